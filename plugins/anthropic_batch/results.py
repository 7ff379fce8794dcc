"""Result lines -> rows: the fast parser, the Parquet writer, failure classification and merging.

The results of a 100,000-request batch are ~100 MB of JSONL. Building the SDK's pydantic objects
for every line (what ``client.messages.batches.results()`` does) costs far more than the parse, so
this module decodes the raw bytes with ``msgspec`` (an Airflow dependency) straight into small
typed structs that hold only the fields a row needs, validates structured output on its JSON text
with pydantic-core, and appends to Arrow column lists flushed once per row group.

``output_json`` holds a valid answer as the model wrote it (guaranteed to validate against the
output model; not re-serialised, which would cost as much again as validating). Readers that want
the model's defaults and coercions apply ``Model.model_validate_json(output_json)``.

Memory: the request keys stay in Arrow columns behind one custom_id -> row dict (``KeyIndex``);
collecting into a local file does not import Airflow (``storage`` is imported for object-store URLs
only), and Arrow buffers come from the system allocator while collecting (see
``_system_allocator``). ``make bench`` (``benchmarks/bench_collect.py``) measures all of this.

No process-wide switch outlives our own work: the allocator swap and the GC pause (``_our_work``)
are entered only around this module's CPU loops and restored after each; the result lines are
pulled from their source (the SDK's download, a file) in blocks between them, so code that is not
ours (the HTTP client, Airflow, the worker's other threads between blocks) runs under the process's
own settings.

A line that does not decode is never fatal: it is counted (and becomes an ``errored`` row with
``error_type = "malformed_result"`` when its custom_id can still be read). Unknown custom_ids are
counted and reported, not written. A custom_id seen twice (e.g. a resumed download) counts once.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import math
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ValidationError

from anthropic_batch import layout, storage
from anthropic_batch.contracts import Manifest
from anthropic_batch.errors import AnthropicBatchError
from anthropic_batch.output_models import format_validation_error, load_output_model, output_tool_name
from anthropic_batch.pricing import PriceTable, UnknownModelError, load_price_table
from anthropic_batch.status import (
    FATAL_ERROR_TYPES,
    RETRIABLE_ERROR_TYPES,
    USER_CANCELED_ERROR_TYPE,
    FailureClass,
    RequestStatus,
    ResultType,
)
from anthropic_batch.table_schemas import (  # noqa: F401  (re-exported: results' readers import them here)
    DEAD_LETTER_SCHEMA,
    OUTCOME_COLUMNS,
    RESULT_SCHEMA,
    dead_letter_schema,
    result_schema,
)

if TYPE_CHECKING:
    from anthropic_batch.storage import PathLike


@contextlib.contextmanager
def _system_allocator() -> Iterator[None]:
    """Arrow allocations in this block use the system allocator, not pyarrow's default (mimalloc).

    mimalloc commits its arenas eagerly and keeps what it frees: collecting 100k results through it
    peaked ~45 MB higher for the same speed. The pool is process-wide, so it is swapped only for the
    block; buffers remember their pool, so arrays from either side stay valid.
    """
    previous = pa.default_memory_pool()
    system = pa.system_memory_pool()
    if previous.backend_name == system.backend_name:
        yield
        return
    pa.set_memory_pool(system)
    try:
        yield
    finally:
        pa.set_memory_pool(previous)


# -- classification ---------------------------------------------------------------------------------

# RETRIABLE_ERROR_TYPES / FATAL_ERROR_TYPES live in status.py (imported above, re-exported here).
_RETRIABLE_STATUSES = frozenset(
    s.value
    for s in (
        RequestStatus.EXPIRED,
        RequestStatus.CANCELED,
        RequestStatus.MISSING,
        RequestStatus.INVALID_OUTPUT,
    )
)


def classify_failure(
    status: str | RequestStatus,
    error_type: str | None = None,
    stop_reason: str | None = None,
    *,
    retry_truncated: bool = True,
) -> FailureClass | None:
    """What to do with a row: ``None`` when it succeeded (and was not truncated).

    Retriable: expired, canceled, missing, invalid_output, errored with api/overloaded/rate-limit
    errors, and a succeeded answer cut off at ``max_tokens``. Fatal: authentication, permission,
    billing. Permanent: everything else (invalid_request_error, needs_followup, unknown types).
    With ``retry_truncated=False`` nothing cut off at ``max_tokens`` is retried: a succeeded one
    is final as it is, an invalid one is permanent. ``failure_codes`` is the vectorised twin.
    """
    status = str(status.value if isinstance(status, RequestStatus) else status)
    truncated = stop_reason == "max_tokens"
    if status == RequestStatus.SUCCEEDED:
        return FailureClass.RETRIABLE if truncated and retry_truncated else None
    if truncated and not retry_truncated:
        return FailureClass.PERMANENT
    if status == RequestStatus.CANCELED and error_type == USER_CANCELED_ERROR_TYPE:
        return FailureClass.PERMANENT  # a user's explicit Cancel: never paid for again
    if status in _RETRIABLE_STATUSES:
        return FailureClass.RETRIABLE
    if status == RequestStatus.ERRORED:
        if error_type in RETRIABLE_ERROR_TYPES:
            return FailureClass.RETRIABLE
        if error_type in FATAL_ERROR_TYPES:
            return FailureClass.FATAL
    return FailureClass.PERMANENT


# -- fast decoding ----------------------------------------------------------------------------------


class _CacheCreation(msgspec.Struct, gc=False):
    ephemeral_5m_input_tokens: int = 0
    ephemeral_1h_input_tokens: int = 0


class _Usage(msgspec.Struct, gc=False):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    cache_creation: _CacheCreation | None = None


class _Block(msgspec.Struct, gc=False):
    type: str
    text: str | None = None
    name: str | None = None
    input: msgspec.Raw = msgspec.Raw()  # kept as raw JSON bytes: validated by pydantic-core directly


class _Message(msgspec.Struct, gc=False):
    model: str | None = None
    content: list[_Block] = []
    stop_reason: str | None = None
    usage: _Usage | None = None


class _ErrorBody(msgspec.Struct, gc=False):
    type: str | None = None
    message: str | None = None


class _ErrorResponse(msgspec.Struct, gc=False):
    type: str | None = None
    error: _ErrorBody | None = None


class _Result(msgspec.Struct, gc=False):
    type: str
    message: _Message | None = None
    error: _ErrorResponse | None = None


class _Line(msgspec.Struct, gc=False):
    custom_id: str
    result: _Result


class _IdOnly(msgspec.Struct, gc=False):
    custom_id: str


_decode_line = msgspec.json.Decoder(_Line, strict=False).decode
_decode_id = msgspec.json.Decoder(_IdOnly, strict=False).decode


class MalformedResultLine(AnthropicBatchError, ValueError):
    """A result line that does not have the documented shape."""


def custom_id_of_line(line: bytes) -> str | None:
    """The custom_id of a result (or request) line, or None when unreadable."""
    try:
        return _decode_id(line).custom_id
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _one_chunk(column: pa.ChunkedArray) -> pa.Array:
    if column.num_chunks == 1:
        return column.chunk(0)
    return pa.concat_arrays(column.chunks) if column.num_chunks else pa.array([], column.type)


# -- keys -------------------------------------------------------------------------------------------

_KeyEntry = tuple[tuple[str | None, ...], str | None]


class KeyIndex(Mapping[str, _KeyEntry]):
    """custom_id -> (key values as strings, request_fingerprint), for the prepared requests.

    A read-only mapping kept compact: the values stay in Arrow columns (``table``: custom_id, the key
    columns, request_fingerprint) and Python holds one dict custom_id -> row number (``rows``),
    ~130 bytes a request instead of ~450 for a dict of tuples of str. ``collect_lines`` takes the key
    columns of a whole row group at once (``take``) instead of carrying them per row.
    """

    def __init__(self, table: pa.Table, key_columns: Sequence[str]) -> None:
        self.key_columns = list(key_columns)
        n = table.num_rows
        names = ["custom_id", *self.key_columns, "request_fingerprint"]
        columns = [
            table.column(name).cast(pa.string()) if name in table.column_names else pa.nulls(n, pa.string())
            for name in names
        ]
        self.table = pa.Table.from_arrays(columns, names=names).combine_chunks()
        # A custom_id listed twice keeps its last row (as a dict built from the rows would).
        self.rows: dict[str, int] = dict(
            zip(self.table.column("custom_id").to_pylist(), range(n), strict=True)
        )
        self._columns = [_one_chunk(column) for column in self.table.columns]

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, _KeyEntry], key_columns: Sequence[str]) -> KeyIndex:
        """An index from a plain ``{custom_id: (key values, fingerprint)}`` mapping."""
        key_columns = list(key_columns)
        ids = list(mapping)
        data: dict[str, list[Any]] = {"custom_id": ids}
        for i, name in enumerate(key_columns):
            data[name] = [mapping[cid][0][i] for cid in ids]
        data["request_fingerprint"] = [mapping[cid][1] for cid in ids]
        return cls(pa.table({k: pa.array(v, pa.string()) for k, v in data.items()}), key_columns)

    def __getitem__(self, custom_id: str) -> _KeyEntry:
        row = self.rows[custom_id]
        values = tuple(column[row].as_py() for column in self._columns[1:-1])
        return values, self._columns[-1][row].as_py()

    def __iter__(self) -> Iterator[str]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, custom_id: object) -> bool:
        return custom_id in self.rows

    def take(self, rows: pa.Array) -> list[pa.Array]:
        """custom_id, key columns and request_fingerprint arrays for ``rows`` (row numbers)."""
        return [column.take(rows) for column in self._columns]


def _read_keys_of(work_dir: PathLike, custom_ids: Iterable[str]) -> pa.Table:
    """The rows of ``keys.parquet`` whose custom_id is one of ``custom_ids``, in file order.

    For a retry chunk, whose requests come from any prepared chunk: the file is filtered one row
    group at a time (Arrow's own I/O), so memory is a row group plus the matches, not the day's keys.
    """
    wanted = pa.array(sorted(custom_ids), pa.string())
    parts = [
        batch.filter(pc.is_in(batch.column("custom_id").cast(pa.string()), value_set=wanted))
        for batch in _iter_parquet_batches(layout.keys_path(work_dir), None, 100_000)
    ]
    return pa.Table.from_batches(parts) if parts else pa.table({"custom_id": pa.array([], pa.string())})


# -- parse context ----------------------------------------------------------------------------------


@dataclass
class ParseContext:
    """What turning result lines into rows needs besides the lines."""

    key_columns: list[str]
    # custom_id -> (key values as strings, request_fingerprint); any mapping is turned into a KeyIndex.
    keys: Mapping[str, _KeyEntry]
    output_model: type[BaseModel] | None = None
    output_mode: str | None = None
    prices: PriceTable = field(default_factory=load_price_table)
    batch_id: str | None = None
    attempt: int = 1
    cache_ttl: str = "1h"
    default_model: str | None = None  # priced when a message's model id is not in the table
    tool_name: str | None = None
    # "canceled by <user>" when a user canceled this batch (cancel.py): its canceled rows carry it.
    user_cancel_reason: str | None = None
    _rates: dict[str | None, tuple[float, ...]] = field(default_factory=dict, repr=False)
    _discount: float = field(default=0.5, init=False, repr=False)
    _row_fn: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.keys, KeyIndex) or self.keys.key_columns != list(self.key_columns):
            self.keys = KeyIndex.from_mapping(self.keys, self.key_columns)
        self._discount = float(self.prices.batch_discount)
        if self.output_model is not None:
            self.output_mode = self.output_mode or "json_schema"
            if self.output_mode == "tool" and self.tool_name is None:
                self.tool_name = output_tool_name(self.output_model)
        else:
            self.output_mode = None
        if self.default_model is not None:
            self.prices.price(self.default_model)  # fail now, not mid-stream, when it has no price

    @classmethod
    def from_keys_table(cls, keys: pa.Table, key_columns: Sequence[str], **kwargs: Any) -> ParseContext:
        """A context from a keys table (``requests/keys.parquet`` layout)."""
        key_columns = list(key_columns)
        with _system_allocator():
            index = KeyIndex(keys, key_columns)
        return cls(key_columns=key_columns, keys=index, **kwargs)

    @classmethod
    def from_work_dir(
        cls,
        work_dir: PathLike,
        *,
        batch_id: str | None = None,
        attempt: int = 1,
        chunk_indices: Iterable[int] | None = None,
        custom_ids: Iterable[str] | None = None,
        prices: PriceTable | None = None,
        include_dir: str | None = None,
        manifest: Manifest | None = None,
        user_cancel_reason: str | None = None,
    ) -> ParseContext:
        """A context from a prepared work dir: its manifest (spec) and ``requests/keys.parquet``.

        ``chunk_indices`` limits the loaded keys to those chunks (less memory for one batch);
        ``custom_ids`` (when ``chunk_indices`` is not given) to those requests: a retry chunk's, whose
        requests come from any prepared chunk.
        """
        if manifest is None:
            manifest = layout.read_manifest(work_dir)
        spec = manifest.spec
        key_columns = list(spec.key_columns)
        ref = spec.output_model
        output_model = load_output_model(ref, include_dir or spec.include_dir) if ref else None
        with _system_allocator():
            # batch_requests loads Jinja: only on this path
            from anthropic_batch.batch_requests import read_keys

            # Only the chunk's row groups (or requests) are kept, not the day's keys.
            if chunk_indices is None and custom_ids is not None:
                keys = _read_keys_of(work_dir, custom_ids)
            else:
                keys = read_keys(work_dir, chunk_indices)
            index = KeyIndex(keys, key_columns)
            del keys
        return cls(
            key_columns=key_columns,
            keys=index,
            output_model=output_model,
            output_mode=spec.output_mode,
            user_cancel_reason=user_cancel_reason,
            prices=prices or load_price_table(),
            batch_id=batch_id,
            attempt=attempt,
            cache_ttl=spec.cache_ttl or "1h",
            default_model=spec.model,
        )

    def rates(self, model: str | None) -> tuple[float, ...]:
        cached = self._rates.get(model)
        if cached is None:
            try:
                cached = self.prices.rates(model) if model else self.prices.rates(self.default_model or "")
            except UnknownModelError:
                if self.default_model is None or model == self.default_model:
                    raise
                cached = self.prices.rates(self.default_model)
            self._rates[model] = cached
        return cached


# -- line -> row ------------------------------------------------------------------------------------

# Row tuple order: OUTCOME_COLUMNS without batch_id, attempt, request_fingerprint (added by the caller).
_TUPLE_COLUMNS = OUTCOME_COLUMNS[:-3]  # everything except batch_id, attempt, request_fingerprint
_NO_USAGE = (None, None, None, None, 0.0, 0.0)


# Plain-str statuses for the per-line hot path (a module global is cheaper than an enum attribute).
_SUCCEEDED: str = RequestStatus.SUCCEEDED.value
_ERRORED: str = RequestStatus.ERRORED.value
_NEEDS_FOLLOWUP: str = RequestStatus.NEEDS_FOLLOWUP.value
_INVALID_OUTPUT: str = RequestStatus.INVALID_OUTPUT.value


def _row_builder(ctx: ParseContext):
    """A function decoded line -> row tuple, specialised for ``ctx`` (everything bound as locals).

    This runs once per result line, so the per-context decisions are taken here, once.
    """
    model = ctx.output_model
    mode = ctx.output_mode
    tool_mode = mode == "tool"
    tool_name = ctx.tool_name
    validator = model.__pydantic_validator__ if model is not None else None
    cache_1h = ctx.cache_ttl == "1h"
    discount = ctx._discount
    default_model = ctx.default_model
    user_cancel_reason = ctx.user_cancel_reason
    rates_for = ctx.rates
    rates_cache: dict[str | None, tuple[float, ...]] = {}
    no_usage = _NO_USAGE

    validate_json = validator.validate_json if validator is not None else None
    invalid = format_validation_error

    def build(line: _Line) -> tuple:
        # One function per line, the succeeded case inline: this runs 100,000 times per batch.
        result = line.result
        msg = result.message
        if msg is None or result.type != _SUCCEEDED:
            return other(result)
        content = msg.content
        stop = msg.stop_reason
        forced_input = None
        foreign_tool = None
        if len(content) == 1 and content[0].type == "text":
            text = content[0].text or ""
        else:
            texts = []
            for block in content:
                kind = block.type
                if kind == "text":
                    if block.text:
                        texts.append(block.text)
                elif kind == "tool_use":
                    if tool_mode and forced_input is None and block.name == tool_name:
                        forced_input = block.input
                    elif foreign_tool is None:
                        foreign_tool = block.name or "?"
            text = "".join(texts)
        status = _SUCCEEDED
        error_type = error_message = output_json = None
        if stop == "pause_turn":
            status, error_type, error_message = _NEEDS_FOLLOWUP, "pause_turn", "the model paused its turn"
        elif foreign_tool is not None or (stop == "tool_use" and forced_input is None):
            status, error_type = _NEEDS_FOLLOWUP, "tool_use"
            error_message = f"the model asked for tool {foreign_tool!r}; a batch cannot continue a tool loop"
        elif validator is not None:
            if tool_mode:
                if forced_input is None or not len(forced_input):
                    error_message = f"no {tool_name} tool_use block in the answer"
                else:
                    answer = bytes(forced_input)
                    try:
                        validate_json(answer)
                        output_json = answer
                    except ValidationError as exc:
                        error_message = invalid(exc)
            elif not text or text.isspace():
                error_message = "empty answer where JSON was expected"
            else:
                # pydantic-core's validator on the JSON text itself (model_validate_json without the
                # wrapper). A valid answer is stored as written, not re-serialised: output_json is
                # guaranteed to validate, and model_dump_json would cost as much again as the
                # validation for a form no reader needs (readers json.loads it;
                # Model.model_validate_json(output_json) gives the defaults and coercions).
                try:
                    validate_json(text)
                    output_json = text
                except ValidationError as exc:
                    error_message = invalid(exc)
            if output_json is None:
                status, error_type = _INVALID_OUTPUT, "validation_error"
                if stop == "max_tokens":
                    error_message = f"answer truncated at max_tokens; {error_message}"
        model_id = msg.model or default_model
        usage = msg.usage
        if usage is None:
            return (status, error_type, error_message, text, output_json, stop, model_id, *no_usage)
        rates = rates_cache.get(model_id)
        if rates is None:
            rates = rates_cache[model_id] = rates_for(model_id)
        inp = usage.input_tokens
        out = usage.output_tokens
        write = usage.cache_creation_input_tokens
        read = usage.cache_read_input_tokens
        sync = (inp or 0) * rates[0] + (out or 0) * rates[1] + (read or 0) * rates[4]
        if write:
            cc = usage.cache_creation
            if cc is not None and (cc.ephemeral_5m_input_tokens or cc.ephemeral_1h_input_tokens):
                # The response says which TTL each written token used: trust it over the request's.
                sync += cc.ephemeral_5m_input_tokens * rates[2] + cc.ephemeral_1h_input_tokens * rates[3]
            else:
                sync += write * (rates[3] if cache_1h else rates[2])
        return (
            status, error_type, error_message, text, output_json, stop, model_id,
            inp, out, write, read, sync * discount, sync,
        )  # fmt: skip

    def other(result: _Result) -> tuple:
        kind = result.type
        if kind == _ERRORED:
            err = result.error
            body = err.error if err is not None else None
            error_type = (body.type if body is not None else None) or (err.type if err is not None else None)
            message = body.message if body is not None else None
            return (_ERRORED, error_type, message, None, None, None, default_model, *no_usage)
        if kind == ResultType.CANCELED and user_cancel_reason:
            reason = user_cancel_reason
            return (kind, USER_CANCELED_ERROR_TYPE, reason, None, None, None, default_model, *no_usage)
        if kind in (ResultType.CANCELED, ResultType.EXPIRED):
            return (kind, None, None, None, None, None, default_model, *no_usage)
        reason = f"result type {kind!r} is not documented"
        return (_ERRORED, "unknown_result_type", reason, None, None, None, default_model, *no_usage)

    return build


def _row_tuple(line: _Line, ctx: ParseContext) -> tuple:
    build = ctx._row_fn
    if build is None:
        build = ctx._row_fn = _row_builder(ctx)
    return build(line)


def _malformed_tuple(ctx: ParseContext, reason: str) -> tuple:
    return (_ERRORED, "malformed_result", reason[:2000], None, None, None, ctx.default_model, *_NO_USAGE)


def parse_result_line(line: bytes | str, ctx: ParseContext) -> dict[str, Any]:
    """One result line -> one RESULT row (a dict). Raises ``MalformedResultLine`` if undecodable."""
    if isinstance(line, str):
        line = line.encode("utf-8")
    try:
        decoded = _decode_line(line)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MalformedResultLine(f"undecodable result line: {exc}") from exc
    keys, fingerprint = ctx.keys.get(decoded.custom_id, ((None,) * len(ctx.key_columns), None))
    row: dict[str, Any] = {"custom_id": decoded.custom_id}
    row.update(zip(ctx.key_columns, keys, strict=True))
    row.update(zip(_TUPLE_COLUMNS, _row_tuple(decoded, ctx), strict=True))
    if isinstance(row["output_json"], bytes):
        row["output_json"] = row["output_json"].decode("utf-8")
    row["batch_id"] = ctx.batch_id
    row["attempt"] = ctx.attempt
    row["request_fingerprint"] = fingerprint
    return row


# -- collect ----------------------------------------------------------------------------------------

_SAMPLE = 20
_CONVERT_EVERY = 2_000
# Dictionary encoding only pays for the low-cardinality columns; long texts are written plain.
_DICTIONARY_COLUMNS = ["status", "error_type", "stop_reason", "model", "batch_id", "attempt"]
_WRITER_OPTIONS: dict[str, Any] = {"use_dictionary": _DICTIONARY_COLUMNS, "compression": "snappy"}


@dataclass
class CollectStats:
    """What ``collect_lines`` saw and wrote."""

    out_path: str
    n_lines: int = 0
    n_rows: int = 0
    n_duplicates: int = 0
    n_unknown: int = 0
    n_malformed: int = 0
    n_missing: int = 0
    counts_by_status: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(
        default_factory=lambda: {"input": 0, "output": 0, "cache_creation": 0, "cache_read": 0}
    )
    cost_usd: float = 0.0
    sync_cost_usd: float = 0.0
    unknown_custom_ids: list[str] = field(default_factory=list)
    malformed_samples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def _our_work() -> Iterator[None]:
    """Our CPU loop's settings (GC paused, system allocator), restored on exit: enter it only
    around our own code, never while pulling from a source that is not ours."""
    with _gc_paused(), _system_allocator():
        yield


def _blocks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """``items`` in lists of up to ``size``, pulled outside :func:`_our_work`."""
    iterator = iter(items)
    while block := list(itertools.islice(iterator, size)):
        yield block


#: Result lines pulled from their source at a time (about 2 MB of JSONL): bounds the memory held
#: while the switches of ``_our_work`` are toggled only once per block.
_PULL_BLOCK = 2_000


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic GC: the loop makes no cycles, yet every allocation would count towards
    collections that walk all live containers (the keys map, the row group): ~25% of the time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def collect_lines(
    lines: Iterable[bytes | str],
    out_path: PathLike,
    ctx: ParseContext,
    *,
    expected_custom_ids: Iterable[str] | None = None,
    row_group_size: int = 10_000,
) -> CollectStats:
    """Stream result lines into a RESULT Parquet file at ``out_path`` (atomic), one row per custom_id.

    Rows for ``expected_custom_ids`` never seen are added with status ``missing``. Items may hold
    several lines; newlines are stripped. Memory stays at about one row group. A local ``out_path``
    is written without importing Airflow.
    """
    schema = result_schema(ctx.key_columns)
    n_keys = len(ctx.key_columns)
    index = ctx.keys
    assert isinstance(index, KeyIndex)  # ParseContext.__post_init__ makes it one
    row_of = index.rows
    written = bytearray(len(index.table))  # per prepared request: 1 once its row is buffered
    stats = CollectStats(out_path="")
    status_counts: Counter[str] = Counter()
    totals = [0, 0, 0, 0]
    costs = [0.0, 0.0]
    # Per buffered row: its row number in the key index and the outcome tuple (_TUPLE_COLUMNS).
    # Converted to Arrow every few thousand rows (Python objects are ~3x larger) with the key
    # columns taken from the index in one go; written once a row group is full.
    convert_every = max(1, min(_CONVERT_EVERY, row_group_size))
    positions: list[int] = []
    values: list[tuple] = []
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    text_is_json = ctx.output_model is not None and ctx.output_mode != "tool"
    constants = [pa.scalar(ctx.batch_id, pa.string()), pa.scalar(ctx.attempt, pa.int32())]
    value_types = [schema.field(name).type for name in _TUPLE_COLUMNS]
    json_column = _TUPLE_COLUMNS.index("output_json")

    def record_batch(id_and_keys: list[pa.Array], fingerprints: pa.Array, rows: list[tuple]) -> None:
        nonlocal pending_rows
        n = len(rows)
        columns = list(zip(*rows, strict=True))
        status_counts.update(columns[0])
        for i, column in enumerate(columns[7:11]):
            totals[i] += sum(filter(None, column))
        costs[0] += sum(columns[11])
        costs[1] += sum(columns[12])
        arrays = list(id_and_keys)
        for i, (column, kind) in enumerate(zip(columns, value_types, strict=True)):
            if i == json_column and text_is_json:
                # In json_schema mode a row's output_json is its output_text or null: share the text
                # column's buffers under a validity bitmap instead of converting the strings again.
                text_array = arrays[-1]
                has_json = pa.array([v is not None for v in column], pa.bool_())
                if text_array.offset == 0:  # (a null text has no output_json: offsets agree)
                    arrays.append(
                        pa.Array.from_buffers(
                            pa.string(), n, [has_json.buffers()[1], *text_array.buffers()[1:]]
                        )
                    )
                    continue
            arrays.append(pa.array(column, kind))
        arrays += [pa.repeat(constants[0], n), pa.repeat(constants[1], n), fingerprints]
        pending.append(pa.RecordBatch.from_arrays(arrays, schema=schema))
        pending_rows += n

    def to_arrow() -> None:
        """Move the buffered rows into an Arrow record batch (compact, off the Python heap)."""
        if positions:
            *id_and_keys, fingerprints = index.take(pa.array(positions, pa.int64()))
            record_batch(id_and_keys, fingerprints, values)
            positions.clear()
            values.clear()

    def flush(writer: pq.ParquetWriter, final: bool = False) -> None:
        """Convert buffered rows; write a row group once ``row_group_size`` rows are pending."""
        nonlocal pending_rows
        to_arrow()
        if pending and (final or pending_rows >= row_group_size):
            writer.write_table(pa.Table.from_batches(pending, schema=schema), row_group_size=row_group_size)
            pending.clear()
            pending_rows = 0

    def add_line(line: bytes) -> None:
        """The slow path: a line that needs splitting, or one that does not decode, or is not ours."""
        for part in line.split(b"\n"):
            part = part.rstrip(b"\r")
            if not part.strip():
                continue
            stats.n_lines += 1
            try:
                decoded = _decode_line(part)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                stats.n_malformed += 1
                if len(stats.malformed_samples) < _SAMPLE:
                    stats.malformed_samples.append(f"{exc}: {part[:200]!r}")
                position = row_of.get(custom_id_of_line(part))  # type: ignore[arg-type]
                if position is None or written[position]:
                    continue
                row = _malformed_tuple(ctx, f"undecodable result line: {exc}")
            else:
                position = row_of.get(decoded.custom_id)
                if position is None:
                    stats.n_unknown += 1
                    if len(stats.unknown_custom_ids) < _SAMPLE:
                        stats.unknown_custom_ids.append(decoded.custom_id)
                    continue
                if written[position]:
                    stats.n_duplicates += 1
                    continue
                row = _row_tuple(decoded, ctx)
            written[position] = 1
            positions.append(position)
            values.append(row)

    decode = _decode_line
    decode_errors = (msgspec.DecodeError, msgspec.ValidationError)
    build = _row_builder(ctx)
    n_lines = 0
    # The writer's encoders draw from the system pool as the rows do (see _system_allocator).
    pool = pa.system_memory_pool()
    with storage.open_atomic_writer(out_path) as handle:
        stats.out_path = storage.path_url(out_path)
        with pq.ParquetWriter(handle, schema, memory_pool=pool, **_WRITER_OPTIONS) as writer:
            for block in _blocks(lines, _PULL_BLOCK):
                with _our_work():
                    for line in block:
                        if len(positions) >= convert_every:
                            flush(writer)
                        if type(line) is not bytes:
                            line = line.encode("utf-8") if isinstance(line, str) else bytes(line)
                        # The common case, inline: one complete line per item. A trailing newline is
                        # JSON whitespace to the decoder, so the line is not copied to strip it.
                        newline = line.find(b"\n")
                        if 0 <= newline < len(line) - 1:
                            add_line(line.rstrip(b"\r\n"))
                            continue
                        try:
                            decoded = decode(line)
                        except decode_errors:
                            add_line(line.rstrip(b"\r\n"))
                            continue
                        position = row_of.get(decoded.custom_id)
                        if position is None:
                            add_line(line.rstrip(b"\r\n"))
                            continue
                        n_lines += 1
                        if written[position]:
                            stats.n_duplicates += 1
                            continue
                        written[position] = 1
                        positions.append(position)
                        values.append(build(decoded))
            with _our_work():
                if expected_custom_ids is not None:
                    missing_row = (
                        RequestStatus.MISSING.value,
                        None,
                        "no result line was returned for this request",
                        None,
                        None,
                        None,
                        ctx.default_model,
                        *_NO_USAGE,
                    )
                    # expected, but not among the prepared keys: null key columns
                    unindexed: list[str] = []
                    for custom_id in sorted(set(expected_custom_ids)):
                        position = row_of.get(custom_id)
                        if position is None:
                            unindexed.append(custom_id)
                            continue
                        if written[position]:
                            continue
                        if len(positions) >= convert_every:
                            flush(writer)
                        written[position] = 1
                        positions.append(position)
                        values.append(missing_row)
                        stats.n_missing += 1
                    if unindexed:
                        to_arrow()  # these go last, after the buffered rows
                        null_keys = [pa.nulls(len(unindexed), pa.string())] * n_keys
                        ids = pa.array(unindexed, pa.string())
                        record_batch(
                            [ids, *null_keys],
                            pa.nulls(len(unindexed), pa.string()),
                            [missing_row] * len(unindexed),
                        )
                        stats.n_missing += len(unindexed)
                flush(writer, final=True)

    stats.n_lines += n_lines
    stats.n_rows = sum(status_counts.values())
    stats.counts_by_status = dict(sorted(status_counts.items()))
    stats.tokens = dict(zip(("input", "output", "cache_creation", "cache_read"), totals, strict=True))
    stats.cost_usd, stats.sync_cost_usd = costs
    return stats


def expected_ids_from_chunk(chunk_path: PathLike) -> set[str]:
    """The custom_ids of a chunk file (what its batch's results must cover)."""
    # batch_requests imports Airflow: collecting into a local file runs without it
    from anthropic_batch.batch_requests import iter_chunk_lines

    ids = set()
    for line in iter_chunk_lines(chunk_path):
        cid = custom_id_of_line(line)
        if cid is not None:
            ids.add(cid)
    return ids


# -- merge and dead letters -------------------------------------------------------------------------
#
# A day can hold a million requests (ten chunks) and several attempts: nothing here loads the day's
# rows at once. The merge runs in two streamed passes over the attempt files:
#
# 1. decide: the small columns (custom_id, status, error_type, stop_reason, attempt) of every file
#    and of the prepared keys are hash-partitioned by custom_id into buckets of about
#    ``bucket_rows`` rows (spilled to a local temp dir as Arrow IPC when there is more than one);
#    each bucket is sorted with pyarrow and yields, per custom_id, its best row, its latest row and
#    the retry decision. What survives the pass is one byte-sized flag set per *row position* of
#    each file (about 10 bytes a row in numpy arrays, no Python object per row);
# 2. write: each file is read again, row group by row group, and its winning rows go to the merged
#    file; dead letters and the retry list are built from the same row groups.
#
# Peak memory is one bucket's small columns plus one row group, whatever the size of the day.

# Vectorised FailureClass: 0 = usable (no retry), then retriable, permanent, fatal.
_CODE_OK, _CODE_RETRIABLE, _CODE_PERMANENT, _CODE_FATAL = 0, 1, 2, 3
_CLASS_OF_CODE: dict[int, FailureClass | None] = {
    _CODE_OK: None,
    _CODE_RETRIABLE: FailureClass.RETRIABLE,
    _CODE_PERMANENT: FailureClass.PERMANENT,
    _CODE_FATAL: FailureClass.FATAL,
}
# An answer, not a usable one.
_ANSWER_STATUSES = frozenset({RequestStatus.INVALID_OUTPUT.value, RequestStatus.NEEDS_FOLLOWUP.value})
_MERGE_COLUMNS = ["custom_id", "status", "error_type", "stop_reason", "attempt"]
_DECIDE_SCHEMA = pa.schema(
    [
        ("custom_id", pa.string()),
        ("file", pa.int32()),
        ("row", pa.int64()),
        ("attempt", pa.int32()),
        ("rank", pa.int8()),
        ("code", pa.int8()),
        ("truncated", pa.bool_()),
        ("chunk", pa.int32()),
        ("status", pa.string()),
        ("error_type", pa.string()),
    ]
)
#: The retry list ``merge_attempts`` writes: what to resubmit and where its last request line is.
RETRY_SCHEMA = pa.schema(
    [
        ("custom_id", pa.string()),
        ("source_attempt", pa.int32()),  # the attempt whose request line is resubmitted
        ("chunk_index", pa.int32()),  # its prepared chunk (keys.parquet), null if unknown
        ("source_file", pa.int32()),  # index of the results file of that attempt, null if none
        ("grow", pa.bool_()),  # the last answer was cut at max_tokens: grow max_tokens
    ]
)
_MISSING_MESSAGE = "no attempt returned a result for this request"


def _conform(table: pa.Table | pa.RecordBatch, schema: pa.Schema) -> pa.Table:
    columns = []
    for f in schema:
        if f.name in table.column_names:
            columns.append(table.column(f.name).cast(f.type))
        else:
            columns.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=schema)


_STRING = pa.string()


def _column(table: pa.Table | pa.RecordBatch, name: str, kind: pa.DataType = _STRING) -> pa.Array:
    if name not in table.column_names:
        return pa.nulls(table.num_rows, kind)
    column = table.column(name)
    return _one_chunk(column) if isinstance(column, pa.ChunkedArray) else column


def _is(values: pa.Array, value: str) -> np.ndarray:
    return pc.fill_null(pc.equal(values, value), False).to_numpy(zero_copy_only=False)


def _is_in(values: pa.Array, options: Iterable[str]) -> np.ndarray:
    found = pc.is_in(values.cast(pa.string()), value_set=pa.array(sorted(options), pa.string()))
    return pc.fill_null(found, False).to_numpy(zero_copy_only=False)


def failure_codes(
    status: pa.Array, error_type: pa.Array, stop_reason: pa.Array, *, retry_truncated: bool = True
) -> np.ndarray:
    """``classify_failure`` for whole columns, as int8 codes (0 usable, 1 retriable, 2 permanent,
    3 fatal). Kept equal to the scalar function by a test."""
    succeeded = _is(status, RequestStatus.SUCCEEDED)
    truncated = _is(stop_reason, "max_tokens")
    errored = _is(status, RequestStatus.ERRORED)
    codes = np.full(len(status), _CODE_PERMANENT, np.int8)
    codes[_is_in(status, _RETRIABLE_STATUSES)] = _CODE_RETRIABLE
    codes[errored & _is_in(error_type, RETRIABLE_ERROR_TYPES)] = _CODE_RETRIABLE
    codes[errored & _is_in(error_type, FATAL_ERROR_TYPES)] = _CODE_FATAL
    codes[_is(status, RequestStatus.CANCELED) & _is(error_type, USER_CANCELED_ERROR_TYPE)] = _CODE_PERMANENT
    if not retry_truncated:
        codes[truncated & ~succeeded] = _CODE_PERMANENT
    codes[succeeded] = _CODE_RETRIABLE if retry_truncated else _CODE_OK
    codes[succeeded & ~truncated] = _CODE_OK
    return codes


def answer_rank(status: pa.Array, stop_reason: pa.Array) -> np.ndarray:
    """How good a row's answer is (higher is better): valid beats invalid, complete beats truncated,
    any answer beats none (errored, canceled, expired, missing: 0)."""
    truncated = _is(stop_reason, "max_tokens")
    answer = _is_in(status, _ANSWER_STATUSES)
    succeeded = _is(status, RequestStatus.SUCCEEDED)
    rank = np.zeros(len(status), np.int8)
    rank[answer] = 2
    rank[answer & ~truncated] = 3
    rank[succeeded] = 4
    rank[succeeded & ~truncated] = 5
    return rank


_HASH_WEIGHTS = np.random.default_rng(20261130).integers(1, 2**62, size=64, dtype=np.uint64) | np.uint64(1)


def _bucket_of(ids: pa.Array, n_buckets: int) -> np.ndarray:
    """A stable hash of each string, modulo ``n_buckets`` (vectorised over the string buffer).

    pyarrow has no scalar hash kernel; a weighted byte sum with a 64-bit finaliser spreads
    custom_ids (``[a-zA-Z0-9_-]{1,64}``) evenly and costs a few numpy passes.
    """
    n = len(ids)
    if n_buckets <= 1 or n == 0:
        return np.zeros(n, np.int32)
    ids = ids.cast(pa.large_string())
    offsets = np.frombuffer(ids.buffers()[1], np.int64)[ids.offset : ids.offset + n + 1]
    data_buffer = ids.buffers()[2]
    relative = offsets - offsets[0]
    total = int(relative[-1])
    lengths = np.diff(relative)
    sums = np.zeros(n, np.uint64)
    if total:
        data = np.frombuffer(data_buffer, np.uint8)[offsets[0] : offsets[0] + total].astype(np.uint64)
        position = np.arange(total, dtype=np.int64) - np.repeat(relative[:-1], lengths)
        weighted = data * _HASH_WEIGHTS[position & 63]
        starts = np.minimum(relative[:-1], total - 1)
        sums = np.add.reduceat(weighted, starts)
        sums[lengths == 0] = 0
    h = sums ^ (lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    return (h % np.uint64(n_buckets)).astype(np.int32)


def _iter_parquet_batches(
    path: PathLike, columns: Sequence[str] | None, batch_size: int
) -> Iterator[pa.RecordBatch]:
    """The record batches of a Parquet file, one row group at a time (only ``columns`` present)."""
    with _open_input(path) as handle:
        parquet = pq.ParquetFile(handle)
        names = parquet.schema_arrow.names
        wanted = None if columns is None else [c for c in columns if c in names]
        if parquet.metadata.num_rows == 0:
            return
        # Row group by row group: iter_batches buffers far ahead (~the whole file) on some readers.
        for index in range(parquet.num_row_groups):
            table = parquet.read_row_group(index, columns=wanted, use_threads=False)
            yield from table.to_batches(max_chunksize=batch_size)
            del table


def _open_input(path: PathLike) -> Any:
    """A readable file for Parquet: a local file through Arrow's own I/O (a Python file object
    would hand every column chunk over as a Python ``bytes``: ~200 MB more peak RSS in a merge,
    as malloc keeps the fragments), anything else through ``storage``."""
    url = storage.path_url(path)
    if url.startswith("file:///") and "%" not in url:
        return pa.OSFile(url[len("file://") :], "rb")
    return storage.open_binary(path)


def _parquet_rows(path: PathLike) -> int:
    with _open_input(path) as handle:
        return pq.ParquetFile(handle).metadata.num_rows


@dataclass
class MergeStats:
    """What ``merge_attempts`` wrote and decided (small: counts, no rows)."""

    merged_path: str
    n_rows: int = 0
    counts_by_status: dict[str, int] = field(default_factory=dict)
    max_attempt: int = 0
    #: error types of fatal failures among the latest rows (authentication, permission, billing)
    fatal_error_types: dict[str, int] = field(default_factory=dict)
    retry_path: str | None = None
    n_retry: int = 0
    #: why the rows to retry failed last time (``retry_reason`` labels) -> count
    retry_reasons: dict[str, int] = field(default_factory=dict)
    dead_letter_path: str | None = None
    n_dead_letters: int = 0
    n_buckets: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _FileFlags:
    """Per row position of one source file: the merge's decisions (numpy, ~10 bytes a row)."""

    win: np.ndarray  # this row is its custom_id's best row
    attempts: np.ndarray  # attempts made for the row's custom_id (0: none)
    retry: np.ndarray
    grow: np.ndarray
    chunk: np.ndarray  # the custom_id's prepared chunk (-1 unknown)
    source_file: np.ndarray  # file index of the custom_id's latest row (-1: none, keys only)
    source_attempt: np.ndarray

    @classmethod
    def empty(cls, n: int) -> _FileFlags:
        return cls(
            win=np.zeros(n, np.bool_),
            attempts=np.zeros(n, np.int16),
            retry=np.zeros(n, np.bool_),
            grow=np.zeros(n, np.bool_),
            chunk=np.full(n, -1, np.int32),
            source_file=np.full(n, -1, np.int32),
            source_attempt=np.zeros(n, np.int16),
        )


def retry_reason(status: str, error_type: str | None, stop_reason: str | None) -> str:
    """A short label for the log: why a row is resubmitted (its last failure)."""
    if stop_reason == "max_tokens":
        return f"{status}: truncated at max_tokens"
    return f"{status}: {error_type}" if error_type else status


def _retry_reason_labels(status: pa.Array, error_type: pa.Array, truncated: np.ndarray) -> pa.Array:
    """``retry_reason`` for whole columns."""
    with_error = pc.binary_join_element_wise(status, error_type, ": ")
    labels = pc.if_else(pc.is_valid(error_type), with_error, status)
    cut = pc.binary_join_element_wise(status, pa.scalar("truncated at max_tokens"), ": ")
    return pc.if_else(pa.array(truncated, pa.bool_()), cut, labels)


def _count(counter: Counter[str], values: pa.Array) -> None:
    if len(values):
        for entry in pc.value_counts(values).to_pylist():
            counter[str(entry["values"])] += int(entry["counts"])


def _decide_rows(
    batch: pa.RecordBatch, file_index: int, first_row: int, *, is_keys: bool, retry_truncated: bool
) -> pa.RecordBatch:
    """The small decision columns of a batch of RESULT rows (or of prepared keys: rank -1)."""
    n = batch.num_rows
    ids = _column(batch, "custom_id").cast(pa.string())
    rows = pa.array(np.arange(first_row, first_row + n, dtype=np.int64))
    files = pa.array(np.full(n, file_index, np.int32))
    if is_keys:
        chunk = _column(batch, "chunk_index", pa.int32()).cast(pa.int32()).fill_null(-1)
        nulls = pa.nulls(n, pa.string())
        return pa.RecordBatch.from_arrays(
            [
                ids, files, rows, pa.array(np.zeros(n, np.int32)), pa.array(np.full(n, -1, np.int8)),
                pa.array(np.full(n, _CODE_RETRIABLE, np.int8)), pa.array(np.zeros(n, np.bool_)),
                chunk, pa.array([RequestStatus.MISSING.value] * n, pa.string()), nulls,
            ],
            schema=_DECIDE_SCHEMA,
        )  # fmt: skip
    status = _column(batch, "status")
    error_type = _column(batch, "error_type")
    stop_reason = _column(batch, "stop_reason")
    attempt = _column(batch, "attempt", pa.int32()).cast(pa.int32()).fill_null(1)
    return pa.RecordBatch.from_arrays(
        [
            ids, files, rows, attempt, pa.array(answer_rank(status, stop_reason)),
            pa.array(failure_codes(status, error_type, stop_reason, retry_truncated=retry_truncated)),
            pa.array(_is(stop_reason, "max_tokens")), pa.array(np.full(n, -1, np.int32)),
            status, error_type,
        ],
        schema=_DECIDE_SCHEMA,
    )  # fmt: skip


def _decide_bucket(
    table: pa.Table,
    flags: list[_FileFlags],
    fatal: Counter[str],
    reasons: Counter[str],
    max_attempts: int | None,
) -> None:
    """Best row, latest row and retry decision per custom_id of one bucket, into ``flags``."""
    if table.num_rows == 0:
        return
    table = table.combine_chunks()
    # Best first: rank, then the later attempt (and file, row) among equals.
    best_order = pc.sort_indices(
        table,
        sort_keys=[("custom_id", "ascending"), ("rank", "descending"), ("attempt", "descending"),
                   ("file", "descending"), ("row", "descending")],
    ).to_numpy()  # fmt: skip
    latest_order = pc.sort_indices(
        table,
        sort_keys=[("custom_id", "ascending"), ("attempt", "descending"), ("file", "descending"),
                   ("row", "descending")],
    ).to_numpy()  # fmt: skip
    ids = _one_chunk(table.column("custom_id")).take(pa.array(best_order))
    n = len(ids)
    starts_mask = np.ones(n, np.bool_)
    if n > 1:
        starts_mask[1:] = pc.not_equal(ids.slice(1), ids.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(starts_mask)
    col = {name: table.column(name).to_numpy() for name in ("file", "row", "attempt", "code", "chunk")}
    truncated = table.column("truncated").to_numpy()
    best = best_order[starts]
    latest = latest_order[starts]  # both orders group the same custom_ids in the same sequence
    attempts = np.maximum.reduceat(col["attempt"][best_order], starts)
    chunk = np.maximum.reduceat(col["chunk"][best_order], starts)
    best_code, latest_code = col["code"][best], col["code"][latest]
    fatal_rows = latest[latest_code == _CODE_FATAL]
    if len(fatal_rows):
        _count(fatal, _one_chunk(table.column("error_type")).take(pa.array(fatal_rows)).fill_null("?"))
    if max_attempts is None:
        retry = np.zeros(len(starts), np.bool_)
    else:
        # Retry only while the best answer is still retriable AND the last try failed in a way a
        # new try can fix (a permanent last failure, e.g. a grown max_tokens refused, ends it).
        retry = (
            (best_code == _CODE_RETRIABLE)
            & (latest_code == _CODE_RETRIABLE)
            & (np.maximum(attempts, 1) < max_attempts)
        )
    grow = retry & truncated[latest]
    retry_rows = latest[retry]
    if len(retry_rows):
        take = pa.array(retry_rows)
        _count(
            reasons,
            _retry_reason_labels(
                _one_chunk(table.column("status")).take(take),
                _one_chunk(table.column("error_type")).take(take),
                truncated[retry_rows],
            ),
        )
    latest_file = col["file"][latest]
    for file_index in np.unique(col["file"][best]):
        mine = col["file"][best] == file_index
        rows = col["row"][best][mine]
        target = flags[int(file_index)]
        target.win[rows] = True
        target.attempts[rows] = attempts[mine]
        target.retry[rows] = retry[mine]
        target.grow[rows] = grow[mine]
        target.chunk[rows] = chunk[mine]
        source_attempt = np.maximum(attempts[mine], 1)
        target.source_attempt[rows] = source_attempt
        # A keys-only row (no attempt returned it) is resubmitted from its prepared chunk.
        target.source_file[rows] = np.where(attempts[mine] > 0, latest_file[mine], -1)


class _RowGroupWriter:
    """A Parquet writer that gathers small tables into row groups of about ``row_group_size``."""

    def __init__(self, writer: pq.ParquetWriter, schema: pa.Schema, row_group_size: int) -> None:
        self.writer, self.schema, self.row_group_size = writer, schema, row_group_size
        self.pending: list[pa.Table] = []
        self.n_pending = 0
        self.n_rows = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.pending.append(table)
            self.n_pending += table.num_rows
            self.n_rows += table.num_rows
            if self.n_pending >= self.row_group_size:
                self.flush()

    def flush(self) -> None:
        if self.pending:
            self.writer.write_table(pa.concat_tables(self.pending), row_group_size=self.row_group_size)
            self.pending.clear()
            self.n_pending = 0


def _missing_rows(keys: pa.RecordBatch | pa.Table, schema: pa.Schema, key_columns: Sequence[str]) -> pa.Table:
    """RESULT rows with status ``missing`` for prepared requests no attempt returned."""
    n = keys.num_rows
    data = {name: pa.nulls(n, schema.field(name).type) for name in schema.names}
    data["custom_id"] = _column(keys, "custom_id").cast(pa.string())
    for k in key_columns:
        data[k] = _column(keys, k).cast(pa.string())
    data["request_fingerprint"] = _column(keys, "request_fingerprint").cast(pa.string())
    data["status"] = pa.array([RequestStatus.MISSING.value] * n, pa.string())
    data["error_message"] = pa.array([_MISSING_MESSAGE] * n, pa.string())
    data["cost_usd"] = pa.array(np.zeros(n))
    data["sync_cost_usd"] = pa.array(np.zeros(n))
    return pa.table(data, schema=schema)


def merge_attempts(
    paths_in_attempt_order: Sequence[PathLike],
    out_path: PathLike,
    key_columns: Sequence[str],
    *,
    expected_keys: pa.Table | PathLike | None = None,
    max_attempts: int | None = None,
    retry_truncated: bool = True,
    retry_path: PathLike | None = None,
    dead_letter_path: PathLike | None = None,
    bucket_rows: int = 200_000,
    row_group_size: int = 10_000,
) -> MergeStats:
    """Merge RESULT files into ``out_path`` (atomic): one row per custom_id, its **best** answer.

    Best: valid beats invalid, complete beats truncated, any answer beats an error (``answer_rank``);
    among equals the later attempt wins. A row keeps its own ``attempt`` and ``batch_id`` (the
    answer's lineage). With ``expected_keys`` (``keys.parquet``: a path or a table), prepared
    requests no attempt returned get a ``missing`` row, so the merge has one row per request.

    With ``max_attempts``, the rows to resubmit are decided too and listed at ``retry_path``
    (``RETRY_SCHEMA``): a custom_id is retried while its best row is retriable (``classify_failure``;
    a truncated answer only with ``retry_truncated``), its latest try failed retriably, and it had
    fewer than ``max_attempts`` attempts. ``dead_letter_path`` receives the DEAD_LETTER rows of the
    merged rows that are not succeeded and not retried. A fatal failure (authentication,
    permission, billing) stops every retry. Memory is bounded (see the section comment above);
    rows are written file by file (attempt order), then the missing ones.
    """
    paths = list(paths_in_attempt_order)
    schema = result_schema(key_columns)
    n_files = len(paths)
    keys_table = expected_keys if isinstance(expected_keys, pa.Table) else None
    keys_path = None if keys_table is not None or expected_keys is None else expected_keys
    sizes = [_parquet_rows(p) for p in paths]
    if keys_table is not None:
        sizes.append(keys_table.num_rows)
    elif keys_path is not None:
        sizes.append(_parquet_rows(keys_path))

    def source_batches(index: int, columns: Sequence[str] | None) -> Iterator[pa.RecordBatch]:
        if index < n_files:
            yield from _iter_parquet_batches(paths[index], columns, row_group_size)
        elif keys_table is not None:
            table = (
                keys_table
                if columns is None
                else keys_table.select([c for c in columns if c in keys_table.column_names])
            )
            yield from table.to_batches(max_chunksize=row_group_size)
        else:
            assert keys_path is not None
            yield from _iter_parquet_batches(keys_path, columns, row_group_size)

    n_buckets = max(1, math.ceil(sum(sizes) / max(1, bucket_rows)))
    stats = MergeStats(merged_path=storage.path_url(out_path), n_buckets=n_buckets)
    flags = [_FileFlags.empty(n) for n in sizes]
    fatal: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    keys_columns = ["custom_id", "chunk_index"]

    # Pass 1: decide.
    with contextlib.ExitStack() as stack:
        spill_dir = (
            stack.enter_context(tempfile.TemporaryDirectory(prefix="merge-")) if n_buckets > 1 else None
        )
        in_memory: list[pa.RecordBatch] = []
        writers: list[pa.ipc.RecordBatchStreamWriter] = []
        if spill_dir is not None:
            for b in range(n_buckets):
                sink = stack.enter_context(pa.OSFile(os.path.join(spill_dir, f"{b}.arrow"), "wb"))
                writers.append(stack.enter_context(pa.ipc.new_stream(sink, _DECIDE_SCHEMA)))
        for index in range(len(sizes)):
            is_keys = index == n_files
            first_row = 0
            for batch in source_batches(index, keys_columns if is_keys else _MERGE_COLUMNS):
                small = _decide_rows(
                    batch, index, first_row, is_keys=is_keys, retry_truncated=retry_truncated
                )
                first_row += batch.num_rows
                if spill_dir is None:
                    in_memory.append(small)
                    continue
                buckets = _bucket_of(small.column(0), n_buckets)
                order = np.argsort(buckets, kind="stable")
                bounds = np.searchsorted(buckets[order], np.arange(n_buckets + 1))
                grouped = small.take(pa.array(order))
                for b in range(n_buckets):
                    if bounds[b + 1] > bounds[b]:
                        writers[b].write_batch(grouped.slice(bounds[b], bounds[b + 1] - bounds[b]))
        if spill_dir is None:
            _decide_bucket(
                pa.Table.from_batches(in_memory, schema=_DECIDE_SCHEMA),
                flags,
                fatal,
                reasons,
                max_attempts,
            )
            in_memory.clear()
        else:
            for writer in writers:
                writer.close()
            for b in range(n_buckets):
                with pa.memory_map(os.path.join(spill_dir, f"{b}.arrow")) as source:
                    table = pa.ipc.open_stream(source).read_all()
                _decide_bucket(table, flags, fatal, reasons, max_attempts)
                del table
    stats.fatal_error_types = dict(sorted(fatal.items()))
    if fatal:
        # Nothing more is sent after a fatal failure: every unfinished row is final.
        for f in flags:
            f.retry[:] = False
            f.grow[:] = False
        reasons.clear()
    stats.retry_reasons = dict(reasons.most_common())

    # Pass 2: write the winners, the dead letters and the retry list.
    status_counts: Counter[str] = Counter()
    dead_schema = dead_letter_schema(key_columns)
    with contextlib.ExitStack() as stack:

        def open_writer(path: PathLike, kind: pa.Schema, **options: Any) -> _RowGroupWriter:
            handle = stack.enter_context(storage.open_atomic_writer(path))
            return _RowGroupWriter(
                stack.enter_context(pq.ParquetWriter(handle, kind, **options)), kind, row_group_size
            )

        merged_out = open_writer(out_path, schema, **_WRITER_OPTIONS)
        retry_out = open_writer(retry_path, RETRY_SCHEMA) if retry_path is not None else None
        dead_out = open_writer(dead_letter_path, dead_schema) if dead_letter_path is not None else None
        for index in range(len(sizes)):
            f = flags[index]
            if not f.win.any():
                continue
            is_keys = index == n_files
            columns = [*keys_columns, *key_columns, "request_fingerprint"] if is_keys else None
            first_row = 0
            for batch in source_batches(index, columns):
                span = slice(first_row, first_row + batch.num_rows)
                first_row += batch.num_rows
                selected = f.win[span]
                if not selected.any():
                    continue
                mask = pa.array(selected)
                rows = (
                    _missing_rows(batch.filter(mask), schema, key_columns)
                    if is_keys
                    else _conform(batch.filter(mask), schema)
                )
                attempts = f.attempts[span][selected]
                retry = f.retry[span][selected]
                merged_out.add(rows)
                _count(status_counts, _one_chunk(rows.column("status")))
                if rows.num_rows and not is_keys:
                    top = pc.max(rows.column("attempt")).as_py() or 0
                    stats.max_attempt = max(stats.max_attempt, int(top))
                if retry_out is not None and retry.any():
                    chunk = f.chunk[span][selected][retry]
                    source_file = f.source_file[span][selected][retry]
                    retry_out.add(
                        pa.table(
                            [
                                _one_chunk(rows.column("custom_id")).filter(pa.array(retry)),
                                pa.array(f.source_attempt[span][selected][retry].astype(np.int32)),
                                pa.array(chunk, mask=chunk < 0),
                                pa.array(source_file, mask=source_file < 0),
                                pa.array(f.grow[span][selected][retry]),
                            ],
                            schema=RETRY_SCHEMA,
                        )
                    )
                if dead_out is not None:
                    dead_out.add(dead_letter_rows(rows, key_columns, attempts=attempts, retry=retry))
        for out in (merged_out, retry_out, dead_out):
            if out is not None:
                out.flush()
    stats.n_rows = merged_out.n_rows
    stats.counts_by_status = dict(sorted(status_counts.items()))
    if retry_out is not None:
        stats.retry_path, stats.n_retry = storage.path_url(retry_path), retry_out.n_rows  # type: ignore[arg-type]
    if dead_out is not None:
        stats.dead_letter_path = storage.path_url(dead_letter_path)  # type: ignore[arg-type]
        stats.n_dead_letters = dead_out.n_rows
    return stats


def retry_mask(
    table: pa.Table, max_attempts: int, *, retry_truncated: bool = True, attempts: np.ndarray | None = None
) -> pa.BooleanArray:
    """Rows of a merged RESULT table (or a row group of it) to resubmit: retriable and tried fewer
    than ``max_attempts`` times (``attempts``: attempts made per row, default its ``attempt``)."""
    codes = failure_codes(
        _column(table, "status"), _column(table, "error_type"), _column(table, "stop_reason"),
        retry_truncated=retry_truncated,
    )  # fmt: skip
    if attempts is None:
        attempts = _column(table, "attempt", pa.int32()).fill_null(1).to_numpy(zero_copy_only=False)
    return pa.array((codes == _CODE_RETRIABLE) & (np.maximum(attempts, 1) < max_attempts))


def has_fatal(table: pa.Table) -> bool:
    """True when any row failed in a way that must stop the run (auth, permission, billing)."""
    codes = failure_codes(
        _column(table, "status"), _column(table, "error_type"), _column(table, "stop_reason")
    )
    return bool((codes == _CODE_FATAL).any())


def _reason(status: str, error_type: str | None, message: str | None, fc: FailureClass | None, n: int) -> str:
    what = status if not error_type else f"{status} ({error_type})"
    detail = f": {message}" if message else ""
    kind = {
        FailureClass.RETRIABLE: f"still failing after {n} attempt(s)",
        FailureClass.PERMANENT: "permanent failure, not retried",
        FailureClass.FATAL: "fatal error, run stopped",
    }.get(fc, "not usable")
    return f"{what}, {kind}{detail}"[:4000]


def dead_letter_rows(
    merged: pa.Table,
    key_columns: Sequence[str],
    *,
    max_attempts: int | None = None,
    attempts: np.ndarray | None = None,
    retry: np.ndarray | None = None,
    retry_truncated: bool = True,
) -> pa.Table:
    """DEAD_LETTER rows (stage ``collect``) for the final failures of merged RESULT rows.

    A row is a dead letter when its status is not ``succeeded`` and it will not be retried: its
    failure is permanent or fatal, or it is retriable but already had ``max_attempts`` attempts
    (with ``max_attempts=None`` every non-succeeded row counts as final). ``retry`` (a mask from
    the merge) overrides that decision; ``attempts`` gives the attempts made per row (default: the
    row's ``attempt``). Truncated but succeeded rows stay in the data (``stop_reason`` says
    ``max_tokens``). Python objects are built for the dead rows only: call it per row group.
    """
    schema = dead_letter_schema(key_columns)
    if attempts is None:
        attempts = _column(merged, "attempt", pa.int32()).fill_null(1).to_numpy(zero_copy_only=False)
    if retry is None:
        retry = (
            np.zeros(merged.num_rows, np.bool_)
            if max_attempts is None
            else retry_mask(
                merged, max_attempts, retry_truncated=retry_truncated, attempts=attempts
            ).to_numpy(zero_copy_only=False)
        )
    dead = ~_is(_column(merged, "status"), RequestStatus.SUCCEEDED) & ~retry
    if not dead.any():
        return schema.empty_table()
    failed = merged.filter(pa.array(dead))
    attempts = np.maximum(np.asarray(attempts)[dead], 1)
    rows: dict[str, list[Any]] = {name: [] for name in schema.names}
    record_cols = [c for c in failed.column_names if c != "output_text"]
    for row, n in zip(failed.to_pylist(), attempts.tolist(), strict=True):
        status = row["status"]
        fc = classify_failure(
            status, row.get("error_type"), row.get("stop_reason"), retry_truncated=retry_truncated
        )
        for k in key_columns:
            rows[k].append(row.get(k))
        rows["custom_id"].append(row["custom_id"])
        rows["stage"].append("collect")
        rows["status"].append(status)
        rows["error_type"].append(row.get("error_type"))
        rows["reason"].append(_reason(status, row.get("error_type"), row.get("error_message"), fc, n))
        rows["attempts"].append(n)
        rows["last_batch_id"].append(row.get("batch_id"))
        record = {c: row.get(c) for c in record_cols}
        if row.get("output_text"):
            record["output_text"] = row["output_text"][:2000]
        rows["record_json"].append(json.dumps(record, sort_keys=True, ensure_ascii=False, default=str))
    return pa.table(rows, schema=schema)
