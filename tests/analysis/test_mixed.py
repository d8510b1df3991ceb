"""Tests of the nested random-intercept mixed model (bmetrack.analysis.mixed).

References used: statsmodels MixedLM, dense-matrix GLS / REML formulas evaluated here, and the
closed-form ANOVA (method of moments) estimators of balanced designs.
"""

from __future__ import annotations

import json
import math
import warnings
from typing import Any

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from scipy import stats

from bmetrack.analysis.mixed import (
    MixedModelResult,
    fit_mixed_arrays,
    fit_mixed_model,
    wald_test,
)

MONTHS = (0, 3, 6, 12)


def simulate_cohort(
    n_patients: int,
    *,
    seed: int,
    sd_patient: float = 2.0,
    sd_vcf: float = 1.5,
    sd_resid: float = 1.0,
    p_missing: float = 0.2,
    max_vcf: int = 3,
) -> pd.DataFrame:
    """Unbalanced nested data: 1..max_vcf VCF per patient, visits missing at random."""
    rng = np.random.default_rng(seed)
    n_vcf = rng.integers(1, max_vcf + 1, size=n_patients)
    patient = np.repeat(np.arange(n_patients), n_vcf)
    vcf = np.arange(patient.size)
    pat_rows = np.repeat(patient, len(MONTHS))
    vcf_rows = np.repeat(vcf, len(MONTHS))
    month = np.tile(np.array(MONTHS), vcf.size)
    x = rng.normal(size=pat_rows.size)
    y = (
        10.0
        - 0.5 * month
        + 0.8 * x
        + rng.normal(0.0, sd_patient, n_patients)[pat_rows]
        + rng.normal(0.0, sd_vcf, vcf.size)[vcf_rows]
        + rng.normal(0.0, sd_resid, pat_rows.size)
    )
    keep = rng.random(pat_rows.size) >= p_missing
    return pd.DataFrame(
        {
            "patient_code": np.char.add("P", pat_rows.astype(str))[keep],
            "vcf_id": np.char.add("V", vcf_rows.astype(str))[keep],
            "month": month[keep],
            "x": x[keep],
            "y": y[keep],
        }
    )


def dense_reference(
    data: pd.DataFrame,
    X: np.ndarray,
    y: np.ndarray,
    groups: list[str],
    variances: dict[str, float],
    reml: bool,
) -> tuple[np.ndarray, np.ndarray, float]:
    """GLS coefficients, their covariance and the (RE)ML log-likelihood with explicit V."""
    n, p = X.shape
    V = variances["residual"] * np.eye(n)
    for name in groups:
        codes = pd.factorize(data[name])[0]
        V += variances[name] * (codes[:, None] == codes[None, :])
    V_inv = np.linalg.inv(V)
    xtvx = X.T @ V_inv @ X
    beta = np.linalg.solve(xtvx, X.T @ V_inv @ y)
    resid = y - X @ beta
    logdet_v = np.linalg.slogdet(V)[1]
    quad = float(resid @ V_inv @ resid)
    if reml:
        loglik = -0.5 * (
            (n - p) * math.log(2 * math.pi) + logdet_v + np.linalg.slogdet(xtvx)[1] + quad
        )
    else:
        loglik = -0.5 * (n * math.log(2 * math.pi) + logdet_v + quad)
    return beta, np.linalg.inv(xtvx), loglik


def statsmodels_fit(data: pd.DataFrame, formula: str, groups: list[str], reml: bool) -> Any:
    if len(groups) == 1:
        model = smf.mixedlm(formula, data, groups=groups[0])
    else:
        model = smf.mixedlm(
            formula,
            data,
            groups=groups[0],
            re_formula="1",
            vc_formula={"vcf": f"0 + C({groups[1]})"},
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.fit(reml=reml, method=["lbfgs"], gtol=1e-10)


# ------------------------------------------------------------------------------------------
# (1) agreement with statsmodels and with dense matrix formulas
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_data() -> pd.DataFrame:
    data = simulate_cohort(40, seed=11)
    # Force singleton inner groups and an outer group with a single observation.
    data = data.iloc[1:].reset_index(drop=True)
    extra = pd.DataFrame(
        {"patient_code": ["P_single"], "vcf_id": ["V_single"], "month": [3], "x": [0.3]}
    ).assign(y=9.0)
    return pd.concat([data, extra], ignore_index=True)


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("groups", [["patient_code"], ["patient_code", "vcf_id"]])
def test_agrees_with_statsmodels(small_data: pd.DataFrame, groups: list[str], reml: bool) -> None:
    formula = "y ~ C(month) + x"
    res = fit_mixed_model(small_data, formula, groups, reml=reml)
    ref = statsmodels_fit(small_data, formula, groups, reml)
    assert res.converged
    assert res.method == ("REML" if reml else "ML")
    assert list(res.terms) == list(ref.fe_params.index)
    np.testing.assert_allclose(res.coefficients, ref.fe_params.to_numpy(), rtol=1e-4, atol=1e-6)
    ref_var = {"residual": ref.scale, "patient_code": float(ref.cov_re.iloc[0, 0])}
    if len(groups) == 2:
        ref_var["vcf_id"] = float(ref.vcomp[0])
    assert res.variance_components.keys() == ref_var.keys()
    for key, value in ref_var.items():
        assert res.variance_components[key] == pytest.approx(value, rel=1e-4), key
    # Our optimum must be at least as good as statsmodels' (same likelihood constants).
    assert res.loglik == pytest.approx(ref.llf, abs=1e-6)
    assert res.loglik >= ref.llf - 1e-8
    # statsmodels adds fixed/random cross terms of the observed Hessian: close, not equal.
    np.testing.assert_allclose(res.std_errors, ref.bse_fe.to_numpy(), rtol=5e-3)
    assert res.n_obs == len(small_data)
    assert res.n_groups["patient_code"] == small_data["patient_code"].nunique()


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("groups", [["patient_code"], ["patient_code", "vcf_id"]])
def test_matches_dense_formulas(small_data: pd.DataFrame, groups: list[str], reml: bool) -> None:
    """Closed-form inverse agrees with explicit V, and the estimate maximises the likelihood."""
    res = fit_mixed_model(small_data, "y ~ C(month) + x", groups, reml=reml)
    month = small_data["month"].to_numpy()
    X = np.column_stack(
        [np.ones(len(small_data))] + [month == m for m in MONTHS[1:]] + [small_data["x"]]
    ).astype(float)
    y = small_data["y"].to_numpy()
    beta, xtvx_inv, loglik = dense_reference(
        small_data, X, y, groups, res.variance_components, reml
    )
    np.testing.assert_allclose(res.coefficients, beta, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(res.cov_params, xtvx_inv, rtol=1e-8, atol=1e-12)
    assert res.loglik == pytest.approx(loglik, rel=1e-10)
    se = np.sqrt(np.diag(xtvx_inv))
    np.testing.assert_allclose(res.std_errors, se, rtol=1e-8)
    z_crit = stats.norm.ppf(0.975)
    np.testing.assert_allclose(res.ci_lower, beta - z_crit * se, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(res.p_values, 2 * stats.norm.sf(np.abs(beta / se)), rtol=1e-6)
    # Any perturbation of the variance components lowers the dense (RE)ML likelihood.
    for key in res.variance_components:
        for factor in (0.98, 1.02):
            moved = dict(res.variance_components)
            moved[key] *= factor
            assert dense_reference(small_data, X, y, groups, moved, reml)[2] < loglik


def test_balanced_standard_errors_equal_statsmodels() -> None:
    """In balanced data statsmodels' Hessian cross terms vanish: SEs must agree closely."""
    data = simulate_cohort(30, seed=5, p_missing=0.0, max_vcf=1)
    res = fit_mixed_model(data, "y ~ C(month)", ["patient_code"])
    ref = statsmodels_fit(data, "y ~ C(month)", ["patient_code"], True)
    np.testing.assert_allclose(res.std_errors, ref.bse_fe.to_numpy(), rtol=1e-4)


# ------------------------------------------------------------------------------------------
# (2) closed forms of balanced designs
# ------------------------------------------------------------------------------------------


def test_balanced_one_way_equals_anova_estimates() -> None:
    rng = np.random.default_rng(3)
    a, n = 25, 6
    group = np.repeat(np.arange(a), n)
    y = 5.0 + rng.normal(0, 2.0, a)[group] + rng.normal(0, 1.0, a * n)
    y_mat = y.reshape(a, n)
    means = y_mat.mean(axis=1)
    msb = n * np.sum((means - y.mean()) ** 2) / (a - 1)
    msw = np.sum((y_mat - means[:, None]) ** 2) / (a * (n - 1))
    assert msb > msw  # the closed forms below hold for interior estimates only
    data = pd.DataFrame({"y": y, "g": group})

    reml = fit_mixed_model(data, "y ~ 1", ["g"])
    assert reml.variance_components["residual"] == pytest.approx(msw, rel=1e-7)
    assert reml.variance_components["g"] == pytest.approx((msb - msw) / n, rel=1e-7)
    assert reml.coefficients[0] == pytest.approx(y.mean(), rel=1e-12)
    assert reml.std_errors[0] == pytest.approx(math.sqrt(msb / (a * n)), rel=1e-7)

    ml = fit_mixed_model(data, "y ~ 1", ["g"], reml=False)
    assert ml.variance_components["residual"] == pytest.approx(msw, rel=1e-7)
    assert ml.variance_components["g"] == pytest.approx(((1 - 1 / a) * msb - msw) / n, rel=1e-7)


def test_balanced_two_level_nested_equals_anova_estimates() -> None:
    rng = np.random.default_rng(4)
    a, b, n = 20, 3, 4
    outer = np.repeat(np.arange(a), b * n)
    inner = np.repeat(np.arange(a * b), n)
    y = (
        1.0
        + rng.normal(0, 2.0, a)[outer]
        + rng.normal(0, 1.5, a * b)[inner]
        + rng.normal(0, 1.0, a * b * n)
    )
    cube = y.reshape(a, b, n)
    mean_ab = cube.mean(axis=2)
    mean_a = cube.mean(axis=(1, 2))
    ms_a = b * n * np.sum((mean_a - y.mean()) ** 2) / (a - 1)
    ms_b = n * np.sum((mean_ab - mean_a[:, None]) ** 2) / (a * (b - 1))
    ms_e = np.sum((cube - mean_ab[:, :, None]) ** 2) / (a * b * (n - 1))
    assert ms_a > ms_b > ms_e
    data = pd.DataFrame({"y": y, "pt": outer, "vcf": inner})
    res = fit_mixed_model(data, "y ~ 1", ["pt", "vcf"])
    vc = res.variance_components
    assert vc["residual"] == pytest.approx(ms_e, rel=1e-6)
    assert vc["vcf"] == pytest.approx((ms_b - ms_e) / n, rel=1e-6)
    assert vc["pt"] == pytest.approx((ms_a - ms_b) / (b * n), rel=1e-6)
    assert res.std_errors[0] == pytest.approx(math.sqrt(ms_a / (a * b * n)), rel=1e-6)


# ------------------------------------------------------------------------------------------
# (3) recovery of known parameters
# ------------------------------------------------------------------------------------------


def test_recovers_parameters_on_large_cohort() -> None:
    data = simulate_cohort(20_000, seed=21, sd_patient=2.0, sd_vcf=1.5, sd_resid=1.0)
    res = fit_mixed_model(data, "y ~ C(month) + x", ["patient_code", "vcf_id"])
    assert res.converged
    truth = {
        "Intercept": 10.0,
        "C(month)[T.3]": -1.5,
        "C(month)[T.6]": -3.0,
        "C(month)[T.12]": -6.0,
        "x": 0.8,
    }
    for term, value in truth.items():
        i = res.terms.index(term)
        assert abs(res.coefficients[i] - value) < 4 * res.std_errors[i], term
    vc = res.variance_components
    assert vc["residual"] == pytest.approx(1.0, rel=0.03)
    assert vc["vcf_id"] == pytest.approx(1.5**2, rel=0.05)
    assert vc["patient_code"] == pytest.approx(2.0**2, rel=0.06)


# ------------------------------------------------------------------------------------------
# (4) boundary, singletons, errors
# ------------------------------------------------------------------------------------------


def test_zero_between_group_variance_gives_exact_boundary_and_ols() -> None:
    """Equal group means make the between-group mean square 0: estimate exactly 0 = OLS."""
    rng = np.random.default_rng(8)
    a, n = 30, 5
    group = np.repeat(np.arange(a), n)
    y = rng.normal(0, 1.0, a * n)
    y = y - y.reshape(a, n).mean(axis=1)[group] + 3.0
    data = pd.DataFrame({"y": y, "g": group})
    res = fit_mixed_model(data, "y ~ 1", ["g"])
    assert res.variance_components["g"] == pytest.approx(0.0, abs=1e-10)
    assert res.variance_components["residual"] == pytest.approx(np.var(y, ddof=1), rel=1e-8)
    assert res.coefficients[0] == pytest.approx(3.0, rel=1e-12)
    assert res.converged


def test_true_zero_variance_two_level_estimate_small() -> None:
    data = simulate_cohort(400, seed=9, sd_patient=0.0, sd_vcf=1.0)
    res = fit_mixed_model(data, "y ~ C(month) + x", ["patient_code", "vcf_id"])
    vc = res.variance_components
    assert all(math.isfinite(v) and v >= 0 for v in vc.values())
    assert vc["patient_code"] < 0.1
    assert vc["vcf_id"] == pytest.approx(1.0, rel=0.3)


def test_all_singleton_inner_groups() -> None:
    """Every VCF seen once: inner and residual variance are confounded, the fit must not fail."""
    data = simulate_cohort(200, seed=10, p_missing=0.0, max_vcf=2)
    data = data.drop_duplicates("vcf_id").reset_index(drop=True)
    res = fit_mixed_model(data, "y ~ x", ["patient_code", "vcf_id"])
    vc = res.variance_components
    assert all(math.isfinite(v) and v >= 0 for v in vc.values())
    # Only the sum of residual and inner variance is identified; it must match a dense fit.
    X = np.column_stack([np.ones(len(data)), data["x"]])
    _, _, loglik = dense_reference(
        data, X, data["y"].to_numpy(), ["patient_code", "vcf_id"], vc, True
    )
    assert res.loglik == pytest.approx(loglik, rel=1e-10)


def test_missing_values_are_dropped_and_counted() -> None:
    data = simulate_cohort(30, seed=12)
    full = fit_mixed_model(data, "y ~ C(month) + x", ["patient_code", "vcf_id"])
    holes = data.copy()
    holes["y"] = holes["y"].astype(float)
    holes["x"] = holes["x"].astype(float)
    extra = pd.DataFrame(
        {
            "patient_code": ["P0", None, "P1"],
            "vcf_id": ["V0", "V1", "V2"],
            "month": [3, 3, 6],
            "x": [np.nan, 0.1, 0.2],
            "y": [1.0, 2.0, np.nan],
        }
    )
    res = fit_mixed_model(
        pd.concat([holes, extra], ignore_index=True),
        "y ~ C(month) + x",
        ["patient_code", "vcf_id"],
    )
    assert res.n_dropped == 3
    assert res.n_obs == full.n_obs
    np.testing.assert_allclose(res.coefficients, full.coefficients, rtol=1e-10)


def test_error_on_empty_data() -> None:
    empty = pd.DataFrame({"y": [], "x": [], "g": []})
    with pytest.raises(ValueError, match="empty"):
        fit_mixed_model(empty, "y ~ x", ["g"])


def test_error_on_non_nested_groups() -> None:
    data = pd.DataFrame(
        {
            "y": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            "pt": ["A", "A", "B", "B", "C", "C"],
            "vcf": ["T12", "L1", "T12", "L2", "L3", "L3"],
        }
    )
    with pytest.raises(ValueError, match=r"not nested.*'T12'"):
        fit_mixed_model(data, "y ~ 1", ["pt", "vcf"])


def test_error_on_rank_deficient_design() -> None:
    data = simulate_cohort(20, seed=13)
    data["x2"] = 2.0 * data["x"]
    with pytest.raises(ValueError, match=r"rank deficient.*x"):
        fit_mixed_model(data, "y ~ x + x2", ["patient_code"])


def test_error_on_bad_groups_argument() -> None:
    data = simulate_cohort(10, seed=14)
    with pytest.raises(ValueError, match="not in data"):
        fit_mixed_model(data, "y ~ x", ["patient"])
    with pytest.raises(ValueError, match="1 or 2"):
        fit_mixed_model(data, "y ~ x", ["patient_code", "vcf_id", "month"])


# ------------------------------------------------------------------------------------------
# (5) Wald test, output formats
# ------------------------------------------------------------------------------------------


def test_wald_test_matches_hand_computation(small_data: pd.DataFrame) -> None:
    res = fit_mixed_model(small_data, "y ~ C(month) + x", ["patient_code", "vcf_id"])
    names = ["C(month)[T.3]", "C(month)[T.6]", "C(month)[T.12]"]
    idx = [res.terms.index(t) for t in names]
    b = np.array(res.coefficients)[idx]
    cov = np.asarray(res.cov_params)[np.ix_(idx, idx)]
    chi2 = float(b @ np.linalg.inv(cov) @ b)
    out = wald_test(res, names)
    assert out.df == 3
    assert out.statistic == pytest.approx(chi2, rel=1e-10)
    assert out.p_value == pytest.approx(stats.chi2.sf(chi2, 3), rel=1e-10)
    # A prefix stands for all its levels.
    assert wald_test(res, ["C(month)"]).statistic == pytest.approx(chi2, rel=1e-10)
    # One term: chi-square = z^2 and the same two-sided p-value.
    single = wald_test(res, ["x"])
    i = res.terms.index("x")
    assert single.statistic == pytest.approx(res.z_values[i] ** 2, rel=1e-10)
    assert single.p_value == pytest.approx(res.p_values[i], rel=1e-8)
    with pytest.raises(ValueError, match="not in the model"):
        wald_test(res, ["month"])


def test_to_dict_is_json_safe_and_confidence_level(small_data: pd.DataFrame) -> None:
    res = fit_mixed_model(small_data, "y ~ C(month) + x", ["patient_code"], confidence_level=0.9)
    assert isinstance(res, MixedModelResult)
    d = res.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert "cov_params" not in d
    assert d["variance_components"].keys() == {"residual", "patient_code"}
    fe = d["fixed_effects"][0]
    assert isinstance(fe["coefficient"], float) and isinstance(d["n_obs"], int)
    z = stats.norm.ppf(0.95)
    se = np.array(res.std_errors)
    np.testing.assert_allclose(res.ci_upper, np.array(res.coefficients) + z * se, rtol=1e-10)
    assert res.to_frame().shape == (len(res.terms), 6)
    assert res.coefficient("x") == res.coefficients[res.terms.index("x")]


def test_array_entry_point_one_level() -> None:
    data = simulate_cohort(30, seed=15)
    X = np.column_stack([np.ones(len(data)), data["x"]])
    res = fit_mixed_arrays(
        data["y"], X, data["patient_code"], terms=["Intercept", "x"], group_names=["pt"]
    )
    ref = fit_mixed_model(data, "y ~ x", ["patient_code"])
    np.testing.assert_allclose(res.coefficients, ref.coefficients, rtol=1e-10)
    assert res.variance_components["pt"] == pytest.approx(
        ref.variance_components["patient_code"], rel=1e-8
    )


@pytest.mark.slow
def test_600k_rows_two_level_completes() -> None:
    data = simulate_cohort(115_000, seed=30, p_missing=0.1, max_vcf=2)
    res = fit_mixed_model(data, "y ~ C(month) + x", ["patient_code", "vcf_id"])
    assert res.n_obs > 600_000
    assert res.converged
    assert res.variance_components["vcf_id"] == pytest.approx(1.5**2, rel=0.05)
