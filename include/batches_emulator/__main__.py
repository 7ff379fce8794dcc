"""Entry point: ``python -m batches_emulator --port 8099 [flags]`` (see ``--help``)."""

from __future__ import annotations

import uvicorn

from batches_emulator.app import create_app
from batches_emulator.config import parse_settings


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=2,
    )


if __name__ == "__main__":
    main()
