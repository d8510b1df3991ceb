"""The Alembic history creates exactly the schema the models declare, on both backends."""

import datetime as dt
from collections.abc import Callable, Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect
from sqlalchemy.exc import IntegrityError

from bmetrack.study import db
from bmetrack.study.models import Base, Visit, WindowStatus

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def make_empty_engine(request, tmp_path) -> Iterator[Callable[[], Engine]]:
    """Factory of empty databases (no tables at all) on the parametrized backend."""
    engines: list[Engine] = []

    def make() -> Engine:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path / f'empty{len(engines)}.db'}"
        else:
            url = request.getfixturevalue("postgres_database")(migrated=False)
        engine = db.make_engine(url)
        assert engine.dialect.name == request.param
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


def test_upgrade_creates_models_schema(make_empty_engine):
    engine = make_empty_engine()
    assert db.current_revision(engine) is None
    assert inspect(engine).get_table_names() == []
    revision = db.upgrade(engine)
    assert revision == db.head_revision()
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == []
    assert set(inspect(engine).get_table_names()) >= {
        "study",
        "patient",
        "procedure",
        "treated_level",
        "visit",
        "clinical_assessment",
        "new_vcf_event",
        "imaging_session",
        "vertebra_measurement",
        "audit_event",
        "alembic_version",
    }
    db.require_current_schema(engine)


def test_upgrade_is_idempotent(make_empty_engine):
    engine = make_empty_engine()
    first = db.upgrade(engine)
    tables = sorted(inspect(engine).get_table_names())
    assert db.upgrade(engine) == first
    engine.dispose()  # the inspector caches; look again with fresh connections
    assert sorted(inspect(engine).get_table_names()) == tables


def test_empty_database_is_refused_with_a_fix(make_empty_engine):
    engine = make_empty_engine()
    with pytest.raises(db.DatabaseError, match="bmetrack db upgrade"):
        db.require_current_schema(engine)


def test_database_url_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("BMETRACK_DB", raising=False)
    assert db.database_url(None) == db.DEFAULT_DB_URL
    monkeypatch.setenv("BMETRACK_DB", "postgresql://u@localhost/x")
    assert db.database_url(None) == "postgresql://u@localhost/x"
    assert db.database_url(tmp_path / "a.db") == f"sqlite:///{tmp_path / 'a.db'}"


def test_foreign_keys_are_enforced(make_empty_engine):
    engine = make_empty_engine()
    db.upgrade(engine)
    with pytest.raises(IntegrityError), db.session_scope(engine) as session:
        session.add(
            Visit(
                patient_id=999,
                visit_date=dt.date(2020, 1, 1),
                days_from_procedure=0,
                window_status=WindowStatus.BASELINE,
            )
        )
