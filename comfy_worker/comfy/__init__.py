"""Talking to ComfyUI: its HTTP API (``client``), its WebSocket (``events``), its process (``supervisor``) and
its error payloads turned into readable errors (``errors``)."""
