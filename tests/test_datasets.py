import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets import canonical_order, load_image, load_split, make_synthetic_split, write_synthetic_coco
from datasets.synthetic import COLOURS, NEW_COLOURS, NEW_SHAPES, PRETRAIN_WORLD, SHAPES, ShapeWorld
from conftest import error_of

CHESS = Path(__file__).resolve().parent.parent / "datasets" / "chess-pieces"


# ---------------------------------------------------------------- helpers


def write_coco(directory: Path, images, annotations, categories, json_name="_annotations.coco.json", image_dir=None):
    """Write a COCO JSON plus a grey PNG for every image entry (sized from the entry or 64x48)."""
    directory.mkdir(parents=True, exist_ok=True)
    image_dir = directory if image_dir is None else image_dir
    image_dir.mkdir(parents=True, exist_ok=True)
    for entry in images:
        Image.new("RGB", (entry.get("width", 64), entry.get("height", 48)), (128, 128, 128)).save(image_dir / entry["file_name"])
    path = directory / json_name
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def image(i, width=100, height=50):
    return {"id": i, "file_name": f"img{i}.png", "width": width, "height": height}


def ann(i, image_id, category_id, bbox, **extra):
    return {"id": i, "image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}


CATS = [{"id": 0, "name": "things"}, {"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]


@pytest.fixture
def small(tmp_path):
    """Roboflow layout: 3 images, two classes, one image without annotations."""
    write_coco(
        tmp_path / "train",
        [image(1), image(2), image(3)],
        [ann(1, 1, 1, [10, 10, 20, 10]), ann(2, 1, 1, [50, 5, 10, 10]), ann(3, 1, 2, [0, 0, 100, 50]), ann(4, 2, 2, [20, 20, 10, 10])],
        CATS,
    )
    return tmp_path


# ---------------------------------------------------------------- bundled chess dataset


@pytest.mark.parametrize("split, n_images", [("train", 24), ("valid", 10), ("test", 10)])
def test_chess_split_counts_match_raw_json(split, n_images):
    raw = json.loads((CHESS / split / "_annotations.coco.json").read_text())
    usable = [a for a in raw["annotations"] if a.get("iscrowd", 0) == 0 and a["bbox"][2] * a["bbox"][3] > 0]
    used_ids = {a["category_id"] for a in raw["annotations"]}
    expected_classes = [c["name"] for c in sorted(raw["categories"], key=lambda c: c["id"]) if c["id"] in used_ids]

    data = load_split(CHESS, split)

    assert len(data.images) == n_images == len(raw["images"])
    assert sum(len(b) for im in data.images for b in im.boxes_by_class.values()) == len(usable)
    assert data.class_names == expected_classes
    assert "pieces" not in data.class_names  # id 0 placeholder, used by no annotation
    # valid/test use the 12 piece classes; train also has one box labelled plain "bishop" (id 1).
    assert len(data.class_names) == (13 if split == "train" else 12)
    positives = data.samples()
    assert sum(len(s.boxes) for s in positives) == len(usable)
    assert all(0 <= v <= 1 for s in positives for box in s.boxes for v in box)


def test_chess_image_without_annotations_yields_only_negatives():
    raw = json.loads((CHESS / "test" / "_annotations.coco.json").read_text())
    annotated = {a["image_id"] for a in raw["annotations"]}
    (empty_id,) = [im["id"] for im in raw["images"] if im["id"] not in annotated]

    data = load_split(CHESS, "test")
    everything = data.samples(negatives_per_positive=1000)
    for_empty = [s for s in everything if s.image_id == empty_id]

    assert len(for_empty) == len(data.class_names)
    assert all(s.boxes == () for s in for_empty)
    assert not [s for s in data.samples() if s.image_id == empty_id]


def test_val_and_valid_are_aliases(tmp_path):
    assert load_split(CHESS, "val").source == CHESS / "valid" / "_annotations.coco.json"
    write_coco(tmp_path / "val", [image(1)], [ann(1, 1, 1, [0, 0, 10, 10])], CATS)
    assert load_split(tmp_path, "valid").source == tmp_path / "val" / "_annotations.coco.json"


# ---------------------------------------------------------------- samples


def test_one_sample_per_image_class_with_all_boxes_in_canonical_order(small):
    samples = load_split(small, "train").samples()
    assert [(s.image_id, s.class_name, len(s.boxes)) for s in samples] == [(1, "cat", 2), (1, "dog", 1), (2, "dog", 1)]
    cats = samples[0].boxes
    assert cats == ((0.5, 0.1, 0.6, 0.3), (0.1, 0.2, 0.3, 0.4))  # upper box (smaller center y) first
    assert samples[0].image_path == small / "train" / "img1.png"


def test_canonical_order_sorts_by_center_y_then_x():
    boxes = [(0.5, 0.5, 0.7, 0.7), (0.1, 0.5, 0.3, 0.7), (0.0, 0.0, 0.2, 0.2)]
    assert canonical_order(boxes) == ((0.0, 0.0, 0.2, 0.2), (0.1, 0.5, 0.3, 0.7), (0.5, 0.5, 0.7, 0.7))


def test_negatives_are_counted_deterministic_and_seeded():
    data = load_split(CHESS, "train")
    n_pos = len(data.samples())
    half = data.samples(negatives_per_positive=0.5, seed=1)
    negatives = [(s.image_id, s.class_name) for s in half if not s.boxes]

    assert len(negatives) == round(0.5 * n_pos)
    assert all(s.class_name not in im.boxes_by_class for s in half if not s.boxes for im in data.images if im.image_id == s.image_id)
    assert half == data.samples(negatives_per_positive=0.5, seed=1)
    other = [(s.image_id, s.class_name) for s in data.samples(negatives_per_positive=0.5, seed=2) if not s.boxes]
    assert other != negatives
    assert error_of(data.samples, negatives_per_positive=-1).startswith("negatives_per_positive")


# ---------------------------------------------------------------- categories


def test_category_zero_is_a_class_when_annotations_use_it(tmp_path):
    write_coco(tmp_path / "train", [image(1)], [ann(1, 1, 0, [0, 0, 10, 10]), ann(2, 1, 2, [20, 0, 10, 10])], CATS)
    assert load_split(tmp_path, "train").class_names == ["things", "dog"]


def test_classes_filter_and_rename(small):
    renamed = load_split(small, "train", rename={"cat": "small cat"})
    assert renamed.class_names == ["small cat", "dog"]
    assert "small cat" in renamed.images[0].boxes_by_class

    only_dogs = load_split(small, "train", classes=["dog"])
    assert only_dogs.class_names == ["dog"]
    assert {s.class_name for s in only_dogs.samples(negatives_per_positive=10)} == {"dog"}

    merged = load_split(small, "train", rename={"cat": "pet", "dog": "pet"})
    assert merged.class_names == ["pet"] and len(merged.images[0].boxes_by_class["pet"]) == 3


def test_unknown_class_names_are_user_errors(small):
    message = error_of(load_split, small, "train", classes=["cow"])
    assert message.startswith("classes") and "'cow'" in message and "cat" in message and "dog" in message
    message = error_of(load_split, small, "train", rename={"cow": "bull"})
    assert message.startswith("rename") and "'cow'" in message and "cat" in message


# ---------------------------------------------------------------- boxes


def test_boxes_are_clipped_degenerate_dropped_with_one_warning_and_crowd_excluded(tmp_path):
    annotations = [
        ann(1, 1, 1, [-10, -10, 30, 20]),  # clipped to [0, 0, 20, 10]
        ann(2, 1, 1, [90, 40, 50, 50]),  # clipped to [90, 40, 100, 50]
        ann(3, 1, 1, [10, 10, 0, 5]),  # zero width
        ann(4, 1, 1, [200, 10, 5, 5]),  # fully outside
        ann(5, 1, 2, [0, 0, 50, 50], iscrowd=1),
        ann(6, 1, 2, [10, 10, 10, 10], iscrowd=0),
    ]
    write_coco(tmp_path / "train", [image(1)], annotations, CATS)
    with pytest.warns(UserWarning, match="dropped 2 box") as record:
        data = load_split(tmp_path, "train")
    assert len(record) == 1
    assert data.images[0].boxes_by_class == {"cat": [(0.0, 0.0, 0.2, 0.2), (0.9, 0.8, 1.0, 1.0)], "dog": [(0.1, 0.2, 0.2, 0.4)]}


def test_missing_width_height_are_read_from_the_image(tmp_path):
    directory = tmp_path / "train"
    write_coco(directory, [{"id": 1, "file_name": "a.png"}], [ann(1, 1, 1, [16, 12, 32, 24])], CATS)
    Image.new("RGB", (64, 48)).save(directory / "a.png")
    record = load_split(tmp_path, "train").images[0]
    assert (record.width, record.height) == (64, 48)
    assert record.boxes_by_class["cat"] == [(0.25, 0.25, 0.75, 0.75)]


def test_plain_coco_layout_with_images_folder_and_direct_json(tmp_path):
    path = write_coco(tmp_path, [image(1)], [ann(1, 1, 2, [0, 0, 50, 25])], CATS, json_name="train.json", image_dir=tmp_path / "images")
    by_split = load_split(tmp_path, "train")
    assert by_split.images[0].path == tmp_path / "images" / "img1.png"
    assert by_split.images[0].boxes_by_class == {"dog": [(0.0, 0.0, 0.5, 0.5)]}
    assert load_split(path, "whatever").images == by_split.images


# ---------------------------------------------------------------- bad input


def test_missing_dataset_and_unknown_split(tmp_path, small):
    assert "dataset not found" in error_of(load_split, tmp_path / "nope", "train")
    message = error_of(load_split, small, "test")
    assert "'test' not found" in message and "train" in message
    (small / "test").mkdir()
    assert "_annotations.coco.json" in error_of(load_split, small, "test")


def test_malformed_json_reports_line_and_column(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "_annotations.coco.json").write_text('{"images": [],\n  "annotations": [,]}')
    message = error_of(load_split, tmp_path, "train")
    assert "_annotations.coco.json" in message and "line 2, column 19" in message


def test_structural_problems_are_user_errors(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"images": [], "categories": []}))
    assert "'annotations'" in error_of(load_split, path, "train")

    write_coco(tmp_path / "b", [image(1)], [{"id": 1, "image_id": 1, "bbox": [0, 0, 1, 1]}], CATS)
    assert "category_id" in error_of(load_split, tmp_path / "b" / "_annotations.coco.json", "train")

    write_coco(tmp_path / "c", [image(1)], [ann(1, 7, 1, [0, 0, 1, 1])], CATS)
    message = error_of(load_split, tmp_path / "c" / "_annotations.coco.json", "train")
    assert "unknown image_id" in message and "7" in message

    write_coco(tmp_path / "d", [image(1)], [ann(1, 1, 9, [0, 0, 1, 1])], CATS)
    assert "unknown category_id" in error_of(load_split, tmp_path / "d" / "_annotations.coco.json", "train")

    write_coco(tmp_path / "e", [image(1)], [ann(1, 1, 1, [0, 0, 1])], CATS)
    assert "bbox" in error_of(load_split, tmp_path / "e" / "_annotations.coco.json", "train")


def test_bad_images_raise_with_hint_or_are_skipped(small):
    (small / "train" / "img2.png").unlink()
    (small / "train" / "img3.png").write_bytes(b"not an image")
    message = error_of(load_split, small, "train")
    assert "2 image file(s)" in message and "img2.png" in message and "img3.png" in message
    assert "skip_bad_images=True" in message

    with pytest.warns(UserWarning, match="skipped 2"):
        data = load_split(small, "train", skip_bad_images=True)
    assert [im.image_id for im in data.images] == [1]


def test_empty_split_is_a_user_error(tmp_path):
    write_coco(tmp_path / "train", [], [], CATS)
    assert "has no images" in error_of(load_split, tmp_path, "train")


# ---------------------------------------------------------------- image decoding


def test_load_image_applies_exif_orientation(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(pixels).save(tmp_path / "r.jpg", exif=exif, quality=95)

    img = load_image(tmp_path / "r.jpg")
    assert img.size == (20, 40) and img.mode == "RGB"
    assert img.getpixel((10, 5))[0] > 200  # the red half is now on top

    # A split without width/height in the JSON gets the displayed (rotated) size.
    write_coco(tmp_path / "train", [], [], CATS)
    (tmp_path / "train" / "_annotations.coco.json").write_text(json.dumps(
        {"images": [{"id": 1, "file_name": "../r.jpg"}], "annotations": [ann(1, 1, 1, [0, 0, 20, 20])], "categories": CATS}
    ))
    record = load_split(tmp_path, "train").images[0]
    assert (record.width, record.height) == (20, 40)


def palette_image(transparent: bool) -> Image.Image:
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 1, 2, 3])
    if transparent:
        img.info["transparency"] = 1
    return img


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 0)), (255, 255, 255)),  # transparent -> white
        (lambda: Image.new("RGBA", (4, 4), (0, 0, 0, 128)), (127, 127, 127)),  # half black on white
        (lambda: Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),
        (lambda: Image.new("L", (4, 4), 100), (100, 100, 100)),
        (lambda: Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
        (lambda: Image.new("I;16", (4, 4), 65535), (255, 255, 255)),
        (lambda: Image.new("I;16", (4, 4), 32896), (128, 128, 128)),
        (lambda: palette_image(transparent=False), (1, 2, 3)),
        (lambda: palette_image(transparent=True), (255, 255, 255)),
    ],
)
def test_load_image_converts_modes_to_rgb(tmp_path, make, expected):
    source = make()
    path = tmp_path / ("x.tiff" if source.mode == "CMYK" else "x.png")
    source.save(path)
    img = load_image(path)
    assert img.mode == "RGB"
    assert all(abs(a - b) <= 1 for a, b in zip(img.getpixel((1, 1)), expected))


def test_load_image_errors_name_the_file_and_close_it(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8garbage")
    assert "broken.jpg" in error_of(load_image, bad)
    assert "missing.png" in error_of(load_image, tmp_path / "missing.png")

    good = tmp_path / "ok.png"
    Image.new("RGB", (8, 8)).save(good)
    load_image(good)
    open_files = {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}
    assert str(good.resolve()) not in open_files


# ---------------------------------------------------------------- synthetic data


def test_synthetic_is_deterministic_and_seeded():
    a, b = make_synthetic_split(6, seed=3), make_synthetic_split(6, seed=3)
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert [x.boxes_by_class for x in a] == [y.boxes_by_class for y in b]
    c = make_synthetic_split(6, seed=4)
    assert not np.array_equal(np.asarray(a[0].image), np.asarray(c[0].image))
    valid = make_synthetic_split(6, seed=3, split="valid")
    assert not np.array_equal(np.asarray(a[0].image), np.asarray(valid[0].image))


def _object_pixels(image: Image.Image) -> np.ndarray:
    """The pixels of the image's one flat-coloured object: its exact colour is the most common one,
    since the noisy background (>= 90 away in colour) almost never repeats an RGB triple."""
    pixels = np.asarray(image).reshape(-1, 3)
    values, counts = np.unique(pixels, axis=0, return_counts=True)
    return (np.asarray(image) == values[counts.argmax()]).all(axis=-1)


def test_synthetic_boxes_are_the_exact_extent_of_each_shape():
    world = ShapeWorld(shapes=SHAPES, backgrounds=("noise",), max_objects=1, min_side=0.1)
    kinds = set()
    for item in make_synthetic_split(60, seed=0, world=world):
        if not item.boxes_by_class:
            continue
        (name, [(x0, y0, x1, y1)]), = item.boxes_by_class.items()
        ys, xs = np.nonzero(_object_pixels(item.image))
        w, h = item.image.size
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h)), name
        kinds.add(name)
    assert len(kinds) >= 6


def test_synthetic_sizes_span_the_world_range_of_the_shorter_side():
    world = ShapeWorld(shapes=("square",), max_objects=6, min_side=0.04, max_side=0.5)
    sides = []
    for item in make_synthetic_split(60, seed=1, world=world):
        w, h = item.image.size
        for x0, y0, x1, y1 in item.boxes_by_class.get("square", []):
            sides.append((x1 - x0) * w / min(w, h))
            assert (x1 - x0) * w == pytest.approx((y1 - y0) * h)  # squares stay square
    assert 0.04 - 0.01 <= min(sides) < 0.07 and 0.35 < max(sides) <= 0.5 + 0.01


def test_synthetic_colour_is_not_the_class():
    world = ShapeWorld(shapes=("square", "circle"), backgrounds=("noise",), max_objects=1, min_side=0.15)
    colours_seen: dict[str, set[str]] = {}
    for item in make_synthetic_split(80, seed=2, world=world):
        for name, [(x0, y0, x1, y1)] in item.boxes_by_class.items():
            w, h = item.image.size
            centre = np.asarray(item.image)[int((y0 + y1) / 2 * h), int((x0 + x1) / 2 * w)].astype(int)
            nearest = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - centre).max())
            assert np.abs(np.array(COLOURS[nearest]) - centre).max() <= 15
            colours_seen.setdefault(name, set()).add(nearest)
    assert all(len(seen) >= 5 for seen in colours_seen.values()), colours_seen


def test_synthetic_colour_named_classes_name_the_colour_drawn():
    world = ShapeWorld(shapes=("square",), colours=("red", "blue"), colour_named=True, backgrounds=("noise",),
                       max_objects=1, min_side=0.15)
    assert world.class_names == ["red square", "blue square"]
    for item in make_synthetic_split(20, seed=3, world=world):
        for name, [(x0, y0, x1, y1)] in item.boxes_by_class.items():
            w, h = item.image.size
            centre = np.asarray(item.image)[int((y0 + y1) / 2 * h), int((x0 + x1) / 2 * w)].astype(int)
            assert np.abs(np.array(COLOURS[name.split()[0]]) - centre).max() <= 15


def test_synthetic_images_vary_in_size_count_and_overlap():
    items = make_synthetic_split(60, seed=4, world=ShapeWorld(shapes=SHAPES))
    sizes = {item.image.size for item in items}
    ratios = {round(w / h, 2) for w, h in sizes}
    counts = [sum(len(b) for b in item.boxes_by_class.values()) for item in items]
    assert len(ratios) >= 4 and min(min(s) for s in sizes) >= 128 and max(min(s) for s in sizes) <= 256
    assert min(counts) == 0 and max(counts) >= 8
    assert any(len(b) >= 3 for item in items for b in item.boxes_by_class.values())  # several of one class
    boxes = [b for item in items for bs in item.boxes_by_class.values() for b in bs]
    overlapping = sum(a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
                      for item in items for bs in [[b for v in item.boxes_by_class.values() for b in v]]
                      for i, a in enumerate(bs) for b in bs[i + 1:])
    assert len(boxes) > 200 and overlapping > 5


def test_pretraining_world_holds_shapes_and_colours_back():
    assert not set(PRETRAIN_WORLD.shapes) & set(NEW_SHAPES) and not set(PRETRAIN_WORLD.colours) & set(NEW_COLOURS)
    assert set(PRETRAIN_WORLD.shapes) | set(NEW_SHAPES) == set(SHAPES)


def test_write_synthetic_coco_round_trips_through_load_split(tmp_path):
    write_synthetic_coco(tmp_path, n_train=5, n_valid=3, n_test=0, seed=7, image_size=96)
    assert not (tmp_path / "test").exists()
    data = load_split(tmp_path, "train")
    expected = make_synthetic_split(5, seed=7, image_size=96)

    assert data.class_names == ["circle", "square", "triangle"]  # placeholder "shapes" skipped
    for record, item in zip(data.images, expected):
        assert np.array_equal(np.asarray(load_image(record.path)), np.asarray(item.image))
        assert record.boxes_by_class.keys() == item.boxes_by_class.keys()
        for name, boxes in item.boxes_by_class.items():
            assert np.allclose(record.boxes_by_class[name], boxes, atol=1e-12)
    assert len(load_split(tmp_path, "val").images) == 3


def test_synthetic_rejects_unknown_shapes():
    assert "heptagon" in error_of(make_synthetic_split, 1, 0, shapes=("heptagon",))


def test_no_warning_for_clean_data():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_split(CHESS, "valid")


def test_pretraining_world_is_the_easier_part_of_the_world():
    items = make_synthetic_split(40, seed=5, world=PRETRAIN_WORLD)
    counts = [sum(len(b) for b in item.boxes_by_class.values()) for item in items]
    assert max(counts) <= 4 and {n for item in items for n in item.boxes_by_class} <= set(PRETRAIN_WORLD.shapes)


def test_the_dataset_loaders_import_without_torch():
    """`datasets/` reads files only: loading the model package (torch) for an error type or an atomic
    write would cost seconds at every `python -m datasets.inspect`."""
    code = ("import sys, datasets, datasets.synthetic, datasets.formats, datasets.parquet; "
            "print(sorted(m for m in ('torch', 'moondream2.moondream', 'finetune.checkpoint') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
