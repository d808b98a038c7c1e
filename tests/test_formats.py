"""Every annotation format `--dataset` reads gives the same split as the same data in COCO, and each
malformed variant stops with one line naming the file and what is wrong.

The data, worked by hand in pixels (x1, y1, x2, y2):
- a.png, 100x50: cat (40, 15, 60, 35), dog (0, 0, 50, 25)
- b.png, 80x60: cat (8, 6, 40, 30)
- c.png, 64x48: nothing (a negative)
so a.png's cat is YOLO `0 0.5 0.5 0.2 0.4`, normalised (0.4, 0.3, 0.6, 0.7).
"""

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datasets import has_split, load_split
from datasets.formats import dataset_format
from conftest import error_of

SIZES = {"a.png": (100, 50), "b.png": (80, 60), "c.png": (64, 48)}
PIXEL_BOXES = {"a.png": [("cat", (40, 15, 60, 35)), ("dog", (0, 0, 50, 25))], "b.png": [("cat", (8, 6, 40, 30))],
               "c.png": []}
CLASSES = ["cat", "dog"]
EXPECTED = [  # (width, height, {class: normalised boxes}), by hand
    (100, 50, {"cat": [(0.4, 0.3, 0.6, 0.7)], "dog": [(0.0, 0.0, 0.5, 0.5)]}),
    (80, 60, {"cat": [(0.1, 0.1, 0.5, 0.5)]}),
    (64, 48, {}),
]


def write_images(directory: Path, names=tuple(SIZES)) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", SIZES[name], (40 * i, 90, 160)).save(directory / name)


def normalised(box, name):
    width, height = SIZES[name]
    return (box[0] / width, box[1] / height, box[2] / width, box[3] / height)


def image_bytes(name: str) -> bytes:
    """A PNG of the image's size, as a Hugging Face Image column embeds it."""
    buffer = io.BytesIO()
    Image.new("RGB", SIZES[name], (1, 90, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


def summary(split):
    """(width, height, {class: boxes}) per image, rounded: formats differ in float noise only."""
    return [(r.width, r.height, {k: [tuple(round(v, 9) for v in b) for b in boxes]
                                 for k, boxes in r.boxes_by_class.items()}) for r in split.images]


# ---------------------------------------------------------------- writers, one per format


def write_coco(root: Path) -> Path:
    write_images(root / "train")
    names = list(SIZES)
    coco = {"images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
            "categories": [{"id": 0, "name": "animals"}, {"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
            "annotations": [{"id": len(names) * i + j, "image_id": i, "category_id": 1 + CLASSES.index(c),
                             "bbox": [x1, y1, x2 - x1, y2 - y1]}
                            for i, n in enumerate(names) for j, (c, (x1, y1, x2, y2)) in enumerate(PIXEL_BOXES[n])]}
    (root / "train" / "_annotations.coco.json").write_text(json.dumps(coco))
    return root


YOLO_LABELS = {"a.png": "0 0.5 0.5 0.2 0.4\n1 0.25 0.25 0.5 0.5\n", "b.png": "0 0.3 0.3 0.4 0.4\n", "c.png": ""}


def write_yolo(root: Path, layout: str = "ultralytics", labels: dict | None = None,
               yaml_text: str = "names: [cat, dog]\n") -> Path:
    images, label_dir = ((root / "images" / "train", root / "labels" / "train") if layout == "ultralytics"
                         else (root / "train" / "images", root / "train" / "labels"))
    write_images(images)
    label_dir.mkdir(parents=True)
    for name, text in (YOLO_LABELS if labels is None else labels).items():
        (label_dir / f"{Path(name).stem}.txt").write_text(text)
    (root / "data.yaml").write_text(yaml_text)
    return root


def voc_xml(name: str, objects: list[tuple[str, tuple]]) -> str:
    """VOC devkit coordinates: 1-based, corners inclusive, so pixel box (x1, y1, x2, y2) is (x1+1, y1+1, x2, y2)."""
    width, height = SIZES[name]
    parts = "".join(f"<object><name>{c}</name><difficult>0</difficult><bndbox><xmin>{x1 + 1}</xmin>"
                    f"<ymin>{y1 + 1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
                    for c, (x1, y1, x2, y2) in objects)
    return (f"<annotation><filename>{name}</filename><size><width>{width}</width><height>{height}</height>"
            f"<depth>3</depth></size>{parts}</annotation>")


def write_voc(root: Path) -> Path:
    write_images(root / "JPEGImages")
    (root / "Annotations").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for name, objects in PIXEL_BOXES.items():
        (root / "Annotations" / f"{Path(name).stem}.xml").write_text(voc_xml(name, objects))
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nb\nc\n")
    return root


def write_csv(root: Path, header: bool = False) -> Path:
    write_images(root / "images")  # SKU-110K keeps its images in images/
    rows = ["image,x1,y1,x2,y2,label,width,height"] if header else []
    for name, objects in PIXEL_BOXES.items():
        rows += [f"{name},{x1},{y1},{x2},{y2},{c},{SIZES[name][0]},{SIZES[name][1]}" for c, (x1, y1, x2, y2) in objects]
        rows += [] if objects else [f"{name},,,,,,,"]
    (root / "annotations_train.csv").write_text("\n".join(rows) + "\n")
    return root


def write_jsonl(root: Path, normalise: bool = False) -> Path:
    write_images(root)
    lines = [json.dumps({"image": name, "objects": [
        {"label": c, "bbox": list(normalised(box, name) if normalise else box)} for c, box in objects]})
        for name, objects in PIXEL_BOXES.items()]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root


HF_FEATURES = {"info": {"features": {
    "image": {"_type": "Image"},
    "objects": {"feature": {"bbox": {"feature": {"dtype": "float32", "_type": "Value"}, "length": 4, "_type": "Sequence"},
                            "category": {"names": CLASSES, "_type": "ClassLabel"}}, "_type": "Sequence"}}}}


def write_parquet(root: Path, table: pa.Table, name: str = "data/train-00000-of-00001.parquet") -> Path:
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / name)
    return root


def hf_detection_table() -> pa.Table:
    """As `datasets` saves a detection set (cppe-5 style): Image bytes, objects with COCO bbox and ClassLabel ids."""
    rows = [{"image": {"bytes": image_bytes(n), "path": n},
             "objects": {"bbox": [[x1, y1, x2 - x1, y2 - y1] for _, (x1, y1, x2, y2) in PIXEL_BOXES[n]],
                         "category": [CLASSES.index(c) for c, _ in PIXEL_BOXES[n]]}} for n in SIZES]
    table = pa.Table.from_pylist(rows)
    return table.replace_schema_metadata({"huggingface": json.dumps(HF_FEATURES)})


def waste_table() -> pa.Table:
    """As moondream/waste_detection stores it: normalised [x1, y1, x2, y2] `boxes` and text `labels`."""
    return pa.Table.from_pylist([{"image": {"bytes": image_bytes(n), "path": None},
                                  "boxes": [list(normalised(b, n)) for _, b in PIXEL_BOXES[n]],
                                  "labels": [c for c, _ in PIXEL_BOXES[n]]} for n in SIZES])


FORMATS = {
    "yolo-ultralytics": (write_yolo, "yolo"),
    "yolo-roboflow": (lambda root: write_yolo(root, "roboflow"), "yolo"),
    "voc": (write_voc, "voc"),
    "csv": (write_csv, "csv"),
    "csv-header": (lambda root: write_csv(root, header=True), "csv"),
    "jsonl-pixels": (write_jsonl, "jsonl (pixel coordinates)"),
    "jsonl-normalised": (lambda root: write_jsonl(root, normalise=True), "jsonl (normalised coordinates)"),
    "parquet-hf": (lambda root: write_parquet(root, hf_detection_table()), "parquet (pixel coordinates)"),
    "parquet-waste": (lambda root: write_parquet(root, waste_table(), "train.parquet"),
                      "parquet (normalised coordinates)"),
}


# ---------------------------------------------------------------- every format reads the same data


def test_the_coco_fixture_is_the_hand_worked_data(tmp_path):
    split = load_split(write_coco(tmp_path), "train")
    assert split.class_names == CLASSES and summary(split) == EXPECTED and split.format == "coco"


@pytest.mark.parametrize("name", FORMATS)
def test_each_format_loads_the_same_split_as_coco(tmp_path, name):
    write, format_name = FORMATS[name]
    coco = load_split(write_coco(tmp_path / "coco"), "train")
    split = load_split(write(tmp_path / name), "train")
    assert split.format == format_name
    assert split.class_names == coco.class_names == CLASSES
    assert summary(split) == summary(coco) == EXPECTED
    as_tuples = lambda s: [(x.class_name, tuple(tuple(round(v, 9) for v in b) for b in x.boxes)) for x in s]
    assert as_tuples(split.samples(1.0, seed=3)) == as_tuples(coco.samples(1.0, seed=3))
    assert all(r.path.is_file() and r.path.resolve().is_relative_to((tmp_path / name).resolve()) for r in split.images)
    assert has_split(tmp_path / name, "train") and not has_split(tmp_path / name, "test")


def test_yolo_oracle_row_in_pixels(tmp_path):
    split = load_split(write_yolo(tmp_path, labels={"a.png": "0 0.5 0.5 0.2 0.4\n", "b.png": "", "c.png": ""}), "train")
    record = split.images[0]
    x1, y1, x2, y2 = record.boxes_by_class["cat"][0]
    assert (x1 * record.width, y1 * record.height, x2 * record.width, y2 * record.height) == pytest.approx((40, 15, 60, 35))


def test_a_yolo_image_without_a_label_file_is_a_negative_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="1 image\\(s\\) have no label file .*c.png.*negatives"):
        split = load_split(write_yolo(tmp_path, labels={k: v for k, v in YOLO_LABELS.items() if k != "c.png"}), "train")
    assert summary(split) == EXPECTED


def test_yolo_names_as_a_mapping_and_data_yaml_given_directly(tmp_path):
    write_yolo(tmp_path, yaml_text="path: /elsewhere\ntrain: ../train/images\nnc: 2\nnames:\n  0: cat\n  1: dog\n")
    assert summary(load_split(tmp_path / "data.yaml", "train")) == EXPECTED


def test_rename_and_classes_work_the_same_in_every_format(tmp_path):
    split = load_split(write_voc(tmp_path), "train", classes=["kitty"], rename={"cat": "kitty"})
    assert split.class_names == ["kitty"] and summary(split)[1] == (80, 60, {"kitty": [(0.1, 0.1, 0.5, 0.5)]})


def test_referring_expressions_become_free_text_classes(tmp_path):
    """RefCOCO as lmms-lab stores it: one row per box, a COCO bbox and a list of phrases for it."""
    rows = [{"image": {"bytes": image_bytes("a.png"), "path": "COCO_1.jpg"}, "bbox": [40.0, 15.0, 20.0, 20.0],
             "answer": ["cat on the left", "small cat"]},
            {"image": {"bytes": image_bytes("a.png"), "path": "COCO_1.jpg"}, "bbox": [0.0, 0.0, 50.0, 25.0],
             "answer": ["dog at top"]}]
    split = load_split(write_parquet(tmp_path, pa.Table.from_pylist(rows), "data/val-00000-of-00001.parquet"), "valid")
    assert len(split.images) == 1  # both rows show the same image
    assert split.class_names == ["cat on the left", "dog at top", "small cat"]
    assert summary(split)[0][2] == {"cat on the left": [(0.4, 0.3, 0.6, 0.7)], "small cat": [(0.4, 0.3, 0.6, 0.7)],
                                    "dog at top": [(0.0, 0.0, 0.5, 0.5)]}


def test_parquet_image_paths_are_read_relative_to_the_dataset(tmp_path):
    write_images(tmp_path / "pics")
    rows = [{"image": f"pics/{n}", "labels": [c for c, _ in PIXEL_BOXES[n]],
             "boxes": [list(b) for _, b in PIXEL_BOXES[n]]} for n in SIZES]
    split = load_split(write_parquet(tmp_path, pa.Table.from_pylist(rows), "train/0000.parquet"), "train")
    assert summary(split) == EXPECTED and split.images[0].path == tmp_path / "pics" / "a.png"


def test_a_directory_with_two_formats_is_refused(tmp_path):
    write_jsonl(tmp_path)
    write_csv(tmp_path)
    message = error_of(load_split, tmp_path, "train")
    assert "looks like both csv" in message and "jsonl" in message


# ---------------------------------------------------------------- each malformed variant gets its error


@pytest.mark.parametrize("labels, expected", [
    ({"a.png": "0 0.5 0.5 0.2\n"}, "a.txt: line 1: 4 values, expected 5"),
    ({"a.png": "\n0 0.5 half 0.2 0.4\n"}, "a.txt: line 2: '0 0.5 half 0.2 0.4' is not 'class cx cy w h' numbers"),
    ({"b.png": "7 0.5 0.5 0.2 0.4\n"}, "b.txt: line 1: unknown class id 7; data.yaml names ids 0..1"),
    ({"a.png": "0 50 25 20 40\n"}, "a.txt: line 1: box 50 25 20 40 is outside the image"),
    ({"a.png": "0 0.5 0.5 0.2 0.4 0.1 0.1 0.2 0.2\n"}, "segmentation polygons are not read"),
])
def test_bad_yolo_rows(tmp_path, labels, expected):
    assert expected in error_of(load_split, write_yolo(tmp_path, labels=labels), "train")


@pytest.mark.parametrize("yaml_text, expected", [
    ("names: [cat, dog\n", "data.yaml: malformed YAML"),
    ("nc: 2\n", "data.yaml: needs 'names'"),
    ("nc: 3\nnames: [cat, dog]\n", "data.yaml: nc is 3 but 'names' lists 2 classes"),
    ("names: [cat, no]\n", "data.yaml: class 1 has the name False; quote it"),
])
def test_bad_data_yaml(tmp_path, yaml_text, expected):
    assert expected in error_of(load_split, write_yolo(tmp_path, yaml_text=yaml_text), "train")


def test_yolo_missing_labels_folder_and_split(tmp_path):
    write_yolo(tmp_path, "roboflow")
    assert "splits found: train" in error_of(load_split, tmp_path, "test")
    for file in (tmp_path / "train" / "labels").iterdir():
        file.unlink()
    (tmp_path / "train" / "labels").rmdir()
    assert error_of(load_split, tmp_path, "train").endswith("labels: missing; put the split's label .txt files there")


def test_bad_voc_files(tmp_path):
    root = write_voc(tmp_path)
    xml = root / "Annotations" / "a.xml"
    xml.write_text("<annotation><filename>a.png</filename>")
    assert "a.xml: malformed XML" in error_of(load_split, root, "train")
    xml.write_text(voc_xml("a.png", [("", (1, 1, 5, 5))]))
    assert "a.xml: object 1 has no <name>" in error_of(load_split, root, "train")
    xml.write_text(voc_xml("a.png", [("cat", (1, 1, 5, 5))]).replace("<xmax>5</xmax>", "<xmax>five</xmax>"))
    assert "a.xml: object 1 (cat) needs numeric <bndbox>" in error_of(load_split, root, "train")
    xml.write_text(voc_xml("a.png", []).replace("<filename>a.png", "<filename>../../a.png"))
    assert "a.xml: <filename> has file_name '../../a.png', outside the dataset directory" in error_of(load_split, root, "train")
    xml.unlink()
    assert "train.txt: line 1: image id 'a' has no" in error_of(load_split, root, "train")
    (root / "ImageSets" / "Main" / "train.txt").write_text("../../etc/passwd\n")
    assert "train.txt: line 1 has file_name '../../etc/passwd.xml', outside" in error_of(load_split, root, "train")
    assert "no test.txt listing the split's image ids (splits found: train)" in error_of(load_split, root, "test")


def test_a_missing_image_names_the_file_in_every_format(tmp_path):
    for name, (write, _) in FORMATS.items():
        if name.startswith("parquet"):
            continue  # its images are inside the parquet file
        root = write(tmp_path / name)
        next(root.rglob("b.png")).unlink()
        message = error_of(load_split, root, "train")
        assert "1 image file(s) missing or unreadable" in message, name
        assert ("b.txt has no image" if name.startswith("yolo") else "b.png") in message, name


@pytest.mark.parametrize("row, expected", [
    ("a.png,40,15,60,35,cat", None),
    ("a.png,40,15,60,cat", "line 2: 5 columns, expected 6 or 8"),
    ("a.png,40,15,sixty,35,cat", "line 2: x1,y1,x2,y2 '40,15,sixty,35' are not all numbers"),
    ("a.png,40,15,60,35,", "line 2: the label is empty"),
    ("../a.png,40,15,60,35,cat", "line 2 has file_name '../a.png', outside the dataset directory"),
    ("/etc/passwd,40,15,60,35,cat", "line 2 has file_name '/etc/passwd', outside the dataset directory"),
])
def test_bad_csv_rows(tmp_path, row, expected):
    write_images(tmp_path)
    (tmp_path / "train.csv").write_text(f"b.png,8,6,40,30,cat\n{row}\n")
    if expected is None:
        assert load_split(tmp_path, "train").class_names == ["cat"]
    else:
        assert f"train.csv: {expected}" in error_of(load_split, tmp_path, "train")


def test_a_csv_header_in_another_order_is_refused(tmp_path):
    write_images(tmp_path)
    (tmp_path / "train.csv").write_text("label,image,x1,y1,x2,y2\ncat,a.png,1,2,3,4\n")
    assert "train.csv: line 1: header 'label,image,x1,y1,x2,y2' is not image,x1,y1,x2,y2,label" in error_of(
        load_split, tmp_path, "train")


@pytest.mark.parametrize("line, expected", [
    ('{"image": "a.png", "objects": [}', "line 2: malformed JSON at column"),
    ('{"image": "a.png"}', 'line 2: expected {"image": PATH, "objects": [...]}'),
    ('{"image": "a.png", "objects": [{"bbox": [1, 2, 3, 4]}]}', "line 2: object 1 has no label"),
    ('{"image": "a.png", "objects": [{"label": "cat", "bbox": [1, 2, 3]}]}', "line 2: object 1 (cat) has bbox [1, 2, 3]"),
    ('{"image": "../a.png", "objects": []}', "line 2 has file_name '../a.png', outside the dataset directory"),
])
def test_bad_jsonl_lines(tmp_path, line, expected):
    write_images(tmp_path)
    (tmp_path / "val.jsonl").write_text('{"image": "b.png", "objects": []}\n' + line + "\n")
    assert f"val.jsonl: {expected}" in error_of(load_split, tmp_path, "valid")


@pytest.mark.parametrize("rows, expected", [
    ([{"picture": "a.png", "boxes": [[1, 2, 3, 4]], "labels": ["cat"]}], "no 'image' column"),
    ([{"image": "a.png", "where": [[1, 2, 3, 4]], "labels": ["cat"]}], "found no box column"),
    ([{"image": "a.png", "boxes": [[1, 2, 3, 4], [1, 2, 3, 4]], "labels": ["cat"]}],
     "row 0: 2 box(es) but 1 label(s)"),
    ([{"image": "a.png", "boxes": [[1, 2, 3]], "labels": ["cat"]}], "row 0: boxes [1, 2, 3] is not 4 numbers"),
    ([{"image": "a.png", "boxes": [[1, 2, 3, 4]], "labels": [3]}], "labels are integers (3, ...) but"),
    ([{"image": "../a.png", "boxes": [[1, 2, 3, 4]], "labels": ["cat"]}], "row 0 has file_name '../a.png', outside"),
])
def test_bad_parquet_rows(tmp_path, rows, expected):
    write_images(tmp_path)
    write_parquet(tmp_path, pa.Table.from_pylist(rows), "train.parquet")
    assert expected in error_of(load_split, tmp_path, "train")


def test_missing_splits_name_what_was_found(tmp_path):
    assert "no test.csv or" not in error_of(load_split, write_csv(tmp_path / "csv"), "valid")
    assert "(found: annotations_train.csv)" in error_of(load_split, tmp_path / "csv", "test")
    assert "(found: train.jsonl)" in error_of(load_split, write_jsonl(tmp_path / "jsonl"), "test")
    root = write_parquet(tmp_path / "pq", waste_table(), "data/train-00000-of-00001.parquet")
    assert "no parquet file for split 'test' (found: data/train-00000-of-00001.parquet)" in error_of(load_split, root, "test")
    assert dataset_format(root)[0].name == "parquet"


@pytest.mark.parametrize("name", FORMATS)
def test_a_tiny_training_run_works_on_each_format(tmp_path, name):
    from sft_trainer_detect_grad import DetectGradConfig, main

    root = FORMATS[name][0](tmp_path / "data")
    config = DetectGradConfig(model="tiny", dataset=str(root), output_dir=str(tmp_path / "run"), max_steps=1,
                              eval_interval=100, batch_size=2, lora_rank=4, lora_alpha=8, max_objects=3, num_pictures=0)
    main(config)
    assert (tmp_path / "run" / "moondream_lora_finetune_detect_grad.safetensors").is_file()
