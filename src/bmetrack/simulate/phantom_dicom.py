"""Write a `Phantom` as two DICOM series (sagittal STIR and T1) with vendor-style MR headers.

Single-frame MR Image Storage files, Explicit VR Little Endian, uint16 pixels with
RescaleSlope/RescaleIntercept reproducing the phantom's (already quantised) values.  File names
are random hex strings (as many PACS exports), so readers must sort by geometry.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

from bmetrack.imaging.volume import Volume

if TYPE_CHECKING:
    from bmetrack.simulate.phantom import Phantom

__all__ = ["MR_IMAGE_STORAGE", "write_phantom_dicom"]

#: SOP Class UID of MR Image Storage.
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"

_VENDOR = {
    "siemens": ("SIEMENS", ["Avanto", "Aera", "Skyra", "Espree"], "syngo MR E11", 12),
    "ge": ("GE MEDICAL SYSTEMS", ["SIGNA HDxt", "DISCOVERY MR750", "SIGNA Explorer"], "27", 16),
    "philips": ("Philips Medical Systems", ["Ingenia", "Achieva", "Intera"], "5.3.1", 12),
}


def _uid(seed: int, *parts: object) -> str:
    """Deterministic UID (2.25 form) from the phantom seed and a path of names."""
    return str(
        generate_uid(prefix=None, entropy_srcs=["bmetrack-phantom", str(seed), *map(str, parts)])
    )


def write_phantom_dicom(
    phantom: Phantom,
    folder: str | Path,
    *,
    patient_id: str | None = None,
    patient_name: str | None = None,
    study_date: _dt.date | str | None = None,
    study_instance_uid: str | None = None,
    accession_number: str | None = None,
    series_number_start: int = 3,
) -> dict[str, Path]:
    """Write ``folder/stir`` and ``folder/t1`` as single-frame MR DICOM series.

    Parameters
    ----------
    phantom : Phantom
        The study to write.
    folder : str or Path
        Output folder (created); the two series go into its ``stir`` and ``t1`` subfolders.
    patient_id, patient_name : str, optional
        Default ``PHANTOM<seed>`` and ``Phantom^<seed>``.
    study_date : date or "YYYYMMDD", optional
        Default 2024-01-15 plus ``acquisition_seed`` weeks (deterministic).
    study_instance_uid : str, optional
        Default deterministic from seed and acquisition seed.
    accession_number : str, optional
    series_number_start : int
        SeriesNumber of the first series written (STIR); T1 gets the next number.

    Returns
    -------
    dict
        ``{"stir": Path, "t1": Path}`` of the series folders.
    """
    out = Path(folder)
    seed = phantom.seed
    acq_seed = phantom.params.acquisition_seed
    rng = np.random.default_rng([seed, 505, acq_seed])
    if study_date is None:
        date = _dt.date(2024, 1, 15) + _dt.timedelta(weeks=int(acq_seed))
    elif isinstance(study_date, str):
        date = _dt.datetime.strptime(study_date, "%Y%m%d").date()
    else:
        date = study_date
    header = phantom.header
    vendor = header["vendor"]
    manufacturer, models, software, bits = _VENDOR[vendor]
    study = {
        "PatientID": patient_id or f"PHANTOM{seed}",
        "PatientName": patient_name or f"Phantom^{seed}",
        "PatientBirthDate": f"{1930 + int(rng.integers(0, 30))}0101",
        "PatientSex": str(rng.choice(["F", "M"], p=[0.7, 0.3])),
        "StudyInstanceUID": study_instance_uid or _uid(seed, acq_seed, "study"),
        "StudyDate": date.strftime("%Y%m%d"),
        "StudyTime": f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}00",
        "AccessionNumber": accession_number or f"A{seed % 100000:05d}{acq_seed:03d}",
        "StudyDescription": "MRI LUMBAR SPINE" if rng.random() < 0.7 else "MR WERVELKOLOM",
        "ReferringPhysicianName": "",
        "StudyID": str(int(rng.integers(1000, 99999))),
        "Manufacturer": manufacturer,
        "ManufacturerModelName": str(rng.choice(models)),
        "SoftwareVersions": software,
        "MagneticFieldStrength": float(header["field_strength_t"]),
        "InstitutionName": "Synthetic Hospital",
        "StationName": f"MR{int(rng.integers(1, 9))}",
        "FrameOfReferenceUID": _uid(seed, acq_seed, "frame"),
        "BodyPartExamined": "LSPINE",
        "PatientPosition": "HFS",
    }
    paths = {}
    for n, (name, volume) in enumerate((("stir", phantom.stir), ("t1", phantom.t1))):
        seq = header["sequence"][name]
        series_dir = out / name
        series_dir.mkdir(parents=True, exist_ok=True)
        _write_series(
            volume,
            series_dir,
            study=study,
            sequence=seq,
            slope=float(header["slope"][name]),
            intercept=float(header["intercept"][name]),
            bits_stored=bits,
            thickness=float(header["thickness_mm"][name]),
            series_uid=_uid(seed, acq_seed, name),
            series_number=series_number_start + n,
            seed_parts=(seed, acq_seed, name),
            rng=rng,
        )
        paths[name] = series_dir
    return paths


def _write_series(
    volume: Volume,
    folder: Path,
    *,
    study: dict[str, Any],
    sequence: dict[str, Any],
    slope: float,
    intercept: float,
    bits_stored: int,
    thickness: float,
    series_uid: str,
    series_number: int,
    seed_parts: tuple[object, ...],
    rng: np.random.Generator,
) -> None:
    affine = volume.affine
    n_k, n_r, n_c = volume.shape
    step = affine[:3, 0]
    row_vec = affine[:3, 2] / np.linalg.norm(affine[:3, 2])  # along a row (column index)
    col_vec = affine[:3, 1] / np.linalg.norm(affine[:3, 1])  # down a column (row index)
    normal = np.cross(row_vec, col_vec)
    spacing_rc = (float(np.linalg.norm(affine[:3, 1])), float(np.linalg.norm(affine[:3, 2])))
    stored = np.rint((volume.array.astype(np.float64) - intercept) / slope)
    max_value = 2**bits_stored - 1
    stored = np.clip(stored, 0, max_value).astype(np.uint16)
    window_hi = float(np.percentile(stored, 99.5)) * slope + intercept
    # Acquisition order: along the normal, sometimes right-to-left; InstanceNumber follows it.
    order = list(range(n_k))
    if rng.random() < 0.5:
        order.reverse()
    series_time = study["StudyTime"][:2] + f"{int(rng.integers(0, 60)):02d}" + "30"
    for instance, k in enumerate(order, start=1):
        sop_uid = str(
            generate_uid(prefix=None, entropy_srcs=[*map(str, seed_parts), str(k), "sop"])
        )
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(MR_IMAGE_STORAGE)
        meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        name = f"{int(rng.integers(0, 2**48)):012X}"
        ds = FileDataset(str(folder / name), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.SOPClassUID = MR_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        for key, value in study.items():
            setattr(ds, key, value)
        ds.Modality = "MR"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDate = study["StudyDate"]
        ds.SeriesTime = series_time
        ds.AcquisitionDate = study["StudyDate"]
        ds.SeriesDescription = sequence["SeriesDescription"]
        ds.ProtocolName = sequence["SeriesDescription"]
        ds.ScanningSequence = list(sequence["ScanningSequence"])
        ds.SequenceVariant = list(sequence["SequenceVariant"])
        if sequence.get("ScanOptions"):
            ds.ScanOptions = list(sequence["ScanOptions"])
        ds.SequenceName = sequence["SequenceName"]
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = sequence["RepetitionTime"]
        ds.EchoTime = sequence["EchoTime"]
        if "InversionTime" in sequence:
            ds.InversionTime = sequence["InversionTime"]
        ds.EchoTrainLength = sequence["EchoTrainLength"]
        ds.FlipAngle = sequence["FlipAngle"]
        ds.NumberOfAverages = 2 if "InversionTime" in sequence else 1
        ds.ImagingFrequency = round(42.577478 * float(study["MagneticFieldStrength"]), 6)
        ds.ImagedNucleus = "1H"
        ds.ReceiveCoilName = "Spine" if study["Manufacturer"] != "SIEMENS" else "SP"
        ds.PixelBandwidth = 190.0
        ds.SliceThickness = round(thickness, 4)
        ds.SpacingBetweenSlices = round(float(np.linalg.norm(step)), 4)
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = instance
        position = affine[:3, 3] + step * k
        ds.ImagePositionPatient = [round(float(p), 6) for p in position]
        ds.ImageOrientationPatient = [round(float(p), 8) for p in (*row_vec, *col_vec)]
        ds.SliceLocation = round(float(position @ normal), 6)
        ds.PositionReferenceIndicator = ""
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = n_r
        ds.Columns = n_c
        ds.PixelSpacing = [round(spacing_rc[0], 8), round(spacing_rc[1], 8)]
        ds.BitsAllocated = 16
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleSlope = f"{slope:.10g}"
        ds.RescaleType = "US"
        ds.WindowCenter = round(window_hi / 2, 1)
        ds.WindowWidth = round(window_hi, 1)
        ds.PixelData = stored[k].tobytes()
        ds.save_as(folder / name, enforce_file_format=True)
