"""Each job's files in a folder of its own: references mapped there, and the folder removed whole."""

from __future__ import annotations

from pathlib import Path

import pytest

from comfy_worker.errors import InputError
from comfy_worker.runtime import cleanup


def test_references_to_uploaded_names_point_at_the_jobs_copy() -> None:
    workflow = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "masks/m.png"}},
        "2": {"class_type": "LoadImageMask", "inputs": {"image": "masks/m.png [input]", "channel": "alpha"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "other.png"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo like masks/m.png"}},
    }
    cleanup.isolate_inputs(workflow, ["masks/m.png"], "jobs/j1")
    assert workflow["1"]["inputs"]["image"] == "jobs/j1/masks/m.png"
    assert workflow["2"]["inputs"]["image"] == "jobs/j1/masks/m.png [input]"
    assert workflow["3"]["inputs"]["image"] == "other.png", "names the job did not upload are left alone"
    assert workflow["4"]["inputs"]["text"] == "a photo like masks/m.png", "only whole values are names"


def test_output_prefixes_are_moved_into_the_jobs_folder() -> None:
    workflow = {
        "1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "/portraits/face"}},
        "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": ""}},
    }
    cleanup.isolate_outputs(workflow, "jobs/j1")
    assert workflow["1"]["inputs"]["filename_prefix"] == "jobs/j1/portraits/face"
    assert workflow["2"]["inputs"]["filename_prefix"] == "jobs/j1/ComfyUI"


@pytest.mark.parametrize("prefix", ["../../victim", "a/../../b", ".", ["5", 0], None])
def test_prefixes_that_cannot_be_isolated_are_refused(prefix: object) -> None:
    with pytest.raises(InputError, match="node 9 \\(SaveImage\\) filename_prefix"):
        cleanup.isolate_outputs({"9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix}}}, "jobs/j1")


def test_the_jobs_folders_go_whole_half_written_uploads_included(tmp_path: Path) -> None:
    folders = {name: tmp_path / name for name in ("input", "output", "temp")}
    kept = [folders["input"] / "important_mask.png", folders["output"] / "jobs" / "other" / "x.png"]
    mine = [folders["input"] / "jobs" / "j1" / "masks" / "truncated.png", folders["output"] / "jobs" / "j1" / "o.png"]
    for path in kept + mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x89PNG")
    cleanup.remove_job_files(folders, "jobs/j1", [])
    assert all(path.exists() for path in kept)
    assert not (folders["input"] / "jobs" / "j1").exists() and not (folders["output"] / "jobs" / "j1").exists()


def test_files_that_lead_out_of_their_folder_are_left_alone(tmp_path: Path) -> None:
    """A ``jobs`` folder that is a link to elsewhere, and a temp file's name with ``..`` (its subfolder comes
    from ComfyUI's history): the files there are not the job's, whatever their names."""
    folders = {name: tmp_path / name for name in ("input", "output", "temp")}
    for folder in folders.values():
        folder.mkdir()
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "j1").mkdir(parents=True)
    (elsewhere / "j1" / "o.png").write_bytes(b"\x89PNG")
    (folders["output"] / "jobs").symlink_to(elsewhere)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "near.png").write_bytes(b"\x89PNG")
    cleanup.remove_job_files(folders, "jobs/j1", [("../outputs", "near.png")])
    assert (elsewhere / "j1" / "o.png").exists()
    assert (tmp_path / "outputs" / "near.png").exists()


def test_a_folder_named_like_the_start_of_another_is_not_inside_it(tmp_path: Path) -> None:
    (tmp_path / "temp").mkdir()
    (tmp_path / "temp2").mkdir()
    (tmp_path / "temp2" / "x.png").write_bytes(b"\x89PNG")
    cleanup.remove_job_files({"temp": tmp_path / "temp"}, "jobs/j1", [("../temp2", "x.png")])
    assert (tmp_path / "temp2" / "x.png").exists()
