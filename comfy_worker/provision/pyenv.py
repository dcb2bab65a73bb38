"""The Python environment that runs ComfyUI: install requirements into it, and remember what is there.

Node requirements must land in the interpreter that runs ComfyUI, not in whatever ``pip`` is first on PATH
(the official worker's #237). That environment lives in the image, outside the volume: a new image on an
old volume has none of them. So what was installed is recorded *inside the environment* (a marker file in
its prefix), and the warm-start gate checks the marker, not the volume.

torch, torchvision and torchaudio are pinned to the versions already installed while node requirements are
installed: a node asking for another torch would otherwise replace the image's CUDA build.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from comfy_worker.fsutil import atomic_write

log = logging.getLogger(__name__)

MARKER_NAME = "comfy-worker-env.json"
PROTECTED = ("torch", "torchvision", "torchaudio")
INSTALL_TIMEOUT_S = 3600.0
_REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_REQUIREMENT_NAME_NORMAL = re.compile(r"[-_.]+")


class InstallError(RuntimeError):
    """Installing requirements failed; the message ends with the installer's last lines."""


@functools.cache  # asked by the gate, by the run under the lock and by each installer step
def prefix_of(python: str) -> Path:
    """``sys.prefix`` of ``python`` (a venv's folder), without starting it when it is this interpreter."""
    if Path(python).absolute() == Path(sys.executable).absolute():
        return Path(sys.prefix)
    done = subprocess.run(
        [python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True, timeout=60, check=True
    )
    return Path(done.stdout.strip())


def marker_path(python: str) -> Path:
    return prefix_of(python) / MARKER_NAME


def read_marker(path: Path) -> set[str]:
    """Requirement sets installed into the environment (empty when the marker is missing or unreadable)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    return {str(key) for key in data.get("installed", [])} if isinstance(data, dict) else set()


def add_to_marker(path: Path, keys: Iterable[str]) -> None:
    installed = read_marker(path) | set(keys)
    atomic_write(path, json.dumps({"installed": sorted(installed)}, indent=1))


def requirements_key(kind: str, name: str, files: Sequence[Path]) -> str:
    """``kind:name:digest`` of the files that decide what gets installed (requirements.txt, install.py)."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        if file.is_file():
            digest.update(file.read_bytes())
    return f"{kind}:{name}:{digest.hexdigest()[:16]}"


def installer(python: str) -> list[str]:
    """uv when there is one (several times faster), else the environment's own pip."""
    uv = shutil.which("uv")
    return [uv, "pip", "install", "--python", python] if uv else [python, "-m", "pip", "install"]


def installed_versions(python: str, names: Sequence[str]) -> dict[str, str]:
    script = (
        "import importlib.metadata as m, json, sys\n"
        "found = {}\n"
        "for name in sys.argv[1:]:\n"
        "    try: found[name] = m.version(name)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(found))\n"
    )
    done = subprocess.run([python, "-c", script, *names], capture_output=True, text=True, timeout=60, check=True)
    versions: dict[str, str] = json.loads(done.stdout)
    return versions


def _without(file: Path, leave_out: Sequence[str], folder: Path) -> Path:
    """A copy of the requirements file in ``folder`` without the lines that name a package of ``leave_out``."""
    names = {_REQUIREMENT_NAME_NORMAL.sub("-", name).lower() for name in leave_out}
    kept = []
    for line in file.read_text(encoding="utf-8").splitlines():
        match = _REQUIREMENT_NAME.match(line)
        if match is None or _REQUIREMENT_NAME_NORMAL.sub("-", match.group(1)).lower() not in names:
            kept.append(line)
    copy = folder / f"{len(list(folder.iterdir()))}-{file.name}"
    copy.write_text("\n".join(kept) + "\n", encoding="utf-8")
    return copy


def pip_install(
    python: str, requirement_files: Sequence[Path], cwd: Path | None = None, leave_out: Sequence[str] = ()
) -> None:
    """Install requirement files into ``python``'s environment, keeping its torch where it is.

    ``leave_out``: packages whose lines are dropped from the files (an environment that is not ours).
    """
    with tempfile.TemporaryDirectory(prefix="comfy-worker-requirements-") as folder:
        files = (
            [_without(file, leave_out, Path(folder)) for file in requirement_files] if leave_out else requirement_files
        )
        _pip_install(python, files, cwd)


def _pip_install(python: str, requirement_files: Sequence[Path], cwd: Path | None) -> None:
    pins = installed_versions(python, PROTECTED)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="torch-pins-", delete=False) as constraints:
        constraints.write("".join(f"{name}=={version}\n" for name, version in pins.items()))
    command = [*installer(python), "--constraint", constraints.name]
    for file in requirement_files:
        command += ["-r", str(file)]
    log.info("Installing %s into %s", ", ".join(str(file) for file in requirement_files), python)
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise InstallError(f"installing requirements timed out after {INSTALL_TIMEOUT_S:g}s") from None
    finally:
        os.unlink(constraints.name)
    if done.returncode != 0:
        tail = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()][-6:]
        raise InstallError("requirements could not be installed: " + " | ".join(tail))


def run_script(python: str, script: Path, timeout_s: float = INSTALL_TIMEOUT_S) -> None:
    """Run a node's install.py in its folder, as ComfyUI-Manager does."""
    try:
        done = subprocess.run(
            [python, script.name], cwd=script.parent, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        raise InstallError(f"{script} timed out after {timeout_s:g}s") from None
    if done.returncode != 0:
        tail = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()][-6:]
        raise InstallError(f"{script.name} exited with code {done.returncode}: " + " | ".join(tail))
