"""Answers already paid for, reused by request fingerprint: a rerun re-bills only what changed.

Every prepared request has a ``request_fingerprint`` (sha256 of its canonical ``params``: model,
max_tokens, system prompt, output schema or forced tool, the rendered prompt), and every RESULT row
carries the fingerprint of the request it answers. Two requests with one fingerprint are the same
question, so a successful, valid answer to one is an answer to the other.

``apply_reuse`` runs in prepare, right after the request files are written and before anything is
sent. It looks up each prepared request's fingerprint among

1. the answers already collected for this work dir (the partition): every
   ``results/attempt-NN/*.parquet`` and the previous ``results/reused.parquet``. A rerun of prepare
   rewrites ``requests/``, but never ``results/``, and result rows carry their own fingerprint, so
   these files are the answers index of the partition;
2. optionally, the pipeline's answer cache (``reuse_answers: {enabled, max_age_days}`` in the
   pipeline YAML): answers paid for on other dates, within the maximum age (see *The cache*).

Only successful, valid answers are reused: status ``succeeded``, not cut off at ``max_tokens`` and,
with an output model, ``output_json`` that still validates against it. Errors, truncations and
invalid output are sent again. The reused rows go to ``results/reused.parquet`` (RESULT schema; the
current custom_id and keys; ``attempt`` 0 and the ``batch_id`` of the batch that originally paid for
the answer; ``cost_usd`` and ``sync_cost_usd`` 0, because this run spends nothing on them). Their
requests are taken out of the chunk files before anything is submitted: a chunk with nothing reused
is kept byte for byte (a rerun while its batch is in flight re-attaches to it through the ledger),
a fully reused one disappears, and what is left of the partly reused ones is packed into new
chunks. So a rerun with k changed records sends at most k requests, and an edit in one place does
not reshuffle the rest. ``keys.parquet`` keeps every prepared request (one row per input record
downstream); a reused one has ``chunk_index`` -1. The manifest gets a ``reuse`` section (counts,
the original cost of what was reused, the reused file, the cache settings); ``merge_inputs`` gives
the resubmit step the reused file as one more merge input and ``summary_fields`` the publish step
its summary fields.

The cache: ``{root}/{pipeline}/answer_cache/fp=X/{written date}--{partition}--{run digest}.parquet``
holds, per file, the valid answers one publish paid for (rows with ``attempt`` >= 1), sorted by
fingerprint, bucketed by the fingerprint's first hex digit ``X``. Files are only ever added (one per
bucket and run, deterministic names so a retried publish overwrites its own). A lookup lists only
the buckets of the fingerprints it looks for, skips by name the files older than ``max_age_days``,
and reads the rest newest first: the fingerprint column, filtered with ``pyarrow.compute.is_in``,
then only the row groups (512 rows) that hold a match; a fingerprint found is not looked for in
older files. It never scans the published partitions. Files past the maximum age are ignored,
not deleted: expire them with a storage lifecycle rule if space matters (the date leads the name).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from anthropic_batch import layout, storage
from anthropic_batch.contracts import ChunkInfo, Manifest, ReuseSection
from anthropic_batch.ledger import ledger_root_for
from anthropic_batch.status import RequestStatus
from anthropic_batch.storage import TMP_MARKER, PathLike

if TYPE_CHECKING:
    import pyarrow as pa
    from airflow.sdk import ObjectStoragePath
    from pydantic import BaseModel

# pyarrow and results (pyarrow) are imported inside the functions: prepare and publish import this
# module, and DAG files import those at parse time.

log = logging.getLogger(__name__)

REUSED_FILE = layout.REUSED_FILE
#: The manifest section written by ``apply_reuse``.
MANIFEST_KEY = "reuse"
#: ``attempt`` of a reused row: not sent by this run.
REUSED_ATTEMPT = 0
#: Hex digits of the fingerprint that pick a cache bucket (16 buckets).
CACHE_BUCKET_CHARS = 1
_CACHE_ROW_GROUP = 512  # small row groups: a lookup reads only those holding a match
_FP = "request_fingerprint"


def _answer_columns() -> list[str]:
    # loads pyarrow: kept out of DAG parsing
    from anthropic_batch.results import OUTCOME_COLUMNS

    return list(OUTCOME_COLUMNS)


# -- which answers may be reused ------------------------------------------------------------------


def reusable_mask(table: pa.Table, structured: bool) -> pa.Array:
    """Rows that are successful, valid answers: succeeded, not truncated, with JSON when structured."""
    # pyarrow/numpy: kept out of DAG parsing
    import pyarrow as pa
    import pyarrow.compute as pc

    if table.num_rows == 0:
        return pa.array([], pa.bool_())
    mask = pc.and_(pc.equal(table["status"], RequestStatus.SUCCEEDED.value), pc.is_valid(table[_FP]))
    truncated = pc.fill_null(pc.equal(table["stop_reason"], "max_tokens"), False)
    mask = pc.and_(mask, pc.invert(truncated))
    if structured:
        mask = pc.and_(mask, pc.is_valid(table["output_json"]))
    return pc.fill_null(mask, False)


def _still_valid(answers: pa.Table, output_model: type[BaseModel] | None) -> pa.Table:
    """Drop answers whose ``output_json`` no longer validates (a validator changed, say)."""
    # pyarrow/numpy: kept out of DAG parsing
    import pyarrow as pa
    from pydantic import ValidationError

    if output_model is None or answers.num_rows == 0:
        return answers
    validate = output_model.__pydantic_validator__.validate_json
    keep = []
    for text in answers.column("output_json").to_pylist():
        try:
            validate(text)
            keep.append(True)
        except ValidationError:
            keep.append(False)
    if all(keep):
        return answers
    log.info("%d earlier answer(s) no longer validate against the output model: resent.", keep.count(False))
    return answers.filter(pa.array(keep, pa.bool_()))


# -- the partition's own answers --------------------------------------------------------------------


def work_dir_answer_files(work: ObjectStoragePath) -> list[ObjectStoragePath]:
    """The partition's collected results, newest first: ``results/reused.parquet`` and the
    ``results/attempt-NN/*.parquet`` files (highest attempt first)."""
    files = layout.attempt_result_files(work, newest_first=True)
    reused = layout.reused_results_path(work)
    return [reused, *files] if reused.exists() else files


def _read_answers(path: PathLike, wanted: pa.Array, structured: bool) -> pa.Table | None:
    """The reusable answers (OUTCOME columns) in one RESULT file for the ``wanted`` fingerprints."""
    # pyarrow/numpy: kept out of DAG parsing
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = _answer_columns()
    try:
        table = storage.read_parquet(path, columns=columns, use_threads=False)
    except (OSError, pa.ArrowException) as exc:
        log.warning("Skipping an unreadable results file %s (its answers are sent again): %s", path, exc)
        return None
    if set(table.column_names) != set(columns):  # (the reader silently leaves out absent columns)
        log.warning(
            "Skipping %s: not RESULT rows (columns %s); its answers are sent again", path, table.column_names
        )
        return None
    table = table.select(columns)
    table = table.filter(pc.and_(reusable_mask(table, structured), pc.is_in(table[_FP], wanted)))
    return table if table.num_rows else None


# -- the cache ----------------------------------------------------------------------------------------


def _bucket(fingerprint: str) -> str:
    return fingerprint[:CACHE_BUCKET_CHARS]


def _cache_file_date(name: str) -> date | None:
    try:
        return date.fromisoformat(name[:10])
    except ValueError:
        return None


def _read_matches(path: ObjectStoragePath, wanted: pa.Array, columns: Sequence[str]) -> pa.Table | None:
    """The rows of one cache file whose fingerprint is in ``wanted``: the fingerprint column first,
    then only the row groups that hold a match (most files of a small lookup stop at the first read)."""
    # pyarrow/numpy: kept out of DAG parsing
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    with storage.open_binary(path) as handle:
        parquet = pq.ParquetFile(handle)
        hit = pc.is_in(parquet.read(columns=[_FP], use_threads=False).column(0), value_set=wanted)
        rows = np.flatnonzero(hit.to_numpy(zero_copy_only=False))
        if not len(rows):
            return None
        starts = np.cumsum(
            [0] + [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
        )
        groups = sorted({int(g) for g in np.searchsorted(starts, rows, side="right") - 1})
        table = parquet.read_row_groups(groups, columns=list(columns), use_threads=False)
    return table.filter(pc.is_in(table[_FP], value_set=wanted))


def lookup_cache(
    cache_dir: PathLike,
    wanted: Sequence[str],
    *,
    max_age_days: int,
    structured: bool,
    today: date | None = None,
) -> pa.Table | None:
    """Answers in the cache for the ``wanted`` fingerprints (one each, the newest), or None.

    Only the buckets of ``wanted`` are listed, only files younger than ``max_age_days`` (by name)
    are opened, newest first, and a fingerprint found is not looked for in older files.
    """
    # pyarrow/numpy: kept out of DAG parsing
    import pyarrow as pa
    import pyarrow.compute as pc

    cache = storage.as_path(cache_dir)
    oldest = (today or datetime.now(UTC).date()) - timedelta(days=max_age_days)
    columns = [*_answer_columns(), "partition"]
    by_bucket: dict[str, list[str]] = {}
    for fp in wanted:
        by_bucket.setdefault(_bucket(fp), []).append(fp)
    pieces = []
    for bucket, fps in sorted(by_bucket.items()):
        directory = cache / f"fp={bucket}"
        if not directory.exists():
            continue
        files = sorted(
            (
                f
                for f in directory.iterdir()
                if f.name.endswith(".parquet")
                and TMP_MARKER not in f.name
                and (_cache_file_date(f.name) or date.min) >= oldest
            ),
            key=lambda p: p.name,
            reverse=True,
        )
        missing = pa.array(sorted(set(fps)), pa.string())
        for file in files:
            found = _read_matches(file, missing, columns)
            if found is None:
                continue
            found = found.filter(reusable_mask(found, structured))
            if found.num_rows:
                pieces.append(found)
                missing = pc.filter(missing, pc.invert(pc.is_in(missing, value_set=found[_FP])))
                if not len(missing):
                    break
    if not pieces:
        return None
    return pa.concat_tables(pieces) if len(pieces) > 1 else pieces[0]


def write_cache(
    cache_dir: PathLike,
    merged: pa.Table,
    *,
    partition: str,
    run_id: str | None,
    structured: bool,
    today: date | None = None,
) -> int:
    """Add the answers this run paid for (valid, ``attempt`` >= 1) to the cache; returns how many."""
    # pyarrow/numpy: kept out of DAG parsing
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = _answer_columns()
    if merged.num_rows == 0:
        return 0
    table = merged.select(columns)
    paid = pc.fill_null(pc.greater_equal(table["attempt"], 1), False)
    table = table.filter(pc.and_(reusable_mask(table, structured), paid))
    if table.num_rows == 0:
        return 0
    table = table.append_column("partition", pa.repeat(pa.scalar(partition, pa.string()), table.num_rows))
    table = table.sort_by([(_FP, "ascending")])
    buckets = pc.utf8_slice_codeunits(table[_FP], 0, CACHE_BUCKET_CHARS)
    digest = hashlib.sha256(str(run_id).encode()).hexdigest()[:12]
    stamp = (today or datetime.now(UTC).date()).isoformat()
    cache = storage.as_path(cache_dir)
    for bucket in sorted(set(buckets.to_pylist())):
        part = table.filter(pc.equal(buckets, bucket))
        storage.write_parquet_atomic(
            cache / f"fp={bucket}" / f"{stamp}--{partition}--{digest}.parquet",
            part,
            row_group_size=_CACHE_ROW_GROUP,
        )
    return table.num_rows


# -- prepare: reuse before sending -----------------------------------------------------------------


def _pick(answers: Sequence[pa.Table | None]) -> pa.Table | None:
    """One answer per fingerprint (the first listed wins: the files come newest first)."""
    # pyarrow/numpy: kept out of DAG parsing
    import pyarrow as pa
    import pyarrow.compute as pc

    present = [t.select(_answer_columns()) for t in answers if t is not None and t.num_rows]
    if not present:
        return None
    table = pa.concat_tables(present) if len(present) > 1 else present[0]
    return table.take(pc.index_in(pc.unique(table[_FP]), value_set=table[_FP]))


def _move(source: ObjectStoragePath, target: ObjectStoragePath) -> None:
    if storage.is_local(source):
        os.replace(source.path, target.path)
    else:
        source.fs.mv(source.path, target.path)


def _repack_chunks(
    work: ObjectStoragePath,
    chunks: Sequence[ChunkInfo],
    keys: pa.Table,
    reused: pa.Array,
    *,
    max_requests: int,
    max_bytes: int,
) -> tuple[list[ChunkInfo], pa.Table]:
    """Take the reused requests out of the chunk files; returns the new ChunkInfos and ``keys``
    with each request's new ``chunk_index`` (-1: reused, not sent).

    A chunk none of whose requests is reused is kept whole, byte for byte (so a rerun while its
    batch is still in flight re-attaches to that batch through the ledger); a chunk fully reused is
    dropped; what is left of the partly reused ones is pooled, in order, into new chunks within the
    same limits, after the kept ones. Files are renamed to ``chunk-NNNNN`` only once every original
    has been read, in an order that never overwrites one still to be moved.
    """
    # pyarrow/numpy: kept out of DAG parsing; loads pyarrow: kept out of DAG parsing
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from anthropic_batch.batch_requests import _ChunkWriter, chunk_name, iter_chunk_lines
    from anthropic_batch.results import custom_id_of_line

    requests_dir = layout.requests_dir(work)
    old_index = keys["chunk_index"].to_numpy()
    is_reused = np.asarray(pc.fill_null(reused, False).to_numpy(zero_copy_only=False), dtype=bool)
    n_reused = np.bincount(old_index[is_reused], minlength=len(chunks))
    ordered = sorted(chunks, key=lambda c: c.index)
    intact = [c for c in ordered if n_reused[c.index] == 0]
    partial = [c for c in ordered if 0 < n_reused[c.index] < c.n_requests]

    # 1. Pool what is left of the partly reused chunks (under names no chunk uses).
    reused_ids = set(keys.filter(pa.array(is_reused))["custom_id"].to_pylist())
    pooled: list[ChunkInfo] = []
    pooled_ids: list[str] = []
    pooled_chunk: list[int] = []
    writer: _ChunkWriter | None = None
    try:
        for chunk in partial:
            for line in iter_chunk_lines(chunk.path):
                custom_id = custom_id_of_line(line)
                if custom_id in reused_ids:
                    continue
                if writer is not None and writer.would_exceed(line, max_requests, max_bytes):
                    pooled.append(writer.close())
                    writer = None
                if writer is None:
                    index = len(intact) + len(pooled)
                    writer = _ChunkWriter(requests_dir / f"pool-{index:05d}.jsonl", index)
                writer.write(line)
                pooled_ids.append(str(custom_id))
                pooled_chunk.append(writer.index)
        if writer is not None:
            pooled.append(writer.close())
    except BaseException as exc:
        if writer is not None:
            writer.abort(exc)
        raise

    # 2. Drop the originals not kept; 3. kept chunks move down to 0..k-1 (never onto one still to
    # move: every lower original is gone or already moved); 4. the pooled ones follow.
    kept_paths = {c.path for c in intact}
    for chunk in ordered:
        if chunk.path not in kept_paths:
            storage.as_path(chunk.path).unlink()
    infos: list[ChunkInfo] = []
    remap = np.full(len(chunks) + 1, -1, dtype=np.int32)
    for new_index, chunk in enumerate(intact):
        source, target = storage.as_path(chunk.path), requests_dir / chunk_name(new_index)
        if source != target:
            _move(source, target)
        infos.append(chunk.model_copy(update={"index": new_index, "path": str(target)}))
        remap[chunk.index] = new_index
    for info in pooled:
        target = requests_dir / chunk_name(info.index)
        _move(storage.as_path(info.path), target)
        infos.append(info.model_copy(update={"path": str(target)}))

    # The new chunk index of every request: kept chunks by their move, pooled ones in pooling order.
    new_index = remap[np.where(old_index >= 0, old_index, len(chunks))]
    new_index[is_reused] = -1
    in_pool = ~is_reused & (new_index == -1)
    if keys.filter(pa.array(in_pool))["custom_id"].to_pylist() != pooled_ids:
        raise RuntimeError(
            f"re-packed chunks disagree with {requests_dir / 'keys.parquet'}: run prepare again"
        )
    new_index[in_pool] = np.asarray(pooled_chunk, dtype=np.int32)
    column = pa.array(new_index, pa.int32())
    keys = keys.set_column(keys.schema.get_field_index("chunk_index"), "chunk_index", column)
    return infos, keys


def _reused_rows(
    keys: pa.Table, answers: pa.Table | None, key_columns: Sequence[str]
) -> tuple[pa.Table, pa.Array, pa.Table]:
    """RESULT rows for the prepared requests that have an answer, the mask of those requests in
    ``keys``, and the answers used (one per row, with their original cost)."""
    # pyarrow/numpy: kept out of DAG parsing; loads pyarrow: kept out of DAG parsing
    import pyarrow as pa
    import pyarrow.compute as pc

    from anthropic_batch.results import result_schema

    schema = result_schema(key_columns)
    if answers is None:
        empty = schema.empty_table()
        return empty, pa.repeat(pa.scalar(False), keys.num_rows), empty.select(_answer_columns())
    position = pc.index_in(keys[_FP].combine_chunks(), value_set=answers[_FP])
    mask = pc.is_valid(position)
    hits = keys.filter(mask)
    found = answers.take(position.filter(mask))
    n = hits.num_rows
    data: dict[str, Any] = {"custom_id": hits["custom_id"]}
    for name in key_columns:
        data[name] = hits[name]
    for name in _answer_columns():
        data[name] = found[name]
    data[_FP] = hits[_FP]
    # Paid for by an earlier run: nothing is spent on these rows now (the summary keeps the original).
    data["cost_usd"] = pa.repeat(pa.scalar(0.0), n)
    data["sync_cost_usd"] = pa.repeat(pa.scalar(0.0), n)
    data["attempt"] = pa.repeat(pa.scalar(REUSED_ATTEMPT, pa.int32()), n)
    table = pa.table({name: data[name] for name in schema.names}).cast(schema)
    return table, mask, found


def apply_reuse(
    work_dir: PathLike,
    manifest: Manifest,
    *,
    output_model: type[BaseModel] | None,
    max_requests_per_chunk: int,
    max_bytes_per_chunk: int,
    cache_dir: PathLike | None = None,
    cache_max_age_days: int | None = None,
) -> Manifest:
    """Reuse earlier answers for the prepared requests of ``work_dir`` (see the module docstring).

    Writes ``results/reused.parquet`` (empty when nothing is reused), re-packs the chunk files and
    ``keys.parquet`` when something is, and returns the manifest with its ``reuse`` section (also
    written to ``requests/manifest.json``). ``cache_dir`` with ``cache_max_age_days`` turns the
    pipeline's answer cache on.
    """
    # pyarrow/numpy: kept out of DAG parsing
    import pyarrow as pa
    import pyarrow.compute as pc

    from anthropic_batch.batch_requests import read_keys

    work = storage.as_path(work_dir)
    key_columns = list(manifest.spec.key_columns)
    structured = output_model is not None
    use_cache = cache_dir is not None and cache_max_age_days is not None
    keys_path = layout.keys_path(work)
    answer_files = work_dir_answer_files(work)
    # Only the fingerprints to look answers up by; the day's whole keys are read only when some
    # answer is found (a first run, or a rerun with nothing to reuse, never holds them).
    fingerprints = (
        storage.read_parquet(keys_path, columns=[_FP], use_threads=False)[_FP]
        if answer_files or use_cache
        else pa.chunked_array([], pa.string())
    )
    wanted = pc.unique(fingerprints.drop_null()) if len(fingerprints) else pa.array([], pa.string())
    del fingerprints

    # The partition's own answers first (read before reused.parquet is rewritten below).
    own = _pick([_read_answers(p, wanted, structured) for p in answer_files])
    own = _still_valid(own, output_model) if own is not None else None
    from_cache = None
    if use_cache and len(wanted):
        rest = wanted if own is None else pc.filter(wanted, pc.invert(pc.is_in(wanted, own[_FP])))
        if len(rest):
            cached = lookup_cache(
                cache_dir, rest.to_pylist(), max_age_days=int(cache_max_age_days), structured=structured
            )
            from_cache = _still_valid(_pick([cached]), output_model) if cached is not None else None
    answers = _pick([own, from_cache])
    keys = storage.read_parquet(keys_path) if answers is not None else read_keys(work, [])
    reused, mask, found = _reused_rows(keys, answers, key_columns)
    n_from_cache = int(pc.sum(pc.is_in(reused[_FP], from_cache[_FP])).as_py() or 0) if from_cache else 0
    reused_path = layout.reused_results_path(work)
    storage.write_parquet_atomic(reused_path, reused, reused.schema)

    n_reused = reused.num_rows
    if n_reused:
        infos, keys = _repack_chunks(
            work,
            manifest.chunks,
            keys,
            mask,
            max_requests=max_requests_per_chunk,
            max_bytes=max_bytes_per_chunk,
        )
        storage.write_parquet_atomic(keys_path, keys, keys.schema)
        manifest = manifest.model_copy(update={"chunks": infos})
    section = ReuseSection(
        n_reused=n_reused,
        n_reused_from_cache=n_from_cache,
        n_to_send=sum(c.n_requests for c in manifest.chunks),
        reused_cost_usd=round(float(pc.sum(found["cost_usd"]).as_py() or 0.0), 6),
        reused_sync_cost_usd=round(float(pc.sum(found["sync_cost_usd"]).as_py() or 0.0), 6),
        reused_path=str(reused_path),
        cache_dir=str(cache_dir) if use_cache else None,
        cache_max_age_days=cache_max_age_days if use_cache else None,
    )
    manifest = manifest.model_copy(update={MANIFEST_KEY: section})
    storage.atomic_write_json(layout.manifest_path(work), manifest.model_dump(mode="json"))
    if n_reused:
        log.info(
            "Reused %d earlier answer(s) (%d from the answer cache; $%.4f already paid): %d of %d "
            "request(s) left to send, in %d chunk(s).",
            n_reused,
            n_from_cache,
            section.reused_cost_usd,
            section.n_to_send,
            keys.num_rows,
            len(manifest.chunks),
        )
    return manifest


# -- downstream: merge input, summary, cache write ---------------------------------------------------


def merge_inputs(manifest: Manifest) -> list[str]:
    """The reused-answers file to merge before the attempts (empty when nothing was reused)."""
    section = manifest.reuse_or_empty
    return [str(section.reused_path)] if section.n_reused else []


def summary_fields(manifest: Manifest) -> dict[str, Any]:
    """Run-summary fields: how many answers were reused and what they had cost when paid for."""
    section = manifest.reuse_or_empty
    return {
        "n_reused": section.n_reused,
        "n_reused_from_cache": section.n_reused_from_cache,
        "reused_cost_usd": section.reused_cost_usd,
        "reused_sync_cost_usd": section.reused_sync_cost_usd,
    }


def cache_after_publish(manifest: Manifest, merged_path: PathLike, run_id: str | None) -> int:
    """Add this run's paid answers to the pipeline's answer cache when it is enabled; returns how many.

    Reads only the answer columns of the merged results, and only when the cache is on.
    """
    cache_dir = manifest.reuse_or_empty.cache_dir
    if not cache_dir:
        return 0
    n = write_cache(
        cache_dir,
        storage.read_parquet(merged_path, columns=_answer_columns()),
        partition=str(manifest.spec.partition),
        run_id=run_id,
        structured=bool(manifest.spec.output_model),
    )
    log.info("Added %d answer(s) to the answer cache %s.", n, cache_dir)
    return n


def iter_cache_files(cache_dir: PathLike) -> Iterator[ObjectStoragePath]:
    """Every file of an answer cache (for tests and housekeeping)."""
    cache = storage.as_path(cache_dir)
    if not cache.exists():
        return
    for bucket in sorted(cache.iterdir(), key=lambda p: p.name):
        if bucket.is_dir():
            yield from sorted(bucket.iterdir(), key=lambda p: p.name)


def cache_dir_for(work_dir: PathLike, pipeline: str) -> ObjectStoragePath:
    """The answer cache of ``pipeline`` in the storage root ``work_dir`` sits in."""

    return storage.answer_cache_dir(ledger_root_for(work_dir), pipeline)
