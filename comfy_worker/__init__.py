"""comfy_worker: the package behind handler.py, a RunPod serverless worker for ComfyUI.

One module per responsibility:

- ``settings``: every environment variable the worker reads, parsed once into a frozen object.
- ``errors``: the one error tree; each error knows its ``error_type`` and turns into the job's result.
- ``schema``: the job input (``event["input"]``), validated with pydantic.
- ``workflow``: API-format checks, overrides and the convenience fields (prompt, seed, size).
- ``comfy_client``: ComfyUI's HTTP API.
- ``events``: ComfyUI's WebSocket, read by one background thread and routed per prompt.
- ``supervisor``: starts (or attaches to) the ComfyUI process and waits until it serves.
- ``outputs``: turns a ``/history`` entry into the result's images, videos, audio, files and text.
- ``job``: one job from input to result; ``app``: the entry point that wires it to the runpod SDK.
"""
