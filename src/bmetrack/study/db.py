"""Engine, sessions and schema migrations of the study database.

The URL comes from ``--db``, else ``BMETRACK_DB``, else ``sqlite:///bmetrack.db``.
A bare file path is taken as a SQLite file. The schema is created and upgraded
only through Alembic (``bmetrack db upgrade``), never by ``create_all``, so
SQLite and PostgreSQL databases always carry the same migration history.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.orm import Session, sessionmaker

__all__ = [
    "DEFAULT_DB_URL",
    "DatabaseError",
    "current_revision",
    "database_url",
    "make_engine",
    "session_scope",
    "upgrade",
]

DEFAULT_DB_URL = "sqlite:///bmetrack.db"
_ENV_VAR = "BMETRACK_DB"


class DatabaseError(RuntimeError):
    """The database cannot be reached or is not at the expected schema revision."""


def database_url(db: str | os.PathLike[str] | None = None) -> str:
    """Resolve the database URL from an argument, ``BMETRACK_DB`` or the default."""
    value = str(db) if db is not None else os.environ.get(_ENV_VAR) or DEFAULT_DB_URL
    if "://" not in value:
        value = f"sqlite:///{Path(value).expanduser().resolve()}"
    return value


def _enable_sqlite_foreign_keys(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(db: str | os.PathLike[str] | None = None, **kwargs: Any) -> Engine:
    """Create an engine; SQLite gets foreign keys enforced."""
    url = database_url(db)
    engine = create_engine(url, future=True, **kwargs)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _enable_sqlite_foreign_keys)
    return engine


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """One transaction: committed when the block ends, rolled back on any error."""
    session = sessionmaker(bind=engine, expire_on_commit=False)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _alembic_config(engine: Engine) -> Any:
    from alembic.config import Config

    config = Config()
    script_location = resources.files("bmetrack.study").joinpath("migrations")
    config.set_main_option("script_location", str(script_location))
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    return config


def upgrade(engine: Engine, revision: str = "head") -> str:
    """Apply migrations up to ``revision``; return the revision now current."""
    from alembic import command

    config = _alembic_config(engine)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    return current_revision(engine) or ""


def current_revision(engine: Engine) -> str | None:
    """The database's Alembic revision (None for an empty database)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    """The newest migration shipped with this version of bmetrack."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config(make_engine("sqlite://")))
    head = script.get_current_head()
    assert head is not None
    return head


def require_current_schema(engine: Engine) -> None:
    """Raise DatabaseError unless the database is migrated to the newest revision."""
    revision = current_revision(engine)
    head = head_revision()
    if revision != head:
        where = engine.url.render_as_string(hide_password=True)
        if revision is None and not inspect(engine).get_table_names():
            msg = f"The database {where} is empty. Create it with 'bmetrack db upgrade --db ...'."
        else:
            msg = (
                f"The database {where} is at schema revision {revision!r}, this bmetrack "
                f"expects {head!r}. Run 'bmetrack db upgrade --db ...' (back it up first)."
            )
        raise DatabaseError(msg)
