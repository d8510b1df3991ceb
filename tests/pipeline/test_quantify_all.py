"""quantify-all: DICOM filed by import-dicom, measured, stored with provenance; failures
are reported and retried, never half-stored; a rerun skips what is done."""

import datetime as dt
import warnings

import pandas as pd
import pytest
from sqlalchemy import func, select

import bmetrack.imaging.quantify as quantify_module
from bmetrack.pipeline import pending_sessions, quantify_all
from bmetrack.simulate.images import DEMO_PHANTOM_PARAMETERS
from bmetrack.simulate.phantom import phantom_for_visit
from bmetrack.study import db
from bmetrack.study.db import session_scope
from bmetrack.study.dicom_import import import_dicom
from bmetrack.study.importers import import_tables
from bmetrack.study.models import AuditEvent, VertebraMeasurement

STUDIES = [  # patient, days after the procedure, month, treated-level BME
    ("P1", 0, 0, 60.0),
    ("P1", 91, 3, 20.0),
    ("P2", 2, 0, 45.0),
]
PROCEDURE = dt.date(2020, 1, 10)


@pytest.fixture(scope="module")
def filed(tmp_path_factory):
    """A migrated database with two patients and three filed DICOM studies."""
    root = tmp_path_factory.mktemp("pipeline")
    engine = db.make_engine(root / "study.db")
    db.upgrade(engine)
    frames = {
        "patients": pd.DataFrame({"patient_code": ["P1", "P2"], "sex": ["F", "M"]}),
        "procedures": pd.DataFrame(
            {
                "patient_code": ["P1", "P2"],
                "procedure_date": [PROCEDURE, PROCEDURE],
                "procedure_type": ["vertebroplasty"] * 2,
                "level": ["L1", "L2"],
            }
        ),
    }
    import_tables(engine, "S", frames, "test")
    labels_by_uid = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, (code, days, month, bme) in enumerate(STUDIES):
            level = "L1" if code == "P1" else "L2"
            cement = 0.0 if month == 0 else 3.0
            phantom = phantom_for_visit(
                [{"level": level, "bme_percent": bme, "cement_volume_ml": cement}],
                month,
                seed=100 + (code == "P2"),
                params=DEMO_PHANTOM_PARAMETERS,
            )
            date = PROCEDURE + dt.timedelta(days=days)
            paths = phantom.write_dicom(
                root / "dicom" / f"{i}", patient_id=code, study_date=date.strftime("%Y%m%d")
            )
            from bmetrack.imaging.dicom import read_series

            uid = read_series(paths["stir"]).series_instance_uid
            labels_by_uid[uid] = (phantom.labels, phantom.truth)
    report = import_dicom(engine, "S", root / "dicom", actor="test")
    assert len(report.by_status("created")) == 3, report.summary()
    return engine, labels_by_uid


def _counts(engine):
    with session_scope(engine) as session:
        return (
            session.scalar(select(func.count()).select_from(VertebraMeasurement)),
            session.scalar(select(func.count()).select_from(AuditEvent)),
        )


@pytest.mark.slow
def test_quantify_all_stores_with_provenance_and_retries(filed, monkeypatch):
    engine, labels_by_uid = filed
    real = quantify_module.quantify_study
    attempts: dict[str, int] = {}

    def with_true_labels(stir, t1, settings=None, **kwargs):
        attempts[stir.series_instance_uid] = attempts.get(stir.series_instance_uid, 0) + 1
        labels, truth = labels_by_uid[stir.series_instance_uid]
        # P2's study (its treated level is L2) fails once, then succeeds on the retry.
        if truth["bme_percent"].max() == 45.0 and attempts[stir.series_instance_uid] == 1:
            raise OSError("transient read error")
        return real(stir, t1, settings, labels=labels)

    monkeypatch.setattr(quantify_module, "quantify_study", with_true_labels)
    assert len(pending_sessions(engine, "S")) == 3
    report = quantify_all(engine, "S", retries=1, actor="tester")
    assert not report.failed, report.summary()
    assert len(report.measured) == 3
    with session_scope(engine) as session:
        rows = session.scalars(select(VertebraMeasurement)).all()
        assert {row.source.value for row in rows} == {"automatic"}
        assert all(row.method_version.startswith("bmetrack.quantify") for row in rows)
        assert all(len(row.input_series_uids) == 2 for row in rows)
        assert all(row.imaging_session_id is not None for row in rows)
        assert all(row.settings_json["settings"]["edema_k_sd"] == 3.0 for row in rows)
        assert all(row.created_by == "tester" for row in rows)
        l1 = {row.visit.visit_date: row.bme_percent for row in rows if row.level == "L1"}
        assert max(l1.values()) > 30 > min(l1.values())  # 60% at month 0, 20% at month 3
        actors = set(session.scalars(select(AuditEvent.actor)))
        assert "tester" in actors
    # A rerun finds nothing to do.
    assert pending_sessions(engine, "S") == []
    assert quantify_all(engine, "S").measured == []


@pytest.mark.slow
def test_failed_study_is_reported_and_nothing_is_stored(tmp_path, monkeypatch):
    engine = db.make_engine(tmp_path / "s.db")
    db.upgrade(engine)
    import_tables(
        engine,
        "S",
        {
            "patients": pd.DataFrame({"patient_code": ["P1"], "sex": ["F"]}),
            "procedures": pd.DataFrame(
                {
                    "patient_code": ["P1"],
                    "procedure_date": [PROCEDURE],
                    "procedure_type": ["vertebroplasty"],
                    "level": ["L1"],
                }
            ),
        },
        "test",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        phantom = phantom_for_visit(
            [{"level": "L1", "bme_percent": 40.0}], 0, seed=5, params=DEMO_PHANTOM_PARAMETERS
        )
    phantom.write_dicom(tmp_path / "dicom", patient_id="P1", study_date="20200110")
    import_dicom(engine, "S", tmp_path / "dicom", actor="test")
    before = _counts(engine)

    def broken(*args, **kwargs):
        raise RuntimeError("segmentation exploded")

    monkeypatch.setattr(quantify_module, "quantify_study", broken)
    report = quantify_all(engine, "S", retries=2)
    assert len(report.failed) == 1
    assert "segmentation exploded" in report.failed[0][1]
    assert "1 failed" in report.summary()
    assert _counts(engine) == before
    assert len(pending_sessions(engine, "S")) == 1  # a rerun will try it again


@pytest.mark.slow
def test_process_pool_measures_or_reports_every_study(filed):
    """Two real worker processes and the built-in segmenter: each study is either stored
    whole or reported as failed; none is lost or half-stored."""
    engine, _ = filed
    with session_scope(engine) as session:
        session.query(VertebraMeasurement).delete()
    jobs = pending_sessions(engine, "S")
    report = quantify_all(engine, "S", workers=2, retries=0)
    assert len(report.measured) + len(report.failed) == len(jobs) == 3
    with session_scope(engine) as session:
        stored = set(session.scalars(select(VertebraMeasurement.imaging_session_id)))
    assert stored == {job.imaging_session_id for job in report.measured}
