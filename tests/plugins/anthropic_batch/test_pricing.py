"""Prices: the built-in table, cache multipliers, batch discount and overrides."""

import json

import pytest

from anthropic_batch import pricing
from anthropic_batch.pricing import (
    PRICE_TABLE_AS_OF,
    UnknownModelError,
    builtin_price_table,
    load_price_table,
)

USAGE = {
    "input_tokens": 1_000_000,
    "output_tokens": 100_000,
    "cache_creation_input_tokens": 200_000,
    "cache_read_input_tokens": 2_000_000,
}


@pytest.fixture(autouse=True)
def _no_overrides(monkeypatch):
    monkeypatch.delenv(pricing.PRICES_ENV, raising=False)
    monkeypatch.delenv("AIRFLOW_VAR_ANTHROPIC_BATCH_PRICES", raising=False)


def test_table_is_dated_and_has_the_reference_models():
    table = builtin_price_table()
    assert table.as_of == PRICE_TABLE_AS_OF == "2026-10-21"
    p = table.price("claude-sonnet-4-5")
    assert (float(p.input), float(p.output)) == (3.0, 15.0)
    assert (float(p.cache_write_5m), float(p.cache_write_1h), float(p.cache_read)) == (3.75, 6.0, 0.3)
    assert float(table.price("claude-haiku-5-5").output) == 0.5
    assert float(table.price("claude-opus-5-5").input) == 4.0


def test_sync_cost_with_cache_tokens_5m_and_1h():
    table = builtin_price_table()
    # 1M input * $3 + 0.1M output * $15 + 0.2M writes * $3.75 + 2M reads * $0.30 = 3 + 1.5 + 0.75 + 0.6
    assert table.cost("claude-sonnet-4-5", USAGE, batch=False) == pytest.approx(5.85, abs=1e-9)
    # 1h writes cost 2x input: 0.2M * $6 = 1.2 instead of 0.75
    assert table.cost("claude-sonnet-4-5", USAGE, batch=False, cache_ttl="1h") == pytest.approx(
        6.30, abs=1e-9
    )


def test_batch_is_half():
    table = builtin_price_table()
    batch, sync = (table.cost("claude-sonnet-4-5", USAGE, batch=b) for b in (True, False))
    assert sync == pytest.approx(5.85, abs=1e-9)
    assert batch == pytest.approx(2.925, abs=1e-9)
    assert batch == pytest.approx(sync * float(table.batch_discount), abs=1e-12)


def test_small_request_is_exact_to_the_cent():
    table = builtin_price_table()
    usage = {"input_tokens": 1234, "output_tokens": 567, "cache_read_input_tokens": 0}
    # haiku-4-5: (1234 * 1 + 567 * 5) / 1e6 = 0.004069 sync, 0.0020345 batch
    batch, sync = (table.cost("claude-haiku-4-5", usage, batch=b) for b in (True, False))
    assert round(sync, 6) == 0.004069
    assert round(batch, 7) == 0.0020345
    # 10,000 such requests summed stay exact to the cent
    assert round(sum([batch] * 10_000), 2) == 20.35


def test_response_cache_breakdown_beats_the_requested_ttl():
    table = builtin_price_table()
    usage = {
        "input_tokens": 0,
        "output_tokens": 0,
        "cache_creation_input_tokens": 300_000,
        "cache_creation": {"ephemeral_5m_input_tokens": 100_000, "ephemeral_1h_input_tokens": 200_000},
    }
    # 0.1M * 3.75 + 0.2M * 6 = 0.375 + 1.2
    assert table.cost("claude-sonnet-4-5", usage, batch=False, cache_ttl="5m") == pytest.approx(1.575)


def test_missing_or_null_usage_fields_count_as_zero():
    table = builtin_price_table()
    usage = {"input_tokens": 1_000_000, "output_tokens": None, "cache_read_input_tokens": None}
    assert table.cost("claude-haiku-4-5", usage, batch=False) == pytest.approx(1.0)


def test_dated_model_ids_fall_back_to_their_family():
    table = builtin_price_table()
    assert table.price("claude-sonnet-4-5-20260101") == table.price("claude-sonnet-4-5")
    # longest prefix wins: opus-5-5 is not priced as opus-5
    assert table.price("claude-opus-5-5-20261001") == table.price("claude-opus-5-5")


def test_unknown_model_names_the_override_variable():
    with pytest.raises(UnknownModelError) as err:
        builtin_price_table().cost("gpt-9", USAGE, batch=True)
    assert "anthropic_batch_prices" in str(err.value)
    assert "gpt-9" in str(err.value)


def test_bad_cache_ttl_rejected():
    with pytest.raises(ValueError, match="cache_ttl"):
        builtin_price_table().cost("claude-haiku-4-5", USAGE, batch=True, cache_ttl="10m")


def test_env_override_json_text(monkeypatch):
    monkeypatch.setenv(
        pricing.PRICES_ENV,
        json.dumps({"as_of": "2027-01-01", "models": {"my-model": {"input": 2, "output": 8}}}),
    )
    table = load_price_table()
    assert table.as_of == "2027-01-01"
    assert table.cost("my-model", {"input_tokens": 1_000_000}, batch=False) == pytest.approx(2.0)
    # derived cache price from the overriding input price
    assert float(table.price("my-model").cache_write_1h) == 4.0
    # built-in models are kept
    assert table.price("claude-haiku-4-5")


def test_env_override_file_and_partial_entry(monkeypatch, tmp_path):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"claude-haiku-4-5": {"output": 6}, "batch_discount": 0.4}))
    monkeypatch.setenv(pricing.PRICES_ENV, str(path))
    table = load_price_table()
    p = table.price("claude-haiku-4-5")
    assert (float(p.input), float(p.output), float(p.cache_read)) == (1.0, 6.0, 0.1)
    batch, sync = (
        table.cost("claude-haiku-4-5", {"output_tokens": 1_000_000}, batch=b) for b in (True, False)
    )
    assert (sync, batch) == (pytest.approx(6.0), pytest.approx(2.4))


def test_variable_override_then_env(monkeypatch):
    # Airflow resolves Variables from AIRFLOW_VAR_* outside tasks as well.
    monkeypatch.setenv(
        "AIRFLOW_VAR_ANTHROPIC_BATCH_PRICES", json.dumps({"models": {"v-model": {"input": 1, "output": 1}}})
    )
    monkeypatch.setenv(pricing.PRICES_ENV, json.dumps({"models": {"v-model": {"output": 3}}}))
    p = load_price_table().price("v-model")
    assert (float(p.input), float(p.output)) == (1.0, 3.0)


def test_bad_override_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(pricing.PRICES_ENV, "{not json")
    with pytest.raises(ValueError, match="ANTHROPIC_BATCH_PRICES"):
        load_price_table()
    monkeypatch.setenv(pricing.PRICES_ENV, json.dumps({"models": {"x": {"output": 1}}}))
    with pytest.raises(ValueError, match="needs 'input'"):
        load_price_table()


def test_breakdown_splits_cache_and_batch_savings():
    from anthropic_batch.pricing import CostBreakdown, builtin_price_table

    table = builtin_price_table()
    usage = {
        "input_tokens": 1_000_000,
        "output_tokens": 100_000,
        "cache_creation_input_tokens": 200_000,
        "cache_read_input_tokens": 2_000_000,
    }
    b = table.breakdown("claude-sonnet-4-6", usage, batch=True)
    # Sonnet 4.6: input 3, output 15, write 3.75, read 0.30 USD/Mtok; batch pays half.
    assert b.input_usd == pytest.approx(1.5)
    assert b.output_usd == pytest.approx(0.75)
    assert b.cache_write_usd == pytest.approx(0.375)
    assert b.cache_read_usd == pytest.approx(0.30)
    assert b.total_usd == pytest.approx(float(table.cost_decimal("claude-sonnet-4-6", usage, batch=True)))
    # reads saved (3 - 0.3) * 2 Mtok / 2 = 2.70; the write premium cost (3.75 - 3) * 0.2 / 2 = 0.075
    assert b.cache_saving_usd == pytest.approx(2.625)
    assert b.batch_saving_usd == pytest.approx(b.total_usd)
    sync = table.breakdown("claude-sonnet-4-6", usage, batch=False)
    assert sync.batch_saving_usd == 0 and sync.total_usd == pytest.approx(2 * b.total_usd)
    summed = b + b
    assert isinstance(summed, CostBreakdown) and summed.cache_read_tokens == 4_000_000
    assert CostBreakdown.model_validate_json(b.model_dump_json()) == b
