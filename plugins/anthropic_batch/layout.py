"""The storage layout of a run: every path under the storage root, in one place.

::

    {root}/_ledger/{dag_id}/{partition}/{task_id}/{chunk_fingerprint}.json   submission ledger
    {root}/{pipeline}/work/date={partition}/                                 work dir of one run
        requests/manifest.json  requests/keys.parquet  requests/chunk-NNNNN.jsonl
        requests/retry-NN/retry-NN-chunk-NNNNN.jsonl                        resubmitted chunks
        sync/chunk-NNNNN.results.jsonl                                       mode=sync results
        results/attempt-NN/<batch_id>.parquet                                collected results
        results/merged.parquet  results/merged.json  results/retry.parquet
        results/resubmit-state.json  results/reused.parquet
        rejected.parquet  dead_letter.parquet  sample/report.json
    {root}/{pipeline}/extractions/date={partition}/                          published partition
    {root}/{pipeline}/answer_cache/                                          answers paid for
    {root}/reports/date={partition}/                                         overnight report

The root directories (``work_dir``, ``extraction_dir``, ``answer_cache_dir``, ``report_dir``,
``ledger_root``) are defined in ``storage.py`` and re-exported here; everything below them is
built (and parsed back) only by the functions of this module. The DAG factory takes its Jinja
templates from here too (``work_dir_template``), and a test renders them against the functions.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, NamedTuple

from anthropic_batch import storage
from anthropic_batch.contracts import Manifest, parse
from anthropic_batch.storage import (
    ANSWER_CACHE_DIR,
    EXTRACTIONS_DIR,
    LEDGER_DIR,
    PARTITION_PREFIX,
    REPORTS_DIR,
    WORK_DIR,
    PathLike,
    answer_cache_dir,
    extraction_dir,
    ledger_root,
    report_dir,
    work_dir,
)

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

__all__ = [
    "ANSWER_CACHE_DIR",
    "EXTRACTIONS_DIR",
    "LEDGER_DIR",
    "PARTITION_PREFIX",
    "PARTITION_TEMPLATE",
    "REPORTS_DIR",
    "WORK_DIR",
    "answer_cache_dir",
    "attempt_dir",
    "attempt_result_files",
    "chunk_name",
    "dead_letter_path",
    "extraction_dir",
    "extraction_dir_template",
    "keys_file",
    "keys_path",
    "ledger_entry_path",
    "ledger_glob",
    "ledger_root",
    "manifest_path",
    "merge_record_path",
    "merged_path",
    "parse_attempt_dir",
    "parse_ledger_entry",
    "parse_work_dir",
    "read_manifest",
    "rejected_path",
    "report_aggregates_path",
    "report_dir",
    "report_groups_path",
    "requests_dir",
    "resubmit_state_path",
    "results_dir",
    "results_file",
    "retry_chunk_name",
    "retry_dir",
    "retry_list_path",
    "reused_results_path",
    "sample_dir",
    "sample_report_path",
    "storage_root_template",
    "sync_results_path",
    "work_dir",
    "work_dir_template",
]

# -- names -------------------------------------------------------------------------------------------
REQUESTS_DIR = "requests"
RESULTS_DIR = "results"
SYNC_DIR = "sync"
SAMPLE_DIR = "sample"
MANIFEST_FILE = "manifest.json"
KEYS_FILE = "keys.parquet"
REJECTED_FILE = "rejected.parquet"
DEAD_LETTER_FILE = "dead_letter.parquet"
MERGED_FILE = "merged.parquet"
RETRY_LIST_FILE = "retry.parquet"
RESUBMIT_STATE_FILE = "resubmit-state.json"
REUSED_FILE = "reused.parquet"
ATTEMPT_PREFIX = "attempt-"
RESULTS_SUFFIX = ".parquet"

_ATTEMPT_RE = re.compile(r"^attempt-(\d+)$")


def _under(base: PathLike, *parts: str) -> ObjectStoragePath:
    return storage.as_path(base).joinpath(*parts)


# -- DAG templates -----------------------------------------------------------------------------------
#: The partition of a run (``run_partition``): its logical date; without one, the last complete interval.
PARTITION_TEMPLATE = "{{ batch_partition() }}"


def storage_root_template(override: str | None) -> str:
    """The storage root of a run, as a Jinja expression (``batch_storage_root`` user macro)."""
    return "{{ batch_storage_root(" + repr(override) + ") }}"


def work_dir_template(root: str, pipeline: str, partition: str) -> str:
    """``work_dir`` as a string (Jinja expressions allowed for ``root`` and ``partition``)."""
    return f"{root}/{pipeline}/{WORK_DIR}/{PARTITION_PREFIX}{partition}"


def extraction_dir_template(root: str, pipeline: str, partition: str) -> str:
    """``extraction_dir`` as a string (Jinja expressions allowed for ``root`` and ``partition``)."""
    return f"{root}/{pipeline}/{EXTRACTIONS_DIR}/{PARTITION_PREFIX}{partition}"


class WorkDirParts(NamedTuple):
    root: ObjectStoragePath
    pipeline: str
    partition: str


def parse_work_dir(path: PathLike) -> WorkDirParts | None:
    """``(root, pipeline, partition)`` of a ``{root}/{pipeline}/work/date={partition}`` path, else None."""
    work = storage.as_path(path)
    if work.name.startswith(PARTITION_PREFIX) and work.parent.name == WORK_DIR:
        return WorkDirParts(
            work.parent.parent.parent, work.parent.parent.name, work.name.removeprefix(PARTITION_PREFIX)
        )
    return None


# -- the work dir ------------------------------------------------------------------------------------
def requests_dir(work: PathLike) -> ObjectStoragePath:
    """``{work}/requests``: the prepared chunks, manifest and keys."""
    return _under(work, REQUESTS_DIR)


def manifest_path(work: PathLike) -> ObjectStoragePath:
    """``{work}/requests/manifest.json``."""
    return _under(work, REQUESTS_DIR, MANIFEST_FILE)


def keys_path(work: PathLike) -> ObjectStoragePath:
    """``{work}/requests/keys.parquet``: one row per request (custom_id, keys, chunk)."""
    return _under(work, REQUESTS_DIR, KEYS_FILE)


def keys_file(work: PathLike) -> PathLike:
    """``keys_path`` as a plain path when ``work`` is local: read without importing Airflow."""
    return storage.joinpath(work, REQUESTS_DIR, KEYS_FILE)


def read_manifest(work: PathLike) -> Manifest:
    """The manifest of a work dir; a clear error naming the file when it is missing or invalid
    (``contracts.ContractError``, naming the field).

    Local files are read without importing Airflow (collect workers stay small).
    """
    path = storage.joinpath(work, REQUESTS_DIR, MANIFEST_FILE)
    data = storage.read_json(path)
    if data is None:
        raise FileNotFoundError(
            f"no {REQUESTS_DIR}/{MANIFEST_FILE} under {work}: run the prepare task for this work_dir first"
        )
    return parse(Manifest, data, path)


def chunk_name(index: int) -> str:
    """``chunk-NNNNN.jsonl``: the file name of chunk ``index``."""
    return f"chunk-{index:05d}.jsonl"


def rejected_path(work: PathLike) -> ObjectStoragePath:
    """``{work}/rejected.parquet``: records rejected while preparing."""
    return _under(work, REJECTED_FILE)


def dead_letter_path(work: PathLike) -> ObjectStoragePath:
    """``{work}/dead_letter.parquet``: requests that failed for good."""
    return _under(work, DEAD_LETTER_FILE)


def sample_dir(work: PathLike) -> ObjectStoragePath:
    """``{work}/sample``: the sample-and-refine answers and report."""
    return _under(work, SAMPLE_DIR)


def sample_report_path(work: PathLike) -> ObjectStoragePath:
    """``{work}/sample/report.json``: the sample gate's report (beside its .md and .html)."""
    return sample_dir(work) / "report.json"


def sync_results_path(chunk_path: PathLike) -> ObjectStoragePath:
    """``{work}/sync/chunk-NNNNN.results.jsonl`` for ``{work}/requests/chunk-NNNNN.jsonl``."""
    chunk = storage.as_path(chunk_path)
    stem = chunk.name.removesuffix(".jsonl")
    return chunk.parent.parent / SYNC_DIR / f"{stem}.results.jsonl"


def retry_dir(work: PathLike, attempt: int) -> ObjectStoragePath:
    """``{work}/requests/retry-NN``: the chunks submitted as attempt NN (NN >= 2)."""
    return _under(work, REQUESTS_DIR, f"retry-{attempt:02d}")


def retry_chunk_name(attempt: int, index: int) -> str:
    """``retry-NN-chunk-NNNNN.jsonl``: chunk ``index`` of attempt ``attempt``."""
    return f"retry-{attempt:02d}-{chunk_name(index)}"


def results_dir(work: PathLike) -> ObjectStoragePath:
    """``{work}/results``."""
    return _under(work, RESULTS_DIR)


def attempt_dir(work: PathLike, attempt: int) -> ObjectStoragePath:
    """``{work}/results/attempt-NN``."""
    return _under(work, RESULTS_DIR, f"{ATTEMPT_PREFIX}{attempt:02d}")


def parse_attempt_dir(name: str) -> int | None:
    """The attempt number of an ``attempt-NN`` directory name, else None."""
    match = _ATTEMPT_RE.match(name)
    return int(match.group(1)) if match else None


def results_file(work: PathLike, attempt: int, batch_id: str) -> ObjectStoragePath:
    """``{work}/results/attempt-NN/<batch_id>.parquet``."""
    return attempt_dir(work, attempt) / f"{batch_id}{RESULTS_SUFFIX}"


def attempt_result_files(work: PathLike, *, newest_first: bool = False) -> list[ObjectStoragePath]:
    """Every complete ``results/attempt-NN/*.parquet`` file, by attempt directory name (highest
    first with ``newest_first``), then by file name; none when nothing was collected."""
    results = results_dir(work)
    if not results.exists():
        return []
    files: list[ObjectStoragePath] = []
    for directory in sorted(results.iterdir(), key=lambda p: p.name, reverse=newest_first):
        if not directory.name.startswith(ATTEMPT_PREFIX) or not directory.is_dir():
            continue
        files += sorted(
            (
                f
                for f in directory.iterdir()
                if f.name.endswith(RESULTS_SUFFIX) and storage.TMP_MARKER not in f.name
            ),
            key=lambda p: p.name,
        )
    return files


def merged_path(work: PathLike) -> ObjectStoragePath:
    """``{work}/results/merged.parquet``: every request's final row across attempts."""
    return _under(work, RESULTS_DIR, MERGED_FILE)


def merge_record_path(merged: PathLike) -> ObjectStoragePath:
    """``results/merged.json`` beside ``results/merged.parquet``: which files the merge used."""
    path = storage.as_path(merged)
    return path.parent / (path.name.removesuffix(RESULTS_SUFFIX) + ".json")


def retry_list_path(work: PathLike) -> ObjectStoragePath:
    """``{work}/results/retry.parquet``: the rows to resubmit."""
    return _under(work, RESULTS_DIR, RETRY_LIST_FILE)


def resubmit_state_path(work: PathLike) -> ObjectStoragePath:
    """``{work}/results/resubmit-state.json``: the resubmit loop's state across deferrals."""
    return _under(work, RESULTS_DIR, RESUBMIT_STATE_FILE)


def reused_results_path(work: PathLike) -> ObjectStoragePath:
    """``{work}/results/reused.parquet``: answers reused from earlier runs (answer_reuse)."""
    return _under(work, RESULTS_DIR, REUSED_FILE)


# -- the overnight report's work dir ---------------------------------------------------------------------
def report_aggregates_path(work: PathLike, date: str) -> ObjectStoragePath:
    """``{work}/aggregates/date={date}.json``: one reported date's numbers (overnight_report)."""
    return _under(work, "aggregates", f"{PARTITION_PREFIX}{date}.json")


def report_groups_path(work: PathLike) -> ObjectStoragePath:
    """``{work}/inputs/groups.jsonl``: the report run's input rows (keys date, category)."""
    return _under(work, "inputs", "groups.jsonl")


# -- the ledger ----------------------------------------------------------------------------------------
class LedgerEntryKey(NamedTuple):
    dag_id: str
    partition: str
    task_id: str
    chunk_fingerprint: str


def ledger_entry_path(
    ledger_base: PathLike, dag_id: str, partition: str, task_id: str, chunk_fingerprint: str
) -> ObjectStoragePath:
    """``{root}/_ledger/{dag_id}/{partition}/{task_id}/{chunk_fingerprint}.json`` (``ledger_base`` is
    ``ledger_root(root)``)."""
    return _under(ledger_base, dag_id, partition, task_id, f"{chunk_fingerprint}.json")


def ledger_glob(dag_id: str | None = None, partition: str | None = None) -> str:
    """Glob of the entries under ``ledger_root`` (optionally of one DAG and/or partition)."""
    return f"{dag_id or '*'}/{partition or '*'}/*/*.json"


def parse_ledger_entry(rel: str) -> LedgerEntryKey | None:
    """The key of ``_ledger/{dag_id}/{partition}/{task_id}/{fingerprint}.json`` (relative to the
    storage root), or None for anything else (a temporary file included)."""
    parts = rel.split("/")
    if len(parts) != 5:
        return None
    name = parts[-1]
    if not name.endswith(".json") or storage.TMP_MARKER in name:
        return None
    return LedgerEntryKey(parts[1], parts[2], parts[3], name.removesuffix(".json"))
