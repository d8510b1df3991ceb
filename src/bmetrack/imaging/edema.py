"""Bone marrow edema, cement, peri-cement rim and deformity per vertebral body (METHOD.md 3-4).

`quantify_vertebrae` takes a STIR, a T1 and a label map of vertebral bodies on ONE grid
(the caller resamples) and measures every labelled body.  Every distance is in mm and is
converted per axis with the grid's spacing (Euclidean distance transforms with
``sampling=spacing``), so 0.6 x 0.6 mm pixels with 4 mm slices are handled correctly.

Rules (settings in brackets, from `bmetrack.settings`):

- **Depth.**  A voxel's depth is the distance (mm) from its centre to the centre of the
  nearest voxel outside its body (image borders count as outside).  "Eroded by r mm" keeps
  the voxels deeper than r, which is a binary erosion by a ball of radius r mm: a margin of
  1 mm on 0.6 mm pixels removes a one-pixel shell in plane and nothing across 4 mm slices.
- **Smoothing.**  Before any threshold, STIR and T1 are median-filtered in plane with a
  5-pixel cross (`MEDIAN_FOOTPRINT`): it halves the noise SD of real (Rician) STIR while
  keeping edges and the corners of rectangular regions; reference statistics are computed
  on the same filtered images so thresholds and data agree.
- **Reference marrow** [reference_erosion_mm, reference_min_bodies].  Candidates: bodies of
  Genant grade 0 (this module's morphometry), not the sacrum, with voxels left after erosion.
  Pooled robust statistics (median; SD = 1.4826 x MAD) of their eroded voxels.  Each
  candidate is judged against the statistics of the OTHER candidates (an abnormal body
  inflates the SD of a pool it belongs to until it no longer looks abnormal): a body holding
  cement (a cement component by the rule below) or whose eroded voxels are abnormal for at
  least `REFERENCE_EDEMA_FRACTION` (edema by the configured rule, or STIR-bright without
  fat -- edema whose T1 change is weak) is a misfit; the worst misfit is dropped and the
  test repeated until none is left.  ``reference_levels`` replaces
  the automatic choice.  Fewer usable bodies than reference_min_bodies: a warning; none:
  `ReferenceMarrowError`.
- **Cement** [cement_fraction_of_reference].  Dark voxels: below the fraction x reference
  median on BOTH sequences, the STIR fraction being at least `CEMENT_STIR_FRACTION_MIN`
  (1.0: fat-suppressed marrow is near the noise floor, so a STIR void is only "not brighter
  than normal marrow"; T1 carries the contrast).  Cortex and endplates are dark too, so the
  search starts in the body interior deeper than `CEMENT_INTERIOR_MARGIN_MM`, removes
  structures thinner than the cortex by an opening of radius `CEMENT_OPENING_RADIUS_MM`
  (sheets up to two 0.6 mm pixels thick vanish; a cement cast is millimetres thick) --
  margin and radius are at least one in-plane pixel, as the imaged cortex is -- keeps
  26-connected components of at least `CEMENT_MIN_COMPONENT_ML`, takes back the dark voxels
  within `CEMENT_GROW_MM` of them (cement touching an endplate), and finally adds the
  partial-volume edge of the cast: up to `CEMENT_GROW_VOXELS` steps into voxels with T1
  below `CEMENT_PARTIAL_FRACTION` x the reference (mostly cement) and STIR not brighter than
  marrow.
- **Rim** [rim_width_mm, edema_k_sd].  Body voxels outside the cement, within rim_width_mm
  of it, with STIR > reference median + k SD.  Reported separately, not edema.
- **Edema** [edema_rule, edema_k_sd, edema_surface_margin_mm, edema_min_cluster_ml].  Body
  voxels deeper than the surface margin, outside cement and rim, with ``stir_and_t1``:
  STIR > median + k SD and T1 < median - k SD (a hemangioma, bright on both, fails the T1
  condition); ``stir_only``: STIR > median + k SD and T1 not brighter than median + k SD
  (fat-containing lesions excluded); ``t1_only``: T1 < median - k SD and STIR not darker
  than median - k SD (cortex, sclerosis: dark on both, are not edema). 26-connected clusters
  smaller than edema_min_cluster_ml are removed.
- ``bme_percent`` = edema / (body - cement) x 100, clipped to 0..100; ``bme_present`` when
  the (0.1-rounded) bme_percent >= bme_present_threshold_percent.  Body volume = label
  voxels x voxel volume.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from bmetrack.anatomy import LevelError, label_from_level, level_from_label
from bmetrack.imaging import morphometry
from bmetrack.imaging.errors import ImagingError
from bmetrack.imaging.volume import Volume
from bmetrack.settings import Settings, resolve_settings

__all__ = [
    "ALGORITHM",
    "CEMENT_GROW_MM",
    "CEMENT_GROW_VOXELS",
    "CEMENT_INTERIOR_MARGIN_MM",
    "CEMENT_MIN_COMPONENT_ML",
    "CEMENT_OPENING_RADIUS_MM",
    "CEMENT_PARTIAL_FRACTION",
    "CEMENT_STIR_FRACTION_MIN",
    "MAD_TO_SD",
    "MEDIAN_FOOTPRINT",
    "REFERENCE_EDEMA_FRACTION",
    "SETTING_NAMES",
    "VERSION",
    "Quantification",
    "ReferenceMarrowError",
    "ReferenceStats",
    "VertebraResult",
    "quantify_vertebrae",
    "robust_stats",
]

ALGORITHM = "bmetrack.edema"
VERSION = "1.1.0"  # 1.1: reference bodies judged leave-one-out

#: Scale from the median absolute deviation to the SD of a normal distribution.
MAD_TO_SD = 1.4826
#: In-plane median filter footprint (a cross of 5 pixels) applied to STIR and T1 before any
#: threshold; axes (slice, row, column), no smoothing across slices (turned to the axis of
#: largest spacing when the grid's thick axis is not the first).
MEDIAN_FOOTPRINT: npt.NDArray[np.bool_] = np.array(
    [[[False, True, False], [True, True, True], [False, True, False]]]
)
MEDIAN_FOOTPRINT.setflags(write=False)
#: Lower bound of the STIR fraction of the cement rule.  Fat-suppressed normal marrow is
#: itself close to the noise floor on STIR (marrow SNR 2-8 on real scans), so the Rician floor
#: of a signal void is 0.3-0.6 x the marrow median and a fraction of 0.3 misses most cement;
#: on STIR, a void is "not brighter than the normal marrow median" (which still rejects
#: edema, rim and fluid, all STIR-bright).  T1, where cement is conspicuous, uses the setting.
CEMENT_STIR_FRACTION_MIN = 1.0
#: Cement is searched deeper than this inside the body (cortex and endplates are dark).
CEMENT_INTERIOR_MARGIN_MM = 1.0
#: Opening radius removing dark sheets thinner than the cortex from the cement search.
CEMENT_OPENING_RADIUS_MM = 1.0
#: Cement components smaller than this are specks and are discarded.
CEMENT_MIN_COMPONENT_ML = 0.05
#: Dark voxels within this distance of a kept cement component join it.
CEMENT_GROW_MM = 1.0
#: Partial-volume edge of a cast: T1 below this fraction of the reference (the midpoint
#: between a void and marrow: the voxel is mostly cement) ...
CEMENT_PARTIAL_FRACTION = 0.5
#: ... taken in up to this many voxel steps from the cast found with the strict rule.
CEMENT_GROW_VOXELS = 2
#: A candidate reference body is edematous when this fraction of its eroded voxels meets the
#: edema rule with the provisional reference statistics.
REFERENCE_EDEMA_FRACTION = 0.05

#: Settings this module reads (recorded in provenance).
SETTING_NAMES: tuple[str, ...] = (
    "edema_k_sd",
    "edema_rule",
    "edema_surface_margin_mm",
    "edema_min_cluster_ml",
    "reference_erosion_mm",
    "reference_min_bodies",
    "cement_fraction_of_reference",
    "rim_width_mm",
    "bme_present_threshold_percent",
    "genant_grade1_min_percent",
    "genant_grade2_min_percent",
    "genant_grade3_min_percent",
)

_CONN26 = np.ones((3, 3, 3), dtype=bool)
# Crop padding (slice, row, column): room for the median filter and for outside voxels.
_PAD = (1, 2, 2)
_EDEMA_RULES = ("stir_and_t1", "stir_only", "t1_only")


class ReferenceMarrowError(ImagingError):
    """No vertebral body can serve as reference marrow."""


@dataclass(frozen=True)
class ReferenceStats:
    """Robust statistics of the reference marrow (on the median-filtered images)."""

    levels: tuple[str, ...]
    labels: tuple[int, ...]
    stir_median: float
    t1_median: float
    stir_sd: float
    t1_sd: float
    n_voxels: int

    def as_dict(self) -> dict[str, Any]:
        """Plain dict: levels, stir_median, t1_median, stir_sd, t1_sd."""
        return {
            "levels": list(self.levels),
            "stir_median": self.stir_median,
            "t1_median": self.t1_median,
            "stir_sd": self.stir_sd,
            "t1_sd": self.t1_sd,
        }


@dataclass(frozen=True)
class VertebraResult:
    """Measurements of one vertebral body; field names are the quantify JSON keys."""

    level: str
    label: int
    body_volume_ml: float
    edema_volume_ml: float
    cement_volume_ml: float
    rim_volume_ml: float
    bme_percent: float
    bme_present: bool
    heights_mm: dict[str, float]
    height_loss_percent: float
    genant_grade: int
    deformity: str

    def to_contract_dict(self) -> dict[str, Any]:
        """JSON-ready dict with rounded numbers (ml 0.01, percent and mm 0.1)."""
        return {
            "level": self.level,
            "label": int(self.label),
            "body_volume_ml": _r(self.body_volume_ml, 2),
            "edema_volume_ml": _r(self.edema_volume_ml, 2),
            "cement_volume_ml": _r(self.cement_volume_ml, 2),
            "rim_volume_ml": _r(self.rim_volume_ml, 2),
            "bme_percent": _r(self.bme_percent, 1),
            "bme_present": bool(self.bme_present),
            "heights_mm": {k: _r(v, 1) for k, v in self.heights_mm.items()},
            "height_loss_percent": _r(self.height_loss_percent, 1),
            "genant_grade": int(self.genant_grade),
            "deformity": self.deformity,
        }


@dataclass
class Quantification:
    """Result of `quantify_vertebrae`.

    Attributes
    ----------
    vertebrae : list of VertebraResult
        One per labelled body, in label (cranio-caudal) order.
    reference : dict
        ``levels, stir_median, t1_median, stir_sd, t1_sd`` of the reference marrow.
    masks : dict of str -> bool ndarray
        ``"edema"``, ``"cement"``, ``"rim"`` on the input grid.
    warnings : list of str
    provenance : dict
        ``algorithm, version, parameters, input_series_uids``.
    """

    vertebrae: list[VertebraResult]
    reference: dict[str, Any]
    masks: dict[str, npt.NDArray[np.bool_]]
    warnings: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_contract_dict(self) -> dict[str, Any]:
        """The ``bmetrack quantify`` JSON of CLI-CONTRACT.md (vertebrae, reference, warnings)."""
        ref = dict(self.reference)
        return {
            "vertebrae": [v.to_contract_dict() for v in self.vertebrae],
            "reference": {
                "levels": list(ref["levels"]),
                "stir_median": _r(ref["stir_median"], 1),
                "t1_median": _r(ref["t1_median"], 1),
                "stir_sd": _r(ref["stir_sd"], 1),
                "t1_sd": _r(ref["t1_sd"], 1),
            },
            "warnings": list(self.warnings),
        }


def _r(value: float, digits: int) -> float:
    return float(round(float(value), digits))


def robust_stats(values: npt.ArrayLike) -> tuple[float, float]:
    """Median and MAD-based SD (1.4826 x median absolute deviation) of ``values``."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        msg = "values must not be empty"
        raise ValueError(msg)
    med = float(np.median(v))
    return med, float(MAD_TO_SD * np.median(np.abs(v - med)))


# ---------------------------------------------------------------------------- per body data
@dataclass
class _Body:
    label: int
    level: str
    box: tuple[slice, slice, slice]  # padded crop in the full grid
    mask: npt.NDArray[np.bool_]
    depth_mm: npt.NDArray[np.float64]
    stir: npt.NDArray[np.float64]
    t1: npt.NDArray[np.float64]
    n_voxels: int
    touches_border: bool


def _edt(mask: npt.NDArray[np.bool_], spacing: tuple[float, float, float]) -> np.ndarray:
    """Distance (mm) from each True voxel to the nearest False voxel centre (outside = False)."""
    padded = np.pad(mask, 1, constant_values=False)
    dist = ndimage.distance_transform_edt(padded, sampling=spacing)
    return np.asarray(dist, dtype=np.float64)[1:-1, 1:-1, 1:-1]


def _ball(radius_mm: float, spacing: tuple[float, float, float]) -> npt.NDArray[np.bool_]:
    """Footprint of the voxel offsets within ``radius_mm`` of the centre (in mm, per axis)."""
    half = [int(np.floor(radius_mm / sp + 1e-9)) for sp in spacing]
    grids = np.meshgrid(
        *[np.arange(-h, h + 1) * sp for h, sp in zip(half, spacing, strict=True)], indexing="ij"
    )
    return np.asarray(sum(g**2 for g in grids) <= radius_mm**2 + 1e-9)


def _erode(
    mask: npt.NDArray[np.bool_], radius_mm: float, spacing: tuple[float, float, float]
) -> npt.NDArray[np.bool_]:
    """Voxels whose every neighbour within ``radius_mm`` is in ``mask`` (outside = False)."""
    return np.asarray(ndimage.binary_erosion(mask, structure=_ball(radius_mm, spacing)))


def _dilate(
    mask: npt.NDArray[np.bool_], radius_mm: float, spacing: tuple[float, float, float]
) -> npt.NDArray[np.bool_]:
    """Voxels within ``radius_mm`` of a voxel of ``mask``."""
    return np.asarray(ndimage.binary_dilation(mask, structure=_ball(radius_mm, spacing)))


def _prepare_bodies(
    stir: npt.NDArray[Any],
    t1: npt.NDArray[Any],
    labels: npt.NDArray[Any],
    spacing: tuple[float, float, float],
    level_names: Mapping[int, str],
) -> list[_Body]:
    bodies = []
    objects = ndimage.find_objects(labels)
    for index, obj in enumerate(objects):
        if obj is None:
            continue
        label = index + 1
        box = tuple(
            slice(max(s.start - p, 0), min(s.stop + p, n))
            for s, p, n in zip(obj, _PAD, labels.shape, strict=True)
        )
        mask = labels[box] == label
        touches = any(s.start == 0 or s.stop == n for s, n in zip(obj, labels.shape, strict=True))
        footprint = _median_footprint(spacing)
        stir_crop = _smoothed(np.asarray(stir[box], dtype=np.float64), footprint)
        t1_crop = _smoothed(np.asarray(t1[box], dtype=np.float64), footprint)
        bodies.append(
            _Body(
                label=label,
                level=level_names.get(label) or _level_name(label),
                box=(box[0], box[1], box[2]),
                mask=mask,
                depth_mm=np.where(mask, _edt(mask, spacing), 0.0),
                stir=stir_crop,
                t1=t1_crop,
                n_voxels=int(mask.sum()),
                touches_border=touches,
            )
        )
    return bodies


def _smoothed(crop: npt.NDArray[np.float64], footprint: np.ndarray) -> np.ndarray:
    """Median-filtered crop; NaN (no data, e.g. outside the other series' slab) propagates to
    every voxel whose footprint touches a missing voxel."""
    missing = ~np.isfinite(crop)
    if not missing.any():
        return np.asarray(ndimage.median_filter(crop, footprint=footprint, mode="nearest"))
    out = ndimage.median_filter(np.where(missing, 0.0, crop), footprint=footprint, mode="nearest")
    out[ndimage.binary_dilation(missing, structure=footprint)] = np.nan
    return np.asarray(out)


def _median_footprint(spacing: tuple[float, float, float]) -> npt.NDArray[np.bool_]:
    """`MEDIAN_FOOTPRINT` turned so that it does not cross the thickest (slice) axis."""
    sp = np.asarray(spacing)
    through = int(np.argmax(sp)) if sp.max() > 1.5 * sp.min() else 0
    return np.moveaxis(MEDIAN_FOOTPRINT, 0, through)


def _level_name(label: int) -> str:
    try:
        return level_from_label(label)
    except LevelError:
        return f"V{label}"


# ---------------------------------------------------------------------------- the rules
def _cement(
    body: _Body, ref: ReferenceStats, s: Settings, spacing: tuple[float, float, float]
) -> npt.NDArray[np.bool_]:
    frac = s["cement_fraction_of_reference"]
    stir_frac = max(frac, CEMENT_STIR_FRACTION_MIN)
    dark = body.mask & (body.stir < stir_frac * ref.stir_median) & (body.t1 < frac * ref.t1_median)
    # The cortex spans at least one pixel plus partial volume whatever the pixel size, so the
    # margin and the opening are at least one in-plane pixel.
    pixel_mm = sorted(spacing)[1]
    margin_mm = max(CEMENT_INTERIOR_MARGIN_MM, pixel_mm)
    radius_mm = max(CEMENT_OPENING_RADIUS_MM, pixel_mm)
    core = dark & (body.depth_mm > margin_mm)
    if not core.any():
        return np.zeros_like(dark)
    eroded = _erode(core, radius_mm, spacing)
    if not eroded.any():
        return np.zeros_like(dark)
    opened = core & _dilate(eroded, radius_mm, spacing)
    comp, n = ndimage.label(opened, structure=_CONN26)
    if n == 0:
        return np.zeros_like(dark)
    sizes_ml = np.bincount(comp.ravel())[1:] * _voxel_ml(spacing)
    keep = np.concatenate([[False], sizes_ml >= CEMENT_MIN_COMPONENT_ML])
    kept = keep[comp]
    if not kept.any():
        return kept
    # Hysteresis: take in the partial-volume edge of the cast, voxels more cement than marrow
    # (T1 below the midpoint between void and marrow, STIR not brighter than marrow), up to
    # CEMENT_GROW_VOXELS steps (26-connected, so across slices too).
    lenient = (
        body.mask
        & (body.stir < stir_frac * ref.stir_median)
        & (body.t1 < max(frac, CEMENT_PARTIAL_FRACTION) * ref.t1_median)
    )
    cement = dark & _dilate(kept, max(CEMENT_GROW_MM, margin_mm), spacing)
    for _ in range(CEMENT_GROW_VOXELS):
        cement |= lenient & ndimage.binary_dilation(cement, structure=_CONN26)
    return cement


def _voxel_ml(spacing: tuple[float, float, float]) -> float:
    return float(np.prod(spacing) / 1000.0)


def _edema_candidates(
    stir: npt.NDArray[np.float64],
    t1: npt.NDArray[np.float64],
    ref: ReferenceStats,
    s: Settings,
    rule: str | None = None,
) -> npt.NDArray[np.bool_]:
    k = s["edema_k_sd"]
    stir_bright = stir > ref.stir_median + k * ref.stir_sd
    t1_dark = t1 < ref.t1_median - k * ref.t1_sd
    rule = rule or s["edema_rule"]
    if rule == "stir_and_t1":
        return np.asarray(stir_bright & t1_dark)
    if rule == "stir_only":
        return np.asarray(stir_bright & ~(t1 > ref.t1_median + k * ref.t1_sd))
    return np.asarray(t1_dark & ~(stir < ref.stir_median - k * ref.stir_sd))


def _abnormal_marrow(
    stir: npt.NDArray[np.float64], t1: npt.NDArray[np.float64], ref: ReferenceStats, s: Settings
) -> npt.NDArray[np.bool_]:
    """Voxels that disqualify a body as reference marrow: edema by the configured rule, or
    STIR-bright without fat (edema whose T1 change is too weak for ``stir_and_t1``)."""
    stir_only = _edema_candidates(stir, t1, ref, s, rule="stir_only")
    return np.asarray(_edema_candidates(stir, t1, ref, s) | stir_only)


def _remove_small(mask: npt.NDArray[np.bool_], min_ml: float, voxel_ml: float) -> np.ndarray:
    if min_ml <= 0 or not mask.any():
        return mask
    comp, _ = ndimage.label(mask, structure=_CONN26)
    sizes_ml = np.bincount(comp.ravel()) * voxel_ml
    keep = sizes_ml >= min_ml
    keep[0] = False
    return np.asarray(keep[comp])


# ---------------------------------------------------------------------------- reference
def _reference(
    bodies: Sequence[_Body],
    grades: Mapping[int, int],
    s: Settings,
    spacing: tuple[float, float, float],
    reference_levels: Sequence[str] | None,
    warnings: list[str],
) -> ReferenceStats:
    erosion = s["reference_erosion_mm"]
    eroded = {
        b.label: (b.depth_mm > erosion) & np.isfinite(b.stir) & np.isfinite(b.t1) for b in bodies
    }
    by_level = {b.level: b for b in bodies}
    if reference_levels is not None:
        chosen = []
        for name in reference_levels:
            body = by_level.get(str(name))
            if body is None:
                body = _body_by_level_name(bodies, str(name))
            if body is None:
                msg = (
                    f"reference_levels names {name!r}, which is not in the label map; "
                    f"levels present: {[b.level for b in bodies]}"
                )
                raise ReferenceMarrowError(msg)
            if not eroded[body.label].any():
                msg = (
                    f"reference level {body.level} has no voxels deeper than "
                    f"reference_erosion_mm={erosion}; choose another level or a smaller "
                    "erosion"
                )
                raise ReferenceMarrowError(msg)
            if grades.get(body.label, 0) > 0:
                warnings.append(
                    f"Reference level {body.level} (named by the user) looks fractured "
                    f"(Genant grade {grades[body.label]})."
                )
            chosen.append(body)
        return _pooled(chosen, eroded)

    candidates = [
        b
        for b in bodies
        if grades.get(b.label, 0) == 0
        and b.label != morphometry.SACRUM_LABEL
        and eroded[b.label].any()
    ]
    if not candidates:
        msg = (
            "no vertebral body can serve as reference marrow (every body is fractured, is "
            f"the sacrum or is thinner than 2 x reference_erosion_mm={erosion}); name "
            "normal levels with reference_levels"
        )
        raise ReferenceMarrowError(msg)
    excluded: dict[str, str] = {}
    # One abnormal body in the pool inflates the SD so much that it no longer looks abnormal
    # against the pool it is part of; so each body is judged against the OTHER candidates,
    # the most abnormal one is dropped, and the test is repeated.
    while len(candidates) > 1:
        worst: tuple[float, _Body, str] | None = None
        for b in candidates:
            others = _pooled([c for c in candidates if c is not b], eroded)
            if _cement(b, others, s, spacing).any():
                score, why = 2.0, "cement"
            else:
                score = float(_abnormal_marrow(b.stir, b.t1, others, s)[eroded[b.label]].mean())
                why = "edema"
            if score >= REFERENCE_EDEMA_FRACTION and (worst is None or score > worst[0]):
                worst = (score, b, why)
        if worst is None:
            break
        excluded[worst[1].level] = worst[2]
        candidates = [c for c in candidates if c is not worst[1]]
    ref = _pooled(candidates, eroded)
    if len(candidates) == 1:
        (b,) = candidates
        if _cement(b, ref, s, spacing).any() or (
            _abnormal_marrow(b.stir, b.t1, ref, s)[eroded[b.label]].mean()
            >= REFERENCE_EDEMA_FRACTION
        ):
            excluded[b.level] = "cement or edema"
            msg = (
                "no vertebral body can serve as reference marrow: the normal-shaped bodies "
                f"hold cement or edema ({excluded}); name reference levels explicitly"
            )
            raise ReferenceMarrowError(msg)
    if len(candidates) < s["reference_min_bodies"]:
        why = ", ".join(f"{lvl}: {why}" for lvl, why in excluded.items())
        warnings.append(
            f"Only {len(candidates)} usable reference bod{'y' if len(candidates) == 1 else 'ies'}"
            f" ({', '.join(b.level for b in candidates)}); reference_min_bodies is "
            f"{s['reference_min_bodies']}"
            + (f"; excluded {why}" if why else "")
            + ". Name reference levels explicitly if these are not normal marrow."
        )
    return ref


def _body_by_level_name(bodies: Sequence[_Body], name: str) -> _Body | None:
    try:
        label = label_from_level(name)
    except LevelError:
        return None
    return next((b for b in bodies if b.label == label), None)


def _pooled(chosen: Sequence[_Body], eroded: Mapping[int, np.ndarray]) -> ReferenceStats:
    usable = {b.label: eroded[b.label] & np.isfinite(b.stir) & np.isfinite(b.t1) for b in chosen}
    stir_vals = np.concatenate([b.stir[usable[b.label]] for b in chosen])
    t1_vals = np.concatenate([b.t1[usable[b.label]] for b in chosen])
    if stir_vals.size == 0:
        msg = (
            f"reference levels {[b.level for b in chosen]} have no voxel with both STIR and "
            "T1 data; check that the two series cover the same vertebrae"
        )
        raise ReferenceMarrowError(msg)
    stir_med, stir_sd = robust_stats(stir_vals)
    t1_med, t1_sd = robust_stats(t1_vals)
    return ReferenceStats(
        levels=tuple(b.level for b in chosen),
        labels=tuple(b.label for b in chosen),
        stir_median=stir_med,
        t1_median=t1_med,
        stir_sd=stir_sd,
        t1_sd=t1_sd,
        n_voxels=int(stir_vals.size),
    )


# ---------------------------------------------------------------------------- entry point
def quantify_vertebrae(
    stir: Volume,
    t1: Volume,
    labels: Volume,
    settings: Mapping[str, Any] | None = None,
    *,
    reference_levels: Sequence[str] | None = None,
    level_names: Mapping[int, str] | None = None,
) -> Quantification:
    """Measure edema, cement, rim and deformity of every labelled vertebral body.

    Parameters
    ----------
    stir, t1 : Volume
        STIR and T1-weighted images on the grid of ``labels`` (resample first:
        ``t1.resample_to(stir, fill_value=np.nan)``: NaN marks voxels without data, which are
        never classified; a fill of 0 would look like cement).
    labels : Volume
        Integer label map of vertebral bodies (VerSe labels; 0 background).
    settings : mapping, optional
        A `Settings` or overrides for `resolve_settings`; registry defaults when omitted.
    reference_levels : sequence of str, optional
        Levels (e.g. ``["L3", "L4"]``) to use as reference marrow instead of the automatic
        choice.
    level_names : mapping label -> str, optional
        Level names for labels (e.g. ``{1: "V1"}``); VerSe names by default.

    Returns
    -------
    Quantification

    Raises
    ------
    ValueError
        When the three volumes do not share one grid or the label map is not integer.
    ReferenceMarrowError
        When no body can serve as reference marrow.
    """
    s = settings if isinstance(settings, Settings) else resolve_settings(settings)
    if s["edema_rule"] not in _EDEMA_RULES:  # pragma: no cover - the registry checks it
        msg = f"edema_rule must be one of {_EDEMA_RULES}, got {s['edema_rule']!r}"
        raise ValueError(msg)
    for name, vol in (("stir", stir), ("t1", t1)):
        if not vol.has_same_geometry(labels):
            msg = (
                f"{name} (shape {vol.shape}) is not on the grid of labels (shape "
                f"{labels.shape}); resample it first, e.g. {name}.resample_to(labels)"
            )
            raise ValueError(msg)
    lab = np.asarray(labels.array)
    if lab.dtype.kind not in "iu":
        msg = f"labels must hold integers, got dtype {lab.dtype}; pass a label map"
        raise ValueError(msg)
    if lab.dtype.kind == "i" and lab.min() < 0:
        msg = f"labels must be >= 0, found {int(lab.min())}"
        raise ValueError(msg)
    if lab.dtype.itemsize > 4 or lab.dtype == np.uint32:
        lab = lab.astype(np.int32)
    spacing = labels.spacing_mm
    voxel_ml = labels.voxel_volume_ml
    warnings: list[str] = []
    if labels.has_shear:
        warnings.append("The grid is sheared; distances are approximated per axis.")

    bodies = _prepare_bodies(stir.array, t1.array, lab, spacing, dict(level_names or {}))
    masks = {key: np.zeros(lab.shape, dtype=bool) for key in ("edema", "cement", "rim")}
    if not bodies:
        msg = "labels holds no vertebral body (all voxels are 0); segment the image first"
        raise ValueError(msg)
    for b in bodies:
        missing = b.mask & ~(np.isfinite(b.stir) & np.isfinite(b.t1))
        if missing.any():
            warnings.append(
                f"{b.level}: {100.0 * missing.sum() / b.n_voxels:.0f}% of the body has no STIR "
                "or no T1 data (outside a series' slab); those voxels count in the body volume "
                "but cannot be classified."
            )
        if b.touches_border:
            warnings.append(
                f"{b.level} touches the edge of the image; its measurements may be incomplete."
            )

    # Deformity first: fractured bodies are not reference marrow.
    heights = {
        b.label: morphometry.heights_from_mask(b.mask, _crop_affine(labels.affine, b.box))
        for b in bodies
    }
    si_order = _cranio_caudal_order(bodies, labels)
    deformities = morphometry.assess_deformities(heights, si_order, s)
    grades = {lab_: d.genant_grade for lab_, d in deformities.items()}

    ref = _reference(bodies, grades, s, spacing, reference_levels, warnings)

    k = s["edema_k_sd"]
    results = []
    for b in bodies:
        cement = _cement(b, ref, s, spacing)
        near_cement = _dilate(cement, s["rim_width_mm"], spacing) if cement.any() else cement
        rim = b.mask & ~cement & near_cement & (b.stir > ref.stir_median + k * ref.stir_sd)
        edema = (
            b.mask
            & (b.depth_mm > s["edema_surface_margin_mm"])
            & ~cement
            & ~rim
            & _edema_candidates(b.stir, b.t1, ref, s)
        )
        edema = _remove_small(edema, s["edema_min_cluster_ml"], voxel_ml)
        for key, m in (("edema", edema), ("cement", cement), ("rim", rim)):
            masks[key][b.box] |= m
        body_ml = b.n_voxels * voxel_ml
        cement_ml = int(cement.sum()) * voxel_ml
        edema_ml = int(edema.sum()) * voxel_ml
        denominator = body_ml - cement_ml
        bme = float(np.clip(100.0 * edema_ml / denominator, 0.0, 100.0)) if denominator > 0 else 0.0
        d = deformities[b.label]
        results.append(
            VertebraResult(
                level=b.level,
                label=b.label,
                body_volume_ml=body_ml,
                edema_volume_ml=edema_ml,
                cement_volume_ml=cement_ml,
                rim_volume_ml=int(rim.sum()) * voxel_ml,
                bme_percent=bme,
                bme_present=round(bme, 1) >= s["bme_present_threshold_percent"],
                heights_mm=d.heights.as_dict(),
                height_loss_percent=d.height_loss_percent,
                genant_grade=d.genant_grade,
                deformity=d.deformity,
            )
        )

    parameters = {name: _plain(s[name]) for name in SETTING_NAMES}
    parameters.update(method_constants())
    provenance = {
        "algorithm": ALGORITHM,
        "version": VERSION,
        "parameters": parameters,
        "input_series_uids": {
            "stir": stir.series_instance_uid,
            "t1": t1.series_instance_uid,
            "labels": labels.series_instance_uid,
        },
    }
    return Quantification(
        vertebrae=results,
        reference=ref.as_dict(),
        masks=masks,
        warnings=warnings,
        provenance=provenance,
    )


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _crop_affine(affine: npt.NDArray[np.float64], box: tuple[slice, ...]) -> np.ndarray:
    out = np.array(affine, dtype=np.float64)
    start = np.array([sl.start for sl in box], dtype=np.float64)
    out[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
    return out


def _cranio_caudal_order(bodies: Sequence[_Body], labels: Volume) -> list[int]:
    """Labels sorted from the most superior body centroid (LPS +z) downwards."""
    z = {}
    for b in bodies:
        centre = np.argwhere(b.mask).mean(axis=0) + [sl.start for sl in b.box]
        z[b.label] = float(labels.world_coordinates(centre)[2])
    return sorted(z, key=lambda lab_: -z[lab_])


def method_constants() -> dict[str, Any]:
    """Module constants of the edema method and of morphometry, for provenance."""
    return {
        "median_filter": "in-plane 5-pixel cross (slice, row, column)",
        "mad_to_sd": MAD_TO_SD,
        "cement_stir_fraction_min": CEMENT_STIR_FRACTION_MIN,
        "cement_interior_margin_mm": CEMENT_INTERIOR_MARGIN_MM,
        "cement_opening_radius_mm": CEMENT_OPENING_RADIUS_MM,
        "cement_min_component_ml": CEMENT_MIN_COMPONENT_ML,
        "cement_grow_mm": CEMENT_GROW_MM,
        "cement_partial_fraction": CEMENT_PARTIAL_FRACTION,
        "cement_grow_voxels": CEMENT_GROW_VOXELS,
        "reference_edema_fraction": REFERENCE_EDEMA_FRACTION,
        "connectivity": 26,
        **morphometry.method_constants(),
    }
