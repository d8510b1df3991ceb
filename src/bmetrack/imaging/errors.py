"""Exceptions raised by the imaging readers and the `Volume` class.

Every exception derives from `ImagingError` (and from `ValueError`, so callers that only
know about bad input can catch that).  DICOM series problems carry the offending file,
a short problem statement and a hint on how to fix it, so that a command-line front end
can print one useful line.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "DicomFileError",
    "DicomSeriesError",
    "DuplicatePositionError",
    "EmptySeriesError",
    "ImagingError",
    "InconsistentMatrixError",
    "MissingGeometryError",
    "MissingSliceError",
    "MixedOrientationError",
    "MultipleSeriesError",
    "NiftiError",
    "NonOriginalImageError",
    "NonUniformSpacingError",
    "UnreadableFileError",
    "UnsupportedTransferSyntaxError",
    "VolumeGeometryError",
    "WrongModalityError",
]


class ImagingError(ValueError):
    """Base class of every error raised by `bmetrack.imaging`."""


class VolumeGeometryError(ImagingError):
    """An array or affine cannot form a valid `Volume`."""


class NiftiError(ImagingError):
    """A NIfTI file cannot be read or written as a 3-D volume."""


class DicomSeriesError(ImagingError):
    """A DICOM series cannot be read as one consistent 3-D volume.

    Parameters
    ----------
    problem : str
        What is wrong, in one sentence.
    fix : str
        How the user can fix it.
    path : str or Path, optional
        The file (or folder) concerned.
    """

    def __init__(self, problem: str, *, fix: str, path: str | Path | None = None) -> None:
        self.problem = problem
        self.fix = fix
        self.path = None if path is None else Path(path)
        where = f"{self.path}: " if self.path is not None else ""
        super().__init__(f"{where}{problem}; fix: {fix}")


class DicomFileError(DicomSeriesError):
    """A problem tied to one file of the series (the file is named in ``path``)."""


class UnreadableFileError(DicomFileError):
    """The file is not DICOM, is truncated, or its pixel data cannot be read."""


class UnsupportedTransferSyntaxError(DicomFileError):
    """The pixel data is compressed with a transfer syntax no installed plugin decodes."""


class MissingGeometryError(DicomFileError):
    """ImagePositionPatient, ImageOrientationPatient, PixelSpacing or pixel data is absent."""


class NonOriginalImageError(DicomFileError):
    """A localizer, derived or secondary image inside an acquired series."""


class WrongModalityError(DicomFileError):
    """The file is not an MR image."""


class InconsistentMatrixError(DicomFileError):
    """Rows/Columns differ from the rest of the series."""


class MixedOrientationError(DicomFileError):
    """ImageOrientationPatient differs from the rest of the series."""


class DuplicatePositionError(DicomFileError):
    """Two different images sit at the same slice position."""


class MissingSliceError(DicomSeriesError):
    """A gap between slice positions larger than 1.5 times the median spacing."""


class NonUniformSpacingError(DicomSeriesError):
    """Slice positions are not equally spaced along one line."""


class EmptySeriesError(DicomSeriesError):
    """No usable image is left in the series."""


class MultipleSeriesError(DicomSeriesError):
    """The input holds more than one SeriesInstanceUID."""
