"""Object-store native primitives: conditional writes, and the filesystem behind an ``s3://`` root.

Three conditional operations that a shared ledger needs when several workers race (they take an
``ObjectStoragePath``; ``file://`` works too, for tests and single-machine runs):

- ``create_if_absent(path, data)``: one PUT with ``If-None-Match: *`` (S3; GCS
  ``ifGenerationMatch=0``); exactly one of several concurrent creators gets ``True``.
- ``read_with_version(path)``: the bytes and their version (S3 ETag, GCS generation) from one GET,
  so the pair is consistent; ``None`` when absent.
- ``replace_if_version(path, data, version)``: one PUT with ``If-Match: <etag>`` (GCS
  ``ifGenerationMatch=<generation>``); ``False`` when someone else wrote in between.

S3 has honoured both conditions since 2024 (AWS; MinIO, moto >= 5 too); a store that ignores them
would make these plain writes, so check yours (README, "S3 and GCS"). GCS goes through gcsfs and is
not exercised by the test suite (no GCS emulator here).

Filesystems: Airflow's ``ObjectStoragePath`` only knows the schemes a provider registers. Without
the Amazon provider, ``bind_filesystem`` attaches an s3fs filesystem built from the path's
connection (an ``aws`` connection: key id in *login*, secret in *password*, extra ``endpoint_url``,
``region_name``, ``aws_session_token``, ``config_kwargs`` — the Amazon provider's field names), so
``s3://aws_default@bucket/prefix`` works with just s3fs installed. A path without a connection uses
the fsspec implementation's own default credentials (instance profile, workload identity, env).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import threading
from typing import TYPE_CHECKING, Any

from anthropic_batch.errors import AnthropicBatchError

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath
    from fsspec import AbstractFileSystem

log = logging.getLogger(__name__)

S3_PROTOCOLS = frozenset({"s3", "s3a", "s3n"})
GCS_PROTOCOLS = frozenset({"gs", "gcs"})
LOCAL_PROTOCOLS = frozenset({"file", "local", ""})
#: HTTP statuses that mean "the condition did not hold": 412, and 409 when S3 saw a concurrent
#: conditional write to the same key (ConditionalRequestConflict: retrying would be refused too).
_CONDITION_FAILED = frozenset({409, 412})

_bound: set[tuple[str, str | None]] = set()


class ConditionalWriteUnsupported(AnthropicBatchError, NotImplementedError):
    """The path's store has no conditional writes here (named in the message)."""


# ---------------------------------------------------------------------------- filesystem binding
def bind_filesystem(protocol: str, conn_id: str | None) -> None:
    """Make ``ObjectStoragePath`` usable for ``protocol`` (and ``conn_id``) in this process.

    Does nothing when a provider registers the scheme (the Amazon or Google provider) or for local
    paths. Called by ``storage.as_path`` before it builds a path.
    """
    if protocol in LOCAL_PROTOCOLS or (protocol, conn_id) in _bound:
        return
    # Airflow's module only on this path: callers that never take it stay light
    from airflow.sdk.io import attach, has_fs

    if not has_fs(protocol):
        if protocol in S3_PROTOCOLS:
            fs = _s3_filesystem(conn_id)
        elif conn_id is None:
            import fsspec

            fs = fsspec.filesystem(protocol)
        else:
            raise ValueError(
                f"no filesystem for {protocol}://{conn_id}@...: install the Airflow provider that "
                f"registers {protocol}:// (e.g. apache-airflow-providers-google for gs://), or drop "
                "the connection id from the storage root to use the default credentials"
            )
        # Assigned, not only passed: a path built earlier may have cached this store without one.
        attach(protocol, conn_id, fs=fs).fs = fs
    _bound.add((protocol, conn_id))


def _s3_filesystem(conn_id: str | None) -> AbstractFileSystem:
    # fsspec/s3fs: only for object-store URLs
    from s3fs import S3FileSystem

    if conn_id is None:
        return S3FileSystem()
    # Airflow's module only on this path: callers that never take it stay light
    from airflow.sdk import BaseHook

    conn = BaseHook.get_connection(conn_id)
    extra: dict[str, Any] = conn.extra_dejson or {}
    service = (extra.get("service_config") or {}).get("s3") or {}
    client_kwargs = {"region_name": extra["region_name"]} if extra.get("region_name") else {}
    return S3FileSystem(
        key=conn.login or extra.get("aws_access_key_id") or None,
        secret=conn.password or extra.get("aws_secret_access_key") or None,
        token=extra.get("aws_session_token") or None,
        endpoint_url=service.get("endpoint_url") or extra.get("endpoint_url") or None,
        client_kwargs=client_kwargs,
        config_kwargs=extra.get("config_kwargs") or {},
    )


# ---------------------------------------------------------------------------- conditional writes
def create_if_absent(path: ObjectStoragePath, data: bytes) -> bool:
    """Create ``path`` with ``data`` unless it exists: ``True`` if this call created it."""
    kind = _kind(path)
    if kind == "s3":
        return _s3_put(path, data, IfNoneMatch="*")
    if kind == "gcs":
        return _gcs_put(path, data, "0")
    return _memory_create(path, data)


def read_with_version(path: ObjectStoragePath) -> tuple[bytes, str] | None:
    """``(bytes, version)`` of ``path`` read in one request, or ``None`` when it does not exist."""
    kind = _kind(path)
    if kind == "s3":
        return _s3_get(path)
    if kind == "gcs":
        return _gcs_get(path)
    with _MEMORY_LOCK:
        return _memory_read(path)


def replace_if_version(path: ObjectStoragePath, data: bytes, version: str) -> bool:
    """Overwrite ``path`` only if it is still at ``version``: ``False`` if it changed or vanished."""
    kind = _kind(path)
    if kind == "s3":
        return _s3_put(path, data, IfMatch=version)
    if kind == "gcs":
        return _gcs_put(path, data, version)
    return _memory_replace(path, data, version)


def _kind(path: ObjectStoragePath) -> str:
    protocol = path.protocol or ""
    if isinstance(protocol, tuple | list):  # fsspec allows several names for one protocol
        protocol = protocol[0]
    if protocol in S3_PROTOCOLS:
        return "s3"
    if protocol in GCS_PROTOCOLS:
        return "gcs"
    if protocol in LOCAL_PROTOCOLS:
        raise ValueError(f"{path}: local files are handled by anthropic_batch.storage, not here")
    if protocol == "memory":
        return "memory"
    raise ConditionalWriteUnsupported(
        f"{path}: conditional writes are implemented for s3://, gs://, memory:// (and local files, "
        f"in anthropic_batch.storage),"
        f"not {protocol}://"
    )


# S3 through s3fs: its coroutine API (``_call_s3``) runs on the filesystem's own event loop.
def _s3_put(path: ObjectStoragePath, data: bytes, **condition: str) -> bool:
    # fsspec/s3fs: only for object-store URLs
    from fsspec.asyn import sync

    fs = path.fs
    bucket, key, _ = fs.split_path(path.path)
    try:
        sync(fs.loop, fs._call_s3, "put_object", Bucket=bucket, Key=key, Body=data, **condition)
    except (FileExistsError, FileNotFoundError):
        return False  # If-None-Match on an existing key / If-Match on a vanished one
    except OSError as exc:
        if _http_status(exc) in _CONDITION_FAILED:
            return False
        raise
    finally:
        fs.invalidate_cache(path.path)
    return True


def _s3_get(path: ObjectStoragePath) -> tuple[bytes, str] | None:
    # fsspec/s3fs: only for object-store URLs
    from fsspec.asyn import sync

    fs = path.fs
    bucket, key, _ = fs.split_path(path.path)

    async def get() -> tuple[bytes, str]:
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        async with resp["Body"] as body:
            return await body.read(), resp["ETag"]

    try:
        return sync(fs.loop, get)
    except FileNotFoundError:
        return None


def _http_status(exc: BaseException) -> int | None:
    cause = exc.__cause__ or exc.__context__
    response = getattr(cause, "response", None) or {}
    return (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")


# GCS through gcsfs's JSON API calls (generation preconditions); not covered by tests here.
def _gcs_put(path: ObjectStoragePath, data: bytes, generation: str) -> bool:
    # fsspec/s3fs: only for object-store URLs
    from fsspec.asyn import sync

    fs = path.fs
    bucket, key, _ = fs.split_path(path.path)
    try:
        sync(
            fs.loop,
            fs._call,
            "POST",
            f"{fs._location}/upload/storage/v1/b/{bucket}/o",
            uploadType="media",
            name=key,
            ifGenerationMatch=generation,
            data=data,
            json_out=True,
        )
    except (FileExistsError, FileNotFoundError):
        return False
    except OSError as exc:
        if getattr(exc, "code", None) in _CONDITION_FAILED or getattr(exc, "errno", None) == errno.EEXIST:
            return False
        raise
    finally:
        fs.invalidate_cache(path.path)
    return True


def _gcs_get(path: ObjectStoragePath) -> tuple[bytes, str] | None:
    fs = path.fs
    try:
        generation = str(fs.info(path.path, refresh=True)["generation"])
        # Reading that generation (not "latest") keeps the bytes and the version consistent.
        return fs.cat_file(f"{path.path}#{generation}"), generation
    except FileNotFoundError:
        return None


# memory:// (fsspec's in-process store, for tests): one lock per process makes each operation
# atomic, which is all a store that lives in one process needs.
_MEMORY_LOCK = threading.Lock()


def _memory_version(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _memory_read(path: ObjectStoragePath) -> tuple[bytes, str] | None:
    try:
        data = path.fs.cat_file(path.path)
    except FileNotFoundError:
        return None
    return data, _memory_version(data)


def _memory_create(path: ObjectStoragePath, data: bytes) -> bool:
    with _MEMORY_LOCK:
        if path.fs.exists(path.path):
            return False
        path.fs.pipe_file(path.path, data)
        return True


def _memory_replace(path: ObjectStoragePath, data: bytes, version: str) -> bool:
    with _MEMORY_LOCK:
        current = _memory_read(path)
        if current is None or current[1] != version:
            return False
        path.fs.pipe_file(path.path, data)
        return True
