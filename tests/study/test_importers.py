"""Importer: all problems at once, nothing written on error, atomic writes, re-import."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import Engine, select, text

from bmetrack.study import importers, records
from bmetrack.study.db import session_scope
from bmetrack.study.exporters import export_frames
from bmetrack.study.importers import ImportValidationError, import_tables
from bmetrack.study.models import (
    AuditEvent,
    ClinicalAssessment,
    NewVcfEvent,
    Patient,
    TreatedLevel,
    Visit,
    WindowStatus,
)

ACTOR = "importer"


def _paths(folder: Path) -> dict[str, Path]:
    return {name: folder / f"{name}.csv" for name in importers.TABLE_ORDER}


def test_import_csv_stores_hand_checked_values(engine: Engine, csv_folder: Path) -> None:
    report = import_tables(engine, "S1", _paths(csv_folder), ACTOR)
    assert report.written
    assert {n: (c.rows, c.created) for n, c in report.counts.items()} == {
        "patients": (3, 3),
        "procedures": (4, 4),
        "clinical": (8, 8),
        "measurements": (7, 7),
    }
    with session_scope(engine) as session:
        visits = {(v.patient.code, v.visit_date): v for v in session.scalars(select(Visit)).all()}
        first = visits[("P002", dt.date(2020, 1, 20))]
        assert first.assessment is not None
        assert (first.assessment.vas, first.assessment.vas_entered) == (pytest.approx(7.3), 73)
        assert first.assessment.analgesic_class == 2  # paracetamol 1, tramadol 2 -> 2
        assert first.days_from_procedure == -12 and first.nominal_month == 0
        # P003: 2020-03-01 -> 2020-07-14 is day 135, between the month-3 (61-121) and
        # month-6 (138-228) windows: kept and flagged.
        odd = visits[("P003", dt.date(2020, 7, 14))]
        assert (odd.nominal_month, odd.window_status) == (None, WindowStatus.OUTSIDE_WINDOW)
        assert odd.assessment is None  # no clinical value was given
        # The measurement-only date 2020-09-01 is day 184: month 6.
        created = visits[("P003", dt.date(2020, 9, 1))]
        assert (created.nominal_month, created.window_status) == (6, WindowStatus.IN_WINDOW)
        vcf = session.scalars(select(NewVcfEvent)).one()
        assert (vcf.level, vcf.visit_id) == ("L4", visits[("P002", dt.date(2020, 5, 2))].id)
        cement = session.scalars(select(TreatedLevel.cement_volume_ml).order_by(TreatedLevel.id))
        assert list(cement) == [3.5, 4.0, 2.25, None]
        n_create = session.scalars(select(AuditEvent).where(AuditEvent.action == "create")).all()
        # study + 3 patients + 3 procedures + 4 levels + 9 visits + 7 assessments + 1 vcf + 7
        assert len(n_create) == 1 + 3 + 3 + 4 + 9 + 7 + 1 + 7


def test_comments_bom_and_european_csv(engine: Engine, tmp_path: Path) -> None:
    patients = tmp_path / "patients.csv"
    patients.write_bytes(
        "\ufeff# exported from the ward spreadsheet\npatient_code;sex;birth_year\n"
        "# a comment in the middle\nP001;F;1940\n\nP002;m;1941\n".encode()
    )
    procedures = tmp_path / "procedures.csv"
    procedures.write_text(
        "patient_code;procedure_date;procedure_type;level;cement_volume_ml\n"
        "P001;2020-01-10;vertebroplasty;th12;3,5\n"
        'P002;2020-01-11;vertebroplasty;L1;"2,25"\n',
        encoding="utf-8",
    )
    clinical = tmp_path / "clinical.csv"
    clinical.write_text(
        "patient_code;visit_date;vas;analgesic_drugs\n"
        'P001;2020-01-05;7,5;"paracetamol; tramadol"\n',
        encoding="utf-8",
    )
    import_tables(
        engine,
        "S1",
        {"patients": patients, "procedures": procedures, "clinical": clinical},
        ACTOR,
    )
    with session_scope(engine) as session:
        assert [(p.code, p.sex) for p in session.scalars(select(Patient))] == [
            ("P001", "F"),
            ("P002", "M"),
        ]
        levels = session.scalars(select(TreatedLevel).order_by(TreatedLevel.id)).all()
        assert [(t.level, t.label, t.cement_volume_ml) for t in levels] == [
            ("T12", 19, 3.5),
            ("L1", 20, 2.25),
        ]
        clinical_row = session.scalars(select(ClinicalAssessment)).one()
        assert (clinical_row.vas, clinical_row.analgesic_class) == (7.5, 2)
        assert clinical_row.analgesic_drugs == "paracetamol; tramadol"


def test_five_bad_rows_give_five_problems_and_write_nothing(
    engine: Engine, csv_folder: Path, take_snapshot: Callable[[Engine], dict[str, object]]
) -> None:
    clinical = csv_folder / "clinical.csv"
    clinical.write_text(
        "# clinical follow-up\n"  # comment lines are not counted
        "# second comment\n"
        "patient_code,visit_date,vas,analgesic_drugs,nominal_month\n"  # line 1
        "P001,2020-01-05,10,morphine,\n"  # line 2: fine
        "P001,2020-04-10,11,none,\n"  # line 3: VAS 11 on 0-10
        "P001,05/07/2020,1,,\n"  # line 4: not an ISO date
        "P001,2021-01-08,1,morfine,\n"  # line 5: unknown drug
        "P999,2020-01-05,3,,\n"  # line 6: unknown patient
        "P002,2020-01-20,3,,\n"  # line 7: fine
        "P002,2020-05-02,3,,5\n",  # line 8: month 5 is not a nominal month
        encoding="utf-8",
    )
    before = take_snapshot(engine)
    with pytest.raises(ImportValidationError) as error:
        import_tables(engine, "S1", _paths(csv_folder), ACTOR)
    problems = error.value.report.problems
    found = [(p.table, p.line, p.file_line, p.field, p.value) for p in problems]
    assert found == [
        ("clinical", 3, 5, "vas", "11"),
        ("clinical", 4, 6, "visit_date", "05/07/2020"),
        ("clinical", 5, 7, "analgesic_drugs", "morfine"),
        ("clinical", 6, 8, "patient_code", "P999"),
        ("clinical", 8, 10, "nominal_month", 5),
    ]
    for problem in problems:
        message = str(problem)
        assert f"clinical.csv line {problem.line}" in message
        assert problem.field in message and str(problem.value) in message
    assert "YYYY-MM-DD" in problems[1].reason and "morphine" in problems[2].reason
    assert error.value.report.written is False
    assert take_snapshot(engine) == before


def test_unknown_and_missing_columns(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "patients.csv"
    path.write_text("patient_code,gender,birth_year\nP001,F,1940\n", encoding="utf-8")
    procedures = tmp_path / "procedures.csv"
    procedures.write_text("patient_code,level\nP001,L1\n", encoding="utf-8")
    with pytest.raises(ImportValidationError) as error:
        import_tables(engine, "S1", {"patients": path, "procedures": procedures}, ACTOR)
    problems = {(p.table, p.field): p.reason for p in error.value.problems}
    assert "unknown column" in problems[("patients", "gender")]
    assert "patient_code, sex, birth_year, enrolled_date, notes" in problems[("patients", "gender")]
    assert "required column is missing" in problems[("patients", "sex")]
    assert "required column is missing" in problems[("procedures", "procedure_date")]
    assert "required column is missing" in problems[("procedures", "procedure_type")]
    assert len(problems) == 4


def test_reimport_skips_unchanged_and_audits_changes(engine: Engine, csv_folder: Path) -> None:
    import_tables(engine, "S1", _paths(csv_folder), ACTOR)
    again = import_tables(engine, "S1", _paths(csv_folder), ACTOR)
    assert all(c.created == c.updated == 0 for c in again.counts.values())
    assert [c.unchanged for c in again.counts.values()] == [3, 4, 8, 7]
    with session_scope(engine) as session:
        n_events = len(session.scalars(select(AuditEvent)).all())
    patients = pd.read_csv(csv_folder / "patients.csv", dtype=str, keep_default_na=False)
    patients.loc[patients["patient_code"] == "P003", "birth_year"] = "1944"
    patients.to_csv(csv_folder / "patients.csv", index=False)
    clinical = pd.read_csv(csv_folder / "clinical.csv", dtype=str, keep_default_na=False)
    clinical.loc[1, "vas"] = "3"  # P001 2020-04-10: 2 -> 3
    clinical.to_csv(csv_folder / "clinical.csv", index=False)
    measurements = pd.read_csv(csv_folder / "measurements.csv", dtype=str, keep_default_na=False)
    measurements.loc[0, "bme_percent"] = "70"  # P001 2020-01-05 T12: 75 -> 70
    measurements.to_csv(csv_folder / "measurements.csv", index=False)
    third = import_tables(engine, "S1", _paths(csv_folder), "second-importer")
    assert {n: (c.created, c.updated, c.unchanged) for n, c in third.counts.items()} == {
        "patients": (0, 1, 2),
        "procedures": (0, 0, 4),
        "clinical": (0, 1, 7),
        "measurements": (0, 1, 6),
    }
    with session_scope(engine) as session:
        new_events = session.scalars(
            select(AuditEvent).where(AuditEvent.actor == "second-importer")
        ).all()
        changes = {(e.entity, e.field): (e.old_value, e.new_value) for e in new_events if e.field}
        assert changes[("patient", "birth_year")] == (None, "1944")
        assert changes[("clinical_assessment", "vas")] == ("2.0", "3.0")
        assert changes[("clinical_assessment", "vas_entered")] == ("2.0", "3.0")
        assert ("vertebra_measurement", "superseded_by_id") in changes
        assert len(session.scalars(select(AuditEvent)).all()) == n_events + len(new_events)
    frames = export_frames(engine, "S1")
    assert frames["measurements"]["bme_percent"].tolist()[0] == 70.0
    assert len(frames["measurements"]) == 7  # the superseded row is not exported


def test_failure_midway_rolls_back_everything(
    engine: Engine,
    csv_folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    take_snapshot: Callable[[Engine], dict[str, object]],
    cohort_factory: Callable[..., dict[str, pd.DataFrame]],
) -> None:
    import_tables(engine, "S1", _paths(csv_folder), ACTOR)
    before = take_snapshot(engine)
    calls = {"n": 0}
    real_add_patient = records.add_patient

    def failing_add_patient(*args: object, **kwargs: object) -> Patient:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk full")
        return real_add_patient(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(records, "add_patient", failing_add_patient)
    with pytest.raises(RuntimeError, match="disk full"):
        import_tables(engine, "S1", cohort_factory(5), ACTOR)
    assert calls["n"] == 3
    assert take_snapshot(engine) == before


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from bmetrack.study import db, importers

    engine = db.make_engine(sys.argv[1])
    folder, marker = Path(sys.argv[2]), Path(sys.argv[3])
    frames = {n: folder / f"{n}.csv" for n in importers.TABLE_ORDER}

    def progress(table, done, total):
        # Patients are flushed (uncommitted) by now; stall in the next table.
        if table == "procedures" and done >= 1:
            marker.write_text("writing")
            time.sleep(120)

    importers.import_tables(engine, "S1", frames, "killed", progress=progress)
    """
)


def _transaction_in_progress(engine: Engine) -> bool:
    """Whether another client holds an open write transaction on this database."""
    if engine.dialect.name == "sqlite":
        database = engine.url.database
        assert database is not None
        return Path(database + "-journal").exists() or Path(database + "-wal").exists()
    with engine.connect() as connection:
        n_open = connection.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND state = 'idle in transaction' "
                "AND backend_xid IS NOT NULL"
            )
        ).scalar_one()
    return bool(n_open)


def test_killed_import_leaves_database_unchanged(
    engine: Engine,
    tmp_path: Path,
    csv_folder: Path,
    take_snapshot: Callable[[Engine], dict[str, object]],
    cohort_factory: Callable[..., dict[str, pd.DataFrame]],
) -> None:
    import_tables(engine, "S1", _paths(csv_folder), ACTOR)
    before = take_snapshot(engine)
    big = tmp_path / "big"
    big.mkdir()
    for name, frame in cohort_factory(20).items():
        frame.to_csv(big / f"{name}.csv", index=False, date_format="%Y-%m-%d")
    marker = tmp_path / "marker"
    url = engine.url.render_as_string(hide_password=False)
    process = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, url, str(big), str(marker)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the import never reached the procedures"
            time.sleep(0.05)
        # 20 patients are now written but not committed.
        assert _transaction_in_progress(engine)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    engine.dispose()
    assert take_snapshot(engine) == before


def test_dataframes_with_typed_columns_import_like_csv(
    make_engine: Callable[[str], Engine],
    tmp_path: Path,
    cohort_factory: Callable[..., dict[str, pd.DataFrame]],
) -> None:
    frames = cohort_factory(6)
    frames["clinical"].loc[2, "vas"] = np.nan
    typed = make_engine("typed")
    import_tables(typed, "S1", frames, ACTOR)
    folder = tmp_path / "as_csv"
    folder.mkdir()
    for name, frame in frames.items():
        text = frame.copy()
        for column in text.columns:
            if pd.api.types.is_datetime64_any_dtype(text[column]):
                text[column] = text[column].dt.strftime("%Y-%m-%d")
            elif pd.api.types.is_bool_dtype(text[column]):
                text[column] = text[column].map({True: "yes", False: "no"})
        text.to_csv(folder / f"{name}.csv", index=False)
    from_csv = make_engine("csv")
    import_tables(from_csv, "S1", _paths(folder), ACTOR)
    a, b = export_frames(typed, "S1"), export_frames(from_csv, "S1")
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name])
    assert a["clinical"]["pain_other_level"].tolist()[:4] == [True] * 4  # patient 0: 0 % 7 == 0
    assert pd.isna(a["clinical"]["vas"].iloc[2])


def test_dataframe_errors_use_row_positions(engine: Engine) -> None:
    patients = pd.DataFrame({"patient_code": ["A1", "bad code", "A3"], "sex": ["F", "X", "M"]})
    with pytest.raises(ImportValidationError) as error:
        import_tables(engine, "S1", {"patients": patients}, ACTOR)
    assert [(p.line, p.field) for p in error.value.problems] == [(3, "patient_code"), (3, "sex")]


def test_duplicate_keys_within_a_file(engine: Engine, csv_folder: Path) -> None:
    procedures = pd.read_csv(csv_folder / "procedures.csv", dtype=str, keep_default_na=False)
    procedures = pd.concat([procedures, procedures.iloc[[0]]], ignore_index=True)
    procedures.to_csv(csv_folder / "procedures.csv", index=False)
    clinical = pd.read_csv(csv_folder / "clinical.csv", dtype=str, keep_default_na=False)
    clinical = pd.concat([clinical, clinical.iloc[[0]]], ignore_index=True)
    clinical.to_csv(csv_folder / "clinical.csv", index=False)
    with pytest.raises(ImportValidationError) as error:
        import_tables(engine, "S1", _paths(csv_folder), ACTOR)
    found = {(p.table, p.line, p.field): p.reason for p in error.value.problems}
    assert "treated twice in one procedure (also line 2)" in found[("procedures", 6, "level")]
    assert "duplicate visit date (also line 2)" in found[("clinical", 10, "visit_date")]
    assert len(found) == 2


def test_cross_table_date_rules(engine: Engine, csv_folder: Path) -> None:
    procedures = pd.read_csv(csv_folder / "procedures.csv", dtype=str, keep_default_na=False)
    procedures.loc[0, "procedure_date"] = "1939-05-01"  # P001 born 1940
    procedures.to_csv(csv_folder / "procedures.csv", index=False)
    clinical = pd.read_csv(csv_folder / "clinical.csv", dtype=str, keep_default_na=False)
    clinical.loc[4, "visit_date"] = "2019-07-01"  # P002: 215 days before 2020-02-01
    clinical.to_csv(csv_folder / "clinical.csv", index=False)
    with pytest.raises(ImportValidationError) as error:
        import_tables(engine, "S1", _paths(csv_folder), ACTOR)
    found = {(p.table, p.line, p.field): p.reason for p in error.value.problems}
    assert "birth year 1940" in found[("procedures", 2, "procedure_date")]
    assert "215 days before the first procedure" in found[("clinical", 6, "visit_date")]


def test_sixty_four_patients(
    engine: Engine, cohort_factory: Callable[..., dict[str, pd.DataFrame]]
) -> None:
    report = import_tables(engine, "S1", cohort_factory(64), ACTOR)
    assert report.counts["patients"].created == 64
    assert report.counts["clinical"].created == 256
    assert report.counts["measurements"].created == 96 * 4  # 32 patients with 2 levels


@pytest.mark.slow
def test_thousand_patients(
    engine: Engine, cohort_factory: Callable[..., dict[str, pd.DataFrame]]
) -> None:
    frames = cohort_factory(1000)
    start = time.perf_counter()
    report = import_tables(engine, "S1", frames, ACTOR)
    elapsed = time.perf_counter() - start
    assert report.counts["clinical"].created == 4000
    again = import_tables(engine, "S1", frames, ACTOR)
    assert again.counts["measurements"].unchanged == 6000
    print(f"1000 patients x 4 visits imported in {elapsed:.1f} s")
