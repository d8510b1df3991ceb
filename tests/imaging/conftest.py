"""Synthetic DICOM MR series written with pydicom, for the imaging tests.

Tests get the factory through the ``dicom_factory`` fixture (a namespace of the functions and
presets below), since test folders are not packages.  Every series has a known expected
geometry (affine in LPS) and known pixel values, computed here independently of
`bmetrack.imaging`.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

# Sequence parameter presets: realistic header combinations of common spine protocols.
SIEMENS_T1 = {
    "description": "t1_tse_sag",
    "manufacturer": "SIEMENS",
    "tr": 600.0,
    "te": 11.0,
    "ti": None,
    "scanning_sequence": ["SE"],
    "sequence_variant": ["SK", "SP", "OSP"],
    "scan_options": ["PFP"],
    "field_t": 1.5,
}
SIEMENS_STIR = {
    "description": "t2_tirm_sag",
    "manufacturer": "SIEMENS",
    "tr": 4000.0,
    "te": 62.0,
    "ti": 160.0,
    "scanning_sequence": ["SE", "IR"],
    "sequence_variant": ["SK", "SP", "MP", "OSP"],
    "scan_options": ["IR"],
    "field_t": 1.5,
}
GE_STIR = {
    "description": "SAG STIR",
    "manufacturer": "GE MEDICAL SYSTEMS",
    "tr": 3500.0,
    "te": 42.0,
    "ti": 150.0,
    "scanning_sequence": ["SE", "IR"],
    "sequence_variant": ["SK", "OSP"],
    "scan_options": ["FAST_GEMS", "IR_GEMS"],
    "field_t": 1.5,
}
GE_T1 = {
    "description": "SAG T1 FSE",
    "manufacturer": "GE MEDICAL SYSTEMS",
    "tr": 550.0,
    "te": 9.5,
    "ti": None,
    "scanning_sequence": ["SE"],
    "sequence_variant": ["SK", "OSP"],
    "scan_options": ["FAST_GEMS"],
    "field_t": 1.5,
}
PHILIPS_T1 = {
    "description": "T1W_TSE",
    "manufacturer": "Philips Medical Systems",
    "tr": 500.0,
    "te": 8.0,
    "ti": None,
    "scanning_sequence": ["SE"],
    "sequence_variant": ["SK"],
    "scan_options": ["FS"],
    "field_t": 3.0,
}
PHILIPS_T2_SPAIR = {
    "description": "T2W_SPAIR",
    "manufacturer": "Philips Medical Systems",
    "tr": 3200.0,
    "te": 90.0,
    "ti": None,
    "scanning_sequence": ["SE"],
    "sequence_variant": ["SK"],
    "scan_options": ["FS"],
    "field_t": 3.0,
}
PRESETS = {
    "siemens_t1": SIEMENS_T1,
    "siemens_stir": SIEMENS_STIR,
    "ge_stir": GE_STIR,
    "ge_t1": GE_T1,
    "philips_t1": PHILIPS_T1,
    "philips_t2_spair": PHILIPS_T2_SPAIR,
}

# Sagittal: columns run posterior (+y), rows run inferior (-z); normal = row x col = -x.
SAGITTAL = ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0))
AXIAL = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
CORONAL = ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0))


def raw_pixels(k: int, rows: int, cols: int) -> np.ndarray:
    """Stored value of slice k (true order): 100 + 50 k + 3 i + j, uint16, unique per slice."""
    i, j = np.mgrid[0:rows, 0:cols]
    return (100 + 50 * k + 3 * i + j).astype(np.uint16)


def make_dataset(
    *,
    pixels: np.ndarray,
    position: Sequence[float] | None,
    orientation: Sequence[Sequence[float]] | None = SAGITTAL,
    pixel_spacing: Sequence[float] | None = (0.9, 0.8),
    slice_thickness: float = 4.0,
    series_uid: str,
    study_uid: str,
    instance_number: int = 1,
    params: dict[str, Any] | None = None,
    modality: str = "MR",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "M", "NORM"),
    rescale: tuple[float, float] | None = None,
    patient_id: str = "PAT001",
    study_date: str = "20240115",
    series_number: int = 3,
) -> FileDataset:
    """One single-frame MR (or CT) image with a realistic header."""
    params = dict(SIEMENS_STIR if params is None else params)
    sop_class = MRImageStorage if modality == "MR" else CTImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = "Test^Patient"
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.Modality = modality
    ds.Manufacturer = params.get("manufacturer", "")
    ds.MagneticFieldStrength = params.get("field_t", 1.5)
    ds.SeriesDescription = params.get("description", "")
    ds.ProtocolName = params.get("description", "")
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.ImageType = list(image_type)
    if modality == "MR":
        ds.ScanningSequence = params.get("scanning_sequence", ["SE"])
        ds.SequenceVariant = params.get("sequence_variant", ["NONE"])
        ds.ScanOptions = params.get("scan_options", [""])
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = params["tr"]
        ds.EchoTime = params["te"]
        if params.get("ti") is not None:
            ds.InversionTime = params["ti"]
        ds.FlipAngle = 150
    ds.SliceThickness = slice_thickness
    if orientation is not None:
        ds.ImageOrientationPatient = [float(v) for v in (*orientation[0], *orientation[1])]
    if position is not None:
        ds.ImagePositionPatient = [float(v) for v in position]
    if pixel_spacing is not None:
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
    if rescale is not None:
        ds.RescaleSlope = rescale[0]
        ds.RescaleIntercept = rescale[1]
    pixels = np.ascontiguousarray(pixels, dtype=np.uint16)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    return ds


def save(ds: FileDataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@dataclass
class SyntheticSeries:
    """A written series and what a correct reader must return."""

    folder: Path
    paths: list[Path]  # in true slice order
    positions: np.ndarray  # (n, 3) IPP of each slice, true order
    affine: np.ndarray  # expected 4x4 LPS affine, axes (slice, row, column)
    values: np.ndarray  # expected array after rescale, (n, rows, cols)
    series_uid: str
    study_uid: str
    datasets: list[FileDataset] = field(default_factory=list)


def write_series(
    folder: Path,
    *,
    n_slices: int = 6,
    rows: int = 10,
    cols: int = 8,
    orientation: Sequence[Sequence[float]] = SAGITTAL,
    pixel_spacing: tuple[float, float] = (0.9, 0.8),
    slice_spacing_mm: float = 4.0,
    slice_step: Sequence[float] | None = None,
    origin: Sequence[float] = (12.0, -60.0, 80.0),
    params: dict[str, Any] | None = None,
    modality: str = "MR",
    rescale: tuple[float, float] | None = (2.0, -5.0),
    seed: int = 0,
    series_uid: str | None = None,
    study_uid: str | None = None,
    series_number: int = 3,
    extension: str = "",
    skip: Sequence[int] = (),
    write: bool = True,
    transfer_syntax: str | None = None,
) -> SyntheticSeries:
    """Write a series with shuffled file names and shuffled InstanceNumbers.

    Slice k sits at ``origin + k * step`` where ``step`` is ``slice_step`` or the unit normal
    (row x column cosines) times ``slice_spacing_mm``.  Slices listed in ``skip`` are not
    written (their expected values are still in ``values``).  File names are random hex
    without extension (or with ``extension``); InstanceNumbers are a random permutation, so a
    reader that sorts by either gets the order wrong.
    """
    rng = np.random.default_rng(seed)
    row_dir = np.asarray(orientation[0], dtype=float)
    col_dir = np.asarray(orientation[1], dtype=float)
    row_dir /= np.linalg.norm(row_dir)
    col_dir /= np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)
    step = normal * slice_spacing_mm if slice_step is None else np.asarray(slice_step, dtype=float)
    origin_arr = np.asarray(origin, dtype=float)
    positions = origin_arr + np.arange(n_slices)[:, None] * step
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    affine = np.eye(4)
    affine[:3, 0] = step
    affine[:3, 1] = col_dir * pixel_spacing[0]
    affine[:3, 2] = row_dir * pixel_spacing[1]
    affine[:3, 3] = origin_arr
    slope, intercept = rescale if rescale is not None else (1.0, 0.0)
    raws = [raw_pixels(k, rows, cols) for k in range(n_slices)]
    values = np.stack([r.astype(np.float64) * slope + intercept for r in raws])
    instance_numbers = rng.permutation(n_slices) + 1
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    datasets: list[FileDataset] = []
    for k in range(n_slices):
        ds = make_dataset(
            pixels=raws[k],
            position=positions[k],
            orientation=(row_dir, col_dir),
            pixel_spacing=pixel_spacing,
            slice_thickness=slice_spacing_mm * 0.9,  # deliberately not the spacing
            series_uid=series_uid,
            study_uid=study_uid,
            instance_number=int(instance_numbers[k]),
            params=params,
            modality=modality,
            rescale=rescale,
            series_number=series_number,
        )
        if transfer_syntax is not None:
            ds.compress(transfer_syntax)
        name = f"{rng.integers(0, 2**48):012x}{extension}"
        path = folder / name
        paths.append(path)
        datasets.append(ds)
        if write and k not in skip:
            save(ds, path)
    return SyntheticSeries(
        folder=folder,
        paths=paths,
        positions=positions,
        affine=affine,
        values=values,
        series_uid=series_uid,
        study_uid=study_uid,
        datasets=datasets,
    )


@pytest.fixture
def dicom_factory() -> types.SimpleNamespace:
    """The synthetic-DICOM helpers of this conftest, as a namespace."""
    return types.SimpleNamespace(
        write_series=write_series,
        make_dataset=make_dataset,
        save=save,
        raw_pixels=raw_pixels,
        SAGITTAL=SAGITTAL,
        AXIAL=AXIAL,
        CORONAL=CORONAL,
        PRESETS=PRESETS,
        **{name.upper(): preset for name, preset in PRESETS.items()},
    )
