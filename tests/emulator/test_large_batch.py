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


def test_a_large_results_download_does_not_hold_up_other_requests(emulator_factory):
    """While a 100k batch is finalised and its results stream out, another batch's retrieve stays fast."""
    import threading
    import time

    import httpx2

    emu = emulator_factory("--processing-seconds", "0.5")
    client = client_for(emu, timeout=300)
    params = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "ping"}]}
    big = client.messages.batches.create(
        requests=[{"custom_id": f"r{i}", "params": params} for i in range(N)]
    )
    small = client.messages.batches.create(requests=[{"custom_id": "s", "params": params}])
    done = threading.Event()
    downloaded: list[int] = []

    def download() -> None:
        # Raw bytes, not the SDK's objects: parsing 100k lines here would contend for this test
        # process's GIL and slow down the retrieves measured below, which is not the emulator's doing.
        try:
            ended = wait_ended(client, big.id, timeout=120)
            headers = {"x-api-key": emu.api_key, "anthropic-version": "2026-10-21"}
            with httpx2.stream("GET", ended.results_url, headers=headers, timeout=300) as response:
                downloaded.append(sum(chunk.count(b"\n") for chunk in response.iter_bytes()))
        finally:
            done.set()

    worker = threading.Thread(target=download, daemon=True)
    worker.start()
    latencies = []
    deadline = time.monotonic() + 180
    while not done.is_set():
        assert time.monotonic() < deadline, "the 100k download did not finish in time"
        t0 = time.monotonic()
        client.messages.batches.retrieve(small.id)
        latencies.append(time.monotonic() - t0)
    worker.join(timeout=10)
    assert downloaded == [N]
    assert len(latencies) > 10
    assert max(latencies) < 1.0, f"a retrieve waited {max(latencies):.2f}s behind the large batch"
