"""A validated index of the ledger entries and run summaries, so the Batches page reads ~6 files, not 1,000.

On an object store every file read is a network request: reading a quarter of backfills (about
1,000 ledger entries and 90 summaries) one by one takes seconds. The index keeps the parsed content
of each file (for summaries: of each partition, whose signature covers its commit file and
summaries) next to its signature (size and ETag or mtime) in two files under ``{root}/_index/``.

It is never trusted blindly. Each read lists the files first — one recursive listing of
``_ledger/`` and one per pipeline's ``extractions/`` (a request per 1,000 files on S3) — and reads
only the files that are new or whose signature changed; entries of files that are gone are dropped.
A missing, unreadable or foreign index is simply rebuilt. When anything changed the index is
rewritten (best effort: a read-only reader still gets correct results, only slower). Concurrent
writers may overwrite each other's index: the loser's changes are seen as stale and read again.

``refresh(root)`` brings both indexes up to date; a task that has just written a ledger entry or a
summary may call it so that the next page load finds nothing to read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from anthropic_batch import layout, storage
from anthropic_batch.contracts import LedgerEntry, RunSummary
from anthropic_batch.partition import COMMIT_FILE, SUMMARY_FILE, read_published_summary
from anthropic_batch.storage import PathLike, as_path

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

log = logging.getLogger(__name__)

INDEX_DIR = "_index"
LEDGER_INDEX = "ledger.json"
SUMMARY_INDEX = "summaries.json"
# 2: summaries and ledger entries are indexed validated (RunSummary, LedgerEntry); version 1 held
# the raw files, bad ones too.
INDEX_VERSION = 2
#: Concurrent reads of changed files on an object store (latency-bound; local reads are sequential).
READ_CONCURRENCY = 16


def _signature(info: dict[str, Any]) -> str:
    """What changes whenever a file's content does: size plus ETag (object stores) or mtime."""
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    # Local atomic writes replace the inode, so it changes even within one mtime tick.
    return f"{info.get('size')}:{tag}:{info.get('ino', '')}"


def _listing(root: ObjectStoragePath, prefix: ObjectStoragePath) -> dict[str, str]:
    """``{path relative to root: signature}`` of every file under ``prefix`` (one recursive listing)."""
    fs = prefix.fs
    base = prefix.path.rstrip("/")
    root_path = root.path.rstrip("/")
    # fsspec file systems cache listings (s3fs for the process lifetime): always ask the store.
    fs.invalidate_cache(base)
    try:
        found = fs.find(base, detail=True)
    except FileNotFoundError:
        return {}
    listing = {}
    for name, info in found.items():
        if info.get("type", "file") != "file":
            continue
        name = name.rstrip("/")
        if not name.startswith(root_path + "/"):
            continue
        listing[name[len(root_path) + 1 :]] = _signature(info)
    return listing


def _read_all(
    root: ObjectStoragePath, rel_paths: list[str], read: Callable[[str], Any]
) -> dict[str, Any | Exception]:
    """``read(rel)`` for each path (or the error it raised); concurrent on an object store."""

    def guarded(rel: str) -> Any | Exception:
        try:
            return read(rel)
        except (OSError, ValueError) as exc:
            return exc

    if storage.is_local(root) or len(rel_paths) < 2:
        return {rel: guarded(rel) for rel in rel_paths}
    with ThreadPoolExecutor(max_workers=READ_CONCURRENCY) as pool:
        return dict(zip(rel_paths, pool.map(guarded, rel_paths), strict=True))


def _load_index(path: ObjectStoragePath) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("Rebuilding the unreadable index %s: %s", path, exc)
        return {}
    if not isinstance(data, dict) or data.get("version") != INDEX_VERSION:
        return {}
    files = data.get("files")
    return files if isinstance(files, dict) else {}


def _sync(
    root: ObjectStoragePath,
    index_name: str,
    listing: dict[str, str],
    read: Callable[[str], dict[str, Any] | None],
) -> dict[str, dict[str, Any] | None]:
    """``{key: read(key)}`` for every listed key, calling ``read`` only where the index is stale."""
    index_path = root / INDEX_DIR / index_name
    index = _load_index(index_path)
    fresh = {
        rel: cached
        for rel, cached in index.items()
        if rel in listing and isinstance(cached, dict) and cached.get("sig") == listing[rel]
    }
    stale = sorted(rel for rel in listing if rel not in fresh)
    for rel, content in _read_all(root, stale, read).items():
        if isinstance(content, Exception):
            # Unreadable, or gone between the listing and the read (a rewrite in progress): skipped
            # this time and not indexed, so the next look tries again.
            log.warning("Unreadable %s: %s", root / rel, content)
            continue
        fresh[rel] = {"sig": listing[rel], "content": content}
    if stale or len(fresh) != len(index):
        try:
            # Compact: the index is read on every page load (indented JSON is ~2x larger and slower).
            payload = json.dumps(
                {"version": INDEX_VERSION, "files": fresh}, separators=(",", ":"), default=str
            )
            storage.atomic_write_bytes(index_path, payload.encode("utf-8"))
        except OSError as exc:
            log.warning("Could not update the index %s (results are still correct): %s", index_path, exc)
    return {rel: cached["content"] for rel, cached in sorted(fresh.items())}


# -- the ledger ------------------------------------------------------------------------------------
def _ledger_reader(root: ObjectStoragePath) -> Callable[[str], dict[str, Any] | None]:
    def read(rel: str) -> dict[str, Any] | None:
        # Validated like every other ledger read (an old sync entry is mapped, a bad one is skipped
        # and logged by _sync); the index keeps the stored fields only.
        path = root / rel
        return LedgerEntry.parse(path.read_bytes(), path).to_dict() or None

    return read


def _is_ledger_entry(rel: str) -> bool:
    # _ledger/{dag_id}/{partition}/{task_id}/{fingerprint}.json, never a temporary file.
    return layout.parse_ledger_entry(rel) is not None


def ledger_entries(
    root: PathLike, dag_id: str | None = None, partition: str | None = None
) -> list[dict[str, Any]]:
    """Every ledger entry (optionally of one DAG / partition), each with ``ledger_path``, by path."""
    root = as_path(root)
    listing = {
        rel: sig for rel, sig in _listing(root, layout.ledger_root(root)).items() if _is_ledger_entry(rel)
    }
    entries = []
    for rel, entry in _sync(root, LEDGER_INDEX, listing, _ledger_reader(root)).items():
        entry_dag, entry_partition, _, _ = layout.parse_ledger_entry(rel)  # type: ignore[misc]
        if entry is None or (dag_id and entry_dag != dag_id) or (partition and entry_partition != partition):
            continue
        entries.append({**entry, "ledger_path": str(root / rel)})
    return entries


# -- run summaries ---------------------------------------------------------------------------------
def _partition_dir(rel: str) -> str | None:
    """``{pipeline}/extractions/date=D`` for a file that decides what that partition publishes."""
    parts = rel.split("/")
    if (
        len(parts) < 4
        or parts[1] != layout.EXTRACTIONS_DIR
        or not parts[2].startswith(layout.PARTITION_PREFIX)
    ):
        return None
    name = parts[-1]
    # The summary itself (directly, or in a generation directory) and the commit file naming it.
    if (len(parts) == 4 and name in (SUMMARY_FILE, COMMIT_FILE)) or (
        len(parts) == 5 and parts[3].startswith("_gen=") and name == SUMMARY_FILE
    ):
        return "/".join(parts[:3])
    return None


def _summary_reader(root: ObjectStoragePath) -> Callable[[str], dict[str, Any] | None]:
    def read(rel_dir: str) -> dict[str, Any] | None:
        summary = read_published_summary(root / rel_dir)  # ContractError (a ValueError): skipped
        if summary is None:
            return None
        # The directory is the source of truth for where the run's files are.
        pipeline, _, date_dir = rel_dir.split("/")
        found = {"pipeline": pipeline, "partition": date_dir.removeprefix(layout.PARTITION_PREFIX)}
        unset = {name: value for name, value in found.items() if name not in summary.model_fields_set}
        return summary.model_copy(update=unset).model_dump(mode="json")

    return read


def summaries(root: PathLike, partition: str | None = None) -> list[RunSummary]:
    """Published run summaries (optionally of one partition), by path."""
    root = as_path(root)
    files: dict[str, list[str]] = {}
    fs = root.fs
    fs.invalidate_cache(root.path)
    try:
        children = fs.ls(root.path, detail=True)
    except FileNotFoundError:
        children = []
    for info in children:
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        if info.get("type") != "directory" or name.startswith(("_", ".")):
            continue
        # One listing per pipeline (a missing extractions/ lists as empty).
        for rel, sig in _listing(root, root / name / layout.EXTRACTIONS_DIR).items():
            directory = _partition_dir(rel)
            if directory is not None:
                files.setdefault(directory, []).append(f"{rel.rsplit('/', 1)[-1]}={sig}")
    # A partition is re-read when any file that decides its summary changed.
    listing = {directory: "|".join(sorted(sigs)) for directory, sigs in files.items()}
    found = _sync(root, SUMMARY_INDEX, listing, _summary_reader(root))
    return [
        RunSummary.model_validate(data)  # written by _summary_reader: valid by construction
        for rel, data in found.items()
        if data is not None
        and (partition is None or rel.split("/")[2] == f"{layout.PARTITION_PREFIX}{partition}")
    ]


def refresh(root: PathLike) -> None:
    """Bring both indexes up to date (reads only what changed); never raises."""
    try:
        ledger_entries(root)
        summaries(root)
    except Exception:  # an index is an optimisation: it must never fail the task that calls this
        log.warning("Could not refresh the run index under %s", root, exc_info=True)
