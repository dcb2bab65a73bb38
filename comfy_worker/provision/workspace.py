"""Where the worker runs and where everything it installs lives: the persistent volume's layout.

RunPod serverless mounts a network volume at ``/runpod-volume``; a RunPod pod mounts its volume at
``/workspace``; a local run uses ``./workspace`` beside ``start.sh`` (docker compose mounts it there). Every
path can be overridden by env. Kept free of heavy imports: the warm-start gate reads it before anything else.
What ComfyUI writes while it runs (its input, output, temp and user folders) is not here on serverless: each
worker keeps it on its own disk (``settings.local_state_dir``), as every worker of an endpoint shares the volume.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from comfy_worker.provision.trees import Tree

Mode = Literal["serverless", "pod", "local"]
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_COMFYUI_REPO = "https://github.com/comfyanonymous/ComfyUI"
STATE_DIRNAME = ".comfy-worker"


def detect_mode(env: Mapping[str, str]) -> Mode:
    """RunPod sets RUNPOD_WEBHOOK_GET_JOB on serverless workers only; pods (and workers) have RUNPOD_POD_ID."""
    if env.get("RUNPOD_WEBHOOK_GET_JOB", "").strip():
        return "serverless"
    if env.get("RUNPOD_POD_ID", "").strip():
        return "pod"
    return "local"


def _env_path(env: Mapping[str, str], name: str, default: Path) -> Path:
    raw = env.get(name, "").strip()
    return Path(raw).expanduser().absolute() if raw else default


@dataclass(frozen=True)
class Workspace:
    """The paths provisioning writes and the worker reads; see the README's "Where things live"."""

    mode: Mode
    root: Path
    comfyui_dir: Path
    models_dir: Path
    model_cache_dir: Path  # models that jobs bring by URL (runtime/models.py), apart from config.yml's
    baked_config: Path
    comfyui_repo: str
    comfyui_python: str
    listen: str
    comfyui_base_python: str | None = None
    comfyui_venv: Path | None = None
    comfyui_baked_dir: Path | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str], is_dir: Callable[[Path], bool] = Path.is_dir) -> Workspace:
        mode = detect_mode(env)
        if env.get("WORKSPACE", "").strip():
            root = _env_path(env, "WORKSPACE", Path())
        elif is_dir(Path("/runpod-volume")):
            root = Path("/runpod-volume")
        elif mode == "pod" and is_dir(Path("/workspace")):
            root = Path("/workspace")
        else:
            root = REPO_ROOT / "workspace"
        # The image's layered environment (pyenv): a venv on the volume, one per Python/PyTorch/ComfyUI, unless
        # COMFYUI_PYTHON names the interpreter to use.
        base_python = env.get("COMFYUI_BASE_PYTHON", "").strip() or None
        key = env.get("COMFYUI_VENV_KEY", "").strip() or Path(base_python or "python").name
        venv = root / STATE_DIRNAME / "venvs" / key if base_python else None
        python = env.get("COMFYUI_PYTHON", "").strip() or (str(venv / "bin" / "python") if venv else sys.executable)
        if venv is not None and python != str(venv / "bin" / "python"):
            venv = None  # COMFYUI_PYTHON names the interpreter: no venv of ours
        baked = env.get("COMFYUI_BAKED_DIR", "").strip()
        return cls(
            mode=mode,
            root=root,
            comfyui_dir=_env_path(env, "COMFYUI_DIR", root / "ComfyUI"),
            models_dir=_env_path(env, "MODELS_DIR", root / "models"),
            model_cache_dir=_env_path(env, "MODEL_CACHE_DIR", root / "model-cache"),
            baked_config=_env_path(env, "BAKED_CONFIG", REPO_ROOT / "config.yml"),
            comfyui_repo=env.get("COMFYUI_REPO", "").strip() or DEFAULT_COMFYUI_REPO,
            comfyui_python=python,
            # Serverless: only the handler talks to ComfyUI. Locally and on pods the user opens its UI.
            listen=env.get("COMFYUI_LISTEN", "").strip() or ("127.0.0.1" if mode == "serverless" else "0.0.0.0"),  # noqa: S104
            comfyui_base_python=base_python,
            comfyui_venv=venv,
            comfyui_baked_dir=Path(baked) if baked else None,
        )

    @property
    def comfyui_link(self) -> Path:
        """Where the worker keeps its ComfyUI: a link to the current install tree (``trees``)."""
        return self.root / "ComfyUI"

    def in_tree(self, tree: Tree) -> Workspace:
        """This workspace with the ComfyUI and the venv of an install tree."""
        venv = tree.venv if self.comfyui_venv is not None else None
        python = str(venv / "bin" / "python") if venv is not None else self.comfyui_python
        return replace(self, comfyui_dir=tree.comfyui_dir, comfyui_venv=venv, comfyui_python=python)

    @property
    def state_dir(self) -> Path:
        return self.root / STATE_DIRNAME

    @property
    def volume_config(self) -> Path:
        return self.root / "config.yml"

    @property
    def custom_nodes_dir(self) -> Path:
        return self.comfyui_dir / "custom_nodes"

    @property
    def extra_model_paths(self) -> Path:
        return self.state_dir / "extra_model_paths.yaml"

    @property
    def status_file(self) -> Path:
        return self.state_dir / "status.json"

    def config_text(self, env: Mapping[str, str], path: Path | None = None) -> tuple[str, str]:
        """The config a command works on: ``path`` when given, else the one start.sh would use."""
        from comfy_worker.provision.config_source import resolve

        if path is not None:
            return path.read_text(encoding="utf-8"), str(path)
        resolved = resolve(env, self.volume_config, self.baked_config)
        return resolved.text, resolved.source

    def worker_env(self) -> dict[str, str]:
        """What start.sh exports for the worker, so it starts this ComfyUI with these folders."""
        return {
            "WORKSPACE": str(self.root),
            "COMFYUI_DIR": str(self.comfyui_dir),
            "MODELS_DIR": str(self.models_dir),
            "MODEL_CACHE_DIR": str(self.model_cache_dir),
            "COMFYUI_PYTHON": self.comfyui_python,
            "COMFYUI_LISTEN": self.listen,
            "COMFYUI_EXTRA_MODEL_PATHS": str(self.extra_model_paths),
            "PROVISION_STATUS": str(self.status_file),
        }
