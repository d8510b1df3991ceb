"""The load benchmark's own HTTP/1.1 client, against a live uvicorn server.

benchmarks/web_load.py measures with a hand-written keep-alive client; these tests
check that it logs in, keeps its session and reads whole responses exactly as a
standard client (Starlette's TestClient) sees them.
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
import shutil
import socket
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import pytest
from fastapi.testclient import TestClient
from webtest_support import PASSWORD, login

from bmetrack.study import db
from bmetrack.web.app import WebSettings, create_app

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "web_load.py"


def _bench() -> ModuleType:
    name = "bmetrack_bench_web_load"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture
def live_app(tmp_path, web_template):
    import uvicorn

    path = tmp_path / "study.db"
    shutil.copyfile(web_template, path)
    engine = db.make_engine(path)
    app = create_app(engine, WebSettings(secret_key="load-client", cache_dir=tmp_path / "c"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.1)
    yield app, port
    server.should_exit = True
    thread.join(timeout=10)
    engine.dispose()


def test_load_client_sees_what_a_standard_client_sees(live_app):
    app, port = live_app
    bench = _bench()
    paths = ["/dashboard", "/patients/1/timeline", "/patients/2/timeline"]

    async def fetch() -> list[tuple[int, bytes]]:
        connection = bench.Connection("127.0.0.1", port)
        assert (await connection.request("GET", "/dashboard"))[0] == 303  # not logged in
        await connection.login("viewer", PASSWORD)
        # Twice on one keep-alive connection: built by the route, then from the cache.
        pages = [await connection.request("GET", p) for p in paths + paths]
        connection.close()
        return pages

    pages = asyncio.run(fetch())
    assert [status for status, _ in pages] == [200] * 6
    assert app.state.pages.fast_hits >= 3
    with TestClient(app, follow_redirects=False) as reference:
        login(reference, "viewer")
        for path, (_, body) in zip(paths, pages[3:], strict=True):
            expected = reference.get(path).content
            # The same page but for the CSRF token, which is per session.
            ours, theirs = _token(body), _token(expected)
            assert ours != theirs
            assert body.replace(ours, b"TOKEN") == expected.replace(theirs, b"TOKEN"), path


def _token(page: bytes) -> bytes:
    match = re.search(rb'name="csrf_token" value="([^"]+)"', page)
    assert match, "no CSRF token in the page"
    return match.group(1)
