"""Loopback load test of the web app: N concurrent clients browse dashboard + timeline pages.

Builds a simulated study in a temporary database, serves it with uvicorn on
127.0.0.1 (one process), logs every client in as a viewer and fetches the
dashboard and patient timelines for DURATION seconds. Writes requests/s,
p50/p95 latency and errors to benchmarks/results/web_load.json.

    python benchmarks/web_load.py [--clients 50] [--duration 60] [--patients 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from bmetrack.simulate.cohort import CohortParameters, simulate_cohort
from bmetrack.study import db
from bmetrack.study.importers import import_tables
from bmetrack.study.users import create_user
from bmetrack.web.app import WebSettings, create_app

PASSWORD = "load test password"


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _client(
    base: str,
    paths: list[str],
    window: list[float],
    ready: asyncio.Barrier,
    latencies: list[float],
    errors: list[str],
) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=30.0) as client:
        page = (await client.get("/login")).text
        token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
        await client.post(
            "/login", data={"username": "viewer", "password": PASSWORD, "csrf_token": token}
        )
        await ready.wait()  # logins (argon2, deliberately slow) are not part of the measurement
        if not window:
            window.append(time.perf_counter())
        stop_at = window[0] + window_s(window)
        i = 0
        while time.perf_counter() < stop_at:
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


def window_s(window: list[float]) -> float:
    return _DURATION[0]


_DURATION: list[float] = [60.0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--patients", type=int, default=20)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "web_load.json"
    )
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bmetrack-load-"))
    engine = db.make_engine(folder / "study.db")
    db.upgrade(engine)
    import_tables(
        engine,
        "LOAD",
        simulate_cohort(CohortParameters(n_patients=args.patients), seed=3).frames,
        "bench",
    )
    with db.session_scope(engine) as session:
        create_user(session, "viewer", PASSWORD, "viewer", actor="bench")
    app = create_app(engine, WebSettings(secret_key="bench", cache_dir=folder / "cache"))
    port = _port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    # Warm the dashboard cache once (the first build runs the whole analysis).
    warm = httpx.Client(base_url=base, timeout=120.0)
    token = re.search(r'name="csrf_token" value="([^"]+)"', warm.get("/login").text).group(1)  # type: ignore[union-attr]
    warm.post("/login", data={"username": "viewer", "password": PASSWORD, "csrf_token": token})
    warm_start = time.perf_counter()
    warm.get("/dashboard")
    warm_s = time.perf_counter() - warm_start
    paths = ["/dashboard"] + [f"/patients/{i}/timeline" for i in range(1, args.patients + 1)]
    latencies: list[float] = []
    errors: list[str] = []
    _DURATION[0] = args.duration
    window: list[float] = []

    async def run_all() -> None:
        ready = asyncio.Barrier(args.clients)
        await asyncio.gather(
            *(_client(base, paths, window, ready, latencies, errors) for _ in range(args.clients))
        )

    asyncio.run(run_all())
    elapsed = time.perf_counter() - window[0]
    server.should_exit = True
    thread.join(timeout=10)
    ordered = sorted(latencies)
    result = {
        "clients": args.clients,
        "duration_s": round(elapsed, 2),
        "patients": args.patients,
        "requests": len(latencies),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(1000 * statistics.median(ordered), 1) if ordered else None,
        "p95_ms": round(1000 * ordered[int(0.95 * (len(ordered) - 1))], 1) if ordered else None,
        "errors": len(errors),
        "error_examples": errors[:5],
        "first_dashboard_build_s": round(warm_s, 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
