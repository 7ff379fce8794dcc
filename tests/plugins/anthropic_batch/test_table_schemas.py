"""The Arrow schemas of a run's tables (table_schemas.py)."""

import pyarrow as pa
import pytest

from anthropic_batch import results
from anthropic_batch.table_schemas import DEAD_LETTER_SCHEMA, dead_letter_schema, result_schema


def test_key_columns_may_not_shadow_result_columns():
    with pytest.raises(ValueError, match="clash"):
        result_schema(["status"])
    with pytest.raises(ValueError, match="clash"):
        dead_letter_schema(["reason"])


def test_key_columns_come_first_as_strings():
    schema = dead_letter_schema(["ticket_id"])
    assert schema.names[:2] == ["ticket_id", "custom_id"]
    assert schema.field("ticket_id").type == pa.string()
    assert result_schema(["ticket_id"]).names[:2] == ["custom_id", "ticket_id"]


def test_results_re_exports_the_same_schemas():
    assert results.DEAD_LETTER_SCHEMA == DEAD_LETTER_SCHEMA
    assert results.result_schema is result_schema
