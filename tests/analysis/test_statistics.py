"""Tests of bmetrack.analysis.statistics against hand formulas and published values.

Each test checks the module against something computed independently: a formula
written out here, a textbook or published result, and only secondarily scipy,
statsmodels or pingouin.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bmetrack.analysis.statistics import (
    Correction,
    _hodges_lehmann_shift,
    _kth_pairwise_difference,
    friedman_test,
    holm_adjust,
    mann_whitney,
    median_iqr,
    pairwise_wilcoxon,
    repeated_measures_correlation,
    responder_rate,
    spearman_correlation,
    stuart_maxwell,
    stuart_maxwell_from_table,
    wilson_interval,
)


def assert_json_safe(result: object) -> dict:
    """to_dict() must survive strict JSON (no NaN, no numpy types)."""
    as_dict = result.to_dict()  # type: ignore[attr-defined]
    text = json.dumps(as_dict, allow_nan=False)
    assert json.loads(text) == as_dict
    return as_dict


def z_of(level: float) -> float:
    return float(stats.norm.ppf(0.5 + level / 2))


# --------------------------------------------------------------------------------------
# Wilson interval
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [
        # Newcombe (1998) Stat Med 17:857, Table II, method 3 (Wilson score).
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0000, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_matches_newcombe_1998(successes: int, n: int, low: float, high: float) -> None:
    result = wilson_interval(successes, n)
    assert result.ci_low == pytest.approx(low, abs=6e-5)
    assert result.ci_high == pytest.approx(high, abs=6e-5)
    assert result.proportion == pytest.approx(successes / n)
    assert result.percent == pytest.approx(100 * successes / n)
    assert result.method == "wilson"


def test_wilson_hand_formula_and_statsmodels_at_90_percent() -> None:
    from statsmodels.stats.proportion import proportion_confint

    s, n, level = 29, 89, 0.90
    z = z_of(level)
    p = s / n
    centre = (s + z**2 / 2) / (n + z**2)
    half = z * math.sqrt(n) / (n + z**2) * math.sqrt(p * (1 - p) + z**2 / (4 * n))
    result = wilson_interval(s, n, confidence_level=level)
    assert result.ci_low == pytest.approx(centre - half, rel=1e-12)
    assert result.ci_high == pytest.approx(centre + half, rel=1e-12)
    low, high = proportion_confint(s, n, alpha=1 - level, method="wilson")
    assert (result.ci_low, result.ci_high) == pytest.approx((low, high), rel=1e-10)
    assert result.confidence_level == level


def test_wilson_all_successes_and_zero_n() -> None:
    full = wilson_interval(np.int64(12), 12)
    assert full.ci_high == 1.0
    assert full.ci_low < 1.0
    empty = wilson_interval(0, 0)
    assert math.isnan(empty.proportion)
    assert empty.note
    as_dict = assert_json_safe(empty)
    assert as_dict["proportion"] is None
    assert as_dict["n"] == 0


@pytest.mark.parametrize(
    ("successes", "n", "level"),
    [
        (5, 4, 0.95),
        (-1, 4, 0.95),
        (1.5, 4, 0.95),
        (1, 4, 1.0),
        (1, 4, 0.0),
        (1, 4, "x"),
        (1, True, 0.95),
    ],
)
def test_wilson_rejects_bad_input(successes: object, n: object, level: object) -> None:
    with pytest.raises(ValueError, match=r"successes|n must|confidence_level"):
        wilson_interval(successes, n, level)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# Friedman
# --------------------------------------------------------------------------------------

# Hollander & Wolfe (1973), p. 140ff: rounding first base, 22 players x 3 methods; the
# example of R's friedman.test: "Friedman chi-squared = 11.143, df = 2, p-value = 0.003805".
ROUNDING_TIMES = [
    (5.40, 5.50, 5.55), (5.85, 5.70, 5.75), (5.20, 5.60, 5.50), (5.55, 5.50, 5.40),
    (5.90, 5.85, 5.70), (5.45, 5.55, 5.60), (5.40, 5.40, 5.35), (5.45, 5.50, 5.35),
    (5.25, 5.15, 5.00), (5.85, 5.80, 5.70), (5.25, 5.20, 5.10), (5.65, 5.55, 5.45),
    (5.60, 5.35, 5.45), (5.05, 5.00, 4.95), (5.50, 5.50, 5.40), (5.45, 5.55, 5.50),
    (5.55, 5.55, 5.35), (5.45, 5.50, 5.55), (5.50, 5.45, 5.25), (5.65, 5.60, 5.40),
    (5.70, 5.65, 5.55), (6.30, 6.30, 6.25),
]  # fmt: skip


def hand_ranks(row: list[float]) -> list[float]:
    """Average ranks (1-based) of one row, ties sharing the mean of their positions."""
    ranks = []
    for value in row:
        below = sum(v < value for v in row)
        equal = sum(v == value for v in row)
        ranks.append(below + (equal + 1) / 2)
    return ranks


def hand_friedman(rows: list[list[float]]) -> tuple[float, float]:
    """Friedman chi-square with tie correction and Kendall's W, written out."""
    n, k = len(rows), len(rows[0])
    rank_rows = [hand_ranks(r) for r in rows]
    rank_sums = [sum(r[j] for r in rank_rows) for j in range(k)]
    chi2 = 12 / (n * k * (k + 1)) * sum(R**2 for R in rank_sums) - 3 * n * (k + 1)
    ties = 0.0
    for row in rows:
        for value in set(row):
            t = row.count(value)
            ties += t**3 - t
    chi2 /= 1 - ties / (n * k * (k**2 - 1))
    return chi2, chi2 / (n * (k - 1))


def test_friedman_rounding_times_published() -> None:
    wide = pd.DataFrame(ROUNDING_TIMES, columns=["round_out", "narrow", "wide"])
    result = friedman_test(wide)
    assert result.statistic == pytest.approx(11.143, abs=5e-4)
    assert result.p_value == pytest.approx(0.003805, abs=5e-7)
    assert result.df == 2
    assert result.n == 22
    assert result.details["n_complete"] == 22
    chi2, w = hand_friedman([list(r) for r in ROUNDING_TIMES])
    assert result.statistic == pytest.approx(chi2, rel=1e-12)
    assert result.effect_size == pytest.approx(w, rel=1e-12)
    assert result.effect_size_name == "kendall_w"


def test_friedman_hand_formula_with_ties_and_missing_rows() -> None:
    rows = [
        [7.0, 3.0, 2.0, 2.0],
        [8.0, 4.0, 4.0, 1.0],
        [6.0, 6.0, 3.0, 0.0],
        [9.0, 2.0, 1.0, 1.0],
        [5.0, 5.0, 5.0, 5.0],
        [4.0, 7.0, 2.0, 3.0],
    ]
    extra = [[np.nan, 3.0, 2.0, 1.0], [9.0, np.nan, np.nan, 1.0]]
    wide = pd.DataFrame(rows + extra, columns=[0, 3, 6, 12])
    result = friedman_test(wide)
    chi2, w = hand_friedman(rows)
    assert result.statistic == pytest.approx(chi2, rel=1e-12)
    assert result.effect_size == pytest.approx(w, rel=1e-12)
    assert result.p_value == pytest.approx(stats.chi2.sf(chi2, 3), rel=1e-12)
    assert (result.n, result.n_dropped) == (6, 2)
    assert result.details["conditions"] == [0, 3, 6, 12]
    secondary = stats.friedmanchisquare(*np.array(rows).T)
    assert result.statistic == pytest.approx(secondary.statistic, rel=1e-10)
    assert_json_safe(result)


def test_friedman_two_conditions_and_pingouin_w() -> None:
    import pingouin as pg

    rows = [[3.0, 1.0], [4.0, 2.0], [2.0, 2.0], [5.0, 1.0], [1.0, 3.0]]
    result = friedman_test(pd.DataFrame(rows, columns=["a", "b"]))
    chi2, w = hand_friedman(rows)
    assert result.statistic == pytest.approx(chi2, rel=1e-12)
    assert result.effect_size == pytest.approx(w, rel=1e-12)
    assert result.df == 1
    long = pd.DataFrame(
        [
            (i, c, v)
            for i, row in enumerate(ROUNDING_TIMES)
            for c, v in zip("abc", row, strict=True)
        ],
        columns=["id", "cond", "value"],
    )
    aov = pg.friedman(data=long, dv="value", within="cond", subject="id")
    wide = pd.DataFrame(ROUNDING_TIMES, columns=list("abc"))
    assert friedman_test(wide).effect_size == pytest.approx(float(aov["W"].iloc[0]), rel=1e-6)


def test_friedman_too_few_rows_and_all_ties() -> None:
    one = friedman_test(pd.DataFrame({"a": [1.0, np.nan], "b": [2.0, 3.0], "c": [3.0, 1.0]}))
    assert math.isnan(one.statistic)
    assert (one.n, one.n_dropped) == (1, 1)
    assert "at least 2" in (one.note or "")
    assert assert_json_safe(one)["statistic"] is None
    tied = friedman_test(pd.DataFrame({"a": [1.0, 2.0], "b": [1.0, 2.0]}))
    assert math.isnan(tied.statistic)
    assert tied.note


def test_friedman_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="DataFrame"):
        friedman_test(np.ones((3, 3)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 2"):
        friedman_test(pd.DataFrame({"a": [1.0, 2.0]}))
    with pytest.raises(ValueError, match="not numeric"):
        friedman_test(pd.DataFrame({"a": [1.0, 2.0], "b": ["x", "y"]}))
    with pytest.raises(ValueError, match="infinite"):
        friedman_test(pd.DataFrame({"a": [1.0, np.inf], "b": [1.0, 2.0]}))


# --------------------------------------------------------------------------------------
# Holm
# --------------------------------------------------------------------------------------


def test_holm_hand_worked_example() -> None:
    # Sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04 -> 0.06
    # (monotone step-down), reported in input order.
    adjusted = holm_adjust([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02], rtol=1e-12)
    np.testing.assert_allclose(holm_adjust([0.5, 0.6]), [1.0, 1.0])
    assert holm_adjust([]).shape == (0,)


def test_holm_ignores_nan_and_matches_statsmodels() -> None:
    from statsmodels.stats.multitest import multipletests

    adjusted = holm_adjust([0.02, np.nan, 0.01])
    assert math.isnan(adjusted[1])
    np.testing.assert_allclose(adjusted[[0, 2]], [0.02, 0.02])
    rng = np.random.default_rng(3)
    p = rng.uniform(0, 0.2, size=17)
    p[5] = p[9]  # a tie
    np.testing.assert_allclose(holm_adjust(p), multipletests(p, method="holm")[1], rtol=1e-12)


def test_holm_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm_adjust([0.1, 1.2])


# --------------------------------------------------------------------------------------
# Pairwise Wilcoxon
# --------------------------------------------------------------------------------------


def test_wilcoxon_pair_hand_exact_example() -> None:
    # Differences b - a = 1, -2, 3, 4, 0, 5: the zero is dropped, ranks 1..5,
    # T+ = 1 + 3 + 4 + 5 = 13, T- = 2. Exact two-sided p = 2 P(T+ <= 2) = 2 * 3/32
    # (sign subsets with rank sum <= 2: {}, {1}, {2}).
    a = [10.0, 10.0, 10.0, 10.0, 10.0, 10.0, np.nan]
    b = [11.0, 8.0, 13.0, 14.0, 10.0, 15.0, 3.0]
    (pair,) = pairwise_wilcoxon(pd.DataFrame({"m0": a, "m3": b}))
    assert (pair.condition_a, pair.condition_b) == ("m0", "m3")
    assert (pair.n, pair.n_dropped, pair.n_nonzero) == (6, 1, 5)
    assert (pair.t_plus, pair.t_minus, pair.statistic) == (13.0, 2.0, 2.0)
    assert pair.p_value == pytest.approx(6 / 32, rel=1e-12)
    assert pair.p_method == "exact"
    assert pair.effect_size == pytest.approx(11 / 15)
    assert pair.median_difference == pytest.approx(2.0)  # of -2, 0, 1, 3, 4, 5 (zero kept)
    assert pair.p_adjusted == pair.p_value  # one comparison: Holm changes nothing
    se = math.sqrt(5 * 6 * 11 / 6) / 15
    z = z_of(0.95)
    assert pair.effect_size_ci_low == pytest.approx(math.tanh(math.atanh(11 / 15) - z * se))
    assert pair.effect_size_ci_high == pytest.approx(math.tanh(math.atanh(11 / 15) + z * se))
    assert_json_safe(pair)


def test_wilcoxon_exact_p_by_enumeration() -> None:
    rng = np.random.default_rng(11)
    a = rng.normal(5, 2, size=12)
    b = a + rng.normal(0.8, 1.5, size=12)
    (pair,) = pairwise_wilcoxon(pd.DataFrame({"a": a, "b": b}))
    d = b - a
    ranks = stats.rankdata(np.abs(d))
    t_obs = ranks[d > 0].sum()
    centre = 12 * 13 / 4
    extreme = 0
    for signs in itertools.product((0, 1), repeat=12):
        t = sum(r for r, s in zip(ranks, signs, strict=True) if s)
        extreme += abs(t - centre) >= abs(t_obs - centre) - 1e-9
    assert pair.p_value == pytest.approx(extreme / 2**12, rel=1e-9)


def test_wilcoxon_normal_approximation_with_ties_hand_formula() -> None:
    rng = np.random.default_rng(5)
    a = rng.integers(3, 10, size=80).astype(float)
    b = np.clip(a - rng.integers(-2, 5, size=80), 0, 10).astype(float)
    (pair,) = pairwise_wilcoxon(pd.DataFrame({0: a, 3: b}))
    d = (b - a)[(b - a) != 0]
    n = d.size
    ranks = stats.rankdata(np.abs(d))
    t_plus = ranks[d > 0].sum()
    _, counts = np.unique(np.abs(d), return_counts=True)
    var = n * (n + 1) * (2 * n + 1) / 24 - np.sum(counts**3 - counts) / 48
    z = (t_plus - n * (n + 1) / 4) / math.sqrt(var)
    assert pair.z == pytest.approx(z, rel=1e-12)
    assert pair.p_value == pytest.approx(2 * stats.norm.sf(abs(z)), rel=1e-12)
    assert pair.p_method.startswith("normal approximation")
    secondary = stats.wilcoxon(d, method="asymptotic")
    assert pair.p_value == pytest.approx(secondary.pvalue, rel=1e-9)
    assert pair.effect_size == pytest.approx(
        (t_plus - (n * (n + 1) / 2 - t_plus)) / (n * (n + 1) / 2)
    )


def test_pairwise_wilcoxon_all_pairs_reference_and_holm() -> None:
    rng = np.random.default_rng(8)
    base = rng.uniform(5, 10, size=40)
    wide = pd.DataFrame(
        {0: base, 3: base - rng.uniform(0, 4, 40), 6: base - rng.uniform(0, 5, 40),
         12: base - rng.uniform(-1, 5, 40)}
    )  # fmt: skip
    wide.iloc[3, 2] = np.nan
    all_pairs = pairwise_wilcoxon(wide)
    assert [(p.condition_a, p.condition_b) for p in all_pairs] == list(
        itertools.combinations([0, 3, 6, 12], 2)
    )
    raw = np.array([p.p_value for p in all_pairs])
    np.testing.assert_allclose([p.p_adjusted for p in all_pairs], holm_adjust(raw))
    assert all(p.correction == "holm" for p in all_pairs)
    assert [p.n for p in all_pairs] == [40, 39, 40, 39, 40, 39]
    versus_0 = pairwise_wilcoxon(wide, reference_column=0, correction="none")
    assert [(p.condition_a, p.condition_b) for p in versus_0] == [(0, 3), (0, 6), (0, 12)]
    assert [p.p_adjusted for p in versus_0] == [p.p_value for p in versus_0]
    assert all(p.median_difference < 0 and p.effect_size < 0 for p in versus_0[:2])
    bonferroni = pairwise_wilcoxon(wide, reference_column=0, correction=Correction.BONFERRONI)
    np.testing.assert_allclose(
        [p.p_adjusted for p in bonferroni], np.minimum([3 * p.p_value for p in versus_0], 1)
    )


def test_pairwise_wilcoxon_all_zero_differences_and_bad_input() -> None:
    wide = pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": [1.0, 2.0, 3.0], "c": [2.0, 3.0, 5.0]})
    results = pairwise_wilcoxon(wide, reference_column="a")
    assert math.isnan(results[0].p_value)
    assert results[0].note
    assert results[1].p_adjusted == pytest.approx(results[1].p_value)  # NaN not counted in m
    assert assert_json_safe(results[0])["p_value"] is None
    with pytest.raises(ValueError, match="reference_column"):
        pairwise_wilcoxon(wide, reference_column="z")
    with pytest.raises(ValueError, match="correction"):
        pairwise_wilcoxon(wide, correction="fdr")
    with pytest.raises(ValueError, match="confidence_level"):
        pairwise_wilcoxon(wide, confidence_level=95)


# --------------------------------------------------------------------------------------
# Stuart-Maxwell
# --------------------------------------------------------------------------------------

# Stuart (1955): unaided distance vision, right eye (rows) x left eye, 7477 women;
# Stuart-Maxwell statistic 11.96 on 3 df (also in Agresti and Stata's `symmetry` manual).
VISION = np.array(
    [[1520, 266, 124, 66], [234, 1512, 432, 78], [117, 362, 1772, 205], [36, 82, 179, 492]]
)


def expand(table: np.ndarray, codes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Paired category arrays with the counts of ``table``."""
    rows, cols = np.indices(table.shape)
    before = np.repeat(np.array(codes)[rows.ravel()], table.ravel()).astype(float)
    after = np.repeat(np.array(codes)[cols.ravel()], table.ravel()).astype(float)
    return before, after


def fleiss_everitt_3x3(t: np.ndarray) -> float:
    """Closed form of the Stuart-Maxwell statistic for a 3 x 3 table (Fleiss & Everitt 1971)."""
    d = t.sum(axis=1) - t.sum(axis=0)
    n12, n13, n23 = ((t[i, j] + t[j, i]) / 2 for i, j in ((0, 1), (0, 2), (1, 2)))
    numerator = n23 * d[0] ** 2 + n13 * d[1] ** 2 + n12 * d[2] ** 2
    return numerator / (2 * (n12 * n23 + n12 * n13 + n13 * n23))


def test_stuart_maxwell_vision_published_and_statsmodels() -> None:
    from statsmodels.stats.contingency_tables import SquareTable

    result = stuart_maxwell_from_table(VISION)
    assert round(result.statistic, 2) == 11.96
    assert result.df == 3
    assert result.n == 7477
    reference = SquareTable(VISION, shift_zeros=False).homogeneity()
    assert result.statistic == pytest.approx(reference.statistic, rel=1e-10)
    assert result.p_value == pytest.approx(reference.pvalue, rel=1e-8)
    before, after = expand(VISION, [0, 1, 2, 3])
    from_arrays = stuart_maxwell(before, after, categories=[0, 1, 2, 3])
    assert from_arrays.statistic == pytest.approx(result.statistic, rel=1e-12)
    assert from_arrays.details["table"] == VISION.tolist()


def test_stuart_maxwell_3x3_hand_closed_form() -> None:
    from statsmodels.stats.contingency_tables import SquareTable

    table = np.array([[20, 10, 5], [3, 30, 15], [2, 5, 40]])
    before, after = expand(table, [0, 1, 2])
    before = np.append(before, [np.nan, 1.0])
    after = np.append(after, [2.0, np.nan])
    result = stuart_maxwell(before, after, [0, 1, 2])
    expected = fleiss_everitt_3x3(table)
    assert result.statistic == pytest.approx(expected, rel=1e-12)
    assert result.p_value == pytest.approx(stats.chi2.sf(expected, 2), rel=1e-12)
    assert (result.df, result.n, result.n_dropped) == (2, 130, 2)
    assert result.statistic == pytest.approx(SquareTable(table).homogeneity().statistic)
    assert result.note is None
    assert_json_safe(result)


def test_stuart_maxwell_drops_absent_category() -> None:
    table = np.array([[20, 10, 5], [3, 30, 15], [2, 5, 40]])
    before, after = expand(table, [0, 1, 3])  # analgesic class 2 never seen
    result = stuart_maxwell(before, after, categories=[0, 1, 2, 3])
    assert result.df == 2
    assert result.statistic == pytest.approx(fleiss_everitt_3x3(table), rel=1e-12)
    assert result.details["categories_dropped"] == [2]
    assert result.details["categories_used"] == [0, 1, 3]


def test_stuart_maxwell_singular_uses_pseudo_inverse() -> None:
    # Category 2 only on the diagonal: the statistic reduces to McNemar on 0/1,
    # (n01 - n10)^2 / (n01 + n10) = (3 - 1)^2 / 4 = 1, with df = rank = 1.
    result = stuart_maxwell_from_table([[5, 3, 0], [1, 4, 0], [0, 0, 6]])
    assert result.statistic == pytest.approx(1.0)
    assert result.df == 1
    assert result.method == "pseudo-inverse"
    assert "pseudo-inverse" in (result.note or "")
    # Two blocks that never exchange subjects: sum of two McNemar statistics, df 2.
    blocks = np.array([[5, 6, 0, 0], [2, 4, 0, 0], [0, 0, 3, 1], [0, 0, 7, 2]])
    expected = (6 - 2) ** 2 / 8 + (1 - 7) ** 2 / 8
    two = stuart_maxwell_from_table(blocks)
    assert two.statistic == pytest.approx(expected)
    assert two.df == 2
    none = stuart_maxwell_from_table(np.diag([4, 5, 6]))
    assert (none.statistic, none.df) == (0.0, 0.0)
    assert math.isnan(none.p_value)
    single = stuart_maxwell([1.0, 1.0], [1.0, 1.0], [0, 1, 2, 3])
    assert math.isnan(single.statistic)
    assert single.note


def test_stuart_maxwell_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="not in categories"):
        stuart_maxwell([0, 1, 4], [0, 1, 1], [0, 1, 2, 3])
    with pytest.raises(ValueError, match="equal lengths"):
        stuart_maxwell([0, 1], [0, 1, 1], [0, 1, 2, 3])
    with pytest.raises(ValueError, match="distinct"):
        stuart_maxwell([0, 1], [0, 1], [1, 1])
    with pytest.raises(ValueError, match="square"):
        stuart_maxwell_from_table([[1, 2, 3]])


# --------------------------------------------------------------------------------------
# Spearman
# --------------------------------------------------------------------------------------


def test_spearman_no_ties_classic_formula() -> None:
    x = [86, 97, 99, 100, 101, 103, 106, 110, 112, 113]
    y = [2, 20, 28, 27, 50, 29, 7, 17, 6, 12]
    # Ranks written out; rho = 1 - 6 sum d^2 / (n (n^2 - 1)).
    rank_x = list(range(1, 11))
    rank_y = [1, 6, 8, 7, 10, 9, 3, 5, 2, 4]
    n = 10
    rho = 1 - 6 * sum((a - b) ** 2 for a, b in zip(rank_x, rank_y, strict=True)) / (n * (n**2 - 1))
    result = spearman_correlation(x, y)
    assert rho == pytest.approx(-29 / 165)
    assert result.r == pytest.approx(rho, rel=1e-12)
    t = rho * math.sqrt((n - 2) / (1 - rho**2))
    assert result.p_value == pytest.approx(2 * stats.t.sf(abs(t), n - 2), rel=1e-12)
    assert result.p_value == pytest.approx(stats.spearmanr(x, y).pvalue, rel=1e-10)
    se = math.sqrt((1 + rho**2 / 2) / (n - 3))
    z = z_of(0.95)
    assert result.ci_low == pytest.approx(math.tanh(math.atanh(rho) - z * se), rel=1e-12)
    assert result.ci_high == pytest.approx(math.tanh(math.atanh(rho) + z * se), rel=1e-12)
    assert (result.n, result.df, result.method) == (10, 8, "spearman")


def test_spearman_ties_and_missing_pairs() -> None:
    x = np.array([1.0, 2.0, 2.0, 3.0, 5.0, np.nan, 4.0, 4.0, 6.0, 7.0])
    y = np.array([10.0, 30.0, 20.0, 20.0, 50.0, 1.0, np.nan, 40.0, 40.0, 45.0])
    keep = ~(np.isnan(x) | np.isnan(y))
    rx = stats.rankdata(x[keep])
    ry = stats.rankdata(y[keep])
    pearson = np.sum((rx - rx.mean()) * (ry - ry.mean())) / math.sqrt(
        np.sum((rx - rx.mean()) ** 2) * np.sum((ry - ry.mean()) ** 2)
    )
    result = spearman_correlation(pd.Series(x), y, confidence_level=0.9)
    assert result.r == pytest.approx(pearson, rel=1e-12)
    assert (result.n, result.n_dropped) == (8, 2)
    assert result.p_value == pytest.approx(stats.spearmanr(x[keep], y[keep]).pvalue, rel=1e-10)
    assert result.confidence_level == 0.9


def test_spearman_small_n_and_constant() -> None:
    two = spearman_correlation([1.0, 2.0, np.nan], [3.0, 1.0, 2.0])
    assert math.isnan(two.r)
    assert two.note
    assert assert_json_safe(two)["r"] is None
    three = spearman_correlation([1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert three.r == pytest.approx(0.5)
    assert math.isnan(three.ci_low)
    constant = spearman_correlation([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0])
    assert math.isnan(constant.r)
    assert "constant" in (constant.note or "")


def test_spearman_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="equal lengths"):
        spearman_correlation([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="numeric"):
        spearman_correlation(["a", "b", "c"], [1, 2, 3])
    with pytest.raises(ValueError, match="confidence_level"):
        spearman_correlation([1, 2, 3, 4], [1, 2, 3, 4], confidence_level=1.5)
    with pytest.raises(ValueError, match="one-dimensional"):
        spearman_correlation(np.ones((2, 2)), np.ones((2, 2)))


# --------------------------------------------------------------------------------------
# Mann-Whitney and Hodges-Lehmann
# --------------------------------------------------------------------------------------


def test_mann_whitney_hand_counts() -> None:
    x = [3.0, 5.0, 5.0, 8.0, 9.0, 12.0, np.nan]
    y = [1.0, 2.0, 5.0, 4.0, 6.0]
    xs = [v for v in x if not math.isnan(v)]
    u = sum((a > b) + 0.5 * (a == b) for a in xs for b in y)
    diffs = sorted(a - b for a in xs for b in y)
    hl = (diffs[14] + diffs[15]) / 2  # 30 differences: mean of the 15th and 16th
    result = mann_whitney(x, y)
    assert result.statistic == u
    assert result.effect_size == pytest.approx(2 * u / 30 - 1)
    assert result.details["hodges_lehmann_shift"] == pytest.approx(hl)
    assert result.details["median_x"] == pytest.approx(6.5)
    assert result.details["median_y"] == pytest.approx(4.0)
    assert result.details["u_y"] == 30 - u
    assert (result.n, result.n_dropped) == (11, 1)
    se = math.sqrt((6 + 5 + 1) / (3 * 6 * 5))
    r = 2 * u / 30 - 1
    z = z_of(0.95)
    assert result.effect_size_ci_low == pytest.approx(math.tanh(math.atanh(r) - z * se))
    assert result.effect_size_ci_high == pytest.approx(math.tanh(math.atanh(r) + z * se))
    secondary = stats.mannwhitneyu(xs, y, alternative="two-sided")
    assert result.p_value == pytest.approx(secondary.pvalue)
    assert_json_safe(result)


def test_mann_whitney_normal_approximation_hand_formula() -> None:
    rng = np.random.default_rng(2)
    x = rng.integers(0, 11, size=60).astype(float)
    y = rng.integers(2, 11, size=45).astype(float)
    result = mann_whitney(x, y)
    n1, n2 = 60, 45
    ranks = stats.rankdata(np.concatenate([x, y]))
    u = ranks[:n1].sum() - n1 * (n1 + 1) / 2
    _, t = np.unique(np.concatenate([x, y]), return_counts=True)
    n = n1 + n2
    sigma = math.sqrt(n1 * n2 / 12 * ((n + 1) - np.sum(t**3 - t) / (n * (n - 1))))
    z = (abs(u - n1 * n2 / 2) - 0.5) / sigma
    assert result.statistic == pytest.approx(u)
    assert result.p_value == pytest.approx(2 * stats.norm.sf(z), rel=1e-9)


def test_mann_whitney_empty_group() -> None:
    result = mann_whitney([1.0, 2.0], [np.nan])
    assert math.isnan(result.p_value)
    assert result.note
    assert result.n_dropped == 1
    assert_json_safe(result)


@pytest.mark.parametrize(("n_x", "n_y"), [(37, 41), (40, 50), (1, 33), (64, 3)])
def test_hodges_lehmann_selection_matches_brute_force(n_x: int, n_y: int) -> None:
    rng = np.random.default_rng(n_x * 100 + n_y)
    x = np.round(rng.normal(0.5, 2, size=n_x), 1)  # many ties
    y = np.round(rng.normal(0.0, 2, size=n_y), 1)
    brute = np.median(np.subtract.outer(x, y))
    assert _hodges_lehmann_shift(x, y, max_enumerate=50) == pytest.approx(brute, abs=1e-12)
    everything = np.sort(np.subtract.outer(np.sort(x), np.sort(y)).ravel())
    for k in (1, 2, everything.size // 3, everything.size - 1, everything.size):
        found = _kth_pairwise_difference(np.sort(x), np.sort(y), k, max_enumerate=10)
        assert found == everything[k - 1]


def test_hodges_lehmann_all_equal_values() -> None:
    x = np.full(300, 2.0)
    y = np.full(400, 1.5)
    assert _hodges_lehmann_shift(x, y, max_enumerate=100) == 0.5


# --------------------------------------------------------------------------------------
# Repeated-measures correlation
# --------------------------------------------------------------------------------------

# Bland & Altman (1995) BMJ 310:446: pH and PaCO2, 8 subjects, 47 observations; the
# rmcorr example of Bakdash & Marusich (2017): r_rm = -0.507, df = 38, p = 0.0008,
# 95% CI -0.71 to -0.23.
BA_SUBJECT = [1] * 4 + [2] * 4 + [3] * 9 + [4] * 5 + [5] * 8 + [6] * 6 + [7] * 3 + [8] * 8
BA_PH = [
    6.68, 6.53, 6.43, 6.33, 6.85, 7.06, 7.13, 7.17, 7.4, 7.42, 7.41, 7.37, 7.34, 7.35, 7.28,
    7.3, 7.34, 7.36, 7.33, 7.29, 7.3, 7.35, 7.35, 7.3, 7.3, 7.37, 7.27, 7.28, 7.32, 7.32,
    7.38, 7.3, 7.29, 7.33, 7.31, 7.33, 6.86, 6.94, 6.92, 7.19, 7.29, 7.21, 7.25, 7.2, 7.19,
    6.77, 6.82,
]  # fmt: skip
BA_PACO2 = [
    3.97, 4.12, 4.09, 3.97, 5.27, 5.37, 5.41, 5.44, 5.67, 3.64, 4.32, 4.73, 4.96, 5.04, 5.22,
    4.82, 5.07, 5.67, 5.1, 5.53, 4.75, 5.51, 4.28, 4.44, 4.32, 3.23, 4.46, 4.72, 4.75, 4.99,
    4.78, 4.73, 5.12, 4.93, 5.03, 4.93, 6.85, 6.44, 6.52, 5.28, 4.56, 4.34, 4.32, 4.41, 3.69,
    6.09, 5.58,
]  # fmt: skip


def bland_altman() -> pd.DataFrame:
    return pd.DataFrame({"subject": BA_SUBJECT, "ph": BA_PH, "paco2": BA_PACO2})


def test_rmcorr_bland_altman_published() -> None:
    result = repeated_measures_correlation(bland_altman(), "subject", "ph", "paco2")
    assert round(result.r, 3) == -0.507
    assert result.df == 38
    assert (result.n, result.n_subjects) == (47, 8)
    assert round(result.p_value, 4) == 0.0008
    assert (round(result.ci_low, 2), round(result.ci_high, 2)) == (-0.71, -0.23)
    assert result.method == "repeated_measures"
    assert_json_safe(result)


def small_rm_data(seed: int = 4) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    subjects = np.repeat(np.arange(9), [3, 4, 2, 5, 3, 4, 4, 2, 3])
    offset = rng.normal(0, 3, size=9)[subjects]
    x = rng.normal(0, 1, size=subjects.size) + offset
    y = 0.6 * x - 2 * offset + rng.normal(0, 1, size=subjects.size)
    return pd.DataFrame({"patient": [f"p{s}" for s in subjects], "bme": x, "vas": y})


def test_rmcorr_matches_ancova_by_ols_by_hand() -> None:
    import statsmodels.formula.api as smf

    data = small_rm_data()
    full = smf.ols("vas ~ C(patient) + bme", data=data).fit()
    reduced = smf.ols("vas ~ C(patient)", data=data).fit()
    ss_x = reduced.ssr - full.ssr
    r_expected = math.copysign(math.sqrt(ss_x / (ss_x + full.ssr)), full.params["bme"])
    result = repeated_measures_correlation(data, "patient", "bme", "vas", confidence_level=0.9)
    assert result.r == pytest.approx(r_expected, rel=1e-10)
    assert result.df == full.df_resid == 30 - 9 - 1
    assert result.p_value == pytest.approx(full.pvalues["bme"], rel=1e-8)
    se = 1 / math.sqrt(result.df - 1)
    z = z_of(0.9)
    assert result.ci_low == pytest.approx(math.tanh(math.atanh(r_expected) - z * se))
    assert result.ci_high == pytest.approx(math.tanh(math.atanh(r_expected) + z * se))


@pytest.mark.filterwarnings("ignore:The inplace keyword")
def test_rmcorr_matches_pingouin() -> None:
    import pingouin as pg

    data = small_rm_data(seed=9)
    reference = pg.rm_corr(data=data, x="bme", y="vas", subject="patient")
    result = repeated_measures_correlation(data, "patient", "bme", "vas")
    assert result.r == pytest.approx(float(reference["r"].iloc[0]), rel=1e-9)
    assert result.df == int(reference["dof"].iloc[0])
    assert result.p_value == pytest.approx(float(reference["pval"].iloc[0]), rel=1e-6)
    low, high = reference["CI95"].iloc[0]  # pingouin rounds the CI to 2 decimals
    assert result.ci_low == pytest.approx(low, abs=0.0051)
    assert result.ci_high == pytest.approx(high, abs=0.0051)


def test_rmcorr_drops_missing_rows_and_single_observation_subjects() -> None:
    data = small_rm_data()
    extra = pd.DataFrame(
        {"patient": ["lonely", "p0", "p1", None], "bme": [3.0, np.nan, 1.0, 2.0],
         "vas": [1.0, 2.0, np.nan, 3.0]}
    )  # fmt: skip
    clean = repeated_measures_correlation(data, "patient", "bme", "vas")
    messy = repeated_measures_correlation(
        pd.concat([data, extra], ignore_index=True), "patient", "bme", "vas"
    )
    assert messy.r == pytest.approx(clean.r, rel=1e-12)
    assert (messy.n, messy.n_dropped, messy.n_subjects) == (30, 4, 9)


def test_rmcorr_small_and_degenerate() -> None:
    tiny = pd.DataFrame({"s": [1, 1, 2], "x": [1.0, 2.0, 3.0], "y": [2.0, 1.0, 0.0]})
    result = repeated_measures_correlation(tiny, "s", "x", "y")
    assert math.isnan(result.r)
    assert result.note
    flat = pd.DataFrame({"s": [1, 1, 2, 2, 3, 3], "x": [1.0, 1.0, 2.0, 2.0, 3.0, 3.0],
                         "y": [1.0, 2.0, 3.0, 1.0, 2.0, 5.0]})  # fmt: skip
    assert math.isnan(repeated_measures_correlation(flat, "s", "x", "y").r)


def test_rmcorr_rejects_bad_input() -> None:
    data = small_rm_data()
    with pytest.raises(ValueError, match="not in data"):
        repeated_measures_correlation(data, "patient", "bme", "pain")
    with pytest.raises(ValueError, match="numeric"):
        repeated_measures_correlation(data, "bme", "patient", "vas")
    with pytest.raises(ValueError, match="DataFrame"):
        repeated_measures_correlation(data.to_numpy(), "patient", "bme", "vas")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# Responders
# --------------------------------------------------------------------------------------


def test_responder_rate_hand_example() -> None:
    baseline = [10.0, 8.0, 5.0, 3.0, 7.3, 0.0, 2.0, np.nan, 6.0]
    follow_up = [7.0, 7.0, 4.0, 2.0, 5.3, 0.0, 0.0, 5.0, np.nan]
    # 10->7 drop 3 (yes); 8->7 drop 1 = 12.5% (no); 5->4 drop 1 = 20% (no);
    # 3->2 drop 1 = 33% (yes, percent rule); 7.3->5.3 drop 2 (yes despite rounding);
    # 0->0 baseline 0: points rule only (no); 2->0 drop 2 (yes); two incomplete pairs.
    result = responder_rate(baseline, follow_up)
    assert (result.successes, result.n, result.n_dropped) == (4, 7, 2)
    reference = wilson_interval(4, 7)
    assert (result.ci_low, result.ci_high) == (reference.ci_low, reference.ci_high)
    assert result.parameters["min_drop_points"] == 2.0
    assert result.parameters["min_drop_percent"] == 30.0
    assert "baseline <= 0" in (result.note or "")
    assert_json_safe(result)


def test_responder_rate_thresholds_and_sensitivity() -> None:
    baseline = np.array([10.0, 8.0, 9.0, 6.0])
    follow_up = np.array([7.0, 5.6, 7.5, 5.0])  # drops 3 (30%), 2.4 (30%), 1.5, 1
    assert responder_rate(baseline, follow_up, None, 30.0).successes == 2
    assert responder_rate(baseline, follow_up, 1.5, None).successes == 3
    assert responder_rate(baseline, follow_up, 3.0, None).successes == 1
    assert responder_rate(baseline, follow_up, 3.0, 30.0).successes == 2


def test_responder_rate_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="both are None"):
        responder_rate([1.0], [0.0], None, None)
    with pytest.raises(ValueError, match="min_drop_points"):
        responder_rate([1.0], [0.0], -1.0)
    with pytest.raises(ValueError, match="min_drop_percent"):
        responder_rate([1.0], [0.0], 2.0, 0.0)
    with pytest.raises(ValueError, match="equal lengths"):
        responder_rate([1.0, 2.0], [0.0])


# --------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------


def test_median_iqr_hand_values() -> None:
    result = median_iqr(pd.Series([4, 1, None, 3, 2], dtype="Int64"))
    assert (result.n, result.n_missing) == (4, 1)
    # Type 7 quartiles of 1, 2, 3, 4: positions 1 + 0.25 * 3 and 1 + 0.75 * 3.
    assert (result.q1, result.median, result.q3) == (1.75, 2.5, 3.25)
    assert result.mean == 2.5
    assert result.sd == pytest.approx(math.sqrt(5 / 3))
    assert (result.min, result.max) == (1.0, 4.0)
    assert_json_safe(result)


def test_median_iqr_edge_cases() -> None:
    empty = median_iqr([np.nan, None])
    assert (empty.n, empty.n_missing) == (0, 2)
    assert assert_json_safe(empty)["median"] is None
    single = median_iqr([7.0])
    assert single.median == 7.0
    assert math.isnan(single.sd)
    with pytest.raises(ValueError, match="numeric"):
        median_iqr(["a", "b"])
    with pytest.raises(ValueError, match="numeric"):
        median_iqr(pd.Series(["1", "2"]))


# --------------------------------------------------------------------------------------
# Large data (simulated cohort size): runs, vectorised, sensible values
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_large_cohort_smoke() -> None:
    rng = np.random.default_rng(2024)
    n_subjects, per_subject = 100_000, 6  # 600,000 rows
    subject = np.repeat(np.arange(n_subjects), per_subject)
    offset = rng.normal(0, 2, n_subjects)[subject]
    x = rng.normal(0, 1, subject.size) + offset
    y = 0.5 * x - offset + rng.normal(0, 1, subject.size)
    long = pd.DataFrame({"patient": subject, "bme": x, "vas": y})
    long.loc[rng.choice(subject.size, 5_000, replace=False), "vas"] = np.nan
    rm = repeated_measures_correlation(long, "patient", "bme", "vas")
    assert rm.n_subjects == n_subjects
    assert rm.r == pytest.approx(0.5 / math.sqrt(1.25), abs=0.01)

    months = [0, 3, 6, 12]
    wide = pd.DataFrame(
        {m: 8 - 0.3 * i + rng.normal(0, 1.5, 150_000) for i, m in enumerate(months)}
    ).round(0)
    wide.iloc[::7, 2] = np.nan
    friedman = friedman_test(wide)
    assert friedman.n + friedman.n_dropped == 150_000
    assert friedman.p_value < 1e-10
    pairs = pairwise_wilcoxon(wide, reference_column=0)
    assert all(p.p_adjusted < 1e-10 and p.effect_size < 0 for p in pairs)

    classes_0 = rng.integers(0, 4, 100_000).astype(float)
    classes_3 = np.clip(classes_0 - rng.integers(0, 3, 100_000), 0, 3)
    assert stuart_maxwell(classes_0, classes_3, [0, 1, 2, 3]).p_value < 1e-10

    a = rng.normal(0, 1, 100_000)
    b = 0.3 * a + rng.normal(0, 1, 100_000)
    spearman = spearman_correlation(a, b)
    assert spearman.ci_low < spearman.r < spearman.ci_high
    mw = mann_whitney(a[:50_000] + 0.2, a[50_000:])
    assert mw.details["hodges_lehmann_shift"] == pytest.approx(0.2, abs=0.03)
    assert responder_rate(wide[0], wide[12]).n > 100_000
    assert median_iqr(long["vas"]).n_missing == 5_000
