"""`bmetrack serve` as a user starts it: a real process on a loopback port, stopped after."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve_and_get(db_path: Path, *flags: str) -> tuple[int, str]:
    """Start `bmetrack serve`, GET /login once it answers, stop it; (status, server log)."""
    port = _free_port()
    command = [sys.executable, "-m", "bmetrack.cli", "serve", "--db", f"sqlite:///{db_path}"]
    process = subprocess.Popen(
        [*command, "--port", str(port), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "BMETRACK_SECRET": "serve-test"},
    )
    status = 0
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=5) as reply:
                    status = reply.status
                break
            except OSError:
                if process.poll() is not None:
                    break
                time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGINT)
        log, _ = process.communicate(timeout=30)
    return status, log


@pytest.mark.slow
def test_serve_answers_and_access_log_can_be_turned_off(tmp_path, web_template):
    db_path = tmp_path / "study.db"
    shutil.copyfile(web_template, db_path)
    status, log = _serve_and_get(db_path)
    assert status == 200, log
    assert "GET /login" in log  # access log on by default
    status, log = _serve_and_get(db_path, "--no-access-log")
    assert status == 200, log
    assert "GET /login" not in log
    assert "Uvicorn running" in log
