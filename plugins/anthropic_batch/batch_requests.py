"""Table -> API requests: the request spec, custom ids, validation and the chunk files.

``prepare_requests`` renders one Messages request per input record with a Jinja template and writes
them, streamed, to ``work_dir/requests/chunk-NNNNN.jsonl`` (one canonical JSON line per request),
``requests/keys.parquet`` (custom_id -> key values, request fingerprint, chunk index),
``rejected.parquet`` (records refused before any spend, with the reason) and
``requests/manifest.json``. Nothing is lost: every input record is either a request or a reject.

Duplicates: when several records share a key (or, improbably, a custom_id), *all* members of the
group are rejected. Picking one would silently drop data the user may still want; the reject table
lists them all so the user can fix the input.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from airflow.sdk import ObjectStoragePath
from pydantic import BaseModel

from anthropic_batch import layout
from anthropic_batch.errors import AnthropicBatchError
from anthropic_batch.layout import chunk_name, read_manifest  # noqa: F401  (re-exported)
from anthropic_batch.output_models import OUTPUT_MODES, output_params
from anthropic_batch.storage import (
    PathLike,
    as_path,
    atomic_write_json,
    open_atomic_writer,
    open_binary,
)

if TYPE_CHECKING:
    import jinja2
    import pandas as pd
    import pyarrow as pa

# pyarrow, pandas, jinja2 and results (pyarrow) are imported inside the functions that use them:
# DAG files import this module (through the prepare operator) at parse time.

API_VERSION = "2026-10-21"
MAX_REQUESTS_PER_BATCH = 100_000
MAX_BATCH_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_BYTES_PER_CHUNK = 200 * 1024 * 1024
CUSTOM_ID_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_CUSTOM_ID_BAD_CHARS = re.compile(r"[^a-zA-Z0-9_-]+")
_HASH_SUFFIX_LEN = 16
#: Hex digits of the request fingerprint at the end of every custom_id (see make_custom_id).
REQUEST_DIGEST_LEN = 8
# A single key usable as the base as-is: custom_id characters, at most 64 - digest - "-" long.
_PLAIN_ID_RE = re.compile(rf"^[a-zA-Z0-9_-]{{1,{64 - REQUEST_DIGEST_LEN - 1}}}$")

BODY_PREFIX = b'{"requests":['
BODY_SUFFIX = b"]}"
BODY_OVERHEAD = len(BODY_PREFIX) + len(BODY_SUFFIX)

# Params set from RequestSpec fields, never through extra_params.
_SPEC_OWNED_PARAMS = frozenset({"model", "max_tokens", "messages", "system"})
# Params a batch request accepts (anthropic SDK 2.x MessageCreateParamsNonStreaming).
_BATCH_PARAMS = frozenset(
    {
        "cache_control",
        "container",
        "diagnostics",
        "inference_geo",
        "metadata",
        "output_config",
        "service_tier",
        "speed",
        "stop_sequences",
        "stream",
        "thinking",
        "tool_choice",
        "tools",
        "user_profile_id",
        "workspace_id",
    }
)
# Rejected for batch requests from API version 2026-10-21 on; accepted by older versions.
_SAMPLING_PARAMS = frozenset({"temperature", "top_p", "top_k"})

REJECT_NULL_KEY = "null_key"
REJECT_TEMPLATE = "template_error"
REJECT_EMPTY_PROMPT = "empty_prompt"
REJECT_DUPLICATE_KEY = "duplicate_key"
REJECT_CUSTOM_ID_COLLISION = "custom_id_collision"
REJECT_TOO_LARGE = "request_too_large"
REJECT_UNREADABLE = "unreadable_record"
# Dead-letter rows written by prepare: their stage and status.
PREPARE_STAGE = "prepare"
REJECTED_STATUS = "rejected"


class BatchRequestError(AnthropicBatchError, ValueError):
    """A request spec or input that would fail in the API: refused before any money is spent."""


def canonical_json(obj: Any) -> str:
    """The one JSON serialisation used for request lines and fingerprints."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_hex(data: bytes | str) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def _finalize(value: Any) -> Any:
    # A null column renders as nothing, not as the word "None".
    return "" if value is None else value


def _jinja_env() -> jinja2.Environment:
    # jinja2: only where a template is rendered
    import jinja2

    return jinja2.Environment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False, finalize=_finalize
    )


@dataclass(frozen=True)
class RequestSpec:
    """Everything that turns one record into one Messages request (except the record itself)."""

    model: str
    max_tokens: int
    prompt_template: str  # Jinja source; the record's columns are its variables
    system_prompt: str | None = None  # sent as-is (not templated) so it can be cached across requests
    cache_system_prompt: bool = True
    cache_ttl: str = "1h"
    output_model: type[BaseModel] | None = None
    output_mode: str = "json_schema"
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    extra_params: dict[str, Any] = field(default_factory=dict)
    api_version: str = API_VERSION
    output_model_ref: str | None = None  # "schemas/x.py:Model", recorded in the manifest

    def output_fragment(self) -> dict[str, Any]:
        """The params this spec adds for structured output (empty without an output model)."""
        if self.output_model is None:
            return {}
        return output_params(self.output_model, self.output_mode)

    def system_param(self) -> str | list[dict[str, Any]] | None:
        if self.system_prompt is None:
            return None
        if not self.cache_system_prompt:
            return self.system_prompt
        return [
            {
                "type": "text",
                "text": self.system_prompt,
                "cache_control": {"type": "ephemeral", "ttl": self.cache_ttl},
            }
        ]

    def base_params(self) -> dict[str, Any]:
        """Every request's params except ``messages``."""
        params: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens}
        system = self.system_param()
        if system is not None:
            params["system"] = system
        if self.tools:
            params["tools"] = [dict(t) for t in self.tools]
        if self.tool_choice:
            params["tool_choice"] = dict(self.tool_choice)
        params.update(self.extra_params)
        fragment = self.output_fragment()
        if "tools" in fragment:
            params["tools"] = params.get("tools", []) + fragment["tools"]
            params["tool_choice"] = fragment["tool_choice"]
        elif "output_config" in fragment:
            params["output_config"] = {**params.get("output_config", {}), **fragment["output_config"]}
        return params

    def build_params(self, prompt: str) -> dict[str, Any]:
        """The full ``params`` of one request for a rendered prompt."""
        params = self.base_params()
        params["messages"] = [{"role": "user", "content": prompt}]
        return params

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of everything that shapes the requests."""
        return sha256_hex(
            canonical_json(
                {
                    "prompt_template": self.prompt_template,
                    "params": self.base_params(),
                    "output_mode": self.output_mode if self.output_model is not None else None,
                    "api_version": self.api_version,
                }
            )
        )

    def validate(self) -> list[str]:
        """Warnings about the spec; raises ``BatchRequestError`` for what a batch would refuse."""
        errors: list[str] = []
        warnings: list[str] = []
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            errors.append(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.model or not isinstance(self.model, str):
            errors.append("model must be a non-empty string")
        if not self.prompt_template or not self.prompt_template.strip():
            errors.append("prompt_template is empty")
        else:
            import jinja2

            try:
                _jinja_env().parse(self.prompt_template)
            except jinja2.TemplateSyntaxError as exc:
                errors.append(f"prompt_template is not valid Jinja (line {exc.lineno}): {exc.message}")
        if self.cache_ttl not in ("5m", "1h"):
            errors.append(f"cache_ttl must be '5m' or '1h', got {self.cache_ttl!r}")
        if self.output_model is not None and self.output_mode not in OUTPUT_MODES:
            errors.append(f"output_mode must be one of {OUTPUT_MODES}, got {self.output_mode!r}")

        extra = self.extra_params or {}
        for key in sorted(extra):
            if key in _SPEC_OWNED_PARAMS:
                errors.append(f"extra_params may not set {key!r}: it comes from the RequestSpec field")
            elif key in _SAMPLING_PARAMS:
                if self.api_version >= API_VERSION:
                    errors.append(
                        f"{key!r} is rejected for batch requests under API version {self.api_version}"
                    )
            elif key not in _BATCH_PARAMS:
                errors.append(f"unknown request parameter {key!r} (a batch request cannot take it)")
        if extra.get("stream"):
            errors.append("stream: true is not allowed in a batch request")
        if extra.get("speed") == "fast":
            errors.append("fast mode (speed: 'fast') is not allowed in a batch request")
        if "tools" in extra or "tool_choice" in extra:
            errors.append("set tools and tool_choice through the RequestSpec fields, not extra_params")

        if self.output_model is not None and self.output_mode == "tool" and self.tool_choice:
            errors.append("output_mode 'tool' forces its own tool_choice; do not set tool_choice as well")
        forced = self.tool_choice and self.tool_choice.get("type") == "tool"
        if self.tools and not forced and not (self.output_model is not None and self.output_mode == "tool"):
            warnings.append(
                "tools are offered without a forced tool_choice: a batch cannot continue a tool loop, "
                "so answers that call a tool are collected as needs_followup"
            )
        if self.system_prompt is not None and not self.system_prompt.strip():
            warnings.append("system_prompt is blank")
        if errors:
            raise BatchRequestError("invalid request spec: " + "; ".join(errors))
        return warnings


# -- custom ids -------------------------------------------------------------------------------------


def _key_str(value: object) -> str | None:
    """A key value as the string stored in keys.parquet and used for custom ids; None when null."""
    if type(value) is str:  # the common case first: it runs for every key of every record, twice
        return value if value.strip() else None
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    # pandas' NaT can only reach here if pandas is loaded; looked up, not imported, to stay light.
    pd = sys.modules.get("pandas")
    if pd is not None and value is pd.NaT:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    text = str(value)
    return text if text.strip() else None


def custom_id_base(key_values: Sequence[object]) -> str:
    """The readable part of a record's custom_id: what identifies the record, at most
    ``64 - REQUEST_DIGEST_LEN - 1`` characters of ``[a-zA-Z0-9_-]``.

    Readable when possible: one key that already fits is used as-is; several keys that fit and
    contain no ``-`` are joined with ``-`` (still reversible). Otherwise a sanitised prefix plus
    ``-`` and a 16-hex-digit hash of all key values. Two records with equal bases are refused
    (duplicate keys or a collision), so custom_ids are unique whatever their request digests.
    """
    if len(key_values) == 1 and type(key_values[0]) is str and _PLAIN_ID_RE.match(key_values[0]):
        return key_values[0]  # one key that already fits: the common case, without the checks below
    if not key_values:
        raise ValueError("custom_id_base needs at least one key value")
    parts = [_key_str(v) for v in key_values]
    if any(p is None for p in parts):
        raise ValueError(f"key values must not be null or blank: {list(key_values)!r}")
    limit = 64 - REQUEST_DIGEST_LEN - 1
    if len(parts) == 1 and CUSTOM_ID_RE.match(parts[0]) and len(parts[0]) <= limit:
        return parts[0]
    if len(parts) > 1 and all(CUSTOM_ID_RE.match(p) and "-" not in p for p in parts):
        joined = "-".join(parts)
        if len(joined) <= limit:
            return joined
    suffix = sha256_hex(canonical_json(parts))[:_HASH_SUFFIX_LEN]
    prefix = _CUSTOM_ID_BAD_CHARS.sub("_", "-".join(parts)).strip("_-")[: limit - _HASH_SUFFIX_LEN - 1]
    return f"{prefix}-{suffix}" if prefix else suffix


def make_custom_id(key_values: Sequence[object], request_fingerprint: str) -> str:
    """A record's custom_id, ``^[a-zA-Z0-9_-]{1,64}$``: :func:`custom_id_base` of its keys, ``-``,
    and the first :data:`REQUEST_DIGEST_LEN` hex digits of its request's fingerprint.

    The digest ties every result line to the exact request it answers: a batch of another date,
    pipeline or chunk with the same keys but another prompt, model or parameters has other
    custom_ids, so its results are never taken for this chunk's (``ledger.iter_verified_lines``).
    The suffix has a fixed length, so distinct bases give distinct custom_ids.
    """
    digest = request_fingerprint[:REQUEST_DIGEST_LEN]
    if len(digest) != REQUEST_DIGEST_LEN or not digest.isalnum():
        raise ValueError(f"request_fingerprint must be a hex digest, got {request_fingerprint!r}")
    return f"{custom_id_base(key_values)}-{digest}"


# -- input tables -----------------------------------------------------------------------------------


def _format_of(name: str) -> str:
    lower = name.lower()
    for suffix, fmt in (
        (".parquet", "parquet"),
        (".pq", "parquet"),
        (".csv", "csv"),
        (".jsonl", "jsonl"),
        (".ndjson", "jsonl"),
        (".json", "jsonl"),
    ):
        if lower.endswith(suffix):
            return fmt
    raise BatchRequestError(f"cannot tell the format of {name!r}: use .parquet, .csv or .jsonl, or pass fmt")


@dataclass(frozen=True)
class UnreadableRecord:
    """A source line that is not a record (not UTF-8, not JSON, not an object): dead-lettered."""

    source: str
    line: int  # 1-based line number in the source file
    reason: str
    raw: str  # the line as text; bytes that are not UTF-8 kept as \\xNN escapes, so nothing is lost
    record: dict[str, Any] | None = None  # a best-effort parse, for the key values of the dead letter

    @property
    def message(self) -> str:
        return f"{self.source} line {self.line}: {self.reason}"


def _parse_jsonl_line(raw: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """``(record, None)`` for a JSON object line, else ``(best-effort record or None, reason)``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        reason = f"not valid UTF-8 ({exc.reason}: byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        try:  # the rest of the line may still name the record
            salvaged = json.loads(raw.decode("utf-8", errors="replace"))
        except ValueError:
            salvaged = None
        return (salvaged if isinstance(salvaged, dict) else None), reason
    try:
        value = json.loads(text)
    except ValueError as exc:
        return None, f"not valid JSON ({exc})"
    if not isinstance(value, dict):
        return None, f"not a JSON object (a {type(value).__name__})"
    return value, None


def _column(values: list[Any]) -> pa.Array:
    # pyarrow/numpy: kept out of DAG parsing
    import pyarrow as pa

    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        # Mixed types in one column (7 here, "7" there): keep every value, as text.
        return pa.array(
            [v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in values],
            type=pa.string(),
        )


#: Records per batch while prepare streams its source: bounds what one batch holds in memory.
SOURCE_BATCH_ROWS = 10_000


def _jsonl_records(handle) -> Iterator[tuple[int, bytes, dict[str, Any] | None, str | None]]:
    """``(line number, line, record or None, reason or None)`` per non-blank line."""
    for number, raw in enumerate(handle, start=1):
        line = raw.strip()
        if number == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]  # a UTF-8 byte order mark
        if not line:
            continue
        record, reason = _parse_jsonl_line(line)
        yield number, line, record, reason


def _unify_type(types: Sequence[pa.DataType]) -> pa.DataType:
    """The one type a whole JSONL column gets from its per-block types (text when they disagree),
    as if it had been inferred over the whole column at once."""
    import pyarrow as pa

    known = [t for t in types if not pa.types.is_null(t)]
    if not known:
        return pa.null()
    if all(t == known[0] for t in known):
        return known[0]
    try:
        schemas = [pa.schema([("c", t)]) for t in known]
        return pa.unify_schemas(schemas, promote_options="permissive").field("c").type
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return pa.string()


def _typed_column(values: list[Any], type_: pa.DataType) -> pa.Array:
    import pyarrow as pa

    try:
        return pa.array(values, type=type_)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array(
            [v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in values],
            type=pa.string(),
        )


class SourceReader:
    """A source table read in record batches, as often as needed, never whole.

    ``iter_batches(columns)`` yields the records (or only ``columns``) in file order, in batches of
    about ``batch_rows``; every call reads the source again, so prepare's two passes (keys, then
    records) hold one batch at a time. Parquet is read row group by row group, CSV block by block,
    JSONL line by line (a first scan finds its columns, their types and the unreadable lines).
    """

    def __init__(
        self,
        source: str | ObjectStoragePath | pd.DataFrame | pa.Table,
        fmt: str | None = None,
        *,
        batch_rows: int | None = None,
    ):
        import pyarrow as pa

        self.batch_rows = batch_rows or SOURCE_BATCH_ROWS
        self.unreadable: list[UnreadableRecord] = []
        self.num_rows: int | None = None  # None: not known before a full read (CSV)
        self._table: pa.Table | None = None
        self._jsonl_types: dict[str, pa.DataType] = {}
        pd = sys.modules.get("pandas")  # a DataFrame implies pandas is loaded; no import needed to test
        if isinstance(source, pa.Table) or (pd is not None and isinstance(source, pd.DataFrame)):
            self._table = (
                source if isinstance(source, pa.Table) else pa.Table.from_pandas(source, preserve_index=False)
            )
            self.fmt, self.path = "table", None
            self.column_names = list(self._table.column_names)
            self.num_rows = self._table.num_rows
            return
        self.path = as_path(source)
        fmt = (fmt or _format_of(self.path.name)).lower()
        if fmt not in ("parquet", "csv", "jsonl", "json", "ndjson"):
            raise BatchRequestError(f"unsupported input format {fmt!r}: use parquet, csv or jsonl")
        self.fmt = "jsonl" if fmt in ("json", "ndjson") else fmt
        if not self.path.exists():
            raise BatchRequestError(f"input file not found: {self.path}")
        with self._errors_named():
            if self.fmt == "parquet":
                import pyarrow.parquet as pq

                with open_binary(self.path) as handle:
                    parquet = pq.ParquetFile(handle)
                    self.column_names = list(parquet.schema_arrow.names)
                    self.num_rows = parquet.metadata.num_rows
            elif self.fmt == "csv":
                import pyarrow.csv as pa_csv

                with open_binary(self.path) as handle:
                    self.column_names = list(pa_csv.open_csv(handle).schema.names)
            else:
                self._scan_jsonl()

    @contextlib.contextmanager
    def _errors_named(self) -> Iterator[None]:
        import pyarrow as pa

        try:
            yield
        except (pa.ArrowException, OSError, UnicodeDecodeError, ValueError) as exc:
            if isinstance(exc, BatchRequestError):
                raise
            raise BatchRequestError(
                f"cannot read {self.fmt} file {self.path}: {type(exc).__name__}: {exc}"
            ) from exc

    def _scan_jsonl(self) -> None:
        """Columns (in first-seen order), their types over the whole file, and the unreadable lines."""
        names: dict[str, None] = {}
        block_types: dict[str, list[pa.DataType]] = {}
        block: list[dict[str, Any]] = []
        n = 0

        def flush() -> None:
            for name in names:
                block_types.setdefault(name, []).append(_column([r.get(name) for r in block]).type)
            block.clear()

        with open_binary(self.path) as handle:
            for number, line, record, reason in _jsonl_records(handle):
                if reason is not None:
                    text = line.decode("utf-8", errors="backslashreplace")
                    self.unreadable.append(UnreadableRecord(str(self.path), number, reason, text, record))
                    continue
                for key in record:
                    if key not in names:
                        names[key] = None
                        block_types.setdefault(key, [])
                block.append(record)
                n += 1
                if len(block) >= self.batch_rows:
                    flush()
            if block:
                flush()
        self.column_names = list(names)
        # Values stay what JSON says they are: a date-like string is not turned into a timestamp.
        self._jsonl_types = {name: _unify_type(block_types[name]) for name in names}
        self.num_rows = n

    def iter_batches(self, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        """The records in file order, in batches; only ``columns`` when given (all must exist)."""
        wanted = list(columns) if columns is not None else list(self.column_names)
        if self._table is not None:
            yield from self._table.select(wanted).to_batches(max_chunksize=self.batch_rows)
            return
        with self._errors_named(), open_binary(self.path) as handle:
            if self.fmt == "parquet":
                import pyarrow.parquet as pq

                # pre_buffer off: its read-ahead cache keeps the file's bytes, so RSS grew with the file.
                parquet = pq.ParquetFile(handle, pre_buffer=False)
                # One thread: each reader thread grows its own malloc arena (peak RSS, not speed).
                yield from parquet.iter_batches(batch_size=self.batch_rows, columns=wanted, use_threads=False)
            elif self.fmt == "csv":
                yield from self._csv_batches(handle, wanted)
            else:
                yield from self._jsonl_batches(handle, wanted)

    def _csv_batches(self, handle, wanted: list[str]) -> Iterator[pa.RecordBatch]:
        import pyarrow as pa
        import pyarrow.csv as pa_csv

        # CSV is text: every column a string so keys like "007" survive; empty cells are null.
        reader = pa_csv.open_csv(
            handle,
            read_options=pa_csv.ReadOptions(block_size=1 << 20),
            convert_options=pa_csv.ConvertOptions(
                column_types={name: pa.string() for name in self.column_names},
                strings_can_be_null=True,
                include_columns=wanted,
            ),
        )
        for batch in reader:
            yield from pa.Table.from_batches([batch]).to_batches(max_chunksize=self.batch_rows)

    def _jsonl_batches(self, handle, wanted: list[str]) -> Iterator[pa.RecordBatch]:
        import pyarrow as pa

        block: list[dict[str, Any]] = []

        def batch() -> pa.RecordBatch:
            arrays = [_typed_column([r.get(n) for r in block], self._jsonl_types[n]) for n in wanted]
            return pa.RecordBatch.from_arrays(arrays, names=wanted)

        for _number, _line, record, reason in _jsonl_records(handle):
            if reason is None:
                block.append(record)
                if len(block) >= self.batch_rows:
                    yield batch()
                    block = []
        if block:
            yield batch()

    def is_empty(self) -> bool:
        """Whether the source has no record (reads at most its first batch)."""
        if self.num_rows is not None:
            return self.num_rows == 0
        first = self.column_names[:1]
        return not any(b.num_rows for b in self.iter_batches(first))

    def read_all(self) -> pa.Table:
        """The whole table (for small inputs and tests; prepare streams)."""
        import pyarrow as pa

        if self._table is not None:
            return self._table
        batches = list(self.iter_batches())
        if not self.column_names:
            return pa.table({})
        if not batches:
            if self.fmt == "jsonl":
                return pa.table({n: pa.array([], type=self._jsonl_types[n]) for n in self.column_names})
            return self._empty_table()
        # A JSONL column falls back to text batch by batch; the whole column is text then.
        types = [
            _unify_type([b.schema.field(i).type for b in batches]) for i in range(len(self.column_names))
        ]
        schema = pa.schema(list(zip(self.column_names, types, strict=True)))
        return pa.Table.from_batches([_cast_batch(b, schema) for b in batches], schema=schema)

    def _empty_table(self) -> pa.Table:
        import pyarrow as pa
        import pyarrow.parquet as pq

        with self._errors_named(), open_binary(self.path) as handle:
            if self.fmt == "parquet":
                return pq.ParquetFile(handle).schema_arrow.empty_table()
        return pa.table({n: pa.array([], type=pa.string()) for n in self.column_names})


def _cast_batch(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    import pyarrow as pa

    if batch.schema == schema:
        return batch
    arrays = []
    for column, field_ in zip(batch.columns, schema, strict=True):
        if column.type == field_.type:
            arrays.append(column)
        elif pa.types.is_string(field_.type) and not pa.types.is_string(column.type):
            arrays.append(_typed_column(column.to_pylist(), pa.string()))
        else:
            arrays.append(column.cast(field_.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def read_source(
    source: str | ObjectStoragePath | pd.DataFrame | pa.Table, fmt: str | None = None
) -> tuple[pa.Table, list[UnreadableRecord]]:
    """The records of ``source`` and the lines that are not records (JSONL only; see ``UnreadableRecord``).

    Reads the whole table: prepare streams through ``SourceReader`` instead. A file that cannot be
    read at all (corrupt Parquet, unreadable CSV) raises ``BatchRequestError`` naming the file.
    """
    reader = SourceReader(source, fmt)
    return reader.read_all(), reader.unreadable


def load_table(source: str | ObjectStoragePath | pd.DataFrame | pa.Table, fmt: str | None = None) -> pa.Table:
    """An Arrow table from a DataFrame, a table, or a Parquet / CSV / JSONL file (by suffix or ``fmt``).

    Strict: a JSONL line that is not a record raises ``BatchRequestError`` (``read_source`` returns
    such lines instead, for prepare to dead-letter them).
    """
    table, unreadable = read_source(source, fmt)
    if unreadable:
        more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
        raise BatchRequestError(f"unreadable record: {unreadable[0].message}{more}")
    return table


def template_variables(template_source: str) -> set[str]:
    """The variables a prompt template reads from the record (Jinja globals such as ``range`` excluded)."""
    # jinja2: only where a template is rendered
    from jinja2 import meta

    env = _jinja_env()
    return meta.find_undeclared_variables(env.parse(template_source)) - set(env.globals)


# -- chunk files ------------------------------------------------------------------------------------


def body_size(n_requests: int, total_line_bytes: int) -> int:
    """Bytes of the POST body ``{"requests":[l1,l2,...]}`` for lines of the given total size."""
    return BODY_OVERHEAD + total_line_bytes + max(n_requests - 1, 0)


class _ChunkWriter:
    """Writes one chunk file atomically while counting requests, body bytes and the file hash."""

    def __init__(self, path: ObjectStoragePath, index: int):
        self.path = path
        self.index = index
        self.n_requests = 0
        self.line_bytes = 0
        self._hash = hashlib.sha256()
        self._cm = open_atomic_writer(path)
        self._handle = self._cm.__enter__()

    @property
    def body_bytes(self) -> int:
        return body_size(self.n_requests, self.line_bytes)

    def would_exceed(self, line: bytes, max_requests: int, max_bytes: int) -> bool:
        if self.n_requests == 0:
            return False
        return (
            self.n_requests + 1 > max_requests
            or body_size(self.n_requests + 1, self.line_bytes + len(line)) > max_bytes
        )

    def write(self, line: bytes) -> None:
        data = line + b"\n"
        self._handle.write(data)
        self._hash.update(data)
        self.n_requests += 1
        self.line_bytes += len(line)

    def close(self) -> dict[str, Any]:
        self._cm.__exit__(None, None, None)
        return {
            "index": self.index,
            "path": str(self.path),
            "n_requests": self.n_requests,
            "n_bytes": self.body_bytes,
            "fingerprint": self._hash.hexdigest(),
        }

    def abort(self, exc: BaseException) -> None:
        # The context manager removes the temp file and re-raises; the caller raises its own.
        with contextlib.suppress(BaseException):
            self._cm.__exit__(type(exc), exc, exc.__traceback__)


def _index_from_name(name: str) -> int:
    match = re.search(r"chunk-(\d+)", name)
    return int(match.group(1)) if match else -1


def write_chunk(lines: Iterable[bytes], path: PathLike, index: int | None = None) -> dict[str, Any]:
    """Write request lines (no trailing newline needed) to a chunk file atomically; returns ChunkInfo."""
    target = as_path(path)
    writer = _ChunkWriter(target, _index_from_name(target.name) if index is None else index)
    try:
        for line in lines:
            writer.write(line.rstrip(b"\r\n"))
    except BaseException as exc:
        writer.abort(exc)
        raise
    return writer.close()


def iter_chunk_lines(chunk_path: PathLike) -> Iterator[bytes]:
    """The request lines of a chunk file, without their newline, streamed."""
    with open_binary(chunk_path) as handle:
        for raw in handle:
            line = raw.rstrip(b"\r\n")
            if line:
                yield line


def iter_chunk_requests(chunk_path: PathLike) -> Iterator[dict[str, Any]]:
    """The requests (``{"custom_id", "params"}`` dicts) of a chunk file, streamed."""
    for line in iter_chunk_lines(chunk_path):
        yield json.loads(line)


class BatchBody:
    """The streamed POST body ``{"requests":[...]}`` of a chunk file.

    Re-iterable: each ``iter()`` reopens the file, so an HTTP retry can send the body again.
    Never holds more than about ``block_size`` bytes (plus one line) in memory.
    """

    def __init__(self, chunk_path: PathLike, block_size: int = 1 << 20):
        self.path = as_path(chunk_path)
        self.block_size = block_size

    def __iter__(self) -> Iterator[bytes]:
        buf = bytearray(BODY_PREFIX)
        first = True
        for line in iter_chunk_lines(self.path):
            if not first:
                buf += b","
            buf += line
            first = False
            if len(buf) >= self.block_size:
                yield bytes(buf)
                buf.clear()
        buf += BODY_SUFFIX
        yield bytes(buf)

    @property
    def n_bytes(self) -> int:
        """Exact body length (for a Content-Length header), from one pass over the file."""
        n = total = 0
        for line in iter_chunk_lines(self.path):
            n += 1
            total += len(line)
        return body_size(n, total)


def iter_batch_body(chunk_path: PathLike, block_size: int = 1 << 20) -> BatchBody:
    """The streamed, re-iterable POST body of a chunk file (see ``BatchBody``)."""
    return BatchBody(chunk_path, block_size)


# -- prepare ----------------------------------------------------------------------------------------


def _params_serializer(base_params: Mapping[str, Any]):
    """prompt -> canonical JSON of ``{**base_params, "messages": [user prompt]}``.

    The shared part (model, system, schema...) is serialised once; per record only the message is.
    Canonical JSON sorts keys, so "messages" is spliced in at its sorted place: byte-identical to
    ``canonical_json`` of the whole dict, at a fraction of the cost.
    """
    parts = [
        (k, json.dumps(k, ensure_ascii=False) + ":" + canonical_json(v))
        for k, v in sorted(base_params.items())
    ]
    before = ",".join(p for k, p in parts if k < "messages")
    after = ",".join(p for k, p in parts if k > "messages")
    head = "{" + before + ("," if before else "") + '"messages":'
    tail = ("," + after if after else "") + "}"

    head += '[{"content":'
    tail = ',"role":"user"}]' + tail
    # = canonical_json([{"content": prompt, "role": "user"}]) spliced in; the C string encoder that
    # json.dumps(ensure_ascii=False) ends in, without building an encoder per record.
    encode = json.encoder.encode_basestring

    def serialise(prompt: str) -> str:
        return head + encode(prompt) + tail

    return serialise


def _record_json(record: Mapping[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)


def _remove_stale_chunks(requests_dir: ObjectStoragePath, n_chunks: int) -> None:
    if not requests_dir.exists():
        return
    for path in requests_dir.iterdir():
        if re.fullmatch(r"chunk-\d+\.jsonl", path.name) and _index_from_name(path.name) >= n_chunks:
            path.unlink()


def _unreadable_rejects(
    unreadable: Sequence[UnreadableRecord], key_columns: Sequence[str], schema: pa.Schema
) -> pa.Table:
    """Dead-letter rows (stage prepare) for source lines that are not records: file, line, reason."""
    # pyarrow/numpy: kept out of DAG parsing
    import pyarrow as pa

    rows = []
    for item in unreadable:
        salvaged = item.record or {}
        rows.append(
            {
                **{k: _key_str(salvaged.get(k)) for k in key_columns},
                "custom_id": None,
                "stage": PREPARE_STAGE,
                "status": REJECTED_STATUS,
                "error_type": REJECT_UNREADABLE,
                "reason": item.message,
                "attempts": 0,
                "last_batch_id": None,
                "record_json": json.dumps(
                    {"source": item.source, "line": item.line, "raw": item.raw}, ensure_ascii=False
                ),
            }
        )
    return pa.Table.from_pylist(rows, schema=schema)


def prepare_requests(
    table: pa.Table | SourceReader,
    key_columns: Sequence[str],
    spec: RequestSpec,
    out_dir: PathLike,
    *,
    max_requests_per_chunk: int = MAX_REQUESTS_PER_BATCH,
    max_bytes_per_chunk: int = DEFAULT_MAX_BYTES_PER_CHUNK,
    max_request_bytes: int | None = None,
    extra_manifest: Mapping[str, Any] | None = None,
    unreadable: Sequence[UnreadableRecord] = (),
    template_name: str | None = None,
) -> dict[str, Any]:
    """Render, validate and write the requests of ``table`` under ``out_dir`` (the run's work_dir).

    ``table`` is a table or a ``SourceReader``: a reader is streamed (its key columns once for the
    duplicate check, then its records batch by batch), so memory holds one batch and the open
    chunk's bookkeeping, whatever the size of the source; its unreadable lines are rejected too.
    Returns the manifest (also written to ``requests/manifest.json``). Raises ``BatchRequestError``
    for a bad spec, missing key columns or a template variable the input has no column for; bad
    *records* are rejected into ``rejected.parquet``, and so are the ``unreadable`` source lines.
    ``template_name`` names the prompt template in errors (default: "the prompt template").
    """
    # pyarrow/numpy: kept out of DAG parsing; loads pyarrow: kept out of DAG parsing
    import pyarrow as pa
    import pyarrow.parquet as pq

    from anthropic_batch.table_schemas import dead_letter_schema

    warnings = spec.validate()
    key_columns = list(key_columns)
    if not key_columns:
        raise BatchRequestError("key_columns must name at least one column")
    source = table if isinstance(table, SourceReader) else SourceReader(table)
    unreadable = [*source.unreadable, *unreadable]
    missing = [k for k in key_columns if k not in source.column_names]
    # No readable record (an empty file, or every line unreadable): nothing to check against.
    empty = source.is_empty() if missing else None
    if missing and not empty:
        raise BatchRequestError(f"key columns {missing} not in the input (columns: {source.column_names})")
    if not 1 <= max_requests_per_chunk <= MAX_REQUESTS_PER_BATCH:
        raise BatchRequestError(f"max_requests_per_chunk must be 1..{MAX_REQUESTS_PER_BATCH}")
    if not BODY_OVERHEAD < max_bytes_per_chunk <= MAX_BATCH_BYTES:
        raise BatchRequestError(f"max_bytes_per_chunk must be at most {MAX_BATCH_BYTES} bytes")
    absent = sorted(template_variables(spec.prompt_template) - set(source.column_names))
    if absent and not (empty if empty is not None else source.is_empty()):
        # A misspelt variable would otherwise make every record a template error: a "successful"
        # run that publishes nothing. It is a mistake in the pipeline, not in the data.
        raise BatchRequestError(
            f"{template_name or 'the prompt template'} uses {', '.join(absent)}, which the input "
            f"does not have (its columns: {', '.join(source.column_names)})"
        )
    # The configured per-request limit (or the chunk size), as named in messages; a request must fit
    # in a batch body of its own, so its line gets BODY_OVERHEAD bytes less.
    request_limit = min(max_request_bytes or max_bytes_per_chunk, max_bytes_per_chunk)
    request_limit_name = "max_request_bytes" if max_request_bytes else "max_bytes_per_chunk"

    work = as_path(out_dir)
    requests_dir = layout.requests_dir(work)
    template = _jinja_env().from_string(spec.prompt_template)
    params_json_for = _params_serializer(spec.base_params())

    # Pass 1 (keys only): how many records share each record's custom_id and keys, to reject whole
    # duplicate groups; by row position, in bounded memory (duplicate_keys.py).
    from anthropic_batch.duplicate_keys import duplicate_counts

    def key_batches() -> Iterator[pa.RecordBatch]:
        return iter(()) if missing else source.iter_batches(key_columns)

    dup_counts = duplicate_counts(key_batches, key_columns, custom_id_base, _key_str, n_rows=source.num_rows)

    keys_schema = pa.schema(
        [("custom_id", pa.string())]
        + [(k, pa.string()) for k in key_columns]
        + [("request_fingerprint", pa.string()), ("chunk_index", pa.int32())]
    )
    dl_schema = dead_letter_schema(key_columns)
    chunks: list[dict[str, Any]] = []
    writer: _ChunkWriter | None = None
    n_requests = n_rejected = n_input = 0

    with (
        open_atomic_writer(layout.keys_path(work)) as keys_handle,
        pq.ParquetWriter(keys_handle, keys_schema) as keys_writer,
        open_atomic_writer(layout.rejected_path(work)) as rej_handle,
        pq.ParquetWriter(rej_handle, dl_schema) as rej_writer,
    ):
        try:
            for batch in () if missing else source.iter_batches():
                batch_id_counts, batch_key_counts = dup_counts.slice(n_input, n_input + batch.num_rows)
                keys_rows: dict[str, list[Any]] = {name: [] for name in keys_schema.names}

                def flush_keys(keys_rows=keys_rows) -> None:
                    # Row groups never span two chunks, so collect reads only its chunk's (read_keys).
                    if keys_rows["custom_id"]:
                        keys_writer.write_table(pa.table(keys_rows, schema=keys_schema))
                        for values in keys_rows.values():
                            values.clear()

                rej_rows: dict[str, list[Any]] = {name: [] for name in dl_schema.names}

                def reject(record, keys, custom_id, error_type, reason, rej_rows=rej_rows):
                    for k, v in zip(key_columns, keys, strict=True):
                        rej_rows[k].append(v)
                    rej_rows["custom_id"].append(custom_id)
                    rej_rows["stage"].append(PREPARE_STAGE)
                    rej_rows["status"].append(REJECTED_STATUS)
                    rej_rows["error_type"].append(error_type)
                    rej_rows["reason"].append(reason)
                    rej_rows["attempts"].append(0)
                    rej_rows["last_batch_id"].append(None)
                    rej_rows["record_json"].append(_record_json(record))

                for row, record in enumerate(batch.to_pylist()):
                    n_input += 1
                    keys = tuple(_key_str(record.get(k)) for k in key_columns)
                    if None in keys:
                        nulls = [k for k, v in zip(key_columns, keys, strict=True) if v is None]
                        reject(
                            record, keys, None, REJECT_NULL_KEY, f"key column(s) {nulls} are null or blank"
                        )
                        continue
                    # The base until the request is rendered: rejects before that have no request.
                    custom_id = custom_id_base(keys)
                    if batch_id_counts[row] > 1:
                        if batch_key_counts[row] > 1:
                            reject(
                                record,
                                keys,
                                custom_id,
                                REJECT_DUPLICATE_KEY,
                                f"{batch_key_counts[row]} records share this key; all are rejected",
                            )
                        else:
                            reject(
                                record,
                                keys,
                                custom_id,
                                REJECT_CUSTOM_ID_COLLISION,
                                f"custom_id {custom_id!r} is produced by different keys",
                            )
                        continue
                    try:
                        prompt = template.render(record)
                    except Exception as exc:
                        reject(record, keys, custom_id, REJECT_TEMPLATE, f"{type(exc).__name__}: {exc}")
                        continue
                    if not prompt.strip():
                        reject(record, keys, custom_id, REJECT_EMPTY_PROMPT, "the rendered prompt is empty")
                        continue
                    params_json = params_json_for(prompt)
                    request_fingerprint = sha256_hex(params_json)
                    # = make_custom_id(keys, request_fingerprint), from the base already made; its
                    # characters need no JSON escaping.
                    custom_id = f"{custom_id}-{request_fingerprint[:REQUEST_DIGEST_LEN]}"
                    line = ('{"custom_id":"' + custom_id + '","params":' + params_json + "}").encode()
                    if len(line) + BODY_OVERHEAD > request_limit:
                        reject(
                            record,
                            keys,
                            custom_id,
                            REJECT_TOO_LARGE,
                            f"request is {len(line) + BODY_OVERHEAD} bytes as a batch body; the limit is "
                            f"{request_limit} bytes ({request_limit_name})",
                        )
                        continue
                    if writer is not None and writer.would_exceed(
                        line, max_requests_per_chunk, max_bytes_per_chunk
                    ):
                        chunks.append(writer.close())
                        writer = None
                        flush_keys()
                    if writer is None:
                        writer = _ChunkWriter(requests_dir / chunk_name(len(chunks)), len(chunks))
                    writer.write(line)
                    n_requests += 1
                    keys_rows["custom_id"].append(custom_id)
                    for k, v in zip(key_columns, keys, strict=True):
                        keys_rows[k].append(v)
                    keys_rows["request_fingerprint"].append(request_fingerprint)
                    keys_rows["chunk_index"].append(writer.index)

                flush_keys()
                rej_writer.write_table(pa.table(rej_rows, schema=dl_schema))
                n_rejected += len(rej_rows["stage"])
            if writer is not None:
                chunks.append(writer.close())
                writer = None
            if unreadable:
                rej_writer.write_table(_unreadable_rejects(unreadable, key_columns, dl_schema))
                n_input += len(unreadable)
                n_rejected += len(unreadable)
        except BaseException as exc:
            if writer is not None:
                writer.abort(exc)
            raise

    _remove_stale_chunks(requests_dir, len(chunks))
    extra = dict(extra_manifest or {})
    spec_extra = extra.pop("spec", {}) or {}
    spec_fingerprint = spec.fingerprint()
    manifest: dict[str, Any] = {
        "chunks": chunks,
        "n_requests": n_requests,
        "n_rejected": n_rejected,
        "n_input_records": n_input,
        "spec_fingerprint": spec_fingerprint,
        "spec": {
            "pipeline": None,
            "partition": None,
            "model": spec.model,
            "max_tokens": spec.max_tokens,
            "output_model": spec.output_model_ref,
            "output_mode": spec.output_mode if spec.output_model is not None else None,
            "include_dir": None,
            "key_columns": key_columns,
            "api_version": spec.api_version,
            "cache_ttl": spec.cache_ttl,
            "spec_fingerprint": spec_fingerprint,
            **spec_extra,
        },
        "mode": "batch",
        "keys_path": str(layout.keys_path(work)),
        "rejected_path": str(layout.rejected_path(work)),
        "warnings": warnings,
        "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **extra,
    }
    atomic_write_json(layout.manifest_path(work), manifest)
    return manifest


def read_keys(
    work: PathLike, chunk_indices: Iterable[int] | None = None, *, columns: Sequence[str] | None = None
) -> pa.Table:
    """The rows of ``keys.parquet`` (all, or those of ``chunk_indices``), in file order.

    For chunks, only the row groups whose ``chunk_index`` statistics can hold one of them are read:
    prepare writes a row group per chunk at most (never one spanning two), so a chunk's collect
    reads its own keys, not the day's. A file laid out otherwise (re-packed after answer reuse) is
    still read correctly, row groups are then only skipped less.
    """
    # pyarrow: kept out of DAG parsing
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    with open_binary(layout.keys_path(work)) as handle:
        parquet = pq.ParquetFile(handle)
        wanted_columns = list(columns) if columns is not None else None
        if chunk_indices is None:
            return parquet.read(columns=wanted_columns, use_threads=False)
        wanted = sorted({int(i) for i in chunk_indices})
        at = parquet.schema_arrow.get_field_index("chunk_index")
        groups = []
        for g in range(parquet.metadata.num_row_groups):
            stats = parquet.metadata.row_group(g).column(at).statistics
            if stats is None or not stats.has_min_max or any(stats.min <= i <= stats.max for i in wanted):
                groups.append(g)
        read_columns = (
            None if wanted_columns is None else list(dict.fromkeys([*wanted_columns, "chunk_index"]))
        )
        table = parquet.read_row_groups(groups, columns=read_columns, use_threads=False)
    mask = pc.is_in(table.column("chunk_index"), pa.array(wanted, pa.int32()))
    table = table.filter(mask)
    return table if wanted_columns is None else table.select(wanted_columns)


# read_manifest: see layout.read_manifest (re-exported above).
