"""comfy_worker: the package behind handler.py, a RunPod serverless worker for ComfyUI.

Three programs that run at different times, often on different machines, each in its own sub-package, and a
few shared leaves they all may use:

- ``provision``: run by start.sh before the worker (``python -m comfy_worker.provision``); makes the volume
  match config.yml. Import-light: it never imports the runtime or ``comfy``.
- ``runtime``: the worker itself (``handler.py``): one job from input to result, behind the runpod SDK.
- ``comfy``: talking to ComfyUI (HTTP, WebSocket, its process, its error payloads); used by the runtime.
- ``tools``: the user's side, on a laptop (``comfy-worker-client``, ``comfy-worker-model-sync``); never
  imports the runtime, provisioning or ``comfy``.
- Shared leaves: ``settings`` (every env var, parsed once), ``errors`` (the one error tree), ``redact``
  (secrets out of logs and results), ``storage`` (S3-compatible buckets, the one boto3 client), ``api_format``
  (what an API-format workflow looks like), ``ui_format`` (a UI-format workflow converted as ComfyUI's
  frontend converts it), ``fsutil`` (the one atomic write and the one lock with a
  deadline). They import no sub-package.

``tests/test_layout.py`` checks these rules.
"""
