"""CollectResultsOperator: an ended batch's results -> a RESULT Parquet file (``collection.collect_batch``).

The shared step lives in :mod:`anthropic_batch.collection` (the resubmit operator uses it too): it
writes ``work_dir/results/attempt-NN/<batch_id>.parquet`` with exactly one row per request of the
chunk and records the collected path, cost and state ``ended`` in the submission's ledger entry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from airflow.sdk import BaseOperator, Context

from anthropic_batch.collection import collect_batch
from anthropic_batch.contracts import BatchHandle
from anthropic_batch.status import DEFAULT_CONN_ID


class CollectResultsOperator(BaseOperator):
    """
    Collect an ended batch (or a sync run) into ``work_dir/results/attempt-NN/<batch_id>.parquet``.

    :param handle: the BatchHandle from the submit task (mapped 1:1 over chunks).
    :param work_dir: the run's work directory (templated).
    :param conn_id: the Anthropic connection.
    :returns: the results Parquet path.
    """

    template_fields: Sequence[str] = ("handle", "work_dir")
    ui_color = "#fdebd0"

    def __init__(
        self,
        *,
        handle: Mapping[str, Any] | Any,
        work_dir: str,
        conn_id: str = DEFAULT_CONN_ID,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.handle = handle
        self.work_dir = work_dir
        self.conn_id = conn_id

    def execute(self, context: Context) -> str:
        # the anthropic SDK: kept out of DAG parsing
        from anthropic_batch.hooks import AnthropicBatchHook

        # The boundary: the XCom value is validated once; collect_batch uses its attributes.
        handle = BatchHandle.model_validate(dict(self.handle))
        stats = collect_batch(AnthropicBatchHook(conn_id=self.conn_id), handle, self.work_dir)
        savings = stats["sync_cost_usd"] - stats["cost_usd"]
        self.log.info(
            "Collected %s %s (attempt %d): %d rows %s; %d duplicate, %d unknown, %d malformed lines. "
            "Cost $%.4f (sync price $%.4f, saved $%.4f). -> %s",
            stats["mode"],
            stats["batch_id"],
            stats["attempt"],
            stats["n_rows"],
            stats["counts_by_status"],
            stats["n_duplicates"],
            stats["n_unknown"],
            stats["n_malformed"],
            stats["cost_usd"],
            stats["sync_cost_usd"],
            savings,
            stats["results_path"],
        )
        return stats["results_path"]
