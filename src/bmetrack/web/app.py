"""The web app: FastAPI + Jinja2 templates + vendored HTMX, server-rendered.

Routes are thin: they parse a form, call the same library functions as the
CLI (:mod:`bmetrack.study.records`, :mod:`bmetrack.study.review`,
:mod:`bmetrack.study.users`, :mod:`bmetrack.analysis.run`) and render what
they return. Jinja2 autoescapes every value, so text typed by users (notes,
drug names, reasons) is shown inert.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.middleware.sessions import SessionMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bmetrack.study.db import make_engine, require_current_schema, session_scope
from bmetrack.web.auth import (
    CSRF_HEADER,
    CurrentUser,
    LoginRateLimiter,
    NotLoggedInError,
    UserCache,
    check_csrf,
    csrf_token,
    load_secret,
    wants_page,
)
from bmetrack.web.cache import DataVersion, PageCache
from bmetrack.web.fastpath import SECURITY_HEADERS, CachedPageMiddleware

__all__ = ["WebSettings", "create_app", "render", "render_cached"]

_HERE = Path(__file__).parent
SESSION_COOKIE = "bmetrack_session"


@dataclass
class WebSettings:
    """Options of one web app instance.

    secret_key : session-signing key (default: ``BMETRACK_SECRET`` or a file beside the db).
    cache_dir : rendered slices and dashboard figures (default: a new temporary folder).
    page_cache_items, page_cache_max_age_s : rendered timeline/dashboard pages kept, and how
        long one is served at most when the database gives no exact data version (then the
        audit counter stands in, which a write outside :mod:`bmetrack.study.records` or
        two PostgreSQL transactions committing out of id order could miss).
    https_only : mark the session cookie Secure (set when served behind HTTPS).
    """

    secret_key: str | None = None
    cache_dir: Path | None = None
    https_only: bool = False
    login_max_failures: int = 5
    login_window_s: float = 300.0
    session_max_age_s: int = 8 * 3600
    slice_cache_items: int = 512
    page_cache_items: int = 256
    page_cache_max_age_s: float = 30.0
    extra: dict[str, Any] = field(default_factory=dict)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["num"] = _num
    return env


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if number != number:  # NaN
        return "–"
    return f"{number:.{digits}f}"


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """Render ``template`` with the user, CSRF token and request in the context."""
    env: jinja2.Environment = request.app.state.templates
    context.setdefault("user", getattr(request.state, "user", None))
    html = env.get_template(template).render(
        request=request, csrf=csrf_token(request), csrf_header=CSRF_HEADER, **context
    )
    return HTMLResponse(html, status_code=status_code)


async def render_cached(
    request: Request,
    user: CurrentUser,
    key: Hashable,
    template: str,
    context: Callable[[Session], dict[str, Any]],
) -> HTMLResponse:
    """Render a read-only page once per (key, role, data version), fill in this user's parts.

    ``context(session)`` is only called when the page is not cached (the template
    is rendered inside the same database session, so it may hold ORM objects);
    it must depend on nothing but ``key``, the user's role and the database, and
    ``key`` must stand for this request's path and query string: later requests
    for them are answered from the cache by :class:`CachedPageMiddleware`.
    A cached page is served on the event loop; building one runs in the thread pool.
    """
    engine: Engine = request.app.state.engine
    pages: PageCache = request.app.state.pages
    # Read before the page is built: a write in between gives a newer version, never an
    # old page under a new version.
    counter = request.app.state.data_version.current()
    full_key = pages.key_now(key)
    role = user.role.value
    csrf = csrf_token(request)
    html = pages.cached(full_key, counter, role, csrf=csrf, username=user.username)
    if html is not None:
        _remember(request, pages, key)
        return HTMLResponse(html)
    env: jinja2.Environment = request.app.state.templates

    def build(csrf_marker: str, user_marker: str) -> str:
        stand_in = CurrentUser(user.id, user_marker, user.role)
        with session_scope(engine) as session:
            return env.get_template(template).render(
                request=request,
                csrf=csrf_marker,
                csrf_header=CSRF_HEADER,
                user=stand_in,
                **context(session),
            )

    html = await run_in_threadpool(
        pages.page, full_key, counter, role, build, csrf=csrf, username=user.username
    )
    _remember(request, pages, key)
    return HTMLResponse(html)


def _remember(request: Request, pages: PageCache, key: Hashable) -> None:
    """Let CachedPageMiddleware answer this path and query string from now on."""
    pages.remember(request.scope["path"], request.scope.get("query_string", b""), key)


_SECURITY_HEADERS = SECURITY_HEADERS


class SecurityHeadersMiddleware:
    """Security headers on every response; ``no-store`` on all but static files.

    A plain ASGI middleware (not ``@app.middleware``, which copies every
    response body through extra tasks and costs about a millisecond a request).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = str(scope.get("path", "")).startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                extra = list(_SECURITY_HEADERS)
                if not static:
                    extra.append((b"cache-control", b"no-store"))
                headers += [(name, value) for name, value in extra if name not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(
    db: str | os.PathLike[str] | Engine | None = None, settings: WebSettings | None = None
) -> FastAPI:
    """Build the app for the study database ``db`` (URL, SQLite path, or Engine)."""
    from bmetrack.web import (
        routes_admin,
        routes_auth,
        routes_clinical,
        routes_dashboard,
        routes_imaging,
        routes_patients,
    )

    settings = settings or WebSettings()
    engine = db if isinstance(db, Engine) else make_engine(db)
    require_current_schema(engine)
    cache_dir = settings.cache_dir or Path(tempfile.mkdtemp(prefix="bmetrack-web-"))
    cache_dir.mkdir(parents=True, exist_ok=True)

    app = FastAPI(
        title="bmetrack",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        dependencies=[Depends(check_csrf)],
    )
    app.state.engine = engine
    app.state.settings = settings
    app.state.cache_dir = cache_dir
    app.state.templates = _environment()
    app.state.limiter = LoginRateLimiter(settings.login_max_failures, settings.login_window_s)
    app.state.dashboard = routes_dashboard.DashboardCache(cache_dir / "dashboard")
    app.state.slices = routes_imaging.SliceCache(cache_dir / "slices", settings.slice_cache_items)
    app.state.data_version = DataVersion(engine)
    app.state.users = UserCache()
    app.state.pages = PageCache(
        settings.page_cache_items,
        None if app.state.data_version.exact else settings.page_cache_max_age_s,
    )

    app.add_middleware(SecurityHeadersMiddleware)

    # Added after the others, so it runs before them: the session is available to all.
    secret_key = settings.secret_key or load_secret(engine)
    app.add_middleware(
        SessionMiddleware,
        secret_key=secret_key,
        session_cookie=SESSION_COOKIE,
        max_age=settings.session_max_age_s,
        same_site="lax",
        https_only=settings.https_only,
    )
    # Outermost: cached pages for logged-in users are answered before any routing.
    app.add_middleware(
        CachedPageMiddleware,
        secret_key=secret_key,
        cookie_name=SESSION_COOKIE,
        max_age_s=settings.session_max_age_s,
        engine=engine,
        data_version=app.state.data_version,
        users=app.state.users,
        pages=app.state.pages,
    )

    @app.exception_handler(NotLoggedInError)
    async def not_logged_in(request: Request, _error: NotLoggedInError) -> Response:
        if wants_page(request):
            return RedirectResponse("/login", status_code=303)
        return PlainTextResponse("Not logged in.", status_code=401)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> Response:
        if wants_page(request) and error.status_code in (403, 404, 409, 429):
            return render(
                request,
                "error.html",
                status_code=error.status_code,
                status=error.status_code,
                message=str(error.detail),
            )
        return PlainTextResponse(str(error.detail), status_code=error.status_code)

    app.mount("/static", StaticFiles(directory=_HERE / "static"), name="static")
    # routes_patients first: its /patients/new must match before /patients/{patient_id}.
    routers = (
        routes_auth,
        routes_patients,
        routes_clinical,
        routes_imaging,
        routes_dashboard,
        routes_admin,
    )
    for module in routers:
        app.include_router(module.router)
    return app
