"""The package layout's rules: which program may import which (see ``comfy_worker/__init__.py``).

Three programs share one package: provisioning (before the worker, must stay import-light), the worker runtime
(with ``comfy``, its link to ComfyUI) and the user's tools (on a laptop). A tool that imports the runtime drags
pydantic and the job schema onto the user's machine; provisioning that imports the job schema couples the
start-up gate to the job API. These tests fail on such an import, direct (any ``import`` statement, also inside
a function) or transitive (what importing a module really loads).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

PACKAGE = REPO / "comfy_worker"
SUBPACKAGES = ("comfy", "runtime", "provision", "tools")
# What each part may import from the package; "shared" = the top-level modules (settings, errors, ...).
ALLOWED = {
    "shared": {"shared"},
    "comfy": {"shared", "comfy"},
    "runtime": {"shared", "comfy", "runtime", "provision"},  # models a job brings use provision's downloader
    "provision": {"shared", "provision"},
    "tools": {"shared", "tools"},
}


def part_of(module: str) -> str | None:
    """``comfy_worker.runtime.job`` -> ``runtime``; ``comfy_worker.errors`` -> ``shared``; others None."""
    parts = module.split(".")
    if parts[0] != "comfy_worker":
        return None
    if len(parts) > 1 and parts[1] in SUBPACKAGES:
        return parts[1]
    return "shared"


def imported_modules(source: str) -> list[str]:
    """Every absolute module an ``import``/``from`` statement names (the package uses absolute imports only)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.append("." * node.level + (node.module or ""))
            elif node.module:
                found.append(node.module)
                if node.module == "comfy_worker":  # from comfy_worker import runtime
                    found += [f"comfy_worker.{alias.name}" for alias in node.names]
    return found


def violations(module: str, source: str) -> list[str]:
    own = part_of(module)
    assert own is not None
    problems = []
    for target in imported_modules(source):
        if target.startswith("."):
            problems.append(f"{module} uses a relative import ({target}): write it absolute")
            continue
        wanted = part_of(target)
        if wanted is not None and wanted not in ALLOWED[own]:
            problems.append(f"{module} ({own}) imports {target} ({wanted})")
    return problems


def package_modules() -> list[tuple[str, Path]]:
    modules = []
    for path in sorted(PACKAGE.rglob("*.py")):
        dotted = ".".join(path.relative_to(REPO).with_suffix("").parts)
        modules.append((dotted.removesuffix(".__init__"), path))
    return modules


def test_every_module_belongs_to_a_part() -> None:
    modules = package_modules()
    assert len(modules) > 25
    assert {part_of(name) for name, _ in modules} == {"shared", *SUBPACKAGES}


@pytest.mark.parametrize(("module", "path"), package_modules(), ids=lambda value: str(value))
def test_imports_follow_the_layout(module: str, path: Path) -> None:
    assert violations(module, path.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("comfy_worker.tools.client", "from comfy_worker.runtime.workflow import prepare", "imports"),
        ("comfy_worker.tools.client", "def f():\n    import comfy_worker.provision.config\n", "imports"),
        ("comfy_worker.provision.config", "from comfy_worker.runtime import schema", "imports"),
        ("comfy_worker.runtime.job", "from comfy_worker.tools.client import main", "imports"),
        ("comfy_worker.comfy.events", "from comfy_worker.runtime.job import Worker", "imports"),
        ("comfy_worker.settings", "from comfy_worker.comfy.client import ComfyClient", "imports"),
        ("comfy_worker.runtime.job", "from .fetch import Fetcher", "relative"),
    ],
)
def test_the_check_catches_a_forbidden_import(module: str, source: str, expected: str) -> None:
    [problem] = violations(module, source)
    assert expected in problem


def loaded_by(module: str) -> set[str]:
    """The modules a fresh interpreter has loaded after importing ``module``."""
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    return set(json.loads(out))


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        # the client runs on a laptop: no pydantic job schema, no runtime, no ComfyUI plumbing
        ("comfy_worker.tools.client", {"pydantic", "runpod", "comfy_worker.runtime", "comfy_worker.provision"}),
        ("comfy_worker.tools.model_sync", {"pydantic", "runpod", "comfy_worker.runtime", "comfy_worker.provision"}),
        # the warm-start gate runs before every start: nothing heavy until it knows there is work
        ("comfy_worker.provision.run", {"pydantic", "runpod", "boto3", "huggingface_hub", "comfy_worker.runtime"}),
        # the worker launches ComfyUI before its heavy imports
        ("comfy_worker.runtime.app", {"runpod", "pydantic", "boto3", "comfy_worker.provision"}),
    ],
)
def test_what_importing_a_program_really_loads(module: str, forbidden: set[str]) -> None:
    loaded = loaded_by(module)
    assert module in loaded
    assert {name for name in loaded if any(name == bad or name.startswith(bad + ".") for bad in forbidden)} == set()
