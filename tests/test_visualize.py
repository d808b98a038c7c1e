import numpy as np
import pytest
from PIL import Image

from finetune.visualize import GT_COLOUR, PRED_COLOUR, contact_sheet, draw_detections, scale_up, side_by_side


def test_boxes_are_drawn_in_their_colours_and_the_input_is_untouched():
    image = Image.new("RGB", (2048, 1024), (128, 128, 128))
    gt_box, pred_box = (0.25, 0.25, 0.5, 0.75), (0.6, 0.3, 0.9, 0.7)
    out = draw_detections(image, {"cat": [gt_box]}, {"cat": [(pred_box, 0.9)], "dog": [(gt_box, None)]})
    strip = out.height - image.height  # the key sits in a strip above the image
    pixels = np.asarray(out)[strip:]

    assert out.width == image.width and strip > 0 and np.all(np.asarray(image) == 128)
    mid_y = 512
    gt_left = int(0.25 * 2048)
    # Ground truth is drawn inward from its edge, thick enough to see at 2048 px.
    assert all(tuple(pixels[mid_y, gt_left + d]) == GT_COLOUR for d in range(4))
    # The prediction on the same box sits just outside it, so both stay visible.
    assert tuple(pixels[mid_y, gt_left - 2]) == PRED_COLOUR
    pred_right = int(0.9 * 2048)
    assert tuple(pixels[mid_y, pred_right + 1]) == PRED_COLOUR
    assert tuple(pixels[mid_y, int(0.75 * 2048)]) == (128, 128, 128)  # inside a box: untouched
    assert tuple(pixels[5, 5]) == (128, 128, 128)  # no key over the image


def test_line_width_scales_with_image_size():
    def green_run(size):
        image = Image.new("RGB", (size, size), (128, 128, 128))
        out = draw_detections(image, {"cat": [(0.25, 0.25, 0.75, 0.75)]}, {})
        row = np.asarray(out)[-out.width // 2]  # square image: its middle row, counted from the bottom
        return int(np.sum(np.all(row == GT_COLOUR, axis=-1)))

    assert green_run(2048) > green_run(256) >= 4


@pytest.mark.parametrize("size", [(128, 96), (300, 200), (639, 100)])
def test_small_images_are_scaled_up_to_a_legible_size(size):
    out = draw_detections(Image.new("RGB", size), {"cat": [(0.1, 0.1, 0.5, 0.5)]}, {})
    assert out.width >= 640 and out.width % size[0] == 0  # a whole factor: every pixel a crisp square


def test_the_key_and_title_sit_outside_the_image():
    """Away from the boxes and their label tabs, the drawn image is exactly the scaled-up input."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8))
    gt_box, pred_box = (0.1, 0.5, 0.3, 0.8), (0.6, 0.5, 0.8, 0.7)
    out = draw_detections(image, {"cat": [gt_box]}, {"cat": [(pred_box, 0.5)]}, title="held-out image 7")
    scaled = np.asarray(scale_up(image))
    height, width = scaled.shape[:2]
    assert out.width == width and out.height > height
    drawn = np.asarray(out)[-height:]
    untouched = np.ones((height, width), dtype=bool)
    margin = 80  # covers outlines and label tabs
    for x0, y0, x1, y1 in (gt_box, pred_box):
        untouched[max(0, int(y0 * height) - margin) : int(y1 * height) + margin,
                  max(0, int(x0 * width) - margin) : int(x1 * width) + margin] = False
    assert untouched[:100, :200].all()  # where an in-image key used to go is checked
    assert (drawn[untouched] == scaled[untouched]).all()
    strip = np.asarray(out)[: out.height - height]
    assert (strip == GT_COLOUR).all(-1).any() and (strip == PRED_COLOUR).all(-1).any()
    assert (strip < 64).all(-1).any()  # key and title text


def test_side_by_side_keeps_both_pictures_whole_under_their_titles():
    left, right = Image.new("RGB", (400, 300), (255, 0, 0)), Image.new("RGB", (500, 250), (0, 0, 255))
    both = side_by_side(left, right, titles=("base", "fine-tuned"))
    pixels = np.asarray(both)
    assert 900 < both.width <= 940 and both.height > 300  # both widths, a small gap, a heading
    assert (pixels[-300:, :400] == (255, 0, 0)).all()  # the left picture, whole, at the bottom
    assert (pixels[-250:, -500:] == (0, 0, 255)).all()  # the right one, bottom-aligned
    heading = pixels[: both.height - 300]
    assert (heading[:, :400] < 64).all(-1).any() and (heading[:, -500:] < 64).all(-1).any()  # both titles


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


def test_contact_sheet_cells_can_be_wide_and_short():
    pairs = [Image.new("RGB", (800, 200), (0, 0, 255)) for _ in range(3)]
    sheet = contact_sheet(pairs, columns=1, thumb=768, cell_height=192)
    assert sheet.size == (768, 3 * 192)
    assert (np.asarray(sheet)[2:190, 2:766] == (0, 0, 255)).all()  # each pair fills its cell
