"""Model outputs through the SDK: structured output, forced tools, truncation, usage and caching."""

from __future__ import annotations

import json
from typing import Literal

import anthropic
import jsonschema
from pydantic import BaseModel, Field

from tests.emulator.conftest import MODEL, client_for, simple_request, wait_ended


class Review(BaseModel):
    product: str
    stars: int = Field(ge=1, le=5)
    sentiment: Literal["positive", "neutral", "negative"]
    pros: list[str]
    cons: list[str] | None = None


WEATHER_TOOL = {
    "name": "record_weather",
    "description": "Record a forecast",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "celsius": {"type": "number", "minimum": -50, "maximum": 50},
            "conditions": {"type": "array", "items": {"enum": ["sun", "rain", "snow"]}, "minItems": 1},
        },
        "required": ["city", "celsius", "conditions"],
        "additionalProperties": False,
    },
}


def test_parse_returns_a_valid_pydantic_model(client):
    message = client.messages.parse(
        model=MODEL,
        max_tokens=1000,
        messages=[{"role": "user", "content": "Review this kettle"}],
        output_format=Review,
    )
    assert isinstance(message.parsed_output, Review)
    assert 1 <= message.parsed_output.stars <= 5


def test_batch_structured_outputs_validate_against_the_model(client):
    schema = anthropic.transform_schema(Review)
    requests = [
        simple_request(
            f"rv{i}",
            f"Review product number {i}",
            max_tokens=1000,
            output_config={"format": {"type": "json_schema", "schema": schema}},
        )
        for i in range(20)
    ]
    batch = client.messages.batches.create(requests=requests)
    wait_ended(client, batch.id)
    results = list(client.messages.batches.results(batch.id))
    assert len(results) == 20
    for r in results:
        assert r.result.type == "succeeded"
        assert r.result.message.stop_reason == "end_turn"
        Review.model_validate_json(r.result.message.content[0].text)


def test_forced_tool_use_validates_against_input_schema(client):
    message = client.messages.create(
        model=MODEL,
        max_tokens=1000,
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "tool", "name": "record_weather"},
    )
    assert message.stop_reason == "tool_use"
    (block,) = message.content
    assert block.type == "tool_use" and block.name == "record_weather" and block.id.startswith("toolu_")
    jsonschema.validate(block.input, WEATHER_TOOL["input_schema"])

    batch = client.messages.batches.create(
        requests=[
            simple_request(
                f"w{i}",
                f"Weather in city {i}",
                max_tokens=1000,
                tools=[WEATHER_TOOL],
                tool_choice={"type": "tool", "name": "record_weather"},
            )
            for i in range(10)
        ]
    )
    wait_ended(client, batch.id)
    for r in client.messages.batches.results(batch.id):
        assert r.result.message.stop_reason == "tool_use"
        jsonschema.validate(r.result.message.content[0].input, WEATHER_TOOL["input_schema"])


def test_unforced_tools_answer_in_text(client):
    message = client.messages.create(
        model=MODEL, max_tokens=1000, messages=[{"role": "user", "content": "hi"}], tools=[WEATHER_TOOL]
    )
    assert message.stop_reason == "end_turn" and message.content[0].type == "text"


def test_small_max_tokens_stops_with_truncated_json(client):
    schema = anthropic.transform_schema(Review)
    message = client.messages.create(
        model=MODEL,
        max_tokens=5,
        messages=[{"role": "user", "content": "Review it"}],
        output_config={"format": {"type": "json_schema", "schema": schema}},
    )
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 5
    try:
        json.loads(message.content[0].text)
        raise AssertionError("truncated output should not be complete JSON")
    except json.JSONDecodeError:
        pass


def test_count_tokens_matches_usage(client):
    params = {
        "model": MODEL,
        "system": "You are terse. ✓",
        "messages": [
            {"role": "user", "content": "Summarise: the quick brown fox jumps over the lazy dog"},
            {"role": "assistant", "content": [{"type": "text", "text": "A fox jumps."}]},
            {"role": "user", "content": [{"type": "text", "text": "Shorter, please."}]},
        ],
        "tools": [WEATHER_TOOL],
    }
    count = client.messages.count_tokens(**params).input_tokens
    message = client.messages.create(max_tokens=300, **params)
    assert message.usage.input_tokens == count
    # The documented formula, by hand: 3 + tool + system + 3 messages * (3 + text).
    tool_tokens = -(-len(json.dumps(WEATHER_TOOL, sort_keys=True, separators=(",", ":")).encode()) // 4)
    texts = ["Summarise: the quick brown fox jumps over the lazy dog", "A fox jumps.", "Shorter, please."]
    expected = 3 + tool_tokens + -(-len("You are terse. ✓".encode()) // 4)
    expected += sum(3 + -(-len(t.encode()) // 4) for t in texts)
    assert count == expected
    assert message.usage.output_tokens == -(-len(message.content[0].text.encode()) // 4)


def test_cached_system_prefix_is_written_then_read(emulator_factory):
    emu = emulator_factory("--processing-seconds", "0.3")
    client = client_for(emu)
    system = [{"type": "text", "text": "Policy. " * 2200, "cache_control": {"type": "ephemeral"}}]

    def ask(question):
        return client.messages.create(
            model=MODEL, max_tokens=200, system=system, messages=[{"role": "user", "content": question}]
        )

    count = client.messages.count_tokens(
        model=MODEL, system=system, messages=[{"role": "user", "content": "a"}]
    )
    first, second = ask("a"), ask("b")
    prefix = 3 + -(-len(("Policy. " * 2200).encode()) // 4)
    assert first.usage.cache_creation_input_tokens == prefix and first.usage.cache_read_input_tokens == 0
    assert first.usage.cache_creation.ephemeral_5m_input_tokens == prefix
    assert second.usage.cache_read_input_tokens == prefix and second.usage.cache_creation_input_tokens == 0
    u = first.usage
    assert u.input_tokens + u.cache_creation_input_tokens + u.cache_read_input_tokens == count.input_tokens

    # In a batch the prefix is still cached (kept in the emulator's database).
    batch = client.messages.batches.create(
        requests=[
            {
                "custom_id": f"q{i}",
                "params": {
                    "model": MODEL,
                    "max_tokens": 200,
                    "system": system,
                    "messages": [{"role": "user", "content": f"q{i}"}],
                },
            }
            for i in range(4)
        ]
    )
    wait_ended(client, batch.id)
    usages = [r.result.message.usage for r in client.messages.batches.results(batch.id)]
    assert all(u.cache_read_input_tokens == prefix for u in usages)
    assert all(u.service_tier == "batch" for u in usages)


def test_short_prefixes_are_not_cached(client):
    system = [{"type": "text", "text": "short", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    for _ in range(2):
        usage = client.messages.create(
            model=MODEL, max_tokens=100, system=system, messages=[{"role": "user", "content": "x"}]
        ).usage
        assert usage.cache_creation_input_tokens == 0 and usage.cache_read_input_tokens == 0


def test_one_hour_cache_ttl_is_reported_separately(emulator_factory):
    emu = emulator_factory()
    client = client_for(emu)
    system = [{"type": "text", "text": "Rules. " * 2400, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    usage = client.messages.create(
        model=MODEL, max_tokens=100, system=system, messages=[{"role": "user", "content": "x"}]
    ).usage
    assert usage.cache_creation.ephemeral_1h_input_tokens == usage.cache_creation_input_tokens > 0
    assert usage.cache_creation.ephemeral_5m_input_tokens == 0


def test_stop_sequences_stop_the_answer(client):
    messages = [{"role": "user", "content": "Tell me something"}]
    full = client.messages.create(model=MODEL, max_tokens=1000, messages=messages).content[0].text
    stop = full.split()[6]
    cut = client.messages.create(model=MODEL, max_tokens=1000, messages=messages, stop_sequences=[stop])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert full.startswith(cut.content[0].text) and stop not in cut.content[0].text


def test_provider_hook_through_the_anthropic_conn_fixture(anthropic_conn, emulator):
    from airflow.providers.anthropic.hooks.anthropic import AnthropicHook

    hook = AnthropicHook(conn_id=anthropic_conn)
    assert hook.test_connection() == (True, "Connection established!")
    batch = hook.create_batch([simple_request("hook-1")])
    ended = hook.wait_for_batch(batch.id, wait_seconds=0.1, timeout=30)
    assert ended.request_counts.succeeded == 1
    (result,) = list(hook.stream_batch_results(batch.id))
    assert result.custom_id == "hook-1"


def test_cache_min_tokens_flag_lowers_the_threshold(emulator_factory):
    emu = emulator_factory("--cache-min-tokens", "10")
    client = client_for(emu)
    system = [
        {
            "type": "text",
            "text": "Forty bytes of shared instructions here.",
            "cache_control": {"type": "ephemeral"},
        }
    ]
    usages = [
        client.messages.create(
            model=MODEL, max_tokens=100, system=system, messages=[{"role": "user", "content": q}]
        ).usage
        for q in ("a", "b")
    ]
    assert usages[0].cache_creation_input_tokens == 13 and usages[1].cache_read_input_tokens == 13
