"""Patients, visits and the visit form (research nurse).

The form validates as you type (HTMX posts the form to /api/validate/visit,
which runs the validators of :mod:`bmetrack.study.records` that the importers
use) and on submit (:func:`records.add_visit` / :func:`records.update_assessment`).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from bmetrack.study import records
from bmetrack.study.analgesics import (
    ANALGESIC_CLASS_NAMES,
    UnknownDrugError,
    drug_lookup,
    split_drug_list,
)
from bmetrack.study.db import session_scope
from bmetrack.study.models import Patient, Procedure, Visit
from bmetrack.web.app import render
from bmetrack.web.auth import AnyUser, Editor

router = APIRouter()

VISIT_FIELDS = (
    "visit_date",
    "nominal_month",
    "vas",
    "vas_unit",
    "analgesic_drugs",
    "analgesic_class",
    "pain_other_level",
    "new_vcf_levels",
    "notes",
)


def _patient(session: Session, patient_id: int) -> Patient:
    patient = session.scalar(
        select(Patient)
        .where(Patient.id == patient_id)
        .options(
            selectinload(Patient.visits).selectinload(Visit.assessment),
            selectinload(Patient.procedures).selectinload(Procedure.treated_levels),
            selectinload(Patient.new_vcf_events),
        )
    )
    if patient is None:
        raise HTTPException(status_code=404, detail=f"No patient with id {patient_id}.")
    return patient


def _form_values(form: Any) -> dict[str, str]:
    return {name: str(form.get(name, "")) for name in VISIT_FIELDS}


def _levels(text: str) -> list[str]:
    return [part.strip() for part in text.replace(";", ",").split(",") if part.strip()]


def _errors_by_field(problems: list[records.Problem]) -> dict[str, list[str]]:
    errors: dict[str, list[str]] = {}
    for problem in problems:
        text = problem.reason
        if problem.field == "analgesic_drugs" and problem.value not in (None, ""):
            text = f"{problem.value}: {problem.reason}"
        errors.setdefault(problem.field, []).append(text)
    return errors


def _visit_problems(
    session: Session, patient: Patient, values: dict[str, str], new: bool
) -> list[records.Problem]:
    """Every problem of the form, found by the library's validators (nothing is written)."""
    record = f"visit of patient {patient.code}"
    assessment = {name: values[name] for name in records.ASSESSMENT_FIELDS if name in values}
    _, problems = records.validate_assessment(assessment, record)
    if new:
        check = records.FieldChecker(record)
        date = check.parse(values, "visit_date", records.parse_date, required=True)
        month = check.parse(values, "nominal_month", records.parse_int, minimum=0)
        settings = records.study_settings(patient.study)
        problems += check.problems + records.check_nominal_month(month, record, settings)
        if date is not None:
            problems += records.validate_visit_date(
                date,
                record,
                birth_year=patient.birth_year,
                first_procedure_date=records.first_procedure_date(patient),
                settings=settings,
            )
        _, new_vcf_problems = records.vcf_problems(
            patient, _levels(values.get("new_vcf_levels", "")), record
        )
        problems += new_vcf_problems
    return problems


@router.get("/")
def home(user: AnyUser) -> Response:
    return RedirectResponse("/dashboard", status_code=303)


@router.get("/patients")
def patients(request: Request, user: AnyUser) -> Response:
    with session_scope(request.app.state.engine) as session:
        rows = session.scalars(
            select(Patient)
            .options(selectinload(Patient.visits), selectinload(Patient.study))
            .order_by(Patient.study_id, Patient.code)
        ).all()
        listing = [
            {
                "id": p.id,
                "code": p.code,
                "study": p.study.code,
                "sex": p.sex,
                "n_visits": len(p.visits),
            }
            for p in rows
        ]
    return render(request, "patients.html", patients=listing)


@router.get("/patients/{patient_id}")
def patient_page(request: Request, user: AnyUser, patient_id: int) -> Response:
    with session_scope(request.app.state.engine) as session:
        patient = _patient(session, patient_id)
        return render(
            request,
            "patient.html",
            patient=patient,
            visits=sorted(patient.visits, key=lambda v: v.visit_date),
            class_names=ANALGESIC_CLASS_NAMES,
        )


def _form_page(
    request: Request,
    patient: Patient,
    visit: Visit | None,
    values: dict[str, str],
    errors: dict[str, list[str]],
    message: str = "",
    status_code: int = 200,
    row_version: int | None = None,
) -> HTMLResponse:
    return render(
        request,
        "visit_form.html",
        status_code=status_code,
        patient=patient,
        visit=visit,
        values=values,
        errors=errors,
        message=message,
        row_version=row_version,
    )


@router.get("/patients/{patient_id}/visits/new")
def new_visit_form(request: Request, user: Editor, patient_id: int) -> Response:
    with session_scope(request.app.state.engine) as session:
        patient = _patient(session, patient_id)
        values = dict.fromkeys(VISIT_FIELDS, "")
        values["vas_unit"] = "0-10"
        return _form_page(request, patient, None, values, {})


@router.post("/patients/{patient_id}/visits")
async def create_visit(request: Request, user: Editor, patient_id: int) -> Response:
    values = _form_values(await request.form())
    with session_scope(request.app.state.engine) as session:
        patient = _patient(session, patient_id)
        try:
            records.add_visit(
                session,
                patient,
                values["visit_date"],
                actor=user.username,
                nominal_month=values["nominal_month"] or None,
                vas=values["vas"] or None,
                vas_unit=values["vas_unit"] or "0-10",
                analgesic_drugs=values["analgesic_drugs"],
                analgesic_class=values["analgesic_class"] or None,
                pain_other_level=values["pain_other_level"] or None,
                notes=values["notes"],
                new_vcf_levels=_levels(values["new_vcf_levels"]),
            )
            session.flush()
        except records.ValidationError as error:
            session.rollback()
            patient = _patient(session, patient_id)
            return _form_page(
                request,
                patient,
                None,
                values,
                _errors_by_field(error.problems),
                message="Please correct the fields marked below.",
                status_code=422,
            )
    return RedirectResponse(f"/patients/{patient_id}", status_code=303)


def _visit(session: Session, visit_id: int) -> Visit:
    visit = session.get(Visit, visit_id)
    if visit is None:
        raise HTTPException(status_code=404, detail=f"No visit with id {visit_id}.")
    return visit


@router.get("/visits/{visit_id}/edit")
def edit_visit_form(request: Request, user: Editor, visit_id: int) -> Response:
    with session_scope(request.app.state.engine) as session:
        visit = _visit(session, visit_id)
        clinical = visit.assessment
        values = dict.fromkeys(VISIT_FIELDS, "")
        values["visit_date"] = visit.visit_date.isoformat()
        values["vas_unit"] = "0-10"
        if clinical is not None:
            values.update(
                vas="" if clinical.vas_entered is None else f"{clinical.vas_entered:g}",
                vas_unit=clinical.vas_unit,
                analgesic_drugs=clinical.analgesic_drugs,
                analgesic_class=""
                if clinical.analgesic_class is None
                else str(clinical.analgesic_class),
                pain_other_level={None: "", True: "yes", False: "no"}[clinical.pain_other_level],
                notes=clinical.notes,
            )
        version = clinical.row_version if clinical is not None else None
        return _form_page(request, visit.patient, visit, values, {}, row_version=version)


@router.post("/visits/{visit_id}/assessment")
async def save_assessment(request: Request, user: Editor, visit_id: int) -> Response:
    form = await request.form()
    values = _form_values(form)
    version_text = str(form.get("row_version", "")).strip()
    expected = int(version_text) if version_text.isdigit() else None
    changes = {name: values[name] or None for name in records.ASSESSMENT_FIELDS}
    changes["analgesic_drugs"] = values["analgesic_drugs"]
    changes["notes"] = values["notes"]
    changes["vas_unit"] = values["vas_unit"] or "0-10"
    with session_scope(request.app.state.engine) as session:
        visit = _visit(session, visit_id)
        patient_id = visit.patient_id
        try:
            if visit.assessment is not None and expected is None:
                raise records.StaleRecordError(
                    "this form has no version number; reload it and re-apply your change"
                )
            records.update_assessment(
                session, visit_id, changes, actor=user.username, expected_row_version=expected
            )
            session.flush()
        except records.ValidationError as error:
            session.rollback()
            visit = _visit(session, visit_id)
            return _form_page(
                request,
                visit.patient,
                visit,
                values,
                _errors_by_field(error.problems),
                message="Please correct the fields marked below.",
                status_code=422,
                row_version=expected,
            )
        except records.StaleRecordError as error:
            session.rollback()
            visit = _visit(session, visit_id)
            return _form_page(
                request,
                visit.patient,
                visit,
                values,
                {},
                message=f"Not saved: {error}",
                status_code=409,
                row_version=expected,
            )
    return RedirectResponse(f"/patients/{patient_id}", status_code=303)


@router.post("/api/validate/visit/{patient_id}")
async def validate_field(
    request: Request,
    user: Editor,
    patient_id: int,
    field: str,
    new: int = 1,
) -> Response:
    """Problems of one field of the visit form, as an HTML fragment (HTMX)."""
    values = _form_values(await request.form())
    with session_scope(request.app.state.engine) as session:
        patient = _patient(session, patient_id)
        errors = _errors_by_field(_visit_problems(session, patient, values, bool(new)))
    return render(request, "_field_errors.html", field=field, messages=errors.get(field, []))


@router.get("/api/drug-class")
def drug_class(request: Request, user: Editor, analgesic_drugs: str = "") -> Response:
    """WHO class of the drugs typed so far (HTMX fragment)."""
    drugs = split_drug_list(analgesic_drugs)
    lookup = drug_lookup()
    classes: list[int] = []
    unknown: list[str] = []
    for drug in drugs:
        try:
            classes.append(lookup.classify(drug))
        except UnknownDrugError as error:
            unknown.append(str(error))
    return render(
        request,
        "_drug_class.html",
        drugs=drugs,
        klass=max(classes) if classes and not unknown else None,
        class_names=ANALGESIC_CLASS_NAMES,
        unknown=unknown,
    )
