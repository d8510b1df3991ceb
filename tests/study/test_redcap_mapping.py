"""Import of a foreign REDCap project (dictionary + flat export) through a mapping file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from sqlalchemy import Engine

from bmetrack.study import redcap, redcap_mapping
from bmetrack.study.exporters import export_frames
from bmetrack.study.importers import TABLE_ORDER, ImportValidationError

ACTOR = "mapper"

# The foreign project: its own names, events, codes; one row per field of the dictionary.
_FIELDS = [
    ("study_id", "demographics", "text", "", ""),
    ("gender", "demographics", "radio", "1, Female | 2, Male", ""),
    ("yob", "demographics", "text", "", "integer"),
    ("visit_dt", "visit", "text", "", "date_ymd"),
    ("pain_scale", "visit", "text", "", "integer"),
    (
        "analgesics",
        "visit",
        "checkbox",
        "1, Paracetamol | 2, Tramadol | 3, Morphine | 4, Oxycodone",
        "",
    ),
    ("other_pain", "visit", "yesno", "", ""),
    ("vp_date", "vertebroplasty", "text", "", "date_ymd"),
    ("vp_level", "vertebroplasty", "dropdown", "1, T11 | 2, Th12 | 3, L1 | 4, L2", ""),
    ("cement_ml", "vertebroplasty", "text", "", "number"),
    ("mri_vert", "mri", "text", "", ""),
    ("bme_pct", "mri", "text", "", "number"),
    ("gsq", "mri", "radio", "0, normal | 1, mild | 2, moderate | 3, severe", ""),
]
_FLAT_COLUMNS = [
    "study_id",
    "redcap_event_name",
    "redcap_repeat_instrument",
    "redcap_repeat_instance",
    "gender",
    "yob",
    "demographics_complete",
    "visit_dt",
    "pain_scale",
    "analgesics___1",
    "analgesics___2",
    "analgesics___3",
    "analgesics___4",
    "other_pain",
    "visit_complete",
    "vp_date",
    "vp_level",
    "cement_ml",
    "vertebroplasty_complete",
    "mri_vert",
    "bme_pct",
    "gsq",
    "mri_complete",
]
_NO_BOXES = ["0", "0", "0", "0"]


def _row(record: str, event: str, instrument: str = "", instance: str = "", **cells: Any) -> dict:
    row = dict.fromkeys(_FLAT_COLUMNS, "")
    # REDCap exports every checkbox column as 0 even on rows where the form is absent.
    row.update(dict(zip([f"analgesics___{i}" for i in range(1, 5)], _NO_BOXES, strict=True)))
    row.update(
        study_id=record,
        redcap_event_name=event,
        redcap_repeat_instrument=instrument,
        redcap_repeat_instance=instance,
    )
    boxes = cells.pop("boxes", None)
    if boxes is not None:
        for i, value in enumerate(boxes, start=1):
            row[f"analgesics___{i}"] = value
    row.update(cells)
    return row


def foreign_dictionary() -> pd.DataFrame:
    rows = []
    for name, form, kind, choices, validation in _FIELDS:
        row = [""] * len(redcap.DICTIONARY_COLUMNS)
        row[0], row[1], row[3], row[4], row[5], row[7] = (
            name,
            form,
            kind,
            name.replace("_", " "),
            choices,
            validation,
        )
        rows.append(row)
    return pd.DataFrame(rows, columns=redcap.DICTIONARY_COLUMNS, dtype=object)


def foreign_flat() -> pd.DataFrame:
    """Three patients; A03's 'extra' visit has no nominal month (the date decides)."""
    scr, fu3, extra = "screening_arm_1", "fu_3m_arm_1", "extra_visit_arm_1"
    visit = {"visit_complete": "2"}
    rows = [
        _row("A01", scr, gender="1", yob="1941", visit_dt="2021-03-01", pain_scale="90", **visit),
        _row("A01", scr, "vertebroplasty", "1", vp_date="2021-03-05", vp_level="2"),
        _row("A01", scr, "mri", "1", mri_vert="Th12", bme_pct="75", gsq="2"),
        _row("A01", fu3, visit_dt="2021-06-04", pain_scale="20", other_pain="0"),
        _row("A01", fu3, "mri", "1", mri_vert="T12", bme_pct="25", gsq="2"),
        _row("A02", scr, gender="2", yob="1938", visit_dt="2021-04-10", pain_scale="70"),
        _row("A02", scr, "vertebroplasty", "1", vp_date="2021-04-12", vp_level="3"),
        _row("A02", scr, "vertebroplasty", "2", vp_date="2021-04-12", vp_level="4"),
        _row("A02", fu3, visit_dt="2021-07-13", pain_scale="35", other_pain="0"),
        _row("A02", fu3, "mri", "1", mri_vert="L1", bme_pct="40", gsq="3"),
        _row("A02", fu3, "mri", "2", mri_vert="th 12", bme_pct="0", gsq="0"),
        _row("A03", scr, gender="1", visit_dt="2021-05-01", pain_scale="50"),
        _row("A03", scr, "vertebroplasty", "1", vp_date="2021-05-03", vp_level="1"),
        _row("A03", extra, visit_dt="2021-09-15", pain_scale="30"),
    ]
    flat = pd.DataFrame(rows, columns=_FLAT_COLUMNS, dtype=object)
    # Analgesics: A01 morphine then nothing; A02 paracetamol + tramadol then paracetamol.
    flat.loc[0, ["analgesics___3", "other_pain"]] = ["1", "0"]
    flat.loc[5, ["analgesics___1", "analgesics___2", "other_pain"]] = ["1", "1", "1"]
    flat.loc[8, ["analgesics___1"]] = "1"
    flat.loc[[1, 6], "cement_ml"] = ["3.5", "4"]
    return flat


def foreign_mapping() -> dict[str, Any]:
    return {
        "record_id": "study_id",
        "events": {
            "screening_arm_1": 0,
            "fu_3m_arm_1": 3,
            "fu_6m_arm_1": 6,
            "fu_12m_arm_1": 12,
            "extra_visit_arm_1": None,
        },
        "tables": {
            "patients": {
                "events": ["screening_arm_1"],
                "columns": {
                    "sex": {"field": "gender", "values": {"1": "F", "2": "M"}},
                    "birth_year": "yob",
                },
            },
            "procedures": {
                "instrument": "vertebroplasty",
                "columns": {
                    "procedure_date": "vp_date",
                    "procedure_type": {"value": "vertebroplasty"},
                    "level": {"field": "vp_level", "labels": True},
                    "cement_volume_ml": "cement_ml",
                },
            },
            "clinical": {
                "columns": {
                    "visit_date": "visit_dt",
                    "vas": "pain_scale",
                    "vas_unit": {"value": "mm"},
                    "analgesic_drugs": {
                        "field": "analgesics",
                        "labels": True,
                        "none_value": "none",
                    },
                    "pain_other_level": "other_pain",
                }
            },
            "measurements": {
                "instrument": "mri",
                "columns": {
                    "visit_date": {"field": "visit_dt", "event_field": True},
                    "level": "mri_vert",
                    "bme_percent": "bme_pct",
                    "genant_grade": {
                        "field": "gsq",
                        "values": {"0": "0", "1": "1", "2": "2", "3": "3"},
                    },
                },
            },
        },
    }


@pytest.fixture
def project(tmp_path: Path) -> dict[str, Path]:
    """The foreign project written as a user has it: dictionary, flat export, mapping."""
    paths = {
        "dictionary": tmp_path / "Foreign_DataDictionary.csv",
        "flat": tmp_path / "Foreign_DATA.csv",
        "mapping": tmp_path / "mapping.json",
    }
    foreign_dictionary().to_csv(paths["dictionary"], index=False)
    foreign_flat().to_csv(paths["flat"], index=False)
    paths["mapping"].write_text(json.dumps(foreign_mapping(), indent=2))
    return paths


def _convert() -> dict[str, pd.DataFrame]:
    mapping = redcap_mapping.parse_mapping(foreign_mapping())
    fields = redcap_mapping.read_data_dictionary(foreign_dictionary())
    assert redcap_mapping.validate_mapping(mapping, fields) == []
    frames, problems = redcap_mapping.foreign_redcap_to_frames(foreign_flat(), mapping, fields)
    assert problems == []
    return frames


def test_dictionary_choices_are_parsed() -> None:
    fields = redcap_mapping.read_data_dictionary(foreign_dictionary())
    assert fields["vp_level"].choices == {"1": "T11", "2": "Th12", "3": "L1", "4": "L2"}
    assert fields["other_pain"].choices == {"1": "Yes", "0": "No"}
    assert (fields["analgesics"].form, fields["analgesics"].field_type) == ("visit", "checkbox")


def test_converted_frames() -> None:
    frames = _convert()
    patients = frames["patients"]
    assert patients[["patient_code", "sex", "birth_year"]].values.tolist() == [
        ["A01", "F", "1941"],
        ["A02", "M", "1938"],
        ["A03", "F", ""],
    ]
    procedures = frames["procedures"]
    # Dropdown labels "Th12" etc. normalised to our level names.
    assert procedures["level"].tolist() == ["T12", "L1", "L2", "T11"]
    assert procedures["procedure_type"].unique().tolist() == ["vertebroplasty"]
    assert procedures["cement_volume_ml"].tolist() == ["3.5", "4", "", ""]
    assert procedures.attrs["source_lines"] == [3, 8, 9, 14]  # header is line 1
    clinical = frames["clinical"].set_index(["patient_code", "visit_date"])
    assert clinical.loc[("A01", "2021-03-01"), "analgesic_drugs"] == "Morphine"
    assert clinical.loc[("A01", "2021-06-04"), "analgesic_drugs"] == "none"  # no box ticked
    assert clinical.loc[("A02", "2021-04-10"), "analgesic_drugs"] == "Paracetamol;Tramadol"
    assert clinical.loc[("A02", "2021-04-10"), "pain_other_level"] == "yes"
    assert clinical.loc[("A02", "2021-07-13"), "pain_other_level"] == "no"
    assert clinical.loc[("A03", "2021-05-01"), "pain_other_level"] == ""
    assert clinical["nominal_month"].tolist() == ["0", "3", "0", "3", "0", ""]
    assert clinical["vas"].tolist() == ["90", "20", "70", "35", "50", "30"]
    assert set(clinical["vas_unit"]) == {"mm"}
    measurements = frames["measurements"]
    # The visit date comes from the event's own row; "th 12" normalised.
    assert measurements[
        ["patient_code", "visit_date", "level", "genant_grade"]
    ].values.tolist() == [
        ["A01", "2021-03-01", "T12", "2"],
        ["A01", "2021-06-04", "T12", "2"],
        ["A02", "2021-07-13", "L1", "3"],
        ["A02", "2021-07-13", "T12", "0"],
    ]


def test_import_and_export_back(
    make_engine: Callable[[str], Engine], project: dict[str, Path]
) -> None:
    engine = make_engine("foreign")
    report = redcap_mapping.import_foreign_redcap(
        engine, "F1", project["flat"], project["dictionary"], project["mapping"], ACTOR
    )
    assert report.written
    counts = {name: report.counts[name].created for name in TABLE_ORDER}
    assert counts == {"patients": 3, "procedures": 4, "clinical": 6, "measurements": 4}
    stored = export_frames(engine, "F1")
    clinical = stored["clinical"].set_index(["patient_code", "visit_date"])
    # 90 mm on the 100 mm line = 9.0 on the 0-10 scale; the class of morphine is 3.
    assert float(clinical.loc[("A01", "2021-03-01"), "vas_0_10"]) == pytest.approx(9.0)
    assert int(clinical.loc[("A01", "2021-03-01"), "analgesic_class"]) == 3
    assert int(clinical.loc[("A02", "2021-04-10"), "analgesic_class"]) == 2
    assert int(clinical.loc[("A01", "2021-06-04"), "analgesic_class"]) == 0
    # Day 135 after the procedure (2021-05-03 -> 2021-09-15) matches no window: kept.
    extra = clinical.loc[("A03", "2021-09-15")]
    assert int(extra["days_from_procedure"]) == 135
    assert pd.isna(extra["nominal_month"]) or str(extra["nominal_month"]) == ""

    # Our own REDCap export of the imported study holds the foreign values.
    flat = redcap.export_redcap(engine, "F1")
    a01 = flat[flat["record_id"] == "A01"]
    baseline = a01[(a01["redcap_event_name"] == "baseline_arm_1")].iloc[0]
    assert (baseline["sex"], baseline["birth_year"]) == ("F", "1941")
    assert (baseline["visit_date"], float(baseline["vas"]), baseline["vas_unit"]) == (
        "2021-03-01",
        90.0,
        "2",  # our code of mm
    )
    assert baseline["pain_other_level"] == "0"
    level = a01[a01["redcap_repeat_instrument"] == "treated_level"].iloc[0]
    assert (level["treated_level"], float(level["cement_volume_ml"])) == ("19", 3.5)  # T12 = 19
    month3 = a01[
        (a01["redcap_event_name"] == "month_3_arm_1") & (a01["redcap_repeat_instrument"] == "")
    ].iloc[0]
    assert float(month3["vas"]) == 20.0
    a03 = flat[flat["record_id"] == "A03"]
    assert a03[a03["redcap_event_name"] == "unscheduled_arm_1"]["visit_date"].tolist() == [
        "2021-09-15"
    ]
    # ... and imports back into a fresh database to the same tables.
    other = make_engine("ours")
    redcap.import_redcap(other, "F1", flat, "other")
    back = export_frames(other, "F1")
    for name in TABLE_ORDER:
        pd.testing.assert_frame_equal(stored[name], back[name])


def test_bad_row_gives_one_problem_and_writes_nothing(
    engine: Engine, take_snapshot: Callable[[Engine], dict[str, object]]
) -> None:
    flat = foreign_flat()
    flat.loc[8, "pain_scale"] = "120"  # A02 month 3: beyond the 100 mm line
    before = take_snapshot(engine)
    with pytest.raises(ImportValidationError) as error:
        redcap_mapping.import_foreign_redcap(
            engine, "F1", flat, foreign_dictionary(), foreign_mapping(), ACTOR
        )
    problems = error.value.problems
    assert len(problems) == 1
    problem = problems[0]
    assert problem.line == 10  # row index 8 + header line + 1
    assert problem.value == "120"
    assert problem.field == "vas (REDCap field pain_scale)"
    assert "REDCap data line 10" in str(problem)
    assert take_snapshot(engine) == before


def test_unmapped_code_and_unknown_event_point_to_foreign_lines() -> None:
    flat = foreign_flat()
    flat.loc[0, "gender"] = "3"
    flat.loc[13, "redcap_event_name"] = "fu_24m_arm_1"
    mapping = redcap_mapping.parse_mapping(foreign_mapping(), "m.json")
    fields = redcap_mapping.read_data_dictionary(foreign_dictionary())
    _, problems = redcap_mapping.foreign_redcap_to_frames(flat, mapping, fields, "data.csv")
    assert [(p.line, p.field, p.value) for p in problems] == [
        (2, "gender", "3"),
        (15, "redcap_event_name", "fu_24m_arm_1"),
    ]
    assert "add it" in problems[0].reason


def test_mapping_problems_are_listed_together() -> None:
    data = foreign_mapping()
    columns = data["tables"]["clinical"]["columns"]
    columns["vas"] = "pain_score"  # no such field
    data["tables"]["patients"]["columns"]["sex"]["values"] = {"1": "F", "3": "M"}  # no code 3
    data["tables"]["patients"]["columns"]["birth_year"] = "analgesics"  # checkbox -> int
    data["tables"]["procedures"]["columns"]["level"] = {"field": "vp_level", "values": {"9": "T9"}}
    del columns["visit_date"]  # required column
    mapping = redcap_mapping.parse_mapping(data, "m.json")
    fields = redcap_mapping.read_data_dictionary(foreign_dictionary())
    problems = redcap_mapping.validate_mapping(mapping, fields)
    found = {(p.field, str(p.value)) for p in problems}
    assert found == {
        ("tables.patients.columns.sex.values", "3"),
        ("tables.patients.columns.birth_year", "analgesics"),
        ("tables.procedures.columns.level.values", "9"),
        ("tables.clinical.columns", "visit_date"),
        ("tables.clinical.columns.vas", "pain_score"),
    }
    reasons = {p.field: p.reason for p in problems}
    assert "not in the data dictionary" in reasons["tables.clinical.columns.vas"]
    assert "1=Female, 2=Male" in reasons["tables.patients.columns.sex.values"]
    with pytest.raises(redcap_mapping.RedcapMappingError) as error:
        redcap_mapping.import_foreign_redcap(
            None,  # type: ignore[arg-type]  # never reached: the mapping is refused first
            "F1",
            foreign_flat(),
            foreign_dictionary(),
            data,
            ACTOR,
        )
    assert len(error.value.problems) == 5


def test_mapping_structure_errors() -> None:
    data: dict[str, Any] = {"events": {"a": -1}, "tables": {"visits": {}}, "extra": 1}
    with pytest.raises(redcap_mapping.RedcapMappingError) as error:
        redcap_mapping.parse_mapping(data, "m.json")
    fields = {p.field for p in error.value.problems}
    assert fields == {"extra", "record_id", "events.a", "tables.visits"}


def test_repeating_field_on_wrong_instrument_is_refused() -> None:
    data = foreign_mapping()
    data["tables"]["measurements"]["columns"]["visit_date"] = "visit_dt"  # lives on 'visit'
    mapping = redcap_mapping.parse_mapping(data)
    fields = redcap_mapping.read_data_dictionary(foreign_dictionary())
    problems = redcap_mapping.validate_mapping(mapping, fields)
    assert [(p.field, p.value) for p in problems] == [
        ("tables.measurements.columns.visit_date", "visit_dt")
    ]
    assert "event_field" in problems[0].reason


def test_mapping_files_json_and_toml(tmp_path: Path) -> None:
    json_path = tmp_path / "m.json"
    json_path.write_text(json.dumps(foreign_mapping()))
    toml_path = tmp_path / "m.toml"
    toml_path.write_text(
        'record_id = "study_id"\n'
        "[events]\n"
        "screening_arm_1 = 0\n"
        "[tables.patients.columns]\n"
        'sex = { field = "gender", values = { "1" = "F", "2" = "M" } }\n'
    )
    from_json = redcap_mapping.load_mapping(json_path)
    from_toml = redcap_mapping.load_mapping(toml_path)
    assert from_json.tables[0].columns[:1] == from_toml.tables[0].columns
    assert from_toml.events == {"screening_arm_1": 0}
    yaml = pytest.importorskip("yaml")
    yaml_path = tmp_path / "m.yaml"
    yaml_path.write_text(yaml.safe_dump(foreign_mapping(), sort_keys=False))
    assert redcap_mapping.load_mapping(yaml_path).tables == from_json.tables
    with pytest.raises(ValueError, match="unknown format"):
        redcap_mapping.load_mapping(tmp_path / "m.ini")


def test_cli_import_foreign(engine: Engine, project: dict[str, Path]) -> None:
    from typer.testing import CliRunner

    from bmetrack.cli import app

    url = engine.url.render_as_string(hide_password=False)
    args = ["import", "--db", url, "--study", "F1", "--redcap-foreign", str(project["flat"])]
    files = [
        "--redcap-dictionary",
        str(project["dictionary"]),
        "--mapping",
        str(project["mapping"]),
    ]
    runner = CliRunner()
    result = runner.invoke(app, args)
    assert result.exit_code == 2  # the dictionary and mapping are required with it
    result = runner.invoke(app, args + files)
    assert result.exit_code == 0, result.output
    assert "clinical: 6 rows - 6 created" in result.output
    bad = foreign_mapping()
    bad["tables"]["clinical"]["columns"]["vas"] = "pain_score"
    project["mapping"].write_text(json.dumps(bad))
    result = runner.invoke(app, args + files)
    assert result.exit_code == 2
    assert "pain_score" in result.output + str(getattr(result, "stderr", ""))


def test_one_table_from_several_field_groups() -> None:
    """A classic (non-longitudinal, non-repeating) project with two level fields per patient."""
    dictionary = pd.DataFrame(
        [
            ["pid", "baseline", "", "text", *[""] * 14],
            ["pv_date", "baseline", "", "text", "", "", "", "date_ymd", *[""] * 10],
            ["level_1", "baseline", "", "dropdown", "", "19, Th12 | 20, L1", *[""] * 12],
            ["level_2", "baseline", "", "text", *[""] * 14],
        ],
        columns=redcap.DICTIONARY_COLUMNS,
    )
    flat = pd.DataFrame(
        [["B1", "2022-01-03", "19", "L1"], ["B2", "2022-02-07", "20", ""]],
        columns=["pid", "pv_date", "level_1", "level_2"],
    )
    common = {"procedure_date": "pv_date", "procedure_type": {"value": "vertebroplasty"}}
    data = {
        "record_id": "pid",
        "tables": {
            "procedures": [
                {"columns": {**common, "level": {"field": "level_1", "labels": True}}},
                {"columns": {**common, "level": "level_2"}, "when": "level_2"},
            ]
        },
    }
    mapping = redcap_mapping.parse_mapping(data)
    fields = redcap_mapping.read_data_dictionary(dictionary)
    assert redcap_mapping.validate_mapping(mapping, fields) == []
    frames, problems = redcap_mapping.foreign_redcap_to_frames(flat, mapping, fields)
    assert problems == []
    procedures = frames["procedures"]
    assert procedures[["patient_code", "level"]].values.tolist() == [
        ["B1", "T12"],
        ["B1", "L1"],
        ["B2", "L1"],
    ]
    assert procedures.attrs["source_lines"] == [2, 2, 3]
    assert procedures.attrs["foreign_fields"]["level"] == "level_1/level_2"
