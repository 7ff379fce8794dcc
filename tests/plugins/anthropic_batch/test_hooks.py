"""AnthropicBatchHook against the real SDK and the emulator: streamed create, results resume, orphans,
async."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anthropic
import pytest

from anthropic_batch.batch_requests import write_chunk
from anthropic_batch.hooks import (
    AmbiguousCreateError,
    AnthropicBatchHook,
    backoff_delay,
    custom_id_of,
    retry_after_seconds,
    split_lines,
    total_requests,
)

MODEL = "claude-haiku-4-5"


def request_line(custom_id: str, text: str = "hello") -> bytes:
    params = {"model": MODEL, "max_tokens": 32, "messages": [{"role": "user", "content": text}]}
    return json.dumps({"custom_id": custom_id, "params": params}, separators=(",", ":")).encode()


def make_chunk(directory: Path, n: int, *, index: int = 0, prefix: str = "r") -> dict:
    """A real chunk file ({dir}/requests/chunk-NNNNN.jsonl) written by batch_requests; its ChunkInfo."""
    path = directory / "requests" / f"chunk-{index:05d}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_chunk((request_line(f"{prefix}{i}", f"text {i}") for i in range(n)), str(path), index)


def use_emulator(monkeypatch: pytest.MonkeyPatch, emu, conn_id: str = "anthropic_default") -> str:
    """Point an Airflow connection (env) at an emulator; returns the conn id."""
    conn = {"conn_type": "anthropic", "password": emu.api_key, "host": emu.base_url}
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))
    return conn_id


def sdk_client(emu, **kwargs) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=emu.api_key, base_url=emu.base_url, **kwargs)


def wait_ended(client: anthropic.Anthropic, batch_id: str, timeout: float = 30.0):
    """Poll (a condition with a deadline) until the batch has ended."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        batch = client.messages.batches.retrieve(batch_id)
        if batch.processing_status == "ended":
            return batch
        assert time.monotonic() < deadline, f"batch {batch_id} did not end in {timeout}s"
        time.sleep(0.1)


def no_sleep(_: float) -> None:
    return None


# -- pure helpers --------------------------------------------------------------------------------
def test_split_lines_handles_lines_across_chunks_and_a_torn_end():
    chunks = [b'{"a":1}\n{"b"', b":2}\n", b'{"c":3}']
    assert list(split_lines(chunks)) == [(b'{"a":1}', True), (b'{"b":2}', True), (b'{"c":3}', False)]
    assert list(split_lines([b"x\n", b"", b"\n"])) == [(b"x", True)]


def test_custom_id_of_uses_prefix_or_falls_back_to_json():
    assert custom_id_of(b'{"custom_id":"a-1_B","result":{}}') == "a-1_B"
    # A nested "custom_id" must not fool it: the top-level one is not first here.
    line = b'{"result":{"x":{"custom_id":"nested"}},"custom_id":"top"}'
    assert custom_id_of(line) == "top"


def test_retry_after_and_backoff():
    class Err(Exception):
        def __init__(self, headers):
            self.response = type("R", (), {"headers": headers})()

    assert retry_after_seconds(Err({"retry-after-ms": "250"}), 9) == 0.25
    assert retry_after_seconds(Err({"retry-after": "3"}), 9) == 3
    assert retry_after_seconds(Err({}), 9) == 9
    for attempt in range(8):
        assert 0.5 <= backoff_delay(attempt, 1.0, 10.0) <= 10.0


# -- against the emulator ------------------------------------------------------------------------
def test_streamed_create_sends_every_request(emulator, anthropic_conn, tmp_path):
    info = make_chunk(tmp_path, 250)
    hook = AnthropicBatchHook(anthropic_conn)
    batch = hook.create_batch_from_chunk(info["path"])
    assert batch.id.startswith("msgbatch_")
    assert total_requests(batch) == 250
    ended = wait_ended(sdk_client(emulator), batch.id)
    lines = list(hook.iter_result_lines(batch.id))
    assert ended.request_counts.succeeded + ended.request_counts.errored == 250
    assert sorted(custom_id_of(line) for line in lines) == sorted(f"r{i}" for i in range(250))


def test_create_retries_a_429_without_duplicating(emulator_factory, monkeypatch, tmp_path):
    emu = emulator_factory("--http-fault", "create:429:0.5", "--seed", "3", "--processing-seconds", "1")
    conn_id = use_emulator(monkeypatch, emu, "faulty")
    info = make_chunk(tmp_path, 5)
    for _ in range(4):
        AnthropicBatchHook(conn_id, sleep=no_sleep).create_batch_from_chunk(info["path"])
    assert len(list(sdk_client(emu).messages.batches.list(limit=100))) == 4


def test_ambiguous_create_is_never_resent_blindly(emulator_factory, monkeypatch, tmp_path):
    # create_after: the emulator creates the batch, then answers 500 (the response is "lost").
    emu = emulator_factory("--http-fault", "create_after:500:1.0", "--processing-seconds", "1")
    conn_id = use_emulator(monkeypatch, emu, "lossy")
    info = make_chunk(tmp_path, 7)
    before = datetime.now(UTC)
    with pytest.raises(AmbiguousCreateError, match="may exist") as err:
        AnthropicBatchHook(conn_id, sleep=no_sleep).create_batch_from_chunk(info["path"])
    assert err.value.started >= before
    listed = list(sdk_client(emu).messages.batches.list(limit=100))
    assert len(listed) == 1 and total_requests(listed[0]) == 7


def test_iter_result_lines_resumes_a_dropped_stream_without_duplicates(
    emulator_factory, monkeypatch, tmp_path
):
    emu = emulator_factory("--drop-results-after-lines", "40", "--processing-seconds", "0.5")
    conn_id = use_emulator(monkeypatch, emu, "droppy")
    info = make_chunk(tmp_path, 120)
    resumes: list[float] = []
    hook = AnthropicBatchHook(conn_id, sleep=resumes.append)  # the hook sleeps once before each resume
    batch = hook.create_batch_from_chunk(info["path"])
    wait_ended(sdk_client(emu), batch.id)
    ids = [custom_id_of(line) for line in hook.iter_result_lines(batch.id)]
    assert len(resumes) == 1  # the drop really happened, and was resumed once
    assert len(ids) == 120
    assert len(set(ids)) == 120
    for line in hook.iter_result_lines(batch.id):
        assert json.loads(line)["result"]["type"] in {"succeeded", "errored"}


def test_iter_result_lines_tolerates_early_404(emulator_factory, monkeypatch, tmp_path):
    emu = emulator_factory("--early-404-seconds", "0.5", "--processing-seconds", "0.2")
    conn_id = use_emulator(monkeypatch, emu, "early")
    info = make_chunk(tmp_path, 3)
    hook = AnthropicBatchHook(conn_id)  # real sleeps: the 404 window must actually pass
    batch = hook.create_batch_from_chunk(info["path"])
    assert hook.get_batch(batch.id).id == batch.id
    ended = hook.get_batch(batch.id)
    while ended.processing_status != "ended":
        ended = hook.get_batch(batch.id)
    assert len(list(hook.iter_result_lines(batch.id))) == 3


def test_find_orphan_batches_matches_size_and_time(emulator_factory, monkeypatch, tmp_path):
    emu = emulator_factory("--processing-seconds", "5")
    conn_id = use_emulator(monkeypatch, emu, "orphans")
    hook = AnthropicBatchHook(conn_id)
    before = datetime.now(UTC) - timedelta(seconds=5)
    three = hook.create_batch_from_chunk(make_chunk(tmp_path / "a", 3)["path"])
    hook.create_batch_from_chunk(make_chunk(tmp_path / "b", 4)["path"])
    assert [b.id for b in hook.find_orphan_batches(before, 3)] == [three.id]
    assert hook.find_orphan_batches(datetime.now(UTC) + timedelta(minutes=5), 3) == []
    with pytest.raises(ValueError, match="timezone-aware"):
        hook.find_orphan_batches(datetime.now(), 3)


async def test_async_get_and_cancel(emulator_factory, monkeypatch, tmp_path):
    emu = emulator_factory("--processing-seconds", "30")
    conn_id = use_emulator(monkeypatch, emu, "asyncy")
    hook = AnthropicBatchHook(conn_id)
    batch = hook.create_batch_from_chunk(make_chunk(tmp_path, 2)["path"])
    assert (await hook.aget_batch(batch.id)).processing_status == "in_progress"
    canceled = await hook.acancel_batch(batch.id)
    assert canceled.processing_status in {"canceling", "ended"}
    assert canceled.cancel_initiated_at is not None


def test_bad_key_is_fatal(emulator, monkeypatch, tmp_path):
    conn = {"conn_type": "anthropic", "password": "wrong-key", "host": emulator.base_url}
    monkeypatch.setenv("AIRFLOW_CONN_BADKEY", json.dumps(conn))
    with pytest.raises(anthropic.AuthenticationError):
        AnthropicBatchHook("badkey", sleep=no_sleep).create_batch_from_chunk(make_chunk(tmp_path, 1)["path"])


# -- the provider's public API only (issue 8) -------------------------------------------------------
def _conn(monkeypatch, conn_id: str, **extra) -> str:
    conn = {"conn_type": "anthropic", "password": "sk-test", "host": "http://127.0.0.1:9", "extra": extra}
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))
    return conn_id


def test_batch_calls_keep_the_providers_platform_check(monkeypatch, tmp_path):
    """Bedrock serves no Message Batches API: every batch call fails at once, naming the platform."""
    from airflow.providers.anthropic.exceptions import AnthropicError

    hook = AnthropicBatchHook(_conn(monkeypatch, "on_bedrock", platform="bedrock", aws_region="us-east-1"))
    calls = [
        lambda: hook.get_batch("msgbatch_x"),
        lambda: hook.cancel_batch("msgbatch_x"),
        lambda: hook.find_orphan_batches(datetime.now(UTC), 1),
        lambda: list(hook.iter_result_lines("msgbatch_x")),
        lambda: hook.create_batch_from_chunk(make_chunk(tmp_path, 1)["path"]),
    ]
    for call in calls:
        with pytest.raises(AnthropicError, match="bedrock"):
            call()


async def test_shared_pool_client_keeps_the_connection_and_the_retry_policy(monkeypatch):
    from anthropic_batch.hooks import DEFAULT_MAX_RETRIES, shared_async_http_client

    client = await AnthropicBatchHook(_conn(monkeypatch, "shared_default")).get_async_conn(shared_http=True)
    assert client._client is shared_async_http_client()  # the loop's pool, no client of its own
    assert (client.api_key, str(client.base_url).rstrip("/")) == ("sk-test", "http://127.0.0.1:9")
    assert client.max_retries == DEFAULT_MAX_RETRIES
    configured = _conn(monkeypatch, "shared_zero", anthropic_client_kwargs={"max_retries": 0, "timeout": 7})
    client = await AnthropicBatchHook(configured).get_async_conn(shared_http=True)
    assert (client.max_retries, client.timeout) == (0, 7)
    own = await AnthropicBatchHook(configured).get_async_conn()
    assert own._client is not shared_async_http_client() and own.max_retries == 0
    await own.close()


def test_sync_client_retry_policy(monkeypatch):
    from anthropic_batch.hooks import DEFAULT_MAX_RETRIES

    assert AnthropicBatchHook(_conn(monkeypatch, "sync_default")).conn.max_retries == DEFAULT_MAX_RETRIES
    configured = _conn(monkeypatch, "sync_one", anthropic_client_kwargs={"max_retries": 1})
    assert AnthropicBatchHook(configured).conn.max_retries == 1
