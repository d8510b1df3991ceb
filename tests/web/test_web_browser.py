"""Real headless Chromium (Debian chromium via Playwright) against a live uvicorn server."""

from __future__ import annotations

import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from webtest_support import PASSWORD

from bmetrack.study import db
from bmetrack.study.models import TreatedLevel, VertebraMeasurement, Visit
from bmetrack.web.app import WebSettings, create_app

CHROMIUM = Path("/usr/bin/chromium")
# Screenshots of the main pages are kept after the run (ignored by git) for a human to look at.
SCREENSHOT_DIR = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium (/usr/bin/chromium) missing"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def server(tmp_path, web_template):
    import uvicorn

    path = tmp_path / "study.db"
    shutil.copyfile(web_template, path)
    engine = db.make_engine(path)
    app = create_app(engine, WebSettings(secret_key="browser-test", cache_dir=tmp_path / "cache"))
    port = _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    for _ in range(100):
        if uv.started:
            break
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}", engine
    uv.should_exit = True
    thread.join(timeout=10)
    engine.dispose()


def _shot(page, name: str) -> None:
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    target = SCREENSHOT_DIR / f"web_{name}.png"
    page.screenshot(path=str(target), full_page=True)
    assert target.stat().st_size > 1000, f"screenshot {target} is empty"


def _login(page, base: str, user: str) -> None:
    page.goto(f"{base}/login")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(".*/dashboard.*"))


def test_browser_workflows(server, tmp_path):
    from playwright.sync_api import sync_playwright

    base, engine = server
    with db.session_scope(engine) as session:
        treated = {(t.procedure.patient_id, t.level) for t in session.scalars(select(TreatedLevel))}
        rows = session.execute(
            select(VertebraMeasurement, Visit)
            .join(Visit)
            .where(VertebraMeasurement.superseded_by_id.is_(None), Visit.nominal_month == 0)
        ).all()
        m, visit = next((m, v) for m, v in rows if (v.patient_id, m.level) in treated)
        mid, patient_id, old_bme = m.id, visit.patient_id, m.bme_percent
        last = max(visit.patient.visits, key=lambda v: v.visit_date).visit_date
    new_date = last.replace(year=last.year + 1).isoformat()
    args = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=args)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        # Research nurse: VAS 12 on 0-10 is refused as you type and on submit, then fixed.
        _login(page, base, "data_entry")
        # A new patient through the pages: a birth year of 1800 is refused as you type.
        page.goto(f"{base}/patients")
        page.click("#new-patient")
        page.fill("input[name=code]", "P777")
        page.select_option("select[name=sex]", "F")
        page.fill("input[name=birth_year]", "1800")
        page.wait_for_selector("#err-birth_year .field-error")
        assert "must be at least 1890" in page.inner_text("#err-birth_year")
        _shot(page, "patient_form_error")
        page.fill("input[name=birth_year]", "1948")
        for _ in range(50):
            if not page.inner_text("#err-birth_year").strip():
                break
            page.wait_for_timeout(100)
        assert not page.inner_text("#err-birth_year").strip()
        page.click("button:has-text('Save patient')")
        page.wait_for_url(re.compile(r".*/patients/\d+/procedures/new$"))
        page.fill("input[name=procedure_date]", "2024-03-05")
        page.locator("input[name=level]").first.fill("T12")
        page.locator("input[name=cement_volume_ml]").first.fill("3")
        _shot(page, "procedure_form")
        page.click("button:has-text('Save procedure')")
        page.wait_for_url(re.compile(r".*/patients/\d+$"))
        assert "Patient P777" in page.content()
        assert "T12 (3.0 ml)" in page.inner_text("#procedures")
        _shot(page, "patient_created")
        page.goto(f"{base}/patients/{patient_id}/visits/new")
        page.fill("input[name=visit_date]", new_date)
        page.fill("input[name=analgesic_drugs]", "tramadol")
        page.wait_for_selector("#drug-class >> text=WHO class 2")
        page.fill("input[name=vas]", "12")
        page.wait_for_selector("#err-vas .field-error")
        assert "must be 0-10" in page.inner_text("#err-vas")
        _shot(page, "visit_form_error")
        page.click("button:has-text('Save visit')")
        page.wait_for_selector("#form-message")
        assert "must be 0-10" in page.inner_text("#err-vas")
        page.select_option("select[name=vas_unit]", "mm")
        for _ in range(50):  # the live check clears the error (no eval: the CSP forbids it)
            if not page.inner_text("#err-vas").strip():
                break
            page.wait_for_timeout(100)
        assert not page.inner_text("#err-vas").strip()
        page.click("button:has-text('Save visit')")
        page.wait_for_url(re.compile(f".*/patients/{patient_id}$"))
        assert new_date in page.content()
        _shot(page, "patient")
        page.click("button:has-text('Log out')")

        # Radiologist: override a BME value with a reason; audit trail and dashboard change.
        _login(page, base, "radiologist")
        before = page.inner_text("tr[data-month='0'] .bme-mean")
        _shot(page, "dashboard_before")
        page.goto(f"{base}/patients/{patient_id}/timeline")
        card = page.locator(f"dl[data-measurement='{mid}']").locator("xpath=..")
        card.locator("summary:has-text('Override')").click()
        new_bme = "0" if old_bme > 50 else "100"
        card.locator("input[name=bme_percent]").fill(new_bme)
        card.locator("input[name=reason]").fill("cement artefact counted as edema")
        _shot(page, "timeline_override")
        card.locator("button:has-text('Save override')").click()
        page.wait_for_selector("#message")
        assert "Overrode" in page.inner_text("#message")
        page.goto(f"{base}/measurements/{mid}/audit")
        assert "cement artefact counted as edema" in page.content()
        _shot(page, "audit")
        page.goto(f"{base}/dashboard")
        after = page.inner_text("tr[data-month='0'] .bme-mean")
        assert after != before
        _shot(page, "dashboard_after")
        page.click("button:has-text('Log out')")

        # Viewer: no edit forms, and a direct attempt is refused.
        _login(page, base, "viewer")
        response = page.goto(f"{base}/patients/{patient_id}/visits/new")
        assert response is not None and response.status == 403
        assert "may not do this" in page.content()
        _shot(page, "viewer_refused")
        page.goto(f"{base}/patients/{patient_id}/timeline")
        assert page.locator("text=Save override").count() == 0
        browser.close()
