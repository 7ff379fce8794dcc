"""The Arrow schemas of the tables a run writes: RESULT (one row per answered request) and DEAD_LETTER.

Below request building (prepare writes rejected records as dead letters) and result decoding (collect,
merge, publish), so neither has to import the other for them. Imported only where tables are
written: pyarrow is loaded at import.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pyarrow as pa

_RESULT_FIELDS_AFTER_KEYS: list[tuple[str, pa.DataType]] = [
    ("status", pa.string()),
    ("error_type", pa.string()),
    ("error_message", pa.string()),
    ("output_text", pa.string()),
    ("output_json", pa.string()),
    ("stop_reason", pa.string()),
    ("model", pa.string()),
    ("input_tokens", pa.int64()),
    ("output_tokens", pa.int64()),
    ("cache_creation_input_tokens", pa.int64()),
    ("cache_read_input_tokens", pa.int64()),
    ("cost_usd", pa.float64()),
    ("sync_cost_usd", pa.float64()),
    ("batch_id", pa.string()),
    ("attempt", pa.int32()),
    ("request_fingerprint", pa.string()),
]
OUTCOME_COLUMNS = [name for name, _ in _RESULT_FIELDS_AFTER_KEYS]

_DEAD_LETTER_FIELDS: list[tuple[str, pa.DataType]] = [
    ("custom_id", pa.string()),
    ("stage", pa.string()),
    ("status", pa.string()),
    ("error_type", pa.string()),
    ("reason", pa.string()),
    ("attempts", pa.int32()),
    ("last_batch_id", pa.string()),
    ("record_json", pa.string()),
]


def _check_key_columns(key_columns: Sequence[str], reserved: Iterable[str]) -> None:
    clash = sorted(set(key_columns) & set(reserved))
    if clash:
        raise ValueError(f"key column names {clash} clash with result columns; rename them in the input")


def result_schema(key_columns: Sequence[str] = ()) -> pa.Schema:
    """RESULT schema: ``custom_id``, the key columns (strings), then the outcome columns."""
    _check_key_columns(key_columns, ["custom_id", *OUTCOME_COLUMNS])
    return pa.schema(
        [("custom_id", pa.string())] + [(k, pa.string()) for k in key_columns] + _RESULT_FIELDS_AFTER_KEYS
    )


def dead_letter_schema(key_columns: Sequence[str] = ()) -> pa.Schema:
    """DEAD_LETTER schema: the key columns (strings), then ``custom_id``, stage, reason..."""
    _check_key_columns(key_columns, [name for name, _ in _DEAD_LETTER_FIELDS])
    return pa.schema([(k, pa.string()) for k in key_columns] + _DEAD_LETTER_FIELDS)


RESULT_SCHEMA = result_schema()
DEAD_LETTER_SCHEMA = dead_letter_schema()
