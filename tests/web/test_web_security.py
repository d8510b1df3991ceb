"""Security of the web app: sessions, roles, CSRF, rate limit, inert injection strings."""

from __future__ import annotations

import re

import pytest
from markupsafe import escape
from sqlalchemy import select
from webtest_support import PASSWORD, csrf_of, login

from bmetrack.study import db
from bmetrack.study.models import (
    AuditEvent,
    ClinicalAssessment,
    Patient,
    User,
    VertebraMeasurement,
)

SCRIPT = "<script>alert('x')</script>"
SQL = "'; DROP TABLE patient; --"

PAGES = [
    "/",
    "/dashboard",
    "/patients",
    "/patients/1",
    "/patients/1/timeline",
    "/patients/1/visits/new",
    "/visits/1/edit",
    "/measurements/1/audit",
    "/admin/users",
    "/downloads/WEB/tables.zip",
    "/downloads/WEB/redcap.csv",
    "/images/1/stir/0.png",
    "/patients/new",
    "/patients/1/edit",
    "/patients/1/procedures/new",
    "/procedures/1/edit",
    "/patients/1/audit",
]
POSTS = [
    "/patients/1/visits",
    "/visits/1/assessment",
    "/measurements/1/accept",
    "/measurements/1/override",
    "/admin/users",
    "/admin/users/1",
    "/patients",
    "/patients/1/edit",
    "/patients/1/procedures",
    "/procedures/1/edit",
    "/api/validate/patient?field=code",
    "/api/validate/procedure?field=levels&patient_id=1",
]


@pytest.mark.parametrize("path", PAGES)
def test_pages_without_session_redirect_to_login(app_client, path):
    response = app_client.get(path)
    assert response.status_code == 303
    assert response.headers["location"] == "/login"


def test_htmx_and_api_without_session_get_401(app_client):
    assert app_client.get("/api/drug-class?analgesic_drugs=morphine").status_code == 401
    response = app_client.get("/fragments/slices/1", headers={"HX-Request": "true"})
    assert response.status_code == 401


@pytest.mark.parametrize("path", POSTS)
def test_posts_without_session_are_refused(app_client, path):
    # No session means no CSRF token either: refused before anything runs.
    assert app_client.post(path, data={}).status_code in (401, 403)


@pytest.mark.parametrize(
    ("role", "method", "path"),
    [
        ("viewer", "get", "/patients/1/visits/new"),
        ("viewer", "get", "/visits/1/edit"),
        ("viewer", "post", "/patients/1/visits"),
        ("viewer", "post", "/measurements/1/override"),
        ("viewer", "post", "/measurements/1/accept"),
        ("viewer", "get", "/admin/users"),
        ("radiologist", "post", "/patients/1/visits"),
        ("radiologist", "get", "/admin/users"),
        ("data_entry", "post", "/measurements/1/override"),
        ("data_entry", "post", "/admin/users"),
    ],
)
def test_wrong_role_gets_403(app_client, logged_in, role, method, path):
    token = logged_in(role)
    if method == "get":
        response = app_client.get(path)
    else:
        response = app_client.post(path, data={"csrf_token": token, "reason": "x"})
    assert response.status_code == 403


def test_post_without_or_with_wrong_csrf_is_403(app_client, logged_in, web_engine):
    logged_in("radiologist")
    with db.session_scope(web_engine) as session:
        before = session.scalars(select(VertebraMeasurement.id)).all()
    for data in (
        {"bme_percent": "1", "reason": "r"},
        {"bme_percent": "1", "reason": "r", "csrf_token": "forged"},
    ):
        assert app_client.post("/measurements/1/override", data=data).status_code == 403
    with db.session_scope(web_engine) as session:
        assert session.scalars(select(VertebraMeasurement.id)).all() == before
    assert app_client.post("/logout", data={}).status_code == 403


def test_session_cookie_is_httponly_and_samesite(app_client):
    token = csrf_of(app_client.get("/login").text)
    response = app_client.post(
        "/login", data={"username": "viewer", "password": PASSWORD, "csrf_token": token}
    )
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie


def test_login_is_rate_limited(app_client):
    token = csrf_of(app_client.get("/login").text)
    codes = [
        app_client.post(
            "/login", data={"username": "admin", "password": "wrong", "csrf_token": token}
        ).status_code
        for _ in range(6)
    ]
    assert codes[:5] == [401] * 5
    assert codes[5] == 429
    # Even the right password is refused while blocked.
    response = app_client.post(
        "/login", data={"username": "admin", "password": PASSWORD, "csrf_token": token}
    )
    assert response.status_code == 429


def test_deactivated_user_loses_access_at_once(app_client, web_engine):
    login(app_client, "viewer")
    with db.session_scope(web_engine) as session:
        session.scalar(select(User).where(User.username == "viewer")).active = False
    assert app_client.get("/patients").status_code == 303


def test_passwords_are_stored_hashed(web_engine):
    with db.session_scope(web_engine) as session:
        hashes = session.scalars(select(User.password_hash)).all()
    assert all(h.startswith("$argon2id$") and PASSWORD not in h for h in hashes)


def test_no_page_shows_a_name_field(app_client, logged_in):
    logged_in("admin")
    for path in ("/patients", "/patients/1", "/patients/1/timeline"):
        text = app_client.get(path).text.lower()
        assert "patient_name" not in text and "date of birth" not in text


@pytest.mark.parametrize("evil", [SCRIPT, SQL])
def test_injection_in_notes_is_stored_and_shown_inert(app_client, logged_in, web_engine, evil):
    token = logged_in("data_entry")
    with db.session_scope(web_engine) as session:
        visit_id = session.scalars(
            select(ClinicalAssessment.visit_id).order_by(ClinicalAssessment.id)
        ).first()
        patient_count = len(session.scalars(select(Patient.id)).all())
    form = app_client.get(f"/visits/{visit_id}/edit").text
    version = int(re.search(r'name="row_version" value="(\d+)"', form).group(1))
    data = {
        "csrf_token": token,
        "row_version": str(version),
        "vas": "4",
        "vas_unit": "0-10",
        "analgesic_drugs": "paracetamol",
        "notes": evil,
    }
    response = app_client.post(f"/visits/{visit_id}/assessment", data=data)
    assert response.status_code == 303, response.text
    with db.session_scope(web_engine) as session:
        stored = session.scalar(
            select(ClinicalAssessment.notes).where(ClinicalAssessment.visit_id == visit_id)
        )
        assert stored == evil  # stored exactly, as text
        assert len(session.scalars(select(Patient.id)).all()) == patient_count
    page = app_client.get(response.headers["location"]).text
    assert evil not in page
    assert str(escape(evil)) in page


def test_injection_in_drug_name_gives_escaped_error(app_client, logged_in):
    token = logged_in("data_entry")
    data = {
        "csrf_token": token,
        "visit_date": "2030-01-01",
        "vas": "3",
        "vas_unit": "0-10",
        "analgesic_drugs": SCRIPT,
    }
    response = app_client.post("/patients/1/visits", data=data)
    assert response.status_code == 422
    assert SCRIPT not in response.text
    assert "Unknown analgesic" in response.text
    assert "&lt;script&gt;" in response.text


@pytest.mark.parametrize("evil", [SCRIPT, SQL])
def test_injection_in_override_reason_is_inert(app_client, logged_in, web_engine, evil):
    token = logged_in("radiologist")
    with db.session_scope(web_engine) as session:
        m = session.scalars(
            select(VertebraMeasurement).where(VertebraMeasurement.superseded_by_id.is_(None))
        ).first()
        mid, version = m.id, m.row_version
    response = app_client.post(
        f"/measurements/{mid}/override",
        data={"csrf_token": token, "row_version": version, "bme_percent": "12.5", "reason": evil},
    )
    assert response.status_code == 303
    page = app_client.get(f"/measurements/{mid}/audit").text
    assert evil not in page
    assert str(escape(evil)) in page


def test_injection_in_new_username_is_refused_and_escaped(app_client, logged_in):
    token = logged_in("admin")
    response = app_client.post(
        "/admin/users",
        data={
            "csrf_token": token,
            "username": SCRIPT,
            "password": "long enough pw",
            "role": "viewer",
        },
    )
    assert response.status_code == 422
    assert SCRIPT not in response.text


PATIENT_FORM_ROUTES = [
    ("get", "/patients/new"),
    ("get", "/patients/1/edit"),
    ("get", "/patients/1/procedures/new"),
    ("get", "/procedures/1/edit"),
    ("post", "/patients"),
    ("post", "/patients/1/edit"),
    ("post", "/patients/1/procedures"),
    ("post", "/procedures/1/edit"),
    ("post", "/api/validate/patient?field=code"),
    ("post", "/api/validate/procedure?field=levels&patient_id=1"),
]


@pytest.mark.parametrize("role", ["viewer", "radiologist"])
def test_read_only_roles_get_403_on_every_patient_form_route(
    app_client, logged_in, web_engine, role
):
    token = logged_in(role)
    with db.session_scope(web_engine) as session:
        before = session.scalars(select(AuditEvent.id)).all()
    for method, path in PATIENT_FORM_ROUTES:
        if method == "get":
            response = app_client.get(path)
        else:
            data = {"csrf_token": token, "code": "P991", "study": "WEB", "row_version": "1"}
            response = app_client.post(path, data=data)
        assert response.status_code == 403, (method, path)
    with db.session_scope(web_engine) as session:
        assert session.scalars(select(AuditEvent.id)).all() == before


PATIENT_FORM_POSTS = [
    ("/patients", {"study": "WEB", "code": "P990", "sex": "F"}),
    ("/patients/1/edit", {"row_version": "1", "code": "X1", "sex": "F"}),
    ("/patients/1/procedures", {"procedure_date": "2031-01-01", "level": "L3"}),
    ("/procedures/1/edit", {"row_version": "1", "procedure_date": "2031-01-01", "level": "L3"}),
]


def test_patient_forms_without_csrf_are_refused_and_write_nothing(
    app_client, logged_in, web_engine
):
    logged_in("data_entry")
    with db.session_scope(web_engine) as session:
        before = session.scalars(select(AuditEvent.id)).all()
    for path, data in PATIENT_FORM_POSTS:
        for token in ({}, {"csrf_token": "forged"}):
            assert app_client.post(path, data={**data, **token}).status_code == 403, path
    with db.session_scope(web_engine) as session:
        assert session.scalars(select(AuditEvent.id)).all() == before
