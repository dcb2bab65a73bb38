"""Which ComfyUI the stand-in imitates: 0.3.64 (the recorded one, the default) or a newer release.

``STANDIN_COMFYUI_FLAVOUR=0.38`` turns on what ComfyUI 0.38 changed on the API a client sees (read from its
server.py, main.py, comfy/cli_args.py, comfy_execution/jobs.py, progress.py, asset_enrichment.py and
app/assets/seeder.py; nothing of its code is copied):

- the command line: ``--normalvram`` and ``--disable-ipex-optimize`` are gone (argparse's exit status 2),
  ``--offline`` and ``--disable-partner-nodes`` are new, ``--disable-api-nodes`` is a deprecated alias of
  ``--offline``;
- ``POST /prompt``: a client-chosen ``prompt_id`` must be a UUID in canonical lowercase form (else 400
  ``invalid_prompt_id``); a null one is minted; queue and history entries carry ``extra_data.create_time``;
- the jobs API: ``GET /api/jobs``, ``GET /api/jobs/{id}``, ``POST /api/jobs/{id}/cancel`` and
  ``POST /api/jobs/cancel`` (registered with the ``/api`` in their path, so also under ``/api/api/``, and not
  as ``/jobs``);
- events: ``progress_state`` entries may carry ``activity`` (what a running node spends its time on),
  the asset seeder's ``assets.seed.*`` events go to every socket, ``executed`` outputs (and the history's)
  give each file an asset ``id`` and ``preview_id``; uploads answer with an ``asset`` too;
- ``/system_stats``: ``system.os`` is ``sys.platform`` (``linux``, not ``posix``), plus
  ``comfy_package_versions``; ``/features`` has ``assets``.

Unset (or ``0.3.64``), the stand-in is exactly the recorded 0.3.64: ``tests/test_standin_contract.py`` holds it
to the recordings.
"""

from __future__ import annotations

import os
import sys

FLAVOURS = {"0.3.64": "0.3.64", "0.38": "0.38.1"}  # flavour -> the version the stand-in reports
FLAVOUR = os.environ.get("STANDIN_COMFYUI_FLAVOUR", "").strip() or "0.3.64"
if FLAVOUR not in FLAVOURS:
    sys.exit(f"STANDIN_COMFYUI_FLAVOUR={FLAVOUR!r}: the stand-in imitates {' or '.join(FLAVOURS)}")

NEWER = FLAVOUR == "0.38"
VERSION = FLAVOURS[FLAVOUR]
