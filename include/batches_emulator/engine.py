"""Batch state in SQLite, the lazy lifecycle, and result generation.

State is derived from timestamps whenever a batch is looked at. When a batch is first seen past its
end its results are computed once, shuffled (seeded) and stored compressed, so every later download
returns the same lines, also after a restart. A small batch is finalised right there; a large one
(more than ``INLINE_FINALIZE_MAX_REQUESTS``) on one background thread with its own SQLite reader, so
that other clients are not kept waiting: until its results are stored it still reads
``in_progress`` (the real API, too, says ``ended`` only once results can be downloaded), and
``ended_at`` is the time it ended, not the time it was finalised. A restart mid-way finalises again.

Times are *emulated* epoch seconds: ``epoch0 + (real_now - epoch0) * time_scale`` with ``epoch0``
fixed in the database on first use, so timestamps stay consistent across restarts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import random
import re
import secrets
import sqlite3
import string
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from batches_emulator import model
from batches_emulator.config import ERROR_TYPES, Settings

DAY = 86400.0
EXPIRY_SECONDS = DAY
ARCHIVE_SECONDS = 29 * DAY
STORE_PART_BYTES = 16 * 1024 * 1024
RESULT_LINES_PER_PART = 2000
#: Batches up to this size are finalised inline (well under a second); larger ones in the background.
INLINE_FINALIZE_MAX_REQUESTS = 2000
#: How long one batch request is "being answered", as a fraction of --processing-seconds: requests
#: of a batch run concurrently, and a cache entry is readable only once the request that wrote it
#: has finished, so requests that started before the first write completed write again.
REQUEST_RUN_FRACTION = 0.1

log = logging.getLogger(__name__)

ERROR_MESSAGES = {
    "api_error": "Internal server error (emulated)",
    "overloaded_error": "Overloaded (emulated)",
    "rate_limit_error": "Rate limited (emulated)",
    "invalid_request_error": "Invalid request (emulated fault)",
    "authentication_error": "Invalid authentication credentials (emulated)",
    "billing_error": "Your credit balance is too low (emulated)",
    "permission_error": "Permission denied (emulated)",
    "not_found_error": "Not found (emulated)",
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    created_at REAL NOT NULL,
    created_real REAL NOT NULL,
    natural_end REAL NOT NULL,
    n_requests INTEGER NOT NULL,
    api_version TEXT NOT NULL,
    cancel_initiated_at REAL,
    ended_at REAL,
    counts TEXT,
    downloads INTEGER NOT NULL DEFAULT 0,
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS request_parts (
    batch_id TEXT NOT NULL, part INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (batch_id, part)
);
CREATE TABLE IF NOT EXISTS result_parts (
    batch_id TEXT NOT NULL, part INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (batch_id, part)
);
CREATE TABLE IF NOT EXISTS cache_entries (
    key TEXT PRIMARY KEY, available_at REAL NOT NULL, expires_at REAL NOT NULL
);
"""

_ALPHABET = string.ascii_letters + string.digits


def rfc3339(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def random_id(prefix: str, n: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(n))


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class NotFound(Exception):
    pass


class Conflict(Exception):
    pass


@dataclass
class Plan:
    """The seeded fate of one request: injected fault and finish time offset (fraction of processing)."""

    error_type: str | None
    stuck: bool
    invalid_output: bool
    truncate: bool
    finish_fraction: float


class Engine:
    def __init__(self, settings: Settings):
        self.settings = settings
        state_dir = settings.db_path.parent
        if not state_dir.exists():
            state_dir.mkdir(parents=True)
            # A directory the emulator creates keeps itself out of git (./.emulator/ in a checkout).
            (state_dir / ".gitignore").write_text("*\n")
        self.db = sqlite3.connect(str(settings.db_path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self.lock = threading.RLock()
        self.sync_seen: dict[str, int] = {}
        # Large batches waiting for / in background finalisation (ids), and the worker's queue.
        self.finalizing: set[str] = set()
        self.finalize_queue: queue.Queue[tuple[tuple, float]] = queue.Queue()
        self.finalizer: threading.Thread | None = None
        self.closed = False
        row = self.db.execute("SELECT value FROM meta WHERE key='epoch0'").fetchone()
        if row is None:
            self.epoch0 = time.time()
            self.db.execute("INSERT INTO meta VALUES ('epoch0', ?)", (repr(self.epoch0),))
        else:
            self.epoch0 = float(row[0])

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.db.close()

    # ------------------------------------------------------------ time

    def now(self) -> float:
        return self.epoch0 + (time.time() - self.epoch0) * self.settings.time_scale

    def emulated(self, real_seconds: float) -> float:
        return real_seconds * self.settings.time_scale

    # ------------------------------------------------------------ plans

    def plans(self, seq: int, n: int) -> Iterator[Plan]:
        s = self.settings
        rng = random.Random(f"{s.seed}:batch:{seq}")
        thresholds: list[tuple[float, str]] = []
        acc = 0.0
        for kind in ERROR_TYPES:
            if s.error_rates.get(kind):
                acc += s.error_rates[kind]
                thresholds.append((acc, kind))
        expired_until = acc + s.expired_rate
        for _ in range(n):
            u, v, w, f = rng.random(), rng.random(), rng.random(), rng.random()
            error_type = next((kind for limit, kind in thresholds if u < limit), None)
            stuck = error_type is None and u < expired_until
            yield Plan(error_type, stuck, v < s.invalid_output_rate, w < s.truncate_rate, 0.1 + 0.9 * f)

    # ------------------------------------------------------------ create

    def create_batch(self, raw_body: bytes, n_requests: int, api_version: str) -> dict[str, Any]:
        s = self.settings
        with self.lock:
            now, real = self.now(), time.time()
            batch_id = random_id("msgbatch_")
            # Never ended at birth: create always answers in_progress, as the real API does.
            processing = max(self.emulated(s.processing_seconds), 1e-3)
            cur = self.db.execute("BEGIN")
            cur.execute(
                "INSERT INTO batches (id, created_at, created_real, natural_end, n_requests, api_version)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (batch_id, now, real, now, n_requests, api_version),
            )
            seq = cur.lastrowid
            stuck = any(p.stuck for p in self.plans(seq, n_requests)) if s.expired_rate else False
            natural_end = now + (EXPIRY_SECONDS if stuck else min(processing, EXPIRY_SECONDS))
            cur.execute("UPDATE batches SET natural_end=? WHERE seq=?", (natural_end, seq))
            packed = zlib.compress(raw_body, 1)
            cur.executemany(
                "INSERT INTO request_parts VALUES (?, ?, ?)",
                (
                    (batch_id, i, packed[off : off + STORE_PART_BYTES])
                    for i, off in enumerate(range(0, len(packed), STORE_PART_BYTES))
                ),
            )
            cur.execute("COMMIT")
            return self._view(self._row(batch_id), now)

    # ------------------------------------------------------------ read

    def queued_requests(self) -> int:
        """Requests of batches still processing (the organisation-wide batch queue)."""
        with self.lock:
            row = self.db.execute(
                "SELECT COALESCE(SUM(n_requests), 0) FROM batches WHERE deleted=0 AND ended_at IS NULL"
                " AND natural_end > ? AND (cancel_initiated_at IS NULL OR cancel_initiated_at > ?)",
                (self.now(), self.now() - self.emulated(self.settings.cancel_seconds)),
            ).fetchone()
            return int(row[0])

    def _row(self, batch_id: str) -> sqlite3.Row | tuple:
        row = self.db.execute(
            "SELECT seq, id, created_at, created_real, natural_end, n_requests, api_version,"
            " cancel_initiated_at, ended_at, counts, downloads FROM batches WHERE id=? AND deleted=0",
            (batch_id,),
        ).fetchone()
        if row is None:
            raise NotFound(batch_id)
        return row

    def _end_time(self, row: tuple) -> float:
        natural_end, cancel_at = row[4], row[7]
        if cancel_at is not None and cancel_at < natural_end:
            return min(natural_end, cancel_at + self.emulated(self.settings.cancel_seconds))
        return natural_end

    def _view(self, row: tuple, now: float, base_url: str = "") -> dict[str, Any]:
        _seq, batch_id, created, _, _, n, _, cancel_at, ended_at, counts, _ = row
        end = self._end_time(row)
        if now >= end and ended_at is None:
            if n <= INLINE_FINALIZE_MAX_REQUESTS:
                ended_at, counts = self._finalize(row, end)
            else:
                self._finalize_later(row, end)
        if ended_at is not None:
            status = "ended"
            request_counts = json.loads(counts)
        else:
            status = "canceling" if cancel_at is not None else "in_progress"
            request_counts = {"processing": n, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        archived = created + ARCHIVE_SECONDS
        return {
            "id": batch_id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": request_counts,
            "ended_at": rfc3339(ended_at),
            "created_at": rfc3339(created),
            "expires_at": rfc3339(created + EXPIRY_SECONDS),
            "archived_at": rfc3339(archived) if now >= archived else None,
            "cancel_initiated_at": rfc3339(cancel_at),
            "results_url": f"{base_url}/v1/messages/batches/{batch_id}/results" if ended_at else None,
        }

    def retrieve(self, batch_id: str, base_url: str) -> dict[str, Any]:
        with self.lock:
            return self._view(self._row(batch_id), self.now(), base_url)

    def seconds_since_create(self, batch_id: str) -> float:
        with self.lock:
            return time.time() - self._row(batch_id)[3]

    def list_batches(
        self, limit: int, after_id: str | None, before_id: str | None, base_url: str
    ) -> dict[str, Any]:
        cols = (
            "seq, id, created_at, created_real, natural_end, n_requests, api_version,"
            " cancel_initiated_at, ended_at, counts, downloads"
        )
        with self.lock:
            if before_id:
                anchor = self._row(before_id)[0]
                rows = self.db.execute(
                    f"SELECT {cols} FROM batches WHERE deleted=0 AND seq>? ORDER BY seq ASC LIMIT ?",
                    (anchor, limit + 1),
                ).fetchall()
                has_more = len(rows) > limit
                rows = list(reversed(rows[:limit]))
            else:
                anchor = self._row(after_id)[0] if after_id else None
                where = "AND seq<?" if anchor is not None else ""
                params = (anchor, limit + 1) if anchor is not None else (limit + 1,)
                rows = self.db.execute(
                    f"SELECT {cols} FROM batches WHERE deleted=0 {where} ORDER BY seq DESC LIMIT ?", params
                ).fetchall()
                has_more = len(rows) > limit
                rows = rows[:limit]
            now = self.now()
            data = [self._view(r, now, base_url) for r in rows]
        return {
            "data": data,
            "has_more": has_more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }

    # ------------------------------------------------------------ cancel / delete

    def cancel(self, batch_id: str, base_url: str) -> dict[str, Any]:
        with self.lock:
            row = self._row(batch_id)
            now = self.now()
            if row[7] is None and now < self._end_time(row):
                self.db.execute("UPDATE batches SET cancel_initiated_at=? WHERE id=?", (now, batch_id))
                row = self._row(batch_id)
            return self._view(row, now, base_url)

    def delete(self, batch_id: str) -> dict[str, Any]:
        with self.lock:
            view = self._view(self._row(batch_id), self.now())
            if view["processing_status"] != "ended":
                raise Conflict(
                    f"Message Batch {batch_id} cannot be deleted while it is {view['processing_status']}; "
                    "cancel it and wait for it to end"
                )
            self.db.execute("BEGIN")
            self.db.execute("UPDATE batches SET deleted=1 WHERE id=?", (batch_id,))
            self.db.execute("DELETE FROM request_parts WHERE batch_id=?", (batch_id,))
            self.db.execute("DELETE FROM result_parts WHERE batch_id=?", (batch_id,))
            self.db.execute("COMMIT")
        return {"id": batch_id, "type": "message_batch_deleted"}

    # ------------------------------------------------------------ results

    def _load_requests(self, db: sqlite3.Connection, batch_id: str) -> list[dict[str, Any]]:
        parts = db.execute(
            "SELECT data FROM request_parts WHERE batch_id=? ORDER BY part", (batch_id,)
        ).fetchall()
        return decode_requests(zlib.decompress(b"".join(p[0] for p in parts)).decode())

    def _finalize(self, row: tuple, end: float) -> tuple[float, str]:
        """Compute and store a batch's results now (caller holds the lock)."""
        counts_json, parts, cache = self._compute_results(row, self.db)
        self._store_results(row, end, counts_json, parts, cache)
        return end, counts_json

    def _finalize_later(self, row: tuple, end: float) -> None:
        """Queue a large batch for the background finaliser (once; caller holds the lock)."""
        if row[1] in self.finalizing:
            return
        self.finalizing.add(row[1])
        self.finalize_queue.put((row, end))
        if self.finalizer is None:
            self.finalizer = threading.Thread(target=self._finalize_worker, name="finalize", daemon=True)
            self.finalizer.start()

    def _finalize_worker(self) -> None:
        # Its own connection: the heavy part reads without the engine lock (WAL readers never block).
        reader = sqlite3.connect(str(self.settings.db_path), check_same_thread=False, isolation_level=None)
        while True:
            row, end = self.finalize_queue.get()
            try:
                counts_json, parts, cache = self._compute_results(row, reader)
                with self.lock:
                    if not self.closed:
                        self._store_results(row, end, counts_json, parts, cache)
            except Exception:  # the next look at the batch queues it again
                log.exception("finalising batch %s failed", row[1])
            finally:
                with self.lock:
                    self.finalizing.discard(row[1])

    def _compute_results(self, row: tuple, db: sqlite3.Connection) -> tuple[str, list[bytes], PrefixCache]:
        """Counts (JSON) and the compressed result parts of an ended batch; nothing is written."""
        seq, batch_id, created, _, _, n, api_version, cancel_at, *_ = row
        requests = self._load_requests(db, batch_id)
        processing = self.emulated(self.settings.processing_seconds)
        expires = created + EXPIRY_SECONDS
        plans = list(self.plans(seq, n))
        order = sorted(range(n), key=lambda i: plans[i].finish_fraction)
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        lines: list[str | None] = [None] * n
        cache = PrefixCache(db)
        for i in order:
            plan, request = plans[i], requests[i]
            requests[i] = None  # type: ignore[call-overload]  # let each request go once answered
            finish = created + processing * plan.finish_fraction
            start = finish - processing * REQUEST_RUN_FRACTION
            custom_id = request["custom_id"]
            if cancel_at is not None and (plan.stuck or finish > cancel_at):
                result: dict[str, Any] = {"type": "canceled"}
            elif plan.stuck or finish > expires:
                result = {"type": "expired"}
            elif plan.error_type:
                result = errored(plan.error_type, ERROR_MESSAGES[plan.error_type])
            else:
                try:
                    message = build_message(
                        request["params"],
                        api_version=api_version,
                        in_batch=True,
                        cache=cache,
                        at=finish,
                        started=start,
                        cache_min_tokens=self.settings.cache_min_tokens,
                        invalid_output=plan.invalid_output,
                        truncate=plan.truncate,
                    )
                    result = {"type": "succeeded", "message": message}
                except model.RequestInvalid as exc:
                    result = errored("invalid_request_error", str(exc))
            counts[result["type"]] += 1
            lines[i] = dumps({"custom_id": custom_id, "result": result}) + "\n"
        random.Random(f"{self.settings.seed}:order:{seq}").shuffle(lines)
        parts = []
        for off in range(0, n, RESULT_LINES_PER_PART):
            parts.append(zlib.compress("".join(lines[off : off + RESULT_LINES_PER_PART]).encode(), 1))
            lines[off : off + RESULT_LINES_PER_PART] = [None] * len(lines[off : off + RESULT_LINES_PER_PART])
        return json.dumps(counts), parts, cache

    def _store_results(
        self, row: tuple, end: float, counts_json: str, parts: list[bytes], cache: PrefixCache
    ) -> None:
        """Write the results and mark the batch ended, unless it was deleted meanwhile (lock held)."""
        seq, batch_id = row[0], row[1]
        self.db.execute("BEGIN")
        try:
            if self.db.execute("SELECT deleted FROM batches WHERE seq=?", (seq,)).fetchone() != (0,):
                return
            cache.flush(self.db)
            self.db.executemany(
                "INSERT OR REPLACE INTO result_parts VALUES (?, ?, ?)",
                ((batch_id, k, part) for k, part in enumerate(parts)),
            )
            self.db.execute("UPDATE batches SET ended_at=?, counts=? WHERE seq=?", (end, counts_json, seq))
        finally:
            self.db.execute("COMMIT")

    def results_status(self, batch_id: str) -> tuple[dict[str, Any], int]:
        """The batch view and the number of earlier downloads (counting this one as started)."""
        with self.lock:
            row = self._row(batch_id)
            view = self._view(row, self.now())
            if view["processing_status"] == "ended":
                self.db.execute("UPDATE batches SET downloads=downloads+1 WHERE id=?", (batch_id,))
            return view, row[10]

    def result_parts(self, batch_id: str) -> Iterator[bytes]:
        n_parts = self.db.execute(
            "SELECT COUNT(*) FROM result_parts WHERE batch_id=?", (batch_id,)
        ).fetchone()[0]
        for k in range(n_parts):
            with self.lock:
                row = self.db.execute(
                    "SELECT data FROM result_parts WHERE batch_id=? AND part=?", (batch_id, k)
                ).fetchone()
            if row is None:  # deleted while streaming
                return
            yield zlib.decompress(row[0])

    # ------------------------------------------------------------ synchronous messages

    def message(self, params: dict[str, Any], api_version: str) -> dict[str, Any]:
        """A synchronous Messages call. Output faults are drawn per (prompt, n-th time asked), so
        they do not depend on the order of concurrent calls and a retry gets a fresh draw."""
        s = self.settings
        with self.lock:
            key = hashlib.sha256(model.canonical(params).encode("utf-8")).hexdigest()
            nth = self.sync_seen.get(key, 0)
            self.sync_seen[key] = nth + 1
            rng = random.Random(f"{s.seed}:sync:{key}:{nth}")
            invalid_output, truncate = rng.random() < s.invalid_output_rate, rng.random() < s.truncate_rate
            cache = PrefixCache(self.db)
            msg = build_message(
                params,
                api_version=api_version,
                in_batch=False,
                cache=cache,
                at=self.now(),
                cache_min_tokens=s.cache_min_tokens,
                invalid_output=invalid_output,
                truncate=truncate,
            )
            cache.flush()
            return msg


_SPACE = re.compile(r"[ \t\n\r]*")


def decode_requests(body: str) -> list[dict[str, Any]]:
    """The ``requests`` of a create body, decoded one request at a time.

    One ``json.loads`` of a 100k-request body holds the GIL for a second or more; one
    ``raw_decode`` per request lets the server's event loop run in between (the body was checked
    to be a JSON object with a ``requests`` list when the batch was created).
    """
    decoder = json.JSONDecoder()

    def skip(pos: int, char: str = "") -> int:
        pos = _SPACE.match(body, pos).end()
        if char:
            if body[pos] != char:
                raise ValueError(f"expected {char!r} at {pos}")
            pos = _SPACE.match(body, pos + 1).end()
        return pos

    pos = skip(0, "{")
    while body[pos] != "}":
        key, pos = decoder.raw_decode(body, pos)
        pos = skip(pos, ":")
        if key != "requests":
            _, pos = decoder.raw_decode(body, pos)
        else:
            requests: list[dict[str, Any]] = []
            pos = skip(pos, "[")
            while body[pos] != "]":
                item, pos = decoder.raw_decode(body, pos)
                requests.append(item)
                pos = skip(pos)
                if body[pos] == ",":
                    pos = skip(pos + 1)
            return requests
        pos = skip(pos)
        if body[pos] == ",":
            pos = skip(pos + 1)
    raise ValueError("the stored body has no requests")


def errored(error_type: str, message: str) -> dict[str, Any]:
    return {
        "type": "errored",
        "error": {
            "type": "error",
            "error": {"type": error_type, "message": message},
            "request_id": random_id("req_"),
        },
    }


class PrefixCache:
    """Prompt-cache entries (prefix hash -> readable from, expires at; emulated times), read through
    and written back in one go."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db
        self.seen: dict[str, tuple[float, float]] = {}
        self.dirty: set[str] = set()

    def entry(self, key: str) -> tuple[float, float]:
        if key not in self.seen:
            row = self.db.execute(
                "SELECT available_at, expires_at FROM cache_entries WHERE key=?", (key,)
            ).fetchone()
            self.seen[key] = (row[0], row[1]) if row else (0.0, 0.0)
        return self.seen[key]

    def readable(self, key: str, at: float) -> bool:
        available, expires = self.entry(key)
        return available <= at < expires

    def put(self, key: str, finished: float, expires_at: float) -> None:
        """A request that finished at ``finished`` wrote or read (refreshing the TTL) the entry."""
        available, expires = self.entry(key)
        # Absent or expired: this request's write makes it readable when it finishes.
        fresh = expires <= available or finished >= expires
        available = finished if fresh else min(available, finished)
        if (available, max(expires, expires_at)) != self.seen[key]:
            self.seen[key] = (available, max(expires, expires_at))
            self.dirty.add(key)

    def flush(self, db: sqlite3.Connection | None = None) -> None:
        if self.dirty:
            (db or self.db).executemany(
                "INSERT OR REPLACE INTO cache_entries VALUES (?, ?, ?)",
                ((key, *self.seen[key]) for key in self.dirty),
            )
            self.dirty.clear()


def usage_for(
    prompt: model.PromptTokens,
    cache: PrefixCache,
    at: float,
    min_cache_tokens: int,
    started: float | None = None,
) -> dict[str, Any]:
    """Split the prompt into uncached / cache-write / cache-read tokens (see the package docstring).

    The request runs from ``started`` (default ``at``) to ``at``: it reads the longest prefix whose
    entry was readable when it started, and its own write becomes readable when it finishes.
    """
    started = at if started is None else started
    points = [bp for bp in prompt.breakpoints if bp[0] >= min_cache_tokens]
    read = 0
    for tokens, key, _ in points:
        if cache.readable(key, started):
            read = max(read, tokens)
    creation_5m = creation_1h = 0
    if points and points[-1][0] > read:
        if points[-1][2] >= 3600:
            creation_1h = points[-1][0] - read
        else:
            creation_5m = points[-1][0] - read
    for _tokens, key, ttl in points:
        cache.put(key, at, at + ttl)
    creation = creation_5m + creation_1h
    return {
        "input_tokens": prompt.total - read - creation,
        "cache_creation_input_tokens": creation,
        "cache_read_input_tokens": read,
        "cache_creation": {
            "ephemeral_5m_input_tokens": creation_5m,
            "ephemeral_1h_input_tokens": creation_1h,
        },
    }


def build_message(
    params: Any,
    *,
    api_version: str,
    in_batch: bool,
    cache: PrefixCache,
    at: float,
    cache_min_tokens: dict[str, int],
    started: float | None = None,
    invalid_output: bool = False,
    truncate: bool = False,
) -> dict[str, Any]:
    model_id, prompt = model.validate_params(params, api_version=api_version, in_batch=in_batch)
    reply = model.answer(params, invalid_output=invalid_output, truncate=truncate)
    minimum = model.cache_min_tokens(model_id, cache_min_tokens)
    usage = usage_for(prompt, cache, at, minimum, started)
    usage["output_tokens"] = reply.output_tokens
    usage["service_tier"] = "batch" if in_batch else "standard"
    return {
        "id": model.message_id(reply.seed + repr(at)),
        "type": "message",
        "role": "assistant",
        "model": params["model"] if isinstance(params["model"], str) else model_id,
        "content": reply.content,
        "stop_reason": reply.stop_reason,
        "stop_sequence": reply.stop_sequence,
        "usage": usage,
    }
