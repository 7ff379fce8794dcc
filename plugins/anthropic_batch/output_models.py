"""Pydantic output models: load them by reference, ask the API for them, read and validate answers.

A pipeline names its output model as ``"schemas/support_ticket.py:TicketExtraction"`` (a file under
the include directory and a class in it). Two ways to get structured output from a batch request:

- ``json_schema``: ``params.output_config = {"format": {"type": "json_schema", "schema": ...}}``;
  the answer is JSON text in the text blocks.
- ``tool``: one forced tool whose ``input_schema`` is the model's schema; the answer is the
  ``input`` of the ``tool_use`` block.

Schemas go through ``anthropic.transform_schema`` so the API accepts them.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from anthropic_batch.errors import AnthropicBatchError

OUTPUT_MODES = ("json_schema", "tool")
_MODULE_PREFIX = "anthropic_batch_output_models"
_TOOL_NAME_RE = re.compile(r"[^a-zA-Z0-9_-]")
_MAX_ERROR_CHARS = 2000


class OutputModelError(AnthropicBatchError, ValueError):
    """An output model reference cannot be loaded."""


def _module_name(path: Path) -> str:
    # Stable across processes (same file -> same name), unique per file, a valid dotted name.
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    stem = re.sub(r"\W", "_", path.stem)
    return f"{_MODULE_PREFIX}.{stem}_{digest}"


@functools.lru_cache(maxsize=64)
def _load_module(path: Path, mtime_ns: int):
    # Keyed by modification time: an edited schema file is imported afresh in long-lived processes.
    name = _module_name(path)
    module = sys.modules.get(name)
    if module is None or getattr(module, "__anthropic_batch_mtime_ns__", None) != mtime_ns:
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise OutputModelError(f"cannot import output model file {path}")
        module = importlib.util.module_from_spec(spec)
        # Registered before exec so pydantic can resolve forward references in the module.
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise OutputModelError(f"error importing output model file {path}: {exc}") from exc
        module.__anthropic_batch_mtime_ns__ = mtime_ns
    return module


def _load(path: Path, class_name: str) -> type[BaseModel]:
    try:
        mtime_ns = path.stat().st_mtime_ns
    except FileNotFoundError:
        raise OutputModelError(f"output model file not found: {path}") from None
    if not path.is_file():
        raise OutputModelError(f"output model reference is not a file: {path}")
    module = _load_module(path, mtime_ns)
    cls = getattr(module, class_name, None)
    if cls is None:
        raise OutputModelError(f"{path} has no class {class_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
        raise OutputModelError(f"{path}:{class_name} is not a pydantic BaseModel subclass")
    return cls


def split_ref(ref: str) -> tuple[str, str]:
    """``"schemas/x.py:Model"`` -> ``("schemas/x.py", "Model")``."""
    file_part, sep, class_name = ref.rpartition(":")
    if not sep or not file_part or not class_name.isidentifier():
        raise OutputModelError(
            f"output model reference must look like 'schemas/file.py:ClassName', got {ref!r}"
        )
    return file_part, class_name


def load_output_model(ref: str, include_dir: str | Path | None = None) -> type[BaseModel]:
    """The pydantic class named by ``ref`` (``"schemas/x.py:Model"``), relative to ``include_dir``."""
    file_part, class_name = split_ref(ref)
    path = Path(file_part)
    if not path.is_absolute():
        base = Path(include_dir) if include_dir is not None else Path.cwd()
        path = base / path
    return _load(path.resolve(), class_name)


def output_tool_name(model_cls: type[BaseModel]) -> str:
    """Name of the forced tool for ``model_cls`` (fits the API's tool-name pattern)."""
    return _TOOL_NAME_RE.sub("_", model_cls.__name__)[:64]


def output_schema(model_cls: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema in the form the API accepts."""
    # Imported here: the SDK is large and result parsing (which imports this module) never needs it.
    from anthropic import transform_schema

    return transform_schema(model_cls)


def output_params(model_cls: type[BaseModel], mode: str = "json_schema") -> dict[str, Any]:
    """The request ``params`` fragment that asks for ``model_cls`` as output."""
    if mode == "json_schema":
        return {"output_config": {"format": {"type": "json_schema", "schema": output_schema(model_cls)}}}
    if mode == "tool":
        name = output_tool_name(model_cls)
        description = (model_cls.__doc__ or "").strip() or f"Record the answer as a {model_cls.__name__}."
        return {
            "tools": [{"name": name, "description": description, "input_schema": output_schema(model_cls)}],
            "tool_choice": {"type": "tool", "name": name},
        }
    raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {mode!r}")


def format_validation_error(exc: ValidationError) -> str:
    """A compact one-line summary of a pydantic ValidationError."""
    parts = []
    for err in exc.errors(include_url=False, include_context=False, include_input=False):
        loc = ".".join(str(p) for p in err.get("loc", ())) or "<root>"
        parts.append(f"{loc}: {err.get('msg')}")
    return "; ".join(parts)[:_MAX_ERROR_CHARS]
