"""Fixtures for DAG tests: a migrated metadata DB in the test AIRFLOW_HOME (set by tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DAGS_DIR = REPO_ROOT / "dags"


@pytest.fixture(scope="session")
def airflow_db() -> str:
    """``airflow db migrate`` once per session (idempotent; SQLite in AIRFLOW_HOME)."""
    airflow = Path(sys.executable).parent / "airflow"
    proc = subprocess.run([str(airflow), "db", "migrate"], capture_output=True, text=True, env=os.environ)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return os.environ["AIRFLOW_HOME"]
