"""The job input (``event["input"]``): one pydantic model, the single source of truth for its fields.

docs/job-api.md's "Job input" table documents these fields; change both together. Validation errors become an
``InputError`` whose message names every bad field, so a client sees all its mistakes at once.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic import ValidationError as PydanticValidationError

from comfy_worker.errors import InputError, field_path
from comfy_worker.provision.config import ModelConfig
from comfy_worker.provision.transfer import PARTIAL_SUFFIXES
from comfy_worker.settings import INPUT_PREFIX
from comfy_worker.storage import sanitize_prefix

MAX_RESOLUTION = 16384  # ComfyUI's own MAX_RESOLUTION for width/height inputs
MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF  # KSampler's seed range
MAX_NAME_LENGTH = 255
MAX_DEPTH = 64  # API-format workflows nest 4 levels deep; deeper is a mistake or an attack on recursion
_DATA_URI = re.compile(r"^data:[\w.+-]+/[\w.+-]+(;[\w=.+-]+)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MB = 1024 * 1024


def check_text(value: str) -> None:
    """Refuse a lone surrogate (JSON's ``"\\ud800"``): no file name or UTF-8 text can hold one."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("holds a lone surrogate (\\ud800-\\udfff), which is not text a file name can hold") from None


def check_json_value(value: Any) -> None:
    """Refuse what JSON cannot carry to ComfyUI (NaN, Infinity) and nesting deeper than MAX_DEPTH.

    Python's json module reads ``NaN``/``Infinity`` and recurses on nesting; ComfyUI would refuse the first
    and the worker's own copies would hit the recursion limit on the second. Iterative, so it cannot recurse.
    """
    stack: list[tuple[Any, tuple[str, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        where = ".".join(path) or "the value"
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{where} is {item}, not a JSON number (NaN and Infinity cannot be sent to ComfyUI)")
        if isinstance(item, dict | list):
            if len(path) >= MAX_DEPTH:
                raise ValueError(f"{'.'.join(path[:3])}... is nested deeper than {MAX_DEPTH} levels")
            children = item.items() if isinstance(item, dict) else enumerate(item)
            stack += [(child, (*path, str(key))) for key, child in children]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class JobModel(ModelConfig):
    """A model the workflow needs, downloaded into the worker's model cache before the prompt is queued."""

    filename: str = Field(description="The file's name, as the workflow names it (e.g. in LoraLoader).")

    @field_validator("filename", "destination")
    @classmethod
    def _plain_text(cls, value: str) -> str:
        check_text(value)
        if _CONTROL.search(value):
            raise ValueError("contains a control character (a newline, a tab...)")
        return value

    @field_validator("filename")
    @classmethod
    def _not_partial(cls, filename: str) -> str:
        if filename.endswith(PARTIAL_SUFFIXES):
            raise ValueError("must not end in .part or .part.json (the names of a download in progress)")
        return filename

    @field_validator("optional")
    @classmethod
    def _required(cls, value: bool) -> bool:
        if value:
            raise ValueError("a job's models are all required: leave 'optional' out")
        return value


class InputImage(_Model):
    """An image the workflow reads with LoadImage (or any node reading ComfyUI's input folder)."""

    name: str = Field(description="Path under ComfyUI's input folder, e.g. 'masks/m.png'.")
    image: str | None = Field(None, description="Base64 bytes, optionally as a data URI.")
    url: str | None = Field(None, min_length=1, max_length=4096, description="http(s):// or s3:// to fetch.")
    _data: bytes = PrivateAttr(default=b"")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        if not name or not name.strip():
            raise ValueError("must not be empty")
        check_text(name)
        if len(name) > MAX_NAME_LENGTH:
            raise ValueError(f"is longer than {MAX_NAME_LENGTH} characters")
        if "\x00" in name:
            raise ValueError("contains a null byte")
        if '"' in name or any(ord(char) < 32 or ord(char) == 127 for char in name):
            raise ValueError("contains a double quote or a control character (an upload would land under another name)")
        if "\\" in name:
            raise ValueError("contains a backslash; use '/' between folders")
        if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
            raise ValueError("must be relative to ComfyUI's input folder, not an absolute path")
        parts = name.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise ValueError("must not contain empty, '.' or '..' path segments (it would escape the input folder)")
        if any(part != part.strip() for part in parts):
            raise ValueError("path segments must not start or end with spaces")
        return name

    @model_validator(mode="after")
    def _decode(self, info: ValidationInfo) -> InputImage:
        if (self.image is None) == (self.url is None):
            raise ValueError(f"image {self.name!r}: give exactly one of 'image' (base64) and 'url'")
        if self.image is None:
            return self  # fetched later, off the event loop
        limit = (info.context or {}).get("image_max_bytes")
        if limit is not None and len(self.image) // 4 * 3 > limit:  # before any copy of a huge string
            raise ValueError(
                f"image {self.name!r}: 'image' is {len(self.image) // 4 * 3 / MB:.1f} MB, over INPUT_IMAGE_MAX_MB "
                f"({limit / MB:g} MB); send large inputs as a url"
            )
        payload = _WHITESPACE.sub("", _DATA_URI.sub("", self.image.strip(), count=1))
        if not payload:
            raise ValueError(f"image {self.name!r}: 'image' is empty")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"image {self.name!r}: 'image' is not valid base64 (nor a base64 data URI)") from None
        self._data = data
        return self

    @property
    def data(self) -> bytes:
        return self._data

    @property
    def subfolder(self) -> str:
        return self.name.rpartition("/")[0]

    @property
    def filename(self) -> str:
        return self.name.rpartition("/")[2]


class Override(_Model):
    """Set one value inside the workflow before it is queued."""

    node_id: str = Field(description="The node's id in the API-format workflow.")
    field: str = Field(description="Dot path inside the node, e.g. 'inputs.text' or 'inputs.seed'.")
    value: Any = Field(description="The new value (any JSON).")

    @field_validator("node_id", mode="before")
    @classmethod
    def _node_id_as_str(cls, value: Any) -> Any:
        # API-format node ids are JSON object keys, so always strings; accept 6 for "6".
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("value")
    @classmethod
    def _json_value(cls, value: Any) -> Any:
        check_json_value(value)
        return value

    @field_validator("field")
    @classmethod
    def _non_empty_path(cls, value: str) -> str:
        if not value or any(not part for part in value.split(".")):
            raise ValueError("must be a dot path such as 'inputs.text'")
        return value


class OutputOptions(_Model):
    """How outputs are collected and delivered."""

    include_temp: bool = Field(False, description="Also return temp outputs (PreviewImage and the like).")
    delivery: Literal["auto", "base64", "s3"] = Field("auto", description="auto: S3 when configured.")
    format: Literal["png", "webp", "jpeg"] = Field("png", description="Still images: as written, or converted.")
    quality: int = Field(90, ge=1, le=100, description="webp/jpeg quality.")
    s3_prefix: str | None = Field(None, min_length=1, max_length=200, description="Key prefix for this job.")

    @field_validator("s3_prefix")
    @classmethod
    def _not_inputs(cls, prefix: str | None) -> str | None:
        if prefix is not None and f"{sanitize_prefix(prefix)}/".startswith(INPUT_PREFIX):
            raise ValueError(f"must not start with {INPUT_PREFIX}: jobs read their s3:// inputs there")
        return prefix


class JobInput(_Model):
    """``event["input"]`` of a job."""

    workflow: dict[str, Any] = Field(
        description="The ComfyUI workflow, in the API format or as *Save* writes it (UI format); object or JSON string."
    )
    images: list[InputImage] = Field(default_factory=list)
    overrides: list[Override] = Field(default_factory=list)
    prompt: str | None = None
    prompt_node_id: str | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    seed_node_id: str | None = None
    width: int | None = Field(None, ge=1, le=MAX_RESOLUTION)
    height: int | None = Field(None, ge=1, le=MAX_RESOLUTION)
    size_node_id: str | None = None
    timeout: float | None = Field(None, gt=0, description="Seconds; default JOB_TIMEOUT, at most JOB_TIMEOUT_MAX.")
    models: list[JobModel] = Field(default_factory=list, max_length=20)
    comfy_org_api_key: str | None = Field(
        None,
        min_length=1,
        max_length=512,
        description="Comfy.org API key for ComfyUI's partner API nodes; default COMFY_ORG_API_KEY. Masked everywhere.",
    )
    output: OutputOptions = Field(default_factory=OutputOptions)

    @field_validator("workflow", mode="before")
    @classmethod
    def _parse_json_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"is a string but not valid JSON: {exc}") from None
            except RecursionError:
                raise ValueError(f"is nested deeper than {MAX_DEPTH} levels") from None
        return value

    @field_validator("workflow")
    @classmethod
    def _json_workflow(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_json_value(value)
        return value

    @field_validator("prompt_node_id", "seed_node_id", "size_node_id", mode="before")
    @classmethod
    def _node_ids_as_str(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("timeout")
    @classmethod
    def _timeout_within_max(cls, value: float | None, info: ValidationInfo) -> float | None:
        limit = (info.context or {}).get("timeout_max")
        if value is not None and limit is not None and value > limit:
            raise ValueError(f"must be at most {limit:g} seconds (JOB_TIMEOUT_MAX)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> JobInput:
        seen: set[str] = set()
        for image in self.images:
            if image.name in seen:
                raise ValueError(f"images: the name {image.name!r} appears more than once")
            seen.add(image.name)
        files: set[str] = set()
        for model in self.models:
            file = f"{model.destination}/{model.filename}"
            if file in files:
                raise ValueError(f"models: {file} appears more than once (one file, one URL)")
            files.add(file)
        if (self.width is None) != (self.height is None):
            raise ValueError("width and height must be given together")
        for id_field, value_field in (
            ("prompt_node_id", "prompt"),
            ("seed_node_id", "seed"),
            ("size_node_id", "width"),
        ):
            if getattr(self, id_field) is not None and getattr(self, value_field) is None:
                raise ValueError(f"{id_field} is given but {value_field} is not")
        return self


def parse_job_input(raw: Any, *, timeout_max: float, image_max_bytes: int | None = None) -> JobInput:
    """Validate ``event["input"]``; raise InputError listing every problem."""
    if not isinstance(raw, dict):
        raise InputError(
            f"The job input must be a JSON object with a 'workflow' field, not {type(raw).__name__}.",
            {"errors": [{"field": "input", "message": "must be an object"}]},
        )
    try:
        context = {"timeout_max": timeout_max, "image_max_bytes": image_max_bytes}
        return JobInput.model_validate(raw, context=context)
    except PydanticValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            field = field_path(error["loc"]) or "input"
            if error["type"] == "extra_forbidden":
                message = f"unknown field; known fields are: {', '.join(_known_fields(error['loc']))}"
            else:
                message = error["msg"].removeprefix("Value error, ")
            problems.append({"field": field, "message": message})
        summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        raise InputError(f"Invalid job input: {summary}", {"errors": problems}) from None


def _known_fields(loc: tuple[int | str, ...]) -> list[str]:
    """The field names allowed where an unknown field was found, for a helpful message."""
    model: type[BaseModel] = JobInput
    parents: dict[str, type[BaseModel]] = {"images": InputImage, "overrides": Override, "output": OutputOptions}
    for part in loc[:-1]:
        if isinstance(part, str) and part in parents:
            model = parents[part]
    return list(model.model_fields)
