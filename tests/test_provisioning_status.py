"""A config.yml that provisioning could not apply: the worker still serves (on what an earlier run installed),
and says so where an operator looks first: the start log's last lines, and ``provisioning`` in every result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from comfy_worker.runtime.diagnostics import provisioning_banner, provisioning_field, provisioning_warnings

from .conftest import EXAMPLES, REPO
from .worker_process import ComfyBackend, serve_api


def broken_config_status(workspace: Path) -> Path:
    """The status.json that provisioning really writes for a config.yml with an error."""
    done = subprocess.run(
        [sys.executable, "-m", "comfy_worker.provision"],
        cwd=REPO,
        env=dict(os.environ, WORKSPACE=str(workspace), CONFIG_YML="nodes: ["),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    return workspace / ".comfy-worker" / "status.json"


def test_a_config_that_failed_is_in_the_start_log_and_in_every_result(tmp_path: Path) -> None:
    status = broken_config_status(tmp_path / "volume")
    model_free = json.loads((EXAMPLES / "requests" / "model_free.json").read_text())["input"]
    failing = {"workflow": {"1": {"class_type": "StandinFail", "inputs": {"message": "no"}}}}
    with serve_api(ComfyBackend.standin(), tmp_path / "worker", PROVISION_STATUS=str(status)) as worker:
        done = worker.runsync(model_free)
        failed = worker.runsync(failing)
        log = worker.log()
    assert done["status"] == "COMPLETED", done
    output = done["output"]
    assert isinstance(output, dict)
    provisioning = output["provisioning"]
    assert provisioning["status"] == "failed"
    assert provisioning["error"].startswith("config.yml: CONFIG_YML is not valid YAML"), provisioning
    assert any(w.startswith("Provisioning: config.yml could not be used") for w in output["warnings"]), output
    error = json.loads(str(failed["error"]))
    assert error["error_type"] == "comfyui_execution"
    assert error["provisioning"]["status"] == "failed", error
    banner = log.index("PROVISIONING FAILED: config.yml: CONFIG_YML is not valid YAML")
    assert log.index("ComfyUI is ready") < banner < log.index("Uvicorn running on"), log[-3000:]
    assert "config.yml was not applied" in log[banner:]


def test_a_worker_that_provisioned_well_says_nothing() -> None:
    assert provisioning_field(None) == {} and provisioning_warnings(None) == [] and provisioning_banner(None) == []
    optional = {"ok": True, "optional_failed": [{"kind": "model", "name": "loras/x", "error": "HTTP 404"}]}
    entry = provisioning_field(optional)["provisioning"]
    assert (entry["status"], entry["error"]) == ("optional_failed", "model loras/x: HTTP 404")
    assert provisioning_banner(optional) == [], "an optional model that failed is no reason for alarm at start"
    assert provisioning_warnings(optional) == ["Provisioning: model loras/x failed: HTTP 404"]
