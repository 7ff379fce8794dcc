"""The pipeline's operators, one module each: prepare, sample_refine, submit, collect, resubmit, publish.

Names are resolved lazily (PEP 562), so ``from anthropic_batch.operators import CollectResultsOperator``
imports only the module it needs; a DAG file pays for what it uses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_MODULE_OF = {
    "PrepareRequestsOperator": "prepare",
    "SampleRefineOperator": "sample_refine",
    "SubmitBatchOperator": "submit",
    "CollectResultsOperator": "collect",
    "ResubmitFailuresOperator": "resubmit",
    "PublishPartitionOperator": "publish",
}

__all__ = [
    "CollectResultsOperator",
    "PrepareRequestsOperator",
    "PublishPartitionOperator",
    "ResubmitFailuresOperator",
    "SampleRefineOperator",
    "SubmitBatchOperator",
]

if TYPE_CHECKING:
    from anthropic_batch.operators.collect import CollectResultsOperator
    from anthropic_batch.operators.prepare import PrepareRequestsOperator
    from anthropic_batch.operators.publish import PublishPartitionOperator
    from anthropic_batch.operators.resubmit import ResubmitFailuresOperator
    from anthropic_batch.operators.sample_refine import SampleRefineOperator
    from anthropic_batch.operators.submit import SubmitBatchOperator


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
