"""A full-size batch: 100,000 requests in, 100,000 result lines streamed out."""

from __future__ import annotations

from tests.emulator.conftest import MODEL, client_for, wait_ended

N = 100_000


def test_hundred_thousand_line_results_stream(emulator_factory):
    emu = emulator_factory("--processing-seconds", "0.5")
    client = client_for(emu, timeout=300)
    params = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "ping"}]}
    batch = client.messages.batches.create(
        requests=[{"custom_id": f"r{i}", "params": params} for i in range(N)]
    )
    assert batch.request_counts.processing == N

    ended = wait_ended(client, batch.id, timeout=120)
    assert ended.request_counts.succeeded == N

    seen = set()
    stop_reasons = set()
    for result in client.messages.batches.results(batch.id):
        seen.add(result.custom_id)
        stop_reasons.add(result.result.message.stop_reason)
    assert len(seen) == N and "r0" in seen and f"r{N - 1}" in seen
    assert stop_reasons == {"max_tokens"}  # 16 tokens is too short for the stand-in's answers


def test_results_are_sent_chunked_not_as_one_body(emulator_factory):
    import httpx2

    emu = emulator_factory("--processing-seconds", "0.1")
    client = client_for(emu)
    params = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "ping"}]}
    batch = client.messages.batches.create(
        requests=[{"custom_id": f"r{i}", "params": params} for i in range(5000)]
    )
    ended = wait_ended(client, batch.id)
    headers = {"x-api-key": emu.api_key, "anthropic-version": "2026-10-21"}
    with httpx2.stream("GET", ended.results_url, headers=headers) as response:
        assert response.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in response.headers
        n_lines = sum(chunk.count(b"\n") for chunk in response.iter_bytes())
    assert n_lines == 5000
