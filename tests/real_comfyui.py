"""The real ComfyUI for the ``comfyui`` and ``image`` tiers: its source from ``../shared``, made ready once per machine.

``../shared/comfyui/ComfyUI-v0.3.64.tar.gz`` is ComfyUI's real source (GPL-3.0: a test fixture, never copied into
the repository). ``prepare()`` unpacks it, makes a Python environment that runs it on the CPU (PyTorch, then
ComfyUI's requirements and the worker's additions to them, ``comfy_worker/provision/comfyui-requirements.txt``,
installed with provisioning's own installer) and writes the random-weight SD1.5 checkpoint of
``make_random_sd15.py`` into its ``models/checkpoints``. Everything goes into a cache outside the repository,
keyed by what it is made from, so a machine makes it once (about 3 minutes) and a new machine makes it anew.

``python -m tests.real_comfyui`` prints ``COMFYUI_DIR=...``, ``COMFYUI_PYTHON=...`` and ``SD15_CHECKPOINT=...``
for test.sh to export, or exits 3 with the reason on stderr when ``../shared`` is missing.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from comfy_worker.provision import pyenv

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SHARED_COMFYUI = REPO.parent / "shared" / "comfyui"
TARBALL = SHARED_COMFYUI / "ComfyUI-v0.3.64.tar.gz"
MAKE_CHECKPOINT = SHARED_COMFYUI / "make_random_sd15.py"
VERSION = "v0.3.64"
# The CUDA build pip takes from this machine's disk (it runs on the CPU with --cpu); PyPI has no torchaudio for it,
# so ComfyUI's two audio node files do not load (shared/comfyui/README.md).
TORCH = ("torch==2.14.1", "torchvision==0.29.1")
CHECKPOINT_NAME = "random_sd15.safetensors"


class Missing(RuntimeError):
    """``../shared`` (or the ComfyUI source in it) is not beside the repository."""


@dataclass(frozen=True)
class RealComfyUI:
    """A ComfyUI checkout, the interpreter that runs it, and the checkpoint name in its models/checkpoints."""

    comfyui_dir: Path
    python: Path
    checkpoint: str

    def env(self) -> dict[str, str]:
        return {
            "COMFYUI_DIR": str(self.comfyui_dir),
            "COMFYUI_PYTHON": str(self.python),
            "SD15_CHECKPOINT": self.checkpoint,
        }


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(base) / "comfy-worker-tests"


def _digest(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part + b"\0")
    return digest.hexdigest()[:12]


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One preparer at a time per machine (two test runs at once share the cache)."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _unpack(root: Path, tarball_sha: str) -> Path:
    """The source tree; unpacked next to its final place and renamed, so it is whole or absent."""
    folder = root / f"ComfyUI-{VERSION}-{tarball_sha}"
    if (folder / "main.py").is_file():
        return folder
    log.info("Unpacking %s into %s", TARBALL, folder)
    with tempfile.TemporaryDirectory(dir=root, prefix=".unpack-") as temporary:
        with tarfile.open(TARBALL) as archive:
            archive.extractall(temporary, filter="data")
        shutil.rmtree(folder, ignore_errors=True)
        (Path(temporary) / "ComfyUI").rename(folder)
    for name in ("models/checkpoints", "custom_nodes", "input", "output"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    return folder


def _venv(root: Path, source: Path, tarball_sha: str) -> Path:
    """A venv with PyTorch and ComfyUI's requirements; complete when its ``.ready`` file exists."""
    extra = pyenv.COMFYUI_EXTRA_REQUIREMENTS.read_bytes()
    key = _digest(tarball_sha.encode(), " ".join(TORCH).encode(), extra, sys.version.encode())
    venv = root / f"venv-{key}"
    python = venv / "bin" / "python"
    if (venv / ".ready").is_file():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    log.info("Making ComfyUI's Python environment %s (PyTorch, then ComfyUI's requirements)", venv)
    quiet = {"stdout": sys.stderr, "stdin": subprocess.DEVNULL}  # stdout is for the variables test.sh reads
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300, **quiet)
    # pip, not uv: pip also looks in the machine's own wheel folders (its configuration), uv does not.
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *TORCH], check=True, timeout=3600, **quiet)
    requirements = [source / "requirements.txt", pyenv.COMFYUI_EXTRA_REQUIREMENTS]
    pyenv.pip_install(str(python), requirements, leave_out=["torchaudio"])
    (venv / ".ready").write_text("")
    return python


def _checkpoint(root: Path, source: Path, python: Path) -> str:
    """The random SD1.5 (2.1 GB, about 35 s): made once into the cache, linked into the checkout's models."""
    made = root / f"{CHECKPOINT_NAME}-{_digest(MAKE_CHECKPOINT.read_bytes())}"
    if not made.is_file():
        log.info("Writing the random-weight SD1.5 checkpoint %s", made)
        partial = made.with_name(made.name + ".part")
        env = {**os.environ, "COMFYUI_DIR": str(source)}
        command = [str(python), str(MAKE_CHECKPOINT), str(partial)]
        subprocess.run(command, env=env, check=True, timeout=1800, cwd=root, stdout=sys.stderr)
        partial.rename(made)
    link = source / "models" / "checkpoints" / CHECKPOINT_NAME
    if not link.is_file():
        link.unlink(missing_ok=True)
        link.symlink_to(made)
    return CHECKPOINT_NAME


def prepare() -> RealComfyUI:
    """The real ComfyUI, ready to run; Missing when ``../shared`` does not have its source."""
    if not TARBALL.is_file():
        raise Missing(f"{TARBALL} is missing (the real ComfyUI's source; see ../shared/README.md)")
    root = cache_root()
    tarball_sha = hashlib.sha256(TARBALL.read_bytes()).hexdigest()[:12]
    with _locked(root):
        source = _unpack(root, tarball_sha)
        python = _venv(root, source, tarball_sha)
        checkpoint = _checkpoint(root, source, python)
    return RealComfyUI(source, python, checkpoint)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="tests.real_comfyui: %(message)s", stream=sys.stderr)
    try:
        ready = prepare()
    except Missing as exc:
        log.error("%s", exc)
        return 3
    for name, value in ready.env().items():
        sys.stdout.write(f"{name}={value}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
