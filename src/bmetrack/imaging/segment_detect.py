"""Detection stage of the vertebral body segmenter: canal centreline, column frame and discs.

All functions work on the canonical work array (axes LR, S->I, A->P; see `segment_geometry`) at
a coarse in-plane resolution.  The spinal canal is found as the longest smooth S-I path of a
tube-like intensity bar (dark on T1, bright on STIR/T2), the column is straightened along it
(curved planar reformation: arc length ``s`` down the canal, depth ``d`` anterior of it) and the
discs are the narrow bands of the body band's 1-D profile, chosen by dynamic programming with a
spacing prior so that missed discs are filled and spurious ones inside bodies are rejected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from bmetrack.imaging.segment_geometry import SegmentationError

__all__ = [
    "CanalPath",
    "Frame",
    "canal_centreline",
    "detect_discs",
    "normalise_intensity",
    "straighten",
]

FloatArray = npt.NDArray[np.float64]

# Width of the heavy Gaussian whose (normalised) blur is divided out as bias field.
_BIAS_SIGMA_MM = 45.0
# Canal half-widths tried (mm) and the gap between the canal and its flanks.
_CANAL_HALF_WIDTHS_MM = (3.0, 5.0, 7.0)
_CANAL_FLANK_GAP_MM = 4.0
# Straightened frame extent: depth posterior (negative) and anterior of the canal centre.
_DEPTH_RANGE_MM = (-20.0, 80.0)
_FRAME_STEP_MM = 1.0
# Depth sub-bands (mm anterior of the canal wall) whose profiles detect discs.
_SUB_BANDS_MM = ((2.0, 7.0), (7.0, 13.0), (13.0, 19.0), (19.0, 25.0))
# Top-hat length (mm) that scores disc bands.  Longer (24 mm) also catches thick or wedge
# discs with their endplates but scores dark endplate edema and sacral remnants as discs too:
# on development phantoms it labelled fewer levels correctly.
_DISC_TOPHAT_MM = 14.0
# A disc at either end of the chain needs this fraction of the chain's median score.
_END_DISC_FRACTION = 0.4
# No disc is placed within this distance (mm) of either end of the frame.
_EDGE_MM = 6.0


def normalise_intensity(
    image: npt.NDArray[np.float32], spacing_mm: tuple[float, float, float]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """Bias-corrected image scaled so that the foreground median is 1, and the foreground.

    The bias field is the normalised Gaussian blur (sigma 45 mm) of the foreground, divided
    out; scanner scaling disappears with the median.
    """
    img = np.clip(image, 0.0, None).astype(np.float32)
    hi = float(np.percentile(img, 99.5))
    if not np.isfinite(hi) or hi <= 0:
        msg = "image has no signal (99.5th percentile <= 0); check the input series"
        raise SegmentationError(msg)
    fg = img > 0.08 * hi
    fg = ndimage.binary_opening(fg, iterations=1)
    # The bias field is smooth: estimate it on a ~6 mm grid and interpolate back.
    zoom = [min(1.0, s / 6.0) for s in spacing_mm]
    small_img = ndimage.zoom(img * fg, zoom, order=1, grid_mode=True, mode="nearest")
    small_fg = ndimage.zoom(fg.astype(np.float32), zoom, order=1, grid_mode=True, mode="nearest")
    small_sp = [s * a / b for s, a, b in zip(spacing_mm, img.shape, small_img.shape, strict=True)]
    sigma = [_BIAS_SIGMA_MM / s for s in small_sp]
    num = ndimage.gaussian_filter(small_img, sigma, mode="nearest", truncate=2.5)
    den = ndimage.gaussian_filter(small_fg, sigma, mode="nearest", truncate=2.5)
    small_bias = num / np.maximum(den, 1e-3)
    back = [a / b for a, b in zip(img.shape, small_bias.shape, strict=True)]
    bias = ndimage.zoom(small_bias, back, order=1, grid_mode=True, mode="nearest")
    out = np.where(fg, img / np.maximum(bias, 1e-6 * hi), 0.0).astype(np.float32)
    med = float(np.median(out[fg])) if fg.any() else 1.0
    return (out / max(med, 1e-12)).astype(np.float32), fg


def _shift(a: FloatArray, n: int, axis: int) -> FloatArray:
    """``a`` shifted by ``n`` samples along ``axis`` with edge replication."""
    if n == 0:
        return a
    idx = np.clip(np.arange(a.shape[axis]) - n, 0, a.shape[axis] - 1)
    return np.take(a, idx, axis=axis)


def canal_response(
    plane: FloatArray, spacing_mm: tuple[float, float], polarity: float
) -> FloatArray:
    """Bar response of a sagittal plane: S-I running bar darker/brighter than both flanks.

    ``polarity`` +1 looks for a bright canal (STIR, T2), -1 for a dark one (T1).  The response
    is the smaller of the two centre-minus-flank contrasts, so an edge (one flank only) scores
    zero.
    """
    s_si, s_ap = spacing_mm
    smooth = ndimage.gaussian_filter(plane, (4.0 / s_si, 0.7 / s_ap), mode="nearest")
    best = np.full(plane.shape, -np.inf)
    flank = ndimage.uniform_filter1d(smooth, max(1, round(3.0 / s_ap)), axis=1)
    for half in _CANAL_HALF_WIDTHS_MM:
        size = max(1, round(2 * half / s_ap))
        centre = ndimage.uniform_filter1d(smooth, size, axis=1, mode="nearest")
        off = round((half + _CANAL_FLANK_GAP_MM) / s_ap)
        left, right = _shift(flank, off, 1), _shift(flank, -off, 1)
        resp = np.minimum(polarity * (centre - left), polarity * (centre - right))
        best = np.maximum(best, resp)
    return best


def _best_paths(
    score: FloatArray, max_step: int, step_penalty: float
) -> tuple[FloatArray, FloatArray]:
    """Max-sum S-I path per plane of ``score`` (planes, rows, columns).

    The column may change by at most ``max_step`` per row, at ``step_penalty`` per column.
    Returns the column per row of each plane's path (planes, rows) and each path's total.
    """
    n_planes, n_rows, n_cols = score.shape
    offsets = np.arange(-max_step, max_step + 1)
    acc = score[:, 0].copy()
    back = np.zeros((n_planes, n_rows, n_cols), dtype=np.int8)
    padded = np.full((n_planes, n_cols + 2 * max_step), -np.inf)
    cand = np.empty((len(offsets), n_planes, n_cols))
    for r in range(1, n_rows):
        padded[:, max_step : max_step + n_cols] = acc
        for i, o in enumerate(offsets):
            # Predecessor column c + o, read at padded index c + o + max_step.
            cand[i] = padded[:, i : i + n_cols] - step_penalty * abs(o)
        arg = np.argmax(cand, axis=0)
        acc = np.max(cand, axis=0) + score[:, r]  # the value at ``arg``
        back[:, r] = offsets[arg]
    paths = np.zeros((n_planes, n_rows))
    totals = np.max(acc, axis=1)
    # Trace all planes back at once.
    planes = np.arange(n_planes)
    c = np.argmax(acc, axis=1)
    for r in range(n_rows - 1, -1, -1):
        paths[:, r] = c
        c = c + back[planes, r, c]
    return paths, totals


@dataclass(frozen=True)
class CanalPath:
    """The canal centreline chosen in one sagittal plane.

    Attributes
    ----------
    plane : int
        Work-grid slice index of the mid-sagittal plane.
    columns : ndarray
        Canal column per row for rows ``first..last`` (smoothed; extrapolated at both ends
        beyond the trusted part, so bodies below the end of the thecal sac are still framed).
    first, last : int
        Rows covered by ``columns``.
    score : float
        Mean canal response over the trusted part.
    periodicity : float
        Rise of the autocorrelation of the disc pattern anterior to the canal from its dip to
        its peak (0..2; `_periodic_contrast`).
    """

    plane: int
    columns: FloatArray
    first: int
    last: int
    score: float
    periodicity: float = 0.0


def _trusted_run(along: FloatArray, s_si: float) -> tuple[int, int]:
    """Longest run of rows with canal response, bridging gaps up to 20 mm."""
    good = ndimage.uniform_filter1d(along, max(1, round(15.0 / s_si)), mode="nearest") > 0.3
    good = ndimage.binary_closing(good, iterations=max(1, round(10.0 / s_si)))
    lab, n = ndimage.label(good)
    if n == 0:
        return 0, -1
    sizes = ndimage.sum(good, lab, index=np.arange(1, n + 1))
    rows = np.flatnonzero(lab == int(np.argmax(sizes)) + 1)
    return int(rows[0]), int(rows[-1])


def _extended_path(path: FloatArray, first: int, last: int, s_si: float) -> CanalPath:
    """Smooth the trusted part of ``path`` and extrapolate it linearly by up to 80 mm."""
    n_rows = len(path)
    seg = path[first : last + 1]
    seg = ndimage.median_filter(seg, size=max(3, round(15.0 / s_si) | 1), mode="nearest")
    seg = ndimage.gaussian_filter1d(seg, 5.0 / s_si, mode="nearest")
    reach = round(80.0 / s_si)
    fit = max(2, min(len(seg), round(20.0 / s_si)))
    lo, hi = max(0, first - reach), min(n_rows - 1, last + reach)
    # End slopes from a line fit to the raw path: the smoothed path is flattened at its ends
    # by the edge padding of the filters, which would steer the extrapolation straight down
    # through L5 and S1 where the canal curves backwards.
    raw = path[first : last + 1]
    x = np.arange(fit, dtype=np.float64)
    top_slope = float(np.polyfit(x, raw[:fit], 1)[0])
    bot_slope = float(np.polyfit(x, raw[-fit:], 1)[0])
    # Below the thecal sac the sacral canal turns posterior (lordosis, sacral kyphosis): a
    # path heading anterior there has drifted off the canal, and extrapolating it would steer
    # the frame through S1 into the pelvis.
    bot_slope = max(bot_slope, 0.0)
    head = seg[0] - top_slope * np.arange(first - lo, 0, -1)
    tail = seg[-1] + bot_slope * np.arange(1, hi - last + 1)
    cols = np.concatenate([head, seg, tail])
    return CanalPath(0, cols, lo, hi, 0.0)


def canal_centreline(
    norm: npt.NDArray[np.float32],
    spacing_mm: tuple[float, float, float],
    polarity: float,
    opposite: npt.NDArray[np.float32] | None = None,
) -> CanalPath:
    """The spinal canal in the mid-sagittal plane.

    In every slice of the central 60% of the left-right extent the two best smooth S-I paths
    of the canal response are candidates (the second one away from the first, since vessels
    can look like a canal).  Each is trimmed to its trusted part and scored by its canal
    response, its length, and the periodicity of the disc pattern just anterior to it: the
    canal is the tube with a column of discs and bodies in front.

    ``opposite`` is an optional T1 image on the same grid as a STIR/T2 ``norm``: the disc
    pattern in front of a candidate is then read on it (every disc is dark on T1).
    """
    n_sl = norm.shape[0]
    lo, hi = int(np.floor(0.2 * (n_sl - 1))), int(np.ceil(0.8 * (n_sl - 1)))
    s_si, s_ap = spacing_mm[1], spacing_mm[2]
    max_step = max(1, round(1.6 * s_si / s_ap))
    planes = list(range(lo, hi + 1))
    scores = np.empty((len(planes), norm.shape[1], norm.shape[2]))
    for i, k in enumerate(planes):
        resp = canal_response(norm[k].astype(np.float64), (s_si, s_ap), polarity)
        scale = float(np.percentile(np.abs(resp), 90)) + 1e-6
        scores[i] = np.clip(resp / scale, -1.0, 3.0)
    candidates: list[tuple[float, int, FloatArray]] = []
    work = scores.copy()
    rows = np.arange(norm.shape[1])
    half = max(1, round(12.0 / s_ap))
    for _ in range(2):
        paths, totals = _best_paths(work, max_step, 0.15)
        for i, k in enumerate(planes):
            candidates.append((float(totals[i]), k, paths[i]))
            cols = np.arange(norm.shape[2])[None, :]
            near = np.abs(cols - paths[i][:, None]) <= half
            work[i][near] = -1.0
    scored: list[tuple[float, float, CanalPath]] = []
    for _, k, path in candidates:
        i = planes.index(k)
        along = scores[i][rows, path.astype(int)]
        first, last = _trusted_run(along, s_si)
        if last - first < round(40.0 / s_si):
            continue
        mean = float(np.mean(along[first : last + 1]))
        cand = _extended_path(path, first, last, s_si)
        cand = CanalPath(k, cand.columns, cand.first, cand.last, mean)
        ant = _anterior_periodicity(
            norm[k], cand, spacing_mm, polarity, None if opposite is None else opposite[k]
        )
        cand = CanalPath(k, cand.columns, cand.first, cand.last, mean, ant)
        length_mm = (last - first) * s_si
        offset_mm = (k - (n_sl - 1) / 2) * spacing_mm[0]
        quality = (
            mean
            * (length_mm / 100.0)
            * max(ant, 0.05)
            * float(np.exp(-0.5 * (offset_mm / 15.0) ** 2))
        )
        scored.append((quality, float(np.mean(path[first : last + 1])), cand))
    if not scored:
        msg = (
            "no spine found: no spinal canal runs through the image; check the contrast "
            "argument and that the series is a sagittal spine MRI"
        )
        raise SegmentationError(msg)
    top_q, top_col, best = max(scored, key=lambda item: item[0])
    # The gap between laminae/spinous processes and the muscles behind them can also look like
    # a canal with a periodic column in front: if a good candidate runs 8-55 mm in front of
    # the best one in the same or a neighbouring slice, that one is the canal.
    front = [
        (col, c)
        for q, col, c in scored
        if q >= 0.5 * top_q
        and abs(c.plane - best.plane) <= 1
        and 8.0 <= (top_col - col) * s_ap <= 55.0
    ]
    if front:
        best = min(front, key=lambda item: item[0])[1]
    if best.score <= 0.2:
        msg = (
            "no spine found: no spinal canal runs through the image (canal score "
            f"{best.score:.2f}); check the contrast argument and that the series is a sagittal "
            "spine MRI"
        )
        raise SegmentationError(msg)
    return best


def _anterior_periodicity(
    plane: npt.NDArray[np.float32],
    canal: CanalPath,
    spacing_mm: tuple[float, float, float],
    polarity: float,
    t1_plane: npt.NDArray[np.float32] | None = None,
) -> float:
    """Autocorrelation peak (lags 18-55 mm) of the disc score anterior of a candidate canal:
    the canal has the body column in front, a prevertebral vessel has bowel or fat.  With a
    T1 plane the discs are read there (dark on T1 whatever their hydration)."""
    # One frame and sampling grid for both planes (the same canal straightens both).
    frame, rr, cc = _frame_grid(canal, spacing_mm)
    mid = _sample_stack(plane[None], rr, cc)[0].astype(np.float64)
    lo, hi = round(18.0 / frame.step_mm), round(55.0 / frame.step_mm)
    wall = anterior_wall_mm(mid, frame.depths_mm, polarity)
    disc_polarity = -1.0 if polarity < 0 else None
    if t1_plane is not None:
        mid = _sample_stack(t1_plane[None], rr, cc)[0].astype(np.float64)
        disc_polarity = -1.0
    prof = band_profile(mid, frame.depths_mm, wall)
    discs = detect_discs(prof, disc_polarity, frame.step_mm)
    return _periodic_contrast(_clipped(discs.score_curve), lo, hi)


def _periodic_contrast(sig: FloatArray, lo: int, hi: int) -> float:
    """Rise of the autocorrelation from its dip to its peak at a lag in ``lo..hi``.

    A periodic pattern anti-correlates at half its period and correlates again at the period;
    smooth non-periodic texture (bowel, fat) correlates highly at short lags but has no dip
    and peak, so the plain autocorrelation value would favour it.
    """
    x = sig - sig.mean()
    ac = np.correlate(x, x, mode="full")[len(x) - 1 :]
    ac = ac / (ac[0] + 1e-12)
    hi = min(hi, len(ac) - 2)
    best = 0.0
    for lag in range(max(lo, 2), hi + 1):
        if ac[lag] >= ac[lag - 1] and ac[lag] >= ac[lag + 1]:
            best = max(best, float(ac[lag] - np.min(ac[1:lag])))
    return best


@dataclass(frozen=True)
class Frame:
    """Curved frame along the canal of the mid-sagittal plane.

    Attributes
    ----------
    points : ndarray (n_s, 2)
        Canal centre at each arc-length step, in work-grid (row, column) indices.
    normals : ndarray (n_s, 2)
        Unit anterior normal per step, in mm components (row, column).
    depths_mm : ndarray (n_d,)
        Depth samples anterior (positive) of the canal centre.
    step_mm : float
        Arc-length step.
    spacing_mm : tuple of float
        (row, column) step of the work grid.
    """

    points: FloatArray
    normals: FloatArray
    depths_mm: FloatArray
    step_mm: float
    spacing_mm: tuple[float, float]

    def to_index(self, s: npt.ArrayLike, d: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
        """Work-grid (row, column) of frame coordinates (arc index ``s``, depth ``d`` mm)."""
        s_arr = np.clip(np.asarray(s, dtype=np.float64), 0, len(self.points) - 1)
        d_arr = np.asarray(d, dtype=np.float64)
        i0 = np.floor(s_arr).astype(int)
        i1 = np.minimum(i0 + 1, len(self.points) - 1)
        f = s_arr - i0
        p = self.points[i0] * (1 - f)[..., None] + self.points[i1] * f[..., None]
        n = self.normals[i0] * (1 - f)[..., None] + self.normals[i1] * f[..., None]
        rows = p[..., 0] + d_arr * n[..., 0] / self.spacing_mm[0]
        cols = p[..., 1] + d_arr * n[..., 1] / self.spacing_mm[1]
        return rows, cols


def straighten(
    norm: npt.NDArray[np.float32],
    canal: CanalPath,
    spacing_mm: tuple[float, float, float],
) -> tuple[Frame, npt.NDArray[np.float32]]:
    """Curved planar reformation of every slice along the canal curve.

    Returns the frame and the straightened stack, shape (n_slices, n_s, n_d).
    """
    frame, rr, cc = _frame_grid(canal, spacing_mm)
    return frame, _sample_stack(norm, rr, cc)


def _sample_stack(
    norm: npt.NDArray[np.float32], rr: FloatArray, cc: FloatArray
) -> npt.NDArray[np.float32]:
    """Every slice of ``norm`` sampled (linear, nearest edge) at work-grid ``(rr, cc)``."""
    out = np.empty((norm.shape[0], *rr.shape), dtype=np.float32)
    for k in range(norm.shape[0]):
        out[k] = ndimage.map_coordinates(norm[k], [rr, cc], order=1, mode="nearest")
    return out


def _frame_grid(
    canal: CanalPath, spacing_mm: tuple[float, float, float]
) -> tuple[Frame, FloatArray, FloatArray]:
    """The frame along ``canal`` and the work-grid (row, column) of its (n_s, n_d) samples."""
    s_si, s_ap = spacing_mm[1], spacing_mm[2]
    rows = np.arange(canal.first, canal.last + 1, dtype=np.float64)
    mm = np.stack([rows * s_si, canal.columns * s_ap], axis=1)
    seg = np.linalg.norm(np.diff(mm, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    s_mm = np.arange(0.0, arc[-1], _FRAME_STEP_MM)
    pts_mm = np.stack([np.interp(s_mm, arc, mm[:, 0]), np.interp(s_mm, arc, mm[:, 1])], axis=1)
    tangent = np.gradient(pts_mm, axis=0)
    tangent = ndimage.gaussian_filter1d(tangent, 4.0, axis=0, mode="nearest")
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True) + 1e-12
    normals = np.stack([tangent[:, 1], -tangent[:, 0]], axis=1)  # column part < 0: anterior
    points = pts_mm / np.array([s_si, s_ap])
    depths = np.arange(_DEPTH_RANGE_MM[0], _DEPTH_RANGE_MM[1] + 1e-9, _FRAME_STEP_MM)
    frame = Frame(points, normals, depths, _FRAME_STEP_MM, (s_si, s_ap))
    # Arc index per row only (broadcast against depths): same values as a full (n_s, n_d)
    # index grid without interpolating the frame n_d times per step.
    rr, cc = frame.to_index(np.arange(len(points), dtype=np.float64)[:, None], depths[None, :])
    return frame, rr, cc


def anterior_wall_mm(mid: FloatArray, depths_mm: FloatArray, polarity: float) -> FloatArray:
    """Depth (mm) of the canal's anterior wall per arc step: the strongest canal->bone edge."""
    grad = ndimage.gaussian_filter(mid, (3.0, 1.5), order=(0, 1), mode="nearest")
    window = (depths_mm >= 2.0) & (depths_mm <= 16.0)
    edge = -polarity * grad[:, window]
    wall = depths_mm[window][np.argmax(edge, axis=1)]
    wall = ndimage.median_filter(wall, size=31, mode="nearest")
    return ndimage.gaussian_filter1d(wall.astype(np.float64), 5.0, mode="nearest")


def band_profile(mid: FloatArray, depths_mm: FloatArray, wall_mm: FloatArray) -> FloatArray:
    """Median intensity per arc step of four sub-bands 2-25 mm anterior of the canal wall,
    shape (n_s, 4).  Discs span all of them; cement or edema patches rarely do."""
    rel = depths_mm[None, :] - wall_mm[:, None]
    out = np.empty((mid.shape[0], len(_SUB_BANDS_MM)))
    for i, (lo, hi) in enumerate(_SUB_BANDS_MM):
        band = np.where((rel >= lo) & (rel <= hi), mid, np.nan)
        prof = _row_nanmedian(band)
        out[:, i] = np.nan_to_num(prof, nan=float(np.nanmedian(prof)))
    return out


def _row_nanmedian(band: FloatArray) -> FloatArray:
    """``np.nanmedian(band, axis=1)`` (NaN for an all-NaN row), without its slow masked-array
    path for short rows: the same mean of the two middle sorted values."""
    srt = np.sort(band, axis=1)  # NaN sort last
    counts = np.count_nonzero(~np.isnan(band), axis=1)
    h = counts // 2
    low = np.where(counts % 2 == 1, h, h - 1)
    rows = np.arange(band.shape[0])
    lo_val = srt[rows, np.maximum(low, 0)]
    hi_val = srt[rows, np.minimum(h, band.shape[1] - 1)]
    med = (lo_val + hi_val) / 2.0
    med[counts == 0] = np.nan
    return med


@dataclass(frozen=True)
class Discs:
    """Disc centres along the arc (indices of the frame), their scores and the period."""

    centres: npt.NDArray[np.int64]
    scores: FloatArray
    period_mm: float
    score_curve: FloatArray
    widths_mm: FloatArray
    polarity: float


def _clipped(sig: FloatArray) -> FloatArray:
    """``sig`` clipped at its 90th percentile, so one very strong band (a cement void) does
    not dominate an autocorrelation."""
    return np.minimum(sig, np.percentile(sig, 90))


def _periodicity(sig: FloatArray, lo: int, hi: int) -> tuple[float, int]:
    x = sig - sig.mean()
    ac = np.correlate(x, x, mode="full")[len(x) - 1 :]
    ac = ac / (ac[0] + 1e-12)
    hi = min(hi, len(ac) - 1)
    if hi <= lo:
        return 0.0, lo
    lag = lo + int(np.argmax(ac[lo:hi]))
    return float(ac[lag]), lag


def detect_discs(
    profile: FloatArray,
    polarity_prior: float | None,
    step_mm: float,
) -> Discs:
    """Disc centres along the column from the band profile.

    Narrow bands (white and black top-hats, `_DISC_TOPHAT_MM` long) of the profile score
    discs; the polarity of discs (dark on T1; mostly bright on STIR/T2) is taken from
    ``polarity_prior`` (-1 dark, +1 bright) or, when None, from whichever polarity is more
    periodic.  A dynamic programme then picks the chain of centres maximising score minus a
    spacing penalty around the period.
    """
    prof = ndimage.gaussian_filter1d(profile, 1.0 / step_mm, axis=0, mode="nearest")
    size = (max(3, round(_DISC_TOPHAT_MM / step_mm)), 1)
    mad = np.median(np.abs(prof - np.median(prof, axis=0)), axis=0) * 1.4826 + 1e-6
    white = (prof - ndimage.grey_opening(prof, size=size, mode="nearest")) / mad
    black = (ndimage.grey_closing(prof, size=size, mode="nearest") - prof) / mad
    # A disc crosses most of the body depth (a hydrated nucleus only its middle): the second
    # largest sub-band response ignores patches confined to one sub-band (cement, edema).
    white = np.sort(white, axis=1)[:, -2]
    black = np.sort(black, axis=1)[:, -2]
    lo, hi = round(18.0 / step_mm), round(55.0 / step_mm)
    if polarity_prior is None:
        pw, _ = _periodicity(white, lo, hi)
        pb, _ = _periodicity(black, lo, hi)
        polarity_prior = 1.0 if pw > pb else -1.0
    main, other = (white, black) if polarity_prior > 0 else (black, white)
    raw_main = main
    # Smoothing turns each disc's flat top-hat plateau into a peak at its centre.
    score = ndimage.gaussian_filter1d(main + 0.3 * other, 3.0 / step_mm, mode="nearest")
    _, lag = _periodicity(_clipped(score), lo, hi)
    period = float(lag) if lag > lo else round(32.0 / step_mm)
    peaks = score[ndimage.maximum_filter1d(score, round(8.0 / step_mm)) == score]
    strong = float(np.percentile(peaks, 90)) if peaks.size else 1.0
    tau = 0.2 * strong
    n = len(score)
    gmin, gmax = max(1, int(0.45 * period)), int(1.6 * period) + 1
    best = np.full(n, -np.inf)
    prev = np.full(n, -1, dtype=np.int64)
    # Capped gain: a very dark cement cast must not outweigh the spacing prior.
    gain = np.minimum(score, 1.5 * strong) - tau
    # A disc needs bone on both sides inside the field of view: the image edge (or the end of
    # the other sequence's field of view) is a dark band otherwise.
    edge = max(1, round(_EDGE_MM / step_mm))
    gain[:edge] = -np.inf
    gain[-edge:] = -np.inf
    lam = 5.0 * strong
    # Spacing penalty by gap i - j (tabulated once; same arithmetic as per candidate).
    penalty = lam * (np.arange(gmax + 1) / period - 1.0) ** 2
    for i in range(n):
        best[i] = gain[i]
        j0, j1 = max(0, i - gmax), i - gmin
        if j1 >= j0:
            cand = best[j0 : j1 + 1] + gain[i] - penalty[i - j0 : i - j1 - 1 : -1]
            m = int(np.argmax(cand))
            if cand[m] > best[i]:
                best[i], prev[i] = cand[m], j0 + m
    end = int(np.argmax(best))
    chain = []
    while end >= 0:
        chain.append(end)
        end = int(prev[end])
    chain = sorted(chain)
    # The spacing prior may fill gaps between strong discs (a fractured or edematous body
    # hides its endplates), but nothing supports a weak position at either end of the chain:
    # the edge of the field of view or tissue past the column.
    ref = float(np.median(score[chain])) if chain else 0.0
    while len(chain) > 3 and score[chain[-1]] < _END_DISC_FRACTION * ref:
        chain.pop()
    while len(chain) > 3 and score[chain[0]] < _END_DISC_FRACTION * ref:
        chain.pop(0)
    centres = np.array(chain, dtype=np.int64)
    smooth_main = ndimage.gaussian_filter1d(raw_main, 1.0 / step_mm, mode="nearest")
    widths = np.array([_half_max_width(smooth_main, int(c)) for c in centres]) * step_mm
    return Discs(centres, score[centres], period * step_mm, score, widths, polarity_prior)


def _half_max_width(curve: FloatArray, centre: int, reach: int = 12) -> float:
    """Width (samples) of the part of ``curve`` above half its local peak around ``centre``."""
    lo, hi = max(0, centre - reach), min(len(curve), centre + reach + 1)
    seg = curve[lo:hi]
    peak = int(np.argmax(seg))
    half = 0.5 * seg[peak]
    if half <= 0:
        return 0.0
    left = peak
    while left > 0 and seg[left - 1] >= half:
        left -= 1
    right = peak
    while right < len(seg) - 1 and seg[right + 1] >= half:
        right += 1
    return float(right - left + 1)


def disc_lines(
    mid: FloatArray,
    depths_mm: FloatArray,
    wall_mm: FloatArray,
    centres: list[float],
    polarity: float,
    step_mm: float,
) -> list[tuple[float, float]]:
    """Mid-line of each disc as ``s = a + b * depth_from_wall_mm`` (arc index units).

    Discs are not always perpendicular to the canal (wedge discs, fractured endplates): per
    depth column the disc centre is the strongest narrow band within 7 mm of the chain
    position, and a weighted line is fitted (slope limited to +-0.5).
    """
    smooth = ndimage.gaussian_filter(mid, (1.0 / step_mm, 1.5 / step_mm), mode="nearest")
    size = (max(3, round(_DISC_TOPHAT_MM / step_mm)), 1)
    if polarity > 0:
        th = smooth - ndimage.grey_opening(smooth, size=size, mode="nearest")
    else:
        th = ndimage.grey_closing(smooth, size=size, mode="nearest") - smooth
    th = ndimage.gaussian_filter1d(th, 2.0 / step_mm, axis=0, mode="nearest")
    reach = round(7.0 / step_mm)
    lines = []
    for c in centres:
        ci = round(c)
        lo, hi = max(0, ci - reach), min(len(th), ci + reach + 1)
        rel = depths_mm - wall_mm[min(max(ci, 0), len(wall_mm) - 1)]
        cols = np.flatnonzero((rel >= 3.0) & (rel <= 28.0))
        if hi - lo < 3 or cols.size < 5:
            lines.append((float(c), 0.0))
            continue
        block = th[lo:hi][:, cols]
        s_best = lo + np.argmax(block, axis=0).astype(np.float64)
        w = np.clip(np.max(block, axis=0), 0.0, None)
        x = rel[cols]
        a, b = float(c), 0.0
        keep = w > 0
        for _ in range(3):
            if keep.sum() < 5:
                break
            b, a = np.polyfit(x[keep], s_best[keep], 1, w=np.sqrt(w[keep]))
            resid = np.abs(s_best - (a + b * x))
            keep = (w > 0) & (resid < max(2.0 / step_mm, 2.5 * np.median(resid[keep])))
        b = float(np.clip(b, -0.5, 0.5))
        a = float(np.median(s_best[keep] - b * x[keep])) if keep.sum() >= 5 else float(c)
        lines.append((a, b))
    return lines
