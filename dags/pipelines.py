"""Airflow DAGs: one per declared pipeline in include/pipelines/*.yaml (see anthropic_batch.dag_factory).

Adding a pipeline is adding a YAML file; this file stays as it is. Only *valid* pipeline files become
DAGs here: an invalid one is reported, naming the file and the field, as the import error of
``dags/pipeline_errors.py``. Airflow marks every DAG of a file with an import error stale, so
raising here would take every pipeline down with the one bad file.
"""

from __future__ import annotations

from anthropic_batch.dag_factory import build_all
from anthropic_batch.pipeline_config import scan_pipelines

globals().update(build_all(scan_pipelines()[0]))
