"""Radiologist timeline: months side by side per vertebra, slices, accept / override.

Slices are rendered by :func:`bmetrack.imaging.render.render_slice` from the
session's STIR and T1 (T1 resampled onto the STIR grid, so one slice index
shows the same anatomy); with ``overlay=1`` the edema, cement and rim masks of
:func:`bmetrack.imaging.quantify.quantify_study` are drawn. PNG bytes,
volumes and quantifications are kept in bounded LRU caches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload
from starlette.concurrency import run_in_threadpool

from bmetrack.study import records, review
from bmetrack.study.db import session_scope
from bmetrack.study.models import (
    ImagingSession,
    Patient,
    Procedure,
    UserRole,
    VertebraMeasurement,
    Visit,
)
from bmetrack.web.app import render, render_cached
from bmetrack.web.auth import AnyUser, Reviewer
from bmetrack.web.cache import LruCache

router = APIRouter()

SERIES = ("stir", "t1")


class SliceCache:
    """Rendered PNGs (many), loaded volumes and quantifications (few) per imaging session."""

    def __init__(self, folder: Path, max_items: int = 512) -> None:
        self.folder = folder
        self.pngs = LruCache(max_items)
        self.volumes = LruCache(4)
        self.quantified = LruCache(2)

    def volumes_of(self, job: dict[str, str]) -> tuple[Any, Any]:
        from bmetrack.imaging.dicom import read_series

        def load() -> tuple[Any, Any]:
            stir = read_series(job["source_path"], series_uid=job["stir"])
            t1 = read_series(job["source_path"], series_uid=job["t1"])
            if not stir.has_same_geometry(t1):
                t1 = t1.resample_to(stir, order=1, fill_value=np.nan)
            return stir, t1.with_array(np.nan_to_num(t1.array, nan=0.0))

        return self.volumes.get_or_make(job["id"], load)

    def quantification_of(self, job: dict[str, str]) -> Any:
        from bmetrack.imaging.quantify import quantify_study

        def run() -> Any:
            stir, t1 = self.volumes_of(job)
            return quantify_study(stir, t1)

        return self.quantified.get_or_make(job["id"], run)

    def png(self, job: dict[str, str], series: str, index: int, overlay: bool) -> bytes:
        from bmetrack.imaging.render import render_slice

        def draw() -> bytes:
            stir, t1 = self.volumes_of(job)
            image = stir if series == "stir" else t1
            if not 0 <= index < image.shape[0]:
                msg = f"slice {index} is outside 0..{image.shape[0] - 1}"
                raise HTTPException(status_code=404, detail=msg)
            if not overlay:
                return render_slice(image, index, size_px=384)
            study = self.quantification_of(job)
            return render_slice(
                image,
                index,
                overlays=study.quantification.masks,
                labels=study.segmentation.labels,
                level_names=study.level_names,
                size_px=384,
            )

        return self.pngs.get_or_make((job["id"], series, index, overlay), draw)


def _job(imaging: ImagingSession) -> dict[str, str] | None:
    """What locates the images of a session, or None when they are not on disk."""
    if not imaging.stir_series_uid or not imaging.t1_series_uid or not imaging.source_path:
        return None
    if not Path(imaging.source_path).exists():
        return None
    return {
        "id": str(imaging.id),
        "source_path": imaging.source_path,
        "stir": imaging.stir_series_uid,
        "t1": imaging.t1_series_uid,
    }


def _imaging_job(session: Session, imaging_session_id: int) -> dict[str, str]:
    imaging = session.get(ImagingSession, imaging_session_id)
    if imaging is None:
        raise HTTPException(status_code=404, detail=f"No imaging session {imaging_session_id}.")
    job = _job(imaging)
    if job is None:
        raise HTTPException(status_code=404, detail="The images of this session are not on disk.")
    return job


def _slice_count(request: Request, job: dict[str, str]) -> int:
    stir, _ = request.app.state.slices.volumes_of(job)
    return int(stir.shape[0])


def timeline_context(session: Session, patient_id: int) -> dict[str, Any]:
    patient = session.scalar(
        select(Patient)
        .where(Patient.id == patient_id)
        .options(
            selectinload(Patient.visits).selectinload(Visit.measurements),
            selectinload(Patient.visits).selectinload(Visit.imaging_sessions),
            selectinload(Patient.procedures).selectinload(Procedure.treated_levels),
        )
    )
    if patient is None:
        raise HTTPException(status_code=404, detail=f"No patient with id {patient_id}.")
    months = [int(m) for m in patient.study.nominal_months]
    treated = {t.level for p in patient.procedures for t in p.treated_levels}
    measured = {m.level for v in patient.visits for m in v.measurements}
    levels = records.sort_levels(treated | measured)
    by_month: dict[int, Visit] = {}
    for visit in sorted(patient.visits, key=lambda v: v.visit_date):
        if visit.nominal_month is not None and visit.nominal_month not in by_month:
            by_month[visit.nominal_month] = visit
    current_ids = [
        m.id for v in patient.visits for m in v.measurements if m.superseded_by_id is None
    ]
    reviewed = review.reviewed_measurement_ids(session, current_ids)
    rows = []
    for level in levels:
        cells = []
        for month in months:
            cell_visit = by_month.get(month)
            measurement = (
                None if cell_visit is None else records.current_measurement_at(cell_visit, level)
            )
            imaging = None
            if cell_visit is not None:
                imaging = next(
                    (s for s in cell_visit.imaging_sessions if _job(s) is not None), None
                )
            cells.append(
                {
                    "month": month,
                    "visit": cell_visit,
                    "m": measurement,
                    "reviewed": measurement is not None and measurement.id in reviewed,
                    "imaging_id": None if imaging is None else imaging.id,
                    "has_session": cell_visit is not None and bool(cell_visit.imaging_sessions),
                }
            )
        rows.append({"level": level, "treated": level in treated, "cells": cells})
    return {"patient": patient, "months": months, "rows": rows}


def _timeline_with_message(
    request: Request, patient_id: int, can_review: bool, message: str
) -> Response:
    with session_scope(request.app.state.engine) as session:
        context = timeline_context(session, patient_id)
        return render(request, "timeline.html", can_review=can_review, message=message, **context)


@router.get("/patients/{patient_id}/timeline")
async def timeline(request: Request, user: AnyUser, patient_id: int) -> Response:
    can_review = user.can(UserRole.RADIOLOGIST, UserRole.ADMIN)
    message = request.query_params.get("message", "")
    if message:  # after a form: this user's message, not a shared page
        return await run_in_threadpool(
            _timeline_with_message, request, patient_id, can_review, message
        )
    return await render_cached(
        request,
        user,
        ("timeline", patient_id),
        "timeline.html",
        lambda session: {
            "can_review": can_review,
            "message": "",
            **timeline_context(session, patient_id),
        },
    )


@router.get("/images/{imaging_session_id}/{series}/{index}.png")
def slice_png(
    request: Request,
    user: AnyUser,
    imaging_session_id: int,
    series: str,
    index: int,
    overlay: int = 1,
) -> Response:
    if series not in SERIES:
        raise HTTPException(status_code=404, detail=f"series must be one of {SERIES}")
    with session_scope(request.app.state.engine) as session:
        job = _imaging_job(session, imaging_session_id)
    data = request.app.state.slices.png(job, series, index, bool(overlay))
    return Response(
        data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"}
    )


@router.get("/fragments/slices/{imaging_session_id}")
def slice_viewer(
    request: Request,
    user: AnyUser,
    imaging_session_id: int,
    index: int | None = None,
    overlay: int = 1,
) -> Response:
    """STIR and T1 of one slice with previous/next buttons (HTMX swaps this fragment)."""
    with session_scope(request.app.state.engine) as session:
        job = _imaging_job(session, imaging_session_id)
    n_slices = _slice_count(request, job)
    index = n_slices // 2 if index is None else min(max(index, 0), n_slices - 1)
    return render(
        request,
        "_slices.html",
        imaging_id=imaging_session_id,
        index=index,
        n_slices=n_slices,
        overlay=overlay,
    )


def _back(patient_id: int, message: str) -> Response:
    from urllib.parse import urlencode

    query = urlencode({"message": message})
    return RedirectResponse(f"/patients/{patient_id}/timeline?{query}", status_code=303)


def _expected(text: str) -> int | None:
    return int(text) if text.strip().isdigit() else None


@router.post("/measurements/{measurement_id}/accept")
def accept(
    request: Request,
    user: Reviewer,
    measurement_id: int,
    row_version: str = Form(""),
) -> Response:
    with session_scope(request.app.state.engine) as session:
        measurement = session.get(VertebraMeasurement, measurement_id)
        if measurement is None:
            raise HTTPException(status_code=404, detail=f"No measurement {measurement_id}.")
        patient_id = measurement.visit.patient_id
        try:
            review.accept_measurement(
                session,
                measurement_id,
                actor=user.username,
                expected_row_version=_expected(row_version),
            )
        except records.StaleRecordError as error:
            session.rollback()
            return _back(patient_id, f"Not saved: {error}")
        message = f"Accepted {measurement.level}."
    return _back(patient_id, message)


@router.post("/measurements/{measurement_id}/override")
def override(
    request: Request,
    user: Reviewer,
    measurement_id: int,
    bme_percent: str = Form(""),
    genant_grade: str = Form(""),
    level: str = Form(""),
    reason: str = Form(""),
    row_version: str = Form(""),
) -> Response:
    with session_scope(request.app.state.engine) as session:
        measurement = session.get(VertebraMeasurement, measurement_id)
        if measurement is None:
            raise HTTPException(status_code=404, detail=f"No measurement {measurement_id}.")
        patient_id = measurement.visit.patient_id
        changes = {}
        if bme_percent.strip():
            changes["bme_percent"] = bme_percent
        if genant_grade.strip():
            changes["genant_grade"] = genant_grade
        # The form shows the current level: only a different one is a change.
        if level.strip() and level.strip().upper() != measurement.level.upper():
            changes["level"] = level
        try:
            if not changes:
                raise records.ValidationError(
                    [
                        records.Problem(
                            f"measurement {measurement_id}",
                            "bme_percent",
                            "",
                            "give a new BME percent, Genant grade or level",
                        )
                    ]
                )
            new = records.override_measurement(
                session,
                measurement_id,
                changes,
                actor=user.username,
                reason=reason,
                expected_row_version=_expected(row_version),
            )
            session.flush()
            message = f"Overrode {new.level}."
        except records.ValidationError as error:
            session.rollback()
            reasons = "; ".join(f"{p.field}: {p.reason}" for p in error.problems)
            return _back(patient_id, f"Not saved: {reasons}")
        except records.StaleRecordError as error:
            session.rollback()
            return _back(patient_id, f"Not saved: {error}")
    return _back(patient_id, message)


@router.get("/measurements/{measurement_id}/audit")
def audit_trail(request: Request, user: AnyUser, measurement_id: int) -> Response:
    with session_scope(request.app.state.engine) as session:
        try:
            chain = review.measurement_chain(session, measurement_id)
        except records.RecordNotFoundError as error:
            raise HTTPException(status_code=404, detail=str(error)) from None
        events = review.measurement_audit(session, measurement_id)
        patient = chain[0].visit.patient
        return render(
            request, "audit.html", chain=chain, events=events, patient=patient, level=chain[0].level
        )
