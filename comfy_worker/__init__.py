"""comfy_worker: the package behind handler.py, a RunPod serverless worker for ComfyUI.

One module per responsibility:

- ``config``: the config.yml schema (what to install), its JSON Schema export and resolution order.
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
"""
