"""config.yml: the schema, its errors, the shipped files, the exported JSON Schema and the resolution order."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from comfy_worker.provision.config import ConfigError, json_schema, main, parse
from comfy_worker.provision.config_source import resolve

from .conftest import REPO


def test_shipped_configs_are_valid() -> None:
    default = parse((REPO / "config.yml").read_text())
    assert [m.destination for m in default.models] == ["checkpoints"]
    assert default.models[0].target_name == "v1-5-pruned-emaonly-fp16.safetensors"
    assert "ComfyUI-Manager" in default.nodes[0].url
    example = parse((REPO / "config.example.yml").read_text())
    destinations = {m.destination for m in example.models}
    assert {"checkpoints", "vae", "text_encoders", "diffusion_models", "loras/sdxl"} <= destinations


def test_schema_file_is_up_to_date() -> None:
    on_disk = json.loads((REPO / "config.schema.json").read_text())
    assert on_disk == json_schema(), "run: comfy-worker-config --schema > config.schema.json"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "models:\n  - {url: 'https://x/a.safetensors', destination: chekpoints}",
            "models[0].destination: 'chekpoints' is not a ComfyUI model folder (did you mean 'checkpoints'?)",
        ),
        ("models:\n  - {url: 'ftp://x/a', destination: vae}", "models[0].url: 'ftp://x/a' is not an http(s) URL"),
        ("models:\n  - {url: 'https://x/a', destination: 'loras/../..'}", "must not contain empty, '.' or '..'"),
        ("models:\n  - {url: 'https://x/a', destination: vae, filename: '../evil'}", "must be a plain file name"),
        (
            "models:\n  - {url: 'https://x/a', destination: vae, sha256: abc}",
            "models[0].sha256: must be 64 hexadecimal",
        ),
        (
            "models:\n  - {url: 'https://x/a', destination: vae, size: 3}",
            "models[0].size: Extra inputs are not permitted",
        ),
        ("nodes:\n  - {url: 'not a url'}", "nodes[0].url: 'not a url' is not a git URL"),
        ("nodes: {url: x}", "nodes: Input should be a valid list"),
        ("- just\n- a list", "must be a mapping"),
        ("models: [", "is not valid YAML"),
    ],
)
def test_errors_name_the_entry_and_the_field(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text)
    assert expected in str(info.value), str(info.value)


def test_resolution_order(tmp_path: Path) -> None:
    volume, baked = tmp_path / "volume.yml", tmp_path / "baked.yml"
    baked.write_text("comfyui: {version: v0.3.64}\n")
    assert resolve({}, volume, baked).source == str(baked)
    volume.write_text("comfyui: {version: nightly}\n")
    chosen = resolve({}, volume, baked)
    assert (chosen.source, parse(chosen.text).comfyui.version) == (str(volume), "nightly")
    plain = resolve({"CONFIG_YML": "comfyui: {version: v1}\n"}, volume, baked)
    assert (plain.source, parse(plain.text).comfyui.version) == ("CONFIG_YML", "v1")
    encoded = base64.b64encode(b"comfyui:\n  version: v2\n").decode()
    from_b64 = resolve({"CONFIG_YML": encoded}, volume, baked)
    assert parse(from_b64.text).comfyui.version == "v2"
    assert from_b64.sha256 != plain.sha256 and len(from_b64.sha256) == 64
    with pytest.raises(ConfigError, match="no config"):
        resolve({}, tmp_path / "none.yml", tmp_path / "nothing.yml")


def test_cli_checks_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(REPO / "config.yml")]) == 0
    assert "1 nodes, 1 models" in capsys.readouterr().out
    bad = tmp_path / "bad.yml"
    bad.write_text("models:\n  - {url: 'https://x/a', destination: nowhere}\n")
    assert main([str(bad)]) == 1
    assert "'nowhere' is not a ComfyUI model folder" in capsys.readouterr().err
