"""Provisioning checks that ComfyUI starts with what it installed (``main.py --quick-test-for-ci``).

A module missing from ComfyUI's environment, or a custom node that cannot be imported, fails provisioning with
its name, and every job's result says so. On the stand-in (which imports custom nodes and exits on
``--quick-test-for-ci`` as ComfyUI does) and on the real ComfyUI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comfy_worker.provision import bootcheck, pyenv

from .git_repos import node_repo, standin_comfyui_repo
from .test_provision import Volume, config_with, run_start_sh, wait_for_job
from .worker_process import ComfyBackend, stop

REAL = ComfyBackend.real()  # read at collection: the tests' environment is cleared of COMFY* variables
BROKEN_NODE = "import module_this_node_needs  # not installed\n\nNODE_CLASS_MAPPINGS = {}\n"


@pytest.fixture
def volume(tmp_path: Path) -> Volume:
    return Volume(tmp_path, standin_comfyui_repo(tmp_path / "src"))


def failures(volume: Volume) -> list[dict[str, str]]:
    failed: list[dict[str, str]] = volume.status["failed"]
    return failed


def test_a_node_that_cannot_be_imported_fails_provisioning_and_every_job_names_it(
    volume: Volume, tmp_path: Path
) -> None:
    good = node_repo(tmp_path / "src", "good-node")
    broken = node_repo(tmp_path / "src", "broken-node", extra={"__init__.py": BROKEN_NODE})
    done = volume.provision(config_with(good.url, broken.url))
    assert done.returncode == 1, done.stderr
    assert failures(volume) == [
        {
            "kind": "node",
            "name": "broken-node",
            "error": "ComfyUI could not import it: No module named 'module_this_node_needs'",
        }
    ]
    assert volume.state["provisioned_sha256"] is None
    # The next start checks again (nothing changed, but the last run did not complete): still named.
    again = volume.provision()
    assert again.returncode == 1 and failures(volume)[0]["name"] == "broken-node", again.stderr

    log = tmp_path / "worker.log"
    process, url = run_start_sh(volume, log)
    try:
        body = wait_for_job(url, process, log)
    finally:
        stop(process)
    assert body["status"] == "COMPLETED", body  # the worker serves: the broken node is reported, not fatal
    warnings = body["output"]["warnings"]
    assert any("node broken-node failed: ComfyUI could not import it" in warning for warning in warnings), warnings


def test_a_comfyui_that_cannot_start_fails_provisioning_and_every_job_names_the_missing_module(
    volume: Volume, tmp_path: Path
) -> None:
    main = volume.comfyui.path / "main.py"
    missing = "import argparse\nimport module_comfyui_needs  # not installed\n"
    source = main.read_text().replace("import argparse\n", missing, 1)
    volume.comfyui.commit({"main.py": source})
    volume.comfyui.tag("v0.3.65")
    done = volume.provision(config_with(comfyui="v0.3.65"))
    assert done.returncode == 1, done.stderr
    [failed] = failures(volume)
    assert failed["kind"] == "comfyui" and failed["name"] == "start-up check", failed
    assert "ModuleNotFoundError: No module named 'module_comfyui_needs'" in failed["error"], failed

    log = tmp_path / "worker.log"
    process, url = run_start_sh(volume, log, COMFY_STARTUP_TIMEOUT="30")
    try:
        body = wait_for_job(url, process, log)
    finally:
        stop(process)
    assert body["status"] == "FAILED", body
    error = json.loads(body["error"])
    assert error["error_type"] == "comfyui_unavailable", error
    assert "No module named 'module_comfyui_needs'" in error["message"], error


def test_the_check_leaves_the_shared_temp_user_and_database_alone(volume: Volume, tmp_path: Path) -> None:
    """ComfyUI empties its temp folder when it starts: the check must not empty the one jobs use."""
    assert volume.provision(config_with()).returncode == 0
    comfyui = volume.path / "ComfyUI"
    (comfyui / "temp").mkdir(exist_ok=True)
    (comfyui / "temp" / "a_running_jobs_preview.png").write_bytes(b"png")
    found = bootcheck.check(comfyui, ComfyBackend.standin().python)
    assert found.ok, found
    assert (comfyui / "temp" / "a_running_jobs_preview.png").read_bytes() == b"png"
    assert not (comfyui / "user").exists() or list((comfyui / "user").iterdir()) == []  # no database made there


def test_the_worker_installs_what_comfyui_imports_but_does_not_list() -> None:
    """ComfyUI 0.3.64's server imports requests, which its requirements.txt does not name."""
    lines = pyenv.COMFYUI_EXTRA_REQUIREMENTS.read_text().splitlines()
    assert [line.split(">=")[0] for line in lines if line and not line.startswith("#")] == ["requests"]


def test_parse_names_custom_nodes_only_and_the_last_exception() -> None:
    output = "\n".join(
        [
            "Cannot import /c/comfy_extras/nodes_audio.py module for custom nodes: No module named 'torchaudio'",
            "Cannot import /c/custom_nodes/bad module for custom nodes: No module named 'cv2'",
            "Import times for custom nodes:",
            "   0.0 seconds (IMPORT FAILED): /c/custom_nodes/bad",
            "   0.0 seconds (IMPORT FAILED): /c/custom_nodes/empty.py",
            "   0.1 seconds: /c/custom_nodes/fine",
        ]
    )
    found = bootcheck.parse(0, output)
    assert found.error is None
    assert found.broken_nodes == {"bad": "No module named 'cv2'", "empty.py": "ComfyUI could not import it"}
    crashed = bootcheck.parse(1, 'Traceback (most recent call last):\n  File "main.py"\nImportError: cannot import x\n')
    assert crashed.error == "ComfyUI exits at start (code 1): ImportError: cannot import x"
    assert not crashed.ok


@pytest.mark.comfyui
def test_the_real_comfyuis_check_names_a_broken_custom_node(tmp_path: Path) -> None:
    real = REAL
    if real is None:
        pytest.skip("set COMFYUI_DIR to a ComfyUI checkout to run against it")
    nodes = tmp_path / "base" / "custom_nodes"
    (nodes / "broken-node").mkdir(parents=True)
    (nodes / "broken-node" / "__init__.py").write_text(BROKEN_NODE)
    (nodes / "good-node").mkdir()
    (nodes / "good-node" / "__init__.py").write_text("NODE_CLASS_MAPPINGS = {}\n")
    found = bootcheck.check(real.comfyui_dir, real.python, ("--base-directory", str(tmp_path / "base")))
    assert found.error is None, found
    assert found.broken_nodes == {"broken-node": "No module named 'module_this_node_needs'"}, found
