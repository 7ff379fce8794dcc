"""Result lines -> rows: the RESULT and DEAD_LETTER schemas (more to come in this module)."""

from __future__ import annotations

from collections.abc import Sequence

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


def result_schema(key_columns: Sequence[str] = ()) -> pa.Schema:
    """RESULT schema: ``custom_id``, the key columns (strings), then the outcome columns."""
    return pa.schema(
        [("custom_id", pa.string())] + [(k, pa.string()) for k in key_columns] + _RESULT_FIELDS_AFTER_KEYS
    )


def dead_letter_schema(key_columns: Sequence[str] = ()) -> pa.Schema:
    """DEAD_LETTER schema: the key columns (strings), then ``custom_id``, stage, reason..."""
    return pa.schema([(k, pa.string()) for k in key_columns] + _DEAD_LETTER_FIELDS)


RESULT_SCHEMA = result_schema()
DEAD_LETTER_SCHEMA = dead_letter_schema()
