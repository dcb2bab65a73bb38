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
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comfy_worker.api_format import check_api_format
from comfy_worker.errors import InputError
from comfy_worker.fsutil import atomic_write
from comfy_worker.tools.jobapi import (
    OUTPUT_KINDS,
    RUNPOD_API_BASE,
    JobAPI,
    JobAPIError,
    describe_progress,
    output_chunks,
    safe_output_name,
)
from comfy_worker.ui_format import is_ui_format

log = logging.getLogger("comfy_worker.tools.client")
ENDPOINT_EXECUTION_TIMEOUT_S = 600.0  # RunPod's default execution timeout of a job
EXECUTION_MARGIN_S = 60.0  # the worker answers within seconds of its timeout; the result then has to travel

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class ClientError(Exception):
    """Something the user can fix (a file, an argument, a credential): printed without a traceback."""


@dataclass(frozen=True)
class Endpoint:
    """Where jobs go: RunPod's ``https://api.runpod.ai/v2/<id>`` or any base URL with the same routes."""

    base_url: str
    api_key: str | None = None


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
    """Read a workflow: the API format (checked here), or the UI format as *Save* writes it.

    A UI-format workflow is sent as it is: the worker converts it with its own ComfyUI's node definitions,
    which this machine does not have.
    """
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
    if is_ui_format(data):
        log.info("%s is in ComfyUI's UI format: the worker converts it to the API format", path)
        return dict(data)
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
    """The job ``input`` in the worker's schema (docs/job-api.md, Job input); the worker validates it again."""
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


def request_options(webhook: str | None, timeout_s: float | None) -> dict[str, Any]:
    """RunPod's request fields beside ``input``: the ``webhook``, and a ``policy.executionTimeout`` when the job's
    own ``timeout`` (plus a margin for its result to travel) needs more than an endpoint's default 600 s, so the
    worker's clear ``timeout`` error, not the platform's kill, ends a job that runs too long."""
    options: dict[str, Any] = {}
    if webhook:
        options["webhook"] = webhook
    if timeout_s is not None and timeout_s + EXECUTION_MARGIN_S > ENDPOINT_EXECUTION_TIMEOUT_S:
        options["policy"] = {"executionTimeout": round((timeout_s + EXECUTION_MARGIN_S) * 1000)}
    return options


# ---------------------------------------------------------------------------------------------------------
# Talking to the endpoint
# ---------------------------------------------------------------------------------------------------------


class ProgressLines:
    """Each new status or progress line once (``IN_PROGRESS  56.2% node 3 (KSampler) step 1/4``), to the log."""

    def __init__(self) -> None:
        self.shown = ""

    def __call__(self, body: Mapping[str, Any]) -> None:
        status = str(body.get("status"))
        line = status
        if status == "IN_PROGRESS" and body.get("output") is not None:
            line = f"{status} {describe_progress(body['output'])}"
        if line != self.shown:
            log.info("%s", line)
            self.shown = line


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


def _unique(folder: Path, name: str, taken: set[str]) -> Path:
    stem, suffix = Path(name).stem, Path(name).suffix
    candidate, counter = name, 1
    while candidate in taken or (folder / candidate).exists():
        counter += 1
        candidate = f"{stem}_{counter}{suffix}"
    taken.add(candidate)
    return folder / candidate


def save_outputs(output: Mapping[str, Any], folder: Path) -> tuple[list[Path], list[str]]:
    """Every file output plus text outputs (``text_node<id>.txt``) into ``folder``: the paths saved, and one
    message per output that could not be (the others are still saved)."""
    folder.mkdir(parents=True, exist_ok=True)
    saved: list[Path] = []
    failed: list[str] = []
    taken: set[str] = set()
    for kind in OUTPUT_KINDS:
        for index, entry in enumerate(output.get(kind) or []):
            fallback = f"{kind}_{index}"
            path = _unique(folder, safe_output_name(entry.get("filename"), fallback), taken)
            try:
                atomic_write(path, output_chunks(entry))
            except (JobAPIError, OSError) as exc:
                failed.append(f"{kind}[{index}] ({entry.get('filename')!r}): {exc}")
                continue
            saved.append(path)
    for index, entry in enumerate(output.get("text") or []):
        path = _unique(folder, f"text_node{safe_output_name(entry.get('node_id'), str(index))}.txt", taken)
        try:
            atomic_write(path, str(entry.get("text", "")))
        except OSError as exc:
            failed.append(f"text[{index}]: {exc}")
            continue
        saved.append(path)
    return saved, failed


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
    parser.add_argument("--webhook", help="URL RunPod POSTs the finished job's status to (as /status answers it)")
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
    api = JobAPI(endpoint.base_url, endpoint.api_key)
    job_id: str | None = None
    try:
        log.info("sending %s to %s%s", args.workflow, endpoint.base_url, "/runsync" if args.sync else "/run")
        first = api.submit(job, sync=args.sync, options=request_options(args.webhook, args.timeout))
        job_id = str(first["id"]) if first.get("id") else None
        if job_id:
            log.info("job %s", job_id)
        body = api.wait(first, poll_s=args.poll, max_wait_s=args.max_wait, on_update=ProgressLines())
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
    if body.get("status") != "COMPLETED":
        log.error("%s", format_error(body, verbose=args.verbose))
        return EXIT_FAILED
    output = body.get("output")
    if not isinstance(output, dict):
        log.error("job %s completed without an output object: %r", job_id, output)
        return EXIT_FAILED
    saved, failed = save_outputs(output, args.out or Path("outputs") / (job_id or "sync"))
    for path in saved:
        _emit(str(path))
    for warning in output.get("warnings") or []:
        log.warning("worker warning: %s", warning)
    for problem in failed:
        log.error("output not saved: %s", problem)
    log.info("done in %ss (prompt %s)", output.get("execution_time_seconds"), output.get("prompt_id"))
    return EXIT_FAILED if failed else EXIT_OK


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return run(args, os.environ if env is None else env)
    except ClientError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    except JobAPIError as exc:
        log.error("%s", exc)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
