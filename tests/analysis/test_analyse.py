"""The results dict on hand-built data: every number derived by hand from the fixture."""

import json

import pandas as pd
import pytest
from test_tables import _frames

from bmetrack.analysis.analyse import analyse, find_recurrences
from bmetrack.analysis.tables import build_study_tables


@pytest.fixture(scope="module")
def results():
    return analyse(build_study_tables(_frames(), study_code="T", study_title="Hand cohort"))


def test_json_safe(results):
    text = json.dumps(results, allow_nan=False)
    assert json.loads(text)["study"] == {"code": "T", "title": "Hand cohort"}


def test_counts_and_flow(results):
    assert (results["n_patients"], results["n_vcf"], results["n_subgroup"]) == (4, 5, 2)
    by_month = results["flow"]["by_month"]
    # Month 3: P1, P2, P4 seen (P4 twice, counted once); VCF measured: P1:T12, P2:L1, P4:T11.
    assert by_month["3"] == {"patients_seen": 3, "patients_with_vas": 3, "vcf_with_bme": 3}
    assert results["missing"]["12"]["vas"] == 3  # only P1 has a month-12 visit
    assert results["visits_outside_window"] == 1
    assert results["flow"]["excluded_from_subgroup"] == {
        "more than one treated VCF": 1,
        "new VCF during follow-up": 2,
        "pain at another untreated level": 1,
    }


def test_bme_by_month(results):
    # Month 0 BME: 75, 60, 40, 50, 80 -> all present; median 60.
    assert results["bme_present_percent"]["0"] == 100.0
    assert results["bme"]["summary_by_month"]["0"]["median"] == 60.0
    # Month 6: only P1:T12 measured (20%); the other 4 treated VCF count as missing.
    assert results["bme"]["summary_by_month"]["6"]["n"] == 1
    assert results["bme"]["summary_by_month"]["6"]["n_missing"] == 4
    assert results["bme"]["extent_by_month"]["0"] == {
        "0": 0,
        "1-25": 0,
        "26-50": 2,
        "51-75": 2,
        "76-100": 1,
    }
    # Month 12: only P1 (0%) -> 0 of 1 present.
    present = results["bme"]["present_by_month"]["12"]
    assert (present["successes"], present["n"]) == (0, 1)
    assert results["n_recurrences"] == 0


def test_vas(results):
    # Month 0 VAS: 10, 8, 7, 7 (70 mm) -> median 7.5; month 3: 2, 5, 3 -> 3.
    assert results["vas_median"] == {"0": 7.5, "3": 3.0, "6": 2.0, "12": 1.0}
    assert results["vas"]["summary_by_month"]["12"]["n_missing"] == 3
    # Share of the 0->12 median drop reached by month 3: (7.5-3)/(7.5-1) = 69.2%.
    assert results["vas"]["share_of_relief_by_month_3_percent"] == pytest.approx(4.5 / 6.5 * 100)
    # Responders at month 3 (drop >= 2 or >= 30%): P1 10->2 yes, P2 8->5 yes, P4 7->3 yes.
    responders = results["vas"]["responders"]["3"]
    assert (responders["successes"], responders["n"]) == (3, 3)


def test_analgesic_counts(results):
    # Month 0: morphine (3), tramadol (2), paracetamol+codeine (2), oxycodone (3).
    assert results["analgesics"]["class_counts_by_month"]["0"] == {"0": 0, "1": 0, "2": 2, "3": 2}
    assert results["analgesics"]["class_counts_by_month"]["3"] == {"0": 2, "1": 1, "2": 0, "3": 0}


def test_subgroup_correlations_listed(results):
    rows = results["subgroup_correlations"]
    assert [row["month"] for row in rows] == [3, 6, 12, 3, 6, 12, None]
    assert results["bme_pain"]["n_patients"] == 2


def test_comparison_rows(results):
    rows = {row["finding"][:20]: row for row in results["comparison"]}
    assert len(results["comparison"]) == 5
    assert rows["once BME had disappe"]["consistent"] is True
    # 69% < 75% of relief by month 3: not the reference pattern.
    assert rows["pain relief was most"]["consistent"] is False


def test_find_recurrences():
    vcf = pd.DataFrame(
        {
            "vcf_id": ["a"] * 4 + ["b"] * 3 + ["c"] * 3,
            "patient_code": ["A"] * 4 + ["B"] * 3 + ["C"] * 3,
            "level": ["L1"] * 10,
            "month": [0, 3, 6, 12, 0, 3, 6, 0, 3, 12],
            "bme_percent": [40, 0, 12, 3, 40, 20, 0, 30, None, 8],
            "bme_present": pd.array(
                [True, False, True, False, True, True, False, True, None, True], dtype="boolean"
            ),
        }
    )
    found = find_recurrences(vcf)
    assert found.to_dict(orient="records") == [
        {
            "vcf_id": "a",
            "patient_code": "A",
            "level": "L1",
            "absent_month": 3,
            "returned_month": 6,
            "bme_percent": 12,
        }
    ]
