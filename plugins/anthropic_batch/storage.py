"""Storage root, the path layout under it, atomic writes and Parquet helpers.

Everything is an ``airflow.sdk.ObjectStoragePath`` so the same code runs on ``file://``, ``s3://``,
``gs://`` and the rest. Writes are atomic: a reader sees either the old file or the complete new one.
On a local file system the bytes go to a temporary file in the *same directory* and are renamed
into place (``os.replace``). On object stores a PUT is already atomic (an object appears only once
complete; a multipart upload only when completed), so a write is a single upload straight to its
final key: no temporary object and no server-side copy (twice the I/O). A streamed write spools to a
local temporary file first and is uploaded when the block ends; nothing is uploaded on error.

Local files are read and written with plain ``open``/``os.replace`` and do not import Airflow (about
85 MB of RSS for ``ObjectStoragePath``): a worker collecting 100k results into a local file needs
none of it. Any other URL goes through ``ObjectStoragePath``, imported on first use.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeAlias
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import pyarrow as pa
    from airflow.sdk import ObjectStoragePath

# pyarrow is imported inside the Parquet helpers: DAG files import this module at parse time.

log = logging.getLogger(__name__)

STORAGE_ROOT_ENV = "ANTHROPIC_BATCH_STORAGE_ROOT"
STORAGE_ROOT_VARIABLE = "anthropic_batch_storage_root"
#: Set to true when a local root is one volume mounted by every worker (NFS and the like).
SHARED_LOCAL_ROOT_ENV = "ANTHROPIC_BATCH_LOCAL_ROOT_IS_SHARED"
#: Executors that run tasks on several machines, where each would see its own local disk.
DISTRIBUTED_EXECUTORS = ("CeleryExecutor", "KubernetesExecutor", "CeleryKubernetesExecutor", "EdgeExecutor")
CHECKOUT_DIR = Path(__file__).resolve().parents[2]
TMP_MARKER = ".tmp-"

PathLike: TypeAlias = "str | os.PathLike | ObjectStoragePath"


def as_path(path: PathLike) -> ObjectStoragePath:
    """An ``ObjectStoragePath`` for a URL, a plain local path (made ``file://``) or a path object."""
    # Airflow's module only on this path: callers that never take it stay light
    from airflow.sdk import ObjectStoragePath

    if isinstance(path, ObjectStoragePath):
        return path
    text = os.fspath(path)
    if "://" not in text:
        # Not Path.as_uri(): it percent-encodes "=" and a Hive partition "date=..." would become "date%3D...".
        text = "file://" + str(Path(text).expanduser().resolve())
    else:
        from anthropic_batch import object_store

        # s3:// with only s3fs installed (no Amazon provider) needs its filesystem attached first.
        url = urlsplit(text)
        object_store.bind_filesystem(url.scheme, url.netloc.rpartition("@")[0] or None)
    return ObjectStoragePath(text)


def _local(path: PathLike) -> tuple[str, str] | None:
    """``(file system path, URL)`` when ``path`` is a local file, else ``None``; never imports Airflow.

    The URL is what ``str(as_path(path))`` gives. A ``file://`` URL with percent-escapes is left to
    ``ObjectStoragePath``, which knows how to read them.
    """
    protocol = getattr(path, "protocol", None)
    if protocol is not None:  # an ObjectStoragePath (or another fsspec-style path)
        return (path.path, str(path)) if protocol in ("file", "local", "") else None
    text = os.fspath(path)
    if "://" not in text:
        resolved = str(Path(text).expanduser().resolve())
        return resolved, "file://" + resolved
    if text.startswith("file:///") and "%" not in text:
        return text[len("file://") :], text
    return None


def path_url(path: PathLike) -> str:
    """The URL of ``path`` as ``str(as_path(path))`` gives it (without importing Airflow when local)."""
    local = _local(path)
    return local[1] if local else str(as_path(path))


def joinpath(base: PathLike, *parts: str) -> PathLike:
    """``base / part / ...``: a plain path for a local ``base`` (no Airflow), else an ObjectStoragePath."""
    local = _local(base)
    return os.path.join(local[0], *parts) if local else as_path(base).joinpath(*parts)


def _variable_root() -> str | None:
    try:
        from airflow.sdk import Variable

        return Variable.get(STORAGE_ROOT_VARIABLE, default=None)
    except Exception as exc:  # outside Airflow (no context, no DB): fall through to the default
        log.debug("storage root Variable %s not readable: %s", STORAGE_ROOT_VARIABLE, exc)
        return None


def default_root() -> Path:
    """``$AIRFLOW_HOME/anthropic_batch_data`` (Airflow's own default home is ``~/airflow``).

    Not inside the code checkout: a deployment replaces the code, not the data.
    """
    home = os.environ.get("AIRFLOW_HOME") or os.path.join("~", "airflow")
    return Path(home).expanduser() / "anthropic_batch_data"


def storage_root(override: str | None = None) -> ObjectStoragePath:
    """The storage root: ``override``, env ``ANTHROPIC_BATCH_STORAGE_ROOT``, Variable, else the default.

    A local root under a distributed executor fails (``check_root_shared``): every worker would
    write its own copy of the ledger and results.
    """
    setting = "the default root"
    root: PathLike = default_root()
    for name, candidate in (
        ("the storage_root override (pipeline YAML storage_root)", override),
        (f"env {STORAGE_ROOT_ENV}", os.environ.get(STORAGE_ROOT_ENV)),
        (f"Variable {STORAGE_ROOT_VARIABLE}", _variable_root()),
    ):
        if candidate and str(candidate).strip():
            setting, root = name, str(candidate).strip()
            break
    check_root_shared(root, setting)
    return as_path(root)


def _distributed_executors() -> list[str]:
    try:
        from airflow.configuration import conf

        configured = conf.get("core", "executor", fallback="") or ""
    except Exception:  # outside an Airflow installation: nothing is distributed
        configured = os.environ.get("AIRFLOW__CORE__EXECUTOR", "")
    # "CeleryExecutor", a class path, an alias ("team:Name") or several, comma separated (Airflow 3).
    names = [part.strip().rsplit(".", 1)[-1].rsplit(":", 1)[-1] for part in configured.split(",")]
    return [name for name in names if name in DISTRIBUTED_EXECUTORS]


def check_root_shared(root: PathLike, setting: str = "the storage root") -> None:
    """Refuse a local ``root`` when Airflow is configured with an executor that spans machines."""
    if _local(root) is None:
        return
    executors = _distributed_executors()
    if not executors or os.environ.get(SHARED_LOCAL_ROOT_ENV, "").lower() in ("1", "true", "yes"):
        return
    raise ValueError(
        f"storage root {path_url(root)} (from {setting}) is a local directory, but the executor "
        f"{', '.join(executors)} runs tasks on several workers: each would keep its own ledger and "
        f"results. Set env {STORAGE_ROOT_ENV} (or the Variable {STORAGE_ROOT_VARIABLE}, or storage_root: "
        f"in the pipeline YAML) to shared storage such as s3://aws_default@bucket/prefix, or set "
        f"{SHARED_LOCAL_ROOT_ENV}=true if that directory is one volume mounted by every worker."
    )


# The directories directly under the root. Everything below them: layout.py (which re-exports these).
WORK_DIR = "work"
EXTRACTIONS_DIR = "extractions"
ANSWER_CACHE_DIR = "answer_cache"
REPORTS_DIR = "reports"
LEDGER_DIR = "_ledger"
#: Hive-style partition directory prefix: ``date=YYYY-MM-DD``.
PARTITION_PREFIX = "date="


def work_dir(root: PathLike, pipeline: str, partition: str) -> ObjectStoragePath:
    """``{root}/{pipeline}/work/date={partition}``: requests, results and rejects of one run."""
    return as_path(root) / pipeline / WORK_DIR / f"{PARTITION_PREFIX}{partition}"


def extraction_dir(root: PathLike, pipeline: str, partition: str) -> ObjectStoragePath:
    """``{root}/{pipeline}/extractions/date={partition}``: the published output of one run."""
    return as_path(root) / pipeline / EXTRACTIONS_DIR / f"{PARTITION_PREFIX}{partition}"


def answer_cache_dir(root: PathLike, pipeline: str) -> ObjectStoragePath:
    """``{root}/{pipeline}/answer_cache``: answers already paid for, by fingerprint (answer_reuse)."""
    return as_path(root) / pipeline / ANSWER_CACHE_DIR


def report_dir(root: PathLike, partition: str) -> ObjectStoragePath:
    """``{root}/reports/date={partition}``: the overnight report."""
    return as_path(root) / REPORTS_DIR / f"{PARTITION_PREFIX}{partition}"


def pipeline_report_dir(root: PathLike, pipeline: str, partition: str) -> ObjectStoragePath:
    """``{root}/reports/{pipeline}/date={partition}``: a pipeline's own report (the weekly audit's),
    beside the overnight report's ``reports/date=...`` and out of its list of reported dates."""
    return as_path(root) / "reports" / pipeline / f"date={partition}"


def ledger_root(root: PathLike) -> ObjectStoragePath:
    """``{root}/_ledger``: submission ledger entries."""
    return as_path(root) / LEDGER_DIR


def is_local(path: ObjectStoragePath) -> bool:
    """True for ``file://`` (and protocol-less) paths."""
    return path.protocol in ("file", "local", "")


def open_binary(path: PathLike, mode: str = "rb") -> IO[bytes]:
    """Open a path in binary mode; local files bypass fsspec (and Airflow's per-open lineage hook)."""
    local = _local(path)
    if local:
        return open(local[0], mode)
    return as_path(path).open(mode)


def _ensure_parent(path: ObjectStoragePath) -> None:
    if is_local(path):
        os.makedirs(os.path.dirname(path.path), exist_ok=True)
        return
    # Object stores have no real directories; mkdir there is a harmless no-op or an error we ignore.
    with contextlib.suppress(FileExistsError, NotImplementedError):
        path.parent.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def open_atomic_writer(path: PathLike) -> Iterator[IO[bytes]]:
    """A binary file that appears at ``path`` only if the block finishes; nothing is left on error."""
    local = _local(path)
    if local:
        directory, name = os.path.split(local[0])
        os.makedirs(directory, exist_ok=True)
        tmp_name = os.path.join(directory, f".{name}{TMP_MARKER}{uuid.uuid4().hex}")
        try:
            with open(tmp_name, "wb") as handle:
                yield handle
            os.replace(tmp_name, local[0])  # atomic on POSIX, overwrites
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        return
    target = as_path(path)
    # Spooled locally, then one upload to the final key (a PUT, or a multipart upload that the
    # store completes atomically): no temporary object, no copy, nothing uploaded on error.
    with tempfile.NamedTemporaryFile(prefix="anthropic-batch-upload-") as spool:
        yield spool
        spool.flush()
        target.fs.put_file(spool.name, target.path)
        target.fs.invalidate_cache(target.path)


def atomic_write_bytes(path: PathLike, data: bytes) -> ObjectStoragePath:
    """Write ``data`` to ``path`` atomically (one PUT on object stores); returns the path."""
    target = as_path(path)
    if is_local(target):
        with open_atomic_writer(target) as handle:
            handle.write(data)
    else:
        target.fs.pipe_file(target.path, data)
    return target


def atomic_write_json(path: PathLike, obj: Any) -> ObjectStoragePath:
    """Write ``obj`` as indented, key-sorted UTF-8 JSON atomically; returns the path."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def read_json(path: PathLike, default: Any = None) -> Any:
    """The JSON at ``path``, or ``default`` when the file does not exist."""
    try:
        with open_binary(path) as handle:
            data = handle.read()
    except FileNotFoundError:
        return default
    return json.loads(data)


def write_parquet_atomic(
    path: PathLike,
    table_or_batches: pa.Table | pa.RecordBatch | Iterable[pa.RecordBatch | pa.Table],
    schema: pa.Schema | None = None,
    *,
    row_group_size: int | None = None,
) -> ObjectStoragePath:
    """Write a table (or a stream of record batches) to ``path`` as Parquet, atomically.

    ``schema`` is required for an iterable of batches (it may be empty); tables are cast to it.
    """
    # pyarrow/numpy: kept out of DAG parsing
    import pyarrow as pa
    import pyarrow.parquet as pq

    target = as_path(path)
    if isinstance(table_or_batches, pa.Table | pa.RecordBatch):
        parts: Iterable[pa.Table | pa.RecordBatch] = [table_or_batches]
        schema = schema or table_or_batches.schema
    else:
        parts = table_or_batches
        if schema is None:
            raise ValueError("write_parquet_atomic needs a schema for a stream of batches")
    with open_atomic_writer(target) as handle, pq.ParquetWriter(handle, schema) as writer:
        for part in parts:
            if part.schema != schema:
                part = part.select(schema.names).cast(schema)
            if isinstance(part, pa.RecordBatch):
                writer.write_batch(part, row_group_size=row_group_size)
            else:
                writer.write_table(part, row_group_size=row_group_size)
    return target


def read_parquet(path: PathLike, columns: list[str] | None = None, *, use_threads: bool = True) -> pa.Table:
    """The Parquet file at ``path`` as an Arrow table.

    ``use_threads=False`` for small files read on a memory budget: each reader thread grows its
    own malloc arena.
    """
    # pyarrow/numpy: kept out of DAG parsing
    import pyarrow.parquet as pq

    # ParquetFile, not pq.read_table: the latter loads pyarrow.dataset (~50 MB of RSS) for nothing.
    with open_binary(path) as handle:
        return pq.ParquetFile(handle).read(columns=columns, use_threads=use_threads)


# -- conditional writes (claims and compare-and-swap) -------------------------------------------
# One block, used by the ledger to claim a chunk: a create that fails when the file exists, and a
# replace that fails when the file changed since it was read. Local files are handled here; any
# other protocol goes to ``object_store`` (conditional puts: If-None-Match / If-Match on S3).
#
# Local version tokens are a SHA-256 of the content: a writer that rewrites identical bytes does
# not invalidate a reader's token, which is harmless (the content it decided on is unchanged).
# Every compare-and-swap on one file holds an exclusive ``flock`` on a sibling lock file
# (``.{name}.lock``) between the compare and the rename, so it is atomic across threads and
# processes on one host (flock locks belong to the open file, so two threads conflict too).
# Plain readers need no lock: the new content appears by ``os.replace``, old or new, never torn.


def _content_version(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _write_local_temp(directory: str, name: str, data: bytes) -> str:
    """A fully written (and flushed) temporary sibling of ``name``; returns its path."""
    os.makedirs(directory, exist_ok=True)
    tmp_name = os.path.join(directory, f".{name}{TMP_MARKER}{uuid.uuid4().hex}")
    with open(tmp_name, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return tmp_name


def create_if_absent(path: PathLike, data: bytes) -> bool:
    """Create ``path`` with ``data`` unless it exists; True if this call created it.

    Local: ``os.link`` of a fully written temporary file, which fails with ``FileExistsError`` when
    the name is taken, so the file never appears half-written and exactly one creator wins.
    """
    local = _local(path)
    if not local:
        from anthropic_batch import object_store

        return object_store.create_if_absent(as_path(path), data)
    directory, name = os.path.split(local[0])
    tmp_name = _write_local_temp(directory, name, data)
    try:
        os.link(tmp_name, local[0])
        return True
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)


def read_with_version(path: PathLike) -> tuple[bytes, str] | None:
    """``(content, version token)`` of ``path``, or None when it does not exist."""
    local = _local(path)
    if not local:
        from anthropic_batch import object_store

        return object_store.read_with_version(as_path(path))
    try:
        with open(local[0], "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return None
    return data, _content_version(data)


def replace_if_version(path: PathLike, data: bytes, version: str) -> bool:
    """Replace ``path`` with ``data`` only if it still has ``version``; True if replaced.

    False when the file changed since ``version`` was read, or no longer exists.
    """
    local = _local(path)
    if not local:
        from anthropic_batch import object_store

        return object_store.replace_if_version(as_path(path), data, version)
    import fcntl  # Unix only, and only for local files

    directory, name = os.path.split(local[0])
    tmp_name = _write_local_temp(directory, name, data)
    try:
        with open(os.path.join(directory, f".{name}.lock"), "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                current = read_with_version(local[0])
                if current is None or current[1] != version:
                    return False
                os.replace(tmp_name, local[0])
                return True
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)


# Progress that must survive a crash, on any store: an object only becomes visible once it is
# closed, so an appended file is lost with its writer. Instead each step writes one numbered,
# immutable part (one PUT); a resumed run lists the parts and skips what they already hold.
PART_PREFIX = "part-"


def write_part(directory: PathLike, n: int, data: bytes, suffix: str = ".jsonl") -> ObjectStoragePath:
    """Write part ``n`` (``{directory}/part-{n:08d}{suffix}``) atomically; returns its path.

    Rewriting a part replaces it whole, so a step that is redone after a crash stays one part.
    """
    if n < 0:
        raise ValueError(f"part number must be >= 0, got {n}")
    return atomic_write_bytes(joinpath(directory, f"{PART_PREFIX}{n:08d}{suffix}"), data)


def iter_parts(directory: PathLike, suffix: str = ".jsonl") -> Iterator[tuple[int, bytes]]:
    """``(n, bytes)`` of every complete part under ``directory``, by ``n``; none if it does not exist."""
    local = _local(directory)
    if local:
        names = os.listdir(local[0]) if os.path.isdir(local[0]) else []
    else:
        base = as_path(directory)
        names = [p.name for p in base.iterdir()] if base.exists() else []
    numbered = []
    for name in names:
        number = name[len(PART_PREFIX) : len(name) - len(suffix)]
        if name.startswith(PART_PREFIX) and name.endswith(suffix) and number.isdigit():
            numbered.append((int(number), name))
    for n, name in sorted(numbered):
        with open_binary(joinpath(directory, name)) as handle:
            yield n, handle.read()
