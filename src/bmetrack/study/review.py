"""Radiologist review of measurements: accept, history, audit trail, worklist.

A measurement is *reviewed* once a radiologist accepted it (an ``accept``
audit event, written by :func:`accept_measurement`) or overrode it (the
``override`` events of :func:`bmetrack.study.records.override_measurement`).
A visit is on the worklist while it has current measurements that are not
manual and none of the measurements of that visit has been reviewed.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from bmetrack.study.models import (
    AuditEvent,
    ImagingSession,
    MeasurementSource,
    Patient,
    Study,
    VertebraMeasurement,
    Visit,
)
from bmetrack.study.records import (
    RecordNotFoundError,
    StaleRecordError,
    require_actor,
)

__all__ = [
    "REVIEW_ACTIONS",
    "WorklistItem",
    "accept_measurement",
    "measurement_audit",
    "measurement_chain",
    "reviewed_measurement_ids",
    "worklist",
]

REVIEW_ACTIONS = ("accept", "override")
_ENTITY = VertebraMeasurement.__tablename__


def _get(session: Session, measurement_id: int) -> VertebraMeasurement:
    measurement = session.get(VertebraMeasurement, measurement_id)
    if measurement is None:
        msg = f"No measurement with id {measurement_id}."
        raise RecordNotFoundError(msg)
    return measurement


def accept_measurement(
    session: Session,
    measurement_id: int,
    *,
    actor: str,
    reason: str = "",
    expected_row_version: int | None = None,
) -> VertebraMeasurement:
    """Record that ``actor`` checked the current measurement and agrees with it.

    The row is not changed; an ``accept`` audit event is written.
    StaleRecordError when it was overridden or changed since the user opened it.
    """
    require_actor(actor)
    measurement = _get(session, measurement_id)
    if measurement.superseded_by_id is not None:
        msg = (
            f"measurement {measurement.id} ({measurement.level}) was already replaced by "
            f"measurement {measurement.superseded_by_id}; reload and review the current value"
        )
        raise StaleRecordError(msg)
    if expected_row_version is not None and measurement.row_version != expected_row_version:
        msg = (
            f"measurement {measurement.id} ({measurement.level}) was changed by someone else "
            f"since you opened it; reload and review it again"
        )
        raise StaleRecordError(msg)
    session.add(
        AuditEvent(
            actor=actor,
            action="accept",
            entity=_ENTITY,
            entity_id=measurement.id,
            field="bme_percent",
            old_value=None,
            new_value=None if measurement.bme_percent is None else repr(measurement.bme_percent),
            reason=reason,
        )
    )
    session.flush()
    return measurement


def measurement_chain(session: Session, measurement_id: int) -> list[VertebraMeasurement]:
    """Every version of a measurement, oldest (the original) first, current last."""
    measurement = _get(session, measurement_id)
    chain = [measurement]
    seen = {measurement.id}
    while chain[0].supersedes_id is not None and chain[0].supersedes_id not in seen:
        chain.insert(0, _get(session, chain[0].supersedes_id))
        seen.add(chain[0].id)
    while chain[-1].superseded_by_id is not None and chain[-1].superseded_by_id not in seen:
        chain.append(_get(session, chain[-1].superseded_by_id))
        seen.add(chain[-1].id)
    return chain


def measurement_audit(session: Session, measurement_id: int) -> list[AuditEvent]:
    """Audit events of every version of a measurement, oldest first."""
    ids = [m.id for m in measurement_chain(session, measurement_id)]
    query = (
        select(AuditEvent)
        .where(AuditEvent.entity == _ENTITY, AuditEvent.entity_id.in_(ids))
        .order_by(AuditEvent.id)
    )
    return list(session.scalars(query))


def reviewed_measurement_ids(session: Session, ids: list[int]) -> set[int]:
    """Those of ``ids`` with an accept or override event."""
    if not ids:
        return set()
    query = select(AuditEvent.entity_id).where(
        AuditEvent.entity == _ENTITY,
        AuditEvent.action.in_(REVIEW_ACTIONS),
        AuditEvent.entity_id.in_(ids),
    )
    return set(session.scalars(query))


@dataclass(frozen=True)
class WorklistItem:
    """One visit whose measurements no radiologist has reviewed."""

    patient_code: str
    patient_id: int
    visit_id: int
    visit_date: dt.date
    nominal_month: int | None
    levels: tuple[str, ...]
    sources: tuple[str, ...]
    imaging_session_ids: tuple[int, ...]


def worklist(session: Session, study: Study) -> list[WorklistItem]:
    """Visits of ``study`` with current non-manual measurements and no review yet."""
    rows = session.execute(
        select(VertebraMeasurement, Visit, Patient.code)
        .join(Visit, VertebraMeasurement.visit_id == Visit.id)
        .join(Patient, Visit.patient_id == Patient.id)
        .where(Patient.study_id == study.id)
        .order_by(Patient.code, Visit.visit_date, VertebraMeasurement.label)
    ).all()
    reviewed = reviewed_measurement_ids(session, [m.id for m, _, _ in rows])
    by_visit: dict[int, list[tuple[VertebraMeasurement, Visit, str]]] = {}
    for measurement, visit, code in rows:
        by_visit.setdefault(visit.id, []).append((measurement, visit, code))
    imaging = session.execute(select(ImagingSession.id, ImagingSession.visit_id)).all()
    sessions_of: dict[int, list[int]] = {}
    for session_id, visit_id in imaging:
        sessions_of.setdefault(visit_id, []).append(session_id)
    items = []
    for visit_id, group in by_visit.items():
        if any(m.id in reviewed for m, _, _ in group):
            continue
        current = [
            m
            for m, _, _ in group
            if m.superseded_by_id is None and m.source != MeasurementSource.MANUAL
        ]
        if not current:
            continue
        _, visit, code = group[0]
        items.append(
            WorklistItem(
                patient_code=code,
                patient_id=visit.patient_id,
                visit_id=visit_id,
                visit_date=visit.visit_date,
                nominal_month=visit.nominal_month,
                levels=tuple(m.level for m in current),
                sources=tuple(sorted({m.source.value for m in current})),
                imaging_session_ids=tuple(sessions_of.get(visit_id, [])),
            )
        )
    return items
