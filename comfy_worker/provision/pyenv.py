"""The Python environment that runs ComfyUI: install requirements into it, and remember what is there.

Node requirements must land in the interpreter that runs ComfyUI, not in whatever ``pip`` is first on PATH
(the official worker's #237). What was installed is recorded *inside the environment* (a marker file in its
prefix), and the warm-start gate checks the marker, not the volume.

In the image, ComfyUI's environment has two layers: the image's Python with PyTorch and the baked ComfyUI's
requirements (its marker written at build time), and a venv on the volume made on top of it with
``--system-site-packages`` (``make_venv``), keyed by the image's Python, PyTorch and ComfyUI versions. Custom
nodes' requirements go into the venv, so a fresh container on a warm volume finds them installed and
downloads nothing. Such a venv is installed into with its own pip: uv does not see the packages underneath.

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
# What ComfyUI imports but does not list (the file says why): installed with its requirements.txt everywhere.
COMFYUI_EXTRA_REQUIREMENTS = Path(__file__).with_name("comfyui-requirements.txt")
PROTECTED = ("torch", "torchvision", "torchaudio")
INSTALL_TIMEOUT_S = 3600.0
_REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_REQUIREMENT_NAME_NORMAL = re.compile(r"[-_.]+")


class InstallError(RuntimeError):
    """Installing requirements failed; the message ends with the installer's last lines."""


@functools.cache  # asked by the gate, by the run under the lock and by each installer step
def prefixes(python: str) -> tuple[Path, Path]:
    """``sys.prefix`` and ``sys.base_prefix`` of ``python``, without starting it when it is this interpreter
    or a venv (read from its pyvenv.cfg: a cold start pays for no extra interpreter)."""
    if Path(python).absolute() == Path(sys.executable).absolute():
        return Path(sys.prefix), Path(sys.base_prefix)
    venv = Path(python).absolute().parent.parent
    config = read_venv_config(venv)
    if "home" in config:
        return venv, Path(config["home"]).parent
    done = subprocess.run(
        [python, "-c", "import sys; print(sys.prefix); print(sys.base_prefix)"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    prefix, base = done.stdout.split("\n")[:2]
    return Path(prefix), Path(base)


def prefix_of(python: str) -> Path:
    return prefixes(python)[0]


def read_venv_config(venv: Path) -> dict[str, str]:
    """A venv's pyvenv.cfg as a dict (empty when ``venv`` is not one)."""
    try:
        lines = (venv / "pyvenv.cfg").read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    pairs = (line.partition("=") for line in lines)
    return {key.strip(): value.strip() for key, sep, value in pairs if sep}


def marker_path(python: str) -> Path:
    return prefix_of(python) / MARKER_NAME


def installed_keys(python: str) -> set[str]:
    """Requirement sets installed into ``python``'s environment, and into the one a venv is made on."""
    prefix, base = prefixes(python)
    keys = read_marker(prefix / MARKER_NAME)
    return keys | read_marker(base / MARKER_NAME) if base != prefix else keys


def make_venv(path: Path, base_python: str) -> str:
    """A venv at ``path`` on top of ``base_python``'s packages (PyTorch); return its python. Idempotent.

    Made in a temporary folder and moved into place, so a stopped start leaves no half-made venv behind.
    """
    python = path / "bin" / "python"
    if python.is_file():
        return str(python)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    log.info("Making the venv for custom nodes' requirements: %s (on top of %s)", path, base_python)
    try:
        subprocess.run(
            [base_python, "-m", "venv", "--system-site-packages", str(temporary)],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        relocate_venv(temporary, temporary, path)
        temporary.rename(path)
    except (OSError, subprocess.SubprocessError) as exc:
        raise InstallError(f"could not make the venv {path}: {exc}") from None
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return str(python)


def relocate_venv(venv: Path, old: Path, new: Path) -> None:
    """Rewrite ``old`` to ``new`` in the venv's scripts (pip's shebang) and config, for a venv made at or copied
    from ``old``. Each file is written anew, not in place: a copied tree's files are hard links to the source's."""
    for path in [venv / "pyvenv.cfg", *(venv / "bin").iterdir()]:
        if not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        if str(old).encode() not in data:
            continue
        mode = path.stat().st_mode
        path.unlink()
        path.write_bytes(data.replace(str(old).encode(), str(new).encode()))
        path.chmod(mode)


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
    """uv when there is one (several times faster), else the environment's own pip. A venv on top of
    another environment's packages gets its pip: uv would reinstall what is underneath (PyTorch)."""
    uv = shutil.which("uv")
    layered = read_venv_config(prefix_of(python)).get("include-system-site-packages") == "true"
    return [uv, "pip", "install", "--python", python] if uv and not layered else [python, "-m", "pip", "install"]


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
