"""Shared test set-up.

Airflow reads its configuration at import time, so the environment is fixed here, before any test
module imports airflow: a throw-away AIRFLOW_HOME inside the checkout (git-ignored), this
checkout's dags and plugins folders, no examples.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("AIRFLOW_HOME", str(REPO_ROOT / ".airflow" / "pytest"))
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO_ROOT / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(REPO_ROOT / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
# A test-only JWT signing secret of proper length: Airflow otherwise generates a short one per
# process, and PyJWT warns on every token the UI tests issue.
os.environ.setdefault("AIRFLOW__API_AUTH__JWT_SECRET", "pytest-only-jwt-secret-" + "0" * 48)
Path(os.environ["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)

# The emulator and S3 (moto) fixtures live with their owners; loaded here for every test package.
pytest_plugins = ["tests.fixtures.emulator", "tests.fixtures.s3"]
