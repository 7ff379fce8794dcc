"""The YAML pipeline schema (pydantic) and its loader.

A pipeline is one YAML file under ``include/pipelines/``; ``dags/pipelines.py`` turns each into a DAG
with ``dag_factory.build_pipeline_dag``. Everything a run needs is declared here: where the records
come from, how a record becomes a request, which model answers, how the answer is validated, and the
money and queue limits. Validation happens at parse time so a typo fails loudly in the DAG import
errors, naming the file and the field, instead of at 3 a.m. inside a task.

This module is imported while DAG files are parsed: it must stay light (no pandas, pyarrow, anthropic).
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from anthropic_batch.errors import AnthropicBatchError

CHECKOUT_DIR = Path(__file__).resolve().parents[2]
#: ``include/``: prompt templates, output schemas and pipeline files are referenced relative to it.
INCLUDE_DIR = CHECKOUT_DIR / "include"
#: A prompt setting (template, system prompt) that is one line ending in one of these names a file.
PROMPT_FILE_SUFFIXES = (".j2", ".jinja", ".jinja2", ".txt", ".md")
#: Where pipeline files are read from; ``ANTHROPIC_BATCH_PIPELINES_DIR`` points elsewhere (tests, staging).
PIPELINES_DIR = Path(os.environ.get("ANTHROPIC_BATCH_PIPELINES_DIR") or INCLUDE_DIR / "pipelines")
#: The pool every pipeline's submit, sensor and resubmit tasks share (created by the demo/e2e set-up).
POOL_NAME = "anthropic_batches"

_IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_CRON_PRESETS = ("@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly")
_OUTPUT_MODEL_REF = re.compile(r"^(?P<file>[\w./-]+\.py):(?P<name>[A-Za-z_]\w*)$")


class PipelineConfigError(AnthropicBatchError, ValueError):
    """A pipeline file is missing, unreadable or invalid; the message names the file and the fields."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SampleConfig(_Section):
    """The sample-and-refine gate: a few requests run synchronously before any batch spend."""

    size: int = Field(20, ge=0, le=1000, description="requests tried synchronously; 0 skips the gate")
    seed: int = 0
    min_pass_rate: float = Field(0.9, ge=0.0, le=1.0)
    use_count_tokens: bool = False


class BudgetConfig(_Section):
    """Money limits checked by the gate before anything is submitted."""

    max_cost_usd: float | None = Field(None, gt=0)


class ResubmitConfig(_Section):
    """How failed requests are retried in follow-up batches."""

    max_attempts: int = Field(3, ge=1, le=10)
    max_tokens_growth: float = Field(2.0, ge=1.0, le=8.0)
    retry_truncated: bool | None = Field(
        None,
        description="resubmit answers cut off at max_tokens (with max_tokens grown); "
        "default: on with an output_model, off for free text",
    )


class ReuseAnswersConfig(_Section):
    """The per-pipeline answer cache: reuse answers already paid for on other dates."""

    enabled: bool = False
    max_age_days: int = Field(30, ge=1, le=3650, description="older cached answers are sent again")


class PipelineConfig(_Section):
    """One declared pipeline (one YAML file)."""

    name: str = Field(description="pipeline name: storage prefix and default dag_id")
    dag_id: str | None = None
    description: str = Field(min_length=1)
    owner: str = "data-platform"
    schedule: str | None = Field("@daily", description="cron expression or preset; null = manual only")
    start_date: dt.date
    catchup: bool = False
    tags: list[str] = Field(default_factory=list)
    retries: int = Field(2, ge=0, le=10)

    # Input and request building.
    source: str = Field(description="URL or path of the day's records; Jinja-templated ({{ ds }})")
    source_format: Literal["jsonl", "json", "csv", "parquet"] | None = None
    key_columns: list[str] = Field(min_length=1)
    prompt_template: str = Field(description="path under include/ (e.g. prompts/x.j2) or inline Jinja")
    system_prompt: str | None = Field(
        None,
        description="inline text, or a file under include/ (e.g. prompts/x.md) for a long shared "
        "prefix (a rubric) that prompt caching reuses across requests",
    )
    model: str = Field(min_length=1)
    max_tokens: int = Field(gt=0, le=128_000)
    output_model: str | None = Field(None, description='"schemas/x.py:Model" under include/')
    output_mode: Literal["json_schema", "tool"] = "json_schema"
    extra_params: dict[str, Any] | None = None

    # Gate, money and retries.
    sample: SampleConfig = Field(default_factory=SampleConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    resubmit: ResubmitConfig = Field(default_factory=ResubmitConfig)
    reuse_answers: ReuseAnswersConfig = Field(default_factory=ReuseAnswersConfig)

    # Run mode and queue.
    mode: Literal["batch", "sync", "auto"] = "batch"
    auto_sync_max_requests: int = Field(200, ge=0)
    max_requests_per_chunk: int = Field(100_000, ge=1, le=100_000)
    max_bytes_per_chunk: int = Field(200 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    max_request_bytes: int | None = Field(
        None,
        ge=1024,
        le=256 * 1024 * 1024,
        description="largest single request in bytes; bigger records are dead-lettered before any "
        "spend (default: whatever fits in a chunk)",
    )
    queue_budget_requests: int = Field(
        100_000, ge=1, description="requests this pipeline may have queued at once; sizes the pool"
    )
    max_active_runs: int = Field(2, ge=1, le=32)
    poll_interval: float = Field(30.0, gt=0)
    max_poll_interval: float = Field(600.0, gt=0)
    deadline_hours: float = Field(30.0, gt=0, le=29 * 24)
    storage_root: str | None = None

    @field_validator("name", "dag_id")
    @classmethod
    def _identifier(cls, value: str | None) -> str | None:
        if value is not None and not _IDENTIFIER.match(value):
            raise ValueError("must be lower_snake_case: a letter, then letters, digits or _ (max 64)")
        return value

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(t.strip() for t in value if t.strip()))

    @field_validator("key_columns")
    @classmethod
    def _key_columns(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("key columns must be distinct")
        return value

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        # croniter: only to read a schedule
        from croniter import croniter

        if value is None or value in ("@once", "@continuous") or value in _CRON_PRESETS:
            return value
        if not croniter.is_valid(value):
            raise ValueError(
                f"{value!r} is not a cron expression or one of {', '.join(_CRON_PRESETS)}, @once, @continuous"
            )
        return value

    @field_validator("output_model")
    @classmethod
    def _output_model_ref(cls, value: str | None) -> str | None:
        if value is not None:
            match = _OUTPUT_MODEL_REF.match(value)
            if not match:
                raise ValueError('must look like "schemas/file.py:ModelName"')
            if not (INCLUDE_DIR / match["file"]).is_file():
                raise ValueError(f"file {match['file']} not found under {INCLUDE_DIR}")
            # Import it now: a typo in the class name (or a broken schema file) is an import error
            # of the DAG, not a failed task at 3 a.m. The module needs only pydantic.
            from anthropic_batch.output_models import OutputModelError, load_output_model

            try:
                load_output_model(value, INCLUDE_DIR)
            except OutputModelError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("prompt_template")
    @classmethod
    def _prompt_template(cls, value: str) -> str:
        if _looks_like_path(value) and not (INCLUDE_DIR / value).is_file():
            raise ValueError(f"template file {value} not found under {INCLUDE_DIR}")
        return value

    @field_validator("system_prompt")
    @classmethod
    def _system_prompt(cls, value: str | None) -> str | None:
        # The same rule as prepare's: one line ending in a prompt-file suffix names a file.
        text = (value or "").strip()
        if "\n" not in text and text.lower().endswith(PROMPT_FILE_SUFFIXES):
            path = (INCLUDE_DIR / text).resolve()
            if not path.is_relative_to(INCLUDE_DIR.resolve()) or not path.is_file():
                raise ValueError(f"file {text} not found under {INCLUDE_DIR}")
        return value

    @model_validator(mode="after")
    def _consistency(self) -> PipelineConfig:
        if self.max_poll_interval < self.poll_interval:
            raise ValueError("max_poll_interval must be >= poll_interval")
        if self.queue_budget_requests < self.max_requests_per_chunk:
            raise ValueError(
                "queue_budget_requests must be >= max_requests_per_chunk (one chunk must fit in the queue)"
            )
        if self.max_request_bytes is not None and self.max_request_bytes > self.max_bytes_per_chunk:
            raise ValueError(
                "max_request_bytes must be <= max_bytes_per_chunk (a request must fit in a chunk)"
            )
        return self

    # ------------------------------------------------------------------ derived
    @property
    def resolved_dag_id(self) -> str:
        return self.dag_id or self.name

    @property
    def pool_slots_total(self) -> int:
        """Pool size: how many chunks (batches) may be queued at once within the request budget.

        Each submit/sensor/resubmit task takes one slot and a chunk holds at most
        ``max_requests_per_chunk`` requests, so ``queue_budget_requests // max_requests_per_chunk``
        slots keep the queued requests under the budget.
        """
        return max(1, self.queue_budget_requests // self.max_requests_per_chunk)

    @property
    def asset_uri(self) -> str:
        """The Asset the publish task updates (downstream DAGs schedule on it)."""
        return f"anthropic-batch://{self.name}/extractions"


def _looks_like_path(template: str) -> bool:
    return "{{" not in template and "{%" not in template and "\n" not in template


def _format_validation_error(path: Path, exc: ValidationError) -> str:
    lines = [f"invalid pipeline file {path}:"]
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "(file)"
        lines.append(f"  - {where}: {err['msg']}")
    return "\n".join(lines)


def load_pipeline(path: str | os.PathLike[str]) -> PipelineConfig:
    """Read and validate one pipeline YAML file; raise ``PipelineConfigError`` naming file and fields."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PipelineConfigError(f"cannot read pipeline file {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise PipelineConfigError(f"pipeline file {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise PipelineConfigError(f"pipeline file {path} must hold a mapping, got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise PipelineConfigError(_format_validation_error(path, exc)) from exc


def scan_pipelines(
    directory: str | os.PathLike[str] | None = None,
) -> tuple[list[PipelineConfig], list[str]]:
    """``(valid pipelines sorted by name, problems)`` for the pipeline files in ``directory``.

    A bad file, or every file of a duplicated dag id, is left out and described in ``problems``
    (each names the file and the field): one bad file must not take the other pipelines down.
    """
    directory = Path(directory) if directory is not None else PIPELINES_DIR
    files = sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])
    loaded: list[tuple[Path, PipelineConfig]] = []
    problems: list[str] = []
    for file in files:
        try:
            loaded.append((file, load_pipeline(file)))
        except PipelineConfigError as exc:
            problems.append(str(exc))
    files_by_dag_id: dict[str, list[Path]] = {}
    for file, cfg in loaded:
        files_by_dag_id.setdefault(cfg.resolved_dag_id, []).append(file)
    configs = []
    for file, cfg in loaded:
        clashing = files_by_dag_id[cfg.resolved_dag_id]
        if len(clashing) > 1:
            if file == clashing[0]:
                names = ", ".join(str(f) for f in clashing)
                problems.append(
                    f"dag_id {cfg.resolved_dag_id!r} is declared by several pipeline files: {names}"
                )
            continue
        configs.append(cfg)
    return sorted(configs, key=lambda c: c.name), problems


def load_pipelines(directory: str | os.PathLike[str] | None = None) -> list[PipelineConfig]:
    """Every ``*.yaml``/``*.yml`` pipeline in ``directory`` (default ``PIPELINES_DIR``), sorted by name.

    All files are validated; the error lists every bad file, and duplicate dag ids are refused.
    (``dags/pipelines.py`` uses ``scan_pipelines`` instead, so the good pipelines still load.)
    """
    configs, problems = scan_pipelines(directory)
    if problems:
        raise PipelineConfigError("\n".join(problems))
    return configs
