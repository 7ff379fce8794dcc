"""A minimal Airflow task context for calling operator ``execute()`` directly in unit tests.

Real-Airflow runs are covered end to end elsewhere; here the operators only need the few context
entries they read (the task instance's identity, XCom push, the data interval start).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


@dataclass
class FakeTaskInstance:
    dag_id: str = "test_dag"
    task_id: str = "test_task"
    run_id: str = "manual__2026-11-01T00:00:00+00:00"
    map_index: int = -1
    try_number: int = 1
    xcoms: dict[str, Any] = field(default_factory=dict)

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcoms[key] = value


def make_context(
    *,
    task_id: str = "test_task",
    map_index: int = -1,
    dag_id: str = "test_dag",
    run_id: str = "manual__2026-11-01T00:00:00+00:00",
    partition: str = "2026-11-01",
    try_number: int = 1,
) -> dict[str, Any]:
    ti = FakeTaskInstance(
        dag_id=dag_id, task_id=task_id, run_id=run_id, map_index=map_index, try_number=try_number
    )
    start = datetime.fromisoformat(partition).replace(tzinfo=UTC)
    return {
        "ti": ti,
        "task_instance": ti,
        "run_id": run_id,
        "ds": partition,
        "logical_date": start,
        "data_interval_start": start,
        "data_interval_end": start,
        "dag_run": None,
        "params": {},
    }


# -- a small real pipeline for operator tests ----------------------------------------------------------

REPO = Path(__file__).resolve().parents[3]
INCLUDE_DIR = REPO / "include"
PARTITION = "2026-11-01"
MODEL = "claude-haiku-4-5"


def file_url(path: Path) -> str:
    """A file URL as the DAG factory builds them (``date=`` kept literal, not percent-encoded)."""
    return f"file://{path}"


def use_emulator(monkeypatch, emu) -> str:
    """Point the ``anthropic_default`` connection at ``emu``; returns the conn id."""
    conn = {"conn_type": "anthropic", "password": emu.api_key, "host": emu.base_url}
    monkeypatch.setenv("AIRFLOW_CONN_ANTHROPIC_DEFAULT", json.dumps(conn))
    return "anthropic_default"


def ticket_records(n: int) -> list[dict[str, Any]]:
    return [
        {
            "ticket_id": f"T{i:04d}",
            "channel": "email",
            "customer_tier": "pro",
            "subject": f"Problem number {i}",
            "body": f"My device stopped working on day {i}. Please help.",
        }
        for i in range(n)
    ]


@dataclass
class Run:
    root: Path
    work_dir: str
    storage_root: str
    chunk_paths: list[str]


def prepare_run(
    tmp_path: Path,
    records: list[dict[str, Any]],
    *,
    per_chunk: int = 10,
    mode: str = "batch",
    output_model: str | None = "schemas/support_ticket.py:SupportTicketExtraction",
    max_tokens: int = 512,
    include_dir: Path = INCLUDE_DIR,
) -> Run:
    """Run the real PrepareRequestsOperator on ``records`` under ``tmp_path/root``."""
    from anthropic_batch.operators.prepare import PrepareRequestsOperator

    root = tmp_path / "root"
    source = tmp_path / "tickets.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    work_dir = file_url(root / "tickets" / "work" / f"date={PARTITION}")
    op = PrepareRequestsOperator(
        task_id="prepare",
        source=str(source),
        key_columns=["ticket_id"],
        prompt_template="prompts/support_ticket.j2",
        model=MODEL,
        max_tokens=max_tokens,
        output_model=output_model,
        output_mode="json_schema" if output_model else None,
        include_dir=str(include_dir),
        work_dir=work_dir,
        pipeline="tickets",
        partition=PARTITION,
        mode=mode,
        max_requests_per_chunk=per_chunk,
    )
    chunk_paths = op.execute(make_context(task_id="prepare"))
    return Run(root=root, work_dir=work_dir, storage_root=file_url(root), chunk_paths=chunk_paths)


def submit_chunks(run: Run, conn_id: str = "anthropic_default") -> list[dict[str, Any]]:
    """The real SubmitBatchOperator over every chunk (map index = chunk position)."""
    from anthropic_batch.operators.submit import SubmitBatchOperator

    handles = []
    for i, chunk_path in enumerate(run.chunk_paths):
        op = SubmitBatchOperator(
            task_id="submit",
            chunk_path=chunk_path,
            work_dir=run.work_dir,
            storage_root=run.storage_root,
            conn_id=conn_id,
        )
        handles.append(op.execute(make_context(task_id="batch.submit", map_index=i)))
    return handles


def wait_ended(hook, batch_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """Poll the batch until it has ended (a condition with a deadline, not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        batch = hook.get_batch(batch_id)
        if batch.processing_status == "ended":
            return batch.model_dump(mode="json")
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch_id} did not end within {timeout}s")
        time.sleep(0.1)
