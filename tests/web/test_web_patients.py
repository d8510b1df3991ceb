"""Patient and procedure forms: create, edit, validate as you type, stale edits, audit trail."""

from __future__ import annotations

import re

import pytest
from markupsafe import escape
from sqlalchemy import select
from webtest_support import STUDY

from bmetrack.study import db
from bmetrack.study.models import AuditEvent, Patient, Procedure

SCRIPT = "<script>alert('x')</script>"
SQL = "'; DROP TABLE patient; --"


def _field_errors(html: str) -> list[str]:
    return re.findall(r'class="field-error">([^<]*)<', html)


def _version(html: str) -> str:
    match = re.search(r'name="row_version" value="(\d+)"', html)
    assert match, "no row_version in the form"
    return match.group(1)


def _create(client, token: str, code: str = "P900", **fields: str):
    data = {"csrf_token": token, "study": STUDY, "code": code, "sex": "F", **fields}
    return client.post("/patients", data=data)


def _patient_id(engine, code: str) -> int | None:
    with db.session_scope(engine) as session:
        return session.scalar(select(Patient.id).where(Patient.code == code))


def test_create_patient_then_its_procedure(app_client, logged_in, web_engine):
    token = logged_in("data_entry")
    assert 'href="/patients/new"' in app_client.get("/patients").text
    form = app_client.get("/patients/new")
    assert form.status_code == 200 and f'<option value="{STUDY}" selected>' in form.text
    created = _create(app_client, token, birth_year="1950", enrolled_date="2024-01-02")
    assert created.status_code == 303
    patient_id = _patient_id(web_engine, "P900")
    assert created.headers["location"] == f"/patients/{patient_id}/procedures/new"
    procedure = app_client.post(
        f"/patients/{patient_id}/procedures",
        data={
            "csrf_token": token,
            "procedure_date": "2024-01-10",
            "procedure_type": "vertebroplasty",
            "level": ["t12", "L1", ""],
            "cement_volume_ml": ["3.5", "", ""],
        },
    )
    assert procedure.status_code == 303
    with db.session_scope(web_engine) as session:
        patient = session.get(Patient, patient_id)
        assert (patient.sex, patient.birth_year, str(patient.enrolled_date)) == (
            "F",
            1950,
            "2024-01-02",
        )
        assert patient.study.code == STUDY
        (only,) = patient.procedures
        assert sorted((t.level, t.cement_volume_ml) for t in only.treated_levels) == [
            ("L1", None),
            ("T12", 3.5),
        ]
        created_events = session.scalars(
            select(AuditEvent).where(
                AuditEvent.action == "create", AuditEvent.actor == "data_entry"
            )
        ).all()
        assert {e.entity for e in created_events} == {"patient", "procedure", "treated_level"}
    page = app_client.get(f"/patients/{patient_id}").text
    assert "T12 (3.5 ml), L1" in page
    audit = app_client.get(f"/patients/{patient_id}/audit").text
    assert audit.count("<td>data_entry</td><td>create</td>") == 4  # patient, procedure, 2 levels


def test_invalid_patient_is_refused_with_the_importer_messages(app_client, logged_in, web_engine):
    token = logged_in("data_entry")
    refused = _create(app_client, token, code="Jan Smit", sex="X", birth_year="1800")
    assert refused.status_code == 422
    assert "Please correct the fields marked below." in refused.text
    errors = " | ".join(_field_errors(refused.text))
    assert "a patient code is 1-64 letters" in errors
    assert "must be one of F, M, U" in errors
    assert "must be at least 1890" in errors
    assert 'value="Jan Smit"' in refused.text  # the form keeps what was typed
    assert _patient_id(web_engine, "Jan Smit") is None
    with db.session_scope(web_engine) as session:
        existing = session.scalars(select(Patient.code).order_by(Patient.id)).first()
    duplicate = _create(app_client, token, code=existing)
    assert duplicate.status_code == 422 and "already has this patient" in duplicate.text
    unknown_study = app_client.post(
        "/patients", data={"csrf_token": token, "study": "NOPE", "code": "P901"}
    )
    assert unknown_study.status_code == 422 and "No study with code" in unknown_study.text


def test_patient_fields_validate_as_you_type(app_client, logged_in, web_engine):
    token = logged_in("data_entry")
    data = {"csrf_token": token, "study": STUDY, "code": "P902", "sex": "F", "birth_year": "1800"}
    birth = app_client.post("/api/validate/patient?field=birth_year", data=data)
    assert birth.status_code == 200 and "must be at least 1890" in birth.text
    assert app_client.post("/api/validate/patient?field=code", data=data).text.strip() == ""
    name_like = app_client.post("/api/validate/patient?field=code", data={**data, "code": "Smith"})
    assert "may be a name" in name_like.text and "field-error" not in name_like.text
    assert _patient_id(web_engine, "P902") is None  # validating writes nothing
    # Editing: the code of another patient is taken.
    with db.session_scope(web_engine) as session:
        first, second = session.scalars(select(Patient).order_by(Patient.id)).all()[:2]
        first_id, second_code = first.id, second.code
    taken = app_client.post(
        f"/api/validate/patient?field=code&patient_id={first_id}",
        data={**data, "code": second_code, "birth_year": ""},
    )
    assert "another patient has this code" in taken.text
    level = app_client.post(
        f"/api/validate/procedure?field=levels&patient_id={first_id}",
        data={
            "csrf_token": token,
            "procedure_date": "2030-01-01",
            "level": ["X9", "L2"],
            "cement_volume_ml": ["", "-1"],
        },
    )
    assert "X9: not a vertebral level" in level.text
    assert "L2: cement must be at least 0 ml" in level.text


def test_edit_patient_audit_and_stale_form(app_client, logged_in, web_engine):
    token = logged_in("data_entry")
    patient_id = 1
    with db.session_scope(web_engine) as session:
        patient = session.get(Patient, patient_id)
        code, old_year = patient.code, patient.birth_year
        after_visits = min(v.visit_date.year for v in patient.visits) + 1
    form = app_client.get(f"/patients/{patient_id}/edit").text
    version = _version(form)
    assert f'name="code" value="{code}"' in form
    new_year = str(old_year - 1)
    data = {
        "csrf_token": token,
        "row_version": version,
        "code": code,
        "sex": "M",
        "birth_year": new_year,
        "notes": "checked against the CRF",
        "reason": "entry error",
    }
    assert app_client.post(f"/patients/{patient_id}/edit", data=data).status_code == 303
    stale = app_client.post(
        f"/patients/{patient_id}/edit", data={**data, "sex": "F", "notes": "late"}
    )
    assert stale.status_code == 409
    assert "Not saved" in stale.text and "changed by someone else" in stale.text
    no_version = app_client.post(f"/patients/{patient_id}/edit", data={**data, "row_version": ""})
    assert no_version.status_code == 409 and "no version number" in no_version.text
    with db.session_scope(web_engine) as session:
        patient = session.get(Patient, patient_id)
        assert (patient.sex, patient.birth_year, patient.notes) == (
            "M",
            int(new_year),
            "checked against the CRF",
        )
    audit = app_client.get(f"/patients/{patient_id}/audit").text
    row = re.search(
        r"<td>data_entry</td><td>update</td><td>patient \d+</td><td>birth_year</td>\s*"
        r'<td class="notes">(\d+)</td><td class="notes">(\d+)</td><td class="reason">([^<]*)<',
        audit,
    )
    assert row and row.groups() == (str(old_year), new_year, "entry error")
    # A birth year after the patient's visits is refused (the importer's rule).
    late_year = app_client.post(
        f"/patients/{patient_id}/edit",
        data={**data, "row_version": str(int(version) + 1), "birth_year": str(after_visits)},
    )
    assert late_year.status_code == 422
    assert "is after the visit on" in late_year.text


def test_edit_procedure_levels_and_stale_level_edit(app_client, logged_in, web_engine):
    token = logged_in("data_entry")
    with db.session_scope(web_engine) as session:
        procedure = session.scalars(select(Procedure).order_by(Procedure.id)).first()
        procedure_id, patient_id = procedure.id, procedure.patient_id
        date, kind = str(procedure.procedure_date), procedure.procedure_type.value
        levels = [t.level for t in procedure.treated_levels]
    form = app_client.get(f"/procedures/{procedure_id}/edit").text
    version = _version(form)
    for level in levels:
        assert f'name="level" value="{level}"' in form
    new_level = next(x for x in ("C3", "C4", "C5") if x not in levels)
    data = {
        "csrf_token": token,
        "row_version": version,
        "procedure_date": date,
        "procedure_type": kind,
        "level": [*levels, new_level],
        "cement_volume_ml": ["" for _ in levels] + ["1.5"],
        "reason": "level missed",
    }
    assert app_client.post(f"/procedures/{procedure_id}/edit", data=data).status_code == 303
    # The same form again (a second nurse opened it before): refused, nothing changed.
    stale = app_client.post(
        f"/procedures/{procedure_id}/edit",
        data={**data, "level": levels, "cement_volume_ml": ["" for _ in levels]},
    )
    assert stale.status_code == 409 and "changed by someone else" in stale.text
    invalid = app_client.post(
        f"/procedures/{procedure_id}/edit",
        data={
            **data,
            "row_version": str(int(version) + 1),
            "level": ["X9"],
            "cement_volume_ml": ["-2"],
        },
    )
    assert invalid.status_code == 422
    assert "X9: not a vertebral level" in invalid.text
    with db.session_scope(web_engine) as session:
        procedure = session.get(Procedure, procedure_id)
        assert sorted(t.level for t in procedure.treated_levels) == sorted([*levels, new_level])
        assert procedure.row_version == int(version) + 1
    audit = app_client.get(f"/patients/{patient_id}/audit").text
    added = re.search(
        r"<td>data_entry</td><td>create</td><td>treated_level \d+</td><td></td>\s*"
        r'<td class="notes"></td><td class="notes">([^<]*)<',
        audit,
    )
    assert added and f"&#34;level&#34;: &#34;{new_level}&#34;" in added.group(1)
    assert "&#34;cement_volume_ml&#34;: 1.5" in added.group(1)


@pytest.mark.parametrize("role", ["viewer", "radiologist"])
def test_read_only_roles_see_no_patient_edit_links(app_client, logged_in, role):
    logged_in(role)
    assert 'href="/patients/new"' not in app_client.get("/patients").text
    page = app_client.get("/patients/1").text
    assert "/patients/1/edit" not in page and "/procedures/new" not in page
    assert 'href="/patients/1/audit"' in page
    assert app_client.get("/patients/1/audit").status_code == 200


@pytest.mark.parametrize("evil", [SCRIPT, SQL])
def test_injection_in_patient_and_procedure_text_is_stored_inert(
    app_client, logged_in, web_engine, evil
):
    token = logged_in("data_entry")
    # As a code it is refused (not a pseudonymous code) and echoed escaped.
    refused = _create(app_client, token, code=evil)
    assert refused.status_code == 422 and evil not in refused.text
    assert str(escape(evil)) in refused.text
    created = _create(app_client, token, code="P903", notes=evil)
    assert created.status_code == 303
    patient_id = _patient_id(web_engine, "P903")
    assert (
        app_client.post(
            f"/patients/{patient_id}/procedures",
            data={
                "csrf_token": token,
                "procedure_date": "2024-02-01",
                "procedure_type": "vertebroplasty",
                "level": ["L1"],
                "cement_volume_ml": [""],
                "notes": evil,
            },
        ).status_code
        == 303
    )
    form = app_client.get(f"/patients/{patient_id}/edit").text
    edited = app_client.post(
        f"/patients/{patient_id}/edit",
        data={
            "csrf_token": token,
            "row_version": _version(form),
            "code": "P903",
            "sex": "U",
            "notes": evil + " 2",
            "reason": evil,
        },
    )
    assert edited.status_code == 303
    with db.session_scope(web_engine) as session:
        patient = session.get(Patient, patient_id)
        assert patient.notes == evil + " 2"
        assert patient.procedures[0].notes == evil
        assert len(session.scalars(select(Patient.id)).all()) > 1  # no table dropped
    for path in (f"/patients/{patient_id}", f"/patients/{patient_id}/audit", "/patients"):
        page = app_client.get(path).text
        assert evil not in page
    assert str(escape(evil)) in app_client.get(f"/patients/{patient_id}/audit").text
