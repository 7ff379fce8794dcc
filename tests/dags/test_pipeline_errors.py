"""One invalid pipeline file is that file's import error only; every other pipeline still loads.

Airflow's dag-processor marks every DAG of a file that has an import error stale (it stops being
scheduled), so the proof goes through the same path: the DAG folder is parsed with a ``DagBag`` and
the result written to the metadata DB with ``sync_bag_to_db`` (what the dag-processor does), in a
fresh interpreter that reads the pipeline files from a test directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import yaml

from anthropic_batch.pipeline_config import PIPELINES_DIR
from tests.dags.conftest import DAGS_DIR, REPO_ROOT

BUNDLE = "pipeline-errors-test"

PARSE_AND_SYNC = f"""
    import json
    from pathlib import Path
    from sqlalchemy import delete, select
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db
    from airflow.models.dag import DagModel
    from airflow.models.dagbundle import DagBundleModel
    from airflow.models.errors import ParseImportError
    from airflow.utils.session import create_session

    with create_session() as session:
        if session.get(DagBundleModel, {BUNDLE!r}) is None:
            session.add(DagBundleModel(name={BUNDLE!r}))
        session.execute(delete(ParseImportError).where(ParseImportError.bundle_name == {BUNDLE!r}))
    folder = Path({str(DAGS_DIR)!r})
    bag = BundleDagBag(dag_folder=folder, bundle_path=folder, bundle_name={BUNDLE!r})
    sync_bag_to_db(bag, {BUNDLE!r}, None)
    with create_session() as session:
        models = session.scalars(select(DagModel).where(DagModel.bundle_name == {BUNDLE!r}))
        dags = {{m.dag_id: {{"stale": m.is_stale, "import_errors": m.has_import_errors,
                             "file": m.relative_fileloc}} for m in models}}
        errors = {{e.filename: e.stacktrace for e in session.scalars(
            select(ParseImportError).where(ParseImportError.bundle_name == {BUNDLE!r}))}}
    print(json.dumps({{"bag_dags": sorted(bag.dag_ids), "bag_errors": bag.import_errors,
                       "dags": dags, "errors": errors}}))
"""


def _parse_and_sync(pipelines_dir) -> dict:
    env = {
        **os.environ,
        "ANTHROPIC_BATCH_PIPELINES_DIR": str(pipelines_dir),
        "PYTHONPATH": os.pathsep.join(str(REPO_ROOT / p) for p in ("plugins", "include", ".")),
    }
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PARSE_AND_SYNC)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _pipelines_with(tmp_path, bad: dict[str, dict]):
    directory = tmp_path / "pipelines"
    shutil.copytree(PIPELINES_DIR, directory)
    for name, changes in bad.items():
        raw = yaml.safe_load((PIPELINES_DIR / "bulk_extraction.yaml").read_text())
        (directory / f"{name}.yaml").write_text(yaml.safe_dump({**raw, "name": name, **changes}))
    return directory


def test_one_bad_pipeline_file_is_its_own_import_error_and_the_others_still_run(tmp_path, airflow_db):
    pipelines = _pipelines_with(tmp_path, {"broken_pipeline": {"max_tokens": -5}})
    result = _parse_and_sync(pipelines)

    # Every valid pipeline (and the report) is a live DAG: parsed, not stale, no import error.
    assert {"bulk_extraction", "weekly_code_audit", "overnight_report"} <= set(result["bag_dags"])
    for dag_id in ("bulk_extraction", "weekly_code_audit", "overnight_report"):
        assert result["dags"][dag_id] == {
            "stale": False,
            "import_errors": False,
            "file": result["dags"][dag_id]["file"],
        }
    assert "broken_pipeline" not in result["bag_dags"]
    # The bad file is reported once, in the UI's import errors, naming the file and the field.
    assert list(result["errors"]) == ["pipeline_errors.py"]
    message = result["errors"]["pipeline_errors.py"]
    assert "broken_pipeline.yaml" in message and "max_tokens" in message
    # ... in a file that holds none of the good DAGs (which would make them stale).
    assert "pipeline_errors.py" not in {d["file"] for d in result["dags"].values()}


def test_all_pipelines_valid_means_no_import_error(tmp_path, airflow_db):
    result = _parse_and_sync(_pipelines_with(tmp_path, {}))
    assert result["errors"] == {} and result["bag_errors"] == {}
