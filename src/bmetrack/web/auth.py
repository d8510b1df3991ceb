"""Sessions, CSRF tokens, login rate limiting and role checks of the web app.

- The session cookie is signed (Starlette ``SessionMiddleware``, itsdangerous),
  HttpOnly and SameSite=Lax. Its key comes from ``BMETRACK_SECRET`` or, when
  unset, from a file ``<database>.secret`` created beside a SQLite database
  (mode 0600; other databases without the variable get a key per process, so
  sessions end when the server restarts).
- Every POST must carry the session's CSRF token, as the form field
  ``csrf_token`` or the header ``X-CSRF-Token`` (HTMX requests); else 403.
- Failed logins are counted per (user name, client address) and per address;
  too many within the window answer 429.
- Roles are checked on every route by :func:`require_roles`; no session means
  a redirect to /login for pages and 401 for HTMX/API requests.
"""

from __future__ import annotations

import hmac
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from sqlalchemy import Engine, bindparam, select

from bmetrack.study.models import User, UserRole

__all__ = [
    "CSRF_FIELD",
    "CSRF_HEADER",
    "CurrentUser",
    "LoginRateLimiter",
    "NotLoggedInError",
    "UserCache",
    "check_csrf",
    "csrf_token",
    "load_secret",
    "require_roles",
]

CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
SECRET_ENV = "BMETRACK_SECRET"


def load_secret(engine: Engine) -> str:
    """The session-signing key: ``BMETRACK_SECRET``, else a file beside the SQLite database."""
    value = os.environ.get(SECRET_ENV, "").strip()
    if value:
        return value
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":
        return secrets.token_urlsafe(32)
    path = Path(database).with_suffix(Path(database).suffix + ".secret")
    if path.exists():
        return path.read_text("utf-8").strip()
    key = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(key)
    return key


def csrf_token(request: Request) -> str:
    """The session's CSRF token (created on first use)."""
    token = request.session.get(CSRF_FIELD)
    if not token:
        token = secrets.token_urlsafe(32)
        request.session[CSRF_FIELD] = token
    return str(token)


async def check_csrf(request: Request) -> None:
    """Refuse (403) any POST whose token is missing or not the session's."""
    if request.method != "POST":
        return
    expected = request.session.get(CSRF_FIELD)
    given = request.headers.get(CSRF_HEADER)
    if not given:
        form = await request.form()
        value = form.get(CSRF_FIELD)
        given = value if isinstance(value, str) else None
    if not expected or not given or not hmac.compare_digest(str(expected), given):
        raise HTTPException(
            status_code=403, detail="Missing or invalid CSRF token; reload the page."
        )


@dataclass(frozen=True)
class CurrentUser:
    id: int
    username: str
    role: UserRole

    def can(self, *roles: UserRole) -> bool:
        return self.role in roles


class NotLoggedInError(Exception):
    """No valid session; pages redirect to /login, HTMX/API requests get 401."""


def wants_page(request: Request) -> bool:
    """True for a browser page request (not HTMX, not /api)."""
    return not request.headers.get("HX-Request") and not request.url.path.startswith("/api/")


_USER_QUERY = select(User.id, User.username, User.role, User.active).where(
    User.id == bindparam("user_id")
)


class UserCache:
    """Active users by id, read once per database data version.

    Any committed write (a role change, a deactivation, even one made directly in
    the database) gives a new data version, so a changed user is re-read at once.
    """

    def __init__(self, max_items: int = 1024) -> None:
        self.max_items = max_items
        self._users: dict[int, tuple[Hashable, CurrentUser | None]] = {}
        self._lock = threading.Lock()

    def get(self, engine: Engine, version: Hashable, user_id: int) -> CurrentUser | None:
        """The active user ``user_id`` at ``version``; None if unknown or deactivated."""
        cached = self._users.get(user_id)
        if cached is not None and cached[0] == version:
            return cached[1]
        with engine.connect() as connection:
            row = connection.execute(_USER_QUERY, {"user_id": user_id}).one_or_none()
        user = (
            None
            if row is None or not row.active
            else CurrentUser(int(row.id), str(row.username), UserRole(row.role))
        )
        with self._lock:
            if len(self._users) >= self.max_items:
                self._users.clear()
            self._users[user_id] = (version, user)
        return user


def require_roles(*roles: UserRole) -> Callable[[Request], Awaitable[CurrentUser]]:
    """Dependency: the logged-in, active user, whose role must be one of ``roles``.

    With no roles given any logged-in user passes. The user is re-read from
    the database whenever the data version changed (:class:`UserCache`), so
    deactivation and role changes apply at once.
    """
    allowed = set(roles)

    async def dependency(request: Request) -> CurrentUser:
        user_id = request.session.get("user_id")
        if not isinstance(user_id, int):
            raise NotLoggedInError
        state = request.app.state
        # On the event loop: a cached user costs a dict lookup, a new one a primary-key
        # query, and a thread-pool hop costs more than either.
        current = state.users.get(state.engine, state.data_version.current(), user_id)
        if current is None:
            request.session.clear()
            raise NotLoggedInError
        if allowed and current.role not in allowed:
            raise HTTPException(
                status_code=403,
                detail=f"Your role ({current.role.value}) may not do this.",
            )
        request.state.user = current
        return current

    return dependency


class LoginRateLimiter:
    """At most ``max_failures`` failed logins per (name, address) within ``window_s``.

    An address alone may fail ``4 * max_failures`` times in the window (many names).
    """

    def __init__(self, max_failures: int = 5, window_s: float = 300.0) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._failures: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        times = self._failures.setdefault(key, deque())
        while times and now - times[0] > self.window_s:
            times.popleft()
        return times

    def blocked(self, username: str, address: str) -> bool:
        now = time.monotonic()
        with self._lock:
            per_name = self._recent((username.strip().lower(), address), now)
            per_address = self._recent(("", address), now)
            return len(per_name) >= self.max_failures or len(per_address) >= 4 * self.max_failures

    def failed(self, username: str, address: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._recent((username.strip().lower(), address), now).append(now)
            self._recent(("", address), now).append(now)

    def succeeded(self, username: str, address: str) -> None:
        with self._lock:
            self._failures.pop((username.strip().lower(), address), None)


AnyUser = Annotated[CurrentUser, Depends(require_roles())]
Editor = Annotated[CurrentUser, Depends(require_roles(UserRole.DATA_ENTRY, UserRole.ADMIN))]
Reviewer = Annotated[CurrentUser, Depends(require_roles(UserRole.RADIOLOGIST, UserRole.ADMIN))]
Admin = Annotated[CurrentUser, Depends(require_roles(UserRole.ADMIN))]
