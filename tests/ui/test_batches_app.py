"""The Batches app over a seeded storage root: authentication, numbers, escaping, drill-down, JSON."""

from __future__ import annotations

import re

import pytest

from tests.ui.seed import DAG_ID, LEAKED_KEY, XSS

PREFIX = "/anthropic-batches"
PAGES = [
    f"{PREFIX}/",
    f"{PREFIX}/runs/{DAG_ID}/2026-11-21",
    f"{PREFIX}/dag-runs/{DAG_ID}/manual__2026-11-21T00:00:00+00:00",
]
APIS = [f"{PREFIX}/api/batches", f"{PREFIX}/api/runs/{DAG_ID}/2026-11-21"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def text_of(html: str) -> str:
    """The visible text of a page, whitespace collapsed (what a reader sees, roughly)."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


# -- authentication ----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", APIS)
def test_api_without_token_is_401_json(client, path):
    resp = client.get(path)
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"] == "Bearer"
    assert resp.json()["detail"].startswith("Not authenticated")


@pytest.mark.parametrize("path", PAGES)
def test_page_without_token_is_401_with_login_link(client, path):
    resp = client.get(path)
    assert resp.status_code == 401
    assert resp.headers["content-type"].startswith("text/html")
    assert "Log in to Airflow" in resp.text
    assert "/auth/login" in resp.text  # the simple auth manager's login page
    assert "msgbatch_" not in resp.text  # nothing of the data leaks


@pytest.mark.parametrize("path", PAGES + APIS)
def test_valid_airflow_token_in_header_or_cookie_is_200(client, make_token, path):
    token = make_token()
    assert client.get(path, headers=bearer(token)).status_code == 200
    client.cookies.set("_token", token)
    try:
        assert client.get(path).status_code == 200
    finally:
        client.cookies.clear()


def test_forged_expired_and_garbage_tokens_are_401(client, make_token):
    from airflow.api_fastapi.auth.tokens import JWTGenerator

    forged = JWTGenerator(
        secret_key="not-the-airflow-secret", valid_for=3600, audience="apache-airflow"
    ).generate({"sub": "admin", "role": "admin"})
    expired = make_token(expiration_time_in_seconds=-120)
    for token in (forged, expired, "not.a.jwt", "x"):
        resp = client.get(f"{PREFIX}/api/batches", headers=bearer(token))
        assert resp.status_code == 401, token
        client.cookies.set("_token", token)
        try:
            assert client.get(f"{PREFIX}/").status_code == 401
        finally:
            client.cookies.clear()


def test_bearer_header_wins_over_cookie(client, make_token):
    client.cookies.set("_token", make_token())
    try:
        assert client.get(f"{PREFIX}/api/batches", headers=bearer("garbage")).status_code == 401
    finally:
        client.cookies.clear()


def test_revoked_token_is_401(client, make_token, auth_manager):
    token = make_token()
    assert client.get(f"{PREFIX}/api/batches", headers=bearer(token)).status_code == 200
    auth_manager.revoke_token(token)
    assert client.get(f"{PREFIX}/api/batches", headers=bearer(token)).status_code == 401


def test_user_without_role_is_403(client, make_token):
    token = make_token(role=None, username="nobody")
    assert client.get(f"{PREFIX}/api/batches", headers=bearer(token)).status_code == 403
    resp = client.get(f"{PREFIX}/", headers=bearer(token))
    assert resp.status_code == 403
    assert "msgbatch_" not in resp.text


# -- the Batches page --------------------------------------------------------------------------------
def test_batches_page_shows_every_batch_with_numbers(client, make_token):
    resp = client.get(f"{PREFIX}/", headers=bearer(make_token()))
    assert resp.status_code == 200
    html = resp.text
    for batch_id in ("msgbatch_01AAAA", "msgbatch_02BBBB", "msgbatch_03CCCC", "msgbatch_04DDDD"):
        assert batch_id in html
    text = text_of(html)
    # Totals come from the run summaries: $0.05 + $0.05 batch, $0.10 + $0.10 synchronous.
    assert re.search(r'data-testid="total-cost">\$0\.1000<', html)
    assert "$0.2000" in text and "50.0% of the synchronous cost" in text
    # Success rate over published rows: (100 + 98) / 200.
    assert "99.0%" in text
    # The running batch: badge, counts and time to expiry (created 3h ago, 24h window).
    assert re.search(r'<span class="badge active"[^>]*>in progress</span>', html)
    assert re.search(r"expires in 2[01]h \d\dm", text)
    assert "processing 80" in text
    # A batch that ended with failures gets the partial badge; a clean one the ok badge.
    assert re.search(
        r'<span class="badge partial" title="ended; some requests failed[^"]*">ended</span>', html
    )
    assert re.search(r'<span class="badge ok"[^>]*>ended</span>', html)
    # Three charts, inline SVG, no script anywhere.
    assert html.count('<svg class="chart"') == 3
    assert "<script" not in html
    assert resp.headers["content-security-policy"].startswith("default-src 'none'")
    assert resp.headers["cache-control"] == "no-store"


def test_runs_link_to_their_drill_down(client, make_token):
    html = client.get(f"{PREFIX}/", headers=bearer(make_token())).text
    for day in ("2026-11-20", "2026-11-21", "2026-11-22"):
        assert f'href="{PREFIX}/runs/{DAG_ID}/{day}"' in html


def test_empty_storage_root_renders(tmp_path, make_token):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from anthropic_batch.ui.app import create_app

    outer = FastAPI()
    outer.mount(PREFIX, create_app(storage_root=str(tmp_path / "nothing-here")))
    with TestClient(outer) as tc:
        resp = tc.get(f"{PREFIX}/", headers=bearer(make_token()))
        assert resp.status_code == 200
        assert "No batches recorded yet." in resp.text
        assert tc.get(f"{PREFIX}/api/batches", headers=bearer(make_token())).json()["batches"] == []


# -- the drill-down ----------------------------------------------------------------------------------
def test_run_drill_down_shows_failures_batches_and_escaped_dead_letters(client, make_token):
    resp = client.get(f"{PREFIX}/runs/{DAG_ID}/2026-11-21", headers=bearer(make_token()))
    assert resp.status_code == 200
    html = resp.text
    assert "msgbatch_02BBBB" in html and "msgbatch_03CCCC" in html
    assert "msgbatch_01AAAA" not in html  # another day's batch
    assert "Showing 3 of 3 rejected records." in text_of(html)
    for doc in ("doc-17", "doc-42", "doc-99"):
        assert doc in html
    # Failures by reason: one row per (stage, status, error_type, reason).
    assert "invalid_request_error" in html and "prompt is too long" in html
    # The model's output is shown as text, never as markup.
    assert XSS not in html
    assert "&lt;script&gt;alert(" in html
    assert "<script" not in html
    # An API key that slipped into a reason is redacted.
    assert LEAKED_KEY not in html
    assert "sk-ant-…[redacted]" in html


def test_dag_run_tab_finds_the_run_by_run_id(client, make_token):
    token = make_token()
    by_partition = client.get(f"{PREFIX}/runs/{DAG_ID}/2026-11-21", headers=bearer(token)).text
    # The Airflow UI URL-encodes the run id into the tab's URL.
    resp = client.get(
        f"{PREFIX}/dag-runs/{DAG_ID}/manual__2026-11-21T00%3A00%3A00%2B00%3A00", headers=bearer(token)
    )
    assert resp.status_code == 200
    assert resp.text == by_partition


def test_unknown_runs_are_404(client, make_token):
    token = make_token()
    assert client.get(f"{PREFIX}/runs/{DAG_ID}/2020-01-01", headers=bearer(token)).status_code == 404
    assert client.get(f"{PREFIX}/runs/{DAG_ID}/not-a-date", headers=bearer(token)).status_code == 404
    assert client.get(f"{PREFIX}/runs/..%2F..%2Fetc/2026-11-21", headers=bearer(token)).status_code == 404
    resp = client.get(f"{PREFIX}/dag-runs/other_dag/manual__x", headers=bearer(token))
    assert resp.status_code == 404
    assert "No batches were recorded" in resp.text
    assert client.get(f"{PREFIX}/api/runs/{DAG_ID}/2020-01-01", headers=bearer(token)).json() == {
        "detail": f"No batches and no published summary for {DAG_ID} on 2020-01-01."
    }


# -- JSON API ----------------------------------------------------------------------------------------
def test_api_batches_numbers(client, make_token, seeded_root):
    _, facts = seeded_root
    body = client.get(f"{PREFIX}/api/batches", headers=bearer(make_token())).json()
    assert [b["batch_id"] for b in body["batches"]] == [
        "msgbatch_04DDDD",
        "msgbatch_03CCCC",
        "msgbatch_02BBBB",
        "msgbatch_01AAAA",
    ]
    totals = body["totals"]
    assert totals["n_batches"] == 4 and totals["n_active"] == 1 and totals["n_runs"] == 3
    assert totals["cost_usd"] == pytest.approx(facts["total_cost"])
    assert totals["sync_cost_usd"] == pytest.approx(facts["total_sync"])
    assert totals["savings_usd"] == pytest.approx(0.10)
    assert totals["success_rate"] == pytest.approx(198 / 200)
    running = body["batches"][0]
    assert running["status"] == "in_progress" and running["badge"] == "active"
    assert 20 * 3600 < running["expires_in_seconds"] <= 21 * 3600
    resubmit = body["batches"][1]
    assert resubmit["attempt"] == 2 and resubmit["savings_usd"] == pytest.approx(0.002)
    runs = {r["partition"]: r for r in body["runs"]}
    assert runs["2026-11-22"]["status"] == "running" and not runs["2026-11-22"]["published"]
    assert runs["2026-11-21"]["n_dead_letters"] == 3 and runs["2026-11-21"]["attempts"] == 2
    assert [p["date"] for p in body["series"]] == ["2026-11-20", "2026-11-21", "2026-11-22"]
    assert body["series"][1]["success_rate"] == pytest.approx(0.98)
    assert body["series"][2]["success_rate"] is None


def test_api_run_dead_letters_limit_and_reasons(client, make_token):
    url = f"{PREFIX}/api/runs/{DAG_ID}/2026-11-21"
    body = client.get(url, params={"limit": 2}, headers=bearer(make_token())).json()
    assert body["run"]["run_id"] == "manual__2026-11-21T00:00:00+00:00"
    assert body["dead_letters"]["total"] == 3
    assert len(body["dead_letters"]["rows"]) == 2
    assert sum(r["count"] for r in body["dead_letters"]["by_reason"]) == 3
    assert body["failures"] == {"errored": 1, "invalid_output": 1}
    assert {b["batch_id"] for b in body["batches"]} == {"msgbatch_02BBBB", "msgbatch_03CCCC"}
    assert LEAKED_KEY not in str(body)


def test_long_history_lists_the_newest_batches_only(client, make_token, monkeypatch):
    from anthropic_batch.ui import app as ui_app

    monkeypatch.setattr(ui_app, "MAX_BATCH_ROWS", 2)
    html = client.get(f"{PREFIX}/", headers=bearer(make_token())).text
    assert "Showing the newest 2 of 4 batches" in text_of(html)
    table = html[html.index('<table class="batches">') :]
    assert "msgbatch_04DDDD" in table and "msgbatch_03CCCC" in table
    assert "msgbatch_01AAAA" not in table
    # The run table still covers every run.
    assert f'href="{PREFIX}/runs/{DAG_ID}/2026-11-20"' in html


def test_dags_the_user_may_not_read_are_hidden_and_forbidden(client, make_token, auth_manager, monkeypatch):
    """Per-DAG read access comes from the auth manager: a denied DAG vanishes from the overview."""
    allowed = auth_manager.is_authorized_dag

    def deny_bulk_extraction(*, method, user, access_entity=None, details=None):
        if details is not None and details.id == DAG_ID:
            return False
        return allowed(method=method, user=user, access_entity=access_entity, details=details)

    monkeypatch.setattr(auth_manager, "is_authorized_dag", deny_bulk_extraction)
    token = make_token(role="viewer", username="viewer")
    body = client.get(f"{PREFIX}/api/batches", headers=bearer(token)).json()
    assert body["batches"] == [] and body["runs"] == [] and body["totals"]["cost_usd"] is None
    html = client.get(f"{PREFIX}/", headers=bearer(token)).text
    assert "msgbatch_" not in html
    for path in (f"{PREFIX}/runs/{DAG_ID}/2026-11-21", f"{PREFIX}/api/runs/{DAG_ID}/2026-11-21"):
        resp = client.get(path, headers=bearer(token))
        assert resp.status_code == 403
        assert "doc-17" not in resp.text


def test_damaged_files_do_not_break_the_pages(client, make_token, seeded_root):
    root, _ = seeded_root
    ext = root / "bulk_extraction" / "extractions"
    (ext / "date=2026-11-21" / "dead_letter.parquet").write_bytes(b"PAR1 not really parquet")
    summary = ext / "date=2026-11-20" / "summary.json"
    summary.write_text(
        '{"dag_id": "bulk_extraction", "counts_by_status": [1, 2], "tokens": "many",'
        ' "cost_usd": "a lot", "n_rows": "100"}'
    )
    (root / "_ledger" / DAG_ID / "2026-11-22" / "submit" / "broken.json").write_text("{not json")
    token = make_token()
    overview = client.get(f"{PREFIX}/", headers=bearer(token))
    assert overview.status_code == 200 and "msgbatch_04DDDD" in overview.text
    run = client.get(f"{PREFIX}/runs/{DAG_ID}/2026-11-21", headers=bearer(token))
    assert run.status_code == 200
    assert "The dead-letter file could not be read" in run.text
    assert "msgbatch_02BBBB" in run.text  # the rest of the run still shows
    assert client.get(f"{PREFIX}/runs/{DAG_ID}/2026-11-20", headers=bearer(token)).status_code == 200
