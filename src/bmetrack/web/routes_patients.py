"""Patients and their procedures: create and edit (data entry and admin), audit trail.

Every rule lives in :mod:`bmetrack.study.records`, the functions the importers
call: the forms submit to :func:`records.add_patient`, :func:`records.update_patient`,
:func:`records.add_procedure` and :func:`records.edit_procedure`, and validate as
you type by running the same call through :func:`records.validation_problems`,
which keeps nothing. Edits carry the row version the form was opened at
(optimistic locking); a stale form is refused with a message, nothing is saved.
Only the pseudonymous code is ever asked for or shown: there are no name fields.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from bmetrack.study import records
from bmetrack.study.db import session_scope
from bmetrack.study.models import Patient, Procedure, ProcedureType, Study
from bmetrack.web.app import render
from bmetrack.web.auth import AnyUser, CurrentUser, Editor

__all__ = ["PATIENT_FIELDS", "PROCEDURE_FIELDS", "router"]

router = APIRouter()

PATIENT_FIELDS = ("code", "sex", "birth_year", "enrolled_date", "notes")
PROCEDURE_FIELDS = ("procedure_date", "procedure_type", "notes")
# Problems of one treated-level row are shown together under the level table.
_LEVEL_FIELDS = {"levels", "level", "cement_volume_ml"}
_BLANK_LEVEL_ROWS = 3
_FIX_MESSAGE = "Please correct the fields marked below."


# --------------------------------------------------------------------------- form parsing


def _text(form: Any, name: str) -> str:
    value = form.get(name, "")
    return value if isinstance(value, str) else ""


def _version(form: Any) -> int | None:
    text = _text(form, "row_version").strip()
    return int(text) if text.isdigit() else None


def _patient_values(form: Any) -> dict[str, str]:
    return {name: _text(form, name) for name in PATIENT_FIELDS}


def _procedure_values(form: Any) -> dict[str, str]:
    return {name: _text(form, name) for name in PROCEDURE_FIELDS}


def _level_rows(form: Any) -> list[tuple[str, str]]:
    """(level, cement ml) rows as typed; rows left wholly empty are not rows."""
    levels = [v if isinstance(v, str) else "" for v in form.getlist("level")]
    cements = [v if isinstance(v, str) else "" for v in form.getlist("cement_volume_ml")]
    cements += [""] * (len(levels) - len(cements))
    return [
        (level.strip(), cement.strip())
        for level, cement in zip(levels, cements, strict=False)
        if level.strip() or cement.strip()
    ]


def _optional(values: dict[str, str], names: tuple[str, ...]) -> dict[str, str | None]:
    """Empty text means 'not given' (None) for the parsers, except free text."""
    return {
        name: (values[name] if values[name].strip() or name == "notes" else None) for name in names
    }


def _errors_by_field(problems: list[records.Problem]) -> dict[str, list[str]]:
    errors: dict[str, list[str]] = {}
    for problem in problems:
        if problem.field in _LEVEL_FIELDS:
            where = problem.record.rpartition(", level ")[2] if ", level " in problem.record else ""
            if not where and problem.field == "level":
                where = str(problem.value)
            prefix = f"{where}: " if where else ""
            name = "cement " if problem.field == "cement_volume_ml" else ""
            text = f"{prefix}{name}{problem.reason}"
            errors.setdefault("levels", []).append(text)
        else:
            errors.setdefault(problem.field, []).append(problem.reason)
    return errors


# --------------------------------------------------------------------------- loading


def _patient(session: Session, patient_id: int) -> Patient:
    patient = session.scalar(
        select(Patient)
        .where(Patient.id == patient_id)
        .options(
            selectinload(Patient.procedures).selectinload(Procedure.treated_levels),
            selectinload(Patient.visits),
            selectinload(Patient.study),
        )
    )
    if patient is None:
        raise HTTPException(status_code=404, detail=f"No patient with id {patient_id}.")
    return patient


def _procedure(session: Session, procedure_id: int) -> Procedure:
    procedure = session.get(Procedure, procedure_id)
    if procedure is None:
        raise HTTPException(status_code=404, detail=f"No procedure with id {procedure_id}.")
    return procedure


def _study_codes(session: Session) -> list[str]:
    return list(session.scalars(select(Study.code).order_by(Study.code)))


# --------------------------------------------------------------------------- writes


def _create_patient(
    session: Session, user: CurrentUser, study_code: str, values: dict[str, str]
) -> Patient:
    try:
        study = records.get_study(session, study_code)
    except records.RecordNotFoundError as error:
        problem = records.Problem("new patient", "study", study_code, str(error))
        raise records.ValidationError([problem]) from None
    fields = _optional(values, PATIENT_FIELDS)
    return records.add_patient(
        session,
        study,
        values["code"],
        actor=user.username,
        sex=fields["sex"] or "U",
        birth_year=fields["birth_year"],
        enrolled_date=fields["enrolled_date"],
        notes=values["notes"],
    )


def _update_patient(
    session: Session,
    user: CurrentUser,
    patient_id: int,
    values: dict[str, str],
    version: int | None,
    reason: str,
) -> Patient:
    return records.update_patient(
        session,
        patient_id,
        _optional(values, PATIENT_FIELDS),
        actor=user.username,
        expected_row_version=version,
        reason=reason,
    )


def _add_procedure(
    session: Session,
    user: CurrentUser,
    patient: Patient,
    values: dict[str, str],
    levels: list[tuple[str, str]],
) -> Procedure:
    fields = _optional(values, PROCEDURE_FIELDS)
    return records.add_procedure(
        session,
        patient,
        values["procedure_date"],
        fields["procedure_type"] or ProcedureType.VERTEBROPLASTY,
        [(level, cement or None) for level, cement in levels],
        actor=user.username,
        notes=values["notes"],
    )


def _edit_procedure(
    session: Session,
    user: CurrentUser,
    procedure_id: int,
    values: dict[str, str],
    levels: list[tuple[str, str]],
    version: int | None,
    reason: str,
) -> Procedure:
    return records.edit_procedure(
        session,
        procedure_id,
        _optional(values, PROCEDURE_FIELDS),
        [(level, cement or None) for level, cement in levels],
        actor=user.username,
        expected_row_version=version,
        reason=reason,
    )


def _require_version(version: int | None) -> None:
    if version is None:
        msg = "this form has no version number; reload it and re-apply your change"
        raise records.StaleRecordError(msg)


def _refusal(session: Session, write: Callable[[], object]) -> dict[str, Any] | None:
    """Run a records write; None when it was accepted, else the form's error arguments
    (after rolling back): invalid input 422, a stale form 409."""
    try:
        write()
        session.flush()
    except records.ValidationError as error:
        problems, message = error.problems, ""
    except records.StaleRecordError as error:
        problems, message = [], f"Not saved: {error}"
    else:
        return None
    session.rollback()
    return {
        "errors": _errors_by_field(problems),
        "message": message or _FIX_MESSAGE,
        "status_code": 409 if message else 422,
    }


# --------------------------------------------------------------------------- patient pages


def _patient_form(
    request: Request,
    *,
    patient: Patient | None,
    values: dict[str, str],
    errors: dict[str, list[str]] | None = None,
    message: str = "",
    status_code: int = 200,
    row_version: int | None = None,
    studies: list[str] | None = None,
    study: str = "",
    reason: str = "",
) -> HTMLResponse:
    return render(
        request,
        "patient_form.html",
        status_code=status_code,
        patient=patient,
        values=values,
        errors=errors or {},
        message=message,
        row_version=row_version,
        studies=studies or [],
        study=study,
        reason=reason,
        warnings=records.patient_code_warnings(values.get("code", "")),
    )


@router.get("/patients/new")
def new_patient_form(request: Request, user: Editor) -> Response:
    with session_scope(request.app.state.engine) as session:
        studies = _study_codes(session)
    values = dict.fromkeys(PATIENT_FIELDS, "")
    values["sex"] = "U"
    return _patient_form(
        request, patient=None, values=values, studies=studies, study=studies[0] if studies else ""
    )


@router.post("/patients")
async def create_patient(request: Request, user: Editor) -> Response:
    form = await request.form()
    values = _patient_values(form)
    study = _text(form, "study")
    created: list[Patient] = []
    with session_scope(request.app.state.engine) as session:
        refusal = _refusal(
            session, lambda: created.append(_create_patient(session, user, study, values))
        )
        if refusal is not None:
            return _patient_form(
                request,
                patient=None,
                values=values,
                studies=_study_codes(session),
                study=study,
                **refusal,
            )
        patient_id = created[0].id
    return RedirectResponse(f"/patients/{patient_id}/procedures/new", status_code=303)


@router.get("/patients/{patient_id}/edit")
def edit_patient_form(request: Request, user: Editor, patient_id: int) -> Response:
    with session_scope(request.app.state.engine) as session:
        patient = _patient(session, patient_id)
        values = {
            "code": patient.code,
            "sex": patient.sex,
            "birth_year": "" if patient.birth_year is None else str(patient.birth_year),
            "enrolled_date": "" if patient.enrolled_date is None else str(patient.enrolled_date),
            "notes": patient.notes,
        }
        return _patient_form(
            request, patient=patient, values=values, row_version=patient.row_version
        )


@router.post("/patients/{patient_id}/edit")
async def save_patient(request: Request, user: Editor, patient_id: int) -> Response:
    form = await request.form()
    values = _patient_values(form)
    version = _version(form)
    reason = _text(form, "reason")
    with session_scope(request.app.state.engine) as session:
        _patient(session, patient_id)

        def write() -> None:
            _require_version(version)
            _update_patient(session, user, patient_id, values, version, reason)

        refusal = _refusal(session, write)
        if refusal is None:
            return RedirectResponse(f"/patients/{patient_id}", status_code=303)
        return _patient_form(
            request,
            patient=_patient(session, patient_id),
            values=values,
            row_version=version,
            reason=reason,
            **refusal,
        )


# --------------------------------------------------------------------------- procedure pages


def _procedure_form(
    request: Request,
    *,
    patient: Patient,
    procedure: Procedure | None,
    values: dict[str, str],
    levels: list[tuple[str, str]],
    errors: dict[str, list[str]] | None = None,
    message: str = "",
    status_code: int = 200,
    row_version: int | None = None,
    reason: str = "",
) -> HTMLResponse:
    return render(
        request,
        "procedure_form.html",
        status_code=status_code,
        patient=patient,
        procedure=procedure,
        values=values,
        levels=levels + [("", "")] * _BLANK_LEVEL_ROWS,
        errors=errors or {},
        message=message,
        row_version=row_version,
        reason=reason,
        types=[member.value for member in ProcedureType],
    )


@router.get("/patients/{patient_id}/procedures/new")
def new_procedure_form(request: Request, user: Editor, patient_id: int) -> Response:
    with session_scope(request.app.state.engine) as session:
        patient = _patient(session, patient_id)
        values = dict.fromkeys(PROCEDURE_FIELDS, "")
        values["procedure_type"] = ProcedureType.VERTEBROPLASTY.value
        return _procedure_form(request, patient=patient, procedure=None, values=values, levels=[])


@router.post("/patients/{patient_id}/procedures")
async def create_procedure(request: Request, user: Editor, patient_id: int) -> Response:
    form = await request.form()
    values = _procedure_values(form)
    levels = _level_rows(form)
    with session_scope(request.app.state.engine) as session:
        patient = _patient(session, patient_id)
        refusal = _refusal(session, lambda: _add_procedure(session, user, patient, values, levels))
        if refusal is not None:
            return _procedure_form(
                request,
                patient=_patient(session, patient_id),
                procedure=None,
                values=values,
                levels=levels,
                **refusal,
            )
    return RedirectResponse(f"/patients/{patient_id}", status_code=303)


@router.get("/procedures/{procedure_id}/edit")
def edit_procedure_form(request: Request, user: Editor, procedure_id: int) -> Response:
    with session_scope(request.app.state.engine) as session:
        procedure = _procedure(session, procedure_id)
        values = {
            "procedure_date": str(procedure.procedure_date),
            "procedure_type": procedure.procedure_type.value,
            "notes": procedure.notes,
        }
        levels = [
            (t.level, "" if t.cement_volume_ml is None else f"{t.cement_volume_ml:g}")
            for t in procedure.treated_levels
        ]
        return _procedure_form(
            request,
            patient=procedure.patient,
            procedure=procedure,
            values=values,
            levels=levels,
            row_version=procedure.row_version,
        )


@router.post("/procedures/{procedure_id}/edit")
async def save_procedure(request: Request, user: Editor, procedure_id: int) -> Response:
    form = await request.form()
    values = _procedure_values(form)
    levels = _level_rows(form)
    version = _version(form)
    reason = _text(form, "reason")
    with session_scope(request.app.state.engine) as session:
        patient_id = _procedure(session, procedure_id).patient_id

        def write() -> None:
            _require_version(version)
            _edit_procedure(session, user, procedure_id, values, levels, version, reason)

        refusal = _refusal(session, write)
        if refusal is None:
            return RedirectResponse(f"/patients/{patient_id}", status_code=303)
        procedure = _procedure(session, procedure_id)
        return _procedure_form(
            request,
            patient=procedure.patient,
            procedure=procedure,
            values=values,
            levels=levels,
            row_version=version,
            reason=reason,
            **refusal,
        )


# --------------------------------------------------------------------------- as you type


def _field_fragment(
    request: Request, field: str, problems: list[records.Problem], hints: list[str] | None = None
) -> Response:
    messages = _errors_by_field(problems).get(field, [])
    return render(request, "_field_errors.html", field=field, messages=messages, hints=hints or [])


@router.post("/api/validate/patient")
async def validate_patient_field(
    request: Request, user: Editor, field: str, patient_id: int | None = None
) -> Response:
    """Problems of one field of the patient form (HTMX fragment); nothing is written."""
    form = await request.form()
    values = _patient_values(form)
    study = _text(form, "study")
    write: Callable[[Session], object]
    if patient_id is None:

        def write(session: Session) -> object:
            return _create_patient(session, user, study, values)

    else:
        # Only the fields the form shows: the version is checked on submit.
        def write(session: Session) -> object:
            return _update_patient(session, user, patient_id, values, None, "")

    with session_scope(request.app.state.engine) as session:
        if patient_id is not None:
            _patient(session, patient_id)  # 404 for an unknown patient
        problems = records.validation_problems(session, lambda: write(session))
    hints = records.patient_code_warnings(values["code"]) if field == "code" else []
    return _field_fragment(request, field, problems, hints)


@router.post("/api/validate/procedure")
async def validate_procedure_field(
    request: Request,
    user: Editor,
    field: str,
    patient_id: int,
    procedure_id: int | None = None,
) -> Response:
    """Problems of one field of the procedure form (HTMX fragment); nothing is written."""
    form = await request.form()
    values = _procedure_values(form)
    levels = _level_rows(form)
    with session_scope(request.app.state.engine) as session:
        if procedure_id is None:
            patient = _patient(session, patient_id)
            problems = records.validation_problems(
                session, lambda: _add_procedure(session, user, patient, values, levels)
            )
        else:
            _procedure(session, procedure_id)  # 404 for an unknown procedure
            problems = records.validation_problems(
                session,
                lambda: _edit_procedure(session, user, procedure_id, values, levels, None, ""),
            )
    return _field_fragment(request, field, problems)


# --------------------------------------------------------------------------- audit


@router.get("/patients/{patient_id}/audit")
def patient_audit(request: Request, user: AnyUser, patient_id: int) -> Response:
    with session_scope(request.app.state.engine) as session:
        patient = _patient(session, patient_id)
        events = records.patient_audit(session, patient_id)
        return render(request, "patient_audit.html", patient=patient, events=events)
