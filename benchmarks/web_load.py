"""Loopback load test of the web app: N concurrent clients browse dashboard + timeline pages.

Three processes, so the clients do not share the server's interpreter (GIL):

1. this one builds a simulated study in a temporary database (``/tmp/webv2_load_*``),
   starts the server, warms the caches, starts the clients and writes the results;
2. the server: ``python web_load.py serve`` = uvicorn, one worker, on a free
   127.0.0.1 port;
3. the clients: ``python web_load.py clients`` = N asyncio httpx clients, each logged
   in as a viewer, fetching the dashboard and every patient's timeline in turn,
   one request at a time (no think time) for DURATION seconds or MAX_REQUESTS.

Writes requests/s, p50/p95/max latency and errors to benchmarks/results/web_load.json.

    python benchmarks/web_load.py [--clients 50] [--duration 60] [--patients 20]
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

import httpx

PASSWORD = "load test password"
USER = "viewer"


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _login(client: httpx.Client) -> None:
    match = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text)
    assert match, "no CSRF token on /login"
    response = client.post(
        "/login", data={"username": USER, "password": PASSWORD, "csrf_token": match.group(1)}
    )
    assert response.status_code == 303, response.status_code


# --- process 2: the server ------------------------------------------------------------------


def serve(db_path: Path, port: int, cache_dir: Path) -> None:
    import uvicorn

    from bmetrack.web.app import WebSettings, create_app

    app = create_app(db_path, WebSettings(secret_key="bench", cache_dir=cache_dir))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --- process 3: the clients -----------------------------------------------------------------


async def _client(
    base: str,
    paths: list[str],
    offset: int,
    ready: asyncio.Barrier,
    window: dict[str, float],
    budget: list[int],
    latencies: list[float],
    errors: list[str],
) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=30.0) as client:
        page = (await client.get("/login")).text
        match = re.search(r'name="csrf_token" value="([^"]+)"', page)
        assert match, "no CSRF token on /login"
        await client.post(
            "/login", data={"username": USER, "password": PASSWORD, "csrf_token": match.group(1)}
        )
        await ready.wait()  # logins (argon2, deliberately slow) are not part of the measurement
        if "start" not in window:
            window["start"] = time.perf_counter()
            print("ready", flush=True)  # the parent samples the server's CPU time now
        stop_at = window["start"] + window["duration"]
        i = offset  # clients start at different pages, like users do
        while time.perf_counter() < stop_at and budget[0] > 0:
            budget[0] -= 1
            path = paths[i % len(paths)]
            i += 1
            start = time.perf_counter()
            try:
                response = await client.get(path)
                if response.status_code != 200:
                    errors.append(f"{path}: {response.status_code}")
            except httpx.HTTPError as error:
                errors.append(f"{path}: {error!r}")
            latencies.append(time.perf_counter() - start)
        window["end"] = max(window.get("end", 0.0), time.perf_counter())


def clients(base: str, n_clients: int, duration_s: float, max_requests: int, out: Path) -> None:
    paths = json.loads(os.environ["BMETRACK_LOAD_PATHS"])
    latencies: list[float] = []
    errors: list[str] = []
    window: dict[str, float] = {"duration": duration_s}
    budget = [max_requests]

    async def run_all() -> None:
        ready = asyncio.Barrier(n_clients)
        await asyncio.gather(
            *(
                _client(base, paths, k, ready, window, budget, latencies, errors)
                for k in range(n_clients)
            )
        )

    asyncio.run(run_all())
    out.write_text(
        json.dumps(
            {
                "elapsed_s": window["end"] - window["start"],
                "latencies_s": latencies,
                "errors": errors,
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


def _children_cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


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

    port = _port()
    base = f"http://127.0.0.1:{port}"
    script = str(Path(__file__).resolve())
    server = subprocess.Popen(
        [sys.executable, script, "serve", str(db_path), str(port), str(folder / "cache")]
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{base}/login", timeout=2.0)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.2)
        paths = ["/dashboard"] + [f"/patients/{i}/timeline" for i in range(1, args.patients + 1)]
        # Warm the caches once: the first dashboard runs the whole analysis.
        with httpx.Client(base_url=base, timeout=300.0) as warm:
            _login(warm)
            first: dict[str, float] = {}
            for path in paths:
                start = time.perf_counter()
                assert warm.get(path).status_code == 200, path
                first[path] = time.perf_counter() - start
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
        clients_cpu = _children_cpu_s()  # includes the clients' logins
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
    result = {
        "clients": args.clients,
        "duration_s": round(elapsed, 2),
        "patients": args.patients,
        "pages": "dashboard + every patient timeline, round robin, no think time",
        "setup": (
            "uvicorn (h11, 1 worker) in its own process; clients (asyncio + httpx) in "
            "another; loopback; SQLite; cached pages after one warm-up pass"
        ),
        "machine": f"{os.cpu_count()} cores, Python {platform.python_version()}",
        # Other jobs on the machine share its cores: a 1-minute load average far above the
        # core count means the numbers below measure a contended machine.
        "load_average_1min_before_after": [
            round(load_average_before[0], 1),
            round(load_average_after[0], 1),
        ],
        "requests": len(ordered),
        "requests_per_s": round(len(ordered) / elapsed, 1),
        "p50_ms": round(1000 * statistics.median(ordered), 1) if ordered else None,
        "p95_ms": round(1000 * _percentile(ordered, 0.95), 1) if ordered else None,
        "max_ms": round(1000 * ordered[-1], 1) if ordered else None,
        "errors": len(errors),
        "error_examples": errors[:5],
        "server_cpu_percent_of_one_core_in_window": (
            None if server_cpu is None else round(100 * server_cpu / elapsed)
        ),
        "clients_cpu_s_including_logins": round(clients_cpu, 1),
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
    parser.add_argument("--max-requests", type=int, default=200_000, help="Bound on all requests.")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "web_load.json"
    )
    return parser.parse_args()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "clients":
        _, _, base_url, n, seconds, limit, out_path = sys.argv
        clients(base_url, int(n), float(seconds), int(limit), Path(out_path))
    else:
        main(_parse())
