"""Study dashboard: key numbers and figures live from the database, worklist, downloads.

The numbers and figures are those of the report (:func:`analysis.run.analyse_and_draw`
on :func:`study.exporters.export_frames`), recomputed only when the database
changed: the cache key is the newest audit event id, which every write through
:mod:`bmetrack.study.records` advances.
"""

from __future__ import annotations

import io
import shutil
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, Response
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from bmetrack.study.db import session_scope
from bmetrack.study.models import Study
from bmetrack.study.review import worklist
from bmetrack.web.app import render_cached
from bmetrack.web.auth import AnyUser
from bmetrack.web.cache import change_counter

__all__ = ["DashboardCache", "DashboardData", "change_counter", "key_numbers", "router"]

router = APIRouter()


@dataclass(frozen=True)
class DashboardData:
    counter: int
    results: dict[str, Any]
    figures: dict[str, Path]
    error: str = ""


class DashboardCache:
    """Analysis results and figures per study, rebuilt when the change counter moves."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._data: dict[str, DashboardData] = {}
        self._lock = threading.Lock()

    def get(self, engine: Engine, study_code: str) -> DashboardData:
        counter = change_counter(engine)
        cached = self._data.get(study_code)
        if cached is not None and cached.counter == counter:
            return cached
        with self._lock:
            cached = self._data.get(study_code)
            if cached is not None and cached.counter == counter:
                return cached
            data = self._build(engine, study_code, counter)
            self._data[study_code] = data
            return data

    def _build(self, engine: Engine, study_code: str, counter: int) -> DashboardData:
        from bmetrack.analysis.run import analyse_and_draw
        from bmetrack.study.exporters import export_frames

        folder = self.folder / f"{_safe(study_code)}-{counter}"
        shutil.rmtree(folder, ignore_errors=True)
        try:
            frames = export_frames(engine, study_code)
            run = analyse_and_draw(frames, folder, study_code=study_code)
        except Exception as error:  # too little data etc.: show why, keep the page up
            return DashboardData(counter, {}, {}, error=f"{type(error).__name__}: {error}")
        return DashboardData(counter, run.results, dict(run.figures))


def _safe(code: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in code)


def _by_month(mapping: Any, month: int) -> Any:
    if not isinstance(mapping, dict):
        return None
    return mapping.get(month, mapping.get(str(month)))


def key_numbers(results: dict[str, Any], months: list[int]) -> list[dict[str, Any]]:
    """One row per nominal month: BME median/mean, % with BME, VAS median (from results)."""
    bme = results.get("bme", {})
    vas = results.get("vas", {})
    rows = []
    for month in months:
        summary = _by_month(bme.get("summary_by_month"), month) or {}
        present = _by_month(bme.get("present_by_month"), month) or {}
        vas_summary = _by_month(vas.get("summary_by_month"), month) or {}
        rows.append(
            {
                "month": month,
                "n_vcf": summary.get("n"),
                "bme_median": summary.get("median"),
                "bme_mean": summary.get("mean"),
                "bme_present_percent": present.get("percent"),
                "vas_median": vas_summary.get("median"),
            }
        )
    return rows


def _study(request: Request, code: str | None) -> Study:
    with session_scope(request.app.state.engine) as session:
        studies = list(session.scalars(select(Study).order_by(Study.code)))
        if not studies:
            raise HTTPException(status_code=404, detail="The database holds no study yet.")
        if code is None:
            return studies[0]
        for study in studies:
            if study.code == code:
                return study
    raise HTTPException(status_code=404, detail=f"No study {code!r}.")


@router.get("/dashboard")
async def dashboard(request: Request, user: AnyUser, study: str | None = None) -> Response:
    engine = request.app.state.engine

    def context(session: Session) -> dict[str, Any]:
        codes = list(session.scalars(select(Study.code).order_by(Study.code)))
        if not codes:
            return {"study": None, "codes": [], "data": None, "numbers": [], "items": []}
        chosen = _study(request, study)
        data = request.app.state.dashboard.get(engine, chosen.code)
        months = [int(m) for m in chosen.nominal_months]
        return {
            "study": chosen,
            "codes": codes,
            "data": data,
            "numbers": key_numbers(data.results, months),
            "items": worklist(session, session.get_one(Study, chosen.id)),
        }

    return await render_cached(request, user, ("dashboard", study), "dashboard.html", context)


@router.get("/dashboard/figures/{study_code}/{counter}/{name}.png")
def figure(
    request: Request,
    user: AnyUser,
    study_code: str,
    counter: int,
    name: str,
) -> Response:
    data = request.app.state.dashboard.get(request.app.state.engine, study_code)
    path = data.figures.get(name)
    if path is None or not Path(path).exists():
        raise HTTPException(status_code=404, detail=f"No figure {name!r}.")
    # The URL names the counter, so a cached copy is right for as long as it is asked for.
    return FileResponse(
        path, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"}
    )


@router.get("/downloads/{study_code}/tables.zip")
def download_tables(request: Request, user: AnyUser, study_code: str) -> Response:
    from bmetrack.study.exporters import export_frames, write_csv

    study = _study(request, study_code)
    frames = export_frames(request.app.state.engine, study.code)
    buffer = io.BytesIO()
    with tempfile.TemporaryDirectory() as folder:
        paths = write_csv(frames, folder)
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in paths.values():
                archive.write(path, arcname=Path(path).name)
    name = f"{_safe(study.code)}-tables.zip"
    return Response(
        buffer.getvalue(),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


@router.get("/downloads/{study_code}/redcap.csv")
def download_redcap(request: Request, user: AnyUser, study_code: str) -> Response:
    from bmetrack.study.redcap import export_redcap

    study = _study(request, study_code)
    text = export_redcap(request.app.state.engine, study.code).to_csv(index=False)
    name = f"{_safe(study.code)}-redcap.csv"
    return Response(
        text,
        media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


@router.get("/downloads/{study_code}/report.{kind}")
def download_report(request: Request, user: AnyUser, study_code: str, kind: str) -> Response:
    from bmetrack.analysis.run import report_from_database

    if kind not in ("html", "pdf"):
        raise HTTPException(status_code=404, detail="report.html or report.pdf")
    study = _study(request, study_code)
    engine = request.app.state.engine
    counter = change_counter(engine)
    folder = request.app.state.cache_dir / "reports" / f"{_safe(study.code)}-{counter}-{kind}"
    path = folder / f"report.{kind}"
    if not path.exists():
        report_from_database(engine, study.code, folder, write_pdf=kind == "pdf")
    media = "text/html" if kind == "html" else "application/pdf"
    return FileResponse(path, media_type=media, filename=f"{_safe(study.code)}-report.{kind}")
