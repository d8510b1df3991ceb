"""Fast, exact linear mixed models with nested random intercepts.

Model, for rows ``k`` with outer group ``g(k)`` and inner group ``j(k)`` nested in it::

    y_k = x_k' b + u_outer[g(k)] + u_inner[j(k)] + e_k
    u_outer ~ N(0, s_o^2),  u_inner ~ N(0, s_i^2),  e ~ N(0, s^2)

fitted by REML (default) or ML.  The one-level model (outer groups only) is the special
case ``s_i^2 = 0``.

Why not statsmodels ``MixedLM``: it loops over groups in Python and takes minutes for
100,000 patients.  Here the per-outer-group covariance
``V_g = s^2 (I + g_i blockdiag(J) + g_o J)`` (``g_i = s_i^2 / s^2``, ``g_o = s_o^2 / s^2``)
is inverted in closed form by two nested Sherman-Morrison steps.  Writing a column ``a`` as
within-inner-group deviations plus inner-group means ``abar_j``, every quadratic form is::

    a' H^-1 b = W(a, b)                                             (within inner groups)
              + sum_j q_j (abar_j - ahat_g)(bbar_j - bhat_g)          (inner around outer)
              + sum_g m_g / (1 + g_o m_g) ahat_g bhat_g               (outer)

with ``H = V / s^2``, ``c_j = 1 / (1 + g_i n_j)``, ``q_j = n_j c_j``, ``m_g = sum_j q_j`` and
``ahat_g`` the ``q``-weighted mean of ``abar_j`` over the inner groups of ``g``; and
``log det H = sum_j log(1 + g_i n_j) + sum_g log(1 + g_o m_g)``.  All weights are
non-negative, so the Gram matrix is formed without cancellation.  ``W`` is computed once;
each likelihood evaluation then costs O(n_inner_groups p^2) with no Python loop over groups.
The residual variance is profiled out and the (RE)ML criterion is minimised over the relative
standard deviations ``sqrt(g_o)``, ``sqrt(g_i)`` >= 0 with L-BFGS-B and an exact gradient, so
estimates can reach the boundary 0.

Standard errors of the fixed effects are ``sqrt(diag(s^2 (X' H^-1 X)^-1))`` (as lme4 and SAS;
statsmodels also uses the fixed/random cross terms of the observed Hessian, which makes its
standard errors differ slightly in unbalanced data).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy import linalg, optimize, stats

__all__ = [
    "MixedModelResult",
    "WaldTestResult",
    "fit_mixed_arrays",
    "fit_mixed_model",
    "wald_test",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]

# Relative standard deviations above this are treated as unbounded (ratio 1e8).
_THETA_MAX = 1.0e4
# Relative standard deviations below this at the optimum are checked against exactly 0.
_THETA_SNAP = 1.0e-3


@dataclass(frozen=True)
class MixedModelResult:
    """Result of a linear mixed model fit.

    Attributes
    ----------
    formula : str
        Fixed-effects formula (patsy), or ``""`` when fitted from arrays.
    outcome : str
        Name of the outcome variable.
    terms : tuple of str
        Names of the fixed-effect columns (e.g. ``"Intercept"``, ``"C(month)[T.3]"``).
    coefficients, std_errors, z_values, p_values, ci_lower, ci_upper : tuple of float
        Per term: estimate, standard error, Wald z, two-sided normal p-value and confidence
        limits at ``confidence_level``.
    confidence_level : float
        Level of the confidence intervals (e.g. 0.95).
    variance_components : dict of str to float
        ``{"residual": s^2, <outer name>: s_o^2[, <inner name>: s_i^2]}``.
    group_names : tuple of str
        Grouping variables, outer first.
    n_groups : dict of str to int
        Number of groups per grouping variable among the rows used.
    n_obs : int
        Rows used in the fit.
    n_dropped : int
        Rows dropped because of missing outcome, predictors or group ids.
    loglik : float
        Maximised log-likelihood (restricted log-likelihood for REML; same constants as
        statsmodels and lme4).
    method : str
        ``"REML"`` or ``"ML"``.
    converged : bool
        Whether the optimiser reported convergence (or the gradient is negligible).
    cov_params : numpy.ndarray
        Covariance matrix of the fixed effects (read-only; not part of ``to_dict``).
    """

    formula: str
    outcome: str
    terms: tuple[str, ...]
    coefficients: tuple[float, ...]
    std_errors: tuple[float, ...]
    z_values: tuple[float, ...]
    p_values: tuple[float, ...]
    ci_lower: tuple[float, ...]
    ci_upper: tuple[float, ...]
    confidence_level: float
    variance_components: dict[str, float]
    group_names: tuple[str, ...]
    n_groups: dict[str, int]
    n_obs: int
    n_dropped: int
    loglik: float
    method: str
    converged: bool
    cov_params: FloatArray = field(repr=False, compare=False)

    def coefficient(self, term: str) -> float:
        """Return the estimate of one fixed-effect term by name."""
        return self.coefficients[_term_index(self, term)]

    def to_frame(self) -> pd.DataFrame:
        """Fixed effects as a DataFrame indexed by term."""
        return pd.DataFrame(
            {
                "coefficient": self.coefficients,
                "std_error": self.std_errors,
                "z": self.z_values,
                "p_value": self.p_values,
                "ci_lower": self.ci_lower,
                "ci_upper": self.ci_upper,
            },
            index=pd.Index(self.terms, name="term"),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (plain floats, ints and strings; no covariance matrix)."""
        return {
            "formula": self.formula,
            "outcome": self.outcome,
            "method": self.method,
            "converged": bool(self.converged),
            "n_obs": int(self.n_obs),
            "n_dropped": int(self.n_dropped),
            "n_groups": {str(k): int(v) for k, v in self.n_groups.items()},
            "group_names": list(self.group_names),
            "loglik": float(self.loglik),
            "confidence_level": float(self.confidence_level),
            "variance_components": {str(k): float(v) for k, v in self.variance_components.items()},
            "fixed_effects": [
                {
                    "term": t,
                    "coefficient": float(b),
                    "std_error": float(se),
                    "z": float(z),
                    "p_value": float(p),
                    "ci_lower": float(lo),
                    "ci_upper": float(hi),
                }
                for t, b, se, z, p, lo, hi in zip(
                    self.terms,
                    self.coefficients,
                    self.std_errors,
                    self.z_values,
                    self.p_values,
                    self.ci_lower,
                    self.ci_upper,
                    strict=True,
                )
            ],
        }


@dataclass(frozen=True)
class WaldTestResult:
    """Joint Wald chi-square test that the listed coefficients are all zero."""

    terms: tuple[str, ...]
    statistic: float
    df: int
    p_value: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary."""
        return {
            "terms": list(self.terms),
            "statistic": float(self.statistic),
            "df": int(self.df),
            "p_value": float(self.p_value),
        }


def _term_index(result: MixedModelResult, term: str) -> int:
    try:
        return result.terms.index(term)
    except ValueError:
        msg = f"term={term!r} is not in the model; available terms: {list(result.terms)}"
        raise ValueError(msg) from None


def wald_test(result: MixedModelResult, terms: Sequence[str]) -> WaldTestResult:
    """Joint Wald chi-square test that the listed fixed effects are all zero.

    Parameters
    ----------
    result : MixedModelResult
        A fitted model.
    terms : sequence of str
        Term names as in ``result.terms``.  A name that is not a term but is the prefix of
        terms followed by ``"["`` (e.g. ``"C(month)"``) stands for all of them, so
        ``wald_test(res, ["C(month)"])`` tests "any change over months".

    Returns
    -------
    WaldTestResult
        ``statistic = b_S' Cov_SS^-1 b_S``, ``df = len(S)``, chi-square p-value.
    """
    if isinstance(terms, str):
        terms = [terms]
    if len(terms) == 0:
        msg = "terms=[] is empty; name at least one fixed-effect term to test"
        raise ValueError(msg)
    selected: list[str] = []
    for name in terms:
        if name in result.terms:
            expanded = [name]
        else:
            expanded = [t for t in result.terms if t.startswith(name + "[")]
        if not expanded:
            msg = f"term={name!r} is not in the model; available terms: {list(result.terms)}"
            raise ValueError(msg)
        selected.extend(t for t in expanded if t not in selected)
    idx = [result.terms.index(t) for t in selected]
    beta = np.asarray(result.coefficients, dtype=float)[idx]
    cov = np.asarray(result.cov_params, dtype=float)[np.ix_(idx, idx)]
    statistic = float(beta @ np.linalg.solve(cov, beta))
    df = len(idx)
    return WaldTestResult(
        terms=tuple(selected),
        statistic=statistic,
        df=df,
        p_value=float(stats.chi2.sf(statistic, df)),
    )


# --------------------------------------------------------------------------------------------
# Core computations on arrays
# --------------------------------------------------------------------------------------------


@dataclass
class _Evaluation:
    objective: float  # profiled -2 (RE)ML log-likelihood without constants
    gradient: FloatArray  # d objective / d gamma (outer[, inner])
    gram: FloatArray  # Z' H^-1 Z, Z = [X, y]
    chol: FloatArray  # lower Cholesky factor of gram
    rss: float
    logdet_h: float


class _NestedGroups:
    """Sufficient statistics of ``Z = [X, y]`` for the nested random-intercept model."""

    def __init__(self, Z: FloatArray, outer: IntArray, inner: IntArray | None, reml: bool) -> None:
        n_obs, n_col = Z.shape
        self.n_obs = n_obs
        self.p = n_col - 1
        self.reml = reml
        self.two_level = inner is not None
        groups = inner if inner is not None else outer
        n_groups = int(groups.max()) + 1
        n_per = np.bincount(groups, minlength=n_groups).astype(float)
        zbar = np.empty((n_groups, n_col))
        for k in range(n_col):
            zbar[:, k] = np.bincount(groups, weights=Z[:, k], minlength=n_groups) / n_per
        within = Z - zbar[groups]
        self.within_gram: FloatArray = within.T @ within
        if inner is not None:
            outer_of_inner = np.empty(n_groups, dtype=np.intp)
            outer_of_inner[inner] = outer
        else:
            outer_of_inner = np.arange(n_groups, dtype=np.intp)
        # Sort inner groups by outer group so that np.add.reduceat sums each outer group.
        order = np.argsort(outer_of_inner, kind="stable")
        self.outer_of_inner: IntArray = outer_of_inner[order]
        self.zbar: FloatArray = zbar[order]
        self.n_inner: FloatArray = n_per[order]
        self.starts: IntArray = np.flatnonzero(
            np.r_[True, self.outer_of_inner[1:] != self.outer_of_inner[:-1]]
        )

    def evaluate(self, gamma: FloatArray, want_gradient: bool = True) -> _Evaluation:
        """Profiled criterion and its gradient at variance ratios ``gamma``."""
        g_o = float(gamma[0])
        g_i = float(gamma[1]) if self.two_level else 0.0
        n_j = self.n_inner
        c = 1.0 / (1.0 + g_i * n_j)
        q = n_j * c
        m = np.add.reduceat(q, self.starts)
        zhat = np.add.reduceat(self.zbar * q[:, None], self.starts, axis=0) / m[:, None]
        e = 1.0 / (1.0 + g_o * m)
        h = m * e
        gram = self.within_gram + zhat.T @ (zhat * h[:, None])
        dev: FloatArray | None = None
        if self.two_level:
            dev = self.zbar - zhat[self.outer_of_inner]
            gram = gram + dev.T @ (dev * q[:, None])
        logdet_h = -float(np.sum(np.log(e)))
        if self.two_level:
            logdet_h -= float(np.sum(np.log(c)))
        try:
            chol = linalg.cholesky(gram, lower=True)
        except linalg.LinAlgError:
            chol = np.full_like(gram, np.nan)
        p = self.p
        rss = float(chol[p, p] ** 2)
        logdet_xx = 2.0 * float(np.sum(np.log(np.diag(chol)[:p])))
        n_eff = self.n_obs - p if self.reml else self.n_obs
        objective = logdet_h + n_eff * math.log(rss) if rss > 0 else math.inf
        if self.reml:
            objective += logdet_xx
        gradient = np.zeros(2 if self.two_level else 1)
        if want_gradient and math.isfinite(objective):
            beta = linalg.cho_solve((chol[:p, :p], True), gram[:p, p])
            resid_coef = np.r_[-beta, 1.0]
            # Rows of t_out / t_in are 1_b' H^-1 Z for the blocks b of dH/dgamma.
            t_out = zhat * h[:, None]
            blocks: list[tuple[FloatArray, float]] = [(t_out, float(np.sum(h)))]
            if self.two_level and dev is not None:
                t_in = q[:, None] * (dev + (zhat * e[:, None])[self.outer_of_inner])
                trace_in = float(np.sum(q - q * q * g_o * e[self.outer_of_inner]))
                blocks.append((t_in, trace_in))
            for k, (t_blk, trace_k) in enumerate(blocks):
                t_r = t_blk @ resid_coef
                grad_k = trace_k - n_eff * float(t_r @ t_r) / rss
                if self.reml:
                    u = t_blk[:, :p]
                    solved = linalg.cho_solve((chol[:p, :p], True), u.T)
                    grad_k -= float(np.sum(u.T * solved))
                gradient[k] = grad_k
        return _Evaluation(objective, gradient, gram, chol, rss, logdet_h)


def _optimise(
    model: _NestedGroups,
) -> tuple[FloatArray, bool]:
    """Minimise the profiled criterion over relative standard deviations theta >= 0."""
    n_par = 2 if model.two_level else 1
    scale = 1.0 / model.n_obs  # keeps gradients O(1) for the tolerance

    def fun(theta: FloatArray) -> tuple[float, FloatArray]:
        ev = model.evaluate(theta**2)
        if not math.isfinite(ev.objective):
            return 1e300, np.zeros(n_par)
        return ev.objective * scale, ev.gradient * 2.0 * theta * scale

    # Coarse grid for a robust starting point (cheap: each evaluation is O(groups p^2)).
    grid_1d = np.array([0.1, 0.5, 1.0, 2.0, 5.0])
    mesh = np.meshgrid(*([grid_1d] * n_par), indexing="ij")
    starts = np.column_stack([g.ravel() for g in mesh])
    values = [model.evaluate(s**2, want_gradient=False).objective for s in starts]
    theta0 = starts[int(np.argmin(values))]
    res = optimize.minimize(
        fun,
        theta0,
        jac=True,
        method="L-BFGS-B",
        bounds=[(0.0, _THETA_MAX)] * n_par,
        options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 500, "maxls": 50},
    )
    theta = np.clip(np.asarray(res.x, dtype=float), 0.0, _THETA_MAX)
    best_value, _ = fun(theta)
    # At the boundary the criterion is flat in theta; snap tiny values to exactly 0.
    for k in range(n_par):
        if 0.0 < theta[k] < _THETA_SNAP:
            trial = theta.copy()
            trial[k] = 0.0
            value, _ = fun(trial)
            if value <= best_value:
                theta, best_value = trial, value
    # Projected gradient on gamma: at gamma = 0 only an increasing criterion is a minimum.
    ev = model.evaluate(theta**2)
    grad_gamma = ev.gradient * scale
    projected = np.where(theta > 0.0, grad_gamma, np.minimum(grad_gamma, 0.0))
    small_gradient = bool(np.all(np.abs(projected * np.maximum(theta**2, 1.0)) < 1e-5))
    converged = bool(res.success) or small_gradient
    if np.any(theta >= _THETA_MAX * 0.999):
        converged = False
    return theta**2, converged


def _check_rank(X: FloatArray, terms: Sequence[str]) -> None:
    if X.shape[1] == 0:
        return
    r, piv = linalg.qr(X, mode="r", pivoting=True)
    diag = np.abs(np.diag(r))
    tol = diag[0] * max(X.shape) * np.finfo(float).eps
    rank = int(np.sum(diag > tol))
    if rank < X.shape[1]:
        aliased = [terms[i] for i in piv[rank:]]
        msg = (
            f"design matrix is rank deficient (rank {rank} < {X.shape[1]} columns); "
            f"terms {aliased} are linear combinations of other terms (e.g. a level never "
            "observed, or a predictor constant within the data); drop or merge them"
        )
        raise ValueError(msg)


def fit_mixed_arrays(
    y: npt.ArrayLike,
    X: npt.ArrayLike,
    outer: npt.ArrayLike,
    inner: npt.ArrayLike | None = None,
    *,
    terms: Sequence[str] | None = None,
    group_names: Sequence[str] = ("group",),
    reml: bool = True,
    confidence_level: float = 0.95,
    outcome: str = "y",
    formula: str = "",
    n_dropped: int = 0,
) -> MixedModelResult:
    """Fit the nested random-intercept model from arrays (no missing values allowed).

    Parameters
    ----------
    y : array_like, shape (n,)
        Outcome.
    X : array_like, shape (n, p)
        Fixed-effects design matrix (include an intercept column yourself).
    outer : array_like, shape (n,)
        Outer group labels (any hashable values).
    inner : array_like, shape (n,), optional
        Inner group labels, each nested in one outer group; omit for a one-level model.
    terms : sequence of str, optional
        Column names of ``X``; default ``x0, x1, ...``.
    group_names : sequence of str
        Names of the grouping variables, outer first (used as variance-component keys).
    reml : bool
        REML (default) or ML.
    confidence_level : float
        Level of the coefficient confidence intervals, in (0, 1).
    outcome, formula : str
        Stored in the result for reporting.
    n_dropped : int
        Stored in the result (rows dropped by the caller).

    Returns
    -------
    MixedModelResult
    """
    if not 0.0 < confidence_level < 1.0:
        msg = f"confidence_level={confidence_level!r} must be in (0, 1), e.g. 0.95"
        raise ValueError(msg)
    y_arr = np.asarray(y, dtype=float).ravel()
    X_arr = np.asarray(X, dtype=float)
    if X_arr.ndim == 1:
        X_arr = X_arr[:, None]
    n_obs = y_arr.shape[0]
    if n_obs == 0:
        msg = "no rows to fit (empty data, or every row has a missing value); supply data"
        raise ValueError(msg)
    if X_arr.shape[0] != n_obs:
        msg = f"X has {X_arr.shape[0]} rows but y has {n_obs}; pass arrays of equal length"
        raise ValueError(msg)
    p = X_arr.shape[1]
    term_names = tuple(terms) if terms is not None else tuple(f"x{i}" for i in range(p))
    if len(term_names) != p:
        msg = f"terms has {len(term_names)} names but X has {p} columns; give one per column"
        raise ValueError(msg)
    if not (np.all(np.isfinite(y_arr)) and np.all(np.isfinite(X_arr))):
        msg = "y or X contains NaN or infinite values; drop those rows before fitting"
        raise ValueError(msg)
    n_levels = 1 if inner is None else 2
    names = tuple(str(g) for g in group_names)
    if len(names) != n_levels:
        msg = f"group_names={list(names)} must name {n_levels} grouping variable(s)"
        raise ValueError(msg)
    outer_codes, outer_uniques = pd.factorize(np.asarray(outer), use_na_sentinel=True)
    if outer_codes.shape[0] != n_obs or np.any(outer_codes < 0):
        msg = f"outer groups ({names[0]}) must have one non-missing label per row of y"
        raise ValueError(msg)
    outer_idx = outer_codes.astype(np.intp)
    inner_idx: IntArray | None = None
    n_groups = {names[0]: len(outer_uniques)}
    if inner is not None:
        inner_codes, inner_uniques = pd.factorize(np.asarray(inner), use_na_sentinel=True)
        if inner_codes.shape[0] != n_obs or np.any(inner_codes < 0):
            msg = f"inner groups ({names[1]}) must have one non-missing label per row of y"
            raise ValueError(msg)
        inner_idx = inner_codes.astype(np.intp)
        owner = np.empty(len(inner_uniques), dtype=np.intp)
        owner[inner_idx] = outer_idx
        bad = np.flatnonzero(owner[inner_idx] != outer_idx)
        if bad.size:
            k = int(bad[0])
            msg = (
                f"groups are not nested: {names[1]}={inner_uniques[inner_idx[k]]!r} occurs "
                f"in more than one {names[0]} (e.g. {outer_uniques[outer_idx[k]]!r} and "
                f"{outer_uniques[owner[inner_idx[k]]]!r}); give inner groups ids that are "
                f"unique across {names[0]}, e.g. '{names[0]}/{names[1]}'"
            )
            raise ValueError(msg)
        n_groups[names[1]] = len(inner_uniques)
    _check_rank(X_arr, term_names)
    if n_obs <= p:
        msg = f"{n_obs} rows for {p} fixed-effect terms; need more rows than terms"
        raise ValueError(msg)

    Z = np.column_stack([X_arr, y_arr])
    model = _NestedGroups(Z, outer_idx, inner_idx, reml)
    gamma, converged = _optimise(model)
    ev = model.evaluate(gamma, want_gradient=False)
    if not (ev.rss > 0 and math.isfinite(ev.objective)):
        msg = "residual variance is zero (outcome fitted exactly by the fixed effects)"
        raise ValueError(msg)
    chol_xx = ev.chol[:p, :p]
    beta = linalg.cho_solve((chol_xx, True), ev.gram[:p, p])
    n_eff = n_obs - p if reml else n_obs
    scale = ev.rss / n_eff
    xtx_inv = linalg.cho_solve((chol_xx, True), np.eye(p))
    cov = scale * 0.5 * (xtx_inv + xtx_inv.T)
    cov.setflags(write=False)
    se = np.sqrt(np.diag(cov))
    z = beta / se
    pval = 2.0 * stats.norm.sf(np.abs(z))
    crit = float(stats.norm.ppf(0.5 + confidence_level / 2.0))
    loglik = -0.5 * (n_eff * math.log(2.0 * math.pi * scale) + ev.logdet_h + n_eff)
    if reml:
        loglik -= 0.5 * 2.0 * float(np.sum(np.log(np.diag(chol_xx))))
    variance = {"residual": float(scale), names[0]: float(scale * gamma[0])}
    if inner is not None:
        variance[names[1]] = float(scale * gamma[1])

    def _tuple(a: FloatArray) -> tuple[float, ...]:
        return tuple(float(v) for v in a)

    return MixedModelResult(
        formula=formula,
        outcome=outcome,
        terms=term_names,
        coefficients=_tuple(beta),
        std_errors=_tuple(se),
        z_values=_tuple(z),
        p_values=_tuple(pval),
        ci_lower=_tuple(beta - crit * se),
        ci_upper=_tuple(beta + crit * se),
        confidence_level=float(confidence_level),
        variance_components=variance,
        group_names=names,
        n_groups=n_groups,
        n_obs=int(n_obs),
        n_dropped=int(n_dropped),
        loglik=float(loglik),
        method="REML" if reml else "ML",
        converged=converged,
        cov_params=cov,
    )


def _categoricals_for_patsy(frame: pd.DataFrame, formula: str) -> pd.DataFrame:
    """Convert columns that patsy treats as categorical to pandas Categorical.

    Patsy converts other categorical inputs element by element in Python (seconds for
    500,000 rows); a pandas Categorical takes its fast path with the same sorted levels.
    A numeric column is converted only when every use in the formula is ``C(name...)``.
    """
    converted = {}
    for col in frame.columns:
        if not isinstance(col, str) or not col.isidentifier():
            continue
        uses = list(re.finditer(rf"(?<![\w.]){re.escape(col)}(?!\w)", formula))
        series = frame[col]
        if not uses or isinstance(series.dtype, pd.CategoricalDtype):
            continue
        if pd.api.types.is_bool_dtype(series.dtype):
            continue
        if pd.api.types.is_numeric_dtype(series.dtype):
            in_c = all(
                re.search(r"(?<![\w.])C\(\s*$", formula[: u.start()])
                and re.match(r"\s*[,)]", formula[u.end() :])
                for u in uses
            )
            if not in_c:
                continue
        converted[col] = pd.Categorical(series)
    return frame.assign(**converted) if converted else frame


def fit_mixed_model(
    data: pd.DataFrame,
    formula: str,
    groups: Sequence[str],
    *,
    reml: bool = True,
    confidence_level: float = 0.95,
) -> MixedModelResult:
    """Fit ``formula`` with random intercepts for one or two nested grouping variables.

    Parameters
    ----------
    data : pandas.DataFrame
        Tidy data, one row per observation.
    formula : str
        Patsy formula of the fixed part, e.g. ``"bme_percent ~ C(month)"`` or
        ``"vas ~ bme_percent + C(month)"``.
    groups : sequence of str
        Grouping columns, outer first: ``["patient_code"]`` or
        ``["patient_code", "vcf_id"]``.  Inner ids must be unique across outer groups.
    reml : bool
        REML (default) or ML.
    confidence_level : float
        Level of the confidence intervals.

    Returns
    -------
    MixedModelResult
        Rows with a missing outcome, predictor or group id are dropped and counted in
        ``n_dropped``.
    """
    import patsy  # local: only the formula entry point needs it

    if isinstance(groups, str):
        groups = [groups]
    groups = list(groups)
    if len(groups) not in (1, 2):
        msg = f"groups={groups!r} must list 1 or 2 grouping columns, outer first"
        raise ValueError(msg)
    missing = [g for g in groups if g not in data.columns]
    if missing:
        msg = f"groups={groups!r}: columns {missing} are not in data; available: {list(data)}"
        raise ValueError(msg)
    if len(data) == 0:
        msg = "data is empty; supply at least one row per group"
        raise ValueError(msg)
    frame = data.reset_index(drop=True)
    frame = frame.loc[frame[groups].notna().all(axis=1)]
    frame = _categoricals_for_patsy(frame, formula)
    if len(frame) == 0:
        msg = f"every row of data has a missing value in groups={groups!r}"
        raise ValueError(msg)
    try:
        y_df, X_df = patsy.dmatrices(formula, frame, NA_action="drop", return_type="dataframe")
    except patsy.PatsyError as exc:
        msg = f"formula={formula!r} could not be built from data: {exc}"
        raise ValueError(msg) from exc
    if y_df.shape[1] != 1:
        msg = f"formula={formula!r} must have one numeric outcome; got columns {list(y_df)}"
        raise ValueError(msg)
    kept = frame.loc[y_df.index]
    n_dropped = len(data) - len(kept)
    if len(kept) == 0:
        msg = f"no complete rows for formula={formula!r} (every row has a missing value)"
        raise ValueError(msg)
    return fit_mixed_arrays(
        y_df.to_numpy(dtype=float)[:, 0],
        X_df.to_numpy(dtype=float),
        kept[groups[0]].to_numpy(),
        kept[groups[1]].to_numpy() if len(groups) == 2 else None,
        terms=[str(c) for c in X_df.columns],
        group_names=groups,
        reml=reml,
        confidence_level=confidence_level,
        outcome=str(y_df.columns[0]),
        formula=formula,
        n_dropped=n_dropped,
    )
