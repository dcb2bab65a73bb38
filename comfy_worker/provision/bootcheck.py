"""ComfyUI's own start-up check, run by provisioning after it changed what ComfyUI runs.

``main.py --quick-test-for-ci`` imports everything ComfyUI's server imports, loads its built-in nodes and the
custom nodes, opens its database and exits. A module missing from the environment (0.3.64's ``requests``, a
custom node's dependency) then fails provisioning with its name, and every job's result says so, instead of
every job failing later with ``comfyui_unavailable`` and a log nobody on RunPod can read.

The check gets temp, user, input and output folders and a database of its own: ComfyUI empties its temp folder
when it starts, and on a shared volume another worker's job may be using the real one.
"""

from __future__ import annotations

import logging
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 600.0
# ComfyUI 0.3.64's words (nodes.py) for a custom node that did not load, and the error it gives.
_CANNOT_IMPORT = re.compile(r"Cannot import (?P<path>.+?) module for custom nodes: (?P<error>.+)$")
_IMPORT_FAILED = re.compile(r"\(IMPORT FAILED\): (?P<path>.+)$")
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*)?(?:Error|Exception|Exit)\b.*")


@dataclass
class BootCheck:
    """What the check found: whether ComfyUI can start, and which custom nodes it could not import."""

    error: str | None = None  # why ComfyUI cannot start: the last line of its traceback
    broken_nodes: dict[str, str] = field(default_factory=dict)  # custom node folder -> why it did not load

    @property
    def ok(self) -> bool:
        return self.error is None and not self.broken_nodes


def check(comfyui_dir: Path, python: str, extra_args: tuple[str, ...] = ()) -> BootCheck:
    """Run ComfyUI's start-up check in ``python``; what it found."""
    with tempfile.TemporaryDirectory(prefix="comfy-worker-bootcheck-") as folder:
        private = Path(folder)
        for name in ("user", "input", "output"):  # its video nodes fail to load without the input folder
            (private / name).mkdir()
        command = [
            python,
            str(comfyui_dir / "main.py"),
            "--cpu",
            "--quick-test-for-ci",
            "--disable-auto-launch",
            "--temp-directory",
            str(private),
            "--user-directory",
            str(private / "user"),
            "--input-directory",
            str(private / "input"),
            "--output-directory",
            str(private / "output"),
            "--database-url",
            f"sqlite:///{private / 'comfyui.db'}",
            *extra_args,
        ]
        log.info("Checking that ComfyUI starts (%s main.py --quick-test-for-ci)", python)
        try:
            done = subprocess.run(
                command, cwd=comfyui_dir, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            return BootCheck(error=f"ComfyUI's start-up check did not finish within {CHECK_TIMEOUT_S:g} s")
        except OSError as exc:
            return BootCheck(error=f"could not run {python}: {exc}")
    return parse(done.returncode, done.stdout + done.stderr)


def parse(returncode: int, output: str) -> BootCheck:
    """The check's result from ComfyUI's exit status and output."""
    result = BootCheck()
    for line in output.splitlines():
        match = _CANNOT_IMPORT.search(line) or _IMPORT_FAILED.search(line)
        path = Path(match["path"].strip()) if match else None
        if match is None or path is None or "custom_nodes" not in path.parts:
            continue  # ComfyUI's own optional nodes (its audio nodes without torchaudio) are its business
        error = match.groupdict().get("error") or "ComfyUI could not import it"
        result.broken_nodes.setdefault(path.name, error.strip())
    if returncode != 0:
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        errors = [line for line in lines if _EXCEPTION.match(line)]
        last = errors[-1] if errors else (lines[-1] if lines else "no output")
        result.error = f"ComfyUI exits at start (code {returncode}): {last}"
    return result
