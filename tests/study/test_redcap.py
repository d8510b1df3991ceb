"""REDCap flat export/import and data dictionary."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import Engine

from bmetrack.study import redcap
from bmetrack.study.exporters import export_frames
from bmetrack.study.importers import TABLE_ORDER, ImportValidationError, import_tables

ACTOR = "redcap"


def _paths(folder: Path) -> dict[str, Path]:
    return {name: folder / f"{name}.csv" for name in TABLE_ORDER}


def test_event_names_follow_nominal_months() -> None:
    assert redcap.redcap_events([0, 3, 6, 12]) == [
        "baseline_arm_1",
        "month_3_arm_1",
        "month_6_arm_1",
        "month_12_arm_1",
        "unscheduled_arm_1",
    ]
    assert redcap.event_name(24) == "month_24_arm_1"


def test_flat_export_layout(engine: Engine, csv_folder: Path) -> None:
    import_tables(engine, "S1", _paths(csv_folder), ACTOR)
    flat = redcap.export_redcap(engine, "S1")
    assert list(flat.columns[:4]) == [
        "record_id",
        "redcap_event_name",
        "redcap_repeat_instrument",
        "redcap_repeat_instance",
    ]
    p001 = flat[flat["record_id"] == "P001"]
    # Baseline row (patient + month-0 visit), the treated level, then per event the visit
    # row and its measurement instance.
    assert list(zip(p001["redcap_event_name"], p001["redcap_repeat_instrument"], strict=True)) == [
        ("baseline_arm_1", ""),
        ("baseline_arm_1", "treated_level"),
        ("baseline_arm_1", "vertebra_measurement"),
        ("month_3_arm_1", ""),
        ("month_3_arm_1", "vertebra_measurement"),
        ("month_6_arm_1", ""),
        ("month_6_arm_1", "vertebra_measurement"),
        ("month_12_arm_1", ""),
        ("month_12_arm_1", "vertebra_measurement"),
    ]
    baseline = p001.iloc[0]
    assert (baseline["sex"], baseline["birth_year"], baseline["enrolled_date"]) == (
        "F",
        "1940",
        "2020-01-02",
    )
    assert (baseline["visit_date"], baseline["vas"], baseline["pain_other_level"]) == (
        "2020-01-05",
        "10.0",
        "0",
    )
    assert baseline["patient_complete"] == "2" and baseline["redcap_repeat_instance"] == ""
    level = p001.iloc[1]
    assert (level["treated_level"], level["redcap_repeat_instance"]) == ("19", "1")  # T12
    assert level["sex"] == "" and level["visit_date"] == ""
    p002 = flat[flat["record_id"] == "P002"]
    month3 = p002[p002["redcap_event_name"] == "month_3_arm_1"].iloc[0]
    assert month3["new_vcf___23"] == "1"  # L4 = label 23
    assert month3["new_vcf___22"] == "0"
    assert (month3["pain_other_level"], month3["vas"], month3["vas_unit"]) == ("1", "40.0", "2")
    levels = p002[p002["redcap_repeat_instrument"] == "treated_level"]
    assert levels["redcap_repeat_instance"].tolist() == ["1", "2"]
    assert levels["treated_level"].tolist() == ["20", "21"]
    # P003's day-135 visit matches no month: a 'visit' instance of the unscheduled event.
    p003 = flat[flat["record_id"] == "P003"]
    odd = p003[p003["redcap_event_name"] == "unscheduled_arm_1"]
    assert odd["redcap_repeat_instrument"].tolist() == ["visit"]
    assert odd["visit_date"].tolist() == ["2020-07-14"]


def test_round_trip_through_redcap_csv(
    make_engine: Callable[[str], Engine], csv_folder: Path, tmp_path: Path
) -> None:
    first = make_engine("first")
    import_tables(first, "S1", _paths(csv_folder), ACTOR)
    path = tmp_path / "redcap.csv"
    redcap.export_redcap(first, "S1").to_csv(path, index=False)
    second = make_engine("second")
    report = redcap.import_redcap(second, "S1", path, "other")
    assert report.counts["clinical"].created == 9
    original, back = export_frames(first, "S1"), export_frames(second, "S1")
    for name in TABLE_ORDER:
        pd.testing.assert_frame_equal(original[name], back[name])
    again = redcap.import_redcap(second, "S1", path, "other")
    assert all(c.created == c.updated == 0 for c in again.counts.values())


def test_redcap_problems_point_to_redcap_lines(engine: Engine, csv_folder: Path) -> None:
    import_tables(engine, "S1", _paths(csv_folder), ACTOR)
    flat = redcap.export_redcap(engine, "S1")
    engine_rows = len(flat)
    flat.loc[3, "vas"] = "12"  # P001 month 3 on the 0-10 scale
    flat.loc[5, "redcap_event_name"] = "month_4_arm_1"
    with pytest.raises(ImportValidationError) as error:
        redcap.import_redcap(engine, "S2", flat, ACTOR)
    found = [(p.line, p.field, p.value) for p in error.value.problems]
    assert found == [(7, "redcap_event_name", "month_4_arm_1")]
    flat.loc[5, "redcap_event_name"] = "month_6_arm_1"
    with pytest.raises(ImportValidationError) as error:
        redcap.import_redcap(engine, "S2", flat, ACTOR)
    problem = error.value.problems[0]
    assert (problem.line, problem.field, problem.value) == (5, "vas", "12")
    assert "REDCap data line 5" in str(problem)
    assert len(flat) == engine_rows


def test_data_dictionary() -> None:
    dictionary = redcap.redcap_data_dictionary()
    assert list(dictionary.columns) == [
        "Variable / Field Name",
        "Form Name",
        "Section Header",
        "Field Type",
        "Field Label",
        "Choices, Calculations, OR Slider Labels",
        "Field Note",
        "Text Validation Type OR Show Slider Number",
        "Text Validation Min",
        "Text Validation Max",
        "Identifier?",
        "Branching Logic (Show field only if...)",
        "Required Field?",
        "Custom Alignment",
        "Question Number (surveys only)",
        "Matrix Group Name",
        "Matrix Ranking?",
        "Field Annotation",
    ]
    fields = dictionary.set_index("Variable / Field Name")
    assert dictionary["Variable / Field Name"].iloc[0] == "record_id"
    assert set(dictionary["Form Name"]) == set(redcap.FORMS)
    validation = "Text Validation Type OR Show Slider Number"
    for name in ("visit_date", "procedure_date", "meas_visit_date", "enrolled_date"):
        assert fields.loc[name, validation] == "date_ymd"
        assert fields.loc[name, "Identifier?"] == "y"
    assert fields.loc["birth_year", validation] == "integer"
    assert (
        fields.loc["bme_percent", "Text Validation Min"],
        fields.loc["bme_percent", "Text Validation Max"],
    ) == ("0", "100")
    assert fields.loc["bme_percent", validation] == "number"
    assert fields.loc["body_volume_ml", "Text Validation Min"] == "0"
    assert fields.loc["pain_other_level", "Field Type"] == "yesno"
    assert fields.loc["new_vcf", "Field Type"] == "checkbox"
    assert "23, L4" in fields.loc["new_vcf", "Choices, Calculations, OR Slider Labels"]
    assert fields.loc["analgesic_class", "Choices, Calculations, OR Slider Labels"].startswith(
        "0, none"
    )
    # Every flat column other than the REDCap identifiers comes from a dictionary field.
    names = set(dictionary["Variable / Field Name"])
    for column in redcap.redcap_flat_columns()[4:]:
        base = column.split("___")[0]
        assert base in names or column.removesuffix("_complete") in redcap.FORMS


def test_unknown_redcap_column_is_refused(engine: Engine) -> None:
    flat = pd.DataFrame(
        {"record_id": ["P1"], "redcap_event_name": ["baseline_arm_1"], "mood": ["ok"]}
    )
    with pytest.raises(ImportValidationError) as error:
        redcap.import_redcap(engine, "S1", flat, ACTOR)
    assert [(p.field, p.line) for p in error.value.problems] == [("mood", 1)]
