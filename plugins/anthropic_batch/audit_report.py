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
from typing import TYPE_CHECKING, Any

from anthropic_batch.report import _CSS, _money, hbar_chart, md_escape, write_report
from anthropic_batch.status import RequestStatus

if TYPE_CHECKING:
    from anthropic_batch.contracts import RunSummary

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
_NO_BREAKDOWN = "The run summary has no cost_breakdown (written before runs recorded one): the split shows 0."


def _issue_key(finding: Mapping[str, Any]) -> tuple[str, str, str]:
    issue = re.sub(r"\s+", " ", str(finding.get("issue") or "")).strip().casefold()
    return (str(finding["path"]), str(finding["severity"]), issue)


def load_findings(extraction_dir: Any, output_model: str = OUTPUT_MODEL) -> dict[str, Any]:
    """The findings of one published partition, the files reviewed, those not reviewed and the summary."""
    from anthropic_batch import partition, storage
    from anthropic_batch.output_models import load_output_model
    from anthropic_batch.pipeline_config import INCLUDE_DIR

    published = partition.published_files(storage.as_path(extraction_dir))
    if published is None:
        raise FileNotFoundError(f"no published {PIPELINE} partition at {extraction_dir}")
    model_cls = load_output_model(output_model, INCLUDE_DIR)
    data = storage.read_parquet(published.data_path, columns=None).to_pylist()
    reviewed: list[str] = []
    not_reviewed: list[dict[str, Any]] = []
    findings: list[dict[str, Any]] = []
    for row in data:
        path = str(row.get("path"))
        if row.get("status") != RequestStatus.SUCCEEDED or not row.get("output_json"):
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

    current = load_findings(storage.extraction_dir(storage.as_path(root), pipeline, date), output_model)
    previous_date = (dt.date.fromisoformat(date) - dt.timedelta(days=7)).isoformat()
    previous_dir = storage.extraction_dir(storage.as_path(root), pipeline, previous_date)
    previous = (
        load_findings(previous_dir, output_model)
        if partition.published_files(previous_dir) is not None
        else None
    )
    summary: RunSummary = current["summary"]
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
    # A summary written before runs recorded the split has none: zeros, and the report says so.
    cost = summary.cost_breakdown or CostBreakdown()
    return {
        "pipeline": pipeline,
        "date": date,
        "previous_date": previous_date if previous is not None else None,
        "source_run_id": summary.run_id,
        "model": summary.model,
        "mode": summary.mode,
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
            "cost_usd": summary.cost_usd or 0.0,
            "sync_cost_usd": summary.sync_cost_usd or 0.0,
            "savings_usd": summary.savings_usd or 0.0,
            "n_reused": summary.n_reused,
            "breakdown_recorded": summary.cost_breakdown is not None,
        },
        "price_table_as_of": summary.price_table_as_of,
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


def _sections(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The report body once, for both renderings: per section a title, notes, a table (or none)."""
    trend_data = report.get("trend", {})
    cost = report.get("cost", {})
    sections: list[dict[str, Any]] = [
        {
            "title": "Findings by severity",
            "headers": ("severity", "findings"),
            "rows": list(report.get("by_severity", {}).items()),
        }
    ]
    if trend_data.get("has_previous"):
        dropped = trend_data.get("not_reaudited")
        sections.append(
            {
                "title": "Trend against the previous week",
                "notes": [f"Compared with the week of {report.get('previous_date')}."],
                "headers": ("severity", "total", "previous week", "new", "resolved"),
                "rows": [
                    (
                        r["severity"],
                        r["total"],
                        _count(r["previous"]),
                        _count(r["new"]),
                        _count(r["resolved"]),
                    )
                    for r in trend_data.get("by_severity", [])
                ],
                "after": [
                    f"{dropped} finding(s) of last week are in files not reviewed this week (deleted, over "
                    "the file cap, or failed): not counted as resolved."
                ]
                if dropped
                else [],
            }
        )
    else:
        sections.append(
            {
                "title": "Trend against the previous week",
                "notes": ["No published audit for the previous week."],
            }
        )
    clean = report.get("files_without_findings")
    sections.append(
        {
            "title": "By file",
            "headers": ("file", "findings", "by severity"),
            "rows": [
                (f["path"], f["n"], ", ".join(f"{s} {n}" for s, n in f["by_severity"].items()))
                for f in report.get("by_file", [])
            ],
            "after": [f"No findings: {', '.join(clean)}."] if clean else [],
        }
    )
    findings = sorted(report.get("findings", []), key=lambda f: (_severity_rank(f["severity"]), f["path"]))
    sections.append(
        {
            "title": "Findings",
            "headers": ("severity", "file:line", "issue", "suggestion"),
            "rows": [
                (f["severity"], f"{f['path']}:{int(f['line'])}", f["issue"], f["suggestion"])
                for f in findings
            ],
        }
    )
    if report.get("not_reviewed"):
        sections.append(
            {
                "title": "Not reviewed",
                "headers": ("file", "why"),
                "rows": [(r["path"], r["reason"]) for r in report["not_reviewed"]],
            }
        )
    sections.append(
        {
            "title": "Cost and cache savings",
            "headers": ("", "tokens", "USD"),
            "rows": _cost_rows(cost),
            "after": [
                *([] if cost.get("breakdown_recorded") else [_NO_BREAKDOWN]),
                f"The run cost {_money(cost.get('cost_usd'))} "
                f"(synchronously {_money(cost.get('sync_cost_usd'))}); "
                f"{cost.get('n_reused', 0)} unchanged file(s) kept last week's review at no cost. "
                f"Prices as of {report.get('price_table_as_of')}.",
            ],
        }
    )
    return sections


def _byline(report: Mapping[str, Any]) -> str:
    return (
        f"Pipeline {report.get('pipeline')}, model {report.get('model')}, mode {report.get('mode')}, "
        f"source run {report.get('source_run_id')}, generated {report.get('generated_at')}. "
        f"{report.get('n_files_reviewed')} file(s) reviewed, {report.get('n_findings')} finding(s)."
    )


def render_html(report: Mapping[str, Any]) -> str:
    """The audit report as one self-contained HTML document (inline CSS and SVG; no scripts)."""
    by_severity = report.get("by_severity", {})
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
        f'<div class="muted">{_E(_byline(report))}</div>',
        '<div class="kpis">',
        *(f'<div class="kpi"><span class="muted">{_E(k)}</span><b>{_E(str(v))}</b></div>' for k, v in kpis),
        "</div>",
        '<div class="charts">',
        *charts,
        "</div>",
    ]
    for section in _sections(report)[1:]:  # the first one is the severity chart above
        out.append(f"<h2>{_E(section['title'])}</h2>")
        out.extend(f'<p class="muted">{_E(note)}</p>' for note in section.get("notes", []))
        if "headers" in section:
            out.append("<table><tr>" + "".join(f"<th>{_E(h)}</th>" for h in section["headers"]) + "</tr>")
            out.extend(
                "<tr>" + "".join(f"<td>{_E(str(cell))}</td>" for cell in row) + "</tr>"
                for row in section["rows"]
            )
            out.append("</table>")
        out.extend(f'<p class="muted">{_E(note)}</p>' for note in section.get("after", []))
    out.append("</body></html>")
    return "\n".join(out)


def render_markdown(report: Mapping[str, Any]) -> str:
    """The Markdown twin of ``render_html`` (tables instead of charts)."""
    lines = [f"# Code audit: week of {md_escape(report.get('date'))}", "", md_escape(_byline(report))]
    for section in _sections(report):
        lines += ["", f"## {md_escape(section['title'])}", ""]
        lines += [md_escape(note) for note in section.get("notes", [])]
        if "headers" in section:
            if section.get("notes"):
                lines.append("")
            lines.append("| " + " | ".join(md_escape(h) for h in section["headers"]) + " |")
            lines.append("|" + "|".join("---" for _ in section["headers"]) + "|")
            lines += ["| " + " | ".join(md_escape(cell) for cell in row) + " |" for row in section["rows"]]
        for note in section.get("after", []):
            lines += ["", md_escape(note)]
    return "\n".join(lines) + "\n"


def write_audit_report(report_dir: Any, report: Mapping[str, Any]) -> dict[str, str]:
    """Write report.json, report.html and report.md atomically under ``report_dir``; return their URLs."""
    return write_report(report_dir, report, to_html=render_html, to_markdown=render_markdown)


def latest_published(root: Any, pipeline: str = PIPELINE) -> str | None:
    """The latest date ``pipeline`` has published (``_SUCCESS``), or None."""
    from anthropic_batch import partition, storage
    from anthropic_batch.report import _partition_dates

    dates = _partition_dates(storage.as_path(root) / pipeline / storage.EXTRACTIONS_DIR)
    root = storage.as_path(root)
    done = [
        d for d in dates if partition.published_dir(storage.extraction_dir(root, pipeline, d)) is not None
    ]
    return max(done, default=None)
