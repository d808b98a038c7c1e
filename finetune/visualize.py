"""Pictures for eyeballing detections: boxes drawn on images, and contact sheets of many.

Ground truth is green, predictions magenta. A prediction's outline is drawn just outside its box
and ground truth just inside, so a perfect prediction shows as two touching rings, not one.
Small images are scaled up first and line width and text size scale with the image, so labels are
legible on 128-px synthetic images and boxes stay visible on 2048-px photos. The key (and a title)
sits in a white strip above the image, never over an object.
"""

import math

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

Box = Sequence[float]  # normalized (x_min, y_min, x_max, y_max)
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

GT_COLOUR = (0, 200, 0)
PRED_COLOUR = (255, 0, 255)
TEXT_COLOUR = (0, 0, 0)
LEGEND_BACKGROUND = (255, 255, 255)
KEY = (("ground truth", GT_COLOUR), ("prediction", PRED_COLOUR))
MIN_SIDE = 640  # longer side, in px, below which an image is scaled up before drawing


def load_font(size: int) -> Font:
    """Pillow's scalable default font at `size` px; the fixed bitmap font on old/minimal Pillow."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1, or built without FreeType
        return ImageFont.load_default()


def draw_detections(
    image: Image.Image,
    gt: dict[str, Sequence[Box]],
    pred: dict[str, Sequence[tuple[Box, float | None]]],
    title: str | None = None,
    min_side: int = MIN_SIDE,
    ground_truth_only: bool = False,
) -> Image.Image:
    """A copy of `image`, scaled up to `min_side`, with labelled boxes under a key (and `title`) strip.

    A score of None (a model that gives none) is drawn as the class name alone. `ground_truth_only`
    leaves predictions out of the key, for pictures of a dataset before any model ran.
    """
    out = scale_up(image.convert("RGB"), min_side)
    draw = ImageDraw.Draw(out)
    line, text = _line_and_text(out)
    font = load_font(text)
    for name, boxes in gt.items():
        for box in boxes:
            _draw_box(draw, out.size, box, name, GT_COLOUR, line, font, outside=False)
    for name, scored in pred.items():
        for box, score in scored:
            label = name if score is None else f"{name} {score:.2f}"
            _draw_box(draw, out.size, box, label, PRED_COLOUR, line, font, outside=True)
    entries = KEY[:1] if ground_truth_only else KEY
    return _stack(_key_strip(out.width, line, font, title, entries), out)


def scale_up(image: Image.Image, min_side: int = MIN_SIDE) -> Image.Image:
    """`image` enlarged by the smallest whole factor that makes its longer side at least `min_side`.

    Whole factors with NEAREST keep every source pixel a crisp square, so the picture shows exactly
    what the model saw, only bigger; images already large enough are returned as they are.
    """
    factor = math.ceil(min_side / max(image.size))
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def _line_and_text(image: Image.Image) -> tuple[int, int]:
    """Outline width and label text size in px for this image: readable at 640 px, visible at 2048."""
    side = max(image.size)
    return max(2, round(side / 320)), max(14, round(side / 40))


def _draw_box(
    draw: ImageDraw.ImageDraw,
    size: tuple[int, int],
    box: Box,
    label: str,
    colour: tuple[int, int, int],
    line: int,
    font: Font,
    outside: bool,
) -> None:
    """Outline plus a filled label tab: above the box for ground truth, below for predictions."""
    width, height = size
    x0, y0, x1, y1 = box[0] * width, box[1] * height, box[2] * width, box[3] * height
    grow = line if outside else 0  # PIL draws outlines inward from the given rectangle
    draw.rectangle((x0 - grow, y0 - grow, x1 + grow, y1 + grow), outline=colour, width=line)
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    tab_w, tab_h = right - left + 2 * line, bottom - top + 2 * line
    tab_y = y1 + grow if outside else y0 - tab_h
    tab_x = min(max(x0 - grow, 0), width - tab_w)
    tab_y = min(max(tab_y, 0), height - tab_h)
    draw.rectangle((tab_x, tab_y, tab_x + tab_w, tab_y + tab_h), fill=colour)
    draw.text((tab_x + line - left, tab_y + line - top), label, fill=TEXT_COLOUR, font=font)


def _key_strip(width: int, line: int, font: Font, title: str | None,
               entries: tuple[tuple[str, tuple[int, int, int]], ...]) -> Image.Image:
    """A white strip `width` px wide: the title (if any), then a swatch and name per colour.

    Entries wrap onto another row when the image is too narrow for both side by side.
    """
    pad, text_h = 2 * line, font.getbbox("Ag")[3]
    swatch = text_h
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    placed, x, y = [], pad, pad + (text_h + pad if title else 0)
    for text, colour in entries:
        entry_w = swatch + pad + scratch.textlength(text, font=font)
        if x > pad and x + entry_w > width - pad:
            x, y = pad, y + text_h + pad
        placed.append((x, y, text, colour))
        x += entry_w + 3 * pad
    strip = Image.new("RGB", (width, y + text_h + pad), LEGEND_BACKGROUND)
    draw = ImageDraw.Draw(strip)
    if title:
        draw.text((pad, pad), _fit(draw, title, font, width - 2 * pad), fill=TEXT_COLOUR, font=font)
    for x, y, text, colour in placed:
        draw.rectangle((x, y, x + swatch, y + text_h), fill=colour)
        draw.text((x + swatch + pad, y), text, fill=TEXT_COLOUR, font=font)
    return strip


def _stack(top: Image.Image, bottom: Image.Image) -> Image.Image:
    """`top` above `bottom`, left-aligned, on white."""
    out = Image.new("RGB", (max(top.width, bottom.width), top.height + bottom.height), LEGEND_BACKGROUND)
    out.paste(top, (0, 0))
    out.paste(bottom, (0, top.height))
    return out


def side_by_side(
    left: Image.Image, right: Image.Image, titles: tuple[str, str] = ("base", "fine-tuned")
) -> Image.Image:
    """Two pictures next to each other, each under its title, for comparing two runs on one image.

    Both sit on panels of the same height, bottom-aligned, so two drawings of the same image line up
    even when one has a taller key strip; neither is resampled, so labels stay sharp.
    """
    left, right = left.convert("RGB"), right.convert("RGB")
    line, text = _line_and_text(left)
    font = load_font(round(1.5 * text))  # headings a step above the labels inside the pictures
    heading, gap = font.getbbox("Ag")[3] + 4 * line, 4 * line
    height = max(left.height, right.height)
    out = Image.new("RGB", (left.width + gap + right.width, heading + height), LEGEND_BACKGROUND)
    draw = ImageDraw.Draw(out)
    for x, panel, title in ((0, left, titles[0]), (left.width + gap, right, titles[1])):
        draw.text((x + 2 * line, 2 * line), _fit(draw, title, font, panel.width - 4 * line), fill=TEXT_COLOUR, font=font)
        out.paste(panel, (x, heading + height - panel.height))
    return out


def contact_sheet(
    images: Sequence[Image.Image],
    columns: int = 4,
    thumb: int = 384,
    captions: Sequence[str] | None = None,
    cell_height: int | None = None,
) -> Image.Image:
    """Tile images as thumb x thumb cells (aspect kept, centred), with a caption strip if given.

    `cell_height` makes cells thumb wide and that tall, so wide pictures (side-by-side pairs) fill
    their cells instead of floating in white space.
    """
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    cell_h = cell_height or thumb
    font = load_font(max(12, min(thumb, cell_h) // 20))
    pad = max(2, min(thumb, cell_h) // 100)
    caption_h = 0 if captions is None else font.getbbox("Ag")[3] + 2 * pad
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * thumb, rows * (cell_h + caption_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, image in enumerate(images):
        left, top = (i % columns) * thumb, (i // columns) * (cell_h + caption_h)
        tile = image.convert("RGB")
        tile.thumbnail((thumb, cell_h))
        sheet.paste(tile, (left + (thumb - tile.width) // 2, top + (cell_h - tile.height) // 2))
        if captions is not None:
            text = _fit(draw, captions[i], font, thumb - 2 * pad)
            draw.text((left + pad, top + cell_h + pad), text, fill=TEXT_COLOUR, font=font)
    return sheet


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Font, max_width: int) -> str:
    """Shorten `text` with an ellipsis until it fits `max_width` px, so captions stay in their cell."""
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + "...", font=font) > max_width:
        text = text[:-1]
    return text + "..."
