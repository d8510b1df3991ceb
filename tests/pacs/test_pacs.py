"""PACS: PS3.15 de-identification on arrival; pull with DICOMweb and DIMSE (C-MOVE and C-GET)
from a real Orthanc (the ``orthanc`` fixture of conftest.py), filed by import_dicom; STOW-RS of
a SEG back into Orthanc."""

from __future__ import annotations

import datetime as dt
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from sqlalchemy import select

from bmetrack.pacs.deidentify import (
    BASIC_PROFILE_EMPTY,
    BASIC_PROFILE_REMOVE,
    Deidentifier,
    deidentify_dataset,
    remap_uid,
)
from bmetrack.pacs.dimse import find_studies, parse_dimse_address
from bmetrack.simulate.phantom import PhantomParameters, make_phantom
from bmetrack.study import db
from bmetrack.study.db import session_scope
from bmetrack.study.importers import import_tables
from bmetrack.study.models import ImagingSession, Patient, Visit

PARAMS = PhantomParameters(n_rows=128, n_columns=128, pixel_spacing_mm=2.4, sacrum_in_view=True)
PROCEDURE = dt.date(2021, 3, 1)
# Original PACS identity -> pseudonym; study date offset from the procedure (days).
PATIENTS = {"MRN-0001": ("P1", "Doe^Jane", 92), "MRN-0002": ("P2", "Roe^Richard", -2)}
PSEUDONYMS = {mrn: code for mrn, (code, _, _) in PATIENTS.items()}
EXPECTED_MONTH = {"P1": 3, "P2": 0}


# --- de-identification (no server) ------------------------------------------------------------


def _identified_instance() -> Dataset:
    """An MR instance carrying every kind of identifying data of the basic profile."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage: a well-known UID
    ds.SOPInstanceUID = "1.2.3.4.5.6.7.1"
    ds.StudyInstanceUID = "1.2.3.4.5.6"
    ds.SeriesInstanceUID = "1.2.3.4.5.6.7"
    ds.FrameOfReferenceUID = "1.2.3.4.5.6.99"
    ds.Modality = "MR"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "MRN-0001"
    ds.PatientBirthDate = "19500102"
    ds.PatientSex = "F"
    ds.PatientAge = "071Y"
    ds.PatientAddress = "1 Main Street"
    ds.OtherPatientIDs = "X-99"
    ds.InstitutionName = "General Hospital"
    ds.InstitutionAddress = "Hospital Road"
    ds.ReferringPhysicianName = "Who^Doctor"
    ds.PerformingPhysicianName = "House^Gregory"
    ds.OperatorsName = "Tech^Tina"
    ds.AccessionNumber = "ACC123"
    ds.StudyID = "S1"
    ds.StationName = "MR1"
    ds.DeviceSerialNumber = "SN42"
    ds.ImageComments = "patient anxious"
    ds.StudyDate = "20210601"
    ds.SeriesDescription = "SAG STIR"
    ds.ProtocolName = "Doe spine"  # names the patient: must be emptied
    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = "1.2.3.4.5.6.7.2"
    ds.ReferencedImageSequence = DicomSequence([ref])
    ds.add_new(0x00091010, "LO", "private secret")
    ds.add_new(0x60003000, "OW", b"\x00\x01" * 4)
    ds.Rows, ds.Columns = 4, 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.arange(16, dtype=np.uint16).tobytes()
    return ds


def test_basic_profile_attributes_are_removed_or_replaced():
    original = _identified_instance()
    out = deidentify_dataset(original, "P1", uid_secret="s3cret")
    present = [kw for kw in BASIC_PROFILE_REMOVE + BASIC_PROFILE_EMPTY if kw in original]
    assert len(present) >= 15  # the test covers a real share of the table
    for keyword in present:
        assert keyword not in out or out[keyword].value in ("", None, []), keyword
    # Nothing of the identity survives anywhere in the written file.
    text = repr(out)
    for secret in ("Doe", "Jane", "MRN-0001", "General Hospital", "ACC123", "1950", "X-99"):
        assert secret not in text, secret
    assert out.PatientID == "P1"
    assert out.PatientName == ""
    assert out.PatientIdentityRemoved == "YES"
    codes = {item.CodeValue for item in out.DeidentificationMethodCodeSequence}
    assert codes == {"113100", "113105", "113106"}  # basic, clean descriptors, full dates
    assert all(i.CodingSchemeDesignator == "DCM" for i in out.DeidentificationMethodCodeSequence)
    assert out.DeidentificationMethod
    assert not any(elem.tag.is_private for elem in out)
    assert 0x60003000 not in out
    # Clean descriptors: kept unless they name the patient; dates kept (Full Dates option).
    assert out.SeriesDescription == "SAG STIR"
    assert out.ProtocolName == ""
    assert out.StudyDate == "20210601"
    # Pixel data and the input are untouched.
    assert out.PixelData == original.PixelData
    assert original.PatientName == "Doe^Jane"


def test_uids_are_remapped_consistently_and_relations_hold():
    a = _identified_instance()
    b = _identified_instance()
    b.SOPInstanceUID = "1.2.3.4.5.6.7.2"  # the instance a references
    out_a = deidentify_dataset(a, "P1", uid_secret="k")
    out_b = deidentify_dataset(b, "P1", uid_secret="k")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert out_a[keyword].value == out_b[keyword].value != a[keyword].value
        assert out_a[keyword].value.startswith("2.25.")
    assert out_a.SOPInstanceUID != out_b.SOPInstanceUID
    assert out_a.ReferencedImageSequence[0].ReferencedSOPInstanceUID == out_b.SOPInstanceUID
    assert out_a.SOPClassUID == a.SOPClassUID  # well-known UIDs are kept
    assert out_a.ReferencedImageSequence[0].ReferencedSOPClassUID == a.SOPClassUID
    # Another secret gives other UIDs; the same one the same (re-pulls match).
    assert remap_uid("1.2.3", "k") == remap_uid("1.2.3", "k") != remap_uid("1.2.3", "j")
    assert len(remap_uid("1.2.3", "k")) <= 64


def test_date_offset_shifts_dates_and_declares_modified_dates():
    out = deidentify_dataset(_identified_instance(), "P1", uid_secret="k", date_offset_days=-10)
    assert out.StudyDate == "20210522"  # 2021-06-01 minus 10 days
    assert "113107" in {item.CodeValue for item in out.DeidentificationMethodCodeSequence}


def test_unmapped_patient_is_not_written(tmp_path):
    store = Deidentifier(tmp_path, {"OTHER": "P9"}, uid_secret="k")
    assert store.store(_identified_instance()) is None
    assert store.unmapped == {"MRN-0001": 1}
    assert "MRN-0001" in store.unmapped_message()
    assert not list(tmp_path.rglob("*.dcm"))
    mapped = Deidentifier(tmp_path, PSEUDONYMS, uid_secret="k")
    path = mapped.store(_identified_instance())
    assert path is not None
    read = pydicom.dcmread(path)
    assert read.PatientID == "P1"
    assert read.file_meta.MediaStorageSOPInstanceUID == read.SOPInstanceUID


def test_dimse_address_is_parsed_and_checked():
    assert parse_dimse_address("pacs.local:104:PACS") == ("pacs.local", 104, "PACS")
    with pytest.raises(ValueError, match="HOST:PORT:AET"):
        parse_dimse_address("pacs:PACS")


# --- against a real Orthanc -------------------------------------------------------------------


@pytest.fixture(scope="module")
def pacs_studies(orthanc, tmp_path_factory):
    """Two phantom MR studies (two patients, identified) uploaded to Orthanc."""
    import requests

    root = tmp_path_factory.mktemp("originals")
    originals: dict[str, dict[str, object]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, (mrn, (code, name, days)) in enumerate(PATIENTS.items()):
            phantom = make_phantom(PARAMS, seed=41 + i)
            date = PROCEDURE + dt.timedelta(days=days)
            phantom.write_dicom(
                root / code,
                patient_id=mrn,
                patient_name=name,
                study_date=date.strftime("%Y%m%d"),
                accession_number=f"ACC{i}",
            )
            files = sorted(f for f in (root / code).rglob("*") if f.is_file())
            headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
            originals[mrn] = {
                "files": files,
                "study_uid": headers[0].StudyInstanceUID,
                "series_uids": {h.SeriesInstanceUID for h in headers},
                "sop_uids": {h.SOPInstanceUID for h in headers},
            }
            for path in files:
                response = requests.post(
                    f"{orthanc['base']}/instances", data=path.read_bytes(), timeout=10
                )
                response.raise_for_status()
    return originals


def _study_db(path: Path):
    engine = db.make_engine(path)
    db.upgrade(engine)
    codes = [code for code, _, _ in PATIENTS.values()]
    frames = {
        "patients": pd.DataFrame({"patient_code": codes, "sex": ["F", "M"]}),
        "procedures": pd.DataFrame(
            {
                "patient_code": codes,
                "procedure_date": [PROCEDURE] * 2,
                "procedure_type": ["vertebroplasty"] * 2,
                "level": ["L1", "L2"],
            }
        ),
    }
    import_tables(engine, "S", frames, "test")
    return engine


def _check_pulled(engine, out_folder: Path, pacs_studies, filed) -> None:
    """De-identified, complete, and filed to the right patient and visit."""
    files = sorted(out_folder.rglob("*.dcm"))
    expected_n = sum(len(study["sop_uids"]) for study in pacs_studies.values())
    assert len(files) == expected_n  # complete: every instance of both studies
    original_uids = set().union(
        *({s["study_uid"]} | s["series_uids"] | s["sop_uids"] for s in pacs_studies.values())
    )
    studies_by_code: dict[str, set[str]] = {}
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.PatientID in {"P1", "P2"}
        assert not ds.get("PatientName")
        assert ds.PatientIdentityRemoved == "YES"
        assert not ds.get("AccessionNumber")
        assert "MRN" not in repr(ds) and "Doe" not in repr(ds) and "Roe" not in repr(ds)
        uids = {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
        assert not uids & original_uids  # remapped
        studies_by_code.setdefault(ds.PatientID, set()).add(ds.StudyInstanceUID)
    assert {k: len(v) for k, v in studies_by_code.items()} == {"P1": 1, "P2": 1}
    assert len(filed.by_status("created")) == 2, filed.summary()
    with session_scope(engine) as session:
        rows = session.execute(
            select(Patient.code, Visit.nominal_month, ImagingSession.study_instance_uid)
            .join(Visit, ImagingSession.visit_id == Visit.id)
            .join(Patient, Visit.patient_id == Patient.id)
        ).all()
    assert {code: month for code, month, _ in rows} == EXPECTED_MONTH
    assert {code: {uid} for code, _, uid in rows} == studies_by_code


@pytest.mark.slow
def test_pull_with_dicomweb_deidentifies_and_files(orthanc, pacs_studies, tmp_path):
    from bmetrack.pacs.pull import pull_study

    engine = _study_db(tmp_path / "web.db")
    out = tmp_path / "pulled"
    pulled, filed = pull_study(
        engine,
        "S",
        out,
        actor="test",
        dicomweb=orthanc["dicomweb"],
        pseudonym_map=PSEUDONYMS,
        dates=(PROCEDURE - dt.timedelta(days=30), PROCEDURE + dt.timedelta(days=200)),
        uid_secret="k",
    )
    assert len(pulled.studies) == 2, pulled.summary()
    _check_pulled(engine, out, pacs_studies, filed)
    # A date range that excludes P1's 3-month study fetches only P2's.
    again = tmp_path / "early"
    narrow, _ = pull_study(
        _study_db(tmp_path / "early.db"),
        "S",
        again,
        actor="test",
        dicomweb=orthanc["dicomweb"],
        pseudonym_map=PSEUDONYMS,
        dates=(PROCEDURE - dt.timedelta(days=30), PROCEDURE + dt.timedelta(days=30)),
    )
    assert narrow.studies == [pacs_studies["MRN-0002"]["study_uid"]]


@pytest.mark.slow
def test_pull_with_dimse_find_and_move_to_our_listener(orthanc, pacs_studies, tmp_path):
    from bmetrack.pacs.pull import pull_study

    engine = _study_db(tmp_path / "dimse.db")
    out = tmp_path / "moved"
    pulled, filed = pull_study(
        engine,
        "S",
        out,
        actor="test",
        dimse=orthanc["dimse"],
        pseudonym_map=PSEUDONYMS,
        uid_secret="k",
        listen_port=orthanc["our_port"],
    )
    assert sorted(pulled.studies) == sorted(s["study_uid"] for s in pacs_studies.values())
    _check_pulled(engine, out, pacs_studies, filed)
    # C-FIND honours the date range: P1's 3-month study lies outside the first month.
    early = (PROCEDURE - dt.timedelta(days=30), PROCEDURE + dt.timedelta(days=30))
    host, port, aet = parse_dimse_address(orthanc["dimse"])
    assert find_studies(host, port, aet, "MRN-0001", dates=early) == []
    assert find_studies(host, port, aet, "MRN-0002", dates=early) == [
        pacs_studies["MRN-0002"]["study_uid"]
    ]


@pytest.mark.slow
def test_pull_with_dimse_c_get_needs_no_receiver(orthanc, pacs_studies, tmp_path):
    from bmetrack.pacs.pull import pull_study

    engine = _study_db(tmp_path / "get.db")
    out = tmp_path / "got"
    # Nothing listens on our port: every instance must come back on our own association.
    pulled, filed = pull_study(
        engine,
        "S",
        out,
        actor="test",
        dimse=orthanc["dimse"],
        pseudonym_map=PSEUDONYMS,
        uid_secret="k",
        retrieve="get",
    )
    assert sorted(pulled.studies) == sorted(s["study_uid"] for s in pacs_studies.values())
    assert pulled.warnings == []
    _check_pulled(engine, out, pacs_studies, filed)
    # The same secret gives the same de-identified UIDs as a C-MOVE or DICOMweb pull would.
    original = pacs_studies["MRN-0001"]["study_uid"]
    uids = {pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID for f in pulled.files}
    assert remap_uid(original, "k") in uids


def test_retrieve_choice_is_checked():
    from bmetrack.pacs.dimse import Retrieve, parse_retrieve
    from bmetrack.pacs.pull import pull_study

    assert parse_retrieve("GET") is Retrieve.GET
    with pytest.raises(ValueError, match="'move' \\(C-MOVE\\) or 'get'"):
        parse_retrieve("fetch")
    with pytest.raises(ValueError, match="applies to dimse only"):
        pull_study(None, "S", "unused", actor="t", dicomweb="http://x", retrieve="get")  # type: ignore[arg-type]


@pytest.mark.slow
def test_cli_pull_with_c_get(orthanc, pacs_studies, tmp_path):
    from typer.testing import CliRunner

    from bmetrack.cli import app

    engine = _study_db(tmp_path / "cli-get.db")
    mapping = tmp_path / "map.csv"
    rows = "".join(f"{mrn},{code}\n" for mrn, code in PSEUDONYMS.items())
    mapping.write_text("dicom_patient_id,patient_code\n" + rows)
    args = ["pull", "--study", "S", "--dimse", orthanc["dimse"], "--retrieve", "get"]
    args += ["--db", str(tmp_path / "cli-get.db"), "--pseudonym-map", str(mapping)]
    args += ["--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "fetched 2 studies" in result.output
    with session_scope(engine) as session:
        assert len(session.scalars(select(ImagingSession)).all()) == 2
    bad = CliRunner().invoke(app, [*args[:5], "--retrieve", "fetch", *args[7:]])
    assert bad.exit_code == 2
    assert "'move' (C-MOVE) or 'get'" in bad.output


@pytest.mark.slow
def test_listener_deidentifies_and_files_what_the_pacs_sends(orthanc, pacs_studies, tmp_path):
    import requests

    from bmetrack.pacs.dimse import Listener
    from bmetrack.study.dicom_import import import_dicom

    engine = _study_db(tmp_path / "listen.db")
    reports = []

    def file_study(folder: Path, files: list[Path]) -> None:
        reports.append(import_dicom(engine, "S", folder, actor="listener"))

    out = tmp_path / "received"
    study_ids = requests.get(f"{orthanc['base']}/studies", timeout=10).json()
    assert len(study_ids) == 2
    with Listener(
        orthanc["our_port"], "BMETRACK", out, pseudonym_map=PSEUDONYMS, on_study=file_study
    ) as listener:
        response = requests.post(
            f"{orthanc['base']}/modalities/bmetrack/store",
            json={"Resources": study_ids, "Synchronous": True},
            timeout=60,
        )
        response.raise_for_status()
        deadline = time.monotonic() + 10
        while not reports and time.monotonic() < deadline:
            time.sleep(0.1)  # the association is released just after the last C-STORE
    assert listener.unmapped == {}
    created = [o for report in reports for o in report.by_status("created")]
    assert sorted(o.patient_code for o in created) == ["P1", "P2"]
    assert {o.patient_code: o.nominal_month for o in created} == EXPECTED_MONTH
    n_sent = len(requests.get(f"{orthanc['base']}/instances", timeout=10).json())
    assert len(listener.files) == n_sent == sum(len(s["sop_uids"]) for s in pacs_studies.values())
    assert all(pydicom.dcmread(f).PatientID in {"P1", "P2"} for f in listener.files)


@pytest.mark.slow
def test_cli_pull_files_with_a_pseudonym_csv(orthanc, pacs_studies, tmp_path):
    from typer.testing import CliRunner

    from bmetrack.cli import app

    engine = _study_db(tmp_path / "cli.db")
    mapping = tmp_path / "map.csv"
    rows = "".join(f"{mrn},{code}\n" for mrn, code in PSEUDONYMS.items())
    mapping.write_text("dicom_patient_id,patient_code\n" + rows)
    args = ["pull", "--study", "S", "--dicomweb", orthanc["dicomweb"], "--db"]
    args += [str(tmp_path / "cli.db"), "--pseudonym-map", str(mapping)]
    args += ["--out", str(tmp_path / "out"), "--from", "2021-01-01", "--to", "2021-12-31"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "fetched 2 studies" in result.output
    with session_scope(engine) as session:
        assert len(session.scalars(select(ImagingSession)).all()) == 2
    bad = CliRunner().invoke(app, ["pull", "--study", "S", "--db", str(tmp_path / "cli.db")])
    assert bad.exit_code == 2
    assert "exactly one source" in bad.output


@pytest.mark.slow
def test_stow_pushes_a_segmentation_of_pulled_images_back(orthanc, pacs_studies, tmp_path):
    # Last of the file: the other tests count the instances of the uploaded studies.
    from dicomweb_client.api import DICOMwebClient

    from bmetrack.imaging.dicom import read_series
    from bmetrack.imaging.dicom_export import export_segmentation
    from bmetrack.pacs.deidentify import restore_uids, reverse_uid_map
    from bmetrack.pacs.dicomweb import pull_dicomweb, push_stow

    original = pacs_studies["MRN-0001"]
    pulled = pull_dicomweb(
        orthanc["dicomweb"],
        ["MRN-0001"],
        out_folder=tmp_path,
        pseudonym_map=PSEUDONYMS,
        uid_secret="k",
    )
    assert len(pulled.files) == len(original["sop_uids"])
    series = [read_series(folder) for folder in {f.parent for f in pulled.files}]
    stir = next(v for v in series if v.metadata["sequence_class"] == "stir")
    sources = [pydicom.dcmread(f) for f in stir.metadata["source_files"]]
    labels = np.asarray(make_phantom(PARAMS, seed=41).labels.array)  # P1's anatomy
    assert labels.shape[0] == len(sources)
    seg = export_segmentation(sources, labels, {}, {})
    assert seg.PatientID == "P1"
    assert seg.StudyInstanceUID != original["study_uid"]  # made from de-identified data
    reverse = reverse_uid_map(
        {original["study_uid"]} | original["series_uids"] | original["sop_uids"], "k"
    )
    restored = restore_uids(seg, reverse, patient_id="MRN-0001", patient_name="Doe^Jane")
    response = push_stow(orthanc["dicomweb"], [restored])
    assert len(response.ReferencedSOPSequence) == 1
    assert not response.get("FailedSOPSequence")  # present but empty in Orthanc
    back = DICOMwebClient(orthanc["dicomweb"]).retrieve_instance(
        original["study_uid"], restored.SeriesInstanceUID, restored.SOPInstanceUID
    )
    assert back.Modality == "SEG"
    assert back.PatientID == "MRN-0001"
    referenced = back.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID in original["series_uids"]
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} <= (
        original["sop_uids"]
    )
    assert len(back.SegmentSequence) == len(np.unique(labels[labels > 0]))
    # Orthanc filed it in the patient's original study.
    studies = DICOMwebClient(orthanc["dicomweb"]).search_for_studies(
        search_filters={"PatientID": "MRN-0001"}
    )
    assert [s["0020000D"]["Value"][0] for s in studies] == [original["study_uid"]]
