"""prepare's bounded-memory duplicate-key check: exact, whatever the 64-bit hashes do."""

from __future__ import annotations

import pyarrow as pa

from anthropic_batch import duplicate_keys
from anthropic_batch.batch_requests import _key_str, custom_id_base


def counts(table: pa.Table, key_columns: list[str]) -> list[tuple[int, int]]:
    result = duplicate_keys.duplicate_counts(table, key_columns, custom_id_base, _key_str)
    ids, keys = result.slice(0, table.num_rows)
    return list(zip(ids, keys, strict=True))


def test_duplicates_and_nulls_are_counted_by_row_position():
    table = pa.table({"k": ["a", "b", "a", None, "c", "a", " ", "b"]})
    assert counts(table, ["k"]) == [(3, 3), (2, 2), (3, 3), (0, 0), (0, 0), (3, 3), (0, 0), (2, 2)]


def test_hash_collisions_refuse_nothing(monkeypatch):
    # Every custom_id hashes alike: all rows become candidates, and the exact check clears them.
    monkeypatch.setattr(duplicate_keys, "hash", lambda _value: 42, raising=False)
    table = pa.table({"k": ["a", "b", "c", "b"]})
    assert [c[0] for c in counts(table, ["k"])] == [0, 2, 0, 2]


def test_different_keys_with_one_custom_id_are_a_collision_not_a_duplicate(monkeypatch):
    monkeypatch.setattr(duplicate_keys, "hash", lambda _value: 1, raising=False)
    table = pa.table({"shop": ["x", "x", "y"], "n": [1, 2, 1]})
    rows = counts(table, ["shop", "n"])
    # custom ids differ (x-1, x-2, y-1), so nothing is refused even though every hash collides.
    assert [r[0] for r in rows] == [0, 0, 0]
    same = duplicate_keys.duplicate_counts(table, ["shop", "n"], lambda keys: "same", _key_str)
    ids, keys = same.slice(0, 3)
    assert ids == [3, 3, 3] and keys == [1, 1, 1]


def test_many_batches_positions_line_up(monkeypatch):
    monkeypatch.setattr(duplicate_keys, "BATCH_ROWS", 7)
    values = [f"r{i % 40}" if i % 3 == 0 else f"u{i}" for i in range(200)]
    expected_dups = {v for v in values if values.count(v) > 1}
    rows = counts(pa.table({"k": values}), ["k"])
    assert [v for v, (n, _) in zip(values, rows, strict=True) if n] == [
        v for v in values if v in expected_dups
    ]
    assert all(n == values.count(v) for v, (n, _) in zip(values, rows, strict=True) if n)
    result = duplicate_keys.duplicate_counts(pa.table({"k": values}), ["k"], custom_id_base, _key_str)
    for start, stop in ((0, 7), (5, 61), (199, 200), (3, 3)):
        assert result.slice(start, stop)[0] == [r[0] for r in rows[start:stop]]
