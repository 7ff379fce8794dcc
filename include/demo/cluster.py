"""A distributed Airflow on one machine, for ``make airflow-cluster`` and the cluster end-to-end test.

What a data team runs, each piece a separate process on 127.0.0.1:

- Postgres (Debian's binaries, a private cluster with its own data directory and port) as the
  metadata database; run as the ``postgres`` user when we are root (Postgres refuses root);
- Redis (Debian's ``redis-server``, no persistence) as the Celery broker;
- an S3-compatible store (``moto_server``) with the bucket ``anthropic-batches``; the storage root is
  ``s3://aws_default@anthropic-batches/<prefix>`` through the ``aws`` connection ``aws_default``
  (endpoint in its extra);
- the Message Batches emulator, then the api-server, scheduler, dag-processor, triggerer and two
  Celery workers, each worker in its own working directory (nothing may depend on the cwd).

``Cluster`` extends ``StandaloneAirflow`` (same REST client, process lookup and ``stop()``):

    with Cluster(home, api_port=28090) as cluster:
        cluster.wait_for_dag("bulk_extraction")
        cluster.worker_names()  # ["worker-1", "worker-2"]; TaskInstance.hostname says which ran a task

Every task's ``hostname`` is ``<host>/<worker name>`` (``worker_hostname``) so a test can tell which
worker ran it. Logs: one file per component under ``<home>/logs/``; task logs under
``<home>/logs/tasks`` (one volume shared by the workers and the api-server, as a shared log
volume would be; the workers do not serve logs over HTTP).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from demo.standalone import REPO_ROOT, VENV_BIN, StandaloneAirflow, StandaloneError, poll_until

BUCKET = "anthropic-batches"
AWS_CONN_ID = "aws_default"
WORKER_NAME_ENV = "CLUSTER_WORKER_NAME"
#: moto accepts any credentials; these only make botocore sign requests.
MOTO_CREDENTIALS = {"login": "cluster-key-id", "password": "cluster-secret"}


def worker_hostname() -> str:
    """``[core] hostname_callable`` of the cluster's workers: ``<host>/<worker name>``."""
    return f"{socket.getfqdn()}/{os.environ.get(WORKER_NAME_ENV, 'unnamed')}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen | None, what: str, log: Path, timeout: float = 60) -> None:
    def listening() -> bool:
        if proc is not None and proc.poll() is not None:
            raise StandaloneError(f"{what} exited with {proc.returncode}; see {log}")
        with socket.socket() as sock:
            sock.settimeout(1)
            return sock.connect_ex(("127.0.0.1", port)) == 0

    poll_until(listening, timeout=timeout, interval=0.2, message=f"{what} not listening on {port}; see {log}")


def _stop_group(proc: subprocess.Popen | None, timeout: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class MotoServer:
    """``moto_server`` on 127.0.0.1: an in-memory S3 that honours conditional writes (moto >= 5)."""

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or _free_port()
        self.log_path = log_path or Path(tempfile.gettempdir()) / f"moto-{self.port}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        binary = VENV_BIN / "moto_server"
        if not binary.exists():
            raise StandaloneError(f"{binary} missing: pip install -r requirements-dev.txt (moto[server])")
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [str(binary), "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_port(self.port, self._proc, "moto_server", self.log_path)
        return self

    def create_bucket(self, name: str) -> None:
        # moto does not check signatures; a plain PUT creates the bucket (200, or 409 if it exists).
        resp = httpx.put(f"{self.endpoint_url}/{name}", timeout=30)
        if resp.status_code not in (200, 409):
            raise StandaloneError(f"creating bucket {name}: {resp.status_code} {resp.text[:300]}")

    def connection(self, conn_id: str = AWS_CONN_ID) -> dict[str, Any]:
        """The ``aws`` connection (Amazon provider field names) pointing at this server."""
        return {
            "conn_type": "aws",
            **MOTO_CREDENTIALS,
            "extra": {"endpoint_url": self.endpoint_url, "region_name": "us-east-1"},
        }

    def stop(self) -> None:
        _stop_group(self._proc)
        self._proc = None

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def find_postgres_bin() -> Path:
    """Debian's ``/usr/lib/postgresql/<version>/bin`` (newest), where ``initdb`` and ``pg_ctl`` live."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise StandaloneError(
            "Postgres not installed: apt-get install postgresql (make airflow-cluster does)"
        )
    return Path(found[-1]).parent


class Postgres:
    """A private Postgres cluster (trust auth, 127.0.0.1 only) with a database ``airflow``."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or _free_port()
        self.bin = find_postgres_bin()
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        # Postgres refuses to run as root: then everything runs as Debian's postgres user.
        self.run_as = "postgres" if os.geteuid() == 0 else None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://airflow@127.0.0.1:{self.port}/airflow"

    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", self.run_as, "--", *args] if self.run_as else list(args)

    def _run(self, *args: str) -> None:
        proc = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise StandaloneError(f"{' '.join(args)} exited {proc.returncode}: {proc.stdout}{proc.stderr}")

    def start(self) -> Postgres:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.run_as:
            user = pwd.getpwnam(self.run_as)
            for path in (self.data_dir, self.data_dir.parent):
                os.chown(path, user.pw_uid, user.pw_gid)
            self.data_dir.chmod(0o700)
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                str(self.bin / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "airflow",
                "-A",
                "trust",
                "-E",
                "UTF8",
            )
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data_dir} -c fsync=off"
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_path),
            "-o",
            options,
            "-w",
            "start",
        )
        proc = subprocess.run(
            self._cmd(
                str(self.bin / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "airflow",
                "airflow",
            ),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0 and "already exists" not in proc.stderr:
            raise StandaloneError(f"createdb failed: {proc.stderr}")
        return self

    def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            with contextlib.suppress(StandaloneError, subprocess.TimeoutExpired):
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop")


class Redis:
    """Debian's ``redis-server`` on 127.0.0.1, in memory only."""

    def __init__(self, work_dir: Path, port: int | None = None) -> None:
        self.work_dir = Path(work_dir)
        self.port = port or _free_port()
        self.log_path = self.work_dir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Redis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise StandaloneError("redis-server not installed: apt-get install redis-server")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.work_dir),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_port(self.port, self._proc, "redis-server", self.log_path)
        return self

    def stop(self) -> None:
        _stop_group(self._proc)
        self._proc = None


class Cluster(StandaloneAirflow):
    """Postgres + Redis + S3 (moto) + emulator + api-server, scheduler, dag-processor, triggerer and
    ``n_workers`` Celery workers. ``env`` overrides the Airflow components' environment."""

    def __init__(
        self,
        home: Path,
        *,
        api_port: int,
        s3_port: int | None = None,
        storage_prefix: str = "cluster",
        n_workers: int = 2,
        worker_concurrency: int = 4,
        emulator_flags: tuple[str, ...] = ("--processing-seconds", "10"),
        postgres_dir: Path | None = None,
        env: Mapping[str, str | None] | None = None,
        startup_timeout: float = 300.0,
    ) -> None:
        home = Path(home).resolve()
        from batches_emulator.testing import EmulatorProcess

        self.moto = MotoServer(s3_port, log_path=home / "logs" / "moto.log")
        self.postgres = Postgres(postgres_dir or home / "postgres")
        self.redis = Redis(home / "redis")
        self.emulator = EmulatorProcess(*emulator_flags, db_path=home / "emulator" / "emulator.sqlite")
        self.storage_root = f"s3://{AWS_CONN_ID}@{BUCKET}/{storage_prefix}"
        self.n_workers = n_workers
        self.worker_concurrency = worker_concurrency
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self._cluster_env = dict(env or {})
        super().__init__(home, port=api_port, startup_timeout=startup_timeout)
        self.log_path = home / "logs" / "airflow.log"

    # ------------------------------------------------------------------ environment
    def _airflow_env(self) -> dict[str, str | None]:
        anthropic = {
            "conn_type": "anthropic",
            "password": self.emulator.api_key,
            "host": self.emulator.base_url,
        }
        return {
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.postgres.url,
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CELERY__BROKER_URL": self.redis.url,
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + self.postgres.url,
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(self.worker_concurrency),
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.airflow_home / "logs" / "tasks"),
            # Not the default 8794: a `make airflow` next to it would hold that port.
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(_free_port()),
            "AIRFLOW__API__WORKERS": "1",  # 2 cores for the whole cluster
            "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(self.moto.connection()),
            "AIRFLOW_CONN_ANTHROPIC_DEFAULT": json.dumps(anthropic),
            "ANTHROPIC_BATCH_STORAGE_ROOT": self.storage_root,
            "ANTHROPIC_BATCH_POLL_INTERVAL": "2",
            **self._cluster_env,
        }

    def _worker_env(self, name: str, workdir: Path) -> dict[str, str]:
        env = dict(self.env)
        env[WORKER_NAME_ENV] = name
        env["AIRFLOW__CORE__HOSTNAME_CALLABLE"] = "demo.cluster.worker_hostname"
        # demo.cluster must be importable by the worker and its task processes.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT / "include"), env.get("PYTHONPATH")) if p
        )
        env["PWD"] = str(workdir)
        return env

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        (self.airflow_home / "logs").mkdir(parents=True, exist_ok=True)
        try:
            self.postgres.start()
            self.redis.start()
            self.moto.start()
            self.moto.create_bucket(BUCKET)
            self.emulator.start()
            self.env = self._build_env(self._airflow_env())
            self.airflow_cli("db", "migrate", timeout=self.startup_timeout)
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
            for component in ("api-server", "scheduler", "dag-processor", "triggerer"):
                self._spawn(component, [component])
            for i in range(1, self.n_workers + 1):
                self.start_worker(f"worker-{i}")
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None):
        log = open(self.airflow_home / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        try:
            proc = subprocess.Popen(
                [str(VENV_BIN / "airflow"), *args],
                env=env or self.env,
                cwd=cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a group per component: stop() and kill_worker() reach all of it
            )
        finally:
            log.close()
        self._extra.append(proc)
        return proc

    def start_worker(self, name: str) -> subprocess.Popen[bytes]:
        """A Celery worker in its own working directory ``<home>/workers/<name>``."""
        workdir = self.airflow_home / "workers" / name
        workdir.mkdir(parents=True, exist_ok=True)
        args = [
            "celery",
            "worker",
            "--celery-hostname",
            f"{name}@%h",
            "--skip-serve-logs",
            "--without-mingle",
        ]
        proc = self._spawn(name, args, cwd=workdir, env=self._worker_env(name, workdir))
        self.workers[name] = proc
        return proc

    def kill_worker(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a worker's whole process group (the worker, its pool and running tasks)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.workers[name].pid, sig)
        self.workers[name].wait(timeout=30)

    def worker_names(self) -> list[str]:
        return sorted(self.workers)

    def stop(self) -> None:
        super().stop()  # every Airflow component's process group
        self.workers = {}
        self.emulator.close()
        self.moto.stop()
        self.redis.stop()
        self.postgres.stop()

    def log_tail(self, n_chars: int = 4000) -> str:
        parts = []
        for log in sorted((self.airflow_home / "logs").glob("*.log")):
            with contextlib.suppress(OSError):
                parts.append(f"--- {log.name}\n{log.read_text(errors='replace')[-n_chars // 4 :]}")
        return "\n".join(parts)[-n_chars * 2 :]

    def upload(self, key: str, data: bytes) -> str:
        """Write ``data`` under the storage root (e.g. demo sources); returns the URL."""
        from anthropic_batch import storage

        self._use_connections_here()
        return str(storage.atomic_write_bytes(f"{self.storage_root}/{key}", data))

    def _use_connections_here(self) -> None:
        """Make this process see the cluster's connections (to read and write the S3 root)."""
        for key in ("AIRFLOW_CONN_AWS_DEFAULT", "AIRFLOW_CONN_ANTHROPIC_DEFAULT"):
            os.environ[key] = self.env[key]


def upload_demo_tickets(cluster: Cluster, day: Any, per_day: int, seed: int = 7) -> str:
    """Generate a day of demo tickets and put them where ``bulk_extraction`` reads its source."""
    from demo.generate_data import tickets_path, write_tickets

    with tempfile.TemporaryDirectory() as tmp:
        local = write_tickets(tmp, day, per_day=per_day, seed=seed)
        key = tickets_path("/", day).relative_to("/").as_posix()
        return cluster.upload(key, local.read_bytes())


def main(argv: list[str] | None = None) -> int:
    """``make airflow-cluster``: start the cluster, print the UI URL and login, stop on Ctrl-C."""
    import argparse
    import datetime as dt

    parser = argparse.ArgumentParser(description="a distributed Airflow on this machine (foreground)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("AIRFLOW_PORT", "8080")))
    parser.add_argument("--s3-port", type=int, default=int(os.environ.get("CLUSTER_S3_PORT", "9100")))
    parser.add_argument("--days", type=int, default=3, help="days of demo tickets before today (and today)")
    parser.add_argument("--per-day", type=int, default=30)
    args = parser.parse_args(argv)

    home = Path(os.environ.get("AIRFLOW_HOME") or REPO_ROOT / ".airflow") / "cluster"
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops it like Ctrl-C
    cluster = Cluster(
        home,
        api_port=args.port,
        s3_port=args.s3_port,
        emulator_flags=("--processing-seconds", "20", "--seed", "7"),
    )
    print(
        f"Starting Postgres, Redis, S3 (moto on :{args.s3_port}), the emulator and Airflow; logs: {home}/logs"
    )
    try:
        cluster.start()
        from anthropic_batch.dag_factory import ensure_pool_commands
        from anthropic_batch.pipeline_config import load_pipelines

        for command in ensure_pool_commands(load_pipelines()):  # one pool per pipeline
            cluster.airflow_cli(*command)
        today = dt.datetime.now(dt.UTC).date()
        for offset in range(args.days + 1):
            upload_demo_tickets(cluster, today - dt.timedelta(days=offset), args.per_day)
        first = today - dt.timedelta(days=args.days)
        print(f"\nAirflow UI: {cluster.base_url}   login: {cluster.username} / {cluster.password}")
        print(f"Storage root: {cluster.storage_root} (S3 endpoint {cluster.moto.endpoint_url}, in memory)")
        print(f"Workers: {', '.join(cluster.worker_names())} (Celery, broker {cluster.redis.url})")
        print(f"Metadata DB: {cluster.postgres.url}")
        print(f"Demo tickets for {first} .. {today}; backfill (AIRFLOW_HOME={home}, the env above):")
        print(f"  airflow backfill create --dag-id bulk_extraction --from-date {first} --to-date {today}")
        print("Ctrl-C stops everything.")
        while all(proc.poll() is None for proc in cluster.workers.values()):
            time.sleep(1)  # foreground until Ctrl-C
        print("a worker exited; see the logs", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        print("\nStopping the cluster ...")
        cluster.stop()


if __name__ == "__main__":  # PYTHONPATH=plugins:include python -m demo.cluster (make airflow-cluster)
    sys.exit(main())
