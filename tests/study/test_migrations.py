"""The Alembic history creates exactly the schema the models declare."""

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from bmetrack.study import db
from bmetrack.study.models import Base


def test_upgrade_creates_models_schema(tmp_path):
    engine = db.make_engine(tmp_path / "study.db")
    assert db.current_revision(engine) is None
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


def test_upgrade_is_idempotent(tmp_path):
    engine = db.make_engine(tmp_path / "study.db")
    first = db.upgrade(engine)
    assert db.upgrade(engine) == first


def test_empty_database_is_refused_with_a_fix(tmp_path):
    import pytest

    engine = db.make_engine(tmp_path / "empty.db")
    with pytest.raises(db.DatabaseError, match="bmetrack db upgrade"):
        db.require_current_schema(engine)


def test_database_url_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("BMETRACK_DB", raising=False)
    assert db.database_url(None) == db.DEFAULT_DB_URL
    monkeypatch.setenv("BMETRACK_DB", "postgresql://u@localhost/x")
    assert db.database_url(None) == "postgresql://u@localhost/x"
    assert db.database_url(tmp_path / "a.db") == f"sqlite:///{tmp_path / 'a.db'}"


def test_sqlite_enforces_foreign_keys(tmp_path):
    import datetime as dt

    import pytest
    from sqlalchemy.exc import IntegrityError

    from bmetrack.study.models import Visit, WindowStatus

    engine = db.make_engine(tmp_path / "study.db")
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
