"""Publication figures of the report (METHOD.md section 5).

Every function takes tidy DataFrames (the columns of ``StudyTables``, see
briefs/TABLES-AND-RESULTS.md) and/or the results dict of ``analyse`` and returns a
:class:`matplotlib.figure.Figure` built without pyplot, so no global figure state is
created or leaked (safe in the web app and in worker processes). Styling is set per
artist rather than through ``rcParams`` for the same reason.

All figures stay fast and small at 100,000 patients (about 560,000 rows): counts and
quantiles are vectorised, the trajectory plot draws at most :data:`TRAJECTORY_MAX_LINES`
lines (a deterministic random sample; its median and IQR use all data) and the scatter
plots switch to hexagonal binning above :data:`SCATTER_MAX_POINTS` points.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, overload

import numpy as np
import numpy.typing as npt
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cbook import boxplot_stats
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import FancyBboxPatch

__all__ = [
    "ANALGESIC_CLASSES",
    "ANALGESIC_LABELS",
    "EXTENT_CATEGORIES",
    "FIGURE_FILES",
    "SCATTER_MAX_POINTS",
    "TRAJECTORY_MAX_LINES",
    "VisitTables",
    "analgesics_figure",
    "bme_extent_figure",
    "bme_present_figure",
    "bme_trajectories_figure",
    "bme_vas_figure",
    "flow_figure",
    "save_figure",
    "save_figures",
    "vas_figure",
]

FloatArray = npt.NDArray[np.float64]

EXTENT_CATEGORIES: tuple[str, ...] = ("0", "1-25", "26-50", "51-75", "76-100")
ANALGESIC_CLASSES: tuple[int, ...] = (0, 1, 2, 3)
ANALGESIC_LABELS: tuple[str, ...] = ("none", "non-opioid", "weak opioid", "strong opioid")

#: Above this many VCF the trajectory plot draws a deterministic random sample of lines.
TRAJECTORY_MAX_LINES = 2000
#: Above this many points per panel the BME-VAS scatter becomes a hexbin density plot.
SCATTER_MAX_POINTS = 5000

#: Figure name -> PNG file name written by :func:`save_figures`.
FIGURE_FILES: dict[str, str] = {
    "bme_extent": "bme_extent.png",
    "bme_trajectories": "bme_trajectories.png",
    "bme_present": "bme_present.png",
    "vas": "vas.png",
    "analgesics": "analgesics.png",
    "bme_vas": "bme_vas.png",
    "flow": "flow.png",
}

# Font sizes (pt) for a figure printed at its natural size (about 16 cm wide).
_TITLE_PT = 10.0
_LABEL_PT = 9.5
_TICK_PT = 9.0
_SMALL_PT = 8.0
_MONTH_LABEL = "Time after vertebroplasty (months; 0 = before)"
_INK = "#222222"
_LINE_BLUE = "#1f4e79"


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _new_figure(width_in: float, height_in: float) -> Figure:
    return Figure(figsize=(width_in, height_in), facecolor="white", layout="constrained")


def _style_axes(ax: Axes) -> None:
    ax.set_facecolor("white")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=_TICK_PT, colors=_INK)
    ax.xaxis.label.set_fontsize(_LABEL_PT)
    ax.yaxis.label.set_fontsize(_LABEL_PT)
    ax.title.set_fontsize(_TITLE_PT)


def _check_columns(frame: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        msg = (
            f"{name} lacks the column(s) {missing}; it has {list(frame.columns)}. "
            "Pass the matching StudyTables DataFrame."
        )
        raise ValueError(msg)


def _resolve_months(frame: pd.DataFrame, months: Sequence[int] | None) -> list[int]:
    if months is None:
        return sorted(int(m) for m in pd.unique(frame["month"].dropna()))
    resolved = [int(m) for m in months]
    if len(set(resolved)) != len(resolved):
        msg = f"months must not repeat a month; got {list(months)}."
        raise ValueError(msg)
    return resolved


def _month_tick_labels(months: Sequence[int], n: Sequence[int]) -> list[str]:
    return [f"{month}\nn = {count:,}" for month, count in zip(months, n, strict=True)]


def _sorted_month_keys(mapping: Mapping[str, Any]) -> list[str]:
    return sorted(mapping, key=lambda key: float(key))


def _number(value: Any) -> float:
    """Float of a JSON number; None and non-numbers become NaN."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _format_p(p_value: Any) -> str:
    p = _number(p_value)
    if math.isnan(p):
        return "p = —"
    if p < 0.001:
        return "p < 0.001"
    return f"p = {p:.3f}"


def _format_r(value: Any) -> str:
    number = _number(value)
    return "—" if math.isnan(number) else f"{number:.2f}"


def _category_percent(
    frame: pd.DataFrame,
    column: str,
    categories: Sequence[Any],
    months: Sequence[int],
) -> tuple[FloatArray, npt.NDArray[np.int64]]:
    """Percent of rows in each category per month (rows: categories) and n per month.

    Rows whose ``column`` is missing are not counted; ``n`` is the number of rows with a
    value at that month. Months without data give zero-height bars.
    """
    data = frame.loc[frame[column].notna() & frame["month"].isin(months), ["month", column]]
    values = data[column].astype(object).map(str)
    counts = pd.crosstab(data["month"].to_numpy(), values.to_numpy())
    labels = [str(c) for c in categories]
    unknown = sorted(set(counts.columns) - set(labels))
    if unknown:
        msg = f"{column} holds values {unknown} outside the categories {labels}."
        raise ValueError(msg)
    counts = counts.reindex(index=list(months), columns=labels, fill_value=0)
    table = counts.to_numpy(dtype=np.float64).T
    n = table.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        percent = np.where(n > 0, 100.0 * table / np.where(n > 0, n, 1.0), 0.0)
    return percent, n.astype(np.int64)


def _stacked_percent_bars(
    ax: Axes,
    percent: FloatArray,
    n: npt.NDArray[np.int64],
    months: Sequence[int],
    labels: Sequence[str],
    colors: Sequence[Any],
    legend_title: str,
) -> None:
    x = np.arange(len(months), dtype=np.float64)
    bottom = np.zeros(len(months))
    for row, (label, color) in enumerate(zip(labels, colors, strict=True)):
        heights = percent[row]
        ax.bar(
            x,
            heights,
            bottom=bottom,
            width=0.62,
            color=color,
            edgecolor="#4d4d4d",
            linewidth=0.6,
            label=label,
        )
        # Write the percentage inside segments tall enough to hold it.
        rgb = np.asarray(colors[row])[:3] if not isinstance(color, str) else None
        dark = rgb is not None and float(np.dot(rgb, [0.299, 0.587, 0.114])) < 0.5
        for xi, height, base in zip(x, heights, bottom, strict=True):
            if height >= 7.0:
                ax.text(
                    xi,
                    base + height / 2.0,
                    f"{height:.0f}%",
                    ha="center",
                    va="center",
                    fontsize=_SMALL_PT,
                    color="white" if dark else _INK,
                )
        bottom = bottom + heights
    ax.set_xticks(x, _month_tick_labels(months, list(n)))
    ax.set_xlim(-0.6, len(months) - 0.4)
    ax.set_ylim(0, 100)
    ax.set_yticks(np.arange(0, 101, 20))
    ax.set_xlabel(_MONTH_LABEL)
    ax.legend(
        title=legend_title,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        frameon=False,
        fontsize=_SMALL_PT + 0.5,
        title_fontsize=_LABEL_PT,
        reverse=True,
    )
    _style_axes(ax)


def _wide_by_month(
    frame: pd.DataFrame, id_column: str, value_column: str, months: Sequence[int]
) -> tuple[npt.NDArray[Any], FloatArray]:
    """Ids and an (n_ids, n_months) array of values (NaN where missing), vectorised."""
    data = frame.loc[frame["month"].isin(months), [id_column, "month", value_column]]
    codes, ids = pd.factorize(data[id_column], sort=True)
    month_array = np.asarray(months, dtype=np.int64)
    order = np.argsort(month_array)
    position = order[np.searchsorted(month_array[order], data["month"].to_numpy(np.int64))]
    wide = np.full((len(ids), len(months)), np.nan)
    wide[codes, position] = pd.to_numeric(data[value_column], errors="coerce").to_numpy(
        dtype=np.float64, na_value=np.nan
    )
    return np.asarray(ids), wide


# --------------------------------------------------------------------------------------
# 1. BME extent categories
# --------------------------------------------------------------------------------------


def _extent_colors() -> list[Any]:
    cmap = colormaps["YlOrRd"]
    return ["#f2f2f2", *[cmap(v) for v in (0.22, 0.45, 0.68, 0.9)]]


def bme_extent_figure(vcf_visits: pd.DataFrame, months: Sequence[int] | None = None) -> Figure:
    """Stacked bars of BME extent categories per month (reference paper Fig 1).

    Parameters
    ----------
    vcf_visits : DataFrame
        ``StudyTables.vcf_visits``: columns ``month`` and ``extent_category``
        (``"0"``, ``"1-25"``, ``"26-50"``, ``"51-75"``, ``"76-100"``; missing when BME
        was not measured).
    months : sequence of int, optional
        Months to show, in order; default the months present in the data.

    Returns
    -------
    Figure
        One axes; each category is one bar container (``ax.containers``) whose bar
        heights are the percent of VCF measured at that month. n under each bar.
    """
    _check_columns(vcf_visits, ["month", "extent_category"], "vcf_visits")
    months = _resolve_months(vcf_visits, months)
    percent, n = _category_percent(vcf_visits, "extent_category", EXTENT_CATEGORIES, months)
    fig = _new_figure(6.3, 3.9)
    ax = fig.add_subplot()
    _stacked_percent_bars(
        ax,
        percent,
        n,
        months,
        [f"{c}%" for c in EXTENT_CATEGORIES],
        _extent_colors(),
        "BME extent\n(% of vertebral body)",
    )
    ax.set_ylabel("Treated VCF (% of VCF measured)")
    return fig


# --------------------------------------------------------------------------------------
# 2. BME trajectories
# --------------------------------------------------------------------------------------


def bme_trajectories_figure(
    vcf_visits: pd.DataFrame,
    months: Sequence[int] | None = None,
    *,
    max_lines: int = TRAJECTORY_MAX_LINES,
    seed: int = 0,
) -> Figure:
    """BME percent of each VCF over time with the median and interquartile band.

    Parameters
    ----------
    vcf_visits : DataFrame
        ``StudyTables.vcf_visits``: ``vcf_id``, ``month``, ``bme_percent``.
    months : sequence of int, optional
        Months on the x axis (drawn at their true spacing); default those in the data.
    max_lines : int
        Above this many VCF, a deterministic random sample of ``max_lines`` VCF is drawn
        (noted on the figure); the median and IQR always use all VCF.
    seed : int
        Seed of the sample, so the figure is reproducible.

    Returns
    -------
    Figure
        One axes: a LineCollection of individual VCF, the median line and the IQR band.
    """
    _check_columns(vcf_visits, ["vcf_id", "month", "bme_percent"], "vcf_visits")
    if max_lines < 1:
        msg = f"max_lines must be >= 1, got {max_lines}."
        raise ValueError(msg)
    months = sorted(_resolve_months(vcf_visits, months))
    month_x = np.asarray(months, dtype=np.float64)
    _ids, wide = _wide_by_month(vcf_visits, "vcf_id", "bme_percent", months)
    measured = ~np.isnan(wide)
    wide = wide[measured.any(axis=1)]
    measured = ~np.isnan(wide)
    n_vcf = wide.shape[0]
    n_per_month = measured.sum(axis=0)

    fig = _new_figure(6.3, 4.0)
    ax = fig.add_subplot()
    sampled = n_vcf > max_lines
    rows = wide
    if sampled:
        rng = np.random.default_rng(seed)
        rows = wide[np.sort(rng.choice(n_vcf, size=max_lines, replace=False))]
    n_drawn = rows.shape[0]
    lines = []
    for row in rows:
        valid = ~np.isnan(row)
        if valid.sum() >= 2:
            lines.append(np.column_stack([month_x[valid], row[valid]]))
    # Fainter lines the more there are, so that dense regions show as darker.
    alpha = float(np.clip(2.5 / math.sqrt(max(n_drawn, 1)), 0.03, 0.6))
    if lines:
        ax.add_collection(
            LineCollection(
                lines,
                colors=[(0.25, 0.3, 0.4, alpha)],
                linewidths=0.7,
                label="Individual VCF",
                zorder=1,
            )
        )
    singles = rows[(~np.isnan(rows)).sum(axis=1) == 1]
    if singles.size:
        single_x = np.broadcast_to(month_x, singles.shape)[~np.isnan(singles)]
        ax.scatter(single_x, singles[~np.isnan(singles)], s=4, color=(0.25, 0.3, 0.4, alpha))

    with np.errstate(all="ignore"):
        q1 = np.full(len(months), np.nan)
        median = np.full(len(months), np.nan)
        q3 = np.full(len(months), np.nan)
        for j in range(len(months)):
            column = wide[measured[:, j], j]
            if column.size:
                q1[j], median[j], q3[j] = np.percentile(column, [25, 50, 75])
    ax.fill_between(
        month_x,
        q1,
        q3,
        color="#e08214",
        alpha=0.35,
        linewidth=0,
        label="IQR (25th-75th percentile)",
        zorder=2,
    )
    ax.plot(
        month_x,
        median,
        color="#b35806",
        linewidth=2.4,
        marker="o",
        markersize=5,
        label="Median",
        zorder=3,
    )
    ax.set_xticks(month_x, _month_tick_labels(months, list(n_per_month)))
    span = max(month_x.max() - month_x.min(), 1.0) if len(months) else 1.0
    if len(months):
        ax.set_xlim(month_x.min() - 0.04 * span, month_x.max() + 0.04 * span)
    ax.set_ylim(-2, 102)
    ax.set_xlabel(_MONTH_LABEL)
    ax.set_ylabel("BME (% of vertebral body volume)")
    # Proxy handle: the real lines may be too faint to show in the legend.
    handles, labels = ax.get_legend_handles_labels()
    proxy = Line2D([], [], color=(0.25, 0.3, 0.4, 0.7), linewidth=0.8)
    handles = [
        proxy if label == "Individual VCF" else h for h, label in zip(handles, labels, strict=True)
    ]
    ax.legend(handles, labels, loc="upper right", frameon=False, fontsize=_SMALL_PT + 0.5)
    note = (
        f"Lines: random sample of {n_drawn:,} of {n_vcf:,} VCF; median and IQR from all VCF"
        if sampled
        else f"Lines: all {n_vcf:,} VCF"
    )
    ax.set_title(note, fontsize=_SMALL_PT, loc="left", color="#555555")
    _style_axes(ax)
    return fig


# --------------------------------------------------------------------------------------
# 3. BME present
# --------------------------------------------------------------------------------------


def bme_present_figure(results: Mapping[str, Any]) -> Figure:
    """Percent of VCF with BME present per month with 95% Wilson intervals.

    Parameters
    ----------
    results : mapping
        The results dict of ``analyse``; uses ``results["bme"]["present_by_month"]``
        (month -> Proportion: ``percent``, ``ci_low``/``ci_high`` on the 0..1 scale,
        ``n``), so the figure shows exactly the numbers of the report table.

    Returns
    -------
    Figure
        One axes with one bar per month (height = percent) and CI error bars.
    """
    try:
        present = results["bme"]["present_by_month"]
    except (KeyError, TypeError):
        msg = "results lacks results['bme']['present_by_month']; pass the dict from analyse()."
        raise ValueError(msg) from None
    keys = _sorted_month_keys(present)
    percent = np.array([_number(present[k].get("percent")) for k in keys])
    low = np.array([100.0 * _number(present[k].get("ci_low")) for k in keys])
    high = np.array([100.0 * _number(present[k].get("ci_high")) for k in keys])
    n = [int(present[k].get("n") or 0) for k in keys]
    x = np.arange(len(keys), dtype=np.float64)
    heights = np.nan_to_num(percent)
    yerr = np.vstack([np.nan_to_num(heights - low), np.nan_to_num(high - heights)])

    fig = _new_figure(5.2, 3.8)
    ax = fig.add_subplot()
    ax.bar(x, heights, width=0.6, color="#d6604d", edgecolor="#4d4d4d", linewidth=0.6)
    ax.errorbar(x, heights, yerr=yerr, fmt="none", ecolor=_INK, elinewidth=1.0, capsize=4)
    for xi, value, top in zip(x, percent, high, strict=True):
        if not math.isnan(value):
            y = (top if not math.isnan(top) else value) + 2.0
            ax.text(xi, y, f"{value:.0f}%", ha="center", va="bottom", fontsize=_SMALL_PT + 0.5)
    ax.set_xticks(x, _month_tick_labels([int(float(k)) for k in keys], n))
    ax.set_xlim(-0.6, len(keys) - 0.4)
    ax.set_ylim(0, 108)
    ax.set_yticks(np.arange(0, 101, 20))
    ax.set_xlabel(_MONTH_LABEL)
    ax.set_ylabel("VCF with BME present (%)\nerror bars: 95% Wilson CI")
    _style_axes(ax)
    return fig


# --------------------------------------------------------------------------------------
# 4. VAS
# --------------------------------------------------------------------------------------


def vas_figure(patient_visits: pd.DataFrame, months: Sequence[int] | None = None) -> Figure:
    """Box plot of VAS pain per month (reference paper Fig 4).

    Boxes: median and interquartile range; whiskers: most extreme values within
    1.5 IQR of the box; no individual outliers (unreadable at 100,000 patients).

    Parameters
    ----------
    patient_visits : DataFrame
        ``StudyTables.patient_visits``: ``month``, ``vas`` (0..10, NaN when missing).
    months : sequence of int, optional
        Months to show; default those in the data.

    Returns
    -------
    Figure
        One axes; n under each box.
    """
    _check_columns(patient_visits, ["month", "vas"], "patient_visits")
    months = _resolve_months(patient_visits, months)
    data = patient_visits.loc[patient_visits["vas"].notna(), ["month", "vas"]]
    grouped = {
        int(month): group.to_numpy(dtype=np.float64)
        for month, group in data.groupby("month", sort=True)["vas"]
    }
    stats = []
    positions = []
    n = []
    for index, month in enumerate(months):
        values = grouped.get(month, np.empty(0))
        n.append(int(values.size))
        if values.size:
            stats.append(boxplot_stats(values, whis=1.5)[0])
            positions.append(index)

    fig = _new_figure(5.4, 3.8)
    ax = fig.add_subplot()
    if stats:
        ax.bxp(
            stats,
            positions=positions,
            widths=0.5,
            showfliers=False,
            patch_artist=True,
            boxprops={"facecolor": "#9ecae1", "edgecolor": _INK, "linewidth": 0.9},
            medianprops={"color": "#08306b", "linewidth": 2.0},
            whiskerprops={"color": _INK, "linewidth": 0.9},
            capprops={"color": _INK, "linewidth": 0.9},
        )
    ax.set_xticks(np.arange(len(months)), _month_tick_labels(months, n))
    ax.set_xlim(-0.6, len(months) - 0.4)
    ax.set_ylim(-0.3, 10.3)
    ax.set_yticks(np.arange(0, 11, 2))
    ax.set_xlabel(_MONTH_LABEL)
    ax.set_ylabel("VAS pain score (0-10)")
    ax.yaxis.grid(True, color="#e5e5e5", linewidth=0.6)
    ax.set_axisbelow(True)
    _style_axes(ax)
    return fig


# --------------------------------------------------------------------------------------
# 5. Analgesics
# --------------------------------------------------------------------------------------


def analgesics_figure(patient_visits: pd.DataFrame, months: Sequence[int] | None = None) -> Figure:
    """Stacked bars of analgesic class per month (reference paper Fig 5).

    Parameters
    ----------
    patient_visits : DataFrame
        ``StudyTables.patient_visits``: ``month``, ``analgesic_class`` (0..3, missing
        when not recorded).
    months : sequence of int, optional
        Months to show; default those in the data.

    Returns
    -------
    Figure
        One axes; one bar container per class (none, non-opioid, weak opioid, strong
        opioid) with heights in percent of patients with data at that month.
    """
    _check_columns(patient_visits, ["month", "analgesic_class"], "patient_visits")
    months = _resolve_months(patient_visits, months)
    frame = patient_visits[["month", "analgesic_class"]].copy()
    frame["analgesic_class"] = pd.to_numeric(frame["analgesic_class"]).astype("Int64")
    percent, n = _category_percent(frame, "analgesic_class", ANALGESIC_CLASSES, months)
    cmap = colormaps["Blues"]
    colors = ["#f2f2f2", cmap(0.35), cmap(0.62), cmap(0.9)]
    fig = _new_figure(6.3, 3.9)
    ax = fig.add_subplot()
    _stacked_percent_bars(ax, percent, n, months, ANALGESIC_LABELS, colors, "Analgesic class")
    ax.set_ylabel("Patients (% of those with data)")
    return fig


# --------------------------------------------------------------------------------------
# 6. BME vs VAS in the subgroup
# --------------------------------------------------------------------------------------


def _subgroup_pairs(vcf_visits: pd.DataFrame, patient_visits: pd.DataFrame) -> pd.DataFrame:
    """BME percent and VAS per subgroup VCF x month (one VCF per subgroup patient)."""
    bme = vcf_visits.loc[
        vcf_visits["in_subgroup"].astype(bool), ["patient_code", "vcf_id", "month", "bme_percent"]
    ]
    vas = patient_visits.loc[
        patient_visits["in_subgroup"].astype(bool), ["patient_code", "month", "vas"]
    ]
    pairs = bme.merge(vas, on=["patient_code", "month"], how="inner")
    pairs["bme_percent"] = pd.to_numeric(pairs["bme_percent"]).astype(np.float64)
    pairs["vas"] = pd.to_numeric(pairs["vas"]).astype(np.float64)
    baseline = pairs.loc[pairs["month"] == 0, ["vcf_id", "bme_percent", "vas"]]
    baseline = baseline.drop_duplicates("vcf_id").rename(
        columns={"bme_percent": "bme_0", "vas": "vas_0"}
    )
    pairs = pairs.merge(baseline, on="vcf_id", how="left")
    pairs["bme_change"] = pairs["bme_percent"] - pairs["bme_0"]
    pairs["vas_change"] = pairs["vas"] - pairs["vas_0"]
    return pairs


def _correlation_title(heading: str, correlation: Mapping[str, Any] | None) -> str:
    if not correlation:
        return f"{heading}\nno correlation result"
    n = correlation.get("n")
    n_text = "—" if n is None else f"{int(n):,}"
    if math.isnan(_number(correlation.get("r"))):
        return f"{heading}\nρ not estimable\nn = {n_text}"
    lo, hi = _format_r(correlation.get("ci_low")), _format_r(correlation.get("ci_high"))
    return (
        f"{heading}\n"
        f"ρ = {_format_r(correlation.get('r'))} (95% CI {lo} to {hi})\n"
        f"{_format_p(correlation.get('p_value'))}, n = {n_text}"
    )


def _scatter_or_hexbin(
    ax: Axes, x: FloatArray, y: FloatArray, extent: tuple[float, float, float, float]
) -> None:
    if x.size > SCATTER_MAX_POINTS:
        ax.hexbin(
            x, y, gridsize=28, extent=extent, bins="log", mincnt=1, cmap="Blues", linewidths=0.1
        )
    elif x.size:
        alpha = float(np.clip(25.0 / math.sqrt(x.size), 0.15, 0.8))
        ax.scatter(x, y, s=14, color=_LINE_BLUE, alpha=alpha, edgecolors="none")


def bme_vas_figure(
    vcf_visits: pd.DataFrame,
    patient_visits: pd.DataFrame,
    results: Mapping[str, Any],
    months: Sequence[int] | None = None,
) -> Figure:
    """BME percent vs VAS in the subgroup, per follow-up month (small multiples).

    Top row: levels at each follow-up month; bottom row: changes from month 0. Panel
    titles show Spearman's rho, its 95% CI, p and n from
    ``results["bme_pain"]["spearman_level"]`` and ``["spearman_change"]``, so they agree
    with the report tables. Above :data:`SCATTER_MAX_POINTS` points a panel is a hexbin
    density plot (log colour scale) instead of a scatter.

    Parameters
    ----------
    vcf_visits, patient_visits : DataFrame
        ``StudyTables.vcf_visits`` (``patient_code``, ``vcf_id``, ``month``,
        ``bme_percent``, ``in_subgroup``) and ``StudyTables.patient_visits``
        (``patient_code``, ``month``, ``vas``, ``in_subgroup``).
    results : mapping
        The results dict of ``analyse``.
    months : sequence of int, optional
        Follow-up months; default the keys of ``spearman_level`` (else the non-zero
        months of the data).

    Returns
    -------
    Figure
        2 x len(months) axes.
    """
    _check_columns(
        vcf_visits, ["patient_code", "vcf_id", "month", "bme_percent", "in_subgroup"], "vcf_visits"
    )
    _check_columns(
        patient_visits, ["patient_code", "month", "vas", "in_subgroup"], "patient_visits"
    )
    bme_pain = results.get("bme_pain") or {}
    level = bme_pain.get("spearman_level") or {}
    change = bme_pain.get("spearman_change") or {}
    if months is None:
        if level:
            months = [int(float(k)) for k in _sorted_month_keys(level)]
        else:
            months = [m for m in _resolve_months(vcf_visits, None) if m != 0]
    months = [int(m) for m in months]
    if not months:
        msg = "bme_vas_figure needs at least one follow-up month; got none."
        raise ValueError(msg)
    pairs = _subgroup_pairs(vcf_visits, patient_visits)

    fig = _new_figure(2.5 * len(months) + 0.5, 6.6)
    axes = fig.subplots(2, len(months), squeeze=False)
    for column, month in enumerate(months):
        at_month = pairs.loc[pairs["month"] == month]
        for row, (x_col, y_col, stats) in enumerate(
            (("bme_percent", "vas", level), ("bme_change", "vas_change", change))
        ):
            ax = axes[row, column]
            both = at_month[[x_col, y_col]].dropna()
            x = both[x_col].to_numpy(np.float64)
            y = both[y_col].to_numpy(np.float64)
            extent = (-2.0, 102.0, -0.3, 10.3) if row == 0 else (-102.0, 102.0, -10.3, 10.3)
            _scatter_or_hexbin(ax, x, y, extent)
            if row == 1:
                ax.axhline(0, color="#999999", linewidth=0.6, zorder=0)
                ax.axvline(0, color="#999999", linewidth=0.6, zorder=0)
                ax.set_yticks(np.arange(-10, 11, 5))
            ax.set_xlim(extent[0], extent[1])
            ax.set_ylim(extent[2], extent[3])
            ax.set_title(
                _correlation_title(
                    f"Month {month}: {'level' if row == 0 else 'change from month 0'}",
                    stats.get(str(month)),
                ),
                loc="left",
                fontsize=_SMALL_PT,
            )
            if row == 0:
                ax.set_xlabel("BME (% of body)")
                ax.set_ylabel("VAS (0-10)" if column == 0 else "")
            else:
                ax.set_xlabel("Change in BME\n(percentage points)")
                ax.set_ylabel("Change in VAS (points)" if column == 0 else "")
            if column > 0:
                ax.tick_params(labelleft=False)
            _style_axes(ax)
    return fig


# --------------------------------------------------------------------------------------
# 7. STROBE flow diagram
# --------------------------------------------------------------------------------------


def _box(
    ax: Axes,
    x_center: float,
    y_top: float,
    width: float,
    lines: Sequence[str],
    *,
    bold_first: bool = True,
    face: str = "white",
) -> tuple[float, float]:
    """Draw a text box (data units = inches) and return its (top, bottom) y."""
    line_height = 0.2
    height = 0.16 + line_height * len(lines)
    ax.add_patch(
        FancyBboxPatch(
            (x_center - width / 2.0, y_top - height),
            width,
            height,
            boxstyle="round,pad=0,rounding_size=0.06",
            facecolor=face,
            edgecolor=_INK,
            linewidth=0.9,
        )
    )
    for index, line in enumerate(lines):
        ax.text(
            x_center,
            y_top - 0.08 - line_height * (index + 0.5),
            line,
            ha="center",
            va="center",
            fontsize=_TICK_PT if index == 0 else _SMALL_PT + 0.5,
            fontweight="bold" if (bold_first and index == 0) else "normal",
            color=_INK,
        )
    return y_top, y_top - height


def _arrow(ax: Axes, start: tuple[float, float], end: tuple[float, float]) -> None:
    ax.annotate(
        "",
        xy=end,
        xytext=start,
        arrowprops={
            "arrowstyle": "-|>",
            "color": _INK,
            "linewidth": 0.9,
            "shrinkA": 0,
            "shrinkB": 0,
            "mutation_scale": 10,
        },
    )


def _reason_label(reason: str) -> str:
    return reason.replace("_", " ")


def flow_figure(results: Mapping[str, Any]) -> Figure:
    """STROBE flow diagram: enrolled -> treated VCF -> each visit -> subgroup.

    Side boxes give the patients not seen at each visit (enrolled - seen) and the
    exclusions from the BME-pain subgroup by reason.

    Parameters
    ----------
    results : mapping
        The results dict of ``analyse``; uses ``results["flow"]`` (``enrolled``,
        ``treated_vcf``, ``by_month`` -> ``patients_seen``, ``patients_with_vas``,
        ``vcf_with_bme``; ``subgroup``; ``excluded_from_subgroup``) and
        ``results["visits_outside_window"]``.

    Returns
    -------
    Figure
        One axes (axis off).
    """
    flow = results.get("flow")
    if not isinstance(flow, Mapping):
        msg = "results lacks results['flow']; pass the dict from analyse()."
        raise ValueError(msg)
    enrolled = int(flow.get("enrolled") or 0)
    by_month = flow.get("by_month") or {}
    excluded = flow.get("excluded_from_subgroup") or {}
    keys = _sorted_month_keys(by_month)

    main_x, main_w = 2.35, 3.5
    side_x, side_w = 5.75, 2.5
    gap = 0.32
    width = 7.2
    # Draw downwards from y = 0 in inch units, then size the figure to what was drawn.
    fig = Figure(figsize=(width, 8.0), facecolor="white")
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_axis_off()

    def fmt(value: Any) -> str:
        return "—" if value is None else f"{int(value):,}"

    y = -0.15
    top, bottom = _box(
        ax, main_x, y, main_w, ["Patients enrolled", f"n = {fmt(enrolled)} patients"]
    )
    previous_bottom = bottom
    y = bottom - gap
    top, bottom = _box(
        ax, main_x, y, main_w, ["Treated VCF", f"n = {fmt(flow.get('treated_vcf'))}"]
    )
    _arrow(ax, (main_x, previous_bottom), (main_x, top))
    previous_bottom = bottom
    for key in keys:
        month = by_month[key] or {}
        seen = month.get("patients_seen")
        title = "Month 0 (before vertebroplasty)" if float(key) == 0 else f"Month {key}"
        lines = [
            title,
            f"patients seen: {fmt(seen)} · with VAS: {fmt(month.get('patients_with_vas'))}",
            f"VCF with BME measured: {fmt(month.get('vcf_with_bme'))}",
        ]
        not_seen = enrolled - int(seen) if seen is not None else None
        side_lines = [f"Not seen at month {key}", f"n = {fmt(not_seen)}"]
        needs_side = not_seen is not None and not_seen > 0
        y = previous_bottom - gap - (0.12 if needs_side else 0.0)
        top, bottom = _box(ax, main_x, y, main_w, lines)
        _arrow(ax, (main_x, previous_bottom), (main_x, top))
        if needs_side:
            mid = (previous_bottom + top) / 2.0
            side_top = mid + 0.28
            _box(ax, side_x, side_top, side_w, side_lines, bold_first=False, face="#f5f5f5")
            ax.plot([main_x, side_x - side_w / 2.0], [mid, mid], color=_INK, linewidth=0.9)
            _arrow(ax, (side_x - side_w / 2.0 - 0.2, mid), (side_x - side_w / 2.0, mid))
        previous_bottom = bottom

    # Patients may meet several reasons: the excluded count is enrolled - subgroup.
    subgroup = flow.get("subgroup")
    n_excluded = (
        enrolled - int(subgroup)
        if subgroup is not None and flow.get("enrolled") is not None
        else sum(int(v) for v in excluded.values())
    )
    exclusion_lines = [f"Excluded from subgroup: n = {fmt(n_excluded)}"]
    if len(excluded) > 1:
        exclusion_lines.append("reasons (a patient may have several):")
    exclusion_lines += [f"• {_reason_label(str(r))}: {fmt(v)}" for r, v in excluded.items()]
    side_height = 0.16 + 0.2 * len(exclusion_lines)
    y = previous_bottom - gap - max(side_height - 0.2, 0.1)
    top, bottom = _box(
        ax, main_x, y, main_w, ["BME-pain subgroup", f"n = {fmt(flow.get('subgroup'))} patients"]
    )
    _arrow(ax, (main_x, previous_bottom), (main_x, top))
    mid = (previous_bottom + top) / 2.0
    _box(
        ax,
        side_x,
        mid + side_height / 2.0,
        side_w,
        exclusion_lines,
        bold_first=False,
        face="#f5f5f5",
    )
    ax.plot([main_x, side_x - side_w / 2.0], [mid, mid], color=_INK, linewidth=0.9)
    _arrow(ax, (side_x - side_w / 2.0 - 0.2, mid), (side_x - side_w / 2.0, mid))
    lowest = min(bottom, mid - side_height / 2.0)
    outside = results.get("visits_outside_window")
    if outside is not None:
        lowest -= 0.35
        ax.text(
            0.15,
            lowest,
            f"Visits outside every visit window (kept, flagged, not analysed): {fmt(outside)}",
            fontsize=_SMALL_PT,
            color="#555555",
            ha="left",
            va="bottom",
        )
    total_height = -lowest + 0.15
    fig.set_size_inches(width, total_height)
    ax.set_xlim(0, width)
    ax.set_ylim(-total_height, 0)
    return fig


# --------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------


def save_figure(fig: Figure, path: Path | str, dpi: int = 150) -> Path:
    """Write ``fig`` as PNG (white background) at ``dpi`` and return the path.

    Use ``dpi=300`` for publication, 150 for the HTML report.
    """
    if dpi <= 0:
        msg = f"dpi must be positive, e.g. 150 or 300; got {dpi}."
        raise ValueError(msg)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, facecolor="white", format="png")
    return path


class VisitTables(Protocol):
    """What :func:`save_figures` needs of ``StudyTables``."""

    @property
    def vcf_visits(self) -> pd.DataFrame: ...

    @property
    def patient_visits(self) -> pd.DataFrame: ...


@overload
def save_figures(
    tables: VisitTables,
    results: Mapping[str, Any],
    out_dir: Path | str,
    /,
    *,
    dpi: int = 150,
    months: Sequence[int] | None = None,
) -> dict[str, Path]: ...


@overload
def save_figures(
    tables: pd.DataFrame,
    patient_visits: pd.DataFrame,
    results: Mapping[str, Any],
    out_dir: Path | str,
    /,
    *,
    dpi: int = 150,
    months: Sequence[int] | None = None,
) -> dict[str, Path]: ...


def save_figures(
    tables: VisitTables | pd.DataFrame,
    *args: Any,
    dpi: int = 150,
    months: Sequence[int] | None = None,
) -> dict[str, Path]:
    """Draw every report figure and write it as PNG into ``out_dir``.

    Call as ``save_figures(study_tables, results, out_dir)`` or
    ``save_figures(vcf_visits, patient_visits, results, out_dir)``.

    Parameters
    ----------
    tables : StudyTables or DataFrame
        An object with ``vcf_visits`` and ``patient_visits`` DataFrames (and optionally
        ``nominal_months``), or the ``vcf_visits`` DataFrame itself, followed by the
        ``patient_visits`` DataFrame.
    results : mapping
        The results dict of ``analyse``.
    out_dir : path
        Folder to write into (created if needed).
    dpi : int
        150 for the HTML report, 300 for publication.
    months : sequence of int, optional
        Nominal months; default ``tables.nominal_months`` or the months in the data.

    Returns
    -------
    dict of str to Path
        Figure name (keys of :data:`FIGURE_FILES`) -> PNG path.
    """
    if isinstance(tables, pd.DataFrame):
        if len(args) != 3:
            msg = (
                "save_figures(vcf_visits, patient_visits, results, out_dir) takes 4 "
                f"positional arguments; got {1 + len(args)}."
            )
            raise TypeError(msg)
        vcf_visits = tables
        patient_visits, results, out_dir = args
    else:
        if len(args) != 2:
            msg = (
                "save_figures(tables, results, out_dir) takes 3 positional arguments; "
                f"got {1 + len(args)}."
            )
            raise TypeError(msg)
        vcf_visits, patient_visits = tables.vcf_visits, tables.patient_visits
        results, out_dir = args
        nominal = getattr(tables, "nominal_months", None)
        if months is None and nominal is not None:
            months = [int(m) for m in nominal]
    out = Path(out_dir)
    builders = {
        "bme_extent": lambda: bme_extent_figure(vcf_visits, months),
        "bme_trajectories": lambda: bme_trajectories_figure(vcf_visits, months),
        "bme_present": lambda: bme_present_figure(results),
        "vas": lambda: vas_figure(patient_visits, months),
        "analgesics": lambda: analgesics_figure(patient_visits, months),
        "bme_vas": lambda: bme_vas_figure(vcf_visits, patient_visits, results),
        "flow": lambda: flow_figure(results),
    }
    paths: dict[str, Path] = {}
    for name, build in builders.items():
        fig = build()
        paths[name] = save_figure(fig, out / FIGURE_FILES[name], dpi=dpi)
        fig.clear()  # free the artists now rather than at garbage collection
    return paths
