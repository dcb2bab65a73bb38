"""HTTP and WebSocket side of the stand-in ComfyUI: the routes, status codes and bodies of the real one.

Routes are served both bare and under ``/api``. Job events go only to the socket whose ``clientId`` equals the
prompt's ``client_id``; ``status`` and binary TEXT frames go to every socket; events of a prompt without
``client_id`` that the real server sends to nobody in particular (``progress_state``, ``progress``, previews,
``execution_interrupted``) are broadcast, exactly as recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import os
import struct
import sys
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from io import BytesIO
from pathlib import PurePath
from typing import Any

import aiohttp
import standin_jobs
from aiohttp import web
from PIL import Image, ImageOps
from standin_assets import Assets
from standin_execution import (
    PREVIEW_IMAGE,
    PREVIEW_IMAGE_WITH_METADATA,
    TEXT,
    UNENCODED_PREVIEW_IMAGE,
    Job,
    JobQueue,
    StopRequest,
    check_prompt,
)
from standin_flavour import NEWER, VERSION
from standin_nodes import NodeEnv, NodeRegistry
from standin_paths import FolderPaths, guess_content_type

log = logging.getLogger("standin.server")

COMFYUI_VERSION = VERSION  # 0.3.64, or 0.38.1 with STANDIN_COMFYUI_FLAVOUR=0.38 (standin_flavour)
FRONTEND_VERSION = "1.27.10"
TEMPLATES_VERSION = "0.1.95"
# Served as bytes, never as something a browser would render or run.
UNSAFE_TYPES = {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript", "text/css"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def memory_bytes() -> tuple[int, int]:
    """(total, available) RAM, read from /proc/meminfo where there is one."""
    found: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                found[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if "MemTotal" in found:
        return found["MemTotal"], found.get("MemAvailable", 0)
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3, 8 * 1024**3


def inside(root: str, candidate: str) -> bool:
    """Whether ``candidate`` (made absolute, ``..`` folded) is ``root`` or lies below it."""
    return PurePath(os.path.abspath(candidate)).is_relative_to(root)


def is_loopback_name(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def origin_mismatch(host: str, origin: str) -> bool:
    """A browser on another site calling a loopback server: the Host and Origin name different places.

    Ports are compared only when both headers carry one."""
    host_url = urllib.parse.urlsplit("//" + host.lower())
    origin_url = urllib.parse.urlsplit(origin)
    if not is_loopback_name(host_url.hostname):
        return False
    host_side = host.lower() if origin_url.port is not None else host_url.hostname or ""
    origin_side = origin_url.netloc.lower() if host_url.port is not None else origin_url.hostname or ""
    return bool(host_side and origin_side and host_side != origin_side)


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Cross-site requests to a loopback server get 403; pre-flight requests get an empty 200."""
    headers = request.headers
    if "Host" in headers and "Origin" in headers and origin_mismatch(headers["Host"], headers["Origin"]):
        log.warning("Refused request: Host %s and Origin %s differ", headers["Host"], headers["Origin"])
        return web.Response(status=403)
    if request.method == "OPTIONS":
        return web.Response()
    return await handler(request)


def encode_preview(preview: Any) -> tuple[str, bytes]:
    """(image format, encoded bytes) of a ``(format, image, max size)`` preview."""
    image_format, image, max_size = preview
    if max_size is not None:
        image = ImageOps.contain(image, (max_size, max_size), Image.Resampling.BILINEAR)
    buffer = BytesIO()
    image.save(buffer, format=image_format, quality=95, compress_level=1)
    return image_format, buffer.getvalue()


def frame_u32(*numbers: int) -> bytes:
    return struct.pack(f">{len(numbers)}I", *numbers)


class StandinServer:
    """One server instance: sockets, the job queue, and the HTTP routes."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        registry: NodeRegistry,
        env: NodeEnv,
        stop: StopRequest,
        paths: FolderPaths,
        max_upload_size_mb: float,
        argv: list[str],
    ) -> None:
        self.loop = loop
        self.registry = registry
        self.env = env
        self.stop = stop
        self.paths = paths
        self.argv = argv
        self.jobs = JobQueue(self)
        self.outbox: asyncio.Queue[tuple[str | int, Any, str | None]] = asyncio.Queue()
        self.next_number = 0
        self.listeners: dict[str, web.WebSocketResponse] = {}
        self.client_flags: dict[str, dict[str, Any]] = {}
        self.current_client: str | None = None
        self.current_node: str | None = None
        upload_limit = max_upload_size_mb * 1024 * 1024
        self.features: dict[str, Any] = {"supports_preview_metadata": True, "max_upload_size": upload_limit}
        if NEWER:
            self.features["assets"] = True
        self.assets = Assets(paths.folder_of) if NEWER else None
        self.app = web.Application(client_max_size=round(upload_limit), middlewares=[guard])
        self._register_routes()
        env.send_text = self.send_text

    # -- events ------------------------------------------------------------------------------------------------
    def publish(self, event: str | int, data: Any, sid: str | None = None) -> None:
        """Queue an event from any thread; ``pump`` delivers them in order (``sid=None``: everyone)."""
        self.loop.call_soon_threadsafe(self.outbox.put_nowait, (event, data, sid))

    def status(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": self.jobs.remaining()}}

    def broadcast_status(self) -> None:
        self.publish("status", {"status": self.status()})

    def wants_preview_metadata(self, sid: str | None) -> bool:
        flags = self.client_flags.get(sid or "", {})
        return flags.get("supports_preview_metadata", False) is True

    def send_text(self, text: str, node_id: str) -> None:
        node = str(node_id).encode("utf-8")
        self.publish(TEXT, frame_u32(len(node)) + node + text.encode("utf-8"))

    async def pump(self) -> None:
        while True:
            event, data, sid = await self.outbox.get()
            try:
                await self.deliver(event, data, sid)
            except Exception:  # one bad event must not stop the others
                log.exception("Could not send %s", event)

    async def deliver(self, event: str | int, data: Any, sid: str | None) -> None:
        if event == UNENCODED_PREVIEW_IMAGE:
            image_format, image = encode_preview(data)
            payload = frame_u32(PREVIEW_IMAGE, 2 if image_format == "PNG" else 1) + image
        elif event == PREVIEW_IMAGE_WITH_METADATA:
            preview, ids = data
            image_format, image = encode_preview(preview)
            mime = "image/png" if image_format == "PNG" else "image/jpeg"
            header = json.dumps({**ids, "image_type": mime}).encode("utf-8")
            payload = frame_u32(PREVIEW_IMAGE_WITH_METADATA, len(header)) + header + image
        elif isinstance(data, (bytes, bytearray)):
            payload = frame_u32(int(event)) + bytes(data)
        else:
            await self._to_sockets(sid, json.dumps({"type": event, "data": data}))
            return
        await self._to_sockets(sid, payload)

    async def _to_sockets(self, sid: str | None, message: str | bytes) -> None:
        if sid is None:
            targets = list(self.listeners.values())
        else:
            targets = [self.listeners[sid]] if sid in self.listeners else []
        for ws in targets:
            try:
                if isinstance(message, str):
                    await ws.send_str(message)
                else:
                    await ws.send_bytes(message)
            except (aiohttp.ClientError, ConnectionError) as err:
                log.warning("WebSocket send failed: %s", err)

    # -- routes ------------------------------------------------------------------------------------------------
    def _register_routes(self) -> None:
        table: list[tuple[str, str, Handler]] = [
            ("GET", "/ws", self.ws),
            ("GET", "/embeddings", self.embeddings),
            ("GET", "/models", self.model_kinds),
            ("GET", "/models/{folder}", self.models),
            ("GET", "/extensions", self.extensions),
            ("POST", "/upload/image", self.upload),
            ("GET", "/view", self.view),
            ("GET", "/system_stats", self.system_stats),
            ("GET", "/features", self.feature_list),
            ("GET", "/prompt", self.queue_status),
            ("GET", "/object_info", self.object_info),
            ("GET", "/object_info/{node_class}", self.object_info_one),
            ("GET", "/history", self.history),
            ("GET", "/history/{prompt_id}", self.history_one),
            ("GET", "/queue", self.queue),
            ("POST", "/prompt", self.submit),
            ("POST", "/queue", self.edit_queue),
            ("POST", "/interrupt", self.interrupt),
            ("POST", "/free", self.free),
            ("POST", "/history", self.edit_history),
        ]
        if NEWER:  # declared with /api in their path: also served under /api/api, never as /jobs
            table += [
                ("GET", "/api/jobs", self.jobs_list),
                ("GET", "/api/jobs/{job_id}", self.job_one),
                ("POST", "/api/jobs/{job_id}/cancel", self.job_cancel),
                ("POST", "/api/jobs/cancel", self.jobs_cancel),
            ]
        router = self.app.router
        for prefix in ("/api", ""):
            for method, path, handler in table:
                router.add_route(method, prefix + path, handler)
        router.add_route("GET", "/", self.root)

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        sid = request.rel_url.query.get("clientId", "") or uuid.uuid4().hex
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.listeners.pop(sid, None)  # a reconnect replaces the old socket (and keeps its place last)
        self.listeners[sid] = ws
        self.client_flags[sid] = {}
        try:
            await self.deliver("status", {"status": self.status(), "sid": sid}, sid)
            if self.current_client == sid and self.current_node is not None:
                await self.deliver("executing", {"node": self.current_node}, sid)
            negotiating = True
            async for message in ws:
                if message.type == aiohttp.WSMsgType.ERROR:
                    log.warning("WebSocket of %s failed: %s", sid, ws.exception())
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                try:
                    body = json.loads(message.data)
                except json.JSONDecodeError:
                    log.warning("Ignoring non-JSON message from %s", sid)
                    continue
                try:
                    if negotiating and body.get("type") == "feature_flags":
                        self.client_flags[sid] = body.get("data", {})
                        await self.deliver("feature_flags", dict(self.features), sid)
                    negotiating = False
                except Exception as exc:
                    log.error("Bad WebSocket message from %s: %s", sid, exc)
        finally:
            self.listeners.pop(sid, None)
            self.client_flags.pop(sid, None)
        return ws

    async def root(self, request: web.Request) -> web.Response:
        html = "<!doctype html><title>ComfyUI (stand-in)</title><p>Stand-in ComfyUI test server: API only.</p>"
        return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-cache"})

    async def embeddings(self, request: web.Request) -> web.Response:
        return web.json_response([os.path.splitext(name)[0] for name in self.paths.files_in("embeddings")])

    async def model_kinds(self, request: web.Request) -> web.Response:
        return web.json_response(list(self.paths.model_folders))

    async def models(self, request: web.Request) -> web.Response:
        folder = request.match_info["folder"]
        if folder not in self.paths.model_folders:
            return web.Response(status=404)
        return web.json_response(self.paths.files_in(folder))

    async def extensions(self, request: web.Request) -> web.Response:
        return web.json_response([])

    async def upload(self, request: web.Request) -> web.Response:
        form = await request.post()
        kind = form.get("type")
        kind = kind if isinstance(kind, str) else "input"
        root = self.paths.folder_of(kind)
        if root is None:  # the real server answers a plain 500 here too
            raise RuntimeError(f"unknown upload type {kind!r}")
        image: Any = form.get("image")
        if not image or not image.file or not image.filename:
            return web.Response(status=400)
        subfolder = str(form.get("subfolder", ""))
        folder = os.path.join(root, os.path.normpath(subfolder))
        name = image.filename
        if not inside(root, os.path.join(folder, name)):
            return web.Response(status=400)
        os.makedirs(folder, exist_ok=True)
        data = image.file.read()
        if form.get("overwrite") not in ("true", "1"):
            stem, suffix = os.path.splitext(image.filename)
            attempt = 0
            while os.path.exists(os.path.join(folder, name)):
                if same_content(os.path.join(folder, name), data):
                    return web.json_response({"name": name, "subfolder": subfolder, "type": kind})
                attempt += 1
                name = f"{stem} ({attempt}){suffix}"
        write_file(os.path.join(folder, name), data)
        answer: dict[str, Any] = {"name": name, "subfolder": subfolder, "type": kind}
        if self.assets is not None:
            answer["asset"] = self.assets.upload(os.path.join(folder, name), name, kind, data)
        return web.json_response(answer)

    async def view(self, request: web.Request) -> web.StreamResponse:
        query = request.rel_url.query
        if "filename" not in query:
            return web.Response(status=404)
        name, root = self.paths.split_annotation(query["filename"])
        if not name or name.startswith("/") or ".." in name:
            return web.Response(status=400)
        root = root or self.paths.folder_of(query.get("type", "output"))
        if root is None:
            return web.Response(status=400)
        if "subfolder" in query:
            folder = os.path.join(root, query["subfolder"])
            if not inside(root, folder):
                return web.Response(status=403)
            root = folder
        name = os.path.basename(name)
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            return web.Response(status=404)
        headers = {"Content-Disposition": f'filename="{name}"'}
        channel = query.get("channel", "")
        if "preview" in query:
            parts = query["preview"].split(";")
            image_format, quality = parts[0], parts[-1]
            if image_format not in ("webp", "jpeg") or "a" in channel:
                image_format = "webp"
            quality_value = int(quality) if quality.isdigit() else 90
            with Image.open(path) as img:
                out = img.convert("RGB") if image_format == "jpeg" or channel == "rgb" else img
                return web.Response(
                    body=save_to_bytes(out, image_format, quality=quality_value),
                    content_type=f"image/{image_format}",
                    headers=headers,
                )
        if channel in ("rgb", "a"):
            with Image.open(path) as img:
                if channel == "rgb":
                    out = img.convert("RGB")
                else:
                    alpha = img.getchannel("A") if img.mode == "RGBA" else Image.new("L", img.size, 255)
                    out = Image.new("RGBA", img.size)
                    out.putalpha(alpha)
                return web.Response(body=save_to_bytes(out, "PNG"), content_type="image/png", headers=headers)
        content_type = guess_content_type(name)
        if content_type in UNSAFE_TYPES:
            content_type = "application/octet-stream"
        return web.FileResponse(path, headers={**headers, "Content-Type": content_type})

    async def system_stats(self, request: web.Request) -> web.Response:
        total, free = memory_bytes()
        system = {
            "os": sys.platform if NEWER else os.name,
            "ram_total": total,
            "ram_free": free,
            "comfyui_version": COMFYUI_VERSION,
            "required_frontend_version": FRONTEND_VERSION,
            "installed_templates_version": TEMPLATES_VERSION,
            "required_templates_version": TEMPLATES_VERSION,
            "python_version": sys.version,
            "pytorch_version": "standin (no torch)",
            "embedded_python": False,
            "argv": self.argv,
        }
        if NEWER:  # one entry per comfy* package of the requirements
            system["comfy_package_versions"] = [
                {"name": "comfyui-frontend-package", "installed": FRONTEND_VERSION, "required": FRONTEND_VERSION}
            ]
        device = {
            "name": "cpu",
            "type": "cpu",
            "index": None,
            "vram_total": total,
            "vram_free": free,
            "torch_vram_total": total,
            "torch_vram_free": free,
        }
        return web.json_response({"system": system, "devices": [device]})

    async def feature_list(self, request: web.Request) -> web.Response:
        return web.json_response(dict(self.features))

    async def queue_status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    async def object_info(self, request: web.Request) -> web.Response:
        return web.json_response(self.registry.object_info())

    async def object_info_one(self, request: web.Request) -> web.Response:
        name = request.match_info["node_class"]
        found = self.registry.get(name) is not None
        return web.json_response({name: self.registry.node_info(name)} if found else {})

    async def history(self, request: web.Request) -> web.Response:
        query = request.rel_url.query
        max_items = int(query["max_items"]) if "max_items" in query else None
        offset = int(query["offset"]) if "offset" in query else -1
        return web.json_response(self.jobs.history(max_items=max_items, offset=offset))

    async def history_one(self, request: web.Request) -> web.Response:
        return web.json_response(self.jobs.history(prompt_id=request.match_info["prompt_id"]))

    async def queue(self, request: web.Request) -> web.Response:
        running, pending = self.jobs.snapshot()
        return web.json_response({"queue_running": running, "queue_pending": pending})

    async def submit(self, request: web.Request) -> web.Response:
        log.info("got prompt")
        body = await request.json()
        if "number" in body:
            number: float = float(body["number"])
        else:
            number = -self.next_number if lookup(body, "front") else self.next_number
            self.next_number += 1
        if "prompt" not in body:
            error = {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided"}
            error["extra_info"] = {}
            return web.json_response({"error": error, "node_errors": {}}, status=400)
        prompt = body["prompt"]
        if NEWER:  # 0.38: absent or null is minted, anything else must be a canonical UUID
            prompt_id = body.get("prompt_id")
            if prompt_id is None:
                prompt_id = str(uuid.uuid4())
            elif not standin_jobs.is_job_id(prompt_id):
                details = (
                    "prompt_id must be a UUID string in canonical lowercase hyphenated form; "
                    "omit it to let the server generate one"
                )
                error = {"type": "invalid_prompt_id", "message": "prompt_id must be a valid UUID", "details": details}
                return web.json_response({"error": error | {"extra_info": {}}, "node_errors": {}}, status=400)
        else:
            prompt_id = str(body.get("prompt_id", uuid.uuid4()))
        ok, error, targets, node_errors = check_prompt(
            self.registry, self.env, prompt, body.get("partial_execution_targets")
        )
        extra = lookup(body, "extra_data", {})
        if "client_id" in body:
            extra["client_id"] = body["client_id"]
        if not ok:
            log.warning("invalid prompt: %s", error)
            return web.json_response({"error": error, "node_errors": node_errors}, status=400)
        if NEWER:
            extra["create_time"] = int(time.time() * 1000)
        self.jobs.add(Job(number, prompt_id, prompt, extra, targets))
        return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": node_errors})

    async def edit_queue(self, request: web.Request) -> web.Response:
        body = await request.json()
        if lookup(body, "clear"):
            self.jobs.clear()
        for prompt_id in lookup(body, "delete", ()):
            self.jobs.cancel(prompt_id)
        return web.Response()

    async def interrupt(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            body = {}
        prompt_id = body.get("prompt_id")
        if not prompt_id:
            log.info("Interrupting whatever runs")
            self.stop.request()
        elif self.jobs.is_running(prompt_id):
            log.info("Interrupting prompt %s", prompt_id)
            self.stop.request()
        else:
            log.info("Prompt %s is not running: nothing to interrupt", prompt_id)
        return web.Response()

    # -- the jobs API (0.38 flavour) ----------------------------------------------------------------------------
    def _history_and_queue(self) -> tuple[list[list[Any]], list[list[Any]], dict[str, Any]]:
        running, pending = self.jobs.snapshot()
        return running, pending, self.jobs.history()

    async def jobs_list(self, request: web.Request) -> web.Response:
        status, body = standin_jobs.list_jobs(dict(request.rel_url.query), *self._history_and_queue())
        return web.json_response(body, status=status)

    async def job_one(self, request: web.Request) -> web.Response:
        job = standin_jobs.one_job(request.match_info["job_id"], *self._history_and_queue())
        if job is None:
            return web.json_response({"error": "Job not found"}, status=404)
        return web.json_response(job)

    def _cancel(self, job_id: str) -> bool:
        """Interrupt ``job_id`` while it is the running one, or drop it from the queue; False for a no-op."""
        if self.jobs.cancel(job_id):
            log.info("Cancelling pending prompt %s", job_id)
            return True
        if self.jobs.interrupt_if_running(job_id, self.stop):
            log.info("Cancelling running prompt %s", job_id)
            return True
        return False

    async def job_cancel(self, request: web.Request) -> web.Response:
        return web.json_response({"cancelled": self._cancel(request.match_info["job_id"])})

    async def jobs_cancel(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return web.json_response({"error": "Request body must be valid JSON"}, status=400)
        ids = body.get("job_ids") if isinstance(body, dict) else None
        if not isinstance(ids, list):
            return web.json_response({"error": "job_ids must be a list"}, status=400)
        invalid = [i if isinstance(i, str) else repr(i) for i in ids if not standin_jobs.is_job_id(i)]
        if invalid:
            body = {"error": "job_ids contains invalid id(s)", "invalid_ids": invalid}
            return web.json_response(body, status=400)
        cancelled = [self._cancel(job_id) for job_id in ids]
        return web.json_response({"cancelled": any(cancelled)})

    async def free(self, request: web.Request) -> web.Response:
        body = await request.json()
        for name in ("unload_models", "free_memory"):
            if body.get(name, False):
                self.jobs.request(name, body[name])
        return web.Response()

    async def edit_history(self, request: web.Request) -> web.Response:
        body = await request.json()
        if lookup(body, "clear"):
            self.jobs.forget_history()
        for prompt_id in lookup(body, "delete", ()):
            self.jobs.forget_history(prompt_id)
        return web.Response()


def same_content(path: str, data: bytes) -> bool:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()


def save_to_bytes(image: Image.Image, image_format: str, **options: Any) -> bytes:
    buffer = BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def lookup(body: Any, key: str, default: Any = None) -> Any:
    """``body[key]`` if present; a JSON list body simply lacks every key (unless it holds the key as an item)."""
    return body[key] if key in body else default  # noqa: SIM401 - body may be a list
