"""Regenerate the UI-format corpus's expected API prompts with ComfyUI's own frontend (the ground truth).

    python tests/ui_format/regenerate.py --comfy-url http://127.0.0.1:8188 [--templates DIR [--into FOLDER]
        [--known-only] [--compact]] [--sources FOLDER ...] [--only NAME]

Needs a real ComfyUI serving its frontend (``comfyui_frontend_package``, or another version of it with
``--front-end-root``) at ``--comfy-url`` and Debian's ``chromium``. Headless Chromium opens the frontend, and
for every UI-format workflow in the ``--sources`` folders (``cases`` and ``templates`` unless told otherwise;
with ``--templates``, the UI-format templates of a ``comfyui_workflow_templates`` folder are first copied into
``--into``) it runs what a user's browser runs on *Queue*: ``app.loadGraphData(workflow)`` then
``app.graphToPrompt()``. The API prompt it returns is written to ``<expected>/<folder>__<name>.json``, where
``<expected>`` is named for the frontend version the page reports: ``expected`` for 1.27.10 (the frontend
ComfyUI 0.3.64 ships, the corpus's first), ``expected-<version>`` for any other. ``object_info.json`` is the
node catalogue every frontend converted against (the converter under test maps widgets with the same
catalogue): 1.27.10 writes it, and another frontend must find the server's catalogue equal to it. The case
builders (``cases/*.js``) use 1.27.10's graph API and run only under it. See frontend.md in the shared notes
this project was started from for what was measured when this was first done.

The corpus of frontend 1.58.1 (``expected-1.58.1``, templates-0.11.97) was made with ComfyUI 0.3.64 started
with ``--front-end-root`` at the static folder of ``comfyui-frontend-package`` 1.58.1, against
``comfyui-workflow-templates`` 0.11.97 (its templates are in ``comfyui-workflow-templates-json`` 0.1.123):
``--templates <site-packages>/comfyui_workflow_templates_json/templates --into templates-0.11.97 --known-only
--compact --sources cases templates templates-0.11.97``. Both ran with no model files and an empty ``3d``
folder in the input directory, as the catalogue shows.

Nothing here runs in the test suite: the stored files are the corpus, and ``tests/test_ui_format.py`` compares
``comfy_worker.ui_format`` against them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import websocket

from comfy_worker.ui_format import node_types

HERE = Path(__file__).resolve().parent
log = logging.getLogger("regenerate")

READY = """(() => {
  const app = window.app;
  if (!app || !app.graph || !app.canvas || app.configuringGraph) return 0;
  return Object.keys(window.LiteGraph?.registered_node_types ?? {}).length;
})()"""

VERSION = "window.__COMFYUI_FRONTEND_VERSION__"
FIRST_FRONTEND = "1.27.10"  # the frontend of the first corpus: its results are in expected/, its builders made cases/

CONVERT = """(async () => {
  const workflow = %s;
  await window.app.loadGraphData(workflow, true, false, null);
  const { output } = await window.app.graphToPrompt();
  const loaded = window.app.graph.nodes.map((node) => String(node.id));
  return JSON.stringify({ output, loaded });
})()"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DevTools:
    """One Chromium tab over the DevTools Protocol (what a user's browser does, driven from Python)."""

    def __init__(self, ws_url: str) -> None:
        self.ws = websocket.create_connection(ws_url, timeout=120, suppress_origin=True)
        self.next_id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(str(details.get("exception", {}).get("description") or details.get("text")))
        return result["result"].get("value")


@contextlib.contextmanager
def chromium() -> Iterator[DevTools]:
    port = free_port()
    profile = tempfile.mkdtemp(prefix="ui-format-chromium-")
    command = [
        "chromium",
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        f"--remote-debugging-port={port}",
        "--remote-debugging-address=127.0.0.1",
        f"--user-data-dir={profile}",
        "about:blank",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/json/new?about:blank", method="PUT")
                with urllib.request.urlopen(request, timeout=5) as response:
                    tab = json.load(response)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        tools = DevTools(tab["webSocketDebuggerUrl"])
        try:
            yield tools
        finally:
            tools.ws.close()
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
        process.kill()
        shutil.rmtree(profile, ignore_errors=True)


def open_frontend(tools: DevTools, comfy_url: str) -> int:
    tools.call("Runtime.enable")
    tools.call("Page.enable")
    tools.call("Page.navigate", url=comfy_url)
    deadline = time.monotonic() + 120
    while (count := tools.evaluate(READY) or 0) < 100:
        if time.monotonic() > deadline:
            raise TimeoutError("the frontend did not finish loading in 120 s")
        time.sleep(0.5)
    time.sleep(5)  # the frontend restores the last open workflow after `app` appears; let it finish first
    return int(count)


def convert(tools: DevTools, workflow: dict[str, Any]) -> dict[str, Any]:
    result = json.loads(tools.evaluate(CONVERT % json.dumps(workflow)))
    # Every root node must be there (the frontend restores its last workflow late and may replace an early
    # load), but for legacy group nodes: newer frontends turn each into a subgraph instance with a new id.
    wanted = {str(node["id"]) for node in workflow.get("nodes", []) if not str(node.get("type")).startswith("workflow")}
    if not wanted <= set(result["loaded"]):
        raise RuntimeError("the frontend converted another graph than the one loaded")
    return dict(result["output"])


# What a case builder (cases/*.js) may use: a clean graph and `add(type, pos, widgetValues)`.
BUILDER_PRELUDE = """
const app = window.app;
app.graph.clear();
const add = (type, pos, values = {}) => {
  const node = window.LiteGraph.createNode(type);
  node.pos = pos;
  app.graph.add(node);
  for (const [name, value] of Object.entries(values)) node.widgets.find((w) => w.name === name).value = value;
  return node;
};
const slot = (node, name) => node.inputs.findIndex((input) => input.name === name);
const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
"""


def build_case(tools: DevTools, script: Path) -> None:
    """Run a case builder in the frontend; what the frontend saves (``graph.serialize()``) becomes the case."""
    body = script.read_text(encoding="utf-8")
    workflow = tools.evaluate(
        f"(async () => {{ {BUILDER_PRELUDE}\n{body}\nreturn JSON.stringify(app.graph.serialize()); }})()"
    )
    target = script.with_suffix(".json")
    target.write_text(json.dumps(json.loads(workflow), indent=1) + "\n", encoding="utf-8")


def copy_templates(source: Path, into: str, known: set[str] | None, compact: bool) -> None:
    """The templates are UI workflows as ComfyUI ships them; keep the JSON files, skip the thumbnails. With
    ``known``, only those whose every node type is one of them (the others are refused before any conversion,
    which the first corpus shows already); ``compact`` writes them without indentation, to keep the corpus small."""
    target = HERE / into
    target.mkdir(exist_ok=True)
    for path in sorted(source.glob("*.json")):
        if path.name.startswith("index."):
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        if not (isinstance(data, dict) and isinstance(data.get("nodes"), list)):
            continue
        if known is not None and not node_types(data) <= known:
            continue
        text = json.dumps(data, separators=(",", ":")) if compact else json.dumps(data, indent=1)
        (target / path.name).write_text(text + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfy-url", default="http://127.0.0.1:8188")
    parser.add_argument("--templates", type=Path, help="a comfyui_workflow_templates templates/ folder to copy")
    parser.add_argument("--into", default="templates", help="the corpus folder the templates go to")
    parser.add_argument("--known-only", action="store_true", help="copy only templates of node types ComfyUI has")
    parser.add_argument("--compact", action="store_true", help="copy the templates without indentation")
    parser.add_argument("--sources", nargs="+", default=["cases", "templates"], help="corpus folders to convert")
    parser.add_argument("--only", help="convert only the case or template with this file stem")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with urllib.request.urlopen(f"{args.comfy_url}/object_info", timeout=60) as response:
        object_info = json.load(response)
    if args.templates:
        copy_templates(args.templates, args.into, set(object_info) if args.known_only else None, args.compact)
    failed = 0
    with chromium() as tools:
        log.info("frontend ready: %d node types", open_frontend(tools, args.comfy_url))
        version = str(tools.evaluate(VERSION))
        catalogue = HERE / "object_info.json"
        if version == FIRST_FRONTEND:
            catalogue.write_text(json.dumps(object_info) + "\n", encoding="utf-8")
            for script in sorted((HERE / "cases").glob("*.js")):
                if not args.only or script.stem == args.only:
                    build_case(tools, script)
        elif json.loads(catalogue.read_text(encoding="utf-8")) != object_info:
            raise SystemExit(f"{args.comfy_url}/object_info is not object_info.json: start ComfyUI as it was started")
        expected = HERE / ("expected" if version == FIRST_FRONTEND else f"expected-{version}")
        expected.mkdir(exist_ok=True)
        log.info("frontend %s: writing %s", version, expected.name)
        for path in [path for folder in args.sources for path in sorted((HERE / folder).glob("*.json"))]:
            name = f"{path.parent.name}__{path.stem}"
            if args.only and path.stem != args.only:
                continue
            try:
                output = convert(tools, json.loads(path.read_text(encoding="utf-8")))
            except RuntimeError as exc:  # the frontend refused the workflow: so must the converter
                refused = str(exc)
                (expected / f"{name}.refused.txt").write_text(refused.splitlines()[0] + "\n", encoding="utf-8")
                log.info("%s: refused by the frontend: %s", name, refused.splitlines()[0])
                continue
            except (TimeoutError, websocket.WebSocketException) as exc:
                failed += 1
                log.warning("%s: %s", name, str(exc)[:300])
                continue
            (expected / f"{name}.json").write_text(json.dumps(output, indent=1) + "\n", encoding="utf-8")
            log.info("%s: %d nodes", name, len(output))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
