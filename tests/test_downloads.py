"""The model downloader against real loopback servers (tests/file_server.py): resume, ranges, locks, the Hub.

Nothing leaves 127.0.0.1: Hugging Face URLs keep their https://huggingface.co form in the config and reach a
loopback "Hub" through HF_ENDPOINT, which redirects LFS files to a loopback "CDN" on another port.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from comfy_worker.provision import verify
from comfy_worker.provision.config import ModelConfig
from comfy_worker.provision.download_options import DownloadOptions
from comfy_worker.provision.downloads import (
    ModelResult,
    download_models,
    plan,
)
from comfy_worker.settings import SettingsError

from .file_server import FileServer, hub_file, make_data
from .processes import stopped_on_exit

REPO = Path(__file__).resolve().parents[1]
DEAD_HUB = "http://127.0.0.1:9"  # the discard port: a test that reached "the Hub" by mistake fails, offline
COMMIT = "0123456789abcdef0123456789abcdef01234567"
MIB = 1024 * 1024


@pytest.fixture(autouse=True)
def _no_download_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("HF_", "DOWNLOAD_", "HUGGING")) or name in ("CIVITAI_TOKEN", "MODELS_DIR"):
            monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FileServer]:
    srv = FileServer(tmp_path / "served")
    yield srv
    srv.close()


@pytest.fixture
def cdn(tmp_path: Path) -> Iterator[FileServer]:
    srv = FileServer(tmp_path / "cdn")
    yield srv
    srv.close()


def options(**overrides: Any) -> DownloadOptions:
    base: dict[str, Any] = {
        "hf_endpoint": DEAD_HUB,
        "retry_backoff_s": 0.01,
        "progress_interval_s": 0.2,
        "progress_bar": False,
    }
    return DownloadOptions(**{**base, **overrides})


def model(url: str, **fields: Any) -> ModelConfig:
    return ModelConfig(url=url, destination=fields.pop("destination", "checkpoints"), **fields)


def one(models_dir: Path, m: ModelConfig, **overrides: Any) -> ModelResult:
    [result] = download_models([m], models_dir, options(**overrides))
    return result


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file() and ".locks" not in p.parts)


def write_config(path: Path, models: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"models": models}))  # JSON is YAML
    return path


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path / "home"),
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_ENDPOINT": DEAD_HUB,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "DOWNLOAD_PROGRESS_INTERVAL": "0.2",
    }
    return {**env, **extra}


def cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(REPO / "download_models.py"), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def spawn(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """download_models.py in a process group of its own (``stopped_on_exit`` ends it on any way out)."""
    command = [sys.executable, str(REPO / "download_models.py"), *args]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def wait_for_progress(sidecar: Path, at_least: int, proc: subprocess.Popen[str], deadline_s: float = 180) -> None:
    """Wait until the sidecar says at least ``at_least`` bytes are on disk."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            done = sum(s[2] for s in json.loads(sidecar.read_text())["segments"])
        except (OSError, ValueError, KeyError):
            done = 0
        if done >= at_least:
            return
        time.sleep(0.05)
    raise AssertionError(f"{sidecar} never reached {at_least} bytes")


# --- plain downloads, integrity ------------------------------------------------------------------------------


def test_download_checks_sha256_and_leaves_only_the_target(server: FileServer, tmp_path: Path) -> None:
    data = make_data(3 * MIB)
    server.add("/files/model.safetensors", data)
    result = one(tmp_path / "models", model(server.url("/files/model.safetensors"), sha256=sha(data)))
    assert result.status == "downloaded", result.error
    assert result.path == tmp_path / "models" / "checkpoints" / "model.safetensors"
    assert result.path.read_bytes() == data
    assert (result.size, result.sha256) == (len(data), sha(data))
    assert leftovers(tmp_path / "models") == ["model.safetensors"]


def test_wrong_sha256_fails_with_both_digests_and_leaves_no_target(server: FileServer, tmp_path: Path) -> None:
    data = make_data(MIB)
    server.add("/m.safetensors", data)
    result = one(tmp_path / "models", model(server.url("/m.safetensors"), sha256="0" * 64))
    assert result.status == "failed"
    assert result.error is not None
    assert "0" * 64 in result.error and sha(data) in result.error and "m.safetensors" in result.error
    assert leftovers(tmp_path / "models") == []


def test_present_file_is_skipped_without_any_request(server: FileServer, tmp_path: Path) -> None:
    data = make_data(1000)
    server.add("/p.safetensors", data)
    target = tmp_path / "models" / "loras" / "p.safetensors"
    target.parent.mkdir(parents=True)
    target.write_bytes(data)
    result = one(tmp_path / "models", model(server.url("/p.safetensors"), destination="loras", sha256=sha(data)))
    assert (result.status, result.path) == ("present", target)
    assert server.requests == []


def test_present_file_with_another_sha256_is_replaced(server: FileServer, tmp_path: Path) -> None:
    data = make_data(1000)
    server.add("/p.safetensors", data)
    target = tmp_path / "models" / "checkpoints" / "p.safetensors"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"stale")
    result = one(tmp_path / "models", model(server.url("/p.safetensors"), sha256=sha(data)))
    assert result.status == "downloaded"
    assert target.read_bytes() == data


def test_a_verified_file_is_not_hashed_again_until_it_changes(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_data(3000)
    server.add("/v.safetensors", data)
    hashed: list[Path] = []
    real_hash = verify.sha256_file
    monkeypatch.setattr(verify, "sha256_file", lambda path: hashed.append(path) or real_hash(path))
    m = model(server.url("/v.safetensors"), sha256=sha(data))
    assert one(tmp_path / "models", m).status == "downloaded"
    assert [path.name for path in hashed] == ["v.safetensors.part"]  # verified once, before the rename
    assert one(tmp_path / "models", m).status == "present"
    assert len(hashed) == 1, "a file verified at download was hashed again"
    target = tmp_path / "models" / "checkpoints" / "v.safetensors"
    target.write_bytes(make_data(3000, seed=5))  # same size, other bytes, a new mtime
    assert one(tmp_path / "models", m).status == "downloaded"
    assert hashed[1] == target and target.read_bytes() == data


def test_content_disposition_names_the_file(server: FileServer, tmp_path: Path) -> None:
    server.add("/api/download/models/123", b"lora", disposition='attachment; filename="detail_v2.safetensors"')
    result = one(tmp_path / "models", model(server.url("/api/download/models/123?type=Model"), destination="loras"))
    assert result.path == tmp_path / "models" / "loras" / "detail_v2.safetensors"
    assert result.path.read_bytes() == b"lora"


# --- resume ----------------------------------------------------------------------------------------------------


def test_cut_connection_resumes_with_only_the_missing_bytes(server: FileServer, tmp_path: Path) -> None:
    data = make_data(8 * MIB)
    half = len(data) // 2 + 12345
    server.add("/cut.bin", data, cut_at=half)
    result = one(tmp_path / "models", model(server.url("/cut.bin"), sha256=sha(data)))
    assert result.status == "downloaded", result.error
    gets = server.gets("/cut.bin")
    assert [g.headers.get("range") for g in gets] == ["bytes=0-0", None, f"bytes={half}-{len(data) - 1}"]
    assert server.bytes_sent["/cut.bin"] == len(data) + 1  # the probe's byte, then every byte exactly once


def test_retries_5xx_then_succeeds(server: FileServer, tmp_path: Path) -> None:
    server.add("/flaky.bin", b"x" * 5000, failures=[500, 503, 502])
    result = one(tmp_path / "models", model(server.url("/flaky.bin")))
    assert result.status == "downloaded", result.error
    assert len(server.gets("/flaky.bin")) == 5  # three failed probes, the probe, the download


def test_changed_file_on_resume_restarts_from_zero(server: FileServer, tmp_path: Path) -> None:
    old, new = make_data(4 * MIB, seed=1), make_data(4 * MIB, seed=2)
    server.add("/v.bin", old, cut_at=3 * MIB, cuts=2)  # the retry at the cut fails too: retries=0 gives up
    first = one(tmp_path / "models", model(server.url("/v.bin")), retries=0)
    assert first.status == "failed"
    part = tmp_path / "models" / "checkpoints" / "v.bin.part"
    assert part.exists() and part.with_name("v.bin.part.json").exists()
    server.replace("/v.bin", new)
    before = len(server.requests)
    second = one(tmp_path / "models", model(server.url("/v.bin")))
    assert second.status == "downloaded", second.error
    assert (tmp_path / "models" / "checkpoints" / "v.bin").read_bytes() == new
    ranges = [r.headers.get("range") for r in server.requests[before:]]
    assert ranges == ["bytes=0-0", None]  # a fresh probe, then the whole new file: no mix of versions


def test_if_range_mismatch_mid_download_restarts(server: FileServer, tmp_path: Path) -> None:
    old, new = make_data(2 * MIB, seed=3), make_data(2 * MIB, seed=4)
    served = server.add("/w.bin", old, cut_at=MIB)
    served.etag = '"v1"'

    def swap_after_cut() -> None:  # the file changes between the cut and the retry
        while server.bytes_sent["/w.bin"] < MIB:  # the first response has sent all it will before the cut
            time.sleep(0.001)
        server.replace("/w.bin", new)

    thread = threading.Thread(target=swap_after_cut)
    thread.start()
    result = one(tmp_path / "models", model(server.url("/w.bin")), retry_backoff_s=0.2)
    thread.join()
    assert result.status == "downloaded", result.error
    assert result.path is not None and result.path.read_bytes() == new
    assert any(r.headers.get("if-range") == '"v1"' for r in server.gets("/w.bin"))


def resumed_at(server: FileServer, path: str, after: int) -> list[int]:
    """Where each ranged GET of ``path`` after the first ``after`` GETs started (the 1-byte probes left out)."""
    ranges = [r.headers.get("range", "") for r in server.gets(path)[after:]]
    return [int(r.removeprefix("bytes=").split("-")[0]) for r in ranges if r.startswith("bytes=") and r != "bytes=0-0"]


def test_resume_across_processes_after_sigkill(server: FileServer, tmp_path: Path) -> None:
    data = make_data(6 * MIB)
    half = len(data) // 2
    served = server.add("/slow.safetensors", data, hold_at=half)  # the rest only once the process is killed
    config = write_config(tmp_path / "config.yml", [{"url": server.url("/slow.safetensors"), "destination": "vae"}])
    models = tmp_path / "models"
    env = cli_env(tmp_path)
    with stopped_on_exit(spawn("--config", str(config), "--models-dir", str(models), env=env), grace_s=0) as proc:
        wait_for_progress(models / "vae" / "slow.safetensors.part.json", half, proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert server.bytes_sent["/slow.safetensors"] < len(data)
    first_run = len(server.gets("/slow.safetensors"))
    served.release.set()
    done = cli("--config", str(config), "--models-dir", str(models), env=env)
    assert done.returncode == 0, done.stderr
    # only what the sidecar did not have: it had the first half
    [start] = resumed_at(server, "/slow.safetensors", first_run)
    assert start >= half and f"resuming at {start} of {len(data)} bytes" in done.stderr
    assert (models / "vae" / "slow.safetensors").read_bytes() == data


# --- speed: segments, single stream ------------------------------------------------------------------------------


def test_large_file_is_fetched_in_parallel_segments(server: FileServer, tmp_path: Path) -> None:
    data = make_data(16 * MIB + 7)
    server.add("/big.bin", data)
    result = one(tmp_path / "models", model(server.url("/big.bin"), sha256=sha(data)), segment_threshold=MIB)
    assert result.status == "downloaded", result.error
    segments = [g for g in server.gets("/big.bin") if g.headers.get("range") != "bytes=0-0"]
    assert len(segments) == 4 and len({g.port for g in segments}) == 4  # four connections
    assert all(g.headers.get("if-range") for g in segments)
    assert server.bytes_sent["/big.bin"] == len(data) + 1


def test_a_failing_segment_stops_the_others(server: FileServer, tmp_path: Path) -> None:
    """One segment's error ends the file's download: the other segments do not go on fetching for nothing."""
    size = 16 * MIB
    served = server.add("/big.bin", make_data(size), rate=1 * MIB, fail_range_at=12 * MIB)
    result = one(tmp_path / "models", model(server.url("/big.bin")), connections=4, segment_threshold=MIB)
    assert result.status == "failed" and result.error is not None and "404" in result.error
    assert served.size == size
    sent = server.bytes_sent["/big.bin"]
    assert sent < size // 4, f"the other segments went on after the failure: {sent} of {size} bytes sent"


def test_server_without_ranges_gets_one_stream(
    server: FileServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = make_data(8 * MIB)
    server.add("/norange.bin", data, ranges=False)
    with caplog.at_level(logging.INFO):
        result = one(tmp_path / "models", model(server.url("/norange.bin"), sha256=sha(data)), segment_threshold=MIB)
    assert result.status == "downloaded", result.error
    assert len(server.gets("/norange.bin")) == 2  # the probe (answered 200) and one stream
    assert "does not support ranges" in caplog.text and "re-fetches from zero" in caplog.text


# --- failures, tokens ---------------------------------------------------------------------------------------------


def test_401_names_the_token_variable_and_the_token_then_works(server: FileServer, tmp_path: Path) -> None:
    server.add("/private.safetensors", b"secret weights", token="tok-abcdef-123")
    url = server.url("/private.safetensors")
    denied = one(tmp_path / "models", model(url))
    assert denied.status == "failed" and denied.error is not None
    assert "401" in denied.error and "DOWNLOAD_TOKENS=127.0.0.1=<token>" in denied.error and url in denied.error
    allowed = one(tmp_path / "models", model(url), host_tokens={"127.0.0.1": "tok-abcdef-123"})
    assert allowed.status == "downloaded", allowed.error


def test_404_says_not_found(server: FileServer, tmp_path: Path) -> None:
    result = one(tmp_path / "models", model(server.url("/missing.safetensors")))
    assert result.error is not None and "404" in result.error and "not found" in result.error


def test_optional_failure_is_not_fatal_but_a_required_one_is(server: FileServer, tmp_path: Path) -> None:
    server.add("/ok.safetensors", b"ok")
    missing = {"url": server.url("/gone.safetensors"), "destination": "loras"}
    good = {"url": server.url("/ok.safetensors"), "destination": "loras"}
    env = cli_env(tmp_path)
    optional = write_config(tmp_path / "optional.yml", [good, {**missing, "optional": True}])
    result = cli("--config", str(optional), "--models-dir", str(tmp_path / "m1"), env=env)
    assert result.returncode == 0, result.stderr
    assert "1 downloaded, 0 present, 1 failed" in result.stdout and "404" in result.stdout
    required = write_config(tmp_path / "required.yml", [good, missing])
    result = cli("--config", str(required), "--models-dir", str(tmp_path / "m2"), env=env)
    assert result.returncode == 1
    assert "404" in result.stdout and "ERROR" in result.stderr
    only = cli("--config", str(optional), "--models-dir", str(tmp_path / "m3"), "--only-required", env=env)
    assert only.returncode == 0 and "0 failed" in only.stdout


def test_tokens_never_reach_the_logs(server: FileServer, tmp_path: Path) -> None:
    secrets = {"HF_TOKEN": "hf_secretvalue1", "CIVITAI_TOKEN": "civ-secretvalue2", "DOWNLOAD_TOKENS": "x.org=dl-sv3"}
    server.add("/t.safetensors", b"x", token="other-token")
    config = write_config(
        tmp_path / "c.yml",
        [{"url": server.url("/t.safetensors?token=url-secret-4&name=a"), "destination": "loras", "optional": True}],
    )
    result = cli("--config", str(config), "--models-dir", str(tmp_path / "m"), env=cli_env(tmp_path, **secrets))
    output = result.stdout + result.stderr
    assert "401" in output and "token=***" in output
    for secret in [*secrets.values(), "url-secret-4"]:
        assert secret not in output


def test_options_from_env() -> None:
    env = {
        "DOWNLOAD_CONCURRENCY": "2",
        "DOWNLOAD_CONNECTIONS": "3",
        "DOWNLOAD_PROGRESS_INTERVAL": "5",
        "HF_TOKEN": "hf_x",
        "CIVITAI_TOKEN": "civ",
        "DOWNLOAD_TOKENS": "Example.com=a, cdn.io=b",
        "HF_ENDPOINT": "http://127.0.0.1:1234/",
        "PROVISION_LOCK_TIMEOUT": "30",
    }
    opts = DownloadOptions.from_env(env)
    assert opts.lock_timeout_s == 30.0 and DownloadOptions.from_env({}).lock_timeout_s == 600.0
    assert (opts.concurrency, opts.connections, opts.progress_interval_s) == (2, 3, 5.0)
    assert opts.host_tokens == {"example.com": "a", "cdn.io": "b", "civitai.com": "civ"}
    assert opts.token_for("www.civitai.com") == "civ" and opts.token_for("evilcivitai.com") is None
    assert opts.hf_endpoint == "http://127.0.0.1:1234" and "hf_x" not in repr(opts)
    defaults = DownloadOptions.from_env({})
    assert (defaults.concurrency, defaults.connections, defaults.progress_interval_s) == (4, 8, 10.0)
    with pytest.raises(SettingsError, match="item 1") as error:
        DownloadOptions.from_env({"DOWNLOAD_TOKENS": "justatokenvalue"})
    assert "justatokenvalue" not in str(error.value)


# --- dry run ------------------------------------------------------------------------------------------------------


def test_dry_run_prints_the_plan_and_writes_nothing(server: FileServer, tmp_path: Path) -> None:
    server.add("/new.safetensors", make_data(2 * MIB))
    models = tmp_path / "models"
    (models / "vae").mkdir(parents=True)
    (models / "vae" / "have.safetensors").write_bytes(b"1234")
    config = write_config(
        tmp_path / "c.yml",
        [
            {"url": server.url("/new.safetensors"), "destination": "checkpoints"},
            {"url": server.url("/have.safetensors"), "destination": "vae"},
        ],
    )
    result = cli("--config", str(config), "--models-dir", str(models), "--dry-run", env=cli_env(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("download") and "checkpoints/new.safetensors" in lines[0] and "2.1 MB" in lines[0]
    assert lines[1].startswith("present") and "vae/have.safetensors" in lines[1]
    assert not (models / "checkpoints").exists()
    assert [r.method for r in server.requests] == ["GET"]  # one probe, nothing for the present file
    planned = plan([model(server.url("/nope.bin"))], models, options())
    assert planned[0].status == "failed" and planned[0].error is not None and "404" in planned[0].error


def test_dry_run_says_download_for_a_file_with_the_wrong_sha256(server: FileServer, tmp_path: Path) -> None:
    """The real run re-downloads a file whose sha256 is not the config's; the plan must say so too."""
    data = make_data(3000)
    server.add("/v.safetensors", data)
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    (models / "checkpoints" / "v.safetensors").write_bytes(make_data(3000, seed=9))
    [planned] = plan([model(server.url("/v.safetensors"), sha256=sha(data))], models, options())
    assert planned.status == "download" and planned.error is not None and sha(data) in planned.error
    assert not (models / ".locks").exists() or not any((models / ".locks").glob("*.sha256"))
    (models / "checkpoints" / "v.safetensors").write_bytes(data)
    [planned] = plan([model(server.url("/v.safetensors"), sha256=sha(data))], models, options())
    assert planned.status == "present"
    assert server.requests == []


def test_a_stale_model_lock_fails_that_model_with_its_holder_named(server: FileServer, tmp_path: Path) -> None:
    """A lock file left by a worker killed on another machine (soft locks) no longer blocks the start forever."""
    server.add("/m.bin", b"model")
    locks = tmp_path / "models" / ".locks"
    locks.mkdir(parents=True)
    (locks / "checkpoints__m.bin.lock").write_text("")
    (locks / "checkpoints__m.bin.lock.owner").write_text("gone-host pid 77 since 00:10:00")
    result = one(tmp_path / "models", model(server.url("/m.bin")), lock="soft", lock_timeout_s=0.5)
    assert result.status == "failed" and result.error is not None
    assert "gone-host pid 77" in result.error and "checkpoints__m.bin.lock" in result.error


def test_the_command_line_scripts_are_executable() -> None:
    for script in ("download_models.py", "install_nodes.py"):
        path = REPO / script
        assert os.access(path, os.X_OK), f"{script} is not executable (chmod +x)"
        assert path.read_text().startswith("#!/usr/bin/env python3\n"), f"{script} has no python3 shebang"


# --- several workers on one volume ---------------------------------------------------------------------------------


def test_four_processes_download_each_file_once(server: FileServer, tmp_path: Path) -> None:
    files = {f"/f{i}.safetensors": make_data(2 * MIB, seed=i) for i in range(3)}
    for path, data in files.items():
        server.add(path, data, rate=4 * MIB)
    config = write_config(
        tmp_path / "c.yml",
        [{"url": server.url(p), "destination": "checkpoints", "sha256": sha(d)} for p, d in files.items()],
    )
    models = tmp_path / "models"
    env = cli_env(tmp_path)
    with contextlib.ExitStack() as stack:
        procs = [
            stack.enter_context(stopped_on_exit(spawn("--config", str(config), "--models-dir", str(models), env=env)))
            for _ in range(4)
        ]
        outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outputs
    for path, data in files.items():
        assert server.bytes_sent[path] == len(data) + 1  # one probe byte, one download
        assert (models / "checkpoints" / path.lstrip("/")).read_bytes() == data
    assert any("waiting for the download of" in err.lower() for _, err in outputs)
    assert leftovers(models) == sorted(p.lstrip("/") for p in files)


def test_soft_lock_mode_works(server: FileServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server.add("/s.bin", b"soft")
    with caplog.at_level(logging.WARNING):
        result = one(tmp_path / "models", model(server.url("/s.bin")), lock="soft")
    assert result.status == "downloaded"
    assert "using lock files" in caplog.text


# --- Hugging Face ---------------------------------------------------------------------------------------------------


def test_hf_url_goes_through_hf_endpoint_token_to_hub_only(server: FileServer, cdn: FileServer, tmp_path: Path) -> None:
    hub = server
    weights, config_json = make_data(3 * MIB, seed=7), b'{"a": 1}'
    digest = hub_file(hub, cdn, "org/model", "unet/model.safetensors", weights, COMMIT)
    hub_file(hub, cdn, "org/model", "config.json", config_json, COMMIT, lfs=False)
    models = [
        model("https://huggingface.co/org/model/resolve/main/unet/model.safetensors?download=true"),
        model("https://huggingface.co/org/model/blob/main/config.json", destination="configs"),
    ]
    results = download_models(models, tmp_path / "models", options(hf_endpoint=hub.url(""), hf_token="hf_tok123"))
    assert [r.status for r in results] == ["downloaded", "downloaded"], [r.error for r in results]
    assert results[0].sha256 == digest  # verified against X-Linked-Etag
    assert (tmp_path / "models" / "configs" / "config.json").read_bytes() == config_json
    assert hub.requests and all(r.headers.get("authorization") == "Bearer hf_tok123" for r in hub.requests)
    assert cdn.requests and not any("authorization" in r.headers for r in cdn.requests)
    pinned = [r for r in hub.requests if r.method == "GET"]
    assert pinned and all(f"/resolve/{COMMIT}/" in r.path for r in pinned)  # the bytes come from the commit


def test_hf_checksum_from_the_hub_catches_a_bad_cdn(server: FileServer, cdn: FileServer, tmp_path: Path) -> None:
    hub_file(server, cdn, "org/model", "m.safetensors", b"good", COMMIT)
    cdn.replace(next(iter(cdn.routes)), b"evil")
    result = one(
        tmp_path / "models",
        model("https://huggingface.co/org/model/resolve/main/m.safetensors"),
        hf_endpoint=server.url(""),
    )
    assert result.status == "failed" and result.error is not None and "wrong checksum" in result.error
    assert leftovers(tmp_path / "models") == []


def test_hf_gated_repo_names_hf_token(server: FileServer, tmp_path: Path) -> None:
    server.add("/org/gated/resolve/main/m.safetensors", b"", status=401)
    result = one(
        tmp_path / "models",
        model("https://huggingface.co/org/gated/resolve/main/m.safetensors"),
        hf_endpoint=server.url(""),
    )
    assert result.error is not None and "HF_TOKEN" in result.error


def test_hf_resume_after_kill(server: FileServer, cdn: FileServer, tmp_path: Path) -> None:
    data = make_data(6 * MIB, seed=9)
    half = len(data) // 2
    hub_file(server, cdn, "org/model", "big.safetensors", data, COMMIT, hold_at=half)
    config = write_config(
        tmp_path / "c.yml",
        [{"url": "https://huggingface.co/org/model/resolve/main/big.safetensors", "destination": "unet"}],
    )
    models = tmp_path / "models"
    env = cli_env(tmp_path, HF_ENDPOINT=server.url(""), HF_TOKEN="hf_killtoken")
    with stopped_on_exit(spawn("--config", str(config), "--models-dir", str(models), env=env), grace_s=0) as proc:
        wait_for_progress(models / "unet" / "big.safetensors.part.json", half, proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    [cdn_path] = cdn.routes
    first_run = len(cdn.gets(cdn_path))
    cdn.routes[cdn_path].release.set()  # type: ignore[union-attr]
    done = cli("--config", str(config), "--models-dir", str(models), env=env)
    assert done.returncode == 0, done.stderr
    [start] = resumed_at(cdn, cdn_path, first_run)
    assert start >= half
    assert (models / "unet" / "big.safetensors").read_bytes() == data
    assert "hf_killtoken" not in done.stderr
