"""Tests of the cohort simulator (bmetrack.simulate.cohort).

Calibration targets are the published figures of the reference study (METHOD.md 1:
64 patients, 89 treated VCF, 29% with BME at month 12, no recurrence, subgroup of
31 patients, pain relief mostly by month 3) and the parameter values themselves,
checked on large cohorts against hand computations.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pandas.testing as pdt
import pytest
from scipy import stats

from bmetrack.anatomy import label_from_level, normalise_level
from bmetrack.settings import resolve_settings
from bmetrack.simulate.cohort import (
    DRUG_CHOICES,
    CohortParameters,
    SimulatedCohort,
    expected_bme_percent,
    simulate_cohort,
)
from bmetrack.study.analgesics import analgesic_class_of, split_drug_list
from bmetrack.study.cohort import DAYS_PER_MONTH, assign_visit_windows
from bmetrack.study.schema import TABLES

LARGE = 20_000


@pytest.fixture(scope="module")
def default() -> SimulatedCohort:
    return simulate_cohort()


@pytest.fixture(scope="module")
def large() -> SimulatedCohort:
    return simulate_cohort(CohortParameters(n_patients=LARGE), seed=11)


def _visits(cohort: SimulatedCohort) -> pd.DataFrame:
    """Clinical rows with days from the procedure and the treated-level measurements."""
    procedures = cohort.frames["procedures"]
    procedure_date = procedures.groupby("patient_code")["procedure_date"].first()
    clinical = cohort.frames["clinical"].copy()
    clinical["procedure_date"] = clinical["patient_code"].map(procedure_date)
    clinical["days"] = (clinical["visit_date"] - clinical["procedure_date"]).dt.days
    return clinical


def _treated_measurements(cohort: SimulatedCohort) -> pd.DataFrame:
    treated = cohort.frames["procedures"][["patient_code", "level"]]
    measurements = cohort.frames["measurements"].merge(treated, on=["patient_code", "level"])
    clinical = cohort.frames["clinical"][["patient_code", "visit_date", "nominal_month", "vas"]]
    return measurements.merge(clinical, on=["patient_code", "visit_date"])


# --------------------------------------------------------------------------- structure


def test_same_seed_gives_identical_frames() -> None:
    first = simulate_cohort(seed=5)
    second = simulate_cohort(seed=5)
    for name in TABLES:
        pdt.assert_frame_equal(first.frames[name], second.frames[name])
    for name in first.truth:
        pdt.assert_frame_equal(first.truth[name], second.truth[name])


def test_different_seeds_differ() -> None:
    first = simulate_cohort(seed=1)
    second = simulate_cohort(seed=2)
    for name in ("clinical", "measurements"):
        assert not first.frames[name].equals(second.frames[name])


def test_frames_have_exactly_the_schema_columns(default: SimulatedCohort) -> None:
    assert set(default.frames) == set(TABLES)
    for name, spec in TABLES.items():
        frame = default.frames[name]
        assert list(frame.columns) == spec.column_names
        for column in spec.columns:
            if column.kind == "date":
                values = frame[column.name]
                assert values.dtype == np.dtype("datetime64[ns]")
                assert (values.dropna() == values.dropna().dt.normalize()).all()
            if column.choices:
                present = set(frame[column.name].dropna()) - {""}
                assert present <= set(column.choices), (name, column.name, present)


def test_default_cohort_has_64_patients_and_89_adjacent_levels(default: SimulatedCohort) -> None:
    patients = default.frames["patients"]
    procedures = default.frames["procedures"]
    assert len(patients) == 64
    assert patients["patient_code"].is_unique
    assert len(procedures) == 89
    assert set(procedures["patient_code"]) == set(patients["patient_code"])
    assert (procedures["procedure_type"] == "vertebroplasty").all()
    for _, group in procedures.groupby("patient_code"):
        labels = sorted(label_from_level(level) for level in group["level"])
        assert 1 <= len(labels) <= 3
        assert labels == list(range(labels[0], labels[0] + len(labels)))  # adjacent
        assert group["procedure_date"].nunique() == 1
    for level in procedures["level"]:
        assert normalise_level(level) == level
        assert label_from_level("T5") <= label_from_level(level) <= label_from_level("L5")
    # One procedure per level: the cement per level is in 2-6 ml.
    assert procedures["cement_volume_ml"].between(2.0, 6.0).all()


@pytest.mark.parametrize(("n_patients", "n_vcf", "expected"), [(10, 25, 25), (128, None, 178)])
def test_total_vcf_is_exact(n_patients: int, n_vcf: int | None, expected: int) -> None:
    cohort = simulate_cohort(CohortParameters(n_patients=n_patients, n_vcf=n_vcf), seed=3)
    assert len(cohort.frames["procedures"]) == expected  # 128 * 89 / 64 = 178
    counts = cohort.frames["procedures"].groupby("patient_code").size()
    assert len(counts) == n_patients
    assert counts.between(1, 3).all()


def test_infeasible_total_and_bad_values_raise() -> None:
    with pytest.raises(ValueError, match="n_vcf=40"):
        CohortParameters(n_patients=10, n_vcf=40)
    with pytest.raises(ValueError, match="recurrence_probability"):
        CohortParameters(recurrence_probability=1.5)
    with pytest.raises(ValueError, match="procedure_type"):
        CohortParameters(procedure_type="surgery")
    with pytest.raises(ValueError, match="missing_fraction"):
        CohortParameters(missing_fraction=(0.1, 0.1))


def test_clinical_values_are_valid(large: SimulatedCohort) -> None:
    clinical = large.frames["clinical"]
    assert clinical["vas"].between(0, 10).all()
    assert np.allclose(clinical["vas"] * 10, np.round(clinical["vas"] * 10))  # one decimal
    assert set(clinical["vas_unit"]) == {"0-10"}
    assert set(clinical["pain_other_level"]) <= {"yes", "no"}
    assert clinical["analgesic_class"].between(0, 3).all()
    # The class the importer derives from the drug names equals the stated one.
    derived = {
        text: analgesic_class_of(split_drug_list(text))
        for text in clinical["analgesic_drugs"].unique()
    }
    stated = clinical["analgesic_class"].to_numpy(dtype=int)
    assert (clinical["analgesic_drugs"].map(derived).to_numpy(dtype=int) == stated).all()
    new_levels = clinical.loc[clinical["new_vcf_levels"] != "", "new_vcf_levels"]
    assert all(normalise_level(level) == level for level in new_levels)
    assert not clinical.duplicated(["patient_code", "visit_date"]).any()
    # Every patient has exactly one month-0 visit, on or before the procedure.
    visits = _visits(large)
    baseline = visits[visits["nominal_month"] == 0]
    assert baseline["patient_code"].is_unique
    assert len(baseline) == LARGE
    assert baseline["days"].between(-14, 0).all()


def test_drug_choices_match_their_class() -> None:
    for analgesic_class, texts in DRUG_CHOICES.items():
        for text in texts:
            assert analgesic_class_of(split_drug_list(text)) == analgesic_class


def test_nominal_month_agrees_with_visit_windows(large: SimulatedCohort) -> None:
    visits = _visits(large)
    assigned = assign_visit_windows(
        visits["visit_date"], visits["procedure_date"], resolve_settings()
    )
    stated = visits["nominal_month"].reset_index(drop=True)
    matched = assigned.nominal_month
    inside = stated.notna().to_numpy()
    assert (matched[inside].to_numpy(dtype=int) == stated[inside].to_numpy(dtype=int)).all()
    assert matched[~inside].isna().all()  # deliberately outside every window
    # ~2% of follow-up visits outside windows (binomial SE ~0.1 pp here).
    n_follow_up = int((visits["days"] > 0).sum())
    assert (~inside).sum() / n_follow_up == pytest.approx(0.02, abs=0.005)
    # In-window jitter has SD ~10 days (truncated to the windows).
    in_window = visits[(visits["nominal_month"] > 0).fillna(False)]
    nominal_day = np.rint(in_window["nominal_month"].to_numpy(dtype=float) * DAYS_PER_MONTH)
    assert np.std(in_window["days"].to_numpy() - nominal_day) == pytest.approx(10.0, abs=0.5)


def test_measurement_values_are_consistent(large: SimulatedCohort) -> None:
    m = large.frames["measurements"]
    assert not m.duplicated(["patient_code", "visit_date", "level"]).any()
    assert m["bme_percent"].between(0, 100).all()
    expected_edema = m["bme_percent"] / 100 * (m["body_volume_ml"] - m["cement_volume_ml"])
    assert np.allclose(m["edema_volume_ml"], expected_edema, atol=0.006)
    assert m["body_volume_ml"].between(14, 50).all()
    assert (m["source"] == "simulated").all()
    assert m["method_version"].str.startswith("bmetrack-simulate ").all()
    heights = m[["height_anterior_mm", "height_middle_mm", "height_posterior_mm"]]
    assert (heights > 0).all().all()
    edges = [20.0, 25.0, 40.0]
    grade_from_loss = np.searchsorted(edges, m["height_loss_percent"], side="right")
    assert (m["genant_grade"].to_numpy(dtype=int) == grade_from_loss).all()

    treated = _treated_measurements(large)
    baseline = treated[treated["nominal_month"] == 0]
    follow_up = treated[(treated["nominal_month"] > 0).fillna(False)]
    assert (baseline["cement_volume_ml"] == 0).all()
    assert follow_up["cement_volume_ml"].between(1.5, 6.5).all()
    assert (baseline["genant_grade"] >= 1).all()
    assert baseline["bme_percent"].between(35, 100).all()  # 40-100 plus noise
    assert baseline["bme_percent"].median() == pytest.approx(70, abs=1.5)
    # Larger bodies lower in the spine.
    by_level = baseline.groupby("level")["body_volume_ml"].mean()
    assert by_level["L3"] > by_level["L1"] > by_level["T10"] > by_level["T6"]
    assert 18 < by_level["T6"] < 24 and 29 < by_level["L3"] < 36
    # Grade mostly stable: at most a one-grade change for >= 95% of VCF.
    grades = treated.pivot_table(
        index=["patient_code", "level"], columns="nominal_month", values="genant_grade"
    )
    change = (grades[12] - grades[0]).dropna()
    assert (change >= -1).all()
    assert (change.abs() <= 1).mean() >= 0.95


def test_new_vcf_has_one_measurement_with_bme_and_deformity(large: SimulatedCohort) -> None:
    clinical = large.frames["clinical"]
    new = clinical[clinical["new_vcf_levels"] != ""]
    assert len(new) > 0
    assert new["patient_code"].is_unique  # first seen once
    treated_levels = large.frames["procedures"].groupby("patient_code")["level"].agg(set)
    merged = new.merge(
        large.frames["measurements"],
        left_on=["patient_code", "visit_date", "new_vcf_levels"],
        right_on=["patient_code", "visit_date", "level"],
        how="left",
    )
    assert merged["bme_percent"].notna().all()
    assert (merged["bme_percent"] >= 5).all()
    assert (merged["genant_grade"] >= 1).all()
    assert (merged["cement_volume_ml"] == 0).all()
    for code, level in zip(merged["patient_code"], merged["level"], strict=True):
        labels = [label_from_level(x) for x in treated_levels[code]]
        assert level not in treated_levels[code]
        assert min(abs(label_from_level(level) - x) for x in labels) == 1  # adjacent
    # New-level measurements only at that one visit.
    m = large.frames["measurements"].merge(
        large.frames["procedures"][["patient_code", "level"]], how="left", indicator=True
    )
    assert (m["_merge"] == "left_only").sum() == len(new)


def test_truth_subgroup_matches_recorded_tables(large: SimulatedCohort) -> None:
    clinical = large.frames["clinical"]
    n_levels = large.frames["procedures"].groupby("patient_code").size()
    flags = (
        pd.DataFrame(
            {
                "patient_code": clinical["patient_code"],
                "new_vcf": clinical["new_vcf_levels"] != "",
                "other_pain": clinical["pain_other_level"] == "yes",
            }
        )
        .groupby("patient_code")[["new_vcf", "other_pain"]]
        .any()
    )
    new_vcf, other_pain = flags["new_vcf"], flags["other_pain"]
    by_hand = (n_levels == 1) & ~new_vcf & ~other_pain
    truth = large.truth["patients"].set_index("patient_code")["in_subgroup"]
    assert (by_hand.reindex(truth.index) == truth).all()
    assert len(large.truth["vcf"]) == len(large.frames["procedures"])


def test_sex_and_age(large: SimulatedCohort) -> None:
    patients = large.frames["patients"]
    assert (patients["sex"] == "F").mean() == pytest.approx(0.77, abs=0.015)
    year = large.frames["procedures"].groupby("patient_code")["procedure_date"].first().dt.year
    age = year.reindex(patients["patient_code"]).to_numpy() - patients["birth_year"].to_numpy()
    assert np.mean(age) == pytest.approx(72, abs=0.3)
    assert np.std(age) == pytest.approx(9, abs=0.4)
    span = large.frames["procedures"]["procedure_date"]
    assert 700 <= (span.max() - span.min()).days <= 730


# --------------------------------------------------------------------------- calibration


def test_bme_present_at_month_12_is_29_percent(large: SimulatedCohort) -> None:
    treated = _treated_measurements(large)
    present = treated.groupby("nominal_month")["bme_percent"].apply(lambda s: (s >= 5).mean())
    # Reference: 29% at month 12 (expectation within 3 pp; SE here ~0.3 pp).
    assert present[12] == pytest.approx(0.29, abs=0.03)
    # Gradual decrease: 100% at month 0, then falling at every visit.
    assert present[0] == 1.0
    assert present[0] > present[3] > present[6] > present[12]
    assert 0.6 < present[3] < 0.95 and 0.4 < present[6] < 0.7
    # Some VCF have resolved completely (0) by month 3 already.
    assert (treated.loc[treated["nominal_month"] == 3, "bme_percent"] == 0).mean() > 0.05


def test_decay_rates_reproduce_the_month_12_share_by_hand(large: SimulatedCohort) -> None:
    vcf = large.truth["vcf"]
    # Hand formula: latent BME at month 12 = b0 * exp(-12 k) >= 5.
    latent_12 = vcf["baseline_bme_percent"] * np.exp(-12 * vcf["decay_rate_per_month"])
    assert np.allclose(
        np.where(latent_12 < 2.0, 0.0, latent_12), vcf["latent_bme_percent_m12"], atol=1e-9
    )
    assert (latent_12 >= 5).mean() == pytest.approx(0.29, abs=0.015)
    # The quadrature expectation agrees with the sample mean.
    expected = expected_bme_percent(large.parameters)
    sample = [vcf[f"latent_bme_percent_m{m}"].mean() for m in (0, 3, 6, 12)]
    assert np.allclose(expected, sample, rtol=0.03)


def _recurrences(cohort: SimulatedCohort) -> int:
    treated = _treated_measurements(cohort).dropna(subset=["nominal_month"])
    wide = treated.pivot_table(
        index=["patient_code", "level"], columns="nominal_month", values="bme_percent"
    )
    values = wide.to_numpy()
    absent_before = np.fmax.accumulate(np.where(np.isnan(values), 0, values < 5), axis=1)
    returned = (values >= 5) & np.roll(absent_before.astype(bool), 1, axis=1)
    returned[:, 0] = False
    return int(returned.any(axis=1).sum())


def test_no_recurrence_by_default(large: SimulatedCohort) -> None:
    assert _recurrences(large) == 0
    assert large.truth["vcf"]["recurrence_month"].isna().all()


def test_recurrence_appears_with_probability() -> None:
    cohort = simulate_cohort(CohortParameters(n_patients=2_000, recurrence_probability=0.3), seed=4)
    assert _recurrences(cohort) > 50
    assert cohort.truth["vcf"]["recurrence_month"].notna().sum() > 100


def test_subgroup_size_is_about_31_of_64(large: SimulatedCohort) -> None:
    # Hand computation: 43 of 64 single-level patients x P(no new VCF) x P(no other pain).
    p = large.parameters
    latent = 43 * (1 - p.new_vcf_probability) * (1 - p.other_pain_probability)
    assert latent == pytest.approx(31, abs=1)
    truth = large.truth["patients"]
    assert truth["in_subgroup_latent"].mean() * 64 == pytest.approx(latent, abs=0.6)
    assert truth["in_subgroup"].mean() * 64 == pytest.approx(31, abs=3)
    assert truth["new_vcf_observed"].mean() == pytest.approx(0.16, abs=0.03)
    assert truth["pain_other_level_observed"].mean() == pytest.approx(0.14, abs=0.03)
    # Exactly 43 single-level patients in every default cohort.
    default_truth = simulate_cohort(seed=99).truth["patients"]
    assert (default_truth["n_treated_vcf"] == 1).sum() == 43


def test_subgroup_expectation_over_seeds() -> None:
    sizes = [int(simulate_cohort(seed=s).truth["patients"]["in_subgroup"].sum()) for s in range(60)]
    assert np.mean(sizes) == pytest.approx(31, abs=2)


def test_vas_relief_mostly_by_month_3(large: SimulatedCohort) -> None:
    clinical = large.frames["clinical"]
    median = clinical.groupby("nominal_month")["vas"].median()
    mean = clinical.groupby("nominal_month")["vas"].mean()
    assert median[0] == pytest.approx(7.5, abs=0.2)
    assert mean[3] == pytest.approx(3.0, abs=0.3)
    assert mean[12] == pytest.approx(2.8, abs=0.3)
    share_by_3 = (median[0] - median[3]) / (median[0] - median[12])
    assert share_by_3 >= 0.75
    assert abs(median[6] - median[12]) < 0.3  # flat after month 3


def test_analgesics_many_opioids_before_few_after(large: SimulatedCohort) -> None:
    clinical = large.frames["clinical"]
    baseline = clinical.loc[clinical["nominal_month"] == 0, "analgesic_class"]
    follow_up = clinical.loc[(clinical["nominal_month"] > 0).fillna(False), "analgesic_class"]
    assert (baseline >= 2).mean() > 0.5
    assert (baseline == 3).mean() > 0.25
    assert (follow_up <= 1).mean() > 0.8


def test_missingness_matches_parameters(large: SimulatedCohort) -> None:
    visits = _visits(large)
    truth = large.truth["patients"]
    # Every visit, in or outside its window, belongs to the nearest nominal day.
    nominal_days = np.array([0, 3, 6, 12]) * DAYS_PER_MONTH
    nearest = np.abs(visits["days"].to_numpy()[:, None] - nominal_days[None, :]).argmin(axis=1)
    for index, target in zip((1, 2, 3), (0.03, 0.06, 0.10), strict=True):
        attended = visits.loc[nearest == index, "patient_code"].nunique()
        # Binomial SE with 20,000 patients: <= 0.2 pp.
        assert 1 - attended / LARGE == pytest.approx(target, abs=0.006)
    # Part of it is monotone dropout: nobody returns after dropping out.
    dropped_at_6 = set(truth.loc[truth["dropout_month"] == 6, "patient_code"])
    assert dropped_at_6
    later = visits[visits["days"] > 200]
    assert not set(later["patient_code"]) & dropped_at_6


def test_level_distribution_concentrated_at_thoracolumbar_junction(
    large: SimulatedCohort,
) -> None:
    levels = large.frames["procedures"]["level"]
    assert levels.isin(["T11", "T12", "L1", "L2"]).mean() > 0.55
    assert levels.value_counts().idxmax() in {"T12", "L1"}


# --------------------------------------------------------------------------- options


def test_vas_in_mm_is_the_same_value_times_10() -> None:
    plain = simulate_cohort(CohortParameters(n_patients=500), seed=8).frames["clinical"]
    mixed = simulate_cohort(
        CohortParameters(n_patients=500, vas_unit_mm_fraction=0.5), seed=8
    ).frames["clinical"]
    mm = mixed["vas_unit"] == "mm"
    assert 0.4 < mm.mean() < 0.6
    assert np.allclose(mixed.loc[mm, "vas"] / 10, plain.loc[mm, "vas"])
    assert mixed.loc[mm, "vas"].between(0, 100).all()
    assert (mixed.loc[~mm, "vas"] == plain.loc[~mm, "vas"]).all()


def test_conservative_treatment_has_no_cement() -> None:
    cohort = simulate_cohort(CohortParameters(procedure_type="Conservative"), seed=2)
    assert (cohort.frames["procedures"]["procedure_type"] == "conservative").all()
    assert (cohort.frames["procedures"]["cement_volume_ml"] == 0).all()
    assert (cohort.frames["measurements"]["cement_volume_ml"] == 0).all()


def test_bme_pain_coupling_creates_a_correlation_only_when_set() -> None:
    params = {"n_patients": LARGE}
    uncoupled = simulate_cohort(CohortParameters(**params), seed=21)
    coupled = simulate_cohort(CohortParameters(**params, bme_pain_coupling=4.0), seed=21)
    # The BME itself does not depend on the coupling (own random stream).
    pdt.assert_series_equal(
        uncoupled.frames["measurements"]["bme_percent"],
        coupled.frames["measurements"]["bme_percent"],
    )
    for cohort, strong in ((uncoupled, False), (coupled, True)):
        members = set(cohort.truth["patients"].loc[lambda d: d["in_subgroup"], "patient_code"])
        rows = _treated_measurements(cohort)
        rows = rows[rows["patient_code"].isin(members)]
        for month in (3, 6, 12):
            at = rows[rows["nominal_month"] == month]
            rho, p_value = stats.spearmanr(at["bme_percent"], at["vas"])
            if strong:
                assert rho > 0.3 and p_value < 1e-10, (month, rho)
            else:
                assert abs(rho) < 0.06, (month, rho)
    # Centred coupling leaves the mean VAS trajectory nearly unchanged.
    means = [
        c.frames["clinical"].groupby("nominal_month")["vas"].mean() for c in (uncoupled, coupled)
    ]
    assert np.allclose(means[0], means[1], atol=0.5)


@pytest.mark.slow
def test_100000_patients_smoke() -> None:
    cohort = simulate_cohort(CohortParameters(n_patients=100_000), seed=7)
    assert len(cohort.frames["patients"]) == 100_000
    assert len(cohort.frames["procedures"]) == round(100_000 * 89 / 64)
    for name, spec in TABLES.items():
        assert list(cohort.frames[name].columns) == spec.column_names
