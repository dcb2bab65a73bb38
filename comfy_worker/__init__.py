"""comfy_worker: the package behind handler.py, a RunPod serverless worker for ComfyUI.

One module per responsibility:

- ``config``: the config.yml schema (what to install) and its JSON Schema export; ``config_source``: which
  config.yml is used (CONFIG_YML, the volume's, the image's) and its SHA-256.
- ``workspace``: where the volume is and what lives where; ``provision``: the SHA gate and the installation
  of what changed, from ``gitrepo`` (versions, checkouts), ``nodes`` (custom nodes), ``pyenv`` (requirements
  in ComfyUI's Python) and ``downloads``/``transfer`` (resumable, segmented model downloads).
- ``settings``: every environment variable the worker reads, parsed once into a frozen object.
- ``errors``: the one error tree; each error knows its ``error_type`` and turns into the job's result.
- ``schema``: the job input (``event["input"]``), validated with pydantic.
- ``workflow``: API-format checks, overrides and the convenience fields (prompt, seed, size).
- ``comfy_client``: ComfyUI's HTTP API.
- ``events``: ComfyUI's WebSocket, read by one background thread and routed per prompt.
- ``supervisor``: starts (or attaches to) the ComfyUI process and waits until it serves.
- ``comfy_errors``: ComfyUI's error payloads as readable errors (node, input, closest file names).
- ``outputs``: a ``/history`` entry's files read (and converted) for the result's images, videos, audio...
- ``delivery`` and ``storage``: outputs as base64 within RunPod's size limit, or uploaded to S3.
- ``fetch``: input files by URL, behind an SSRF guard.
- ``cleanup``: each job's uploads and outputs removed once its result is built.
- ``diagnostics``: what a failed job reports about the worker; ``redact``: secrets kept out of it.
- ``job``: one job from input to result; ``app``: the entry point that wires it to the runpod SDK.
- ``client`` and ``model_sync``: the user's side (send workflows to an endpoint; upload models to a volume).
"""
