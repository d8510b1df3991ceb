"""Read and write NIfTI files as `Volume` objects (nibabel; RAS <-> LPS via `Volume`).

Axis convention: a NIfTI array is indexed ``(i, j, k)``; tools such as dcm2niix store the
image columns along ``i``, the rows along ``j`` and the slices along ``k``.  bmetrack volumes
are indexed ``(slice, row, column)``, so reading transposes the array to ``(k, j, i)`` and
permutes the affine columns to match, and writing does the reverse.  World coordinates are
unchanged by this, and a DICOM series and its dcm2niix conversion give volumes with the same
axis order.  The NIfTI RAS affine is converted to LPS only through `Volume.from_ras_affine`
and `Volume.to_ras_affine`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import numpy.typing as npt

from bmetrack.imaging.errors import NiftiError
from bmetrack.imaging.volume import Volume

__all__ = ["read_nifti", "write_nifti"]

logger = logging.getLogger(__name__)

# NIfTI (i, j, k) <-> Volume (slice, row, column) = (k, j, i); the permutation is its own
# inverse.  The 4th entry keeps the translation column in place.
_AXES = (2, 1, 0)
_AFFINE_COLUMNS = [2, 1, 0, 3]
_SUFFIXES = (".nii", ".nii.gz")
# sform and qform equal within this (mm per voxel / mm) are the same geometry.
_FORM_TOL = 1e-3
_SHEAR_WARNING = (
    "the affine has shear (non-orthogonal voxel axes); it is kept exactly, but "
    "bmetrack's measurements (heights, erosion by mm) assume orthogonal axes: resample "
    "onto an orthogonal grid first"
)


def _check_suffix(path: Path, name: str) -> None:
    if not path.name.lower().endswith(_SUFFIXES):
        msg = f"{name} must end with .nii or .nii.gz, got {str(path)!r}"
        raise NiftiError(msg)


def read_nifti(path: str | Path) -> Volume:
    """Read a 3-D NIfTI-1/2 file into a `Volume` (LPS, axes slice/row/column).

    The affine is the sform when its code is non-zero (it can hold shear), else the qform
    when its code is non-zero, else nibabel's pixdim-only fallback with a warning.  Scaling
    (``scl_slope``/``scl_inter``) is applied.  Trailing singleton dimensions (``x, y, z, 1``)
    are dropped.  Warnings (no coded affine, sform and qform disagree, shear) go to
    ``Volume.warnings``; ``metadata["affine_source"]`` says which affine was used.

    Parameters
    ----------
    path : str or Path
        ``.nii`` or ``.nii.gz`` file.

    Returns
    -------
    Volume

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    NiftiError
        If the file is not NIfTI, not 3-D (e.g. 4-D with several volumes) or not numeric.
    """
    file = Path(path)
    if not file.is_file():
        msg = f"NIfTI file {str(file)!r} does not exist"
        raise FileNotFoundError(msg)
    try:
        img = nib.load(file)
    except Exception as exc:
        msg = f"cannot read {str(file)!r} as NIfTI: {exc}"
        raise NiftiError(msg) from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        msg = f"{str(file)!r} is a {type(img).__name__}, not a NIfTI image; convert it to .nii.gz"
        raise NiftiError(msg)
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        msg = (
            f"{str(file)!r} has shape {tuple(img.shape)}; bmetrack needs one 3-D volume. "
            "Extract one volume first (e.g. nibabel img.slicer[..., 0] or fslroi)"
            if len(shape) > 3
            else f"{str(file)!r} has shape {tuple(img.shape)}; bmetrack needs a 3-D volume"
        )
        raise NiftiError(msg)

    header = img.header
    warnings: list[str] = []
    sform, s_code = header.get_sform(coded=True)
    qform, q_code = header.get_qform(coded=True)
    ras: npt.NDArray[np.float64]
    if sform is not None and int(s_code) > 0:
        ras, source = np.asarray(sform, dtype=np.float64), "sform"
        if (
            qform is not None
            and int(q_code) > 0
            and not np.allclose(sform, qform, rtol=0.0, atol=_FORM_TOL)
        ):
            warnings.append("sform and qform differ; the sform is used (nibabel's convention)")
    elif qform is not None and int(q_code) > 0:
        ras, source = np.asarray(qform, dtype=np.float64), "qform"
    else:
        ras, source = np.asarray(header.get_base_affine(), dtype=np.float64), "pixdim"
        warnings.append(
            "neither sform nor qform is set: orientation unknown, the affine uses only the "
            "voxel sizes (pixdim)"
        )

    data = np.asanyarray(img.dataobj)
    if data.dtype.kind not in "biuf":
        msg = f"{str(file)!r} holds {data.dtype} data; bmetrack needs a numeric scalar image"
        raise NiftiError(msg)
    array = np.ascontiguousarray(np.reshape(data, shape).transpose(_AXES))
    volume = Volume.from_ras_affine(
        array,
        ras[:, _AFFINE_COLUMNS],
        metadata={"source_path": str(file), "affine_source": source},
        warnings=warnings,
    )
    if volume.has_shear:
        volume.warnings.append(_SHEAR_WARNING)
    for text in volume.warnings:
        logger.warning("%s: %s", file, text)
    return volume


def write_nifti(volume: Volume, path: str | Path) -> Path:
    """Write a `Volume` as NIfTI-1 (RAS affine in sform and, without shear, qform).

    Both forms get code 1 (scanner); a sheared affine goes only into the sform (the qform
    cannot hold shear; its code is set to 0).  Boolean arrays are stored as uint8 and 64-bit
    integers as int32 when their values fit.  Metadata other than geometry is not stored.

    Parameters
    ----------
    volume : Volume
        The volume to write.
    path : str or Path
        Output file ending in ``.nii`` or ``.nii.gz``; parent folders are created.

    Returns
    -------
    Path
        The written file.
    """
    if not isinstance(volume, Volume):
        msg = f"volume must be a Volume, got {type(volume).__name__}"
        raise TypeError(msg)
    file = Path(path)
    _check_suffix(file, "path")
    data = volume.array.transpose(_AXES)
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    elif data.dtype == np.float16:
        data = data.astype(np.float32)
    elif data.dtype.kind in "iu" and data.dtype.itemsize == 8:
        info = np.iinfo(np.int32)
        if data.size == 0 or (data.min() >= info.min and data.max() <= info.max):
            data = data.astype(np.int32)
    ras = volume.to_ras_affine()[:, _AFFINE_COLUMNS]
    img = nib.Nifti1Image(np.asarray(data), ras)
    img.set_sform(ras, code=1)
    if volume.has_shear:
        img.set_qform(None, code=0)
    else:
        img.set_qform(ras, code=1)
    img.header.set_xyzt_units(xyz="mm")
    file.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, file)
    return file
