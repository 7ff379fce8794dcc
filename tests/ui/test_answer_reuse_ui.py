"""The Batches page shows a run's reused answers (issue 9, item 3) from its summary."""

from __future__ import annotations

import json

from anthropic_batch.contracts import RunSummary
from anthropic_batch.ui import data
from tests.ui.seed import DAG_ID

PREFIX = "/anthropic-batches"


def test_run_row_carries_reuse_from_the_summary():
    summary = RunSummary(n_rows=40, counts_by_status={"succeeded": 40}, n_reused=38, reused_cost_usd=0.0095)
    run = data.run_row(DAG_ID, "2026-11-21", summary, [])
    assert run["n_reused"] == 38 and run["reused_cost_usd"] == 0.0095


def test_run_page_shows_reused_answers(seeded_root, client, make_token):
    root, _ = seeded_root
    [path] = [p for p in root.rglob("summary.json") if "date=2026-11-21" in str(p)]
    summary = json.loads(path.read_text())
    headers = {"Authorization": f"Bearer {make_token()}"}
    html = client.get(f"{PREFIX}/runs/{DAG_ID}/2026-11-21", headers=headers).text
    assert 'data-testid="run-reused"' not in html  # nothing reused: no card

    path.write_text(json.dumps({**summary, "n_reused": 38, "reused_cost_usd": 0.0095}))
    html = client.get(f"{PREFIX}/runs/{DAG_ID}/2026-11-21", headers=headers).text
    assert 'data-testid="run-reused">38<' in html
    assert "paid by earlier runs, not billed again" in html


def test_run_page_of_a_run_still_in_flight_renders_without_reuse_fields(client, make_token):
    headers = {"Authorization": f"Bearer {make_token()}"}
    resp = client.get(f"{PREFIX}/runs/{DAG_ID}/2026-11-22", headers=headers)  # no summary yet
    assert resp.status_code == 200 and 'data-testid="run-reused"' not in resp.text
