"""Fixtures of the study tests: a fresh migrated database (SQLite and PostgreSQL), a cohort."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import Engine, func, select

from bmetrack.study import db
from bmetrack.study.models import (
    AuditEvent,
    ClinicalAssessment,
    NewVcfEvent,
    Patient,
    Procedure,
    TreatedLevel,
    VertebraMeasurement,
    Visit,
)

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(scope="session")
def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite database migrated with ``db.upgrade``; tests get copies (migrating is slow)."""
    path = tmp_path_factory.mktemp("template") / "template.db"
    engine = db.make_engine(path)
    db.upgrade(engine)
    engine.dispose()
    return path


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The database every study test runs on: a SQLite file, then a real PostgreSQL."""
    return str(request.param)


@pytest.fixture
def make_engine(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[[str], Engine]]:
    """Factory of fresh migrated databases (SQLite files in ``tmp_path`` or PostgreSQL)."""
    engines: list[Engine] = []

    def make(name: str) -> Engine:
        if backend == "sqlite":
            path = tmp_path / f"{name}.db"
            shutil.copyfile(request.getfixturevalue("migrated_template"), path)
            engine = db.make_engine(path)
        else:
            # Looked up lazily so that SQLite-only runs never start a server.
            engine = db.make_engine(request.getfixturevalue("postgres_database")())
        assert engine.dialect.name == backend
        assert db.current_revision(engine) == db.head_revision()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


@pytest.fixture
def engine(make_engine: Callable[[str], Engine]) -> Engine:
    """A new database (SQLite file or PostgreSQL), upgraded to the newest schema."""
    return make_engine("study")


def cohort_frames() -> dict[str, pd.DataFrame]:
    """Three patients written by hand (values a user would type).

    P001 is the reference paper's example case (T12; VAS 10, 2, 1, 1; BME 75, 25,
    20, 0 %); P002 has two treated levels, VAS in mm and a new VCF at L4; P003 has
    no birth year and a visit 135 days after PV (outside every window).
    """
    patients = pd.DataFrame(
        [
            ["P001", "F", "1940", "2020-01-02", ""],
            ["P002", "M", "1935", "", "two levels"],
            ["P003", "U", "", "", ""],
        ],
        columns=["patient_code", "sex", "birth_year", "enrolled_date", "notes"],
    )
    procedures = pd.DataFrame(
        [
            ["P001", "2020-01-10", "vertebroplasty", "T12", "3.5", ""],
            ["P002", "2020-02-01", "vertebroplasty", "L1", "4", ""],
            ["P002", "2020-02-01", "vertebroplasty", "L2", "2.25", ""],
            ["P003", "2020-03-01", "kyphoplasty", "T11", "", ""],
        ],
        columns=[
            "patient_code",
            "procedure_date",
            "procedure_type",
            "level",
            "cement_volume_ml",
            "notes",
        ],
    )
    clinical = pd.DataFrame(
        [
            ["P001", "2020-01-05", "", "10", "0-10", "morphine", "", "no", "", ""],
            ["P001", "2020-04-10", "", "2", "0-10", "none", "", "no", "", ""],
            ["P001", "2020-07-10", "", "1", "0-10", "", "", "no", "", ""],
            ["P001", "2021-01-08", "", "1", "0-10", "none", "", "no", "", ""],
            ["P002", "2020-01-20", "", "73", "mm", "paracetamol; tramadol", "2", "", "", ""],
            ["P002", "2020-05-02", "", "40", "mm", "paracetamol", "", "yes", "L4", "back"],
            ["P003", "2020-03-01", "0", "5", "", "", "", "", "", ""],
            ["P003", "2020-07-14", "", "", "", "", "", "", "", ""],
        ],
        columns=[
            "patient_code",
            "visit_date",
            "nominal_month",
            "vas",
            "vas_unit",
            "analgesic_drugs",
            "analgesic_class",
            "pain_other_level",
            "new_vcf_levels",
            "notes",
        ],
    )
    measurements = pd.DataFrame(
        [
            ["P001", "2020-01-05", "T12", "75", "30.5", "22.875", "", "wedge", "2"],
            ["P001", "2020-04-10", "T12", "25", "", "", "3.5", "wedge", "2"],
            ["P001", "2020-07-10", "T12", "20", "", "", "3.5", "wedge", "2"],
            ["P001", "2021-01-08", "T12", "0", "", "", "3.5", "wedge", "2"],
            ["P002", "2020-01-20", "L1", "40.5", "", "", "", "crush", "3"],
            ["P002", "2020-01-20", "L2", "0.1", "", "", "", "none", "0"],
            ["P003", "2020-09-01", "T11", "12", "", "", "", "", ""],
        ],
        columns=[
            "patient_code",
            "visit_date",
            "level",
            "bme_percent",
            "body_volume_ml",
            "edema_volume_ml",
            "cement_volume_ml",
            "deformity",
            "genant_grade",
        ],
    )
    return {
        "patients": patients,
        "procedures": procedures,
        "clinical": clinical,
        "measurements": measurements,
    }


@pytest.fixture
def frames() -> dict[str, pd.DataFrame]:
    return cohort_frames()


@pytest.fixture
def csv_folder(tmp_path: Path, frames: dict[str, pd.DataFrame]) -> Path:
    """The cohort written as plain CSV files (one per table)."""
    folder = tmp_path / "csv"
    folder.mkdir()
    for name, frame in frames.items():
        frame.to_csv(folder / f"{name}.csv", index=False)
    return folder


MODELS = (
    Patient,
    Procedure,
    TreatedLevel,
    Visit,
    ClinicalAssessment,
    NewVcfEvent,
    VertebraMeasurement,
    AuditEvent,
)


def snapshot(engine: Engine) -> dict[str, object]:
    """Row counts of every table plus the whole audit log, to show 'nothing changed'."""
    with engine.connect() as connection:
        counts = {
            model.__tablename__: connection.execute(
                select(func.count()).select_from(model)
            ).scalar_one()
            for model in MODELS
        }
        audit = connection.execute(
            select(
                AuditEvent.id,
                AuditEvent.action,
                AuditEvent.entity,
                AuditEvent.entity_id,
                AuditEvent.field,
                AuditEvent.old_value,
                AuditEvent.new_value,
            ).order_by(AuditEvent.id)
        ).all()
    return {"counts": counts, "audit": [tuple(row) for row in audit]}


@pytest.fixture
def take_snapshot() -> Callable[[Engine], dict[str, object]]:
    return snapshot


def generated_frames(n_patients: int, seed: int = 0) -> dict[str, pd.DataFrame]:
    """A larger synthetic cohort: one or two levels, 4 visits, typed columns like the simulator."""
    rng = np.random.default_rng(seed)
    patients, procedures, clinical, measurements = [], [], [], []
    drugs = ["morphine", "tramadol", "paracetamol", "none"]
    for i in range(n_patients):
        code = f"G{i:04d}"
        patients.append({"patient_code": code, "sex": "FM"[i % 2], "birth_year": 1930 + i % 30})
        day0 = pd.Timestamp("2019-01-07") + pd.Timedelta(days=i % 300)
        levels = ["T12", "L1"][: 1 + i % 2]
        for level in levels:
            procedures.append(
                {
                    "patient_code": code,
                    "procedure_date": day0,
                    "procedure_type": "vertebroplasty",
                    "level": level,
                    "cement_volume_ml": float(np.round(2 + 3 * rng.random(), 2)),
                }
            )
        for month in (0, 3, 6, 12):
            shift = -2 if month == 0 else round(month * 30.4375) + int(rng.integers(-9, 10))
            visit = day0 + pd.Timedelta(days=shift)
            clinical.append(
                {
                    "patient_code": code,
                    "visit_date": visit,
                    "vas": float(rng.integers(0, 11)),
                    "analgesic_drugs": drugs[month % 4],
                    "pain_other_level": bool(i % 7 == 0),
                }
            )
            for level in levels:
                measurements.append(
                    {
                        "patient_code": code,
                        "visit_date": visit,
                        "level": level,
                        "bme_percent": float(100 * rng.random()),
                        "genant_grade": int(rng.integers(0, 4)),
                    }
                )
    return {
        "patients": pd.DataFrame(patients),
        "procedures": pd.DataFrame(procedures),
        "clinical": pd.DataFrame(clinical),
        "measurements": pd.DataFrame(measurements),
    }


@pytest.fixture
def cohort_factory() -> Callable[..., dict[str, pd.DataFrame]]:
    return generated_frames
