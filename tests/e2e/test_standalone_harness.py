"""The end-to-end harness rides out a slow api-server: polls retry transient HTTP failures within
their deadline (a busy 2-core machine once failed a browser test with ``httpx.ReadTimeout``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from demo.standalone import poll_until


class _SlowAtFirst(BaseHTTPRequestHandler):
    slow_requests = 2  # the first requests answer after the client gave up

    def do_GET(self) -> None:
        server = self.server
        with server.lock:
            server.seen += 1
            slow = server.seen <= server.slow_requests
        if slow:
            time.sleep(0.6)  # a busy server, not synchronisation: the client's timeout is 0.2 s
        try:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and left

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def slow_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowAtFirst)
    server.lock = threading.Lock()
    server.seen = 0
    server.slow_requests = _SlowAtFirst.slow_requests
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_poll_retries_read_timeouts_within_its_deadline(slow_server):
    with httpx.Client(base_url=f"http://127.0.0.1:{slow_server.server_port}", timeout=0.2) as client:
        poll_until(lambda: client.get("/health").status_code == 200, timeout=20, interval=0.05)
    assert slow_server.seen == slow_server.slow_requests + 1


def test_poll_names_the_last_transient_error_at_its_deadline(slow_server):
    slow_server.slow_requests = 10**6
    with (
        httpx.Client(base_url=f"http://127.0.0.1:{slow_server.server_port}", timeout=0.1) as client,
        pytest.raises(TimeoutError, match=r"never healthy.*ReadTimeout"),
    ):
        poll_until(lambda: client.get("/health").status_code == 200, timeout=1, message="never healthy")
