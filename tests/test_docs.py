"""The docs stay true where a machine can check them.

- docs/environment.md: every environment variable the code reads is in a table there, with its real default,
  and every variable in those tables is read somewhere. The reads are found in the source itself (Python by
  its syntax tree, shell scripts by their ``${NAME:-default}`` expansions), so a new variable on any branch
  fails here until it is documented.
- docs/job-api.md and docs/troubleshooting.md: every ``error_type`` the code can produce has a row in their
  error tables, and every row names one the code produces.
- Relative links between the pages (and their ``#anchors``) resolve; the README stays a short path.

Each check is a pure function over text, run once on the real files and again on edited copies that must
fail, so none of them can pass by finding nothing.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from comfy_worker.provision.workspace import Workspace
from comfy_worker.settings import s3_from_env

from .conftest import REPO

ENV_DOC = REPO / "docs" / "environment.md"
ERROR_DOCS = (REPO / "docs" / "job-api.md", REPO / "docs" / "troubleshooting.md")
PAGES = (REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md")))

PYTHON_SOURCES = (
    *sorted((REPO / "comfy_worker").rglob("*.py")),
    *sorted(REPO.glob("*.py")),
    *sorted((REPO / "bridge").rglob("*.py")),
)
SHELL_SOURCES = (*sorted(REPO.glob("*.sh")), REPO / ".ci" / "run")

VAR = re.compile(r"[A-Z][A-Z0-9_]+[A-Z0-9]")
# The names the code gives the environment mapping: ``env`` parameters and ``os.environ``.
ENV_NAMES = {"env", "environ"}
# Defaults the code computes (so this test cannot read them off the source), as environment.md must write them.
DERIVED = {
    "WORKSPACE": "`/runpod-volume`",
    "COMFYUI_DIR": "`$WORKSPACE/ComfyUI`",
    "MODELS_DIR": "`$WORKSPACE/models`",
    "MODEL_CACHE_DIR": "`$WORKSPACE/model-cache`",
    "BAKED_CONFIG": "`config.yml` beside `start.sh`",
    "COMFYUI_PYTHON": "the worker's Python",
    "COMFYUI_INPUT_DIR": "`$COMFYUI_DIR/input`",
    "COMFYUI_OUTPUT_DIR": "`$COMFYUI_DIR/output`",
    "COMFYUI_TEMP_DIR": "`$COMFYUI_DIR/temp`",
    "COMFYUI_LOCAL_STATE": "`true` on serverless",
    "XDG_CACHE_HOME": "`~/.cache`",
    "COMFYUI_VENV_KEY": "the base Python's name",
    "RUNPOD_LOG_LEVEL": "`LOG_LEVEL`",
}
# Read with an empty default and filled in further on, as environment.md must write them
# (test_later_defaults_are_real checks each against the code).
LATER_DEFAULTS = {"BUCKET_REGION": "`us-east-1`", "WORKSPACE": "`/runpod-volume`"}
# Upper-case string constants in the code that are not environment variables.
NOT_ENV = {
    "CANCELLED", "COMPLETED", "FAILED", "IN_PROGRESS", "TIMED_OUT",  # RunPod job states
    "GET", "POST", "HEAD",  # HTTP methods, git's HEAD
    "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "WARN", "NOTSET", "TRACE",  # log levels (logging's, runpod's)
    "JPEG", "RGB", "RGBA", "RGBX", "WEBP", "LLM", "UNIQUE_ID",  # Pillow, model folders, ComfyUI types
    "STRING", "INT", "FLOAT", "BOOLEAN", "COMBO",  # ComfyUI widget types (ui_format)
    "KB", "MB", "GB",  # units
}  # fmt: skip
SHELL_OWN = {"BASH_SOURCE", "BASH_REMATCH", "PIPESTATUS", "FUNCNAME", "LINENO", "HOME", "PATH", "PWD", "IFS"}
UNSET, COMPUTED = "<unset>", "<computed>"


@dataclass(frozen=True)
class Read:
    """One place the code reads a variable; ``default`` is its rendered value, UNSET, COMPUTED or None (shell
    expansions without a literal default, which say nothing about the default)."""

    name: str
    default: str | None
    where: str


# ---------------------------------------------------------------------------------------------------------------
# Reading the code.
def render(value: object) -> str:
    if value is None or value in ("", ()):
        return UNSET
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def is_env(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id in ENV_NAMES) or (
        isinstance(node, ast.Attribute) and node.attr == "environ"
    )


def var_name(node: ast.AST | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and VAR.fullmatch(node.value):
        return node.value
    return None


class PythonReads:
    """Every read of an environment variable in one module, with the default expression's value."""

    def __init__(self, source: str, where: str, package: dict[str, dict[str, object]] | None = None) -> None:
        self.tree = ast.parse(source)
        self.where = where
        self.parents = {child: node for node in ast.walk(self.tree) for child in ast.iter_child_nodes(node)}
        self.constants = self._imported_constants(package or {}) | self._assigned_constants(self.tree.body)
        self.classes = {n.name: n for n in ast.walk(self.tree) if isinstance(n, ast.ClassDef)}
        # Local helpers called as helper("NAME", ...), like Settings.from_env's folder().
        self.name_helpers = {
            n.name
            for n in ast.walk(self.tree)
            if isinstance(n, ast.FunctionDef) and n.args.args and n.args.args[0].arg == "name"
        }

    @staticmethod
    def _assigned_constants(body: list[ast.stmt]) -> dict[str, object]:
        found: dict[str, object] = {}
        for stmt in body:
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                target, value = stmt.targets[0].id, stmt.value
            elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
                target, value = stmt.target.id, stmt.value
            else:
                continue
            if isinstance(value, ast.Constant):
                found[target] = value.value
            elif isinstance(value, ast.Tuple) and not value.elts:
                found[target] = ()
        return found

    def _imported_constants(self, package: dict[str, dict[str, object]]) -> dict[str, object]:
        """Constants this module imports from another module of the package (``from comfy_worker.x import D``)."""
        found: dict[str, object] = {}
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom) and node.module in package:
                for alias in node.names:
                    if alias.name in package[node.module]:
                        found[alias.asname or alias.name] = package[node.module][alias.name]
        return found

    def _enclosing_class(self, node: ast.AST) -> ast.ClassDef | None:
        while node in self.parents:
            node = self.parents[node]
            if isinstance(node, ast.ClassDef):
                return node
        return None

    def values(self, expr: ast.AST | None, at: ast.AST) -> list[str]:
        """The default an expression gives, rendered; COMPUTED when it is not a plain value."""
        if expr is None:
            return [UNSET]
        if isinstance(expr, ast.Constant):
            return [render(expr.value)]
        if isinstance(expr, (ast.Tuple, ast.List)) and not expr.elts:
            return [UNSET]
        if isinstance(expr, ast.Name) and expr.id in self.constants:
            return [render(self.constants[expr.id])]
        if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name):
            owner = self._enclosing_class(at) if expr.value.id == "cls" else self.classes.get(expr.value.id)
            attrs = self._assigned_constants(owner.body) if owner is not None else {}
            if expr.attr in attrs:
                return [render(attrs[expr.attr])]
        if isinstance(expr, ast.IfExp):
            both = self.values(expr.body, at) + self.values(expr.orelse, at)
            return [COMPUTED] if COMPUTED in both else both
        return [COMPUTED]

    def effective_default(self, call: ast.AST, default: ast.AST | None) -> ast.AST | None:
        """``env.get(N, "").strip() or X``: X is the default."""
        node = call
        while True:
            parent = self.parents.get(node)
            grand = self.parents.get(parent) if parent is not None else None
            if isinstance(parent, ast.Attribute) and isinstance(grand, ast.Call) and grand.func is parent:
                node = grand
                continue
            if isinstance(parent, ast.BoolOp) and isinstance(parent.op, ast.Or) and parent.values[0] is node:
                return parent.values[-1]
            return default

    def reads(self) -> Iterator[Read]:
        for node in ast.walk(self.tree):
            found = self._read(node)
            if found is not None:
                name, default = found
                for value in self.values(default, node):
                    yield Read(name, value, f"{self.where}:{node.lineno}")  # type: ignore[attr-defined]

    def _read(self, node: ast.AST) -> tuple[str, ast.AST | None] | None:
        if isinstance(node, ast.Call):
            func, args = node.func, node.args
            # env.get("N", default), os.environ.get(...), os.getenv(...)
            # os.environ.setdefault("N", default): a default for a library that reads N itself
            getter = isinstance(func, ast.Attribute) and (
                (func.attr in ("get", "setdefault") and is_env(func.value)) or func.attr == "getenv"
            )
            if getter and args and (name := var_name(args[0])):
                return name, self.effective_default(node, args[1] if len(args) > 1 else None)
            # helper(env, "N", default, ...): env_int, env_float, _bool, _path, _networks, _env_path
            if len(args) >= 2 and is_env(args[0]) and (name := var_name(args[1])):
                keyword = next((k.value for k in node.keywords if k.arg == "default"), None)
                return name, args[2] if len(args) > 2 else keyword
            # a local helper(name, ...) whose default this test cannot evaluate
            if isinstance(func, ast.Name) and func.id in self.name_helpers and args and (name := var_name(args[0])):
                return name, ast.Call(func=ast.Name("computed"), args=[], keywords=[])
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.ctx, ast.Load)  # os.environ["N"] = value gives a library its variable
            and is_env(node.value)
            and (name := var_name(node.slice))
        ):
            return name, None
        if (
            isinstance(node, ast.Compare)
            and isinstance(node.ops[0], (ast.In, ast.NotIn))
            and is_env(node.comparators[0])
            and (name := var_name(node.left))
        ):
            return name, None
        return None

    def unexplained_constants(self, read_names: set[str]) -> Iterator[str]:
        """Upper-case constants that look like variables but are neither read nor known not to be one."""
        for node in ast.walk(self.tree):
            name = var_name(node)
            if name and name not in read_names and name not in NOT_ENV:
                yield f"{self.where}:{node.lineno}: {name!r}"  # type: ignore[attr-defined]


SHELL_EXPANSION = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?::?[-=]([^}]*))?|\$([A-Z_][A-Z0-9_]*)")
SHELL_ASSIGNMENT = re.compile(r"^\s*(?:local\s+|export\s+|readonly\s+)?([A-Z_][A-Z0-9_]*)=", re.MULTILINE)
SHELL_LITERAL = re.compile(r"[^\s$\"'`()]+")


def shell_reads(scripts: dict[str, str]) -> Iterator[Read]:
    """``${NAME:-default}``, ``${NAME}`` and ``$NAME`` outside comments, less the scripts' own variables (those
    they assign and never read with a default; all scripts together, since they source each other)."""
    expansions = []
    for where, text in scripts.items():
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.lstrip().startswith("#"):
                expansions += [(f"{where}:{lineno}", match) for match in SHELL_EXPANSION.finditer(line)]
    with_default = {m[1] for _, m in expansions if m[2] is not None}
    own = {name for text in scripts.values() for name in SHELL_ASSIGNMENT.findall(text)} - with_default
    for where, match in expansions:
        name = match[1] or match[3]
        if name in own or name in SHELL_OWN:
            continue
        default = match[2]
        literal = default if default and SHELL_LITERAL.fullmatch(default) else None
        yield Read(name, literal, where)


def code_reads(python: dict[str, str], shell: dict[str, str]) -> tuple[list[Read], list[str]]:
    """Every read in the given sources (path -> text), and the constants nobody could explain."""
    reads: list[Read] = []
    package = {}
    for path, text in python.items():
        package[path.removesuffix(".py").replace("/", ".")] = PythonReads(text, path).constants
    modules = [PythonReads(text, where, package) for where, text in python.items()]
    for module in modules:
        reads += module.reads()
    reads += shell_reads(shell)
    names = {read.name for read in reads}
    unexplained = [where for module in modules for where in module.unexplained_constants(names)]
    return reads, unexplained


def repo_reads() -> tuple[list[Read], list[str]]:
    python = {str(p.relative_to(REPO)): p.read_text(encoding="utf-8") for p in PYTHON_SOURCES}
    shell = {str(p.relative_to(REPO)): p.read_text(encoding="utf-8") for p in SHELL_SOURCES}
    return code_reads(python, shell)


# ---------------------------------------------------------------------------------------------------------------
# Reading the pages.
def table_rows(markdown: str, first_header: str) -> list[list[str]]:
    """The body rows of every table whose first header cell is ``first_header``, as lists of cells."""
    rows: list[list[str]] = []
    in_table = False
    for line in markdown.splitlines():
        if not line.startswith("|"):
            in_table = False
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not in_table:
            in_table = cells[0] == first_header
            header = True
            continue
        if header:  # the |---| line
            header = False
            continue
        rows.append(cells)
    return rows


def documented_variables(markdown: str) -> tuple[dict[str, str], list[str]]:
    """environment.md's rows: variable -> default cell; and problems with the rows themselves."""
    documented: dict[str, str] = {}
    problems = []
    lines = markdown.splitlines()
    starts = [
        line
        for before, line in zip(["", *lines], lines, strict=False)
        if line.startswith("|") and not before.startswith("|")
    ]
    problems += [
        f"environment.md: a table must have the columns variable | default | meaning: {line}"
        for line in starts
        if line != "| variable | default | meaning |"
    ]
    for cells in table_rows(markdown, "variable"):
        match = re.fullmatch(r"`([A-Z_][A-Z0-9_]*)`", cells[0])
        if match is None or len(cells) < 3:
            problems.append(f"environment.md: a row must be `NAME` | default | meaning: {' | '.join(cells)}")
            continue
        if match[1] in documented:
            problems.append(f"environment.md: {match[1]} has two rows")
        documented[match[1]] = cells[1]
    return documented, problems


def env_problems(reads: list[Read], unexplained: list[str], markdown: str) -> list[str]:
    """What environment.md gets wrong about the code; empty when it is right."""
    documented, problems = documented_variables(markdown)
    problems += [
        f"{where}: looks like an environment variable but is read in no way this test knows: teach "
        "tests/test_docs.py how it is read, or add it to NOT_ENV if it is not one"
        for where in unexplained
    ]
    read_names = {read.name for read in reads}
    for read in reads:
        cell = documented.get(read.name)
        if cell is None:
            problems.append(f"{read.name} (read at {read.where}) is not in docs/environment.md")
            continue
        if read.default is None:
            continue
        if read.default == UNSET and read.name in LATER_DEFAULTS:
            wanted = LATER_DEFAULTS[read.name]
        elif read.default == UNSET:
            if not re.search(r"\b(unset|empty)\b", cell):
                problems.append(f"{read.name}: read at {read.where} with no default, but the doc says {cell!r}")
            continue
        elif read.default == COMPUTED:
            if read.name not in DERIVED:
                problems.append(
                    f"{read.name}: the default at {read.where} is computed; document it and add it to DERIVED"
                )
                continue
            wanted = DERIVED[read.name]
        else:
            wanted = f"`{read.default}`"
        if wanted not in cell:
            problems.append(f"{read.name}: default {wanted} (read at {read.where}) is not in the doc's {cell!r}")
    problems += [
        f"{name} is in docs/environment.md but no code reads it" for name in documented if name not in read_names
    ]
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Environment variables.
def test_environment_doc_matches_the_code() -> None:
    reads, unexplained = repo_reads()
    assert len({read.name for read in reads}) >= 70  # the extraction found the code's reads
    assert env_problems(reads, unexplained, ENV_DOC.read_text()) == []


def test_derived_and_later_defaults_are_current() -> None:
    """Each DERIVED entry is a variable whose default is computed, each LATER_DEFAULTS one is read as ""."""
    reads, _ = repo_reads()
    assert sorted(DERIVED) == sorted({read.name for read in reads if read.default == COMPUTED})
    assert set(LATER_DEFAULTS) <= {read.name for read in reads if read.default == UNSET}


def edit_row(markdown: str, name: str, old: str, new: str) -> str:
    lines = markdown.splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith(f"| `{name}` |"))
    assert old in lines[index]
    lines[index] = lines[index].replace(old, new, 1)
    return "\n".join(lines)


def drop_row(markdown: str, name: str) -> str:
    return "\n".join(line for line in markdown.splitlines() if not line.startswith(f"| `{name}` |"))


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda md: drop_row(md, "JOB_TIMEOUT"), "JOB_TIMEOUT (read at comfy_worker/settings.py:"),
        (lambda md: drop_row(md, "RP_API_PORT"), "RP_API_PORT (read at start.sh:"),
        (lambda md: drop_row(md, "XDG_CACHE_HOME"), "XDG_CACHE_HOME (read at comfy_worker/tools/model_sync.py:"),
        (lambda md: edit_row(md, "JOB_TIMEOUT", "`540`", "`900`"), "JOB_TIMEOUT: default `540`"),
        (lambda md: edit_row(md, "CLEANUP_JOB_FILES", "`true`", "`false`"), "CLEANUP_JOB_FILES: default `true`"),
        (lambda md: edit_row(md, "JUPYTER_PORT", "`8888`", "`8889`"), "JUPYTER_PORT: default `8888`"),
        (lambda md: edit_row(md, "COMFYUI_LISTEN", "`0.0.0.0`", "all"), "COMFYUI_LISTEN: default `0.0.0.0`"),
        (lambda md: edit_row(md, "BUCKET_REGION", "`us-east-1`", "`eu`"), "BUCKET_REGION: default `us-east-1`"),
        (lambda md: edit_row(md, "WARMUP_WORKFLOW", "unset", "`warmup.json`"), "WARMUP_WORKFLOW: read at"),
        (lambda md: edit_row(md, "COMFYUI_INPUT_DIR", "`$COMFYUI_DIR/input`", "input"), "COMFYUI_INPUT_DIR: default"),
        (lambda md: md.rstrip() + "\n| `NOBODY_READS_THIS` | unset | x |\n", "NOBODY_READS_THIS is in docs/"),
        (lambda md: md + "\n| name | default |\n|---|---|\n| `JOB_TIMEOUT` | `600` |\n", "a table must have the"),
        (lambda md: md.replace("| `LOG_LEVEL` |", "| `LOG_LEVEL`, `X` |"), "a row must be `NAME` | default"),
        (lambda md: md + "\n| variable | default | meaning |\n|---|---|---|\n| `JOB_TIMEOUT` | `600` | again |\n",
         "JOB_TIMEOUT has two rows"),
    ],
)  # fmt: skip
def test_environment_check_fails_on_a_wrong_doc(edit: object, expected: str) -> None:
    reads, unexplained = repo_reads()
    problems = env_problems(reads, unexplained, edit(ENV_DOC.read_text()))  # type: ignore[operator]
    assert any(expected in problem for problem in problems), problems


PY_CASES = [
    ('env.get("NEW_VAR", "x")', "`x`"),
    ('os.environ.get("NEW_VAR")', "unset"),
    ('os.getenv("NEW_VAR", "3")', "`3`"),
    ('env.get("NEW_VAR", "").strip() or "fallback"', "`fallback`"),
    ('(env.get("NEW_VAR", "").strip() or DEFAULT).rstrip("/")', "`https://example.org`"),
    ('float(env.get("NEW_VAR", "1") or 1)', "`1`"),
    ('env_int(env, "NEW_VAR", 4, minimum=1)', "`4`"),
    ('env_float(env, "NEW_VAR", 64.0)', "`64`"),
    ('_bool(env, "NEW_VAR", True)', "`true`"),
    ('_path(env, "NEW_VAR", None)', "unset"),
    ('env["NEW_VAR"]', "unset"),
    ('"NEW_VAR" in os.environ', "unset"),
    ('env.get("NEW_VAR", Thing.limit)', "`7`"),
    ('env.get("NEW_VAR", "").strip() or ("a" if x else "b")', "`a` here, `b` there"),
]


@pytest.mark.parametrize(("expression", "documented"), PY_CASES)
def test_a_new_python_variable_must_be_documented(expression: str, documented: str) -> None:
    """Each way the code reads a variable is found: undocumented it fails, documented right it passes."""
    source = f'DEFAULT = "https://example.org"\n\nclass Thing:\n    limit: int = 7\n\nx = {expression}\n'
    reads, unexplained = code_reads({"new.py": source}, {})
    assert unexplained == []
    assert [r.name for r in reads] == ["NEW_VAR"] * len(reads) and reads
    assert env_problems(reads, [], "") == ["NEW_VAR (read at new.py:6) is not in docs/environment.md"] * len(reads)
    assert (
        env_problems(reads, [], f"| variable | default | meaning |\n|---|---|---|\n| `NEW_VAR` | {documented} | m |")
        == []
    )


@pytest.mark.parametrize(
    ("script", "default"),
    [
        ('echo "${NEW_VAR:-8080}"', "`8080`"),
        ('echo "${NEW_VAR:-}"', None),
        ('echo "$NEW_VAR"', None),
        ('echo "${NEW_VAR:-$ROOT/x}"', None),
    ],
)
def test_a_new_shell_variable_must_be_documented(script: str, default: str | None) -> None:
    text = f'#!/usr/bin/env bash\n# $IN_A_COMMENT\nROOT=/x\nLOCAL_ONLY=1\necho "$LOCAL_ONLY $ROOT"\n{script}\n'
    reads, _ = code_reads({}, {"new.sh": text})
    assert {r.name for r in reads} == {"NEW_VAR"}
    assert env_problems(reads, [], "") == ["NEW_VAR (read at new.sh:6) is not in docs/environment.md"]
    wrong = "| variable | default | meaning |\n|---|---|---|\n| `NEW_VAR` | `1` | m |"
    assert bool(env_problems(reads, [], wrong)) is (default is not None)


def test_an_unknown_way_of_reading_is_not_missed() -> None:
    reads, unexplained = code_reads({"new.py": 'value = settings_lookup("NEW_VAR")\nlevel = "INFO"\n'}, {})
    assert reads == [] and unexplained == ["new.py:1: 'NEW_VAR'"]
    assert "teach tests/test_docs.py" in env_problems(reads, unexplained, "")[0]


def test_a_computed_default_needs_derived() -> None:
    reads, _ = code_reads({"new.py": 'x = env.get("NEW_VAR", "").strip() or sys.executable\n'}, {})
    doc = "| variable | default | meaning |\n|---|---|---|\n| `NEW_VAR` | the interpreter | m |"
    assert env_problems(reads, [], doc)[0].startswith("NEW_VAR: the default at new.py:1 is computed")


def test_later_defaults_are_real() -> None:
    """The variables read as "" and filled in further on get the defaults LATER_DEFAULTS says."""
    s3 = s3_from_env({"BUCKET_NAME": "b", "BUCKET_ACCESS_KEY_ID": "k", "BUCKET_SECRET_ACCESS_KEY": "s"})
    assert s3 is not None and f"`{s3.region}`" == LATER_DEFAULTS["BUCKET_REGION"]
    volume = Path("/runpod-volume")
    workspace = Workspace.from_env({}, is_dir=lambda path: path == volume)
    assert f"`{workspace.root}`" == LATER_DEFAULTS["WORKSPACE"]
    assert set(LATER_DEFAULTS) == {"BUCKET_REGION", "WORKSPACE"}


# ---------------------------------------------------------------------------------------------------------------
# Error types.
def code_error_types(sources: dict[str, str]) -> dict[str, str]:
    """``error_type = "x"`` in classes and ``"error_type": "x"`` in dicts: type -> where."""
    found: dict[str, str] = {}
    for where, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "error_type" for t in node.targets
            ):
                values = [node.value]
            elif isinstance(node, ast.Dict):
                values = [
                    v
                    for k, v in zip(node.keys, node.values, strict=True)
                    if isinstance(k, ast.Constant) and k.value == "error_type"
                ]
            else:
                continue
            for value in values:
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    found.setdefault(value.value, f"{where}:{value.lineno}")
    return found


def error_table_problems(produced: dict[str, str], page: str, markdown: str) -> list[str]:
    rows = [cells[0] for cells in table_rows(markdown, "`error_type`")]
    listed = [row.strip("`") for row in rows]
    problems = [f"{page}: error_type {t!r} ({where}) has no row" for t, where in produced.items() if t not in listed]
    problems += [
        f"{page}: error_type {t!r} has a row but the code never produces it" for t in listed if t not in produced
    ]
    problems += [f"{page}: error_type {t!r} has two rows" for t in set(listed) if listed.count(t) > 1]
    return problems


def repo_error_types() -> dict[str, str]:
    sources = {str(p.relative_to(REPO)): p.read_text() for p in sorted((REPO / "comfy_worker").rglob("*.py"))}
    return code_error_types(sources)


@pytest.mark.parametrize("page", ERROR_DOCS, ids=lambda p: p.name)
def test_every_error_type_is_in_the_tables(page: Path) -> None:
    produced = repo_error_types()
    assert {"internal", "validation", "workflow_validation", "storage"} <= set(produced)
    assert error_table_problems(produced, page.name, page.read_text()) == []


@pytest.mark.parametrize("page", ERROR_DOCS, ids=lambda p: p.name)
def test_error_table_check_fails_on_a_wrong_doc(page: Path) -> None:
    produced = repo_error_types()
    text = page.read_text()
    without = "\n".join(line for line in text.splitlines() if not line.startswith("| `storage` |"))
    assert error_table_problems(produced, page.name, without) == [
        f"{page.name}: error_type 'storage' (comfy_worker/errors.py:{produced['storage'].split(':')[1]}) has no row"
    ]
    new_class = {"x.py": 'class QuotaError(WorkerError):\n    error_type = "quota"\n'}
    assert error_table_problems(produced | code_error_types(new_class), page.name, text) == [
        f"{page.name}: error_type 'quota' (x.py:2) has no row"
    ]
    extra = text.replace("| `storage` |", "| `quota` | x | x |\n| `storage` |", 1)
    assert error_table_problems(produced, page.name, extra) == [
        f"{page.name}: error_type 'quota' has a row but the code never produces it"
    ]


# ---------------------------------------------------------------------------------------------------------------
# Links.
def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    found: set[str] = set()
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (match := re.match(r"#{1,6} (.+)", line)):
            base = slug(match[1])
            name, n = base, 1
            while name in found:
                name, n = f"{base}-{n}", n + 1
            found.add(name)
    return found


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def link_problems(page: Path, markdown: str, read: dict[Path, str]) -> list[str]:
    """Relative links (and #anchors) in ``markdown`` that lead nowhere; ``read`` gives other pages' text."""
    problems = []
    text = re.sub(r"```.*?```", "", markdown, flags=re.DOTALL)
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        path_part, _, anchor = target.partition("#")
        path = (page.parent / path_part).resolve() if path_part else page
        if not path.exists():
            problems.append(f"{page.name}: link {target!r}: {path_part} does not exist")
            continue
        if anchor and path.suffix == ".md":
            content = markdown if path == page else read.get(path) or path.read_text()
            if anchor not in anchors(content):
                problems.append(f"{page.name}: link {target!r}: no heading #{anchor} in {path.name}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_resolve(page: Path) -> None:
    assert link_problems(page, page.read_text(), {}) == []


def test_every_page_is_linked_from_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"]({page.relative_to(REPO)})" in readme, f"README.md does not link {page.relative_to(REPO)}"


@pytest.mark.parametrize(
    ("markdown", "expected"),
    [
        ("[x](docs/nowhere.md)", "README.md: link 'docs/nowhere.md': docs/nowhere.md does not exist"),
        ("[x](docs/job-api.md#no-such-heading)", "README.md: link 'docs/job-api.md#no-such-heading': no heading"),
        ("# Title\n[x](#titel)", "README.md: link '#titel': no heading #titel in README.md"),
    ],
)
def test_link_check_fails_on_a_broken_link(markdown: str, expected: str) -> None:
    problems = link_problems(REPO / "README.md", markdown, {})
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_link_check_passes_good_links() -> None:
    markdown = "# A `code` title: yes\n[a](#a-code-title-yes) [b](docs/job-api.md#errors) [c](https://x.org/#y)"
    assert link_problems(REPO / "README.md", markdown, {}) == []


def test_readme_is_a_short_path() -> None:
    """The README is what a newcomer reads top to bottom; reference belongs in docs/."""
    assert len((REPO / "README.md").read_text().splitlines()) <= 200
