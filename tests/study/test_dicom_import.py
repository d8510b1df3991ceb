"""DICOM import: studies filed to the right patient and visit, all-or-nothing, robustness."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from sqlalchemy import Engine, func, select

from bmetrack.imaging.dicom import scan_folder
from bmetrack.study import dicom_import
from bmetrack.study.db import session_scope
from bmetrack.study.dicom_import import (
    DicomImportError,
    StudyStatus,
    import_dicom,
    read_pseudonym_map,
)
from bmetrack.study.importers import import_tables
from bmetrack.study.models import (
    AuditEvent,
    ClinicalAssessment,
    ImagingSession,
    Patient,
    Procedure,
    Visit,
    WindowStatus,
)
from bmetrack.study.records import RecordNotFoundError, ValidationError

ACTOR = "radiographer"
STUDY = "VERTOS"

# ---------------------------------------------------------------- synthetic DICOM (copied from
# tests/imaging/conftest.py, trimmed: fixtures of another folder's conftest are not visible)
STIR = {
    "description": "t2_tirm_sag",
    "tr": 4000.0,
    "te": 62.0,
    "ti": 160.0,
    "scanning_sequence": ["SE", "IR"],
}
T1 = {"description": "t1_tse_sag", "tr": 600.0, "te": 11.0, "ti": None, "scanning_sequence": ["SE"]}
T2 = {
    "description": "t2_tse_tra",
    "tr": 3200.0,
    "te": 90.0,
    "ti": None,
    "scanning_sequence": ["SE"],
}
LOCALIZER = {
    "description": "localizer",
    "tr": 8.6,
    "te": 4.0,
    "ti": None,
    "scanning_sequence": ["GR"],
}
SAGITTAL = ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0))
AXIAL = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
CORONAL = ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0))


def make_dataset(
    *,
    position: Sequence[float],
    orientation: Sequence[Sequence[float]],
    series_uid: str,
    study_uid: str,
    patient_id: str,
    study_date: str,
    params: dict[str, Any],
    modality: str = "MR",
    series_number: int = 1,
    instance_number: int = 1,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "M", "NORM"),
    rows: int = 12,
    cols: int = 10,
) -> FileDataset:
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
    ds.PatientID = patient_id
    ds.PatientName = "Test^Patient"
    ds.StudyDate = study_date
    ds.Modality = modality
    ds.SeriesDescription = params["description"]
    ds.ProtocolName = params["description"]
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.ImageType = list(image_type)
    if modality == "MR":
        ds.ScanningSequence = params["scanning_sequence"]
        ds.RepetitionTime = params["tr"]
        ds.EchoTime = params["te"]
        if params.get("ti") is not None:
            ds.InversionTime = params["ti"]
    ds.ImageOrientationPatient = [float(v) for v in (*orientation[0], *orientation[1])]
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.PixelSpacing = [0.9, 0.8]
    ds.SliceThickness = 4.0
    pixels = (np.arange(rows * cols).reshape(rows, cols) + 7 * instance_number).astype(np.uint16)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    return ds


def write_series(
    folder: Path,
    *,
    study_uid: str,
    patient_id: str,
    study_date: str,
    params: dict[str, Any],
    n_slices: int,
    orientation: Sequence[Sequence[float]] = SAGITTAL,
    modality: str = "MR",
    series_number: int = 1,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "M", "NORM"),
) -> tuple[str, list[Path]]:
    """Write a series (file names without extension); return its UID and files."""
    series_uid = generate_uid()
    normal = np.cross(orientation[0], orientation[1])
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n_slices):
        ds = make_dataset(
            position=np.array([12.0, -60.0, 80.0]) + 4.0 * k * normal,
            orientation=orientation,
            series_uid=series_uid,
            study_uid=study_uid,
            patient_id=patient_id,
            study_date=study_date,
            params=params,
            modality=modality,
            series_number=series_number,
            instance_number=k + 1,
            image_type=image_type,
        )
        path = folder / f"IM{series_number:02d}{k:03d}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return series_uid, paths


@dataclass
class ExportStudy:
    study_uid: str
    patient_id: str
    study_date: str
    stir: str | None = None
    t1: str | None = None
    others: dict[str, str] | None = None  # name -> series uid


def write_mr_study(
    folder: Path,
    patient_id: str,
    study_date: str,
    *,
    stir: bool = True,
    t1: bool = True,
    extras: bool = False,
) -> ExportStudy:
    """A spine MR study: STIR (6 slices) + T1 (5), with extras a localizer, an axial T2,
    a shorter second STIR and a truncated STIR file."""
    study = ExportStudy(generate_uid(), patient_id, study_date, others={})
    common = {"study_uid": study.study_uid, "patient_id": patient_id, "study_date": study_date}
    if stir:
        study.stir, paths = write_series(
            folder / "stir", params=STIR, n_slices=6, series_number=3, **common
        )
        if extras:  # a truncated copy of a slice (new SOP instance), in the STIR folder
            ds = pydicom.dcmread(paths[0])
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(folder / "stir" / "truncated", enforce_file_format=True)
            data = (folder / "stir" / "truncated").read_bytes()
            (folder / "stir" / "truncated").write_bytes(data[: len(data) - 100])
    if t1:
        study.t1, _ = write_series(folder / "t1", params=T1, n_slices=5, series_number=4, **common)
    if extras:
        assert study.others is not None
        study.others["localizer"], _ = write_series(
            folder / "loc",
            params=LOCALIZER,
            n_slices=3,
            series_number=1,
            image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
            **common,
        )
        study.others["axial_t2"], _ = write_series(
            folder / "ax", params=T2, n_slices=3, orientation=AXIAL, series_number=5, **common
        )
        study.others["stir_short"], _ = write_series(
            folder / "stir2", params=STIR, n_slices=4, series_number=6, **common
        )
    return study


@dataclass
class Export:
    root: Path
    p1_m0: ExportStudy
    p1_m3: ExportStudy
    p2_m0: ExportStudy
    p2_m3: ExportStudy
    ct: ExportStudy


def write_export(root: Path, ids: tuple[str, str] = ("P001", "P002")) -> Export:
    """Two patients, two MR visits each, a CT study, junk files, a DICOMDIR."""
    p1, p2 = ids
    export = Export(
        root=root,
        p1_m0=write_mr_study(root / "A" / "1", p1, "20200108", extras=True),
        p1_m3=write_mr_study(root / "A" / "2", p1, "20200414"),
        p2_m0=write_mr_study(root / "B" / "1", p2, "20200130"),
        p2_m3=write_mr_study(root / "B" / "2", p2, "20200505", stir=False),
        ct=ExportStudy(generate_uid(), p1, "20200106", others={}),
    )
    assert export.ct.others is not None
    export.ct.others["ct"], _ = write_series(
        root / "C",
        study_uid=export.ct.study_uid,
        patient_id=p1,
        study_date="20200106",
        params={"description": "CT spine"},
        n_slices=2,
        orientation=AXIAL,
        modality="CT",
    )
    (root / "notes.txt").write_text("exported by PACS\n")
    (root / "A" / "DICOMDIR").write_bytes(b"\x00" * 40 + b"not really a DICOMDIR")
    shutil.copy(get_testdata_file("DICOMDIR"), root / "DICOMDIR")
    return export


# ---------------------------------------------------------------- database


def cohort() -> dict[str, pd.DataFrame]:
    """P001: PV 2020-01-10, clinical visits 2020-01-05 (month 0) and 2020-04-10 (month 3).
    P002: PV 2020-02-01, no visits yet. P003: PV 2020-03-01. P100: PV 2003-05-01 (for the
    MR studies of pydicom's test files, dated 2003-05-05)."""
    patients = pd.DataFrame(
        [["P001", "F", "1940"], ["P002", "M", "1935"], ["P003", "U", ""], ["P100", "F", ""]],
        columns=["patient_code", "sex", "birth_year"],
    )
    procedures = pd.DataFrame(
        [
            ["P001", "2020-01-10", "vertebroplasty", "T12", "3.5"],
            ["P002", "2020-02-01", "vertebroplasty", "L1", "4"],
            ["P003", "2020-03-01", "vertebroplasty", "T11", ""],
            ["P100", "2003-05-01", "vertebroplasty", "L2", ""],
        ],
        columns=["patient_code", "procedure_date", "procedure_type", "level", "cement_volume_ml"],
    )
    clinical = pd.DataFrame(
        [["P001", "2020-01-05", "9"], ["P001", "2020-04-10", "2"]],
        columns=["patient_code", "visit_date", "vas"],
    )
    return {"patients": patients, "procedures": procedures, "clinical": clinical}


@pytest.fixture
def study_engine(engine: Engine) -> Engine:
    import_tables(engine, STUDY, cohort(), actor="setup")
    return engine


TABLES = (Patient, Procedure, Visit, ClinicalAssessment, ImagingSession, AuditEvent)


def snapshot(engine: Engine) -> dict[str, Any]:
    """Row counts, visits, imaging sessions and the whole audit log."""
    with engine.connect() as connection:
        counts = {
            model.__tablename__: connection.execute(
                select(func.count()).select_from(model)
            ).scalar_one()
            for model in TABLES
        }
        visits = connection.execute(select(Visit.__table__).order_by(Visit.id)).all()
        sessions = connection.execute(
            select(ImagingSession.__table__).order_by(ImagingSession.id)
        ).all()
        audit = connection.execute(
            select(
                AuditEvent.id,
                AuditEvent.action,
                AuditEvent.entity,
                AuditEvent.entity_id,
                AuditEvent.field,
                AuditEvent.new_value,
            ).order_by(AuditEvent.id)
        ).all()
    return {
        "counts": counts,
        "visits": [tuple(r) for r in visits],
        "sessions": [tuple(r) for r in sessions],
        "audit": [tuple(r) for r in audit],
    }


def stored_sessions(engine: Engine) -> dict[str, tuple[Any, ...]]:
    """study uid -> (patient code, visit date, nominal month, window status, stir, t1, date)."""
    with session_scope(engine) as session:
        rows = session.execute(
            select(ImagingSession, Visit, Patient)
            .join(Visit, ImagingSession.visit_id == Visit.id)
            .join(Patient, Visit.patient_id == Patient.id)
        ).all()
        return {
            s.study_instance_uid: (
                p.code,
                v.visit_date,
                v.nominal_month,
                v.window_status,
                s.stir_series_uid,
                s.t1_series_uid,
                s.acquisition_date,
            )
            for s, v, p in rows
        }


# ---------------------------------------------------------------- tests


def test_pacs_export_filed_to_patients_and_visits(study_engine: Engine, tmp_path: Path) -> None:
    export = write_export(tmp_path / "export")
    before = snapshot(study_engine)
    report = import_dicom(study_engine, STUDY, export.root, actor=ACTOR)
    assert report.written

    # Visit windows by hand: P001 PV 2020-01-10 -> 2020-01-08 is day -2 (baseline),
    # 2020-04-14 is day 21 + 29 + 31 + 14 = 95 (month 3 = day 91 +- 30). P002 PV 2020-02-01 ->
    # 2020-01-30 is day -2, 2020-05-05 is day 29 + 31 + 30 + 4 = 94.
    stored = stored_sessions(study_engine)
    d = dt.date
    assert stored == {
        export.p1_m0.study_uid: (
            "P001", d(2020, 1, 5), 0, WindowStatus.BASELINE, export.p1_m0.stir, export.p1_m0.t1,
            d(2020, 1, 8),
        ),
        export.p1_m3.study_uid: (
            "P001", d(2020, 4, 10), 3, WindowStatus.IN_WINDOW, export.p1_m3.stir,
            export.p1_m3.t1, d(2020, 4, 14),
        ),
        export.p2_m0.study_uid: (
            "P002", d(2020, 1, 30), 0, WindowStatus.BASELINE, export.p2_m0.stir,
            export.p2_m0.t1, d(2020, 1, 30),
        ),
        export.p2_m3.study_uid: (
            "P002", d(2020, 5, 5), 3, WindowStatus.IN_WINDOW, None, export.p2_m3.t1,
            d(2020, 5, 5),
        ),
    }  # fmt: skip

    # P001 reused its two clinical visits; P002 got two new visits without assessment.
    out = {s.study_instance_uid: s for s in report.studies}
    assert out[export.p1_m0.study_uid].visit == "reused"
    assert out[export.p1_m3.study_uid].visit == "reused"
    assert out[export.p1_m3.study_uid].days_from_procedure == 91  # the reused visit's own
    assert out[export.p2_m0.study_uid].visit == "created"
    assert out[export.p2_m3.study_uid].days_from_procedure == 94
    assert out[export.p2_m0.study_uid].days_from_procedure == -2
    after = snapshot(study_engine)
    assert after["counts"]["visit"] == before["counts"]["visit"] + 2
    assert after["counts"]["clinical_assessment"] == before["counts"]["clinical_assessment"]
    assert after["counts"]["imaging_session"] == 4

    # Warnings: several STIR candidates (most slices chosen), a missing STIR.
    p1_warnings = " ".join(out[export.p1_m0.study_uid].warnings)
    assert "2 sagittal STIR series" in p1_warnings
    assert export.p1_m0.others is not None
    assert export.p1_m0.others["stir_short"] in p1_warnings
    assert "1 file(s) of the STIR series were rejected" in p1_warnings
    assert any(
        "cannot be quantified until a STIR series" in w
        for w in out[export.p2_m3.study_uid].warnings
    )
    assert out[export.p2_m3.study_uid].stir_series_uid is None

    # The CT study has nothing to file; series skipped with reasons.
    assert out[export.ct.study_uid].status is StudyStatus.SKIPPED
    assert "no sagittal STIR or T1" in out[export.ct.study_uid].reason
    skipped = {n.series_instance_uid: n.reason for n in report.skipped_series}
    others = export.p1_m0.others
    assert skipped[others["localizer"]].startswith("localizer")
    assert "axial series, not sagittal" in skipped[others["axial_t2"]]
    assert "another sagittal STIR series was chosen" in skipped[others["stir_short"]]
    assert export.ct.others is not None
    assert skipped[export.ct.others["ct"]] == "modality CT, not MR"

    # Files: truncated, text and fake DICOMDIR rejected; the real DICOMDIR skipped.
    rejected = {f.path.relative_to(export.root).as_posix(): f.reason for f in report.rejected_files}
    assert set(rejected) == {"A/1/stir/truncated", "notes.txt", "A/DICOMDIR"}
    assert rejected["A/1/stir/truncated"].startswith("truncated")
    assert "not a DICOM file" in rejected["notes.txt"]
    assert [f.path.name for f in report.skipped_files] == ["DICOMDIR"]
    assert "DICOMDIR" in report.skipped_files[0].reason

    counts = report.counts
    assert counts["studies"] == 5 and counts["studies_created"] == 4
    assert counts["studies_skipped"] == 1 and counts["studies_rejected"] == 0
    assert counts["visits_created"] == 2 and counts["visits_reused"] == 2
    assert counts["series_used"] == 7 and counts["series_skipped"] == 4
    # 6+1+5+3+3+4 / 6+5 / 6+5 / 5 / 2 image files + 3 rejected + 1 skipped
    assert counts["files"] == 21 + 11 + 11 + 5 + 2 + 4

    # source_path: the study's folder under the scanned root, not a file list
    assert out[export.p1_m0.study_uid].source_path == str((export.root / "A" / "1").resolve())
    summary = report.summary()
    assert "4 filed" in summary and "P002 2020-05-05 month 3" in summary
    assert "A/1/stir/truncated" in summary
    json.dumps(report.to_dict())  # JSON-safe


def test_audit_events_for_every_created_row(study_engine: Engine, tmp_path: Path) -> None:
    export = write_export(tmp_path / "export")
    n_before = snapshot(study_engine)["counts"]["audit_event"]
    import_dicom(study_engine, STUDY, export.root, actor=ACTOR)
    with session_scope(study_engine) as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.actor == ACTOR)).all()
        session_ids = set(session.scalars(select(ImagingSession.id)).all())
        p2_visits = set(
            session.scalars(select(Visit.id).join(Patient).where(Patient.code == "P002")).all()
        )
    created = {(e.entity, e.entity_id) for e in events if e.action == "create"}
    assert created == {("imaging_session", i) for i in session_ids} | {
        ("visit", i) for i in p2_visits
    }
    assert len(events) == len(created) == 6
    assert snapshot(study_engine)["counts"]["audit_event"] == n_before + 6
    event = next(e for e in events if e.entity == "imaging_session")
    values = json.loads(event.new_value or "{}")
    assert values["study_instance_uid"] and values["acquisition_date"]
    assert event.reason == "DICOM import"


def test_reimport_is_unchanged(study_engine: Engine, tmp_path: Path) -> None:
    export = write_export(tmp_path / "export")
    import_dicom(study_engine, STUDY, export.root, actor=ACTOR)
    first = snapshot(study_engine)
    report = import_dicom(study_engine, STUDY, export.root, actor=ACTOR)
    assert snapshot(study_engine) == first
    assert report.counts["studies_unchanged"] == 4 and report.counts["studies_created"] == 0
    assert report.counts["visits_created"] == 0
    out = report.study(export.p2_m3.study_uid)
    assert (out.patient_code, out.nominal_month, out.t1_series_uid) == (
        "P002",
        3,
        export.p2_m3.t1,
    )


def test_override_changes_series_with_audit(study_engine: Engine, tmp_path: Path) -> None:
    export = write_export(tmp_path / "export")
    import_dicom(study_engine, STUDY, export.root, actor=ACTOR)
    assert export.p1_m0.others is not None
    short = export.p1_m0.others["stir_short"]
    # the longer STIR was chosen; marking it "other" makes the shorter one the STIR
    report = import_dicom(
        study_engine,
        STUDY,
        export.root,
        actor="reader",
        sequence_overrides={export.p1_m0.stir or "": "other"},
    )
    out = report.study(export.p1_m0.study_uid)
    assert out.status is StudyStatus.UPDATED
    assert out.stir_series_uid == short
    assert stored_sessions(study_engine)[export.p1_m0.study_uid][4] == short
    with session_scope(study_engine) as session:
        (event,) = session.scalars(select(AuditEvent).where(AuditEvent.actor == "reader")).all()
    assert (event.action, event.entity, event.field) == (
        "update",
        "imaging_session",
        "stir_series_uid",
    )
    assert (event.old_value, event.new_value) == (export.p1_m0.stir, short)
    with pytest.raises(ValueError, match="must be one of stir, t1, t2, other; got 'flair'"):
        import_dicom(
            study_engine, STUDY, export.root, actor=ACTOR, sequence_overrides={short: "flair"}
        )


def test_unknown_patient_rejected_with_fix(study_engine: Engine, tmp_path: Path) -> None:
    root = tmp_path / "export"
    known = write_mr_study(root / "1", "P003", "20200301")
    stranger = write_mr_study(root / "2", "HOSP-999", "20200301")
    before = snapshot(study_engine)
    report = import_dicom(study_engine, STUDY, root, actor=ACTOR)
    out = report.study(stranger.study_uid)
    assert out.status is StudyStatus.REJECTED and out.patient_code is None
    assert "'HOSP-999' is not a patient code of study VERTOS" in out.reason
    assert "pseudonym map" in out.reason and "import the patient first" in out.reason
    assert report.study(known.study_uid).status is StudyStatus.CREATED
    with session_scope(study_engine) as session:
        codes = set(session.scalars(select(Patient.code)).all())
    assert codes == {"P001", "P002", "P003", "P100"}  # no patient created
    assert not report.ok and len(report.problems) == 1
    assert "HOSP-999" in str(report.problems[0])

    # strict: the same rejection aborts everything
    with pytest.raises(DicomImportError) as info:
        import_dicom(study_engine, STUDY, root, actor=ACTOR, strict=True)
    assert "'HOSP-999' is not a patient code" in str(info.value)
    assert info.value.report.written is False
    after_strict = snapshot(study_engine)
    report2 = import_dicom(study_engine, STUDY, root, actor=ACTOR, dry_run=True)
    assert snapshot(study_engine) == after_strict
    assert after_strict["counts"]["imaging_session"] == before["counts"]["imaging_session"] + 1
    assert report2.study(known.study_uid).status is StudyStatus.UNCHANGED


def test_strict_aborts_on_rejected_file(study_engine: Engine, tmp_path: Path) -> None:
    root = tmp_path / "export"
    write_mr_study(root, "P003", "20200301")
    (root / "readme.txt").write_text("junk")
    before = snapshot(study_engine)
    with pytest.raises(DicomImportError, match=r"readme\.txt"):
        import_dicom(study_engine, STUDY, root, actor=ACTOR, strict=True)
    assert snapshot(study_engine) == before
    (root / "readme.txt").unlink()
    report = import_dicom(study_engine, STUDY, root, actor=ACTOR, strict=True)
    assert report.counts["studies_created"] == 1 and report.ok


def test_pseudonym_map_csv(study_engine: Engine, tmp_path: Path) -> None:
    export = write_export(tmp_path / "export", ids=("HOSP123", "HOSP456"))
    mapping = tmp_path / "map.csv"
    mapping.write_text("# pseudonyms\ndicom_patient_id;patient_code\nHOSP123;P001\n")
    report = import_dicom(study_engine, STUDY, export.root, actor=ACTOR, pseudonym_map=mapping)
    assert report.study(export.p1_m0.study_uid).patient_code == "P001"
    p2 = report.study(export.p2_m0.study_uid)
    assert p2.status is StudyStatus.REJECTED
    assert (
        "PatientID 'HOSP456' is not in the pseudonym map; add a row 'HOSP456,<patient code>'"
        in (p2.reason)
    )
    mapping.write_text("dicom_patient_id,patient_code\nHOSP123,P001\nHOSP456,P002\n")
    report = import_dicom(study_engine, STUDY, export.root, actor=ACTOR, pseudonym_map=mapping)
    assert report.counts["studies_created"] == 2 and report.counts["studies_unchanged"] == 2
    assert {v[0] for v in stored_sessions(study_engine).values()} == {"P001", "P002"}
    # a mapped code that is not a patient of the study
    report = import_dicom(
        study_engine, STUDY, export.root, actor=ACTOR, pseudonym_map={"HOSP123": "P999"}
    )
    assert "patient code 'P999', which is not a patient of study VERTOS" in (
        report.study(export.p1_m0.study_uid).reason
    )


def test_pseudonym_map_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("patient,code\nA,P001\n")
    with pytest.raises(ValidationError, match="lacks column"):
        read_pseudonym_map(bad)
    bad.write_text("dicom_patient_id,patient_code\nA,P001\nA,P002\n,P003\n")
    with pytest.raises(ValidationError) as info:
        read_pseudonym_map(bad)
    assert len(info.value.problems) == 2
    assert "already mapped to 'P001'" in str(info.value) and "line 4" in str(info.value)
    with pytest.raises(FileNotFoundError):
        read_pseudonym_map(tmp_path / "none.csv")
    assert read_pseudonym_map({" A ": "P001"}) == {"A": "P001"}


def test_study_already_filed_under_another_patient(study_engine: Engine, tmp_path: Path) -> None:
    root = tmp_path / "export"
    study = write_mr_study(root, "P001", "20200108")
    import_dicom(study_engine, STUDY, root, actor=ACTOR)
    report = import_dicom(study_engine, STUDY, root, actor=ACTOR, pseudonym_map={"P001": "P002"})
    out = report.study(study.study_uid)
    assert out.status is StudyStatus.REJECTED
    assert "already filed under patient P001" in out.reason
    assert stored_sessions(study_engine)[study.study_uid][0] == "P001"


def test_outside_window_kept_and_flagged(study_engine: Engine, tmp_path: Path) -> None:
    root = tmp_path / "export"
    # P002 PV 2020-02-01; 2020-06-05 is day 29 + 31 + 30 + 31 + 4 = 125: after month 3's
    # window (91 + 30 = 121), before month 6's (183 - 45 = 138).
    late = write_mr_study(root / "late", "P002", "20200605")
    # 2019-07-01 is 31 + 31 + 30 + 31 + 30 + 31 + 31 = 215 days before PV: beyond the
    # baseline limit (setting baseline_max_days_before_procedure, 180 days) -> rejected
    early = write_mr_study(root / "early", "P002", "20190701")
    report = import_dicom(study_engine, STUDY, root, actor=ACTOR)
    out = report.study(late.study_uid)
    assert out.status is StudyStatus.CREATED and out.visit == "created"
    assert (out.nominal_month, out.window_status, out.days_from_procedure) == (
        None,
        WindowStatus.OUTSIDE_WINDOW,
        125,
    )
    assert any("outside every visit window" in w for w in out.warnings)
    assert stored_sessions(study_engine)[late.study_uid][3] == WindowStatus.OUTSIDE_WINDOW
    rejected = report.study(early.study_uid)
    assert rejected.status is StudyStatus.REJECTED
    assert "215 days before the first procedure" in rejected.reason


def test_two_studies_same_window_share_a_new_visit(study_engine: Engine, tmp_path: Path) -> None:
    root = tmp_path / "export"
    a = write_mr_study(root / "a", "P003", "20200601")  # day 92 after 2020-03-01
    b = write_mr_study(root / "b", "P003", "20200605", stir=False)  # day 96, same window
    report = import_dicom(study_engine, STUDY, root, actor=ACTOR)
    assert report.study(a.study_uid).visit == "created"
    out_b = report.study(b.study_uid)
    assert out_b.visit == "reused" and out_b.visit_date == dt.date(2020, 6, 1)
    assert any("already has imaging" in w for w in out_b.warnings)
    assert report.counts["visits_created"] == 1


def test_dry_run_writes_nothing(study_engine: Engine, tmp_path: Path) -> None:
    export = write_export(tmp_path / "export")
    before = snapshot(study_engine)
    report = import_dicom(study_engine, STUDY, export.root, actor=ACTOR, dry_run=True)
    assert snapshot(study_engine) == before
    assert not report.written and report.counts["studies_created"] == 4
    assert report.study(export.p2_m0.study_uid).imaging_session_id is None
    assert "dry run, nothing written" in report.summary()


def test_failure_midway_leaves_database_unchanged(
    study_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    export = write_export(tmp_path / "export")
    before = snapshot(study_engine)
    real = dicom_import.add_imaging_session
    calls: list[int] = []

    def failing(*args: Any, **kwargs: Any) -> ImagingSession:
        calls.append(1)
        if len(calls) == 3:  # after two sessions and a created visit were flushed
            msg = "disk full"
            raise OSError(msg)
        return real(*args, **kwargs)

    monkeypatch.setattr(dicom_import, "add_imaging_session", failing)
    with pytest.raises(OSError, match="disk full"):
        import_dicom(study_engine, STUDY, export.root, actor=ACTOR)
    assert len(calls) == 3
    assert snapshot(study_engine) == before


def test_argument_errors(study_engine: Engine, tmp_path: Path) -> None:
    with pytest.raises(RecordNotFoundError):
        import_dicom(study_engine, "NOPE", tmp_path, actor=ACTOR)
    with pytest.raises(FileNotFoundError):
        import_dicom(study_engine, STUDY, tmp_path / "missing", actor=ACTOR)
    with pytest.raises(ValueError, match="actor"):
        import_dicom(study_engine, STUDY, tmp_path, actor=" ")


# ---------------------------------------------------------------- robustness


def _pydicom_folder(tmp_path: Path) -> tuple[Path, list[Path]]:
    files = [Path(f) for f in get_testdata_files() if Path(f).is_file()]
    folder = tmp_path / "pydicom"
    folder.mkdir()
    copies = [
        Path(shutil.copy(f, folder / (f"{n:03d}_{f.name}" if n % 2 else f"{n:03d}")))
        for n, f in enumerate(files)
    ]
    return folder, copies


def _every_file_accounted(report: dicom_import.DicomImportReport, copies: list[Path]) -> None:
    listed = {f.path for f in report.rejected_files} | {f.path for f in report.skipped_files}
    assert all(f.reason for f in [*report.rejected_files, *report.skipped_files])
    series_of = {
        p: info.series_instance_uid for info in scan_folder(copies[0].parent) for p in info.files
    }
    study_series = {uid for s in report.studies for uid in s.series_uids}
    rejected_series = {n.series_instance_uid for n in report.rejected_series}
    for path in copies:
        assert path in listed or series_of[path] in study_series | rejected_series, path
    for s in report.studies:
        if not s.filed:
            assert s.reason, s
        else:
            used = {s.stir_series_uid, s.t1_series_uid}
            noted = {n.series_instance_uid for n in report.skipped_series}
            assert set(s.series_uids) <= used | noted


def test_pydicom_test_files_never_crash(study_engine: Engine, tmp_path: Path) -> None:
    folder, copies = _pydicom_folder(tmp_path)
    assert len(copies) > 50
    before = snapshot(study_engine)
    report = import_dicom(study_engine, STUDY, folder, actor=ACTOR)
    _every_file_accounted(report, copies)
    assert report.studies and all(s.status is StudyStatus.REJECTED for s in report.studies)
    assert all(s.reason for s in report.studies)
    assert snapshot(study_engine) == before
    json.dumps(report.to_dict())
    with pytest.raises(DicomImportError):
        import_dicom(study_engine, STUDY, folder, actor=ACTOR, strict=True)
    assert snapshot(study_engine) == before

    # Every PatientID mapped to P100: real-world headers pass patient matching; none is a
    # sagittal STIR/T1 MR, so every study is skipped or rejected with a reason.
    scan = scan_folder(folder)
    pseudonyms = dict.fromkeys({info.patient_id for info in scan if info.patient_id}, "P100")
    report = import_dicom(study_engine, STUDY, folder, actor=ACTOR, pseudonym_map=pseudonyms)
    _every_file_accounted(report, copies)
    assert not any(s.filed for s in report.studies)
    assert report.by_status("skipped") and snapshot(study_engine) == before

    # Marking every sagittal MR series (GE localizers of 2003-05-05) as T1 files them: three
    # studies of that day share one new visit, 4 days after P100's PV (outside every window).
    overrides = {
        info.series_instance_uid: "t1"
        for info in scan
        if info.modality == "MR" and info.orientation.value == "sagittal"
    }
    assert overrides
    report = import_dicom(
        study_engine,
        STUDY,
        folder,
        actor=ACTOR,
        pseudonym_map=pseudonyms,
        sequence_overrides=overrides,
    )
    _every_file_accounted(report, copies)
    stored = stored_sessions(study_engine)
    filed = {s.study_instance_uid: s for s in report.studies if s.filed}
    assert len(filed) == 3 and set(stored) == set(filed)
    for uid, row in stored.items():
        assert row[:4] == ("P100", dt.date(2003, 5, 5), None, WindowStatus.OUTSIDE_WINDOW)
        assert (row[4], row[5]) == (None, filed[uid].t1_series_uid)
        assert row[5] in overrides
    assert report.counts["visits_created"] == 1 and report.counts["visits_reused"] == 2
    counts = report.counts
    assert counts["studies"] == sum(counts[f"studies_{s.value}"] for s in StudyStatus)
    # a second pass changes nothing
    again = snapshot(study_engine)
    import_dicom(
        study_engine,
        STUDY,
        folder,
        actor=ACTOR,
        pseudonym_map=pseudonyms,
        sequence_overrides=overrides,
    )
    assert snapshot(study_engine) == again
