"""examples/detect_with_finetuned.ipynb runs top to bottom with plain Python, as Jupyter's "Run all"
would, and leaves what its cells say: metrics of both models, agreeing loaders, a strict merged file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from datasets import load_image
from moondream2 import MoondreamConfig, MoondreamModel

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "detect_with_finetuned.ipynb"


def code_cells(path: Path) -> list[dict]:
    return [cell for cell in json.loads(path.read_text())["cells"] if cell["cell_type"] == "code"]


def run_notebook(path: Path, parameters: dict) -> dict:
    """Every code cell in order in one namespace; `parameters` are set right after the cell tagged
    "parameters" (papermill's convention), as a user would edit them there. A cell that raises fails
    the caller, with the cell's number in the traceback."""
    namespace: dict = {"__name__": "__main__"}
    for index, cell in enumerate(code_cells(path)):
        exec(compile("".join(cell["source"]), f"{path.name}, code cell {index}", "exec"), namespace)
        if "parameters" in cell["metadata"].get("tags", []):
            namespace.update(parameters)
    return namespace


@pytest.fixture(scope="module")
def notebook(tmp_path_factory) -> dict:
    """The namespace after "Run all" from examples/ (where Jupyter starts). It trains its own adapter
    into a temporary RUN_DIR, whatever runs/quickstart holds, so the run is the same everywhere."""
    out = tmp_path_factory.mktemp("notebook")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(NOTEBOOK.parent)
            return run_notebook(NOTEBOOK, {"CHECKPOINT": out / "absent.safetensors", "RUN_DIR": out})
    finally:
        torch.set_num_threads(threads)  # the process's count again for the tests after


def boxes_of(model: MoondreamModel, namespace: dict) -> list[list[dict]]:
    """Every class on the first two test images: enough chances for a briefly trained model to draw boxes."""
    split, settings = namespace["test_split"], namespace["settings"]
    images = [load_image(record.path) for record in split.images[:2]]
    return [model.detect(image, name, settings)["objects"] for image in images for name in split.class_names]


def test_notebook_is_committed_without_outputs():
    notebook = json.loads(NOTEBOOK.read_text())
    assert notebook["nbformat"] == 4
    cells = code_cells(NOTEBOOK)
    assert cells and all(cell["outputs"] == [] and cell["execution_count"] is None for cell in cells)
    assert sum("parameters" in cell["metadata"].get("tags", []) for cell in cells) == 1


def test_base_and_finetuned_are_scored_on_the_whole_test_split(notebook):
    n_images = len(notebook["test_split"].images)
    for metrics in (notebook["base_metrics"], notebook["finetuned_metrics"]):
        assert {"f1", "map", "map50", "count_error"} <= metrics.keys()
        assert metrics["n_images"] == n_images
    # The checkpoint really changed the model: the same images give other predictions.
    assert notebook["finetuned_eval"].predictions != notebook["base_eval"].predictions


def test_one_call_and_by_hand_loading_give_the_same_model(notebook):
    assert notebook["same"] is True and notebook["unexpected"] == [] and notebook["missing"]
    by_hand, finetuned = boxes_of(notebook["by_hand"], notebook), boxes_of(notebook["finetuned"], notebook)
    assert any(finetuned) and by_hand == finetuned


def test_merged_checkpoint_loads_strictly_and_detects_like_the_adapters(notebook):
    path = Path(notebook["merged_path"])
    assert path.is_file() and path.parent == notebook["RUN_DIR"] / "merged"
    fresh = MoondreamModel(MoondreamConfig.preset(notebook["meta"]["model"]))
    fresh.load_state_dict(load_file(path))  # strict
    merged, adapted = boxes_of(fresh.eval(), notebook), boxes_of(notebook["finetuned"], notebook)
    assert any(adapted)
    coords = ("x_min", "y_min", "x_max", "y_max")
    for boxes, reference in zip(merged, adapted, strict=True):
        assert [[b[k] for k in coords] for b in boxes] == [[b[k] for k in coords] for b in reference]
        assert [b["score"] for b in boxes] == pytest.approx([b["score"] for b in reference], rel=1e-4)


def test_side_by_side_pictures_are_written_and_shown_inline(notebook):
    sheet = notebook["contact_sheet"]
    assert isinstance(sheet, Image.Image) and hasattr(sheet, "_repr_png_")  # what Jupyter draws
    pictures = sorted((notebook["RUN_DIR"] / "pictures").glob("*.png"))
    assert len(pictures) == notebook["N_PICTURES"] + 1  # one pair per image, plus the contact sheet
