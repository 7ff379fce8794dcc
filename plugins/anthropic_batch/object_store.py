"""Conditional writes on object stores (placeholder).

The ledger claims a chunk with :func:`anthropic_batch.storage.create_if_absent` and takes over a
dead worker's intent with :func:`anthropic_batch.storage.replace_if_version`; for non-local paths
those call the functions here (conditional puts: ``If-None-Match: *`` / ``If-Match`` on S3 and
their equivalents elsewhere). This placeholder refuses, so no claim is ever made with a plain
overwrite; the object-store implementation replaces this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath


def _unsupported(path: ObjectStoragePath) -> NotImplementedError:
    return NotImplementedError(
        f"conditional writes on {path.protocol}:// are not implemented yet ({path}); the submission "
        "ledger needs them to claim a chunk exactly once. Use a local storage root for now."
    )


def create_if_absent(path: ObjectStoragePath, data: bytes) -> bool:
    raise _unsupported(path)


def read_with_version(path: ObjectStoragePath) -> tuple[bytes, str] | None:
    raise _unsupported(path)


def replace_if_version(path: ObjectStoragePath, data: bytes, version: str) -> bool:
    raise _unsupported(path)
