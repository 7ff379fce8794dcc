"""The Batches app: server-rendered pages and a JSON API over the storage root, mounted by the plugin.

Routes (relative to the mount prefix, ``/anthropic-batches`` in the api-server):

``GET /``                                   every batch across runs, run list, charts
``GET /runs/{dag_id}/{partition}``          one run: outcomes, failures by reason, batches, dead letters
``GET /dag-runs/{dag_id}/{run_id}``         the same, found by Airflow run id (the DAG-run tab)
``GET /api/batches``                        JSON of the overview
``GET /api/runs/{dag_id}/{partition}``      JSON of one run (``?limit=`` dead-letter rows)

Every route requires an Airflow login (see :mod:`anthropic_batch.ui.auth`): 401 without a valid
token (JSON for ``/api``, an HTML page with a login link otherwise), 403 without permission.
Templates autoescape everything; the pages carry no JavaScript and a CSP that forbids any.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from anthropic_batch.ui import data
from anthropic_batch.ui.auth import (
    Forbidden,
    NotAuthenticated,
    login_url,
    readable_dag_ids,
    require_dag_read,
    require_user,
)

TEMPLATES_DIR = Path(__file__).parent / "templates"
#: Airflow's own rule for DAG ids; anything else cannot name a run of ours.
DAG_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,250}$")
DEFAULT_DEAD_LETTER_LIMIT = 200
#: Newest batches listed on the HTML page (the run table and the JSON API cover all of them).
MAX_BATCH_ROWS = 500
SECURITY_HEADERS = {
    # No script at all; styles and SVG are inline. Framing only by the Airflow UI (same origin).
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
        "frame-ancestors 'self'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


#: The authenticated user (every route depends on it).
UserDep = Annotated[Any, Depends(require_user)]
#: How many dead-letter rows a run page / API answer carries.
LimitQuery = Annotated[int, Query(ge=0, le=5000)]


class RunNotFound(Exception):
    """No batches and no summary for the requested run."""


# -- formatting filters ------------------------------------------------------------------------------
def fmt_usd(value: Any) -> str:
    if value is None:
        return "—"
    value = float(value)
    sign = "-" if value < 0 else ""
    value = abs(value)
    if value >= 100:
        return f"{sign}${value:,.0f}"
    if value >= 1:
        return f"{sign}${value:,.2f}"
    return f"{sign}${value:.4f}"


def fmt_pct(value: Any) -> str:
    return "—" if value is None else f"{float(value) * 100:.1f}%"


def fmt_num(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:,}" if isinstance(value, int) else str(value)


def fmt_time(value: Any) -> str:
    parsed = data.parse_time(value)
    return parsed.strftime("%Y-%m-%d %H:%M UTC") if parsed else "—"


def fmt_expiry(seconds: Any) -> str:
    """Time left before an unfinished batch expires: ``in 5h 12m``, or ``expired``."""
    if seconds is None:
        return ""
    if seconds <= 0:
        return "expired"
    minutes = int(seconds // 60)
    hours, minutes = divmod(minutes, 60)
    return f"in {hours}h {minutes:02d}m" if hours else f"in {minutes}m"


def _environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,  # every value from data or a model is escaped; charts are Markup built escaped
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(usd=fmt_usd, pct=fmt_pct, num=fmt_num, time=fmt_time, expiry=fmt_expiry)
    env.filters["cell"] = lambda v: _cell(v, data.MAX_CELL_CHARS)
    env.filters["redact"] = data.redact
    return env


def _cell(value: Any, limit: int) -> str:
    if value is None:
        return ""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- the app -----------------------------------------------------------------------------------------
def create_app(storage_root: str | None = None) -> FastAPI:
    """The Batches FastAPI app; ``storage_root`` overrides ``storage.storage_root()`` (tests)."""
    app = FastAPI(
        title="Anthropic batches",
        description="Message Batches across pipeline runs, read from the storage root.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.storage_root = storage_root
    app.state.jinja = None

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    app.add_exception_handler(NotAuthenticated, _not_authenticated)
    app.add_exception_handler(Forbidden, _forbidden)
    app.add_exception_handler(RunNotFound, _not_found)

    @app.get("/", response_class=HTMLResponse, name="batches_page")
    def batches_page(request: Request, user: UserDep) -> HTMLResponse:
        overview = _overview(request, user)
        return _render(
            request,
            "batches.html",
            overview=overview,
            charts=_charts(overview["series"]),
            max_rows=MAX_BATCH_ROWS,
        )

    @app.get("/runs/{dag_id}/{partition}", response_class=HTMLResponse, name="run_page")
    def run_page(
        request: Request,
        dag_id: str,
        partition: str,
        user: UserDep,
        limit: LimitQuery = DEFAULT_DEAD_LETTER_LIMIT,
    ) -> HTMLResponse:
        detail = _run_detail(request, user, dag_id, partition, limit)
        return _render(request, "run.html", **detail)

    @app.get("/dag-runs/{dag_id}/{run_id:path}", response_class=HTMLResponse, name="dag_run_page")
    def dag_run_page(
        request: Request,
        dag_id: str,
        run_id: str,
        user: UserDep,
        limit: LimitQuery = DEFAULT_DEAD_LETTER_LIMIT,
    ) -> HTMLResponse:
        partition = _partition_of(request, user, dag_id, run_id)
        detail = _run_detail(request, user, dag_id, partition, limit)
        return _render(request, "run.html", **detail)

    @app.get("/api/batches", name="api_batches")
    def api_batches(request: Request, user: UserDep) -> dict[str, Any]:
        return _overview(request, user)

    @app.get("/api/runs/{dag_id}/{partition}", name="api_run")
    def api_run(
        request: Request,
        dag_id: str,
        partition: str,
        user: UserDep,
        limit: LimitQuery = DEFAULT_DEAD_LETTER_LIMIT,
    ) -> dict[str, Any]:
        detail = _run_detail(request, user, dag_id, partition, limit)
        return {k: v for k, v in detail.items() if k in ("run", "batches", "dead_letters", "failures")}

    return app


# -- route helpers -----------------------------------------------------------------------------------
def _root(request: Request):
    from anthropic_batch import storage

    return storage.storage_root(request.app.state.storage_root)


def _overview(request: Request, user: Any) -> dict[str, Any]:
    root = _root(request)
    entries = data.read_ledger_entries(root)
    summaries = data.read_summaries(root)
    dag_ids = {e.get("dag_id") for e in entries} | {s.get("dag_id") for s in summaries}
    allowed = readable_dag_ids(user, {d for d in dag_ids if d})
    overview = data.build_overview(entries, summaries, allowed_dag_ids=allowed)
    overview["generated_at"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return overview


def _check_run_key(dag_id: str, partition: str) -> None:
    if not DAG_ID_RE.match(dag_id) or not data.PARTITION_RE.match(partition):
        raise RunNotFound(f"No run {dag_id!r} / {partition!r}.")


def _partition_of(request: Request, user: Any, dag_id: str, run_id: str) -> str:
    if not DAG_ID_RE.match(dag_id):
        raise RunNotFound(f"No run {dag_id!r}.")
    require_dag_read(user, dag_id)
    root = _root(request)
    entries = data.read_ledger_entries(root, dag_id=dag_id)
    partition = data.partition_of_run_id(entries, data.read_summaries(root), dag_id, run_id)
    if partition is None:
        raise RunNotFound(f"No batches were recorded for run {run_id} of {dag_id}.")
    return partition


def _run_detail(request: Request, user: Any, dag_id: str, partition: str, limit: int) -> dict[str, Any]:
    _check_run_key(dag_id, partition)
    require_dag_read(user, dag_id)
    root = _root(request)
    entries = data.read_ledger_entries(root, dag_id=dag_id, partition=partition)
    summaries = [s for s in data.read_summaries(root, partition=partition) if s.get("dag_id") == dag_id]
    overview = data.build_overview(entries, summaries)
    run = data.find_run(overview, dag_id, partition)
    if run is None:
        raise RunNotFound(f"No batches and no published summary for {dag_id} on {partition}.")
    if run["pipeline"]:
        dead = data.read_dead_letters(data.dead_letter_path(root, run["pipeline"], partition), limit)
    else:
        dead = {"exists": False, "total": 0, "columns": [], "rows": [], "by_reason": [], "error": None}
    failures = {k: v for k, v in run["counts_by_status"].items() if k != "succeeded" and v}
    return {"run": run, "batches": overview["batches"], "dead_letters": dead, "failures": failures}


def _charts(series: list[dict[str, Any]]) -> dict[str, Any]:
    from anthropic_batch.ui.charts import bar_chart, line_chart

    return {
        "cost": bar_chart(
            series,
            [("sync_cost_usd", "Synchronous equivalent", "bar-sync"), ("cost_usd", "Batch cost", "bar-cost")],
            fmt_usd,
            "Cost per day: batch vs synchronous equivalent",
        ),
        "savings": bar_chart(series, [("savings_usd", "Savings", "bar-savings")], fmt_usd, "Savings per day"),
        "success": line_chart(series, "success_rate", lambda v: f"{v * 100:.0f}%", "Success rate per day"),
    }


def _render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    state = request.app.state
    if state.jinja is None:
        state.jinja = _environment()

    def url(name: str, **params: Any) -> str:
        return request.url_for(name, **params).path

    html = state.jinja.get_template(template).render(url=url, **context)
    return HTMLResponse(html, status_code=status_code)


def _is_api(request: Request) -> bool:
    path = request.url.path.removeprefix(request.scope.get("root_path", ""))
    return path.startswith("/api/")


def _error(request: Request, status_code: int, title: str, message: str, login: bool = False) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if status_code == 401 else None
    if _is_api(request):
        return JSONResponse({"detail": message}, status_code=status_code, headers=headers)
    response = _render(
        request,
        "error.html",
        status_code=status_code,
        title=title,
        message=message,
        login_url=login_url(request.url.path) if login else None,
    )
    if headers:
        response.headers.update(headers)
    return response


async def _not_authenticated(request: Request, exc: Exception) -> Response:
    return _error(request, 401, "Log in to Airflow", str(exc), login=True)


async def _forbidden(request: Request, exc: Exception) -> Response:
    return _error(request, 403, "Not allowed", str(exc))


async def _not_found(request: Request, exc: Exception) -> Response:
    return _error(request, 404, "No such run", str(exc))
