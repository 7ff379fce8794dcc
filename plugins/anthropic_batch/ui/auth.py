"""Who is asking: the Airflow user behind a request to the Batches app.

Airflow does not protect plugin FastAPI apps, so every route depends on :func:`require_user`. The
credential is the same JWT the Airflow UI and REST API use: an ``Authorization: Bearer`` header
(API clients; it wins when both are present, as in Airflow's own ``get_user``) or the ``_token``
cookie the Airflow UI sets at login (the page runs inside the UI, same origin). Validation is the
configured auth manager's ``get_user_from_token`` (signature, expiry, audience, revocation), never
a parser of our own. Authorisation is the auth manager's too: the website view to open the app,
read access to a DAG to see its batches and runs, edit access to its runs (``PUT``, what clearing
or marking a task needs) to cancel one of its batches.

Cancel is the one state-changing route, so it is protected against cross-site requests: a request
authenticated by the ``Authorization`` header cannot be forged by another site (browsers never add
it on their own); one authenticated by the cookie must come from our origin (``Origin``, else
``Referer``) AND carry the form token, an HMAC of the user's own JWT that another site cannot read
or compute (:func:`check_cross_site`).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fastapi import Request

if TYPE_CHECKING:
    from airflow.api_fastapi.auth.managers.base_auth_manager import BaseAuthManager


class NotAuthenticated(Exception):
    """No credential, or one the auth manager rejects (bad signature, expired, revoked)."""


class Forbidden(Exception):
    """A valid user without the permission the route needs."""


def bearer_token(request: Request) -> str | None:
    """The JWT of the ``Authorization: Bearer`` header, if any."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return None


def request_token(request: Request) -> str | None:
    """The JWT of the request: the bearer header first, else the Airflow UI's ``_token`` cookie."""
    # the API server's modules: only inside the UI app
    from airflow.api_fastapi.auth.managers.base_auth_manager import COOKIE_NAME_JWT_TOKEN

    return bearer_token(request) or request.cookies.get(COOKIE_NAME_JWT_TOKEN) or None


def auth_manager() -> BaseAuthManager:
    # the API server's modules: only inside the UI app
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager()


async def require_user(request: Request) -> Any:
    """FastAPI dependency: the authenticated Airflow user allowed to open the Airflow website."""
    # the API server's modules: only inside the UI app
    from airflow.api_fastapi.auth.managers.models.resource_details import AccessView
    from jwt import InvalidTokenError

    token = request_token(request)
    if token is None:
        raise NotAuthenticated("Not authenticated: log in to Airflow first.")
    manager = auth_manager()
    try:
        user = await manager.get_user_from_token(token)
    except InvalidTokenError as exc:  # ExpiredSignatureError is a subclass
        raise NotAuthenticated("Invalid or expired token: log in to Airflow again.") from exc
    if not manager.is_authorized_view(access_view=AccessView.WEBSITE, user=user):
        raise Forbidden("Your Airflow role may not open this page.")
    return user


def readable_dag_ids(user: Any, dag_ids: set[str]) -> set[str]:
    """The subset of ``dag_ids`` whose runs ``user`` may read."""
    return auth_manager().filter_authorized_dag_ids(dag_ids=dag_ids, user=user, method="GET")


def require_dag_read(user: Any, dag_id: str) -> None:
    """Raise :class:`Forbidden` unless ``user`` may read runs of ``dag_id``."""
    # the API server's modules: only inside the UI app
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails

    allowed = auth_manager().is_authorized_dag(
        method="GET", access_entity=DagAccessEntity.RUN, details=DagDetails(id=dag_id), user=user
    )
    if not allowed:
        raise Forbidden(f"Your Airflow role may not read runs of {dag_id}.")


def may_edit_dag(user: Any, dag_id: str) -> bool:
    """Whether ``user`` may change runs of ``dag_id`` (clear, mark, and here: cancel its batches)."""
    # the API server's modules: only inside the UI app
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails

    return auth_manager().is_authorized_dag(
        method="PUT", access_entity=DagAccessEntity.RUN, details=DagDetails(id=dag_id), user=user
    )


def editable_dag_ids(user: Any, dag_ids: set[str]) -> set[str]:
    """The subset of ``dag_ids`` whose batches ``user`` may cancel."""
    return {dag_id for dag_id in dag_ids if may_edit_dag(user, dag_id)}


def require_dag_edit(user: Any, dag_id: str) -> None:
    """Raise :class:`Forbidden` unless ``user`` may change runs of ``dag_id``."""
    if not may_edit_dag(user, dag_id):
        raise Forbidden(
            f"Your Airflow role may not change runs of {dag_id}, so it may not cancel its batches."
        )


def user_name(user: Any) -> str:
    """What the ledger records as the user who acted."""
    try:
        return str(user.get_name())
    except Exception:  # an auth manager's user without a usable name is still someone
        return str(getattr(user, "username", None) or user)


def form_token(request: Request) -> str:
    """The anti-CSRF token of the cancel form: an HMAC keyed by the user's own JWT."""
    token = request_token(request) or ""
    return hmac.new(token.encode(), b"anthropic-batches/cancel", hashlib.sha256).hexdigest()


def _same_origin(request: Request) -> bool:
    """Whether the request says it comes from a page of this host (``Origin``, else ``Referer``)."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source or source == "null":
        return False
    # Behind a proxy the browser's host is X-Forwarded-Host (a cross-site form cannot set that header).
    hosts = {request.url.netloc, request.headers.get("host", ""), request.headers.get("x-forwarded-host", "")}
    hosts = {h.split(",")[0].strip().lower() for h in hosts if h}
    return urlsplit(source).netloc.lower() in hosts


def check_cross_site(request: Request, submitted_token: str | None) -> None:
    """Refuse a cookie-authenticated state change that may come from another site (see module doc)."""
    if bearer_token(request) is not None:
        return
    if not _same_origin(request):
        raise Forbidden("Refused: the request does not come from this site (Origin/Referer check).")
    if not submitted_token or not hmac.compare_digest(submitted_token, form_token(request)):
        raise Forbidden("Refused: the form is stale or did not come from this page; reload it and retry.")


def login_url(next_url: str) -> str | None:
    """The auth manager's login page, returning to ``next_url``; None if it cannot say."""
    try:
        return auth_manager().get_url_login(next_url=next_url)
    except Exception:  # a login link is a convenience on an error page, never a reason to fail
        return None
