"""500 BatchPollTriggers in one event loop (as in a triggerer) against the emulator: CPU per poll.

Creates N small batches, runs one trigger per batch concurrently until every trigger has yielded its
single event, and reports the event-loop process's CPU time per poll and per trigger, next to the
wall time. The emulator runs in its own process, so its CPU is not counted.
Run: ``python -m benchmarks bench_trigger`` (env BENCH_TRIGGERS to change N).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO / "plugins", REPO / "include", REPO):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

N_TRIGGERS = int(os.environ.get("BENCH_TRIGGERS", "500"))
PROCESSING_SECONDS = float(os.environ.get("BENCH_TRIGGER_PROCESSING_SECONDS", "30"))


class _CountingBatches:
    """Wraps ``client.messages.batches`` to count retrieve calls (one per poll).

    Also notes the process CPU time when the N-th poll completes: everything before is start-up
    (client construction, first poll of every trigger), everything after is steady-state polling.
    """

    def __init__(self, inner: Any, counter: list[float]) -> None:
        self._inner, self._counter = inner, counter

    async def retrieve(self, *args: Any, **kwargs: Any) -> Any:
        result = await self._inner.retrieve(*args, **kwargs)
        self._counter[0] += 1
        if self._counter[0] == N_TRIGGERS:
            self._counter[1] = time.process_time()
        return result


class _CountingClient:
    def __init__(self, client: Any, counter: list[int]) -> None:
        self.messages = type("M", (), {"batches": _CountingBatches(client.messages.batches, counter)})()


def main() -> None:
    import logging

    from anthropic_batch.batch_requests import write_chunk
    from anthropic_batch.hooks import AnthropicBatchHook
    from anthropic_batch.triggers import BatchPollTrigger
    from batches_emulator.testing import EmulatorProcess

    polls: list[float] = [0, 0.0]

    class CountingTrigger(BatchPollTrigger):
        async def _poll(self, client: Any) -> Any:
            return await super()._poll(_CountingClient(client, polls))

    import tempfile

    with (
        tempfile.TemporaryDirectory(prefix="bench-trigger-") as tmp,
        EmulatorProcess("--processing-seconds", str(PROCESSING_SECONDS)) as emu,
    ):
        os.environ["AIRFLOW_CONN_BENCH_TRIGGER"] = json.dumps(
            {"conn_type": "anthropic", "password": emu.api_key, "host": emu.base_url}
        )
        chunk = Path(tmp) / "requests" / "chunk-00000.jsonl"
        chunk.parent.mkdir(parents=True)
        line = json.dumps(
            {
                "custom_id": "a",
                "params": {
                    "model": "claude-haiku-4-5",
                    "max_tokens": 16,
                    "messages": [{"role": "user", "content": "hi"}],
                },
            }
        ).encode()
        info = write_chunk([line], str(chunk), 0)
        # The triggerer logs each poll at INFO; keep that cost in, but not the console output.
        logging.getLogger("airflow").setLevel(logging.WARNING)
        logging.getLogger("httpx2").setLevel(logging.WARNING)
        hook = AnthropicBatchHook("bench_trigger")
        t0 = time.perf_counter()
        batch_ids = [hook.create_batch_from_chunk(info["path"]).id for _ in range(N_TRIGGERS)]
        print(f"created {N_TRIGGERS} batches in {time.perf_counter() - t0:.1f}s")

        deadline = time.time() + 600
        triggers = [
            CountingTrigger(
                batch_id=b,
                conn_id="bench_trigger",
                deadline=deadline,
                poll_interval=1.0,
                max_poll_interval=4.0,
                max_transient_seconds=600,
            )
            for b in batch_ids
        ]

        async def one(trigger: BatchPollTrigger) -> str:
            async for event in trigger.run():
                return event.payload["status"]
            return "none"

        async def all_triggers() -> list[str]:
            return await asyncio.gather(*(one(t) for t in triggers))

        cpu0, wall0 = time.process_time(), time.perf_counter()
        # The per-poll INFO log lines are formatted and written (their cost is real), to /dev/null.
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            statuses = asyncio.run(all_triggers())
        cpu_end = time.process_time()
        cpu, wall = cpu_end - cpu0, time.perf_counter() - wall0
        startup_cpu = polls[1] - cpu0
    n_polls = int(polls[0])
    ended = statuses.count("ended")
    steady_polls = n_polls - N_TRIGGERS
    steady_cpu = cpu_end - polls[1]
    print(f"{N_TRIGGERS} triggers, {ended} ended, {n_polls} polls in {wall:.1f}s wall")
    print(
        f"event-loop CPU: {cpu:.2f}s total = {cpu / wall:.0%} of one core; "
        f"{1000 * cpu / max(n_polls, 1):.2f} ms per poll overall"
    )
    print(
        f"  start-up (clients + first poll of all {N_TRIGGERS}): {startup_cpu:.2f}s "
        f"= {1000 * startup_cpu / N_TRIGGERS:.2f} ms per trigger"
    )
    if steady_polls > 0:
        per_poll = steady_cpu / steady_polls
        print(
            f"  steady state: {steady_polls} polls, {1000 * per_poll:.2f} ms CPU per poll; "
            f"one poll cycle of all {N_TRIGGERS} triggers costs {N_TRIGGERS * per_poll:.2f}s CPU"
        )


if __name__ == "__main__":
    main()
