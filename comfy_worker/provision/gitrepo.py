"""Git, for ComfyUI and custom nodes: turn a config ``version`` into a commit, and put a checkout at it.

Versions: ``latest`` = the newest version-like tag (``v1.2.3``, ``1.2``; the repository's default branch when
it has none), ``nightly`` = the default branch's head, or a tag, a branch, a full or abbreviated commit. They
are resolved with one ``git ls-remote`` before anything is fetched, so a typo fails fast with the tags there
are. Checkouts are shallow when the version is a ref (ComfyUI's full history is large) and are forced: a
managed checkout follows the config, local edits included.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from comfy_worker.redact import redact_url, redact_urls

log = logging.getLogger(__name__)

_VERSION_TAG = re.compile(r"^v?(\d+(?:\.\d+)*)$")
_COMMIT = re.compile(r"^[0-9a-f]{7,40}$")
GIT_TIMEOUT_S = 600.0


class GitError(RuntimeError):
    """A git command failed; the message carries git's own last lines.

    Credentials in URLs (``https://user:token@host/node.git``) are masked here, once for every message:
    git's own error text and ours quote URLs, and these messages reach logs, status.json and every job.
    """

    def __init__(self, message: str) -> None:
        super().__init__(redact_urls(message))


@dataclass(frozen=True)
class Resolved:
    """A config version pinned down: the commit to check out and the ref that brings it (None: a bare commit)."""

    commit: str
    ref: str | None
    description: str


def git(*args: str, cwd: Path | None = None, timeout_s: float = GIT_TIMEOUT_S) -> str:
    """Run git without prompts (a private repository fails instead of waiting for a password)."""
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0", GIT_ASKPASS="/bin/false", LC_ALL="C")
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        raise GitError(f"git {args[0]} timed out after {timeout_s:g}s") from None
    except FileNotFoundError:
        raise GitError("git is not installed") from None
    if done.returncode != 0:
        tail = " ".join(done.stderr.strip().splitlines()[-3:]) or f"exit code {done.returncode}"
        raise GitError(f"git {args[0]} failed: {tail}")
    return done.stdout


def remote_refs(url: str) -> tuple[dict[str, str], str | None]:
    """All refs of ``url`` (peeled tags to their commits) and the default branch's name."""
    refs: dict[str, str] = {}
    default_branch = None
    for line in git("ls-remote", "--symref", url).splitlines():
        if line.startswith("ref: ") and line.endswith("\tHEAD"):
            default_branch = line[5:].split("\t")[0].removeprefix("refs/heads/")
            continue
        commit, _, name = line.partition("\t")
        if name.endswith("^{}"):
            refs[name[:-3]] = commit  # an annotated tag: the commit it points to wins
        else:
            refs.setdefault(name, commit)
    return refs, default_branch


def _version_key(tag: str) -> tuple[int, ...]:
    match = _VERSION_TAG.match(tag)
    return tuple(int(part) for part in match.group(1).split(".")) if match else ()


def _under(refs: dict[str, str], prefix: str) -> dict[str, str]:
    return {name.removeprefix(prefix): commit for name, commit in refs.items() if name.startswith(prefix)}


def resolve_version(url: str, version: str) -> Resolved:
    """The commit ``version`` names in the repository at ``url``."""
    refs, default_branch = remote_refs(url)
    tags = _under(refs, "refs/tags/")
    heads = _under(refs, "refs/heads/")
    if version == "latest":
        releases = sorted((tag for tag in tags if _VERSION_TAG.match(tag)), key=_version_key)
        if releases:
            tag = releases[-1]
            return Resolved(tags[tag], f"refs/tags/{tag}", f"latest = tag {tag}")
        log.warning("%s has no release tags; 'latest' means its default branch", redact_url(url))
        version = "nightly"
    if version == "nightly":
        if "HEAD" not in refs:
            raise GitError(f"{url} has no default branch")
        branch = default_branch or "HEAD"
        ref = f"refs/heads/{default_branch}" if default_branch else "HEAD"
        return Resolved(refs["HEAD"], ref, f"nightly = {branch} at {refs['HEAD'][:10]}")
    if version in tags:
        return Resolved(tags[version], f"refs/tags/{version}", f"tag {version}")
    if version in heads:
        return Resolved(heads[version], f"refs/heads/{version}", f"branch {version} at {heads[version][:10]}")
    if _COMMIT.match(version.lower()):
        return Resolved(version.lower(), None, f"commit {version[:10]}")
    newest = sorted((tag for tag in tags if _VERSION_TAG.match(tag)), key=_version_key)[-5:]
    hint = f" Newest tags: {', '.join(reversed(newest))}." if newest else ""
    raise GitError(f"version {version!r} is not a tag, branch or commit of {url}.{hint}")


def head_commit(path: Path) -> str | None:
    """The checked-out commit, or None when ``path`` is not a git checkout."""
    if not (path / ".git").exists():
        return None
    try:
        return git("rev-parse", "HEAD", cwd=path).strip()
    except GitError:
        return None


def origin_url(path: Path) -> str | None:
    try:
        return git("remote", "get-url", "origin", cwd=path).strip()
    except GitError:
        return None


def _fetch(path: Path, resolved: Resolved) -> None:
    """Fetch just the commit when the server allows it (GitHub does), else the history that holds it."""
    wanted = resolved.ref or resolved.commit
    try:
        git("fetch", "--quiet", "--depth", "1", "origin", wanted, cwd=path)
        if resolved.ref is not None or len(resolved.commit) == 40:
            return
    except GitError as exc:
        if resolved.ref is not None and "shallow" in str(exc):  # a server without shallow fetches (dumb HTTP)
            git("fetch", "--quiet", "origin", resolved.ref, cwd=path)
            return
        if resolved.ref is not None:
            raise
    unshallow = ["--unshallow"] if (path / ".git" / "shallow").exists() else []
    git("fetch", "--quiet", *unshallow, "--tags", "origin", "+refs/heads/*:refs/remotes/origin/*", cwd=path)


def _same_repository(one: str, other: str) -> bool:
    """The same repository, whatever the credentials in the URLs, a trailing slash or ``.git``."""
    return redact_url(one).rstrip("/").removesuffix(".git") == redact_url(other).rstrip("/").removesuffix(".git")


def _half_made(path: Path) -> bool:
    """A clone this code began (``git init`` + remote) that never checked a commit out: only ``.git`` in the
    folder and no HEAD commit. A failed first clone (a wrong URL, a lost connection) leaves one behind; it
    holds nothing of anybody's, so the next run replaces it instead of refusing a corrected URL."""
    if not (path / ".git").is_dir() or head_commit(path) is not None:
        return False
    return [entry.name for entry in path.iterdir()] == [".git"]


def checkout(url: str, resolved: Resolved, path: Path) -> str:
    """Make ``path`` a checkout of ``url`` at the resolved commit; return the commit checked out.

    A folder that exists but is not a clone of ``url`` is left alone and reported: it may be the user's.
    """
    if _half_made(path):
        log.warning("%s: an earlier clone stopped before its first checkout; starting it again", path)
        shutil.rmtree(path)
    if path.exists() and not (path / ".git").exists():
        raise GitError(f"{path} exists and is not a git checkout; move it away or remove the entry")
    if (path / ".git").exists():
        current = origin_url(path)
        if current is not None and _same_repository(current, url) and current != url:
            git("remote", "set-url", "origin", url, cwd=path)  # new credentials (a rotated token) in the URL
        elif current is not None and not _same_repository(current, url):
            raise GitError(f"{path} is a clone of {current}, not of {url}; move it away or fix the url")
    else:
        path.mkdir(parents=True)
        git("init", "--quiet", cwd=path)
        git("remote", "add", "origin", url, cwd=path)
    if head_commit(path) == resolved.commit and not git("status", "--porcelain", "--untracked-files=no", cwd=path):
        return resolved.commit
    _fetch(path, resolved)
    git("checkout", "--quiet", "--force", resolved.commit, cwd=path)
    git("submodule", "update", "--quiet", "--init", "--recursive", "--depth", "1", cwd=path)
    commit = head_commit(path) or ""
    if not commit.startswith(resolved.commit):
        raise GitError(f"{path} is at {commit[:10]} after checkout, expected {resolved.commit[:10]}")
    return commit
