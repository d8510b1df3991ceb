"""Loopback load test of the web app: N concurrent clients browse dashboard + timeline pages.

Three processes, so the clients do not share the server's interpreter (GIL):

1. this one builds a simulated study in a temporary database (``/tmp/webv2_load_*``),
   starts the server, warms the caches, starts the clients and writes the results;
2. the server: ``python web_load.py serve`` = uvicorn (httptools/uvloop when installed,
   else h11/asyncio), one worker, on a free 127.0.0.1 port;
3. the clients: ``python web_load.py clients`` = N asyncio clients, each logged in as a
   viewer (its own session cookie and CSRF token), each on its own HTTP/1.1 keep-alive
   connection, fetching the dashboard and every patient's timeline in turn, one request
   at a time (no think time) for DURATION seconds or MAX_REQUESTS.

The clients speak HTTP/1.1 over asyncio streams directly (a few dozen lines below)
instead of through an HTTP library: httpx costs about as much CPU per request as the
server itself, so on a 2-core machine the load generator took the server's core. With
``--pin`` (default on machines with 2+ cores) the server runs on CPU 0 and the clients
on CPU 1.

Writes requests/s, p50/p95/max latency, errors, load average before/after and the CPU
time of server and clients to benchmarks/results/web_load.json.

    python benchmarks/web_load.py [--clients 50] [--duration 60] [--patients 20] [--no-pin]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

PASSWORD = "load test password"
USER = "viewer"
COOKIE = "bmetrack_session"
_CSRF = re.compile(rb'name="csrf_token" value="([^"]+)"')
_COOKIE_VALUE = re.compile(rb"^" + COOKIE.encode() + rb"=([^;]*)")


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pin(cpu: int) -> None:
    """Run this process on one CPU (Linux); silently nothing elsewhere."""
    if hasattr(os, "sched_setaffinity") and cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {cpu})


# --- a lean HTTP/1.1 keep-alive client ------------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection with a session cookie, like one browser tab."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.cookie = b""
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.retries = 0

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.reader is None or self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self.reader, self.writer

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(
        self, method: str, path: str, body: bytes = b"", content_type: str = ""
    ) -> tuple[int, bytes]:
        """Send one request and read the whole response; returns (status, body).

        Like a browser, a request on a reused connection that the server had already
        closed (idle keep-alive timeout) is sent once more on a new connection, but
        only when not a byte of the response had arrived.
        """
        reused = self.writer is not None and not self.writer.is_closing()
        try:
            return await self._request(method, path, body, content_type)
        except (asyncio.IncompleteReadError, ConnectionError) as error:
            partial = getattr(error, "partial", b"")
            if not reused or partial:
                raise
            self.close()
            self.retries += 1
            return await self._request(method, path, body, content_type)

    async def _request(
        self, method: str, path: str, body: bytes, content_type: str
    ) -> tuple[int, bytes]:
        reader, writer = await self._open()
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        if self.cookie:
            lines.append(f"Cookie: {COOKIE}={self.cookie.decode()}")
        if body or method == "POST":
            lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = -1
        chunked = close = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and value.lower() == b"close":
                close = True
            elif name == b"set-cookie":
                match = _COOKIE_VALUE.match(value)
                if match:
                    self.cookie = match.group(1)
        if chunked:
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                parts.append(await reader.readexactly(size + 2))
                if size == 0:
                    break
            data = b"".join(part[:-2] for part in parts)
        elif length >= 0:
            data = await reader.readexactly(length)
        else:
            data = await reader.read()
            close = True
        if close:
            self.close()
        return status, data

    async def login(self, username: str, password: str) -> None:
        status, page = await self.request("GET", "/login")
        match = _CSRF.search(page)
        if status != 200 or not match:
            msg = f"GET /login gave {status} without a CSRF token"
            raise RuntimeError(msg)
        form = urlencode(
            {"username": username, "password": password, "csrf_token": match.group(1).decode()}
        ).encode()
        status, _ = await self.request("POST", "/login", form, "application/x-www-form-urlencoded")
        if status != 303:
            msg = f"POST /login gave {status}, expected 303"
            raise RuntimeError(msg)


# --- process 2: the server ------------------------------------------------------------------


def serve(db_path: Path, port: int, cache_dir: Path, cpu: int | None) -> None:
    import uvicorn

    from bmetrack.web.app import WebSettings, create_app

    if cpu is not None:
        _pin(cpu)
    app = create_app(db_path, WebSettings(secret_key="bench", cache_dir=cache_dir))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --- process 3: the clients -----------------------------------------------------------------


async def _client(
    host: str,
    port: int,
    paths: list[str],
    offset: int,
    ready: asyncio.Barrier,
    logins: asyncio.Semaphore,
    window: dict[str, float],
    budget: list[int],
    latencies: list[float],
    errors: list[str],
    retries: list[int],
) -> None:
    connection = Connection(host, port)
    async with logins:  # two at a time: 50 argon2 hashes at once only heat the machine
        await connection.login(USER, PASSWORD)
    await ready.wait()  # logins (argon2, deliberately slow) are not part of the measurement
    connection.close()  # the server may have closed it while the others logged in
    if "start" not in window:
        window["start"] = time.perf_counter()
        window["cpu_start"] = time.process_time()
        print("ready", flush=True)  # the parent samples the server's CPU time now
    stop_at = window["start"] + window["duration"]
    i = offset  # clients start at different pages, like users do
    clock = time.perf_counter
    while clock() < stop_at and budget[0] > 0:
        budget[0] -= 1
        path = paths[i % len(paths)]
        i += 1
        start = clock()
        try:
            status, _ = await connection.request("GET", path)
            if status != 200:
                errors.append(f"{path}: {status}")
        except (OSError, asyncio.IncompleteReadError, ValueError) as error:
            errors.append(f"{path}: {error!r}")
            connection.close()
        latencies.append(clock() - start)
    window["end"] = max(window.get("end", 0.0), clock())
    retries.append(connection.retries)
    connection.close()


def clients(
    base: str, n_clients: int, duration_s: float, max_requests: int, out: Path, cpu: int | None
) -> None:
    if cpu is not None:
        _pin(cpu)
    host, port = base.removeprefix("http://").rsplit(":", 1)
    paths = json.loads(os.environ["BMETRACK_LOAD_PATHS"])
    latencies: list[float] = []
    errors: list[str] = []
    window: dict[str, float] = {"duration": duration_s}
    budget = [max_requests]
    retries: list[int] = []

    async def run_all() -> None:
        ready = asyncio.Barrier(n_clients)
        logins = asyncio.Semaphore(2)
        await asyncio.gather(
            *(
                _client(
                    host,
                    int(port),
                    paths,
                    k,
                    ready,
                    logins,
                    window,
                    budget,
                    latencies,
                    errors,
                    retries,
                )
                for k in range(n_clients)
            )
        )

    asyncio.run(run_all())
    out.write_text(
        json.dumps(
            {
                "elapsed_s": window["end"] - window["start"],
                "clients_cpu_s_in_window": time.process_time() - window["cpu_start"],
                "latencies_s": latencies,
                "errors": errors,
                "retries_on_closed_keep_alive": sum(retries),
            }
        )
    )


# --- process 1: set up, run, report ---------------------------------------------------------


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc), or None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _server_stack() -> str:
    import importlib.util

    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return f"uvicorn ({http}, {loop}, 1 worker)"


def _warm(base: str, paths: list[str]) -> dict[str, float]:
    """Log in once and fetch every page: the first dashboard runs the whole analysis."""

    async def run() -> dict[str, float]:
        host, port = base.removeprefix("http://").rsplit(":", 1)
        connection = Connection(host, int(port))
        await connection.login(USER, PASSWORD)
        first: dict[str, float] = {}
        for path in paths:
            start = time.perf_counter()
            status, _ = await asyncio.wait_for(connection.request("GET", path), 300)
            assert status == 200, (path, status)
            first[path] = time.perf_counter() - start
        connection.close()
        return first

    return asyncio.run(run())


def _wait_until_up(base: str, server: subprocess.Popen[bytes]) -> None:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2.0):
                return
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the server did not start") from None
            time.sleep(0.2)


def main(args: argparse.Namespace) -> None:
    from bmetrack.simulate.cohort import CohortParameters, simulate_cohort
    from bmetrack.study import db
    from bmetrack.study.importers import import_tables
    from bmetrack.study.users import create_user

    folder = Path(tempfile.mkdtemp(prefix="webv2_load_"))
    db_path = folder / "study.db"
    engine = db.make_engine(db_path)
    db.upgrade(engine)
    cohort = simulate_cohort(CohortParameters(n_patients=args.patients), seed=3)
    import_tables(engine, "LOAD", cohort.frames, "bench")
    with db.session_scope(engine) as session:
        create_user(session, USER, PASSWORD, "viewer", actor="bench")
    engine.dispose()

    pin = args.pin and (os.cpu_count() or 1) >= 2
    server_cpu_id, clients_cpu_id = (0, 1) if pin else (None, None)
    port = _port()
    base = f"http://127.0.0.1:{port}"
    script = str(Path(__file__).resolve())
    server = subprocess.Popen(
        [
            sys.executable,
            script,
            "serve",
            str(db_path),
            str(port),
            str(folder / "cache"),
            str(server_cpu_id),
        ]
    )
    try:
        _wait_until_up(base, server)
        paths = ["/dashboard"] + [f"/patients/{i}/timeline" for i in range(1, args.patients + 1)]
        first = _warm(base, paths)
        raw = folder / "client-results.json"
        env = {**os.environ, "BMETRACK_LOAD_PATHS": json.dumps(paths)}
        command = [
            sys.executable,
            script,
            "clients",
            base,
            str(args.clients),
            str(args.duration),
            str(args.max_requests),
            str(raw),
            str(clients_cpu_id),
        ]
        load_average_before = os.getloadavg()
        with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) as load:
            assert load.stdout is not None
            line = load.stdout.readline()  # after the logins
            assert line.strip() == "ready", line
            server_cpu_before = _cpu_s(server.pid)
            load.wait(timeout=args.duration + 300)
            server_cpu_after = _cpu_s(server.pid)
        load_average_after = os.getloadavg()
        if load.returncode != 0:
            msg = f"the load clients failed (exit code {load.returncode})"
            raise RuntimeError(msg)
        server_cpu = (
            None
            if server_cpu_before is None or server_cpu_after is None
            else server_cpu_after - server_cpu_before
        )
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=15)
    measured = json.loads(raw.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    ordered = sorted(measured["latencies_s"])
    elapsed = measured["elapsed_s"]
    errors = measured["errors"]
    n = len(ordered)
    result = {
        "clients": args.clients,
        "duration_s": round(elapsed, 2),
        "patients": args.patients,
        "pages": "dashboard + every patient timeline, round robin, no think time",
        "setup": (
            f"{_server_stack()} in its own process; clients (asyncio, raw HTTP/1.1 keep-alive, "
            "one connection and logged-in viewer session each) in another; loopback; SQLite; "
            "cached pages after one warm-up pass"
            + ("; server pinned to CPU 0, clients to CPU 1" if pin else "")
        ),
        "machine": f"{os.cpu_count()} cores, Python {platform.python_version()}",
        # Other jobs on the machine share its cores: a 1-minute load average far above the
        # core count means the numbers below measure a contended machine.
        "load_average_1min_before_after": [
            round(load_average_before[0], 1),
            round(load_average_after[0], 1),
        ],
        "requests": n,
        "requests_per_s": round(n / elapsed, 1),
        "p50_ms": round(1000 * statistics.median(ordered), 1) if ordered else None,
        "p95_ms": round(1000 * _percentile(ordered, 0.95), 1) if ordered else None,
        "max_ms": round(1000 * ordered[-1], 1) if ordered else None,
        "errors": len(errors),
        "error_examples": errors[:5],
        "retries_on_closed_keep_alive": measured["retries_on_closed_keep_alive"],
        "server_cpu_percent_of_one_core_in_window": (
            None if server_cpu is None else round(100 * server_cpu / elapsed)
        ),
        "server_cpu_ms_per_request": (
            None if server_cpu is None or not n else round(1000 * server_cpu / n, 2)
        ),
        "clients_cpu_percent_of_one_core_in_window": round(
            100 * measured["clients_cpu_s_in_window"] / elapsed
        ),
        "first_dashboard_build_s": round(first["/dashboard"], 2),
        "first_timeline_build_ms_median": round(
            1000 * statistics.median(v for k, v in first.items() if k != "/dashboard"), 1
        ),
        "target": "0 errors, p95 < 300 ms",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--patients", type=int, default=20)
    parser.add_argument(
        "--max-requests", type=int, default=2_000_000, help="Bound on all requests."
    )
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Server on CPU 0, clients on CPU 1 (Linux, 2+ cores).",
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "web_load.json"
    )
    return parser.parse_args()


def _cpu_arg(text: str) -> int | None:
    return None if text == "None" else int(text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), _cpu_arg(sys.argv[5]))
    elif len(sys.argv) > 1 and sys.argv[1] == "clients":
        _, _, base_url, n, seconds, limit, out_path, cpu_text = sys.argv
        clients(base_url, int(n), float(seconds), int(limit), Path(out_path), _cpu_arg(cpu_text))
    else:
        main(_parse())
