"""The simulated reference study reproduces the published findings, and the analysis
detects a BME-pain relation when one is simulated (issue 2 acceptance)."""

import pytest

from bmetrack.analysis.analyse import analyse
from bmetrack.analysis.tables import build_study_tables
from bmetrack.simulate.cohort import CohortParameters, simulate_cohort

N_SEEDS = 20


def _results(seed: int, **parameters):
    cohort = simulate_cohort(CohortParameters(**parameters), seed=seed)
    return analyse(build_study_tables(cohort.frames))


def _relation_found(results) -> bool:
    p_value = results["bme_pain"]["primary"]["p_value"]
    assert p_value is not None
    return p_value < 0.05


@pytest.fixture(scope="module")
def default_results():
    return _results(2006)


def test_default_cohort_size(default_results):
    assert default_results["n_patients"] == 64
    assert default_results["n_vcf"] == 89
    assert 25 <= default_results["n_subgroup"] <= 37


def test_default_seed_reproduces_published_pattern(default_results):
    present = default_results["bme_present_percent"]
    assert abs(present["12"] - 29.0) <= 8.0
    assert present["0"] >= present["3"] >= present["6"] >= present["12"]
    assert default_results["n_recurrences"] == 0
    assert default_results["vas"]["share_of_relief_by_month_3_percent"] >= 75.0
    assert not _relation_found(default_results)
    consistent = {row["finding"]: row["consistent"] for row in default_results["comparison"]}
    assert all(consistent.values()), consistent


def test_recurrence_is_reported_when_simulated():
    results = _results(2006, recurrence_probability=0.5)
    assert results["n_recurrences"] > 0
    row = results["recurrences"][0]
    assert row["returned_month"] > row["absent_month"]


@pytest.mark.slow
def test_detection_rate_with_coupling_and_false_positive_rate_without():
    detected = sum(
        _relation_found(_results(seed, bme_pain_coupling=4.0)) for seed in range(N_SEEDS)
    )
    false_positive = sum(_relation_found(_results(seed)) for seed in range(N_SEEDS))
    assert detected / N_SEEDS >= 0.80, f"detected in {detected}/{N_SEEDS} seeds"
    assert false_positive / N_SEEDS <= 0.10, f"false positives in {false_positive}/{N_SEEDS}"
