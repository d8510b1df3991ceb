"""Exporter: exchange frames from the database, CSV round trip, templates."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import Engine, select

from bmetrack.study import records
from bmetrack.study.db import session_scope
from bmetrack.study.exporters import EXPORT_COLUMNS, export_frames, template_csv, write_csv
from bmetrack.study.importers import TABLE_ORDER, import_tables
from bmetrack.study.models import VertebraMeasurement
from bmetrack.study.schema import TABLES

ACTOR = "exporter"


def _paths(folder: Path) -> dict[str, Path]:
    return {name: folder / f"{name}.csv" for name in TABLE_ORDER}


def test_exported_values_match_the_input(engine: Engine, csv_folder: Path) -> None:
    import_tables(engine, "S1", _paths(csv_folder), ACTOR)
    frames = export_frames(engine, "S1")
    assert list(frames) == list(TABLE_ORDER)
    for name, frame in frames.items():
        assert list(frame.columns) == EXPORT_COLUMNS[name]
        assert list(frame.columns[: len(TABLES[name].columns)]) == TABLES[name].column_names
    clinical = frames["clinical"].set_index(["patient_code", "visit_date"])
    row = clinical.loc[("P002", pd.Timestamp("2020-01-20"))]
    assert (row["vas"], row["vas_unit"], row["vas_0_10"]) == (73.0, "mm", pytest.approx(7.3))
    assert (row["nominal_month"], row["window_status"], row["days_from_procedure"]) == (
        0,
        "baseline",
        -12,
    )
    later = clinical.loc[("P002", pd.Timestamp("2020-05-02"))]
    assert (later["new_vcf_levels"], bool(later["pain_other_level"]), later["notes"]) == (
        "L4",
        True,
        "back",
    )
    assert later["nominal_month"] == 3  # day 91 after 2020-02-01
    odd = clinical.loc[("P003", pd.Timestamp("2020-07-14"))]
    assert pd.isna(odd["nominal_month"]) and odd["window_status"] == "outside_window"
    assert odd["vas_unit"] == "" and pd.isna(odd["vas"])
    procedures = frames["procedures"]
    assert procedures["level"].tolist() == ["T12", "L1", "L2", "T11"]
    assert procedures["cement_volume_ml"].tolist()[:3] == [3.5, 4.0, 2.25]
    measurements = frames["measurements"]
    assert measurements["bme_percent"].tolist() == [75.0, 25.0, 20.0, 0.0, 40.5, 0.1, 12.0]
    assert set(measurements["source"]) == {"imported"}
    assert measurements["overridden_by"].tolist() == [""] * 7
    assert str(frames["patients"]["birth_year"].dtype) == "Int64"
    assert pd.api.types.is_datetime64_any_dtype(frames["clinical"]["visit_date"])


def test_override_is_exported_instead_of_the_original(engine: Engine, csv_folder: Path) -> None:
    import_tables(engine, "S1", _paths(csv_folder), ACTOR)
    with session_scope(engine) as session:
        first = session.scalars(
            select(VertebraMeasurement).where(VertebraMeasurement.bme_percent == 25.0)
        ).one()
        records.override_measurement(
            session, first.id, {"bme_percent": 30.0}, actor="dr", reason="second look"
        )
    measurements = export_frames(engine, "S1")["measurements"]
    assert len(measurements) == 7
    row = measurements[measurements["visit_date"] == pd.Timestamp("2020-04-10")].iloc[0]
    assert (row["bme_percent"], row["source"], row["overridden_by"], row["override_reason"]) == (
        30.0,
        "manual",
        "dr",
        "second look",
    )


def test_csv_round_trip_into_a_fresh_database(
    make_engine: Callable[[str], Engine], csv_folder: Path, tmp_path: Path
) -> None:
    first = make_engine("first")
    import_tables(first, "S1", _paths(csv_folder), ACTOR)
    with session_scope(first) as session:
        measurement = session.scalars(select(VertebraMeasurement)).first()
        assert measurement is not None
        records.override_measurement(
            session, measurement.id, {"genant_grade": 3}, actor="dr", reason="re-read"
        )
    exported = export_frames(first, "S1")
    paths = write_csv(exported, tmp_path / "export")
    text = paths["clinical"].read_text(encoding="utf-8")
    assert "2020-01-05" in text and ",yes," in text  # ISO dates, yes/no
    second = make_engine("second")
    report = import_tables(second, "S1", paths, "someone else")
    assert report.counts["measurements"].created == 7
    again = export_frames(second, "S1")
    for name in TABLE_ORDER:
        pd.testing.assert_frame_equal(exported[name], again[name])
    # And importing the export into the same database changes nothing.
    same = import_tables(first, "S1", paths, ACTOR)
    assert all(c.created == c.updated == 0 for c in same.counts.values())


@pytest.mark.parametrize("name", TABLE_ORDER)
def test_template_documents_columns_and_imports_as_is(
    engine: Engine, tmp_path: Path, name: str
) -> None:
    text = template_csv(name)
    lines = text.splitlines()
    comments = [line for line in lines if line.startswith("#")]
    assert all(line.startswith("# ") or line == "#" for line in comments)
    assert lines[-1] == ",".join(TABLES[name].column_names)
    assert len(lines) == len(comments) + 1
    for column in TABLES[name].columns:
        documented = [line for line in comments if line.startswith(f"# {column.name} (")]
        assert len(documented) == 1
        assert ("required" if column.required else "optional") in documented[0]
        if column.unit:
            assert f"unit {column.unit}" in documented[0]
        if column.choices:
            assert ", ".join(column.choices) in documented[0]
    path = tmp_path / f"{name}.csv"
    path.write_text(text, encoding="utf-8")
    report = import_tables(engine, "S1", {name: path}, ACTOR)
    assert report.counts[name].rows == 0 and report.written


def test_export_of_unknown_study_names_it(engine: Engine) -> None:
    with pytest.raises(LookupError, match="'NOPE'"):
        export_frames(engine, "NOPE")


def test_dates_of_export_are_dates(engine: Engine, csv_folder: Path) -> None:
    import_tables(engine, "S1", _paths(csv_folder), ACTOR)
    patients = export_frames(engine, "S1")["patients"]
    assert patients["enrolled_date"].iloc[0].date() == dt.date(2020, 1, 2)
    assert pd.isna(patients["enrolled_date"].iloc[1])
