"""The overnight report: a day's extraction aggregated, narrated by the model, rendered twice.

``aggregate_partition`` reads one published partition (data, dead letters, summary) and returns
plain numbers per group (ticket category); ``load_history`` reads the run summaries of the previous
days for the trend charts; ``attach_narratives`` adds the model's paragraph per group from a RESULT
table. ``render_html`` gives one self-contained HTML file (inline CSS and SVG charts, no scripts,
nothing fetched) and ``render_markdown`` its Markdown twin; ``write_report`` puts both and the
``report.json`` they were rendered from under ``reports/date=YYYY-MM-DD/``.

One report run may cover several dates: Airflow collapses the Asset events that arrive while a
report run is queued (a backfill publishes many dates) into one run. ``report_dates`` turns the
triggering events into the sorted distinct partitions; every date gets its own report, and all
narratives go out in one batch (the prompt rows are keyed by ``date`` and ``category``).
Airflow also leaves the events that arrive between the queueing of a run and its creation to the
*next* run (which only comes with the next event), so ``unreported_dates`` adds the published
partitions around those dates that have no report yet.

Everything that comes from data or from the model is escaped: HTML with ``html.escape``, Markdown
by backslash-escaping its syntax and HTML characters (Markdown renderers pass raw HTML through).
"""

from __future__ import annotations

import datetime as dt
import html
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from anthropic_batch import partition, storage
from anthropic_batch.status import RequestStatus

GROUP_FIELD = "category"
UNKNOWN_GROUP = "unclassified"
HISTORY_DAYS = 14
_SAMPLE_SUMMARIES = 6
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")

# ----------------------------------------------------------------------------- aggregation


def _parse_json(text: Any) -> dict[str, Any]:
    if not isinstance(text, str) or not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _counts(values: Iterable[Any]) -> dict[str, int]:
    counter = Counter(str(v) for v in values if v not in (None, ""))
    return dict(counter.most_common())


def aggregate_partition(extraction_dir: Any, group_field: str = GROUP_FIELD) -> dict[str, Any]:
    """Numbers of one published partition: totals, status counts, dead-letter reasons, per-group stats."""

    directory = partition.published_dir(storage.as_path(extraction_dir)) or storage.as_path(extraction_dir)
    summary = partition.read_run_summary(directory / partition.SUMMARY_FILE)
    if summary is None:
        raise FileNotFoundError(f"no published partition at {directory} ({partition.SUMMARY_FILE} missing)")
    data = storage.read_parquet(directory / partition.DATA_FILE).to_pandas()
    dead_path = directory / partition.DEAD_LETTER_FILE
    dead = storage.read_parquet(dead_path).to_pandas() if dead_path.exists() else None

    parsed = [_parse_json(v) for v in data.get("output_json", [])]
    succeeded = data["status"] == RequestStatus.SUCCEEDED.value if "status" in data else []
    groups: dict[str, list[dict[str, Any]]] = {}
    for ok, fields in zip(succeeded, parsed, strict=False):
        if not ok:
            continue
        name = str(fields.get(group_field) or UNKNOWN_GROUP)
        groups.setdefault(name, []).append(fields)
    n_classified = sum(len(v) for v in groups.values()) or 1
    group_stats = []
    for name, rows in sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])):
        group_stats.append(
            {
                "name": name,
                "n": len(rows),
                "share_pct": round(100.0 * len(rows) / n_classified, 1),
                "priorities": _counts(r.get("priority") for r in rows),
                "sentiments": _counts(r.get("sentiment") for r in rows),
                "products": dict(list(_counts(r.get("product") for r in rows).items())[:5]),
                "sample_summaries": [str(r.get("summary")) for r in rows if r.get("summary")][
                    :_SAMPLE_SUMMARIES
                ],
                "narrative": None,
                "narrative_status": None,
            }
        )
    dead_reasons: dict[str, int] = {}
    if dead is not None and len(dead):
        column = "reason" if "reason" in dead else "status"
        dead_reasons = _counts(_short_reason(r) for r in dead[column])
    return {
        "date": summary.partition,
        "pipeline": summary.pipeline,
        "source_run_id": summary.run_id,
        "mode": summary.mode,
        "model": summary.model,
        "totals": {
            "n_input_records": summary.n_input_records,
            "n_rows": summary.n_rows if summary.n_rows is not None else len(data),
            "n_dead_letters": summary.n_dead_letters,
            "cost_usd": summary.cost_usd or 0.0,
            "sync_cost_usd": summary.sync_cost_usd or 0.0,
            "savings_usd": summary.savings_usd or 0.0,
            "n_batches": len(summary.batch_ids),
            "attempts": summary.attempts,
        },
        "status_counts": dict(summary.counts_by_status or _counts(data.get("status", []))),
        # Issue 13: cache writes, cache reads and both savings, tokens and dollars (None: older run).
        "cost_breakdown": summary.cost_breakdown.model_dump() if summary.cost_breakdown else None,
        "dead_letter_reasons": dead_reasons,
        "groups": group_stats,
    }


def _short_reason(reason: Any) -> str:
    text = re.sub(r"\s+", " ", str(reason or "unknown")).strip()
    # Reasons often end with record specifics (sizes, ids); keep the part that groups well.
    return text.split(":")[0][:80]


def load_history(root: Any, pipeline: str, date: str, days: int = HISTORY_DAYS) -> list[dict[str, Any]]:
    """The run summaries of ``pipeline`` for the ``days`` days ending at ``date`` (those that exist)."""

    end = dt.date.fromisoformat(date)
    history = []
    for offset in range(days - 1, -1, -1):
        day = (end - dt.timedelta(days=offset)).isoformat()
        summary = partition.read_published_summary(
            storage.extraction_dir(storage.as_path(root), pipeline, day)
        )
        if summary is None:
            continue
        history.append(
            {
                "date": day,
                "n_rows": summary.n_rows or 0,
                "n_dead_letters": summary.n_dead_letters,
                "cost_usd": summary.cost_usd or 0.0,
                "sync_cost_usd": summary.sync_cost_usd or 0.0,
                "savings_usd": summary.savings_usd or 0.0,
            }
        )
    return history


def event_partition(event: Any, schedule: str | None = None) -> str | None:
    """The ``YYYY-MM-DD`` partition an Asset event published, or None if it does not say.

    ``extra["partition"]`` when the publisher set it; else the partition of the source run, computed
    the way the pipeline computes it (``dag_factory.run_partition``: logical date, or the last
    complete interval of ``schedule`` for a run without one).
    """
    extra = getattr(event, "extra", None) or {}
    if extra.get("partition"):
        return dt.date.fromisoformat(str(extra["partition"])).isoformat()
    run = getattr(event, "source_dag_run", None)
    if run is None:
        return None
    # dag_factory loads Airflow's DAG classes: the report renders without them
    from anthropic_batch.dag_factory import run_partition

    run_after = getattr(run, "run_after", None) or getattr(run, "start_date", None) or event.timestamp
    return run_partition(getattr(run, "logical_date", None), run_after, schedule)


def report_dates(
    param_date: Any,
    triggering_events: Mapping[Any, Iterable[Any]] | None,
    run_after: dt.datetime,
    *,
    source_dag_id: str,
    schedule: str | None = None,
) -> list[str]:
    """The dates one report run covers, sorted and distinct.

    ``param_date`` (``YYYY-MM-DD``, several separated by commas or a list) wins; else every
    partition published by ``source_dag_id`` among the triggering Asset events (each date of a
    backfill, not only the first event); else, for a time-triggered run, the day before ``run_after``.
    """
    if param_date:
        values = param_date if isinstance(param_date, list | tuple) else str(param_date).split(",")
        dates = set()
        for value in values:
            try:
                dates.add(dt.date.fromisoformat(str(value).strip()).isoformat())
            except ValueError:
                raise ValueError(f"param date: {value!r} is not a YYYY-MM-DD date") from None
        return sorted(dates)
    dates = set()
    for events in (triggering_events or {}).values():
        for event in events:
            if getattr(event, "source_dag_id", None) != source_dag_id:
                continue
            partition = event_partition(event, schedule)
            if partition:
                dates.add(partition)
    if dates:
        return sorted(dates)
    return [(run_after - dt.timedelta(days=1)).date().isoformat()]


def _partition_dates(directory: Any) -> set[str]:
    """The ``YYYY-MM-DD`` of every ``date=...`` entry directly under ``directory`` (one listing)."""
    from anthropic_batch.layout import PARTITION_PREFIX

    if not directory.exists():
        return set()
    names = (
        p.name.removeprefix(PARTITION_PREFIX)
        for p in directory.iterdir()
        if p.name.startswith(PARTITION_PREFIX)
    )
    return {n for n in names if _DATE_RE.match(n)}


def unreported_dates(root: Any, pipeline: str, first: str, last: str) -> list[str]:
    """Dates in ``[first, last]`` that ``pipeline`` has published (``_SUCCESS``) but that have no report."""

    root = storage.as_path(root)
    published = _partition_dates(root / pipeline / storage.EXTRACTIONS_DIR)
    candidates = published - _partition_dates(root / storage.REPORTS_DIR)
    return sorted(
        d
        for d in candidates
        if first <= d <= last and (storage.extraction_dir(root, pipeline, d) / "_SUCCESS").exists()
    )


def dates_to_report(
    root: Any,
    pipeline: str,
    dates: Sequence[str],
    run_after: dt.datetime,
    lookback_days: int = HISTORY_DAYS,
) -> list[str]:
    """``dates`` plus the unreported published dates from ``lookback_days`` before the first of them
    up to the later of the last of them and the day before ``run_after``."""
    first = (dt.date.fromisoformat(min(dates)) - dt.timedelta(days=lookback_days)).isoformat()
    last = max(max(dates), (run_after - dt.timedelta(days=1)).date().isoformat())
    return sorted({*dates, *unreported_dates(root, pipeline, first, last)})


def group_prompt_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per group for the narrative prompt (``prompts/report_group.j2``); key column ``category``."""
    rows = []
    for group in report["groups"]:
        rows.append(
            {
                "category": group["name"],
                "date": report["date"],
                "n_tickets": group["n"],
                "share_pct": group["share_pct"],
                "priorities": _inline_counts(group["priorities"]),
                "sentiments": _inline_counts(group["sentiments"]),
                "products": _inline_counts(group["products"]) or "none named",
                "sample_summaries": "\n".join(f"- {s}" for s in group["sample_summaries"]) or "(none)",
            }
        )
    return rows


def attach_narratives(report: dict[str, Any], results: Any, key: str = "category") -> dict[str, Any]:
    """Put each group's narrative (``output_text`` of its RESULT row) and status into ``report``.

    When ``results`` has a ``date`` column (one batch for several report dates), only the rows of
    ``report["date"]`` count.
    """
    frame = results.to_pandas() if hasattr(results, "to_pandas") else results
    if "date" in frame and report.get("date") is not None:
        frame = frame[frame["date"].astype(str) == str(report["date"])]
    by_key = {str(row[key]): row for row in frame.to_dict("records")} if len(frame) else {}
    cost = 0.0
    sync_cost = 0.0
    for row in by_key.values():
        cost += float(row.get("cost_usd") or 0.0)
        sync_cost += float(row.get("sync_cost_usd") or 0.0)
    for group in report["groups"]:
        row = by_key.get(group["name"])
        if row is None:
            group["narrative_status"] = RequestStatus.MISSING.value
            continue
        group["narrative_status"] = str(row.get("status"))
        if row.get("status") == RequestStatus.SUCCEEDED and row.get("output_text"):
            group["narrative"] = str(row["output_text"]).strip()
    report["narrative_cost"] = {"cost_usd": round(cost, 6), "sync_cost_usd": round(sync_cost, 6)}
    return report


def _inline_counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items())


# ----------------------------------------------------------------------------- SVG charts

_PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f"]
_STATUS_COLOURS: dict[str, str] = {
    RequestStatus.SUCCEEDED.value: "#59a14f",
    RequestStatus.ERRORED.value: "#e15759",
    RequestStatus.INVALID_OUTPUT.value: "#f28e2b",
    RequestStatus.EXPIRED.value: "#9c755f",
    RequestStatus.CANCELED.value: "#bab0ac",
    RequestStatus.MISSING.value: "#b07aa1",
    RequestStatus.NEEDS_FOLLOWUP.value: "#edc948",
}
_E = html.escape


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    exponent = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exponent:
            return step * exponent
    return 10 * exponent


def hbar_chart(
    items: Sequence[tuple[str, float]],
    *,
    title: str,
    value_format: str = "{:,.0f}",
    colours: Mapping[str, str] | None = None,
    width: int = 520,
) -> str:
    """A horizontal bar chart as inline SVG (labels and values escaped)."""
    row_h, label_w, pad = 22, 150, 8
    height = pad * 2 + 24 + row_h * max(1, len(items))
    top = max((v for _, v in items), default=0.0)
    scale = (width - label_w - 70) / (top or 1.0)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}"><title>{_E(title)}</title>',
        f'<text x="{pad}" y="{pad + 12}" class="t">{_E(title)}</text>',
    ]
    if not items:
        parts.append(f'<text x="{pad}" y="{pad + 40}" class="l">no data</text>')
    for i, (label, value) in enumerate(items):
        y = pad + 24 + i * row_h
        colour = (colours or {}).get(label, _PALETTE[i % len(_PALETTE)])
        bar = max(1.0, value * scale) if value else 0.0
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 15}" class="l" text-anchor="end">{_E(_clip(label, 22))}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{bar:.1f}" height="{row_h - 6}" fill="{colour}">'
            f"<title>{_E(label)}: {_E(value_format.format(value))}</title></rect>"
            f'<text x="{label_w + bar + 4:.1f}" y="{y + 15}" class="v">'
            f"{_E(value_format.format(value))}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def column_chart(
    dates: Sequence[str],
    series: Mapping[str, Sequence[float]],
    *,
    title: str,
    value_format: str = "{:,.2f}",
    width: int = 640,
    height: int = 240,
) -> str:
    """Grouped vertical bars per date (one colour per series) with a legend, as inline SVG."""
    left, right, top_pad, bottom = 56, 12, 40, 44
    plot_w, plot_h = width - left - right, height - top_pad - bottom
    top = _nice_max(max((v for values in series.values() for v in values), default=0.0))
    n_series = max(1, len(series))
    slot = plot_w / max(1, len(dates))
    bar_w = min(28.0, max(2.0, slot * 0.8 / n_series))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}"><title>{_E(title)}</title>',
        f'<text x="8" y="16" class="t">{_E(title)}</text>',
    ]
    for tick in range(5):
        value = top * tick / 4
        y = top_pad + plot_h - plot_h * tick / 4
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" class="g"/>'
            f'<text x="{left - 4}" y="{y + 4:.1f}" class="v" text-anchor="end">'
            f"{_E(value_format.format(value))}</text>"
        )
    for s_index, (name, values) in enumerate(series.items()):
        colour = _PALETTE[s_index % len(_PALETTE)]
        parts.append(
            f'<rect x="{left + s_index * 140}" y="24" width="10" height="10" fill="{colour}"/>'
            f'<text x="{left + s_index * 140 + 14}" y="33" class="l">{_E(name)}</text>'
        )
        for d_index, value in enumerate(values):
            h = plot_h * value / top if top else 0.0
            x = left + d_index * slot + (slot - n_series * bar_w) / 2 + s_index * bar_w
            parts.append(
                f'<rect x="{x:.1f}" y="{top_pad + plot_h - h:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                f'fill="{colour}"><title>{_E(dates[d_index])} {_E(name)}: '
                f"{_E(value_format.format(value))}</title></rect>"
            )
    label_every = max(1, math.ceil(len(dates) / 8))
    for d_index, date in enumerate(dates):
        if d_index % label_every == 0:
            x = left + d_index * slot + slot / 2
            parts.append(
                f'<text x="{x:.1f}" y="{height - bottom + 16}" class="v" text-anchor="middle">'
                f"{_E(date[5:])}</text>"
            )
    parts.append("</svg>")
    return "".join(parts)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# ----------------------------------------------------------------------------- HTML

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:980px;
color:#1f2328;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d0d7de}
.muted{color:#59636e}.kpis{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0}
.kpi{border:1px solid #d0d7de;border-radius:6px;padding:8px 14px;min-width:120px}
.kpi b{display:block;font-size:20px}.charts{display:flex;flex-wrap:wrap;gap:16px}
table{border-collapse:collapse;width:100%}td,th{border:1px solid #d0d7de;padding:4px 8px;text-align:left;
vertical-align:top}th{background:#f6f8fa}.group p{margin:6px 0 14px}
svg .t{font-weight:600;font-size:13px}svg .l{font-size:12px}svg .v{font-size:11px;fill:#59636e}
svg .g{stroke:#eaeef2}
"""


def _money(value: Any) -> str:
    return f"${float(value or 0):,.4f}"


def cost_rows(report: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """The cost section: ``(what, tokens, USD)`` per kind of token and per saving (empty for a run
    summary written before the breakdown existed)."""
    from anthropic_batch.pricing import CostBreakdown

    data = report.get("cost_breakdown")
    if not data:
        return []
    return [
        (label, "" if tokens is None else f"{tokens:,}", _money(usd))
        for label, tokens, usd in CostBreakdown(**data).table_rows()
    ]


def render_html(report: Mapping[str, Any]) -> str:
    """The report as one self-contained HTML document (inline CSS and SVG; no scripts, no fetches)."""
    totals = report.get("totals", {})
    history = report.get("history", [])
    groups = report.get("groups", [])
    dates = [h["date"] for h in history]
    kpis = [
        ("records in", totals.get("n_input_records")),
        ("rows out", totals.get("n_rows")),
        ("dead letters", totals.get("n_dead_letters")),
        ("batches", totals.get("n_batches")),
        ("cost", _money(totals.get("cost_usd"))),
        ("sync would cost", _money(totals.get("sync_cost_usd"))),
        ("saved", _money(totals.get("savings_usd"))),
    ]
    charts = [
        hbar_chart([(g["name"], g["n"]) for g in groups], title="Tickets by category"),
        hbar_chart(
            list(report.get("status_counts", {}).items()),
            title="Requests by final status",
            colours=_STATUS_COLOURS,
        ),
        column_chart(
            dates,
            {
                "batch cost": [h["cost_usd"] for h in history],
                "sync cost": [h["sync_cost_usd"] for h in history],
            },
            title=f"Cost vs synchronous cost, last {len(dates)} day(s) (USD)",
            value_format="{:,.3f}",
        ),
        column_chart(
            dates,
            {"rows": [h["n_rows"] for h in history], "dead letters": [h["n_dead_letters"] for h in history]},
            title=f"Volume, last {len(dates)} day(s)",
            value_format="{:,.0f}",
        ),
    ]
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Overnight report {_E(str(report.get('date')))}</title><style>{_CSS}</style></head><body>",
        f"<h1>Overnight report: {_E(str(report.get('pipeline')))} {_E(str(report.get('date')))}</h1>",
        f'<div class="muted">model {_E(str(report.get("model")))}, mode {_E(str(report.get("mode")))}, '
        f"source run {_E(str(report.get('source_run_id')))}, generated {_E(str(report.get('generated_at')))}"
        "</div>",
        '<div class="kpis">',
        *(f'<div class="kpi"><span class="muted">{_E(k)}</span><b>{_E(str(v))}</b></div>' for k, v in kpis),
        "</div>",
        '<div class="charts">',
        *charts,
        "</div>",
        "<h2>By category</h2>",
    ]
    for group in groups:
        narrative = group.get("narrative")
        text = (
            "".join(f"<p>{_E(p)}</p>" for p in narrative.split("\n\n") if p.strip())
            if narrative
            else f'<p class="muted">no narrative ({_E(str(group.get("narrative_status")))})</p>'
        )
        out.append(
            f'<div class="group"><h3>{_E(group["name"])} <span class="muted">{group["n"]} tickets, '
            f"{group['share_pct']}%</span></h3>"
            f'<div class="muted">priority: {_E(_inline_counts(group["priorities"]))}; '
            f"sentiment: {_E(_inline_counts(group['sentiments']))}; "
            f"products: {_E(_inline_counts(group['products']) or 'none named')}</div>{text}</div>"
        )
    rows = cost_rows(report)
    if rows:
        out.append("<h2>Cost breakdown</h2><table><tr><th></th><th>tokens</th><th>USD</th></tr>")
        out.extend(f"<tr><td>{_E(a)}</td><td>{_E(b)}</td><td>{_E(c)}</td></tr>" for a, b, c in rows)
        out.append("</table>")
    reasons = report.get("dead_letter_reasons", {})
    out.append("<h2>Dead letters</h2>")
    if reasons:
        out.append("<table><tr><th>reason</th><th>records</th></tr>")
        out.extend(f"<tr><td>{_E(r)}</td><td>{n}</td></tr>" for r, n in reasons.items())
        out.append("</table>")
    else:
        out.append('<p class="muted">none</p>')
    narrative_cost = report.get("narrative_cost") or {}
    out.append(
        f'<p class="muted">Narratives cost {_E(_money(narrative_cost.get("cost_usd")))} '
        f"(sync {_E(_money(narrative_cost.get('sync_cost_usd')))}). "
        f"Prices as of {_E(str(report.get('price_table_as_of')))}.</p>"
    )
    out.append("</body></html>")
    return "\n".join(out)


# ----------------------------------------------------------------------------- Markdown

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|>~])")


def md_escape(text: Any) -> str:
    """Text safe inside Markdown (and a table cell): syntax and HTML characters escaped, one line."""
    value = html.escape(str(text), quote=False)
    value = _MD_SPECIAL.sub(r"\\\1", value)
    return re.sub(r"\s*\n\s*", " ", value).strip()


def render_markdown(report: Mapping[str, Any]) -> str:
    """The Markdown twin of ``render_html`` (tables instead of charts)."""
    totals = report.get("totals", {})
    lines = [
        f"# Overnight report: {md_escape(report.get('pipeline'))} {md_escape(report.get('date'))}",
        "",
        f"Model {md_escape(report.get('model'))}, mode {md_escape(report.get('mode'))}, "
        f"generated {md_escape(report.get('generated_at'))}.",
        "",
        "| records in | rows out | dead letters | batches | cost | sync would cost | saved |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {totals.get('n_input_records')} | {totals.get('n_rows')} | {totals.get('n_dead_letters')} | "
        f"{totals.get('n_batches')} | {_money(totals.get('cost_usd'))} | "
        f"{_money(totals.get('sync_cost_usd'))} | {_money(totals.get('savings_usd'))} |",
        "",
        *(
            ["## Cost breakdown", "", "| | tokens | USD |", "|---|---:|---:|"]
            + [f"| {md_escape(a)} | {b} | {c} |" for a, b, c in cost_rows(report)]
            + [""]
            if report.get("cost_breakdown")
            else []
        ),
        "## Requests by final status",
        "",
        "| status | requests |",
        "|---|---:|",
        *(f"| {md_escape(s)} | {n} |" for s, n in report.get("status_counts", {}).items()),
        "",
        "## By category",
        "",
    ]
    for group in report.get("groups", []):
        lines += [
            f"### {md_escape(group['name'])} ({group['n']} tickets, {group['share_pct']}%)",
            "",
            f"Priority: {md_escape(_inline_counts(group['priorities']))}. "
            f"Sentiment: {md_escape(_inline_counts(group['sentiments']))}. "
            f"Products: {md_escape(_inline_counts(group['products']) or 'none named')}.",
            "",
            md_escape(group["narrative"])
            if group.get("narrative")
            else f"_no narrative ({md_escape(group.get('narrative_status'))})_",
            "",
        ]
    history = report.get("history", [])
    lines += [
        "## Last days",
        "",
        "| date | rows | dead letters | cost | sync cost | saved |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {md_escape(h['date'])} | {h['n_rows']} | {h['n_dead_letters']} | {_money(h['cost_usd'])} | "
        f"{_money(h['sync_cost_usd'])} | {_money(h['savings_usd'])} |"
        for h in history
    ]
    reasons = report.get("dead_letter_reasons", {})
    lines += ["", "## Dead letters", ""]
    if reasons:
        lines += [
            "| reason | records |",
            "|---|---:|",
            *(f"| {md_escape(r)} | {n} |" for r, n in reasons.items()),
        ]
    else:
        lines.append("none")
    return "\n".join(lines) + "\n"


def write_report(
    report_dir: Any,
    report: Mapping[str, Any],
    *,
    to_html: Callable[[Mapping[str, Any]], str] = render_html,
    to_markdown: Callable[[Mapping[str, Any]], str] = render_markdown,
) -> dict[str, str]:
    """Write report.json, report.html and report.md atomically under ``report_dir``; return their URLs.

    ``to_html``/``to_markdown`` render another report kind the same way (``audit_report``)."""
    from anthropic_batch import storage

    directory = storage.as_path(report_dir)
    paths = {
        "json": storage.atomic_write_json(directory / "report.json", report),
        "html": storage.atomic_write_bytes(directory / "report.html", to_html(report).encode("utf-8")),
        "markdown": storage.atomic_write_bytes(directory / "report.md", to_markdown(report).encode("utf-8")),
    }
    return {kind: str(path) for kind, path in paths.items()}
