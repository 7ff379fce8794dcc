"""A real ``airflow standalone`` in a subprocess, for end-to-end tests and ``make airflow``.

``StandaloneAirflow`` migrates a private ``AIRFLOW_HOME``, starts ``airflow standalone`` (scheduler,
dag-processor, triggerer, api-server; LocalExecutor, SQLite) in its own process group with this
checkout's dags and plugins folders, waits until the api-server health endpoint reports every
component healthy, and then offers a small REST v2 client authenticated through the simple auth
manager (``POST /auth/token``). ``stop()`` ends the whole process group.

    with StandaloneAirflow(tmp_path / "airflow", port=28080) as af:
        af.wait_for_dag("bulk_extraction")
        run = af.api("POST", "/api/v2/dags/bulk_extraction/dagRuns", json={"logical_date": None})
        af.wait_for_dag_run("bulk_extraction", run["dag_run_id"], timeout=300)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

#: The components ``airflow standalone`` runs, as they appear in the command line (``airflow <name>``).
COMPONENTS = ("scheduler", "dag-processor", "triggerer", "api-server")
#: DagRun states after which a run never changes again on its own.
FINISHED_RUN_STATES = frozenset({"success", "failed"})


class StandaloneError(RuntimeError):
    """The standalone Airflow did not start, or a REST call failed."""


class StandaloneAirflow:
    """``airflow standalone`` as a context manager, with a REST v2 client.

    ``env`` entries override the computed environment (e.g. ``AIRFLOW_CONN_ANTHROPIC_DEFAULT``,
    ``ANTHROPIC_BATCH_STORAGE_ROOT``); a ``None`` value removes an inherited variable. The log of
    every component goes to ``<airflow_home>/standalone.log``.
    """

    def __init__(
        self,
        airflow_home: Path,
        *,
        port: int,
        env: Mapping[str, str | None] | None = None,
        dags_folder: Path | None = None,
        plugins_folder: Path | None = None,
        startup_timeout: float = 240.0,
    ) -> None:
        self.airflow_home = Path(airflow_home).resolve()
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.startup_timeout = startup_timeout
        self.dags_folder = Path(dags_folder or REPO_ROOT / "dags").resolve()
        self.plugins_folder = Path(plugins_folder or REPO_ROOT / "plugins").resolve()
        self.log_path = self.airflow_home / "standalone.log"
        self.env = self._build_env(env or {})
        self._process: subprocess.Popen[bytes] | None = None
        self._extra: list[subprocess.Popen[bytes]] = []
        self._log_file: Any = None
        self._token: str | None = None
        self._client = httpx.Client(base_url=self.base_url, timeout=30.0)

    # ------------------------------------------------------------------ lifecycle
    def _build_env(self, overrides: Mapping[str, str | None]) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
                "AIRFLOW_HOME": str(self.airflow_home),
                "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
                "AIRFLOW__CORE__PLUGINS_FOLDER": str(self.plugins_folder),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                # Runs created through the API or a backfill should execute without a manual unpause.
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(self.port),
                "AIRFLOW__API__BASE_URL": self.base_url,
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
                # Every component must sign and check task tokens with the same secret.
                "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
                # Find new DAG files quickly; the e2e tests should not wait minutes for a parse.
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "True",
                "PYTHONUNBUFFERED": "1",
            }
        )
        for key, value in overrides.items():
            if value is None:
                env.pop(key, None)  # e.g. drop an inherited AIRFLOW_CONN_* so the DB connection is used
            else:
                env[key] = value
        return env

    def __enter__(self) -> StandaloneAirflow:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def airflow_cli(
        self, *args: str, check: bool = True, timeout: float = 300.0
    ) -> subprocess.CompletedProcess:
        """Run ``airflow <args>`` with this instance's environment and return the completed process."""
        proc = subprocess.run(
            [str(VENV_BIN / "airflow"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise StandaloneError(
                f"`airflow {' '.join(args)}` exited {proc.returncode}:\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        return proc

    def create_backfill(self, dag_id: str, start: dt.date, end: dt.date) -> None:
        """``airflow backfill create``, retried while SQLite is locked by the running scheduler.

        The command runs in one transaction, so a locked attempt leaves nothing behind; any other
        failure is raised at once.
        """
        args = ("backfill", "create", "--dag-id", dag_id)
        args += ("--from-date", start.isoformat(), "--to-date", end.isoformat())
        outcome: dict[str, str] = {}

        def created() -> bool:
            proc = self.airflow_cli(*args, check=False)
            outcome["output"] = proc.stdout[-1500:] + proc.stderr[-1500:]
            if proc.returncode == 0:
                return True
            if "database is locked" not in outcome["output"]:
                raise StandaloneError(f"`airflow {' '.join(args)}` failed:\n{outcome['output']}")
            return False

        poll_until(
            created, timeout=120, interval=2.0, message=lambda: f"backfill create kept failing: {outcome}"
        )

    def start(self) -> None:
        """Migrate the database, start ``airflow standalone`` and wait until every component is healthy."""
        self.airflow_home.mkdir(parents=True, exist_ok=True)
        self.airflow_cli("db", "migrate", timeout=self.startup_timeout)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._process = subprocess.Popen(
            [str(VENV_BIN / "airflow"), "standalone"],
            env=self.env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop() reaches every component
        )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_until_ready(self) -> None:
        def ready() -> bool:
            if self._process is not None and self._process.poll() is not None:
                raise StandaloneError(
                    f"airflow standalone exited early; see {self.log_path}:\n{self.log_tail()}"
                )
            health = self.health()
            return (
                bool(health)
                and all(
                    (health.get(part) or {}).get("status") == "healthy"
                    for part in ("metadatabase", "scheduler", "triggerer", "dag_processor")
                )
                and self.password_file.exists()
            )

        poll_until(
            ready,
            timeout=self.startup_timeout,
            interval=1.0,
            message=lambda: f"airflow standalone not healthy in time; log tail:\n{self.log_tail()}",
        )

    def stop(self) -> None:
        """Terminate every process this instance started (the standalone group and extra components)."""
        procs = [p for p in [*self._extra, self._process] if p is not None]
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            _signal_group(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        # Grandchildren (task supervisors) may outlive their parents; end whatever is left in our groups.
        for proc in procs:
            _signal_group(proc, signal.SIGKILL)
        self._process = None
        self._extra = []
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self._client.close()

    def log_tail(self, n_chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return ""

    # ------------------------------------------------------------------ processes
    def pids_of(self, component: str) -> list[int]:
        """PIDs of the running processes for a component (``airflow <component>``), children included.

        Only processes of this instance are considered (same ``AIRFLOW_HOME`` in their environment, or
        a descendant of a process this instance started).
        """
        roots = [p.pid for p in [self._process, *self._extra] if p is not None]
        mine: set[int] = set()
        for pid in roots:
            try:
                root = psutil.Process(pid)
                mine.add(pid)
                mine.update(child.pid for child in root.children(recursive=True))
            except psutil.NoSuchProcess:
                continue
        found = []
        for pid in sorted(mine):
            try:
                cmdline = psutil.Process(pid).cmdline()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if _is_component(cmdline, component):
                found.append(pid)
        return found

    def kill_component(self, component: str, sig: int = signal.SIGKILL) -> list[int]:
        """Send ``sig`` to every process of ``component``; return the PIDs signalled."""
        pids = self.pids_of(component)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pids

    def start_component(self, component: str) -> subprocess.Popen[bytes]:
        """Start ``airflow <component>`` with this instance's environment (stopped by ``stop()``)."""
        if self._log_file is None:
            raise StandaloneError("start the standalone instance first")
        proc = subprocess.Popen(
            [str(VENV_BIN / "airflow"), component],
            env=self.env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._extra.append(proc)
        return proc

    # ------------------------------------------------------------------ REST
    @property
    def password_file(self) -> Path:
        return self.airflow_home / "simple_auth_manager_passwords.json.generated"

    @property
    def username(self) -> str:
        return "admin"

    @property
    def password(self) -> str:
        """The generated admin password (the simple auth manager writes it on first start)."""
        return json.loads(self.password_file.read_text())[self.username]

    def health(self) -> dict[str, Any] | None:
        try:
            resp = self._client.get("/api/v2/monitor/health", timeout=5.0)
        except httpx.HTTPError:
            return None
        return resp.json() if resp.status_code == 200 else None

    def token(self, *, refresh: bool = False) -> str:
        """A JWT for the admin user, from the simple auth manager's ``POST /auth/token``."""
        if self._token is None or refresh:
            credentials = {"username": self.username, "password": self.password}
            resp = self._client.post("/auth/token", json=credentials)
            if resp.status_code not in (200, 201):
                raise StandaloneError(f"POST /auth/token -> {resp.status_code}: {resp.text[:500]}")
            self._token = resp.json()["access_token"]
        return self._token

    def api(
        self,
        method: str,
        path: str,
        json: Any = None,
        *,
        params: Mapping[str, Any] | None = None,
        expect: tuple[int, ...] | None = None,
    ) -> Any:
        """Call the REST API (``path`` like ``/api/v2/dags``) and return the decoded JSON body.

        Raises ``StandaloneError`` on an unexpected status (any status >= 400 when ``expect`` is None).
        """
        resp = self._request(method, path, json, params)
        if resp.status_code == 401:
            self.token(refresh=True)
            resp = self._request(method, path, json, params)
        ok = resp.status_code in expect if expect else resp.status_code < 400
        if not ok:
            raise StandaloneError(f"{method} {path} -> {resp.status_code}: {resp.text[:2000]}")
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            return resp.text

    def _request(self, method: str, path: str, json: Any, params: Mapping[str, Any] | None) -> httpx.Response:
        return self._client.request(
            method, path, json=json, params=params, headers={"Authorization": f"Bearer {self.token()}"}
        )

    def wait_for_dag(self, dag_id: str, timeout: float = 120.0) -> dict[str, Any]:
        """Poll until the dag-processor has parsed ``dag_id``; return the DAG's REST representation."""
        found: dict[str, Any] = {}

        def parsed() -> bool:
            resp = self._request("GET", f"/api/v2/dags/{dag_id}", None, None)
            if resp.status_code == 200:
                found.update(resp.json())
                return True
            return False

        poll_until(
            parsed,
            timeout=timeout,
            interval=1.0,
            message=lambda: f"DAG {dag_id} not parsed in time; import errors: {self.import_errors()}",
        )
        return found

    def import_errors(self) -> list[dict[str, Any]]:
        try:
            return self.api("GET", "/api/v2/importErrors").get("import_errors", [])
        except StandaloneError as exc:
            return [{"error": str(exc)}]

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")

    def wait_for_dag_run(self, dag_id: str, run_id: str, timeout: float = 300.0) -> str:
        """Poll a DagRun until it is finished (success/failed); return its final state."""
        state: dict[str, str] = {}

        def finished() -> bool:
            state["state"] = self.dag_run(dag_id, run_id)["state"]
            return state["state"] in FINISHED_RUN_STATES

        poll_until(
            finished,
            timeout=timeout,
            interval=2.0,
            message=lambda: (
                f"{dag_id}/{run_id} still {state.get('state')} after {timeout}s: "
                f"{self.task_states(dag_id, run_id)}"
            ),
        )
        return state["state"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return self.api(
            "GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 1000}
        )["task_instances"]

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        """``{"task_id[map_index]": state}`` for a run, for assertions and failure messages."""
        states = {}
        for ti in self.task_instances(dag_id, run_id):
            key = ti["task_id"] if ti.get("map_index", -1) < 0 else f"{ti['task_id']}[{ti['map_index']}]"
            states[key] = ti["state"]
        return states


#: Errors a poll rides out until its deadline: a busy machine's api-server may answer late or
#: drop a connection, which says nothing about the condition being polled.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (httpx.TransportError,)


def poll_until(
    condition: Callable[[], bool],
    *,
    timeout: float,
    interval: float = 0.5,
    message: str | Callable[[], str] = "condition not met in time",
) -> None:
    """Call ``condition`` until it returns true; raise ``TimeoutError`` after ``timeout`` seconds.

    A transient HTTP failure (``TRANSIENT_ERRORS``: timeouts, refused or dropped connections) counts
    as "not yet" and is retried within the deadline; the last one is named in the timeout message.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            if condition():
                return
        except TRANSIENT_ERRORS as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            try:
                text = message() if callable(message) else message
            except TRANSIENT_ERRORS as exc:  # the message itself may need the unresponsive server
                text = f"condition not met in time (details unavailable: {exc!r})"
            if last_error is not None:
                text += f" (last transient error: {type(last_error).__name__}: {last_error})"
            raise TimeoutError(text) from last_error
        time.sleep(interval)


def _is_component(cmdline: list[str], component: str) -> bool:
    # `airflow triggerer` shows up as [".../python", ".../bin/airflow", "triggerer", ...]; forked
    # children keep the parent's command line, so they match too.
    for i, part in enumerate(cmdline[:-1]):
        if Path(part).name == "airflow" and cmdline[i + 1] == component:
            return True
    return False


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
