"""The overnight report: aggregation of a published partition, narratives, escaping, both renderings."""

from __future__ import annotations

import datetime as dt
import json
import re
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from anthropic_batch import report

EVIL = '<script>alert("x")</script>'


def _publish(root, date, rows, *, dead=None, cost=0.5, sync_cost=1.0):
    directory = root / "bulk_extraction" / "extractions" / f"date={date}"
    directory.mkdir(parents=True)
    table = pa.table(
        {
            "custom_id": [f"c{i}" for i in range(len(rows))],
            "status": [r[0] for r in rows],
            "output_json": [json.dumps(r[1]) if r[1] is not None else None for r in rows],
        }
    )
    pq.write_table(table, directory / "data.parquet")
    if dead:
        pq.write_table(pa.table({"reason": dead}), directory / "dead_letter.parquet")
    summary = {
        "pipeline": "bulk_extraction",
        "partition": date,
        "run_id": "manual__x",
        "mode": "batch",
        "model": "claude-haiku-4-5",
        "n_input_records": len(rows) + len(dead or []),
        "n_rows": len(rows),
        "n_dead_letters": len(dead or []),
        "counts_by_status": {},
        "cost_usd": cost,
        "sync_cost_usd": sync_cost,
        "savings_usd": sync_cost - cost,
        "batch_ids": ["msgbatch_1"],
        "attempts": 1,
    }
    (directory / "summary.json").write_text(json.dumps(summary))
    return directory


def _ticket(category, priority="low", sentiment="neutral", summary="s", product=None):
    return {
        "category": category,
        "priority": priority,
        "sentiment": sentiment,
        "summary": summary,
        "product": product,
    }


@pytest.fixture
def published(tmp_path):
    rows = [
        ("succeeded", _ticket("billing", "high", "negative", "double charge", "Vela")),
        ("succeeded", _ticket("billing", "low", "neutral", "invoice VAT", "Vela")),
        ("succeeded", _ticket("bug", "urgent", "negative", "crash on start", "Atlas")),
        ("succeeded", _ticket(EVIL, summary=EVIL)),
        ("errored", None),
        ("invalid_output", None),
    ]
    _publish(tmp_path, "2026-11-01", rows[:2], cost=0.2, sync_cost=0.4)
    directory = _publish(tmp_path, "2026-11-02", rows, dead=["duplicate_key: 2 records", "empty prompt"])
    return tmp_path, directory


def test_aggregate_partition_counts_groups_and_statuses(published):
    _, directory = published
    agg = report.aggregate_partition(directory)
    groups = {g["name"]: g for g in agg["groups"]}
    assert groups["billing"]["n"] == 2
    assert groups["billing"]["priorities"] == {"high": 1, "low": 1}
    assert groups["billing"]["products"] == {"Vela": 2}
    assert agg["groups"][0]["name"] == "billing"  # largest first
    assert sum(g["n"] for g in agg["groups"]) == 4  # only succeeded rows are classified
    assert agg["status_counts"] == {"succeeded": 4, "errored": 1, "invalid_output": 1}
    assert agg["dead_letter_reasons"] == {"duplicate_key": 1, "empty prompt": 1}
    assert agg["totals"]["cost_usd"] == 0.5 and agg["totals"]["n_batches"] == 1


def test_history_reads_existing_days_only(published):
    root, _ = published
    history = report.load_history(root, "bulk_extraction", "2026-11-02", days=5)
    assert [h["date"] for h in history] == ["2026-11-01", "2026-11-02"]
    assert history[0]["sync_cost_usd"] == 0.4


def test_group_rows_and_narratives(published):
    _, directory = published
    agg = report.aggregate_partition(directory)
    rows = report.group_prompt_rows(agg)
    assert [r["category"] for r in rows] == [g["name"] for g in agg["groups"]]
    assert "- double charge" in rows[0]["sample_summaries"]
    results = pa.table(
        {
            "category": ["billing", "bug"],
            "status": ["succeeded", "errored"],
            "output_text": [f"Billing was rough. {EVIL}", None],
            "cost_usd": [0.001, 0.0],
            "sync_cost_usd": [0.002, 0.0],
        }
    )
    report.attach_narratives(agg, results)
    groups = {g["name"]: g for g in agg["groups"]}
    assert groups["billing"]["narrative"].startswith("Billing was rough")
    assert groups["bug"]["narrative"] is None and groups["bug"]["narrative_status"] == "errored"
    assert groups[EVIL]["narrative_status"] == "missing"
    assert agg["narrative_cost"] == {"cost_usd": 0.001, "sync_cost_usd": 0.002}


def test_renderings_escape_data_and_model_text(published, tmp_path):
    root, directory = published
    agg = report.aggregate_partition(directory)
    agg["history"] = report.load_history(root, "bulk_extraction", "2026-11-02")
    report.attach_narratives(
        agg, pa.table({"category": ["billing"], "status": ["succeeded"], "output_text": [EVIL]})
    )
    page = report.render_html(agg)
    assert "<script" not in page  # neither the category name nor the narrative is live markup
    assert "&lt;script&gt;" in page
    assert page.count("<svg") == 4
    assert "http" not in re.sub(r'xmlns="http://www.w3.org/2000/svg"', "", page)  # nothing fetched
    markdown = report.render_markdown(agg)
    assert "<script>" not in markdown and "&lt;script&gt;" in markdown
    assert "| billing | " not in markdown  # groups are headings, statuses are table rows
    assert "| succeeded | 4 |" in markdown
    paths = report.write_report(tmp_path / "reports" / "date=2026-11-02", agg)
    assert json.loads((tmp_path / "reports" / "date=2026-11-02" / "report.json").read_text())["date"] == (
        "2026-11-02"
    )
    assert set(paths) == {"json", "html", "markdown"}


def test_md_escape_is_one_line_and_inert():
    assert report.md_escape("a|b\n# c *d*") == r"a\|b \# c \*d\*"


def test_missing_partition_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"summary\.json missing"):
        report.aggregate_partition(tmp_path / "nothing")


# ----------------------------------------------------------------------------- which dates a run covers


def _event(source_dag_id="bulk_extraction", *, logical=None, run_after=None, extra=None):
    when = run_after or logical
    run = SimpleNamespace(logical_date=logical, run_after=when, start_date=when)
    return SimpleNamespace(source_dag_id=source_dag_id, source_dag_run=run, extra=extra or {}, timestamp=None)


def _at(day, hour=0):
    return dt.datetime(2026, 11, day, hour, tzinfo=dt.UTC)


def test_every_date_of_the_collapsed_asset_events_is_reported():
    # A backfill of 1-3 Nov publishes three partitions while one report run waits: Airflow hands
    # that run all three events (in any order; a re-run of a date publishes it twice).
    events = {
        "anthropic-batch://bulk_extraction/extractions": [
            _event(logical=_at(3)),
            _event(logical=_at(1)),
            _event(logical=_at(2)),
            _event(logical=_at(3)),
            _event("someone_else", logical=_at(9)),
        ]
    }
    dates = report.report_dates(None, events, _at(4, 6), source_dag_id="bulk_extraction", schedule="@daily")
    assert dates == ["2026-11-01", "2026-11-02", "2026-11-03"]


def test_event_partition_follows_the_pipeline_partition_rule():
    # A manual run without a logical date processed the last complete day before it was triggered.
    assert report.event_partition(_event(run_after=_at(30, 9)), "@daily") == "2026-11-29"
    # A partition the publisher states wins.
    assert report.event_partition(_event(logical=_at(3), extra={"partition": "2026-11-02"})) == "2026-11-02"


def test_param_dates_and_the_time_triggered_default():
    assert report.report_dates("2026-11-02", None, _at(4), source_dag_id="bulk_extraction") == ["2026-11-02"]
    several = report.report_dates("2026-11-03, 2026-11-01", None, _at(4), source_dag_id="bulk_extraction")
    assert several == ["2026-11-01", "2026-11-03"]
    assert report.report_dates(None, {}, _at(4, 6), source_dag_id="bulk_extraction") == ["2026-11-03"]
    with pytest.raises(ValueError, match="'yesterday' is not a YYYY-MM-DD date"):
        report.report_dates("yesterday", None, _at(4), source_dag_id="bulk_extraction")


def test_one_batch_of_narratives_for_several_dates_is_split_by_date(published):
    _, directory = published
    results = pa.table(
        {
            "date": ["2026-11-01", "2026-11-02"],
            "category": ["billing", "billing"],
            "status": ["succeeded", "succeeded"],
            "output_text": ["the first", "the second"],
            "cost_usd": [0.001, 0.003],
            "sync_cost_usd": [0.002, 0.006],
        }
    )
    agg = report.aggregate_partition(directory)
    agg["date"] = "2026-11-02"
    report.attach_narratives(agg, results)
    billing = next(g for g in agg["groups"] if g["name"] == "billing")
    assert billing["narrative"] == "the second"
    assert agg["narrative_cost"] == {"cost_usd": 0.003, "sync_cost_usd": 0.006}


def test_published_dates_without_a_report_are_picked_up(tmp_path):
    # Airflow defers an event that arrives while a report run is being queued to the next run;
    # the run in hand takes such dates from storage instead of waiting for the next publication.
    for date in ("2026-10-01", "2026-11-01", "2026-11-02", "2026-11-03"):
        directory = _publish(tmp_path, date, [("succeeded", _ticket("billing"))])
        (directory / "_SUCCESS").write_text("")
    (tmp_path / "reports" / "date=2026-11-02").mkdir(parents=True)  # already reported
    in_progress = tmp_path / "bulk_extraction" / "extractions" / "date=2026-11-04"
    in_progress.mkdir()  # being published: no _SUCCESS yet
    dates = report.dates_to_report(tmp_path, "bulk_extraction", ["2026-11-03"], _at(5, 6), lookback_days=14)
    assert dates == ["2026-11-01", "2026-11-03"]  # not 2 Nov (reported), 1 Oct (too old), 4 Nov (unfinished)
    assert report.unreported_dates(tmp_path, "nothing_here", "2026-01-01", "2026-12-31") == []


def test_the_report_shows_cache_writes_reads_and_both_savings(tmp_path):
    """Issue 13: the summary's cost_breakdown becomes a cost section, tokens and dollars apart."""
    from anthropic_batch.pricing import load_price_table

    directory = _publish(tmp_path, "2026-11-03", [("succeeded", _ticket("billing"))])
    summary = json.loads((directory / "summary.json").read_text())
    usage = {
        "input_tokens": 12_345,
        "output_tokens": 2_000,
        "cache_creation_input_tokens": 4_200,
        "cache_read_input_tokens": 151_200,
    }
    breakdown = load_price_table().breakdown("claude-haiku-4-5", usage, batch=True, cache_ttl="1h")
    summary["cost_breakdown"] = breakdown.model_dump()
    (directory / "summary.json").write_text(json.dumps(summary))

    agg = report.aggregate_partition(directory)
    rows = {label: (tokens, usd) for label, tokens, usd in report.cost_rows(agg)}
    assert rows["cache writes"] == ("4,200", f"${breakdown.cache_write_usd:,.4f}")
    assert rows["cache reads"] == ("151,200", f"${breakdown.cache_read_usd:,.4f}")
    assert rows["saved by caching"] == ("", f"${breakdown.cache_saving_usd:,.4f}")
    assert rows["saved by batching"] == ("", f"${breakdown.batch_saving_usd:,.4f}")
    markdown = report.render_markdown(agg)
    assert "## Cost breakdown" in markdown and "| cache reads | 151,200 |" in markdown
    page = report.render_html(agg)
    assert "<h2>Cost breakdown</h2>" in page and "<td>saved by caching</td>" in page


def test_a_summary_without_a_breakdown_renders_no_cost_section(published):
    _, directory = published
    agg = report.aggregate_partition(directory)
    assert report.cost_rows(agg) == [] and "Cost breakdown" not in report.render_markdown(agg)
