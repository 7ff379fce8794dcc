"""Pure view-model rules of the Batches page: statuses, badges, expiry, money, run roll-up."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from anthropic_batch.ui import data
from anthropic_batch.ui.app import fmt_expiry, fmt_usd

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def entry(**fields):
    base = {"dag_id": "d", "partition": "2026-11-23", "state": "submitted", "mode": "batch", "n_requests": 10}
    return {**base, **fields}


@pytest.mark.parametrize(
    ("fields", "status", "badge"),
    [
        ({"state": "intent"}, "submitting", "muted"),
        ({"processing_status": "in_progress"}, "in_progress", "active"),
        ({"processing_status": "canceling"}, "canceling", "warn"),
        (
            {"state": "ended", "processing_status": "ended", "request_counts": {"succeeded": 10}},
            "ended",
            "ok",
        ),
        (
            {
                "state": "ended",
                "processing_status": "ended",
                "request_counts": {"succeeded": 8, "errored": 2},
            },
            "ended",
            "partial",
        ),
        (
            {"state": "ended", "processing_status": "ended", "request_counts": {"expired": 10}},
            "ended",
            "failed",
        ),
        ({"mode": "sync", "state": "submitted"}, "running", "active"),
        ({"mode": "sync", "state": "ended"}, "ended", "muted"),
    ],
)
def test_status_and_badge(fields, status, badge):
    row = data.batch_row(entry(**fields), NOW)
    assert (row["status"], row["badge"]) == (status, badge)


def test_time_to_expiry_only_while_processing():
    created = NOW - timedelta(hours=23, minutes=30)
    expires = (created + timedelta(hours=24)).isoformat().replace("+00:00", "Z")
    running = data.batch_row(entry(processing_status="in_progress", expires_at=expires), NOW)
    assert running["expires_in_seconds"] == pytest.approx(30 * 60)
    assert fmt_expiry(running["expires_in_seconds"]) == "in 30m"
    assert fmt_expiry(-5) == "expired" and fmt_expiry(3 * 3600 + 61) == "in 3h 01m"
    ended = data.batch_row(entry(state="ended", processing_status="ended", expires_at=expires), NOW)
    assert ended["expires_in_seconds"] is None


def test_savings_need_both_costs():
    assert data.batch_row(entry(cost_usd=0.5, sync_cost_usd=1.0), NOW)["savings_usd"] == pytest.approx(0.5)
    assert data.batch_row(entry(cost_usd=0.5), NOW)["savings_usd"] is None


def test_money_format():
    assert [fmt_usd(v) for v in (None, 0, 0.00421, 1.5, 1234.4, -0.25)] == [
        "—",
        "$0.0000",
        "$0.0042",
        "$1.50",
        "$1,234",
        "-$0.2500",
    ]


def test_unpublished_run_rolls_up_its_batches():
    batches = [
        data.batch_row(
            entry(
                state="ended",
                processing_status="ended",
                cost_usd=0.2,
                sync_cost_usd=0.4,
                request_counts={"succeeded": 10},
                attempt=1,
            ),
            NOW,
        ),
        data.batch_row(entry(processing_status="in_progress", attempt=2), NOW),
    ]
    run = data.run_row("d", "2026-11-23", None, batches)
    assert run["status"] == "running" and not run["published"]
    assert run["cost_usd"] == pytest.approx(0.2) and run["savings_usd"] == pytest.approx(0.2)
    assert run["attempts"] == 2 and run["n_active_batches"] == 1
    assert run["success_rate"] is None  # only published rows count


def test_redact_and_parse_time():
    assert data.redact("key sk-ant-api03-abcdef123 here") == "key sk-ant-…[redacted] here"
    assert data.redact(5) == 5
    assert data.parse_time("2026-11-23T10:00:00Z") == datetime(2026, 11, 23, 10, tzinfo=UTC)
    assert data.parse_time("garbage") is None and data.parse_time(None) is None


def test_other_batches_of_a_chunk_are_listed_with_why():
    row = data.batch_row(
        entry(
            previous_batch_ids=["msgbatch_old"],
            duplicate_batch_ids=["msgbatch_dup"],
            foreign_batch_ids=["msgbatch_other"],
            identity_verified=False,
        ),
        NOW,
    )
    assert row["other_batches"] == [
        ("replaced", "msgbatch_old"),
        ("duplicate, canceled", "msgbatch_dup"),
        ("not this chunk's", "msgbatch_other"),
    ]
    assert row["identity_verified"] is False
