"""The explicit Cancel action of the Batches page: edit rights, CSRF, the API call, the ledger record.

Real pieces throughout: Airflow's auth manager and tokens, the emulator behind the provider's hook,
ledger entries written by ``submit_idempotently``.
"""

from __future__ import annotations

import re

import pytest

from anthropic_batch.cancel import user_canceled_batches
from anthropic_batch.hooks import AnthropicBatchHook
from anthropic_batch.ledger import SubmissionLedger
from anthropic_batch.submission import submit_idempotently
from tests.plugins.anthropic_batch.test_hooks import make_chunk, sdk_client, use_emulator, wait_ended
from tests.plugins.anthropic_batch.test_submission import submit_kwargs

PREFIX = "/anthropic-batches"
DAG_ID = "bulk_extraction"
PARTITION = "2026-11-22"
ORIGIN = "http://testserver"  # the TestClient's own origin


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def live(emulator_factory, monkeypatch, tmp_path, auth_manager):
    """A batch in progress at the emulator, its ledger entry in a storage root, the app over it."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from anthropic_batch.ui.app import create_app

    emu = emulator_factory("--processing-seconds", "60", "--cancel-seconds", "0.5")
    use_emulator(monkeypatch, emu)  # anthropic_default: what the ledger entry's batch is canceled through
    root = tmp_path / "storage"
    ledger = SubmissionLedger(str(root))
    info = make_chunk(tmp_path / "work", 3)
    handle = submit_idempotently(
        AnthropicBatchHook(),
        ledger,
        **submit_kwargs(info, dag_id=DAG_ID, partition=PARTITION, task_id="batch.submit"),
    )
    outer = FastAPI()
    outer.mount(PREFIX, create_app(storage_root=str(root)))
    with TestClient(outer) as client:
        yield {"client": client, "emu": emu, "handle": handle, "ledger": ledger}


def paths(batch_id: str) -> dict[str, str]:
    base = f"/runs/{DAG_ID}/{PARTITION}/batches/{batch_id}/cancel"
    return {"page": PREFIX + base, "form": PREFIX + base, "api": f"{PREFIX}/api{base}"}


def cancel_initiated(live) -> bool:
    batch = sdk_client(live["emu"]).messages.batches.retrieve(live["handle"]["batch_id"])
    return batch.cancel_initiated_at is not None


def test_viewer_sees_no_cancel_and_is_refused(live, make_token):
    client, batch_id = live["client"], live["handle"]["batch_id"]
    token = make_token(role="viewer", username="vera")
    run_page = client.get(f"{PREFIX}/runs/{DAG_ID}/{PARTITION}", headers=bearer(token))
    assert run_page.status_code == 200 and batch_id in run_page.text
    assert "Cancel…" not in run_page.text
    assert client.get(paths(batch_id)["page"], headers=bearer(token)).status_code == 403
    resp = client.post(paths(batch_id)["api"], headers=bearer(token))
    assert resp.status_code == 403 and "may not change runs" in resp.json()["detail"]
    assert not cancel_initiated(live)
    assert "cancel_reason" not in live["ledger"].read(live["handle"]["ledger_path"])


def test_user_with_edit_rights_cancels_through_the_json_route(live, make_token):
    client, handle = live["client"], live["handle"]
    token = make_token(role="user", username="alice")
    run_page = client.get(f"{PREFIX}/runs/{DAG_ID}/{PARTITION}", headers=bearer(token)).text
    assert paths(handle["batch_id"])["page"] in run_page  # the "Cancel…" link of the in-progress batch

    resp = client.post(paths(handle["batch_id"])["api"], headers=bearer(token))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["batch_id"] == handle["batch_id"]
    assert body["canceled_by"] == "alice" and body["cancel_reason"] == "user"
    assert body["processing_status"] in ("canceling", "ended") and body["cancel_requested_at"]
    assert cancel_initiated(live)
    entry = live["ledger"].read(handle["ledger_path"])
    assert entry["canceled_by"] == "alice" and entry["cancel_reason"] == "user"
    assert entry["cancel_requested_at"] == body["cancel_requested_at"]
    # What resubmit reads to dead-letter (not retry) this batch's canceled requests.
    assert user_canceled_batches(live["ledger"].root, DAG_ID, PARTITION) == {
        handle["batch_id"]: "canceled by alice"
    }

    after = client.get(f"{PREFIX}/runs/{DAG_ID}/{PARTITION}", headers=bearer(token)).text
    assert "canceled by alice" in after
    assert paths(handle["batch_id"])["page"] not in after  # no second cancel offered

    wait_ended(sdk_client(live["emu"]), handle["batch_id"])
    again = client.post(paths(handle["batch_id"])["api"], headers=bearer(token))
    assert again.status_code == 409 and "already ended" in again.json()["detail"]


def test_cookie_form_needs_the_form_token_and_our_origin(live, make_token):
    client, batch_id = live["client"], live["handle"]["batch_id"]
    client.cookies.set("_token", make_token(role="op", username="olga"))
    try:
        page = client.get(paths(batch_id)["page"])
        assert page.status_code == 200
        assert "no-store" in page.headers["cache-control"] and "<script" not in page.text
        form_token = re.search(r'name="form_token" value="([0-9a-f]{64})"', page.text).group(1)
        url = paths(batch_id)["form"]

        # A cross-site form post: the browser sends the cookie, but the Origin is another site.
        forged = client.post(url, data={"form_token": form_token}, headers={"Origin": "https://evil.example"})
        assert forged.status_code == 403
        # Same origin, but no (or a wrong) form token: a page that never saw ours.
        assert client.post(url, data={}, headers={"Origin": ORIGIN}).status_code == 403
        assert client.post(url, data={"form_token": "0" * 64}, headers={"Origin": ORIGIN}).status_code == 403
        # No Origin and no Referer at all: refused too.
        assert client.post(url, data={"form_token": form_token}).status_code == 403
        # Cookie-authenticated JSON calls get the same checks.
        assert client.post(paths(batch_id)["api"], headers={"Origin": ORIGIN}).status_code == 403
        assert not cancel_initiated(live)

        ok = client.post(
            url,
            data={"form_token": form_token},
            headers={"Referer": f"{ORIGIN}{paths(batch_id)['page']}"},
            follow_redirects=False,
        )
        assert ok.status_code == 303
        assert ok.headers["location"] == f"{PREFIX}/runs/{DAG_ID}/{PARTITION}"
    finally:
        client.cookies.clear()
    assert cancel_initiated(live)
    assert live["ledger"].read(live["handle"]["ledger_path"])["canceled_by"] == "olga"


def test_unknown_batch_and_bad_ids_are_404(live, make_token):
    client = live["client"]
    token = make_token(role="admin", username="admin")
    for batch_id in ("msgbatch_nope", "not%20an%20id"):
        resp = client.post(paths(batch_id)["api"], headers=bearer(token))
        assert resp.status_code == 404, resp.text
    assert not cancel_initiated(live)


def test_without_login_nothing_is_canceled(live):
    client, batch_id = live["client"], live["handle"]["batch_id"]
    assert client.post(paths(batch_id)["api"]).status_code == 401
    assert client.post(paths(batch_id)["form"], data={}, headers={"Origin": ORIGIN}).status_code == 401
    assert not cancel_initiated(live)
