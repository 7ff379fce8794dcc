"""Answer reuse (issue 9, item 3): a rerun re-bills only what changed; the optional answer cache.

The end-to-end tests run the real operators (prepare -> submit -> collect -> resubmit/merge ->
publish) against an emulator of their own and count what the emulator received with the SDK's
batch list (every batch, its request_counts).
"""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import anthropic
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from anthropic_batch import answer_reuse
from anthropic_batch.operators.collect import CollectResultsOperator
from anthropic_batch.operators.prepare import PrepareRequestsOperator
from anthropic_batch.operators.publish import PublishPartitionOperator
from anthropic_batch.operators.resubmit import ResubmitFailuresOperator
from anthropic_batch.partition import published_dir
from tests.plugins.anthropic_batch._operator_context import (
    INCLUDE_DIR,
    MODEL,
    Run,
    file_url,
    make_context,
    submit_chunks,
    ticket_records,
    use_emulator,
    wait_ended,
)

SCHEMA = "schemas/support_ticket.py:SupportTicketExtraction"


# -- helpers ------------------------------------------------------------------------------------------


def _prepare(
    tmp_path: Path,
    records: list[dict[str, Any]],
    partition: str,
    *,
    per_chunk: int = 10,
    cache_days: int | None = None,
    mode: str = "batch",
) -> Run:
    root = tmp_path / "root"
    source = tmp_path / f"tickets-{partition}.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    work_dir = file_url(root / "tickets" / "work" / f"date={partition}")
    op = PrepareRequestsOperator(
        task_id="prepare",
        source=str(source),
        key_columns=["ticket_id"],
        prompt_template="prompts/support_ticket.j2",
        model=MODEL,
        max_tokens=512,
        output_model=SCHEMA,
        output_mode="json_schema",
        include_dir=str(INCLUDE_DIR),
        work_dir=work_dir,
        pipeline="tickets",
        partition=partition,
        mode=mode,
        max_requests_per_chunk=per_chunk,
        answer_cache_max_age_days=cache_days,
    )
    chunk_paths = op.execute(make_context(task_id="prepare", partition=partition))
    return Run(root=root, work_dir=work_dir, storage_root=file_url(root), chunk_paths=chunk_paths)


def _run_date(
    tmp_path: Path, records: list[dict[str, Any]], partition: str = "2026-11-01", **kwargs: Any
) -> tuple[Run, dict[str, Any], pa.Table]:
    """prepare -> submit -> wait -> collect -> resubmit (merge) -> publish; (run, summary, data)."""
    from anthropic_batch.hooks import AnthropicBatchHook

    run = _prepare(tmp_path, records, partition, **kwargs)
    paths = []
    for i, handle in enumerate(submit_chunks(run)):
        if handle["mode"] == "batch":
            wait_ended(AnthropicBatchHook(), handle["batch_id"])
        op = CollectResultsOperator(task_id="collect", handle=handle, work_dir=run.work_dir)
        paths.append(op.execute(make_context(task_id="batch.collect", map_index=i, partition=partition)))
    merged = ResubmitFailuresOperator(
        task_id="resubmit", results_paths=paths, work_dir=run.work_dir, max_attempts=1
    ).execute(make_context(task_id="resubmit", partition=partition))
    target = run.root / "tickets" / "extractions" / f"date={partition}"
    summary = PublishPartitionOperator(
        task_id="publish",
        work_dir=run.work_dir,
        merged_path=merged,
        extraction_dir=file_url(target),
        pipeline="tickets",
    ).execute(make_context(task_id="publish", partition=partition))
    return run, summary, pq.read_table(published_dir(target).path + "/data.parquet")


def _requests_received(emu) -> tuple[int, int]:
    """(batches, requests) the emulator received, from the SDK's batch list and request_counts."""
    client = anthropic.Anthropic(api_key=emu.api_key, base_url=emu.base_url, max_retries=0)
    batches = list(client.messages.batches.list(limit=100))
    counts = [b.request_counts for b in batches]
    return len(batches), sum(c.processing + c.succeeded + c.errored + c.canceled + c.expired for c in counts)


def _by_id(table: pa.Table) -> dict[str, dict[str, Any]]:
    return {row["ticket_id"]: row for row in table.to_pylist()}


# -- the headline: edit one, add one, remove one -> exactly two new requests ----------------------------


def test_rerun_with_one_edit_one_add_one_remove_sends_exactly_two_requests(
    tmp_path, emulator_factory, monkeypatch
):
    emu = emulator_factory("--processing-seconds", "0.3")
    use_emulator(monkeypatch, emu)
    records = ticket_records(40)
    _, first_summary, first = _run_date(tmp_path, records)
    assert _requests_received(emu) == (4, 40)
    assert first.num_rows == 40 and first_summary.get("n_reused", 0) == 0

    edited = [dict(r) for r in records]
    edited[5]["body"] = "The screen flickers since the update. Please help."  # chunk 0
    del edited[12]  # chunk 1: removing it shifts every later record one place
    edited.append({**records[0], "ticket_id": "T9999", "body": "A brand new ticket about a charger."})
    _, summary, data = _run_date(tmp_path, edited)

    batches, requests = _requests_received(emu)
    assert (batches - 4, requests - 40) == (1, 2)  # one new batch holding exactly the two changes
    # Exactly one row per current record, none for the removed one.
    assert sorted(data.column("ticket_id").to_pylist()) == sorted(r["ticket_id"] for r in edited)
    before, after = _by_id(first), _by_id(data)
    for custom_id in {r["ticket_id"] for r in edited} - {"T0005", "T9999"}:
        # Unchanged records keep the answer (and the batch) they were paid with; nothing spent now.
        assert after[custom_id]["output_json"] == before[custom_id]["output_json"]
        assert after[custom_id]["batch_id"] == before[custom_id]["batch_id"]
        assert after[custom_id]["attempt"] == 0 and after[custom_id]["cost_usd"] == 0
    new_batch = {after["T0005"]["batch_id"]}
    assert new_batch == {after["T9999"]["batch_id"]} and new_batch.isdisjoint(first_summary["batch_ids"])
    assert after["T0005"]["attempt"] == 1 and after["T0005"]["status"] == "succeeded"
    assert after["T0005"]["request_fingerprint"] != before["T0005"]["request_fingerprint"]
    assert after["T0005"]["output_json"] != before["T0005"]["output_json"]  # the edit got a new answer
    # The summary bills the two new requests and shows what was reused (and had been paid).
    assert summary["n_reused"] == 38 and summary["n_rows"] == 40
    assert summary["batch_ids"] == sorted(new_batch)
    assert summary["cost_usd"] == pytest.approx(after["T0005"]["cost_usd"] + after["T9999"]["cost_usd"])
    paid_before = sum(before[c]["cost_usd"] for c in after if c not in ("T0005", "T9999"))
    assert summary["reused_cost_usd"] == pytest.approx(paid_before, abs=1e-6)


def test_rerun_of_an_unchanged_date_sends_nothing_and_publishes_every_row(
    tmp_path, emulator_factory, monkeypatch
):
    emu = emulator_factory("--processing-seconds", "0.3")
    use_emulator(monkeypatch, emu)
    records = ticket_records(12)
    _, _, first = _run_date(tmp_path, records)
    run, summary, data = _run_date(tmp_path, records)

    assert run.chunk_paths == []
    assert _requests_received(emu) == (2, 12)  # the first run's two batches, nothing since
    assert data.num_rows == 12 and summary["n_reused"] == 12 and summary["cost_usd"] == 0
    assert _by_id(data).keys() == _by_id(first).keys()
    assert all(row["output_json"] == _by_id(first)[cid]["output_json"] for cid, row in _by_id(data).items())


def test_only_successful_valid_answers_are_reused(tmp_path, emulator_factory, monkeypatch):
    """Errors, truncations and invalid output are sent again; only they are."""
    emu = emulator_factory(
        "--processing-seconds", "0.3", "--seed", "7",
        "--error-rate", "overloaded_error=0.2", "--truncate-rate", "0.15", "--invalid-output-rate", "0.15",
    )  # fmt: skip
    use_emulator(monkeypatch, emu)
    records = ticket_records(40)
    _, _, first = _run_date(tmp_path, records)
    rows = first.to_pylist()
    bad = {r["custom_id"] for r in rows if r["status"] != "succeeded" or r["stop_reason"] == "max_tokens"}
    assert {"errored", "invalid_output"} <= {r["status"] for r in rows}
    assert any(r["stop_reason"] == "max_tokens" for r in rows)
    _, sent_before = _requests_received(emu)

    _, summary, data = _run_date(tmp_path, records)

    _, sent = _requests_received(emu)
    assert sent - sent_before == len(bad)
    assert summary["n_reused"] == 40 - len(bad)
    reused = {r["custom_id"] for r in data.to_pylist() if r["attempt"] == 0}
    assert reused == {r["custom_id"] for r in rows} - bad


# -- the answer cache across dates ----------------------------------------------------------------------


def test_answer_cache_lets_a_backfill_reuse_answers_paid_on_other_dates(
    tmp_path, emulator_factory, monkeypatch
):
    emu = emulator_factory("--processing-seconds", "0.3")
    use_emulator(monkeypatch, emu)
    day1 = ticket_records(20)
    # The next day: 15 of the same tickets (same content, so the same requests) and 5 new ones.
    day2 = day1[5:] + [
        {**r, "ticket_id": f"N{i}", "body": f"Another problem, number {i}."} for i, r in enumerate(day1[:5])
    ]
    run1, summary1, data1 = _run_date(tmp_path, day1, "2026-11-01", cache_days=30)
    cache = answer_reuse.cache_dir_for(run1.work_dir, "tickets")
    assert summary1["n_reused"] == 0
    assert sum(pq.read_metadata(f.path).num_rows for f in answer_reuse.iter_cache_files(cache)) == 20

    _, summary2, data2 = _run_date(tmp_path, day2, "2026-11-02", cache_days=30)

    assert _requests_received(emu)[1] == 20 + 5
    assert summary2["n_reused"] == summary2["n_reused_from_cache"] == 15
    assert summary2["reused_cost_usd"] == pytest.approx(
        sum(r["cost_usd"] for r in data1.to_pylist() if r["ticket_id"] in {d["ticket_id"] for d in day2}),
        abs=1e-6,
    )
    assert data2.num_rows == 20
    rows1 = _by_id(data1)
    for row in data2.to_pylist():
        if row["ticket_id"] in rows1:
            assert row["attempt"] == 0 and row["output_json"] == rows1[row["ticket_id"]]["output_json"]


def test_answer_cache_is_off_by_default(tmp_path, emulator_factory, monkeypatch):
    emu = emulator_factory("--processing-seconds", "0.3")
    use_emulator(monkeypatch, emu)
    records = ticket_records(6)
    run1, _, _ = _run_date(tmp_path, records, "2026-11-01")
    _, summary, _ = _run_date(tmp_path, records, "2026-11-02")
    assert summary["n_reused"] == 0 and _requests_received(emu)[1] == 12
    assert list(answer_reuse.iter_cache_files(answer_reuse.cache_dir_for(run1.work_dir, "tickets"))) == []


def _answers(fingerprints: list[str], **overrides: Any) -> pa.Table:
    from anthropic_batch.results import RESULT_SCHEMA

    n = len(fingerprints)
    data = {name: [None] * n for name in RESULT_SCHEMA.names}
    data.update(
        custom_id=[f"c{i}" for i in range(n)],
        status=["succeeded"] * n,
        stop_reason=["end_turn"] * n,
        output_text=["{}"] * n,
        output_json=["{}"] * n,
        cost_usd=[0.01] * n,
        sync_cost_usd=[0.02] * n,
        attempt=[1] * n,
        batch_id=["msgbatch_x"] * n,
        request_fingerprint=fingerprints,
    )
    data.update(overrides)
    return pa.table(data, schema=RESULT_SCHEMA)


def test_cache_lookup_honours_the_maximum_age_and_reads_only_the_buckets_asked_for(tmp_path):
    cache = tmp_path / "cache"
    today = date(2026, 11, 30)
    fps = ["a" * 64, "b" * 64, "c" * 64]
    answer_reuse.write_cache(
        cache, _answers(fps[:2]), partition="2026-10-01", run_id="r1", structured=True,
        today=today - timedelta(days=40),
    )  # fmt: skip
    answer_reuse.write_cache(
        cache, _answers(fps[1:]), partition="2026-11-20", run_id="r2", structured=True,
        today=today - timedelta(days=10),
    )  # fmt: skip
    assert sorted(p.parent.name for p in cache.rglob("*.parquet")) == ["fp=a", "fp=b", "fp=b", "fp=c"]

    found = answer_reuse.lookup_cache(cache, fps, max_age_days=30, structured=True, today=today)
    assert sorted(found.column("request_fingerprint").to_pylist()) == fps[1:]  # "a" is too old
    assert set(found.column("partition").to_pylist()) == {"2026-11-20"}
    found = answer_reuse.lookup_cache(cache, fps, max_age_days=60, structured=True, today=today)
    assert sorted(set(found.column("request_fingerprint").to_pylist())) == fps

    # A bucket that is not asked for is never opened (an unreadable file there would fail the read).
    (cache / "fp=c" / f"{today.isoformat()}--x--y.parquet").write_bytes(b"not parquet")
    found = answer_reuse.lookup_cache(cache, fps[:2], max_age_days=60, structured=True, today=today)
    assert sorted(set(found.column("request_fingerprint").to_pylist())) == fps[:2]


def test_cache_keeps_only_answers_this_run_paid_for_that_are_valid(tmp_path):
    fps = [f"{i:x}" * 64 for i in range(5)]
    merged = _answers(
        fps,
        status=["succeeded", "succeeded", "errored", "invalid_output", "succeeded"],
        stop_reason=["end_turn", "max_tokens", None, "end_turn", "end_turn"],
        attempt=[1, 1, 1, 1, 0],  # the last one was itself reused: not paid by this run
    )
    n = answer_reuse.write_cache(tmp_path, merged, partition="2026-11-01", run_id="r", structured=True)
    assert n == 1
    assert [pq.read_table(f)["request_fingerprint"].to_pylist() for f in tmp_path.rglob("*.parquet")] == [
        [fps[0]]
    ]


# -- configuration ------------------------------------------------------------------------------------


def _pipeline(tmp_path: Path, **extra: Any) -> Path:
    import yaml

    data = {
        "name": "tiny",
        "description": "A tiny pipeline.",
        "start_date": "2026-11-01",
        "source": "/tmp/in/date={{ ds }}/x.jsonl",
        "key_columns": ["id"],
        "prompt_template": "Say {{ text }}",
        "model": "claude-haiku-4-5",
        "max_tokens": 64,
        **extra,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_reuse_answers_setting_is_optional_off_by_default_and_reaches_prepare(tmp_path):
    from anthropic_batch.dag_factory import build_pipeline_dag
    from anthropic_batch.pipeline_config import PipelineConfigError, load_pipeline

    off = load_pipeline(_pipeline(tmp_path))
    assert off.reuse_answers.enabled is False
    assert build_pipeline_dag(off).get_task("prepare").answer_cache_max_age_days is None

    on = load_pipeline(_pipeline(tmp_path, reuse_answers={"enabled": True, "max_age_days": 14}))
    dag = build_pipeline_dag(on)
    assert dag.get_task("prepare").answer_cache_max_age_days == 14
    assert "answers up to 14 days old are reused across dates" in dag.doc_md

    with pytest.raises(PipelineConfigError, match=r"reuse_answers\.max_age_days"):
        load_pipeline(_pipeline(tmp_path, reuse_answers={"enabled": True, "max_age_days": 0}))
    with pytest.raises(PipelineConfigError, match=r"reuse_answers\.ttl"):
        load_pipeline(_pipeline(tmp_path, reuse_answers={"ttl": 3}))


def test_a_rerun_while_batches_are_in_flight_keeps_their_chunks_and_re_attaches(
    tmp_path, emulator_factory, monkeypatch
):
    """Chunk 0 collected with failures, chunks 1 and 2 not collected yet: the rerun resends chunk 0's
    failures only, in a chunk of their own; chunks 1 and 2 stay byte for byte and re-attach."""
    from anthropic_batch.hooks import AnthropicBatchHook

    emu = emulator_factory(
        "--processing-seconds", "0.3", "--seed", "5", "--error-rate", "overloaded_error=0.3"
    )
    use_emulator(monkeypatch, emu)
    records = ticket_records(30)
    run = _prepare(tmp_path, records, "2026-11-01")
    work = Path(run.work_dir.removeprefix("file://"))
    first_chunks = json.loads((work / "requests" / "manifest.json").read_text())["chunks"]
    handles = submit_chunks(run)
    wait_ended(AnthropicBatchHook(), handles[0]["batch_id"])
    collected = CollectResultsOperator(task_id="collect", handle=handles[0], work_dir=run.work_dir).execute(
        make_context(task_id="batch.collect", map_index=0)
    )
    n_failed = sum(
        1 for s in pq.read_table(collected.removeprefix("file://"))["status"].to_pylist() if s != "succeeded"
    )
    assert 0 < n_failed < 10

    rerun = _prepare(tmp_path, records, "2026-11-01")

    manifest = json.loads((work / "requests" / "manifest.json").read_text())
    assert manifest["reuse"]["n_reused"] == 10 - n_failed
    kept, pooled = manifest["chunks"][:2], manifest["chunks"][2:]
    assert [c["fingerprint"] for c in kept] == [c["fingerprint"] for c in first_chunks[1:]]
    assert [c["n_requests"] for c in pooled] == [n_failed]
    again = submit_chunks(rerun)
    assert [h["batch_id"] for h in again[:2]] == [h["batch_id"] for h in handles[1:]]  # re-attached
    assert _requests_received(emu) == (4, 30 + n_failed)  # only chunk 0's failures were sent again


def test_sync_rerun_answers_an_edited_record_anew(tmp_path, emulator_factory, monkeypatch):
    emu = emulator_factory("--processing-seconds", "0.3")
    use_emulator(monkeypatch, emu)
    records = ticket_records(12)
    _, _, first = _run_date(tmp_path, records, mode="sync")
    edited = [dict(r) for r in records]
    edited[1]["body"] = "My charger melted and smells of smoke. Urgent!"
    _, summary, data = _run_date(tmp_path, edited, mode="sync")
    assert summary["n_reused"] == 11
    assert _by_id(data)["T0001"]["output_json"] != _by_id(first)["T0001"]["output_json"]
