"""Vertebral body heights and Genant semiquantitative grading (METHOD.md 4).

Heights are measured on the mid-sagittal plane of each body, along the body's own
superior-inferior axis (bodies are tilted by lordosis and kyphosis):

- The sagittal plane is the array plane perpendicular to the array axis closest to the
  patient's left-right direction (taken from the affine, never assumed).  The body's plane
  is the central one of the planes the body occupies; when the centre falls between two
  planes, the one with the larger body area.
- The body's superior-inferior axis is found by a minimum-area bounding rectangle of the
  body's pixels in that plane, searched within +-`MAX_TILT_DEG` of the world
  superior-inferior direction projected into the plane.  For a trapezoidal (wedge) body the
  rectangle stays aligned with the intact walls, so the tilt is not confused with the
  fracture.
- The depth (posterior-anterior extent) of the body along the perpendicular axis is split
  into fractions: the anterior height is measured at `ANTERIOR_FRACTION` of the depth from
  the anterior surface, the middle height at the centre and the posterior height at
  `ANTERIOR_FRACTION` from the posterior surface.  Each height is the mean over
  `HEIGHT_BAND_LINES` lines spread over +-`HEIGHT_BAND_HALF_WIDTH_MM` (averages out pixel
  staircases), each line's height being the longest run of body along the line (sampled
  every `HEIGHT_STEP_MM`, body = linear interpolation of the mask >= 0.5), so a pixel-exact
  box of N pixels measures exactly N pixel spacings.

Grading (`assess_deformities`): METHOD.md 4 defines one *expected* height per body: the
posterior height of the nearest normal (grade 0) bodies above and below, weighted by inverse
distance in levels (the plain average of the two neighbours when both are adjacent); with a
normal neighbour on one side only, that neighbour's posterior height; with none, the body's
own posterior height (the default `EXPECTED_HEIGHT_RULE` = ``"posterior"``).
``"corresponding"`` instead compares each height with the same height of the neighbours
(anterior with anterior...), as quantitative morphometry variants do.
The height loss is the largest relative reduction ``1 - h / expected`` of the three; the
deformity type is the height with that largest reduction (anterior: wedge, middle:
biconcave, posterior: crush), or crush when all three are reduced alike (smallest reduction
at least `CRUSH_UNIFORMITY` times the largest).  Which bodies are normal is decided
iteratively: first by their own shape, then by comparison with their normal neighbours,
until the set no longer changes.  The sacrum (label 26) is measured but never serves as a
normal neighbour and is not graded (grade 0, deformity ``none``): Genant grading applies to
thoracic and lumbar bodies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from bmetrack.imaging.volume import Volume
from bmetrack.settings import Settings, resolve_settings

__all__ = [
    "ANTERIOR_FRACTION",
    "CRUSH_UNIFORMITY",
    "DEFORMITY_TYPES",
    "EXPECTED_HEIGHT_RULE",
    "HEIGHT_BAND_HALF_WIDTH_MM",
    "HEIGHT_BAND_LINES",
    "HEIGHT_STEP_MM",
    "MAX_TILT_DEG",
    "SACRUM_LABEL",
    "Deformity",
    "Heights",
    "assess_deformities",
    "body_heights_mm",
    "deformity_type",
    "genant_grade",
    "height_reductions",
    "heights_from_mask",
    "method_constants",
]

#: Anterior and posterior heights are measured this fraction of the depth in from the
#: anterior and the posterior surface (away from the rounded corners); the middle at 0.5.
ANTERIOR_FRACTION = 0.10
#: Half-width (mm, along the depth) of the band of lines averaged for each height.
HEIGHT_BAND_HALF_WIDTH_MM = 1.0
#: Number of lines averaged within the band.
HEIGHT_BAND_LINES = 5
#: Sampling step (mm) along each height line.
HEIGHT_STEP_MM = 0.1
#: Largest tilt (degrees) of a body's axis from the world superior-inferior direction.
MAX_TILT_DEG = 40.0
#: Crush when the smallest height reduction is at least this fraction of the largest.
CRUSH_UNIFORMITY = 0.75
#: How expected heights are formed from the normal neighbours: "corresponding" (anterior
#: from their anterior heights, middle from middle, posterior from posterior) or
#: "posterior" (one expected height, their posterior height, for all three: METHOD.md 4 read
#: literally, "1 - smallest height / expected height").
EXPECTED_HEIGHT_RULE = "posterior"
_EXPECTED_RULES = ("corresponding", "posterior")
#: VerSe label of S1 / the sacrum: measured, never graded, never a normal neighbour.
SACRUM_LABEL = 26
#: Deformity types (METHOD.md 4).
DEFORMITY_TYPES: tuple[str, ...] = ("none", "wedge", "biconcave", "crush")

# Iterations of the normal-set refinement (converges in 2-3 in practice).
_MAX_GRADING_ITERATIONS = 10


@dataclass(frozen=True)
class Heights:
    """Anterior, middle and posterior heights of a vertebral body in mm."""

    anterior: float
    middle: float
    posterior: float

    def as_dict(self) -> dict[str, float]:
        """``{"anterior": ..., "middle": ..., "posterior": ...}`` (the contract's heights_mm)."""
        return {"anterior": self.anterior, "middle": self.middle, "posterior": self.posterior}

    def as_array(self) -> npt.NDArray[np.float64]:
        """The three heights as an array (anterior, middle, posterior)."""
        return np.array([self.anterior, self.middle, self.posterior], dtype=np.float64)


@dataclass(frozen=True)
class Deformity:
    """Morphometry of one body: heights, expected heights, loss, grade and type.

    ``expected_from`` names the labels whose heights gave the expected heights; empty when
    the body's own posterior height was used.
    """

    label: int
    heights: Heights
    expected: Heights
    height_loss_percent: float
    genant_grade: int
    deformity: str
    expected_from: tuple[int, ...] = ()
    warnings: tuple[str, ...] = field(default=())


# ---------------------------------------------------------------------------- grading rules
def genant_grade(height_loss_percent: float, settings: Mapping[str, Any] | None = None) -> int:
    """Genant semiquantitative grade of a height loss (METHOD.md 4).

    Grade 0 below ``genant_grade1_min_percent`` (20); grade 1 from it up to below
    ``genant_grade2_min_percent`` (25); grade 2 from that up to and including
    ``genant_grade3_min_percent`` (40); grade 3 above it.  So 19.9 -> 0, 20 -> 1,
    24.9 -> 1, 25 -> 2, 40 -> 2, 40.1 -> 3, matching "0: < 20%, 1: 20-25%, 2: 25-40%,
    3: > 40%".

    Parameters
    ----------
    height_loss_percent : float
        Height loss in percent (negative values, taller than expected, are grade 0).
    settings : mapping, optional
        Settings (or overrides) holding the three thresholds; defaults from the registry.
    """
    s = _as_settings(settings)
    loss = float(height_loss_percent)
    if not np.isfinite(loss):
        msg = f"height_loss_percent must be a finite number, got {height_loss_percent!r}"
        raise ValueError(msg)
    if loss > s["genant_grade3_min_percent"]:
        return 3
    if loss >= s["genant_grade2_min_percent"]:
        return 2
    if loss >= s["genant_grade1_min_percent"]:
        return 1
    return 0


def height_reductions(heights: Heights, expected: Heights) -> npt.NDArray[np.float64]:
    """Relative reductions ``1 - h / expected`` of (anterior, middle, posterior)."""
    exp = expected.as_array()
    if not np.all(exp > 0):
        msg = f"expected heights must be positive, got {expected}"
        raise ValueError(msg)
    return np.asarray(1.0 - heights.as_array() / exp, dtype=np.float64)


def deformity_type(heights: Heights, expected: Heights, *, grade: int | None = None) -> str:
    """Genant deformity type: ``wedge``, ``biconcave``, ``crush`` (or ``none`` for grade 0).

    The height with the largest relative reduction names the type (anterior: wedge, middle:
    biconcave, posterior: crush); when the three are reduced alike (smallest reduction at
    least `CRUSH_UNIFORMITY` times the largest) the whole body is reduced: crush.

    Parameters
    ----------
    heights, expected : Heights
        Measured and expected heights (mm).
    grade : int, optional
        The body's Genant grade; 0 gives ``"none"``.
    """
    if grade == 0:
        return "none"
    red = height_reductions(heights, expected)
    largest = float(red.max())
    if largest <= 0:
        return "none"
    if float(red.min()) >= CRUSH_UNIFORMITY * largest:
        return "crush"
    return ("wedge", "biconcave", "crush")[int(np.argmax(red))]


# ---------------------------------------------------------------------------- heights
def body_heights_mm(labels: Volume, label: int) -> Heights:
    """Anterior, middle and posterior heights (mm) of one body on its mid-sagittal plane.

    Parameters
    ----------
    labels : Volume
        Integer label map of vertebral bodies.
    label : int
        The body's label.

    Raises
    ------
    ValueError
        When ``label`` is absent from ``labels`` or the grid has no sagittal plane.
    """
    arr = np.asarray(labels.array)
    mask = arr == int(label)
    if not mask.any():
        present = sorted(int(v) for v in np.unique(arr) if v > 0)
        msg = f"label {label} is not in the label map; labels present: {present}"
        raise ValueError(msg)
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    assert box is not None
    return heights_from_mask(mask[box], _crop_affine(labels.affine, box))


def _crop_affine(affine: npt.NDArray[np.float64], box: tuple[slice, ...]) -> np.ndarray:
    out = np.array(affine, dtype=np.float64)
    start = np.array([s.start for s in box], dtype=np.float64)
    out[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
    return out


def _sagittal_axis(affine: npt.NDArray[np.float64]) -> int:
    lin = affine[:3, :3]
    dirs = lin / np.linalg.norm(lin, axis=0)
    return int(np.argmax(np.abs(dirs[0])))  # LPS x is left-right


def heights_from_mask(mask: npt.ArrayLike, affine: npt.ArrayLike) -> Heights:
    """Heights (mm) of the body in a boolean mask whose voxel-to-LPS affine is ``affine``.

    The mask should hold one body (a crop is fine: pass the crop's affine).  See the module
    docstring for the method.
    """
    m = np.asarray(mask, dtype=bool)
    aff = np.asarray(affine, dtype=np.float64)
    if m.ndim != 3 or not m.any():
        msg = f"mask must be a non-empty 3-D boolean array, got shape {m.shape}"
        raise ValueError(msg)
    lr = _sagittal_axis(aff)
    in_plane = [a for a in range(3) if a != lr]
    area = m.sum(axis=tuple(in_plane))
    occupied = np.flatnonzero(area)
    centre = (occupied[0] + occupied[-1]) / 2.0
    candidates = sorted({int(np.floor(centre)), int(np.ceil(centre))})
    plane_index = max(candidates, key=lambda k: (area[k], -abs(k - centre)))
    plane = np.take(m, plane_index, axis=lr)
    plane = ndimage.binary_fill_holes(plane)

    # 2-D mm coordinates in an orthonormal basis (e1, e2) of the plane.
    v1, v2 = aff[:3, in_plane[0]], aff[:3, in_plane[1]]
    e1 = v1 / np.linalg.norm(v1)
    e2 = v2 - (v2 @ e1) * e1
    e2 /= np.linalg.norm(e2)
    to_mm = np.array([[v1 @ e1, v2 @ e1], [v1 @ e2, v2 @ e2]])  # pixel (i, j) -> (x, y) mm
    from_mm = np.linalg.inv(to_mm)
    superior = np.array([0.0, 0.0, 1.0])
    anterior = np.array([0.0, -1.0, 0.0])
    s2 = np.array([superior @ e1, superior @ e2])
    if np.linalg.norm(s2) < 0.5:
        msg = (
            "the label map's planes perpendicular to the left-right axis do not contain the "
            "superior-inferior direction (not a sagittal acquisition); resample the labels "
            "onto a sagittal grid"
        )
        raise ValueError(msg)
    s2 /= np.linalg.norm(s2)
    a2 = np.array([anterior @ e1, anterior @ e2])
    a2 -= (a2 @ s2) * s2
    if np.linalg.norm(a2) < 1e-6:  # pragma: no cover - impossible for a sagittal plane
        a2 = np.array([-s2[1], s2[0]])
    a2 /= np.linalg.norm(a2)

    ij = np.argwhere(plane).astype(np.float64)
    pts = ij @ to_mm.T
    pixel_mm = np.sqrt(np.abs(np.linalg.det(to_mm)))
    # The bounding rectangle only depends on the outline: search on boundary pixels.
    outline = plane & ~ndimage.binary_erosion(plane)
    si_dir, ap_dir = _body_axes(np.argwhere(outline).astype(np.float64) @ to_mm.T, s2, a2)
    depth = pts @ ap_dir
    height = pts @ si_dir
    # Pixel centres span the body minus one pixel; the body's faces are half a pixel out.
    d_post, d_ant = depth.min() - pixel_mm / 2, depth.max() + pixel_mm / 2
    h_lo, h_hi = height.min() - 2 * pixel_mm - 1.0, height.max() + 2 * pixel_mm + 1.0
    field_f = plane.astype(np.float64)
    fractions = (1.0 - ANTERIOR_FRACTION, 0.5, ANTERIOR_FRACTION)  # from posterior surface
    offsets = np.linspace(-HEIGHT_BAND_HALF_WIDTH_MM, HEIGHT_BAND_HALF_WIDTH_MM, HEIGHT_BAND_LINES)
    steps = np.arange(h_lo, h_hi + HEIGHT_STEP_MM / 2, HEIGHT_STEP_MM)
    values = []
    for fraction in fractions:
        d0 = d_post + fraction * (d_ant - d_post)
        runs = []
        for off in offsets:
            line_mm = np.outer(np.full_like(steps, 1.0), (d0 + off) * ap_dir) + np.outer(
                steps, si_dir
            )
            line_ij = line_mm @ from_mm.T
            samples = ndimage.map_coordinates(
                field_f, line_ij.T, order=1, mode="grid-constant", cval=0.0
            )
            runs.append(_longest_run(samples >= 0.5) * HEIGHT_STEP_MM)
        values.append(float(np.mean(runs)))
    return Heights(anterior=values[0], middle=values[1], posterior=values[2])


def _body_axes(
    pts: npt.NDArray[np.float64], s2: npt.NDArray[np.float64], a2: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Superior and anterior unit vectors of the body's minimum-area bounding rectangle."""
    centred = pts - pts.mean(axis=0)
    if len(centred) > 4:  # only the convex hull matters; cheap reduction to extreme points
        centred = centred[_hull_candidates(centred)]

    def area(theta_deg: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        t = np.deg2rad(theta_deg)[:, None]
        s = np.cos(t) * s2 + np.sin(t) * a2  # (n_angles, 2)
        a = -np.sin(t) * s2 + np.cos(t) * a2
        hs, ds = centred @ s.T, centred @ a.T
        return np.asarray(np.ptp(hs, axis=0) * np.ptp(ds, axis=0), dtype=np.float64)

    coarse = np.arange(-MAX_TILT_DEG, MAX_TILT_DEG + 0.5, 1.0)
    best = float(coarse[int(np.argmin(area(coarse)))])
    fine = np.arange(best - 1.0, best + 1.0 + 1e-9, 0.1)
    fine = fine[np.abs(fine) <= MAX_TILT_DEG]
    theta = np.deg2rad(float(fine[int(np.argmin(area(fine)))]))
    si = np.cos(theta) * s2 + np.sin(theta) * a2
    ap = -np.sin(theta) * s2 + np.cos(theta) * a2
    return si, ap


def _hull_candidates(pts: npt.NDArray[np.float64]) -> npt.NDArray[np.intp]:
    """Indices of points extreme along any of 90 directions (a superset of hull vertices
    that matter for rectangles within the angle range)."""
    angles = np.deg2rad(np.arange(0.0, 180.0, 2.0))
    dirs = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    proj = pts @ dirs.T
    return np.unique(np.concatenate([proj.argmin(axis=0), proj.argmax(axis=0)]))


def _longest_run(flags: npt.NDArray[np.bool_]) -> int:
    if not flags.any():
        return 0
    padded = np.concatenate([[False], flags, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    starts, ends = edges[::2], edges[1::2]
    return int((ends - starts).max())


# ---------------------------------------------------------------------------- grading
def assess_deformities(
    heights: Mapping[int, Heights],
    order: Sequence[int] | None = None,
    settings: Mapping[str, Any] | None = None,
    *,
    expected_rule: str | None = None,
) -> dict[int, Deformity]:
    """Expected heights, height loss, Genant grade and deformity type of every body.

    Parameters
    ----------
    heights : mapping label -> Heights
        Measured heights of the bodies of one scan.
    order : sequence of int, optional
        Labels in cranio-caudal order (top first); sorted labels (the VerSe order) when
        omitted.  Neighbours are taken in this order.
    settings : mapping, optional
        Settings or overrides with the Genant thresholds.
    expected_rule : {"corresponding", "posterior"}, optional
        See `EXPECTED_HEIGHT_RULE` (the default).

    Returns
    -------
    dict label -> Deformity
    """
    s = _as_settings(settings)
    rule = EXPECTED_HEIGHT_RULE if expected_rule is None else str(expected_rule)
    if rule not in _EXPECTED_RULES:
        msg = f"expected_rule must be one of {_EXPECTED_RULES}, got {expected_rule!r}"
        raise ValueError(msg)
    seq = [int(v) for v in (order if order is not None else sorted(heights))]
    missing = [v for v in seq if v not in heights]
    if missing or len(set(seq)) != len(seq) or set(seq) != set(heights):
        msg = f"order must list each label of heights once; got {seq} for {sorted(heights)}"
        raise ValueError(msg)
    gradable = [v for v in seq if v != SACRUM_LABEL]
    # First pass: each body against its own posterior height.
    results = {v: _grade_one(v, heights[v], None, (), s) for v in seq}
    normal = {v for v in gradable if results[v].genant_grade == 0}
    for _ in range(_MAX_GRADING_ITERATIONS):
        new_results = {}
        for pos, v in enumerate(seq):
            expected, used = _expected_from_neighbours(pos, seq, heights, normal - {v})
            if expected is not None and rule == "posterior":
                expected = Heights(expected.posterior, expected.posterior, expected.posterior)
            new_results[v] = _grade_one(v, heights[v], expected, used, s)
        new_normal = {v for v in gradable if new_results[v].genant_grade == 0}
        results = new_results
        if new_normal == normal:
            break
        normal = new_normal
    return results


def _expected_from_neighbours(
    pos: int, seq: list[int], heights: Mapping[int, Heights], normal: set[int]
) -> tuple[Heights | None, tuple[int, ...]]:
    above = next(((pos - i, seq[i]) for i in range(pos - 1, -1, -1) if seq[i] in normal), None)
    below = next(((i - pos, seq[i]) for i in range(pos + 1, len(seq)) if seq[i] in normal), None)
    found = [nb for nb in (above, below) if nb is not None]
    if not found:
        return None, ()
    weights = np.array([1.0 / dist for dist, _ in found])
    stacked = np.stack([heights[lab].as_array() for _, lab in found])
    mean = weights @ stacked / weights.sum()
    return Heights(*(float(x) for x in mean)), tuple(lab for _, lab in found)


def _grade_one(
    label: int,
    heights: Heights,
    expected: Heights | None,
    used: tuple[int, ...],
    settings: Settings,
) -> Deformity:
    if expected is None:
        expected = Heights(heights.posterior, heights.posterior, heights.posterior)
    if label == SACRUM_LABEL or heights.posterior <= 0 or not np.all(expected.as_array() > 0):
        return Deformity(label, heights, expected, 0.0, 0, "none", used)
    red = height_reductions(heights, expected)
    # Rounded so that the grade agrees with the reported (0.1 %) height loss.
    loss = round(max(0.0, float(red.max()) * 100.0), 1)
    grade = genant_grade(loss, settings)
    return Deformity(
        label, heights, expected, loss, grade, deformity_type(heights, expected, grade=grade), used
    )


def _as_settings(settings: Mapping[str, Any] | None) -> Settings:
    if isinstance(settings, Settings):
        return settings
    return resolve_settings(settings)


def method_constants() -> dict[str, Any]:
    """Module constants of the morphometry method, for provenance."""
    return {
        "morphometry_anterior_fraction": ANTERIOR_FRACTION,
        "morphometry_band_half_width_mm": HEIGHT_BAND_HALF_WIDTH_MM,
        "morphometry_band_lines": HEIGHT_BAND_LINES,
        "morphometry_step_mm": HEIGHT_STEP_MM,
        "morphometry_max_tilt_deg": MAX_TILT_DEG,
        "morphometry_crush_uniformity": CRUSH_UNIFORMITY,
        "morphometry_plane": "central sagittal plane of the body (larger area on a tie)",
        "morphometry_expected": "inverse-level-distance mean of nearest normal neighbours",
        "morphometry_expected_rule": EXPECTED_HEIGHT_RULE,
    }
