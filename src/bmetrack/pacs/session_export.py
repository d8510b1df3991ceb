"""Export the measured imaging sessions of a study as DICOM SEG + SR, optionally pushed to PACS.

The database keeps the numbers, not the masks. To export a session the images are measured
again, from the files ``import-dicom`` filed, with the settings recorded in the stored
measurements (the method is deterministic), and the recomputed automatic values must agree
with the stored automatic ones: otherwise the images or the algorithm changed since, the
masks would not be the ones behind the stored numbers, and the session is refused with
nothing written.

The SR reports the values the analysis uses: where a radiologist overrode a measurement, the
override, with who overrode it, why, when, and the automatic value it replaced (see
`bmetrack.imaging.dicom_export.export_measurement_report`). Both objects are built by the
same builder as ``export-dicom --stir/--t1`` (`build_dicom_exports`).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset
from sqlalchemy import Engine, select

from bmetrack.pacs.dicomweb import StowResult, stow_and_check
from bmetrack.pipeline import SessionJob, quantify_job
from bmetrack.settings import Settings, resolve_settings
from bmetrack.study.records import MEASUREMENT_FIELDS

__all__ = [
    "COMPARED_FIELDS",
    "SessionExport",
    "SessionExportReport",
    "export_sessions",
    "measured_sessions",
]

#: Stored fields checked against the re-measurement (numbers within `ABS_TOLERANCE` /
#: `REL_TOLERANCE`, grade and deformity exactly).
COMPARED_FIELDS: tuple[str, ...] = tuple(f for f in MEASUREMENT_FIELDS if f != "bme_present")
#: The same images and settings give the same floats; the tolerance only absorbs the
#: database's float round trip.
ABS_TOLERANCE = 1e-6
REL_TOLERANCE = 1e-9
_REPORTED_FIELDS = (*COMPARED_FIELDS, "bme_present")
_HEIGHTS = {"anterior": "height_anterior_mm", "middle": "height_middle_mm"}
_HEIGHTS["posterior"] = "height_posterior_mm"
_SHOWN_DIFFERENCES = 4


@dataclass(frozen=True)
class StoredMeasurement:
    """A plain copy of one `VertebraMeasurement` row of a session."""

    id: int
    level: str
    label: int
    source: str
    values: dict[str, Any]
    settings_json: dict[str, Any]
    supersedes_id: int | None
    superseded_by_id: int | None
    overridden_by: str | None
    override_reason: str | None
    created_at: dt.datetime | None


@dataclass(frozen=True)
class MeasuredSession:
    """An imaging session with its stored measurements (every row, superseded ones too)."""

    job: SessionJob
    study_instance_uid: str
    measurements: tuple[StoredMeasurement, ...]


@dataclass
class SessionExport:
    """What happened to one imaging session."""

    study_instance_uid: str
    patient_code: str
    visit_date: str
    status: str  # "written" or "refused"
    message: str = ""
    paths: dict[str, Path] = field(default_factory=dict)
    n_vertebrae: int = 0
    n_overridden: int = 0
    push: StowResult | None = None

    def summary(self) -> str:
        """One or two lines for people."""
        head = f"{self.status:<8} {self.patient_code} {self.visit_date} {self.study_instance_uid}"
        if self.status == "written":
            head += (
                f": {self.n_vertebrae} vertebrae ({self.n_overridden} overridden) -> "
                f"{self.paths['seg'].parent}"
            )
        lines = [head]
        if self.message:
            lines.append(f"  {self.message}")
        if self.push is not None:
            lines.append(f"  {self.push.summary()}")
        return "\n".join(lines)


@dataclass
class SessionExportReport:
    """Every selected session, written or refused, and what the PACS answered."""

    out_dir: Path
    sessions: list[SessionExport] = field(default_factory=list)

    @property
    def written(self) -> list[SessionExport]:
        return [s for s in self.sessions if s.status == "written"]

    @property
    def refused(self) -> list[SessionExport]:
        return [s for s in self.sessions if s.status == "refused"]

    @property
    def push_failed(self) -> list[SessionExport]:
        return [s for s in self.sessions if s.push is not None and not s.push.ok]

    @property
    def ok(self) -> bool:
        """Nothing refused and every push stored everything."""
        return not self.refused and not self.push_failed

    def summary(self) -> str:
        """A headline, then one entry per session."""
        pushed = sum(s.push is not None and s.push.ok for s in self.sessions)
        head = (
            f"{len(self.written)} imaging sessions exported to {self.out_dir}, "
            f"{len(self.refused)} refused"
        )
        if any(s.push is not None for s in self.sessions):
            head += f"; {pushed} pushed, {len(self.push_failed)} push failures"
        return "\n".join([head, *(s.summary() for s in self.sessions)])


# ------------------------------------------------------------------------------ database
def _copy_row(row: Any) -> StoredMeasurement:

    return StoredMeasurement(
        id=int(row.id),
        level=str(row.level),
        label=int(row.label),
        source=str(row.source.value if hasattr(row.source, "value") else row.source),
        values={name: getattr(row, name) for name in MEASUREMENT_FIELDS},
        settings_json=dict(row.settings_json or {}),
        supersedes_id=row.supersedes_id,
        superseded_by_id=row.superseded_by_id,
        overridden_by=row.overridden_by,
        override_reason=row.override_reason,
        created_at=row.created_at,
    )


def measured_sessions(
    engine: Engine, study_code: str, session_uids: Iterable[str] | None = None
) -> list[MeasuredSession]:
    """Imaging sessions of the study with automatic measurements, with all their rows.

    Parameters
    ----------
    engine : Engine
        The study database.
    study_code : str
        The study.
    session_uids : iterable of str, optional
        StudyInstanceUIDs to keep; a selected session without automatic measurement is
        returned too (with its rows, possibly none) so that the caller can say why it is
        not exported.

    Raises
    ------
    RecordNotFoundError
        No such study, or a UID of ``session_uids`` is not an imaging session of it.
    """
    from bmetrack.study.db import session_scope
    from bmetrack.study.models import (
        ImagingSession,
        MeasurementSource,
        Patient,
        VertebraMeasurement,
        Visit,
    )
    from bmetrack.study.records import RecordNotFoundError, get_study

    wanted = None if session_uids is None else list(dict.fromkeys(session_uids))
    with session_scope(engine) as session:
        study = get_study(session, study_code)
        query = (
            select(ImagingSession, Visit, Patient.code)
            .join(Visit, ImagingSession.visit_id == Visit.id)
            .join(Patient, Visit.patient_id == Patient.id)
            .where(Patient.study_id == study.id)
            .order_by(Patient.code, Visit.visit_date, ImagingSession.id)
        )
        if wanted is not None:
            query = query.where(ImagingSession.study_instance_uid.in_(wanted))
        found = session.execute(query).all()
        unknown = sorted(set(wanted or ()) - {imaging.study_instance_uid for imaging, *_ in found})
        if unknown:
            msg = (
                f"session_uids {unknown} are not imaging sessions of study {study_code!r}; "
                "give StudyInstanceUIDs that import-dicom filed in this study."
            )
            raise RecordNotFoundError(msg)
        out = []
        for imaging, visit, code in found:
            rows = session.scalars(
                select(VertebraMeasurement)
                .where(VertebraMeasurement.imaging_session_id == imaging.id)
                .order_by(VertebraMeasurement.id)
            ).all()
            automatic = any(row.source == MeasurementSource.AUTOMATIC for row in rows)
            if not automatic and wanted is None:
                continue
            job = SessionJob.of(imaging, visit, code, study_code)
            copies = tuple(_copy_row(row) for row in rows)
            out.append(MeasuredSession(job, imaging.study_instance_uid, copies))
    return out


# ------------------------------------------------------------------------------ checking
class _RefusedError(Exception):
    """The session cannot be exported; the message says why and what to do."""


def _origin(row: StoredMeasurement, by_id: Mapping[int, StoredMeasurement]) -> Any:
    """The automatic measurement an (overridden) row descends from, or None."""
    seen: set[int] = set()
    current: StoredMeasurement | None = row
    while current is not None and current.id not in seen:
        if current.source == "automatic":
            return current
        seen.add(current.id)
        current = by_id.get(current.supersedes_id) if current.supersedes_id else None
    return None


def _recorded_settings(rows: Sequence[StoredMeasurement], fallback: Settings | None) -> Settings:
    recorded = [row.settings_json.get("settings") for row in rows]
    values = [v for v in recorded if v]
    if not values:
        return fallback or resolve_settings()
    if any(v != values[0] for v in values[1:]):
        msg = (
            "its automatic measurements were stored with different settings; re-measure the "
            "session (delete its automatic rows and run quantify-all) before exporting it"
        )
        raise _RefusedError(msg)
    try:
        return resolve_settings(values[0])
    except ValueError as error:
        msg = f"the settings stored with its measurements are not valid any more: {error}"
        raise _RefusedError(msg) from None


def _contract_value(vertebra: Mapping[str, Any], name: str) -> Any:
    for side, column in _HEIGHTS.items():
        if name == column:
            return (vertebra.get("heights_mm") or {}).get(side)
    return vertebra.get(name)


def _same(stored: Any, recomputed: Any) -> bool:
    if stored is None or recomputed is None:
        return stored is None and recomputed is None
    if isinstance(stored, str) or isinstance(recomputed, str):
        return str(stored) == str(recomputed)
    a, b = float(stored), float(recomputed)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=REL_TOLERANCE, abs_tol=ABS_TOLERANCE)


def _differences(
    automatic: Sequence[StoredMeasurement], recomputed: Sequence[Mapping[str, Any]]
) -> list[str]:
    by_level = {str(v["level"]): v for v in recomputed}
    out = []
    for row in automatic:
        vertebra = by_level.get(row.level)
        if vertebra is None:
            out.append(f"{row.level} was not found again (levels now: {sorted(by_level)})")
            continue
        for name in COMPARED_FIELDS:
            stored, now = row.values.get(name), _contract_value(vertebra, name)
            if not _same(stored, now):
                out.append(f"{row.level} {name} stored {stored!r}, re-measured {now!r}")
    return out


def _versions(provenance: Mapping[str, Any]) -> dict[str, str]:
    """The algorithm versions a provenance record names (bmetrack, segmentation, edema)."""
    segmentation = provenance.get("segmentation") or {}
    quantification = provenance.get("quantification") or {}
    return {
        "bmetrack": str(provenance.get("bmetrack_version", "") or "unknown"),
        "segmentation": str(segmentation.get("method_version", "") or "unknown"),
        "quantification": str(quantification.get("version", "") or "unknown"),
    }


def _mismatch_message(
    differences: Sequence[str], stored: Mapping[str, Any], current: Mapping[str, Any]
) -> str:
    shown = "; ".join(differences[:_SHOWN_DIFFERENCES])
    more = len(differences) - _SHOWN_DIFFERENCES
    if more > 0:
        shown += f"; and {more} more"
    then, now = _versions(stored), _versions(current)
    changed = [f"{name} {then[name]} -> {now[name]}" for name in then if then[name] != now[name]]
    if changed:
        cause = (
            f"the algorithm changed since it was measured ({', '.join(changed)}): re-measure "
            "the session with this version, or export with the version that measured it"
        )
    else:
        cause = (
            "the images changed since they were measured (same algorithm versions and "
            "settings), or the algorithm changed without a new version: restore the filed "
            "images, or re-measure the session"
        )
    return (
        "refused: the re-measured values differ from the stored automatic values, so the "
        f"masks would not match the stored numbers ({shown}); {cause}."
    )


# ------------------------------------------------------------------------------ building
def _vertebra_for_report(
    row: StoredMeasurement, origin: StoredMeasurement | None
) -> dict[str, Any]:
    """The SR input of one effective row (contract keys, plus override and segment level)."""
    values = row.values
    vertebra: dict[str, Any] = {
        "level": row.level,
        "label": row.label,
        **{name: values.get(name) for name in _REPORTED_FIELDS if name not in _HEIGHTS.values()},
        "heights_mm": {side: values.get(column) for side, column in _HEIGHTS.items()},
        "segment_level": origin.level if origin is not None else row.level,
    }
    if row.source == "manual" and row.overridden_by:
        automatic: dict[str, Any] = {}
        if origin is not None:
            if origin.level != row.level:
                automatic["level"] = origin.level
            automatic.update(
                {
                    name: origin.values.get(name)
                    for name in _REPORTED_FIELDS
                    if not _same(origin.values.get(name), values.get(name))
                }
            )
        vertebra["override"] = {
            "by": row.overridden_by,
            "reason": row.override_reason or "",
            "at": row.created_at,
            "automatic": automatic,
        }
    return vertebra


def _build(record: MeasuredSession, fallback: Settings | None) -> tuple[Dataset, Dataset, int, int]:
    """SEG, SR, number of vertebrae and of overridden ones; `_RefusedError` when not possible."""
    from bmetrack.imaging.dicom_export import build_dicom_exports

    job = record.job
    by_id = {row.id: row for row in record.measurements}
    effective = [row for row in record.measurements if row.superseded_by_id is None]
    origins = {row.id: _origin(row, by_id) for row in effective}
    automatic = list({o.id: o for o in origins.values() if o is not None}.values())
    if not automatic:
        msg = "refused: the session has no automatic measurement; run quantify-all first."
        raise _RefusedError(msg)
    if not job.stir_series_uid or not job.t1_series_uid:
        msg = "refused: the session lacks its STIR or T1 series; file both with import-dicom."
        raise _RefusedError(msg)
    provenance = dict(automatic[0].settings_json.get("provenance") or {})
    try:
        settings = _recorded_settings(automatic, fallback)
    except _RefusedError as refused:
        raise _RefusedError(f"refused: {refused}") from None
    try:
        study = quantify_job(job, settings)
    except Exception as error:  # unreadable or missing files, segmentation failure
        msg = (
            f"refused: its images at {job.source_path} could not be measured again "
            f"({type(error).__name__}: {error}); restore the filed images."
        )
        raise _RefusedError(msg) from None
    differences = _differences(automatic, study.quantification.to_contract_dict()["vertebrae"])
    if differences:
        raise _RefusedError(_mismatch_message(differences, provenance, study.provenance()))
    vertebrae = [_vertebra_for_report(row, origins[row.id]) for row in effective]
    vertebrae.sort(key=lambda v: int(v["label"]))
    try:
        seg, sr = build_dicom_exports(
            study, vertebrae=vertebrae, provenance=provenance or study.provenance()
        )
    except (ValueError, OSError) as error:
        raise _RefusedError(f"refused: the SEG/SR could not be built: {error}") from None
    n_overridden = sum("override" in v for v in vertebrae)
    return seg, sr, len(vertebrae), n_overridden


def _folder(out_dir: Path, job: SessionJob, used: set[Path]) -> Path:
    folder = out_dir / job.patient_code / job.visit_date
    n = 2
    while folder in used:  # two sessions of one visit
        folder = out_dir / job.patient_code / f"{job.visit_date}_{n}"
        n += 1
    used.add(folder)
    return folder


def export_sessions(
    engine: Engine,
    study_code: str,
    out_dir: str | Path,
    *,
    session_uids: Iterable[str] | None = None,
    push_url: str | None = None,
    settings: Settings | None = None,
) -> SessionExportReport:
    """Write (and push) a DICOM SEG and a TID 1500 SR per measured imaging session.

    Parameters
    ----------
    engine : Engine
        The study database.
    study_code : str
        The study.
    out_dir : str or Path
        Files go to ``out_dir/<patient_code>/<visit_date>/seg.dcm`` and ``sr.dcm``.
    session_uids : iterable of str, optional
        StudyInstanceUIDs of the sessions to export; default every session with automatic
        measurements.
    push_url : str, optional
        DICOMweb root: both objects of each written session are stored with STOW-RS and the
        answer is reported per session.
    settings : Settings, optional
        Used only for measurements stored without their settings (the recorded settings
        always win: they made the stored numbers).

    Returns
    -------
    SessionExportReport
        One entry per selected session: written (with the push result) or refused with the
        reason. A refused session has nothing written.

    Raises
    ------
    RecordNotFoundError
        No such study, or a UID of ``session_uids`` is not one of its imaging sessions.
    """
    out = Path(out_dir)
    report = SessionExportReport(out)
    used: set[Path] = set()
    for record in measured_sessions(engine, study_code, session_uids):
        job = record.job
        entry = SessionExport(record.study_instance_uid, job.patient_code, job.visit_date, "")
        report.sessions.append(entry)
        try:
            seg, sr, entry.n_vertebrae, entry.n_overridden = _build(record, settings)
        except _RefusedError as refused:
            entry.status, entry.message = "refused", str(refused)
            continue
        from bmetrack.imaging.dicom_export import save_dicom_exports

        entry.paths = save_dicom_exports(seg, sr, _folder(out, job, used))
        entry.status = "written"
        if push_url is not None:
            entry.push = stow_and_check(push_url, [seg, sr])
    return report
