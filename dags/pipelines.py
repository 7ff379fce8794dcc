"""Airflow DAGs: one per declared pipeline in include/pipelines/*.yaml (see anthropic_batch.dag_factory).

Adding a pipeline is adding a YAML file; this file stays as it is. An invalid YAML file fails the
import here with a message naming the file and the field.
"""

from __future__ import annotations

from anthropic_batch.dag_factory import build_all
from anthropic_batch.pipeline_config import load_pipelines

globals().update(build_all(load_pipelines()))
