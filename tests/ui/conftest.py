"""Fixtures for the Batches UI: a migrated metadata DB (token revocation lives there), Airflow's auth
manager, tokens it issues, a seeded storage root and a TestClient mounted like the api-server does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """``airflow db migrate`` on the test AIRFLOW_HOME (idempotent, a few seconds)."""
    proc = subprocess.run(
        [str(VENV_BIN / "airflow"), "db", "migrate"],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.fixture(scope="session")
def auth_manager(airflow_db):
    from airflow.api_fastapi.app import init_auth_manager

    return init_auth_manager()


@pytest.fixture(scope="session")
def make_token(auth_manager):
    """``make_token(role)``: a JWT signed by Airflow's own token code for a simple-auth-manager user."""
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    def make(role: str | None = "admin", username: str = "admin", **kwargs) -> str:
        return auth_manager.generate_jwt(SimpleAuthManagerUser(username=username, role=role), **kwargs)

    return make


@pytest.fixture
def seeded_root(tmp_path):
    from tests.ui.seed import seed

    root = tmp_path / "storage"
    root.mkdir()
    facts = seed(str(root))
    return root, facts


@pytest.fixture
def client(seeded_root, auth_manager):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from anthropic_batch.ui.app import create_app

    root, _ = seeded_root
    outer = FastAPI()
    outer.mount("/anthropic-batches", create_app(storage_root=str(root)))
    with TestClient(outer) as tc:
        yield tc
