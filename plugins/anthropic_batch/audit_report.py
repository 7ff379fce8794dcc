"""The weekly code audit's findings report: by severity and file, the trend, the cost (HTML + Markdown).

``load_findings`` reads one published ``weekly_code_audit`` partition (one row per reviewed file,
``output_json`` validated against ``schemas/code_audit.py:CodeAuditResult``) into plain findings;
``build_audit_report`` adds the previous week's partition for the trend (new, resolved and total per
severity) and the run's cost split (``pricing.CostBreakdown`` from the run summary's
``cost_breakdown``: cache writes, cache reads, the saving from caching and from batching);
``write_audit_report`` renders both files and the ``report.json`` they came from under
``{root}/reports/weekly_code_audit/date=YYYY-MM-DD/``, beside the overnight report.

A finding is identified across weeks by file, severity and issue text (whitespace and case folded),
not by line: an edit above it moves its line without making it new. Findings of a file that was not
reviewed this week (deleted, over the file cap, or its request failed) are counted as ``not
re-audited``, never as resolved. The HTML is self-contained (inline CSS and SVG, no scripts) and
shares the overnight report's chart, escaping and money helpers.
"""

from __future__ import annotations

import datetime as dt
import html
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from anthropic_batch.report import _CSS, _money, _path, hbar_chart, md_escape, write_report

PIPELINE = "weekly_code_audit"
OUTPUT_MODEL = "schemas/code_audit.py:CodeAuditResult"
#: Most severe first; severities the output model adds later are appended in its order.
SEVERITY_ORDER = ("critical", "high", "medium", "low", "info")
_SEVERITY_COLOURS = {
    "critical": "#8e0b0b",
    "high": "#e15759",
    "medium": "#f28e2b",
    "low": "#edc948",
    "info": "#76b7b2",
}
_E = html.escape


def _issue_key(finding: Mapping[str, Any]) -> tuple[str, str, str]:
    issue = re.sub(r"\s+", " ", str(finding.get("issue") or "")).strip().casefold()
    return (str(finding["path"]), str(finding["severity"]), issue)


def load_findings(extraction_dir: Any, output_model: str = OUTPUT_MODEL) -> dict[str, Any]:
    """The findings of one published partition, the files reviewed, those not reviewed and the summary."""
    from anthropic_batch import partition, storage
    from anthropic_batch.output_models import load_output_model
    from anthropic_batch.pipeline_config import INCLUDE_DIR

    published = partition.published_files(_path(extraction_dir))
    if published is None:
        raise FileNotFoundError(f"no published {PIPELINE} partition at {extraction_dir}")
    model_cls = load_output_model(output_model, INCLUDE_DIR)
    data = storage.read_parquet(published.data_path, columns=None).to_pylist()
    reviewed: list[str] = []
    not_reviewed: list[dict[str, Any]] = []
    findings: list[dict[str, Any]] = []
    for row in data:
        path = str(row.get("path"))
        if row.get("status") != "succeeded" or not row.get("output_json"):
            not_reviewed.append(
                {"path": path, "reason": row.get("error_type") or row.get("status") or "no answer"}
            )
            continue
        reviewed.append(path)
        for finding in model_cls.model_validate_json(row["output_json"]).findings:
            findings.append({"path": path, **finding.model_dump(mode="json")})
    dead_path = published.dead_letter_path
    if dead_path.exists():
        for row in storage.read_parquet(dead_path).to_pylist():
            if row.get("stage") == "prepare":  # refused before any spend (collect failures are rows above)
                not_reviewed.append({"path": str(row.get("path")), "reason": row.get("reason") or "refused"})
    findings.sort(key=lambda f: (f["path"], f["line"], _severity_rank(f["severity"])))
    return {
        "summary": published.read_summary(),
        "reviewed": sorted(reviewed),
        "not_reviewed": sorted(not_reviewed, key=lambda r: r["path"]),
        "findings": findings,
    }


def _severity_rank(severity: str) -> int:
    return SEVERITY_ORDER.index(severity) if severity in SEVERITY_ORDER else len(SEVERITY_ORDER)


def _severities(findings: Iterable[Mapping[str, Any]]) -> list[str]:
    seen = {str(f["severity"]) for f in findings}
    return [*SEVERITY_ORDER, *sorted(seen - set(SEVERITY_ORDER))]


def trend(current: Mapping[str, Any], previous: Mapping[str, Any] | None) -> dict[str, Any]:
    """Per severity: ``total`` now, ``previous`` total, ``new`` and ``resolved`` findings.

    Compared as multisets of (file, severity, issue); ``resolved`` counts only files reviewed this
    week, ``not_reaudited`` the previous findings of files that were not.
    """
    now = Counter(_issue_key(f) for f in current["findings"])
    before = Counter(_issue_key(f) for f in (previous or {}).get("findings", []))
    reviewed = set(current["reviewed"])
    new = now - before
    gone = before - now
    resolved = Counter({k: n for k, n in gone.items() if k[0] in reviewed})
    dropped = Counter({k: n for k, n in gone.items() if k[0] not in reviewed})
    rows = []
    for severity in _severities([*current["findings"], *(previous or {}).get("findings", [])]):

        def count(counter: Counter, severity: str = severity) -> int:
            return sum(n for k, n in counter.items() if k[1] == severity)

        rows.append(
            {
                "severity": severity,
                "total": count(now),
                "previous": count(before) if previous is not None else None,
                "new": count(new) if previous is not None else None,
                "resolved": count(resolved) if previous is not None else None,
            }
        )
    return {
        "has_previous": previous is not None,
        "by_severity": rows,
        "not_reaudited": sum(dropped.values()) if previous is not None else 0,
    }


def build_audit_report(
    root: Any, date: str, pipeline: str = PIPELINE, output_model: str = OUTPUT_MODEL
) -> dict[str, Any]:
    """Everything the report shows for the week ``date``, as plain JSON-able data."""
    from anthropic_batch import partition, storage
    from anthropic_batch.pricing import CostBreakdown

    current = load_findings(storage.extraction_dir(_path(root), pipeline, date), output_model)
    previous_date = (dt.date.fromisoformat(date) - dt.timedelta(days=7)).isoformat()
    previous_dir = storage.extraction_dir(_path(root), pipeline, previous_date)
    previous = (
        load_findings(previous_dir, output_model)
        if partition.published_files(previous_dir) is not None
        else None
    )
    summary = current["summary"]
    by_file: dict[str, Counter] = {}
    for finding in current["findings"]:
        by_file.setdefault(finding["path"], Counter())[finding["severity"]] += 1
    files = [
        {"path": path, "n": sum(counts.values()), "by_severity": dict(counts)}
        for path, counts in sorted(
            by_file.items(),
            key=lambda item: (
                [-item[1].get(s, 0) for s in SEVERITY_ORDER],  # worst files first
                item[0],
            ),
        )
    ]
    cost = CostBreakdown.model_validate(summary.get("cost_breakdown") or {})
    return {
        "pipeline": pipeline,
        "date": date,
        "previous_date": previous_date if previous is not None else None,
        "source_run_id": summary.get("run_id"),
        "model": summary.get("model"),
        "mode": summary.get("mode"),
        "n_files_reviewed": len(current["reviewed"]),
        "n_findings": len(current["findings"]),
        "by_severity": {
            s: n
            for s in _severities(current["findings"])
            if (n := sum(1 for f in current["findings"] if f["severity"] == s))
        },
        "by_file": files,
        "files_without_findings": sorted(set(current["reviewed"]) - set(by_file)),
        "not_reviewed": current["not_reviewed"],
        "trend": trend(current, previous),
        "findings": current["findings"],
        "cost": {
            **cost.model_dump(),
            "total_usd": cost.total_usd,
            "cost_usd": float(summary.get("cost_usd") or 0.0),
            "sync_cost_usd": float(summary.get("sync_cost_usd") or 0.0),
            "savings_usd": float(summary.get("savings_usd") or 0.0),
            "n_reused": int(summary.get("n_reused") or 0),
        },
        "price_table_as_of": summary.get("price_table_as_of"),
    }


# ----------------------------------------------------------------------------- rendering


def _count(value: Any) -> str:
    return "-" if value is None else str(value)


def _cost_rows(cost: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(what, tokens, dollars) lines of the cost section, the bill's split."""
    return [
        ("input", f"{cost.get('input_tokens', 0):,}", _money(cost.get("input_usd"))),
        ("output", f"{cost.get('output_tokens', 0):,}", _money(cost.get("output_usd"))),
        ("cache writes", f"{cost.get('cache_write_tokens', 0):,}", _money(cost.get("cache_write_usd"))),
        ("cache reads", f"{cost.get('cache_read_tokens', 0):,}", _money(cost.get("cache_read_usd"))),
        ("saved by caching", "", _money(cost.get("cache_saving_usd"))),
        ("saved by batching", "", _money(cost.get("batch_saving_usd"))),
    ]


def render_html(report: Mapping[str, Any]) -> str:
    """The audit report as one self-contained HTML document (inline CSS and SVG; no scripts)."""
    by_severity = report.get("by_severity", {})
    trend_data = report.get("trend", {})
    cost = report.get("cost", {})
    kpis = [
        ("files reviewed", report.get("n_files_reviewed")),
        ("findings", report.get("n_findings")),
        *((s, n) for s, n in by_severity.items()),
        ("run cost", _money(cost.get("cost_usd"))),
        ("saved by caching", _money(cost.get("cache_saving_usd"))),
        ("saved by batching", _money(cost.get("batch_saving_usd"))),
    ]
    charts = [
        hbar_chart(list(by_severity.items()), title="Findings by severity", colours=_SEVERITY_COLOURS),
        hbar_chart([(f["path"].rsplit("/", 1)[-1], f["n"]) for f in report.get("by_file", [])[:12]],
                   title="Files with the most findings"),
    ]  # fmt: skip
    title = f"Code audit: week of {report.get('date')}"
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_E(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_E(title)}</h1>",
        f'<div class="muted">pipeline {_E(str(report.get("pipeline")))}, '
        f"model {_E(str(report.get('model')))}, "
        f"mode {_E(str(report.get('mode')))}, source run {_E(str(report.get('source_run_id')))}, "
        f"generated {_E(str(report.get('generated_at')))}</div>",
        '<div class="kpis">',
        *(f'<div class="kpi"><span class="muted">{_E(k)}</span><b>{_E(str(v))}</b></div>' for k, v in kpis),
        "</div>",
        '<div class="charts">',
        *charts,
        "</div>",
        "<h2>Trend against the previous week</h2>",
    ]
    if trend_data.get("has_previous"):
        out.append(
            f'<p class="muted">compared with the week of {_E(str(report.get("previous_date")))}</p>'
            "<table><tr><th>severity</th><th>total</th><th>previous week</th><th>new</th>"
            "<th>resolved</th></tr>"
        )
        out.extend(
            f"<tr><td>{_E(r['severity'])}</td><td>{r['total']}</td><td>{_count(r['previous'])}</td>"
            f"<td>{_count(r['new'])}</td><td>{_count(r['resolved'])}</td></tr>"
            for r in trend_data.get("by_severity", [])
        )
        out.append("</table>")
        if trend_data.get("not_reaudited"):
            out.append(
                f'<p class="muted">{trend_data["not_reaudited"]} finding(s) of last week are in files not '
                "reviewed this week (deleted, over the file cap, or failed): not counted as resolved.</p>"
            )
    else:
        out.append('<p class="muted">no published audit for the previous week</p>')
    out += ["<h2>By file</h2>", "<table><tr><th>file</th><th>findings</th><th>by severity</th></tr>"]
    out.extend(
        f"<tr><td>{_E(f['path'])}</td><td>{f['n']}</td><td>"
        f"{_E(', '.join(f'{s} {n}' for s, n in f['by_severity'].items()))}</td></tr>"
        for f in report.get("by_file", [])
    )
    out.append("</table>")
    if report.get("files_without_findings"):
        out.append(f'<p class="muted">No findings: {_E(", ".join(report["files_without_findings"]))}</p>')
    out += [
        "<h2>Findings</h2>",
        "<table><tr><th>severity</th><th>file:line</th><th>issue</th><th>suggestion</th></tr>",
    ]
    findings = sorted(report.get("findings", []), key=lambda f: (_severity_rank(f["severity"]), f["path"]))
    out.extend(
        f'<tr><td style="color:{_SEVERITY_COLOURS.get(f["severity"], "#1f2328")}">{_E(f["severity"])}</td>'
        f"<td>{_E(f['path'])}:{int(f['line'])}</td><td>{_E(f['issue'])}</td><td>{_E(f['suggestion'])}</td></tr>"
        for f in findings
    )
    out.append("</table>")
    if report.get("not_reviewed"):
        out += ["<h2>Not reviewed</h2>", "<table><tr><th>file</th><th>why</th></tr>"]
        out.extend(
            f"<tr><td>{_E(r['path'])}</td><td>{_E(str(r['reason']))}</td></tr>"
            for r in report["not_reviewed"]
        )
        out.append("</table>")
    out += ["<h2>Cost and cache savings</h2>", "<table><tr><th></th><th>tokens</th><th>USD</th></tr>"]
    out.extend(f"<tr><td>{_E(a)}</td><td>{_E(b)}</td><td>{_E(c)}</td></tr>" for a, b, c in _cost_rows(cost))
    out.append("</table>")
    out.append(
        f'<p class="muted">The run cost {_E(_money(cost.get("cost_usd")))} (synchronously '
        f"{_E(_money(cost.get('sync_cost_usd')))}); {cost.get('n_reused', 0)} unchanged file(s) kept "
        f"last review at no cost. Prices as of {_E(str(report.get('price_table_as_of')))}.</p>"
    )
    out.append("</body></html>")
    return "\n".join(out)


def render_markdown(report: Mapping[str, Any]) -> str:
    """The Markdown twin of ``render_html`` (tables instead of charts)."""
    cost = report.get("cost", {})
    trend_data = report.get("trend", {})
    lines = [
        f"# Code audit: week of {md_escape(report.get('date'))}",
        "",
        f"Pipeline {md_escape(report.get('pipeline'))}, model {md_escape(report.get('model'))}, "
        f"mode {md_escape(report.get('mode'))}, generated {md_escape(report.get('generated_at'))}. "
        f"{report.get('n_files_reviewed')} file(s) reviewed, {report.get('n_findings')} finding(s).",
        "",
        "## Findings by severity",
        "",
        "| severity | findings |",
        "|---|---:|",
        *(f"| {md_escape(s)} | {n} |" for s, n in report.get("by_severity", {}).items()),
        "",
        "## Trend against the previous week",
        "",
    ]
    if trend_data.get("has_previous"):
        lines += [
            f"Compared with the week of {md_escape(report.get('previous_date'))}.",
            "",
            "| severity | total | previous week | new | resolved |",
            "|---|---:|---:|---:|---:|",
            *(
                f"| {md_escape(r['severity'])} | {r['total']} | {_count(r['previous'])} | "
                f"{_count(r['new'])} | {_count(r['resolved'])} |"
                for r in trend_data.get("by_severity", [])
            ),
        ]
        if trend_data.get("not_reaudited"):
            lines += ["", f"{trend_data['not_reaudited']} finding(s) of last week are in files not reviewed "
                      "this week: not counted as resolved."]  # fmt: skip
    else:
        lines.append("No published audit for the previous week.")
    lines += ["", "## By file", "", "| file | findings | by severity |", "|---|---:|---|"]
    lines += [
        f"| {md_escape(f['path'])} | {f['n']} | "
        f"{md_escape(', '.join(f'{s} {n}' for s, n in f['by_severity'].items()))} |"
        for f in report.get("by_file", [])
    ]
    if report.get("files_without_findings"):
        lines += ["", f"No findings: {md_escape(', '.join(report['files_without_findings']))}."]
    lines += ["", "## Findings", "", "| severity | file:line | issue | suggestion |", "|---|---|---|---|"]
    findings = sorted(report.get("findings", []), key=lambda f: (_severity_rank(f["severity"]), f["path"]))
    lines += [
        f"| {md_escape(f['severity'])} | {md_escape(f['path'])}:{int(f['line'])} | {md_escape(f['issue'])} | "
        f"{md_escape(f['suggestion'])} |"
        for f in findings
    ]
    if report.get("not_reviewed"):
        lines += ["", "## Not reviewed", "", "| file | why |", "|---|---|"]
        lines += [f"| {md_escape(r['path'])} | {md_escape(r['reason'])} |" for r in report["not_reviewed"]]
    lines += ["", "## Cost and cache savings", "", "| | tokens | USD |", "|---|---:|---:|"]
    lines += [f"| {md_escape(a)} | {b} | {md_escape(c)} |" for a, b, c in _cost_rows(cost)]
    lines += [
        "",
        f"The run cost {md_escape(_money(cost.get('cost_usd')))} (synchronously "
        f"{md_escape(_money(cost.get('sync_cost_usd')))}); {cost.get('n_reused', 0)} unchanged file(s) "
        f"kept last review at no cost. Prices as of {md_escape(report.get('price_table_as_of'))}.",
    ]
    return "\n".join(lines) + "\n"


def write_audit_report(report_dir: Any, report: Mapping[str, Any]) -> dict[str, str]:
    """Write report.json, report.html and report.md atomically under ``report_dir``; return their URLs."""
    return write_report(report_dir, report, to_html=render_html, to_markdown=render_markdown)


def latest_published(root: Any, pipeline: str = PIPELINE) -> str | None:
    """The latest date ``pipeline`` has published (``_SUCCESS``), or None."""
    from anthropic_batch import storage
    from anthropic_batch.report import _partition_dates

    dates = _partition_dates(_path(root) / pipeline / "extractions")
    done = [d for d in dates if (storage.extraction_dir(_path(root), pipeline, d) / "_SUCCESS").exists()]
    return max(done, default=None)
