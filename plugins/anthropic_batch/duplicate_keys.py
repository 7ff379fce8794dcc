"""prepare's duplicate-key check in bounded memory (no Python object per key of the day).

Two records are refused when they share a key (``duplicate_key``) or when different keys produce
the same ``custom_id`` (``custom_id_collision``). Every key yields a custom_id and equal keys yield
equal custom_ids, so both cases are among the records whose custom_id occurs more than once.

Pass 1 keeps one 32-bit hash per record in a NumPy array (4 bytes a record), sorts a copy and
marks the records whose hash occurs more than once: the *candidates*. Only the candidates are
confirmed exactly (their custom_ids and keys counted with Arrow's group-by), so a hash collision
never refuses a record. The result holds counts for the candidates only, which the caller reads
by row position: about 4 + 4 + 1 + 1 bytes per record during pass 1, i.e. ~100 MB for 10,000,000
keys, plus Arrow tables for the candidates (the duplicates and ~n²/2³³ chance hash pairs: about
23,000 extra records at 10,000,000 keys).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

#: Records per Arrow batch while hashing (bounds the Python lists alive at any time).
BATCH_ROWS = 65_536


@dataclass
class DuplicateCounts:
    """How many records share a row's custom_id / its keys, kept for the candidate rows only.

    ``positions`` is sorted; rows not in it are unique (count 0).
    """

    positions: np.ndarray
    id_counts: np.ndarray
    key_counts: np.ndarray

    def slice(self, start: int, stop: int) -> tuple[list[int], list[int]]:
        """Counts of rows ``start:stop`` as Python lists (cheap per-row lookups in the caller's loop)."""
        # pyarrow/numpy: kept out of DAG parsing
        import numpy as np

        lo, hi = np.searchsorted(self.positions, [start, stop])
        ids, keys = [0] * (stop - start), [0] * (stop - start)
        for pos, n_id, n_key in zip(
            (self.positions[lo:hi] - start).tolist(),
            self.id_counts[lo:hi].tolist(),
            self.key_counts[lo:hi].tolist(),
            strict=True,
        ):
            ids[pos], keys[pos] = n_id, n_key
        return ids, keys


#: The key columns of the source, batch by batch, in row order; called once per pass (a streamed
#: source is read again rather than held).
KeyBatches = Callable[[], Iterable["pa.RecordBatch"]]


def _key_batches(source: pa.Table | KeyBatches, key_columns: Sequence[str]) -> KeyBatches:
    if callable(source):
        return source
    return lambda: source.select(list(key_columns)).to_batches(max_chunksize=BATCH_ROWS)


def _rows(
    batches: KeyBatches, key_columns: Sequence[str], key_str: Callable[[object], str | None]
) -> Iterator[tuple[int, list[tuple[str | None, ...]]]]:
    """``(first row position, key tuples)`` per batch of the key columns."""
    pos = 0
    for batch in batches():
        batch = batch.select(list(key_columns))
        columns = [col.to_pylist() for col in batch.columns]
        yield pos, [tuple(key_str(v) for v in row) for row in zip(*columns, strict=True)]
        pos += batch.num_rows


def duplicate_counts(
    source: pa.Table | KeyBatches,
    key_columns: Sequence[str],
    custom_id_of: Callable[[Sequence[object]], str],
    key_str: Callable[[object], str | None],
    *,
    n_rows: int | None = None,
) -> DuplicateCounts:
    """Count, exactly, the records sharing each record's custom_id and keys (rows with null keys: 0).

    ``source`` is a table or a function returning its key-column batches (read twice at most: all
    of them, then again for the candidates only), so a streamed source is never held whole.
    ``n_rows``, when known, lets the hashes be filled in place.
    """
    # pyarrow/numpy: kept out of DAG parsing
    import numpy as np

    batches = _key_batches(source, key_columns)
    if n_rows is None and not callable(source):
        n_rows = source.num_rows
    # Filled in place when the row count is known up front (a table, Parquet metadata); else one
    # part per batch, joined at the end (a transient second copy: 5 bytes a record).
    hashes = np.zeros(n_rows or 0, dtype=np.uint32)
    valid = np.zeros(n_rows or 0, dtype=np.bool_)
    hash_parts: list[np.ndarray] = []
    valid_parts: list[np.ndarray] = []
    n = 0
    for start, key_rows in _rows(batches, key_columns, key_str):
        ok = np.fromiter((None not in keys for keys in key_rows), dtype=np.bool_, count=len(key_rows))
        # hash() of a str is SipHash, stable within this process (all we need); 32 bits of it keep
        # the array at 4 bytes a record, and the ~n²/2³³ chance pairs are cleared by the exact check.
        part = np.fromiter(
            (
                hash(custom_id_of(keys)) & 0xFFFFFFFF if good else 0
                for keys, good in zip(key_rows, ok, strict=True)
            ),
            dtype=np.uint32,
            count=len(key_rows),
        )
        n = start + len(key_rows)
        if n_rows is not None and n <= n_rows:
            hashes[start:n], valid[start:n] = part, ok
        else:
            hash_parts.append(part)
            valid_parts.append(ok)
    if hash_parts:
        hashes = np.concatenate([hashes[: n - sum(len(p) for p in hash_parts)], *hash_parts])
        valid = np.concatenate([valid[: len(hashes) - sum(len(p) for p in valid_parts)], *valid_parts])
    elif n_rows is not None and n != n_rows:
        hashes, valid = hashes[:n], valid[:n]
    del hash_parts, valid_parts
    n = len(hashes)

    ordered = hashes[valid]
    ordered.sort()  # in place: one 4-byte copy per record at the peak
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    del ordered
    # Membership by binary search, a slice at a time (np.isin would sort a concatenated copy).
    is_candidate = np.zeros(n, dtype=np.bool_)
    if len(repeated):
        for off in range(0, n, 1 << 20):
            part = hashes[off : off + (1 << 20)]
            at = np.minimum(np.searchsorted(repeated, part), len(repeated) - 1)
            is_candidate[off : off + len(part)] = repeated[at] == part
    is_candidate &= valid
    del hashes, valid, repeated

    if not is_candidate.any():
        empty = np.zeros(0, dtype=np.int64)
        return DuplicateCounts(empty, empty.astype(np.int32), empty.astype(np.int32))
    return _confirm(batches, key_columns, custom_id_of, key_str, is_candidate)


def _confirm(
    batches: KeyBatches,
    key_columns: Sequence[str],
    custom_id_of: Callable[[Sequence[object]], str],
    key_str: Callable[[object], str | None],
    is_candidate: np.ndarray,
) -> DuplicateCounts:
    """Exact counts for the candidate rows only (Arrow group-by; no per-key Python objects kept)."""
    # pyarrow/numpy: kept out of DAG parsing
    import numpy as np
    import pyarrow as pa

    parts = []
    pos = 0
    # Batch by batch with a mask: Table.take on a chunked column would concatenate the whole column.
    for batch in batches():
        batch = batch.select(list(key_columns))
        mask = is_candidate[pos : pos + batch.num_rows]
        positions = np.flatnonzero(mask) + pos
        pos += batch.num_rows
        if not len(positions):
            continue
        sub = batch.filter(pa.array(mask))
        key_rows = [
            tuple(key_str(v) for v in row) for row in zip(*(c.to_pylist() for c in sub.columns), strict=True)
        ]
        parts.append(
            pa.table(
                {
                    "pos": pa.array(positions, pa.int64()),
                    "cid": pa.array([custom_id_of(k) for k in key_rows], pa.string()),
                    # The key tuple as canonical JSON: one comparable value per record.
                    "key": pa.array([json.dumps(k, ensure_ascii=False) for k in key_rows], pa.string()),
                }
            )
        )
    cand = pa.concat_tables(parts)
    del parts
    by_id = cand.group_by("cid", use_threads=False).aggregate([("pos", "count")])
    by_key = cand.group_by("key", use_threads=False).aggregate([("pos", "count")])
    joined = (
        cand.join(by_id.rename_columns(["cid", "n_id"]), "cid", use_threads=False)
        .join(by_key.rename_columns(["key", "n_key"]), "key", use_threads=False)
        .select(["pos", "n_id", "n_key"])
    )
    joined = joined.sort_by("pos")
    n_id = joined["n_id"].to_numpy().astype(np.int32)
    # Only a custom_id that really occurs more than once is a duplicate (a hash collision is not).
    return DuplicateCounts(
        joined["pos"].to_numpy(),
        np.where(n_id > 1, n_id, 0).astype(np.int32),
        joined["n_key"].to_numpy().astype(np.int32),
    )
