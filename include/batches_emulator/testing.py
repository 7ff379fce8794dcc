"""Run the emulator as a subprocess from tests, the demo and benchmarks.

    with EmulatorProcess("--processing-seconds", "1") as emu:
        client = anthropic.Anthropic(api_key=emu.api_key, base_url=emu.base_url)

The process listens on a free loopback port; start-up is awaited by polling ``GET /v1/models``
until it answers (with a deadline), never by sleeping a fixed time.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

INCLUDE_DIR = Path(__file__).resolve().parents[1]
START_TIMEOUT_SECONDS = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmulatorProcess:
    """A `python -m batches_emulator` subprocess; a context manager that starts and stops it."""

    def __init__(
        self,
        *cli_flags: str,
        port: int | None = None,
        db_path: str | os.PathLike[str] | None = None,
        api_key: str = "emulator-key",
    ):
        if api_key.startswith("sk-ant-"):
            raise ValueError("the emulator must not be given a real-looking Anthropic key")
        self.cli_flags = tuple(str(f) for f in cli_flags)
        self.port = port or free_port()
        self.api_key = api_key
        self._tmpdir: str | None = None
        if db_path is None:
            self._tmpdir = tempfile.mkdtemp(prefix="batches-emulator-")
            db_path = Path(self._tmpdir) / "emulator.sqlite"
        self.db_path = Path(db_path)
        self.log_path = self.db_path.with_suffix(".log")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> EmulatorProcess:
        if self._proc is not None and self._proc.poll() is None:
            return self
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "batches_emulator",
            "--port",
            str(self.port),
            "--db",
            str(self.db_path),
            "--api-key",
            self.api_key,
            "--parent-pid",
            str(os.getpid()),
            *self.cli_flags,
        ]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(INCLUDE_DIR), os.environ.get("PYTHONPATH", "")]),
        }
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(cmd, cwd=INCLUDE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        request = urllib.request.Request(
            f"{self.base_url}/v1/models?limit=1",
            headers={"x-api-key": self.api_key, "anthropic-version": "2023-06-01"},
        )
        delay = 0.02
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"emulator exited with {self._proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(request, timeout=2) as response:
                    if response.status == 200:
                        return
            except urllib.error.HTTPError:
                return  # it answers (an injected fault, say): it is up
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(
                    f"emulator did not answer within {START_TIMEOUT_SECONDS}s: {self.log_tail()}"
                )
            time.sleep(delay)  # back-off between readiness probes, not synchronisation
            delay = min(delay * 1.5, 0.2)

    def log_tail(self, n_bytes: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n_bytes:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def restart(self) -> EmulatorProcess:
        """Stop and start again on the same port with the same database."""
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> EmulatorProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EmulatorProcess(base_url={self.base_url!r}, db_path={str(self.db_path)!r})"
