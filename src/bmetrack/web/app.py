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
import time
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
    check_csrf,
    csrf_token,
    load_secret,
    wants_page,
)
from bmetrack.web.cache import PageCache, change_counter

__all__ = ["WebSettings", "create_app", "render", "render_cached"]

_HERE = Path(__file__).parent


@dataclass
class WebSettings:
    """Options of one web app instance.

    secret_key : session-signing key (default: ``BMETRACK_SECRET`` or a file beside the db).
    cache_dir : rendered slices and dashboard figures (default: a new temporary folder).
    page_cache_items, page_cache_max_age_s : rendered timeline/dashboard pages kept, and how
        long one is served at most (a bound on staleness should the change counter miss a
        write, e.g. two PostgreSQL transactions committing out of id order).
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
    """Render a read-only page once per (key, role, data change), fill in this user's parts.

    ``context(session)`` is only called when the page is not cached (the template
    is rendered inside the same database session, so it may hold ORM objects);
    it must depend on nothing but ``key``, the user's role and the database.
    A cached page is served on the event loop (one indexed query for the change
    counter); building one runs in the thread pool.
    """
    settings: WebSettings = request.app.state.settings
    engine: Engine = request.app.state.engine
    pages: PageCache = request.app.state.pages
    counter = change_counter(engine)
    full_key = (key, int(time.monotonic() // settings.page_cache_max_age_s))
    role = user.role.value
    csrf = csrf_token(request)
    html = pages.cached(full_key, counter, role, csrf=csrf, username=user.username)
    if html is not None:
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
    return HTMLResponse(html)


_SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
        b"script-src 'self'; frame-ancestors 'none'; form-action 'self'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
]


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
    app.state.pages = PageCache(settings.page_cache_items)

    app.add_middleware(SecurityHeadersMiddleware)

    # Added last, so it runs first: the session is available to everything above.
    app.add_middleware(
        SessionMiddleware,
        secret_key=settings.secret_key or load_secret(engine),
        session_cookie="bmetrack_session",
        max_age=settings.session_max_age_s,
        same_site="lax",
        https_only=settings.https_only,
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
    for module in (routes_auth, routes_clinical, routes_imaging, routes_dashboard, routes_admin):
        app.include_router(module.router)
    return app
