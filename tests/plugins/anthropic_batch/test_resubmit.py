"""ResubmitFailuresOperator against the emulator with fault rates, through real deferrals."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import anthropic
import pyarrow.parquet as pq
import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException, TaskDeferred

from anthropic_batch.batch_requests import iter_chunk_requests
from anthropic_batch.collection import merge_record_path
from anthropic_batch.operators.collect import CollectResultsOperator
from anthropic_batch.operators.resubmit import (
    ResubmitFailuresOperator,
    grow_max_tokens,
    resubmit_state_path,
)
from anthropic_batch.triggers import BatchPollTrigger
from tests.plugins.anthropic_batch._operator_context import (
    INCLUDE_DIR,
    make_context,
    prepare_run,
    submit_chunks,
    ticket_records,
    use_emulator,
    wait_ended,
)

STRICT_SCHEMA = '''
from pydantic import BaseModel, field_validator


class StrictTicket(BaseModel):
    """Valid JSON per the schema, but a validator the model's answers never satisfy."""

    category: str
    priority: str
    sentiment: str
    summary: str
    product: str | None

    @field_validator("summary")
    @classmethod
    def must_cite_policy(cls, value: str) -> str:
        if "POLICY-7" not in value:
            raise ValueError("summary must cite POLICY-7")
        return value
'''


def _local(url: str) -> str:
    return url.removeprefix("file://")


def _first_event(trigger: BatchPollTrigger) -> dict:
    async def first():
        async for event in trigger.run():
            return event.payload
        raise AssertionError("trigger ended without an event")

    return asyncio.run(first())


def run_with_deferrals(make_operator, context) -> tuple[str, list[TaskDeferred]]:
    """execute(); on each TaskDeferred run the trigger (rebuilt from its serialised form, as the
    triggerer does) to its event and resume on a FRESH operator instance with the event only (as
    ``dag.test()`` does: it drops the deferral kwargs). Returns the result."""
    deferrals: list[TaskDeferred] = []
    try:
        return make_operator().execute(context), deferrals
    except TaskDeferred as deferred:
        current = deferred
    while True:
        deferrals.append(current)
        # The loop's state is on storage, not in the deferral; neither holds a secret.
        assert not current.kwargs
        classpath, trigger_kwargs = current.trigger.serialize()
        assert classpath == "anthropic_batch.triggers.BatchPollTrigger"
        assert "emulator-key" not in json.dumps(trigger_kwargs)
        operator = make_operator()
        state_path = Path(_local(str(resubmit_state_path(operator.work_dir))))
        assert "emulator-key" not in state_path.read_text()
        event = _first_event(BatchPollTrigger(**trigger_kwargs))
        try:
            return getattr(operator, current.method_name)(context, event=event), deferrals
        except TaskDeferred as deferred:
            current = deferred


def _collect_all(run, handles) -> list[str]:
    from anthropic_batch.hooks import AnthropicBatchHook

    paths = []
    for i, handle in enumerate(handles):
        if handle["mode"] == "batch":
            wait_ended(AnthropicBatchHook(), handle["batch_id"])
        op = CollectResultsOperator(task_id="collect", handle=handle, work_dir=run.work_dir)
        paths.append(op.execute(make_context(task_id="batch.collect", map_index=i)))
    return paths


def _operator_factory(run, paths, **kwargs):
    def make():
        return ResubmitFailuresOperator(
            task_id="resubmit",
            results_paths=paths,
            work_dir=run.work_dir,
            poll_interval=0.2,
            max_poll_interval=0.5,
            **kwargs,
        )

    return make


def _batch_count(emu) -> int:
    client = anthropic.Anthropic(api_key=emu.api_key, base_url=emu.base_url)
    return sum(1 for _ in client.messages.batches.list(limit=100))


def test_retriable_failures_recover_and_permanent_ones_are_dead_lettered(
    tmp_path, emulator_factory, monkeypatch
):
    emu = emulator_factory(
        "--processing-seconds", "0.5",
        "--error-rate", "api_error=0.25",
        "--error-rate", "invalid_request_error=0.1",
        "--truncate-rate", "0.15",
        "--seed", "11",
    )  # fmt: skip
    use_emulator(monkeypatch, emu)
    records = ticket_records(60)
    run = prepare_run(tmp_path, records, per_chunk=25, max_tokens=300)
    paths = _collect_all(run, submit_chunks(run))
    first_rows = [r for p in paths for r in pq.read_table(_local(p)).to_pylist()]
    retriable_first = {
        r["custom_id"]
        for r in first_rows
        if (r["status"] == "errored" and r["error_type"] == "api_error") or r["stop_reason"] == "max_tokens"
    }
    permanent_first = {r["custom_id"] for r in first_rows if r["error_type"] == "invalid_request_error"}
    truncated_first = {r["custom_id"] for r in first_rows if r["stop_reason"] == "max_tokens"}
    assert retriable_first and permanent_first and truncated_first, "the fault rates produced no mix"

    context = make_context(task_id="resubmit")
    merged_path, deferrals = run_with_deferrals(_operator_factory(run, paths, max_attempts=3), context)
    assert deferrals, "retries must wait in the triggerer, not in the worker"

    merged = pq.read_table(_local(merged_path)).to_pylist()
    ids = [r["custom_id"] for r in merged]
    # exactly one row per prepared request (custom_id = key + "-" + request digest)
    assert sorted(cid.rsplit("-", 1)[0] for cid in ids) == sorted(r["ticket_id"] for r in records)
    by_id = {r["custom_id"]: r for r in merged}
    recovered = [cid for cid in retriable_first if by_id[cid]["status"] == "succeeded"]
    assert recovered and all(by_id[cid]["attempt"] >= 2 for cid in recovered)
    assert all(by_id[cid]["attempt"] == 1 for cid in permanent_first)

    dead = pq.read_table(Path(_local(run.work_dir)) / "dead_letter.parquet").to_pylist()
    dead_ids = {r["custom_id"] for r in dead}
    assert permanent_first <= dead_ids
    assert all(r["stage"] == "collect" and r["reason"] and r["attempts"] >= 1 for r in dead)
    # Every row is either usable or dead-lettered with its reason; nothing is silently lost.
    for row in merged:
        if row["status"] != "succeeded":
            assert row["custom_id"] in dead_ids

    # Attempt 2's chunk holds only resubmitted requests; truncated ones got a larger max_tokens.
    retry_chunks = sorted((Path(_local(run.work_dir)) / "requests" / "retry-02").glob("*.jsonl"))
    retried = {r["custom_id"]: r for p in retry_chunks for r in iter_chunk_requests(f"file://{p}")}
    assert set(retried) == retriable_first
    for cid in truncated_first:
        assert retried[cid]["params"]["max_tokens"] == 600
    for cid in retriable_first - truncated_first:
        assert retried[cid]["params"]["max_tokens"] == 300


def test_nothing_retriable_submits_no_new_batch(tmp_path, emulator_factory, monkeypatch):
    emu = emulator_factory("--processing-seconds", "0.5")
    use_emulator(monkeypatch, emu)
    run = prepare_run(tmp_path, ticket_records(12), per_chunk=6)
    paths = _collect_all(run, submit_chunks(run))
    before = _batch_count(emu)
    merged_path, deferrals = run_with_deferrals(
        _operator_factory(run, paths), make_context(task_id="resubmit")
    )
    assert deferrals == []
    assert _batch_count(emu) == before
    merged = pq.read_table(_local(merged_path))
    assert merged.num_rows == 12 and set(merged["status"].to_pylist()) == {"succeeded"}
    assert pq.read_table(Path(_local(run.work_dir)) / "dead_letter.parquet").num_rows == 0
    assert not (Path(_local(run.work_dir)) / "requests" / "retry-02").exists()


def test_missing_results_are_resubmitted(tmp_path, emulator_factory, monkeypatch):
    """A chunk whose collect never ran: its requests are 'missing' and get a new batch."""
    emu = emulator_factory("--processing-seconds", "0.5")
    use_emulator(monkeypatch, emu)
    run = prepare_run(tmp_path, ticket_records(10), per_chunk=5)
    paths = _collect_all(run, submit_chunks(run))
    merged_path, deferrals = run_with_deferrals(
        _operator_factory(run, paths[:1]), make_context(task_id="resubmit")
    )
    assert len(deferrals) == 1
    merged = pq.read_table(_local(merged_path)).to_pylist()
    assert len(merged) == 10 and {r["status"] for r in merged} == {"succeeded"}
    assert sorted(r["attempt"] for r in merged) == [1] * 5 + [2] * 5


def test_a_retried_task_reattaches_instead_of_submitting_again(tmp_path, emulator_factory, monkeypatch):
    emu = emulator_factory(
        "--processing-seconds", "0.5", "--error-rate", "overloaded_error=0.5", "--seed", "2"
    )
    use_emulator(monkeypatch, emu)
    run = prepare_run(tmp_path, ticket_records(12), per_chunk=12)
    paths = _collect_all(run, submit_chunks(run))
    make = _operator_factory(run, paths, max_attempts=2)
    context = make_context(task_id="resubmit")
    with pytest.raises(TaskDeferred) as first:
        make().execute(context)
    n_batches = _batch_count(emu)
    # The worker died while deferred; the task is retried from execute().
    with pytest.raises(TaskDeferred) as second:
        make().execute(make_context(task_id="resubmit", try_number=2))
    assert second.value.trigger.batch_id == first.value.trigger.batch_id
    assert _batch_count(emu) == n_batches
    merged_path, _ = run_with_deferrals(make, context)
    assert pq.read_table(_local(merged_path)).num_rows == 12
    assert _batch_count(emu) == n_batches


def test_fatal_errors_fail_loudly_and_keep_what_was_collected(tmp_path, emulator_factory, monkeypatch):
    emu = emulator_factory(
        "--processing-seconds", "0.5", "--error-rate", "authentication_error=0.3", "--seed", "4"
    )
    use_emulator(monkeypatch, emu)
    run = prepare_run(tmp_path, ticket_records(15), per_chunk=15)
    paths = _collect_all(run, submit_chunks(run))
    before = _batch_count(emu)
    with pytest.raises(AirflowFailException, match="authentication_error"):
        _operator_factory(run, paths)().execute(make_context(task_id="resubmit"))
    assert _batch_count(emu) == before
    work = Path(_local(run.work_dir))
    assert pq.read_table(work / "results" / "merged.parquet").num_rows == 15
    dead = pq.read_table(work / "dead_letter.parquet").to_pylist()
    assert dead and {r["error_type"] for r in dead} == {"authentication_error"}


def test_sync_mode_retries_without_deferring_and_dead_letters_exhausted_rows(tmp_path, anthropic_conn):
    include = tmp_path / "include"
    shutil.copytree(INCLUDE_DIR / "prompts", include / "prompts")
    (include / "schemas").mkdir()
    (include / "schemas" / "strict.py").write_text(STRICT_SCHEMA)
    run = prepare_run(
        tmp_path, ticket_records(4), per_chunk=4, mode="sync",
        output_model="schemas/strict.py:StrictTicket", include_dir=include,
    )  # fmt: skip
    paths = _collect_all(run, submit_chunks(run))
    merged_path, deferrals = run_with_deferrals(
        _operator_factory(run, paths, max_attempts=3), make_context(task_id="resubmit")
    )
    assert deferrals == []
    merged = pq.read_table(_local(merged_path)).to_pylist()
    assert len(merged) == 4
    assert {(r["status"], r["attempt"]) for r in merged} == {("invalid_output", 3)}
    dead = pq.read_table(Path(_local(run.work_dir)) / "dead_letter.parquet").to_pylist()
    assert len(dead) == 4
    assert all("3 attempt" in r["reason"] and "POLICY-7" in r["reason"] for r in dead)


def test_grow_max_tokens_only_touches_max_tokens():
    line = b'{"custom_id":"a","params":{"max_tokens":300,"messages":[{"content":"hi","role":"user"}]}}'
    grown = json.loads(grow_max_tokens(line, 2.0))
    assert grown == {
        "custom_id": "a",
        "params": {"max_tokens": 600, "messages": [{"content": "hi", "role": "user"}]},
    }
    assert json.loads(grow_max_tokens(line, 1000.0))["params"]["max_tokens"] == 128_000


def _state(run) -> dict:
    return json.loads(Path(_local(str(resubmit_state_path(run.work_dir)))).read_text())


def test_a_fresh_instance_resumes_from_storage_with_the_event_only(tmp_path, emulator_factory, monkeypatch):
    """dag.test() resumes with ``{"event": ...}`` only: the loop's state must come from storage."""
    emu = emulator_factory(
        "--processing-seconds", "0.5", "--error-rate", "overloaded_error=0.5", "--seed", "2"
    )  # fmt: skip
    use_emulator(monkeypatch, emu)
    run = prepare_run(tmp_path, ticket_records(12), per_chunk=12)
    paths = _collect_all(run, submit_chunks(run))
    make = _operator_factory(run, paths, max_attempts=2)
    context = make_context(task_id="resubmit")
    with pytest.raises(TaskDeferred) as deferred:
        make().execute(context)
    assert not deferred.value.kwargs  # nothing rides in the deferral
    state = _state(run)
    assert state["phase"] == "waiting" and state["attempt"] == 2
    assert state["handle"]["batch_id"] == deferred.value.trigger.batch_id
    assert state["results_paths"] == paths
    assert state["run_id"] == context["ti"].run_id and state["task_id"] == "resubmit"

    event = _first_event(BatchPollTrigger(**deferred.value.trigger.serialize()[1]))
    merged_path = make().execute_complete(context, event=event)  # a fresh instance, no kwargs

    merged = pq.read_table(_local(merged_path)).to_pylist()
    assert sorted(r["ticket_id"] for r in merged) == [f"T{i:04d}" for i in range(12)]
    assert any(r["attempt"] == 2 for r in merged)
    assert _state(run)["phase"] == "finished"
    record = json.loads(Path(_local(str(merge_record_path(merged_path)))).read_text())
    assert record["attempts"] == 2
    [round_2] = record["rounds"]
    assert round_2["attempt"] == 2 and round_2["batch_ids"] == [event["batch_id"]]
    assert round_2["n_requests"] == sum(round_2["reasons"].values()) > 0
    assert set(round_2["reasons"]) == {"errored: overloaded_error"}
    assert len(record["results_paths"]) == len(paths) + 1


def test_resume_refuses_a_state_that_is_not_its_own(tmp_path, emulator_factory, monkeypatch):
    emu = emulator_factory(
        "--processing-seconds", "0.5", "--error-rate", "overloaded_error=0.5", "--seed", "2"
    )  # fmt: skip
    use_emulator(monkeypatch, emu)
    run = prepare_run(tmp_path, ticket_records(12), per_chunk=12)
    paths = _collect_all(run, submit_chunks(run))
    make = _operator_factory(run, paths, max_attempts=2)
    context = make_context(task_id="resubmit")
    with pytest.raises(TaskDeferred) as deferred:
        make().execute(context)
    batch_id = deferred.value.trigger.batch_id

    # An event about another batch than the one awaited.
    with pytest.raises(AirflowException, match=f"awaits {batch_id}"):
        make().execute_complete(context, event={"status": "ended", "batch_id": "msgbatch_other"})
    # Another run of the same partition replaced the state: resuming the first run must not use it.
    other_run = make_context(task_id="resubmit", run_id="manual__2026-11-02T00:00:00+00:00")
    with pytest.raises(AirflowException, match="not a deferral of this task instance"):
        make().execute_complete(other_run, event={"status": "ended", "batch_id": batch_id})

    # A fresh execute() of the other run starts a new state (the stale one is never resumed) and,
    # being a new run, it can only finish its own loop.
    n_batches = _batch_count(emu)
    with pytest.raises(TaskDeferred):
        make().execute(other_run)
    assert _state(run)["run_id"] == other_run["ti"].run_id
    with pytest.raises(AirflowException, match="not a deferral of this task instance"):
        make().execute_complete(context, event={"status": "ended", "batch_id": batch_id})
    assert _batch_count(emu) == n_batches  # the ledger (per partition) re-attached, nothing paid twice

    # No state at all: a clear error, not a TypeError.
    Path(_local(str(resubmit_state_path(run.work_dir)))).unlink()
    with pytest.raises(AirflowException, match="No resubmit state"):
        make().execute_complete(context, event={"status": "ended", "batch_id": batch_id})


def _retried_requests(run, attempt: int) -> dict[str, dict]:
    chunks = sorted((Path(_local(run.work_dir)) / "requests" / f"retry-{attempt:02d}").glob("*.jsonl"))
    return {r["custom_id"]: r for p in chunks for r in iter_chunk_requests(f"file://{p}")}


@pytest.mark.parametrize("retry_truncated", [None, True])
def test_free_text_truncations_are_retried_only_when_the_pipeline_asks(
    tmp_path, emulator_factory, monkeypatch, retry_truncated
):
    emu = emulator_factory(
        "--processing-seconds", "0.3", "--truncate-rate", "0.3",
        "--error-rate", "api_error=0.2", "--seed", "5",
    )  # fmt: skip
    use_emulator(monkeypatch, emu)
    run = prepare_run(tmp_path, ticket_records(30), per_chunk=30, output_model=None, max_tokens=300)
    paths = _collect_all(run, submit_chunks(run))
    first = pq.read_table(_local(paths[0])).to_pylist()
    truncated = {r["custom_id"] for r in first if r["stop_reason"] == "max_tokens"}
    errored = {r["custom_id"] for r in first if r["status"] == "errored"}
    assert truncated and errored
    merged_path, _ = run_with_deferrals(
        _operator_factory(run, paths, max_attempts=2, retry_truncated=retry_truncated),
        make_context(task_id="resubmit"),
    )
    retried = _retried_requests(run, 2)
    by_id = {r["custom_id"]: r for r in pq.read_table(_local(merged_path)).to_pylist()}
    if retry_truncated is None:  # free text: off by default, the cut-off answer is kept as it is
        assert set(retried) == errored
        assert all((by_id[c]["status"], by_id[c]["attempt"]) == ("succeeded", 1) for c in truncated)
    else:
        assert set(retried) == truncated | errored
        assert all(retried[c]["params"]["max_tokens"] == 600 for c in truncated)
        # Whatever the retry returned, each record keeps a valid answer.
        assert all(by_id[c]["status"] == "succeeded" for c in truncated)
    dead = pq.read_table(Path(_local(run.work_dir)) / "dead_letter.parquet").to_pylist()
    assert not truncated & {r["custom_id"] for r in dead}


def test_later_attempts_resubmit_the_last_line_from_the_right_retry_chunk(
    tmp_path, emulator_factory, monkeypatch
):
    """Retry rounds split into several chunks: attempt 3 finds each line in its attempt-2 chunk."""
    emu = emulator_factory(
        "--processing-seconds", "0.3", "--error-rate", "overloaded_error=0.6", "--seed", "9"
    )
    use_emulator(monkeypatch, emu)
    run = prepare_run(tmp_path, ticket_records(20), per_chunk=10)
    paths = _collect_all(run, submit_chunks(run))
    merged_path, _ = run_with_deferrals(
        _operator_factory(run, paths, max_attempts=3, max_requests_per_chunk=3),
        make_context(task_id="resubmit"),
    )
    second, third = _retried_requests(run, 2), _retried_requests(run, 3)
    assert len(list((Path(_local(run.work_dir)) / "requests" / "retry-02").glob("*.jsonl"))) >= 2
    assert third and set(third) <= set(second)
    assert all(third[c]["params"] == second[c]["params"] for c in third)
    record = json.loads(Path(_local(str(merge_record_path(merged_path)))).read_text())
    assert [r["n_requests"] for r in record["rounds"]] == [len(second), len(third)]
    assert pq.read_table(_local(merged_path)).num_rows == 20


# -- memory: collecting a retry chunk does not load the day's keys (issue 12) ----------------------


def _day_with_a_retry_chunk(work: Path, n: int, retried: list[int]) -> dict:
    """A work dir of ``n`` prepared keys (row groups of 5,000) and a sync-collected retry chunk of
    the requests ``retried`` (spread over every prepared chunk); returns its collect handle."""
    import pyarrow as pa

    (work / "requests").mkdir(parents=True)
    model = "claude-haiku-4-5"
    ids = [f"T{i:08d}-abc" for i in range(n)]
    keys = pa.table(
        {
            "custom_id": ids,
            "ticket_id": [f"T{i:08d}" for i in range(n)],
            "request_fingerprint": [f"fp{i}" for i in range(n)],
            "chunk_index": pa.array([i // 10_000 for i in range(n)], pa.int32()),
        }
    )
    pq.write_table(keys, work / "requests" / "keys.parquet", row_group_size=5_000)
    manifest = {
        "chunks": [
            {
                "index": c,
                "path": str(work / "requests" / f"chunk-{c:05d}.jsonl"),
                "n_requests": min(10_000, n - c * 10_000),
                "n_bytes": 0,
                "fingerprint": f"chunk{c}",
            }
            for c in range((n + 9_999) // 10_000)
        ],
        "n_requests": n,
        "spec": {"key_columns": ["ticket_id"], "model": model},
    }
    (work / "requests" / "manifest.json").write_text(json.dumps(manifest))
    retry = work / "requests" / "retry-02" / "retry-02-chunk-00000.jsonl"
    retry.parent.mkdir(parents=True)
    retry.write_text(
        "".join(
            json.dumps({"custom_id": ids[i], "params": {"model": model, "max_tokens": 8}}) + "\n"
            for i in retried
        )
    )
    message = {
        "id": "msg_1", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 2},
    }  # fmt: skip
    results = work / "sync-results.jsonl"
    results.write_text(
        "".join(
            json.dumps({"custom_id": ids[i], "result": {"type": "succeeded", "message": message}}) + "\n"
            for i in retried
        )
    )
    return {
        "batch_id": "sync_retry",
        "mode": "sync",
        "attempt": 2,
        "chunk_path": str(retry),
        "results_path": str(results),
    }


def test_collecting_a_retry_chunk_keeps_its_own_keys_not_the_days(tmp_path):
    """The retry batch's collect looked up keys for all of keys.parquet (a retry chunk is in no
    manifest chunk): a Python index of the whole day, ~300 bytes a prepared request. It now keeps
    the retry chunk's requests only, so its memory does not grow with the day."""
    import tracemalloc

    from anthropic_batch.collection import collect_batch

    peaks = {}
    for n in (20_000, 80_000):
        work = tmp_path / f"day-{n}"
        retried = list(range(7, n, n // 50))  # 50 requests, from every prepared chunk
        handle = _day_with_a_retry_chunk(work, n, retried)
        tracemalloc.start()
        try:
            stats = collect_batch(None, handle, str(work), attempt=2)
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        rows = pq.read_table(stats["results_path"]).to_pylist()
        assert stats["counts_by_status"] == {"succeeded": 50}
        # Same rows as before: each retried request's own keys and fingerprint.
        assert sorted((r["ticket_id"], r["request_fingerprint"], r["attempt"]) for r in rows) == [
            (f"T{i:08d}", f"fp{i}", 2) for i in retried
        ]
    # Old code: +60,000 prepared requests cost ~10 MB of Python objects; now nothing per request.
    assert peaks[80_000] - peaks[20_000] < 1_000_000, peaks
