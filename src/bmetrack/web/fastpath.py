"""Serve cached read-only pages before routing: the cheap path for the busiest requests.

:func:`bmetrack.web.app.render_cached` keeps the timeline and dashboard HTML per
(page, role, data version) and notes which request path and query string each page
answers. For a GET of such a path, :class:`CachedPageMiddleware` does only what the
full path would do for a cached page and nothing else:

1. read the signed session cookie (a verified cookie is remembered, so the HMAC
   and JSON decoding run once per cookie, its expiry is still checked every time);
2. look up the user, re-read from the database when the data version changed, so a
   deactivated user is refused at once, as on every route;
3. send the page cached for this page, the user's role and the current data version,
   with this user's CSRF token and name filled in.

Anything else (no cookie, an expired or forged one, no CSRF token in the session,
a page not cached for this role and data version) goes through the app unchanged,
where the route checks the role and builds the page. A page is only ever cached by
its route for a role that route admitted, so serving it here to a user of the same
role grants nothing the route would not.
"""

from __future__ import annotations

import json
import time
from base64 import b64decode
from typing import Any

import itsdangerous
from sqlalchemy import Engine

from bmetrack.web.auth import CSRF_FIELD, UserCache
from bmetrack.web.cache import DataVersion, LruCache, PageCache

__all__ = ["SECURITY_HEADERS", "CachedPageMiddleware"]

SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
        b"script-src 'self'; frame-ancestors 'none'; form-action 'self'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
]

_PAGE_HEADERS = [
    (b"content-type", b"text/html; charset=utf-8"),
    (b"vary", b"Cookie"),
    *SECURITY_HEADERS,
    (b"cache-control", b"no-store"),
]


class CachedPageMiddleware:
    """ASGI middleware answering GETs of cached pages without routing (see the module).

    Parameters
    ----------
    app : ASGI app
        The rest of the stack (session middleware, routes).
    secret_key, cookie_name, max_age_s
        Those of the session middleware: the cookie is verified exactly as it would.
    engine, data_version, users, pages
        The app's database engine, :class:`DataVersion`, :class:`UserCache` and
        :class:`PageCache`.
    """

    def __init__(
        self,
        app: Any,
        *,
        secret_key: str,
        cookie_name: str,
        max_age_s: int,
        engine: Engine,
        data_version: DataVersion,
        users: UserCache,
        pages: PageCache,
    ) -> None:
        self.app = app
        self.signer = itsdangerous.TimestampSigner(secret_key)
        self.cookie_prefix = cookie_name + "="
        self.max_age_s = max_age_s
        self.engine = engine
        self.data_version = data_version
        self.users = users
        self.pages = pages
        # Raw cookie value -> (user id, CSRF token, expiry as time.time()).
        self.sessions = LruCache(4096)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            body = self._cached_page(scope)
            if body is not None:
                self.pages.fast_hits += 1
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            *_PAGE_HEADERS,
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    def _cached_page(self, scope: Any) -> bytes | None:
        key = self.pages.lookup(scope["path"], scope.get("query_string", b""))
        if key is None:
            return None
        session = self._session(scope)
        if session is None:
            return None
        user_id, csrf = session
        version = self.data_version.current()
        user = self.users.get(self.engine, version, user_id)
        if user is None:
            return None  # the app clears the session and redirects to /login
        html = self.pages.cached(
            self.pages.key_now(key), version, user.role.value, csrf=csrf, username=user.username
        )
        return None if html is None else html.encode()

    def _cookie(self, scope: Any) -> str | None:
        """The session cookie's value; the last one if sent twice, as Starlette reads it."""
        found = None
        for name, value in scope["headers"]:
            if name == b"cookie":
                for part in value.decode("latin-1").split(";"):
                    part = part.strip()
                    if part.startswith(self.cookie_prefix):
                        found = part[len(self.cookie_prefix) :]
        return found

    def _session(self, scope: Any) -> tuple[int, str] | None:
        """(user id, CSRF token) of a valid, unexpired session cookie, else None."""
        raw = self._cookie(scope)
        if not raw:
            return None
        known: tuple[int, str, float] | None = self.sessions.get(raw)
        if known is None:
            known = self._verify(raw)
            if known is None:
                return None
            self.sessions.put(raw, known)
        user_id, csrf, expires = known
        if time.time() >= expires:
            return None
        return user_id, csrf

    def _verify(self, raw: str) -> tuple[int, str, float] | None:
        try:
            data, signed = self.signer.unsign(
                raw.encode(), max_age=self.max_age_s, return_timestamp=True
            )
            session: Any = json.loads(b64decode(data))
        except (itsdangerous.BadSignature, ValueError):
            return None
        if not isinstance(session, dict):
            return None
        user_id, csrf = session.get("user_id"), session.get(CSRF_FIELD)
        if not isinstance(user_id, int) or not isinstance(csrf, str) or not csrf:
            return None
        return user_id, csrf, signed.timestamp() + self.max_age_s
