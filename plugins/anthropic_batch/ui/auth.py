"""Who is asking: the Airflow user behind a request to the Batches app.

Airflow does not protect plugin FastAPI apps, so every route depends on :func:`require_user`. The
credential is the same JWT the Airflow UI and REST API use: an ``Authorization: Bearer`` header
(API clients; it wins when both are present, as in Airflow's own ``get_user``) or the ``_token``
cookie the Airflow UI sets at login (the page runs inside the UI, same origin). Validation is the
configured auth manager's ``get_user_from_token`` (signature, expiry, audience, revocation), never
a parser of our own. Authorisation is the auth manager's too: the website view to open the app,
and read access to a DAG to see its batches and runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import Request

if TYPE_CHECKING:
    from airflow.api_fastapi.auth.managers.base_auth_manager import BaseAuthManager


class NotAuthenticated(Exception):
    """No credential, or one the auth manager rejects (bad signature, expired, revoked)."""


class Forbidden(Exception):
    """A valid user without the permission the route needs."""


def request_token(request: Request) -> str | None:
    """The JWT of the request: the bearer header first, else the Airflow UI's ``_token`` cookie."""
    from airflow.api_fastapi.auth.managers.base_auth_manager import COOKIE_NAME_JWT_TOKEN

    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.cookies.get(COOKIE_NAME_JWT_TOKEN) or None


def auth_manager() -> BaseAuthManager:
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager()


async def require_user(request: Request) -> Any:
    """FastAPI dependency: the authenticated Airflow user allowed to open the Airflow website."""
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
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails

    allowed = auth_manager().is_authorized_dag(
        method="GET", access_entity=DagAccessEntity.RUN, details=DagDetails(id=dag_id), user=user
    )
    if not allowed:
        raise Forbidden(f"Your Airflow role may not read runs of {dag_id}.")


def login_url(next_url: str) -> str | None:
    """The auth manager's login page, returning to ``next_url``; None if it cannot say."""
    try:
        return auth_manager().get_url_login(next_url=next_url)
    except Exception:  # a login link is a convenience on an error page, never a reason to fail
        return None
