"""External vertebral label maps as a replacement for the built-in segmenter (METHOD.md 2).

Accepted: any NIfTI whose vertebral bodies carry VerSe / SPINEPS integers
(C1..C7 = 1..7, T1..T12 = 8..19, L1..L5 = 20..24, L6 = 25, S1 = 26; T13 = 28 is
refused). SPINEPS ``seg-vert`` maps also hold intervertebral discs (100 + label)
and endplates (200 + label): values of 100 and above are dropped. A SPINEPS
``seg-vert`` label covers the whole vertebra; give its ``seg-spine``
subregion map too, and only the vertebral body (corpus, subregions 49-50) is
kept, as METHOD.md 3-4 measure bodies only.
"""

from __future__ import annotations

import numpy as np

from bmetrack.anatomy import LEVEL_LABELS, level_from_label
from bmetrack.imaging.errors import ImagingError
from bmetrack.imaging.segment import Segmentation
from bmetrack.imaging.volume import Volume

__all__ = [
    "EDGE_MARGIN_MM",
    "EXTERNAL_METHOD",
    "SPINEPS_CORPUS_SUBREGIONS",
    "external_segmentation",
]

EXTERNAL_METHOD = "external label map"
#: SPINEPS seg-spine subregions of the vertebral body: corpus border and corpus.
SPINEPS_CORPUS_SUBREGIONS = (49, 50)
_FIRST_NON_VERTEBRA = 100
#: Bodies reaching this close to the in-plane edge of the image are left out as partial.
EDGE_MARGIN_MM = 3.0
_MIN_BODY_ML = 1.0


def external_segmentation(
    label_map: Volume,
    reference: Volume,
    *,
    subregions: Volume | None = None,
    source: str = "",
) -> Segmentation:
    """Bring an external label map onto ``reference``'s grid as a `Segmentation`.

    Parameters
    ----------
    label_map : Volume
        Integer label map in the VerSe convention, on any grid (resampled by geometry,
        nearest neighbour).
    reference : Volume
        The grid to measure on (the STIR series).
    subregions : Volume, optional
        SPINEPS ``seg-spine`` map; when given, only its corpus subregions are kept.
    source : str
        Where the map came from (recorded in ``parameters``).

    Raises
    ------
    ImagingError
        When the map is not integer, holds labels that are not vertebrae, or covers no
        vertebral body on the reference grid.
    """
    values = np.asarray(label_map.array)
    if values.dtype.kind == "f" and not (
        np.all(np.isfinite(values)) and np.array_equal(values, np.round(values))
    ):
        msg = (
            f"The label map {source} holds non-integer values; give an integer label map "
            "(VerSe convention: L1 = 20, S1 = 26)."
        )
        raise ImagingError(msg)
    labels = label_map.with_array(values.astype(np.int16))
    if not labels.has_same_geometry(reference):
        labels = labels.resample_to(reference, order=0, fill_value=0)
    array = np.asarray(labels.array, dtype=np.int16).copy()
    array[array >= _FIRST_NON_VERTEBRA] = 0
    if subregions is not None:
        parts = subregions.with_array(np.asarray(subregions.array).astype(np.int16))
        if not parts.has_same_geometry(reference):
            parts = parts.resample_to(reference, order=0, fill_value=0)
        array[~np.isin(np.asarray(parts.array), SPINEPS_CORPUS_SUBREGIONS)] = 0
    known = set(LEVEL_LABELS.values())
    found = [int(v) for v in np.unique(array) if v != 0]
    unknown = [v for v in found if v not in known]
    if unknown:
        msg = (
            f"The label map {source} holds labels {unknown} that are not vertebrae of the "
            "VerSe convention (C1..C7 = 1..7, T1..T12 = 8..19, L1..L6 = 20..25, S1 = 26); "
            "convert it (e.g. TotalSegmentator names to VerSe integers) first."
        )
        raise ImagingError(msg)
    voxel_ml = reference.voxel_volume_ml
    counts = {v: int(np.count_nonzero(array == v)) for v in found}
    # Bodies cut by the in-plane field of view cannot be measured (CLI-CONTRACT.md); within
    # EDGE_MARGIN_MM of the edge a body is likely cut obliquely or hit by edge artefacts.
    edge = np.zeros(array.shape, dtype=bool)
    for axis in (1, 2):
        margin = max(1, int(np.ceil(EDGE_MARGIN_MM / reference.spacing_mm[axis])))
        index = [slice(None)] * 3
        index[axis] = np.r_[0:margin, array.shape[axis] - margin : array.shape[axis]]
        edge[tuple(index)] = True
    cut = {int(v) for v in np.unique(array[edge]) if v != 0}
    warnings = []
    kept = []
    partial = []
    for value in found:
        if value in cut:
            array[array == value] = 0
            partial.append(level_from_label(value))
        elif counts[value] * voxel_ml < _MIN_BODY_ML:
            array[array == value] = 0
            warnings.append(
                f"{level_from_label(value)} covers {counts[value] * voxel_ml:.2f} ml of the "
                "measured field of view; left out."
            )
        else:
            kept.append(value)
    if not kept:
        msg = (
            f"The label map {source} covers no vertebral body inside the STIR field of view; "
            "check that it belongs to this study."
        )
        raise ImagingError(msg)
    # Bottom-up, as the built-in segmenter reports levels.
    levels = [level_from_label(value) for value in sorted(kept, reverse=True)]
    return Segmentation(
        labels=reference.with_array(array),
        levels=levels,
        partial=partial,
        warnings=warnings,
        method_version=EXTERNAL_METHOD,
        parameters={"source": source, "spineps_subregions": subregions is not None},
    )
