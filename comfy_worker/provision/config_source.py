"""Which config.yml the worker uses, and its SHA-256: CONFIG_YML, then the volume's, then the image's.

Kept apart from ``config`` (the pydantic schema) on purpose: the warm-start gate only needs the text and
its digest, and must decide within a few milliseconds, before anything heavy is imported.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """config.yml is missing or not valid; the message names every bad entry and field."""


@dataclass(frozen=True)
class ResolvedConfig:
    text: str
    source: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def decode_env(value: str) -> str:
    """CONFIG_YML holds YAML or its base64: base64 is detected as text without ':' that decodes to UTF-8
    text with one (every config.yml is a mapping, so its YAML has a ':')."""
    compact = "".join(value.split())
    if compact and ":" not in compact:
        try:
            decoded = base64.b64decode(compact, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            return value
        if ":" in decoded:
            return decoded
    return value


def resolve(env: Mapping[str, str], volume_config: Path, baked_config: Path) -> ResolvedConfig:
    """The config text to use and where it came from: CONFIG_YML, then the volume's, then the image's."""
    raw = env.get("CONFIG_YML", "")
    if raw.strip():
        return ResolvedConfig(decode_env(raw), "CONFIG_YML")
    for path in (volume_config, baked_config):
        if path.is_file():
            return ResolvedConfig(path.read_text(encoding="utf-8"), str(path))
    raise ConfigError(f"no config: CONFIG_YML is unset and neither {volume_config} nor {baked_config} exists")
