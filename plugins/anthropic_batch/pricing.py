"""The price table: list prices per model (dated), overridable, and the cost of a usage block.

Prices are USD per million tokens at the *synchronous* list price; the batch price is
``batch_discount`` times that. Cache prices derive from the input price (5-minute write x1.25,
1-hour write x2, read x0.1) unless a table states them explicitly.

Overrides, in order (later wins): the built-in table, Airflow Variable ``anthropic_batch_prices``,
env ``ANTHROPIC_BATCH_PRICES`` (JSON text or a path to a JSON file). Both use the built-in shape::

    {"as_of": "2026-11-01", "batch_discount": 0.5,
     "models": {"claude-x": {"input": 3, "output": 15}}}

or a bare ``{"claude-x": {...}}`` mapping. Per model, the given fields replace the built-in ones.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from anthropic_batch.errors import AnthropicBatchError

log = logging.getLogger(__name__)

PRICE_TABLE_AS_OF = "2026-10-21"
PRICES_VARIABLE = "anthropic_batch_prices"
PRICES_ENV = "ANTHROPIC_BATCH_PRICES"
BATCH_DISCOUNT = "0.5"

CACHE_WRITE_5M_MULTIPLIER = Decimal("1.25")
CACHE_WRITE_1H_MULTIPLIER = Decimal("2")
CACHE_READ_MULTIPLIER = Decimal("0.1")
_PER_TOKEN = Decimal(1_000_000)

# (input, output) USD per million tokens, synchronous list price, as of PRICE_TABLE_AS_OF.
_LIST_PRICES: dict[str, tuple[str, str]] = {
    "claude-opus-5-5": ("4", "20"),
    "claude-opus-5": ("5", "25"),
    "claude-opus-4-8": ("5", "25"),
    "claude-opus-4-7": ("5", "25"),
    "claude-opus-4-6": ("5", "25"),
    "claude-opus-4-5": ("5", "25"),
    "claude-sonnet-5-5": ("2", "10"),
    "claude-sonnet-5": ("2", "10"),
    "claude-sonnet-4-6": ("3", "15"),
    "claude-sonnet-4-5": ("3", "15"),
    # List price for prompts up to 100k tokens.
    "claude-haiku-5-5": ("0.10", "0.50"),
    "claude-haiku-4-5": ("1", "5"),
}


class UnknownModelError(AnthropicBatchError, KeyError):
    """No price is known for a model."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class ModelPrice:
    """Synchronous USD prices per million tokens for one model."""

    input: Decimal
    output: Decimal
    cache_write_5m: Decimal
    cache_write_1h: Decimal
    cache_read: Decimal

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], base: ModelPrice | None = None) -> ModelPrice:
        def dec(name: str, fallback: Decimal | None) -> Decimal:
            if name in data and data[name] is not None:
                return Decimal(str(data[name]))
            if fallback is None:
                raise ValueError(f"price entry needs {name!r}: {dict(data)!r}")
            return fallback

        inp = dec("input", base.input if base else None)
        out = dec("output", base.output if base else None)
        # Derived cache prices follow a changed input price unless stated explicitly.
        derived = "input" in data or base is None
        return cls(
            input=inp,
            output=out,
            cache_write_5m=dec(
                "cache_write_5m", inp * CACHE_WRITE_5M_MULTIPLIER if derived else base.cache_write_5m
            ),
            cache_write_1h=dec(
                "cache_write_1h", inp * CACHE_WRITE_1H_MULTIPLIER if derived else base.cache_write_1h
            ),
            cache_read=dec("cache_read", inp * CACHE_READ_MULTIPLIER if derived else base.cache_read),
        )

    def to_dict(self) -> dict[str, float]:
        return {
            k: float(getattr(self, k))
            for k in ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")
        }


class CostBreakdown(BaseModel):
    """Tokens and dollars of a run, split the way the bill splits them (the run summary's
    ``cost_breakdown``, the reports and the Batches page show exactly these fields).

    ``*_usd`` fields are what was paid. ``cache_saving_usd`` is what the cache reads saved against
    paying those tokens as plain input, minus the premium paid to write the cache (negative when
    writes were never read back). ``batch_saving_usd`` is the synchronous price of the same usage
    minus the price paid. Both savings are at the price actually paid (batch or synchronous).
    """

    model_config = ConfigDict(frozen=True)

    input_tokens: int = 0
    output_tokens: int = 0
    cache_write_tokens: int = 0
    cache_read_tokens: int = 0
    input_usd: float = 0.0
    output_usd: float = 0.0
    cache_write_usd: float = 0.0
    cache_read_usd: float = 0.0
    cache_saving_usd: float = 0.0
    batch_saving_usd: float = 0.0

    @property
    def total_usd(self) -> float:
        return self.input_usd + self.output_usd + self.cache_write_usd + self.cache_read_usd

    def table_rows(self) -> list[tuple[str, int | None, float]]:
        """``(label, tokens, usd)`` rows in the order every display shows them (report, Batches
        page): what was paid per kind of token, then the two savings (no token count)."""
        return [
            ("input", self.input_tokens, self.input_usd),
            ("output", self.output_tokens, self.output_usd),
            ("cache writes", self.cache_write_tokens, self.cache_write_usd),
            ("cache reads", self.cache_read_tokens, self.cache_read_usd),
            ("saved by caching", None, self.cache_saving_usd),
            ("saved by batching", None, self.batch_saving_usd),
        ]

    def __add__(self, other: CostBreakdown) -> CostBreakdown:
        return CostBreakdown(
            **{name: getattr(self, name) + getattr(other, name) for name in CostBreakdown.model_fields}
        )


def _usage_int(usage: Mapping[str, Any], key: str) -> int:
    value = usage.get(key)
    return int(value) if value else 0


@dataclass(frozen=True)
class PriceTable:
    """Prices per model plus the batch discount, with the date they were taken."""

    models: Mapping[str, ModelPrice]
    as_of: str = PRICE_TABLE_AS_OF
    batch_discount: Decimal = field(default_factory=lambda: Decimal(BATCH_DISCOUNT))

    def price(self, model: str) -> ModelPrice:
        """Price of ``model``; a dated id such as ``claude-x-20261001`` falls back to ``claude-x``."""
        if model in self.models:
            return self.models[model]
        candidates = [name for name in self.models if model.startswith(name + "-")]
        if candidates:
            return self.models[max(candidates, key=len)]
        raise UnknownModelError(
            f"no price for model {model!r} in the price table (as of {self.as_of}); add it with the "
            f"Airflow Variable {PRICES_VARIABLE!r} or env {PRICES_ENV}, e.g. "
            f'{{"models": {{"{model}": {{"input": 3, "output": 15}}}}}} (USD per million tokens)'
        )

    def cost_decimal(
        self, model: str, usage: Mapping[str, Any], *, batch: bool, cache_ttl: str = "5m"
    ) -> Decimal:
        """Exact cost in USD of one response's ``usage`` block."""
        if cache_ttl not in ("5m", "1h"):
            raise ValueError(f"cache_ttl must be '5m' or '1h', not {cache_ttl!r}")
        p = self.price(model)
        cache_creation = usage.get("cache_creation")
        write_total = _usage_int(usage, "cache_creation_input_tokens")
        if isinstance(cache_creation, Mapping) and (
            cache_creation.get("ephemeral_5m_input_tokens") or cache_creation.get("ephemeral_1h_input_tokens")
        ):
            # The response says which TTL each written token used: trust it over the request's TTL.
            w5 = _usage_int(cache_creation, "ephemeral_5m_input_tokens")
            w1 = _usage_int(cache_creation, "ephemeral_1h_input_tokens")
        elif cache_ttl == "1h":
            w5, w1 = 0, write_total
        else:
            w5, w1 = write_total, 0
        total = (
            _usage_int(usage, "input_tokens") * p.input
            + _usage_int(usage, "output_tokens") * p.output
            + w5 * p.cache_write_5m
            + w1 * p.cache_write_1h
            + _usage_int(usage, "cache_read_input_tokens") * p.cache_read
        ) / _PER_TOKEN
        return total * self.batch_discount if batch else total

    def breakdown(
        self, model: str, usage: Mapping[str, Any], *, batch: bool, cache_ttl: str = "5m"
    ) -> CostBreakdown:
        """The :class:`CostBreakdown` of a usage block (one response's, or token totals of a run:
        ``input_tokens``, ``output_tokens``, ``cache_creation_input_tokens``,
        ``cache_read_input_tokens``; ``cache_ttl`` prices the writes)."""
        if cache_ttl not in ("5m", "1h"):
            raise ValueError(f"cache_ttl must be '5m' or '1h', not {cache_ttl!r}")
        p = self.price(model)
        paid = self.batch_discount if batch else Decimal(1)
        n_in = _usage_int(usage, "input_tokens")
        n_out = _usage_int(usage, "output_tokens")
        n_write = _usage_int(usage, "cache_creation_input_tokens")
        n_read = _usage_int(usage, "cache_read_input_tokens")
        write_price = p.cache_write_1h if cache_ttl == "1h" else p.cache_write_5m

        def usd(tokens: int, price: Decimal) -> float:
            return float(tokens * price * paid / _PER_TOKEN)

        parts = CostBreakdown(
            input_tokens=n_in,
            output_tokens=n_out,
            cache_write_tokens=n_write,
            cache_read_tokens=n_read,
            input_usd=usd(n_in, p.input),
            output_usd=usd(n_out, p.output),
            cache_write_usd=usd(n_write, write_price),
            cache_read_usd=usd(n_read, p.cache_read),
            cache_saving_usd=usd(n_read, p.input - p.cache_read) - usd(n_write, write_price - p.input),
        )
        return parts.model_copy(
            update={"batch_saving_usd": parts.total_usd / float(paid) - parts.total_usd if batch else 0.0}
        )

    def cost(self, model: str, usage: Mapping[str, Any], *, batch: bool, cache_ttl: str = "5m") -> float:
        """Cost in USD of one response's ``usage`` block, batch or synchronous price."""
        return float(self.cost_decimal(model, usage, batch=batch, cache_ttl=cache_ttl))

    def rates(self, model: str) -> tuple[float, float, float, float, float]:
        """Synchronous USD *per token* as floats: (input, output, write 5m, write 1h, read).

        For hot loops (one result line each); ``cost_decimal`` is the exact reference.
        """
        p = self.price(model)
        return tuple(  # type: ignore[return-value]
            float(v / _PER_TOKEN)
            for v in (p.input, p.output, p.cache_write_5m, p.cache_write_1h, p.cache_read)
        )

    def overlay(self, data: Mapping[str, Any]) -> PriceTable:
        """A new table with ``data`` (the override shape, see the module docstring) applied."""
        if not isinstance(data, Mapping):
            raise ValueError(f"price override must be a JSON object, got {type(data).__name__}")
        models_data = (
            data.get("models")
            if "models" in data
            else {k: v for k, v in data.items() if k not in ("as_of", "batch_discount")}
        )
        if not isinstance(models_data, Mapping):
            raise ValueError("price override 'models' must be an object of model -> prices")
        models = dict(self.models)
        for name, entry in models_data.items():
            if not isinstance(entry, Mapping):
                raise ValueError(f"price override for {name!r} must be an object, got {entry!r}")
            models[name] = ModelPrice.from_mapping(entry, base=models.get(name))
        return PriceTable(
            models=models,
            as_of=str(data.get("as_of", self.as_of)),
            batch_discount=Decimal(str(data["batch_discount"]))
            if data.get("batch_discount") is not None
            else self.batch_discount,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "as_of": self.as_of,
            "batch_discount": float(self.batch_discount),
            "models": {name: p.to_dict() for name, p in self.models.items()},
        }


def builtin_price_table() -> PriceTable:
    """The dated list prices shipped with this library, without overrides."""
    return PriceTable(
        models={
            name: ModelPrice.from_mapping({"input": inp, "output": out})
            for name, (inp, out) in _LIST_PRICES.items()
        }
    )


def json_overrides(variable: str, env: str) -> list[tuple[str, Any]]:
    """``(source, data)`` of a table's overrides, in the order they apply: Airflow Variable
    ``variable`` (JSON), then env ``env`` (JSON text or a path to a JSON file); unset ones are
    left out. Shared by the price table and the cache minimums (``caching.py``)."""
    found: list[tuple[str, Any]] = []
    try:
        from airflow.sdk import Variable

        data = Variable.get(variable, default=None, deserialize_json=True)
    except Exception as exc:  # no Airflow context or DB: the built-in table still works
        log.debug("Variable %s not readable: %s", variable, exc)
        data = None
    if data is not None:
        found.append((f"Variable {variable}", data))
    raw = os.environ.get(env, "").strip()
    if raw:
        if not raw.startswith("{"):
            path = Path(raw)
            if not path.is_file():
                raise ValueError(f"{env} is neither JSON text nor an existing file: {raw!r}")
            raw = path.read_text(encoding="utf-8")
        try:
            found.append((env, json.loads(raw)))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{env} is not valid JSON: {exc}") from exc
    return found


def load_price_table() -> PriceTable:
    """The built-in table, overlaid by the price Variable, then by env ``ANTHROPIC_BATCH_PRICES``."""
    table = builtin_price_table()
    for source, data in json_overrides(PRICES_VARIABLE, PRICES_ENV):
        try:
            table = table.overlay(data)
        except (ValueError, ArithmeticError) as exc:
            raise ValueError(f"bad price override in {source}: {exc}") from exc
    return table
