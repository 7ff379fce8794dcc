"""PrepareRequestsOperator: turn the day's source table into request chunk files.

Streams the source (Parquet / CSV / JSONL) in record batches, renders one Messages request per record with the
pipeline's Jinja prompt, and writes, under ``work_dir``: ``requests/chunk-NNNNN.jsonl`` (one batch
each), ``requests/keys.parquet``, ``rejected.parquet`` (records refused before any spend, with the
reason) and ``requests/manifest.json`` (the run's spec and resolved mode, which every downstream
operator reads instead of repeating configuration). Returns the chunk paths for the mapped
submit tasks.

Mode: ``batch`` and ``sync`` are taken as given; ``auto`` becomes ``sync`` when the run has at most
``auto_sync_max_requests`` requests (waiting for a batch is not worth it for a handful; the sync
price is double but the absolute amount is small) or when the optional ``deadline`` hint is less
than 24 hours away (a batch may take that long), else ``batch``.

A source with no valid record is not an error: the task succeeds with an empty chunk list, so the
mapped batch tasks (and what depends on them) are skipped, and every record sits in
``rejected.parquet`` with its reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator, Context

from anthropic_batch import layout, storage
from anthropic_batch.answer_reuse import apply_reuse, cache_dir_for
from anthropic_batch.batch_requests import (
    DEFAULT_MAX_BYTES_PER_CHUNK,
    MAX_REQUESTS_PER_BATCH,
    BatchRequestError,
    RequestSpec,
    SourceReader,
    prepare_requests,
)
from anthropic_batch.caching import log_prefix_check
from anthropic_batch.contracts import CacheCheck
from anthropic_batch.output_models import load_output_model
from anthropic_batch.pipeline_config import PROMPT_FILE_SUFFIXES
from anthropic_batch.status import RunMode

log = logging.getLogger(__name__)

#: How long a batch may take before its unfinished requests expire.
BATCH_MAX_HOURS = 24

#: A ``prompt_template`` ending in one of these is a file under ``include_dir``; anything else is Jinja.


def parse_deadline(deadline: str | datetime | None) -> datetime | None:
    """An aware datetime from an RFC 3339 / ISO text (``Z`` allowed); None for None or blank."""
    if deadline is None or isinstance(deadline, datetime):
        return deadline
    text = str(deadline).strip()
    if not text or text.lower() == "none":
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BatchRequestError(f"deadline must be an ISO 8601 / RFC 3339 time, got {deadline!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def resolve_mode(
    mode: str | RunMode,
    n_requests: int,
    auto_sync_max_requests: int,
    *,
    deadline: datetime | None = None,
    now: datetime | None = None,
) -> RunMode:
    """``auto`` -> ``sync`` for small runs or a deadline sooner than a batch may take, else ``batch``.

    A batch may take up to ``BATCH_MAX_HOURS`` (24 h) before its requests expire; when ``deadline``
    is closer than that, only the synchronous API can promise to meet it.
    """
    try:
        requested = RunMode(str(mode).strip().lower())
    except ValueError:
        raise BatchRequestError(f"mode must be one of batch, sync, auto; got {mode!r}") from None
    if requested is not RunMode.AUTO:
        return requested
    if n_requests <= auto_sync_max_requests:
        return RunMode.SYNC
    if deadline is not None and deadline - (now or datetime.now(UTC)) < timedelta(hours=BATCH_MAX_HOURS):
        return RunMode.SYNC
    return RunMode.BATCH


def load_prompt_template(
    prompt_template: str, include_dir: str | Path | None, *, setting: str = "prompt template"
) -> str:
    """The text: read from ``include_dir`` when it names a file (one line with a template suffix),
    else taken inline; ``setting`` names the setting in the error for a missing file."""
    text = prompt_template.strip()
    if "\n" not in text and text.lower().endswith(PROMPT_FILE_SUFFIXES):
        path = Path(text)
        if not path.is_absolute():
            path = Path(include_dir or ".") / path
        if not path.is_file():
            raise BatchRequestError(f"{setting} file not found: {path}")
        return path.read_text(encoding="utf-8")
    return prompt_template


class PrepareRequestsOperator(BaseOperator):
    """
    Build the run's request chunks, keys, rejections and manifest from a source table.

    :param source: URL or path of the input (Parquet / CSV / JSONL). Templated.
    :param source_format: ``parquet`` / ``csv`` / ``jsonl``; by default taken from the suffix.
    :param key_columns: columns that identify a record (they make the ``custom_id``).
    :param prompt_template: a template file under ``include_dir`` (``.j2``, ``.jinja``, ``.txt``) or
        inline Jinja; the record's columns are its variables.
    :param model: the Claude model id.
    :param max_tokens: max output tokens per request.
    :param cache_system_prompt: mark ``system_prompt`` for prompt caching (default). Turn it off for
        a short prompt or a handful of requests a day: a cache write that is never read costs 1.25x.
    :param system_prompt: sent as-is (cached across requests); inline text or a file under
        ``include_dir`` (same suffixes as ``prompt_template``), read as plain text, not templated.
    :param output_model: ``"schemas/x.py:Model"`` under ``include_dir`` for structured output.
    :param output_mode: ``json_schema`` (output_config) or ``tool`` (forced tool use).
    :param extra_params: further request params (validated: only what a batch accepts).
    :param include_dir: base directory of templates and output models.
    :param work_dir: the run's work directory. Templated.
    :param pipeline: the pipeline name (recorded in the manifest).
    :param partition: ``YYYY-MM-DD`` of the run. Templated.
    :param mode: ``batch`` / ``sync`` / ``auto``. Templated (a DAG param usually).
    :param deadline: when the results are needed (RFC 3339, templated, e.g. from ``dag_run.conf``);
        ``auto`` picks ``sync`` when it is less than 24 hours away (a batch may take that long).
    :param auto_sync_max_requests: ``auto`` picks ``sync`` up to this many requests.
    :param max_requests_per_chunk: requests per chunk (= per batch), at most 100,000.
    :param max_bytes_per_chunk: bytes of a batch body, at most 256 MB.
    :param max_request_bytes: the largest single request (its JSON line) in bytes; a bigger one is
        rejected into ``rejected.parquet`` before any spend. Default: whatever fits in a chunk.
    :param answer_cache_max_age_days: turns the pipeline's answer cache on (``answer_reuse``):
        answers paid for on other dates within this many days are reused. Answers already collected
        for this partition are always reused.
    :returns: the chunk paths (possibly empty).
    """

    template_fields: Sequence[str] = ("source", "work_dir", "partition", "mode", "deadline")
    ui_color = "#e8f4fd"

    def __init__(
        self,
        *,
        source: str,
        key_columns: Sequence[str],
        prompt_template: str,
        model: str,
        max_tokens: int,
        include_dir: str,
        work_dir: str,
        pipeline: str,
        partition: str,
        source_format: str | None = None,
        system_prompt: str | None = None,
        cache_system_prompt: bool = True,
        output_model: str | None = None,
        output_mode: str | None = "json_schema",
        extra_params: dict[str, Any] | None = None,
        mode: str = "batch",
        deadline: str | None = None,
        auto_sync_max_requests: int = 200,
        max_requests_per_chunk: int = MAX_REQUESTS_PER_BATCH,
        max_bytes_per_chunk: int = DEFAULT_MAX_BYTES_PER_CHUNK,
        max_request_bytes: int | None = None,
        answer_cache_max_age_days: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if max_request_bytes is not None and not 1 <= max_request_bytes <= max_bytes_per_chunk:
            raise ValueError(
                f"max_request_bytes must be 1..max_bytes_per_chunk ({max_bytes_per_chunk}), "
                f"got {max_request_bytes}"
            )
        self.source = source
        self.source_format = source_format
        self.key_columns = list(key_columns)
        self.prompt_template = prompt_template
        self.model = model
        self.max_tokens = max_tokens
        self.system_prompt = system_prompt
        self.cache_system_prompt = cache_system_prompt
        self.output_model = output_model
        self.output_mode = output_mode
        self.extra_params = dict(extra_params or {})
        self.include_dir = include_dir
        self.work_dir = work_dir
        self.pipeline = pipeline
        self.partition = partition
        self.mode = mode
        self.deadline = deadline
        self.auto_sync_max_requests = auto_sync_max_requests
        self.max_requests_per_chunk = max_requests_per_chunk
        self.max_bytes_per_chunk = max_bytes_per_chunk
        self.max_request_bytes = max_request_bytes
        self.answer_cache_max_age_days = answer_cache_max_age_days

    @property
    def template_name(self) -> str:
        """How errors name the prompt template: its file, or "the inline prompt template"."""
        text = self.prompt_template.strip()
        if "\n" not in text and text.lower().endswith(PROMPT_FILE_SUFFIXES):
            return f"prompt template {text}"
        return "the inline prompt template"

    def build_spec(self) -> RequestSpec:
        model_cls = load_output_model(self.output_model, self.include_dir) if self.output_model else None
        return RequestSpec(
            model=self.model,
            max_tokens=self.max_tokens,
            prompt_template=load_prompt_template(self.prompt_template, self.include_dir),
            # Like the template, a file under include_dir (a long shared rubric, cached) or inline text.
            system_prompt=load_prompt_template(self.system_prompt, self.include_dir, setting="system_prompt")
            if self.system_prompt
            else self.system_prompt,
            cache_system_prompt=self.cache_system_prompt,
            output_model=model_cls,
            output_mode=self.output_mode or "json_schema",
            extra_params=self.extra_params,
            output_model_ref=self.output_model,
        )

    def execute(self, context: Context) -> list[str]:
        spec = self.build_spec()
        # A bad mode or deadline fails before any file is written.
        deadline = parse_deadline(self.deadline)
        resolve_mode(self.mode, 0, self.auto_sync_max_requests)
        # Streamed: the source is read batch by batch (twice: keys, then records), never whole.
        source = SourceReader(self.source, self.source_format)
        unreadable = source.unreadable
        log.info(
            "Reading %s records (%d columns) from %s.",
            "?" if source.num_rows is None else source.num_rows,
            len(source.column_names),
            self.source,
        )
        for item in unreadable[:20]:
            log.warning("Unreadable record, dead-lettered: %s", item.message)
        if len(unreadable) > 20:
            log.warning("... and %d more unreadable records (all in rejected.parquet).", len(unreadable) - 20)
        work = storage.as_path(self.work_dir)
        manifest = prepare_requests(
            source,
            self.key_columns,
            spec,
            work,
            max_requests_per_chunk=self.max_requests_per_chunk,
            max_bytes_per_chunk=self.max_bytes_per_chunk,
            max_request_bytes=self.max_request_bytes,
            template_name=self.template_name,
            extra_manifest={
                "spec": {
                    "pipeline": self.pipeline,
                    "partition": self.partition,
                    "include_dir": str(self.include_dir),
                },
                "source": str(self.source),
                "requested_mode": str(self.mode),
                "deadline": deadline.isoformat() if deadline else None,
            },
        )
        # Answer reuse (issue 9): what was already paid for is not sent again; only the rest is chunked.
        manifest = apply_reuse(
            work,
            manifest,
            output_model=spec.output_model,
            max_requests_per_chunk=self.max_requests_per_chunk,
            max_bytes_per_chunk=self.max_bytes_per_chunk,
            cache_dir=cache_dir_for(work, self.pipeline) if self.answer_cache_max_age_days else None,
            cache_max_age_days=self.answer_cache_max_age_days,
        )
        reuse = manifest.reuse_or_empty
        n_to_send = reuse.n_to_send
        mode = resolve_mode(self.mode, n_to_send, self.auto_sync_max_requests, deadline=deadline)
        # The final mode, and the prompt-caching check (a warning when the prefix marked for caching
        # is below the model's minimum), in one write.
        manifest = manifest.model_copy(
            update={
                "mode": mode.value,
                "cache": CacheCheck.model_validate(log_prefix_check(spec.base_params())),
            }
        )
        storage.atomic_write_json(layout.manifest_path(work), manifest.model_dump(mode="json"))

        chunks = manifest.chunks
        for warning in manifest.warnings:
            log.warning("Request spec: %s", warning)
        log.info(
            "Prepared %d requests (%d to send, %d answers reused) in %d chunk(s), %d bytes in all; "
            "%d of %d records rejected%s. Mode: %s%s.",
            manifest.n_requests,
            n_to_send,
            reuse.n_reused,
            len(chunks),
            sum(c.n_bytes for c in chunks),
            manifest.n_rejected,
            manifest.n_input_records,
            f" (see {manifest.rejected_path})" if manifest.n_rejected else "",
            mode.value,
            f" (auto: threshold {self.auto_sync_max_requests} requests, deadline {deadline})"
            if str(self.mode).strip().lower() == "auto"
            else "",
        )
        if not chunks and reuse.n_reused:
            log.info("Every request already has an answer: nothing to submit.")
        elif not chunks:
            log.warning(
                "No valid request in %s: nothing to submit; the batch tasks will be skipped.", self.source
            )
        return [c.path for c in chunks]
