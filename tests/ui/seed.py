"""Realistic storage-root contents for the UI tests, written with the project's own writers.

Ledger entries go through ``ledger.SubmissionLedger``, summaries through ``storage.atomic_write_json``
and dead letters through ``storage.write_parquet_atomic`` with ``results.dead_letter_schema``: the
same files, in the same places, as the operators write them.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa

from anthropic_batch import storage
from anthropic_batch.ledger import SubmissionLedger, rfc3339
from anthropic_batch.results import dead_letter_schema

DAG_ID = "bulk_extraction"
PIPELINE = "bulk_extraction"
MODEL = "claude-haiku-4-5"
XSS = "<script>alert('pwned')</script>"
# Assembled at run time so that secret scanners keep flagging only real keys in the repository.
LEAKED_KEY = "sk-ant-" + "api03-THISMUSTNEVERSHOW"


def run_id_of(partition: str) -> str:
    """A manually triggered run's id (the e2e test creates this DagRun through the REST API)."""
    return f"manual__{partition}T00:00:00+00:00"


def ledger_entry(
    *,
    partition: str,
    fingerprint: str,
    batch_id: str | None,
    state: str,
    processing_status: str | None,
    counts: dict[str, int] | None,
    created: datetime | None,
    ended: datetime | None,
    n_requests: int,
    cost: float | None,
    sync_cost: float | None,
    attempt: int = 1,
    map_index: int = 0,
    task_id: str = "submit",
    mode: str = "batch",
    dag_id: str = DAG_ID,
) -> dict[str, Any]:
    run_id = run_id_of(partition)
    return {
        "ledger_key": f"{dag_id}/{partition}/{task_id}/{fingerprint}",
        "dag_id": dag_id,
        "task_id": task_id,
        "run_id": run_id,
        "map_index": map_index,
        "partition": partition,
        "pipeline": PIPELINE,
        "attempt": attempt,
        "chunk_path": f"file:///data/{PIPELINE}/work/date={partition}/requests/chunk-{map_index:05d}.jsonl",
        "chunk_fingerprint": fingerprint,
        "n_requests": n_requests,
        "n_bytes": n_requests * 900,
        "model": MODEL,
        "mode": mode,
        "state": state,
        "intent_at": rfc3339(created - timedelta(seconds=2)) if created else rfc3339(datetime.now(UTC)),
        "submitted_at": rfc3339(created) if created and state != "intent" else None,
        "batch_id": batch_id,
        "processing_status": processing_status,
        "request_counts": counts,
        "created_at": rfc3339(created) if created else None,
        "expires_at": rfc3339(created + timedelta(hours=24)) if created else None,
        "ended_at": rfc3339(ended) if ended else None,
        "results_path": None,
        "projected_cost_usd": round(n_requests * 0.0004, 6),
        "cost_usd": cost,
        "sync_cost_usd": sync_cost,
        "previous_batch_ids": [],
    }


def summary(
    partition: str,
    *,
    n_rows: int,
    counts: dict[str, int],
    cost: float,
    sync_cost: float,
    n_dead: int,
    batch_ids: list[str],
    attempts: int,
    root: Any,
) -> dict[str, Any]:
    ext = storage.extraction_dir(root, PIPELINE, partition)
    return {
        "pipeline": PIPELINE,
        "dag_id": DAG_ID,
        "run_id": run_id_of(partition),
        "partition": partition,
        "mode": "batch",
        "n_input_records": n_rows + 1,
        "n_rows": n_rows,
        "counts_by_status": counts,
        "n_dead_letters": n_dead,
        "tokens": {
            "input": n_rows * 410,
            "output": n_rows * 95,
            "cache_creation": 0,
            "cache_read": n_rows * 300,
        },
        "cost_usd": cost,
        "sync_cost_usd": sync_cost,
        "savings_usd": round(sync_cost - cost, 6),
        "batch_ids": batch_ids,
        "attempts": attempts,
        "price_table_as_of": "2026-10-21",
        "data_path": str(ext / "data.parquet"),
        "dead_letter_path": str(ext / "dead_letter.parquet"),
        "finished_at": f"{partition}T06:12:00Z",
    }


def dead_letters(rows: list[dict[str, Any]]) -> pa.Table:
    schema = dead_letter_schema(["doc_id"])
    return pa.Table.from_pylist(rows, schema=schema)


def seed(root: Any, now: datetime | None = None) -> dict[str, Any]:
    """Three days of a pipeline: two published runs (one with dead letters) and one still in flight.

    Returns the numbers the tests assert on.
    """
    now = now or datetime.now(UTC)
    ledger = SubmissionLedger(root)
    day1, day2, day3 = "2026-11-20", "2026-11-21", "2026-11-22"
    t1 = datetime(2026, 11, 20, 1, 0, tzinfo=UTC)
    t2 = datetime(2026, 11, 21, 1, 0, tzinfo=UTC)
    entries = [
        ledger_entry(
            partition=day1,
            fingerprint="a" * 64,
            batch_id="msgbatch_01AAAA",
            state="ended",
            processing_status="ended",
            counts={"processing": 0, "succeeded": 100, "errored": 0, "canceled": 0, "expired": 0},
            created=t1,
            ended=t1 + timedelta(minutes=40),
            n_requests=100,
            cost=0.05,
            sync_cost=0.10,
        ),
        ledger_entry(
            partition=day2,
            fingerprint="b" * 64,
            batch_id="msgbatch_02BBBB",
            state="ended",
            processing_status="ended",
            counts={"processing": 0, "succeeded": 95, "errored": 3, "canceled": 0, "expired": 2},
            created=t2,
            ended=t2 + timedelta(hours=2),
            n_requests=100,
            cost=0.048,
            sync_cost=0.096,
        ),
        ledger_entry(
            partition=day2,
            fingerprint="c" * 64,
            batch_id="msgbatch_03CCCC",
            state="ended",
            processing_status="ended",
            counts={"processing": 0, "succeeded": 3, "errored": 1, "canceled": 0, "expired": 0},
            created=t2 + timedelta(hours=3),
            ended=t2 + timedelta(hours=3, minutes=5),
            n_requests=4,
            cost=0.002,
            sync_cost=0.004,
            attempt=2,
            task_id="resubmit",
        ),
        # Still running: created three hours ago, so it expires in about 21 hours.
        ledger_entry(
            partition=day3,
            fingerprint="d" * 64,
            batch_id="msgbatch_04DDDD",
            state="submitted",
            processing_status="in_progress",
            counts={"processing": 80, "succeeded": 20, "errored": 0, "canceled": 0, "expired": 0},
            created=now - timedelta(hours=3),
            ended=None,
            n_requests=100,
            cost=None,
            sync_cost=None,
        ),
    ]
    for e in entries:
        ledger.write(ledger.entry_path(e["dag_id"], e["partition"], e["task_id"], e["chunk_fingerprint"]), e)

    s1 = summary(
        day1,
        n_rows=100,
        counts={"succeeded": 100},
        cost=0.05,
        sync_cost=0.10,
        n_dead=0,
        batch_ids=["msgbatch_01AAAA"],
        attempts=1,
        root=root,
    )
    s2 = summary(
        day2,
        n_rows=100,
        counts={"succeeded": 98, "errored": 1, "invalid_output": 1},
        cost=0.05,
        sync_cost=0.10,
        n_dead=3,
        batch_ids=["msgbatch_02BBBB", "msgbatch_03CCCC"],
        attempts=2,
        root=root,
    )
    for s in (s1, s2):
        storage.atomic_write_json(storage.extraction_dir(root, PIPELINE, s["partition"]) / "summary.json", s)
    storage.write_parquet_atomic(
        storage.extraction_dir(root, PIPELINE, day1) / "dead_letter.parquet", dead_letters([])
    )
    storage.write_parquet_atomic(
        storage.extraction_dir(root, PIPELINE, day2) / "dead_letter.parquet",
        dead_letters(
            [
                {
                    "doc_id": "doc-17",
                    "custom_id": "r-17",
                    "stage": "collect",
                    "status": "invalid_output",
                    "error_type": "validation_error",
                    "reason": f"output did not validate: model wrote {XSS}",
                    "attempts": 3,
                    "last_batch_id": "msgbatch_03CCCC",
                    "record_json": json.dumps({"doc_id": "doc-17", "text": XSS}),
                },
                {
                    "doc_id": "doc-42",
                    "custom_id": "r-42",
                    "stage": "collect",
                    "status": "errored",
                    "error_type": "invalid_request_error",
                    "reason": "prompt is too long",
                    "attempts": 1,
                    "last_batch_id": "msgbatch_02BBBB",
                    "record_json": json.dumps({"doc_id": "doc-42"}),
                },
                {
                    "doc_id": "doc-99",
                    "custom_id": None,
                    "stage": "prepare",
                    "status": "rejected",
                    "error_type": "missing_field",
                    "reason": f"field 'text' is missing (header {LEAKED_KEY})",
                    "attempts": 0,
                    "last_batch_id": None,
                    "record_json": json.dumps({"doc_id": "doc-99"}),
                },
            ]
        ),
    )
    # A torn write in progress must be ignored by readers.
    (ledger.base / DAG_ID / day3 / "submit").mkdir(parents=True, exist_ok=True)
    (ledger.base / DAG_ID / day3 / "submit" / f".x.json{storage.TMP_MARKER}123").write_text("{")
    return {
        "days": (day1, day2, day3),
        "total_cost": 0.10,
        "total_sync": 0.20,
        "running_batch": "msgbatch_04DDDD",
    }
