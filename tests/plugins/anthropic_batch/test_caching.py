from __future__ import annotations

import json

import pytest

from anthropic_batch import caching
from anthropic_batch.batch_requests import RequestSpec


def test_builtin_minimums_are_dated_and_per_model():
    table = caching.builtin_cache_minimums()
    assert table.as_of == caching.CACHE_MINIMUMS_AS_OF
    assert table.minimum("claude-haiku-4-5") == 4096
    assert table.minimum("claude-haiku-4-5-20251001") == 4096  # dated id -> its family
    assert table.minimum("claude-sonnet-4-6") == table.minimum("claude-sonnet-4-5") == 1024
    assert table.minimum("claude-opus-4-5") == table.minimum("claude-opus-4-6") == 4096
    assert table.minimum("claude-3-5-haiku") == 2048
    assert table.minimum("claude-unknown-9") == caching.DEFAULT_MIN_CACHEABLE_TOKENS


def test_env_override_wins_and_bad_values_name_the_source(monkeypatch, tmp_path):
    monkeypatch.setenv(
        caching.CACHE_MINIMUMS_ENV, '{"as_of": "2027-01-01", "models": {"claude-haiku-4-5": 2048}}'
    )
    table = caching.load_cache_minimums()
    assert (table.minimum("claude-haiku-4-5"), table.as_of) == (2048, "2027-01-01")
    assert table.minimum("claude-opus-4-6") == 4096
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"claude-opus-4-6": 1000, "default": 100}))
    monkeypatch.setenv(caching.CACHE_MINIMUMS_ENV, str(path))
    table = caching.load_cache_minimums()
    assert table.minimum("claude-opus-4-6") == 1000 and table.minimum("other") == 100
    monkeypatch.setenv(caching.CACHE_MINIMUMS_ENV, '{"claude-haiku-4-5": "lots"}')
    with pytest.raises(ValueError, match=r"ANTHROPIC_BATCH_CACHE_MINIMUMS.*claude-haiku-4-5"):
        caching.load_cache_minimums()


def spec(system: str, model: str = "claude-haiku-4-5", **kwargs) -> RequestSpec:
    return RequestSpec(model=model, max_tokens=100, prompt_template="{{ x }}", system_prompt=system, **kwargs)


def test_short_marked_system_prompt_is_below_the_minimum_with_both_numbers():
    check = caching.check_shared_prefix(spec("You triage tickets.").base_params())
    assert check.marked and check.below_minimum and not check.cacheable
    assert check.prefix_tokens == 3 + 5 and check.minimum == 4096
    warning = check.warning()
    assert "8 tokens" in warning and "4,096" in warning and "claude-haiku-4-5" in warning


def test_long_enough_prefix_is_cacheable_and_unmarked_prefix_is_not_checked():
    long = "abcd" * 4093
    assert caching.check_shared_prefix(spec(long).base_params()).cacheable
    assert caching.check_shared_prefix(spec(long[:-4]).base_params()).below_minimum
    unmarked = caching.check_shared_prefix(spec("short", cache_system_prompt=False).base_params())
    assert not unmarked.marked and unmarked.warning() is None
    # Sonnet's minimum is lower: the same prefix is cacheable there.
    assert caching.check_shared_prefix(spec("abcd" * 1100, model="claude-sonnet-4-5").base_params()).cacheable


def test_automatic_caching_is_noted():
    params = spec("x", extra_params={"cache_control": {"type": "ephemeral"}}).base_params()
    assert caching.check_shared_prefix(params).automatic


def test_variable_override_then_env(monkeypatch):
    # Airflow resolves Variables from AIRFLOW_VAR_* outside tasks as well.
    monkeypatch.setenv("AIRFLOW_VAR_ANTHROPIC_BATCH_CACHE_MINIMUMS", json.dumps({"claude-haiku-4-5": 1024}))
    assert caching.load_cache_minimums().minimum("claude-haiku-4-5") == 1024
    monkeypatch.setenv(caching.CACHE_MINIMUMS_ENV, json.dumps({"models": {"claude-haiku-4-5": 2048}}))
    assert caching.load_cache_minimums().minimum("claude-haiku-4-5") == 2048
