"""The weekly code audit's findings report: findings, trend, cost section, escaping, both renderings."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from anthropic_batch import audit_report
from anthropic_batch.pricing import CostBreakdown

EVIL = '<script>alert("x")</script> | *bold*'
BREAKDOWN = CostBreakdown(
    input_tokens=1200, output_tokens=800, cache_write_tokens=1500, cache_read_tokens=6000,
    input_usd=0.0018, output_usd=0.006, cache_write_usd=0.0028125, cache_read_usd=0.0009,
    cache_saving_usd=0.0052875, batch_saving_usd=0.0115,
)  # fmt: skip


def _finding(severity, line, issue):
    return {"severity": severity, "line": line, "issue": issue, "suggestion": f"fix {issue}"}


def _publish(root, date, files, *, dead=(), summary_extra=None):
    """A published partition (legacy layout: read the same way) with one row per file."""
    directory = root / "weekly_code_audit" / "extractions" / f"date={date}"
    directory.mkdir(parents=True)
    rows = []
    for path, findings in files.items():
        ok = findings is not None
        rows.append(
            {
                "path": path,
                "status": "succeeded" if ok else "errored",
                "error_type": None if ok else "overloaded_error",
                "output_json": json.dumps({"findings": findings}) if ok else None,
            }
        )
    pq.write_table(pa.Table.from_pylist(rows), directory / "data.parquet")
    dead_rows = [{"path": p, "stage": "prepare", "reason": r} for p, r in dead]
    schema = pa.schema([("path", pa.string()), ("stage", pa.string()), ("reason", pa.string())])
    pq.write_table(pa.Table.from_pylist(dead_rows, schema=schema), directory / "dead_letter.parquet")
    summary = {
        "pipeline": "weekly_code_audit", "partition": date, "run_id": "scheduled__x", "mode": "batch",
        "model": "claude-sonnet-4-6", "cost_usd": 0.0115, "sync_cost_usd": 0.023, "savings_usd": 0.0115,
        "n_reused": 1, "price_table_as_of": "2026-10-21", **(summary_extra or {}),
    }  # fmt: skip
    (directory / "summary.json").write_text(json.dumps(summary))
    return directory


@pytest.fixture
def two_weeks(tmp_path):
    _publish(
        tmp_path,
        "2026-11-09",
        {
            "a.py": [_finding("high", 10, "Retry  appends rows"), _finding("low", 3, "no timeout")],
            "gone.py": [_finding("medium", 5, "race on the ledger")],
            "same.py": [_finding("critical", 7, "key is logged")],
        },
    )
    _publish(
        tmp_path,
        "2026-11-16",
        {
            # "Retry appends rows" moved lines and changed case/spacing: the same finding, not new.
            "a.py": [_finding("high", 14, "retry appends rows"), _finding("high", 30, "file read whole")],
            "same.py": [_finding("critical", 7, "key is logged")],
            "new.py": [_finding("medium", 1, EVIL)],
            "clean.py": [],
            "failed.py": None,
        },
        dead=[("huge.py", "request is 300000 bytes, over max_request_bytes")],
        summary_extra={"cost_breakdown": BREAKDOWN.model_dump()},
    )
    return tmp_path


def test_findings_by_severity_and_file_and_the_trend(two_weeks):
    report = audit_report.build_audit_report(two_weeks, "2026-11-16")
    assert report["n_findings"] == 4 and report["n_files_reviewed"] == 4
    assert report["by_severity"] == {"critical": 1, "high": 2, "medium": 1}  # most severe first
    assert [(f["path"], f["n"]) for f in report["by_file"]] == [("same.py", 1), ("a.py", 2), ("new.py", 1)]
    assert report["files_without_findings"] == ["clean.py"]
    assert report["not_reviewed"] == [
        {"path": "failed.py", "reason": "overloaded_error"},
        {"path": "huge.py", "reason": "request is 300000 bytes, over max_request_bytes"},
    ]
    assert report["previous_date"] == "2026-11-09"
    trend = {r["severity"]: r for r in report["trend"]["by_severity"]}
    assert trend["high"] == {"severity": "high", "total": 2, "previous": 1, "new": 1, "resolved": 0}
    assert trend["critical"] == {"severity": "critical", "total": 1, "previous": 1, "new": 0, "resolved": 0}
    # a.py was reviewed again without its low finding: resolved; gone.py was not reviewed: not resolved.
    assert trend["low"] == {"severity": "low", "total": 0, "previous": 1, "new": 0, "resolved": 1}
    assert trend["medium"] == {"severity": "medium", "total": 1, "previous": 1, "new": 1, "resolved": 0}
    assert report["trend"]["not_reaudited"] == 1


def test_first_week_has_no_trend_and_no_breakdown_means_zeros(two_weeks):
    report = audit_report.build_audit_report(two_weeks, "2026-11-09")
    assert report["previous_date"] is None and report["trend"]["has_previous"] is False
    assert all(r["new"] is None for r in report["trend"]["by_severity"])
    assert report["cost"]["cache_read_tokens"] == 0 and report["cost"]["cache_saving_usd"] == 0.0
    assert report["cost"]["cost_usd"] == pytest.approx(0.0115)  # the summary's totals still show
    assert "No published audit for the previous week\\." in audit_report.render_markdown(report)


def test_cost_section_shows_the_runs_breakdown(two_weeks):
    report = audit_report.build_audit_report(two_weeks, "2026-11-16")
    assert {k: report["cost"][k] for k in BREAKDOWN.model_fields} == BREAKDOWN.model_dump()
    markdown = audit_report.render_markdown(report)
    assert "| cache writes | 1,500 | $0\\.0028 |" in markdown
    assert "| cache reads | 6,000 | $0\\.0009 |" in markdown
    assert "| saved by caching |  | $0\\.0053 |" in markdown
    assert "| saved by batching |  | $0\\.0115 |" in markdown
    page = audit_report.render_html(report)
    assert "<td>cache reads</td><td>6,000</td><td>$0.0009</td>" in page
    assert "<td>saved by caching</td><td></td><td>$0.0053</td>" in page


def test_renderings_escape_model_output_and_write_three_files(two_weeks):
    report = audit_report.build_audit_report(two_weeks, "2026-11-16")
    page = audit_report.render_html(report)
    assert "<script>" not in page and "&lt;script&gt;" in page
    markdown = audit_report.render_markdown(report)
    assert "<script>" not in markdown and "\\*bold\\*" in markdown
    assert "| high | 2 | 1 | 1 | 0 |" in markdown  # severity, total, previous, new, resolved
    assert "| same\\.py | 1 | critical 1 |" in markdown
    written = audit_report.write_audit_report(
        two_weeks / "reports" / "weekly_code_audit" / "date=2026-11-16", report
    )
    assert set(written) == {"json", "html", "markdown"}
    out = two_weeks / "reports" / "weekly_code_audit" / "date=2026-11-16"
    assert json.loads((out / "report.json").read_text())["n_findings"] == 4
    assert (out / "report.md").read_text() == markdown


def test_missing_partition_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no published weekly_code_audit partition"):
        audit_report.build_audit_report(tmp_path, "2026-11-16")
    assert audit_report.latest_published(tmp_path) is None


def test_a_summary_without_a_breakdown_says_so(two_weeks):
    with_split = audit_report.build_audit_report(two_weeks, "2026-11-16")
    without = audit_report.build_audit_report(two_weeks, "2026-11-09")
    assert with_split["cost"]["breakdown_recorded"] and not without["cost"]["breakdown_recorded"]
    assert "no cost\\_breakdown" in audit_report.render_markdown(without)
    assert "no cost_breakdown" in audit_report.render_html(without)
    assert "no cost\\_breakdown" not in audit_report.render_markdown(with_split)
