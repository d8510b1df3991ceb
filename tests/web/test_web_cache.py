"""Cached timeline and dashboard pages: built once per role and data change, per-user parts."""

from __future__ import annotations

import sqlite3
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text
from webtest_support import PASSWORD, csrf_of, login

from bmetrack.study import db
from bmetrack.study.models import User, VertebraMeasurement, Visit
from bmetrack.study.users import create_user
from bmetrack.web.app import WebSettings, create_app
from bmetrack.web.cache import DataVersion


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


def _timeline_bme_cell(engine) -> tuple[int, int]:
    """(patient id, measurement id) of a current measurement shown on a timeline."""
    with db.session_scope(engine) as session:
        m = session.scalars(
            select(VertebraMeasurement)
            .join(Visit)
            .where(VertebraMeasurement.superseded_by_id.is_(None), Visit.nominal_month == 0)
            .order_by(VertebraMeasurement.id)
        ).first()
        return m.visit.patient_id, m.id


def test_cached_pages_are_answered_before_routing_with_the_same_bytes(app_client, logged_in):
    logged_in("viewer")
    pages = app_client.app.state.pages
    first = app_client.get("/patients/1/timeline")  # built by the route
    assert pages.fast_hits == 0
    again = app_client.get("/patients/1/timeline")
    assert pages.fast_hits == 1
    assert again.status_code == 200 and again.content == first.content
    for name in ("content-type", "cache-control", "content-security-policy", "x-frame-options"):
        assert again.headers[name] == first.headers[name], name
    # Another path or query string is not the cached page: the route answers it.
    assert app_client.get("/patients/1/timeline?message=saved").status_code == 200
    assert pages.fast_hits == 1


def test_no_stale_page_after_any_committed_write(app_client, logged_in, web_engine):
    """A write outside the app and its audit trail (another connection) still shows at once."""
    logged_in("viewer")
    patient_id, measurement_id = _timeline_bme_cell(web_engine)
    path = f"/patients/{patient_id}/timeline"
    app_client.get(path)
    before = app_client.get(path).text  # from the cache
    assert app_client.app.state.pages.fast_hits == 1
    assert "87.6 %" not in before
    database = web_engine.url.database
    with sqlite3.connect(database) as other:  # not SQLAlchemy, not this app, no audit event
        other.execute(
            "UPDATE vertebra_measurement SET bme_percent = 87.6 WHERE id = ?", (measurement_id,)
        )
    after = app_client.get(path).text
    assert "87.6 %" in after
    assert app_client.get("/dashboard").status_code == 200


def test_fast_path_refuses_deactivated_users_and_bad_cookies(app_client, logged_in, web_engine):
    logged_in("viewer")
    app_client.get("/patients/1/timeline")
    assert app_client.get("/patients/1/timeline").status_code == 200
    cookie = app_client.cookies.get("bmetrack_session")
    forged = cookie[:-2] + ("AA" if not cookie.endswith("AA") else "BB")
    app_client.cookies.clear()
    app_client.cookies.set("bmetrack_session", forged)
    refused = app_client.get("/patients/1/timeline")
    assert refused.status_code == 303 and refused.headers["location"] == "/login"
    app_client.cookies.clear()
    app_client.cookies.set("bmetrack_session", cookie)
    assert app_client.get("/patients/1/timeline").status_code == 200
    with db.session_scope(web_engine) as session:
        session.scalar(select(User).where(User.username == "viewer")).active = False
    gone = app_client.get("/patients/1/timeline")
    assert gone.status_code == 303 and gone.headers["location"] == "/login"


def test_fast_path_checks_session_expiry(web_engine, tmp_path):
    settings = WebSettings(secret_key="k", cache_dir=tmp_path / "c", session_max_age_s=3)
    with TestClient(create_app(web_engine, settings), follow_redirects=False) as client:
        login(client, "viewer")
        assert client.get("/patients/1/timeline").status_code == 200
        assert client.get("/patients/1/timeline").status_code == 200
        assert client.app.state.pages.fast_hits == 1
        time.sleep(4.1)  # itsdangerous counts whole seconds
        expired = client.get("/patients/1/timeline")
        assert expired.status_code == 303 and expired.headers["location"] == "/login"


def _probe_table(engine) -> None:
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE probe (x INTEGER)"))


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_data_version_moves_with_every_commit_and_only_then(backend, tmp_path, request):
    if backend == "sqlite":
        engine = db.make_engine(tmp_path / "v.db")
    else:
        engine = db.make_engine(request.getfixturevalue("postgres_database")(migrated=False))
    _probe_table(engine)
    versions = DataVersion(engine)
    assert versions.exact
    start = versions.current()
    with engine.connect() as connection:
        connection.execute(text("SELECT count(*) FROM probe")).scalar()
    assert versions.current() == start  # reads change nothing
    with engine.connect() as connection:
        connection.execute(text("INSERT INTO probe VALUES (1)"))
        assert versions.current() == start  # not committed yet
        connection.commit()
    after_commit = versions.current()
    assert after_commit != start
    with engine.connect() as connection:
        connection.execute(text("INSERT INTO probe VALUES (2)"))
        connection.rollback()
    if backend == "sqlite":
        assert versions.current() == after_commit  # a rolled-back write is no change
    versions.close()
    engine.dispose()


def test_data_version_falls_back_to_the_audit_counter_in_memory():
    engine = db.make_engine("sqlite://")
    versions = DataVersion(engine)
    assert not versions.exact
    engine.dispose()
