"""Folder layout of the stand-in ComfyUI: where inputs, outputs, temp files and models live.

Follows the rules a ComfyUI 0.3.64 client can observe: defaults under the base directory, the
``--temp-directory D`` quirk that really means ``D/temp``, model folders that may span several paths,
the ``name [output]`` annotation, and ``prefix_00001_.png`` counters.
"""

from __future__ import annotations

import logging
import mimetypes
import os
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePath

log = logging.getLogger("standin.paths")

WEIGHT_FILES = frozenset({".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"})

# (name, sub-folders of models/, accepted extensions; empty: any), in the order ``GET /models`` lists them.
MODEL_FOLDERS: list[tuple[str, tuple[str, ...], frozenset[str]]] = [
    ("checkpoints", ("checkpoints",), WEIGHT_FILES),
    ("configs", ("configs",), frozenset({".yaml"})),
    ("loras", ("loras",), WEIGHT_FILES),
    ("vae", ("vae",), WEIGHT_FILES),
    ("text_encoders", ("text_encoders", "clip"), WEIGHT_FILES),
    ("diffusion_models", ("unet", "diffusion_models"), WEIGHT_FILES),
    ("clip_vision", ("clip_vision",), WEIGHT_FILES),
    ("style_models", ("style_models",), WEIGHT_FILES),
    ("embeddings", ("embeddings",), WEIGHT_FILES),
    ("diffusers", ("diffusers",), frozenset({"folder"})),
    ("vae_approx", ("vae_approx",), WEIGHT_FILES),
    ("controlnet", ("controlnet", "t2i_adapter"), WEIGHT_FILES),
    ("gligen", ("gligen",), WEIGHT_FILES),
    ("upscale_models", ("upscale_models",), WEIGHT_FILES),
    ("custom_nodes", (), frozenset()),
    ("hypernetworks", ("hypernetworks",), WEIGHT_FILES),
    ("photomaker", ("photomaker",), WEIGHT_FILES),
    ("classifiers", ("classifiers",), frozenset({""})),
    ("model_patches", ("model_patches",), WEIGHT_FILES),
    ("audio_encoders", ("audio_encoders",), WEIGHT_FILES),
]
OLD_NAMES = {"unet": "diffusion_models", "clip": "text_encoders"}
# Where ``name [output]`` style annotations point (the suffix and the space before it are cut off).
ANNOTATIONS = ("output", "input", "temp")
# Media kinds decided by extension before asking ``mimetypes``.
KNOWN_KINDS = {"webp": "image", "fbx": "model"}

mimetypes.init()
mimetypes.add_type("application/javascript; charset=utf-8", ".js")
mimetypes.add_type("image/webp", ".webp")


@dataclass
class ModelFolder:
    paths: list[str]
    extensions: frozenset[str] = field(default_factory=frozenset)

    def files(self) -> set[str]:
        """Relative paths of the matching files below every path (``.git`` folders skipped)."""
        found: set[str] = set()
        for root in self.paths:
            for folder, subfolders, names in os.walk(root, followlinks=True):
                subfolders[:] = [d for d in subfolders if d != ".git"]
                for name in names:
                    if not self.extensions or os.path.splitext(name)[1].lower() in self.extensions:
                        found.add(os.path.relpath(os.path.join(folder, name), root))
        return found


class FolderPaths:
    """All directories of one server instance."""

    def __init__(self, base: str) -> None:
        self.base = os.path.abspath(base)
        self.model_folders: dict[str, ModelFolder] = {}
        for name, subfolders, extensions in MODEL_FOLDERS:
            if name == "custom_nodes":
                paths = [os.path.join(self.base, "custom_nodes")]
            else:
                paths = [os.path.join(self.base, "models", sub) for sub in subfolders]
            self.model_folders[name] = ModelFolder(paths, extensions)
        self.output_dir = os.path.join(self.base, "output")
        self.temp_dir = os.path.join(self.base, "temp")
        self.input_dir = os.path.join(self.base, "input")
        self.user_dir = os.path.join(self.base, "user")

    # -- model folders -------------------------------------------------------------------------------------------
    def add_model_path(self, name: str, path: str, first: bool = False) -> None:
        name = OLD_NAMES.get(name, name)
        if name not in self.model_folders:
            self.model_folders[name] = ModelFolder([path])
            return
        paths = self.model_folders[name].paths
        if path in paths and not first:
            return
        if path in paths:
            paths.remove(path)
        if first:
            paths.insert(0, path)
        else:
            paths.append(path)

    def read_extra_paths(self, yaml_path: str) -> None:
        """Add the model paths of an ``extra_model_paths.yaml`` (relative paths: from the file's folder)."""
        import yaml

        here = os.path.dirname(os.path.abspath(yaml_path))
        with open(yaml_path, encoding="utf-8") as stream:
            sections = yaml.safe_load(stream) or {}
        for section in sections.values():
            if section is None:
                continue
            base = section.pop("base_path", None)
            if base is not None:
                base = os.path.join(here, os.path.expandvars(os.path.expanduser(base)))
            first = bool(section.pop("is_default", False))
            for name, lines in section.items():
                for line in filter(None, lines.split("\n")):
                    path = os.path.normpath(os.path.join(base or here, line))
                    log.info("Extra %s path: %s", name, path)
                    self.add_model_path(name, path, first)

    def paths_of(self, name: str) -> list[str]:
        return list(self.model_folders[OLD_NAMES.get(name, name)].paths)

    def files_in(self, name: str) -> list[str]:
        return sorted(self.model_folders[OLD_NAMES.get(name, name)].files())

    # -- input / output / temp ----------------------------------------------------------------------------------
    def folder_of(self, kind: str) -> str | None:
        return {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}.get(kind)

    def split_annotation(self, name: str) -> tuple[str, str | None]:
        """``"x.png [output]"`` -> (``"x.png"``, output dir). Like the real server it cuts one character more
        than the annotation, so ``"x.png[output]"`` (no space) becomes ``"x.pn"``."""
        for kind in ANNOTATIONS:
            suffix = f"[{kind}]"
            if name.endswith(suffix):
                return name[: -len(suffix) - 1], self.folder_of(kind)
        return name, None

    def annotated_path(self, name: str, default_dir: str | None = None) -> str:
        name, folder = self.split_annotation(name)
        return os.path.join(folder or default_dir or self.input_dir, name)

    def annotated_exists(self, name: str) -> bool:
        return os.path.exists(self.annotated_path(name))

    def save_slot(self, prefix: str, root: str, width: int = 0, height: int = 0) -> tuple[str, str, int, str, str]:
        """(folder, file stem, next free counter, subfolder, expanded prefix) for ``stem_00001_.ext`` files."""
        if "%" in prefix:
            prefix = expand_placeholders(prefix, width, height)
        normal = os.path.normpath(prefix)
        subfolder, stem = os.path.dirname(normal), os.path.basename(normal)
        folder = os.path.join(root, subfolder)
        if not PurePath(os.path.abspath(folder)).is_relative_to(root):
            common = os.path.commonpath((root, os.path.abspath(folder)))
            message = (
                "**** ERROR: Saving image outside the output folder is not allowed."
                f"\n full_output_folder: {os.path.abspath(folder)}"
                f"\n         output_dir: {root}"
                f"\n         commonpath: {common}"
            )
            log.error(message)
            raise Exception(message)
        try:
            existing = os.listdir(folder)
        except FileNotFoundError:
            os.makedirs(folder, exist_ok=True)
            existing = []
        return folder, stem, next_counter(existing, stem, len(os.path.basename(prefix))), subfolder, prefix

    def input_images(self) -> list[str]:
        """LoadImage's choices: top-level files of the input folder that are images, sorted."""
        return [name for name in self.input_listing() if media_kind(name) == "image"]

    def input_listing(self) -> list[str]:
        folder = Path(self.input_dir)
        if not folder.is_dir():
            return []
        return sorted(entry.name for entry in folder.iterdir() if entry.is_file())


def next_counter(names: list[str], stem: str, width: int) -> int:
    """One more than the highest number in ``<stem>_<number>...`` names (compared case-folded like the OS).

    ``width`` is the length of the prefix's last component as given, which the name's head must match."""
    numbers = []
    for name in names:
        head, marker, tail = name[:width], name[width : width + 1], name[width + 1 :]
        if marker != "_" or os.path.normcase(head) != os.path.normcase(stem):
            continue
        try:
            numbers.append(int(tail.split("_")[0]))
        except ValueError:
            numbers.append(0)
    return max(numbers) + 1 if numbers else 1


def expand_placeholders(text: str, width: int, height: int) -> str:
    now = time.localtime()
    values = {
        "%width%": str(width),
        "%height%": str(height),
        "%year%": str(now.tm_year),
        "%month%": f"{now.tm_mon:02}",
        "%day%": f"{now.tm_mday:02}",
        "%hour%": f"{now.tm_hour:02}",
        "%minute%": f"{now.tm_min:02}",
        "%second%": f"{now.tm_sec:02}",
    }
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    return text


def media_kind(name: str) -> str | None:
    """``image``, ``video``, ... from the extension."""
    extension = name.split(".")[-1]
    if extension in KNOWN_KINDS:
        return KNOWN_KINDS[extension]
    mime, _ = mimetypes.guess_type(name, strict=False)
    return mime.split("/")[0] if mime else None


def guess_content_type(filename: str) -> str:
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"
