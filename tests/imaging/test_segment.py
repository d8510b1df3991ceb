"""Tests of `bmetrack.imaging.segment` on small synthetic sagittal spines built here.

The synthetic spine is defined in world (LPS) millimetres and sampled on any grid, so flipped or
oblique acquisitions of the same anatomy can be compared.  Its truth labels come from the same
geometric definition, independently of the segmenter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

import bmetrack.imaging.segment as segment_module
from bmetrack.anatomy import label_from_level
from bmetrack.imaging.segment import (
    Contrast,
    Segmentation,
    SegmentationError,
    segment_vertebral_bodies,
)
from bmetrack.imaging.segment_delineate import BodyMask, BodySpan
from bmetrack.imaging.volume import Volume

# Tissue signal per contrast (arbitrary units, before scanner scaling).
TISSUE = {
    "t1": {
        "air": 0.02, "fat": 1.0, "muscle": 0.35, "marrow": 0.75, "cortex": 0.15, "disc": 0.35,
        "csf": 0.12, "cord": 0.45, "edema": 0.32, "cement": 0.03,
    },
    "stir": {
        "air": 0.02, "fat": 0.10, "muscle": 0.30, "marrow": 0.20, "cortex": 0.08, "disc": 0.60,
        "csf": 1.00, "cord": 0.50, "edema": 0.80, "cement": 0.03,
    },
    "t2": {
        "air": 0.02, "fat": 0.70, "muscle": 0.25, "marrow": 0.50, "cortex": 0.08, "disc": 0.75,
        "csf": 1.00, "cord": 0.45, "edema": 0.80, "cement": 0.03,
    },
}  # fmt: skip
LEVELS_ALL = ["T8", "T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1"]


@dataclass
class SpineSpec:
    """Geometry of the synthetic spine (world mm, LPS: x left, y posterior, z superior)."""

    levels: list[str] = field(default_factory=lambda: list(LEVELS_ALL))
    body_height_mm: float = 24.0
    disc_mm: float = 8.0
    depth_mm: float = 32.0
    width_mm: float = 44.0
    lordosis_per_mm2: float = 0.0006
    sacrum: bool = True
    edema_level: str | None = None
    cement_level: str | None = None
    # Tissue with the marrow's signal beside this body, left and right (ribs, fatty muscle).
    marrow_beside_level: str | None = None
    # Wider bodies at some levels (mm), e.g. to reach beyond the slab sideways.
    width_by_level: dict[str, float] = field(default_factory=dict)


def _level_centres_mm(spec: SpineSpec) -> dict[str, float]:
    """z of each body centre; S1 (if listed) at z = 0, bodies stacked upward."""
    period = spec.body_height_mm + spec.disc_mm
    return {lev: (len(spec.levels) - 1 - i) * period for i, lev in enumerate(spec.levels)}


def _spine_y(z: np.ndarray) -> np.ndarray:
    return 0.0006 * (z - 130.0) ** 2


def render_spine(
    spec: SpineSpec, affine: np.ndarray, shape: tuple[int, int, int], contrast: str, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Image and truth labels of the synthetic spine on the grid (affine, shape)."""
    rng = np.random.default_rng(seed)
    k, i, j = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    idx = np.stack([k, i, j, np.ones_like(k)], axis=-1)
    world = idx @ affine.T
    x, y, z = world[..., 0], world[..., 1], world[..., 2]
    tissue = TISSUE[contrast]
    img = np.full(shape, tissue["air"])
    labels = np.zeros(shape, dtype=np.int16)
    yc = spec.lordosis_per_mm2 / 0.0006 * _spine_y(z)
    v = y - yc  # anterior-posterior coordinate relative to the body centre line
    # Trunk: fat shell around muscle; the spine sits in its posterior third.
    trunk = ((v + 40.0) / 130.0) ** 2 + (x / 170.0) ** 2
    img[trunk < 1.0] = tissue["fat"]
    img[trunk < 0.80] = tissue["muscle"]
    half_w, half_d = spec.width_mm / 2, spec.depth_mm / 2
    centres = _level_centres_mm(spec)
    top = max(centres.values()) + spec.body_height_mm / 2 + spec.disc_mm
    bottom = min(centres.values()) - spec.body_height_mm / 2
    # Discs are as wide as the bodies they join: each point takes the width of the nearest body.
    levels = list(centres)
    nearest = np.argmin(np.abs(z[..., None] - np.array([centres[lev] for lev in levels])), axis=-1)
    widths = np.array([spec.width_by_level.get(lev, spec.width_mm) for lev in levels])
    column_radial2 = (x / (widths[nearest] / 2)) ** 2 + (v / half_d) ** 2
    column = (column_radial2 < 1.0) & (z < top) & (z > bottom)
    img[column] = tissue["disc"]
    # Posterior elements: pedicles, laminae, spinous processes (bone) around the canal.
    canal_v = half_d + 9.0
    for lev, zc in centres.items():
        u = z - zc
        hh = spec.body_height_mm / 2
        if lev == "S1":
            continue
        ped = (np.abs(u) < 0.35 * spec.body_height_mm) & (np.abs(np.abs(x) - 12.0) < 4.0)
        ped &= (v > half_d - 3.0) & (v < canal_v + 10.0)
        lam = (u > -hh) & (u < hh - 4) & (v > canal_v + 8.0) & (v < canal_v + 14.0)
        lam &= np.abs(x) < 18.0
        spin = (u > -hh - 6) & (u < hh - 8) & (v > canal_v + 8.0) & (v < canal_v + 45.0)
        spin &= np.abs(x) < 4.0
        img[ped | lam | spin] = tissue["marrow"]
    for lev, zc in centres.items():
        u = z - zc
        if lev in spec.width_by_level:
            radial2 = (x / (spec.width_by_level[lev] / 2)) ** 2 + (v / half_d) ** 2
        else:
            radial2 = (x / half_w) ** 2 + (v / half_d) ** 2
        hh = spec.body_height_mm / 2 - 1.5 * (1.0 - np.clip(radial2, 0, 1))  # concave endplates
        body = (radial2 < 1.0) & (np.abs(u) < hh)
        inner = (radial2 < (1.0 - 1.2 / half_d) ** 2) & (np.abs(u) < hh - 1.2)
        img[body] = tissue["cortex"]
        img[inner] = tissue["marrow"]
        if lev == spec.edema_level:
            img[inner & (u > -0.2 * spec.body_height_mm)] = tissue["edema"]
        if lev == spec.marrow_beside_level:
            beside = (
                (np.abs(u) < hh + spec.disc_mm) & (np.abs(x) > half_w + 1.5) & (np.abs(v) < half_d)
            )
            img[beside] = tissue["marrow"]
        if lev == spec.cement_level:
            blob = (x / 12.0) ** 2 + ((v + 2.0) / 9.0) ** 2 + (u / 8.0) ** 2 < 1.0
            img[inner & blob] = tissue["cement"]
        labels[body] = label_from_level(lev)
    if spec.sacrum and "S1" in centres:
        # Fused sacral segments below S1: bone tilting backwards, no disc, to the FOV edge.
        zs = centres["S1"] - spec.body_height_mm / 2
        w = zs - z
        vs = v - 0.7 * w
        sac = (w > 0) & (w < 120) & ((x / (half_w * 1.1)) ** 2 + (vs / (half_d * 0.8)) ** 2 < 1)
        img[sac] = tissue["marrow"]
        img[sac & (np.abs(w - 1.5) < 1.5)] = tissue["cortex"]
    # Canal with CSF and cord; below S1 it follows the sacrum backwards.
    if spec.sacrum and "S1" in centres:
        w = np.clip(centres["S1"] - spec.body_height_mm / 2 - z, 0.0, None)
        v = v - 0.7 * w
    canal = (x**2 + (v - canal_v) ** 2) < 8.0**2
    img[canal] = tissue["csf"]
    cord = (x**2 + (v - canal_v) ** 2 < 4.0**2) & (z > centres.get("L1", 0.0))
    img[cord] = tissue["cord"]
    # Bias field, noise, scanner scaling.
    bias = 1.0 + 0.4 * (i / shape[1]) - 0.2 * (j / shape[2])
    img = img * bias + rng.normal(0.0, 0.025, shape)
    img = np.abs(img) * 1370.0
    return img.astype(np.float32), labels


def sagittal_affine(
    spacing_mm: tuple[float, float, float],
    origin_lps: tuple[float, float, float],
    *,
    flip_rows: bool = False,
    tilt_deg: float = 0.0,
) -> np.ndarray:
    """Affine of a sagittal series: slices along -x, rows S->I (or I->S), columns A->P."""
    t = np.deg2rad(tilt_deg)
    row = np.array([0.0, np.sin(t), -np.cos(t)])  # mostly inferior
    col = np.array([0.0, np.cos(t), np.sin(t)])  # mostly posterior
    if flip_rows:
        row = -row
    dirs = np.stack([np.array([-1.0, 0.0, 0.0]), row, col], axis=1)
    aff = np.eye(4)
    aff[:3, :3] = dirs * np.asarray(spacing_mm)
    aff[:3, 3] = origin_lps
    return aff


def make_spine(
    contrast: str = "t1",
    spec: SpineSpec | None = None,
    *,
    z_top_mm: float = 328.0,
    n_rows: int = 300,
    flip_rows: bool = False,
    tilt_deg: float = 0.0,
    seed: int = 0,
) -> tuple[Volume, Volume]:
    """A synthetic sagittal study: (image, truth labels) on a 13 x n_rows x 180 grid."""
    spec = spec or SpineSpec()
    spacing = (4.0, 1.25, 1.25)
    shape = (13, n_rows, 180)
    # First voxel: right-most slice, top row, front column.
    origin = np.array([24.0, -110.0, z_top_mm])
    aff = sagittal_affine(spacing, tuple(origin), flip_rows=False, tilt_deg=tilt_deg)
    if flip_rows:
        last_row = aff[:3, :3] @ np.array([0.0, n_rows - 1.0, 0.0]) + aff[:3, 3]
        aff = sagittal_affine(spacing, tuple(last_row), flip_rows=True, tilt_deg=tilt_deg)
    img, lab = render_spine(spec, aff, shape, contrast, seed=seed)
    return Volume(img, aff, modality="MR"), Volume(lab, aff)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean masks."""
    denom = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / denom) if denom else 1.0


def per_body_dice(seg: Segmentation, truth: Volume) -> dict[int, float]:
    """Dice per truth label present in the segmentation's label set."""
    out = {}
    for lab in np.unique(truth.array):
        if lab == 0:
            continue
        out[int(lab)] = dice(seg.labels.array == lab, truth.array == lab)
    return out


# --------------------------------------------------------------------------- fixtures
FULL_LEVELS_BOTTOM_UP = ["S1", "L5", "L4", "L3", "L2", "L1", "T12", "T11", "T10", "T9"]


@pytest.fixture(scope="module")
def stir_case() -> tuple[Volume, Volume, Segmentation]:
    spec = SpineSpec(edema_level="L1", cement_level="L3")
    image, truth = make_spine("stir", spec)
    return image, truth, segment_vertebral_bodies(image, "stir")


@pytest.fixture(scope="module")
def t1_case() -> tuple[Volume, Volume, Segmentation]:
    spec = SpineSpec(edema_level="L1", cement_level="L3")
    image, truth = make_spine("t1", spec, seed=1)
    return image, truth, segment_vertebral_bodies(image, Contrast.T1)


# --------------------------------------------------------------------------- tests
def test_bodies_found_ordered_and_labelled_from_s1(stir_case) -> None:
    image, _, seg = stir_case
    assert seg.levels == FULL_LEVELS_BOTTOM_UP
    assert seg.labels.array.dtype == np.int16
    assert seg.labels.has_same_geometry(image)
    assert set(np.unique(seg.labels.array)) == {0} | {
        label_from_level(lev) for lev in FULL_LEVELS_BOTTOM_UP
    }
    # Bottom-up order: the world z of each body's centre rises along the list.
    z = []
    for lev in seg.levels:
        idx = np.argwhere(seg.labels.array == label_from_level(lev)).mean(axis=0)
        z.append(image.world_coordinates(idx)[2])
    assert np.all(np.diff(z) > 15.0)
    assert seg.parameters["sacrum_found"] is True
    assert seg.method_version


def test_dice_of_every_body_including_edema_and_cement(stir_case, t1_case) -> None:
    for _, truth, seg in (stir_case, t1_case):
        scores = per_body_dice(seg, truth)
        for lev in FULL_LEVELS_BOTTOM_UP[1:]:
            # T12 sits on the edematous L1, whose dark T1 signal merges with the disc.
            assert scores[label_from_level(lev)] >= 0.75, (lev, scores)
        # S1's lower end is the fused S1-S2 junction, a thin line: looser bound.
        assert scores[label_from_level("S1")] >= 0.6, scores
        # The edematous (L1) and cemented (L3) bodies are segmented about as well as the
        # others (measured >= 0.84).
        assert scores[label_from_level("L1")] >= 0.8
        assert scores[label_from_level("L3")] >= 0.8


def test_cement_void_is_inside_the_body(t1_case) -> None:
    image, truth, seg = t1_case
    dark = image.array < 0.1 * np.percentile(image.array, 99)
    cement = dark & (truth.array == label_from_level("L3"))
    assert cement.sum() > 50
    assert np.mean(seg.labels.array[cement] == label_from_level("L3")) > 0.9


def test_posterior_elements_are_not_labelled(stir_case) -> None:
    image, _, seg = stir_case
    spec = SpineSpec()
    k, i, j = np.meshgrid(*[np.arange(n) for n in image.shape], indexing="ij")
    world = image.world_coordinates(np.stack([k, i, j], axis=-1))
    v = world[..., 1] - _spine_y(world[..., 2])
    half_d = spec.depth_mm / 2
    # Pedicles and laminae (T9-L5): behind the posterior body wall, beside and behind the
    # canal; above the sacrum, which tilts backwards.
    behind = (v > half_d + 3.0) & (np.abs(world[..., 0]) < 20.0) & (world[..., 2] > 12.0)
    bone = image.array > 0.5 * np.percentile(image.array[seg.labels.array > 0], 50)
    assert (behind & bone).sum() > 1000
    assert not np.any(seg.labels.array[behind])


def test_partial_top_body_left_out_and_reported(stir_case) -> None:
    _, truth, seg = stir_case
    assert "T8" in seg.partial
    assert not np.any(seg.labels.array == label_from_level("T8"))
    assert any("T8" in w for w in seg.warnings)
    # The truth does hold voxels of T8: it is in the image, only cut.
    assert np.any(truth.array == label_from_level("T8"))


def test_levels_from_lowest_level_without_sacrum() -> None:
    # The field of view ends in the middle of L5: no sacrum, L5 partly visible.
    image, truth = make_spine("stir", SpineSpec(), n_rows=238, seed=2)
    seg = segment_vertebral_bodies(image, "stir", lowest_level="l4")
    assert seg.levels == ["L4", "L3", "L2", "L1", "T12", "T11", "T10", "T9"]
    assert seg.parameters["sacrum_found"] is False
    assert "L5" in seg.partial and "T8" in seg.partial
    scores = per_body_dice(seg, truth)
    assert min(scores[label_from_level(lev)] for lev in seg.levels) >= 0.8
    assert not np.any(seg.labels.array == label_from_level("L5"))
    unnamed = segment_vertebral_bodies(image, "stir")
    assert unnamed.levels == [f"V{i}" for i in range(1, 9)]
    assert any("V1..Vn" in w for w in unnamed.warnings)
    assert set(np.unique(unnamed.labels.array)) == {0} | set(range(101, 109))
    # Same bodies, other names.
    for i, lev in enumerate(seg.levels, start=1):
        same = (unnamed.labels.array == 100 + i) == (seg.labels.array == label_from_level(lev))
        assert same.all()


def _outer_slice_fraction(labels: np.ndarray, label: int) -> float:
    """Hand computation: larger outer-slice area of a label over its largest slice area."""
    area = [(labels[k] == label).sum() for k in range(labels.shape[0])]
    return max(area[0], area[-1]) / max(area)


def test_bodies_cut_by_the_slab_sideways_are_partial_and_still_counted() -> None:
    # L5 80 mm wide: beyond the 13 x 4 mm slab (outer slice centres x = +-24 mm) on both
    # sides, fully visible in plane.  The other bodies (44 mm) end inside the slab.  S1 is
    # never judged cut sideways (its alae continue it), so it is not widened here.
    spec = SpineSpec(width_by_level={"L5": 80.0})
    image, truth = make_spine("stir", spec, seed=5)
    t = truth.array
    # Elliptic footprint: the outer section is sqrt(1 - (24 / 40)^2) = 0.8 of the middle one.
    assert _outer_slice_fraction(t, label_from_level("L5")) == pytest.approx(0.8, abs=0.05)
    assert _outer_slice_fraction(t, label_from_level("L4")) == 0.0
    seg = segment_vertebral_bodies(image, "stir")
    assert seg.parameters["sacrum_found"] is True
    # Names still count L5: the body above S1 is L4, not L5.
    assert seg.levels == ["S1", *FULL_LEVELS_BOTTOM_UP[2:]]
    assert "L5" in seg.partial
    assert sum("left/right edge of the slab" in w for w in seg.warnings) == 1
    assert not np.any(seg.labels.array == label_from_level("L5"))
    scores = per_body_dice(seg, truth)
    assert min(scores[label_from_level(lev)] for lev in seg.levels) >= 0.8


def test_laterally_cut_anchor_body_keeps_its_name() -> None:
    # The field of view ends in L5; L4 (the user's lowest_level, seen whole in plane) is too
    # wide for the slab: it is left out as partial and L3 keeps its name.
    spec = SpineSpec(width_by_level={"L4": 80.0})
    image, truth = make_spine("stir", spec, n_rows=238, seed=6)
    seg = segment_vertebral_bodies(image, "stir", lowest_level="L4")
    assert seg.levels == ["L3", "L2", "L1", "T12", "T11", "T10", "T9"]
    assert "L4" in seg.partial and "L5" in seg.partial
    assert any("L4 is cut by the left/right edge" in w for w in seg.warnings)
    scores = per_body_dice(seg, truth)
    assert min(scores[label_from_level(lev)] for lev in seg.levels) >= 0.8


def test_flipped_rows_give_the_same_levels_and_masks() -> None:
    spec = SpineSpec()
    image, truth = make_spine("stir", spec, flip_rows=True, seed=3)
    assert image.orientation[1] == "S"  # rows now run inferior -> superior
    seg = segment_vertebral_bodies(image, "stir")
    assert seg.levels == FULL_LEVELS_BOTTOM_UP
    scores = per_body_dice(seg, truth)
    assert min(scores[label_from_level(lev)] for lev in seg.levels[1:]) >= 0.8
    assert scores[label_from_level("S1")] >= 0.6


def test_t2_input_and_transposed_axes() -> None:
    image, truth = make_spine("t2", SpineSpec(), seed=4)
    # Same data with the row and column axes swapped: directions come from the affine.
    perm = np.eye(4)[:, [0, 2, 1, 3]]
    swapped = Volume(np.transpose(image.array, (0, 2, 1)), image.affine @ perm)
    seg = segment_vertebral_bodies(swapped, "T2")
    assert seg.levels == FULL_LEVELS_BOTTOM_UP
    assert seg.labels.shape == swapped.shape
    back = np.transpose(seg.labels.array, (0, 2, 1))
    for lev in seg.levels[1:]:
        lab = label_from_level(lev)
        assert dice(back == lab, truth.array == lab) >= 0.8


def test_non_sagittal_input_is_rejected() -> None:
    axial = Volume.from_geometry(
        np.random.default_rng(0).random((20, 64, 64)).astype(np.float32),
        spacing_mm=(5.0, 0.8, 0.8),
        direction=np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]),
    )  # slices along z, rows along x, columns along y: an axial stack
    with pytest.raises(SegmentationError, match="not sagittal"):
        segment_vertebral_bodies(axial, "t1")


def test_image_without_spine_is_rejected() -> None:
    rng = np.random.default_rng(5)
    image, _ = make_spine("t1", SpineSpec(), seed=5)
    noise = image.with_array(rng.normal(100.0, 10.0, image.shape).astype(np.float32))
    with pytest.raises(SegmentationError, match="no spine found"):
        segment_vertebral_bodies(noise, "t1")


def test_bad_arguments_are_reported() -> None:
    image, _ = make_spine("t1", SpineSpec(), n_rows=60)
    with pytest.raises(ValueError, match="contrast"):
        segment_vertebral_bodies(image, "flair")
    with pytest.raises(ValueError, match="not a vertebral level"):
        segment_vertebral_bodies(image, "t1", lowest_level="Q3")


# --------------------------------------------------------------------------- two sequences
def test_t1_with_stir_on_the_same_grid() -> None:
    spec = SpineSpec(edema_level="L1", cement_level="L3")
    t1, truth = make_spine("t1", spec, seed=3)
    stir, _ = make_spine("stir", spec, seed=4)
    seg = segment_vertebral_bodies(t1, "t1", other=stir, other_contrast=Contrast.STIR)
    assert seg.levels == FULL_LEVELS_BOTTOM_UP
    assert seg.labels.has_same_geometry(t1)
    assert seg.parameters["other_contrast"] == "stir"
    scores = per_body_dice(seg, truth)
    for lev in FULL_LEVELS_BOTTOM_UP[1:]:
        # Measured >= 0.74 (T12, above the edematous L1 whose dark T1 signal meets its disc).
        assert scores[label_from_level(lev)] >= 0.7, (lev, scores)
    # The reverse order (STIR as the image) gives the same bodies.
    rev = segment_vertebral_bodies(stir, "stir", other=t1, other_contrast="t1")
    assert rev.levels == seg.levels
    same = dice(rev.labels.array > 0, seg.labels.array > 0)
    assert same > 0.95


def test_second_sequence_arguments_are_checked() -> None:
    t1, _ = make_spine("t1", SpineSpec())
    with pytest.raises(ValueError, match="other_contrast is required"):
        segment_vertebral_bodies(t1, "t1", other=t1)
    with pytest.raises(ValueError, match="must complement"):
        segment_vertebral_bodies(t1, "t1", other=t1, other_contrast="t1")
    with pytest.raises(ValueError, match="other_contrast must be one of"):
        segment_vertebral_bodies(t1, "t1", other=t1, other_contrast="pd")
    small = Volume(t1.array[:, :200], t1.affine, modality="MR")
    with pytest.raises(ValueError, match="grid of image"):
        segment_vertebral_bodies(t1, "t1", other=small, other_contrast="stir")


def test_two_sequence_path_on_the_realistic_phantom() -> None:
    """Demo-size phantom (seed measured during development): level labels and body Dice.

    Truth is the phantom's own label map; thresholds sit a little below the measured values
    (method 1.1: 7 of 8 fully visible bodies with Dice > 0.5, mean Dice 0.79; the miss is a
    wedge-fractured T12 with band edema, Dice 0.40, delineated only in part).
    """
    phantom_mod = pytest.importorskip("bmetrack.simulate.phantom")
    params = phantom_mod.PhantomParameters(
        n_rows=256, n_columns=256, pixel_spacing_mm=1.2, sacrum_in_view=True
    )
    ph = phantom_mod.make_phantom(params, seed=5)
    t1 = ph.t1.resample_to(ph.stir, order=1, fill_value=np.nan)
    anchor = None if ph.sacrum_in_view else ph.lowest_level
    seg = segment_vertebral_bodies(
        ph.stir, "stir", other=t1, other_contrast="t1", lowest_level=anchor
    )
    full = ph.truth[~ph.truth["partially_visible"]]
    scores = [dice(seg.labels.array == lab, ph.labels.array == lab) for lab in full["label"]]
    assert np.mean(np.asarray(scores) > 0.5) >= 0.85, scores
    assert np.mean(scores) >= 0.75, scores


@pytest.mark.slow
def test_level_labels_on_three_realistic_phantoms() -> None:
    """Levels counted from S1 on demo-size phantoms (STIR + T1 on different grids).

    Seeds 2 and 9 have a fused S1-S2 remnant that the disc chain picks up as a disc (the old
    rule then missed the sacrum: V1..Vn) and a near-void chained position above L5-S1; the end
    of the dural sac in view fixes L5-S1.  Development measured 27 of 27 bodies with the right
    level; the threshold allows one miss.  Truth is the phantom's own label map.
    """
    phantom_mod = pytest.importorskip("bmetrack.simulate.phantom")
    params = phantom_mod.PhantomParameters(
        n_rows=256, n_columns=256, pixel_spacing_mm=1.2, sacrum_in_view=True
    )
    correct: list[bool] = []
    for seed in (2, 9, 10):
        ph = phantom_mod.make_phantom(params, seed=seed)
        t1 = ph.t1.resample_to(ph.stir, order=1, fill_value=np.nan)
        seg = segment_vertebral_bodies(ph.stir, "stir", other=t1, other_contrast="t1")
        assert seg.parameters["sacrum_found"], seed
        full = ph.truth[~ph.truth["partially_visible"]]
        correct += [
            dice(seg.labels.array == lab, ph.labels.array == lab) > 0.5 for lab in full["label"]
        ]
    assert len(correct) >= 20
    assert np.mean(correct) >= 0.95, correct


# --------------------------------------------------------------------------- fixed failure modes
def test_anchor_is_trusted_when_a_long_partial_body_ends_the_field_of_view() -> None:
    """FOV ending low in L5 (about 83 % of it visible), no sacrum, lowest_level L4 given.

    Method 1.0 took the long bony stretch below the L4-L5 disc for the sacrum and counted
    from S1 (L5 named S1, every level shifted), ignoring the user's anchor.  Without a direct
    sacrum cue (the end of the thecal sac) the anchor must name the bodies.
    """
    spec = SpineSpec()
    t1, truth = make_spine("t1", spec, n_rows=244, seed=7)
    stir, _ = make_spine("stir", spec, n_rows=244, seed=8)
    seg = segment_vertebral_bodies(stir, "stir", other=t1, other_contrast="t1", lowest_level="L4")
    assert seg.parameters["sacrum_found"] is False
    assert seg.levels == ["L4", "L3", "L2", "L1", "T12", "T11", "T10", "T9"]
    assert "L5" in seg.partial
    scores = per_body_dice(seg, truth)
    assert min(scores[label_from_level(lev)] for lev in seg.levels) >= 0.8, scores
    assert not np.any(seg.labels.array == label_from_level("S1"))


def test_top_body_whose_upper_disc_is_cut_by_the_field_of_view_is_kept() -> None:
    """The field of view starts in the middle of the T8-T9 disc (z 304 mm; T9's upper
    endplate 4 mm below the edge): no disc band above T9 can be chained, but T9 is whole and
    must be labelled (method 1.0 called it partial and left it out)."""
    image, truth = make_spine("stir", SpineSpec(), z_top_mm=304.0, seed=6)
    seg = segment_vertebral_bodies(image, "stir")
    assert seg.levels == FULL_LEVELS_BOTTOM_UP
    assert seg.parameters["virtual_top_disc"] is True
    assert seg.partial == []
    assert per_body_dice(seg, truth)[label_from_level("T9")] >= 0.85


def test_partly_visible_top_body_is_still_left_out(stir_case) -> None:
    """T8 with its top 4 mm cut has no disc signal at the image edge: not whole."""
    _, _, seg = stir_case
    assert seg.parameters["virtual_top_disc"] is False
    assert "T8" in seg.partial


def test_periodic_contrast_prefers_a_column_of_discs_to_smooth_texture() -> None:
    """For a cosine of period P the normalised autocorrelation is about cos(2 pi lag / P):
    -1 at P/2 and +1 at P, a rise near 2 (less the finite-length taper); smooth noise decays
    monotonically and has no dip-to-peak rise."""
    from scipy import ndimage

    from bmetrack.imaging.segment_detect import _periodic_contrast

    n, period = 300, 30
    cosine = np.cos(2 * np.pi * np.arange(n) / period)
    expected = np.cos(0.0) * (1 - period / n) - np.cos(np.pi) * (1 - (period / 2) / n)
    assert _periodic_contrast(cosine, 18, 55) == pytest.approx(expected, abs=0.05)
    smooth = ndimage.gaussian_filter1d(np.random.default_rng(0).normal(size=n), 12.0)
    assert _periodic_contrast(smooth, 18, 55) < 0.5


def test_tissue_with_marrow_signal_beside_a_body_is_not_taken_for_more_of_it() -> None:
    # Beside L4 and its discs, left and right, lies tissue with the marrow's signal: the
    # body's outline must stop at its own lateral edge (no disc above and below there).
    spec = SpineSpec(marrow_beside_level="L4", width_mm=36.0)
    image, truth = make_spine("stir", spec, seed=3)
    seg = segment_vertebral_bodies(image, "stir")
    lab = label_from_level("L4")
    true_slices = set(np.flatnonzero((truth.array == lab).any(axis=(1, 2))))
    found_slices = set(np.flatnonzero((seg.labels.array == lab).any(axis=(1, 2))))
    assert found_slices <= true_slices
    assert per_body_dice(seg, truth)[lab] >= 0.95


def test_a_body_much_shallower_than_its_neighbours_is_outlined_again_deeper() -> None:
    # Depths (mm) of five first outlines: the middle one stopped half way (an edge inside it).
    first = [
        BodyMask(np.ones((1, 2, 2), bool), (0, 0), (0, 0), depth)
        for depth in (36.0, 38.0, 19.0, 40.0, 39.0)
    ]
    spans = [BodySpan((10.0 * i, 0.0), (10.0 * i + 8.0, 0.0)) for i in range(5)]
    calls: list[BodySpan] = []

    def outline_again(span: BodySpan) -> BodyMask:
        calls.append(span)
        return BodyMask(np.ones((1, 2, 2), bool), (0, 0), (0, 0), 37.0)

    out = segment_module._redelineate_shallow(first, spans, outline_again)
    # Only the shallow body is outlined again, its inner marker reaching 5 mm short of the
    # median depth of its two neighbours on each side (36, 38, 40, 39: 38.5).
    assert len(calls) == 1
    assert calls[0].upper == spans[2].upper
    assert calls[0].core_depth_mm == pytest.approx(38.5 - 5.0)
    assert [b.depth_mm if b is not None else None for b in out] == [36.0, 38.0, 37.0, 40.0, 39.0]
    # A second outline no deeper than the first is not taken.
    kept = segment_module._redelineate_shallow(
        first, spans, lambda span: BodyMask(np.ones((1, 2, 2), bool), (0, 0), (0, 0), 15.0)
    )
    assert kept[2] is first[2]


def test_a_lowest_body_at_the_edge_of_the_field_of_view_is_the_one_below_lowest_level() -> None:
    # The field of view ends one row below L5's inferior endplate: L5 is in the image but its
    # endplate lies on the edge (no disc below it seen).  The user names L4 the lowest body
    # seen whole; L5 must then be reported partial, not named L4.
    image, truth = make_spine("stir", SpineSpec(), n_rows=248, seed=2)
    l5_rows = np.flatnonzero((truth.array == label_from_level("L5")).any(axis=(0, 2)))
    assert l5_rows[-1] == 246  # inside the image (rows 0..247), touching its edge
    seg = segment_vertebral_bodies(image, "stir", lowest_level="L4")
    assert seg.levels[:2] == ["L4", "L3"]
    assert "L5" in seg.partial
    assert not np.any(seg.labels.array == label_from_level("L5"))
    scores = per_body_dice(seg, truth)
    assert min(scores[label_from_level(lev)] for lev in seg.levels) >= 0.8
