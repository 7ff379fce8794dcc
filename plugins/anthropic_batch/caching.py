"""Prompt caching: each model's minimum cacheable prefix (dated, overridable) and prefix checks.

A ``cache_control`` breakpoint only caches when the prompt up to it reaches the model's minimum;
below it the API neither writes nor reads the cache and says nothing (both cache counters stay 0,
the prefix is billed as plain input). Prepare and the sample report warn about it; the emulator
applies the same table (``batches_emulator.model.CACHE_MIN_TOKENS`` mirrors it; a test keeps the
two equal).

Overrides, in order (later wins), like the price table: the built-in table, Airflow Variable
``anthropic_batch_cache_minimums``, env ``ANTHROPIC_BATCH_CACHE_MINIMUMS`` (JSON text or a path)::

    {"as_of": "2026-12-01", "default": 4096, "models": {"claude-x": 2048}}

or a bare ``{"claude-x": 2048}`` mapping.

Token counts here are an *estimate* (no tokenizer is published): ``ceil(utf8_bytes / 4)`` per text
part, the emulator's formula (its package docstring), so on the emulator the estimate is exact.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

CACHE_MINIMUMS_AS_OF = "2026-11-30"
CACHE_MINIMUMS_VARIABLE = "anthropic_batch_cache_minimums"
CACHE_MINIMUMS_ENV = "ANTHROPIC_BATCH_CACHE_MINIMUMS"

#: Minimum cacheable prompt length in tokens, as of CACHE_MINIMUMS_AS_OF. Sources (README "Prompt
#: caching"): [A] Anthropic's prompt-caching page as quoted in anthropics/anthropic-sdk-python#1194;
#: [B] news.creeta.com / dev.to "Claude's prompt cache fails silently below 1,024 tokens" (2026);
#: [C] LiteLLM prompt-caching docs (last updated 2026-10-07).
_MIN_CACHEABLE_TOKENS: dict[str, int] = {
    "claude-opus-5": 512,  # [B], [C]
    "claude-sonnet-5": 1024,  # [B], [C]
    "claude-opus-4-8": 1024,  # [B], [C]
    "claude-opus-4-7": 2048,  # [B] (a Bedrock row of [C] says 4,096)
    "claude-opus-4-6": 4096,  # [A], [B], [C]
    "claude-opus-4-5": 4096,  # [A], [B], [C]
    "claude-sonnet-4-6": 1024,  # [A], [B] (one gateway's page says 2,048)
    "claude-sonnet-4-5": 1024,  # [A], [B]
    "claude-haiku-4-5": 4096,  # [A], [B], [C]
    "claude-3-5-haiku": 2048,  # [A]
}
#: For a model with no published figure (claude-opus-5-5, claude-sonnet-5-5, claude-haiku-5-5 when
#: this was written): the largest known minimum, so a warning errs towards "may not be cached".
DEFAULT_MIN_CACHEABLE_TOKENS = 4096

REQUEST_OVERHEAD_TOKENS = 3  # the emulator's per-request overhead (batches_emulator.model)


def estimate_tokens(text: str) -> int:
    """Estimated tokens of ``text``: one per started 4 bytes of UTF-8 (the emulator's tokenizer)."""
    return math.ceil(len(text.encode("utf-8")) / 4)


def _json_tokens(value: Any) -> int:
    return estimate_tokens(json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False))


@dataclass(frozen=True)
class CacheMinimums:
    """Minimum cacheable prompt length per model, with the date the figures were taken."""

    models: Mapping[str, int]
    as_of: str = CACHE_MINIMUMS_AS_OF
    default: int = DEFAULT_MIN_CACHEABLE_TOKENS

    def minimum(self, model: str) -> int:
        """The minimum for ``model``; a dated id (``claude-x-20261001``) falls back to ``claude-x``."""
        if model in self.models:
            return int(self.models[model])
        candidates = [name for name in self.models if model.startswith(name + "-")]
        if candidates:
            return int(self.models[max(candidates, key=len)])
        return self.default

    def overlay(self, data: Mapping[str, Any]) -> CacheMinimums:
        if not isinstance(data, Mapping):
            raise ValueError(f"cache minimums override must be a JSON object, got {type(data).__name__}")
        models_data = (
            data.get("models")
            if "models" in data
            else {k: v for k, v in data.items() if k not in ("as_of", "default")}
        )
        if not isinstance(models_data, Mapping):
            raise ValueError("cache minimums override 'models' must be an object of model -> tokens")
        models = dict(self.models)
        for name, value in models_data.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"minimum for {name!r} must be a whole number of tokens >= 0, got {value!r}")
            models[name] = value
        default = data.get("default", self.default)
        if isinstance(default, bool) or not isinstance(default, int) or default < 0:
            raise ValueError(f"'default' must be a whole number of tokens >= 0, got {default!r}")
        return CacheMinimums(models=models, as_of=str(data.get("as_of", self.as_of)), default=default)

    def to_dict(self) -> dict[str, Any]:
        return {"as_of": self.as_of, "default": self.default, "models": dict(self.models)}


def builtin_cache_minimums() -> CacheMinimums:
    return CacheMinimums(models=dict(_MIN_CACHEABLE_TOKENS))


def load_cache_minimums() -> CacheMinimums:
    """The built-in table, overlaid by the Variable, then by env ``ANTHROPIC_BATCH_CACHE_MINIMUMS``."""
    from anthropic_batch.pricing import json_overrides

    table = builtin_cache_minimums()
    for source, data in json_overrides(CACHE_MINIMUMS_VARIABLE, CACHE_MINIMUMS_ENV):
        try:
            table = table.overlay(data)
        except ValueError as exc:
            raise ValueError(f"bad cache minimums override in {source}: {exc}") from exc
    return table


# ---------------------------------------------------------------------------- the shared prefix
def _block_tokens(block: Any) -> int:
    if isinstance(block, str):
        return estimate_tokens(block)
    if isinstance(block, Mapping) and block.get("type") == "text":
        return estimate_tokens(str(block.get("text", "")))
    return _json_tokens(block)


def _marked(block: Any) -> bool:
    return isinstance(block, Mapping) and isinstance(block.get("cache_control"), Mapping)


@dataclass(frozen=True)
class PrefixCheck:
    """Whether the part shared by every request (schema, tools, system) is marked for caching, how
    long it is up to its last breakpoint (estimated tokens) and the model's minimum."""

    model: str
    marked: bool
    automatic: bool
    prefix_tokens: int
    minimum: int
    as_of: str

    @property
    def cacheable(self) -> bool:
        return self.marked and self.prefix_tokens >= self.minimum

    @property
    def below_minimum(self) -> bool:
        return self.marked and self.prefix_tokens < self.minimum

    def warning(self) -> str | None:
        """The warning to log when a marked prefix cannot be cached, else None."""
        if not self.below_minimum:
            return None
        return (
            f"the prompt prefix marked for caching (cache_control) is about {self.prefix_tokens:,} tokens, "
            f"below the minimum of {self.minimum:,} tokens for {self.model} (cache minimums as of "
            f"{self.as_of}): the API will neither write nor read the cache, and every request pays the "
            "prefix as plain input. Lengthen the shared prefix (system prompt), or drop cache_control."
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "marked": self.marked,
            "automatic": self.automatic,
            "prefix_tokens": self.prefix_tokens,
            "minimum": self.minimum,
            "cacheable": self.cacheable,
            "as_of": self.as_of,
            "method": "estimate: ceil(utf8_bytes / 4) per part",
        }


def check_shared_prefix(base_params: Mapping[str, Any], minimums: CacheMinimums | None = None) -> PrefixCheck:
    """Check the prefix every request shares (``base_params``: all params but ``messages``).

    Prompt order as the API caches it: output schema, tools, system. The prefix ends at the last
    ``cache_control`` breakpoint among those parts. A top-level ``cache_control`` (automatic caching)
    puts the breakpoint on the last block of each request, i.e. inside the per-record message, so
    it caches nothing shared across records by itself: ``automatic`` says so, ``marked`` stays
    about the shared parts.
    """
    minimums = minimums or load_cache_minimums()
    model = str(base_params.get("model"))
    parts: list[tuple[Any, int]] = []
    config = base_params.get("output_config")
    if isinstance(config, Mapping) and isinstance(config.get("format"), Mapping):
        parts.append(({}, _json_tokens(config["format"].get("schema", {}))))
    for tool in base_params.get("tools") or []:
        parts.append((tool, _json_tokens(tool)))
    system = base_params.get("system")
    if isinstance(system, str):
        parts.append((system, estimate_tokens(system)))
    elif isinstance(system, list):
        parts.extend((block, _block_tokens(block)) for block in system)
    running, prefix = REQUEST_OVERHEAD_TOKENS, 0
    for block, tokens in parts:
        running += tokens
        if _marked(block):
            prefix = running
    return PrefixCheck(
        model=model,
        marked=prefix > 0,
        automatic=isinstance(base_params.get("cache_control"), Mapping),
        prefix_tokens=prefix,
        minimum=minimums.minimum(model),
        as_of=minimums.as_of,
    )


def log_prefix_check(base_params: Mapping[str, Any]) -> dict[str, Any]:
    """Prepare's check: log a WARNING when the shared prefix marked for caching is below the
    model's minimum; returns the check for the manifest's ``cache`` (the sample report shows it)."""
    check = check_shared_prefix(base_params)
    warning = check.warning()
    if warning:
        log.warning("Prompt caching: %s", warning)
    elif check.cacheable:
        log.info(
            "Prompt caching: the shared prefix (about %d tokens) reaches the minimum of %d for %s.",
            check.prefix_tokens,
            check.minimum,
            check.model,
        )
    return {**check.to_dict(), "warning": warning}
