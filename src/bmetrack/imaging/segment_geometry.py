"""Orientation helpers of the vertebral body segmenter.

The segmenter works on a *canonical* array: axis 0 runs left-right (either sign), axis 1 runs
superior -> inferior and axis 2 anterior -> posterior, whatever the order and signs of the input
axes.  Directions come from the affine only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from bmetrack.imaging.errors import ImagingError
from bmetrack.imaging.volume import Volume

__all__ = ["Canonical", "SegmentationError", "canonicalise", "uncanonicalise"]

# An axis counts as left-right when its direction is within ~45 degrees of LPS x.
_MIN_LR_COSINE = 0.7
# A series is not sagittal when its LR axis is this much finer than the coarsest other axis.
_SAGITTAL_SPACING_RATIO = 0.7


class SegmentationError(ImagingError):
    """The image cannot be segmented (not sagittal, no spine found, too small...)."""


@dataclass(frozen=True)
class Canonical:
    """How the input array maps to the canonical (LR, S->I, A->P) array.

    Attributes
    ----------
    perm : tuple of int
        Input axes taken, in order, as canonical axes 0, 1, 2.
    flips : tuple of bool
        Whether each canonical axis is reversed after the transpose.
    spacing_mm : tuple of float
        Voxel step (mm) along the canonical axes (LR, SI, AP).
    """

    perm: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    spacing_mm: tuple[float, float, float]


def canonicalise(volume: Volume) -> tuple[npt.NDArray[np.float32], Canonical]:
    """Float32 view of ``volume`` in canonical axis order, and the mapping back.

    Raises
    ------
    SegmentationError
        When no axis runs left-right (the series is not sagittal), or the left-right axis is
        much finer than the in-plane axes (an axial or coronal stack).
    """
    dirs = volume.direction
    weight = np.abs(dirs)  # rows: world x, y, z; columns: array axes
    free_world, free_axes = [0, 1, 2], [0, 1, 2]
    axis_of_world = [0, 0, 0]
    for _ in range(3):
        sub = weight[np.ix_(free_world, free_axes)]
        w, a = np.unravel_index(int(np.argmax(sub)), sub.shape)
        axis_of_world[free_world[w]] = free_axes[a]
        free_world.remove(free_world[w])
        free_axes.remove(free_axes[a])
    lr, ap, si = axis_of_world
    spacing = volume.spacing_mm
    if weight[0, lr] < _MIN_LR_COSINE:
        msg = (
            f"image is not sagittal: no axis runs left-right (orientation "
            f"{volume.orientation!r}); give a sagittal series"
        )
        raise SegmentationError(msg)
    if spacing[lr] < _SAGITTAL_SPACING_RATIO * max(spacing[ap], spacing[si]):
        msg = (
            f"image is not sagittal: its left-right step {spacing[lr]:.2f} mm is finer than the "
            f"in-plane steps ({spacing[si]:.2f}, {spacing[ap]:.2f} mm), as in an axial or coronal "
            "stack; give a sagittal series"
        )
        raise SegmentationError(msg)
    perm = (lr, si, ap)
    flips = (False, bool(dirs[2, si] > 0), bool(dirs[1, ap] < 0))
    arr = np.transpose(np.asarray(volume.array), perm)
    for axis, flip in enumerate(flips):
        if flip:
            arr = np.flip(arr, axis=axis)
    out = np.ascontiguousarray(arr, dtype=np.float32)
    return out, Canonical(perm, flips, (spacing[lr], spacing[si], spacing[ap]))


def uncanonicalise(array: npt.NDArray[np.generic], canon: Canonical) -> npt.NDArray[np.generic]:
    """Inverse of `canonicalise`: the canonical ``array`` back in the input axis layout."""
    arr = array
    for axis, flip in enumerate(canon.flips):
        if flip:
            arr = np.flip(arr, axis=axis)
    return np.ascontiguousarray(np.transpose(arr, np.argsort(canon.perm)))
