import numpy as np
import pytest
from PIL import Image

from finetune.visualize import GT_COLOUR, PRED_COLOUR, contact_sheet, draw_detections


def test_boxes_are_drawn_in_their_colours_and_the_input_is_untouched():
    image = Image.new("RGB", (2048, 1024), (128, 128, 128))
    gt_box, pred_box = (0.25, 0.25, 0.5, 0.75), (0.6, 0.3, 0.9, 0.7)
    out = draw_detections(image, {"cat": [gt_box]}, {"cat": [(pred_box, 0.9)], "dog": [(gt_box, None)]})
    pixels = np.asarray(out)

    assert out.size == image.size and np.all(np.asarray(image) == 128)
    mid_y = 512
    gt_left = int(0.25 * 2048)
    # Ground truth is drawn inward from its edge, thick enough to see at 2048 px.
    assert all(tuple(pixels[mid_y, gt_left + d]) == GT_COLOUR for d in range(4))
    # The prediction on the same box sits just outside it, so both stay visible.
    assert tuple(pixels[mid_y, gt_left - 2]) == PRED_COLOUR
    pred_right = int(0.9 * 2048)
    assert tuple(pixels[mid_y, pred_right + 1]) == PRED_COLOUR
    assert tuple(pixels[mid_y, int(0.75 * 2048)]) == (128, 128, 128)  # inside a box: untouched
    assert tuple(pixels[5, 5]) != (128, 128, 128)  # the legend


def test_line_width_scales_with_image_size():
    def green_run(size):
        image = Image.new("RGB", (size, size), (128, 128, 128))
        row = np.asarray(draw_detections(image, {"cat": [(0.25, 0.25, 0.75, 0.75)]}, {}))[size // 2]
        return int(np.sum(np.all(row == GT_COLOUR, axis=-1)))

    assert green_run(2048) > green_run(256) >= 4


@pytest.mark.parametrize("n, columns, captions, expected", [(5, 2, None, (768, 1152)), (3, 4, ["a", "b", "c"], None)])
def test_contact_sheet_size(n, columns, captions, expected):
    images = [Image.new("RGB", (640, 480), (i * 40, 0, 0)) for i in range(n)]
    sheet = contact_sheet(images, columns=columns, thumb=384, captions=captions)
    if expected:
        assert sheet.size == expected
    else:
        assert sheet.width == 3 * 384 and sheet.height > 384  # one row plus a caption strip
        caption_strip = np.asarray(sheet)[384:, :384]
        assert (caption_strip < 128).any()  # caption text was drawn
    # Each thumbnail keeps its aspect ratio and sits centred in its cell.
    pixels = np.asarray(sheet)
    assert tuple(pixels[192, 0]) == (0, 0, 0) and tuple(pixels[10, 192]) == (255, 255, 255)
