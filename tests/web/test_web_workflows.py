"""Nurse, radiologist, dashboard and admin workflows through the HTTP interface."""

from __future__ import annotations

import re

from sqlalchemy import select
from webtest_support import PASSWORD, login

from bmetrack.study import db
from bmetrack.study.models import (
    AuditEvent,
    ClinicalAssessment,
    Patient,
    TreatedLevel,
    User,
    VertebraMeasurement,
    Visit,
)


def _new_visit_date(engine, patient_id: int) -> str:
    with db.session_scope(engine) as session:
        last = max(session.get(Patient, patient_id).visits, key=lambda v: v.visit_date)
        return (last.visit_date.replace(year=last.visit_date.year + 1)).isoformat()


def test_visit_with_invalid_vas_is_refused_then_saved(app_client, logged_in, web_engine):
    token = logged_in("data_entry")
    date = _new_visit_date(web_engine, 1)
    data = {
        "csrf_token": token,
        "visit_date": date,
        "vas": "12",
        "vas_unit": "0-10",
        "analgesic_drugs": "tramadol",
        "notes": "follow-up",
    }
    # As you type: the field endpoint gives the importer's message for the VAS field only.
    live = app_client.post("/api/validate/visit/1?field=vas&new=1", data=data)
    assert live.status_code == 200
    assert "VAS (0-10) must be 0-10" in live.text and "set vas_unit to mm" in live.text
    assert app_client.post("/api/validate/visit/1?field=notes&new=1", data=data).text.strip() == ""
    refused = app_client.post("/patients/1/visits", data=data)
    assert refused.status_code == 422
    assert "VAS (0-10) must be 0-10" in refused.text
    with db.session_scope(web_engine) as session:
        assert str(date) not in {str(v.visit_date) for v in session.get(Patient, 1).visits}
    # Fixed: 12 on the 100 mm line is 1.2 on 0-10; tramadol is WHO class 2.
    saved = app_client.post("/patients/1/visits", data={**data, "vas_unit": "mm"})
    assert saved.status_code == 303
    with db.session_scope(web_engine) as session:
        visit = next(v for v in session.get(Patient, 1).visits if str(v.visit_date) == date)
        assert visit.assessment.vas == 1.2 and visit.assessment.vas_entered == 12
        assert visit.assessment.analgesic_class == 2


def test_drug_class_lookup(app_client, logged_in):
    logged_in("data_entry")
    assert (
        "WHO class 3"
        in app_client.get("/api/drug-class?analgesic_drugs=paracetamol; morphine").text
    )
    assert "Unknown analgesic" in app_client.get("/api/drug-class?analgesic_drugs=morfine").text


def test_stale_form_is_refused_with_a_message(app_client, logged_in, web_engine):
    token = logged_in("data_entry")
    with db.session_scope(web_engine) as session:
        assessment = session.scalars(
            select(ClinicalAssessment).order_by(ClinicalAssessment.id)
        ).first()
        visit_id, version = assessment.visit_id, assessment.row_version
    base = {
        "csrf_token": token,
        "vas": "3",
        "vas_unit": "0-10",
        "analgesic_drugs": "",
        "notes": "first",
    }
    first = app_client.post(f"/visits/{visit_id}/assessment", data={**base, "row_version": version})
    assert first.status_code == 303
    second = app_client.post(
        f"/visits/{visit_id}/assessment", data={**base, "notes": "second", "row_version": version}
    )
    assert second.status_code == 409
    assert "changed by someone else" in second.text
    with db.session_scope(web_engine) as session:
        assert (
            session.scalar(
                select(ClinicalAssessment.notes).where(ClinicalAssessment.visit_id == visit_id)
            )
            == "first"
        )


def _dashboard_row(client, month: int) -> tuple[int, float]:
    page = client.get("/dashboard").text
    row = re.search(
        rf'<tr data-month="{month}"><td>{month}</td><td>(\d+)</td>.*?class="bme-mean">([\d.]+)<',
        page,
        re.S,
    )
    assert row, page[:2000]
    return int(row.group(1)), float(row.group(2))


def test_override_keeps_original_shows_audit_and_moves_dashboard(app_client, logged_in, web_engine):
    token = logged_in("radiologist")
    with db.session_scope(web_engine) as session:
        treated = {(t.procedure.patient_id, t.level) for t in session.scalars(select(TreatedLevel))}
        candidates = session.execute(
            select(VertebraMeasurement, Visit)
            .join(Visit)
            .where(VertebraMeasurement.superseded_by_id.is_(None), Visit.nominal_month == 0)
        ).all()
        m, visit = next((m, v) for m, v in candidates if (v.patient_id, m.level) in treated)
        mid, old_bme, version, patient_id = m.id, m.bme_percent, m.row_version, visit.patient_id
    n, mean_before = _dashboard_row(app_client, 0)
    new_bme = 0.0 if old_bme > 50 else 100.0
    response = app_client.post(
        f"/measurements/{mid}/override",
        data={
            "csrf_token": token,
            "row_version": version,
            "bme_percent": str(new_bme),
            "genant_grade": "1",
            "reason": "edema overestimated: fat signal",
        },
    )
    assert response.status_code == 303
    assert "Overrode" in app_client.get(response.headers["location"]).text
    with db.session_scope(web_engine) as session:
        original = session.get(VertebraMeasurement, mid)
        assert original.bme_percent == old_bme and original.superseded_by_id is not None
        current = session.get(VertebraMeasurement, original.superseded_by_id)
        assert current.bme_percent == new_bme and current.overridden_by == "radiologist"
        events = session.scalars(
            select(AuditEvent).where(
                AuditEvent.action == "override", AuditEvent.field == "bme_percent"
            )
        ).all()
        assert events and events[-1].old_value == repr(old_bme)
    audit = app_client.get(f"/measurements/{mid}/audit").text
    assert "edema overestimated: fat signal" in audit
    assert f">{old_bme:.1f}<" in audit and f">{new_bme:.1f}<" in audit
    # The mean over n VCF moves by (new - old) / n: an independent hand computation.
    n_after, mean_after = _dashboard_row(app_client, 0)
    assert n_after == n
    assert abs((mean_after - mean_before) - (new_bme - old_bme) / n) < 0.011
    timeline = app_client.get(f"/patients/{patient_id}/timeline").text
    assert "manual by radiologist" in timeline


def test_stale_override_is_refused(app_client, logged_in, web_engine):
    token = logged_in("radiologist")
    with db.session_scope(web_engine) as session:
        m = session.scalars(
            select(VertebraMeasurement).where(VertebraMeasurement.superseded_by_id.is_(None))
        ).first()
        mid, version = m.id, m.row_version
    data = {"csrf_token": token, "row_version": version, "bme_percent": "10", "reason": "checked"}
    assert app_client.post(f"/measurements/{mid}/override", data=data).status_code == 303
    again = app_client.post(f"/measurements/{mid}/override", data=data, follow_redirects=True)
    message = re.search(r"id=\"message\">(.*?)<", again.text, re.S)
    assert message, again.url
    assert "Not saved" in message.group(1)
    assert "changed by someone else" in message.group(1) or "already replaced" in message.group(1)
    no_reason = app_client.post(
        f"/measurements/{mid + 1}/override", data={**data, "reason": ""}, follow_redirects=True
    )
    assert "needs a reason" in no_reason.text


def test_level_override_from_the_timeline(app_client, logged_in, web_engine):
    token = logged_in("radiologist")
    with db.session_scope(web_engine) as session:
        m = session.scalars(
            select(VertebraMeasurement).where(VertebraMeasurement.superseded_by_id.is_(None))
        ).first()
        taken = [x.level for x in m.visit.measurements if x.superseded_by_id is None]
        mid, version, old_level, patient_id = m.id, m.row_version, m.level, m.visit.patient_id
    free = next(level for level in ("C3", "C4", "C5") if level not in taken)
    page = app_client.get(f"/patients/{patient_id}/timeline").text
    assert f'name="level" value="{old_level}"' in page  # the form offers the level
    data = {"csrf_token": token, "row_version": version, "reason": "level miscounted"}
    if len(taken) > 1:  # a level measured at the same visit is refused, nothing stored
        other = next(level for level in taken if level != old_level)
        refused = app_client.post(
            f"/measurements/{mid}/override", data={**data, "level": other}, follow_redirects=True
        )
        assert "Not saved" in refused.text and "already has a current measurement" in refused.text
    response = app_client.post(f"/measurements/{mid}/override", data={**data, "level": free})
    assert response.status_code == 303
    with db.session_scope(web_engine) as session:
        original = session.get(VertebraMeasurement, mid)
        assert original.level == old_level and original.superseded_by_id is not None
        current = session.get(VertebraMeasurement, original.superseded_by_id)
        assert (current.level, current.bme_percent) == (free, original.bme_percent)
        event = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "override", AuditEvent.field == "level")
        ).one()
        assert (event.old_value, event.new_value) == (old_level, free)
    audit = app_client.get(f"/measurements/{mid}/audit").text
    assert "level miscounted" in audit


def test_accept_takes_the_visit_off_the_worklist(app_client, logged_in, web_engine):
    token = logged_in("radiologist")
    page = app_client.get("/dashboard").text
    count = int(re.search(r"not yet reviewed \((\d+)\)", page).group(1))
    assert count > 0
    with db.session_scope(web_engine) as session:
        m = session.scalars(
            select(VertebraMeasurement).where(VertebraMeasurement.superseded_by_id.is_(None))
        ).first()
        mid, version = m.id, m.row_version
    response = app_client.post(
        f"/measurements/{mid}/accept", data={"csrf_token": token, "row_version": version}
    )
    assert response.status_code == 303
    page = app_client.get("/dashboard").text
    assert int(re.search(r"not yet reviewed \((\d+)\)", page).group(1)) == count - 1


def test_timeline_shows_placeholder_without_images(app_client, logged_in):
    logged_in("viewer")
    page = app_client.get("/patients/1/timeline").text
    assert "Month 0" in page and "Month 12" in page
    assert "no images" in page
    assert "Save override" not in page  # a viewer sees no edit forms


def test_downloads(app_client, logged_in):
    logged_in("viewer")
    zipped = app_client.get("/downloads/WEB/tables.zip")
    assert zipped.status_code == 200 and zipped.content[:2] == b"PK"
    redcap = app_client.get("/downloads/WEB/redcap.csv")
    assert redcap.status_code == 200 and "record_id" in redcap.text.splitlines()[0]
    report = app_client.get("/downloads/WEB/report.html")
    assert report.status_code == 200 and "<html" in report.text.lower()


def test_admin_manages_users(app_client, logged_in, web_engine):
    token = logged_in("admin")
    created = app_client.post(
        "/admin/users",
        data={
            "csrf_token": token,
            "username": "nurse2",
            "password": "a long password",
            "role": "data_entry",
        },
    )
    assert created.status_code == 303
    page = app_client.get("/admin/users").text
    assert "nurse2" in page
    with db.session_scope(web_engine) as session:
        user_id = session.scalar(select(User.id).where(User.username == "nurse2"))
    changed = app_client.post(
        f"/admin/users/{user_id}",
        data={"csrf_token": token, "role": "viewer", "active": "no", "row_version": "1"},
    )
    assert changed.status_code == 303
    app_client.post("/logout", data={"csrf_token": token})
    refused = app_client.post(
        "/login",
        data={
            "username": "nurse2",
            "password": "a long password",
            "csrf_token": re.search(
                r'name="csrf_token" value="([^"]+)"', app_client.get("/login").text
            ).group(1),
        },
    )
    assert refused.status_code == 401
    login(app_client, "admin", PASSWORD)


def test_every_dashboard_figure_is_served(app_client, logged_in):
    import re

    logged_in("viewer")
    page = app_client.get("/dashboard")
    assert page.status_code == 200
    sources = re.findall(r'<img src="(/dashboard/figures/[^"]+\.png)"', page.text)
    assert len(sources) == 7
    for source in sources:
        image = app_client.get(source)
        assert image.status_code == 200, source
        assert image.content[:8] == b"\x89PNG\r\n\x1a\n"
