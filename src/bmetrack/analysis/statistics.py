"""Statistical building blocks of the report (METHOD.md section 5).

Plain functions over numpy arrays and pandas objects. Each returns a small frozen
dataclass whose ``to_dict()`` is JSON-safe (plain ``float``/``int``/``str``/``None``;
NaN and infinities become ``None``) and records the n used, the n dropped and the
parameters. Everything is vectorised so that a simulated cohort of 100,000 patients
x 4 visits (600,000 rows) runs in seconds: no Python loops over subjects.

Conventions
-----------
- Missing values are NaN (or ``None``/``pd.NA``); each function states which rows it
  keeps (complete cases, pairwise complete, ...) and reports how many it dropped.
- Too little data never raises: the statistics are NaN and ``note`` says why. Bad
  input (unequal lengths, non-numeric values, a confidence level outside (0, 1))
  raises ``ValueError``.
- Effect sizes come with confidence intervals at ``confidence_level``.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy import stats

from bmetrack.jsonsafe import json_safe

__all__ = [
    "Correction",
    "Correlation",
    "PairResult",
    "Proportion",
    "Summary",
    "TestResult",
    "friedman_test",
    "holm_adjust",
    "mann_whitney",
    "median_iqr",
    "pairwise_wilcoxon",
    "repeated_measures_correlation",
    "responder_rate",
    "spearman_correlation",
    "stuart_maxwell",
    "stuart_maxwell_from_table",
    "wilson_interval",
]

JSONValue = None | bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"]
FloatArray = npt.NDArray[np.float64]

# Largest number of pairwise differences materialised at once by the Hodges-Lehmann
# estimator; above it an exact selection algorithm is used (see _kth_pairwise_difference).
_HL_MAX_ENUMERATE = 1_000_000
# Exact Wilcoxon signed-rank p-values are used up to this many non-zero differences.
_WILCOXON_EXACT_MAX_N = 50


class Correction(StrEnum):
    """Multiple-comparison correction for a family of p-values."""

    HOLM = "holm"
    BONFERRONI = "bonferroni"
    NONE = "none"


# --------------------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Result:
    """Base class: a frozen dataclass with a JSON-safe ``to_dict``."""

    def to_dict(self) -> dict[str, JSONValue]:
        """Return the fields as a JSON-safe dict (NaN and infinities become ``None``)."""
        return {f.name: json_safe(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class Proportion(_Result):
    """A proportion with its confidence interval (proportions on the 0..1 scale).

    ``n_dropped`` counts the rows left out before counting (missing values);
    ``parameters`` records the settings (e.g. the responder thresholds).
    """

    successes: int
    n: int
    proportion: float
    percent: float
    ci_low: float
    ci_high: float
    confidence_level: float
    method: str = "wilson"
    n_dropped: int = 0
    note: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TestResult(_Result):
    """Result of a hypothesis test.

    ``n`` is the number of units used (complete rows for Friedman, pairs for
    Stuart-Maxwell, both groups together for Mann-Whitney); ``n_dropped`` the number
    left out for missing data. ``details`` holds test-specific extra output (its keys
    are listed in each function's docstring); ``parameters`` the settings used.
    """

    __test__ = False  # not a pytest test class despite its name

    test: str
    statistic: float
    statistic_name: str
    df: float
    p_value: float
    n: int
    n_dropped: int
    effect_size: float = math.nan
    effect_size_name: str | None = None
    effect_size_ci_low: float = math.nan
    effect_size_ci_high: float = math.nan
    confidence_level: float | None = None
    method: str | None = None
    note: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PairResult(_Result):
    """One paired comparison of a Wilcoxon signed-rank family.

    Differences are ``condition_b - condition_a``. ``statistic`` is the two-sided
    Wilcoxon statistic min(T+, T-) over non-zero differences; ``z`` the tie-corrected
    normal score of T+ (sign follows the direction of b - a). The effect size is the
    matched-pairs rank-biserial correlation (T+ - T-) / (T+ + T-).
    """

    condition_a: Hashable
    condition_b: Hashable
    n: int
    n_dropped: int
    n_nonzero: int
    median_a: float
    median_b: float
    median_difference: float
    statistic: float
    t_plus: float
    t_minus: float
    z: float
    p_value: float
    p_adjusted: float
    p_method: str
    correction: str
    effect_size: float
    effect_size_ci_low: float
    effect_size_ci_high: float
    confidence_level: float
    effect_size_name: str = "matched_pairs_rank_biserial"
    note: str | None = None


@dataclass(frozen=True)
class Correlation(_Result):
    """A correlation coefficient with p-value and confidence interval.

    ``n`` is the number of observations (pairs) used; ``n_subjects`` is set for the
    repeated-measures correlation only.
    """

    method: str
    r: float
    p_value: float
    ci_low: float
    ci_high: float
    confidence_level: float
    ci_method: str
    n: int
    n_dropped: int
    df: float
    n_subjects: int | None = None
    note: str | None = None


@dataclass(frozen=True)
class Summary(_Result):
    """Descriptive summary of one numeric variable (quartiles: numpy 'linear', type 7)."""

    n: int
    n_missing: int
    median: float
    q1: float
    q3: float
    mean: float
    sd: float
    min: float
    max: float
    note: str | None = None


# --------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------


def _check_confidence_level(confidence_level: float) -> float:
    try:
        level = float(confidence_level)
    except (TypeError, ValueError):
        msg = f"confidence_level must be a number in (0, 1), got {confidence_level!r}"
        raise ValueError(msg) from None
    if not 0.0 < level < 1.0:
        msg = f"confidence_level must be in (0, 1), e.g. 0.95, got {confidence_level!r}"
        raise ValueError(msg)
    return level


def _z_critical(confidence_level: float) -> float:
    return float(stats.norm.ppf(0.5 + confidence_level / 2.0))


def _as_float_array(values: object, name: str, *, allow_inf: bool = False) -> FloatArray:
    """Return ``values`` as a 1-D float64 array (missing -> NaN) or raise ValueError."""
    if isinstance(values, pd.DataFrame):
        msg = f"{name} must be one-dimensional (a Series or array), got a DataFrame"
        raise ValueError(msg)
    if isinstance(values, pd.Series | pd.Index):
        if not (
            pd.api.types.is_numeric_dtype(values.dtype) or pd.api.types.is_bool_dtype(values.dtype)
        ):
            msg = (
                f"{name} must be numeric, got dtype {values.dtype}; "
                "convert it with pandas.to_numeric first"
            )
            raise ValueError(msg)
        array = values.to_numpy(dtype=float, na_value=np.nan)
    else:
        raw = np.asarray(values)
        if raw.dtype.kind in "biuf":
            array = raw.astype(float)
        elif raw.dtype.kind == "O":
            try:
                array = np.array(
                    [np.nan if v is None or v is pd.NA else v for v in raw.ravel()], dtype=float
                ).reshape(raw.shape)
            except (TypeError, ValueError):
                msg = f"{name} must contain only numbers or missing values, got {raw[:5]!r}..."
                raise ValueError(msg) from None
        else:
            msg = f"{name} must be numeric, got dtype {raw.dtype}"
            raise ValueError(msg)
    if array.ndim != 1:
        msg = f"{name} must be one-dimensional, got shape {array.shape}"
        raise ValueError(msg)
    if not allow_inf and np.isinf(array).any():
        msg = f"{name} contains infinite values; replace them with NaN (missing) or fix the data"
        raise ValueError(msg)
    return array


def _check_equal_length(a: FloatArray, b: FloatArray, name_a: str, name_b: str) -> None:
    if a.shape[0] != b.shape[0]:
        msg = (
            f"{name_a} and {name_b} must have equal lengths (one value per subject), "
            f"got {a.shape[0]} and {b.shape[0]}"
        )
        raise ValueError(msg)


def _wide_to_array(wide: object, name: str = "wide") -> FloatArray:
    """Return a wide DataFrame (rows = subjects, columns = conditions) as a float matrix."""
    if not isinstance(wide, pd.DataFrame):
        msg = f"{name} must be a pandas DataFrame (rows = subjects, columns = conditions)"
        raise ValueError(msg)
    if wide.shape[1] < 2:
        msg = f"{name} needs at least 2 condition columns, got {list(wide.columns)!r}"
        raise ValueError(msg)
    if not wide.columns.is_unique:
        msg = f"{name} has duplicate column labels {list(wide.columns)!r}; make them unique"
        raise ValueError(msg)
    bad = [
        col
        for col, dtype in wide.dtypes.items()
        if not (pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype))
    ]
    if bad:
        msg = (
            f"{name} columns {bad!r} are not numeric; convert them with pandas.to_numeric "
            "(missing values as NaN)"
        )
        raise ValueError(msg)
    array = wide.to_numpy(dtype=float, na_value=np.nan)
    if np.isinf(array).any():
        msg = f"{name} contains infinite values; replace them with NaN or fix the data"
        raise ValueError(msg)
    return array


def _as_count(value: object, name: str) -> int:
    if isinstance(value, bool | np.bool_):
        msg = f"{name} must be a non-negative integer, got the boolean {value!r}"
        raise ValueError(msg)
    try:
        count = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        msg = f"{name} must be a non-negative integer, got {value!r}"
        raise ValueError(msg) from None
    if count < 0:
        msg = f"{name} must be a non-negative integer, got {count}"
        raise ValueError(msg)
    return int(count)


def _label(value: Hashable) -> Hashable:
    """Plain Python version of a column label (numpy ints -> int)."""
    if isinstance(value, np.generic):
        return value.item()
    return value


def _fisher_ci(r: float, se: float, confidence_level: float) -> tuple[float, float]:
    """Confidence interval for a correlation-type coefficient via Fisher's z."""
    if not (math.isfinite(r) and math.isfinite(se)):
        return math.nan, math.nan
    z_crit = _z_critical(confidence_level)
    with np.errstate(divide="ignore"):
        z = float(np.arctanh(np.clip(r, -1.0, 1.0)))
    return math.tanh(z - z_crit * se), math.tanh(z + z_crit * se)


def _t_test_correlation(r: float, df: float) -> float:
    """Two-sided p-value of H0: rho = 0 from t = r sqrt(df / (1 - r^2))."""
    if not math.isfinite(r) or df < 1:
        return math.nan
    if abs(r) >= 1.0:
        return 0.0
    t = r * math.sqrt(df / (1.0 - r * r))
    return float(2.0 * stats.t.sf(abs(t), df))


# --------------------------------------------------------------------------------------
# Proportions and summaries
# --------------------------------------------------------------------------------------


def wilson_interval(successes: int, n: int, confidence_level: float = 0.95) -> Proportion:
    """Proportion with a Wilson score confidence interval.

    Parameters
    ----------
    successes : int
        Number of successes, 0 <= successes <= n.
    n : int
        Number of trials. ``n = 0`` gives NaN proportion and interval with a note.
    confidence_level : float
        Two-sided confidence level in (0, 1).

    Returns
    -------
    Proportion
        ``proportion`` and ``ci_low``/``ci_high`` on the 0..1 scale, ``percent`` x 100.

    Notes
    -----
    Wilson (1927): centre (p + z^2/2n) / (1 + z^2/n), half-width
    z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n), without continuity correction.
    """
    level = _check_confidence_level(confidence_level)
    s = _as_count(successes, "successes")
    total = _as_count(n, "n")
    if s > total:
        msg = f"successes ({s}) must not exceed n ({total})"
        raise ValueError(msg)
    if total == 0:
        return Proportion(
            successes=0,
            n=0,
            proportion=math.nan,
            percent=math.nan,
            ci_low=math.nan,
            ci_high=math.nan,
            confidence_level=level,
            note="n = 0: proportion undefined",
        )
    z = _z_critical(level)
    p = s / total
    denominator = 1.0 + z * z / total
    centre = (p + z * z / (2.0 * total)) / denominator
    half = z * math.sqrt(p * (1.0 - p) / total + z * z / (4.0 * total * total)) / denominator
    ci_low = 0.0 if s == 0 else max(0.0, centre - half)
    ci_high = 1.0 if s == total else min(1.0, centre + half)
    return Proportion(
        successes=s,
        n=total,
        proportion=p,
        percent=100.0 * p,
        ci_low=ci_low,
        ci_high=ci_high,
        confidence_level=level,
    )


def responder_rate(
    baseline: object,
    follow_up: object,
    min_drop_points: float | None = 2.0,
    min_drop_percent: float | None = 30.0,
    confidence_level: float = 0.95,
) -> Proportion:
    """Share of responders with a Wilson interval.

    A responder's score drops by at least ``min_drop_points`` OR by at least
    ``min_drop_percent`` % of its baseline (the MCID rule of METHOD.md 5.3).

    Parameters
    ----------
    baseline, follow_up : array-like of float
        Paired scores (e.g. VAS 0-10), one per subject; NaN = missing. Only pairs with
        both values present are used.
    min_drop_points : float or None
        Absolute drop threshold (>= 0); ``None`` disables the points rule.
    min_drop_percent : float or None
        Relative drop threshold in percent of baseline (0-100]; ``None`` disables it.
        With a baseline <= 0 the percent rule is undefined and only the points rule
        applies.
    confidence_level : float
        Level of the Wilson interval.

    Returns
    -------
    Proportion
        ``parameters`` records both thresholds and the rule.

    Notes
    -----
    Comparisons allow a tolerance of 1e-9 so that decimal VAS values (7.3 - 5.3)
    meet a 2-point threshold despite binary rounding.
    """
    level = _check_confidence_level(confidence_level)
    before = _as_float_array(baseline, "baseline")
    after = _as_float_array(follow_up, "follow_up")
    _check_equal_length(before, after, "baseline", "follow_up")
    if min_drop_points is None and min_drop_percent is None:
        msg = "give min_drop_points or min_drop_percent (or both); both are None"
        raise ValueError(msg)
    if min_drop_points is not None and not (
        math.isfinite(min_drop_points) and min_drop_points >= 0
    ):
        msg = f"min_drop_points must be a finite number >= 0, got {min_drop_points!r}"
        raise ValueError(msg)
    if min_drop_percent is not None and not (0.0 < min_drop_percent <= 100.0):
        msg = f"min_drop_percent must be in (0, 100], got {min_drop_percent!r}"
        raise ValueError(msg)
    tolerance = 1e-9
    present = ~(np.isnan(before) | np.isnan(after))
    before = before[present]
    after = after[present]
    drop = before - after
    responder = np.zeros(before.shape[0], dtype=bool)
    if min_drop_points is not None:
        responder |= drop >= min_drop_points - tolerance
    if min_drop_percent is not None:
        positive = before > 0
        responder |= positive & (
            drop * 100.0 >= min_drop_percent * before - tolerance * np.maximum(before, 1.0)
        )
    rule = " or ".join(
        part
        for part in (
            None if min_drop_points is None else f"drop >= {min_drop_points:g} points",
            None if min_drop_percent is None else f"drop >= {min_drop_percent:g}% of baseline",
        )
        if part is not None
    )
    result = wilson_interval(int(responder.sum()), int(before.shape[0]), level)
    note = result.note
    if min_drop_percent is not None and np.any(before <= 0):
        extra = f"{int(np.sum(before <= 0))} pair(s) with baseline <= 0: points rule only"
        note = extra if note is None else f"{note}; {extra}"
    return dataclasses.replace(
        result,
        n_dropped=int((~present).sum()),
        note=note,
        parameters={
            "min_drop_points": min_drop_points,
            "min_drop_percent": min_drop_percent,
            "rule": rule,
        },
    )


def median_iqr(values: object) -> Summary:
    """Median, quartiles and other descriptives of one variable (NaN = missing).

    Quartiles use numpy's default 'linear' interpolation (Hyndman-Fan type 7, as R's
    default); ``sd`` is the sample SD (ddof = 1; NaN for n < 2).
    """
    array = _as_float_array(values, "values")
    present = array[~np.isnan(array)]
    n = int(present.shape[0])
    n_missing = int(array.shape[0] - n)
    if n == 0:
        nan = math.nan
        return Summary(0, n_missing, nan, nan, nan, nan, nan, nan, nan, note="no values")
    q1, median, q3 = (float(v) for v in np.quantile(present, [0.25, 0.5, 0.75]))
    return Summary(
        n=n,
        n_missing=n_missing,
        median=median,
        q1=q1,
        q3=q3,
        mean=float(present.mean()),
        sd=float(present.std(ddof=1)) if n > 1 else math.nan,
        min=float(present.min()),
        max=float(present.max()),
        note=None if n > 1 else "n = 1: SD undefined",
    )


# --------------------------------------------------------------------------------------
# Friedman and paired Wilcoxon
# --------------------------------------------------------------------------------------


def _tie_sum_rows(data: FloatArray) -> float:
    """Sum over rows and tie groups of (t^3 - t) for tied values within each row."""
    ordered = np.sort(data, axis=1)
    new_group = np.ones(ordered.shape, dtype=bool)
    new_group[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group_id = np.cumsum(new_group.ravel()) - 1
    sizes = np.bincount(group_id).astype(float)
    return float(np.sum(sizes**3 - sizes))


def friedman_test(wide: pd.DataFrame) -> TestResult:
    """Friedman test for k related samples, complete cases only.

    Parameters
    ----------
    wide : pandas.DataFrame
        Rows = subjects, columns = conditions (e.g. months); NaN = missing. Rows with
        any missing value are dropped.

    Returns
    -------
    TestResult
        ``statistic`` is Friedman's chi-square with the tie correction (as
        ``scipy.stats.friedmanchisquare``), ``df = k - 1``, ``n`` the complete rows,
        ``effect_size`` Kendall's W = chi2 / (n (k - 1)). ``details``:
        ``n_complete``, ``n_conditions``, ``conditions``, ``mean_ranks``.

    Notes
    -----
    chi2 = [12 / (n k (k+1)) sum_j R_j^2 - 3 n (k+1)] / C with
    C = 1 - sum(t^3 - t) / (n k (k^2 - 1)) over tie groups within rows.
    Fewer than 2 complete rows, or all values tied within every row, give NaN.
    """
    values = _wide_to_array(wide)
    conditions = [_label(c) for c in wide.columns]
    complete = ~np.isnan(values).any(axis=1)
    data = values[complete]
    n, k = data.shape
    n_dropped = int(values.shape[0] - n)
    base: dict[str, Any] = {
        "test": "friedman",
        "statistic_name": "chi2",
        "df": float(k - 1),
        "n": int(n),
        "n_dropped": n_dropped,
        "effect_size_name": "kendall_w",
        "method": "chi-square approximation with tie correction",
    }
    details: dict[str, Any] = {"n_complete": int(n), "n_conditions": k, "conditions": conditions}
    if n < 2:
        return TestResult(
            statistic=math.nan,
            p_value=math.nan,
            note=f"{n} complete row(s); Friedman needs at least 2",
            details={**details, "mean_ranks": [math.nan] * k},
            **base,
        )
    ranks = stats.rankdata(data, axis=1)
    rank_sums = ranks.sum(axis=0)
    correction = 1.0 - _tie_sum_rows(data) / (n * k * (k * k - 1.0))
    details["mean_ranks"] = (rank_sums / n).tolist()
    if correction <= 1e-12:
        return TestResult(
            statistic=math.nan,
            p_value=math.nan,
            note="all values are tied within every row; the statistic is undefined",
            details=details,
            **base,
        )
    chi2 = 12.0 / (n * k * (k + 1.0)) * float(np.sum(rank_sums**2)) - 3.0 * n * (k + 1.0)
    chi2 = max(chi2 / correction, 0.0)
    return TestResult(
        statistic=chi2,
        p_value=float(stats.chi2.sf(chi2, k - 1)),
        effect_size=chi2 / (n * (k - 1.0)),
        details=details,
        **base,
    )


def holm_adjust(p_values: object) -> npt.NDArray[np.float64]:
    """Holm (1979) step-down adjusted p-values.

    Parameters
    ----------
    p_values : array-like of float
        Raw p-values in [0, 1]; NaN entries are kept as NaN and not counted in m.

    Returns
    -------
    numpy.ndarray
        Adjusted p-values in the input order: with p sorted ascending,
        p_adj(i) = max_{j <= i} min(1, (m - j + 1) p(j)).
    """
    p = _as_float_array(p_values, "p_values")
    finite = ~np.isnan(p)
    if np.any((p[finite] < 0) | (p[finite] > 1)):
        msg = f"p_values must lie in [0, 1], got {p[finite][(p[finite] < 0) | (p[finite] > 1)]}"
        raise ValueError(msg)
    adjusted = np.full(p.shape, np.nan)
    m = int(finite.sum())
    if m == 0:
        return adjusted
    valid = p[finite]
    order = np.argsort(valid, kind="stable")
    stepped = (m - np.arange(m)) * valid[order]
    stepped = np.minimum(np.maximum.accumulate(stepped), 1.0)
    result = np.empty(m)
    result[order] = stepped
    adjusted[finite] = result
    return adjusted


def _adjust(p_values: FloatArray, correction: Correction) -> FloatArray:
    if correction is Correction.HOLM:
        return holm_adjust(p_values)
    if correction is Correction.BONFERRONI:
        m = int((~np.isnan(p_values)).sum())
        return np.minimum(p_values * m, 1.0)
    return p_values.copy()


def _signed_rank(differences: FloatArray, confidence_level: float) -> dict[str, Any]:
    """Wilcoxon signed-rank test on the non-zero ``differences`` (zeros already removed)."""
    n = int(differences.shape[0])
    nan = math.nan
    if n == 0:
        return {
            "statistic": nan,
            "t_plus": nan,
            "t_minus": nan,
            "z": nan,
            "p_value": nan,
            "p_method": "none",
            "effect_size": nan,
            "effect_size_ci_low": nan,
            "effect_size_ci_high": nan,
            "note": "all paired differences are zero (or no pairs); test undefined",
        }
    magnitude = np.abs(differences)
    ranks = stats.rankdata(magnitude)
    t_plus = float(ranks[differences > 0].sum())
    t_minus = float(ranks[differences < 0].sum())
    total = n * (n + 1) / 2.0
    _, tie_counts = np.unique(magnitude, return_counts=True)
    tie_term = float(np.sum(tie_counts.astype(float) ** 3 - tie_counts))
    variance = n * (n + 1) * (2 * n + 1) / 24.0 - tie_term / 48.0
    z = (t_plus - total / 2.0) / math.sqrt(variance) if variance > 0 else nan
    if n <= _WILCOXON_EXACT_MAX_N and tie_term == 0:
        p_value = float(stats.wilcoxon(differences, method="exact").pvalue)
        p_method = "exact"
    else:
        p_value = float(2.0 * stats.norm.sf(abs(z))) if math.isfinite(z) else nan
        p_method = "normal approximation, tie-corrected, no continuity correction"
    effect = (t_plus - t_minus) / total
    # Null SE of the rank-biserial r on the Fisher-z scale, as R effectsize::rank_biserial.
    se = math.sqrt(n * (n + 1) * (2 * n + 1) / 6.0) / total
    ci_low, ci_high = _fisher_ci(effect, se, confidence_level)
    return {
        "statistic": min(t_plus, t_minus),
        "t_plus": t_plus,
        "t_minus": t_minus,
        "z": z,
        "p_value": p_value,
        "p_method": p_method,
        "effect_size": effect,
        "effect_size_ci_low": ci_low,
        "effect_size_ci_high": ci_high,
        "note": None,
    }


def pairwise_wilcoxon(
    wide: pd.DataFrame,
    reference_column: Hashable | None = None,
    correction: str | Correction = Correction.HOLM,
    confidence_level: float = 0.95,
) -> list[PairResult]:
    """Wilcoxon signed-rank tests between conditions, with a multiplicity correction.

    Parameters
    ----------
    wide : pandas.DataFrame
        Rows = subjects, columns = conditions; NaN = missing. Each pair uses the rows
        complete for its two columns.
    reference_column : hashable or None
        Compare this column with every other column (difference = other - reference).
        ``None``: all pairs of columns in column order (difference = later - earlier).
    correction : {"holm", "bonferroni", "none"}
        Adjustment of the family of p-values (``p_adjusted``); "holm" by default.
    confidence_level : float
        Level of the effect-size confidence intervals.

    Returns
    -------
    list of PairResult
        In column order.

    Notes
    -----
    Zero differences are discarded (Wilcoxon's convention). The p-value is exact
    (``scipy.stats.wilcoxon(method="exact")``) for at most 50 non-zero differences
    without tied magnitudes, otherwise from the tie-corrected normal approximation
    without continuity correction. The effect size is the matched-pairs rank-biserial
    correlation r = (T+ - T-) / (T+ + T-) (Kerby 2014), positive when b > a; its CI
    uses Fisher's z with the null SE sqrt(n(n+1)(2n+1)/6) / (n(n+1)/2), as R's
    effectsize package.
    """
    level = _check_confidence_level(confidence_level)
    method = _as_correction(correction)
    values = _wide_to_array(wide)
    columns = list(wide.columns)
    if reference_column is None:
        pairs = [(i, j) for i in range(len(columns)) for j in range(i + 1, len(columns))]
    else:
        if reference_column not in columns:
            msg = f"reference_column {reference_column!r} is not a column of wide {columns!r}"
            raise ValueError(msg)
        ref = columns.index(reference_column)
        pairs = [(ref, j) for j in range(len(columns)) if j != ref]
    raw: list[dict[str, Any]] = []
    for i, j in pairs:
        a = values[:, i]
        b = values[:, j]
        both = ~(np.isnan(a) | np.isnan(b))
        a_used = a[both]
        b_used = b[both]
        differences = b_used - a_used
        nonzero = differences[differences != 0]
        n = int(both.sum())
        result = _signed_rank(nonzero, level)
        result.update(
            condition_a=_label(columns[i]),
            condition_b=_label(columns[j]),
            n=n,
            n_dropped=int(values.shape[0] - n),
            n_nonzero=int(nonzero.shape[0]),
            median_a=float(np.median(a_used)) if n else math.nan,
            median_b=float(np.median(b_used)) if n else math.nan,
            median_difference=float(np.median(differences)) if n else math.nan,
        )
        raw.append(result)
    adjusted = _adjust(np.array([r["p_value"] for r in raw], dtype=float), method)
    return [
        PairResult(**r, p_adjusted=float(p_adj), correction=method.value, confidence_level=level)
        for r, p_adj in zip(raw, adjusted, strict=True)
    ]


def _as_correction(correction: str | Correction) -> Correction:
    try:
        return Correction(correction)
    except ValueError:
        choices = ", ".join(c.value for c in Correction)
        msg = f"correction must be one of {choices}; got {correction!r}"
        raise ValueError(msg) from None


# --------------------------------------------------------------------------------------
# Stuart-Maxwell marginal homogeneity
# --------------------------------------------------------------------------------------


def stuart_maxwell(before: object, after: object, categories: Iterable[float]) -> TestResult:
    """Stuart-Maxwell test of marginal homogeneity for paired ordinal categories.

    Parameters
    ----------
    before, after : array-like of numbers
        Category codes per subject (e.g. analgesic class 0-3 at month 0 and at month
        k); NaN = missing. Only pairs with both present are used.
    categories : iterable of numbers
        All possible codes (e.g. ``[0, 1, 2, 3]``); a value outside it is an error.

    Returns
    -------
    TestResult
        See :func:`stuart_maxwell_from_table`.
    """
    first = _as_float_array(before, "before")
    second = _as_float_array(after, "after")
    _check_equal_length(first, second, "before", "after")
    codes = _as_float_array(list(categories), "categories")
    if codes.shape[0] < 2 or np.isnan(codes).any() or np.unique(codes).shape[0] != codes.shape[0]:
        msg = f"categories must hold at least 2 distinct numbers, got {codes.tolist()!r}"
        raise ValueError(msg)
    both = ~(np.isnan(first) | np.isnan(second))
    first = first[both]
    second = second[both]
    order = np.argsort(codes)
    sorted_codes = codes[order]
    k = codes.shape[0]

    def to_index(values: FloatArray, name: str) -> npt.NDArray[np.intp]:
        position = np.clip(np.searchsorted(sorted_codes, values), 0, k - 1)
        unknown = sorted_codes[position] != values
        if unknown.any():
            msg = (
                f"{name} holds values {np.unique(values[unknown]).tolist()!r} that are not "
                f"in categories {codes.tolist()!r}"
            )
            raise ValueError(msg)
        return order[position]

    rows = to_index(first, "before")
    cols = to_index(second, "after")
    table = np.bincount(rows * k + cols, minlength=k * k).reshape(k, k)
    labels: list[float | int] = [int(c) if float(c).is_integer() else float(c) for c in codes]
    result = stuart_maxwell_from_table(table, labels)
    return dataclasses.replace(result, n_dropped=int((~both).sum()))


def stuart_maxwell_from_table(
    table: npt.ArrayLike, categories: Sequence[Hashable] | None = None
) -> TestResult:
    """Stuart-Maxwell test on a k x k table of paired counts (rows = before).

    Parameters
    ----------
    table : array-like, shape (k, k)
        Non-negative counts; ``table[i, j]`` = pairs in category i before, j after.
    categories : sequence or None
        Labels of the k categories (default 0..k-1).

    Returns
    -------
    TestResult
        ``statistic`` = d' S^-1 d with d the differences of the margins and S its
        covariance (S_ii = n_i. + n_.i - 2 n_ii, S_ij = -(n_ij + n_ji)); ``df = k - 1``.
        ``details``: ``categories_used``, ``categories_dropped``, ``table``,
        ``before_counts``, ``after_counts``.

    Notes
    -----
    Categories absent from both margins are dropped first (k = categories left).
    If S is still singular (a category seen only on the diagonal, or categories that
    never exchange subjects), the Moore-Penrose pseudo-inverse is used with df =
    rank(S): the sum of independent Stuart-Maxwell statistics over the blocks of
    categories that exchange subjects. ``note`` says so. No discordant pairs at all
    give statistic 0, df 0 and p NaN.
    """
    counts = np.asarray(table, dtype=float)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        msg = f"table must be a square k x k array, got shape {counts.shape}"
        raise ValueError(msg)
    if np.any(~np.isfinite(counts)) or np.any(counts < 0):
        msg = "table must hold finite, non-negative counts"
        raise ValueError(msg)
    k_all = counts.shape[0]
    labels = list(range(k_all)) if categories is None else [_label(c) for c in categories]
    if len(labels) != k_all:
        msg = f"categories has {len(labels)} labels but table is {k_all} x {k_all}"
        raise ValueError(msg)
    row_totals = counts.sum(axis=1)
    col_totals = counts.sum(axis=0)
    present = (row_totals + col_totals) > 0
    used = counts[np.ix_(present, present)]
    k = int(present.sum())
    details: dict[str, Any] = {
        "categories_used": [lab for lab, keep in zip(labels, present, strict=True) if keep],
        "categories_dropped": [lab for lab, keep in zip(labels, present, strict=True) if not keep],
        "table": counts.astype(int).tolist() if np.all(counts == np.round(counts)) else counts,
        "before_counts": row_totals.tolist(),
        "after_counts": col_totals.tolist(),
    }
    base: dict[str, Any] = {
        "test": "stuart_maxwell",
        "statistic_name": "chi2",
        "n": round(float(counts.sum())),
        "n_dropped": 0,
        "details": details,
    }
    if k < 2:
        return TestResult(
            statistic=math.nan,
            df=math.nan,
            p_value=math.nan,
            note=f"{k} category observed; marginal homogeneity needs at least 2",
            **base,
        )
    rows = used.sum(axis=1)
    cols = used.sum(axis=0)
    d = rows - cols
    covariance = -(used + used.T)
    np.fill_diagonal(covariance, rows + cols - 2.0 * np.diag(used))
    rank = int(np.linalg.matrix_rank(covariance))
    if rank == 0:
        return TestResult(
            statistic=0.0,
            df=0.0,
            p_value=math.nan,
            note="no discordant pairs: the margins are identical; p undefined",
            method="none",
            **base,
        )
    if rank == k - 1:
        # Standard form: drop the last category (S is then invertible).
        statistic = float(d[:-1] @ np.linalg.solve(covariance[:-1, :-1], d[:-1]))
        note = None
        method = "inverse"
    else:
        statistic = float(d @ np.linalg.pinv(covariance) @ d)
        note = (
            f"covariance of the margin differences is singular (rank {rank} < {k - 1}); "
            f"Moore-Penrose pseudo-inverse used with df = {rank}"
        )
        method = "pseudo-inverse"
    return TestResult(
        statistic=statistic,
        df=float(rank),
        p_value=float(stats.chi2.sf(statistic, rank)),
        note=note,
        method=method,
        **base,
    )


# --------------------------------------------------------------------------------------
# Correlations
# --------------------------------------------------------------------------------------


def spearman_correlation(x: object, y: object, confidence_level: float = 0.95) -> Correlation:
    """Spearman rank correlation on pairwise complete observations.

    Parameters
    ----------
    x, y : array-like of float
        Paired values (NaN = missing); pairs with either missing are dropped.
    confidence_level : float
        Level of the confidence interval.

    Returns
    -------
    Correlation
        rho = Pearson correlation of average ranks; p from t = rho sqrt((n-2)/(1-rho^2))
        with n - 2 df (as ``scipy.stats.spearmanr``); CI by Fisher's z with the
        Bonett-Wright (2000) SE sqrt((1 + rho^2/2) / (n - 3)). n < 3 or a constant
        variable give NaN; n = 3 gives no CI.
    """
    level = _check_confidence_level(confidence_level)
    xs = _as_float_array(x, "x")
    ys = _as_float_array(y, "y")
    _check_equal_length(xs, ys, "x", "y")
    both = ~(np.isnan(xs) | np.isnan(ys))
    n = int(both.sum())
    base: dict[str, Any] = {
        "method": "spearman",
        "confidence_level": level,
        "ci_method": "Fisher z, Bonett-Wright SE sqrt((1 + rho^2/2) / (n - 3))",
        "n": n,
        "n_dropped": int(xs.shape[0] - n),
        "df": float(n - 2) if n >= 3 else math.nan,
    }
    nan = math.nan
    if n < 3:
        return Correlation(
            r=nan, p_value=nan, ci_low=nan, ci_high=nan,
            note=f"n = {n} complete pairs; Spearman needs at least 3", **base,
        )  # fmt: skip
    rank_x = stats.rankdata(xs[both])
    rank_y = stats.rankdata(ys[both])
    rank_x -= rank_x.mean()
    rank_y -= rank_y.mean()
    denominator = math.sqrt(float(rank_x @ rank_x) * float(rank_y @ rank_y))
    if denominator == 0:
        return Correlation(
            r=nan, p_value=nan, ci_low=nan, ci_high=nan,
            note="x or y is constant; correlation undefined", **base,
        )  # fmt: skip
    rho = float(np.clip(float(rank_x @ rank_y) / denominator, -1.0, 1.0))
    p_value = _t_test_correlation(rho, n - 2)
    if n > 3:
        ci_low, ci_high = _fisher_ci(rho, math.sqrt((1.0 + rho * rho / 2.0) / (n - 3)), level)
        note = None
    else:
        ci_low, ci_high, note = nan, nan, "n = 3: confidence interval needs n >= 4"
    return Correlation(r=rho, p_value=p_value, ci_low=ci_low, ci_high=ci_high, note=note, **base)


def repeated_measures_correlation(
    data: pd.DataFrame,
    subject: str,
    x: str,
    y: str,
    confidence_level: float = 0.95,
) -> Correlation:
    """Repeated-measures correlation (rmcorr, Bakdash & Marusich 2017).

    Parameters
    ----------
    data : pandas.DataFrame
        Long table, one row per observation.
    subject, x, y : str
        Column names: subject identifier and the two numeric variables.
    confidence_level : float
        Level of the confidence interval.

    Returns
    -------
    Correlation
        ``r`` = sum(xc yc) / sqrt(sum(xc^2) sum(yc^2)) with x, y centred on each
        subject's mean (identical to the ANCOVA form
        sign(b) sqrt(SS_x / (SS_x + SS_resid)) of ``y ~ C(subject) + x``);
        ``df = N - k - 1`` (N observations, k subjects); p from t with df; CI by
        Fisher's z with SE 1 / sqrt(df - 1), as ``pingouin.rm_corr``. ``n`` = N used,
        ``n_subjects`` = k.

    Notes
    -----
    Rows with x, y or subject missing are dropped, then subjects with fewer than 2
    complete rows (they carry no within-subject information). Vectorised with
    ``pandas.factorize`` and ``numpy.bincount``: no per-subject loop, no dummy columns.
    """
    level = _check_confidence_level(confidence_level)
    if not isinstance(data, pd.DataFrame):
        msg = "data must be a pandas DataFrame in long format (one row per observation)"
        raise ValueError(msg)
    for role, column in (("subject", subject), ("x", x), ("y", y)):
        if column not in data.columns:
            msg = f"{role} column {column!r} is not in data (columns: {list(data.columns)!r})"
            raise ValueError(msg)
    if len({subject, x, y}) != 3:
        msg = f"subject, x and y must be three different columns, got {subject!r}, {x!r}, {y!r}"
        raise ValueError(msg)
    xs = _as_float_array(data[x], f"data[{x!r}]")
    ys = _as_float_array(data[y], f"data[{y!r}]")
    subject_codes, _ = pd.factorize(data[subject], use_na_sentinel=True)
    complete = ~(np.isnan(xs) | np.isnan(ys)) & (subject_codes >= 0)
    codes = subject_codes[complete]
    rows_per_subject = np.bincount(codes) if codes.size else np.zeros(0, dtype=np.intp)
    keep_subject = rows_per_subject >= 2
    keep = keep_subject[codes]
    codes = codes[keep]
    xs = xs[complete][keep]
    ys = ys[complete][keep]
    n = int(codes.shape[0])
    k = int(keep_subject.sum())
    df = n - k - 1
    base: dict[str, Any] = {
        "method": "repeated_measures",
        "confidence_level": level,
        "ci_method": "Fisher z, SE 1 / sqrt(df - 1) (as pingouin.rm_corr)",
        "n": n,
        "n_dropped": int(data.shape[0] - n),
        "df": float(df),
        "n_subjects": k,
    }
    nan = math.nan
    if df < 1:
        return Correlation(
            r=nan, p_value=nan, ci_low=nan, ci_high=nan,
            note=f"df = {df} (N = {n}, {k} subjects with >= 2 rows); rmcorr needs df >= 1",
            **base,
        )  # fmt: skip
    size = np.bincount(codes).astype(float)
    x_centred = xs - (np.bincount(codes, weights=xs) / np.where(size > 0, size, 1.0))[codes]
    y_centred = ys - (np.bincount(codes, weights=ys) / np.where(size > 0, size, 1.0))[codes]
    ss_x = float(x_centred @ x_centred)
    ss_y = float(y_centred @ y_centred)
    if ss_x == 0 or ss_y == 0:
        return Correlation(
            r=nan, p_value=nan, ci_low=nan, ci_high=nan,
            note="x or y does not vary within subjects; correlation undefined", **base,
        )  # fmt: skip
    r = float(np.clip(float(x_centred @ y_centred) / math.sqrt(ss_x * ss_y), -1.0, 1.0))
    if df > 1:
        ci_low, ci_high = _fisher_ci(r, 1.0 / math.sqrt(df - 1.0), level)
        note = None
    else:
        ci_low, ci_high, note = nan, nan, "df = 1: confidence interval needs df >= 2"
    return Correlation(
        r=r,
        p_value=_t_test_correlation(r, df),
        ci_low=ci_low,
        ci_high=ci_high,
        note=note,
        **base,
    )


# --------------------------------------------------------------------------------------
# Mann-Whitney and the Hodges-Lehmann shift
# --------------------------------------------------------------------------------------


def _first_at_most(
    x_sorted: FloatArray, y_sorted: FloatArray, threshold: float
) -> npt.NDArray[np.int64]:
    """Per row i, the smallest column j with x[i] - y[j] <= threshold (n_y if none).

    x - y[j] is non-increasing in j for ascending y (floating subtraction is
    monotone), so a vectorised bisection over all rows at once is exact with respect
    to the computed differences.
    """
    n_y = y_sorted.shape[0]
    low = np.zeros(x_sorted.shape[0], dtype=np.int64)
    high = np.full(x_sorted.shape[0], n_y, dtype=np.int64)
    for _ in range(int(n_y).bit_length() + 1):
        active = low < high
        if not active.any():
            break
        middle = (low + high) // 2
        at_most = (x_sorted - y_sorted[np.minimum(middle, n_y - 1)]) <= threshold
        high = np.where(active & at_most, middle, high)
        low = np.where(active & ~at_most, middle + 1, low)
    return low


def _kth_pairwise_difference(
    x_sorted: FloatArray, y_sorted: FloatArray, k: int, max_enumerate: int = _HL_MAX_ENUMERATE
) -> float:
    """The k-th smallest (1-based) of all x[i] - y[j], without forming all of them.

    Randomised selection (fixed seed; the result is exact whatever the pivots): keep
    the candidates in (low, high] as one column range per row, split on a random
    candidate, and once at most ``max_enumerate`` candidates remain, materialise them
    and use ``numpy.partition``. Each step costs O(n_x log n_y).
    """
    n_x, n_y = x_sorted.shape[0], y_sorted.shape[0]
    rng = np.random.default_rng(0)
    first_low = np.full(n_x, n_y, dtype=np.int64)  # first column <= low (-inf)
    first_high = np.zeros(n_x, dtype=np.int64)  # first column <= high (+inf)
    count_low = 0  # differences <= low
    while True:
        per_row = first_low - first_high
        cumulative = np.cumsum(per_row)
        total = int(cumulative[-1])
        if total <= max_enumerate:
            rows = np.repeat(np.arange(n_x), per_row)
            columns = np.repeat(first_high - (cumulative - per_row), per_row) + np.arange(total)
            candidates = x_sorted[rows] - y_sorted[columns]
            position = k - count_low - 1
            return float(np.partition(candidates, position)[position])
        pick = int(rng.integers(total))
        row = int(np.searchsorted(cumulative, pick, side="right"))
        column = int(first_high[row] + pick - (cumulative[row] - per_row[row]))
        pivot = float(x_sorted[row] - y_sorted[column])
        first_le = _first_at_most(x_sorted, y_sorted, pivot)
        count_le = int(n_x * n_y - first_le.sum())
        below = float(np.nextafter(pivot, -np.inf))
        first_lt = _first_at_most(x_sorted, y_sorted, below)
        count_lt = int(n_x * n_y - first_lt.sum())
        if count_lt < k <= count_le:
            return pivot
        if count_le < k:
            first_low, count_low = first_le, count_le
        else:
            first_high = first_lt


def _hodges_lehmann_shift(
    x: FloatArray, y: FloatArray, max_enumerate: int = _HL_MAX_ENUMERATE
) -> float:
    """Median of all pairwise differences x[i] - y[j] (exact, also for large samples)."""
    n_pairs = x.shape[0] * y.shape[0]
    if n_pairs == 0:
        return math.nan
    if n_pairs <= max_enumerate:
        return float(np.median(np.subtract.outer(x, y)))
    x_sorted = np.sort(x)
    y_sorted = np.sort(y)
    if n_pairs % 2:
        return _kth_pairwise_difference(x_sorted, y_sorted, (n_pairs + 1) // 2, max_enumerate)
    lower = _kth_pairwise_difference(x_sorted, y_sorted, n_pairs // 2, max_enumerate)
    upper = _kth_pairwise_difference(x_sorted, y_sorted, n_pairs // 2 + 1, max_enumerate)
    return (lower + upper) / 2.0


def mann_whitney(x: object, y: object, confidence_level: float = 0.95) -> TestResult:
    """Two-sided Mann-Whitney U test with rank-biserial correlation and Hodges-Lehmann shift.

    Parameters
    ----------
    x, y : array-like of float
        Two independent samples (any lengths); NaN values are dropped.
    confidence_level : float
        Level of the effect-size confidence interval.

    Returns
    -------
    TestResult
        ``statistic`` = U of x (pairs with x > y, ties counting 1/2), p from
        ``scipy.stats.mannwhitneyu(method="auto")`` (exact for small samples without
        ties, else normal approximation with tie and continuity correction).
        ``effect_size`` = rank-biserial correlation 2 U / (n_x n_y) - 1 (= Cliff's
        delta; positive when x tends to be larger), CI by Fisher's z with the null SE
        sqrt((n_x + n_y + 1) / (3 n_x n_y)) as R's effectsize package. ``details``:
        ``n_x``, ``n_y``, ``median_x``, ``median_y``, ``u_y``,
        ``hodges_lehmann_shift`` (median of all x_i - y_j, computed exactly: directly
        up to 10^6 pairs, above by an O(n log n)-per-step selection algorithm).
    """
    level = _check_confidence_level(confidence_level)
    xs = _as_float_array(x, "x")
    ys = _as_float_array(y, "y")
    x_used = xs[~np.isnan(xs)]
    y_used = ys[~np.isnan(ys)]
    n_x, n_y = int(x_used.shape[0]), int(y_used.shape[0])
    nan = math.nan
    details: dict[str, Any] = {
        "n_x": n_x,
        "n_y": n_y,
        "median_x": float(np.median(x_used)) if n_x else nan,
        "median_y": float(np.median(y_used)) if n_y else nan,
    }
    base: dict[str, Any] = {
        "test": "mann_whitney",
        "statistic_name": "U",
        "df": nan,
        "n": n_x + n_y,
        "n_dropped": int(xs.shape[0] + ys.shape[0] - n_x - n_y),
        "effect_size_name": "rank_biserial",
        "confidence_level": level,
        "parameters": {"alternative": "two-sided"},
    }
    if n_x == 0 or n_y == 0:
        return TestResult(
            statistic=nan,
            p_value=nan,
            note=f"n_x = {n_x}, n_y = {n_y}: both groups need at least one value",
            details={**details, "u_y": nan, "hodges_lehmann_shift": nan},
            **base,
        )
    result = stats.mannwhitneyu(x_used, y_used, alternative="two-sided", method="auto")
    u_x = float(result.statistic)
    effect = 2.0 * u_x / (n_x * n_y) - 1.0
    se = math.sqrt((n_x + n_y + 1.0) / (3.0 * n_x * n_y))
    ci_low, ci_high = _fisher_ci(effect, se, level)
    details["u_y"] = n_x * n_y - u_x
    details["hodges_lehmann_shift"] = _hodges_lehmann_shift(x_used, y_used)
    return TestResult(
        statistic=u_x,
        p_value=float(result.pvalue),
        effect_size=effect,
        effect_size_ci_low=ci_low,
        effect_size_ci_high=ci_high,
        method="scipy.stats.mannwhitneyu, method='auto'",
        details=details,
        **base,
    )
