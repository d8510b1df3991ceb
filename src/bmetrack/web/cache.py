"""Bounded in-process caches of the web app: an LRU mapping and rendered read-only pages.

Pages such as the timeline and the dashboard are the same for every user of
one role until the study data change, so their HTML is kept per
(page, role, change counter). The change counter is the newest audit event
id, which every write through :mod:`bmetrack.study.records` and
:mod:`bmetrack.study.review` advances: a stale page is never served. What
differs between users of one role (the CSRF token, the user name) is
rendered as a random marker and filled in per request.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from markupsafe import escape
from sqlalchemy import Engine, func, select

from bmetrack.study.models import AuditEvent

__all__ = ["LruCache", "PageCache", "change_counter"]


def change_counter(engine: Engine) -> int:
    """Newest audit event id: changes whenever study data changes."""
    with engine.connect() as connection:
        return int(connection.execute(select(func.max(AuditEvent.id))).scalar() or 0)


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
    """Rendered HTML per (page key, role, change counter), with per-user markers.

    Parameters
    ----------
    max_items : int
        Pages kept; old counters fall out of the LRU on their own.
    """

    def __init__(self, max_items: int = 256) -> None:
        self.pages = LruCache(max_items)
        self.csrf_marker = f"csrf-{secrets.token_hex(12)}"
        self.user_marker = f"user-{secrets.token_hex(12)}"

    def page(
        self,
        key: Hashable,
        counter: int,
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
        self, key: Hashable, counter: int, role: str, *, csrf: str, username: str
    ) -> str | None:
        """The page for this user if it is cached (never builds, never waits on a build)."""
        html: str | None = self.pages.get((key, role, counter))
        return None if html is None else self._fill(html, csrf, username)

    def _fill(self, html: str, csrf: str, username: str) -> str:
        return html.replace(self.csrf_marker, str(escape(csrf))).replace(
            self.user_marker, str(escape(username))
        )
