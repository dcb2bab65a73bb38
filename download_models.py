#!/usr/bin/env python3
"""Download config.yml's models onto the volume: ``python download_models.py [--dry-run] [--only-required]``.

The work is in ``comfy_worker.provision.downloads``; this file is the command line (the worker's start-up runs it, and
users run it to pre-fill a network volume). Exit status 1 when a required model failed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from comfy_worker.provision.config import parse
from comfy_worker.provision.config_source import ConfigError
from comfy_worker.provision.download_options import DownloadOptions
from comfy_worker.provision.downloads import (
    download_models,
    failed_required,
    format_plan,
    format_results,
    plan,
)
from comfy_worker.provision.logs import setup_logging
from comfy_worker.provision.workspace import Workspace
from comfy_worker.settings import SettingsError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download the models listed in config.yml.")
    parser.add_argument(
        "--config", type=Path, help="config file (default: the one start.sh uses, see docs/configuration.md)"
    )
    parser.add_argument("--models-dir", type=Path, help="default: MODELS_DIR, else the workspace's models/")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; download nothing")
    parser.add_argument("--only-required", action="store_true", help="skip models marked optional")
    args = parser.parse_args(argv)
    try:
        options = DownloadOptions.from_env(os.environ)
        workspace = Workspace.from_env(os.environ)
        config = parse(*workspace.config_text(os.environ, args.config))
    except (OSError, ConfigError, SettingsError) as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    setup_logging(os.environ, options.secrets)
    models = [m for m in config.models if not (args.only_required and m.optional)]
    models_dir = args.models_dir or workspace.models_dir
    if args.dry_run:
        sys.stdout.write(format_plan(plan(models, models_dir, options)))
        return 0
    results = download_models(models, models_dir, options)
    sys.stdout.write(format_results(results))
    return 1 if failed_required(results) else 0


if __name__ == "__main__":
    sys.exit(main())
