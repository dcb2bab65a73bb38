"""Provisioning, run by start.sh before the worker: ``run`` (the SHA gate and what changed), ``config`` and
``config_source`` (config.yml and which one), ``workspace`` (the volume's layout), ``gitrepo`` and ``nodes``
(ComfyUI and custom nodes at their versions), ``pyenv`` (requirements in ComfyUI's Python), ``logs`` (one
log set-up that masks secrets and URL credentials) and the model downloads: ``downloads`` (orchestration),
``download_options``, ``sources`` (URLs and the servers' answers), ``transfer`` (resumable Range segments),
``verify`` (size and sha256) and ``progress``.

Kept import-light (the warm-start gate runs at every start): nothing here is imported by this ``__init__``.
"""
