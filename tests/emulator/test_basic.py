"""Core round trip through the official SDK: create, poll, results, messages, count_tokens, models."""

from __future__ import annotations

from anthropic.types.messages import MessageBatchIndividualResponse

from tests.emulator.conftest import MODEL, simple_request, wait_ended


def test_batch_round_trip(client):
    requests = [simple_request(f"r-{i}", f"question {i}") for i in range(7)]
    batch = client.messages.batches.create(requests=requests)
    assert batch.processing_status == "in_progress"
    assert batch.request_counts.processing == 7
    assert batch.results_url is None
    assert (batch.expires_at - batch.created_at).total_seconds() == 86400

    ended = wait_ended(client, batch.id)
    assert ended.request_counts.succeeded == 7
    assert ended.request_counts.processing == 0
    assert ended.ended_at is not None
    assert ended.results_url.startswith(f"{client.base_url}".rstrip("/"))

    results = list(client.messages.batches.results(batch.id))
    assert all(isinstance(r, MessageBatchIndividualResponse) for r in results)
    assert sorted(r.custom_id for r in results) == sorted(r["custom_id"] for r in requests)
    for r in results:
        assert r.result.type == "succeeded"
        assert r.result.message.model == MODEL
        assert r.result.message.content[0].text


def test_sync_message_and_count_tokens_agree(client):
    messages = [{"role": "user", "content": "How many tokens is this sentence, roughly?"}]
    message = client.messages.create(model=MODEL, max_tokens=500, messages=messages)
    count = client.messages.count_tokens(model=MODEL, messages=messages)
    assert message.usage.input_tokens == count.input_tokens
    assert message.stop_reason == "end_turn"
    again = client.messages.create(model=MODEL, max_tokens=500, messages=messages)
    assert again.content[0].text == message.content[0].text
