"""The one Airflow plugin of this project: the Batches page, its DAG-run tab and the operator extra links.

The plugin loader imports this file in every component (scheduler, dag-processor, triggerer,
api-server, workers), so it stays light: the FastAPI app is cheap to build and its routes import
the storage readers, pyarrow and Airflow's security code only when a request arrives.
``plugins/.airflowignore`` keeps the loader out of the ``anthropic_batch`` library package.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from airflow.configuration import conf
from airflow.plugins_manager import AirflowPlugin

from anthropic_batch.ui.app import create_app

log = logging.getLogger(__name__)

#: Where the api-server mounts the Batches app.
URL_PREFIX = "/anthropic-batches"


def _ui_path(path: str) -> str:
    """``path`` under the api-server's ``[api] base_url`` path (Airflow served below a sub-path)."""
    base = urlsplit(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")
    return f"{base}{path}"


def _extra_links() -> list:
    # links.py belongs to the operators' side; the page must still load while it is absent or broken.
    try:
        from anthropic_batch.links import AnthropicConsoleBatchLink, RunResultsLink
    except ImportError as exc:
        log.warning("anthropic_batch.links not importable, no extra links registered: %s", exc)
        return []
    return [AnthropicConsoleBatchLink(), RunResultsLink()]


class AnthropicBatchPlugin(AirflowPlugin):
    """Batches page (nav), a run's batches and dead letters (DAG-run tab), Console/results links."""

    name = "anthropic_batch"
    fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "Anthropic batches"}]
    external_views = [
        {
            "name": "Batches",
            "href": _ui_path(f"{URL_PREFIX}/"),
            "destination": "nav",
            "category": "browse",
            "url_route": "anthropic-batches",
        },
        {
            # The Airflow UI fills {DAG_ID} and {RUN_ID} (URL-encoded) for the run being viewed.
            "name": "Batches",
            "href": _ui_path(URL_PREFIX + "/dag-runs/{DAG_ID}/{RUN_ID}"),
            "destination": "dag_run",
            "url_route": "anthropic-batches-run",
        },
    ]
    operator_extra_links = _extra_links()
