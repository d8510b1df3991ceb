"""`Volume`: a 3-D image array with its voxel-to-world affine in DICOM LPS coordinates."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from bmetrack.imaging.errors import VolumeGeometryError

__all__ = ["AXIS_NAMES", "LPS_TO_RAS", "Volume"]

#: Names of the three array axes, in order.
AXIS_NAMES: tuple[str, str, str] = ("slice", "row", "column")

#: Flips x and y: maps LPS world coordinates to RAS and back (the matrix is its own inverse).
LPS_TO_RAS: npt.NDArray[np.float64] = np.diag([-1.0, -1.0, 1.0, 1.0])
LPS_TO_RAS.setflags(write=False)

# Letters for the positive and negative direction of each LPS world axis.
_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("S", "I"))
# Smallest singular value (mm per voxel step) of an acceptable affine.
_MIN_STEP_MM = 1e-6
# Index coordinates closer than this to an integer are snapped to it before resampling, so
# resampling onto the same grid is exact despite round-off in the affine products.
_SNAP_TOL = 1e-6
_SPLINE_MODE = "mirror"


class Volume:
    """A 3-D image and the affine that places it in patient (LPS) space.

    Conventions
    -----------
    - Array axes are named ``(slice, row, column)``: ``array[k, i, j]`` is column ``j`` of row
      ``i`` of slice ``k``.  For a DICOM series, rows and columns are those of each image and
      slices are sorted along the slice normal.
    - ``affine`` is a 4x4 matrix mapping voxel indices ``(k, i, j, 1)`` to world coordinates
      ``(x, y, z, 1)`` in millimetres in the DICOM patient coordinate system **LPS**: +x points
      to the patient's Left, +y to Posterior, +z to Superior.  Index ``(0, 0, 0)`` is the
      *centre* of the first voxel, so ``affine[:3, 3]`` is the ImagePositionPatient of the
      first slice.
    - Conversions to nibabel/NIfTI RAS coordinates (+x Right, +y Anterior, +z Superior)
      happen only in `to_ras_affine` and `from_ras_affine`, which flip x and y.
    - The affine may be any non-singular matrix: flipped axes and shear (non-orthogonal
      axes) are represented exactly.  `has_shear` tells whether axes are non-orthogonal;
      measurements that assume orthogonal axes should check it.

    Parameters
    ----------
    array : array_like
        3-D numeric (bool, integer or float) array.  Not copied.
    affine : array_like
        4x4 voxel-index-to-LPS matrix; finite, non-singular, last row ``0 0 0 1``.  Copied and
        made read-only.
    series_instance_uid : str, optional
        DICOM SeriesInstanceUID of the source series, when known.
    modality : str, optional
        DICOM Modality (``"MR"``), when known.
    metadata : mapping, optional
        Free-form metadata (sequence parameters, source files...).  Copied (shallow).
    warnings : list of str, optional
        Problems found while building the volume (e.g. by a lenient reader).  Copied.

    Raises
    ------
    VolumeGeometryError
        If the array is not 3-D and numeric, or the affine is not a valid 4x4 affine.
    """

    def __init__(
        self,
        array: npt.ArrayLike,
        affine: npt.ArrayLike,
        *,
        series_instance_uid: str | None = None,
        modality: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        warnings: list[str] | None = None,
    ) -> None:
        arr = np.asarray(array)
        if arr.ndim != 3:
            msg = (
                f"array must be 3-D with axes (slice, row, column), got shape {arr.shape}; "
                "add or remove axes before building a Volume"
            )
            raise VolumeGeometryError(msg)
        if 0 in arr.shape:
            msg = f"array must not be empty, got shape {arr.shape}"
            raise VolumeGeometryError(msg)
        if arr.dtype.kind not in "biuf":
            msg = f"array must be bool, integer or float, got dtype {arr.dtype}"
            raise VolumeGeometryError(msg)
        self._array = arr
        self._affine = _validated_affine(affine)
        self.series_instance_uid = series_instance_uid
        self.modality = modality
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.warnings: list[str] = list(warnings or [])

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_geometry(
        cls,
        array: npt.ArrayLike,
        *,
        spacing_mm: tuple[float, float, float] | npt.ArrayLike,
        origin_lps: npt.ArrayLike = (0.0, 0.0, 0.0),
        direction: npt.ArrayLike | None = None,
        **kwargs: Any,
    ) -> Volume:
        """Build a volume from spacing, origin and direction instead of an affine.

        Parameters
        ----------
        array : array_like
            3-D array, axes (slice, row, column).
        spacing_mm : sequence of 3 floats
            Step in mm along the slice, row and column axes.
        origin_lps : sequence of 3 floats
            LPS position (mm) of the centre of voxel (0, 0, 0).
        direction : array_like, optional
            3x3 matrix whose columns are the LPS unit vectors of the slice, row and column
            axes; identity when omitted.
        **kwargs
            Passed to `Volume` (``series_instance_uid``, ``modality``, ``metadata``...).
        """
        spacing = np.asarray(spacing_mm, dtype=np.float64).reshape(-1)
        if spacing.shape != (3,) or not np.all(spacing > 0):
            msg = f"spacing_mm must be 3 positive numbers, got {spacing_mm!r}"
            raise VolumeGeometryError(msg)
        dirs = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
        if dirs.shape != (3, 3):
            msg = f"direction must be a 3x3 matrix, got shape {dirs.shape}"
            raise VolumeGeometryError(msg)
        norms = np.linalg.norm(dirs, axis=0)
        if not np.all(norms > 0):
            msg = f"direction columns must be non-zero vectors, got {dirs.tolist()}"
            raise VolumeGeometryError(msg)
        affine = np.eye(4)
        affine[:3, :3] = dirs / norms * spacing
        affine[:3, 3] = np.asarray(origin_lps, dtype=np.float64).reshape(3)
        return cls(array, affine, **kwargs)

    @classmethod
    def from_ras_affine(
        cls, array: npt.ArrayLike, ras_affine: npt.ArrayLike, **kwargs: Any
    ) -> Volume:
        """Build a volume from an affine that maps voxel indices to RAS (nibabel) mm.

        This and `to_ras_affine` are the only places where RAS and LPS meet.

        Parameters
        ----------
        array : array_like
            3-D array, axes (slice, row, column) as the affine's columns.
        ras_affine : array_like
            4x4 voxel-to-RAS affine.
        **kwargs
            Passed to `Volume`.
        """
        ras = _validated_affine(ras_affine)
        return cls(array, LPS_TO_RAS @ ras, **kwargs)

    # ------------------------------------------------------------------ properties
    @property
    def array(self) -> np.ndarray:
        """The voxel values, axes (slice, row, column)."""
        return self._array

    @property
    def affine(self) -> npt.NDArray[np.float64]:
        """Read-only 4x4 voxel-index-to-LPS (mm) affine."""
        return self._affine

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape (n_slices, n_rows, n_columns)."""
        s = self._array.shape
        return (int(s[0]), int(s[1]), int(s[2]))

    @property
    def dtype(self) -> np.dtype[Any]:
        """Array data type."""
        return self._array.dtype

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Distance in mm between neighbouring voxel centres along (slice, row, column)."""
        n = np.linalg.norm(self._affine[:3, :3], axis=0)
        return (float(n[0]), float(n[1]), float(n[2]))

    @property
    def origin_lps(self) -> npt.NDArray[np.float64]:
        """LPS position (mm) of the centre of voxel (0, 0, 0), shape (3,)."""
        return self._affine[:3, 3].copy()

    @property
    def direction(self) -> npt.NDArray[np.float64]:
        """3x3 matrix whose columns are the LPS unit vectors of the slice, row, column axes."""
        lin = self._affine[:3, :3]
        return lin / np.linalg.norm(lin, axis=0)

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in ml (= cm^3), valid for sheared grids too."""
        return float(abs(np.linalg.det(self._affine[:3, :3])) / 1000.0)

    @property
    def has_shear(self) -> bool:
        """True when the voxel axes are not mutually orthogonal (|cos angle| > 1e-4)."""
        d = self.direction
        gram = d.T @ d
        return bool(np.max(np.abs(gram - np.diag(np.diag(gram)))) > 1e-4)

    @property
    def orientation(self) -> str:
        """Three LPS letters: the world direction each axis (slice, row, column) points to.

        Each axis gets the letter of the world axis its direction is closest to (``L``/``R``,
        ``P``/``A``, ``S``/``I``), assigned greedily so that the three letters name three
        different world axes (as nibabel's ``aff2axcodes``, but in LPS).  A typical sagittal
        DICOM series read by `bmetrack.imaging.dicom.read_series` is ``"RIP"``: slices go
        toward the patient's right, rows go down, columns go back.
        """
        dirs = self.direction
        weight = np.abs(dirs)
        letters = [""] * 3
        free_world, free_axes = [0, 1, 2], [0, 1, 2]
        for _ in range(3):
            sub = weight[np.ix_(free_world, free_axes)]
            w, a = np.unravel_index(int(np.argmax(sub)), sub.shape)
            world, axis = free_world[w], free_axes[a]
            positive = dirs[world, axis] >= 0
            letters[axis] = _AXIS_LETTERS[world][0 if positive else 1]
            free_world.remove(world)
            free_axes.remove(axis)
        return "".join(letters)

    # ------------------------------------------------------------------ coordinates
    def world_coordinates(self, indices: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """LPS coordinates (mm) of voxel indices.

        Parameters
        ----------
        indices : array_like, shape (..., 3)
            (slice, row, column) indices; fractional values allowed (0.5 is a voxel face).

        Returns
        -------
        ndarray, shape (..., 3)
            LPS coordinates in mm.
        """
        idx = _as_points(indices, "indices")
        return idx @ self._affine[:3, :3].T + self._affine[:3, 3]

    def index_of(self, world: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Continuous (slice, row, column) indices of LPS points (mm); round them yourself.

        Parameters
        ----------
        world : array_like, shape (..., 3)
            LPS coordinates in mm.

        Returns
        -------
        ndarray, shape (..., 3)
            Fractional voxel indices (may lie outside the array).
        """
        pts = _as_points(world, "world")
        inv = np.linalg.inv(self._affine)
        return pts @ inv[:3, :3].T + inv[:3, 3]

    def to_ras_affine(self) -> npt.NDArray[np.float64]:
        """The voxel-to-RAS affine (as nibabel expects): x and y of the LPS affine negated."""
        return LPS_TO_RAS @ self._affine

    def has_same_geometry(self, other: Volume, *, atol_mm: float = 1e-3) -> bool:
        """True when ``other`` has the same shape and an affine equal within ``atol_mm``."""
        return self.shape == other.shape and bool(
            np.allclose(self._affine, other.affine, rtol=0.0, atol=atol_mm)
        )

    # ------------------------------------------------------------------ derived volumes
    def with_array(self, new_array: npt.ArrayLike) -> Volume:
        """A volume with the same geometry and metadata holding ``new_array``.

        Parameters
        ----------
        new_array : array_like
            Array of exactly ``self.shape`` (e.g. a label map or a filtered image).
        """
        arr = np.asarray(new_array)
        if arr.shape != self.shape:
            msg = (
                f"new_array must have the volume's shape {self.shape}, got {arr.shape}; "
                "use resample_to() to move data between grids"
            )
            raise VolumeGeometryError(msg)
        return Volume(
            arr,
            self._affine,
            series_instance_uid=self.series_instance_uid,
            modality=self.modality,
            metadata=self.metadata,
            warnings=self.warnings,
        )

    def resample_to(self, reference: Volume, order: int = 1, fill_value: float = 0.0) -> Volume:
        """Sample this volume on the grid of ``reference`` (world coordinates preserved).

        Uses ``scipy.ndimage.map_coordinates`` with the exact affine composition
        ``inv(self.affine) @ reference.affine``, so flipped, rotated and sheared grids are all
        handled (SimpleITK would need orthonormal directions).

        Parameters
        ----------
        reference : Volume
            Defines the output grid (shape and affine).
        order : int, default 1
            Spline order: 0 nearest neighbour (use for label maps; keeps the dtype),
            1 trilinear, 3 cubic.  Orders >= 1 return floats.
        fill_value : float, default 0.0
            Value of output voxels whose centre lies outside this volume's voxels (beyond
            half a voxel from the outermost voxel centres).

        Returns
        -------
        Volume
            Array of ``reference.shape`` on ``reference.affine``, with this volume's metadata.
        """
        if not isinstance(reference, Volume):
            msg = f"reference must be a Volume, got {type(reference).__name__}"
            raise TypeError(msg)
        if isinstance(order, bool) or order not in range(6):
            msg = f"order must be an integer 0..5 (0 for label maps), got {order!r}"
            raise ValueError(msg)
        src = self._array
        if order == 0:
            out_dtype = src.dtype
            fill = np.asarray(fill_value).astype(out_dtype)
            if fill != fill_value:
                msg = f"fill_value {fill_value!r} cannot be stored in dtype {out_dtype}"
                raise ValueError(msg)
            data = src
        else:
            out_dtype = np.result_type(src.dtype, np.float32)
            data = src.astype(np.float64, copy=False)
            if order > 1:  # prefilter once, not once per chunk
                data = ndimage.spline_filter(data, order=order, mode=_SPLINE_MODE)
        # Splines use "mirror", the boundary scipy's spline_filter handles without padding,
        # so prefiltering here and evaluating with prefilter=False is exact.
        mode = "nearest" if order <= 1 else _SPLINE_MODE
        mapping = np.linalg.inv(self._affine) @ reference.affine
        out = np.empty(reference.shape, dtype=out_dtype)
        n_s, n_r, n_c = reference.shape
        rows, cols = np.meshgrid(np.arange(n_r), np.arange(n_c), indexing="ij")
        plane = np.stack([np.zeros(rows.size), rows.ravel(), cols.ravel()], axis=1)
        upper = np.array(src.shape, dtype=np.float64) - 0.5
        for k in range(n_s):  # one output slice at a time bounds memory
            plane[:, 0] = k
            coords = plane @ mapping[:3, :3].T + mapping[:3, 3]
            snapped = np.round(coords)
            near = np.abs(coords - snapped) < _SNAP_TOL
            coords[near] = snapped[near]
            inside = np.all((coords >= -0.5 - _SNAP_TOL) & (coords <= upper + _SNAP_TOL), axis=1)
            values = ndimage.map_coordinates(
                data, coords.T, order=order, mode=mode, prefilter=False
            )
            values = np.where(inside, values, fill_value)
            out[k] = values.reshape(n_r, n_c).astype(out_dtype, copy=False)
        return Volume(
            out,
            reference.affine,
            series_instance_uid=self.series_instance_uid,
            modality=self.modality,
            metadata=self.metadata,
            warnings=self.warnings,
        )

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.4g}" for s in self.spacing_mm)
        return (
            f"Volume(shape={self.shape}, spacing_mm=({sp}), orientation={self.orientation!r}, "
            f"dtype={self.dtype}, modality={self.modality!r}, "
            f"series_instance_uid={self.series_instance_uid!r})"
        )


def _validated_affine(affine: npt.ArrayLike) -> npt.NDArray[np.float64]:
    try:
        aff = np.array(affine, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        msg = f"affine must be a 4x4 numeric matrix, got {affine!r}"
        raise VolumeGeometryError(msg) from exc
    if aff.shape != (4, 4):
        msg = f"affine must be 4x4, got shape {aff.shape}"
        raise VolumeGeometryError(msg)
    if not np.all(np.isfinite(aff)):
        msg = f"affine must be finite, got {aff.tolist()}"
        raise VolumeGeometryError(msg)
    if not np.allclose(aff[3], [0.0, 0.0, 0.0, 1.0], rtol=0.0, atol=1e-9):
        msg = f"affine's last row must be 0 0 0 1, got {aff[3].tolist()}"
        raise VolumeGeometryError(msg)
    aff[3] = [0.0, 0.0, 0.0, 1.0]
    sv = np.linalg.svd(aff[:3, :3], compute_uv=False)
    if sv[-1] < _MIN_STEP_MM or sv[0] / sv[-1] > 1e8:
        msg = (
            f"affine is singular (singular values {sv.tolist()}): every voxel axis needs a "
            "non-zero, independent step; check spacing and direction cosines"
        )
        raise VolumeGeometryError(msg)
    aff.setflags(write=False)
    return aff


def _as_points(points: npt.ArrayLike, name: str) -> npt.NDArray[np.float64]:
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim == 0 or pts.shape[-1] != 3:
        msg = f"{name} must have shape (..., 3), got shape {pts.shape}"
        raise ValueError(msg)
    return pts
