"""Create and update study rows with validation and an audit trail.

The one place that writes study data: the CLI, the importers and the web app
all call these functions, so every rule of METHOD.md is checked once and every
change leaves :class:`~bmetrack.study.models.AuditEvent` rows (who, when, which
field, old and new value, why).

- Functions take a :class:`~sqlalchemy.orm.Session` and an ``actor`` and never
  commit: the caller owns the transaction (``db.session_scope``), so a batch
  of changes is all-or-nothing.
- Invalid input raises :class:`ValidationError` carrying every
  :class:`Problem` found (record, field, value, reason with the fix).
- Updates take ``expected_row_version`` (the version the user opened) and
  raise :class:`StaleRecordError` when someone else changed the row since.
- Measurements are never edited: :func:`override_measurement` adds a new row
  that supersedes the old one.

Values may be typed (``datetime.date``, ``float``) or text as typed in a CSV
file (``"2021-03-04"``, ``"7.5"``, ``"yes"``); both go through the same
validators (the ``validate_*`` functions), which the importer reuses.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import and_, event, insert, inspect, or_, select
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import flag_modified, set_committed_value
from sqlalchemy.orm.exc import StaleDataError

from bmetrack.anatomy import LevelError, label_from_level, level_sort_key, normalise_level
from bmetrack.settings import Settings, resolve_settings
from bmetrack.study.analgesics import (
    ANALGESIC_CLASS_NAMES,
    UnknownDrugError,
    drug_lookup,
    split_drug_list,
)
from bmetrack.study.cohort import assign_visit_windows
from bmetrack.study.models import (
    AuditEvent,
    Base,
    ClinicalAssessment,
    MeasurementSource,
    NewVcfEvent,
    Patient,
    Procedure,
    ProcedureType,
    Study,
    TreatedLevel,
    VertebraMeasurement,
    Visit,
    WindowStatus,
)

__all__ = [
    "ASSESSMENT_FIELDS",
    "MEASUREMENT_FIELDS",
    "PATIENT_CODE_PATTERN",
    "FieldChecker",
    "NewMeasurement",
    "NewVisit",
    "Problem",
    "RecordNotFoundError",
    "StaleRecordError",
    "ValidationError",
    "add_measurement",
    "add_measurements",
    "add_new_vcf_event",
    "add_patient",
    "add_procedure",
    "add_treated_level",
    "add_visit",
    "add_visits",
    "apply_changes",
    "assessment_is_empty",
    "check_nominal_month",
    "check_procedure_date",
    "compute_visit_windows",
    "current_measurement_at",
    "current_measurements",
    "current_measurements_select",
    "edit_procedure",
    "first_procedure_date",
    "get_or_create_study",
    "get_study",
    "override_measurement",
    "parse_bool",
    "parse_choice",
    "parse_date",
    "parse_float",
    "parse_int",
    "parse_level",
    "parse_text",
    "patient_audit",
    "patient_code_warnings",
    "queue_create_audit",
    "remove_new_vcf_event",
    "require_actor",
    "same_value",
    "study_settings",
    "update_assessment",
    "update_patient",
    "update_procedure",
    "update_treated_level",
    "update_visit",
    "validate_assessment",
    "validate_measurement",
    "validate_patient",
    "validate_procedure_level",
    "validate_visit_date",
    "validation_problems",
    "vcf_problems",
]

PATIENT_CODE_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ASSESSMENT_FIELDS = (
    "vas",
    "vas_unit",
    "analgesic_drugs",
    "analgesic_class",
    "pain_other_level",
    "notes",
)
MEASUREMENT_FIELDS = (
    "bme_percent",
    "bme_present",
    "body_volume_ml",
    "edema_volume_ml",
    "cement_volume_ml",
    "rim_volume_ml",
    "height_anterior_mm",
    "height_middle_mm",
    "height_posterior_mm",
    "height_loss_percent",
    "genant_grade",
    "deformity",
)
DEFORMITIES = ("none", "wedge", "biconcave", "crush")
VAS_UNITS = ("0-10", "mm")
_NON_NEGATIVE_ML_MM = (
    "body_volume_ml",
    "edema_volume_ml",
    "cement_volume_ml",
    "rim_volume_ml",
    "height_anterior_mm",
    "height_middle_mm",
    "height_posterior_mm",
)
_MISSING_TEXT = {"", "na", "n/a", "nan", "null", "nat", "<na>"}


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class Problem:
    """One invalid value: which record, which field, what value and why (with the fix).

    ``table`` and ``line`` are set by the importers (``line`` counts the header
    as line 1 and skips comment lines; ``file_line`` is the line an editor shows).
    """

    record: str
    field: str
    value: Any
    reason: str
    table: str | None = None
    line: int | None = None
    file_line: int | None = None

    def __str__(self) -> str:
        return f"{self.record}: {self.field} = {_show(self.value)}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form for the CLI and the web app."""
        return {
            "table": self.table,
            "line": self.line,
            "file_line": self.file_line,
            "record": self.record,
            "field": self.field,
            "value": _audit_text(self.value),
            "reason": self.reason,
            "message": str(self),
        }


def _show(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "(empty)"
    return repr(value) if isinstance(value, str) else str(value)


class ValidationError(ValueError):
    """Invalid input; ``problems`` lists every problem found, not just the first."""

    def __init__(self, problems: Iterable[Problem], heading: str = "Invalid input") -> None:
        self.problems: list[Problem] = list(problems)
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        count = len(self.problems)
        plural = "problem" if count == 1 else "problems"
        super().__init__(f"{heading} ({count} {plural}):\n{lines}")


class StaleRecordError(ValueError):
    """The row changed since the user opened it (optimistic locking)."""


class RecordNotFoundError(LookupError):
    """No row with the given id or code."""


# --------------------------------------------------------------------------- value parsing


class _BadValueError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, float | np.floating) and math.isnan(float(value)):
        return True
    return isinstance(value, str) and value.strip().lower() in _MISSING_TEXT


def parse_text(value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def parse_float(value: Any) -> float | None:
    if _is_missing(value):
        return None
    if isinstance(value, bool | np.bool_):
        raise _BadValueError("expected a number, got a yes/no value")
    try:
        number = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise _BadValueError("expected a number (use '.' as decimal separator)") from None
    if not math.isfinite(number):
        raise _BadValueError("expected a finite number")
    return number


def parse_int(value: Any) -> int | None:
    number = parse_float(value)
    if number is None:
        return None
    if number != int(number):
        raise _BadValueError("expected a whole number")
    return int(number)


def parse_date(value: Any) -> dt.date | None:
    if _is_missing(value):
        return None
    if isinstance(value, pd.Timestamp | dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, np.datetime64):
        return pd.Timestamp(value).date()
    text = str(value).strip()
    date_part, _, time_part = text.replace("T", " ").partition(" ")
    try:
        if time_part.strip() not in {"", "00:00:00", "00:00"}:
            raise ValueError(text)
        return dt.date.fromisoformat(date_part) if len(date_part) == 10 else _raise_date(text)
    except ValueError:
        raise _BadValueError("expected a date written as YYYY-MM-DD (e.g. 2021-03-04)") from None


def _raise_date(text: str) -> dt.date:
    raise ValueError(text)


def parse_bool(value: Any) -> bool | None:
    if _is_missing(value):
        return None
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer) and int(value) in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in {"yes", "y", "true", "1", "1.0"}:
        return True
    if text in {"no", "n", "false", "0", "0.0"}:
        return False
    raise _BadValueError("expected yes or no")


def parse_level(value: Any) -> str | None:
    if _is_missing(value):
        return None
    try:
        return normalise_level(str(value))
    except LevelError:
        raise _BadValueError(
            "not a vertebral level; use C1-C7, T1-T12, L1-L5 (L6 for a lumbarised segment) or S1"
        ) from None


def parse_choice(value: Any, choices: Sequence[str]) -> str | None:
    if _is_missing(value):
        return None
    text = str(value.value if isinstance(value, enum.Enum) else value).strip()
    for choice in choices:
        if text.lower() == choice.lower():
            return choice
    raise _BadValueError(f"must be one of {', '.join(choices)}")


class FieldChecker:
    """Collects problems of one record while parsing its fields."""

    def __init__(self, record: str) -> None:
        self.record = record
        self.problems: list[Problem] = []

    def add(self, field_name: str, value: Any, reason: str) -> None:
        self.problems.append(Problem(self.record, field_name, value, reason))

    def parse(
        self,
        values: Mapping[str, Any],
        field_name: str,
        parser: Callable[[Any], Any],
        *,
        required: bool = False,
        minimum: float | None = None,
        maximum: float | None = None,
        unit: str = "",
    ) -> Any:
        raw = values.get(field_name)
        try:
            parsed = parser(raw)
        except _BadValueError as bad:
            self.add(field_name, raw, bad.reason)
            return None
        if parsed is None:
            if required:
                self.add(field_name, raw, "is required; fill it in")
            return None
        suffix = f" {unit}" if unit else ""
        if minimum is not None and parsed < minimum:
            self.add(field_name, raw, f"must be at least {_num(minimum)}{suffix}")
            return None
        if maximum is not None and parsed > maximum:
            self.add(field_name, raw, f"must be at most {_num(maximum)}{suffix}")
            return None
        return parsed


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


# --------------------------------------------------------------------------- validators


def validate_patient(
    values: Mapping[str, Any], record: str
) -> tuple[dict[str, Any], list[Problem]]:
    """Parse and check a patient's fields (``code`` or ``patient_code``, sex, ...).

    Only keys present in ``values`` are returned, so the result also serves
    partial updates.
    """
    check = FieldChecker(record)
    clean: dict[str, Any] = {}
    code_key = "patient_code" if "patient_code" in values else "code"
    if code_key in values:
        code = parse_text(values[code_key])
        if not PATIENT_CODE_PATTERN.fullmatch(code):
            check.add(
                code_key,
                values[code_key],
                "a patient code is 1-64 letters, digits, '-' or '_' (no spaces, no names or "
                "hospital numbers); use the pseudonymous study code, e.g. P001",
            )
        clean["code"] = code
    if "sex" in values:
        sex = check.parse(values, "sex", lambda v: parse_choice(v, ("F", "M", "U")))
        clean["sex"] = sex or "U"
    if "birth_year" in values:
        this_year = dt.date.today().year
        clean["birth_year"] = check.parse(
            values, "birth_year", parse_int, minimum=1890, maximum=this_year
        )
    if "enrolled_date" in values:
        clean["enrolled_date"] = check.parse(values, "enrolled_date", parse_date)
    if "notes" in values:
        clean["notes"] = parse_text(values["notes"])
    return clean, check.problems


def validate_procedure_level(
    values: Mapping[str, Any], record: str
) -> tuple[dict[str, Any], list[Problem]]:
    """Parse procedure_date, procedure_type, level and cement_volume_ml of one treated level."""
    check = FieldChecker(record)
    clean: dict[str, Any] = {}
    if "procedure_date" in values:
        clean["procedure_date"] = check.parse(values, "procedure_date", parse_date, required=True)
    if "procedure_type" in values:
        choices = [member.value for member in ProcedureType]
        kind = check.parse(values, "procedure_type", lambda v: parse_choice(v, choices))
        clean["procedure_type"] = ProcedureType(kind) if kind else ProcedureType.VERTEBROPLASTY
    if "level" in values:
        clean["level"] = check.parse(values, "level", parse_level, required=True)
    if "cement_volume_ml" in values:
        clean["cement_volume_ml"] = check.parse(
            values, "cement_volume_ml", parse_float, minimum=0, unit="ml"
        )
    if "notes" in values:
        clean["notes"] = parse_text(values["notes"])
    return clean, check.problems


def validate_assessment(
    values: Mapping[str, Any], record: str
) -> tuple[dict[str, Any], list[Problem]]:
    """Parse the clinical fields of a visit into the stored form.

    VAS is given on 0-10, or 0-100 with ``vas_unit="mm"`` (stored as mm / 10
    with the entered value and unit kept). Each drug must be known; the class
    is derived from the drugs, and a class given beside them must agree.
    Returns keys ``vas``, ``vas_entered``, ``vas_unit``, ``analgesic_class``,
    ``analgesic_drugs``, ``pain_other_level``, ``notes`` (those implied by
    ``values``).
    """
    check = FieldChecker(record)
    clean: dict[str, Any] = {}
    if "vas" in values or "vas_unit" in values:
        unit = check.parse(values, "vas_unit", lambda v: parse_choice(v, VAS_UNITS)) or "0-10"
        maximum = 100.0 if unit == "mm" else 10.0
        vas = check.parse(values, "vas", parse_float)
        if vas is not None and not 0 <= vas <= maximum:
            hint = (
                "; if it was measured on a 100 mm line, set vas_unit to mm"
                if unit == "0-10" and 10 < vas <= 100
                else ""
            )
            check.add("vas", values.get("vas"), f"VAS ({unit}) must be 0-{_num(maximum)}{hint}")
            vas = None
        clean["vas_unit"] = unit
        clean["vas_entered"] = vas
        clean["vas"] = None if vas is None else (vas / 10.0 if unit == "mm" else vas)
    drugs: list[str] | None = None
    if "analgesic_drugs" in values:
        drugs = split_drug_list(parse_text(values["analgesic_drugs"]))
        clean["analgesic_drugs"] = "; ".join(drugs)
    derived: int | None = None
    if drugs:
        lookup = drug_lookup()
        classes = []
        for drug in drugs:
            try:
                classes.append(lookup.classify(drug))
            except UnknownDrugError as error:
                check.add("analgesic_drugs", drug, str(error))
        if len(classes) == len(drugs):
            derived = max(classes)
    if "analgesic_class" in values or drugs is not None:
        given = check.parse(values, "analgesic_class", parse_int, minimum=0, maximum=3)
        if given is not None and derived is not None and given != derived:
            check.add(
                "analgesic_class",
                values.get("analgesic_class"),
                f"disagrees with analgesic_drugs {clean['analgesic_drugs']!r} (WHO class "
                f"{derived}, {ANALGESIC_CLASS_NAMES[derived]}); correct one of them or leave "
                "analgesic_class empty to derive it",
            )
        bad_drugs = bool(drugs) and derived is None
        clean["analgesic_class"] = (
            derived if derived is not None else (None if bad_drugs else given)
        )
    if "pain_other_level" in values:
        clean["pain_other_level"] = check.parse(values, "pain_other_level", parse_bool)
    if "notes" in values:
        clean["notes"] = parse_text(values["notes"])
    return clean, check.problems


def assessment_is_empty(values: Mapping[str, Any]) -> bool:
    """True when no clinical field of a visit row is filled (no assessment to store)."""
    return all(_is_missing(values.get(name)) for name in ASSESSMENT_FIELDS)


def validate_measurement(
    values: Mapping[str, Any], record: str, settings: Settings | None = None
) -> tuple[dict[str, Any], list[Problem]]:
    """Parse the measured values of one vertebral body (keys of ``MEASUREMENT_FIELDS``).

    ``bme_percent`` must be 0-100; volumes and heights must not be negative;
    ``genant_grade`` is 0-3; ``deformity`` is none, wedge, biconcave or crush.
    ``bme_present`` is derived from ``bme_percent`` when not given.
    """
    check = FieldChecker(record)
    unknown = sorted(set(values) - set(MEASUREMENT_FIELDS))
    for name in unknown:
        check.add(name, values[name], f"unknown measurement field; use {MEASUREMENT_FIELDS}")
    clean: dict[str, Any] = {}
    if "bme_percent" in values:
        clean["bme_percent"] = check.parse(
            values, "bme_percent", parse_float, required=True, minimum=0, maximum=100, unit="%"
        )
    for name in _NON_NEGATIVE_ML_MM:
        if name in values:
            unit = "ml" if name.endswith("_ml") else "mm"
            clean[name] = check.parse(values, name, parse_float, minimum=0, unit=unit)
    if "height_loss_percent" in values:
        clean["height_loss_percent"] = check.parse(
            values, "height_loss_percent", parse_float, minimum=-100, maximum=100, unit="%"
        )
    if "genant_grade" in values:
        clean["genant_grade"] = check.parse(values, "genant_grade", parse_int, minimum=0, maximum=3)
    if "deformity" in values:
        clean["deformity"] = check.parse(
            values, "deformity", lambda v: parse_choice(v, DEFORMITIES)
        )
    if "bme_present" in values:
        clean["bme_present"] = check.parse(values, "bme_present", parse_bool)
    elif clean.get("bme_percent") is not None:
        threshold = (settings or resolve_settings())["bme_present_threshold_percent"]
        clean["bme_present"] = bool(clean["bme_percent"] >= threshold)
    return clean, check.problems


def validate_visit_date(
    visit_date: dt.date,
    record: str,
    *,
    birth_year: int | None,
    first_procedure_date: dt.date | None,
    settings: Settings,
    field_name: str = "visit_date",
) -> list[Problem]:
    """Check a visit date against the birth year and the baseline window."""
    problems: list[Problem] = []
    if birth_year is not None and visit_date.year < birth_year:
        problems.append(
            Problem(
                record,
                field_name,
                visit_date,
                f"is before the patient's birth year {birth_year}; correct the date or the "
                "birth year",
            )
        )
    if first_procedure_date is None:
        problems.append(
            Problem(
                record,
                field_name,
                visit_date,
                "the patient has no procedure, so the visit cannot be placed in time; add the "
                "procedure first (procedures table)",
            )
        )
        return problems
    limit = int(settings["baseline_max_days_before_procedure"])
    days_before = (first_procedure_date - visit_date).days
    if days_before > limit:
        problems.append(
            Problem(
                record,
                field_name,
                visit_date,
                f"is {days_before} days before the first procedure ({first_procedure_date}); "
                f"a baseline visit may be at most {limit} days before it. Correct the date or "
                "change setting 'baseline_max_days_before_procedure'",
            )
        )
    return problems


def check_procedure_date(
    procedure_date: dt.date | None, birth_year: int | None, record: str
) -> list[Problem]:
    if procedure_date is not None and birth_year is not None and procedure_date.year < birth_year:
        return [
            Problem(
                record,
                "procedure_date",
                procedure_date,
                f"is before the patient's birth year {birth_year}; correct the date or the "
                "birth year",
            )
        ]
    return []


def _raise_if(problems: list[Problem], heading: str = "Invalid input") -> None:
    if problems:
        raise ValidationError(problems, heading)


# --------------------------------------------------------------------------- audit trail

_PENDING_AUDIT = "bmetrack_pending_audit"
_PENDING_LINKS = "bmetrack_pending_links"


def _audit_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.date | dt.datetime):
        return value.isoformat()
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, default=str, sort_keys=True)
    return str(value)


def _row_values(obj: Base) -> dict[str, Any]:
    mapper = inspect(type(obj))
    values: dict[str, Any] = {}
    for column in mapper.columns:
        if column.key in {"id", "row_version"}:
            continue
        value = getattr(obj, column.key)
        if isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, dt.date | dt.datetime):
            value = value.isoformat()
        values[column.key] = value
    return values


def queue_create_audit(session: Session, obj: Base, actor: str, reason: str = "") -> None:
    """Write a 'create' event once the row has its id (at the next flush, batched)."""
    table = obj.__tablename__

    def build() -> dict[str, Any] | None:
        entity_id = getattr(obj, "id", None)
        if entity_id is None:
            return None
        return {
            "at": dt.datetime.now(dt.UTC).replace(tzinfo=None),
            "actor": actor,
            "action": "create",
            "entity": table,
            "entity_id": entity_id,
            "field": "",
            "old_value": None,
            "new_value": json.dumps(_row_values(obj), default=str, sort_keys=True),
            "reason": reason,
            "context": "",
        }

    session.info.setdefault(_PENDING_AUDIT, []).append(build)


@event.listens_for(Session, "after_flush")
def _write_pending_audit(session: Session, _flush_context: Any) -> None:
    links: list[Callable[[Any], bool]] = session.info.get(_PENDING_LINKS, [])
    if links:
        connection = session.connection()
        session.info[_PENDING_LINKS] = [link for link in links if not link(connection)]
    pending: list[Callable[[], dict[str, Any] | None]] = session.info.get(_PENDING_AUDIT, [])
    if not pending:
        return
    rows: list[dict[str, Any]] = []
    waiting: list[Callable[[], dict[str, Any] | None]] = []
    for build in pending:
        row = build()
        if row is None:
            waiting.append(build)
        else:
            rows.append(row)
    session.info[_PENDING_AUDIT] = waiting
    if rows:
        session.connection().execute(insert(AuditEvent), rows)


@event.listens_for(Session, "after_soft_rollback")
def _drop_pending_audit(session: Session, _previous_transaction: Any) -> None:
    session.info.pop(_PENDING_AUDIT, None)
    session.info.pop(_PENDING_LINKS, None)


def _audit_change(
    session: Session,
    obj: Base,
    field_name: str,
    old: Any,
    new: Any,
    actor: str,
    reason: str,
    action: str = "update",
    entity_id: int | None = None,
) -> None:
    session.add(
        AuditEvent(
            actor=actor,
            action=action,
            entity=obj.__tablename__,
            entity_id=entity_id if entity_id is not None else obj.id,  # type: ignore[attr-defined]
            field=field_name,
            old_value=_audit_text(old),
            new_value=_audit_text(new),
            reason=reason,
        )
    )


def _describe(obj: Base) -> str:
    if isinstance(obj, Patient):
        return f"patient {obj.code}"
    if isinstance(obj, Visit):
        return f"visit {obj.visit_date} of patient {obj.patient.code}"
    if isinstance(obj, ClinicalAssessment):
        return f"clinical assessment of visit {obj.visit.visit_date}"
    if isinstance(obj, Procedure):
        return f"procedure {obj.procedure_date} of patient {obj.patient.code}"
    if isinstance(obj, VertebraMeasurement):
        return f"measurement {obj.id} ({obj.level})"
    return f"{obj.__tablename__} {getattr(obj, 'id', '?')}"


def _check_version(obj: Base, expected_row_version: int | None) -> None:
    if expected_row_version is None:
        return
    current = getattr(obj, "row_version", None)
    if current != expected_row_version:
        msg = (
            f"{_describe(obj)} was changed by someone else since you opened it (version "
            f"{current}, yours {expected_row_version}); reload and re-apply your change"
        )
        raise StaleRecordError(msg)


def apply_changes(
    session: Session,
    obj: Base,
    changes: Mapping[str, Any],
    actor: str,
    reason: str,
) -> dict[str, tuple[Any, Any]]:
    """Set changed attributes, one audit event per changed field; return what changed."""
    changed: dict[str, tuple[Any, Any]] = {}
    for name, new in changes.items():
        old = getattr(obj, name)
        if same_value(old, new):
            continue
        setattr(obj, name, new)
        changed[name] = (old, new)
        if getattr(obj, "id", None) is not None:
            _audit_change(session, obj, name, old, new, actor, reason)
    return changed


def same_value(old: Any, new: Any) -> bool:
    if isinstance(old, enum.Enum):
        old = old.value
    if isinstance(new, enum.Enum):
        new = new.value
    if old is None or new is None:
        return old is None and new is None
    return bool(old == new)


def _flush_checked(session: Session, obj: Base) -> None:
    """Flush; a concurrent change detected by the row_version turns into StaleRecordError."""
    what = _describe(obj)  # before the flush: a failed flush expires the object
    try:
        session.flush()
    except StaleDataError:
        msg = (
            f"{what} was changed by someone else while you edited it; reload and "
            "re-apply your change"
        )
        raise StaleRecordError(msg) from None


def require_actor(actor: str) -> None:
    if not str(actor).strip():
        msg = "actor must name who makes the change (e.g. a user name); got an empty string."
        raise ValueError(msg)


# --------------------------------------------------------------------------- studies, patients


def get_study(session: Session, code: str) -> Study:
    """The study with ``code``; RecordNotFoundError when there is none."""
    study = session.scalars(select(Study).where(Study.code == code)).one_or_none()
    if study is None:
        msg = f"No study with code {code!r}; create it with an import or get_or_create_study."
        raise RecordNotFoundError(msg)
    return study


def get_or_create_study(
    session: Session,
    code: str,
    title: str = "",
    *,
    actor: str = "system",
    nominal_months: Sequence[int] | None = None,
) -> Study:
    """Return the study with ``code``, creating it (with an audit event) if needed."""
    study = session.scalars(select(Study).where(Study.code == code)).one_or_none()
    if study is not None:
        return study
    if not PATIENT_CODE_PATTERN.fullmatch(code):
        raise ValidationError(
            [Problem(f"study {code!r}", "code", code, "use 1-64 letters, digits, '-' or '_'")]
        )
    months = [int(m) for m in (nominal_months or resolve_settings()["nominal_months"])]
    study = Study(code=code, title=title, nominal_months=months)
    session.add(study)
    queue_create_audit(session, study, actor)
    return study


def study_settings(study: Study, settings: Settings | None = None) -> Settings:
    """``settings`` (default: METHOD.md defaults) with the study's own nominal months."""
    settings = settings if settings is not None else resolve_settings()
    months = tuple(int(m) for m in study.nominal_months)
    if tuple(settings["nominal_months"]) == months:
        return settings
    return resolve_settings({**dict(settings.data), "nominal_months": months})


def add_patient(
    session: Session,
    study: Study,
    code: str,
    *,
    actor: str,
    sex: str = "U",
    birth_year: int | str | None = None,
    enrolled_date: dt.date | str | None = None,
    notes: str = "",
) -> Patient:
    """Add a patient to ``study`` (pseudonymous code, sex, birth year only)."""
    require_actor(actor)
    values = {
        "code": code,
        "sex": sex,
        "birth_year": birth_year,
        "enrolled_date": enrolled_date,
        "notes": notes,
    }
    clean, problems = validate_patient(values, f"patient {code}")
    if any(patient.code == clean["code"] for patient in study.patients):
        problems.append(
            Problem(
                f"patient {code}",
                "code",
                code,
                f"study {study.code} already has this patient; use update_patient to change it",
            )
        )
    _raise_if(problems)
    # Empty collections mark them loaded, so no lazy load after the flush.
    patient = Patient(study=study, procedures=[], visits=[], new_vcf_events=[], **clean)
    session.add(patient)
    queue_create_audit(session, patient, actor)
    return patient


def _get(session: Session, model: type[Any], entity_id: int) -> Any:
    obj = session.get(model, entity_id)
    if obj is None:
        msg = f"No {model.__tablename__} with id {entity_id}; it may have been deleted."
        raise RecordNotFoundError(msg)
    return obj


def update_patient(
    session: Session,
    patient_id: int,
    changes: Mapping[str, Any],
    *,
    actor: str,
    expected_row_version: int | None = None,
    reason: str = "",
) -> Patient:
    """Change fields of a patient (sex, birth_year, enrolled_date, notes, code)."""
    require_actor(actor)
    patient: Patient = _get(session, Patient, patient_id)
    _check_version(patient, expected_row_version)
    allowed = {"code", "sex", "birth_year", "enrolled_date", "notes"}
    record = f"patient {patient.code}"
    problems = [
        Problem(record, name, value, f"cannot be changed here; change one of {sorted(allowed)}")
        for name, value in changes.items()
        if name not in allowed
    ]
    clean, field_problems = validate_patient(
        {k: v for k, v in changes.items() if k in allowed}, record
    )
    problems += field_problems
    new_code = clean.get("code")
    if new_code and new_code != patient.code:
        others = session.scalars(
            select(Patient.id).where(Patient.study_id == patient.study_id, Patient.code == new_code)
        ).all()
        if others:
            problems.append(Problem(record, "code", new_code, "another patient has this code"))
    if "birth_year" in clean and clean["birth_year"] is not None:
        for procedure in patient.procedures:
            problems += check_procedure_date(procedure.procedure_date, clean["birth_year"], record)
        for visit in patient.visits:
            if visit.visit_date.year < clean["birth_year"]:
                problems.append(
                    Problem(
                        record,
                        "birth_year",
                        clean["birth_year"],
                        f"is after the visit on {visit.visit_date}; correct the birth year",
                    )
                )
    _raise_if(problems)
    apply_changes(session, patient, clean, actor, reason)
    _flush_checked(session, patient)
    return patient


# --------------------------------------------------------------------------- procedures


def first_procedure_date(patient: Patient) -> dt.date | None:
    return min((p.procedure_date for p in patient.procedures), default=None)


def add_procedure(
    session: Session,
    patient: Patient,
    procedure_date: dt.date | str,
    procedure_type: ProcedureType | str,
    levels: Sequence[tuple[str, float | str | None]],
    *,
    actor: str,
    notes: str = "",
    settings: Settings | None = None,
) -> Procedure:
    """Add a procedure treating ``levels`` (pairs of level name and cement volume in ml).

    When the procedure is earlier than the patient's first one, the visit
    windows of the patient's visits are recomputed (with audit events).
    """
    require_actor(actor)
    record = f"procedure of patient {patient.code}"
    clean, problems = validate_procedure_level(
        {"procedure_date": procedure_date, "procedure_type": procedure_type, "notes": notes},
        record,
    )
    parsed_levels, level_problems = _treated_level_list(levels, record)
    problems += level_problems
    date = clean.get("procedure_date")
    problems += check_procedure_date(date, patient.birth_year, record)
    if date is not None and any(p.procedure_date == date for p in patient.procedures):
        problems.append(
            Problem(
                record,
                "procedure_date",
                date,
                "the patient already has a procedure on this date; add the level to it "
                "(add_treated_level) instead",
            )
        )
    _raise_if(problems)
    assert date is not None
    earlier = first_procedure_date(patient)
    procedure = Procedure(
        patient=patient,
        procedure_date=date,
        procedure_type=clean["procedure_type"],
        notes=clean["notes"],
        treated_levels=[],
    )
    session.add(procedure)
    queue_create_audit(session, procedure, actor)
    for name, cement_ml in parsed_levels:
        _new_treated_level(session, procedure, name, cement_ml, actor)
    if earlier is not None and date < earlier and patient.visits:
        _recompute_windows(session, patient, actor, settings)
    return procedure


def _new_treated_level(
    session: Session, procedure: Procedure, level: str, cement_ml: float | None, actor: str
) -> TreatedLevel:
    treated = TreatedLevel(
        procedure=procedure, level=level, label=label_from_level(level), cement_volume_ml=cement_ml
    )
    session.add(treated)
    queue_create_audit(session, treated, actor)
    return treated


def add_treated_level(
    session: Session,
    procedure: Procedure,
    level: str,
    cement_volume_ml: float | str | None = None,
    *,
    actor: str,
) -> TreatedLevel:
    """Add one treated level to an existing procedure."""
    require_actor(actor)
    record = f"procedure {procedure.procedure_date} of patient {procedure.patient.code}"
    clean, problems = validate_procedure_level(
        {"level": level, "cement_volume_ml": cement_volume_ml}, record
    )
    if clean.get("level") in {t.level for t in procedure.treated_levels}:
        problems.append(
            Problem(
                record,
                "level",
                level,
                "this level is already treated in this procedure; list each level once",
            )
        )
    _raise_if(problems)
    return _new_treated_level(session, procedure, clean["level"], clean["cement_volume_ml"], actor)


def update_procedure(
    session: Session,
    procedure_id: int,
    changes: Mapping[str, Any],
    *,
    actor: str,
    expected_row_version: int | None = None,
    reason: str = "",
    settings: Settings | None = None,
) -> Procedure:
    """Change procedure_date, procedure_type or notes of a procedure."""
    require_actor(actor)
    procedure: Procedure = _get(session, Procedure, procedure_id)
    _check_version(procedure, expected_row_version)
    record = f"procedure {procedure.procedure_date} of patient {procedure.patient.code}"
    allowed = {"procedure_date", "procedure_type", "notes"}
    problems = [
        Problem(record, name, value, f"cannot be changed here; change one of {sorted(allowed)}")
        for name, value in changes.items()
        if name not in allowed
    ]
    clean, field_problems = validate_procedure_level(
        {k: v for k, v in changes.items() if k in allowed}, record
    )
    problems += field_problems
    problems += check_procedure_date(
        clean.get("procedure_date"), procedure.patient.birth_year, record
    )
    _raise_if(problems)
    first_before = first_procedure_date(procedure.patient)
    apply_changes(session, procedure, clean, actor, reason)
    _flush_checked(session, procedure)
    if first_procedure_date(procedure.patient) != first_before:
        _recompute_windows(session, procedure.patient, actor, settings)
    return procedure


def update_treated_level(
    session: Session,
    treated_level_id: int,
    changes: Mapping[str, Any],
    *,
    actor: str,
    reason: str = "",
) -> TreatedLevel:
    """Change the cement volume (or level) of a treated level."""
    require_actor(actor)
    treated: TreatedLevel = _get(session, TreatedLevel, treated_level_id)
    record = f"treated level {treated.level} of procedure {treated.procedure.procedure_date}"
    clean, problems = validate_procedure_level(
        {k: v for k, v in changes.items() if k in {"level", "cement_volume_ml"}}, record
    )
    if "level" in clean and clean["level"] is not None:
        clean["label"] = label_from_level(clean["level"])
    _raise_if(problems)
    apply_changes(session, treated, clean, actor, reason)
    return treated


# --------------------------------------------------------------------------- visits


@dataclass
class NewVisit:
    """Input of :func:`add_visits`: one visit, optionally with its clinical assessment."""

    patient: Patient
    visit_date: dt.date | str
    nominal_month: int | str | None = None
    assessment: Mapping[str, Any] | None = None
    new_vcf_levels: Sequence[str] = ()
    record: str = ""


def compute_visit_windows(
    visit_dates: Sequence[dt.date],
    first_procedure_dates: Sequence[dt.date],
    given_months: Sequence[int | None],
    settings: Settings,
) -> list[tuple[int | None, WindowStatus, int]]:
    """(nominal month, window status, days from first procedure) per visit, vectorised.

    Thin wrapper of :func:`bmetrack.study.cohort.assign_visit_windows`.
    """
    if not visit_dates:
        return []
    given = pd.Series(pd.array(list(given_months), dtype="Int64"))
    result = assign_visit_windows(
        pd.Series(pd.to_datetime(list(visit_dates))),
        pd.Series(pd.to_datetime(list(first_procedure_dates))),
        settings,
        given_month=given if given.notna().any() else None,
    )
    months = result.nominal_month.tolist()
    return [
        (None if pd.isna(month) else int(month), WindowStatus(status), int(days))
        for month, status, days in zip(
            months, result.window_status, result.days_from_procedure, strict=True
        )
    ]


def check_nominal_month(month: int | None, record: str, settings: Settings) -> list[Problem]:
    months = [int(m) for m in settings["nominal_months"]]
    if month is not None and month not in months:
        return [
            Problem(
                record,
                "nominal_month",
                month,
                f"is not a nominal month of this study ({months}); leave it empty to match "
                "the date to the nearest visit window",
            )
        ]
    return []


def vcf_problems(
    patient: Patient,
    levels: Sequence[str],
    record: str,
    visit: Visit | None = None,
    pending: Mapping[str, str] | None = None,
) -> tuple[list[str], list[Problem]]:
    """Parse new-VCF levels; a treated level or a level already recorded is an error."""
    problems: list[Problem] = []
    parsed: list[str] = []
    treated = {t.level for p in patient.procedures for t in p.treated_levels}
    recorded = {
        e.level: str(e.detected_date)
        for e in patient.new_vcf_events
        if visit is None or e.visit_id != visit.id
    }
    recorded.update(pending or {})
    for raw in levels:
        try:
            level = parse_level(raw)
        except _BadValueError as bad:
            problems.append(Problem(record, "new_vcf_levels", raw, bad.reason))
            continue
        if level is None:
            continue
        if level in treated:
            problems.append(
                Problem(
                    record,
                    "new_vcf_levels",
                    raw,
                    "is a treated level, not a new VCF; remove it from new_vcf_levels",
                )
            )
        elif level in recorded:
            problems.append(
                Problem(
                    record,
                    "new_vcf_levels",
                    raw,
                    f"a new VCF at {level} is already recorded (first seen {recorded[level]}); "
                    "list a new VCF only at the visit where it was first seen",
                )
            )
        elif level in parsed:
            problems.append(Problem(record, "new_vcf_levels", raw, "listed twice"))
        else:
            parsed.append(level)
    return parsed, problems


def add_visits(
    session: Session,
    visits: Sequence[NewVisit],
    *,
    actor: str,
    settings: Settings | None = None,
) -> list[Visit]:
    """Add many visits at once (window matching vectorised); all valid or none added.

    Each visit's nominal month, window status and days from procedure are
    computed relative to the patient's first procedure (METHOD.md 1). A visit's
    ``assessment`` mapping (fields of ``ASSESSMENT_FIELDS``) creates its
    clinical assessment; ``new_vcf_levels`` record new VCF first seen then.
    """
    require_actor(actor)
    if not visits:
        return []
    study = visits[0].patient.study
    settings = study_settings(study, settings)
    problems: list[Problem] = []
    prepared: list[tuple[NewVisit, dt.date, int | None, dict[str, Any], list[str]]] = []
    batch_dates: set[tuple[int, dt.date]] = set()
    pending_vcf: dict[int, dict[str, str]] = {}
    for item in visits:
        patient = item.patient
        record = item.record or f"visit {item.visit_date} of patient {patient.code}"
        check = FieldChecker(record)
        date = check.parse({"visit_date": item.visit_date}, "visit_date", parse_date, required=True)
        month = check.parse(
            {"nominal_month": item.nominal_month}, "nominal_month", parse_int, minimum=0
        )
        problems += check.problems
        problems += check_nominal_month(month, record, settings)
        assessment: dict[str, Any] = {}
        if item.assessment is not None and not assessment_is_empty(item.assessment):
            unknown = sorted(set(item.assessment) - set(ASSESSMENT_FIELDS))
            problems += [
                Problem(
                    record, name, item.assessment[name], f"unknown field; use {ASSESSMENT_FIELDS}"
                )
                for name in unknown
            ]
            assessment, assessment_problems = validate_assessment(
                {k: v for k, v in item.assessment.items() if k in ASSESSMENT_FIELDS}, record
            )
            problems += assessment_problems
        key = id(patient)
        levels, new_vcf_problems = vcf_problems(
            patient, item.new_vcf_levels, record, pending=pending_vcf.get(key)
        )
        problems += new_vcf_problems
        if date is None:
            continue
        pending_vcf.setdefault(key, {}).update(dict.fromkeys(levels, str(date)))
        problems += validate_visit_date(
            date,
            record,
            birth_year=patient.birth_year,
            first_procedure_date=first_procedure_date(patient),
            settings=settings,
        )
        if (key, date) in batch_dates or any(v.visit_date == date for v in patient.visits):
            problems.append(
                Problem(
                    record,
                    "visit_date",
                    date,
                    "the patient already has a visit on this date; change that visit instead "
                    "of adding a second one",
                )
            )
        batch_dates.add((key, date))
        prepared.append((item, date, month, assessment, levels))
    _raise_if(problems)
    windows = compute_visit_windows(
        [date for _, date, _, _, _ in prepared],
        [first_procedure_date(item.patient) or date for item, date, _, _, _ in prepared],
        [month for _, _, month, _, _ in prepared],
        settings,
    )
    created: list[Visit] = []
    for (item, date, _month, assessment, levels), (month, status, days) in zip(
        prepared, windows, strict=True
    ):
        visit = Visit(
            patient=item.patient,
            visit_date=date,
            nominal_month=month,
            window_status=status,
            days_from_procedure=days,
            measurements=[],
            imaging_sessions=[],
        )
        session.add(visit)
        queue_create_audit(session, visit, actor)
        if assessment:
            clinical = ClinicalAssessment(visit=visit, **assessment)
            session.add(clinical)
            queue_create_audit(session, clinical, actor)
        for level in levels:
            _new_vcf(session, item.patient, visit, level, date, "clinical", actor)
        created.append(visit)
    return created


def add_visit(
    session: Session,
    patient: Patient,
    visit_date: dt.date | str,
    *,
    actor: str,
    nominal_month: int | str | None = None,
    vas: float | str | None = None,
    vas_unit: str = "0-10",
    analgesic_drugs: str | Sequence[str] = "",
    analgesic_class: int | str | None = None,
    pain_other_level: bool | str | None = None,
    notes: str = "",
    new_vcf_levels: Sequence[str] = (),
    settings: Settings | None = None,
) -> Visit:
    """Add one visit with its clinical assessment (see :func:`add_visits`)."""
    drugs = analgesic_drugs if isinstance(analgesic_drugs, str) else "; ".join(analgesic_drugs)
    assessment = {
        "vas": vas,
        "vas_unit": vas_unit if vas is not None else None,
        "analgesic_drugs": drugs,
        "analgesic_class": analgesic_class,
        "pain_other_level": pain_other_level,
        "notes": notes,
    }
    item = NewVisit(patient, visit_date, nominal_month, assessment, new_vcf_levels)
    return add_visits(session, [item], actor=actor, settings=settings)[0]


def _recompute_windows(
    session: Session, patient: Patient, actor: str, settings: Settings | None
) -> None:
    """Re-match every visit of ``patient`` after its first procedure date changed."""
    first = first_procedure_date(patient)
    visits = list(patient.visits)
    if first is None or not visits:
        return
    windows = compute_visit_windows(
        [v.visit_date for v in visits],
        [first] * len(visits),
        [None] * len(visits),
        study_settings(patient.study, settings),
    )
    for visit, (month, status, days) in zip(visits, windows, strict=True):
        apply_changes(
            session,
            visit,
            {"nominal_month": month, "window_status": status, "days_from_procedure": days},
            actor,
            "first procedure date changed",
        )


def update_visit(
    session: Session,
    visit_id: int,
    changes: Mapping[str, Any],
    *,
    actor: str,
    expected_row_version: int | None = None,
    reason: str = "",
    settings: Settings | None = None,
) -> Visit:
    """Change a visit's date or nominal month; the window is recomputed.

    ``nominal_month`` set to None matches the date to the nearest window;
    when absent from ``changes`` and the date changes, the month is re-matched.
    """
    require_actor(actor)
    visit: Visit = _get(session, Visit, visit_id)
    _check_version(visit, expected_row_version)
    patient = visit.patient
    settings = study_settings(patient.study, settings)
    record = f"visit {visit.visit_date} of patient {patient.code}"
    allowed = {"visit_date", "nominal_month"}
    check = FieldChecker(record)
    for name in set(changes) - allowed:
        check.add(name, changes[name], f"cannot be changed here; change one of {sorted(allowed)}")
    date = visit.visit_date
    if "visit_date" in changes:
        date = check.parse(changes, "visit_date", parse_date, required=True) or date
    month = visit.nominal_month if "visit_date" not in changes else None
    if "nominal_month" in changes:
        month = check.parse(changes, "nominal_month", parse_int, minimum=0)
    problems = check.problems + check_nominal_month(month, record, settings)
    problems += validate_visit_date(
        date,
        record,
        birth_year=patient.birth_year,
        first_procedure_date=first_procedure_date(patient),
        settings=settings,
    )
    if date != visit.visit_date and any(v.visit_date == date for v in patient.visits):
        problems.append(
            Problem(record, "visit_date", date, "the patient already has a visit on this date")
        )
    _raise_if(problems)
    first = first_procedure_date(patient)
    assert first is not None
    ((new_month, status, days),) = compute_visit_windows([date], [first], [month], settings)
    apply_changes(
        session,
        visit,
        {
            "visit_date": date,
            "nominal_month": new_month,
            "window_status": status,
            "days_from_procedure": days,
        },
        actor,
        reason,
    )
    _flush_checked(session, visit)
    return visit


def update_assessment(
    session: Session,
    visit_id: int,
    changes: Mapping[str, Any],
    *,
    actor: str,
    expected_row_version: int | None = None,
    reason: str = "",
) -> ClinicalAssessment:
    """Change clinical fields of a visit (creating its assessment if it has none).

    ``changes`` holds fields of ``ASSESSMENT_FIELDS``; the others keep their
    value and the whole assessment is re-validated (e.g. class vs drugs).
    ``expected_row_version`` is the assessment's version.
    """
    require_actor(actor)
    visit: Visit = _get(session, Visit, visit_id)
    clinical = visit.assessment
    record = f"visit {visit.visit_date} of patient {visit.patient.code}"
    unknown = sorted(set(changes) - set(ASSESSMENT_FIELDS))
    _raise_if(
        [
            Problem(record, name, changes[name], f"unknown field; use {ASSESSMENT_FIELDS}")
            for name in unknown
        ]
    )
    if clinical is not None:
        _check_version(clinical, expected_row_version)
        current: dict[str, Any] = {
            "vas": clinical.vas_entered,
            "vas_unit": clinical.vas_unit,
            "analgesic_drugs": clinical.analgesic_drugs,
            "pain_other_level": clinical.pain_other_level,
            "notes": clinical.notes,
        }
        # A class stated without drugs is kept unless changed; with drugs it is re-derived.
        if not clinical.analgesic_drugs:
            current["analgesic_class"] = clinical.analgesic_class
    else:
        current = {}
    merged = {**current, **changes}
    if "analgesic_drugs" in changes and "analgesic_class" not in changes:
        merged.pop("analgesic_class", None)
    if "vas" in changes and "vas_unit" not in changes and clinical is None:
        merged["vas_unit"] = "0-10"
    clean, problems = validate_assessment(merged, record)
    _raise_if(problems)
    if clinical is None:
        clinical = ClinicalAssessment(visit=visit, **clean)
        session.add(clinical)
        queue_create_audit(session, clinical, actor, reason)
        return clinical
    apply_changes(session, clinical, clean, actor, reason)
    _flush_checked(session, clinical)
    return clinical


def _new_vcf(
    session: Session,
    patient: Patient,
    visit: Visit | None,
    level: str,
    detected_date: dt.date,
    source: str,
    actor: str,
) -> NewVcfEvent:
    vcf = NewVcfEvent(patient=patient, level=level, detected_date=detected_date, source=source)
    session.add(vcf)
    if visit is not None:
        _link_vcf_visit(session, vcf, visit)
    queue_create_audit(session, vcf, actor)
    return vcf


def _link_vcf_visit(session: Session, vcf: NewVcfEvent, visit: Visit) -> None:
    """Set ``vcf.visit_id``; the model has no relationship, so a new visit is linked after flush."""
    if visit.id is not None:
        vcf.visit_id = visit.id
        return

    def link(connection: Any) -> bool:
        if vcf.id is None or visit.id is None:
            return False
        table = NewVcfEvent.__table__
        connection.execute(table.update().where(table.c.id == vcf.id).values(visit_id=visit.id))
        set_committed_value(vcf, "visit_id", visit.id)
        return True

    session.info.setdefault(_PENDING_LINKS, []).append(link)


def add_new_vcf_event(
    session: Session,
    patient: Patient,
    level: str,
    detected_date: dt.date | str,
    *,
    actor: str,
    visit: Visit | None = None,
    source: str = "clinical",
) -> NewVcfEvent:
    """Record a new VCF at an untreated level, first seen on ``detected_date``."""
    require_actor(actor)
    record = f"new VCF of patient {patient.code}"
    check = FieldChecker(record)
    date = check.parse({"detected_date": detected_date}, "detected_date", parse_date, required=True)
    levels, problems = vcf_problems(patient, [level], record)
    problems = check.problems + problems
    if date is not None and patient.birth_year is not None and date.year < patient.birth_year:
        problems.append(
            Problem(record, "detected_date", date, "is before the patient's birth year")
        )
    _raise_if(problems)
    assert date is not None
    return _new_vcf(session, patient, visit, levels[0], date, source, actor)


def _audit_delete(session: Session, obj: Base, actor: str, reason: str, context: str = "") -> None:
    """A 'delete' event keeping the row's values, written before the row goes."""
    session.add(
        AuditEvent(
            actor=actor,
            action="delete",
            entity=obj.__tablename__,
            entity_id=getattr(obj, "id", None),
            field="",
            old_value=json.dumps(_row_values(obj), default=str, sort_keys=True),
            new_value=None,
            reason=reason,
            context=context,
        )
    )


def remove_new_vcf_event(
    session: Session, vcf: NewVcfEvent, *, actor: str, reason: str = ""
) -> None:
    """Delete a new-VCF record (an entry error), keeping its values in the audit log."""
    require_actor(actor)
    _audit_delete(session, vcf, actor, reason)
    vcf.patient.new_vcf_events.remove(vcf)
    session.delete(vcf)


# --------------------------------------------------------------------------- measurements


def current_measurements_select(study: Study | None = None, patient: Patient | None = None) -> Any:
    """SELECT of measurements not superseded by an override (optionally one study/patient)."""
    query = select(VertebraMeasurement).where(VertebraMeasurement.superseded_by_id.is_(None))
    if patient is not None:
        query = query.join(Visit).where(Visit.patient_id == patient.id)
    elif study is not None:
        query = query.join(Visit).join(Patient).where(Patient.study_id == study.id)
    return query.order_by(VertebraMeasurement.visit_id, VertebraMeasurement.label)


def current_measurements(
    session: Session, study: Study | None = None, patient: Patient | None = None
) -> list[VertebraMeasurement]:
    """Measurements that are not superseded (what the analysis reads)."""
    return list(session.scalars(current_measurements_select(study, patient)))


def current_measurement_at(visit: Visit, level: str) -> VertebraMeasurement | None:
    for measurement in visit.measurements:
        if measurement.level == level and measurement.superseded_by_id is None:
            return measurement
    return None


def add_measurement(
    session: Session,
    patient: Patient,
    visit_date: dt.date | str,
    level: str,
    measures: Mapping[str, Any],
    *,
    actor: str,
    source: MeasurementSource | str = MeasurementSource.AUTOMATIC,
    method_version: str = "",
    settings_json: Mapping[str, Any] | None = None,
    input_series_uids: Sequence[str] = (),
    imaging_session_id: int | None = None,
    created_by: str | None = None,
    overridden_by: str | None = None,
    override_reason: str | None = None,
    replace_manual: bool = False,
    settings: Settings | None = None,
) -> VertebraMeasurement:
    """Store the measurement of one vertebral body at the visit on ``visit_date``.

    The visit is created when the patient has none on that date. A current
    measurement of the same level at that visit is superseded by the new one
    (refused when it is a manual override, unless ``replace_manual``).
    """
    require_actor(actor)
    record = f"measurement {level} on {visit_date} of patient {patient.code}"
    check = FieldChecker(record)
    date = check.parse({"visit_date": visit_date}, "visit_date", parse_date, required=True)
    level_name = check.parse({"level": level}, "level", parse_level, required=True)
    kind = check.parse(
        {"source": source},
        "source",
        lambda v: parse_choice(v, [m.value for m in MeasurementSource]),
    )
    settings = study_settings(patient.study, settings)
    clean, problems = validate_measurement(measures, record, settings)
    problems = check.problems + problems
    if "bme_percent" not in measures:
        problems.append(Problem(record, "bme_percent", None, "is required; fill it in"))
    _raise_if(problems)
    assert date is not None and level_name is not None
    visit = next((v for v in patient.visits if v.visit_date == date), None)
    if visit is None:
        visit = add_visits(
            session, [NewVisit(patient, date, record=record)], actor=actor, settings=settings
        )[0]
    old = current_measurement_at(visit, level_name)
    if old is not None and old.source == MeasurementSource.MANUAL and not replace_manual:
        msg = (
            f"{record}: the current value is a manual override by {old.overridden_by}; "
            "pass replace_manual=True to replace it, or override it again"
        )
        raise ValidationError([Problem(record, "source", kind, msg)])
    measurement = VertebraMeasurement(
        visit=visit,
        level=level_name,
        label=label_from_level(level_name),
        source=MeasurementSource(kind or MeasurementSource.AUTOMATIC),
        method_version=method_version or "",
        settings_json=dict(settings_json or {}),
        input_series_uids=list(input_series_uids),
        imaging_session_id=imaging_session_id,
        created_by=created_by or actor,
        overridden_by=overridden_by or None,
        override_reason=override_reason or None,
        **clean,
    )
    session.add(measurement)
    queue_create_audit(session, measurement, actor)
    if old is not None:
        _supersede(session, old, measurement, actor, "replaced by a new measurement")
    return measurement


@dataclass
class NewMeasurement:
    """Input of :func:`add_measurements`: one vertebral body measured at one visit."""

    patient: Patient
    visit_date: dt.date | str
    level: str
    measures: Mapping[str, Any]
    source: MeasurementSource | str = MeasurementSource.AUTOMATIC
    method_version: str = ""
    settings_json: Mapping[str, Any] | None = None
    input_series_uids: Sequence[str] = ()
    imaging_session_id: int | None = None
    created_by: str | None = None
    overridden_by: str | None = None
    override_reason: str | None = None
    record: str = ""


def add_measurements(
    session: Session,
    items: Sequence[NewMeasurement],
    *,
    actor: str,
    settings: Settings | None = None,
) -> list[int]:
    """Insert many new measurements at once; all valid or none added. Returns their ids.

    Same rules as :func:`add_measurement`, written with one bulk INSERT (and
    one for their audit events) for speed. A level that already has a current
    measurement at that visit is refused: use :func:`add_measurement` to
    supersede it. Missing visits are created.
    """
    require_actor(actor)
    if not items:
        return []
    settings = study_settings(items[0].patient.study, settings)
    problems: list[Problem] = []
    prepared: list[tuple[NewMeasurement, dt.date, str, str, dict[str, Any]]] = []
    seen: set[tuple[int, dt.date, str]] = set()
    sources = [m.value for m in MeasurementSource]
    for item in items:
        record = item.record or (
            f"measurement {item.level} on {item.visit_date} of patient {item.patient.code}"
        )
        check = FieldChecker(record)
        date = check.parse({"visit_date": item.visit_date}, "visit_date", parse_date, required=True)
        level = check.parse({"level": item.level}, "level", parse_level, required=True)
        kind = check.parse({"source": item.source}, "source", lambda v: parse_choice(v, sources))
        clean, more = validate_measurement(item.measures, record, settings)
        problems += check.problems + more
        if "bme_percent" not in item.measures:
            problems.append(Problem(record, "bme_percent", None, "is required; fill it in"))
        if date is None or level is None:
            continue
        key = (id(item.patient), date, level)
        if key in seen:
            problems.append(Problem(record, "level", level, "measured twice at this visit"))
        seen.add(key)
        visit = next((v for v in item.patient.visits if v.visit_date == date), None)
        if visit is not None and current_measurement_at(visit, level) is not None:
            problems.append(
                Problem(
                    record,
                    "level",
                    level,
                    "already has a current measurement at this visit; supersede it with "
                    "add_measurement or override_measurement",
                )
            )
        prepared.append((item, date, level, kind or MeasurementSource.AUTOMATIC.value, clean))
    _raise_if(problems)
    missing: dict[tuple[int, dt.date], NewVisit] = {}
    for item, date, _level, _kind, _clean in prepared:
        if not any(v.visit_date == date for v in item.patient.visits):
            missing.setdefault(
                (id(item.patient), date), NewVisit(item.patient, date, record=item.record)
            )
    add_visits(session, list(missing.values()), actor=actor, settings=settings)
    session.flush()
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    rows: list[dict[str, Any]] = []
    touched: list[Visit] = []
    for item, date, level, kind, clean in prepared:
        visit = next(v for v in item.patient.visits if v.visit_date == date)
        touched.append(visit)
        row: dict[str, Any] = dict.fromkeys(MEASUREMENT_FIELDS)
        row.update(clean)
        row.update(
            visit_id=visit.id,
            imaging_session_id=item.imaging_session_id,
            level=level,
            label=label_from_level(level),
            source=MeasurementSource(kind),
            method_version=item.method_version or "",
            settings_json=dict(item.settings_json or {}),
            input_series_uids=list(item.input_series_uids),
            created_by=item.created_by or actor,
            created_at=now,
            overridden_by=item.overridden_by or None,
            override_reason=item.override_reason or None,
            supersedes_id=None,
            superseded_by_id=None,
            row_version=1,
        )
        rows.append(row)
    result = session.connection().execute(
        insert(VertebraMeasurement).returning(VertebraMeasurement.id, sort_by_parameter_order=True),
        rows,
    )
    ids = [int(entity_id) for entity_id in result.scalars().all()]
    audit = []
    for entity_id, row in zip(ids, rows, strict=True):
        values = {k: v for k, v in row.items() if k != "row_version"}
        values["source"] = row["source"].value
        values["created_at"] = now.isoformat()
        audit.append(
            {
                "at": now,
                "actor": actor,
                "action": "create",
                "entity": VertebraMeasurement.__tablename__,
                "entity_id": entity_id,
                "field": "",
                "old_value": None,
                "new_value": json.dumps(values, default=str, sort_keys=True),
                "reason": "",
                "context": "",
            }
        )
    session.connection().execute(insert(AuditEvent), audit)
    for visit in {id(v): v for v in touched}.values():
        session.expire(visit, ["measurements"])
    return ids


def _supersede(
    session: Session,
    old: VertebraMeasurement,
    new: VertebraMeasurement,
    actor: str,
    reason: str,
) -> None:
    _flush_checked(session, old)  # the new row needs its id
    new.supersedes_id = old.id
    apply_changes(session, old, {"superseded_by_id": new.id}, actor, reason)
    _flush_checked(session, old)


def override_measurement(
    session: Session,
    measurement_id: int,
    changes: Mapping[str, Any],
    *,
    actor: str,
    reason: str,
    expected_row_version: int | None = None,
) -> VertebraMeasurement:
    """Correct a measurement by hand: a new ``manual`` row supersedes the old one.

    ``changes`` holds measurement fields (``MEASUREMENT_FIELDS``) and may hold
    ``level`` to say the body was mislabelled: the new level must be a valid
    level name not already measured (current row) at the same visit. The old
    row stays unchanged except for ``superseded_by_id``; the audit log gets one
    'override' event per changed field, ``level`` included (old and new value,
    reason).
    """
    require_actor(actor)
    old: VertebraMeasurement = _get(session, VertebraMeasurement, measurement_id)
    record = f"measurement {old.id} ({old.level}, visit {old.visit.visit_date})"
    if not str(reason or "").strip():
        raise ValidationError(
            [Problem(record, "reason", reason, "an override needs a reason; say why")]
        )
    _check_version(old, expected_row_version)
    if old.superseded_by_id is not None:
        msg = (
            f"{record} was already replaced by measurement {old.superseded_by_id}; reload and "
            "override the current value"
        )
        raise StaleRecordError(msg)
    measures = {name: value for name, value in changes.items() if name != "level"}
    clean, problems = validate_measurement(measures, record)
    level = old.level
    if "level" in changes:
        level, level_problems = _override_level(old, changes["level"], record)
        problems.extend(level_problems)
    if clean.get("bme_percent") is not None and "bme_present" not in changes:
        threshold = study_settings(old.visit.patient.study)["bme_present_threshold_percent"]
        clean["bme_present"] = bool(clean["bme_percent"] >= threshold)
    _raise_if(problems)
    values = {name: getattr(old, name) for name in MEASUREMENT_FIELDS}
    new = VertebraMeasurement(
        visit=old.visit,
        imaging_session_id=old.imaging_session_id,
        level=level,
        label=old.label if level == old.level else label_from_level(level),
        source=MeasurementSource.MANUAL,
        method_version=old.method_version,
        settings_json=dict(old.settings_json or {}),
        input_series_uids=list(old.input_series_uids or []),
        created_by=actor,
        overridden_by=actor,
        override_reason=reason,
        **{**values, **clean},
    )
    session.add(new)
    queue_create_audit(session, new, actor, reason)
    _supersede(session, old, new, actor, reason)
    for name, value in clean.items():
        if not same_value(values[name], value):
            _audit_change(session, new, name, values[name], value, actor, reason, action="override")
    if level != old.level:
        _audit_change(session, new, "level", old.level, level, actor, reason, action="override")
    return new


def _override_level(old: VertebraMeasurement, value: Any, record: str) -> tuple[str, list[Problem]]:
    """The new level of an override, or problems: invalid name, or measured at that visit."""
    try:
        level = parse_level(value)
    except _BadValueError as error:
        return old.level, [Problem(record, "level", value, str(error))]
    if level is None:
        return old.level, [Problem(record, "level", value, "is empty; give a level such as L1")]
    if level == old.level:
        return level, []
    taken = current_measurement_at(old.visit, level)
    if taken is not None:
        reason = (
            f"already has a current measurement ({taken.id}) at this visit; override that "
            "measurement instead, or relabel it first"
        )
        return old.level, [Problem(record, "level", level, reason)]
    return level, []


def sort_levels(levels: Iterable[str]) -> list[str]:
    """Level names in cranio-caudal order."""
    return sorted(levels, key=level_sort_key)


# --------------------------------------------------------------------------- forms (web app)


def validation_problems(session: Session, write: Callable[[], object]) -> list[Problem]:
    """The problems a write of this module would raise, keeping nothing it wrote.

    Runs ``write()`` (e.g. ``lambda: add_patient(session, study, "P9", actor="nurse")``)
    and then rolls back the session's whole transaction, whatever happened: give it a
    session of its own. Forms use it to validate as you type with exactly the rules of
    the write itself, which are those of the importers. A stale ``expected_row_version``
    is reported as a problem of the field ``row_version``.

    Returns
    -------
    list of Problem
        Empty when the write would succeed.
    """
    try:
        with session.no_autoflush:
            write()
    except ValidationError as error:
        return list(error.problems)
    except StaleRecordError as error:
        return [Problem("form", "row_version", None, str(error))]
    finally:
        session.rollback()
    return []


_NAME_LIKE_CODE = re.compile(r"^[A-Za-z]{2,}([_-][A-Za-z]{2,})*$")


def patient_code_warnings(code: str) -> list[str]:
    """Warnings (not errors) about a patient code that may be a direct identifier.

    A code made of letters only (``Smith``, ``jan_de-vries``) may be a name; study codes
    carry a number (``P001``). The importers accept such codes, so this only warns.
    """
    text = parse_text(code)
    if _NAME_LIKE_CODE.fullmatch(text):
        return [
            f"{text!r} has no digits and may be a name; use the pseudonymous study code "
            "(e.g. P001), never a name or hospital number"
        ]
    return []


def _treated_level_list(
    levels: Sequence[tuple[Any, Any]], record: str
) -> tuple[list[tuple[str, float | None]], list[Problem]]:
    """Parse (level, cement ml) pairs of one procedure: at least one, each level once."""
    problems: list[Problem] = []
    if not levels:
        problems.append(Problem(record, "levels", [], "name at least one treated level"))
    parsed: list[tuple[str, float | None]] = []
    seen: set[str] = set()
    for level, cement_ml in levels:
        clean, level_problems = validate_procedure_level(
            {"level": level, "cement_volume_ml": cement_ml}, f"{record}, level {level}"
        )
        problems += level_problems
        name = clean.get("level")
        if name is None:
            continue
        if name in seen:
            problems.append(
                Problem(
                    record,
                    "level",
                    level,
                    "this level is treated twice in one procedure; list each level once",
                )
            )
            continue
        seen.add(name)
        parsed.append((name, clean.get("cement_volume_ml")))
    return parsed, problems


def edit_procedure(
    session: Session,
    procedure_id: int,
    changes: Mapping[str, Any],
    levels: Sequence[tuple[Any, Any]],
    *,
    actor: str,
    expected_row_version: int | None = None,
    reason: str = "",
    settings: Settings | None = None,
) -> Procedure:
    """Change a procedure and set its treated levels, all or nothing (the procedure form).

    Parameters
    ----------
    changes : mapping
        ``procedure_date``, ``procedure_type`` and/or ``notes``, as :func:`update_procedure`.
    levels : sequence of (level, cement volume in ml)
        The treated levels after the edit: levels not listed are removed (their values
        kept in a ``delete`` audit event), new ones added, cement volumes updated.
    expected_row_version : int, optional
        The procedure's version the user opened. Any change to its levels moves the
        version on too, so a form opened before is refused as stale.

    Raises
    ------
    ValidationError
        Every problem of the fields and levels; nothing is changed.
    StaleRecordError
        The procedure changed since ``expected_row_version``.
    """
    require_actor(actor)
    procedure: Procedure = _get(session, Procedure, procedure_id)
    _check_version(procedure, expected_row_version)
    patient = procedure.patient
    record = f"procedure {procedure.procedure_date} of patient {patient.code}"
    allowed = {"procedure_date", "procedure_type", "notes"}
    problems = [
        Problem(record, name, value, f"cannot be changed here; change one of {sorted(allowed)}")
        for name, value in changes.items()
        if name not in allowed
    ]
    fields = {k: v for k, v in changes.items() if k in allowed}
    clean, field_problems = validate_procedure_level(fields, record)
    problems += field_problems
    date = clean.get("procedure_date")
    problems += check_procedure_date(date, patient.birth_year, record)
    if date is not None and any(
        p.procedure_date == date and p.id != procedure.id for p in patient.procedures
    ):
        problems.append(
            Problem(
                record,
                "procedure_date",
                date,
                "the patient already has another procedure on this date; edit that one instead",
            )
        )
    parsed, level_problems = _treated_level_list(levels, record)
    problems += level_problems
    _raise_if(problems)
    version_before = procedure.row_version
    if fields:
        update_procedure(
            session, procedure.id, fields, actor=actor, reason=reason, settings=settings
        )
    wanted = dict(parsed)
    current = {t.level: t for t in procedure.treated_levels}
    levels_changed = False
    for level, treated in current.items():
        if level in wanted:
            continue
        _audit_delete(session, treated, actor, reason, context=f"procedure {procedure.id}")
        procedure.treated_levels.remove(treated)
        session.delete(treated)
        levels_changed = True
    for level, cement_ml in parsed:
        kept = current.get(level)
        if kept is None:
            add_treated_level(session, procedure, level, cement_ml, actor=actor)
            levels_changed = True
        elif not same_value(kept.cement_volume_ml, cement_ml):
            update_treated_level(
                session, kept.id, {"cement_volume_ml": cement_ml}, actor=actor, reason=reason
            )
            levels_changed = True
    if levels_changed and procedure.row_version == version_before:
        # Treated levels have no version of their own: an UPDATE of the procedure row moves
        # its row_version (once per edit), so forms opened before are refused as stale.
        flag_modified(procedure, "notes")
    _flush_checked(session, procedure)
    return procedure


def patient_audit(session: Session, patient_id: int) -> list[AuditEvent]:
    """Audit events of a patient and of its procedures, treated levels, visits, oldest first.

    Includes the clinical assessments and new-VCF records, and treated levels removed by
    :func:`edit_procedure`.
    """
    patient: Patient = _get(session, Patient, patient_id)
    procedure_ids = [p.id for p in patient.procedures]
    # Removed treated levels are found through their delete events, then all their events.
    removed_level_ids = session.scalars(
        select(AuditEvent.entity_id).where(
            AuditEvent.entity == TreatedLevel.__tablename__,
            AuditEvent.action == "delete",
            AuditEvent.context.in_([f"procedure {i}" for i in procedure_ids]),
        )
    ).all()
    ids: dict[str, list[int]] = {
        Patient.__tablename__: [patient.id],
        Procedure.__tablename__: procedure_ids,
        TreatedLevel.__tablename__: [t.id for p in patient.procedures for t in p.treated_levels]
        + list(removed_level_ids),
        Visit.__tablename__: [v.id for v in patient.visits],
        ClinicalAssessment.__tablename__: [
            v.assessment.id for v in patient.visits if v.assessment is not None
        ],
        NewVcfEvent.__tablename__: [e.id for e in patient.new_vcf_events],
    }
    conditions = [
        and_(AuditEvent.entity == entity, AuditEvent.entity_id.in_(entity_ids))
        for entity, entity_ids in ids.items()
        if entity_ids
    ]
    query = select(AuditEvent).where(or_(*conditions)).order_by(AuditEvent.id)
    return list(session.scalars(query))
