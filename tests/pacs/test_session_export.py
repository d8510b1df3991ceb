"""export-dicom from the database: per measured imaging session a SEG + SR that carry the
values the analysis uses (overrides with author and reason), pushed to a real Orthanc and read
back; sessions whose images changed are refused; the CLI's two forms and their errors."""

from __future__ import annotations

import datetime as dt
import socket
import warnings

import highdicom as hd
import numpy as np
import pandas as pd
import pydicom
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from bmetrack.anatomy import label_from_level, level_from_label
from bmetrack.cli import app
from bmetrack.imaging.dicom import read_series
from bmetrack.imaging.dicom_export import read_measurement_report
from bmetrack.imaging.labelmaps import EXTERNAL_METHOD
from bmetrack.pacs.session_export import export_sessions
from bmetrack.pipeline import quantify_all
from bmetrack.simulate.images import DEMO_PHANTOM_PARAMETERS
from bmetrack.simulate.phantom import phantom_for_visit
from bmetrack.study import db
from bmetrack.study.db import session_scope
from bmetrack.study.dicom_import import import_dicom
from bmetrack.study.importers import import_tables
from bmetrack.study.models import ImagingSession, Patient, VertebraMeasurement, Visit
from bmetrack.study.records import override_measurement

PROCEDURE = dt.date(2021, 3, 1)
# patient, treated level, days from the procedure, month, phantom seed
VISITS = [("P1", "L1", -2, 0, 10), ("P2", "L2", 92, 3, 5)]
BME_OVERRIDE = {"bme_percent": 12.5, "genant_grade": 1}
READER = "dr.radiologist"
REASON = "edema overestimated at the endplate"
RELABEL_REASON = "levels counted from the wrong end"
MASK_SEGMENTS = {"Bone marrow edema", "Bone cement", "Peri-cement rim"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _new_study_db(path):
    engine = db.make_engine(path)
    db.upgrade(engine)
    codes = [code for code, *_ in VISITS]
    frames = {
        "patients": pd.DataFrame({"patient_code": codes, "sex": ["F", "M"]}),
        "procedures": pd.DataFrame(
            {
                "patient_code": codes,
                "procedure_date": [PROCEDURE] * 2,
                "procedure_type": ["vertebroplasty"] * 2,
                "level": [level for _, level, *_ in VISITS],
            }
        ),
    }
    import_tables(engine, "S", frames, "test")
    return engine


@pytest.fixture(scope="module")
def true_labels():
    """quantify_study segments with the phantoms' own label maps (registered here by STIR
    series UID): these tests are about the export, and must not depend on the built-in
    segmenter coping with a given phantom. Everything else (edema, cement, rim, heights) is
    measured from the images, so a changed image still changes the values."""
    import bmetrack.imaging.quantify as quantify_module

    real = quantify_module.quantify_study
    labels_by_uid = {}

    def with_true_labels(stir, t1, settings=None, **kwargs):
        kwargs.setdefault("labels", labels_by_uid.get(stir.series_instance_uid))
        return real(stir, t1, settings, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quantify_module, "quantify_study", with_true_labels)
        yield labels_by_uid


@pytest.fixture(scope="module")
def measured(tmp_path_factory, true_labels):
    """Two phantom studies filed by import-dicom and measured by quantify-all; P1's treated
    level overridden (BME and Genant grade), P2's top level relabelled."""
    root = tmp_path_factory.mktemp("measured")
    engine = _new_study_db(root / "study.db")
    folders = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for code, level, days, month, seed in VISITS:
            phantom = phantom_for_visit(
                [{"level": level, "bme_percent": 50.0, "cement_volume_ml": 3.0 * (month > 0)}],
                month,
                seed=seed,
                params=DEMO_PHANTOM_PARAMETERS,
            )
            date = PROCEDURE + dt.timedelta(days=days)
            folders[code] = phantom.write_dicom(
                root / "dicom" / code, patient_id=code, study_date=date.strftime("%Y%m%d")
            )
            stir_uid = read_series(folders[code]["stir"]).series_instance_uid
            true_labels[stir_uid] = phantom.labels
    filed = import_dicom(engine, "S", root / "dicom", actor="test")
    assert len(filed.by_status("created")) == 2, filed.summary()
    measuring = quantify_all(engine, "S")
    assert not measuring.failed, measuring.summary()
    with session_scope(engine) as session:
        methods = {
            row.settings_json["provenance"]["segmentation"]["method_version"]
            for row in session.scalars(select(VertebraMeasurement))
        }
        assert methods == {EXTERNAL_METHOD}  # the true label maps were used
        rows = session.execute(
            select(VertebraMeasurement, Patient.code)
            .join(Visit, VertebraMeasurement.visit_id == Visit.id)
            .join(Patient, Visit.patient_id == Patient.id)
        ).all()
        by_patient: dict[str, list[VertebraMeasurement]] = {}
        for row, code in rows:
            by_patient.setdefault(code, []).append(row)
        l1 = next(row for row in by_patient["P1"] if row.level == "L1")
        assert l1.bme_percent != BME_OVERRIDE["bme_percent"]
        override_measurement(session, l1.id, BME_OVERRIDE, actor=READER, reason=REASON)
        top = min(by_patient["P2"], key=lambda row: row.label)
        above = level_from_label(top.label - 1)
        override_measurement(session, top.id, {"level": above}, actor=READER, reason=RELABEL_REASON)
    return {"engine": engine, "root": root, "folders": folders, "relabelled": (top.level, above)}


def _sessions(engine):
    """Per patient: the session's UIDs and its rows, read with plain SQL (not the exporter)."""
    with session_scope(engine) as session:
        found = session.execute(
            select(ImagingSession, Patient.code, Visit.visit_date)
            .join(Visit, ImagingSession.visit_id == Visit.id)
            .join(Patient, Visit.patient_id == Patient.id)
        ).all()
        out = {}
        for imaging, code, date in found:
            rows = session.scalars(
                select(VertebraMeasurement).where(
                    VertebraMeasurement.imaging_session_id == imaging.id
                )
            ).all()
            out[code] = {
                "study_uid": imaging.study_instance_uid,
                "series": {imaging.stir_series_uid, imaging.t1_series_uid},
                "stir_uid": imaging.stir_series_uid,
                "source_path": imaging.source_path,
                "date": date.isoformat(),
                "current": {r.level: r for r in rows if r.superseded_by_id is None},
                "by_id": {r.id: r for r in rows},
            }
            session.expunge_all()
    return out


def _segment_masks(seg, stir_uids):
    numbers = [int(item.SegmentNumber) for item in seg.SegmentSequence]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=stir_uids, segment_numbers=numbers, combine_segments=False
    )
    return {
        str(item.SegmentLabel): pixels[..., i].astype(bool)
        for i, item in enumerate(seg.SegmentSequence)
    }


@pytest.mark.slow
def test_exported_sessions_read_back_from_orthanc(measured, orthanc, tmp_path):
    from dicomweb_client.api import DICOMwebClient

    engine = measured["engine"]
    report = export_sessions(engine, "S", tmp_path / "out", push_url=orthanc["dicomweb"])
    assert report.ok, report.summary()
    assert len(report.written) == 2
    sessions = _sessions(engine)
    client = DICOMwebClient(orthanc["dicomweb"])
    for entry in report.written:
        expected = sessions[entry.patient_code]
        folder = tmp_path / "out" / entry.patient_code / expected["date"]
        assert entry.paths == {"seg": folder / "seg.dcm", "sr": folder / "sr.dcm"}
        local = {kind: pydicom.dcmread(path) for kind, path in entry.paths.items()}
        assert entry.push is not None
        assert sorted(entry.push.stored) == sorted(ds.SOPInstanceUID for ds in local.values())
        back = {
            kind: client.retrieve_instance(
                expected["study_uid"], ds.SeriesInstanceUID, ds.SOPInstanceUID
            )
            for kind, ds in local.items()
        }
        seg, sr = back["seg"], back["sr"]
        assert (seg.Modality, sr.Modality) == ("SEG", "SR")
        assert seg.StudyInstanceUID == sr.StudyInstanceUID == expected["study_uid"]
        assert {s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence} == expected["series"]

        # SR: the effective values of the database, overrides with author, reason and the
        # automatic value they replaced.
        current = expected["current"]
        by_level = {v["level"]: v for v in read_measurement_report(sr)}
        assert set(by_level) == set(current)
        for level, row in current.items():
            got = by_level[level]
            assert got["bme_percent"] == pytest.approx(row.bme_percent, abs=1e-9), level
            assert got["genant_grade"] == row.genant_grade, level
            if row.source.value == "manual":
                automatic = expected["by_id"][row.supersedes_id]
                assert got["override"]["by"] == READER
                assert got["override"]["reason"] == row.override_reason
                changed = {
                    key: getattr(automatic, key)
                    for key in ("bme_percent", "bme_present", "genant_grade")
                    if getattr(automatic, key) != getattr(row, key)
                }
                if automatic.level != row.level:
                    changed["level"] = automatic.level
                assert got["override"]["automatic"] == pytest.approx(changed)
            else:
                assert "override" not in got
        evidence = {
            series.SeriesInstanceUID
            for item in sr.CurrentRequestedProcedureEvidenceSequence
            for series in item.ReferencedSeriesSequence
        }
        assert evidence == expected["series"] | {seg.SeriesInstanceUID}

        # SEG: one body segment per automatic level, the masks, on the session's STIR grid;
        # the body and edema voxel counts give back the stored automatic volumes.
        automatic_rows = [r for r in expected["by_id"].values() if r.source.value == "automatic"]
        labels = {str(item.SegmentLabel) for item in seg.SegmentSequence}
        assert labels == {f"{r.level} vertebral body" for r in automatic_rows} | MASK_SEGMENTS
        stir = read_series(expected["source_path"], series_uid=expected["stir_uid"])
        stir_uids = [
            pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
            for f in stir.metadata["source_files"]
        ]
        masks = _segment_masks(hd.seg.Segmentation.from_dataset(seg), stir_uids)
        for row in automatic_rows:
            body = masks[f"{row.level} vertebral body"]
            assert body.sum() * stir.voxel_volume_ml == pytest.approx(row.body_volume_ml, abs=6e-3)
            edema = body & masks["Bone marrow edema"]
            edema_ml = edema.sum() * stir.voxel_volume_ml
            assert edema_ml == pytest.approx(row.edema_volume_ml, abs=6e-3), row.level

    # The relabelled body: reported under its new level, still pointing at its own segment.
    old, new = measured["relabelled"]
    p2 = next(e for e in report.written if e.patient_code == "P2")
    sr_doc = hd.sr.srread(p2.paths["sr"])
    seg_doc = pydicom.dcmread(p2.paths["seg"])
    numbers = {str(s.SegmentLabel): int(s.SegmentNumber) for s in seg_doc.SegmentSequence}
    group = next(
        g
        for g in sr_doc.content.get_volumetric_roi_measurement_groups()
        if str(g.tracking_identifier) == f"{new} vertebral body"
    )
    assert group.referenced_segment.referenced_segment_numbers == [numbers[f"{old} vertebral body"]]
    assert label_from_level(new) == label_from_level(old) - 1


@pytest.mark.slow
def test_changed_images_are_refused_and_push_failures_reported(measured, tmp_path):
    engine = measured["engine"]
    sessions = _sessions(engine)
    # Brighten one STIR slice of P2's filed study (as a re-sent or edited file would).
    stir = read_series(sessions["P2"]["source_path"], series_uid=sessions["P2"]["stir_uid"])
    files = stir.metadata["source_files"]
    altered = pydicom.dcmread(files[len(files) // 2])
    pixels = altered.pixel_array
    brighter = np.clip(pixels * 1.3, 0, np.iinfo(pixels.dtype).max).astype(pixels.dtype)
    altered.PixelData = brighter.tobytes()
    altered.save_as(files[len(files) // 2])

    dead = f"http://127.0.0.1:{_free_port()}/dicom-web"  # nothing listens there
    out = tmp_path / "out"
    report = export_sessions(engine, "S", out, push_url=dead)
    assert not report.ok
    (refused,) = report.refused
    assert refused.patient_code == "P2"
    assert "re-measured values differ from the stored automatic values" in refused.message
    assert "images changed" in refused.message
    assert refused.paths == {} and refused.push is None
    assert not (out / "P2").exists()  # nothing written for it
    (written,) = report.written  # the other session goes on
    assert written.patient_code == "P1" and written.paths["sr"].is_file()
    assert report.push_failed == [written]
    assert written.push is not None and "ConnectionError" in written.push.error
    summary = report.summary()
    assert "1 refused" in summary and "push to" in summary and "failed" in summary


@pytest.mark.slow
def test_cli_export_dicom_database_and_folder_forms(measured, orthanc, tmp_path):
    uid = _sessions(measured["engine"])["P1"]["study_uid"]
    database = str(measured["root"] / "study.db")
    db_out = str(tmp_path / "db")
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["export-dicom", "--db", database, "--study", "S", "--session", uid, "--out", db_out],
    )
    assert result.exit_code == 0, result.output
    assert "1 imaging sessions exported" in result.output
    assert sorted(p.name for p in (tmp_path / "db" / "P1").rglob("*.dcm")) == ["seg.dcm", "sr.dcm"]
    assert not (tmp_path / "db" / "P2").exists()

    folders = measured["folders"]["P1"]
    args = ["export-dicom", "--stir", str(folders["stir"]), "--t1", str(folders["t1"])]
    result = runner.invoke(
        app, [*args, "--out", str(tmp_path / "folder"), "--push", orthanc["dicomweb"]]
    )
    assert result.exit_code == 0, result.output
    assert "pushed 2 objects" in result.output
    sop = pydicom.dcmread(tmp_path / "folder" / "sr.dcm").SOPInstanceUID
    import requests

    found = requests.post(
        f"{orthanc['base']}/tools/find",
        json={"Level": "Instance", "Query": {"SOPInstanceUID": sop}},
        timeout=10,
    ).json()
    assert len(found) == 1


def test_cli_export_dicom_wrong_option_combinations(tmp_path):
    _new_study_db(tmp_path / "s.db")
    runner = CliRunner()
    out = ["--out", str(tmp_path / "out")]
    cases = {
        # folder options with the database form
        ("--stir", "a", "--study", "S"): "--stir (folder form) cannot be combined with --study",
        # neither form
        (): "give --stir and --t1",
        # only half of the folder form
        ("--stir", "a"): "give --stir and --t1",
        # database options without --study
        ("--session", "1.2.3", "--stir", "a", "--t1", "b"): "(database form) need --study",
        # a session that is not in the study
        ("--db", str(tmp_path / "s.db"), "--study", "S", "--session", "1.2.3"): "1.2.3",
    }
    for args, message in cases.items():
        result = runner.invoke(app, ["export-dicom", *args, *out])
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_export_from_postgresql(measured, postgres_database, tmp_path):
    """The same export against a real PostgreSQL: P1's study filed, measured, exported."""
    engine = _new_study_db(postgres_database())
    filed = import_dicom(engine, "S", measured["root"] / "dicom" / "P1", actor="test")
    assert len(filed.by_status("created")) == 1, filed.summary()
    assert not quantify_all(engine, "S").failed
    report = export_sessions(engine, "S", tmp_path)
    assert report.ok, report.summary()
    (entry,) = report.written
    stored = _sessions(engine)["P1"]["current"]
    back = {v["level"]: v["bme_percent"] for v in read_measurement_report(entry.paths["sr"])}
    assert back == pytest.approx({level: row.bme_percent for level, row in stored.items()})
    engine.dispose()
