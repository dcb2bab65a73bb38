"""Superseded by ``comfy-worker-client`` (see docs/client.md); kept so the old command still works.

    python examples/test_local.py examples/workflows/sd15_txt2img.json --prompt "a red fox" --seed 7

runs the client against the worker's local API (``--url`` defaults to http://127.0.0.1:8000 here).
"""

import sys

from comfy_worker.tools.client import main

if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(args if "--url" in args else [*args, "--url", "http://127.0.0.1:8000"]))
