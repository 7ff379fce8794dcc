"""Engine-level checks that would need wall-clock waits through HTTP: partial cancel, plans, --help."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import batches_emulator
from batches_emulator.config import build_parser, parse_settings
from batches_emulator.engine import Engine
from batches_emulator.testing import INCLUDE_DIR
from tests.emulator.conftest import wait_until


def make_engine(tmp_path, *flags):
    return Engine(parse_settings(["--db", str(tmp_path / "e.sqlite"), *flags]))


def body(n):
    params = {"model": "claude-haiku-4-5", "max_tokens": 50, "messages": [{"role": "user", "content": "x"}]}
    return json.dumps({"requests": [{"custom_id": f"c{i}", "params": params} for i in range(n)]}).encode()


def test_cancel_halfway_cancels_only_unfinished_requests(tmp_path):
    engine = make_engine(tmp_path, "--processing-seconds", "100")
    view = engine.create_batch(body(60), 60, "2026-10-21")
    # Move the batch 200 s into the past, canceled 50 s after creation.
    engine.db.execute(
        "UPDATE batches SET created_at=created_at-200, natural_end=natural_end-200,"
        " cancel_initiated_at=created_at-150 WHERE id=?",
        (view["id"],),
    )
    ended = engine.retrieve(view["id"], "http://x")
    counts = ended["request_counts"]
    assert ended["processing_status"] == "ended"
    assert counts["succeeded"] > 0 and counts["canceled"] > 0
    assert counts["succeeded"] + counts["canceled"] == 60
    lines = b"".join(engine.result_parts(view["id"])).decode().splitlines()
    kinds = [json.loads(line)["result"]["type"] for line in lines]
    assert kinds.count("canceled") == counts["canceled"]


def test_plans_are_reproducible_per_seed_and_batch(tmp_path):
    a = make_engine(tmp_path / "a", "--seed", "5", "--error-rate", "api_error=0.5")
    b = make_engine(tmp_path / "b", "--seed", "5", "--error-rate", "api_error=0.5")
    assert list(a.plans(1, 100)) == list(b.plans(1, 100))
    # A resubmitted request (a later batch) gets a fresh draw, so it can succeed next time.
    assert list(a.plans(1, 100)) != list(a.plans(2, 100))


def test_help_and_docstring_document_every_flag():
    done = subprocess.run(
        [sys.executable, "-m", "batches_emulator", "--help"],
        cwd=INCLUDE_DIR,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0
    flags = [
        opt
        for action in build_parser()._actions
        for opt in action.option_strings
        if opt not in ("-h", "--help")
    ]
    assert len(flags) > 20
    for flag in flags:
        assert flag in done.stdout, flag
        assert flag in batches_emulator.__doc__, flag


def test_stuck_requests_of_a_canceled_batch_are_canceled_not_expired(tmp_path):
    engine = make_engine(tmp_path, "--processing-seconds", "1", "--expired-rate", "1.0")
    view = engine.create_batch(body(5), 5, "2026-10-21")
    canceled = engine.cancel(view["id"], "http://x")
    assert canceled["processing_status"] == "canceling"
    engine.db.execute(
        "UPDATE batches SET created_at=created_at-100, natural_end=natural_end-100,"
        " cancel_initiated_at=cancel_initiated_at-99 WHERE id=?",
        (view["id"],),
    )
    ended = engine.retrieve(view["id"], "http://x")
    assert ended["request_counts"]["canceled"] == 5


def test_emulator_exits_when_its_parent_dies(tmp_path):
    import os
    import signal

    script = (
        "import sys, time; sys.path.insert(0, {!r})\n"
        "from batches_emulator.testing import EmulatorProcess\n"
        "emu = EmulatorProcess(db_path={!r}).start()\n"
        "print(emu.pid, flush=True)\n"
        "time.sleep(120)\n"
    ).format(str(INCLUDE_DIR), str(tmp_path / "orphan.sqlite"))
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait(timeout=10)

    def child_gone():
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            return True
        # A zombie still answers kill(0); it is gone once its state is Z.
        with open(f"/proc/{child_pid}/stat") as stat:
            return stat.read().split()[2] == "Z"

    try:
        assert wait_until(child_gone, timeout=15, what="orphaned emulator to exit")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child_pid, signal.SIGKILL)
    parent.stdout.close()


def test_create_answers_in_progress_even_with_zero_processing_time(tmp_path):
    engine = make_engine(tmp_path, "--processing-seconds", "0")
    view = engine.create_batch(body(2), 2, "2023-06-01")
    assert view["processing_status"] == "in_progress" and view["results_url"] is None
    ended = wait_until(
        lambda: (v := engine.retrieve(view["id"], "http://h"))["processing_status"] == "ended" and v
    )
    assert ended["request_counts"]["succeeded"] == 2
    assert ended["results_url"] == f"http://h/v1/messages/batches/{view['id']}/results"


def test_a_large_batch_is_finalised_in_the_background_and_survives_restarts(tmp_path, monkeypatch):
    import batches_emulator.engine as engine_module

    monkeypatch.setattr(engine_module, "INLINE_FINALIZE_MAX_REQUESTS", 10)
    engine = make_engine(tmp_path, "--processing-seconds", "0")
    view = engine.create_batch(body(50), 50, "2026-10-21")
    ended = wait_until(
        lambda: (v := engine.retrieve(view["id"], "http://h"))["processing_status"] == "ended" and v
    )
    assert ended["request_counts"]["succeeded"] == 50
    # ended_at is when the batch ended, not when the background thread stored its results.
    assert ended["ended_at"] <= engine_module.rfc3339(engine.now())
    lines = b"".join(engine.result_parts(view["id"]))
    engine.close()

    again = make_engine(tmp_path)
    assert again.retrieve(view["id"], "http://h")["request_counts"] == ended["request_counts"]
    assert b"".join(again.result_parts(view["id"])) == lines
    again.close()


def test_a_restart_before_the_background_finalisation_finalises_again(tmp_path, monkeypatch):
    import batches_emulator.engine as engine_module

    monkeypatch.setattr(engine_module, "INLINE_FINALIZE_MAX_REQUESTS", 10)
    first = make_engine(tmp_path, "--processing-seconds", "0")
    view = first.create_batch(body(30), 30, "2026-10-21")
    # Closed before anyone looked at the ended batch: nothing was finalised.
    first.close()
    second = make_engine(tmp_path, "--processing-seconds", "0")
    ended = wait_until(
        lambda: (v := second.retrieve(view["id"], "http://h"))["processing_status"] == "ended" and v
    )
    assert ended["request_counts"]["succeeded"] == 30
    assert len(b"".join(second.result_parts(view["id"])).splitlines()) == 30
    second.close()


def test_requests_are_decoded_one_at_a_time_from_any_json_layout():
    from batches_emulator.engine import decode_requests

    doc = {
        "x": [1, {"a": "}"}],
        "requests": [{"custom_id": "a", "params": {"m": [1, 2]}}, {"custom_id": "b]"}],
    }
    for text in (json.dumps(doc), json.dumps(doc, indent=2), json.dumps(doc, separators=(",", ":"))):
        assert decode_requests(text) == doc["requests"]
    assert decode_requests(' { "requests" : [ ] } ') == []
