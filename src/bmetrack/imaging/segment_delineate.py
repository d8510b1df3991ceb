"""Delineation stage of the vertebral body segmenter: one body mask per detected level.

Each body is delineated between its two discs by a marker-controlled watershed on the gradient
magnitude of the normalised image: the inner marker is the body's core (whatever its signal:
edema or cement change the signal but not where the core is), the outer markers are the two
disc mid-lines, the canal and the region far anterior.  Posterior elements are cut off by the
canal's anterior wall, extended as a plane through every slice.  Holes (cement) are filled.  The
mid-sagittal result is propagated slice by slice laterally, each slice within one pixel of the
previous one, until the body's signal or size no longer matches the mid-sagittal body or its
discs are no longer seen above and below it (tissue beside a body can have the marrow's signal;
the discs are as wide as the bodies).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from skimage.segmentation import watershed

from bmetrack.imaging.segment_detect import Frame

__all__ = ["BodySpan", "delineate_body"]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

# Largest anterior-posterior depth a vertebral body can have (mm): anterior outer marker.
_MAX_DEPTH_MM = 55.0
# A lateral slice is kept while its body area is at least this fraction of the mid-sagittal one.
_MIN_AREA_FRACTION = 0.3
# Inner marker depth range (mm in front of the canal wall) of a first outline.
_CORE_DEPTH_MM = 14.0
# A lateral slice is a slice of the body only while its discs are there: the contrast between
# the disc lines and the body (T1: discs darker than marrow) keeps at least this fraction of
# its mid-sagittal value, and the disc lines' signal at least `_MIN_DISC_SIGNAL_FRACTION` of
# theirs (below: outside the other sequence's field of view, no data).
_MIN_DISC_CONTRAST_FRACTION = 0.25
_MIN_DISC_SIGNAL_FRACTION = 0.25
# Mid-sagittal disc contrast below which the disc test is not used (discs not seen).
_MIN_MID_DISC_CONTRAST = 0.15


@dataclass(frozen=True)
class BodySpan:
    """One body along the frame: its upper and lower disc mid-lines.

    Each line is ``(a, b)``: arc index ``a + b * d`` at depth ``d`` mm anterior of the wall.
    The margins (arc steps) keep the inner marker off the discs (half the disc thickness plus
    a safety distance); the marker fills the body between them, so a body whose signal changes
    inside (band edema, cement) is still claimed as a whole.
    """

    upper: tuple[float, float]
    lower: tuple[float, float]
    upper_margin: float = 0.0
    lower_margin: float = 0.0
    depth_limit_mm: float = _MAX_DEPTH_MM
    # Anterior end of the inner marker (mm in front of the wall).  Deeper when the
    # neighbouring bodies show this body's first outline stopped short (edema or cement edges
    # inside the body stop the watershed).
    core_depth_mm: float = _CORE_DEPTH_MM


def _frame_coordinates(
    frame: Frame, wall_mm: FloatArray, rows: FloatArray, cols: FloatArray, s_lo: int, s_hi: int
) -> tuple[FloatArray, FloatArray]:
    """Arc index and depth relative to the canal wall (mm) of work-grid pixels."""
    s_idx = np.arange(max(0, s_lo), min(len(frame.points), s_hi + 1))
    pts = frame.points[s_idx]  # (n, 2) rows, cols
    sr, sc = frame.spacing_mm
    dr = (rows.ravel()[:, None] - pts[None, :, 0]) * sr
    dc = (cols.ravel()[:, None] - pts[None, :, 1]) * sc
    normals = frame.normals[s_idx]
    depth = dr * normals[None, :, 0] + dc * normals[None, :, 1]
    # Tangent t = (-n_col, n_row) (`straighten` sets n = (t_col, -t_row)): the signed
    # distance along it extends the arc index past the nearest frame point.
    along = dc * normals[None, :, 0] - dr * normals[None, :, 1]
    nearest = np.argmin(np.abs(along), axis=1)
    pick = np.arange(len(nearest))
    s_val = s_idx[nearest] + along[pick, nearest] / frame.step_mm
    d_val = depth[pick, nearest] - wall_mm[s_idx[nearest]]
    return s_val.reshape(rows.shape), d_val.reshape(rows.shape)


@dataclass(frozen=True)
class BodyMask:
    """A delineated body: boolean mask inside a work-grid box, and the box origin."""

    mask: BoolArray  # (n_slices, box_rows, box_cols)
    origin: tuple[int, int]
    slices: tuple[int, int]  # first and last slice with voxels
    # Mid-sagittal depth in front of the wall (mm) of the body's middle half (98th percentile).
    depth_mm: float = 0.0


def delineate_body(
    norm: npt.NDArray[np.float32],
    grad: npt.NDArray[np.float32],
    frame: Frame,
    wall_mm: FloatArray,
    span: BodySpan,
    mid_slice: int,
    slice_spacing_mm: float,
) -> BodyMask | None:
    """Mask of one body on the work grid (all slices), or None when nothing was found."""
    n_sl, n_r, n_c = norm.shape
    d_ext = np.array([0.0, span.depth_limit_mm])
    up_ext = span.upper[0] + span.upper[1] * d_ext
    low_ext = span.lower[0] + span.lower[1] * d_ext
    s_lo, s_hi = int(np.floor(up_ext.min())) - 4, int(np.ceil(low_ext.max())) + 4
    s_lo, s_hi = max(0, s_lo), min(len(frame.points) - 1, s_hi)
    ss = np.arange(s_lo, s_hi + 1)
    corners_r, corners_c = [], []
    for d in (-12.0, span.depth_limit_mm + 8.0):
        r, c = frame.to_index(ss, wall_mm[ss] + d)
        corners_r.append(r)
        corners_c.append(c)
    r0 = max(0, int(np.floor(np.min(corners_r))) - 2)
    r1 = min(n_r, int(np.ceil(np.max(corners_r))) + 3)
    c0 = max(0, int(np.floor(np.min(corners_c))) - 2)
    c1 = min(n_c, int(np.ceil(np.max(corners_c))) + 3)
    if r1 - r0 < 3 or c1 - c0 < 3:
        return None
    rows, cols = np.meshgrid(
        np.arange(r0, r1, dtype=np.float64), np.arange(c0, c1, dtype=np.float64), indexing="ij"
    )
    s_val, d_val = _frame_coordinates(frame, wall_mm, rows, cols, s_lo, s_hi)
    upper = span.upper[0] + span.upper[1] * np.clip(d_val, 0.0, span.depth_limit_mm)
    lower = span.lower[0] + span.lower[1] * np.clip(d_val, 0.0, span.depth_limit_mm)
    height = lower - upper
    within = (s_val > upper) & (s_val < lower)
    top = upper + np.clip(span.upper_margin, 0.2 * height, 0.4 * height)
    bottom = lower - np.clip(span.lower_margin, 0.2 * height, 0.4 * height)
    core = (s_val > top) & (s_val < bottom) & (d_val > 3.0) & (d_val < span.core_depth_mm)
    outer = (
        (np.abs(s_val - upper) < 1.0)
        | (np.abs(s_val - lower) < 1.0)
        | (s_val < upper - 2.0)
        | (s_val > lower + 2.0)
        | ((d_val < -1.5) & (d_val > -8.0))
        | (d_val > span.depth_limit_mm)
    )
    outer &= ~core
    allowed = within & (d_val >= -0.5) & (d_val <= span.depth_limit_mm)
    out = np.zeros((n_sl, r1 - r0, c1 - c0), dtype=bool)

    def one_slice(k: int, inner: BoolArray) -> BoolArray:
        markers = np.zeros(inner.shape, dtype=np.int32)
        markers[outer] = 2
        markers[inner] = 1
        ws = watershed(grad[k, r0:r1, c0:c1], markers)
        region = (ws == 1) & allowed
        region = ndimage.binary_opening(region, iterations=1)
        lab, n = ndimage.label(region)
        if n > 1:
            sizes = ndimage.sum(region, lab, index=np.arange(1, n + 1))
            keep = [i + 1 for i in range(n) if np.any(inner & (lab == i + 1))]
            if not keep:
                keep = [int(np.argmax(sizes)) + 1]
            region = np.isin(lab, keep)
        region = ndimage.binary_fill_holes(region) & allowed
        if region.any():
            # The watershed stops at the marrow-cortex edge; the dark cortex is body too.
            plane = norm[k, r0:r1, c0:c1]
            ring = ndimage.binary_dilation(region) & ~region & allowed
            region |= ring & (plane < np.median(plane[region]))
        return region

    mid = one_slice(mid_slice, core)
    if not mid.any():
        return None
    disc_band = (
        ((np.abs(s_val - upper) < 1.2) | (np.abs(s_val - lower) < 1.2))
        & (d_val > 3.0)
        & (d_val < min(25.0, span.depth_limit_mm))
    )

    # Against the mid-sagittal body's signal: cement or edema change the body's signal from
    # slice to slice, the disc's signal does not.
    body_mid = float(np.median(norm[mid_slice, r0:r1, c0:c1][mid]))

    def disc_signal(k: int) -> float:
        """Median signal on the disc lines of slice k."""
        return float(np.median(norm[k, r0:r1, c0:c1][disc_band])) if disc_band.any() else 0.0

    disc_mid = disc_signal(mid_slice)
    contrast_mid = 1.0 - disc_mid / body_mid if body_mid else 0.0
    out[mid_slice] = mid
    area_mid = int(mid.sum())
    # Marrow statistics of the mid-sagittal body, cortex excluded by erosion.
    inner_mid = ndimage.binary_erosion(mid, iterations=2)
    vals = norm[mid_slice, r0:r1, c0:c1][inner_mid if inner_mid.sum() >= 10 else mid]
    q_lo, q_hi = np.percentile(vals, [10, 90])
    spread = max(q_hi - q_lo, 0.15 * abs(float(np.median(vals))))
    lo, hi = q_lo - 0.25 * spread, q_hi + 0.25 * spread
    for step in (-1, 1):
        prev = mid
        k = mid_slice + step
        while 0 <= k < n_sl:
            inner = ndimage.binary_erosion(prev, iterations=3) & core
            if inner.sum() < 4:
                break
            # A body's section hardly grows away from the mid-sagittal plane: one pixel
            # around the previous slice's outline at most (more has leaked beside the body).
            region = one_slice(k, inner) & ndimage.binary_dilation(prev, iterations=1)
            area = int(region.sum())
            if area < _MIN_AREA_FRACTION * area_mid:
                break
            if abs(contrast_mid) >= _MIN_MID_DISC_CONTRAST:
                disc = disc_signal(k)
                gain = (1.0 - disc / body_mid) / contrast_mid
                if (
                    gain < _MIN_DISC_CONTRAST_FRACTION
                    or disc < _MIN_DISC_SIGNAL_FRACTION * disc_mid
                ):
                    break  # no disc above and below: lateral to the body, or no data
            med = float(np.median(norm[k, r0:r1, c0:c1][region]))
            if not lo - 0.75 * spread <= med <= hi + 0.75 * spread:
                break
            out[k] = region
            if not lo <= med <= hi:
                break  # a partial-volume edge slice: keep it, but go no further
            prev = region
            k += step
    ks = np.flatnonzero(out.any(axis=(1, 2)))
    middle = mid & (s_val > upper + 0.25 * height) & (s_val < lower - 0.25 * height)
    depth = float(np.percentile(d_val[middle], 98)) if middle.any() else 0.0
    return BodyMask(out, (r0, c0), (int(ks[0]), int(ks[-1])), depth)
