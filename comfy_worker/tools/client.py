"""Send a ComfyUI workflow to the worker and save what comes back: the user's side of the job API.

    comfy-worker-client examples/workflows/sd15_txt2img.json --prompt "a red fox" --seed 7
    comfy-worker-client wf.json --image photo.png --image masks/m.png=mask.png --set 6.inputs.text="a cat"
    comfy-worker-client wf.json --url http://127.0.0.1:8000 --sync      # the worker's local API

Without ``--url`` the endpoint is RunPod's (``RUNPOD_ENDPOINT_ID``, ``RUNPOD_API_KEY``). By default the job
goes to ``/run`` and ``/status/<id>`` is polled, with the worker's progress shown as it comes; ``--sync``
uses ``/runsync`` (and still polls when RunPod answers before the job is done). Ctrl-C cancels the job
(``/cancel/<id>``) and exits with 130. Every output is saved into ``--out`` (default
``./outputs/<job id>/``) and its path printed on stdout; a failed job exits with 1 and the worker's
structured error, made readable. Exit codes: 0 done, 1 the job failed or the endpoint could not be
reached, 2 bad arguments or files, 130 interrupted.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from comfy_worker.api_format import check_api_format
from comfy_worker.errors import InputError

log = logging.getLogger("comfy_worker.tools.client")

RUNPOD_API_BASE = "https://api.runpod.ai/v2"
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})
OUTPUT_KINDS = ("images", "videos", "audio", "files")
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class ClientError(Exception):
    """Something the user can fix (a file, an argument, a credential): printed without a traceback."""


class EndpointError(Exception):
    """The endpoint did not answer as a RunPod job API does (network, HTTP status, not JSON)."""


@dataclass(frozen=True)
class Endpoint:
    """Where jobs go: RunPod's ``https://api.runpod.ai/v2/<id>`` or any base URL with the same routes."""

    base_url: str
    api_key: str | None = None

    def headers(self) -> dict[str, str]:
        """The API key travels only to the endpoint, never to the S3 hosts outputs are downloaded from."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def endpoint_from(url: str | None, env: Mapping[str, str]) -> Endpoint:
    """``--url`` wins (an API key is still sent when one is set); otherwise RunPod's endpoint from the env."""
    api_key = env.get("RUNPOD_API_KEY", "").strip() or None
    if url:
        if not url.startswith(("http://", "https://")):
            raise ClientError(f"--url must start with http:// or https://, got {url!r}")
        return Endpoint(url.rstrip("/"), api_key)
    endpoint_id = env.get("RUNPOD_ENDPOINT_ID", "").strip()
    missing = [name for name, value in (("RUNPOD_ENDPOINT_ID", endpoint_id), ("RUNPOD_API_KEY", api_key)) if not value]
    if missing:
        raise ClientError(
            f"set {' and '.join(missing)} to send jobs to RunPod, or give --url (e.g. the worker's local API "
            "http://127.0.0.1:8000)"
        )
    return Endpoint(f"{RUNPOD_API_BASE}/{endpoint_id}", api_key)


# ---------------------------------------------------------------------------------------------------------
# Building the job
# ---------------------------------------------------------------------------------------------------------


def parse_set(text: str) -> dict[str, Any]:
    """``6.inputs.text=a cat`` -> an override; the value is JSON when it parses (``7``, ``true``,
    ``[1, 2]``), else the text itself, so quoting strings is optional."""
    target, sep, raw = text.partition("=")
    node_id, dot, field = target.strip().partition(".")
    if not sep or not dot or not node_id or not field:
        raise argparse.ArgumentTypeError(f'--set needs NODE.FIELD=VALUE (e.g. 6.inputs.text="a cat"), got {text!r}')
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return {"node_id": node_id, "field": field, "value": value}


def parse_image(text: str) -> tuple[str, Path]:
    """``name=path`` uploads ``path`` as ``name`` (subfolders allowed); a bare ``path`` keeps its file name."""
    if Path(text).is_file() or "=" not in text:
        path = Path(text)
        name = path.name
    else:
        name, _, raw_path = text.partition("=")
        path = Path(raw_path)
    if not name:
        raise argparse.ArgumentTypeError(f"--image needs NAME=PATH or PATH, got {text!r}")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"--image {text!r}: no file at {path}")
    return name, path


def parse_size(text: str) -> tuple[int, int]:
    """``768x512`` -> (768, 512)."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.strip().isdigit() or not height.strip().isdigit():
        raise argparse.ArgumentTypeError(f"--size needs WIDTHxHEIGHT (e.g. 768x512), got {text!r}")
    return int(width), int(height)


def load_workflow(path: Path) -> dict[str, Any]:
    """Read an API-format workflow, refusing a UI export with the same hint the worker gives."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ClientError(f"cannot read the workflow {path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ClientError(f"{path} is not JSON: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("input"), dict) and "workflow" in data["input"]:
        raise ClientError(
            f'{path} is a whole request body ({{"input": ...}}), not a workflow: send it as it is with curl, '
            "or give this client the workflow alone"
        )
    try:
        return check_api_format(data)
    except InputError as exc:
        raise ClientError(f"{path}: {exc.message}") from exc


def build_job(
    workflow: dict[str, Any],
    *,
    images: Sequence[tuple[str, Path]] = (),
    overrides: Sequence[dict[str, Any]] = (),
    prompt: str | None = None,
    seed: int | None = None,
    size: tuple[int, int] | None = None,
    timeout: float | None = None,
    output: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The job ``input`` in the worker's schema (README, Job input); the worker validates it again."""
    job: dict[str, Any] = {"workflow": workflow}
    if images:
        job["images"] = [{"name": name, "image": base64.b64encode(path.read_bytes()).decode()} for name, path in images]
    if overrides:
        job["overrides"] = list(overrides)
    if prompt is not None:
        job["prompt"] = prompt
    if seed is not None:
        job["seed"] = seed
    if size is not None:
        job["width"], job["height"] = size
    if timeout is not None:
        job["timeout"] = timeout
    if output:
        job["output"] = output
    return job


# ---------------------------------------------------------------------------------------------------------
# Talking to the endpoint
# ---------------------------------------------------------------------------------------------------------


class JobAPI:
    """RunPod's job routes (``/run``, ``/runsync``, ``/status``, ``/cancel``) on one endpoint.

    RunPod answers ``GET /status``; the runpod SDK's local API only ``POST`` (and runs the job inside that
    call), so a 405 switches to POST once. Only GETs are retried: a retried ``/run`` could queue a job twice.
    """

    def __init__(self, endpoint: Endpoint, *, request_timeout_s: float = 30.0, status_timeout_s: float = 3600.0):
        self.endpoint = endpoint
        self.request_timeout_s = request_timeout_s
        self.status_timeout_s = status_timeout_s
        self.session = requests.Session()
        retry = Retry(total=4, backoff_factor=0.5, status_forcelist=(429, 502, 503, 504), allowed_methods={"GET"})
        self.session.mount("http://", HTTPAdapter(max_retries=retry))
        self.session.mount("https://", HTTPAdapter(max_retries=retry))
        self._status_method = "GET"

    def close(self) -> None:
        self.session.close()

    def _call(self, method: str, route: str, body: Any = None, timeout_s: float | None = None) -> requests.Response:
        url = f"{self.endpoint.base_url}/{route}"
        try:
            return self.session.request(
                method,
                url,
                json=body,
                headers=self.endpoint.headers(),
                timeout=(10, timeout_s or self.request_timeout_s),
            )
        except requests.RequestException as exc:
            raise EndpointError(f"{method} {url} failed: {exc}") from exc

    @staticmethod
    def _json(response: requests.Response) -> dict[str, Any]:
        if response.status_code == 401:
            raise EndpointError(f"{response.url} refused the API key (HTTP 401): check RUNPOD_API_KEY")
        if response.status_code >= 400:
            raise EndpointError(f"{response.url} answered HTTP {response.status_code}: {response.text[:500]}")
        try:
            body = response.json()
        except ValueError as exc:
            raise EndpointError(f"{response.url} did not answer JSON: {response.text[:200]!r}") from exc
        if not isinstance(body, dict):
            raise EndpointError(f"{response.url} answered {type(body).__name__}, not a job object")
        return body

    def submit(self, job: dict[str, Any], sync: bool) -> dict[str, Any]:
        route = "runsync" if sync else "run"
        return self._json(self._call("POST", route, {"input": job}, self.status_timeout_s if sync else None))

    def status(self, job_id: str) -> dict[str, Any]:
        response = self._call(self._status_method, f"status/{job_id}", timeout_s=self.status_timeout_s)
        if response.status_code == 405 and self._status_method == "GET":
            self._status_method = "POST"
            response = self._call("POST", f"status/{job_id}", timeout_s=self.status_timeout_s)
        return self._json(response)

    def cancel(self, job_id: str) -> bool:
        """True when the endpoint took the cancellation (the local API has no ``/cancel``)."""
        try:
            response = self._call("POST", f"cancel/{job_id}", timeout_s=10)
        except EndpointError as exc:
            log.warning("could not cancel job %s: %s", job_id, exc)
            return False
        if response.status_code >= 400:
            log.warning(
                "the endpoint did not cancel job %s: HTTP %s %s", job_id, response.status_code, response.text[:200]
            )
            return False
        return True


def describe_progress(output: Any) -> str:
    """One line for a progress update: the worker's dict, or whatever another worker posts."""
    if not isinstance(output, dict):
        return str(output)
    parts = []
    if isinstance(output.get("percent"), int | float):
        parts.append(f"{output['percent']:5.1f}%")
    if output.get("node_id") is not None:
        parts.append(f"node {output['node_id']} ({output.get('class_type') or '?'})")
    if output.get("steps"):
        parts.append(f"step {output.get('step')}/{output['steps']}")
    if output.get("nodes_total"):
        parts.append(f"[{output.get('nodes_done', 0)}/{output['nodes_total']} nodes]")
    return " ".join(parts) or json.dumps(output, default=str)


def wait_for_job(
    api: JobAPI,
    first: dict[str, Any],
    *,
    poll_s: float = 1.0,
    max_wait_s: float | None = None,
    on_update: Callable[[str], None] = log.info,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Poll ``/status`` until the job is final, reporting each new status and progress line once."""
    body, seen = first, ""
    deadline = None if max_wait_s is None else clock() + max_wait_s
    while True:
        status = str(body.get("status"))
        line = status
        if status == "IN_PROGRESS" and body.get("output") is not None:
            line = f"{status} {describe_progress(body['output'])}"
        if line != seen:
            on_update(line)
            seen = line
        if status in FINAL_STATES:
            return body
        if "id" not in body:
            raise EndpointError(f"the endpoint answered status {status!r} without a job id: {body}")
        if deadline is not None and clock() >= deadline:
            raise TimeoutError(f"job {body['id']} not finished after {max_wait_s:g} s")
        sleep(poll_s)
        body = api.status(str(body["id"])) | {"id": body["id"]}


# ---------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------


def _details_lines(details: Mapping[str, Any]) -> list[str]:
    lines = []
    for item in details.get("node_errors") or []:
        if isinstance(item, dict):
            where = f"node {item.get('node_id')} ({item.get('class_type', '?')})"
            if item.get("input_name"):
                where += f" input {item['input_name']!r}"
            line = f"{where}: {item.get('message', '')}"
            if item.get("closest"):
                line += f" (closest: {', '.join(map(str, item['closest']))})"
            lines.append(line)
    for key, value in details.items():
        if key in {"node_errors", "comfyui_error", "traceback"}:
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
        lines.append(f"{key}: {text if len(text) <= 300 else text[:300] + '...'}")
    return lines


def format_error(body: Mapping[str, Any], verbose: bool = False) -> str:
    """A failed job, readable: the worker's ``error`` is a JSON string (error_type, message, details)."""
    raw = body.get("error")
    head = f"job {body.get('id', '?')} {body.get('status', 'FAILED')}"
    try:
        error = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        error = raw
    if not isinstance(error, dict):
        return f"{head}: {error if error is not None else '(no error message)'}"
    error_type = error.get("error_type", "error")
    message = error.get("message") or error.get("error_message") or ""
    lines = [f"{head}: {error_type}", f"  {message}"]
    details = error.get("details")
    if isinstance(details, dict):
        lines += [f"  {line}" for line in _details_lines(details)]
    if error.get("prompt_id"):
        lines.append(f"  prompt_id: {error['prompt_id']}")
    comfyui = (error.get("diagnostics") or {}).get("comfyui") or {}
    if comfyui:
        lines.append(f"  ComfyUI {comfyui.get('version', '?')}: {comfyui.get('state', '?')}")
    tail = (error.get("diagnostics") or {}).get("comfyui_log_tail") or []
    if verbose and tail:
        lines += ["  ComfyUI log:", *(f"    {line}" for line in tail)]
    traceback = error.get("error_traceback") or (details or {}).get("traceback")
    if verbose and traceback:
        lines += ["  traceback:", *(f"    {line}" for line in str(traceback).splitlines())]
    return "\n".join(lines)


def safe_filename(name: Any, fallback: str) -> str:
    """Only the last path segment of a worker-given name: outputs never land outside ``--out``."""
    base = Path(str(name or "")).name
    return base if base not in {"", ".", ".."} else fallback


def _unique(folder: Path, name: str, taken: set[str]) -> Path:
    stem, suffix = Path(name).stem, Path(name).suffix
    candidate, counter = name, 1
    while candidate in taken or (folder / candidate).exists():
        counter += 1
        candidate = f"{stem}_{counter}{suffix}"
    taken.add(candidate)
    return folder / candidate


def _write_atomic(path: Path, chunks: Any) -> None:
    """Write to a process-unique temporary name beside ``path`` and move it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with tmp.open("wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def fetch_output(entry: Mapping[str, Any], path: Path) -> None:
    """An output's bytes into ``path``: base64 decoded, or an ``s3_url`` downloaded (without our API key)."""
    data = entry.get("data")
    if not isinstance(data, str):
        raise EndpointError(f"output {entry.get('filename')!r} has no data")
    if entry.get("type") == "s3_url" or data.startswith(("http://", "https://")):
        try:
            with requests.get(data, stream=True, timeout=(10, 300)) as response:
                response.raise_for_status()
                _write_atomic(path, response.iter_content(1 << 20))
        except requests.RequestException as exc:
            raise EndpointError(f"downloading {entry.get('filename')!r} failed: {exc}") from exc
        return
    try:
        payload = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EndpointError(f"output {entry.get('filename')!r} is not valid base64: {exc}") from exc
    _write_atomic(path, [payload])


def save_outputs(output: Mapping[str, Any], folder: Path) -> list[Path]:
    """Every file output plus text outputs (``text_node<id>.txt``) into ``folder``; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    saved: list[Path] = []
    taken: set[str] = set()
    for kind in OUTPUT_KINDS:
        for index, entry in enumerate(output.get(kind) or []):
            path = _unique(folder, safe_filename(entry.get("filename"), f"{kind}_{index}"), taken)
            fetch_output(entry, path)
            saved.append(path)
    for index, entry in enumerate(output.get("text") or []):
        path = _unique(folder, f"text_node{safe_filename(entry.get('node_id'), str(index))}.txt", taken)
        path.write_text(str(entry.get("text", "")), encoding="utf-8")
        saved.append(path)
    return saved


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"needs a number > 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comfy-worker-client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("workflow", type=Path, help="an API-format workflow file (Workflow > Export (API))")
    parser.add_argument("--url", help="endpoint base URL (default: RunPod's, from RUNPOD_ENDPOINT_ID)")
    parser.add_argument("--sync", action="store_true", help="use /runsync instead of /run + /status polling")
    parser.add_argument("--image", action="append", type=parse_image, default=[], metavar="[NAME=]PATH")
    parser.add_argument("--set", action="append", type=parse_set, default=[], metavar="NODE.FIELD=VALUE")
    parser.add_argument("--prompt", help="the positive prompt")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--size", type=parse_size, metavar="WxH")
    parser.add_argument("--timeout", type=_positive, help="the job's time limit on the worker, seconds")
    parser.add_argument("--max-wait", type=_positive, help="give up (and cancel) after this many seconds")
    parser.add_argument("--poll", type=_positive, default=1.0, help="seconds between status calls (default 1)")
    parser.add_argument("--format", choices=("png", "webp", "jpeg"), help="output.format")
    parser.add_argument("--quality", type=int, help="output.quality (webp/jpeg, 1..100)")
    parser.add_argument("--delivery", choices=("auto", "base64", "s3"), help="output.delivery")
    parser.add_argument("--include-temp", action="store_true", help="also return PreviewImage outputs")
    parser.add_argument("--s3-prefix", help="output.s3_prefix")
    parser.add_argument("--out", type=Path, help="folder for the outputs (default ./outputs/<job id>)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs; ComfyUI's log tail on errors")
    return parser


def output_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {
        "format": args.format,
        "quality": args.quality,
        "delivery": args.delivery,
        "s3_prefix": args.s3_prefix,
        "include_temp": args.include_temp or None,
    }
    return {key: value for key, value in options.items() if value is not None}


def _emit(line: str) -> None:
    """Results (saved paths) go to stdout, one per line, so scripts can read them; logs go to stderr."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    endpoint = endpoint_from(args.url, env)
    job = build_job(
        load_workflow(args.workflow),
        images=args.image,
        overrides=args.set,
        prompt=args.prompt,
        seed=args.seed,
        size=args.size,
        timeout=args.timeout,
        output=output_options(args),
    )
    api = JobAPI(endpoint)
    job_id: str | None = None
    try:
        log.info("sending %s to %s%s", args.workflow, endpoint.base_url, "/runsync" if args.sync else "/run")
        first = api.submit(job, sync=args.sync)
        job_id = str(first["id"]) if first.get("id") else None
        if job_id:
            log.info("job %s", job_id)
        body = wait_for_job(api, first, poll_s=args.poll, max_wait_s=args.max_wait)
    except KeyboardInterrupt:
        if job_id is None:
            log.warning("interrupted before the endpoint gave a job id: the job may still run")
        elif api.cancel(job_id):
            log.warning("interrupted: cancelled job %s", job_id)
        return EXIT_INTERRUPTED
    except TimeoutError as exc:
        if job_id:
            api.cancel(job_id)
        log.error("%s: cancelled", exc)
        return EXIT_FAILED
    finally:
        api.close()
    if body.get("status") != "COMPLETED":
        log.error("%s", format_error(body, verbose=args.verbose))
        return EXIT_FAILED
    output = body.get("output")
    if not isinstance(output, dict):
        log.error("job %s completed without an output object: %r", job_id, output)
        return EXIT_FAILED
    for path in save_outputs(output, args.out or Path("outputs") / (job_id or "sync")):
        _emit(str(path))
    for warning in output.get("warnings") or []:
        log.warning("worker warning: %s", warning)
    log.info("done in %ss (prompt %s)", output.get("execution_time_seconds"), output.get("prompt_id"))
    return EXIT_OK


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return run(args, os.environ if env is None else env)
    except ClientError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    except EndpointError as exc:
        log.error("%s", exc)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
