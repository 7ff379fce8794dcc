"""A published partition and its commit file: the one way to read ``extractions/date=D/``.

Publishing must switch readers from the old partition to the new one in one step, on a local disk
and on object stores alike (S3 and GCS have no directory rename). So a partition is never
rewritten in place:

1. publish writes the new files under a fresh generation directory
   ``extractions/date=D/_gen=<id>/`` (``data.parquet``, ``dead_letter.parquet``, ``summary.json``);
   nothing points at it yet, so a crash here changes nothing a reader sees;
2. it then writes ``extractions/date=D/_COMMIT.json`` in one write (a single object PUT, or an
   atomic rename on a local disk). The commit names the generation and every file of it with its
   size; it is the switch: before it, readers see the old generation, after it the new one;
3. it writes ``_SUCCESS`` beside it (for outside tools that wait for one) and only then deletes
   older generations, best effort. A reader that resolved the old commit just before and is slow
   may find its files gone: it resolves again.

Generation ids sort by creation time (``20261123T010203123456Z-1a2b3c4d``): cleanup only removes
generations older than the committed one, so a concurrent publisher's newer generation is never
deleted before it commits. The ``_`` prefix keeps generation directories out of Hive-style dataset
discovery (pyarrow, Spark and Hive skip ``_`` and ``.`` names), so a tool scanning
``extractions/`` cannot silently read two generations at once.

Readers: ``published_files(extraction_dir)`` (or ``published_dir`` for the directory that holds
the three files under their usual names). A partition published before this protocol (files
directly in ``date=D/``) is still returned, as ``generation=None``.

This module imports neither pyarrow nor Airflow at import time (DAG files import it at parse time).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from anthropic_batch import storage
from anthropic_batch.contracts import RunSummary, parse

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

log = logging.getLogger(__name__)

DATA_FILE = "data.parquet"
DEAD_LETTER_FILE = "dead_letter.parquet"
SUMMARY_FILE = "summary.json"
SUCCESS_MARKER = "_SUCCESS"
COMMIT_FILE = "_COMMIT.json"
GENERATION_PREFIX = "_gen="
COMMIT_FORMAT = "anthropic-batch-partition/1"
PARTITION_FILES = (DATA_FILE, DEAD_LETTER_FILE, SUMMARY_FILE)


@dataclass(frozen=True)
class PublishedPartition:
    """What a partition's commit names: its generation and complete file set."""

    directory: ObjectStoragePath  # extractions/date=D
    generation: str | None  # None: a partition in the layout from before commit files
    files: Mapping[str, Mapping[str, Any]]  # file name -> {"path": relative to directory, "size": int|None}
    commit: Mapping[str, Any] = field(default_factory=dict)

    @property
    def root(self) -> ObjectStoragePath:
        """The directory holding the files (the generation directory, or the partition itself)."""
        if self.generation is None:
            return self.directory
        return self.directory / f"{GENERATION_PREFIX}{self.generation}"

    def path(self, name: str) -> ObjectStoragePath:
        """The committed file ``name`` (``data.parquet``, ``dead_letter.parquet``, ``summary.json``)."""
        entry = self.files.get(name)
        if entry is None:
            raise FileNotFoundError(f"{name} is not part of the published partition {self.directory}")
        return self.directory / str(entry["path"])

    @property
    def data_path(self) -> ObjectStoragePath:
        return self.path(DATA_FILE)

    @property
    def dead_letter_path(self) -> ObjectStoragePath:
        return self.path(DEAD_LETTER_FILE)

    @property
    def summary_path(self) -> ObjectStoragePath:
        return self.path(SUMMARY_FILE)

    def read_summary(self) -> RunSummary:
        summary = read_run_summary(self.summary_path)
        if summary is None:
            raise FileNotFoundError(
                f"the published partition {self.directory} has no readable {SUMMARY_FILE}"
            )
        return summary


def published_files(extraction_dir: storage.PathLike) -> PublishedPartition | None:
    """The partition readers must see at ``extraction_dir``, or ``None`` if nothing is published.

    One read (``_COMMIT.json``) for a committed partition; a partition in the older layout (no
    commit) is recognised by its ``summary.json``. A commit that does not parse raises
    ``ValueError`` naming the file: readers must not guess.
    """
    directory = storage.as_path(extraction_dir)
    commit_path = directory / COMMIT_FILE
    try:
        commit = storage.read_json(commit_path)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{commit_path} is not valid JSON: {exc}") from exc
    if commit is None:
        if (directory / SUMMARY_FILE).exists():
            return PublishedPartition(
                directory=directory,
                generation=None,
                files={name: {"path": name, "size": None} for name in PARTITION_FILES},
            )
        return None
    if (
        not isinstance(commit, dict)
        or not commit.get("generation")
        or not isinstance(commit.get("files"), dict)
    ):
        raise ValueError(f"{commit_path} does not name a generation and its files ({COMMIT_FORMAT})")
    return PublishedPartition(
        directory=directory, generation=str(commit["generation"]), files=commit["files"], commit=commit
    )


def published_dir(extraction_dir: storage.PathLike) -> ObjectStoragePath | None:
    """The directory holding the published ``data.parquet``, ``dead_letter.parquet`` and
    ``summary.json`` of ``extraction_dir`` (its committed generation), or ``None``."""
    published = published_files(extraction_dir)
    return published.root if published is not None else None


def read_run_summary(path: storage.PathLike) -> RunSummary | None:
    """The run summary at ``path`` (a ``summary.json``), or ``None`` if there is no such file; a
    ``contracts.ContractError`` naming the file and field if it does not validate."""
    data = storage.read_json(path)
    return None if data is None else parse(RunSummary, data, path)


def read_published_summary(extraction_dir: storage.PathLike) -> RunSummary | None:
    """The committed ``summary.json`` of ``extraction_dir``, or ``None`` if nothing is published."""
    published = published_files(extraction_dir)
    return read_run_summary(published.summary_path) if published is not None else None


# -- writing (publish) -------------------------------------------------------------------------------


def new_generation() -> str:
    """A generation id that sorts by creation time and is unique across workers."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:8]}"


def generation_dir(extraction_dir: storage.PathLike, generation: str) -> ObjectStoragePath:
    return storage.as_path(extraction_dir) / f"{GENERATION_PREFIX}{generation}"


def file_size(path: ObjectStoragePath) -> int:
    if storage.is_local(path):
        return os.path.getsize(path.path)
    return int(path.fs.size(path.path))


def commit_partition(
    extraction_dir: storage.PathLike,
    generation: str,
    names: tuple[str, ...] = PARTITION_FILES,
    **details: Any,
) -> PublishedPartition:
    """Switch readers to ``generation`` (whose files must all be written): one commit write, then
    ``_SUCCESS``. ``details`` (run id, partition, ...) are recorded in the commit."""
    directory = storage.as_path(extraction_dir)
    root = generation_dir(directory, generation)
    files = {
        name: {"path": f"{GENERATION_PREFIX}{generation}/{name}", "size": file_size(root / name)}
        for name in names
    }
    commit = {
        "format": COMMIT_FORMAT,
        "generation": generation,
        "files": files,
        "committed_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        **details,
    }
    storage.atomic_write_json(directory / COMMIT_FILE, commit)
    storage.atomic_write_bytes(directory / SUCCESS_MARKER, b"")
    return PublishedPartition(directory=directory, generation=generation, files=files, commit=commit)


def remove_generation(extraction_dir: storage.PathLike, generation: str) -> None:
    """Delete one (uncommitted or superseded) generation directory, best effort."""
    _remove_quietly(generation_dir(extraction_dir, generation))


def remove_superseded(extraction_dir: storage.PathLike, generation: str) -> list[str]:
    """After ``generation`` was committed: delete older generations and files of the old layout.

    Best effort (a failure is logged, never raised) and only while the commit still names
    ``generation``: if a concurrent publisher committed since, it cleans up instead. Newer
    generations (a publisher still writing) are kept. Returns the names removed.
    """
    directory = storage.as_path(extraction_dir)
    try:
        current = published_files(directory)
        if current is None or current.generation != generation:
            return []
        removed = []
        for entry in list(directory.iterdir()):
            name = entry.name
            if name.startswith(GENERATION_PREFIX):
                if name[len(GENERATION_PREFIX) :] >= generation:
                    continue
            elif name in (COMMIT_FILE, SUCCESS_MARKER) or name.startswith(".") or storage.TMP_MARKER in name:
                continue  # (a ".tmp-" name may be a concurrent publisher's write in flight)
            _remove_quietly(entry)
            removed.append(name)
        return removed
    except Exception as exc:  # cleanup must never fail a publish that has committed
        log.warning("could not clean up old generations under %s: %s", directory, exc)
        return []


def _remove_quietly(path: ObjectStoragePath) -> None:
    try:
        if storage.is_local(path):
            import shutil

            if os.path.isdir(path.path):
                shutil.rmtree(path.path, ignore_errors=True)
            elif os.path.exists(path.path):
                os.unlink(path.path)
            return
        if path.exists():
            path.fs.rm(path.path, recursive=True)
    except (OSError, NotImplementedError) as exc:
        log.warning("could not remove %s: %s", path, exc)
