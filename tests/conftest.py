"""Fixtures shared by every test package: a real PostgreSQL server started by the tests.

One server per test session (per pytest-xdist worker) runs from a temporary data
directory: ``initdb`` + ``pg_ctl`` of the newest PostgreSQL under
``/usr/lib/postgresql/*/bin`` (else ``initdb`` on PATH), listening on 127.0.0.1 only,
on a free port, with its unix socket in the temporary directory and fsync off. A
template database is migrated once with Alembic; each test gets a fresh copy through
``CREATE DATABASE ... TEMPLATE``, which takes milliseconds instead of a migration.

PostgreSQL refuses to run as root; when the tests run as root (CI, containers) the
server runs as the unprivileged ``postgres`` user the Debian package creates.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

PG_INSTALL_ROOT = Path("/usr/lib/postgresql")
SERVER_USER = "postgres"  # the unprivileged account of Debian's postgresql package
SUPERUSER = "postgres"  # the database role initdb creates
TEMPLATE_DB = "bmetrack_template"
_START_ATTEMPTS = 3  # a free port can be taken between probing and binding


def postgres_bindir() -> Path | None:
    """Directory of ``initdb``/``pg_ctl``: newest Debian install, else PATH, else None."""

    def major(initdb: Path) -> int:
        name = initdb.parent.parent.name
        return int(name) if name.isdigit() else -1

    debian = sorted(PG_INSTALL_ROOT.glob("*/bin/initdb"), key=major)
    if debian:
        return debian[-1].parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    pg_config = shutil.which("pg_config")
    if pg_config:
        bindir = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if bindir and (Path(bindir) / "initdb").exists():
            return Path(bindir)
    return None


def _as_server_user(args: list[str]) -> list[str]:
    """Wrap a command so that it runs unprivileged when the tests run as root."""
    if os.geteuid() != 0:
        return args
    if shutil.which("runuser"):
        return ["runuser", "-u", SERVER_USER, "--", *args]
    return ["su", SERVER_USER, "-s", "/bin/sh", "-c", shlex.join(args)]


def _run(args: list[str], cwd: Path) -> None:
    completed = subprocess.run(
        _as_server_user(args), cwd=cwd, capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        msg = (
            f"{shlex.join(args)} failed with exit code {completed.returncode}:\n"
            f"{completed.stdout}\n{completed.stderr}"
        )
        raise RuntimeError(msg)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _private_temp_dir() -> Path:
    """A temp dir the server user owns, outside pytest's root-only (0700) basetemp."""
    path = Path(tempfile.mkdtemp(prefix="bmetrack-pg-"))
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam(SERVER_USER)
        except KeyError:
            shutil.rmtree(path)
            msg = (
                f"PostgreSQL refuses to run as root and there is no user {SERVER_USER!r} "
                "to run it as: install the Debian 'postgresql' package (it creates that "
                "user) or run the tests as an unprivileged user."
            )
            raise RuntimeError(msg) from None
        os.chown(path, account.pw_uid, account.pw_gid)
    return path


def admin_execute(base_url: str, sql: str) -> None:
    """Run one statement outside a transaction (CREATE/DROP DATABASE) as the superuser."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(base_url)
    with psycopg.connect(
        host=url.host, port=url.port, user=url.username, dbname="postgres", autocommit=True
    ) as connection:
        connection.execute(sql)  # type: ignore[arg-type]  # built here from fixed names


def database_url(base_url: str, database: str) -> str:
    """SQLAlchemy URL of one database on the test server."""
    return f"{base_url}/{database}"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """Start PostgreSQL once for the session; yield ``postgresql+psycopg://user@host:port``.

    Skipped only when no PostgreSQL binaries are installed at all; any other failure
    (initdb, start-up) is an error with the server log.
    """
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL is not installed (no initdb under /usr/lib/postgresql/*/bin or on "
            "PATH); install the Debian 'postgresql' package (`make system-deps`)."
        )
    root = _private_temp_dir()
    data = root / "data"
    log = root / "server.log"
    started = False
    try:
        _run(
            [
                str(bindir / "initdb"),
                "--pgdata",
                str(data),
                "--username",
                SUPERUSER,
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--locale",
                "C",
                "--no-sync",
            ],
            cwd=root,
        )
        base_conf = (data / "postgresql.conf").read_text()
        for attempt in range(1, _START_ATTEMPTS + 1):
            port = _free_port()
            # Speed over durability: the cluster is thrown away after the session.
            settings = {
                "listen_addresses": "'127.0.0.1'",
                "port": str(port),
                "unix_socket_directories": f"'{root}'",
                "fsync": "off",
                "synchronous_commit": "off",
                "full_page_writes": "off",
                "max_connections": "100",
            }
            conf = "\n".join(f"{key} = {value}" for key, value in settings.items())
            (data / "postgresql.conf").write_text(f"{base_conf}\n{conf}\n")
            try:
                pg_ctl = [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log)]
                _run([*pg_ctl, "-w", "-t", "60", "start"], cwd=root)
            except RuntimeError:
                if attempt == _START_ATTEMPTS:
                    server_log = log.read_text() if log.exists() else "(no log)"
                    msg = f"PostgreSQL did not start; server log:\n{server_log}"
                    raise RuntimeError(msg) from None
                continue
            started = True
            break
        yield f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{port}"
    finally:
        if started:
            _run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], cwd=root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_template(postgres_server: str) -> str:
    """Name of a database migrated once with ``db.upgrade``; tests get copies of it."""
    from bmetrack.study import db

    admin_execute(postgres_server, f"CREATE DATABASE {TEMPLATE_DB}")
    engine = db.make_engine(database_url(postgres_server, TEMPLATE_DB))
    db.upgrade(engine)
    # CREATE DATABASE ... TEMPLATE needs the template free of connections.
    engine.dispose()
    return TEMPLATE_DB


@pytest.fixture
def postgres_database(
    postgres_server: str, request: pytest.FixtureRequest
) -> Iterator[Callable[..., str]]:
    """Factory of fresh databases: ``make(migrated=True) -> URL``; dropped after the test.

    ``migrated=True`` copies the migrated template; ``migrated=False`` gives an empty
    database (for testing the migrations themselves).
    """
    created: list[str] = []

    def make(migrated: bool = True) -> str:
        name = f"test_{uuid.uuid4().hex[:16]}"
        if migrated:
            template = request.getfixturevalue("postgres_template")
            admin_execute(postgres_server, f"CREATE DATABASE {name} TEMPLATE {template}")
        else:
            admin_execute(postgres_server, f"CREATE DATABASE {name}")
        created.append(name)
        return database_url(postgres_server, name)

    yield make
    for name in created:
        # FORCE ends connections a test left open (pooled engines, killed clients).
        admin_execute(postgres_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
