"""sync_runner against the emulator: batch-format lines, retries through HTTP faults, bounded window."""

from __future__ import annotations

import json
import socket
import time

import anthropic
import pytest

from anthropic_batch.sync_runner import call_one, run_requests_sync

MODEL = "claude-haiku-4-5"


def _requests(n: int, *, prefix: str = "req", **extra) -> list[dict]:
    return [
        {
            "custom_id": f"{prefix}-{i:05d}",
            "params": {
                "model": MODEL,
                "max_tokens": 64,
                "messages": [{"role": "user", "content": f"Say something about item {i}."}],
                **extra,
            },
        }
        for i in range(n)
    ]


def _client(server, **kwargs) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=server.api_key, base_url=server.base_url, **kwargs)


def _parse(lines: list[bytes]) -> dict[str, dict]:
    by_id: dict[str, dict] = {}
    for line in lines:
        assert b"\n" not in line  # same contract as AnthropicBatchHook.iter_result_lines
        obj = json.loads(line)
        assert set(obj) == {"custom_id", "result"}
        assert obj["custom_id"] not in by_id, "duplicate result line"
        by_id[obj["custom_id"]] = obj
    return by_id


def test_every_request_yields_one_succeeded_line_in_batch_format(emulator):
    requests = _requests(25)
    lines = list(run_requests_sync(requests, _client(emulator), concurrency=4))
    by_id = _parse(lines)
    assert set(by_id) == {r["custom_id"] for r in requests}
    for obj in by_id.values():
        result = obj["result"]
        assert result["type"] == "succeeded"
        message = result["message"]
        assert message["type"] == "message" and message["role"] == "assistant"
        assert message["model"] == MODEL
        assert message["usage"]["input_tokens"] > 0
        assert message["stop_reason"] in {"end_turn", "max_tokens", "stop_sequence", "tool_use"}


def test_lines_match_what_the_batch_results_endpoint_returns(emulator):
    """The same request through a real batch and through the sync runner: same line shape."""
    client = _client(emulator)
    requests = _requests(3, prefix="shape")
    sync_lines = [json.loads(x) for x in run_requests_sync(requests, client)]
    batch = client.messages.batches.create(requests=requests)
    deadline = time.monotonic() + 30
    while client.messages.batches.retrieve(batch.id).processing_status != "ended":
        assert time.monotonic() < deadline, "batch did not end"
        time.sleep(0.05)
    batch_lines = [r.to_dict() for r in client.messages.batches.results(batch.id)]
    assert len(batch_lines) == len(sync_lines) == 3
    for sync_obj, batch_obj in zip(
        sorted(sync_lines, key=lambda o: o["custom_id"]),
        sorted(batch_lines, key=lambda o: o["custom_id"]),
        strict=True,
    ):
        assert sync_obj["custom_id"] == batch_obj["custom_id"]
        assert sync_obj["result"]["type"] == batch_obj["result"]["type"] == "succeeded"
        assert set(batch_obj["result"]["message"]) <= set(sync_obj["result"]["message"])


def test_http_faults_are_retried_until_every_request_succeeds(emulator_factory):
    server = emulator_factory(
        "--http-fault", "messages:529:0.3", "--http-fault", "messages:429:0.1", "--seed", "7"
    )
    requests = _requests(30, prefix="flaky")
    lines = list(run_requests_sync(requests, _client(server), concurrency=4, max_retries=10))
    by_id = _parse(lines)
    assert set(by_id) == {r["custom_id"] for r in requests}
    assert all(obj["result"]["type"] == "succeeded" for obj in by_id.values())


def test_exhausted_retries_become_errored_lines_with_the_api_error_type(emulator_factory):
    server = emulator_factory("--http-fault", "messages:500:1.0")
    requests = _requests(4, prefix="down")
    by_id = _parse(list(run_requests_sync(requests, _client(server), concurrency=2, max_retries=0)))
    assert set(by_id) == {r["custom_id"] for r in requests}
    for obj in by_id.values():
        result = obj["result"]
        assert result["type"] == "errored"
        error = result["error"]
        assert error["type"] == "error"
        assert error["error"]["type"] in {"api_error", "overloaded_error", "rate_limit_error"}
        assert error["error"]["message"]


def test_invalid_request_is_an_errored_line_and_does_not_affect_the_others(emulator):
    good = _requests(3, prefix="good")
    bad = {"custom_id": "bad-0", "params": {"model": MODEL, "max_tokens": 64, "messages": []}}
    by_id = _parse(list(run_requests_sync([*good, bad], _client(emulator), concurrency=2)))
    assert by_id["bad-0"]["result"]["type"] == "errored"
    assert by_id["bad-0"]["result"]["error"]["error"]["type"] == "invalid_request_error"
    assert all(by_id[r["custom_id"]]["result"]["type"] == "succeeded" for r in good)


def test_connection_refused_becomes_a_retriable_errored_line():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port any more.
    client = anthropic.Anthropic(api_key="k", base_url=f"http://127.0.0.1:{port}")
    result = call_one(client.with_options(max_retries=0), _requests(1)[0])
    assert result["custom_id"] == "req-00000"
    assert result["result"]["type"] == "errored"
    assert result["result"]["error"]["error"]["type"] == "api_error"


def test_in_flight_window_is_bounded_and_input_consumed_lazily(emulator):
    concurrency = 3
    pulled = 0

    def source():
        nonlocal pulled
        for request in _requests(40, prefix="lazy"):
            pulled += 1
            yield request

    yielded = 0
    for _ in run_requests_sync(source(), _client(emulator), concurrency=concurrency):
        yielded += 1
        # Never more than the window outstanding beyond what has been handed back.
        assert pulled - yielded <= 2 * concurrency
    assert yielded == pulled == 40


def test_stopping_early_returns_promptly_without_draining_the_input(emulator):
    pulled = 0

    def source():
        nonlocal pulled
        for request in _requests(1000, prefix="early"):
            pulled += 1
            yield request

    lines = run_requests_sync(source(), _client(emulator), concurrency=2)
    first = next(lines)
    lines.close()
    assert json.loads(first)["result"]["type"] == "succeeded"
    assert pulled <= 2 * 2 + 1


def test_concurrency_must_be_positive(emulator):
    with pytest.raises(ValueError, match="concurrency"):
        list(run_requests_sync(_requests(1), _client(emulator), concurrency=0))
