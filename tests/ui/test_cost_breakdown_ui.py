"""The Batches page shows cache writes, cache reads and both savings (issue 13) from the summaries."""

from __future__ import annotations

import json

import pytest

from anthropic_batch.contracts import ContractError, RunSummary, parse
from anthropic_batch.pricing import load_price_table
from anthropic_batch.ui import data
from tests.ui.seed import DAG_ID

PREFIX = "/anthropic-batches"
USAGE = {
    "input_tokens": 12_345,
    "output_tokens": 2_000,
    "cache_creation_input_tokens": 4_200,
    "cache_read_input_tokens": 151_200,
}


def _breakdown() -> dict:
    return load_price_table().breakdown("claude-haiku-4-5", USAGE, batch=True, cache_ttl="1h").model_dump()


def test_run_rows_and_totals_carry_the_breakdown():
    one = data.run_row(DAG_ID, "2026-11-20", RunSummary(n_rows=1, cost_breakdown=_breakdown()), [])
    two = data.run_row(DAG_ID, "2026-11-21", RunSummary(n_rows=1, cost_breakdown=_breakdown()), [])
    old = data.run_row(DAG_ID, "2026-11-19", RunSummary(n_rows=1), [])
    assert one["cost_breakdown"] == _breakdown() and old["cost_breakdown"] is None
    # A malformed breakdown makes the whole summary invalid: it is skipped when read (run_index).
    with pytest.raises(ContractError, match=r"summary\.json.*cost_breakdown\.input_tokens"):
        parse(
            RunSummary,
            {"n_rows": 1, "cost_breakdown": {"input_tokens": "many"}},
            "date=2026-11-18/summary.json",
        )
    totals = data.totals([], [one, two, old])
    assert totals["n_runs_with_breakdown"] == 2
    assert totals["cost_breakdown"]["cache_read_tokens"] == 2 * 151_200
    rows = {r["label"]: r for r in data.cost_breakdown_rows(totals["cost_breakdown"])}
    assert rows["cache writes"]["tokens"] == 8_400
    assert rows["saved by caching"]["tokens"] is None and rows["saved by caching"]["usd"] > 0
    assert rows["saved by batching"]["usd"] > 0


def test_pages_show_the_cost_breakdown(seeded_root, client, make_token):
    root, _ = seeded_root
    [path] = [p for p in root.rglob("summary.json") if "date=2026-11-21" in str(p)]
    summary = json.loads(path.read_text())
    headers = {"Authorization": f"Bearer {make_token()}"}
    run_url = f"{PREFIX}/runs/{DAG_ID}/2026-11-21"
    assert 'data-testid="run-cost-breakdown"' not in client.get(run_url, headers=headers).text

    path.write_text(json.dumps({**summary, "cost_breakdown": _breakdown()}))
    html = client.get(run_url, headers=headers).text
    assert 'data-testid="run-cost-breakdown"' in html
    for label in ("cache writes", "cache reads", "saved by caching", "saved by batching"):
        assert f"<td>{label}</td>" in html
    assert "151,200" in html and "4,200" in html
    overview = client.get(f"{PREFIX}/", headers=headers).text
    assert 'data-testid="total-cost-breakdown"' in overview and "151,200" in overview
