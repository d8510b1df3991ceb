"""REDCap exchange: flat record export/import and the data dictionary.

Follows REDCap's flat ("records") CSV conventions for a longitudinal project
with repeating instruments:

- one row per record x event (x repeating instance); ``record_id`` is the
  patient code; ``redcap_event_name`` is ``baseline_arm_1`` for month 0 and
  ``month_{m}_arm_1`` for each other nominal month of the study;
- patient fields sit on the baseline event; each visit's clinical fields on
  the event of its nominal month;
- treated levels (instrument ``treated_level``, on the baseline event) and
  vertebra measurements (``vertebra_measurement``, on the event of their
  visit) are repeating instruments: ``redcap_repeat_instrument`` names the
  instrument and ``redcap_repeat_instance`` counts 1..n;
- visits that match no nominal month, or a second visit matching the same
  month, go to event ``unscheduled_arm_1`` as instances of the repeating
  instrument ``visit``;
- checkbox fields are ``field___code`` columns holding 1/0, yes/no fields
  1/0, dates YYYY-MM-DD; each instrument has a ``{form}_complete`` column
  (2 = complete).

An import converts the flat file back to the exchange tables and runs them
through :func:`bmetrack.study.importers.import_tables` (same validation, same
all-or-nothing transaction).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import Engine

from bmetrack.anatomy import LEVEL_LABELS, level_from_label
from bmetrack.settings import Settings, resolve_settings
from bmetrack.study import records
from bmetrack.study.db import session_scope
from bmetrack.study.exporters import export_frames
from bmetrack.study.importers import (
    ImportReport,
    ImportValidationError,
    ProgressCallback,
    cell_text,
    import_tables,
)
from bmetrack.study.models import MeasurementSource, ProcedureType, Study
from bmetrack.study.records import Problem
from bmetrack.study.schema import TABLES

__all__ = [
    "DICTIONARY_COLUMNS",
    "REDCAP_FIELDS",
    "RedcapField",
    "event_name",
    "export_redcap",
    "import_redcap",
    "read_redcap_csv",
    "redcap_data_dictionary",
    "redcap_events",
    "redcap_flat_columns",
    "redcap_from_frames",
    "redcap_to_frames",
]

DICTIONARY_COLUMNS = [
    "Variable / Field Name",
    "Form Name",
    "Section Header",
    "Field Type",
    "Field Label",
    "Choices, Calculations, OR Slider Labels",
    "Field Note",
    "Text Validation Type OR Show Slider Number",
    "Text Validation Min",
    "Text Validation Max",
    "Identifier?",
    "Branching Logic (Show field only if...)",
    "Required Field?",
    "Custom Alignment",
    "Question Number (surveys only)",
    "Matrix Group Name",
    "Matrix Ranking?",
    "Field Annotation",
]
FORMS = ("patient", "visit", "treated_level", "vertebra_measurement")
UNSCHEDULED_EVENT = "unscheduled_arm_1"
_VAS_UNIT_CODES = {"1": "0-10", "2": "mm"}
_LEVEL_CHOICES = " | ".join(f"{label}, {level}" for level, label in LEVEL_LABELS.items())


@dataclass(frozen=True)
class RedcapField:
    """One REDCap field and where its value lives in the exchange tables."""

    name: str
    form: str
    field_type: str
    label: str
    table: str = ""  # exchange table, "" for record_id
    column: str = ""  # exchange column
    choices: str = ""
    note: str = ""
    validation: str = ""
    minimum: str = ""
    maximum: str = ""
    identifier: bool = False
    branching: str = ""
    required: bool = False


def _f(name: str, form: str, kind: str, label: str, table: str, column: str, **kw: Any) -> Any:
    return RedcapField(name, form, kind, label, table, column, **kw)


_NUMBER = {"validation": "number"}
_DATE = {"validation": "date_ymd", "identifier": True}
REDCAP_FIELDS: tuple[RedcapField, ...] = (
    RedcapField(
        "record_id", "patient", "text", "Patient code (pseudonymous study code)", required=True
    ),
    _f(
        "sex",
        "patient",
        "dropdown",
        "Sex",
        "patients",
        "sex",
        choices="F, F (female) | M, M (male) | U, U (unknown)",
        required=True,
    ),
    _f(
        "birth_year",
        "patient",
        "text",
        "Year of birth",
        "patients",
        "birth_year",
        validation="integer",
        minimum="1890",
        maximum="2100",
    ),
    _f(
        "enrolled_date",
        "patient",
        "text",
        "Date of inclusion",
        "patients",
        "enrolled_date",
        **_DATE,
    ),
    _f("patient_notes", "patient", "notes", "Notes (no identifying data)", "patients", "notes"),
    _f(
        "visit_date",
        "visit",
        "text",
        "Date of the visit",
        "clinical",
        "visit_date",
        required=True,
        **_DATE,
    ),
    _f(
        "nominal_month",
        "visit",
        "text",
        "Nominal time point (months after the procedure)",
        "clinical",
        "nominal_month",
        validation="integer",
        minimum="0",
        note="Empty: matched to the nearest visit window",
    ),
    _f(
        "vas",
        "visit",
        "text",
        "Pain, visual analog scale",
        "clinical",
        "vas",
        minimum="0",
        maximum="100",
        note="0-10, or 0-100 when the unit is mm",
        **_NUMBER,
    ),
    _f(
        "vas_unit",
        "visit",
        "radio",
        "VAS unit",
        "clinical",
        "vas_unit",
        choices="1, 0-10 scale | 2, mm (0-100 mm line)",
        branching="[vas] <> ''",
    ),
    _f(
        "analgesic_drugs",
        "visit",
        "text",
        "Analgesics taken (separated by ;) or none",
        "clinical",
        "analgesic_drugs",
    ),
    _f(
        "analgesic_class",
        "visit",
        "dropdown",
        "Analgesic class (WHO ladder)",
        "clinical",
        "analgesic_class",
        choices="0, none | 1, non-opioid | 2, weak opioid | 3, strong opioid",
        note="Empty: derived from the drugs",
    ),
    _f(
        "pain_other_level",
        "visit",
        "yesno",
        "Pain at an untreated level",
        "clinical",
        "pain_other_level",
    ),
    _f(
        "new_vcf",
        "visit",
        "checkbox",
        "New VCF first seen at this visit",
        "clinical",
        "new_vcf_levels",
        choices=_LEVEL_CHOICES,
    ),
    _f("visit_notes", "visit", "notes", "Notes", "clinical", "notes"),
    _f(
        "procedure_date",
        "treated_level",
        "text",
        "Date of the procedure",
        "procedures",
        "procedure_date",
        required=True,
        **_DATE,
    ),
    _f(
        "procedure_type",
        "treated_level",
        "dropdown",
        "Procedure",
        "procedures",
        "procedure_type",
        choices=" | ".join(f"{m.value}, {m.value}" for m in ProcedureType),
        required=True,
    ),
    _f(
        "treated_level",
        "treated_level",
        "dropdown",
        "Treated level",
        "procedures",
        "level",
        choices=_LEVEL_CHOICES,
        required=True,
    ),
    _f(
        "cement_volume_ml",
        "treated_level",
        "text",
        "Cement injected (ml)",
        "procedures",
        "cement_volume_ml",
        minimum="0",
        **_NUMBER,
    ),
    _f("procedure_notes", "treated_level", "notes", "Notes", "procedures", "notes"),
    _f(
        "meas_visit_date",
        "vertebra_measurement",
        "text",
        "Date of the visit (imaging)",
        "measurements",
        "visit_date",
        required=True,
        **_DATE,
    ),
    _f(
        "meas_level",
        "vertebra_measurement",
        "dropdown",
        "Vertebral level",
        "measurements",
        "level",
        choices=_LEVEL_CHOICES,
        required=True,
    ),
    _f(
        "bme_percent",
        "vertebra_measurement",
        "text",
        "Bone marrow edema (% of body volume without cement)",
        "measurements",
        "bme_percent",
        minimum="0",
        maximum="100",
        required=True,
        **_NUMBER,
    ),
    *(
        _f(
            name,
            "vertebra_measurement",
            "text",
            label,
            "measurements",
            column,
            minimum="0",
            **_NUMBER,
        )
        for name, column, label in (
            ("body_volume_ml", "body_volume_ml", "Vertebral body volume (ml)"),
            ("edema_volume_ml", "edema_volume_ml", "Edema volume (ml)"),
            ("meas_cement_volume_ml", "cement_volume_ml", "Cement volume (ml)"),
            ("rim_volume_ml", "rim_volume_ml", "Peri-cement rim volume (ml)"),
            ("height_anterior_mm", "height_anterior_mm", "Anterior height (mm)"),
            ("height_middle_mm", "height_middle_mm", "Middle height (mm)"),
            ("height_posterior_mm", "height_posterior_mm", "Posterior height (mm)"),
        )
    ),
    _f(
        "height_loss_percent",
        "vertebra_measurement",
        "text",
        "Height loss (%)",
        "measurements",
        "height_loss_percent",
        minimum="-100",
        maximum="100",
        **_NUMBER,
    ),
    _f(
        "genant_grade",
        "vertebra_measurement",
        "dropdown",
        "Genant grade",
        "measurements",
        "genant_grade",
        choices="0, 0 (normal) | 1, 1 (mild) | 2, 2 (moderate) | 3, 3 (severe)",
    ),
    _f(
        "deformity",
        "vertebra_measurement",
        "dropdown",
        "Deformity type",
        "measurements",
        "deformity",
        choices="none, none | wedge, wedge | biconcave, biconcave | crush, crush",
    ),
    _f(
        "meas_source",
        "vertebra_measurement",
        "dropdown",
        "Source of the value",
        "measurements",
        "source",
        choices=" | ".join(f"{m.value}, {m.value}" for m in MeasurementSource),
    ),
    _f(
        "method_version",
        "vertebra_measurement",
        "text",
        "Software / method version",
        "measurements",
        "method_version",
    ),
    _f("reader", "vertebra_measurement", "text", "Reader", "measurements", "reader"),
    _f(
        "overridden_by",
        "vertebra_measurement",
        "text",
        "Overridden by",
        "measurements",
        "overridden_by",
    ),
    _f(
        "override_reason",
        "vertebra_measurement",
        "notes",
        "Reason of the override",
        "measurements",
        "override_reason",
    ),
)
_BY_NAME = {f.name: f for f in REDCAP_FIELDS}


def event_name(month: int) -> str:
    """REDCap unique event name of a nominal month (0 -> ``baseline_arm_1``)."""
    return "baseline_arm_1" if int(month) == 0 else f"month_{int(month)}_arm_1"


def redcap_events(nominal_months: Sequence[int]) -> list[str]:
    """Event names of a study, in order, ending with the unscheduled event."""
    return [event_name(m) for m in nominal_months] + [UNSCHEDULED_EVENT]


def redcap_data_dictionary() -> pd.DataFrame:
    """The REDCap data dictionary (18 standard columns) of the bmetrack instruments."""
    rows = []
    for f in REDCAP_FIELDS:
        rows.append(
            [
                f.name,
                f.form,
                "",
                f.field_type,
                f.label,
                f.choices,
                f.note,
                f.validation,
                f.minimum,
                f.maximum,
                "y" if f.identifier else "",
                f.branching,
                "y" if f.required else "",
                "",
                "",
                "",
                "",
                "",
            ]
        )
    return pd.DataFrame(rows, columns=DICTIONARY_COLUMNS, dtype=object)


def redcap_flat_columns() -> list[str]:
    """Columns of a flat record export: identifiers, fields (checkboxes expanded), *_complete."""
    columns = [
        "record_id",
        "redcap_event_name",
        "redcap_repeat_instrument",
        "redcap_repeat_instance",
    ]
    for form in FORMS:
        for f in REDCAP_FIELDS:
            if f.form != form or f.name == "record_id":
                continue
            if f.field_type == "checkbox":
                columns += [f"{f.name}___{label}" for label in LEVEL_LABELS.values()]
            else:
                columns.append(f.name)
        columns.append(f"{form}_complete")
    return columns


# --------------------------------------------------------------------------- export


def _text(value: Any) -> str:
    return cell_text(value)


def _form_values(form: str, row: pd.Series) -> dict[str, str]:
    values: dict[str, str] = {}
    for f in REDCAP_FIELDS:
        if f.form != form or f.name == "record_id":
            continue
        value = row.get(f.column)
        if f.field_type == "checkbox":
            levels = {p.strip() for p in str(value or "").split(";") if p.strip()}
            for level, label in LEVEL_LABELS.items():
                values[f"{f.name}___{label}"] = "1" if level in levels else "0"
        elif f.name in {"treated_level", "meas_level"}:
            values[f.name] = str(LEVEL_LABELS[str(value)])
        elif f.name == "vas_unit":
            codes = {v: k for k, v in _VAS_UNIT_CODES.items()}
            values[f.name] = codes.get(str(value), "")
        elif f.field_type == "yesno":
            text = _text(value)
            values[f.name] = {"yes": "1", "no": "0"}.get(text, text)
        else:
            values[f.name] = _text(value)
    values[f"{form}_complete"] = "2"
    return values


def redcap_from_frames(
    frames: dict[str, pd.DataFrame], nominal_months: Sequence[int]
) -> pd.DataFrame:
    """Flat REDCap records (all text cells) from the exchange tables."""
    months = [int(m) for m in nominal_months]
    rows: list[dict[str, str]] = []
    patients = frames["patients"]
    clinical = frames["clinical"].sort_values(["patient_code", "visit_date"])
    procedures = frames["procedures"]
    measurements = frames["measurements"]
    for _, patient in patients.sort_values("patient_code").iterrows():
        code = str(patient["patient_code"])
        # Each visit goes to the event of its nominal month, the first one there wins.
        events: dict[str, list[dict[str, str]]] = defaultdict(list)
        visit_event: dict[str, tuple[str, str, str]] = {}
        used: set[int] = set()
        unscheduled = 0
        for _, visit in clinical[clinical["patient_code"] == code].iterrows():
            month = visit["nominal_month"]
            values = _form_values("visit", visit)
            if not pd.isna(month) and int(month) in months and int(month) not in used:
                used.add(int(month))
                key = (event_name(int(month)), "", "")
            else:
                unscheduled += 1
                key = (UNSCHEDULED_EVENT, "visit", str(unscheduled))
            events[key[0]].append({"_instrument": key[1], "_instance": key[2], **values})
            visit_event[_text(visit["visit_date"])] = key
        base = {"record_id": code}
        baseline = {**base, **_form_values("patient", patient)}
        main_rows: dict[str, dict[str, str]] = {event_name(0): baseline}
        extra_rows: list[tuple[str, str, int, dict[str, str]]] = []
        for event, items in events.items():
            for values in items:
                instrument, instance = values.pop("_instrument"), values.pop("_instance")
                if instrument:
                    extra_rows.append((event, instrument, int(instance), {**base, **values}))
                else:
                    main_rows.setdefault(event, dict(base)).update(values)
        levels = procedures[procedures["patient_code"] == code]
        for number, (_, level) in enumerate(levels.iterrows(), start=1):
            values = {**base, **_form_values("treated_level", level)}
            extra_rows.append((event_name(0), "treated_level", number, values))
        counters: dict[str, int] = defaultdict(int)
        for _, measurement in measurements[measurements["patient_code"] == code].iterrows():
            event = visit_event.get(_text(measurement["visit_date"]), (UNSCHEDULED_EVENT,))[0]
            counters[event] += 1
            values = {**base, **_form_values("vertebra_measurement", measurement)}
            extra_rows.append((event, "vertebra_measurement", counters[event], values))
        # REDCap's order: by event, the event's own row first, then instruments' instances.
        order = {name: i for i, name in enumerate(redcap_events(months))}
        extra_rows += [(event, "", 0, values) for event, values in main_rows.items()]
        for extra in sorted(
            extra_rows, key=lambda r: (order[r[0]], FORMS.index(r[1]) if r[1] else -1, r[2])
        ):
            rows.append(
                {
                    "redcap_event_name": extra[0],
                    "redcap_repeat_instrument": extra[1],
                    "redcap_repeat_instance": str(extra[2]) if extra[1] else "",
                    **extra[3],
                }
            )
    flat = pd.DataFrame(rows, columns=redcap_flat_columns(), dtype=object)
    return flat.fillna("")


def export_redcap(engine: Engine, study_code: str) -> pd.DataFrame:
    """Flat REDCap records of a study (write with ``to_csv(path, index=False)``)."""
    with session_scope(engine) as session:
        months = list(records.get_study(session, study_code).nominal_months)
    return redcap_from_frames(export_frames(engine, study_code), months)


# --------------------------------------------------------------------------- import


def read_redcap_csv(path: str | Path) -> pd.DataFrame:
    """Read a REDCap flat CSV as text cells (UTF-8, BOM allowed)."""
    return pd.read_csv(
        path, dtype=str, keep_default_na=False, encoding="utf-8-sig", na_filter=False
    ).astype(object)


def redcap_to_frames(
    flat: pd.DataFrame, nominal_months: Sequence[int], source: str = "REDCap file"
) -> tuple[dict[str, pd.DataFrame], list[Problem]]:
    """Exchange tables (text cells) from flat REDCap records, and problems found.

    Each frame carries ``attrs["source_lines"]`` (line of the REDCap file,
    header = 1) so later validation messages point into the REDCap file.
    """
    problems: list[Problem] = []
    known = set(redcap_flat_columns())
    columns = [str(c) for c in flat.columns]
    for column in columns:
        if column not in known:
            problems.append(
                Problem(
                    f"{source} header (line 1)",
                    column,
                    column,
                    "unknown REDCap field; export the project with bmetrack's data dictionary "
                    "('bmetrack redcap-dictionary')",
                    table="redcap",
                    line=1,
                )
            )
    for column in ("record_id", "redcap_event_name"):
        if column not in columns:
            problems.append(
                Problem(f"{source} header (line 1)", column, None, "required column is missing")
            )
    if problems:
        return {}, problems
    month_of = {event_name(m): int(m) for m in nominal_months}
    tables: dict[str, list[dict[str, str]]] = {name: [] for name in TABLES}
    lines: dict[str, list[int]] = {name: [] for name in TABLES}
    for position, row in enumerate(flat.to_dict("records")):
        line = position + 2
        cells = {k: str(v).strip() for k, v in row.items()}
        code = cells["record_id"]
        event = cells["redcap_event_name"]
        instrument = cells.get("redcap_repeat_instrument", "")
        record = f"{source} line {line} (record {code}, {event})"

        def flag(
            field: str, value: Any, reason: str, record: str = record, line: int = line
        ) -> None:
            problems.append(Problem(record, field, value, reason, "redcap", line))

        if event not in month_of and event != UNSCHEDULED_EVENT:
            flag(
                "redcap_event_name",
                event,
                f"unknown event; use one of {', '.join(redcap_events(list(nominal_months)))}",
            )
            continue
        forms: list[str] = []
        if instrument == "":
            forms = ["patient"] if event == event_name(0) else []
            if cells.get("visit_date", ""):
                forms.append("visit")
        elif instrument in {"visit", "treated_level", "vertebra_measurement"}:
            forms = [instrument]
        else:
            flag("redcap_repeat_instrument", instrument, f"unknown instrument; use {FORMS[1:]}")
            continue
        for form in forms:
            values = _read_form(form, cells, flag)
            values["patient_code"] = code
            table = {
                "patient": "patients",
                "visit": "clinical",
                "treated_level": "procedures",
                "vertebra_measurement": "measurements",
            }[form]
            if form == "visit" and not values.get("nominal_month") and event in month_of:
                values["nominal_month"] = str(month_of[event])
            tables[table].append(values)
            lines[table].append(line)
    frames: dict[str, pd.DataFrame] = {}
    for name, rows in tables.items():
        spec_columns = [c for c in TABLES[name].column_names if c != "reader"] + (
            ["reader", "overridden_by", "override_reason"] if name == "measurements" else []
        )
        frame = pd.DataFrame(rows, columns=spec_columns, dtype=object).fillna("")
        frame.attrs["source_name"] = source
        frame.attrs["source_lines"] = lines[name]
        frames[name] = frame
    return frames, problems


def _read_form(form: str, cells: dict[str, str], flag: Any) -> dict[str, str]:
    values: dict[str, str] = {}
    for f in REDCAP_FIELDS:
        if f.form != form or f.name == "record_id":
            continue
        if f.field_type == "checkbox":
            chosen = []
            for level, label in LEVEL_LABELS.items():
                cell = cells.get(f"{f.name}___{label}", "")
                if cell == "1":
                    chosen.append(level)
                elif cell not in {"", "0"}:
                    flag(f"{f.name}___{label}", cell, "a checkbox holds 1 (checked) or 0")
            values[f.column] = ";".join(chosen)
            continue
        cell = cells.get(f.name, "")
        if f.name in {"treated_level", "meas_level"} and cell:
            try:
                cell = level_from_label(int(cell))
            except ValueError:
                flag(f.name, cell, f"unknown level code; use one of {_LEVEL_CHOICES}")
                cell = ""
        elif f.name == "vas_unit" and cell:
            if cell not in _VAS_UNIT_CODES:
                flag(f.name, cell, "unknown code; use 1 (0-10 scale) or 2 (mm)")
            cell = _VAS_UNIT_CODES.get(cell, "")
        elif f.field_type == "yesno" and cell:
            cell = {"1": "yes", "0": "no"}.get(cell, cell)
        values[f.column] = cell
    return values


def import_redcap(
    engine: Engine,
    study_code: str,
    source: str | Path | pd.DataFrame,
    actor: str,
    settings: Settings | None = None,
    *,
    progress: ProgressCallback | None = None,
) -> ImportReport:
    """Import a REDCap flat record CSV (or DataFrame) through :func:`import_tables`.

    Raises :class:`~bmetrack.study.importers.ImportValidationError` listing
    every problem (REDCap structure first, then the exchange-table rules,
    with lines of the REDCap file); nothing is written then.
    """
    settings = settings if settings is not None else resolve_settings()
    name = "REDCap data" if isinstance(source, pd.DataFrame) else Path(source).name
    flat = source if isinstance(source, pd.DataFrame) else read_redcap_csv(source)
    with session_scope(engine) as session:
        study = session.query(Study).filter(Study.code == study_code).one_or_none()
        months = list(study.nominal_months) if study else list(settings["nominal_months"])
    frames, problems = redcap_to_frames(flat, months, name)
    if problems:
        report = ImportReport(study_code, {"redcap": name}, problems=problems)
        raise ImportValidationError(report)
    return import_tables(engine, study_code, frames, actor, settings, progress=progress)
