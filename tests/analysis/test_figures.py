"""Figures: the drawn bars, boxes, lines and titles equal numbers computed by hand."""

from __future__ import annotations

import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib._pylab_helpers import Gcf
from matplotlib.collections import LineCollection, PolyCollection
from matplotlib.container import BarContainer, ErrorbarContainer
from matplotlib.figure import Figure
from matplotlib.patches import PathPatch

from bmetrack.analysis import figures

# Hand counts of the conftest data (BME dict): categories 0, 1-25, 26-50, 51-75, 76-100.
EXTENT_COUNTS = {
    0: [0, 2, 2, 2, 2],  # 80 60 40 10 90 55 30 20
    3: [2, 3, 2, 1, 0],  # 50 30 20 0 60 25 0 10
    6: [4, 2, 1, 0, 0],  # 20 10 0 0 30 0 0 (P6 not measured)
    12: [5, 2, 0, 0, 0],  # 0 0 0 0 15 0 5 (P5 no visit)
}
# Hand counts of analgesic class 0..3 (ANALGESIC dict; missing values not counted).
ANALGESIC_COUNTS = {0: [0, 1, 2, 3], 3: [3, 2, 0, 0], 6: [4, 1, 1, 0], 12: [4, 1, 0, 0]}


def _stack_heights(fig: Figure) -> list[list[float]]:
    (ax,) = fig.axes
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    return [[patch.get_height() for patch in container.patches] for container in bars]


def _tick_texts(fig: Figure) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_xticklabels()]


def test_extent_bar_heights_are_percent_of_measured_vcf(vcf_visits: pd.DataFrame) -> None:
    fig = figures.bme_extent_figure(vcf_visits)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 1
    heights = _stack_heights(fig)
    assert len(heights) == 5  # one container per extent category
    for column, month in enumerate((0, 3, 6, 12)):
        counts = EXTENT_COUNTS[month]
        expected = [100.0 * c / sum(counts) for c in counts]
        drawn = [heights[row][column] for row in range(5)]
        np.testing.assert_allclose(drawn, expected, atol=1e-9)
    assert _tick_texts(fig) == ["0\nn = 8", "3\nn = 8", "6\nn = 7", "12\nn = 7"]
    # The segments are stacked: each starts where the previous one ends.
    (ax,) = fig.axes
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    np.testing.assert_allclose(
        [p.get_y() for p in bars[2].patches],
        [heights[0][j] + heights[1][j] for j in range(4)],
    )


def test_extent_respects_months_order_and_empty_month(vcf_visits: pd.DataFrame) -> None:
    fig = figures.bme_extent_figure(vcf_visits, months=[12, 0, 24])
    heights = _stack_heights(fig)
    assert [heights[row][0] for row in range(5)] == pytest.approx([500 / 7, 200 / 7, 0, 0, 0])
    assert [heights[row][2] for row in range(5)] == [0, 0, 0, 0, 0]
    assert _tick_texts(fig)[2] == "24\nn = 0"


def test_extent_rejects_unknown_category(vcf_visits: pd.DataFrame) -> None:
    frame = vcf_visits.copy()
    frame["extent_category"] = frame["extent_category"].astype(str).replace("0", "zero")
    with pytest.raises(ValueError, match="zero"):
        figures.bme_extent_figure(frame)


def test_missing_column_message_names_column(vcf_visits: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="extent_category"):
        figures.bme_extent_figure(vcf_visits.drop(columns="extent_category"))


def test_analgesic_bar_heights(patient_visits: pd.DataFrame) -> None:
    fig = figures.analgesics_figure(patient_visits)
    assert len(fig.axes) == 1
    heights = _stack_heights(fig)
    assert len(heights) == 4
    for column, month in enumerate((0, 3, 6, 12)):
        counts = ANALGESIC_COUNTS[month]
        expected = [100.0 * c / sum(counts) for c in counts]
        np.testing.assert_allclose([heights[r][column] for r in range(4)], expected)
    assert _tick_texts(fig) == ["0\nn = 6", "3\nn = 5", "6\nn = 6", "12\nn = 5"]
    legend = fig.axes[0].get_legend()
    assert {t.get_text() for t in legend.get_texts()} == {
        "none",
        "non-opioid",
        "weak opioid",
        "strong opioid",
    }


def test_present_figure_uses_results_numbers(results: dict) -> None:
    fig = figures.bme_present_figure(results)
    (ax,) = fig.axes
    bars = next(c for c in ax.containers if isinstance(c, BarContainer))
    # 8/8, 6/8, 3/7, 2/7 of VCF with BME >= 5% in the conftest data.
    assert [p.get_height() for p in bars.patches] == pytest.approx([100.0, 75.0, 300 / 7, 200 / 7])
    errorbar = next(c for c in ax.containers if isinstance(c, ErrorbarContainer))
    segments = errorbar.lines[2][0].get_segments()
    lows = [seg[:, 1].min() for seg in segments]
    highs = [seg[:, 1].max() for seg in segments]
    assert lows == pytest.approx([67.56, 40.93, 15.82, 8.22])
    assert highs == pytest.approx([100.0, 92.85, 74.95, 64.11])
    assert _tick_texts(fig)[3] == "12\nn = 7"


def test_present_figure_needs_results_key() -> None:
    with pytest.raises(ValueError, match="present_by_month"):
        figures.bme_present_figure({"bme": {}})


def test_vas_boxes_show_median_quartiles_and_no_fliers(patient_visits: pd.DataFrame) -> None:
    fig = figures.vas_figure(patient_visits)
    (ax,) = fig.axes
    medians = [line.get_ydata()[0] for line in ax.lines if line.get_color() == "#08306b"]
    assert medians == [7.5, 2.0, 2.0, 1.0]  # VAS lists of the conftest, by hand
    boxes = [p for p in ax.patches if isinstance(p, PathPatch)]
    assert len(boxes) == 4
    y0 = boxes[0].get_path().vertices[:, 1]
    assert (y0.min(), y0.max()) == pytest.approx((7.0, 8.75))  # 6 7 7 8 9 10, type 7
    whisker_ends = sorted(
        {float(v) for line in ax.lines[:4] for v in line.get_ydata()}
    )  # first box: whiskers + caps
    assert min(whisker_ends) == 6.0 and max(whisker_ends) == 10.0
    assert not any(line.get_marker() not in ("None", None, "") for line in ax.lines)
    assert _tick_texts(fig) == ["0\nn = 6", "3\nn = 5", "6\nn = 6", "12\nn = 5"]


def test_trajectories_draw_every_vcf_and_median(vcf_visits: pd.DataFrame) -> None:
    fig = figures.bme_trajectories_figure(vcf_visits)
    (ax,) = fig.axes
    (collection,) = [c for c in ax.collections if isinstance(c, LineCollection)]
    segments = collection.get_segments()
    assert len(segments) == 8
    # P5 has no month-12 row and P6 no month-6 value: 3 points each; the rest 4.
    assert sorted(len(s) for s in segments) == [3, 3, 4, 4, 4, 4, 4, 4]
    p6 = [s for s in segments if tuple(s[0]) == (0.0, 20.0)]
    np.testing.assert_allclose(p6[0], [[0, 20], [3, 10], [12, 5]])
    median_line = next(line for line in ax.lines if line.get_label() == "Median")
    expected = [np.median([80, 60, 40, 10, 90, 55, 30, 20]), 22.5, 0.0, 0.0]
    np.testing.assert_allclose(median_line.get_ydata(), expected)
    assert "all 8 VCF" in ax.get_title(loc="left")


def test_trajectories_sample_is_deterministic_and_noted(vcf_visits: pd.DataFrame) -> None:
    first = figures.bme_trajectories_figure(vcf_visits, max_lines=3, seed=7)
    second = figures.bme_trajectories_figure(vcf_visits, max_lines=3, seed=7)

    def lines(fig: Figure) -> list[np.ndarray]:
        ax = fig.axes[0]
        return next(c for c in ax.collections if isinstance(c, LineCollection)).get_segments()

    assert len(lines(first)) == 3
    for a, b in zip(lines(first), lines(second), strict=True):
        np.testing.assert_array_equal(a, b)
    assert "random sample of 3 of 8 VCF" in first.axes[0].get_title(loc="left")
    median_line = next(line for line in first.axes[0].lines if line.get_label() == "Median")
    assert median_line.get_ydata()[0] == pytest.approx(47.5)  # still from all 8 VCF


def test_bme_vas_panels_points_and_titles(
    vcf_visits: pd.DataFrame, patient_visits: pd.DataFrame, results: dict
) -> None:
    fig = figures.bme_vas_figure(vcf_visits, patient_visits, results)
    assert len(fig.axes) == 6
    top_left, bottom_left = fig.axes[0], fig.axes[3]
    # Subgroup P3, P4, P5 at month 3: (BME, VAS) and changes from month 0.
    points = {tuple(p) for p in top_left.collections[0].get_offsets().tolist()}
    assert points == {(60.0, 2.0), (25.0, 1.0), (0.0, 4.0)}
    changes = sorted(tuple(p) for p in bottom_left.collections[0].get_offsets().tolist())
    assert changes == [(-30.0, -8.0), (-30.0, -5.0), (-30.0, -5.0)]
    title = top_left.get_title(loc="left")
    assert "ρ = 0.50 (95% CI -0.96 to 1.00)" in title
    assert "p = 0.667, n = 3" in title
    assert "ρ = 0.23 (95% CI -0.97 to 0.99)" in fig.axes[4].get_title(loc="left")
    assert "not estimable" in fig.axes[2].get_title(loc="left")


def test_bme_vas_switches_to_hexbin(
    vcf_visits: pd.DataFrame,
    patient_visits: pd.DataFrame,
    results: dict,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(figures, "SCATTER_MAX_POINTS", 2)
    fig = figures.bme_vas_figure(vcf_visits, patient_visits, results, months=[3])
    assert len(fig.axes) == 2
    assert isinstance(fig.axes[0].collections[0], PolyCollection)  # hexbin


def test_flow_figure_texts(results: dict) -> None:
    fig = figures.flow_figure(results)
    assert len(fig.axes) == 1
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "n = 6 patients" in texts
    assert "n = 8" in texts
    assert "Not seen at month 12" in texts
    assert "patients seen: 5 · with VAS: 5" in texts
    assert "• multiple treated vcf: 2" in texts
    assert "Excluded from subgroup: n = 3" in texts
    assert "n = 3 patients" in texts
    assert any("outside every visit window" in t and t.endswith(": 4") for t in texts)


def test_flow_counts_excluded_patients_not_reasons(results: dict) -> None:
    """A patient may meet several reasons: excluded = enrolled - subgroup (6 - 3)."""
    changed = {**results, "flow": {**results["flow"]}}
    changed["flow"]["excluded_from_subgroup"] = {"multiple_treated_vcf": 2, "new_vcf": 2}
    texts = [t.get_text() for t in figures.flow_figure(changed).axes[0].texts]
    assert "Excluded from subgroup: n = 3" in texts
    assert "• new vcf: 2" in texts


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_save_figures_writes_every_png(
    tmp_path: Path, vcf_visits: pd.DataFrame, patient_visits: pd.DataFrame, results: dict
) -> None:
    paths = figures.save_figures(vcf_visits, patient_visits, results, tmp_path, dpi=60)
    assert {p.name for p in paths.values()} == {
        "bme_extent.png",
        "bme_trajectories.png",
        "bme_present.png",
        "vas.png",
        "analgesics.png",
        "bme_vas.png",
        "flow.png",
    }
    for path in paths.values():
        assert path.parent == tmp_path
        _png_size(path)
    fig = figures.vas_figure(patient_visits)
    low = _png_size(figures.save_figure(fig, tmp_path / "low.png", dpi=100))
    high = _png_size(figures.save_figure(fig, tmp_path / "high.png", dpi=300))
    assert high[0] == pytest.approx(3 * low[0], abs=3)


def test_save_figures_accepts_study_tables_object(
    tmp_path: Path, vcf_visits: pd.DataFrame, patient_visits: pd.DataFrame, results: dict
) -> None:
    tables = SimpleNamespace(
        vcf_visits=vcf_visits, patient_visits=patient_visits, nominal_months=(0, 3, 6, 12, 24)
    )
    paths = figures.save_figures(tables, results, tmp_path, dpi=40)
    assert len(paths) == 7 and all(p.is_file() for p in paths.values())
    with pytest.raises(TypeError, match="3 positional"):
        figures.save_figures(tables, results)  # type: ignore[call-overload]
    # nominal_months of the object decide the x axis (month 24: no data, n = 0).
    fig = figures.bme_extent_figure(vcf_visits, tables.nominal_months)
    assert _tick_texts(fig)[-1] == "24\nn = 0"


def test_figures_leave_no_global_state(
    tmp_path: Path, vcf_visits: pd.DataFrame, patient_visits: pd.DataFrame, results: dict
) -> None:
    """No figure registered with pyplot, no rcParams changed."""
    before = {k: v for k, v in matplotlib.rcParams.items() if k != "backend"}
    n_managers = Gcf.get_num_fig_managers()
    figures.save_figures(vcf_visits, patient_visits, results, tmp_path, dpi=40)
    assert Gcf.get_num_fig_managers() == n_managers
    after = {k: v for k, v in matplotlib.rcParams.items() if k != "backend"}
    assert after == before


@pytest.mark.slow
def test_large_cohort_smoke(tmp_path: Path, results: dict, large_tables: Any) -> None:
    vcf_visits, patient_visits = large_tables(100_000)
    assert len(vcf_visits) > 500_000
    paths = figures.save_figures(vcf_visits, patient_visits, results, tmp_path, dpi=100)
    assert len(paths) == 7
    fig = figures.bme_trajectories_figure(vcf_visits)
    (collection,) = [c for c in fig.axes[0].collections if isinstance(c, LineCollection)]
    assert len(collection.get_segments()) <= figures.TRAJECTORY_MAX_LINES
    heights = _stack_heights(figures.bme_extent_figure(vcf_visits))
    np.testing.assert_allclose(np.sum(heights, axis=0), 100.0)
