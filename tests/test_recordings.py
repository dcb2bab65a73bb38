"""The recordings of a real ComfyUI in tests/comfyui_transcripts: all there, unchanged, and still current.

They are part of the repository (a clean clone has them), so a missing or edited file is a failure, never a
skip. ``config.yml`` pinning a ComfyUI release newer than the recorded one is a failure too: the stand-in then
vouches for a server nobody recorded, so re-record (see shared/comfyui) before moving the pin.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import requests
import yaml

from .comfy_servers import run_standin
from .conftest import REPO, TRANSCRIPTS

RECORDED_VERSION_SOURCE = "h_queue_interrupt_history_view_misc.json"  # its GET /system_stats answer


def manifest() -> dict[str, str]:
    """``SHA256SUMS``: file name -> sha256."""
    lines = (TRANSCRIPTS / "SHA256SUMS").read_text().splitlines()
    return {name.lstrip("*"): digest for digest, name in (line.split(maxsplit=1) for line in lines if line.strip())}


def test_every_recording_is_present_and_unchanged() -> None:
    listed = manifest()
    assert len(listed) == 20
    on_disk = {path.name for path in TRANSCRIPTS.glob("*.json")}
    assert sorted(set(listed) - on_disk) == [], "recordings missing from tests/comfyui_transcripts"
    assert sorted(on_disk - set(listed)) == [], "files not in SHA256SUMS (recordings are copied, not made here)"
    changed = [
        name
        for name, digest in listed.items()
        if hashlib.sha256((TRANSCRIPTS / name).read_bytes()).hexdigest() != digest
    ]
    assert changed == [], "recordings differ from SHA256SUMS"


def test_the_stand_in_serves_the_recorded_node_list(tmp_path: Path) -> None:
    """Without the recording the stand-in falls back to a small node list and fewer workflows validate."""
    recorded = json.loads((TRANSCRIPTS / "object_info_full.json").read_text())
    assert len(recorded) == 478
    with run_standin(tmp_path) as server:
        served = requests.get(f"{server.url}/object_info", timeout=30).json()
    assert set(recorded) <= set(served)


def recorded_comfyui_version() -> str:
    events = json.loads((TRANSCRIPTS / RECORDED_VERSION_SOURCE).read_text())["events"]
    stats = next(e for e in events if e["kind"] == "http_response" and e["path"] == "/system_stats")
    version: str = stats["body"]["json"]["system"]["comfyui_version"]
    return version


def release(version: str) -> tuple[int, ...] | None:
    """``v0.3.64`` or ``0.3.64`` as numbers; None for what is not a release (latest, nightly, a branch, a commit)."""
    match = re.fullmatch(r"v?(\d+(?:\.\d+)*)", version.strip())
    return tuple(int(part) for part in match[1].split(".")) if match else None


def past_the_recording(config_version: str, recorded: str) -> bool | None:
    """Whether config.yml's ComfyUI release is newer than the recorded one; None when it names no release."""
    wanted, have = release(config_version), release(recorded)
    assert have is not None, f"the recorded version {recorded!r} is not a release number"
    return None if wanted is None else wanted > have


@pytest.mark.parametrize(
    ("config_version", "past"),
    [
        ("v0.3.64", False),
        ("0.3.64", False),
        ("v0.3.9", False),
        ("v0.3.65", True),
        ("0.4", True),
        ("v1.0.0", True),
        ("latest", None),
        ("nightly", None),
        ("master", None),
        ("a125cd84", None),
    ],
)
def test_past_the_recording(config_version: str, past: bool | None) -> None:
    assert past_the_recording(config_version, "0.3.64") is past


def test_config_yml_comfyui_is_the_recorded_one() -> None:
    recorded = recorded_comfyui_version()
    assert recorded == "0.3.64"  # what tests/comfyui_transcripts/README.md and the docs say
    version = str(yaml.safe_load((REPO / "config.yml").read_text())["comfyui"]["version"])
    past = past_the_recording(version, recorded)
    if past is None:
        pytest.skip(
            f"config.yml asks for ComfyUI {version!r}, which names no release: only a pinned release can be "
            f"compared with the recorded {recorded}"
        )
    assert not past, (
        f"config.yml pins ComfyUI {version}, past the recorded {recorded}: the stand-in and its contract test "
        "vouch only for the recorded version. Record the new one (shared/comfyui), copy it into "
        "tests/comfyui_transcripts and update SHA256SUMS, or pin the recorded version."
    )
