"""The import errors of the pipeline files (include/pipelines/*.yaml); this file defines no DAG.

``dags/pipelines.py`` builds a DAG for every valid pipeline file and skips invalid ones. This file
fails its import with every problem found (each names the pipeline file and the field), so a bad
file shows up in Airflow's import errors while the other pipelines keep running: the dag-processor
marks every DAG of a file with an import error stale, which is why the error lives in a file of its own.
"""

from __future__ import annotations

from anthropic_batch.pipeline_config import PipelineConfigError, scan_pipelines

_, problems = scan_pipelines()
if problems:
    raise PipelineConfigError("\n".join(problems))
