"""Bounded in-process caches of the web app: an LRU mapping and rendered read-only pages.

Pages such as the timeline and the dashboard are the same for every user of
one role until the study data change, so their HTML is kept per
(page, role, data version). The data version (:class:`DataVersion`) changes
whenever any write is committed to the database, by this process or any
other: a stale page is never served. What differs between users of one role
(the CSRF token, the user name) is rendered as a random marker and filled in
per request.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

from markupsafe import escape
from sqlalchemy import Engine, func, select, text

from bmetrack.study.models import AuditEvent

__all__ = ["DataVersion", "LruCache", "PageCache", "change_counter"]


def change_counter(engine: Engine) -> int:
    """Newest audit event id: changes whenever study data changes."""
    with engine.connect() as connection:
        return int(connection.execute(select(func.max(AuditEvent.id))).scalar() or 0)


class DataVersion:
    """A value that changes whenever a write is committed to the database.

    - SQLite file: ``PRAGMA data_version`` on a connection of its own that never
      writes; it changes with every commit by any other connection, of this
      process or another (CLI imports, a second server), and costs microseconds.
    - PostgreSQL: the text of ``pg_current_snapshot()`` (xmin:xmax:running ids),
      which changes whenever a writing transaction starts or ends.
    - Otherwise (in-memory SQLite, old PostgreSQL): the newest audit event id, which
      every write through :mod:`bmetrack.study.records` advances; ``exact`` is then
      False and callers should also bound how long they keep what they cache.

    ``current()`` is thread-safe.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._sqlite: sqlite3.Connection | None = None
        self._postgres = False
        database = engine.url.database
        if engine.dialect.name == "sqlite" and database and database != ":memory:":
            path = Path(database)
            if path.exists():
                # Autocommit (no transaction held open): each PRAGMA sees the newest commit.
                self._sqlite = sqlite3.connect(
                    f"{path.resolve().as_uri()}?mode=ro",
                    uri=True,
                    check_same_thread=False,
                    isolation_level=None,
                )
        elif engine.dialect.name == "postgresql":
            try:
                with engine.connect() as connection:
                    connection.execute(text("SELECT pg_current_snapshot()::text")).scalar()
                self._postgres = True
            except Exception:  # before PostgreSQL 13: fall back to the audit counter
                self._postgres = False
        self.exact = self._sqlite is not None or self._postgres

    def current(self) -> Hashable:
        """The version now (compare for equality only)."""
        if self._sqlite is not None:
            with self._lock:
                row = self._sqlite.execute("PRAGMA data_version").fetchone()
            return int(row[0])
        if self._postgres:
            with self.engine.connect() as connection:
                return str(connection.execute(text("SELECT pg_current_snapshot()::text")).scalar())
        return change_counter(self.engine)

    def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
            self._sqlite = None
            self.exact = self._postgres


class LruCache:
    """A small thread-safe LRU mapping; ``get_or_make`` builds a missing value once.

    Concurrent requests for the same missing key wait for one build instead
    of all building it (50 browsers opening the same page after a change).
    """

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[Hashable, threading.Lock] = {}
        self.builds = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def get_or_make(self, key: Hashable, make: Callable[[], Any]) -> Any:
        value = self.get(key)
        if value is not None:
            return value
        with self._lock:
            lock = self._building.setdefault(key, threading.Lock())
        try:
            with lock:
                value = self.get(key)
                if value is None:
                    value = make()
                    self.builds += 1
                    self.put(key, value)
        finally:
            with self._lock:
                self._building.pop(key, None)
        return value


class PageCache:
    """Rendered HTML per (page key, role, data version), with per-user markers.

    Parameters
    ----------
    max_items : int
        Pages kept; pages of old data versions fall out of the LRU on their own.
    max_age_s : float, optional
        Keep a page at most this long (see :meth:`key_now`); None: while its version holds.
    """

    def __init__(self, max_items: int = 256, max_age_s: float | None = None) -> None:
        self.pages = LruCache(max_items)
        self.max_age_s = max_age_s
        # (path, query string) of a request -> the page key its route used, so that
        # CachedPageMiddleware can serve the page without routing the request.
        self.aliases = LruCache(16 * max_items)
        self.fast_hits = 0  # pages served by CachedPageMiddleware
        self.csrf_marker = f"csrf-{secrets.token_hex(12)}"
        self.user_marker = f"user-{secrets.token_hex(12)}"

    def key_now(self, key: Hashable) -> Hashable:
        """``key``, plus the current time slot when pages may live at most ``max_age_s``."""
        if self.max_age_s is None:
            return key
        return (key, int(time.monotonic() // self.max_age_s))

    def remember(self, path: str, query: bytes, key: Hashable) -> None:
        """Note that the page at ``path?query`` is cached under ``key``."""
        self.aliases.put((path, query), key)

    def lookup(self, path: str, query: bytes) -> Hashable | None:
        """The key a route used for ``path?query``, or None if it never cached that page."""
        key: Hashable | None = self.aliases.get((path, query))
        return key

    def page(
        self,
        key: Hashable,
        counter: Hashable,
        role: str,
        build: Callable[[str, str], str],
        *,
        csrf: str,
        username: str,
    ) -> str:
        """The page for this user: ``build(csrf_marker, user_marker)`` once per cache key.

        ``build`` must render the page with the markers in place of the CSRF
        token and user name (both are autoescaped plain text in the templates).
        """
        html: str = self.pages.get_or_make(
            (key, role, counter), lambda: build(self.csrf_marker, self.user_marker)
        )
        return self._fill(html, csrf, username)

    def cached(
        self, key: Hashable, counter: Hashable, role: str, *, csrf: str, username: str
    ) -> str | None:
        """The page for this user if it is cached (never builds, never waits on a build)."""
        html: str | None = self.pages.get((key, role, counter))
        return None if html is None else self._fill(html, csrf, username)

    def _fill(self, html: str, csrf: str, username: str) -> str:
        return html.replace(self.csrf_marker, str(escape(csrf))).replace(
            self.user_marker, str(escape(username))
        )
