"""Every DAG file imports cleanly, fast, without heavy libraries, and every DAG is documented."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.dags.conftest import DAGS_DIR, REPO_ROOT

DAG_FILES = sorted(p for p in DAGS_DIR.glob("*.py") if not p.name.startswith("_"))
EXPECTED_DAGS = {"bulk_extraction", "weekly_code_audit", "overnight_report", "weekly_code_audit_report"}
HEAVY_MODULES = ("pandas", "pyarrow", "anthropic")
PARSE_SECONDS_LIMIT = 1.0
# Every module a DAG file can import while it is parsed: each must stay free of heavy imports, so a
# new module-level import anywhere in this chain fails here (not only through the DAG files above).
PARSE_TIME_MODULES = (
    "anthropic_batch.dag_factory",
    "anthropic_batch.pipeline_config",
    "anthropic_batch.status",
    "anthropic_batch.storage",
    "anthropic_batch.layout",
    "anthropic_batch.batch_requests",
    "anthropic_batch.ledger",
    "anthropic_batch.links",
    "anthropic_batch.sensors",
    "anthropic_batch.triggers",
    "anthropic_batch.operators.prepare",
    "anthropic_batch.operators.sample_refine",
    "anthropic_batch.operators.submit",
    "anthropic_batch.operators.collect",
    "anthropic_batch.operators.resubmit",
    "anthropic_batch.operators.publish",
)


def _run_python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter with the same sys.path as Airflow components; return its JSON."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(REPO_ROOT / p) for p in ("plugins", "include", ".")),
    }
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS_DIR))


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}


def test_expected_dags_present(dagbag):
    assert set(dagbag.dag_ids) >= EXPECTED_DAGS


def test_every_dag_is_documented_tagged_and_owned(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags, f"{dag_id} has no tags"
        assert dag.doc_md and len(dag.doc_md) > 80, f"{dag_id} has no real doc_md"
        owners = {task.owner for task in dag.tasks}
        assert owners and "airflow" not in owners, f"{dag_id} tasks are owned by {owners}"


@pytest.mark.parametrize("dag_file", DAG_FILES, ids=lambda p: p.name)
def test_dag_file_parses_fast(dag_file: Path):
    # The dag-processor has Airflow loaded already; what counts is the file (and what it pulls in).
    result = _run_python(
        f"""
        import json, time
        import airflow.sdk
        from airflow.dag_processing.dagbag import DagBag
        started = time.perf_counter()
        bag = DagBag(dag_folder={str(dag_file)!r})
        print(json.dumps({{"seconds": time.perf_counter() - started, "errors": list(bag.import_errors),
                           "dags": len(bag.dags)}}))
        """
    )
    # pipeline_errors.py defines no DAG: it only reports invalid pipeline files (as its import error).
    assert result["errors"] == [] and result["dags"] >= (0 if dag_file.name == "pipeline_errors.py" else 1)
    assert result["seconds"] < PARSE_SECONDS_LIMIT, f"{dag_file.name} took {result['seconds']:.2f}s to parse"


@pytest.mark.parametrize("dag_file", DAG_FILES, ids=lambda p: p.name)
def test_dag_file_imports_no_heavy_modules(dag_file: Path):
    result = _run_python(
        f"""
        import importlib.util, json, sys
        import airflow.sdk
        before = {{m for m in {HEAVY_MODULES!r} if m in sys.modules}}
        spec = importlib.util.spec_from_file_location("dag_under_test", {str(dag_file)!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        after = {{m for m in {HEAVY_MODULES!r} if m in sys.modules}}
        print(json.dumps({{"before": sorted(before), "after": sorted(after)}}))
        """
    )
    assert result["before"] == [], "airflow.sdk itself imports a heavy module; the check would be void"
    assert result["after"] == [], f"{dag_file.name} imports {result['after']} at parse time"


def test_parse_time_modules_import_no_heavy_modules():
    # One fresh interpreter per module, so one module's imports cannot hide another's.
    code = """
        import importlib, json, sys
        import airflow.sdk
        importlib.import_module({module!r})
        print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
        """
    loaded = {
        module: _run_python(code.format(module=module, heavy=HEAVY_MODULES)) for module in PARSE_TIME_MODULES
    }
    assert {module: heavy for module, heavy in loaded.items() if heavy} == {}


def test_trigger_classpath_imports_in_a_fresh_interpreter():
    # The triggerer imports the trigger by its classpath alone; the hook is loaded when it runs.
    result = _run_python(
        """
        import importlib, json
        from anthropic_batch.triggers import CLASSPATH, BatchPollTrigger
        module, name = CLASSPATH.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        path, kwargs = cls(batch_id="msgbatch_x").serialize()
        print(json.dumps({"same": cls is BatchPollTrigger, "path": path, "conn_id": kwargs["conn_id"]}))
        """
    )
    assert result == {
        "same": True,
        "path": "anthropic_batch.triggers.BatchPollTrigger",
        "conn_id": "anthropic_default",
    }


def test_default_conn_id_is_the_hooks():
    # Operator signatures use status.DEFAULT_CONN_ID so they need not import the hook at parse time.
    from anthropic_batch.hooks import AnthropicBatchHook
    from anthropic_batch.status import DEFAULT_CONN_ID

    assert AnthropicBatchHook.default_conn_name == DEFAULT_CONN_ID
