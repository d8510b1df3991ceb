"""File DICOM studies (a PACS export, any mix of series) into the study database.

:func:`import_dicom` scans a folder with :func:`bmetrack.imaging.dicom.scan_folder` (headers
only; no pixel data is decoded), groups the series by StudyInstanceUID and files each study as
one :class:`~bmetrack.study.models.ImagingSession`:

- patient: ``pseudonym_map[PatientID]`` when a map is given, else the PatientID itself must be
  a patient code of the study. Patients are never created here.
- visit: the study date relative to the patient's first procedure gives the nominal month and
  window status (:func:`bmetrack.study.cohort.assign_visit_windows`); an existing visit of
  the patient on that day, or in the window of the same nominal month, is reused, else a visit
  (without clinical assessment) is created through :func:`records.add_visit`. A date outside
  every window gets a new visit flagged ``outside_window``, never dropped.
- series: the sagittal STIR and sagittal T1 (several candidates: the one with most slices,
  with a warning); non-MR, localizer, non-sagittal and other-contrast series are listed as
  skipped with the reason. A study lacking one of the two is still filed, with a warning.

Everything runs in ONE transaction: an unexpected error midway writes nothing. Files, series
and studies that cannot be filed are listed in the report with the reason and the fix (they
do not stop the import), unless ``strict=True``, which turns any rejection into a
:class:`DicomImportError` listing them all, with nothing written.

The DICOM PatientID is used only to find the patient: it is never stored. It does appear in
the rejection reason of an unmapped study, since the fix (a pseudonym map row) needs it.
"""

from __future__ import annotations

import csv
import datetime as dt
import enum
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, selectinload

from bmetrack.imaging.dicom import (
    Orientation,
    RejectedFile,
    SequenceClass,
    SeriesInfo,
    classify_series,
    scan_folder,
)
from bmetrack.settings import Settings
from bmetrack.study import records
from bmetrack.study.db import session_scope
from bmetrack.study.models import ImagingSession, Patient, Study, Visit, WindowStatus
from bmetrack.study.records import Problem, ValidationError

__all__ = [
    "MAX_UID_LENGTH",
    "DicomImportError",
    "DicomImportReport",
    "SeriesNote",
    "StudyOutcome",
    "StudyStatus",
    "add_imaging_session",
    "import_dicom",
    "read_pseudonym_map",
    "update_imaging_session_series",
]

#: DICOM UIDs are at most 64 characters (PS3.5 9.1); the database columns have that size.
MAX_UID_LENGTH = 64
PSEUDONYM_COLUMNS = ("dicom_patient_id", "patient_code")
_AUDIT_REASON = "DICOM import"
_LOCALIZER_WORDS = frozenset({"LOCALIZER", "LOCALISER", "LOC", "SCOUT", "SURVEY", "PILOT"})
# File reasons of scan_folder that mean "not an image" rather than "damaged".
_NOT_AN_IMAGE_PREFIXES = ("DICOMDIR", "no pixel data")


class StudyStatus(enum.StrEnum):
    """What the import did with one DICOM study."""

    CREATED = "created"  # a new imaging session
    UPDATED = "updated"  # already filed; its STIR/T1 series choice changed
    UNCHANGED = "unchanged"  # already filed with the same series
    SKIPPED = "skipped"  # nothing to file (no sagittal STIR or T1 series)
    REJECTED = "rejected"  # cannot be filed; ``reason`` says why and how to fix it


@dataclass
class StudyOutcome:
    """One DICOM study (StudyInstanceUID) of the scanned folder and what became of it."""

    study_instance_uid: str
    status: StudyStatus
    reason: str = ""
    patient_code: str | None = None
    study_date: dt.date | None = None
    nominal_month: int | None = None
    window_status: WindowStatus | None = None
    days_from_procedure: int | None = None
    visit_date: dt.date | None = None
    visit: str | None = None  # "created" or "reused"
    visit_id: int | None = None
    imaging_session_id: int | None = None
    stir_series_uid: str | None = None
    t1_series_uid: str | None = None
    source_path: str | None = None
    series_uids: tuple[str, ...] = ()
    warnings: list[str] = field(default_factory=list)

    @property
    def filed(self) -> bool:
        """True when the study is (or, in a dry run, would be) in the database."""
        return self.status in (StudyStatus.CREATED, StudyStatus.UPDATED, StudyStatus.UNCHANGED)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        out = asdict(self)
        out["status"] = self.status.value
        out["window_status"] = None if self.window_status is None else self.window_status.value
        for key in ("study_date", "visit_date"):
            out[key] = None if out[key] is None else out[key].isoformat()
        out["series_uids"] = list(self.series_uids)
        out["warnings"] = list(self.warnings)
        return out


@dataclass(frozen=True)
class SeriesNote:
    """A series that was not used (skipped) or could not be used (rejected), and why."""

    series_instance_uid: str
    study_instance_uid: str | None
    reason: str
    series_description: str = ""
    series_number: int | None = None
    modality: str | None = None
    orientation: str = Orientation.UNKNOWN.value
    sequence_class: str = SequenceClass.OTHER.value
    n_files: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _file_dict(item: RejectedFile) -> dict[str, str]:
    return {"path": str(item.path), "reason": item.reason}


@dataclass
class DicomImportReport:
    """Outcome of :func:`import_dicom`: per study, per series and per file.

    ``written`` is True once the transaction is committed (False in a dry run and when
    :class:`DicomImportError` was raised).
    """

    study_code: str
    source: str
    dry_run: bool = False
    strict: bool = False
    written: bool = False
    n_files: int = 0
    studies: list[StudyOutcome] = field(default_factory=list)
    rejected_files: list[RejectedFile] = field(default_factory=list)
    skipped_files: list[RejectedFile] = field(default_factory=list)
    rejected_series: list[SeriesNote] = field(default_factory=list)
    skipped_series: list[SeriesNote] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def by_status(self, status: StudyStatus | str) -> list[StudyOutcome]:
        """Studies with ``status``."""
        wanted = StudyStatus(status)
        return [s for s in self.studies if s.status is wanted]

    def study(self, study_instance_uid: str) -> StudyOutcome:
        """The outcome of one study; KeyError naming the UIDs present when absent."""
        for outcome in self.studies:
            if outcome.study_instance_uid == study_instance_uid:
                return outcome
        msg = (
            f"study_instance_uid {study_instance_uid!r} is not in this report; it holds "
            f"{[s.study_instance_uid for s in self.studies]}"
        )
        raise KeyError(msg)

    @property
    def counts(self) -> dict[str, int]:
        """Numbers of files, series, studies and visits by outcome."""
        visits = [s.visit for s in self.studies if s.status is StudyStatus.CREATED]
        used = sum(
            (s.stir_series_uid is not None) + (s.t1_series_uid is not None)
            for s in self.studies
            if s.filed
        )
        out = {
            "files": self.n_files,
            "files_rejected": len(self.rejected_files),
            "files_skipped": len(self.skipped_files),
            "series_used": used,
            "series_skipped": len(self.skipped_series),
            "series_rejected": len(self.rejected_series),
            "studies": len(self.studies),
        }
        for status in StudyStatus:
            out[f"studies_{status.value}"] = len(self.by_status(status))
        out["visits_created"] = visits.count("created")
        out["visits_reused"] = visits.count("reused")
        return out

    @property
    def problems(self) -> list[Problem]:
        """Every rejection (file, series, study) as a :class:`records.Problem`."""
        out = [
            Problem(f"file {item.path}", "file", str(item.path), item.reason)
            for item in self.rejected_files
        ]
        out += [
            Problem(
                f"series {note.series_instance_uid}",
                "series",
                note.series_instance_uid,
                note.reason,
            )
            for note in self.rejected_series
        ]
        out += [
            Problem(
                f"DICOM study {s.study_instance_uid}"
                + (f" of {s.study_date}" if s.study_date else ""),
                "study",
                s.study_instance_uid,
                s.reason,
            )
            for s in self.by_status(StudyStatus.REJECTED)
        ]
        return out

    @property
    def ok(self) -> bool:
        """True when nothing was rejected."""
        return not (
            self.rejected_files or self.rejected_series or self.by_status(StudyStatus.REJECTED)
        )

    def summary(self) -> str:
        """Human-readable lines for the CLI."""
        c = self.counts
        if self.written:
            state = "written"
        elif self.dry_run:
            state = "dry run, nothing written"
        else:
            state = "nothing written"
        lines = [
            f"DICOM import into study {self.study_code} from {self.source} ({state})",
            f"{c['files']} files, {c['studies']} studies: {c['studies_created']} filed, "
            f"{c['studies_updated']} updated, {c['studies_unchanged']} unchanged, "
            f"{c['studies_skipped']} skipped, {c['studies_rejected']} rejected; "
            f"{c['visits_created']} visits created, {c['visits_reused']} reused",
        ]
        for s in self.studies:
            if s.filed:
                month = "outside every window" if s.nominal_month is None else s.nominal_month
                lines.append(
                    f"  {s.status.value:9} {s.patient_code} {s.study_date} month {month} "
                    f"({s.window_status.value if s.window_status else '?'}, visit "
                    f"{s.visit_date} {s.visit}) STIR {s.stir_series_uid or '-'} "
                    f"T1 {s.t1_series_uid or '-'}"
                )
            else:
                lines.append(
                    f"  {s.status.value:9} study {s.study_instance_uid}"
                    f"{f' of {s.study_date}' if s.study_date else ''}: {s.reason}"
                )
            lines += [f"      warning: {w}" for w in s.warnings]
        if self.skipped_series:
            lines.append(f"{len(self.skipped_series)} series skipped:")
            lines += [
                f"  - {n.series_instance_uid} ({n.series_description or 'no description'}): "
                f"{n.reason}"
                for n in self.skipped_series
            ]
        if self.rejected_series:
            lines.append(f"{len(self.rejected_series)} series rejected:")
            lines += [f"  - {n.series_instance_uid}: {n.reason}" for n in self.rejected_series]
        if self.rejected_files:
            lines.append(f"{len(self.rejected_files)} files rejected:")
            lines += [f"  - {f.path}: {f.reason}" for f in self.rejected_files]
        if self.skipped_files:
            lines.append(f"{len(self.skipped_files)} files skipped (not images):")
            lines += [f"  - {f.path}: {f.reason}" for f in self.skipped_files]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        return {
            "study_code": self.study_code,
            "source": self.source,
            "dry_run": self.dry_run,
            "strict": self.strict,
            "written": self.written,
            "counts": self.counts,
            "studies": [s.to_dict() for s in self.studies],
            "rejected_files": [_file_dict(f) for f in self.rejected_files],
            "skipped_files": [_file_dict(f) for f in self.skipped_files],
            "rejected_series": [n.to_dict() for n in self.rejected_series],
            "skipped_series": [n.to_dict() for n in self.skipped_series],
            "warnings": list(self.warnings),
            "problems": [p.to_dict() for p in self.problems],
        }


class DicomImportError(ValidationError):
    """``strict=True`` and something was rejected; nothing was written. See ``report``."""

    def __init__(self, report: DicomImportReport) -> None:
        self.report = report
        super().__init__(report.problems, "DICOM import refused (strict), nothing was written")


# --------------------------------------------------------------------------- records-style


def _check_uid(value: str | None, record: str, field_name: str) -> list[Problem]:
    if value is None:
        return []
    if not value.strip():
        return [Problem(record, field_name, value, "must not be empty")]
    if len(value) > MAX_UID_LENGTH:
        return [
            Problem(
                record,
                field_name,
                value,
                f"is {len(value)} characters long; a DICOM UID has at most {MAX_UID_LENGTH}",
            )
        ]
    return []


def add_imaging_session(
    session: Session,
    visit: Visit,
    study_instance_uid: str,
    *,
    actor: str,
    stir_series_uid: str | None = None,
    t1_series_uid: str | None = None,
    acquisition_date: dt.date | None = None,
    source_path: str = "",
    reason: str = "",
) -> ImagingSession:
    """Add an imaging session (one DICOM study) to ``visit``, with a 'create' audit event.

    Does not commit (the caller owns the transaction).

    Raises
    ------
    ValidationError
        A UID is empty or longer than 64 characters, or the study is already filed.
    """
    records.require_actor(actor)
    record = f"imaging session {study_instance_uid}"
    problems = _check_uid(study_instance_uid, record, "study_instance_uid")
    problems += _check_uid(stir_series_uid, record, "stir_series_uid")
    problems += _check_uid(t1_series_uid, record, "t1_series_uid")
    existing = session.scalars(
        select(ImagingSession).where(ImagingSession.study_instance_uid == study_instance_uid)
    ).first()
    if existing is not None:
        problems.append(
            Problem(
                record,
                "study_instance_uid",
                study_instance_uid,
                f"is already filed (imaging session {existing.id}); change that session "
                "instead of adding a second one",
            )
        )
    if problems:
        raise ValidationError(problems)
    imaging = ImagingSession(
        visit=visit,
        study_instance_uid=study_instance_uid,
        stir_series_uid=stir_series_uid,
        t1_series_uid=t1_series_uid,
        acquisition_date=acquisition_date,
        source_path=source_path,
    )
    session.add(imaging)
    records.queue_create_audit(session, imaging, actor, reason)
    return imaging


def update_imaging_session_series(
    session: Session,
    imaging: ImagingSession,
    *,
    actor: str,
    stir_series_uid: str | None = None,
    t1_series_uid: str | None = None,
    reason: str = "",
) -> dict[str, tuple[Any, Any]]:
    """Set the STIR and/or T1 series of a stored session (None leaves a value as it is).

    One 'update' audit event per changed field; returns ``{field: (old, new)}``.
    """
    records.require_actor(actor)
    record = f"imaging session {imaging.study_instance_uid}"
    problems = _check_uid(stir_series_uid, record, "stir_series_uid")
    problems += _check_uid(t1_series_uid, record, "t1_series_uid")
    if problems:
        raise ValidationError(problems)
    changes = {
        name: value
        for name, value in (("stir_series_uid", stir_series_uid), ("t1_series_uid", t1_series_uid))
        if value is not None
    }
    return records.apply_changes(session, imaging, changes, actor, reason)


# --------------------------------------------------------------------------- inputs


def read_pseudonym_map(source: Mapping[str, str] | str | Path) -> dict[str, str]:
    """DICOM PatientID -> patient code, from a mapping or a CSV file.

    The CSV needs the columns ``dicom_patient_id`` and ``patient_code`` (UTF-8, with or
    without BOM; ``,``, ``;`` or tab separated; lines starting with ``#`` are comments).

    Raises
    ------
    ValidationError
        Missing columns, empty cells, or one PatientID mapped to two codes (every problem
        listed with its line).
    FileNotFoundError
        The file does not exist.
    """
    if isinstance(source, Mapping):
        pairs = [(str(k), str(v), f"pseudonym_map[{k!r}]") for k, v in source.items()]
        name = "pseudonym_map"
    else:
        path = Path(source)
        if not path.is_file():
            msg = (
                f"pseudonym_map file {str(path)!r} does not exist; give a CSV with columns "
                f"{','.join(PSEUDONYM_COLUMNS)}"
            )
            raise FileNotFoundError(msg)
        pairs, problems = _read_pseudonym_csv(path)
        if problems:
            raise ValidationError(problems, f"Cannot read pseudonym map {path}")
        name = path.name
    out: dict[str, str] = {}
    problems = []
    for key, value, record in pairs:
        key, value = key.strip(), value.strip()
        if not key or not value:
            problems.append(
                Problem(
                    record,
                    PSEUDONYM_COLUMNS[0] if not key else PSEUDONYM_COLUMNS[1],
                    key if not key else value,
                    "is empty; fill in both the DICOM PatientID and the patient code",
                )
            )
            continue
        if key in out and out[key] != value:
            problems.append(
                Problem(
                    record,
                    PSEUDONYM_COLUMNS[1],
                    value,
                    f"PatientID {key!r} is already mapped to {out[key]!r}; one PatientID "
                    "belongs to one patient, remove one of the rows",
                )
            )
            continue
        out[key] = value
    if problems:
        raise ValidationError(problems, f"Invalid pseudonym map {name}")
    return out


def _read_pseudonym_csv(path: Path) -> tuple[list[tuple[str, str, str]], list[Problem]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        reason = f"is not UTF-8 text ({error.reason}); save it as 'CSV UTF-8'"
        return [], [Problem(path.name, "(file)", str(path), reason)]
    numbered = [
        (n, line)
        for n, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not numbered:
        reason = f"is empty; it needs a header line {','.join(PSEUDONYM_COLUMNS)}"
        return [], [Problem(path.name, "(file)", str(path), reason)]
    header = numbered[0][1]
    delimiter = max((",", ";", "\t"), key=header.count)
    rows = list(csv.reader([line for _, line in numbered], delimiter=delimiter))
    columns = [c.strip().lower() for c in rows[0]]
    missing = [c for c in PSEUDONYM_COLUMNS if c not in columns]
    if missing:
        reason = (
            f"lacks column(s) {', '.join(missing)} (found {', '.join(columns) or 'none'}); "
            f"the header must be {','.join(PSEUDONYM_COLUMNS)}"
        )
        return [], [Problem(f"{path.name} line {numbered[0][0]}", "(header)", header, reason)]
    i_id, i_code = (columns.index(c) for c in PSEUDONYM_COLUMNS)
    pairs = []
    for (line_no, _), row in zip(numbered[1:], rows[1:], strict=True):
        cells = [*row, "", ""]
        pairs.append((cells[i_id], cells[i_code], f"{path.name} line {line_no}"))
    return pairs, []


def _check_overrides(overrides: Mapping[str, str] | None) -> dict[str, SequenceClass]:
    out: dict[str, SequenceClass] = {}
    for uid, value in (overrides or {}).items():
        try:
            out[str(uid)] = SequenceClass(str(getattr(value, "value", value)).lower())
        except ValueError:
            allowed = ", ".join(c.value for c in SequenceClass)
            msg = f"sequence_overrides[{uid!r}] must be one of {allowed}; got {value!r}"
            raise ValueError(msg) from None
    return out


# --------------------------------------------------------------------------- planning


@dataclass
class _Plan:
    outcome: StudyOutcome
    patient: Patient | None = None
    existing: ImagingSession | None = None


def _note(info: SeriesInfo, reason: str, cls: SequenceClass | None = None) -> SeriesNote:
    return SeriesNote(
        series_instance_uid=info.series_instance_uid,
        study_instance_uid=info.study_instance_uid,
        reason=reason,
        series_description=info.series_description,
        series_number=info.series_number,
        modality=info.modality,
        orientation=info.orientation.value,
        sequence_class=(cls or info.sequence_class).value,
        n_files=info.n_files,
    )


def _is_localizer(info: SeriesInfo) -> bool:
    words = {
        w
        for text in (info.series_description, info.protocol_name)
        for w in "".join(c if c.isalnum() else " " for c in text.upper()).split()
    }
    return "LOCALIZER" in info.image_type or bool(words & _LOCALIZER_WORDS)


def _is_derived(info: SeriesInfo) -> bool:
    return bool(info.image_type) and (
        info.image_type[0] == "DERIVED" or "SECONDARY" in info.image_type[:2]
    )


def _describe_series(info: SeriesInfo) -> str:
    return (
        f"{info.series_instance_uid} ({info.series_description or 'no description'}, "
        f"series {info.series_number if info.series_number is not None else '?'}, "
        f"{info.n_files} slices)"
    )


def _select_series(
    infos: Sequence[SeriesInfo], overrides: Mapping[str, SequenceClass]
) -> tuple[dict[SequenceClass, SeriesInfo | None], list[SeriesNote], list[str]]:
    """The STIR and T1 series of one study, the skipped series and warnings."""
    skipped: list[SeriesNote] = []
    warnings: list[str] = []
    candidates: dict[SequenceClass, list[SeriesInfo]] = {
        SequenceClass.STIR: [],
        SequenceClass.T1: [],
    }
    for info in infos:
        cls = classify_series(info, overrides)
        override = info.series_instance_uid in overrides
        if info.modality != "MR":
            reason = f"modality {info.modality or 'missing'}, not MR"
        elif _is_localizer(info) and not override:
            reason = "localizer (scout) series"
        elif info.orientation is not Orientation.SAGITTAL:
            plane = (
                "images in several orientations (e.g. a multi-plane localizer)"
                if info.orientation is Orientation.MIXED
                else f"{info.orientation.value} series"
            )
            reason = f"{plane}, not sagittal; bmetrack measures sagittal STIR and T1"
        elif cls not in candidates:
            reason = (
                f"sagittal {cls.value.upper()} series; bmetrack uses sagittal STIR and T1 "
                "(if it is one of them, set sequence_overrides[series UID] to 'stir' or 't1')"
            )
        elif len(info.series_instance_uid) > MAX_UID_LENGTH:
            reason = (
                f"SeriesInstanceUID longer than {MAX_UID_LENGTH} characters (not a valid "
                "DICOM UID); re-export the series from the PACS"
            )
        else:
            candidates[cls].append(info)
            continue
        skipped.append(_note(info, reason, cls))
    chosen: dict[SequenceClass, SeriesInfo | None] = {}
    for cls, found in candidates.items():
        name = cls.value.upper()
        if not found:
            chosen[cls] = None
            warnings.append(
                f"no sagittal {name} series: the study cannot be quantified until a {name} "
                f"series is imported, or one of its series is marked '{cls.value}' in "
                "sequence_overrides"
            )
            continue
        # Most slices first; original before derived; then the later (repeated) series.
        ranked = sorted(
            found,
            key=lambda s: (-s.n_files, _is_derived(s), -(s.series_number or 0)),
        )
        best = ranked[0]
        chosen[cls] = best
        if len(ranked) > 1:
            others = "; ".join(_describe_series(s) for s in ranked[1:])
            warnings.append(
                f"{len(ranked)} sagittal {name} series: chose {_describe_series(best)} (most "
                f"slices), not {others}; set sequence_overrides to choose another"
            )
            skipped += [
                _note(s, f"another sagittal {name} series was chosen ({best.series_instance_uid})")
                for s in ranked[1:]
            ]
        if _is_derived(best):
            warnings.append(
                f"the {name} series {best.series_instance_uid} is DERIVED/SECONDARY (a "
                "reconstruction, not the acquired images)"
            )
        if best.rejected:
            warnings.append(
                f"{len(best.rejected)} file(s) of the {name} series were rejected (see the "
                "rejected files); the series may miss slices"
            )
    return chosen, skipped, warnings


def _source_folder(infos: Iterable[SeriesInfo]) -> str:
    folders = {str(Path(f).resolve().parent) for info in infos for f in info.files}
    return os.path.commonpath(sorted(folders)) if folders else ""


def _resolve_patient(
    patient_ids: set[str],
    patients: Mapping[str, Patient],
    pseudonyms: Mapping[str, str] | None,
    study_code: str,
) -> tuple[Patient | None, str]:
    """The patient of a study, or None and the rejection reason with the fix."""
    if not patient_ids:
        return None, (
            "no PatientID in the headers; the study cannot be matched to a patient. "
            "Re-export it with the PatientID"
        )
    if len(patient_ids) > 1:
        return None, (
            f"the series of the study carry {len(patient_ids)} different PatientIDs "
            f"({', '.join(sorted(map(repr, patient_ids)))}); re-export the study from the PACS"
        )
    (patient_id,) = patient_ids
    if pseudonyms is None:
        code = patient_id
        if code not in patients:
            return None, (
                f"PatientID {patient_id!r} is not a patient code of study {study_code}; give a "
                f"pseudonym map (CSV columns {','.join(PSEUDONYM_COLUMNS)}) with a row for it, "
                "or import the patient first (bmetrack import)"
            )
        return patients[code], ""
    if patient_id not in pseudonyms:
        return None, (
            f"PatientID {patient_id!r} is not in the pseudonym map; add a row "
            f"'{patient_id},<patient code>' (columns {','.join(PSEUDONYM_COLUMNS)})"
        )
    code = pseudonyms[patient_id]
    if code not in patients:
        return None, (
            f"the pseudonym map gives patient code {code!r}, which is not a patient of study "
            f"{study_code}; import the patient first (bmetrack import) or correct the map"
        )
    return patients[code], ""


def _plan_study(
    uid: str,
    infos: list[SeriesInfo],
    *,
    study: Study,
    patients: Mapping[str, Patient],
    pseudonyms: Mapping[str, str] | None,
    existing: Mapping[str, tuple[ImagingSession, Patient]],
    overrides: Mapping[str, SequenceClass],
    settings: Settings,
    report: DicomImportReport,
) -> _Plan:
    dates = sorted({i.study_date for i in infos if i.study_date is not None})
    outcome = StudyOutcome(
        study_instance_uid=uid,
        status=StudyStatus.REJECTED,
        study_date=dates[0] if dates else None,
        series_uids=tuple(i.series_instance_uid for i in infos),
    )
    plan = _Plan(outcome)

    def reject(reason: str) -> _Plan:
        outcome.status = StudyStatus.REJECTED
        outcome.reason = reason
        return plan

    if len(uid) > MAX_UID_LENGTH:
        return reject(
            f"StudyInstanceUID longer than {MAX_UID_LENGTH} characters (not a valid DICOM "
            "UID); re-export the study from the PACS"
        )
    patient, why = _resolve_patient(
        {i.patient_id for i in infos if i.patient_id}, patients, pseudonyms, study.code
    )
    if patient is None:
        return reject(why)
    plan.patient = patient
    outcome.patient_code = patient.code
    if not dates:
        return reject(
            "no valid StudyDate (YYYYMMDD) in the headers; the study cannot be placed at a "
            "visit. Re-export it with the StudyDate"
        )
    if len(dates) > 1:
        outcome.warnings.append(
            f"the series carry different StudyDates ({', '.join(map(str, dates))}); the "
            "earliest is used"
        )
    study_date = dates[0]

    chosen, skipped, warnings = _select_series(infos, overrides)
    report.skipped_series += skipped
    stir, t1 = chosen[SequenceClass.STIR], chosen[SequenceClass.T1]
    if stir is None and t1 is None:
        outcome.status = StudyStatus.SKIPPED
        kinds = ", ".join(sorted({f"{n.modality or '?'} {n.orientation}" for n in skipped}))
        outcome.reason = (
            f"no sagittal STIR or T1 series (found: {kinds or 'nothing'}); nothing to quantify. "
            "If one series is STIR or T1, set sequence_overrides[series UID]"
        )
        return plan
    outcome.warnings += warnings
    outcome.stir_series_uid = None if stir is None else stir.series_instance_uid
    outcome.t1_series_uid = None if t1 is None else t1.series_instance_uid
    outcome.source_path = _source_folder(infos)

    stored = existing.get(uid)
    if stored is not None:
        imaging, owner = stored
        if owner.id != patient.id:
            where = (
                f"patient {owner.code}"
                if owner.study_id == study.id
                else f"study {owner.study.code}, patient {owner.code}"
            )
            return reject(
                f"already filed under {where} (visit {imaging.visit.visit_date}); a study "
                "belongs to one patient: check the pseudonym map, or remove that imaging "
                "session first"
            )
        plan.existing = imaging
        outcome.status = StudyStatus.UNCHANGED  # or UPDATED, decided when writing
        return plan

    first = records.first_procedure_date(patient)
    problems = records.validate_visit_date(
        study_date,
        f"DICOM study of {study_date}",
        birth_year=patient.birth_year,
        first_procedure_date=first,
        settings=settings,
        field_name="StudyDate",
    )
    if problems:
        return reject("; ".join(p.reason for p in problems))
    outcome.status = StudyStatus.CREATED
    return plan


# --------------------------------------------------------------------------- writing


def _match_visit(
    patient: Patient, study_date: dt.date, month: int | None, status: WindowStatus
) -> Visit | None:
    """The patient's visit on that day, else the nearest one in the same nominal window."""
    same_day = [v for v in patient.visits if v.visit_date == study_date]
    if same_day:
        return same_day[0]
    if month is None or status not in (WindowStatus.BASELINE, WindowStatus.IN_WINDOW):
        return None
    in_window = [
        v
        for v in patient.visits
        if v.nominal_month == month
        and v.window_status in (WindowStatus.BASELINE, WindowStatus.IN_WINDOW)
    ]
    if not in_window:
        return None
    return min(in_window, key=lambda v: (abs((v.visit_date - study_date).days), v.visit_date))


def _write_study(
    session: Session, plan: _Plan, *, actor: str, settings: Settings, dry_run: bool
) -> None:
    outcome = plan.outcome
    patient = plan.patient
    assert patient is not None and outcome.study_date is not None
    if plan.existing is not None:
        imaging = plan.existing
        changed = update_imaging_session_series(
            session,
            imaging,
            actor=actor,
            stir_series_uid=outcome.stir_series_uid,
            t1_series_uid=outcome.t1_series_uid,
            reason=_AUDIT_REASON,
        )
        outcome.status = StudyStatus.UPDATED if changed else StudyStatus.UNCHANGED
        if changed:
            outcome.warnings.append(
                "series choice changed: "
                + "; ".join(f"{k} {old or '-'} -> {new}" for k, (old, new) in changed.items())
            )
        # Report what is stored (a series missing from this folder keeps its stored UID).
        outcome.stir_series_uid = imaging.stir_series_uid
        outcome.t1_series_uid = imaging.t1_series_uid
        outcome.source_path = imaging.source_path
        outcome.visit = "reused"
        _fill_visit(outcome, imaging.visit, imaging.id)
        return

    first = records.first_procedure_date(patient)
    assert first is not None
    ((month, status, days),) = records.compute_visit_windows(
        [outcome.study_date], [first], [None], settings
    )
    visit = _match_visit(patient, outcome.study_date, month, status)
    if visit is None:
        try:
            visit = records.add_visit(
                session, patient, outcome.study_date, actor=actor, settings=settings
            )
        except ValidationError as error:  # validated in the plan; kept as a rejection
            outcome.status = StudyStatus.REJECTED
            outcome.reason = "; ".join(p.reason for p in error.problems)
            return
        outcome.visit = "created"
    else:
        outcome.visit = "reused"
        if visit.imaging_sessions:
            others = ", ".join(s.study_instance_uid for s in visit.imaging_sessions)
            outcome.warnings.append(
                f"the visit of {visit.visit_date} already has imaging (study {others}); both "
                "studies are filed at this visit"
            )
    if status is WindowStatus.OUTSIDE_WINDOW:
        outcome.warnings.append(
            f"study date {outcome.study_date} is {days} days from the first procedure "
            f"({first}), outside every visit window; filed at a visit flagged outside_window"
        )
    imaging = add_imaging_session(
        session,
        visit,
        outcome.study_instance_uid,
        actor=actor,
        stir_series_uid=outcome.stir_series_uid,
        t1_series_uid=outcome.t1_series_uid,
        acquisition_date=outcome.study_date,
        source_path=outcome.source_path or "",
        reason=_AUDIT_REASON,
    )
    session.flush()  # ids for the report; writes the audit events
    outcome.status = StudyStatus.CREATED
    _fill_visit(outcome, visit, None if dry_run else imaging.id)
    if dry_run and outcome.visit == "created":
        outcome.visit_id = None


def _fill_visit(outcome: StudyOutcome, visit: Visit, imaging_id: int | None) -> None:
    outcome.visit_date = visit.visit_date
    outcome.visit_id = visit.id
    outcome.nominal_month = visit.nominal_month
    outcome.window_status = WindowStatus(visit.window_status)
    outcome.days_from_procedure = visit.days_from_procedure
    outcome.imaging_session_id = imaging_id


# --------------------------------------------------------------------------- entry point


def _not_an_image(item: RejectedFile) -> bool:
    """A DICOMDIR or a non-image object (report, RT plan, ...): skipped, not rejected.

    An *image* SOP class without pixel data is a damaged file and stays rejected.
    """
    if not item.reason.startswith(_NOT_AN_IMAGE_PREFIXES):
        return False
    return "Image Storage" not in item.reason


def import_dicom(
    engine: Engine,
    study_code: str,
    path: str | Path,
    *,
    actor: str,
    settings: Settings | None = None,
    pseudonym_map: Mapping[str, str] | str | Path | None = None,
    sequence_overrides: Mapping[str, str] | None = None,
    dry_run: bool = False,
    strict: bool = False,
) -> DicomImportReport:
    """File every DICOM study under ``path`` as an imaging session of study ``study_code``.

    Parameters
    ----------
    engine : sqlalchemy.Engine
        The study database (migrated; the study, its patients and procedures exist).
    study_code : str
        Code of the study to file into.
    path : str or Path
        Folder (searched recursively; any file names, DICOMDIR and junk files allowed) or file.
    actor : str
        Who imports (written to the audit log).
    settings : Settings, optional
        Visit windows; METHOD.md defaults (with the study's nominal months) when omitted.
    pseudonym_map : mapping or path, optional
        DICOM PatientID -> patient code (a dict, or a CSV with columns ``dicom_patient_id``,
        ``patient_code``). Without it the PatientID must be the patient code.
    sequence_overrides : mapping, optional
        SeriesInstanceUID -> ``"stir"``, ``"t1"``, ``"t2"`` or ``"other"``; wins over the
        header classification (and over the localizer test). Non-MR and non-sagittal series
        stay skipped.
    dry_run : bool, default False
        Do everything, report it, and roll back (``report.written`` stays False; ids of rows
        that would be created are None).
    strict : bool, default False
        Any rejected file, series or study aborts the import (:class:`DicomImportError`).

    Returns
    -------
    DicomImportReport
        Per study: status, patient code, study date, nominal month, window status, visit
        created or reused, STIR/T1 series UIDs, warnings. ``source_path`` of a session is
        the deepest folder holding all the study's image files (the scanned root for a
        flat export); file lists are not stored. DICOMDIR files and non-image objects
        (reports, RT plans...) are ``skipped_files``; unreadable, truncated or non-DICOM
        files are ``rejected_files``.

    Raises
    ------
    DicomImportError
        ``strict=True`` and something was rejected; nothing was written.
    RecordNotFoundError
        No study ``study_code``.
    FileNotFoundError
        ``path`` (or the pseudonym map file) does not exist.
    ValueError
        An invalid ``sequence_overrides`` value; ValidationError for an invalid pseudonym map.
    """
    records.require_actor(actor)
    overrides = _check_overrides(sequence_overrides)
    pseudonyms = None if pseudonym_map is None else read_pseudonym_map(pseudonym_map)
    root = Path(path)
    scan = scan_folder(root)
    report = DicomImportReport(
        study_code=study_code, source=str(root.resolve()), dry_run=dry_run, strict=strict
    )
    for item in scan.all_rejected:
        target = report.skipped_files if _not_an_image(item) else report.rejected_files
        target.append(item)
    report.n_files = sum(info.n_files for info in scan) + len(scan.all_rejected)
    by_study: dict[str, list[SeriesInfo]] = defaultdict(list)
    for info in scan:
        if info.study_instance_uid:
            by_study[info.study_instance_uid].append(info)
        else:
            reason = (
                "no StudyInstanceUID in the headers: the series cannot be grouped into a "
                "study; re-export it from the PACS"
            )
            report.rejected_series.append(_note(info, reason))
    seen = {info.series_instance_uid for info in scan}
    unused = sorted(set(overrides) - seen)
    if unused:
        report.warnings.append(
            f"sequence_overrides name series not found under {root}: {', '.join(unused)}"
        )

    with session_scope(engine) as session:
        study = session.scalars(
            select(Study)
            .where(Study.code == study_code)
            .options(
                selectinload(Study.patients).selectinload(Patient.procedures),
                selectinload(Study.patients)
                .selectinload(Patient.visits)
                .selectinload(Visit.imaging_sessions),
            )
        ).one_or_none()
        if study is None:
            records.get_study(session, study_code)  # raises RecordNotFoundError
        assert study is not None
        settings = records.study_settings(study, settings)
        patients = {p.code: p for p in study.patients}
        existing = _existing_sessions(session, list(by_study))
        plans = [
            _plan_study(
                uid,
                infos,
                study=study,
                patients=patients,
                pseudonyms=pseudonyms,
                existing=existing,
                overrides=overrides,
                settings=settings,
                report=report,
            )
            for uid, infos in sorted(
                by_study.items(),
                key=lambda kv: (min((i.study_date or dt.date.min) for i in kv[1]), kv[0]),
            )
        ]
        report.studies = [plan.outcome for plan in plans]
        if strict and not report.ok:
            raise DicomImportError(report)
        for plan in plans:
            if plan.outcome.filed:
                _write_study(session, plan, actor=actor, settings=settings, dry_run=dry_run)
        session.flush()
        if strict and not report.ok:
            raise DicomImportError(report)
        if dry_run:
            session.rollback()
    report.written = not dry_run
    return report


def _existing_sessions(
    session: Session, study_uids: Sequence[str]
) -> dict[str, tuple[ImagingSession, Patient]]:
    """Stored imaging sessions of these StudyInstanceUIDs, with their patient (any study)."""
    out: dict[str, tuple[ImagingSession, Patient]] = {}
    chunk = 500  # stay below the bound-parameter limits of every backend
    for start in range(0, len(study_uids), chunk):
        rows = session.execute(
            select(ImagingSession, Patient)
            .join(Visit, ImagingSession.visit_id == Visit.id)
            .join(Patient, Visit.patient_id == Patient.id)
            .where(ImagingSession.study_instance_uid.in_(study_uids[start : start + chunk]))
        ).all()
        out.update({imaging.study_instance_uid: (imaging, patient) for imaging, patient in rows})
    return out
