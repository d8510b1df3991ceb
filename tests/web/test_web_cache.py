"""Cached timeline and dashboard pages: built once per role and data change, per-user parts."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import select
from webtest_support import PASSWORD, csrf_of, login

from bmetrack.study import db
from bmetrack.study.models import VertebraMeasurement
from bmetrack.study.users import create_user


def test_timeline_is_built_once_and_each_user_gets_their_own_token(
    app_client, logged_in, web_engine
):
    cache = app_client.app.state.pages
    pages = cache.pages
    token = logged_in("radiologist")
    with db.session_scope(web_engine) as session:
        create_user(session, "second.rad", PASSWORD, "radiologist", actor="test")
    first = app_client.get("/patients/1/timeline").text
    builds = pages.builds
    assert app_client.get("/patients/1/timeline").text == first
    assert pages.builds == builds  # served from the cache
    assert csrf_of(first) == token and "radiologist (radiologist)" in first
    assert cache.csrf_marker not in first and cache.user_marker not in first

    with TestClient(app_client.app, follow_redirects=False) as other:
        other_token = login(other, "second.rad")
        page = other.get("/patients/1/timeline").text
    assert pages.builds == builds  # same role, same data: the same cached page
    assert csrf_of(page) == other_token != token
    assert "second.rad (radiologist)" in page and "radiologist (radiologist)" not in page
    assert token not in page

    viewer = TestClient(app_client.app, follow_redirects=False)
    login(viewer, "viewer")
    assert "Save override" not in viewer.get("/patients/1/timeline").text  # role in the key
    assert pages.builds == builds + 1


def test_a_write_makes_the_cached_pages_new(app_client, logged_in, web_engine):
    token = logged_in("radiologist")
    with db.session_scope(web_engine) as session:
        m = session.scalars(
            select(VertebraMeasurement)
            .where(VertebraMeasurement.superseded_by_id.is_(None))
            .order_by(VertebraMeasurement.id)
        ).first()
        mid, version, patient_id = m.id, m.row_version, m.visit.patient_id
    before = app_client.get(f"/patients/{patient_id}/timeline").text
    app_client.get("/dashboard")
    assert "cache-check reason" not in before
    data = {
        "csrf_token": token,
        "row_version": version,
        "bme_percent": "12.5",
        "reason": "cache-check reason",
    }
    assert app_client.post(f"/measurements/{mid}/override", data=data).status_code == 303
    after = app_client.get(f"/patients/{patient_id}/timeline").text
    assert "cache-check reason" in after and "12.5 %" in after
