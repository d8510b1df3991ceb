"""Read MR series from DICOM files, list the series of a folder, classify sequences.

Geometry follows DICOM PS3.3 C.7.6.2: ImageOrientationPatient (IOP) holds the LPS direction
cosines of an image row (the direction in which the column index grows) and of a column (the
direction in which the row index grows); ImagePositionPatient (IPP) is the LPS centre of the
first transmitted pixel; PixelSpacing is (spacing between rows, spacing between columns).
Slices are ordered by IPP projected on the slice normal ``row x column``, never by file name
or InstanceNumber, and the slice step is taken from those positions, never from
SliceThickness.

Strict and lenient reading follow pydicom's model: with ``strict=True`` every problem raises a
`bmetrack.imaging.errors.DicomSeriesError` subclass naming the file, the problem and the fix;
with ``strict=False`` (default) files that can safely be left out are dropped and each problem
is recorded in ``Volume.warnings``.  Problems that leave the series ambiguous (several series,
duplicate positions with different pixels, a tie between orientations or matrices, an
undecodable transfer syntax) raise in both modes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings as _warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ImplicitVRLittleEndian, MediaStorageDirectoryStorage

from bmetrack.imaging.errors import (
    DicomSeriesError,
    DuplicatePositionError,
    EmptySeriesError,
    InconsistentMatrixError,
    MissingGeometryError,
    MissingSliceError,
    MixedOrientationError,
    MultipleSeriesError,
    NonOriginalImageError,
    NonUniformSpacingError,
    UnreadableFileError,
    UnsupportedTransferSyntaxError,
    WrongModalityError,
)
from bmetrack.imaging.volume import Volume

__all__ = [
    "GAP_FACTOR",
    "STIR_MAX_INVERSION_TIME_MS",
    "FolderScan",
    "Orientation",
    "RejectedFile",
    "SequenceClass",
    "SeriesInfo",
    "classify_series",
    "read_series",
    "scan_folder",
]

logger = logging.getLogger(__name__)

#: A step between neighbouring slices larger than this multiple of the median step is a gap.
GAP_FACTOR = 1.5
#: Inversion times up to this value (ms) with an IR sequence mean STIR (fat nulling: about
#: 150-170 ms at 1.5 T, 210-250 ms at 3 T; T1-FLAIR uses ~800 ms, FLAIR ~2000 ms and more).
STIR_MAX_INVERSION_TIME_MS = 300.0
#: T1 weighting: TR and TE below these values (ms), no inversion pulse.
T1_MAX_TR_MS = 800.0
T1_MAX_TE_MS = 30.0
#: T2 weighting: TR and TE at or above these values (ms).
T2_MIN_TR_MS = 1500.0
T2_MIN_TE_MS = 60.0
#: Gradient-echo T1 (spoiled GRE, VIBE) has TE below this; T2* GRE is longer.
_GRE_T1_MAX_TE_MS = 10.0

# Slice positions closer than this (mm) are the same position.
_DUPLICATE_TOL_MM = 0.01
# Steps within max(rel * median, abs) of the median step count as uniform.
_SPACING_REL_TOL = 0.01
_SPACING_ABS_TOL_MM = 0.01
# Lenient reading fills missing slices only while they are at most this share of the stack.
_MAX_FILLED_FRACTION = 0.25
# Direction cosines within this tolerance are the same orientation.
_ORIENTATION_TOL = 1e-3
# Deferring big values keeps header-only reads cheap while still showing if pixel data exists.
_DEFER_SIZE = "4 KB"
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)


class SequenceClass(StrEnum):
    """MR contrast of a series as bmetrack uses it."""

    STIR = "stir"
    T1 = "t1"
    T2 = "t2"
    OTHER = "other"


class Orientation(StrEnum):
    """Image plane from the dominant LPS axis of the slice normal."""

    SAGITTAL = "sagittal"
    CORONAL = "coronal"
    AXIAL = "axial"
    MIXED = "mixed"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class RejectedFile:
    """A file left out of every series, and why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class SeriesInfo:
    """Header summary of one series found by `scan_folder` (all fields from headers only).

    Sequence parameters (TR, TE, TI, ...) are those of the first image file (sorted by path);
    ``files`` are the image files of the series, ``rejected`` its files that cannot be images.
    """

    series_instance_uid: str
    study_instance_uid: str | None = None
    patient_id: str | None = None
    study_date: date | None = None
    series_description: str = ""
    modality: str | None = None
    series_number: int | None = None
    n_files: int = 0
    orientation: Orientation = Orientation.UNKNOWN
    sequence_class: SequenceClass = SequenceClass.OTHER
    files: tuple[Path, ...] = ()
    rejected: tuple[RejectedFile, ...] = ()
    protocol_name: str = ""
    manufacturer: str = ""
    magnetic_field_strength_t: float | None = None
    repetition_time_ms: float | None = None
    echo_time_ms: float | None = None
    inversion_time_ms: float | None = None
    flip_angle_deg: float | None = None
    scanning_sequence: tuple[str, ...] = ()
    sequence_variant: tuple[str, ...] = ()
    scan_options: tuple[str, ...] = ()
    image_type: tuple[str, ...] = ()


class FolderScan(list[SeriesInfo]):
    """The series found by `scan_folder` (a list), plus files that belong to no series.

    Attributes
    ----------
    rejected : list of RejectedFile
        Files that are not DICOM, unreadable, DICOMDIR indexes, or DICOM objects without an
        image series (reports, structure sets...).  Files rejected *within* a series are in
        that series' ``rejected``.
    """

    def __init__(
        self, series: Iterable[SeriesInfo] = (), rejected: Iterable[RejectedFile] = ()
    ) -> None:
        super().__init__(series)
        self.rejected: list[RejectedFile] = list(rejected)

    @property
    def all_rejected(self) -> list[RejectedFile]:
        """Folder-level rejects followed by the rejects of every series."""
        out = list(self.rejected)
        for info in self:
            out.extend(info.rejected)
        return out


# ============================================================== header helpers
def _get(ds: Dataset, keyword: str) -> Any:
    """Value of ``keyword`` or None; never raises on malformed elements."""
    try:
        value = ds.get(keyword)
    except Exception:
        return None
    if value is None or value == "":
        return None
    return value


def _get_str(ds: Dataset, keyword: str) -> str | None:
    value = _get(ds, keyword)
    return None if value is None else str(value).strip()


def _get_float(ds: Dataset, keyword: str) -> float | None:
    value = _get(ds, keyword)
    if value is None:
        return None
    try:
        if not isinstance(value, str | bytes) and hasattr(value, "__len__"):
            value = value[0]  # first of a multi-valued element
        out = float(value)
    except (TypeError, ValueError, IndexError):
        return None
    return out if np.isfinite(out) else None


def _get_int(ds: Dataset, keyword: str) -> int | None:
    value = _get_float(ds, keyword)
    return None if value is None else int(value)


def _get_floats(ds: Dataset, keyword: str, n: int) -> npt.NDArray[np.float64] | None:
    value = _get(ds, keyword)
    if value is None:
        return None
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        return None
    return arr


def _get_tuple(ds: Dataset, keyword: str) -> tuple[str, ...]:
    value = _get(ds, keyword)
    if value is None:
        return ()
    if isinstance(value, str):
        parts = value.split("\\")
    else:
        try:
            parts = [str(v) for v in value]
        except TypeError:
            parts = [str(value)]
    return tuple(p.strip().upper() for p in parts if p.strip())


def _get_date(ds: Dataset, keyword: str) -> date | None:
    value = _get_str(ds, keyword)
    if value is None or not re.fullmatch(r"\d{8}", value):
        return None
    try:
        return date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return None


def _orientation_vectors(
    ds: Dataset,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None:
    """Unit row and column direction cosines from IOP, or None if absent or invalid."""
    iop = _get_floats(ds, "ImageOrientationPatient", 6)
    if iop is None:
        return None
    row, col = iop[:3], iop[3:]
    n_row, n_col = np.linalg.norm(row), np.linalg.norm(col)
    if n_row < 0.5 or n_col < 0.5:
        return None
    row, col = row / n_row, col / n_col
    if abs(float(row @ col)) > 1e-2:
        return None
    return row, col


def _plane(normal: npt.NDArray[np.float64] | None) -> Orientation:
    if normal is None:
        return Orientation.UNKNOWN
    return (Orientation.SAGITTAL, Orientation.CORONAL, Orientation.AXIAL)[
        int(np.argmax(np.abs(normal)))
    ]


def _is_dicomdir(ds: Dataset) -> bool:
    try:
        sop = ds.file_meta.get("MediaStorageSOPClassUID")
    except Exception:
        sop = None
    return sop == MediaStorageDirectoryStorage or "DirectoryRecordSequence" in ds


def _has_pixel_data(ds: Dataset) -> bool:
    return any(tag in ds for tag in _PIXEL_TAGS)


def _transfer_syntax(ds: Dataset) -> UID:
    try:
        ts = ds.file_meta.get("TransferSyntaxUID")
    except Exception:
        ts = None
    return UID(str(ts)) if ts else ImplicitVRLittleEndian


def _expected_native_bytes(ds: Dataset) -> int | None:
    rows, cols = _get_int(ds, "Rows"), _get_int(ds, "Columns")
    bits = _get_int(ds, "BitsAllocated")
    if rows is None or cols is None or bits is None:
        return None
    spp = _get_int(ds, "SamplesPerPixel") or 1
    frames = _get_int(ds, "NumberOfFrames") or 1
    n_bits = rows * cols * spp * frames * bits
    return (n_bits + 7) // 8


def _dcmread(path: Path, *, header_only: bool) -> Dataset:
    """Read a DICOM file; files without the DICM preamble are accepted if they look DICOM.

    Raises
    ------
    InvalidDicomError
        The file is not DICOM.
    Exception
        Whatever pydicom raises on a damaged file.
    """
    kwargs: dict[str, Any] = {"defer_size": _DEFER_SIZE} if header_only else {}
    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore")  # pydicom warns on every non-conformant value
        try:
            return pydicom.dcmread(path, **kwargs)
        except InvalidDicomError:
            pass
        # No preamble: older exports write the bare dataset.  Accept only if it parses to
        # something with the identifying tags, so text or image files are not taken for DICOM.
        try:
            ds = pydicom.dcmread(path, force=True, **kwargs)
        except Exception as exc:
            msg = "not a DICOM file (no DICM preamble and not a bare DICOM dataset)"
            raise InvalidDicomError(msg) from exc
        if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
            msg = "not a DICOM file (no DICM preamble and no SOP Class/Instance UID)"
            raise InvalidDicomError(msg)
        return ds


def _header_fields(ds: Dataset) -> dict[str, Any]:
    """The SeriesInfo fields (except counts, files, class) read from one header."""
    return {
        "study_instance_uid": _get_str(ds, "StudyInstanceUID"),
        "patient_id": _get_str(ds, "PatientID"),
        "study_date": _get_date(ds, "StudyDate"),
        "series_description": _get_str(ds, "SeriesDescription") or "",
        "modality": (_get_str(ds, "Modality") or "").upper() or None,
        "series_number": _get_int(ds, "SeriesNumber"),
        "protocol_name": _get_str(ds, "ProtocolName") or "",
        "manufacturer": _get_str(ds, "Manufacturer") or "",
        "magnetic_field_strength_t": _get_float(ds, "MagneticFieldStrength"),
        "repetition_time_ms": _get_float(ds, "RepetitionTime"),
        "echo_time_ms": _get_float(ds, "EchoTime"),
        "inversion_time_ms": _get_float(ds, "InversionTime"),
        "flip_angle_deg": _get_float(ds, "FlipAngle"),
        "scanning_sequence": _get_tuple(ds, "ScanningSequence"),
        "sequence_variant": _get_tuple(ds, "SequenceVariant"),
        "scan_options": _get_tuple(ds, "ScanOptions"),
        "image_type": _get_tuple(ds, "ImageType"),
    }


# ============================================================== classification
_SPECTRAL_FAT_SAT = frozenset({"SPAIR", "SPIR", "FS", "FATSAT", "FATSUP", "FSAT", "CHESS"})
_LOCALIZER_TOKENS = frozenset({"LOCALIZER", "LOCALISER", "LOC", "SCOUT", "SURVEY", "PILOT"})
_T1_TOKEN = re.compile(r"T1[A-Z]*")  # T1, T1W, T1WI, T1FS, T1TSE; not T10..T12 (levels)
_T2_TOKEN = re.compile(r"T2[A-Z]*")


def _tokens(*texts: str) -> set[str]:
    out: set[str] = set()
    for text in texts:
        out.update(t for t in re.split(r"[^A-Z0-9]+", text.upper()) if t)
    return out


def _is_stir_token(token: str) -> bool:
    # STIR, T2STIR, STIRW; Siemens TIRM / TIR.  Not SPAIR/SPIR, which contain "IR" but are
    # spectral fat saturation of a T2 (or T1) sequence.
    return "STIR" in token or token in {"TIR", "TIRM"} or token.startswith("TIRM")


def _description_class(tokens: set[str]) -> SequenceClass | None:
    if any(_is_stir_token(t) for t in tokens):
        return SequenceClass.STIR
    has_t1 = any(_T1_TOKEN.fullmatch(t) for t in tokens)
    has_t2 = any(_T2_TOKEN.fullmatch(t) for t in tokens)
    if has_t1 != has_t2:
        return SequenceClass.T1 if has_t1 else SequenceClass.T2
    return None


def _physics_class(info: SeriesInfo, spectral_fat_sat: bool) -> SequenceClass | None:
    seq = set(info.scanning_sequence)
    tr, te, ti = info.repetition_time_ms, info.echo_time_ms, info.inversion_time_ms
    inversion = "IR" in seq or (not seq and ti is not None and ti > 0)
    if inversion:
        if ti is None or ti <= 0:
            return None
        if ti > STIR_MAX_INVERSION_TIME_MS:
            return None  # FLAIR or T1-IR: let the description decide
        if not spectral_fat_sat:
            return SequenceClass.STIR
        # SPAIR/SPIR flagged as IR: fat saturation, judge the weighting by TR/TE below.
    if tr is None or te is None:
        return None
    gradient_echo = "GR" in seq and "SE" not in seq
    if tr < T1_MAX_TR_MS and te < T1_MAX_TE_MS:
        if gradient_echo and te >= _GRE_T1_MAX_TE_MS:
            return None  # T2* gradient echo
        return SequenceClass.T1
    if tr >= T2_MIN_TR_MS and te >= T2_MIN_TE_MS:
        return SequenceClass.T2
    return None


def classify_series(
    info: SeriesInfo, overrides: Mapping[str, SequenceClass | str] | None = None
) -> SequenceClass:
    """Classify an MR series as STIR, T1, T2 or OTHER from its header.

    Rules, in order:

    1. ``overrides[info.series_instance_uid]`` if given (a `SequenceClass` or its value).
    2. Not MR, or a localizer (ImageType LOCALIZER, or a description token LOCALIZER,
       LOC, SCOUT, SURVEY, PILOT): OTHER.
    3. The description (SeriesDescription and ProtocolName, split into alphanumeric tokens,
       so "SPAIR" is not read as containing "IR") says STIR (tokens STIR, T2STIR, TIRM, TIR)
       and InversionTime is absent or <= `STIR_MAX_INVERSION_TIME_MS`: STIR.
    4. Physics, when decisive:

       - inversion recovery (ScanningSequence contains IR, or no ScanningSequence but an
         InversionTime) with 0 < TI <= `STIR_MAX_INVERSION_TIME_MS` (300 ms; fat is nulled at
         about 150-170 ms at 1.5 T and 210-250 ms at 3 T): STIR, unless the description names
         spectral fat saturation (SPAIR, SPIR, FS, FATSAT...), which some scanners flag as IR:
         then TR/TE decide.  A longer TI (T1-FLAIR, FLAIR) is left to the description.
       - TR < 800 ms and TE < 30 ms: T1 (for a pure gradient echo TE must be < 10 ms, as a
         longer TE is T2*).
       - TR >= 1500 ms and TE >= 60 ms: T2 (fat-saturated T2, e.g. Philips "T2W_SPAIR",
         is T2).
    5. Otherwise the description breaks the tie: a T1 token (T1, T1W, T1WI, T1FS... but not
       the vertebral levels T10-T12) without a T2 token gives T1, and vice versa (STIR tokens
       are ignored here when TI is FLAIR-like, so "t1_tirm_dark-fluid" is T1).
    6. Otherwise OTHER (proton density, T2*, diffusion, unknown).

    Parameters
    ----------
    info : SeriesInfo
        Header summary (from `scan_folder`, or built by hand).
    overrides : mapping, optional
        Manual classes by SeriesInstanceUID; they win over every rule.

    Returns
    -------
    SequenceClass
    """
    if overrides and info.series_instance_uid in overrides:
        value = overrides[info.series_instance_uid]
        try:
            return SequenceClass(value)
        except ValueError as exc:
            allowed = ", ".join(c.value for c in SequenceClass)
            msg = f"overrides[{info.series_instance_uid!r}] must be one of {allowed}, got {value!r}"
            raise ValueError(msg) from exc
    if info.modality is not None and info.modality.upper() != "MR":
        return SequenceClass.OTHER
    tokens = _tokens(info.series_description, info.protocol_name)
    if "LOCALIZER" in info.image_type or tokens & _LOCALIZER_TOKENS:
        return SequenceClass.OTHER
    described = _description_class(tokens)
    ti = info.inversion_time_ms
    if described is SequenceClass.STIR:
        if ti is None or ti <= STIR_MAX_INVERSION_TIME_MS:
            return SequenceClass.STIR
        # "TIRM"/"STIR" in the name but a FLAIR-like TI (Siemens "t1_tirm_dark-fluid"):
        # ignore the inversion tokens and keep any T1/T2 token.
        described = _description_class({t for t in tokens if not _is_stir_token(t)})
    spectral = bool(tokens & _SPECTRAL_FAT_SAT)
    physics = _physics_class(info, spectral)
    if physics is not None:
        return physics
    return described or SequenceClass.OTHER


# ============================================================== folder scan
def _walk(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda _err: None):
        dirnames.sort()
        out.extend(Path(dirpath) / name for name in sorted(filenames))
    return out


@dataclass
class _SeriesAcc:
    fields: dict[str, Any]
    files: list[Path] = field(default_factory=list)
    rejected: list[RejectedFile] = field(default_factory=list)
    planes: set[Orientation] = field(default_factory=set)


def _header_problem(path: Path, ds: Dataset) -> str | None:
    """Why a readable file with a series UID cannot be an image of it, or None."""
    if not _has_pixel_data(ds):
        sop = _get_str(ds, "SOPClassUID") or "unknown SOP class"
        with contextlib.suppress(Exception):
            sop = UID(sop).name
        return f"no pixel data ({sop})"
    if _get_int(ds, "Rows") is None or _get_int(ds, "Columns") is None:
        return "pixel data without Rows/Columns"
    size = path.stat().st_size
    # A deferred (unread) pixel element knows where its value starts and how long it is.
    for tag in _PIXEL_TAGS:
        elem = ds.get_item(tag, keep_deferred=True) if tag in ds else None
        value_tell = getattr(elem, "value_tell", None)
        length = getattr(elem, "length", None)
        if value_tell is None or length is None or length == 0xFFFFFFFF:
            continue  # already read, or encapsulated (undefined length)
        if value_tell + length > size:
            return (
                f"truncated: pixel data needs {length} bytes from offset {value_tell}, "
                f"the file has {size} bytes"
            )
    if not _transfer_syntax(ds).is_compressed:
        expected = _expected_native_bytes(ds)
        if expected is not None and size < expected:
            return f"truncated: file has {size} bytes, its pixel data alone needs {expected}"
    return None


def scan_folder(path: str | Path) -> FolderScan:
    """List the DICOM series in a folder from file headers only; never raises on a file.

    Every file under ``path`` (recursively, any name or extension; a DICOMDIR is not needed
    and is itself listed as rejected) is read header-only and grouped by SeriesInstanceUID.

    Parameters
    ----------
    path : str or Path
        Folder (or single file) to scan.

    Returns
    -------
    FolderScan
        A list of `SeriesInfo` sorted by study date, series number and UID; its ``rejected``
        attribute lists files outside every series with the reason (not DICOM, unreadable,
        DICOMDIR, no SeriesInstanceUID...).  Each series' own ``rejected`` lists its files
        that cannot be images (no pixel data, truncated...).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    """
    root = Path(path)
    if not root.exists():
        msg = f"path {str(root)!r} does not exist; give a folder holding DICOM files"
        raise FileNotFoundError(msg)
    series: dict[str, _SeriesAcc] = {}
    rejected: list[RejectedFile] = []
    for file in _walk(root):
        try:
            ds = _dcmread(file, header_only=True)
        except InvalidDicomError as exc:
            rejected.append(RejectedFile(file, str(exc) or "not a DICOM file"))
            continue
        except Exception as exc:
            reason = f"unreadable or truncated DICOM: {type(exc).__name__}: {exc}"
            rejected.append(RejectedFile(file, reason))
            continue
        try:
            if _is_dicomdir(ds):
                rejected.append(RejectedFile(file, "DICOMDIR index file (not an image)"))
                continue
            uid = _get_str(ds, "SeriesInstanceUID")
            if not uid:
                reason = "no SeriesInstanceUID (not an image object, or header truncated)"
                rejected.append(RejectedFile(file, reason))
                continue
            problem = _header_problem(file, ds)
            acc = series.get(uid)
            if acc is None:
                acc = series[uid] = _SeriesAcc(fields=_header_fields(ds))
            if problem is not None:
                acc.rejected.append(RejectedFile(file, problem))
                continue
            if not acc.files:  # parameters from the first image file
                acc.fields = _header_fields(ds)
            acc.files.append(file)
            vectors = _orientation_vectors(ds)
            acc.planes.add(_plane(None if vectors is None else np.cross(*vectors)))
        except Exception as exc:  # a malformed element we did not foresee
            reason = f"unreadable header: {type(exc).__name__}: {exc}"
            rejected.append(RejectedFile(file, reason))
    infos: list[SeriesInfo] = []
    for uid, acc in series.items():
        if not acc.files:  # reports, structure sets...: not an image series
            rejected.extend(acc.rejected)
            continue
        planes = acc.planes - {Orientation.UNKNOWN} or acc.planes
        plane = next(iter(planes)) if len(planes) == 1 else Orientation.MIXED
        info = SeriesInfo(
            series_instance_uid=uid,
            n_files=len(acc.files),
            orientation=plane,
            files=tuple(acc.files),
            rejected=tuple(acc.rejected),
            **acc.fields,
        )
        infos.append(_with_class(info))
    infos.sort(
        key=lambda s: (s.study_date or date.min, s.series_number or 0, s.series_instance_uid)
    )
    return FolderScan(infos, rejected)


def _with_class(info: SeriesInfo) -> SeriesInfo:
    return replace(info, sequence_class=classify_series(info))


# ============================================================== series reader
class _Issues:
    """Raise (strict) or record (lenient) problems."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.warnings: list[str] = []

    def drop(self, exc_type: type[DicomSeriesError], path: Path, problem: str, fix: str) -> None:
        if self.strict:
            raise exc_type(problem, fix=fix, path=path)
        self.warnings.append(f"dropped {path}: {problem}")
        logger.warning("dropped %s: %s", path, problem)

    def note(
        self,
        exc_type: type[DicomSeriesError],
        path: Path | None,
        problem: str,
        fix: str,
        action: str = "",
    ) -> None:
        """Raise (strict) or record ``problem`` followed by the lenient ``action``."""
        if self.strict:
            raise exc_type(problem, fix=fix, path=path)
        text = f"{problem}; {action}" if action else problem
        self.warnings.append(text)
        logger.warning("%s", text)


@dataclass
class _Slice:
    path: Path
    ds: Dataset
    row_dir: npt.NDArray[np.float64]
    col_dir: npt.NDArray[np.float64]
    position: npt.NDArray[np.float64]
    spacing: npt.NDArray[np.float64]  # (between rows, between columns)
    matrix: tuple[int, int]
    pixels: npt.NDArray[np.float32] | None = None


def _collect_paths(folder_or_files: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(folder_or_files, str | Path):
        root = Path(folder_or_files)
        if not root.exists():
            msg = f"DICOM input {str(root)!r} does not exist; give a series folder or files"
            raise FileNotFoundError(msg)
        return _walk(root)
    return [Path(p) for p in folder_or_files]


def _decode(item: _Slice) -> npt.NDArray[np.float32]:
    """Pixel values with RescaleSlope/Intercept applied, as float32 (rows, columns)."""
    ds = item.ds
    ts = _transfer_syntax(ds)
    if ts.is_compressed:
        from pydicom.pixels import get_decoder

        try:
            decoder = get_decoder(ts)
        except NotImplementedError:
            decoder = None
        if decoder is None or not decoder.is_available:
            missing = "; ".join(decoder.missing_dependencies) if decoder is not None else ""
            hint = f"install one of: {missing}" if missing else "no pydicom decoder exists"
            problem = (
                f"cannot decode pixel data compressed with {ts.name} ({ts}): "
                f"no installed decoder plugin supports it"
            )
            fix = f"{hint}; or re-export the series uncompressed (Explicit VR Little Endian)"
            raise UnsupportedTransferSyntaxError(problem, fix=fix, path=item.path)
    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore")
        raw = ds.pixel_array
    if raw.shape != item.matrix:
        msg = f"pixel array shape {raw.shape} differs from Rows x Columns {item.matrix}"
        raise ValueError(msg)
    slope = _get_float(ds, "RescaleSlope")
    intercept = _get_float(ds, "RescaleIntercept")
    values = raw.astype(np.float64) * (1.0 if slope is None else slope) + (intercept or 0.0)
    return values.astype(np.float32)


def _majority(keys: list[Any]) -> Any | None:
    """The most common key, or None on a tie for first place."""
    counts = Counter(keys).most_common()
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
        return None
    return counts[0][0]


def _orientation_key(item: _Slice) -> tuple[float, ...]:
    return tuple(np.round(np.concatenate([item.row_dir, item.col_dir]) / _ORIENTATION_TOL))


def read_series(
    folder_or_files: str | Path | Iterable[str | Path],
    *,
    strict: bool = False,
    series_uid: str | None = None,
) -> Volume:
    """Read one DICOM MR series into a `Volume` (axes slice, row, column; LPS affine).

    Slices are sorted by ImagePositionPatient projected on the slice normal (the cross
    product of the two ImageOrientationPatient vectors); the slice step vector is
    ``(last position - first position) / (n - 1)``, so a sheared stack (positions not along
    the normal) is kept exactly.  RescaleSlope/RescaleIntercept are applied; the array is
    float32.

    Problems detected (strict: raise; lenient: the action given):

    - unreadable, truncated or non-DICOM file: dropped;
    - no pixel data or missing geometry (IOP, IPP, PixelSpacing, Rows, Columns): dropped;
    - multi-frame or colour image: dropped;
    - localizer image (ImageType LOCALIZER): dropped;
    - derived/secondary image (ImageType DERIVED or SECONDARY): dropped when original images
      exist, else kept with a warning;
    - non-MR modality: dropped when MR images exist, else kept with a warning;
    - different Rows/Columns/PixelSpacing, mixed orientations: the majority is kept (a tie
      raises);
    - duplicate positions: exact copies (same SOPInstanceUID or same pixels) collapse to one,
      different images raise;
    - missing slice (a step > `GAP_FACTOR` x the median step) or otherwise non-uniform steps:
      the stack is resampled linearly onto a uniform grid along the slice line, and
      ``metadata["interpolated_slices"]`` lists the slice indices that were interpolated;
      more than 25 % missing positions, or positions off one line, raise in both modes.

    Parameters
    ----------
    folder_or_files : str, Path or iterable of paths
        A folder (searched recursively; DICOMDIR files are ignored) or the files of a series.
    strict : bool, default False
        Raise on the first problem instead of recording it in ``Volume.warnings``.
    series_uid : str, optional
        Read only this SeriesInstanceUID (needed when the input holds several series).

    Returns
    -------
    Volume
        With ``series_instance_uid``, ``modality``, ``warnings`` and ``metadata`` (study and
        patient identifiers, sequence parameters, ``sequence_class``, ``source_files`` in
        slice order, ``transfer_syntax_uid``).

    Raises
    ------
    DicomSeriesError
        A subclass from `bmetrack.imaging.errors` naming the file, the problem and the fix.
    FileNotFoundError
        If the folder does not exist.
    """
    issues = _Issues(strict)
    paths = _collect_paths(folder_or_files)
    if not paths:
        msg = "no files found"
        raise EmptySeriesError(msg, fix="give a folder holding the series' DICOM files")

    # ---- read every file, keep those of the wanted series
    by_series: dict[str, list[tuple[Path, Dataset]]] = {}
    for path in paths:
        try:
            ds = _dcmread(path, header_only=False)
        except InvalidDicomError as exc:
            fix = "move non-DICOM files out of the series folder, or read with strict=False"
            issues.drop(UnreadableFileError, path, str(exc) or "not a DICOM file", fix)
            continue
        except Exception as exc:
            problem = f"unreadable or truncated DICOM ({type(exc).__name__}: {exc})"
            fix = "re-export the file from the PACS, or read with strict=False to skip it"
            issues.drop(UnreadableFileError, path, problem, fix)
            continue
        if _is_dicomdir(ds):
            continue  # an index of the export, not part of the series
        uid = _get_str(ds, "SeriesInstanceUID")
        if uid is None:
            problem = "no SeriesInstanceUID (not an image of a series)"
            fix = "remove the file from the series folder, or read with strict=False"
            issues.drop(MissingGeometryError, path, problem, fix)
            continue
        by_series.setdefault(uid, []).append((path, ds))
    if series_uid is not None:
        if series_uid not in by_series:
            found = ", ".join(sorted(by_series)) or "none"
            problem = f"series_uid {series_uid!r} not found (series present: {found})"
            raise EmptySeriesError(problem, fix="use scan_folder() to list the series")
        chosen = by_series[series_uid]
    elif len(by_series) > 1:
        listing = "; ".join(
            f"{uid} ({_get_str(items[0][1], 'SeriesDescription') or 'no description'}, "
            f"{len(items)} files)"
            for uid, items in sorted(by_series.items())
        )
        raise MultipleSeriesError(
            f"the input holds {len(by_series)} series: {listing}",
            fix="pass series_uid=..., or a folder holding one series (scan_folder() lists them)",
        )
    elif by_series:
        chosen = next(iter(by_series.values()))
    else:
        raise EmptySeriesError(
            "no DICOM image found" + _summary(issues.warnings),
            fix="check the folder holds the series' DICOM files",
        )

    items = _check_files(chosen, issues)
    items = _check_consistency(items, issues)
    for item in list(items):
        try:
            item.pixels = _decode(item)
        except UnsupportedTransferSyntaxError:
            raise
        except Exception as exc:
            problem = f"pixel data cannot be read ({type(exc).__name__}: {exc})"
            fix = "re-export the file from the PACS, or read with strict=False to skip it"
            issues.drop(UnreadableFileError, item.path, problem, fix)
            items.remove(item)
    if not items:
        raise EmptySeriesError(
            "no usable image left" + _summary(issues.warnings),
            fix="re-export the series from the PACS",
        )
    return _assemble(items, issues)


def _summary(messages: list[str]) -> str:
    if not messages:
        return ""
    head = "; ".join(messages[:3])
    more = f" (+{len(messages) - 3} more)" if len(messages) > 3 else ""
    return f" ({head}{more})"


def _check_files(chosen: list[tuple[Path, Dataset]], issues: _Issues) -> list[_Slice]:
    """Per-file checks: pixel data, geometry, frames, localizers."""
    items: list[_Slice] = []
    for path, ds in chosen:
        fix_geometry = "re-export the series with complete headers, or read with strict=False"
        if not _has_pixel_data(ds):
            issues.drop(MissingGeometryError, path, "no pixel data", fix_geometry)
            continue
        if (_get_int(ds, "NumberOfFrames") or 1) > 1:
            problem = "multi-frame (enhanced) image, not supported"
            fix = "export classic single-frame images, or convert to NIfTI with dcm2niix"
            issues.drop(UnreadableFileError, path, problem, fix)
            continue
        if (_get_int(ds, "SamplesPerPixel") or 1) != 1:
            problem = "colour image (SamplesPerPixel != 1)"
            fix = "remove screenshots or colour images from the series folder"
            issues.drop(NonOriginalImageError, path, problem, fix)
            continue
        if "LOCALIZER" in _get_tuple(ds, "ImageType"):
            problem = "localizer (scout) image inside the series"
            fix = "remove localizer images from the folder, or read with strict=False"
            issues.drop(NonOriginalImageError, path, problem, fix)
            continue
        vectors = _orientation_vectors(ds)
        position = _get_floats(ds, "ImagePositionPatient", 3)
        spacing = _get_floats(ds, "PixelSpacing", 2)
        rows, cols = _get_int(ds, "Rows"), _get_int(ds, "Columns")
        missing = [
            name
            for name, value in (
                ("ImageOrientationPatient", vectors),
                ("ImagePositionPatient", position),
                ("PixelSpacing", spacing if spacing is None or np.all(spacing > 0) else None),
                ("Rows", rows),
                ("Columns", cols),
            )
            if value is None
        ]
        if missing:
            problem = f"missing or invalid geometry tags: {', '.join(missing)}"
            issues.drop(MissingGeometryError, path, problem, fix_geometry)
            continue
        assert vectors is not None and position is not None and spacing is not None
        assert rows is not None and cols is not None
        items.append(_Slice(path, ds, vectors[0], vectors[1], position, spacing, (rows, cols)))
    return items


def _check_consistency(items: list[_Slice], issues: _Issues) -> list[_Slice]:
    """Series-level checks: modality, derived images, matrix, orientation."""
    if not items:
        return items
    modalities = [(_get_str(it.ds, "Modality") or "").upper() for it in items]
    if "MR" in modalities:
        kept = []
        for it, modality in zip(items, modalities, strict=True):
            if modality == "MR":
                kept.append(it)
            else:
                problem = f"modality {modality or 'missing'} inside an MR series"
                fix = "remove the non-MR images from the folder, or read with strict=False"
                issues.drop(WrongModalityError, it.path, problem, fix)
        items = kept
    else:
        issues.note(
            WrongModalityError,
            items[0].path,
            f"modality is {modalities[0] or 'missing'}, not MR; bmetrack's measurements "
            "assume MR images",
            "select the MR series (scan_folder() lists every series and its modality)",
        )

    def derived(it: _Slice) -> bool:
        image_type = _get_tuple(it.ds, "ImageType")
        return bool(image_type) and (image_type[0] == "DERIVED" or "SECONDARY" in image_type[:2])

    flags = [derived(it) for it in items]
    if any(flags):
        fix = "use the original acquired series (ImageType ORIGINAL), or read with strict=False"
        if all(flags):
            issues.note(
                NonOriginalImageError,
                items[0].path,
                "all images are DERIVED/SECONDARY (a reconstruction, not the acquisition)",
                fix,
            )
        else:
            kept = []
            for it, flag in zip(items, flags, strict=True):
                if flag:
                    issues.drop(NonOriginalImageError, it.path, "derived/secondary image", fix)
                else:
                    kept.append(it)
            items = kept

    def matrix_key(it: _Slice) -> tuple[Any, ...]:
        return (*it.matrix, *np.round(it.spacing, 4).tolist())

    items = _keep_majority(
        items,
        matrix_key,
        issues,
        InconsistentMatrixError,
        "Rows/Columns/PixelSpacing",
        "remove images of another acquisition (different matrix) from the folder",
    )
    return _keep_majority(
        items,
        _orientation_key,
        issues,
        MixedOrientationError,
        "ImageOrientationPatient",
        "split the series by orientation (scan_folder() shows it) or remove localizers",
    )


def _keep_majority(
    items: list[_Slice],
    key: Any,
    issues: _Issues,
    exc_type: type[DicomSeriesError],
    what: str,
    fix: str,
) -> list[_Slice]:
    if not items:
        return items
    keys = [key(it) for it in items]
    best = _majority(keys)
    if best is None:
        counts = Counter(keys)
        raise exc_type(
            f"{what} differs within the series with no majority ({len(counts)} variants of "
            f"{len(items)} images each)",
            fix=fix,
            path=items[0].path,
        )
    kept = []
    for it, k in zip(items, keys, strict=True):
        if k == best:
            kept.append(it)
        else:
            issues.drop(exc_type, it.path, f"{what} differs from the rest of the series", fix)
    return kept


def _assemble(items: list[_Slice], issues: _Issues) -> Volume:
    ref = items[0]
    normal = np.cross(ref.row_dir, ref.col_dir)
    items = sorted(items, key=lambda it: float(it.position @ normal))
    items = _drop_duplicates(items, normal, issues)
    heights = np.array([float(it.position @ normal) for it in items])
    positions = np.array([it.position for it in items])
    stack = np.stack([it.pixels for it in items if it.pixels is not None])
    metadata = _metadata(items)

    if len(items) == 1:
        thickness = _get_float(ref.ds, "SpacingBetweenSlices") or _get_float(
            ref.ds, "SliceThickness"
        )
        step_mm = thickness if thickness and thickness > 0 else 1.0
        issues.warnings.append(
            f"single-slice series: slice spacing {step_mm:g} mm taken from "
            "SpacingBetweenSlices/SliceThickness (or 1 mm), not from positions"
        )
        step = normal * step_mm
        origin = positions[0]
        interpolated: list[int] = []
    else:
        stack, origin, step, interpolated = _regular_stack(stack, heights, positions, items, issues)
    if abs(float(step @ normal)) < (1 - 1e-6) * np.linalg.norm(step):
        issues.warnings.append(
            "slice positions are not along the slice normal (sheared grid, e.g. gantry "
            "tilt); the affine keeps the shear, but measurements assume orthogonal axes"
        )
    affine = np.eye(4)
    affine[:3, 0] = step
    affine[:3, 1] = ref.col_dir * ref.spacing[0]
    affine[:3, 2] = ref.row_dir * ref.spacing[1]
    affine[:3, 3] = origin
    if interpolated:
        metadata["interpolated_slices"] = interpolated
    return Volume(
        stack,
        affine,
        series_instance_uid=_get_str(ref.ds, "SeriesInstanceUID"),
        modality=metadata.get("modality"),
        metadata=metadata,
        warnings=issues.warnings,
    )


def _drop_duplicates(
    items: list[_Slice], normal: npt.NDArray[np.float64], issues: _Issues
) -> list[_Slice]:
    kept: list[_Slice] = []
    for it in items:
        if kept and abs(float((it.position - kept[-1].position) @ normal)) < _DUPLICATE_TOL_MM:
            prev = kept[-1]
            same_instance = _get_str(it.ds, "SOPInstanceUID") == _get_str(prev.ds, "SOPInstanceUID")
            same_pixels = (
                it.pixels is not None
                and prev.pixels is not None
                and np.array_equal(it.pixels, prev.pixels)
                and np.allclose(it.position, prev.position, atol=_DUPLICATE_TOL_MM)
            )
            fix = (
                "remove duplicate copies; for multi-echo or dynamic series pass only the "
                "files of one echo or time point"
            )
            if same_instance or same_pixels:
                issues.drop(
                    DuplicatePositionError,
                    it.path,
                    f"duplicate of {prev.path.name} (same position and "
                    f"{'SOPInstanceUID' if same_instance else 'pixels'})",
                    fix,
                )
                continue
            raise DuplicatePositionError(
                f"two different images at the same slice position as {prev.path}",
                fix=fix,
                path=it.path,
            )
        kept.append(it)
    return kept


def _regular_stack(
    stack: npt.NDArray[np.float32],
    heights: npt.NDArray[np.float64],
    positions: npt.NDArray[np.float64],
    items: list[_Slice],
    issues: _Issues,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64], npt.NDArray[np.float64], list[int]]:
    """Check slice steps; resample onto a uniform grid when lenient and needed.

    Returns the stack, the origin, the step vector and the interpolated slice indices.
    """
    n = len(heights)
    span = heights[-1] - heights[0]
    # All positions must lie on one line: p_k = p_0 + (h_k - h_0) / span * (p_last - p_0).
    along = positions[0] + np.outer((heights - heights[0]) / span, positions[-1] - positions[0])
    off_line = float(np.max(np.linalg.norm(positions - along, axis=1)))
    if off_line > max(_SPACING_ABS_TOL_MM, 0.05 * span / (n - 1)):
        raise NonUniformSpacingError(
            f"slice positions do not lie on one line (up to {off_line:.2f} mm off); the "
            "folder may hold several stacks",
            fix="split the stacks into separate folders, or pass the files of one stack",
            path=items[0].path,
        )
    steps = np.diff(heights)
    median = float(np.median(steps))
    tol = max(_SPACING_REL_TOL * median, _SPACING_ABS_TOL_MM)
    gaps = np.flatnonzero(steps > GAP_FACTOR * median)
    uneven = bool(np.any(np.abs(steps - median) > tol))
    if not uneven:
        step = (positions[-1] - positions[0]) / (n - 1)
        return stack, positions[0], step, []

    if gaps.size:
        where = ", ".join(
            f"{steps[g]:.2f} mm after {items[g].path.name} (at {heights[g]:.2f} mm)" for g in gaps
        )
        issues.note(
            MissingSliceError,
            items[gaps[0] + 1].path,
            f"missing slice(s): gap of {where}; median spacing {median:.2f} mm",
            "re-export the complete series from the PACS, or read with strict=False to fill "
            "the gap by interpolation",
            "the gap is filled by linear interpolation",
        )
    non_gap = np.delete(steps, gaps)
    if non_gap.size and np.any(np.abs(non_gap - median) > tol):
        issues.note(
            NonUniformSpacingError,
            items[0].path,
            f"non-uniform slice spacing: steps from {steps.min():.3f} to {steps.max():.3f} mm "
            f"(median {median:.3f} mm)",
            "re-export the series, or read with strict=False to resample it",
            "resampled onto a uniform grid",
        )
    n_out = round(span / median) + 1
    n_missing = n_out - n
    if n_missing > _MAX_FILLED_FRACTION * n_out:
        raise MissingSliceError(
            f"{n_missing} of {n_out} slice positions are missing; too many to fill by "
            "interpolation",
            fix="re-export the complete series, or pass the files of one contiguous stack",
            path=items[0].path,
        )
    targets = heights[0] + np.arange(n_out) * (span / (n_out - 1))
    out = np.empty((n_out, *stack.shape[1:]), dtype=np.float32)
    interpolated: list[int] = []
    for j, t in enumerate(targets):
        hi = int(np.clip(np.searchsorted(heights, t), 1, n - 1))
        lo = hi - 1
        w = (t - heights[lo]) / (heights[hi] - heights[lo])
        if abs(w) * (heights[hi] - heights[lo]) < tol:
            out[j] = stack[lo]
        elif abs(1 - w) * (heights[hi] - heights[lo]) < tol:
            out[j] = stack[hi]
        else:
            out[j] = (1 - w) * stack[lo] + w * stack[hi]
            interpolated.append(j)
    step = (positions[-1] - positions[0]) / (n_out - 1)
    return out, positions[0], step, interpolated


def _metadata(items: list[_Slice]) -> dict[str, Any]:
    ds = items[0].ds
    fields = _header_fields(ds)
    info = SeriesInfo(series_instance_uid=_get_str(ds, "SeriesInstanceUID") or "", **fields)
    meta: dict[str, Any] = {
        k: (v.isoformat() if isinstance(v, date) else list(v) if isinstance(v, tuple) else v)
        for k, v in fields.items()
    }
    meta["sequence_class"] = classify_series(info).value
    meta["slice_thickness_mm"] = _get_float(ds, "SliceThickness")
    meta["transfer_syntax_uid"] = str(_transfer_syntax(ds))
    meta["source_files"] = [str(it.path) for it in items]
    return meta
