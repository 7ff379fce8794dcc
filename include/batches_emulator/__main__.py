"""Entry point: ``python -m batches_emulator --port 8099 [flags]`` (see ``--help``)."""

from __future__ import annotations

import logging
import os
import threading
import time

import uvicorn

from batches_emulator.app import EmulatedConnectionDrop, create_app
from batches_emulator.config import parse_settings


def exit_with_parent(pid: int) -> None:
    """Leave no orphan server behind when the test run or demo that started us dies."""

    def watch() -> None:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:
                pass
            time.sleep(1.0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    if settings.parent_pid:
        exit_with_parent(settings.parent_pid)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        # Long keep-alive: an idle pooled connection closed under the client causes spurious errors.
        timeout_keep_alive=120,
        timeout_graceful_shutdown=2,
    )
    # Injected connection drops are intended; keep their tracebacks out of the log.
    logging.getLogger("uvicorn.error").addFilter(
        lambda record: not (record.exc_info and isinstance(record.exc_info[1], EmulatedConnectionDrop))
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
