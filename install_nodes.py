#!/usr/bin/env python3
"""Install config.yml's custom nodes into a ComfyUI checkout: ``install_nodes.py --comfyui-dir DIR [--dry-run]``.

start.sh does this (and more) through ``python -m comfy_worker.provision``; this is the same code on its own.
"""

import sys

from comfy_worker.provision.nodes import main

if __name__ == "__main__":
    sys.exit(main())
