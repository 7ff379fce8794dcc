"""A minimal Airflow task context for calling operator ``execute()`` directly in unit tests.

Real-Airflow runs are covered end to end elsewhere; here the operators only need the few context
entries they read (the task instance's identity, XCom push, the data interval start).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
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
