"""``config.yml``: what the worker installs (ComfyUI, custom nodes, models), as one pydantic schema.

The schema is the single source of truth: ``config.schema.json`` is exported from it (``python -m
comfy_worker.provision.config --schema``) so editors validate the file, and errors name the entry and the field
(``models[3].destination: 'chekpoints' is not a ComfyUI model folder (did you mean 'checkpoints'?)``).
Which file is used (``CONFIG_YML``, the volume's, the image's) is ``config_source``'s job; ``provision``
acts on it.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic import ValidationError as PydanticValidationError

from comfy_worker.errors import field_path
from comfy_worker.provision.config_source import ConfigError

# ComfyUI's model folders (folder_paths), plus the ones popular custom nodes add.
MODEL_FOLDERS = (
    "checkpoints",
    "clip",
    "clip_vision",
    "configs",
    "controlnet",
    "diffusers",
    "diffusion_models",
    "embeddings",
    "gligen",
    "hypernetworks",
    "loras",
    "model_patches",
    "audio_encoders",
    "photomaker",
    "style_models",
    "text_encoders",
    "unet",
    "upscale_models",
    "vae",
    "vae_approx",
    "ipadapter",
    "sams",
    "ultralytics",
    "LLM",
)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SAFE_FILENAME = re.compile(r"^[^/\\\x00]+$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ComfyUIConfig(_Model):
    version: str = Field("latest", description="'latest' (newest release tag), 'nightly', a tag, a branch or a commit.")


class NodeConfig(_Model):
    url: str = Field(description="Git URL of the custom node's repository.")
    version: str = Field("latest", description="'latest' (newest release tag), 'nightly', a tag, a branch or a commit.")

    @field_validator("url")
    @classmethod
    def _git_url(cls, url: str) -> str:
        if not (url.startswith(("https://", "http://", "git@", "ssh://", "file://")) or Path(url).is_absolute()):
            raise ValueError(f"{url!r} is not a git URL (https://..., git@..., or a local path)")
        return url


class ModelConfig(_Model):
    url: str = Field(description="http(s) URL of the file (Hugging Face, Civitai, any server).")
    destination: str = Field(description="ComfyUI model folder, optionally with a subfolder: 'loras/sdxl'.")
    filename: str | None = Field(None, description="File name to save as; default: the URL's last segment.")
    sha256: str | None = Field(None, description="Expected SHA-256 (hex); the download is checked against it.")
    optional: bool = Field(False, description="A failing optional model is reported, not fatal.")

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
            raise ValueError(f"{url!r} is not an http(s) URL")
        return url

    @field_validator("destination")
    @classmethod
    def _model_folder(cls, destination: str) -> str:
        folder, _, sub = destination.strip("/").partition("/")
        if folder not in MODEL_FOLDERS:
            close = difflib.get_close_matches(folder, MODEL_FOLDERS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (one of: {', '.join(MODEL_FOLDERS)})"
            raise ValueError(f"{folder!r} is not a ComfyUI model folder{hint}")
        if any(part in ("", ".", "..") for part in sub.split("/")) and sub:
            raise ValueError(f"{destination!r}: the subfolder must not contain empty, '.' or '..' segments")
        return destination.strip("/")

    @field_validator("filename")
    @classmethod
    def _plain_filename(cls, filename: str | None) -> str | None:
        if filename is not None and (not _SAFE_FILENAME.match(filename) or filename in (".", "..")):
            raise ValueError(f"{filename!r} must be a plain file name (no folders)")
        return filename

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, digest: str | None) -> str | None:
        if digest is not None and not _SHA256.match(digest.lower()):
            raise ValueError("must be 64 hexadecimal characters")
        return digest.lower() if digest else None

    @property
    def target_name(self) -> str:
        return self.filename or urlsplit(self.url).path.rsplit("/", 1)[-1]


class Config(_Model):
    """The whole config.yml."""

    comfyui: ComfyUIConfig = Field(default_factory=ComfyUIConfig)
    nodes: list[NodeConfig] = Field(default_factory=list)
    models: list[ModelConfig] = Field(default_factory=list)


def parse(text: str, source: str = "config.yml") -> Config:
    """Parse and validate config text; raise ConfigError naming every problem."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping with comfyui, nodes and models sections")
    try:
        return Config.model_validate(data)
    except PydanticValidationError as exc:
        problems = [
            f"{field_path(error['loc'])}: {error['msg'].removeprefix('Value error, ')}"
            for error in exc.errors(include_url=False)
        ]
        raise ConfigError(f"{source} is invalid: " + "; ".join(problems)) from None


def json_schema() -> dict[str, Any]:
    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "comfy-worker config.yml"
    return schema


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check config.yml, or print its JSON Schema.")
    parser.add_argument("config", nargs="?", type=Path, help="a config file to check")
    parser.add_argument("--schema", action="store_true", help="print config.schema.json")
    args = parser.parse_args(argv)
    if args.schema:
        sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")
        return 0
    if args.config is None:
        parser.error("give a config file or --schema")
    try:
        config = parse(args.config.read_text(encoding="utf-8"), str(args.config))
    except (OSError, ConfigError) as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    sys.stdout.write(
        f"{args.config}: ComfyUI {config.comfyui.version}, {len(config.nodes)} nodes, {len(config.models)} models\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
