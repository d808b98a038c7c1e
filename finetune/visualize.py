"""Pictures for eyeballing detections: boxes drawn on images, and contact sheets of many.

Ground truth is green, predictions magenta. A prediction's outline is drawn just outside its box
and ground truth just inside, so a perfect prediction shows as two touching rings, not one.
Line width and text size scale with the image, so boxes stay visible on 2048-px photos.
"""

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

Box = Sequence[float]  # normalized (x_min, y_min, x_max, y_max)
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

GT_COLOUR = (0, 200, 0)
PRED_COLOUR = (255, 0, 255)
TEXT_COLOUR = (0, 0, 0)
LEGEND_BACKGROUND = (255, 255, 255)


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
) -> Image.Image:
    """A copy of `image` with labelled ground-truth boxes and (box, score) predictions.

    A score of None (a model that gives none) is drawn as the class name alone.
    """
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    side = max(out.size)
    line, font = max(2, round(side / 400)), load_font(max(12, round(side / 64)))
    for name, boxes in gt.items():
        for box in boxes:
            _draw_box(draw, out.size, box, name, GT_COLOUR, line, font, outside=False)
    for name, scored in pred.items():
        for box, score in scored:
            label = name if score is None else f"{name} {score:.2f}"
            _draw_box(draw, out.size, box, label, PRED_COLOUR, line, font, outside=True)
    _draw_legend(draw, line, font)
    return out


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


def _draw_legend(draw: ImageDraw.ImageDraw, line: int, font: Font) -> None:
    """A two-row key in the top-left corner saying which colour is which."""
    entries = (("ground truth", GT_COLOUR), ("prediction", PRED_COLOUR))
    text_h = max(draw.textbbox((0, 0), text, font=font)[3] for text, _ in entries)
    text_w = max(draw.textlength(text, font=font) for text, _ in entries)
    pad, swatch = 2 * line, text_h
    draw.rectangle((0, 0, 3 * pad + swatch + text_w, pad + 2 * (text_h + pad)), fill=LEGEND_BACKGROUND)
    for row, (text, colour) in enumerate(entries):
        y = pad + row * (text_h + pad)
        draw.rectangle((pad, y, pad + swatch, y + text_h), fill=colour)
        draw.text((2 * pad + swatch, y), text, fill=TEXT_COLOUR, font=font)


def contact_sheet(
    images: Sequence[Image.Image],
    columns: int = 4,
    thumb: int = 384,
    captions: Sequence[str] | None = None,
) -> Image.Image:
    """Tile images as thumb x thumb cells (aspect kept, centred), with a caption strip if given."""
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    font = load_font(max(12, thumb // 20))
    pad = max(2, thumb // 100)
    caption_h = 0 if captions is None else font.getbbox("Ag")[3] + 2 * pad
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * thumb, rows * (thumb + caption_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, image in enumerate(images):
        left, top = (i % columns) * thumb, (i // columns) * (thumb + caption_h)
        tile = image.convert("RGB")
        tile.thumbnail((thumb, thumb))
        sheet.paste(tile, (left + (thumb - tile.width) // 2, top + (thumb - tile.height) // 2))
        if captions is not None:
            text = _fit(draw, captions[i], font, thumb - 2 * pad)
            draw.text((left + pad, top + thumb + pad), text, fill=TEXT_COLOUR, font=font)
    return sheet


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Font, max_width: int) -> str:
    """Shorten `text` with an ellipsis until it fits `max_width` px, so captions stay in their cell."""
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + "...", font=font) > max_width:
        text = text[:-1]
    return text + "..."
