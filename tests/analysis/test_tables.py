"""Tidy tables from hand-built exchange tables, every expectation worked out by hand."""

import numpy as np
import pandas as pd
import pytest

from bmetrack.analysis.tables import build_study_tables, extent_category
from bmetrack.settings import resolve_settings

DAY0 = pd.Timestamp("2020-01-01")


def _d(days: int) -> pd.Timestamp:
    return DAY0 + pd.Timedelta(days=days)


def _frames() -> dict[str, pd.DataFrame]:
    patients = pd.DataFrame(
        {
            "patient_code": ["P1", "P2", "P3", "P4"],
            "sex": ["F", "F", "M", "F"],
            "birth_year": [1935, 1940, 1938, 1930],
        }
    )
    procedures = pd.DataFrame(
        {
            "patient_code": ["P1", "P2", "P2", "P3", "P4", "P4"],
            "procedure_date": [DAY0] * 5 + [_d(200)],  # P4's second procedure is not index
            "procedure_type": ["vertebroplasty"] * 6,
            "level": ["T12", "L1", "L2", "L1", "T11", "L3"],
        }
    )
    clinical_rows = [
        # P1: the reference paper's Fig 2 case: VAS 10, 2, 1, 1; morphine then nothing.
        ("P1", -2, 10.0, "0-10", "morphine", "no", ""),
        ("P1", 90, 2.0, "0-10", "none", "no", ""),
        ("P1", 185, 1.0, "0-10", "none", "no", ""),
        ("P1", 370, 1.0, "0-10", "none", "no", ""),
        # P2: two treated levels, new VCF at month 3, last visit outside every window.
        ("P2", 0, 8.0, "0-10", "tramadol", "no", ""),
        ("P2", 95, 5.0, "0-10", "paracetamol", "no", "L3"),
        ("P2", 300, 4.0, "0-10", "paracetamol", "no", ""),
        # P3: pain at another level at month 6.
        ("P3", 0, 7.0, "0-10", "paracetamol;codeine", "no", ""),
        ("P3", 183, 3.0, "0-10", "", "yes", ""),
        # P4: VAS in mm at baseline, two visits near month 3 (85 is nearer to 91 than 100).
        ("P4", 0, 70.0, "mm", "oxycodone", "no", ""),
        ("P4", 85, 3.0, "0-10", "none", "no", ""),
        ("P4", 100, 4.0, "0-10", "none", "no", ""),
    ]
    clinical = pd.DataFrame(
        clinical_rows,
        columns=[
            "patient_code",
            "day",
            "vas",
            "vas_unit",
            "analgesic_drugs",
            "pain_other_level",
            "new_vcf_levels",
        ],
    )
    clinical["visit_date"] = clinical.pop("day").map(_d)
    clinical["nominal_month"] = pd.array([pd.NA] * len(clinical), dtype="Int64")
    clinical["analgesic_class"] = pd.array([pd.NA] * len(clinical), dtype="Int64")
    measurement_rows = [
        ("P1", -2, "T12", 75.0, 2),
        ("P1", 90, "T12", 25.0, 2),
        ("P1", 185, "T12", 20.0, 2),
        ("P1", 370, "T12", 0.0, 2),
        ("P2", 0, "L1", 60.0, 1),
        ("P2", 0, "L2", 40.0, 1),
        ("P2", 95, "L1", 30.0, 1),
        ("P3", 0, "L1", 50.0, 3),
        ("P3", 90, "L4", 30.0, 1),  # untreated level, fractured at follow-up: new VCF
        ("P4", 0, "T11", 80.0, 1),
        ("P4", 85, "T11", 10.0, 1),
        ("P4", 100, "T11", 12.0, 1),
        ("P4", 0, "L5", 0.0, 1),  # untreated, already fractured at month 0: not new
        ("P4", 90, "L5", 0.0, 1),
    ]
    measurements = pd.DataFrame(
        measurement_rows, columns=["patient_code", "day", "level", "bme_percent", "genant_grade"]
    )
    measurements["visit_date"] = measurements.pop("day").map(_d)
    return {
        "patients": patients,
        "procedures": procedures,
        "clinical": clinical,
        "measurements": measurements,
    }


@pytest.fixture(scope="module")
def tables():
    return build_study_tables(_frames(), resolve_settings(), study_code="T")


def test_patients_and_subgroup(tables):
    patients = tables.patients.set_index("patient_code")
    assert patients["n_treated_vcf"].to_dict() == {"P1": 1, "P2": 2, "P3": 1, "P4": 1}
    assert patients.at["P2", "treated_levels"] == "L1;L2"
    assert patients["in_subgroup"].to_dict() == {"P1": True, "P2": False, "P3": False, "P4": True}
    assert patients.at["P2", "exclusion_reasons"] == (
        "more than one treated VCF; new VCF during follow-up"
    )
    assert patients.at["P3", "exclusion_reasons"] == (
        "new VCF during follow-up; pain at another untreated level"
    )
    assert patients.at["P4", "any_new_vcf"] == np.False_
    assert patients["imaged_month_0"].all()


def test_visits_windows_units_and_classes(tables):
    visits = tables.patient_visits.set_index(["patient_code", "month"])
    assert visits.loc[("P1", 0), "analgesic_class"] == 3
    assert visits.loc[("P1", 3), "analgesic_class"] == 0
    assert visits.loc[("P3", 0), "analgesic_class"] == 2
    assert pd.isna(visits.loc[("P3", 6), "analgesic_class"])
    assert visits.loc[("P4", 0), "vas"] == pytest.approx(7.0)
    # The nearer of two month-3 visits is used.
    assert visits.loc[("P4", 3), "vas"] == 3.0
    assert tables.duplicate_visits == 2  # one clinical and one measurement duplicate
    assert list(tables.outside_window_visits["patient_code"]) == ["P2"]
    assert tables.outside_window_visits["days_from_procedure"].tolist() == [300]
    assert ("P2", 12) not in visits.index
    assert visits.loc[("P2", 3), "new_vcf"]
    assert visits["in_subgroup"].groupby(level=0).first().to_dict() == {
        "P1": True,
        "P2": False,
        "P3": False,
        "P4": True,
    }


def test_vcf_visits_treated_levels_only(tables):
    vcf = tables.vcf_visits
    assert set(vcf["vcf_id"]) == {"P1:T12", "P2:L1", "P2:L2", "P3:L1", "P4:T11"}
    p1 = vcf[vcf["vcf_id"] == "P1:T12"].set_index("month")
    assert p1["bme_percent"].to_dict() == {0: 75.0, 3: 25.0, 6: 20.0, 12: 0.0}
    assert p1["bme_present"].tolist() == [True, True, True, False]
    assert p1["extent_category"].astype(str).tolist() == ["51-75", "1-25", "1-25", "0"]
    assert list(vcf["extent_category"].cat.categories) == ["0", "1-25", "26-50", "51-75", "76-100"]
    assert vcf.loc[vcf["vcf_id"] == "P4:T11", "bme_percent"].tolist() == [80.0, 10.0]


def test_extent_category_edges():
    values = pd.Series([0.0, 0.4, 25.0, 25.01, 50.0, 75.5, 100.0, np.nan])
    labels = extent_category(values, (0.0, 25.0, 50.0, 75.0, 100.0)).astype(object).tolist()
    assert labels[:7] == ["0", "1-25", "1-25", "26-50", "26-50", "76-100", "76-100"]
    assert pd.isna(labels[7])


def test_missing_table_is_named():
    frames = _frames()
    del frames["clinical"]
    with pytest.raises(ValueError, match="'clinical' is missing"):
        build_study_tables(frames)


def test_visit_without_procedure_is_an_error():
    frames = _frames()
    frames["clinical"].loc[0, "patient_code"] = "P9"
    with pytest.raises(ValueError, match="without a procedure"):
        build_study_tables(frames)
