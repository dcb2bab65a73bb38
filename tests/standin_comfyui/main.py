"""Stand-in ComfyUI: a fast, torch-free test server that speaks ComfyUI 0.3.64's HTTP/WebSocket API.

Run it exactly like ComfyUI::

    python tests/standin_comfyui/main.py --listen 127.0.0.1 --port 8188 [--cpu] [--base-directory D] ...

It accepts ComfyUI's command line (unknown flags are ignored), lays out input/output/temp/models folders the
same way, validates prompts against the recorded ``/object_info`` of the real server, and executes a handful of
image nodes with Pillow plus the test-only ``Standin*`` nodes. See README.md beside this file.
Stand-in specific options: ``--object-info PATH`` (or ``STANDIN_COMFYUI_OBJECT_INFO``) and
``--standin-startup-delay SECONDS`` (sleep before listening, to imitate a slow boot).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import shutil
import sqlite3
import sys
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from standin_flavour import NEWER, VERSION  # noqa: E402
from standin_paths import FolderPaths  # noqa: E402

log = logging.getLogger("standin")
ALEMBIC_LINES = (
    "INFO  [alembic.runtime.migration] Context impl SQLiteImpl.",
    "INFO  [alembic.runtime.migration] Will assume non-transactional DDL.",
)


def _existing_directory(path: str) -> str:
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(
            f"The path '{path}' does not exist." if not os.path.exists(path) else f"'{path}' is not a directory."
        )
    return path


def build_parser() -> argparse.ArgumentParser:
    """ComfyUI 0.3.64's command line: same options, arities, choices and mutually exclusive groups; with the
    0.38 flavour less ``--normalvram`` and ``--disable-ipex-optimize``, plus ``--offline`` and
    ``--disable-partner-nodes`` (``standin_flavour``).

    Only some options change the stand-in's behaviour; the others are accepted and ignored. Like ComfyUI, an
    option it does not know is an error (exit status 2).
    """
    parser = argparse.ArgumentParser(prog="main.py", description="Stand-in ComfyUI test server")
    add = parser.add_argument
    flag = "store_true"
    add("--listen", type=str, default="127.0.0.1", metavar="IP", nargs="?", const="0.0.0.0,::")
    add("--port", type=int, default=8188)
    add("--tls-keyfile", type=str)
    add("--tls-certfile", type=str)
    add("--enable-cors-header", type=str, default=None, metavar="ORIGIN", nargs="?", const="*")
    add("--max-upload-size", type=float, default=100)
    add("--base-directory", type=str, default=None)
    add("--extra-model-paths-config", type=str, default=None, metavar="PATH", nargs="+", action="append")
    add("--output-directory", type=str, default=None)
    add("--temp-directory", type=str, default=None)
    add("--input-directory", type=str, default=None)
    add("--auto-launch", action=flag)
    add("--disable-auto-launch", action=flag)
    add("--cuda-device", type=int, default=None)
    add("--default-device", type=int, default=None)
    groups: list[list[str]] = [
        ["--cuda-malloc", "--disable-cuda-malloc"],
        ["--force-fp32", "--force-fp16"],
        [
            "--fp32-unet",
            "--fp64-unet",
            "--bf16-unet",
            "--fp16-unet",
            "--fp8_e4m3fn-unet",
            "--fp8_e5m2-unet",
            "--fp8_e8m0fnu-unet",
        ],
        ["--fp16-vae", "--fp32-vae", "--bf16-vae"],
        ["--fp8_e4m3fn-text-enc", "--fp8_e5m2-text-enc", "--fp16-text-enc", "--fp32-text-enc", "--bf16-text-enc"],
        [
            "--use-split-cross-attention",
            "--use-quad-cross-attention",
            "--use-pytorch-cross-attention",
            "--use-sage-attention",
            "--use-flash-attention",
        ],
        ["--force-upcast-attention", "--dont-upcast-attention"],
        ["--gpu-only", "--highvram", *([] if NEWER else ["--normalvram"]), "--lowvram", "--novram", "--cpu"],
    ]
    for names in groups:
        group = parser.add_mutually_exclusive_group()
        for name in names:
            group.add_argument(name, action=flag)
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--cache-classic", action=flag)
    cache.add_argument("--cache-lru", type=int, default=0)
    cache.add_argument("--cache-none", action=flag)
    for name in (
        "--cpu-vae", "--force-channels-last", "--disable-ipex-optimize", "--supports-fp8-compute",
        "--disable-xformers", "--async-offload", "--force-non-blocking", "--disable-smart-memory",
        "--deterministic", "--mmap-torch-files", "--disable-mmap", "--dont-print-server", "--quick-test-for-ci",
        "--windows-standalone-build", "--disable-metadata", "--disable-all-custom-nodes", "--disable-api-nodes",
        "--multi-user", "--log-stdout", "--enable-compress-response-body",
    ):  # fmt: skip
        if not (NEWER and name == "--disable-ipex-optimize"):
            add(name, action=flag)
    if NEWER:
        add("--offline", action=flag)
        add("--disable-partner-nodes", action=flag)
    add("--directml", type=int, nargs="?", metavar="DIRECTML_DEVICE", const=-1)
    add("--oneapi-device-selector", type=str, default=None)
    add("--preview-method", type=str, default="none", choices=["none", "auto", "latent2rgb", "taesd"])
    add("--preview-size", type=int, default=512)
    add("--reserve-vram", type=float, default=None)
    add("--default-hashing-function", type=str, choices=["md5", "sha1", "sha256", "sha512"], default="sha256")
    add("--fast", nargs="*", choices=["fp16_accumulation", "fp8_matrix_mult", "cublas_ops", "autotune"])
    add("--whitelist-custom-nodes", type=str, nargs="+", default=[])
    add(
        "--verbose", default="INFO", const="DEBUG", nargs="?", choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
    )
    add("--front-end-version", type=str, default="comfyanonymous/ComfyUI@latest")
    add("--front-end-root", type=_existing_directory, default=None)
    add("--user-directory", type=_existing_directory, default=None)
    add("--comfy-api-base", type=str, default="https://api.comfy.org")
    add("--database-url", type=str, default=None)
    # Stand-in only.
    add("--object-info", type=str, default=None, help="stand-in only: the recorded object_info JSON to serve")
    add("--standin-startup-delay", type=float, default=0.0, help="stand-in only: sleep before listening (s)")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def setup_logging(args: argparse.Namespace) -> None:
    handler = logging.StreamHandler(sys.stdout if args.log_stdout else sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(args.verbose)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def setup_paths(args: argparse.Namespace) -> FolderPaths:
    """Base directory, then extra model paths, then the explicitly given folders (the real server's order)."""
    paths = FolderPaths(args.base_directory or str(HERE))
    configs = [str(HERE / "extra_model_paths.yaml")] if (HERE / "extra_model_paths.yaml").is_file() else []
    configs += [path for group in args.extra_model_paths_config or [] for path in group]
    for config in configs:
        paths.read_extra_paths(config)
    if args.output_directory:
        paths.output_dir = os.path.abspath(args.output_directory)
        log.info("Output directory: %s", paths.output_dir)
    # Output folders double as model folders, so saved checkpoints/loras/... can be loaded again.
    for kind in ("checkpoints", "clip", "vae", "diffusion_models", "loras"):
        paths.add_model_path(kind, os.path.join(paths.output_dir, kind))
    if args.input_directory:
        paths.input_dir = os.path.abspath(args.input_directory)
        log.info("Input directory: %s", paths.input_dir)
    if args.user_directory:
        paths.user_dir = os.path.abspath(args.user_directory)
    if args.temp_directory:
        # --temp-directory D means D/temp.
        paths.temp_dir = os.path.join(os.path.abspath(args.temp_directory), "temp")
        log.info("Temp directory: %s", paths.temp_dir)
    return paths


def check_custom_nodes(args: argparse.Namespace, paths: FolderPaths) -> None:
    """Every custom_nodes folder must be listable, or start-up dies with a traceback like the real server's."""
    if args.disable_all_custom_nodes and not args.whitelist_custom_nodes:
        return
    for path in paths.paths_of("custom_nodes"):
        os.listdir(path)


def import_custom_nodes(args: argparse.Namespace, paths: FolderPaths) -> None:
    """Import every custom node as ComfyUI does, in its words for one that fails (provisioning's start-up check
    reads them). Their classes are not served: the stand-in's nodes are its own."""
    if args.disable_all_custom_nodes and not args.whitelist_custom_nodes:
        return
    times = []
    for folder in paths.paths_of("custom_nodes"):
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if (
                name == "__pycache__"
                or name.endswith(".disabled")
                or (os.path.isfile(path) and not name.endswith(".py"))
            ):
                continue
            started = time.perf_counter()
            imported = _import_custom_node(path)
            times.append((time.perf_counter() - started, path, imported))
    if times:
        log.info("\nImport times for custom nodes:")
        for seconds, path, imported in sorted(times):
            log.info("%6.1f seconds%s: %s", seconds, "" if imported else " (IMPORT FAILED)", path)
        log.info("")


def _import_custom_node(path: str) -> bool:
    init = os.path.join(path, "__init__.py") if os.path.isdir(path) else path
    try:
        spec = importlib.util.spec_from_file_location(f"custom_nodes.{os.path.basename(path)}", init)
        assert spec is not None and spec.loader is not None
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    except Exception as exc:
        log.warning(traceback.format_exc())
        log.warning("Cannot import %s module for custom nodes: %s", path, exc)
        return False
    return True


async def serve(args: argparse.Namespace, paths: FolderPaths, argv: list[str]) -> None:
    # Imported only now, so that command-line errors are reported at once (aiohttp takes ~0.3 s to import).
    from aiohttp import web
    from standin_execution import Runner, StopRequest, work_forever
    from standin_nodes import NodeEnv, NodeRegistry, load_object_info
    from standin_server import StandinServer

    object_info, object_info_path = load_object_info(args.object_info)
    env = NodeEnv(
        paths=paths,
        disable_metadata=args.disable_metadata,
        preview_method=args.preview_method,
        preview_size=args.preview_size,
    )
    registry = NodeRegistry(object_info, paths)
    stop = StopRequest()
    server = StandinServer(asyncio.get_running_loop(), registry, env, stop, paths, args.max_upload_size, argv)
    log.info("Stand-in ComfyUI: %d node classes from %s", len(registry.classes), object_info_path)

    cache_mode = "lru" if args.cache_lru > 0 else ("none" if args.cache_none else "classic")
    runner = Runner(server, registry, env, stop, cache_mode, args.cache_lru)
    threading.Thread(target=work_forever, args=(server.jobs, runner, server), daemon=True, name="worker").start()
    import_custom_nodes(args, paths)
    if args.quick_test_for_ci:
        return
    os.makedirs(paths.temp_dir, exist_ok=True)
    if args.standin_startup_delay > 0:
        await asyncio.sleep(args.standin_startup_delay)

    site_runner = web.AppRunner(server.app, access_log=None, handle_signals=False)
    await site_runner.setup()
    if not args.dont_print_server:
        log.info("Starting server\n")
    for address in args.listen.split(","):
        await web.TCPSite(site_runner, address, args.port).start()
        if not args.dont_print_server:
            log.info("To see the GUI go to: http://%s:%s", f"[{address}]" if ":" in address else address, args.port)
    await server.pump()


def open_database(url: str | None) -> sqlite3.Connection | None:
    """The SQLite database ComfyUI opens at start and keeps open (``app/database/db.py``); one it cannot open
    is an error in the log, not a failed start. ComfyUI's default is ``user/comfyui.db`` beside its code
    (whatever ``--base-directory`` or ``--user-directory`` say); the stand-in opens one only when
    ``--database-url`` names it, so that tests leave no database inside the repository."""
    if url is None:
        return None
    if not url.startswith("sqlite:///"):
        log.error("Failed to initialize database: Unsupported database URL '%s'.", url)
        return None
    try:
        return sqlite3.connect(url.removeprefix("sqlite:///"), check_same_thread=False)
    except sqlite3.Error as exc:
        log.error("Failed to initialize database. %s", exc)
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    setup_logging(args)
    started = time.perf_counter()
    paths = setup_paths(args)
    check_custom_nodes(args, paths)
    os.makedirs(paths.input_dir, exist_ok=True)
    os.makedirs(paths.user_dir, exist_ok=True)
    shutil.rmtree(paths.temp_dir, ignore_errors=True)
    log.info("Python version: %s", sys.version)
    log.info("ComfyUI version: %s (stand-in)", VERSION)
    if NEWER and args.disable_api_nodes:
        log.warning("--disable-api-nodes is deprecated: it now means --offline (0.38 stand-in)")
    for line in ALEMBIC_LINES:  # the real server's database migration check, at every start
        log.info("%s", line)
    log.debug("start-up took %.3f s before serving", time.perf_counter() - started)
    database = open_database(args.database_url)
    try:
        asyncio.run(serve(args, paths, [sys.argv[0], *argv]))
    except KeyboardInterrupt:
        log.info("\nStopped server")
    finally:
        if database is not None:
            database.close()
    shutil.rmtree(paths.temp_dir, ignore_errors=True)  # at exit too, as ComfyUI's main.py does
    return 0


if __name__ == "__main__":
    sys.exit(main())
