"""weekly_code_audit end to end with dag.test() on the emulator (no mocks): two consecutive weeks of
this repository's own source files, then weekly_code_audit_report renders the findings report."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from demo.generate_data import code_week_files, write_code_files

from tests.dags.audit_repo import ADDED, DELETED, EDITED, UNCHANGED, WEEK_1, WEEK_2, make_audit_repo
from tests.dags.conftest import DAGS_DIR

PIPELINE = "weekly_code_audit"


@pytest.fixture
def storage_root(tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_BATCH_STORAGE_ROOT", f"file://{tmp_path / 'data'}")
    monkeypatch.setenv("ANTHROPIC_BATCH_POLL_INTERVAL", "1")
    return tmp_path / "data"


def _run(dag_file: str, dag_id: str, logical: dt.datetime, conf: dict) -> str:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS_DIR / dag_file))
    assert bag.import_errors == {}
    run = bag.dags[dag_id].test(logical_date=logical, run_conf=conf)
    return str(getattr(run.state, "value", run.state))


def _published(storage_root: Path, week: dt.date) -> tuple[list[dict], dict]:
    from anthropic_batch.partition import published_dir

    directory = Path(published_dir(f"file://{storage_root}/{PIPELINE}/extractions/date={week}").path)
    rows = pq.read_table(directory / "data.parquet").to_pylist()
    return rows, json.loads((directory / "summary.json").read_text())


def _findings(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(path, severity, issue) of every finding, straight from the published output_json."""
    return [
        (r["path"], f["severity"], f["issue"])
        for r in rows
        if r["status"] == "succeeded"
        for f in json.loads(r["output_json"])["findings"]
    ]


def _midnight(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)


def test_two_weeks_of_audit_publish_findings_and_the_report(
    airflow_db, anthropic_conn, storage_root, tmp_path
):
    from anthropic_batch.pricing import CostBreakdown

    repo = make_audit_repo(tmp_path / "repo")
    for week in (WEEK_1, WEEK_2):
        write_code_files(f"file://{storage_root}", week, repo_dir=repo)
        assert _run("pipelines.py", PIPELINE, _midnight(week), {"mode": "batch"}) == "success"

    rows_1, _ = _published(storage_root, WEEK_1)
    rows_2, summary_2 = _published(storage_root, WEEK_2)
    assert sorted(r["path"] for r in rows_1) == sorted(r["path"] for r in code_week_files(WEEK_1, repo))
    assert sorted(r["path"] for r in rows_2) == sorted([UNCHANGED, EDITED, ADDED])
    assert all(r["status"] == "succeeded" for r in rows_1 + rows_2)
    # The rubric (the system prompt) is a cached prefix: written once, then read by the other files.
    tokens = Counter()
    for r in rows_1:
        tokens.update(write=r["cache_creation_input_tokens"] or 0, read=r["cache_read_input_tokens"] or 0)
    assert tokens["read"] >= 1300, tokens
    # The unchanged file kept last week's review for free (same request fingerprint).
    unchanged = next(r for r in rows_2 if r["path"] == UNCHANGED)
    assert unchanged["attempt"] == 0 and unchanged["cost_usd"] == 0
    assert summary_2["n_reused"] >= 1
    findings_1, findings_2 = _findings(rows_1), _findings(rows_2)
    assert findings_1 and findings_2  # the emulator's reviews are not all empty

    state = _run(
        "weekly_code_audit_report.py", f"{PIPELINE}_report", _midnight(WEEK_2 + dt.timedelta(days=1)),
        {"date": f"{WEEK_1},{WEEK_2}"},
    )  # fmt: skip
    assert state == "success"
    out = storage_root / "reports" / PIPELINE / f"date={WEEK_2}"
    report = json.loads((out / "report.json").read_text())
    markdown = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    assert (storage_root / "reports" / PIPELINE / f"date={WEEK_1}" / "report.html").exists()
    assert not (storage_root / "reports" / f"date={WEEK_2}").exists()  # not mistaken for an overnight report

    # Counts by severity and by file are the published findings'.
    assert report["n_findings"] == len(findings_2)
    assert report["by_severity"] == dict(Counter(s for _, s, _ in findings_2))
    assert {f["path"]: f["n"] for f in report["by_file"]} == dict(Counter(p for p, _, _ in findings_2))
    assert report["n_files_reviewed"] == 3
    for severity, n in report["by_severity"].items():
        assert f"| {severity} | {n} |" in markdown
    for f in report["by_file"]:
        assert f"<td>{f['path']}</td><td>{f['n']}</td>" in page

    # The trend is this week against last week: the unchanged file's findings are neither new nor
    # resolved, the added file's are all new, the deleted file's are not counted as resolved.
    trend = {r["severity"]: r for r in report["trend"]["by_severity"]}
    before, now = Counter(findings_1), Counter(findings_2)
    for severity, row in trend.items():
        assert row["total"] == sum(n for k, n in now.items() if k[1] == severity)
        assert row["previous"] == sum(n for k, n in before.items() if k[1] == severity)
        assert row["new"] == sum(n for k, n in (now - before).items() if k[1] == severity)
        resolved = before - now
        assert row["resolved"] == sum(n for k, n in resolved.items() if k[1] == severity and k[0] != DELETED)
        assert (
            f"| {severity} | {row['total']} | {row['previous']} | {row['new']} | {row['resolved']} |"
            in markdown
        )
    assert report["trend"]["not_reaudited"] == sum(1 for p, _, _ in findings_1 if p == DELETED)
    new_total = sum(r["new"] for r in trend.values())
    assert new_total >= sum(1 for p, _, _ in findings_2 if p == ADDED) > 0
    assert not any(k[0] == UNCHANGED for k in now - before)

    # Cost: the run summary's, the cache split from its cost_breakdown (zeros until publish writes one).
    expected = CostBreakdown.model_validate(summary_2.get("cost_breakdown") or {})
    assert {k: report["cost"][k] for k in CostBreakdown.model_fields} == expected.model_dump()
    assert report["cost"]["cost_usd"] == pytest.approx(summary_2["cost_usd"])
    assert "## Cost and cache savings" in markdown and "saved by caching" in page
    print(markdown)  # shown with -s: what a reader of the report sees
