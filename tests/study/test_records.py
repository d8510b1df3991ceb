"""records: validation rules, audit trail, optimistic locking, overrides."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from sqlalchemy import Engine, select

from bmetrack.study import records
from bmetrack.study.db import session_scope
from bmetrack.study.models import AuditEvent, MeasurementSource, Patient, Visit, WindowStatus
from bmetrack.study.records import Problem, StaleRecordError, ValidationError

ACTOR = "tester"


def _setup(session, birth_year=1940):
    study = records.get_or_create_study(session, "S1", "test", actor=ACTOR)
    patient = records.add_patient(
        session, study, "P001", actor=ACTOR, sex="F", birth_year=birth_year
    )
    records.add_procedure(
        session, patient, "2020-01-10", "vertebroplasty", [("T12", 3.5)], actor=ACTOR
    )
    return study, patient


def _only_problem(error: pytest.ExceptionInfo[ValidationError]) -> Problem:
    assert len(error.value.problems) == 1, error.value.problems
    return error.value.problems[0]


def test_visit_windows_relative_to_first_procedure(engine: Engine) -> None:
    with session_scope(engine) as session:
        _, patient = _setup(session)
        baseline = records.add_visit(session, patient, "2020-01-05", actor=ACTOR, vas=10)
        month3 = records.add_visit(session, patient, dt.date(2020, 4, 10), actor=ACTOR, vas=2)
        outside = records.add_visit(session, patient, "2020-06-01", actor=ACTOR)
        session.flush()
        # 2020-01-05 is 5 days before 2020-01-10; 2020-04-10 is 91 days after
        # (month 3 = round(3 * 365.25 / 12) = 91 days); 2020-06-01 is day 143:
        # > 91 + 30 and < 183 - 45 = 138? no: 143 >= 138 -> month 6 window.
        assert (baseline.nominal_month, baseline.window_status) == (0, WindowStatus.BASELINE)
        assert baseline.days_from_procedure == -5
        assert (month3.nominal_month, month3.days_from_procedure) == (3, 91)
        assert month3.window_status == WindowStatus.IN_WINDOW
        assert (outside.nominal_month, outside.days_from_procedure) == (6, 143)
        odd = records.add_visit(session, patient, "2020-05-24", actor=ACTOR)  # day 135
        assert odd.nominal_month is None
        assert odd.window_status == WindowStatus.OUTSIDE_WINDOW


def test_earlier_procedure_recomputes_windows(engine: Engine) -> None:
    with session_scope(engine) as session:
        _, patient = _setup(session)
        visit = records.add_visit(session, patient, "2020-04-10", actor=ACTOR)
        session.flush()
        records.add_procedure(
            session, patient, "2020-01-01", "vertebroplasty", [("L1", None)], actor=ACTOR
        )
        session.flush()
        assert visit.days_from_procedure == 100  # 2020-01-01 -> 2020-04-10
        events = session.scalars(
            select(AuditEvent).where(
                AuditEvent.entity == "visit", AuditEvent.field == "days_from_procedure"
            )
        ).all()
        assert [(e.old_value, e.new_value) for e in events] == [("91", "100")]


def test_vas_mm_is_converted_and_entered_value_kept(engine: Engine) -> None:
    with session_scope(engine) as session:
        _, patient = _setup(session)
        visit = records.add_visit(
            session, patient, "2020-01-05", actor=ACTOR, vas=73, vas_unit="mm"
        )
        assert visit.assessment is not None
        assert visit.assessment.vas == pytest.approx(7.3)
        assert (visit.assessment.vas_entered, visit.assessment.vas_unit) == (73, "mm")


@pytest.mark.parametrize(
    ("vas", "unit", "expect"),
    [(11, "0-10", "vas_unit to mm"), (-1, "0-10", "0-10"), (101, "mm", "0-100")],
)
def test_vas_out_of_range(engine: Engine, vas: float, unit: str, expect: str) -> None:
    with session_scope(engine) as session:
        _, patient = _setup(session)
        with pytest.raises(ValidationError) as error:
            records.add_visit(session, patient, "2020-01-05", actor=ACTOR, vas=vas, vas_unit=unit)
    problem = _only_problem(error)
    assert (problem.field, problem.value) == ("vas", vas)
    assert expect in problem.reason
    assert "P001" in str(problem) and "vas" in str(problem) and str(vas) in str(problem)


def test_unknown_level_and_level_treated_twice(engine: Engine) -> None:
    with session_scope(engine) as session:
        _, patient = _setup(session)
        with pytest.raises(ValidationError) as error:
            records.add_procedure(
                session,
                patient,
                "2020-02-01",
                "vertebroplasty",
                [("X9", 1.0), ("L1", 2.0), ("l1", 1.0)],
                actor=ACTOR,
            )
    problems = {(p.field, p.value): p.reason for p in error.value.problems}
    assert "not a vertebral level" in problems[("level", "X9")]
    assert "treated twice" in problems[("level", "l1")]
    assert len(problems) == 2


def test_dates_before_birth_year_and_before_baseline_window(engine: Engine) -> None:
    with session_scope(engine) as session:
        study = records.get_or_create_study(session, "S1", actor=ACTOR)
        patient = records.add_patient(session, study, "P001", actor=ACTOR, birth_year=1950)
        with pytest.raises(ValidationError) as error:
            records.add_procedure(
                session, patient, "1949-12-31", "vertebroplasty", [("L1", None)], actor=ACTOR
            )
        problem = _only_problem(error)
        assert (problem.field, problem.value) == ("procedure_date", dt.date(1949, 12, 31))
        assert "birth year 1950" in problem.reason
        records.add_procedure(
            session, patient, "2020-01-10", "vertebroplasty", [("L1", None)], actor=ACTOR
        )
        # 181 days before the procedure: one more than the default 180.
        with pytest.raises(ValidationError) as error:
            records.add_visit(
                session, patient, dt.date(2020, 1, 10) - dt.timedelta(days=181), actor=ACTOR
            )
        problem = _only_problem(error)
        assert problem.field == "visit_date" and "181 days before" in problem.reason
        with pytest.raises(ValidationError) as error:
            records.add_visit(session, patient, "1949-06-01", actor=ACTOR)
        assert any("birth year" in p.reason for p in error.value.problems)
        records.add_visit(
            session, patient, dt.date(2020, 1, 10) - dt.timedelta(days=180), actor=ACTOR
        )


def test_unknown_drug_and_class_disagreeing_with_drugs(engine: Engine) -> None:
    with session_scope(engine) as session:
        _, patient = _setup(session)
        with pytest.raises(ValidationError) as error:
            records.add_visit(
                session, patient, "2020-01-05", actor=ACTOR, analgesic_drugs="morfine"
            )
        problem = _only_problem(error)
        assert (problem.field, problem.value) == ("analgesic_drugs", "morfine")
        assert "morphine" in problem.reason  # close-match hint
        with pytest.raises(ValidationError) as error:
            records.add_visit(
                session,
                patient,
                "2020-01-05",
                actor=ACTOR,
                analgesic_drugs="tramadol",
                analgesic_class=1,
            )
        problem = _only_problem(error)
        assert (problem.field, problem.value) == ("analgesic_class", 1)
        assert "class 2" in problem.reason
        visit = records.add_visit(
            session, patient, "2020-01-05", actor=ACTOR, analgesic_drugs="paracetamol; oxycodone"
        )
        assert visit.assessment is not None and visit.assessment.analgesic_class == 3


@pytest.mark.parametrize("code", ["Jan Jansen", "P 001", "", "P001;DROP", "x" * 65, "Pé01"])
def test_bad_patient_codes(engine: Engine, code: str) -> None:
    with session_scope(engine) as session:
        study = records.get_or_create_study(session, "S1", actor=ACTOR)
        with pytest.raises(ValidationError) as error:
            records.add_patient(session, study, code, actor=ACTOR)
    problem = _only_problem(error)
    assert problem.field == "code" and problem.value == code and "pseudonymous" in problem.reason


def test_duplicate_visit_date_and_duplicate_patient(engine: Engine) -> None:
    with session_scope(engine) as session:
        study, patient = _setup(session)
        records.add_visit(session, patient, "2020-01-05", actor=ACTOR)
        with pytest.raises(ValidationError) as error:
            records.add_visit(session, patient, "2020-01-05", actor=ACTOR)
        assert _only_problem(error).field == "visit_date"
        with pytest.raises(ValidationError) as error:
            records.add_patient(session, study, "P001", actor=ACTOR)
        assert "already has this patient" in _only_problem(error).reason


def test_measurement_rules_reported_together(engine: Engine) -> None:
    with session_scope(engine) as session:
        _, patient = _setup(session)
        bad = {
            "bme_percent": 120,
            "body_volume_ml": -1,
            "genant_grade": 4,
            "deformity": "squashed",
            "height_anterior_mm": -0.5,
        }
        with pytest.raises(ValidationError) as error:
            records.add_measurement(session, patient, "2020-01-05", "T12", bad, actor=ACTOR)
    found = {(p.field, p.value) for p in error.value.problems}
    assert found == {
        ("bme_percent", 120),
        ("body_volume_ml", -1),
        ("genant_grade", 4),
        ("deformity", "squashed"),
        ("height_anterior_mm", -0.5),
    }
    assert all(
        "measurement T12 on 2020-01-05 of patient P001" in str(p) for p in error.value.problems
    )


def test_measurement_creates_missing_visit_and_supersedes(engine: Engine) -> None:
    with session_scope(engine) as session:
        _, patient = _setup(session)
        first = records.add_measurement(
            session, patient, "2020-04-12", "T12", {"bme_percent": 4.9}, actor=ACTOR
        )
        session.flush()
        assert first.bme_present is False  # threshold 5 %
        assert [(v.visit_date, v.nominal_month) for v in patient.visits] == [
            (dt.date(2020, 4, 12), 3)
        ]
        second = records.add_measurement(
            session, patient, "2020-04-12", "T12", {"bme_percent": 5.0}, actor=ACTOR
        )
        session.flush()
        assert second.bme_present is True
        assert first.superseded_by_id == second.id and second.supersedes_id == first.id
        assert [m.id for m in records.current_measurements(session, patient=patient)] == [second.id]


def test_create_and_update_write_audit_events(engine: Engine) -> None:
    with session_scope(engine) as session:
        _, patient = _setup(session)
        session.flush()
        patient_id = patient.id
    with session_scope(engine) as session:
        created = session.scalars(
            select(AuditEvent).where(AuditEvent.entity == "patient", AuditEvent.action == "create")
        ).one()
        assert created.entity_id == patient_id and created.actor == ACTOR
        values = json.loads(created.new_value or "")
        assert values["code"] == "P001" and values["birth_year"] == 1940 and values["sex"] == "F"
        entities = set(session.scalars(select(AuditEvent.entity)).all())
        assert {"study", "patient", "procedure", "treated_level"} <= entities
        records.update_patient(
            session,
            patient_id,
            {"sex": "M", "birth_year": 1941, "notes": ""},
            actor="editor",
            expected_row_version=1,
            reason="typo",
        )
    with session_scope(engine) as session:
        updates = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "update").order_by(AuditEvent.field)
        ).all()
        assert [(e.field, e.old_value, e.new_value, e.actor, e.reason) for e in updates] == [
            ("birth_year", "1940", "1941", "editor", "typo"),
            ("sex", "F", "M", "editor", "typo"),
        ]
        assert session.get(Patient, patient_id).row_version == 2


def test_stale_update_is_refused(engine: Engine) -> None:
    with session_scope(engine) as session:
        _, patient = _setup(session)
        session.flush()
        patient_id = patient.id
    with session_scope(engine) as session:
        records.update_patient(
            session, patient_id, {"notes": "first"}, actor="a", expected_row_version=1
        )
    with session_scope(engine) as session, pytest.raises(StaleRecordError) as error:
        records.update_patient(
            session, patient_id, {"notes": "second"}, actor="b", expected_row_version=1
        )
    assert str(error.value) == (
        "patient P001 was changed by someone else since you opened it (version 2, yours 1); "
        "reload and re-apply your change"
    )
    with session_scope(engine) as session:
        assert session.get(Patient, patient_id).notes == "first"


def test_concurrent_sessions_detected_at_flush(engine: Engine) -> None:
    with session_scope(engine) as session:
        _, patient = _setup(session)
        session.flush()
        patient_id = patient.id
    # The slow session read version 1; the fast one commits version 2 meanwhile.
    with pytest.raises(StaleRecordError), session_scope(engine) as slow:
        loaded = slow.get(Patient, patient_id)
        assert loaded is not None and loaded.row_version == 1
        with session_scope(engine) as fast:
            records.update_patient(fast, patient_id, {"notes": "fast"}, actor="a")
        records.update_patient(slow, patient_id, {"notes": "slow"}, actor="b")
    with session_scope(engine) as session:
        assert session.get(Patient, patient_id).notes == "fast"


def test_update_assessment_rederives_class_and_audits(engine: Engine) -> None:
    with session_scope(engine) as session:
        _, patient = _setup(session)
        visit = records.add_visit(
            session, patient, "2020-01-05", actor=ACTOR, vas=8, analgesic_drugs="tramadol"
        )
        session.flush()
        visit_id = visit.id
    with session_scope(engine) as session:
        clinical = records.update_assessment(
            session,
            visit_id,
            {"analgesic_drugs": "fentanyl", "vas": 80, "vas_unit": "mm"},
            actor="e",
            expected_row_version=1,
        )
        assert (clinical.analgesic_class, clinical.vas) == (3, 8.0)
        with pytest.raises(StaleRecordError):
            records.update_assessment(
                session, visit_id, {"vas": 1}, actor="e", expected_row_version=1
            )
    with session_scope(engine) as session:
        changes = {
            e.field: (e.old_value, e.new_value)
            for e in session.scalars(select(AuditEvent).where(AuditEvent.action == "update"))
        }
        assert changes == {
            "analgesic_class": ("2", "3"),
            "analgesic_drugs": ("tramadol", "fentanyl"),
            "vas_entered": ("8.0", "80.0"),
            "vas_unit": ("0-10", "mm"),
        }


def test_override_measurement(engine: Engine) -> None:
    with session_scope(engine) as session:
        _, patient = _setup(session)
        old = records.add_measurement(
            session,
            patient,
            "2020-01-05",
            "T12",
            {"bme_percent": 75, "genant_grade": 2},
            actor="pipeline",
        )
        session.flush()
        old_id = old.id
    with session_scope(engine) as session:
        with pytest.raises(ValidationError) as error:
            records.override_measurement(
                session, old_id, {"bme_percent": 60}, actor="dr", reason=" "
            )
        assert _only_problem(error).field == "reason"
        with pytest.raises(ValidationError):
            records.override_measurement(
                session, old_id, {"bme_percent": 160}, actor="dr", reason="x"
            )
        new = records.override_measurement(
            session,
            old_id,
            {"bme_percent": 60},
            actor="dr",
            reason="rim counted as edema",
            expected_row_version=1,
        )
        session.flush()
        assert new.source == MeasurementSource.MANUAL
        assert (new.overridden_by, new.override_reason, new.supersedes_id) == (
            "dr",
            "rim counted as edema",
            old_id,
        )
        assert new.genant_grade == 2  # unchanged fields are carried over
        new_id = new.id
    with session_scope(engine) as session:
        assert session.get(type(new), old_id).superseded_by_id == new_id
        assert session.get(type(new), old_id).bme_percent == 75  # the original stays
        assert [m.id for m in records.current_measurements(session)] == [new_id]
        override = session.scalars(select(AuditEvent).where(AuditEvent.action == "override")).one()
        assert (
            override.field,
            override.old_value,
            override.new_value,
            override.actor,
            override.reason,
        ) == (
            "bme_percent",
            "75.0",
            "60.0",
            "dr",
            "rim counted as edema",
        )
        link = session.scalars(
            select(AuditEvent).where(AuditEvent.field == "superseded_by_id")
        ).one()
        assert (link.entity_id, link.old_value, link.new_value) == (old_id, None, str(new_id))
        with pytest.raises(StaleRecordError):
            records.override_measurement(
                session, old_id, {"bme_percent": 1}, actor="dr", reason="again"
            )


def test_override_measurement_level(engine: Engine) -> None:
    with session_scope(engine) as session:
        _, patient = _setup(session)
        first = records.add_measurement(
            session, patient, "2020-01-05", "T12", {"bme_percent": 40}, actor="pipeline"
        )
        other = records.add_measurement(
            session, patient, "2020-01-05", "L2", {"bme_percent": 10}, actor="pipeline"
        )
        session.flush()
        first_id, other_id = first.id, other.id
    with session_scope(engine) as session:
        with pytest.raises(ValidationError) as error:
            records.override_measurement(session, first_id, {"level": "X9"}, actor="dr", reason="x")
        assert (_only_problem(error).field, _only_problem(error).value) == ("level", "X9")
        with pytest.raises(ValidationError) as error:  # L2 is measured at this visit already
            records.override_measurement(session, first_id, {"level": "l2"}, actor="dr", reason="x")
        assert (_only_problem(error).field, _only_problem(error).value) == ("level", "L2")
    with session_scope(engine) as session:
        new = records.override_measurement(
            session, first_id, {"level": " l1 "}, actor="dr", reason="counted from the sacrum"
        )
        session.flush()
        new_id = new.id
        # VerSe labels: T12 = 19, L1 = 20; the measured values are carried over.
        assert (new.level, new.label, new.bme_percent) == ("L1", 20, 40)
        assert session.get(type(new), first_id).label == 19
    with session_scope(engine) as session:
        old = session.get(type(new), first_id)
        assert (old.level, old.superseded_by_id) == ("T12", new_id)  # the original stays
        current = {m.level: m.id for m in records.current_measurements(session)}
        assert current == {"L1": new_id, "L2": other_id}
        event = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "override", AuditEvent.field == "level")
        ).one()
        assert (event.entity_id, event.old_value, event.new_value, event.reason) == (
            new_id,
            "T12",
            "L1",
            "counted from the sacrum",
        )
        created = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "create", AuditEvent.entity_id == new_id)
        ).all()
        assert len([e for e in created if e.entity == "vertebra_measurement"]) == 1


def test_new_vcf_rules(engine: Engine) -> None:
    with session_scope(engine) as session:
        _, patient = _setup(session)
        visit = records.add_visit(
            session, patient, "2020-04-10", actor=ACTOR, new_vcf_levels=["L2"]
        )
        session.flush()
        assert [(e.level, e.visit_id) for e in patient.new_vcf_events] == [("L2", visit.id)]
        with pytest.raises(ValidationError) as error:
            records.add_visit(
                session, patient, "2020-07-10", actor=ACTOR, new_vcf_levels=["T12", "L2"]
            )
        reasons = {p.value: p.reason for p in error.value.problems}
        assert "treated level" in reasons["T12"] and "already recorded" in reasons["L2"]


def test_visits_are_linked_to_patient(engine: Engine) -> None:
    with session_scope(engine) as session:
        _, patient = _setup(session)
        records.add_visit(session, patient, "2020-01-05", actor=ACTOR)
    with session_scope(engine) as session:
        assert session.scalars(select(Visit.visit_date)).all() == [dt.date(2020, 1, 5)]


def _count(session, model) -> int:
    return len(session.scalars(select(model.id)).all())


def test_validation_problems_are_those_of_the_write_and_nothing_is_kept(engine: Engine) -> None:
    with session_scope(engine) as session:
        _setup(session)
    bad = {"sex": "X", "birth_year": "1700", "enrolled_date": "2020-13-01"}
    with session_scope(engine) as session:
        study = records.get_study(session, "S1")
        with pytest.raises(ValidationError) as raised:
            records.add_patient(session, study, "P 2", actor=ACTOR, **bad)
    with session_scope(engine) as session:
        study = records.get_study(session, "S1")
        problems = records.validation_problems(
            session, lambda: records.add_patient(session, study, "P 2", actor=ACTOR, **bad)
        )
    assert problems == raised.value.problems
    assert {p.field for p in problems} == {"code", "sex", "birth_year", "enrolled_date"}
    with session_scope(engine) as session:
        study = records.get_study(session, "S1")
        valid = records.validation_problems(
            session, lambda: records.add_patient(session, study, "P002", actor=ACTOR)
        )
        assert valid == []
        duplicate = records.validation_problems(
            session,
            lambda: records.add_patient(
                session, records.get_study(session, "S1"), "P001", actor=ACTOR
            ),
        )
        assert [p.field for p in duplicate] == ["code"]
        assert "already has this patient" in duplicate[0].reason
    with session_scope(engine) as session:
        patient_id = session.scalar(select(Patient.id).where(Patient.code == "P001"))
        # A valid update that flushes is rolled back too.
        assert (
            records.validation_problems(
                session,
                lambda: records.update_patient(
                    session, patient_id, {"notes": "tried"}, actor=ACTOR, expected_row_version=1
                ),
            )
            == []
        )
        stale = records.validation_problems(
            session,
            lambda: records.update_patient(
                session, patient_id, {"notes": "x"}, actor=ACTOR, expected_row_version=7
            ),
        )
        assert [p.field for p in stale] == ["row_version"]
        assert "changed by someone else" in stale[0].reason
    with session_scope(engine) as session:
        assert _count(session, Patient) == 1
        patient = session.get(Patient, patient_id)
        assert patient is not None and patient.notes == "" and patient.row_version == 1
        assert not session.scalars(select(AuditEvent).where(AuditEvent.action == "update")).all()


@pytest.mark.parametrize(
    ("code", "warns"),
    [("Smith", True), ("jan_de-vries", True), ("P001", False), ("AB12", False), ("X", False)],
)
def test_patient_code_warnings(code: str, warns: bool) -> None:
    warnings = records.patient_code_warnings(code)
    assert bool(warnings) is warns
    if warns:
        assert "may be a name" in warnings[0]


def test_edit_procedure_sets_levels_with_audit_and_moves_the_version(engine: Engine) -> None:
    with session_scope(engine) as session:
        _, patient = _setup(session)  # procedure 2020-01-10, T12 with 3.5 ml
        session.flush()
        patient_id, procedure_id = patient.id, patient.procedures[0].id
    with session_scope(engine) as session:
        records.edit_procedure(
            session,
            procedure_id,
            {"procedure_type": "kyphoplasty"},
            [("T12", "4"), ("l1", "")],
            actor="nurse",
            expected_row_version=1,
            reason="op report",
        )
    with session_scope(engine) as session:
        procedure = session.get(records.Procedure, procedure_id)
        assert procedure is not None
        assert procedure.procedure_type.value == "kyphoplasty"
        assert sorted((t.level, t.cement_volume_ml) for t in procedure.treated_levels) == [
            ("L1", None),
            ("T12", 4.0),
        ]
        version = procedure.row_version
        assert version == 2
        # Only the levels change: the procedure's version still moves on.
        records.edit_procedure(
            session, procedure_id, {}, [("L1", 2.5)], actor="nurse", expected_row_version=2
        )
    with session_scope(engine) as session:
        procedure = session.get(records.Procedure, procedure_id)
        assert procedure is not None and procedure.row_version == 3
        assert [(t.level, t.cement_volume_ml) for t in procedure.treated_levels] == [("L1", 2.5)]
        with pytest.raises(StaleRecordError, match="changed by someone else"):
            records.edit_procedure(
                session, procedure_id, {}, [("L2", None)], actor="late", expected_row_version=2
            )
    with session_scope(engine) as session:
        events = records.patient_audit(session, patient_id)
        removed = [e for e in events if e.action == "delete"]
        assert len(removed) == 1 and removed[0].entity == "treated_level"
        assert json.loads(removed[0].old_value or "")["level"] == "T12"
        changed = {
            (e.entity, e.field, e.old_value, e.new_value) for e in events if e.action == "update"
        }
        assert ("procedure", "procedure_type", "vertebroplasty", "kyphoplasty") in changed
        assert ("treated_level", "cement_volume_ml", "3.5", "4.0") in changed
        created = [(e.entity, e.action) for e in events if e.action == "create"]
        assert created.count(("treated_level", "create")) == 2  # T12 at setup, L1 now
        assert created[0] == ("patient", "create")
        assert all(e.actor != "late" for e in events)


def test_edit_procedure_reports_every_problem_and_changes_nothing(engine: Engine) -> None:
    with session_scope(engine) as session:
        _, patient = _setup(session, birth_year=1940)
        records.add_procedure(
            session, patient, "2021-05-01", "vertebroplasty", [("L2", None)], actor=ACTOR
        )
        session.flush()
        procedure_id = patient.procedures[0].id
    with session_scope(engine) as session, pytest.raises(ValidationError) as error:
        records.edit_procedure(
            session,
            procedure_id,
            {"procedure_date": "2021-05-01", "procedure_type": "surgery"},
            [("X9", None), ("T12", "-1"), ("t12", None)],
            actor="nurse",
        )
    fields = sorted(p.field for p in error.value.problems)
    assert fields == ["cement_volume_ml", "level", "level", "procedure_date", "procedure_type"]
    with session_scope(engine) as session, pytest.raises(ValidationError) as error:
        records.edit_procedure(
            session, procedure_id, {"procedure_date": "1939-12-31"}, [], actor="nurse"
        )
    assert sorted(p.field for p in error.value.problems) == ["levels", "procedure_date"]
    with session_scope(engine) as session:
        procedure = session.get(records.Procedure, procedure_id)
        assert procedure is not None and procedure.row_version == 1
        assert str(procedure.procedure_date) == "2020-01-10"
        assert [(t.level, t.cement_volume_ml) for t in procedure.treated_levels] == [("T12", 3.5)]
