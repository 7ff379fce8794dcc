"""The demo data generator: deterministic, messy on purpose, written where the pipelines read."""

from __future__ import annotations

import datetime as dt
import json

from demo.generate_data import OVERSIZED_CHARS, generate_tickets, valid_ticket_ids, write_tickets

DAY = dt.date(2026, 11, 3)


def test_same_seed_same_day_same_tickets_other_day_differs():
    assert generate_tickets(DAY, 20, seed=1) == generate_tickets(DAY, 20, seed=1)
    assert generate_tickets(DAY, 20, seed=1) != generate_tickets(DAY + dt.timedelta(days=1), 20, seed=1)


def test_tickets_are_messy_on_purpose():
    records = generate_tickets(DAY, 40, seed=7)
    ids = [r["ticket_id"] for r in records]
    assert len(records) == 41  # one duplicate appended
    assert None in ids
    assert len([i for i in ids if i is not None]) - len({i for i in ids if i is not None}) == 1
    assert any(r["body"] == "" for r in records)
    assert any(len(r["body"]) >= OVERSIZED_CHARS for r in records)
    assert any(not r["body"].isascii() for r in records)


def test_written_partition_layout(tmp_path):
    path = write_tickets(tmp_path, DAY, per_day=12, seed=7)
    assert path == tmp_path / "sources" / "support_tickets" / "date=2026-11-03" / "tickets.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == generate_tickets(DAY, 12, seed=7)
    # The code-audit table: tests/dags/test_code_audit_source.py.


def test_valid_ticket_ids_leave_out_exactly_what_prepare_rejects():
    records = generate_tickets(DAY, 40, seed=7)
    valid = valid_ticket_ids(DAY, 40, seed=7)
    ids = [r["ticket_id"] for r in records]
    duplicated = {i for i in ids if i is not None and ids.count(i) > 1}
    assert None not in valid and not valid & duplicated
    for r in records:
        if r["ticket_id"] in valid:
            assert r["body"].strip() and len(r["body"]) < OVERSIZED_CHARS
    # Everything else is kept: ids that are present, unique and have a usable body.
    kept = {r["ticket_id"] for r in records if r["body"].strip() and len(r["body"]) < OVERSIZED_CHARS}
    assert valid == kept - duplicated - {None}
