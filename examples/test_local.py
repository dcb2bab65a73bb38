"""Send a workflow file to a running worker's local API and save what comes back.

    python examples/test_local.py examples/workflows/sd15_txt2img.json --prompt "a red fox" --seed 7
    python examples/test_local.py wf.json --image photo.png:inputs/photo.png --set 6.inputs.text="a cat"

The worker must be serving (``python handler.py --rp_serve_api``). Outputs are written to ``--out``; the
exit code is 1 when the job failed, with the worker's structured error printed.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import sys
from pathlib import Path
from typing import Any

import requests

log = logging.getLogger("test_local")


def parse_set(text: str) -> dict[str, Any]:
    """``6.inputs.text=a cat`` -> an override; the value is JSON when it parses, else a string."""
    target, sep, raw = text.partition("=")
    node_id, dot, field = target.partition(".")
    if not sep or not dot:
        raise argparse.ArgumentTypeError(f"--set needs NODE.FIELD=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return {"node_id": node_id, "field": field, "value": value}


def build_job(args: argparse.Namespace) -> dict[str, Any]:
    job: dict[str, Any] = {"workflow": json.loads(Path(args.workflow).read_text())}
    if args.image:
        images = []
        for spec in args.image:
            path, _, name = spec.partition(":")
            images.append(
                {"name": name or Path(path).name, "image": base64.b64encode(Path(path).read_bytes()).decode()}
            )
        job["images"] = images
    if args.set:
        job["overrides"] = args.set
    if args.prompt is not None:
        job["prompt"] = args.prompt
    if args.seed is not None:
        job["seed"] = args.seed
    if args.size:
        width, _, height = args.size.partition("x")
        job["width"], job["height"] = int(width), int(height)
    if args.timeout is not None:
        job["timeout"] = args.timeout
    return job


def save_outputs(output: dict[str, Any], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    saved = []
    for kind in ("images", "videos", "audio", "files"):
        for entry in output.get(kind, []):
            path = folder / entry["filename"]
            path.write_bytes(base64.b64decode(entry["data"]))
            saved.append(path)
    for entry in output.get("text", []):
        path = folder / f"text_node{entry['node_id']}.txt"
        with path.open("a", encoding="utf-8") as handle:
            handle.write(entry["text"] + "\n")
        saved.append(path)
    return saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workflow", help="an API-format workflow file")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the worker's local API")
    parser.add_argument("--image", action="append", help="PATH[:NAME] to upload into ComfyUI's input folder")
    parser.add_argument("--set", action="append", type=parse_set, help="NODE.FIELD=VALUE override")
    parser.add_argument("--prompt")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--size", help="WIDTHxHEIGHT")
    parser.add_argument("--timeout", type=float)
    parser.add_argument("--out", default="outputs", help="folder for the outputs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    response = requests.post(f"{args.url}/runsync", json={"input": build_job(args)}, timeout=3600)
    response.raise_for_status()
    body = response.json()
    if body.get("status") != "COMPLETED":
        try:
            error = json.loads(body.get("error", ""))
        except ValueError:
            error = body.get("error")
        log.error("job %s %s:\n%s", body.get("id"), body.get("status"), json.dumps(error, indent=2))
        return 1
    output = body["output"]
    for path in save_outputs(output, Path(args.out)):
        log.info("saved %s", path)
    for warning in output.get("warnings", []):
        log.warning("warning: %s", warning)
    log.info("done in %ss (prompt %s)", output.get("execution_time_seconds"), output.get("prompt_id"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
