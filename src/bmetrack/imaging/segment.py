"""Segmentation of vertebral bodies and level labelling on sagittal spine MRI (METHOD.md 2).

A classical, weight-free pipeline (no learned component, nothing downloaded):

1. Axes are reordered from the affine so that the work array runs left-right, superior ->
   inferior, anterior -> posterior; the in-plane grid is reduced to about 1.25 mm.
2. Intensities are divided by a heavy Gaussian bias estimate and scaled to the foreground
   median (arbitrary scanner scaling and smooth coil shading disappear).
3. The spinal canal is the best smooth S-I path of a bar darker (T1) or brighter (STIR, T2)
   than both flanks; the slice holding the best path is the mid-sagittal plane.
4. The column is straightened along the canal; the canal's anterior wall bounds the bodies
   posteriorly (posterior elements excluded); discs are the narrow bands of the body band's
   profile, chained by dynamic programming with a spacing prior (fills missed discs, rejects
   bands inside fractured or edematous bodies).
5. Each body is delineated between its discs by a marker-controlled watershed (tolerant to
   edema and cement, whose signal differs but whose position is inside the body), holes
   filled, and propagated laterally slice by slice while the discs are seen above and below
   (tissue beside a body may have the marrow's signal).  A body much shallower than its
   neighbours (an edge inside it, from edema or cement, stopped the watershed) is outlined
   again with its inner marker reaching close to the neighbours' depth.  S1 is delineated in
   a straight frame along its own axis (perpendicular to the L5-S1 disc), since the canal
   frame bends away from it below the thecal sac.  A body at either end of the field of view
   whose outer disc is cut by the edge is kept when it is as long as a body and disc signal
   shows at the edge.
   A body (not S1: its alae continue it sideways) filling the first or last slice (more than
   `_LATERAL_CUT_FRACTION` of its mid-sagittal section, same signal) is cut by the left/right
   edge of the slab: reported partial, not labelled, but still counted when naming the bodies
   above it.
6. Levels are counted upward from S1 when the sacrum is in view (the end of the thecal sac
   on STIR/T2; without a fluid image or without that cue, a long fused bony segment below
   the lowest disc), else from ``lowest_level``, else named V1..Vn (a lowest body reaching
   the edge of the field of view is then the partly seen body below them).  A user-given
   ``lowest_level`` is overridden only by the thecal-sac cue: the weaker bony-length rules
   can take a partly visible lumbar body for the sacrum.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from bmetrack.anatomy import LEVEL_LABELS, label_from_level, normalise_level
from bmetrack.imaging.segment_delineate import BodyMask, BodySpan, delineate_body
from bmetrack.imaging.segment_detect import (
    Discs,
    Frame,
    anterior_wall_mm,
    band_profile,
    canal_centreline,
    canal_response,
    detect_discs,
    disc_lines,
    normalise_intensity,
    straighten,
)
from bmetrack.imaging.segment_geometry import (
    SegmentationError,
    canonicalise,
    uncanonicalise,
)
from bmetrack.imaging.volume import Volume

__all__ = [
    "METHOD_VERSION",
    "UNNAMED_LABEL_OFFSET",
    "Contrast",
    "Segmentation",
    "SegmentationError",
    "segment_vertebral_bodies",
]

METHOD_VERSION = "bmetrack-classic-1.3"
#: Unnamed levels V1..Vn (no sacrum, no anchor) get labels 101..100+n (no VerSe integer).
UNNAMED_LABEL_OFFSET = 100

# In-plane step (mm) of the work grid: finer inputs are reduced to it.
_WORK_STEP_MM = 1.25
# Bony length (in vertebral periods) below the lowest disc that makes it the sacrum.
_SACRUM_MIN_PERIODS = 1.0
# With T1 + STIR, S1 alone (field of view ending below it) is enough.
_SACRUM_MIN_PERIODS_PAIR = 0.7
# A chained disc position with less than this fraction of the median disc score is void.
_VOID_DISC_FRACTION = 0.15
# The body beyond the first (last) disc is whole when the data hold this many local periods
# beyond that disc (a body plus half a disc; a body cut by the field of view leaves less).
_END_BODY_MIN_PERIODS = 0.8
_END_BODY_MAX_PERIODS = 1.15
# A body whose mask in the first or last slice of the volume covers more than this fraction of
# its mid-sagittal area is cut by the left/right edge of the slab.  The lateral wall of a
# vertebral body is rounded and each slice keeps only voxels mostly inside the body, so a body
# ending inside the slab shows at most about half of its largest section in the outer slice;
# one continuing beyond the slab shows nearly all of it (phantom development seeds, true label
# maps: bodies inside <= 0.53, bodies cut sideways >= 0.56).  On the delineated masks of seeds
# 2000-2039 the check flags 5 lumbar bodies: 3 cut in the truth, 2 whole but touching the
# outer slice.
_LATERAL_CUT_FRACTION = 0.55
# ... and when its signal there is still the body's: the median in the outer slice over that in
# the mid-sagittal slice, on every sequence, within this range.  The lateral propagation of the
# delineation can carry a mask into an outer slice beyond the body's end; muscle or fat there
# gives other ratios (synthetic spines: 0 to 0.5; bodies really cut: 0.9 to 1).
_EDGE_SIGNAL_RANGE = (0.75, 1.33)
# Going sideways from the mid-sagittal slice, a mask may grow by this factor over the smallest
# area so far (delineation noise: about 1.15 on synthetic bodies); more is leakage.
_EDGE_REGROWTH = 1.25
# Fewer slices than this: no lateral check (every body touches the outer slices).
_LATERAL_MIN_SLICES = 3
# Arc steps whose T1 band signal is below this fraction of the median have no data.
_DATA_FRACTION = 0.1
# Shortest CSF segment (mm) along the canal whose lower end can be the end of the thecal sac.
_SAC_MIN_SEGMENT_MM = 40.0
# Depths (mm, negative = posterior) around the frame line searched for the thecal sac.
_SAC_SEARCH_DEPTHS_MM = np.arange(-12.0, 4.01, 2.0)
# A body between the two lowest discs must be this bone-like (fraction of its height).
_MIN_BONE_FRACTION = 0.5
# Below all three (rise of the disc autocorrelation from dip to peak, median disc contrast in
# robust SD, mean canal response) there is no spine: pure noise scores about 0.3-0.55,
# 0.8-1.5 and 0.8-1.1; phantom and synthetic spines about 1.1-1.6, > 5 and > 2.
_MIN_PERIODICITY = 0.8
_MIN_DISC_SCORE = 2.0
_MIN_CANAL_SCORE = 1.15
# A body shallower than this fraction of its neighbours' median depth (up to
# `_DEPTH_NEIGHBOURS` bodies on each side) is outlined again with its inner marker reaching
# `_CORE_FRONT_GAP_MM` short of the neighbours' depth.
_SHALLOW_FRACTION = 0.8
_DEPTH_NEIGHBOURS = 2
_CORE_FRONT_GAP_MM = 5.0
# A body whose mask comes this close (work pixels) to the in-plane edge of the data is cut.
_FOV_EDGE_PX = 1

FloatArray = npt.NDArray[np.float64]


class Contrast(StrEnum):
    """MR contrast of the image to segment."""

    T1 = "t1"
    T2 = "t2"
    STIR = "stir"


@dataclass
class Segmentation:
    """Result of `segment_vertebral_bodies`.

    Attributes
    ----------
    labels : Volume
        int16 label map on the input grid: VerSe integers of the fully visible vertebral
        bodies (posterior elements excluded), 0 elsewhere.  Unnamed levels V1..Vn get
        ``UNNAMED_LABEL_OFFSET + n``.
    levels : list of str
        Levels of the labelled bodies, bottom-up (e.g. ``["S1", "L5", "L4"]``).
    partial : list of str
        Levels of bodies cut by the field of view, in plane or by the left/right edge of the
        slab (not labelled).
    warnings : list of str
        Anything the user should check (no anchor, anchor disagreement, weak detection...).
    method_version : str
        Algorithm name and version.
    parameters : dict
        Settings and derived quantities used (contrast, period, mid-sagittal slice...).
    """

    labels: Volume
    levels: list[str]
    partial: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    method_version: str = METHOD_VERSION
    parameters: dict[str, Any] = field(default_factory=dict)


# Cranio-caudal order of the normal levels (L6 only when the user names it).
_NORMAL_ORDER = [lev for lev in LEVEL_LABELS if lev != "L6"]


def _names_upward(lowest: str, n: int) -> list[str | None]:
    """``n`` level names bottom-up starting at ``lowest`` (None above C1)."""
    order = list(_NORMAL_ORDER)
    if lowest == "L6":
        order.insert(order.index("S1"), "L6")
    i = order.index(lowest)
    return [order[i - j] if i - j >= 0 else None for j in range(n)]


def _work_image(
    canon: npt.NDArray[np.float32], spacing_mm: tuple[float, float, float]
) -> tuple[npt.NDArray[np.float32], tuple[float, float, float]]:
    """In-plane reduction of the canonical image to about `_WORK_STEP_MM` (never enlarged)."""
    zoom = [1.0] + [min(1.0, s / _WORK_STEP_MM) for s in spacing_mm[1:]]
    if zoom[1] == 1.0 and zoom[2] == 1.0:
        return canon, spacing_mm
    sigma = [0.0] + [max(0.0, (1.0 / z - 1.0) / 2.0) for z in zoom[1:]]
    smooth = ndimage.gaussian_filter(canon, sigma, mode="nearest")
    # Slice by slice: the same values as a 3-D zoom with factor 1 across slices (its weights
    # there are exactly 1 and 0), at half the interpolation work.
    planes = [ndimage.zoom(sl, zoom[1:], order=1, mode="nearest", grid_mode=True) for sl in smooth]
    if planes:
        work = np.stack(planes)
    else:
        work = ndimage.zoom(smooth, zoom, order=1, mode="nearest", grid_mode=True)
    step = (
        spacing_mm[0],
        spacing_mm[1] * canon.shape[1] / work.shape[1],
        spacing_mm[2] * canon.shape[2] / work.shape[2],
    )
    return work.astype(np.float32), step


def _work_mask(
    mask: npt.NDArray[np.bool_], spacing_mm: tuple[float, float, float]
) -> npt.NDArray[np.bool_]:
    """A canonical-grid mask on the work grid (any overlap counts)."""
    work, _ = _work_image(mask.astype(np.float32), spacing_mm)
    return work > 0.01


def _reaches_fov_edge(
    body: BodyMask, work_shape: tuple[int, ...], no_data: npt.NDArray[np.bool_] | None
) -> bool:
    """Whether the body's mask comes within `_FOV_EDGE_PX` work pixels of the in-plane edge
    of the image or of a region without data (``no_data``, work grid)."""
    r0, c0 = body.origin
    _, br, bc = body.mask.shape
    rows, cols = np.nonzero(body.mask.any(axis=0))
    if rows.size == 0:
        return False
    m = _FOV_EDGE_PX
    if no_data is not None:
        near = ndimage.binary_dilation(no_data[:, r0 : r0 + br, c0 : c0 + bc], iterations=m)
        if np.any(near & body.mask):
            return True
    n_r, n_c = work_shape[1:]
    return bool(
        r0 + rows.min() < m
        or c0 + cols.min() < m
        or r0 + rows.max() > n_r - 1 - m
        or c0 + cols.max() > n_c - 1 - m
    )


def _to_full(
    body: BodyMask, work_shape: tuple[int, ...], full_shape: tuple[int, ...]
) -> tuple[npt.NDArray[np.bool_], tuple[slice, slice, slice]]:
    """Body mask on the full canonical grid (linear interpolation of the work mask, > 0.5)."""
    fr = full_shape[1] / work_shape[1]
    fc = full_shape[2] / work_shape[2]
    r0, c0 = body.origin
    br, bc = body.mask.shape[1:]
    fr0, fr1 = max(0, int(np.floor((r0 - 0.5) * fr))), min(full_shape[1], int((r0 + br) * fr) + 1)
    fc0, fc1 = max(0, int(np.floor((c0 - 0.5) * fc))), min(full_shape[2], int((c0 + bc) * fc) + 1)
    k0, k1 = body.slices
    rr = (np.arange(fr0, fr1) + 0.5) / fr - 0.5 - r0
    cc = (np.arange(fc0, fc1) + 0.5) / fc - 0.5 - c0
    grid_r, grid_c = np.meshgrid(rr, cc, indexing="ij")
    out = np.zeros((k1 - k0 + 1, fr1 - fr0, fc1 - fc0), dtype=bool)
    for k in range(k0, k1 + 1):
        m = body.mask[k].astype(np.float32)
        out[k - k0] = ndimage.map_coordinates(m, [grid_r, grid_c], order=1, cval=0.0) > 0.5
    return out, (slice(k0, k1 + 1), slice(fr0, fr1), slice(fc0, fc1))


def segment_vertebral_bodies(
    image: Volume,
    contrast: str | Contrast = "t1",
    *,
    lowest_level: str | None = None,
    settings: Mapping[str, Any] | None = None,
    other: Volume | None = None,
    other_contrast: str | Contrast | None = None,
) -> Segmentation:
    """Segment and label the vertebral bodies of a sagittal spine MRI.

    Parameters
    ----------
    image : Volume
        Sagittal T1, T2 or STIR image (any axis order or flips; directions from the affine).
    contrast : {"t1", "t2", "stir"} or Contrast
        Contrast of ``image``: sets the expected polarity of CSF and discs.
    lowest_level : str, optional
        Name of the lowest body seen whole on the sagittal images (e.g. ``"L2"``; a body cut
        only by the left/right edge of the slab counts, though it is then left out as
        partial).  Used unless the end of the thecal sac (STIR/T2) shows the sacrum in view;
        then levels are counted from S1 with a warning.  ``"S1"`` says the sacrum is in view.
    settings : mapping, optional
        Method settings (`bmetrack.settings.resolve_settings`); recorded in ``parameters``.
        No segmentation setting is currently read from it.
    other : Volume, optional
        A second sequence of the same study on the SAME grid as ``image`` (resample first;
        NaN outside its field of view is allowed).  With one T1 and one fluid-sensitive
        (STIR/T2) image, the canal is found on the fluid image (bright CSF), discs on the T1
        image (discs darker than marrow) and bodies are delineated on both.
    other_contrast : {"t1", "t2", "stir"} or Contrast, optional
        Contrast of ``other``; required with ``other`` and must differ from ``contrast`` in
        being T1 vs fluid-sensitive.

    Returns
    -------
    Segmentation

    Raises
    ------
    SegmentationError
        When the image is not sagittal, is too small, or no spine is found in it.
    ValueError
        For an unknown ``contrast`` or ``lowest_level``.
    """
    try:
        con = Contrast(str(contrast).lower())
    except ValueError:
        msg = f"contrast must be one of t1, t2, stir; got {contrast!r}"
        raise ValueError(msg) from None
    anchor = normalise_level(lowest_level) if lowest_level is not None else None
    pair = _pair_roles(image, con, other, other_contrast)
    canon, geo = canonicalise(image)
    # A sequence resampled onto another grid has NaN outside its own field of view.
    canon = np.nan_to_num(canon, nan=0.0)
    n_sl, n_r, n_c = canon.shape
    extent = (n_r * geo.spacing_mm[1], n_c * geo.spacing_mm[2])
    if min(extent) < 60.0:
        msg = (
            f"image field of view {extent[0]:.0f} x {extent[1]:.0f} mm is too small to hold "
            "vertebral bodies (need at least 60 mm in-plane); give the whole sagittal series"
        )
        raise SegmentationError(msg)
    work, wsp = _work_image(canon, geo.spacing_mm)
    norm, _ = normalise_intensity(work, wsp)
    fluid_norm: npt.NDArray[np.float32] | None = None
    if pair is not None:
        other_canon, _ = canonicalise(pair)
        other_work, _ = _work_image(np.nan_to_num(other_canon, nan=0.0), geo.spacing_mm)
        other_norm, _ = normalise_intensity(other_work, wsp)
        # From here on ``norm`` is the T1 image and ``fluid_norm`` the STIR/T2 image.
        if con is Contrast.T1:
            fluid_norm = other_norm
        else:
            fluid_norm, norm = norm, other_norm
    canal_polarity = -1.0 if (con is Contrast.T1 and pair is None) else 1.0
    canal_image = fluid_norm if fluid_norm is not None else norm
    canal = canal_centreline(
        canal_image, wsp, canal_polarity, norm if fluid_norm is not None else None
    )
    mid_k, canal_score = canal.plane, canal.score
    centre_sl = range(max(0, mid_k - 1), min(n_sl, mid_k + 2))
    near = [k for k in centre_sl if abs(k - mid_k) * wsp[0] <= 4.0] or [mid_k]
    # Only the slices near the mid-sagittal plane are averaged: straighten just those.
    frame, straight = straighten(norm[near], canal, wsp)
    mid_plane = straight.mean(axis=0).astype(np.float64)
    if fluid_norm is not None:
        _, fluid_straight = straighten(fluid_norm[near], canal, wsp)
        fluid_mid = fluid_straight.mean(axis=0).astype(np.float64)
        wall = anterior_wall_mm(fluid_mid, frame.depths_mm, 1.0)
        disc_polarity: float | None = -1.0
        line_polarity = -1.0
    else:
        wall = anterior_wall_mm(mid_plane, frame.depths_mm, canal_polarity)
        disc_polarity = -1.0 if con is Contrast.T1 else None
    profile = band_profile(mid_plane, frame.depths_mm, wall)
    discs = detect_discs(profile, disc_polarity, frame.step_mm)
    if fluid_norm is None:
        line_polarity = discs.polarity
    centres = [float(c) for c in discs.centres]
    median_score = float(np.median(discs.scores)) if len(discs.scores) else 0.0
    if (
        canal.periodicity < _MIN_PERIODICITY
        and median_score < _MIN_DISC_SCORE
        and canal.score < _MIN_CANAL_SCORE
    ):
        msg = (
            "no spine found: neither a clear canal nor a regular series of intervertebral "
            f"discs (canal score {canal.score:.2f}, disc periodicity {canal.periodicity:.2f}, "
            f"median disc contrast {median_score:.2f}); check the contrast argument and that "
            "the series is a sagittal spine MRI"
        )
        raise SegmentationError(msg)
    if len(centres) < 2:
        msg = (
            "no spine found: fewer than two intervertebral discs detected along the canal; "
            "check the contrast argument and that the series covers the spine"
        )
        raise SegmentationError(msg)
    period = discs.period_mm / frame.step_mm
    n_s = len(frame.points)
    centres = _extend_upward(centres, discs.score_curve, np.median(profile, axis=1), period)
    flat_t1 = np.median(profile, axis=1)
    warnings: list[str] = []
    sacrum_periods = _SACRUM_MIN_PERIODS
    # A user-given lowest level other than S1 says the sacrum is not fully in view.
    trust_anchor = anchor is not None and anchor != "S1"
    weak_cut: list[float] | None = None
    sac_cut: list[float] | None = None
    if fluid_norm is not None:
        fluid_profile = band_profile(fluid_mid, frame.depths_mm, wall)
        centres = _trim_non_bone(centres, [flat_t1, np.median(fluid_profile, axis=1)])
        sacrum_periods = _SACRUM_MIN_PERIODS_PAIR
        # The end of the dural sac in view is the most direct sacrum cue (STIR/T2 + T1).
        sac_cut = _cut_at_sac_end(centres, fluid_norm[mid_k], frame, wall, wsp, period)
        if sac_cut is None and not trust_anchor:
            weak_cut = _cut_at_void_disc(centres, discs)
        if weak_cut is not None:
            centres = weak_cut
    # With T1 + STIR every true disc is dark on T1 (also degenerated ones), so only a much
    # weaker or thin lowest band is taken for a fused S1-S2 remnant.
    thin, weak = (0.5, 0.6) if fluid_norm is None else (0.6, 0.3)
    if sac_cut is not None:
        has_sacrum, centres = True, sac_cut
    elif trust_anchor:
        # The user named the lowest fully visible body and no direct sacrum cue (end of the
        # thecal sac) contradicts it: the weaker bony-length and void-disc rules, which can
        # take a partly visible lumbar body or pelvic tissue for the sacrum, are not used.
        has_sacrum = False
    else:
        has_sacrum, centres = _find_sacrum(
            centres, discs, period, flat_t1, sacrum_periods, thin, weak
        )
    if fluid_norm is not None and not has_sacrum and weak_cut is not None:
        has_sacrum = True
    lines = disc_lines(mid_plane, frame.depths_mm, wall, centres, line_polarity, frame.step_mm)
    if has_sacrum:
        # S1 ends at the S1-S2 junction: a thin dark line (fused endplates) 0.6-1.05 periods
        # below L5-S1 on every sequence; parallel to the L5-S1 disc.
        flat = np.median(profile, axis=1)
        size = max(3, round(8.0 / frame.step_mm))
        dark = ndimage.grey_closing(flat, size=size, mode="nearest") - flat
        lo = int(centres[-1] + 0.6 * period)
        hi = int(min(n_s - 1, centres[-1] + 1.05 * period))
        s1_end = lo + int(np.argmax(dark[lo : hi + 1])) if hi > lo else lo
        slope = lines[-1][1]
        a_end = float(s1_end) - slope * 15.0  # the line passes s1_end 15 mm in front of the wall
        lines.append((a_end, slope))
        centres = [*centres, float(s1_end)]
    # Arc range with signal on the T1 band (a resampled sequence is 0 outside its own field
    # of view): discs at the very edge of the data are not seen.
    has_data = np.flatnonzero(flat_t1 > _DATA_FRACTION * float(np.median(flat_t1)))
    data_start, data_end = (int(has_data[0]), int(has_data[-1])) if has_data.size else (0, n_s - 1)
    top_virtual = bottom_virtual = False
    if len(centres) >= 2:
        # The field of view may end at (or just inside) the disc above the top body, so that
        # disc is not chained; a top body as long as a body and half a disc, with disc-like
        # signal (part of the disc above it) at the edge of the data, is whole: a virtual
        # upper line one local period above the first disc bounds it (the watershed then stops
        # at its real endplate).  Same below when no sacrum ends the column.
        disc_like = _disc_like(flat_t1, centres, line_polarity)
        local = centres[1] - centres[0]
        edge = disc_like[data_start : data_start + max(2, int(0.35 * local))]
        if centres[0] - data_start >= _END_BODY_MIN_PERIODS * local and _has_run(edge, 2):
            top_virtual = True
            lines.insert(0, (centres[0] - local, lines[0][1]))
            centres = [centres[0] - local, *centres]
        # Below, more than a body and a disc with no disc seen is no normal vertebra (a fused
        # sacrum beside the field of view, pelvic tissue): no virtual line then.
        local = centres[-1] - centres[-2]
        span = data_end - centres[-1]
        edge = disc_like[max(0, data_end - int(0.35 * local)) : data_end + 1]
        if (
            not has_sacrum
            and _END_BODY_MIN_PERIODS * local <= span <= _END_BODY_MAX_PERIODS * local
            and _has_run(edge, 2)
        ):
            bottom_virtual = True
            lines.append((centres[-1] + local, lines[-1][1]))
            centres = [*centres, centres[-1] + local]
    half_mm = {float(c): 0.5 * w for c, w in zip(discs.centres, discs.widths_mm, strict=True)}
    margins = [(half_mm.get(c, 3.0) + 2.0) / frame.step_mm for c in centres]
    spans = [
        BodySpan(lines[i], lines[i + 1], margins[i], margins[i + 1]) for i in range(len(lines) - 1)
    ]
    partial_top = (centres[0] - data_start) * frame.step_mm > 6.0
    partial_bottom = (not has_sacrum) and (data_end - centres[-1]) * frame.step_mm > 6.0

    grad = np.empty_like(norm)
    for k in range(n_sl):
        grad[k] = ndimage.gaussian_gradient_magnitude(
            norm[k], (1.0 / wsp[1], 1.0 / wsp[2]), mode="nearest"
        )
        if fluid_norm is not None:
            # Edges of either sequence bound a body (edema moves the T1 edge, not the STIR one).
            g2 = ndimage.gaussian_gradient_magnitude(
                fluid_norm[k], (1.0 / wsp[1], 1.0 / wsp[2]), mode="nearest"
            )
            grad[k] = np.sqrt(grad[k] ** 2 + g2**2)

    def outline(span: BodySpan) -> BodyMask | None:
        return delineate_body(norm, grad, frame, wall, span, mid_k, wsp[0])

    above_s1 = spans[: len(spans) - int(has_sacrum)]
    bodies: list[BodyMask | None] = [outline(sp) for sp in above_s1]
    bodies = _redelineate_shallow(bodies, above_s1, outline)
    if has_sacrum:
        # The canal frame bends away from S1 (sacral kyphosis, frame extrapolated below the
        # thecal sac): S1 is delineated in a straight local frame along its own axis,
        # perpendicular to the L5-S1 disc, from the disc's posterior end.
        s1_frame, s1_span = _s1_frame(norm[mid_k], frame, wall, lines[-2], lines[-3], margins[-2])
        bodies.append(
            delineate_body(
                norm, grad, s1_frame, np.zeros(len(s1_frame.points)), s1_span, mid_k, wsp[0]
            )
        )

    # When no sacrum names the bodies, a lowest body reaching the in-plane edge of the field
    # of view (or of the other sequence's) is not seen whole: it is the partly seen body below
    # the lowest whole one, the body `lowest_level` names.  (Not applied to the top body: a
    # mask spreading a pixel or two past its endplate would drop a whole body there.)
    if not has_sacrum and len(bodies) > 1 and bodies[-1] is not None:
        no_data = None if pair is None else _work_mask(np.isnan(other_canon), geo.spacing_mm)
        if _reaches_fov_edge(bodies[-1], norm.shape, no_data):
            bodies, spans = bodies[:-1], spans[:-1]
            partial_bottom = True

    # Names, bottom-up.
    n_bodies = len(spans)
    if has_sacrum:
        names = _names_upward("S1", n_bodies + 1)
        if anchor is not None and anchor != "S1":
            warnings.append(
                f"the end of the thecal sac places the sacrum in view: levels are counted "
                f"upward from S1 (lowest_level {anchor} is used only when no sacrum is seen)"
            )
    elif anchor is not None:
        names = _names_upward(anchor, n_bodies + 1)
    else:
        names = [f"V{i + 1}" for i in range(n_bodies + 1)]
        warnings.append(
            "no sacrum in the field of view and no lowest_level given: bodies are named "
            "V1..Vn bottom-up; give lowest_level to name them"
        )
    bottom_up = list(range(n_bodies - 1, -1, -1))
    out = np.zeros(canon.shape, dtype=np.int16)
    levels: list[str] = []
    found: list[tuple[int, BodyMask]] = []
    lateral_cut: list[str] = []
    lateral_edge: dict[str, dict[str, Any]] = {}
    for rank, idx in enumerate(bottom_up):
        name = names[rank]
        body = bodies[idx]
        if name is None or body is None:
            if body is None:
                warnings.append(f"body {name} between two discs could not be delineated")
            continue
        cut, lateral_edge[name] = _lateral_cut(
            body, mid_k, [norm] if fluid_norm is None else [norm, fluid_norm]
        )
        if cut and name != "S1":
            # Not measurable over all its sagittal images; it still takes its name so that
            # the bodies above are named right.  Not S1: lateral to its body the sagittal
            # images show the sacral alae, the same bone with no boundary, so a filled outer
            # slice does not show S1 cut (phantom development seeds: 5 of 9 such S1 were
            # whole).
            lateral_cut.append(name)
            continue
        label = (
            label_from_level(name)
            if not name.startswith("V")
            else UNNAMED_LABEL_OFFSET + int(name[1:])
        )
        found.append((label, body))
        levels.append(name)
    # Written top-down: where two masks overlap the upper body keeps the voxel (S1, the least
    # certain shape, yields to L5).
    for label, body in reversed(found):
        mask, box = _to_full(body, norm.shape, canon.shape)
        region = out[box]
        region[mask & (region == 0)] = label
    partial: list[str] = []
    if partial_bottom:
        partial.append(_name_below(names[0]))
    if partial_top:
        top = names[n_bodies] if n_bodies < len(names) else None
        partial.append(top if top is not None else "above")
    for p in partial:
        warnings.append(f"body {p} only partly in the field of view: left out")
    for p in lateral_cut:
        warnings.append(
            f"body {p} is cut by the left/right edge of the slab (it fills the outer sagittal "
            f"slice): left out; acquire more slices to measure it"
        )
    partial += lateral_cut
    labels = image.with_array(uncanonicalise(out, geo))
    params: dict[str, Any] = {
        "contrast": con.value,
        "other_contrast": None if pair is None else str(Contrast(str(other_contrast).lower())),
        "lowest_level": anchor,
        "sacrum_found": bool(has_sacrum),
        # Whole end bodies bounded by a virtual line where the field of view hides their disc.
        "virtual_top_disc": bool(top_virtual),
        "virtual_bottom_disc": bool(bottom_virtual),
        # Per named body: outer-slice area over mid-sagittal area, areas shrinking sideways,
        # outer over mid-sagittal median signal per image (`_lateral_cut`).
        "lateral_edge": lateral_edge,
        "period_mm": round(float(discs.period_mm), 2),
        "mid_sagittal_slice_canonical": int(mid_k),
        "canal_score": round(float(canal_score), 3),
        "disc_periodicity": round(float(canal.periodicity), 3),
        "disc_scores": [round(float(x), 2) for x in discs.scores],
        "work_step_mm": [round(float(s), 4) for s in wsp],
        "settings": dict(settings) if settings is not None else {},
    }
    return Segmentation(labels, levels, partial, warnings, METHOD_VERSION, params)


def _pair_roles(
    image: Volume,
    con: Contrast,
    other: Volume | None,
    other_contrast: str | Contrast | None,
) -> Volume | None:
    """Check the optional second sequence; return it when it pairs T1 with STIR/T2."""
    if other is None:
        return None
    if other_contrast is None:
        msg = "other_contrast is required with other; give 't1', 't2' or 'stir'"
        raise ValueError(msg)
    try:
        ocon = Contrast(str(other_contrast).lower())
    except ValueError:
        msg = f"other_contrast must be one of t1, t2, stir; got {other_contrast!r}"
        raise ValueError(msg) from None
    if (ocon is Contrast.T1) == (con is Contrast.T1):
        msg = (
            f"other_contrast {ocon.value!r} must complement contrast {con.value!r}: one T1 and "
            "one STIR or T2 image"
        )
        raise ValueError(msg)
    if tuple(other.array.shape) != tuple(image.array.shape) or not np.allclose(
        other.affine, image.affine, atol=1e-3
    ):
        msg = (
            f"other must be on the grid of image (shape {tuple(image.array.shape)}); got shape "
            f"{tuple(other.array.shape)} or another affine: resample it with "
            "other.resample_to(image, order=1)"
        )
        raise ValueError(msg)
    return other


def _extend_upward(
    centres: list[float], score: FloatArray, profile: FloatArray, period: float
) -> list[float]:
    """Add discs above the chain where the column continues but discs are faint.

    Dehydrated discs can be invisible on STIR or T2: while a whole period above the top disc
    still has bone-like band signal (the range of the bodies found), a disc is placed at the
    best score within a quarter period of one period above.
    """
    out = list(centres)
    if len(out) < 3:
        return out
    bodies = np.zeros(len(profile), dtype=bool)
    for a, b in itertools.pairwise(out):
        bodies[int(a + 0.3 * (b - a)) : int(b - 0.3 * (b - a)) + 1] = True
    vals = profile[bodies]
    q_lo, q_hi = np.percentile(vals, [5, 95])
    spread = max(q_hi - q_lo, 0.25 * abs(float(np.median(vals))))
    inside = (profile >= q_lo - 0.5 * spread) & (profile <= q_hi + 0.5 * spread)
    while True:
        guess = out[0] - period
        lo, hi = round(guess - 0.25 * period), round(guess + 0.25 * period)
        if lo < 0:
            break
        body = inside[int(guess + 0.3 * period) : int(out[0] - 0.3 * period) + 1]
        if body.size == 0 or body.mean() < 0.8:
            break
        out.insert(0, float(lo + int(np.argmax(score[lo : hi + 1]))))
    return out


def _inside_bone(centres: list[float], profile: FloatArray) -> npt.NDArray[np.bool_]:
    """Arc steps whose band signal lies within the range of the bodies between ``centres``."""
    bodies = np.zeros(len(profile), dtype=bool)
    for a, b in itertools.pairwise(centres):
        bodies[int(a + 0.3 * (b - a)) : int(b - 0.3 * (b - a)) + 1] = True
    if not bodies.any():
        return np.ones(len(profile), dtype=bool)
    vals = profile[bodies]
    q_lo, q_hi = np.percentile(vals, [5, 95])
    spread = max(q_hi - q_lo, 0.25 * abs(float(np.median(vals))))
    inside: npt.NDArray[np.bool_] = (profile >= q_lo - 0.5 * spread) & (
        profile <= q_hi + 0.5 * spread
    )
    return inside


def _cut_at_sac_end(
    centres: list[float],
    fluid_plane: npt.NDArray[np.float32],
    frame: Frame,
    wall_mm: FloatArray,
    spacing_mm: tuple[float, float, float],
    period: float,
) -> list[float] | None:
    """Disc chain ending at L5-S1 when the end of the thecal sac is in view, else None.

    The dural sac (a CSF tube, bright on STIR/T2) ends at about S2 (S1-S3); below it the
    sacral canal holds fat and roots only.  When the tube ends inside the field of view (at
    least 10 mm above where the frame leaves the image), the lowest disc that still has the
    sac behind it for a third of a vertebral period is L5-S1; discs chained below that (a
    fused S1-S2 remnant, pelvic tissue) are dropped.  None when the sac is not seen to end or
    no chained disc lies below the cut (the older bony-length rule then decides).  Known
    limit: a sac ending within S1 (uncommon) makes L4-L5 the cut.
    """
    n_s = len(frame.points)
    resp = canal_response(fluid_plane.astype(np.float64), spacing_mm[1:], 1.0)
    resp = resp / (float(np.percentile(np.abs(resp), 90)) + 1e-6)
    arc = np.arange(n_s, dtype=np.float64)
    # The strongest response a little behind or in front of the frame line: where a strong
    # lordosis or sacral kyphosis makes the frame leave the canal, the sac is still seen.
    rows, cols = frame.to_index(arc[:, None], _SAC_SEARCH_DEPTHS_MM[None, :])
    along = ndimage.map_coordinates(resp, [rows, cols], order=1, mode="nearest").max(axis=1)
    along = ndimage.uniform_filter1d(along, max(1, round(9.0 / frame.step_mm)), mode="nearest")
    good = ndimage.binary_closing(along > 0.5, iterations=max(1, round(5.0 / frame.step_mm)))
    lab, n = ndimage.label(good)
    if n == 0:
        return None
    # The sac ends at the lowest end of a long CSF segment: a stenosis (retropulsed fragment,
    # disc herniation) can interrupt the column higher up.
    sizes = ndimage.sum(good, lab, index=np.arange(1, n + 1))
    long_enough = np.flatnonzero(
        sizes >= min(float(sizes.max()), _SAC_MIN_SEGMENT_MM / frame.step_mm)
    )
    sac_end = max(int(np.flatnonzero(lab == i + 1)[-1]) for i in long_enough)
    r_b, c_b = frame.to_index(arc, wall_mm + 12.0)
    in_image = (r_b >= 0) & (r_b <= fluid_plane.shape[0] - 1)
    in_image &= (c_b >= 0) & (c_b <= fluid_plane.shape[1] - 1)
    fov_end = int(np.flatnonzero(in_image)[-1]) if in_image.any() else n_s - 1
    if sac_end > fov_end - 10.0 / frame.step_mm:
        return None
    above = [c for c in centres if c <= sac_end - period / 3.0]
    if len(above) < 2 or len(above) == len(centres):
        return None
    return above


def _cut_at_void_disc(centres: list[float], discs: Discs) -> list[float] | None:
    """Chain ending above a near-void "disc" among the lowest five, or None.

    On T1 every true disc is darker than marrow; a chained position with almost no disc
    contrast there is a gap the spacing prior filled: a fused sacral segment or tissue past
    the column.  The chain stops above it (the highest such position) and S1 follows.
    """
    score_of = {float(c): float(v) for c, v in zip(discs.centres, discs.scores, strict=True)}
    scores = [score_of.get(float(c), np.nan) for c in centres]
    known = [v for v in scores if np.isfinite(v)]
    if len(known) < 5:
        return None
    ref = float(np.median(known))
    start = max(3, len(centres) - 5)
    for i in range(start, len(centres)):
        if np.isfinite(scores[i]) and scores[i] < _VOID_DISC_FRACTION * ref:
            return list(centres[:i])
    return None


def _trim_non_bone(centres: list[float], profiles: list[FloatArray]) -> list[float]:
    """Drop the lowest discs while the 'body' above them is no bone on any sequence.

    Past the sacrum the frame runs into pelvic soft tissue and bowel, whose texture can
    mimic discs; a real body (even edematous or cemented) stays in the bone range on at least
    one of T1 and STIR for most of its height.
    """
    out = list(centres)
    while len(out) > 3:
        ref = out[:-1]
        a, b = out[-2], out[-1]
        lo, hi = int(a + 0.2 * (b - a)), int(b - 0.2 * (b - a)) + 1
        frac = max(float(_inside_bone(ref, p)[lo:hi].mean()) for p in profiles)
        if frac >= _MIN_BONE_FRACTION:
            break
        out.pop()
    return out


def _find_sacrum(
    centres: list[float],
    discs: Discs,
    period: float,
    profile: FloatArray,
    min_periods: float = 1.0,
    thin_fraction: float = 0.5,
    weak_fraction: float = 0.6,
) -> tuple[bool, list[float]]:
    """Whether the sacrum is below the lowest true disc, and the disc centres above it.

    The sacrum is fused: below the L5-S1 disc, bone continues for more than a vertebral period
    with no disc in it.  Bone is recognised by the band profile staying within the range of
    the bodies above (so the end of the field of view or soft tissue stops it).  Fused
    segments can leave a thin remnant disc (S1-S2) that the disc chain picks up; a lowest
    "disc" markedly weaker or thinner than the others, with bone below it, is taken for such
    a remnant and dropped (at most two, so real discs survive).
    """
    kept = list(centres)
    scores = list(discs.scores)
    widths = list(discs.widths_mm)
    for _ in range(2):
        if len(kept) < 4:
            break
        ref_score = float(np.median(scores[:-1]))
        ref_width = float(np.median(widths[:-1]))
        weak = scores[-1] < weak_fraction * ref_score or widths[-1] < thin_fraction * ref_width
        if weak and _bony_length(kept, profile, period) >= 0.5 * period:
            kept.pop()
            scores.pop()
            widths.pop()
        else:
            break
    if _bony_length(kept, profile, period) >= min_periods * period:
        return True, kept
    return False, list(centres)


def _bony_length(centres: list[float], profile: FloatArray, period: float) -> float:
    """Arc steps of bone-like band signal below the lowest disc (gaps of 6 steps bridged)."""
    bodies = np.zeros(len(profile), dtype=bool)
    for a, b in itertools.pairwise(centres):
        lo, hi = int(a + 0.3 * (b - a)), int(b - 0.3 * (b - a))
        bodies[lo : hi + 1] = True
    if not bodies.any():
        return 0.0
    vals = profile[bodies]
    q_lo, q_hi = np.percentile(vals, [5, 95])
    spread = max(q_hi - q_lo, 0.25 * abs(float(np.median(vals))))
    inside = (profile >= q_lo - 0.5 * spread) & (profile <= q_hi + 0.5 * spread)
    start = int(centres[-1] + 0.25 * period)
    length, gap = 0, 0
    for i in range(start, len(profile)):
        if inside[i]:
            length, gap = i - start + 1, 0
        else:
            gap += 1
            if gap > 6:
                break
    return float(length + 0.25 * period)


def _disc_like(profile: FloatArray, centres: list[float], polarity: float) -> npt.NDArray[np.bool_]:
    """Arc steps whose band signal is nearer the chained discs' level than the bodies'."""
    idx = np.clip(np.round(centres).astype(int), 0, len(profile) - 1)
    disc_level = float(np.median(profile[idx]))
    inside = np.zeros(len(profile), dtype=bool)
    for a, b in itertools.pairwise(centres):
        inside[int(a + 0.3 * (b - a)) : int(b - 0.3 * (b - a)) + 1] = True
    body_level = float(np.median(profile[inside])) if inside.any() else disc_level
    mid = 0.5 * (disc_level + body_level)
    sign = 1.0 if disc_level > body_level else -1.0 if disc_level < body_level else polarity
    out: npt.NDArray[np.bool_] = sign * (profile - mid) > 0
    return out


def _has_run(mask: npt.NDArray[np.bool_], length: int) -> bool:
    """Whether ``mask`` holds ``length`` consecutive True values."""
    run = 0
    for v in mask:
        run = run + 1 if v else 0
        if run >= length:
            return True
    return False


def _redelineate_shallow(
    bodies: list[BodyMask | None],
    spans: list[BodySpan],
    outline: Callable[[BodySpan], BodyMask | None],
) -> list[BodyMask | None]:
    """Outline again the bodies much shallower than their neighbours, with a deeper core.

    A body's depth (front to back) changes little from one level to the next, also in a
    fracture (a wedge loses height, not depth).  An edematous or cemented body has edges
    inside it that can stop the first outline part way; its neighbours' median depth then
    sets how far forward its inner marker reaches.
    """
    depths = np.array([b.depth_mm if b is not None else np.nan for b in bodies])
    out = list(bodies)
    for i, body in enumerate(bodies):
        near = np.r_[
            depths[max(0, i - _DEPTH_NEIGHBOURS) : i], depths[i + 1 : i + 1 + _DEPTH_NEIGHBOURS]
        ]
        near = near[np.isfinite(near) & (near > 0)]
        if body is None or near.size < 2:
            continue
        expected = float(np.median(near))
        if body.depth_mm >= _SHALLOW_FRACTION * expected:
            continue
        core_depth_mm = max(spans[i].core_depth_mm, expected - _CORE_FRONT_GAP_MM)
        deeper = replace(spans[i], core_depth_mm=core_depth_mm)
        again = outline(deeper)
        if again is not None and again.depth_mm > body.depth_mm:
            out[i] = again
    return out


def _s1_frame(
    plane: npt.NDArray[np.float32],
    frame: Frame,
    wall_mm: FloatArray,
    disc: tuple[float, float],
    disc_above: tuple[float, float],
    margin: float,
) -> tuple[Frame, BodySpan]:
    """A straight frame along S1's own axis and S1's span in it.

    The L5-S1 disc mid-line (``disc``, in the canal frame) gives the disc direction in the
    image; S1's axis is perpendicular to it, starting at the disc's posterior end, and its
    anterior normal runs along the disc.  S1 ends at the S1-S2 junction: the darkest thin
    line 0.6-1.1 L5 heights below the disc (fused endplates), else one L5 height.
    """
    a, b = disc
    n_s = len(frame.points)

    def point(d: float) -> FloatArray:
        s = a + b * d
        w = wall_mm[int(np.clip(round(s), 0, n_s - 1))]
        r, c = frame.to_index(s, w + d)
        return np.array([float(r), float(c)])

    sr, sc = frame.spacing_mm
    p0, p1 = point(0.0), point(30.0)
    u = (p1 - p0) * np.array([sr, sc])
    u /= np.linalg.norm(u) + 1e-12
    v = np.array([-u[1], u[0]])  # inferior along S1's axis (frame convention n = (v_c, -v_r))
    l5_height = max(10.0, (a - disc_above[0]) * frame.step_mm)
    length = int(1.6 * l5_height / frame.step_mm) + 1
    t = np.arange(length, dtype=np.float64) * frame.step_mm
    points = p0[None, :] + t[:, None] * v[None, :] / np.array([sr, sc])
    normals = np.tile(u, (length, 1))
    local = Frame(points, normals, frame.depths_mm, frame.step_mm, frame.spacing_mm)
    depths = np.arange(3.0, 25.01, 1.0)
    rows, cols = local.to_index(np.arange(length)[:, None], depths[None, :])
    prof = np.median(ndimage.map_coordinates(plane, [rows, cols], order=1, mode="nearest"), axis=1)
    size = max(3, round(8.0 / frame.step_mm))
    dark = ndimage.grey_closing(prof, size=size, mode="nearest") - prof
    lo = int(0.6 * l5_height / frame.step_mm)
    hi = min(length - 1, int(1.1 * l5_height / frame.step_mm))
    end = lo + int(np.argmax(dark[lo : hi + 1])) if hi > lo else round(l5_height / frame.step_mm)
    span = BodySpan((0.0, 0.0), (float(end), 0.0), margin, 3.0 / frame.step_mm)
    return local, span


def _lateral_cut(
    body: BodyMask, mid_k: int, images: list[npt.NDArray[np.float32]]
) -> tuple[bool, dict[str, Any]]:
    """Whether the slab's left or right edge cuts the body, with the evidence.

    The body is cut when, in its fuller outer slice (first or last of the volume): the mask
    covers more than `_LATERAL_CUT_FRACTION` of its mid-sagittal area, the mask areas do not
    grow from the mid-sagittal slice out to that slice (a body's section only shrinks
    sideways; a mask growing again has leaked into other tissue), and the median signal there
    over the mid-sagittal one is within `_EDGE_SIGNAL_RANGE` on every image.
    """
    area = body.mask.reshape(body.mask.shape[0], -1).sum(axis=1).astype(float)
    n = area.size
    if n < _LATERAL_MIN_SLICES or not 0 <= mid_k < n or area[mid_k] == 0:
        return False, {"fraction": 0.0}
    k_edge = 0 if area[0] >= area[-1] else n - 1
    fraction = float(area[k_edge] / area[mid_k])
    path = area[mid_k::-1] if k_edge == 0 else area[mid_k:]
    running_min = np.minimum.accumulate(path)
    shrinking = bool(np.all(path[1:] <= _EDGE_REGROWTH * running_min[:-1]))
    r0, c0 = body.origin
    br, bc = body.mask.shape[1:]
    ratios = []
    for img in images:
        box = img[:, r0 : r0 + br, c0 : c0 + bc]
        if area[k_edge] == 0:
            ratios.append(0.0)
            continue
        e = float(np.median(box[k_edge][body.mask[k_edge]]))
        m = float(np.median(box[mid_k][body.mask[mid_k]]))
        ratios.append(round(e / m, 3) if m else 0.0)
    same_signal = all(_EDGE_SIGNAL_RANGE[0] <= r <= _EDGE_SIGNAL_RANGE[1] for r in ratios)
    cut = fraction > _LATERAL_CUT_FRACTION and shrinking and same_signal
    return cut, {"fraction": round(fraction, 3), "shrinking": shrinking, "signal": ratios}


def _name_below(lowest: str | None) -> str:
    """Name of the partly visible body just below the lowest fully visible one."""
    if lowest is None:
        return "below"
    if lowest.startswith("V"):
        return "V0"
    order = list(_NORMAL_ORDER)
    if lowest == "L6":
        return "S1"
    if lowest in order and order.index(lowest) + 1 < len(order):
        return order[order.index(lowest) + 1]
    return "below"
