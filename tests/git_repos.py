"""Real git repositories made in the test (tags, branches, commits), and a wheel to depend on offline."""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import zipfile
from pathlib import Path

from .worker_process import STANDIN_DIR


def git(path: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args],
        cwd=path,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


class Repo:
    """A repository on disk that tests grow commit by commit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True)
        git(path, "init", "--quiet", "--initial-branch", "main")

    @property
    def url(self) -> str:
        return str(self.path)

    def commit(self, files: dict[str, str], message: str = "change") -> str:
        for name, text in files.items():
            target = self.path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        git(self.path, "add", "-A")
        git(self.path, "commit", "--quiet", "-m", message)
        return git(self.path, "rev-parse", "HEAD")

    def tag(self, name: str, annotated: bool = False) -> None:
        git(self.path, "tag", *(["-a", "-m", name] if annotated else []), name)

    def branch(self, name: str) -> None:
        git(self.path, "checkout", "--quiet", "-b", name)

    def switch(self, name: str) -> None:
        git(self.path, "checkout", "--quiet", name)


def node_repo(root: Path, name: str, version: str = "v1.0.0", extra: dict[str, str] | None = None) -> Repo:
    """A custom node: NODE_CLASS_MAPPINGS in __init__.py, tagged ``version``."""
    repo = Repo(root / name)
    repo.commit({"__init__.py": "NODE_CLASS_MAPPINGS = {}\n", **(extra or {})}, "first")
    repo.tag(version)
    return repo


def standin_comfyui_repo(root: Path, tag: str = "v0.3.64") -> Repo:
    """The stand-in ComfyUI as "the ComfyUI to install": a repository with a tag, like upstream's."""
    repo = Repo(root / "ComfyUI")
    shutil.copytree(
        STANDIN_DIR, repo.path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "user", "*.pyc")
    )
    (repo.path / "requirements.txt").write_text("aiohttp\nPillow\npyyaml\n")  # all in the test environment
    repo.commit({}, "stand-in ComfyUI")
    repo.tag(tag)
    return repo


def make_wheel(folder: Path, name: str, version: str = "1.0") -> Path:
    """A pure-Python wheel with one module ``name`` (importable, with ``VERSION``); installs without an index."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": f"VERSION = {version!r}\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for file, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{file},sha256={digest},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    with zipfile.ZipFile(path, "w") as wheel:
        for file, text in files.items():
            wheel.writestr(file, text)
        wheel.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    return path


def real_comfyui_repo(root: Path, checkout: Path) -> Repo:
    """A real ComfyUI checkout's files as a tagged repository, without its models, outputs or nodes.

    Copied from the working tree rather than cloned: a checkout may lack blobs (a fetched snapshot leaves its
    largest files out) and would fail to clone. ``torchaudio`` is dropped from its requirements: the test
    environment's CPU torch has no matching torchaudio on the package index, and the image ships all three.
    """
    repo = Repo(root / "ComfyUI")
    top_level = {".git", "models", "output", "input", "temp", "user", "custom_nodes"}

    def skip(folder: str, names: list[str]) -> set[str]:
        dropped = {name for name in names if name == "__pycache__" or name.endswith(".pyc")}
        return dropped | (top_level & set(names) if Path(folder) == checkout else set())

    shutil.copytree(checkout, repo.path, dirs_exist_ok=True, ignore=skip)
    (repo.path / "custom_nodes").mkdir()
    (repo.path / "custom_nodes" / "README.md").write_text("custom nodes go here\n")
    (repo.path / "models" / "checkpoints").mkdir(parents=True)
    (repo.path / "models" / "checkpoints" / "put_checkpoints_here").write_text("")
    requirements = repo.path / "requirements.txt"
    kept = [line for line in requirements.read_text().splitlines() if not line.startswith("torchaudio")]
    requirements.write_text("\n".join(kept) + "\n")
    # Upstream tracks these two folders' placeholder files although its .gitignore lists the folders.
    git(repo.path, "add", "--force", "custom_nodes/README.md", "models/checkpoints/put_checkpoints_here")
    repo.commit({}, "ComfyUI")
    repo.tag("v0.3.64")
    return repo


def output_node_repo(root: Path, class_name: str) -> Repo:
    """A custom node with one output node, ``class_name``, that returns ``<class_name>=<value>`` as text."""
    source = f'''
class {class_name}:
    @classmethod
    def INPUT_TYPES(cls):
        return {{"required": {{"value": ("INT", {{"default": 1}})}}}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "tests"

    def run(self, value):
        return {{"ui": {{"text": ["{class_name}=" + str(value)]}}}}


NODE_CLASS_MAPPINGS = {{"{class_name}": {class_name}}}
'''
    return node_repo(root, class_name.lower(), extra={"__init__.py": source})
