"""The Batches app: server-rendered pages and a JSON API over the storage root, mounted by the plugin.

Routes (relative to the mount prefix, ``/anthropic-batches`` in the api-server):

``GET /``                                   every batch across runs, run list, charts
``GET /runs/{dag_id}/{partition}``          one run: outcomes, failures by reason, batches, dead letters
``GET /dag-runs/{dag_id}/{run_id}``         the same, found by Airflow run id (the DAG-run tab)
``GET /api/batches``                        JSON of the overview
``GET /api/runs/{dag_id}/{partition}``      JSON of one run (``?limit=`` dead-letter rows)
``GET  /runs/{dag_id}/{partition}/batches/{batch_id}/cancel``      confirmation page with the form
``POST /runs/{dag_id}/{partition}/batches/{batch_id}/cancel``      cancel (form), back to the run page
``POST /api/runs/{dag_id}/{partition}/batches/{batch_id}/cancel``  cancel, JSON answer

Every route requires an Airflow login (see :mod:`anthropic_batch.ui.auth`): 401 without a valid
token (JSON for ``/api``, an HTML page with a login link otherwise), 403 without permission.
Templates autoescape everything; the pages carry no JavaScript and a CSP that forbids any.

Cancel is the only way this project cancels a batch on a person's behalf (clearing or marking a
task never does, see :mod:`anthropic_batch.triggers`): it needs edit rights on the DAG's runs, is
refused across sites (:func:`~anthropic_batch.ui.auth.check_cross_site`), and records who and when
in the ledger entry, so the canceled requests are dead-lettered instead of resubmitted
(:mod:`anthropic_batch.cancel`).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from anthropic_batch.status import ProcessingStatus, RequestStatus
from anthropic_batch.ui import data
from anthropic_batch.ui.auth import (
    Forbidden,
    NotAuthenticated,
    check_cross_site,
    editable_dag_ids,
    form_token,
    login_url,
    readable_dag_ids,
    require_dag_edit,
    require_dag_read,
    require_user,
    user_name,
)
from anthropic_batch.ui.charts import bar_chart, line_chart

TEMPLATES_DIR = Path(__file__).parent / "templates"
#: Airflow's own rule for DAG ids; anything else cannot name a run of ours.
DAG_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,250}$")
#: Message Batch ids (``msgbatch_...``); anything else cannot name one of our batches.
BATCH_ID_RE = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")
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


class CancelRefused(Exception):
    """The batch exists but cannot be canceled (already ended, not a batch)."""


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
        return RequestStatus.EXPIRED.value
    minutes = int(seconds // 60)
    hours, minutes = divmod(minutes, 60)
    return f"in {hours}h {minutes:02d}m" if hours else f"in {minutes}m"


def _environment():
    # jinja2: only where a template is rendered
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
    env.filters["cost_rows"] = data.cost_breakdown_rows  # issue 13: the cost breakdown section
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
    app.add_exception_handler(CancelRefused, _conflict)

    @app.get("/", response_class=HTMLResponse, name="batches_page")
    def batches_page(request: Request, user: UserDep) -> HTMLResponse:
        overview = _overview(request, user)
        return _render(
            request,
            "batches.html",
            overview=overview,
            charts=_charts(overview["series"]),
            max_rows=MAX_BATCH_ROWS,
            editable=_editable(user, overview["batches"]),
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
        return _render(request, "run.html", editable=_editable(user, detail["batches"]), **detail)

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
        return _render(request, "run.html", editable=_editable(user, detail["batches"]), **detail)

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

    @app.get(
        "/runs/{dag_id}/{partition}/batches/{batch_id}/cancel",
        response_class=HTMLResponse,
        name="cancel_page",
    )
    def cancel_page(
        request: Request, dag_id: str, partition: str, batch_id: str, user: UserDep
    ) -> HTMLResponse:
        entry = _cancelable_entry(request, user, dag_id, partition, batch_id)
        return _render(
            request,
            "cancel.html",
            entry=entry,
            # Cancel is offered only while in progress: a missing status was last seen as that.
            last_status=entry.get("processing_status") or ProcessingStatus.IN_PROGRESS.value,
            dag_id=dag_id,
            partition=partition,
            batch_id=batch_id,
            form_token=form_token(request),
        )

    @app.post("/runs/{dag_id}/{partition}/batches/{batch_id}/cancel", name="cancel_batch")
    async def cancel_batch(
        request: Request, dag_id: str, partition: str, batch_id: str, user: UserDep
    ) -> Response:
        form = await request.form()
        token = form.get("form_token")
        check_cross_site(request, token if isinstance(token, str) else None)
        await _cancel(request, user, dag_id, partition, batch_id)
        target = request.url_for("run_page", dag_id=dag_id, partition=partition).path
        return RedirectResponse(target, status_code=303)

    @app.post("/api/runs/{dag_id}/{partition}/batches/{batch_id}/cancel", name="api_cancel_batch")
    async def api_cancel_batch(
        request: Request, dag_id: str, partition: str, batch_id: str, user: UserDep
    ) -> dict[str, Any]:
        check_cross_site(request, request.headers.get("x-form-token"))
        entry = await _cancel(request, user, dag_id, partition, batch_id)
        keys = ("batch_id", "processing_status", "cancel_reason", "canceled_by", "cancel_requested_at")
        return {k: entry.get(k) for k in keys}

    return app


# -- route helpers -----------------------------------------------------------------------------------
def _root(request: Request):
    # the plugin (imported by every Airflow component) loads this module: storage only on use
    from anthropic_batch import storage

    return storage.storage_root(request.app.state.storage_root)


def _overview(request: Request, user: Any) -> dict[str, Any]:
    root = _root(request)
    entries = data.read_ledger_entries(root)
    summaries = data.read_summaries(root)
    dag_ids = {e.get("dag_id") for e in entries} | {s.dag_id for s in summaries}
    allowed = readable_dag_ids(user, {d for d in dag_ids if d})
    overview = data.build_overview(entries, summaries, allowed_dag_ids=allowed)
    _add_cancels(overview["batches"], entries)
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
    summaries = [s for s in data.read_summaries(root, partition=partition) if s.dag_id == dag_id]
    overview = data.build_overview(entries, summaries)
    _add_cancels(overview["batches"], entries)
    run = data.find_run(overview, dag_id, partition)
    if run is None:
        raise RunNotFound(f"No batches and no published summary for {dag_id} on {partition}.")
    if run["pipeline"]:
        dead = data.read_dead_letters(data.dead_letter_path(root, run["pipeline"], partition), limit)
    else:
        dead = {"exists": False, "total": 0, "columns": [], "rows": [], "by_reason": [], "error": None}
    failures = {k: v for k, v in run["counts_by_status"].items() if k != RequestStatus.SUCCEEDED and v}
    return {"run": run, "batches": overview["batches"], "dead_letters": dead, "failures": failures}


def _add_cancels(batches: list[dict[str, Any]], entries: list[dict[str, Any]]) -> None:
    """Who canceled each batch and why (``cancel_reason``: deadline or user), from its ledger entry."""
    by_batch = {e["batch_id"]: e for e in entries if e.get("batch_id") and e.get("cancel_reason")}
    for row in batches:
        entry = by_batch.get(row.get("batch_id"))
        row["cancel_reason"] = entry.get("cancel_reason") if entry else None
        row["canceled_by"] = data.redact(entry.get("canceled_by")) if entry else None
        row["cancel_requested_at"] = entry.get("cancel_requested_at") if entry else None


def _editable(user: Any, batches: list[dict[str, Any]]) -> set[str]:
    """DAG ids among ``batches`` whose batches ``user`` may cancel (an empty set hides the links)."""
    return editable_dag_ids(user, {b["dag_id"] for b in batches if b.get("dag_id")})


def _cancelable_entry(
    request: Request, user: Any, dag_id: str, partition: str, batch_id: str
) -> dict[str, Any]:
    """The ledger entry of ``batch_id`` in that run, once the user is known to may cancel it."""
    _check_run_key(dag_id, partition)
    if not BATCH_ID_RE.match(batch_id):
        raise RunNotFound(f"No batch {batch_id!r}.")
    require_dag_edit(user, dag_id)
    entries = data.read_ledger_entries(_root(request), dag_id=dag_id, partition=partition)
    for entry in entries:
        if entry.get("batch_id") == batch_id:
            return entry
    raise RunNotFound(f"No batch {batch_id} was recorded for {dag_id} on {partition}.")


async def _cancel(request: Request, user: Any, dag_id: str, partition: str, batch_id: str) -> dict[str, Any]:
    """Cancel through the hook and record who and when; blocking I/O runs off the event loop."""
    # the API server's modules: only inside the UI app
    from starlette.concurrency import run_in_threadpool

    from anthropic_batch.cancel import NotCancelable, cancel_by_user

    entry = await run_in_threadpool(_cancelable_entry, request, user, dag_id, partition, batch_id)
    try:
        return await run_in_threadpool(cancel_by_user, entry, user_name(user))
    except NotCancelable as exc:
        raise CancelRefused(str(exc)) from exc


def _charts(series: list[dict[str, Any]]) -> dict[str, Any]:
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


async def _conflict(request: Request, exc: Exception) -> Response:
    return _error(request, 409, "Not canceled", str(exc))
