"""Hand-built tidy tables and results dict (briefs/TABLES-AND-RESULTS.md) for figure and
report tests.

Six patients, eight treated VCF, months 0, 3, 6, 12. P1 and P2 have two treated VCF;
P3, P4, P5 form the BME-pain subgroup (P6 has pain at another level). P5 missed month
12; P6's BME was not measured at month 6 and P6 has no VAS at month 3.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

MONTHS = (0, 3, 6, 12)
EXTENT = ["0", "1-25", "26-50", "51-75", "76-100"]

# vcf_id -> BME percent at months 0, 3, 6, 12 (NaN: row present, not measured;
# None: no row at all).
BME: dict[str, list[float | None]] = {
    "P1:T12": [80, 50, 20, 0],
    "P1:L1": [60, 30, 10, 0],
    "P2:L2": [40, 20, 0, 0],
    "P2:L3": [10, 0, 0, 0],
    "P3:T11": [90, 60, 30, 15],
    "P4:L1": [55, 25, 0, 0],
    "P5:T8": [30, 0, 0, None],
    "P6:L3": [20, 10, np.nan, 5],
}
# patient -> VAS and analgesic class at months 0, 3, 6, 12 (None: no visit).
VAS: dict[str, list[float | None]] = {
    "P1": [8, 3, 2, 2],
    "P2": [7, 2, 2, 1],
    "P3": [10, 2, 1, 1],
    "P4": [6, 1, 1, 0],
    "P5": [9, 4, 3, None],
    "P6": [7, np.nan, 3, 2],
}
ANALGESIC: dict[str, list[int | None]] = {
    "P1": [3, 0, 0, 0],
    "P2": [2, 1, 0, 0],
    "P3": [3, 0, 0, 0],
    "P4": [1, 0, 0, 0],
    "P5": [2, 1, 1, None],
    "P6": [3, None, 2, 1],
}
SUBGROUP = {"P3", "P4", "P5"}
PROCEDURE = pd.Timestamp("2024-01-15")


def _category(value: float) -> str | None:
    if np.isnan(value):
        return None
    if value == 0:
        return "0"
    for upper, label in zip((25, 50, 75, 100), EXTENT[1:], strict=True):
        if value <= upper:
            return label
    raise AssertionError(value)


def build_vcf_visits() -> pd.DataFrame:
    rows = []
    for vcf_id, values in BME.items():
        patient, level = vcf_id.split(":")
        for month, value in zip(MONTHS, values, strict=True):
            if value is None:
                continue
            rows.append(
                {
                    "patient_code": patient,
                    "vcf_id": vcf_id,
                    "level": level,
                    "month": month,
                    "visit_date": PROCEDURE + pd.Timedelta(days=30 * month),
                    "bme_percent": float(value),
                    "extent_category": _category(float(value)),
                    "edema_volume_ml": np.nan,
                    "body_volume_ml": 30.0,
                    "cement_volume_ml": 0.0 if month == 0 else 4.0,
                    "genant_grade": 1,
                    "in_subgroup": patient in SUBGROUP,
                }
            )
    frame = pd.DataFrame(rows)
    frame["month"] = frame["month"].astype("int64")
    present = frame["bme_percent"] >= 5
    frame["bme_present"] = pd.array(present, dtype="boolean")
    frame.loc[frame["bme_percent"].isna(), "bme_present"] = pd.NA
    frame["extent_category"] = pd.Categorical(
        frame["extent_category"], categories=EXTENT, ordered=True
    )
    frame["genant_grade"] = frame["genant_grade"].astype("Int64")
    return frame


def build_patient_visits() -> pd.DataFrame:
    rows = []
    for patient, values in VAS.items():
        for month, vas, drug in zip(MONTHS, values, ANALGESIC[patient], strict=True):
            if vas is None:
                continue
            rows.append(
                {
                    "patient_code": patient,
                    "month": month,
                    "visit_date": PROCEDURE + pd.Timedelta(days=30 * month),
                    "days_from_procedure": 30 * month,
                    "window_status": "baseline" if month == 0 else "in_window",
                    "vas": float(vas),
                    "analgesic_class": drug,
                    "pain_other_level": patient == "P6",
                    "new_vcf": False,
                    "in_subgroup": patient in SUBGROUP,
                }
            )
    frame = pd.DataFrame(rows)
    frame["month"] = frame["month"].astype("int64")
    frame["analgesic_class"] = pd.array(frame["analgesic_class"], dtype="Int64")
    frame["pain_other_level"] = frame["pain_other_level"].astype("boolean")
    return frame


def build_patients() -> pd.DataFrame:
    rows = []
    for patient in VAS:
        levels = [v.split(":")[1] for v in BME if v.startswith(patient + ":")]
        reasons = ""
        if len(levels) > 1:
            reasons = "multiple_treated_vcf"
        elif patient == "P6":
            reasons = "pain_other_level"
        rows.append(
            {
                "patient_code": patient,
                "sex": "F",
                "birth_year": 1945,
                "procedure_date": PROCEDURE,
                "procedure_type": "vertebroplasty",
                "n_treated_vcf": len(levels),
                "treated_levels": ";".join(levels),
                "any_new_vcf": False,
                "any_pain_other_level": patient == "P6",
                "in_subgroup": patient in SUBGROUP,
                "exclusion_reasons": reasons,
                "n_visits": sum(v is not None for v in VAS[patient]),
                "imaged_month_0": True,
            }
        )
    return pd.DataFrame(rows)


def _proportion(successes: int, n: int, low: float, high: float) -> dict[str, Any]:
    return {
        "successes": successes,
        "n": n,
        "proportion": successes / n,
        "percent": 100.0 * successes / n,
        "ci_low": low,
        "ci_high": high,
        "method": "wilson",
        "confidence_level": 0.95,
    }


def _summary(n: int, n_missing: int, median: float, q1: float, q3: float) -> dict[str, Any]:
    return {
        "n": n,
        "n_missing": n_missing,
        "median": median,
        "q1": q1,
        "q3": q3,
        "mean": median,
        "sd": 1.0,
        "min": 0.0,
        "max": 10.0,
    }


def _test(
    name: str, statistic: float, df: float | None, p: float, n: int, **extra: Any
) -> dict[str, Any]:
    result = {
        "test": name,
        "statistic": statistic,
        "df": df,
        "p_value": p,
        "n": n,
        "effect_size": None,
        "effect_size_name": None,
        "ci_low": None,
        "ci_high": None,
        "note": None,
    }
    result.update(extra)
    return result


def _correlation(r: float, low: float, high: float, p: float, n: int) -> dict[str, Any]:
    return {
        "method": "spearman",
        "r": r,
        "ci_low": low,
        "ci_high": high,
        "p_value": p,
        "n": n,
        "df": n - 2,
        "confidence_level": 0.95,
        "note": None,
    }


def _model(formula: str, terms: list[tuple[str, float, float, float, float, float]]) -> dict:
    return {
        "formula": formula,
        "terms": [
            {"term": t, "estimate": e, "se": s, "ci_low": lo, "ci_high": hi, "p_value": p}
            for t, e, s, lo, hi, p in terms
        ],
        "variance_components": {"patient": 120.5, "residual": 80.25},
        "n_obs": 31,
        "n_groups": 6,
        "method": "REML",
        "converged": True,
        "wald_month": {"statistic": 54.321, "df": 3, "p_value": 2.5e-11},
    }


def build_results() -> dict[str, Any]:
    """A results dict shaped exactly like the contract, with distinctive numbers."""
    return {
        "bmetrack_version": "0.1.0",
        "generated_at": "2025-03-04T10:20:30+00:00",
        "study": {"code": "VOOR2006", "title": "Bone marrow edema after vertebroplasty"},
        "settings": [
            {
                "name": "bme_present_threshold_percent",
                "value": 5.0,
                "default": 5.0,
                "changed": False,
                "unit": "%",
                "method_section": "3",
                "description": "BME is present when bme_percent is at least this.",
            },
            {
                "name": "edema_k_sd",
                "value": 2.5,
                "default": 3.0,
                "changed": True,
                "unit": "SD",
                "method_section": "3",
                "description": "Edema threshold: reference median +- k x MAD-based SD.",
            },
            {
                "name": "nominal_months",
                "value": [0, 3, 6, 12],
                "default": [0, 3, 6, 12],
                "changed": False,
                "unit": "month",
                "method_section": "1",
                "description": "Nominal visit time points after the procedure.",
            },
        ],
        "software": {
            "python": "3.11.9",
            "bmetrack": "0.1.0",
            "numpy": "2.4.6",
            "scipy": "1.16.0",
            "pandas": "3.1.1",
            "statsmodels": "0.14.5",
            "matplotlib": "3.11.2",
        },
        "n_patients": 6,
        "n_vcf": 8,
        "n_subgroup": 3,
        "flow": {
            "enrolled": 6,
            "treated_vcf": 8,
            "by_month": {
                "0": {"patients_seen": 6, "patients_with_vas": 6, "vcf_with_bme": 8},
                "3": {"patients_seen": 6, "patients_with_vas": 5, "vcf_with_bme": 8},
                "6": {"patients_seen": 6, "patients_with_vas": 6, "vcf_with_bme": 7},
                "12": {"patients_seen": 5, "patients_with_vas": 5, "vcf_with_bme": 7},
            },
            "subgroup": 3,
            "excluded_from_subgroup": {"multiple_treated_vcf": 2, "pain_other_level": 1},
        },
        "missing": {
            "0": {"vas": 0, "analgesic_class": 0, "bme_percent": 0},
            "3": {"vas": 1, "analgesic_class": 1, "bme_percent": 0},
            "6": {"vas": 0, "analgesic_class": 0, "bme_percent": 1},
            "12": {"vas": 1, "analgesic_class": 1, "bme_percent": 1},
        },
        "visits_outside_window": 4,
        "duplicate_visits": 0,
        "bme": {
            "extent_by_month": {
                "0": {"0": 0, "1-25": 2, "26-50": 2, "51-75": 2, "76-100": 2},
                "3": {"0": 2, "1-25": 3, "26-50": 2, "51-75": 1, "76-100": 0},
                "6": {"0": 4, "1-25": 2, "26-50": 1, "51-75": 0, "76-100": 0},
                "12": {"0": 5, "1-25": 2, "26-50": 0, "51-75": 0, "76-100": 0},
            },
            "present_by_month": {
                "0": _proportion(8, 8, 0.6756, 1.0),
                "3": _proportion(6, 8, 0.4093, 0.9285),
                "6": _proportion(3, 7, 0.1582, 0.7495),
                "12": _proportion(2, 7, 0.0822, 0.6411),
            },
            "summary_by_month": {
                "0": _summary(8, 0, 47.5, 27.5, 65.0),
                "3": _summary(8, 0, 22.5, 7.5, 35.0),
                "6": _summary(7, 1, 0.0, 0.0, 15.0),
                "12": _summary(7, 1, 0.0, 0.0, 2.5),
            },
            "friedman": _test("friedman", 17.3456, 3, 0.000599, 6),
            "mixed_model": _model(
                "bme_percent ~ C(month) + (1 | patient/vcf)",
                [
                    ("Intercept", 48.125, 6.2, 35.97, 60.28, 1.2e-14),
                    ("C(month)[T.3]", -24.375, 4.1, -32.41, -16.34, 3.3e-9),
                    ("C(month)[T.6]", -39.819, 4.3, -48.25, -31.39, 1.1e-19),
                    ("C(month)[T.12]", -44.722, 4.3, -53.15, -36.29, 4.0e-25),
                ],
            ),
        },
        "bme_present_percent": {"0": 100.0, "3": 75.0, "6": 42.857, "12": 28.571},
        "recurrences": [],
        "n_recurrences": 0,
        "vas": {
            "summary_by_month": {
                "0": _summary(6, 0, 7.5, 7.0, 8.75),
                "3": _summary(5, 1, 2.0, 2.0, 3.0),
                "6": _summary(6, 0, 2.0, 1.25, 2.75),
                "12": _summary(5, 1, 1.0, 1.0, 2.0),
            },
            "friedman": _test("friedman", 12.612, 3, 0.005561, 4),
            "pairwise": [
                _test(
                    "wilcoxon",
                    0.0,
                    None,
                    0.03125,
                    5,
                    pair="0-3",
                    p_adjusted=0.09375,
                    effect_size=1.0,
                    effect_size_name="rank_biserial",
                    ci_low=0.77,
                    ci_high=1.0,
                ),
                _test(
                    "wilcoxon",
                    0.0,
                    None,
                    0.03125,
                    6,
                    pair="0-6",
                    p_adjusted=0.09375,
                    effect_size=1.0,
                    effect_size_name="rank_biserial",
                    ci_low=0.77,
                    ci_high=1.0,
                ),
                _test(
                    "wilcoxon",
                    1.5,
                    None,
                    0.4142,
                    4,
                    pair="3-6",
                    p_adjusted=0.8284,
                    effect_size=0.4,
                    effect_size_name="rank_biserial",
                    ci_low=-0.5,
                    ci_high=0.88,
                ),
            ],
            "mixed_model": _model(
                "vas ~ C(month) + (1 | patient)",
                [
                    ("Intercept", 7.833, 0.5, 6.85, 8.81, 1.0e-30),
                    ("C(month)[T.3]", -5.431, 0.6, -6.61, -4.25, 2.0e-19),
                ],
            ),
            "responders": {
                "3": _proportion(5, 5, 0.5655, 1.0),
                "6": _proportion(6, 6, 0.6097, 1.0),
                "12": _proportion(5, 5, 0.5655, 1.0),
            },
            "responders_sensitivity": {
                "1.5": {"3": _proportion(5, 5, 0.5655, 1.0)},
                "3.0": {"3": _proportion(4, 5, 0.3755, 0.9638)},
            },
            "share_of_relief_by_month_3_percent": 87.654,
        },
        "vas_median": {"0": 7.5, "3": 2.0, "6": 2.0, "12": 1.0},
        "analgesics": {
            "class_counts_by_month": {
                "0": {"0": 0, "1": 1, "2": 2, "3": 3},
                "3": {"0": 3, "1": 2, "2": 0, "3": 0},
                "6": {"0": 4, "1": 1, "2": 1, "3": 0},
                "12": {"0": 4, "1": 1, "2": 0, "3": 0},
            },
            "stuart_maxwell": {
                "3": _test("stuart_maxwell", 5.0, 3, 0.1718, 5),
                "6": _test("stuart_maxwell", 6.0, 3, 0.1116, 6),
                "12": _test("stuart_maxwell", 5.0, 3, 0.1718, 5),
            },
        },
        "bme_pain": {
            "n_patients": 3,
            "spearman_level": {
                "3": _correlation(0.5, -0.962, 0.999, 0.6667, 3),
                "6": _correlation(-0.866, -0.998, 0.905, 0.3333, 3),
                "12": _correlation(None, None, None, None, 2),  # type: ignore[arg-type]
            },
            "spearman_change": {
                "3": _correlation(-0.5, -0.999, 0.962, 0.6667, 3),
                "6": _correlation(0.234, -0.97, 0.99, 0.8499, 3),
                "12": _correlation(None, None, None, None, 2),  # type: ignore[arg-type]
            },
            "present_vs_absent": {
                "3": _test(
                    "mann_whitney",
                    1.0,
                    None,
                    0.6547,
                    3,
                    effect_size=0.5,
                    effect_size_name="rank_biserial",
                    ci_low=-0.71,
                    ci_high=0.97,
                    details={"n_x": 1, "n_y": 2, "median_x": 2.0, "median_y": 2.5},
                ),
            },
            "rmcorr": {
                "method": "rmcorr",
                "r": 0.613,
                "ci_low": 0.021,
                "ci_high": 0.893,
                "p_value": 0.0436,
                "n": 11,
                "df": 7,
                "confidence_level": 0.95,
                "note": None,
            },
            "mixed_model": _model(
                "vas ~ bme_percent + C(month) + (1 | patient)",
                [("bme_percent", 0.0412, 0.02, 0.0021, 0.0803, 0.0391)],
            ),
            "rmcorr_note": "follow-up visits only",
            "n_patients_with_pairs": 3,
            "primary": {
                "analysis": "mixed model vas ~ bme_percent + C(month) + (1 | patient)",
                "estimate_vas_per_10_percent_bme": 0.412,
                "ci_low_per_10_percent": 0.021,
                "ci_high_per_10_percent": 0.803,
                "p_value": 0.0391,
            },
        },
        "subgroup_correlations": [],
        "comparison": [
            {
                "finding": "BME present at 12 months",
                "reference": "29% of treated VCF",
                "this_cohort": "28.6% (2 of 7)",
                "consistent": True,
            },
            {
                "finding": "BME returned after disappearing",
                "reference": "never",
                "this_cohort": "0 VCF",
                "consistent": True,
            },
            {
                "finding": "Pain relief and BME",
                "reference": "no relation",
                "this_cohort": "rmcorr r = 0.61",
                "consistent": False,
            },
        ],
    }


@pytest.fixture
def vcf_visits() -> pd.DataFrame:
    return build_vcf_visits()


@pytest.fixture
def patient_visits() -> pd.DataFrame:
    return build_patient_visits()


@pytest.fixture
def patients() -> pd.DataFrame:
    return build_patients()


@pytest.fixture
def results() -> dict[str, Any]:
    return build_results()


def build_large_tables(n_patients: int, seed: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Vectorised vcf_visits and patient_visits for ``n_patients`` (smoke tests only).

    About 1.4 treated VCF per patient and four visits, so 100,000 patients give about
    560,000 VCF-visit rows. Values are random but in range; a few are missing.
    """
    rng = np.random.default_rng(seed)
    months = np.array(MONTHS, dtype=np.int64)
    codes = np.array([f"P{i:06d}" for i in range(n_patients)], dtype=object)
    n_vcf = 1 + (rng.random(n_patients) < 0.4).astype(np.int64)
    subgroup = (n_vcf == 1) & (rng.random(n_patients) < 0.8)
    patient_of_vcf = np.repeat(np.arange(n_patients), n_vcf)
    level = np.where(np.arange(patient_of_vcf.size) % 2 == 0, "L1", "T12").astype(object)
    vcf_id = codes[patient_of_vcf] + ":" + level
    start = rng.uniform(10, 100, patient_of_vcf.size)
    decay = np.array([1.0, 0.55, 0.3, 0.15])
    bme = np.clip(start[:, None] * decay[None, :] + rng.normal(0, 8, (start.size, 4)), 0, 100)
    bme[rng.random(bme.shape) < 0.3] = 0.0
    bme[rng.random(bme.shape) < 0.03] = np.nan
    vcf_rows = np.repeat(np.arange(patient_of_vcf.size), 4)
    edges = np.array([0.0, 25.0, 50.0, 75.0, 100.0])
    flat = bme.ravel()
    category = np.where(
        flat == 0,
        "0",
        np.array(EXTENT[1:], dtype=object)[np.searchsorted(edges[1:], flat).clip(0, 3)],
    ).astype(object)
    category[np.isnan(flat)] = None
    vcf_visits = pd.DataFrame(
        {
            "patient_code": codes[patient_of_vcf][vcf_rows],
            "vcf_id": vcf_id[vcf_rows],
            "month": np.tile(months, patient_of_vcf.size),
            "bme_percent": flat,
            "extent_category": pd.Categorical(category, categories=EXTENT, ordered=True),
            "in_subgroup": subgroup[patient_of_vcf][vcf_rows],
        }
    )
    vas = np.clip(
        np.round(
            rng.normal(7.5, 1.5, n_patients)[:, None] * np.array([1, 0.35, 0.3, 0.3])
            + rng.normal(0, 1, (n_patients, 4))
        ),
        0,
        10,
    )
    vas[rng.random(vas.shape) < 0.05] = np.nan
    drugs = rng.integers(0, 4, (n_patients, 4)).astype(float)
    drugs[rng.random(drugs.shape) < 0.05] = np.nan
    patient_visits = pd.DataFrame(
        {
            "patient_code": np.repeat(codes, 4),
            "month": np.tile(months, n_patients),
            "vas": vas.ravel(),
            "analgesic_class": pd.array(drugs.ravel(), dtype="Float64").astype("Int64"),
            "in_subgroup": np.repeat(subgroup, 4),
        }
    )
    return vcf_visits, patient_visits


@pytest.fixture
def large_tables() -> Any:
    """The factory :func:`build_large_tables` (call it with the number of patients)."""
    return build_large_tables


@pytest.fixture(scope="session")
def figure_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The seven report figures of the hand-built data, as small PNGs (50 dpi)."""
    from bmetrack.analysis import figures

    out = tmp_path_factory.mktemp("figures")
    return figures.save_figures(
        build_vcf_visits(), build_patient_visits(), build_results(), out, dpi=50
    )
