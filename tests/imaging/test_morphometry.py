"""Tests of vertebral body heights and Genant grading on analytically known shapes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from bmetrack.imaging.morphometry import (
    ANTERIOR_FRACTION,
    Heights,
    assess_deformities,
    body_heights_mm,
    deformity_type,
    genant_grade,
)
from bmetrack.imaging.volume import Volume
from bmetrack.settings import resolve_settings

SPACING = (4.0, 0.6, 0.6)
# Typical sagittal series: slices toward patient right, rows downward, columns backward.
SAGITTAL = np.column_stack([(-1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0)])
N_SLICES, N_ROWS, N_COLS = 12, 260, 110

# A profile maps depth d (mm, 0 at the posterior wall) to the (bottom, top) of the body in mm
# above the body's base, along the body's own superior axis.
Profile = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _box(height_mm: float) -> Profile:
    return lambda d: (np.zeros_like(d), np.full_like(d, height_mm))


def _wedge(posterior_mm: float, anterior_mm: float, depth_mm: float) -> Profile:
    return lambda d: (
        np.zeros_like(d),
        posterior_mm + (anterior_mm - posterior_mm) * d / depth_mm,
    )


def _biconcave(height_mm: float, dip_mm: float, depth_mm: float) -> Profile:
    """Both endplates indented by dip_mm / 2 at the centre, over the central half only."""

    def profile(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = (d - depth_mm / 2) / (depth_mm / 4)
        dip = np.where(np.abs(x) < 1, (dip_mm / 2) * (1 - x**2), 0.0)
        return dip, height_mm - dip

    return profile


def _paint(
    labels: np.ndarray,
    label: int,
    profile: Profile,
    *,
    depth_mm: float,
    base_row_mm: float,
    posterior_col_mm: float,
    tilt_deg: float = 0.0,
    slices: slice = slice(2, 10),
    anterior_sign: float = -1.0,
) -> None:
    """Rasterise a body: pixel centres inside the profile, in a frame tilted by tilt_deg.

    In-plane coordinates: u = row * 0.6 (mm, increasing inferiorly), v = column * 0.6 (mm).
    Untilted, the body's anterior axis points toward decreasing v when anterior_sign is -1
    (columns run anterior -> posterior); d is the depth from the posterior wall.
    """
    t = np.deg2rad(tilt_deg)
    rows, cols = np.meshgrid(np.arange(N_ROWS), np.arange(N_COLS), indexing="ij")
    u = rows * SPACING[1] - base_row_mm
    v = cols * SPACING[2] - posterior_col_mm
    # Rotate the untilted axes (superior (-1, 0), anterior (0, anterior_sign)) by t.
    sup = np.array([-np.cos(t), -np.sin(t)])
    ant = np.array([-anterior_sign * np.sin(t), anterior_sign * np.cos(t)])
    h = u * sup[0] + v * sup[1]
    d = u * ant[0] + v * ant[1]
    lo, hi = profile(d)
    inside = (d >= 0) & (d <= depth_mm) & (h >= lo) & (h <= hi)
    labels[slices][:, inside] = label


def _volume(labels: np.ndarray, direction: np.ndarray = SAGITTAL) -> Volume:
    return Volume.from_geometry(labels, spacing_mm=SPACING, direction=direction)


def _single(profile: Profile, tilt_deg: float = 0.0, depth_mm: float = 33.0) -> Volume:
    labels = np.zeros((N_SLICES, N_ROWS, N_COLS), dtype=np.int16)
    _paint(
        labels,
        20,
        profile,
        depth_mm=depth_mm,
        base_row_mm=110.0,
        posterior_col_mm=50.0,
        tilt_deg=tilt_deg,
    )
    return _volume(labels)


def test_axis_aligned_box_heights_are_exact_pixel_counts() -> None:
    labels = np.zeros((N_SLICES, N_ROWS, N_COLS), dtype=np.int16)
    labels[2:10, 100:142, 20:75] = 20  # 42 rows of 0.6 mm = 25.2 mm
    h = body_heights_mm(_volume(labels), 20)
    assert h.anterior == pytest.approx(25.2, abs=0.05)
    assert h.middle == pytest.approx(25.2, abs=0.05)
    assert h.posterior == pytest.approx(25.2, abs=0.05)


@pytest.mark.parametrize("tilt_deg", [0.0, 15.0, -15.0, 25.0])
def test_tilted_box_heights_within_half_mm(tilt_deg: float) -> None:
    h = body_heights_mm(_single(_box(25.0), tilt_deg=tilt_deg), 20)
    for value in (h.anterior, h.middle, h.posterior):
        assert value == pytest.approx(25.0, abs=0.5)


@pytest.mark.parametrize("tilt_deg", [0.0, 15.0])
def test_wedge_heights_follow_the_sloped_endplate(tilt_deg: float) -> None:
    depth = 33.0
    h = body_heights_mm(_single(_wedge(25.0, 15.0, depth), tilt_deg=tilt_deg, depth_mm=depth), 20)
    # Heights at f, 50 % and 1 - f of the depth from the posterior wall (linear profile).
    f = ANTERIOR_FRACTION
    assert h.posterior == pytest.approx(25.0 - 10.0 * f, abs=0.5)
    assert h.middle == pytest.approx(20.0, abs=0.5)
    assert h.anterior == pytest.approx(25.0 - 10.0 * (1 - f), abs=0.5)


def test_biconcave_middle_height() -> None:
    h = body_heights_mm(_single(_biconcave(25.0, 8.0, 33.0)), 20)
    assert h.anterior == pytest.approx(25.0, abs=0.5)
    assert h.posterior == pytest.approx(25.0, abs=0.5)
    assert h.middle == pytest.approx(17.0, abs=0.5)


def test_anterior_side_comes_from_the_affine_not_the_array_order() -> None:
    # Columns flipped: now columns run posterior -> anterior.
    labels = np.zeros((N_SLICES, N_ROWS, N_COLS), dtype=np.int16)
    _paint(
        labels,
        20,
        _wedge(25.0, 15.0, 33.0),
        depth_mm=33.0,
        base_row_mm=110.0,
        posterior_col_mm=10.0,
        anterior_sign=1.0,
    )
    flipped = SAGITTAL.copy()
    flipped[:, 2] *= -1
    h = body_heights_mm(_volume(labels, flipped), 20)
    assert h.anterior == pytest.approx(25.0 - 10.0 * (1 - ANTERIOR_FRACTION), abs=0.5)
    assert h.posterior == pytest.approx(25.0 - 10.0 * ANTERIOR_FRACTION, abs=0.5)


def test_mid_sagittal_plane_is_the_central_slice() -> None:
    labels = np.zeros((N_SLICES, N_ROWS, N_COLS), dtype=np.int16)
    labels[2:9, 100:142, 20:75] = 20  # slices 2..8, centre 5
    labels[2:5, 90:152, 20:75] = 20  # lateral slices taller: must not be measured
    labels[7:9, 110:132, 20:75] = 20  # the other side shorter
    labels[5, 100:142, 20:75] = 0
    labels[5, 101:141, 20:75] = 20  # central slice: 40 rows = 24 mm
    h = body_heights_mm(_volume(labels), 20)
    assert h.middle == pytest.approx(24.0, abs=0.05)


def test_missing_label_is_an_error() -> None:
    labels = np.zeros((4, 10, 10), dtype=np.int16)
    labels[1:3, 2:8, 2:8] = 20
    with pytest.raises(ValueError, match="label 21 is not in the label map"):
        body_heights_mm(_volume(labels), 21)


@pytest.mark.parametrize(
    ("loss", "grade"),
    [(0.0, 0), (19.9, 0), (20.0, 1), (24.9, 1), (25.0, 2), (39.9, 2), (40.0, 2), (40.1, 3)],
)
def test_genant_grade_boundaries(loss: float, grade: int) -> None:
    assert genant_grade(loss) == grade


def test_genant_grade_reads_settings() -> None:
    settings = resolve_settings({"genant_grade1_min_percent": 15})
    assert genant_grade(17.0, settings) == 1
    assert genant_grade(17.0, {"genant_grade1_min_percent": 18}) == 0
    assert genant_grade(-5.0) == 0
    with pytest.raises(ValueError, match="finite"):
        genant_grade(float("nan"))


@pytest.mark.parametrize(
    ("heights", "expected_type"),
    [
        (Heights(15.0, 20.0, 25.0), "wedge"),
        (Heights(24.0, 16.0, 24.5), "biconcave"),
        (Heights(24.0, 23.0, 15.0), "crush"),
        (Heights(15.0, 15.5, 16.0), "crush"),  # uniformly reduced
    ],
)
def test_deformity_type(heights: Heights, expected_type: str) -> None:
    expected = Heights(25.0, 25.0, 25.0)
    assert deformity_type(heights, expected) == expected_type
    assert deformity_type(heights, expected, grade=0) == "none"


def _spine(shapes: dict[int, Profile]) -> Volume:
    labels = np.zeros((N_SLICES, 600, N_COLS), dtype=np.int16)
    rows, cols = np.meshgrid(np.arange(600), np.arange(N_COLS), indexing="ij")
    for i, (label, profile) in enumerate(sorted(shapes.items())):
        base = 20.0 + 34.0 * (i + 1)  # bodies stacked downward, 34 mm apart
        u = base - rows * SPACING[1]  # mm above the body's base
        d = 43.0 - cols * SPACING[2]  # columns run anterior -> posterior; posterior at 43 mm
        lo, hi = profile(d)
        inside = (d >= 0) & (d <= 33.0) & (u >= lo) & (u <= hi)
        labels[2:10][:, inside] = label
    return Volume.from_geometry(labels, spacing_mm=SPACING, direction=SAGITTAL)


def test_assess_deformities_against_normal_neighbours() -> None:
    vol = _spine(
        {
            19: _box(24.0),
            20: _wedge(25.0, 15.0, 33.0),  # anterior ~16 vs expected ~24.5
            21: _box(25.0),
            22: _box(16.8),  # crush: 16.8 vs (25 + 26) / 2
            23: _box(26.0),
            24: _biconcave(26.0, 9.0, 33.0),  # middle 17 vs 26 (only a neighbour above)
        }
    )
    heights = {lab: body_heights_mm(vol, lab) for lab in range(19, 25)}
    result = assess_deformities(heights)
    assert [result[lab].genant_grade for lab in (19, 21, 23)] == [0, 0, 0]
    assert result[20].deformity == "wedge"
    assert result[20].expected_from == (19, 21)
    wedge_anterior = 25.0 - 10.0 * (1 - ANTERIOR_FRACTION)
    assert result[20].height_loss_percent == pytest.approx(
        100 * (1 - wedge_anterior / 24.5), abs=2.5
    )
    assert result[20].genant_grade == 2
    assert result[22].deformity == "crush"
    assert result[22].expected_from == (21, 23)
    assert result[22].height_loss_percent == pytest.approx(100 * (1 - 16.8 / 25.5), abs=2.5)
    assert result[22].genant_grade == 2
    assert result[24].deformity == "biconcave"
    assert result[24].expected_from == (23,)
    assert result[24].height_loss_percent == pytest.approx(100 * (1 - 17.0 / 26.0), abs=2.5)
    assert result[24].genant_grade == 2


def test_isolated_body_uses_its_own_posterior_height() -> None:
    vol = _single(_wedge(25.0, 10.0, 33.0))
    result = assess_deformities({20: body_heights_mm(vol, 20)})
    f = ANTERIOR_FRACTION  # anterior at 1 - f of the depth, posterior at f
    anterior, posterior = 25 - 15 * (1 - f), 25 - 15 * f
    assert result[20].height_loss_percent == pytest.approx(
        100 * (1 - anterior / posterior), abs=2.5
    )
    assert result[20].genant_grade == 3
    assert result[20].deformity == "wedge"
    assert result[20].expected_from == ()


def test_assess_deformities_rejects_bad_order() -> None:
    h = Heights(25.0, 25.0, 25.0)
    with pytest.raises(ValueError, match="order must list each label"):
        assess_deformities({20: h, 21: h}, order=[20])
