"""Prompt caching conformance: per-model minimum cacheable prefix, automatic caching, concurrency."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from batches_emulator import model
from tests.emulator.conftest import client_for, wait_ended

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugins"))
from anthropic_batch import caching


def system_of(n_tokens: int, ttl: str = "1h") -> list[dict]:
    """A system block whose prefix (3 overhead + text) is exactly ``n_tokens`` emulator tokens."""
    return [
        {"type": "text", "text": "abcd" * (n_tokens - 3), "cache_control": {"type": "ephemeral", "ttl": ttl}}
    ]


def ask(client, model_id: str, system, question: str = "q", **kwargs):
    return client.messages.create(
        model=model_id,
        max_tokens=50,
        system=system,
        messages=[{"role": "user", "content": question}],
        **kwargs,
    ).usage


@pytest.fixture
def client(emulator_factory):
    return client_for(emulator_factory("--processing-seconds", "0.5"))


def test_the_emulator_table_mirrors_the_library_table():
    assert dict(caching.builtin_cache_minimums().models) == model.CACHE_MIN_TOKENS
    assert model.DEFAULT_CACHE_MIN_TOKENS == caching.DEFAULT_MIN_CACHEABLE_TOKENS
    assert model.CACHE_MIN_TOKENS_AS_OF == caching.CACHE_MINIMUMS_AS_OF


@pytest.mark.parametrize(
    ("model_id", "minimum"),
    [
        ("claude-haiku-4-5", 4096),
        ("claude-sonnet-4-5", 1024),
        ("claude-opus-4-6", 4096),
        ("claude-opus-5", 512),
    ],
)
def test_below_the_minimum_nothing_is_cached_at_the_minimum_written_then_read(client, model_id, minimum):
    below = system_of(minimum - 1)
    for question in ("a", "b"):
        usage = ask(client, model_id, below, question)
        assert (usage.cache_creation_input_tokens, usage.cache_read_input_tokens) == (0, 0)
        assert usage.input_tokens == minimum - 1 + 3 + 1  # the whole prompt, as plain input, no error
    at = system_of(minimum)
    first, second = ask(client, model_id, at, "a"), ask(client, model_id, at, "b")
    assert (first.cache_creation_input_tokens, first.cache_read_input_tokens) == (minimum, 0)
    assert first.cache_creation.ephemeral_1h_input_tokens == minimum
    assert (second.cache_creation_input_tokens, second.cache_read_input_tokens) == (0, minimum)


def test_a_prefix_cached_for_sonnet_is_not_cached_for_haiku(client):
    system = system_of(2000)
    sonnet = [ask(client, "claude-sonnet-4-5", system, q) for q in "ab"]
    haiku = [ask(client, "claude-haiku-4-5", system, q) for q in "ab"]
    assert [u.cache_read_input_tokens for u in sonnet] == [0, 2000]
    assert all(u.cache_creation_input_tokens == u.cache_read_input_tokens == 0 for u in haiku)


def test_automatic_caching_writes_then_reads(client):
    """A top-level cache_control (SDK 2.x MessageCreateParams.cache_control) caches up to the last block."""
    text = "Long shared document. " * 800
    kwargs = {"cache_control": {"type": "ephemeral"}}
    first, second = (
        client.messages.create(
            model="claude-haiku-4-5", max_tokens=50, messages=[{"role": "user", "content": text}], **kwargs
        ).usage
        for _ in range(2)
    )
    whole = first.input_tokens + first.cache_creation_input_tokens
    assert first.cache_creation_input_tokens == whole - 0 and first.input_tokens == 0
    assert first.cache_creation.ephemeral_5m_input_tokens == whole
    assert (second.cache_creation_input_tokens, second.cache_read_input_tokens) == (0, whole)
    # Below the minimum, automatic caching silently does nothing either.
    short = client.messages.create(
        model="claude-haiku-4-5", max_tokens=50, messages=[{"role": "user", "content": "short"}], **kwargs
    ).usage
    assert short.cache_creation_input_tokens == short.cache_read_input_tokens == 0


def test_automatic_caching_in_batch_params_writes_then_reads(client):
    text = "Shared reference text. " * 800
    params = {
        "model": "claude-haiku-4-5",
        "max_tokens": 50,
        "cache_control": {"type": "ephemeral", "ttl": "1h"},
        "messages": [{"role": "user", "content": text}],
    }
    first = client.messages.batches.create(requests=[{"custom_id": "one", "params": params}])
    wait_ended(client, first.id)
    (written,) = [r.result.message.usage for r in client.messages.batches.results(first.id)]
    assert written.cache_creation.ephemeral_1h_input_tokens == written.cache_creation_input_tokens > 4096
    second = client.messages.batches.create(requests=[{"custom_id": "two", "params": params}])
    wait_ended(client, second.id)
    (read,) = [r.result.message.usage for r in client.messages.batches.results(second.id)]
    assert read.cache_read_input_tokens == written.cache_creation_input_tokens
    assert read.cache_creation_input_tokens == 0


def test_in_a_cold_batch_only_requests_started_after_the_first_write_finished_read(client):
    system = system_of(4200)
    batch = client.messages.batches.create(
        requests=[
            {
                "custom_id": f"r{i}",
                "params": {
                    "model": "claude-haiku-4-5",
                    "max_tokens": 50,
                    "system": system,
                    "messages": [{"role": "user", "content": f"ticket {i}"}],
                },
            }
            for i in range(40)
        ]
    )
    wait_ended(client, batch.id)
    usages = [r.result.message.usage for r in client.messages.batches.results(batch.id)]
    writes = sum(1 for u in usages if u.cache_creation_input_tokens == 4200)
    reads = sum(1 for u in usages if u.cache_read_input_tokens == 4200)
    assert writes + reads == 40
    # The requests running while the first write was in flight all missed and wrote too.
    assert 2 <= writes < 40 // 2 and reads > 40 // 2


def test_the_minimum_can_be_overridden_per_model(emulator_factory):
    client = client_for(emulator_factory("--cache-min-tokens", "claude-haiku-4-5=100"))
    system = system_of(200)
    haiku = [ask(client, "claude-haiku-4-5", system, q) for q in "ab"]
    opus = [ask(client, "claude-opus-4-6", system, q) for q in "ab"]
    assert [u.cache_read_input_tokens for u in haiku] == [0, 200]
    assert all(u.cache_read_input_tokens == u.cache_creation_input_tokens == 0 for u in opus)


def test_a_bad_override_is_refused(emulator_factory):
    from batches_emulator.config import parse_settings

    with pytest.raises(SystemExit):
        parse_settings(["--cache-min-tokens", "claude-haiku-4-5=many"])
    assert parse_settings(["--cache-min-tokens", "10"]).cache_min_tokens == {"*": 10}
