"""Provisioning, run by start.sh before the worker: ``run`` (the SHA gate and what changed), ``config`` and
``config_source`` (config.yml and which one), ``workspace`` (the volume's layout), ``gitrepo`` and ``nodes``
(ComfyUI and custom nodes at their versions), ``pyenv`` (requirements in ComfyUI's Python) and
``downloads``/``transfer`` (resumable, verified model downloads).

Kept import-light (the warm-start gate runs at every start): nothing here is imported by this ``__init__``.
"""
