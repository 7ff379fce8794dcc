"""The floors ``bench_pipeline`` measures its tasks against, each run in a fresh process.

- ``pyarrow``: read the input and write the same output Parquet with pyarrow alone (the issue's floor).
- ``per_record``: that, plus the per-record work no implementation of the pipeline can skip, in
  plain Python with no code of ours: render each record's prompt with Jinja (the pipeline's
  template), JSON-encode its request line (the same params: model, max_tokens, output schema,
  the prompt), write the lines, and JSON-decode one line per record back (standing in for parsing
  its answer, which collect must do). It leaves out everything else the tasks do: HTTP, the
  emulator, validation of every answer, pricing, ledgers, retries, start-up of a task process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def pyarrow_floor(args: dict[str, Any]) -> dict[str, Any]:
    """Read the input and write the same output Parquet, with pyarrow alone."""
    import pyarrow.parquet as pq

    table = pq.read_table(args["input"])
    rows = table.num_rows
    del table
    source = pq.ParquetFile(args["output"])
    with pq.ParquetWriter(args["copy"], source.schema_arrow) as writer:
        for batch in source.iter_batches(batch_size=65_536):
            writer.write_batch(batch)
    return {"rows": rows}


def per_record_floor(args: dict[str, Any]) -> dict[str, Any]:
    """``pyarrow_floor`` plus render + JSON-encode every request and JSON-decode a line per record."""
    import jinja2
    import pyarrow.parquet as pq

    out = pyarrow_floor(args)
    template = jinja2.Environment(keep_trailing_newline=True, autoescape=False).from_string(
        Path(args["template"]).read_text(encoding="utf-8")
    )
    base = json.loads(Path(args["base_params"]).read_text(encoding="utf-8"))
    n = 0
    lines_path = Path(args["copy"]).with_suffix(".jsonl")
    with lines_path.open("w", encoding="utf-8") as lines:
        for batch in pq.ParquetFile(args["input"]).iter_batches(batch_size=10_000):
            for record in batch.to_pylist():
                prompt = template.render(**record)
                params = {**base, "messages": [{"role": "user", "content": prompt}]}
                lines.write(json.dumps({"custom_id": record["ticket_id"], "params": params}) + "\n")
                n += 1
    with lines_path.open("rb") as lines:
        for line in lines:
            json.loads(line)
    lines_path.unlink()
    return {**out, "records": n}
