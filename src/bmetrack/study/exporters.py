"""Export a study as the exchange tables, and CSV templates of those tables.

:func:`export_frames` gives one DataFrame per table of
:mod:`bmetrack.study.schema` (current, non-superseded measurements only),
with a few extra columns computed by the database: ``window_status``,
``days_from_procedure`` and ``vas_0_10`` in ``clinical``; ``overridden_by``
and ``override_reason`` in ``measurements``. The importer accepts these
columns (computed ones are recomputed), so an export imports unchanged into a
fresh database and exports again to identical frames.

Types: dates are ``datetime64``; whole numbers nullable ``Int64``; yes/no
nullable ``boolean``; text ``object`` with ``""`` for empty. In ``clinical``,
``vas`` is the value as entered in ``vas_unit`` (0-10 or mm) and ``vas_0_10``
the stored 0-10 value the analysis uses.
"""

from __future__ import annotations

import csv
import io
import textwrap
from pathlib import Path

import pandas as pd
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, selectinload

from bmetrack.anatomy import level_sort_key
from bmetrack.study import records
from bmetrack.study.db import session_scope
from bmetrack.study.importers import DERIVED_COLUMNS, EXTRA_COLUMNS, TABLE_ORDER
from bmetrack.study.models import Patient, Procedure, VertebraMeasurement, Visit
from bmetrack.study.schema import TABLES, table_spec

__all__ = [
    "EXPORT_COLUMNS",
    "export_frames",
    "export_frames_from_session",
    "template_csv",
    "write_csv",
]

EXPORT_COLUMNS: dict[str, list[str]] = {
    name: TABLES[name].column_names + list(EXTRA_COLUMNS[name] + DERIVED_COLUMNS[name])
    for name in TABLE_ORDER
}
_DATE_COLUMNS = {"enrolled_date", "procedure_date", "visit_date"}
_INT_COLUMNS = {
    "birth_year",
    "nominal_month",
    "analgesic_class",
    "genant_grade",
    "days_from_procedure",
}
_BOOL_COLUMNS = {"pain_other_level"}


def _frame(name: str, rows: list[dict[str, object]]) -> pd.DataFrame:
    columns = EXPORT_COLUMNS[name]
    frame = pd.DataFrame(rows, columns=columns)
    for column in columns:
        kind = TABLES[name].column(column).kind if column in TABLES[name].column_names else ""
        if column in _DATE_COLUMNS:
            frame[column] = pd.to_datetime(frame[column]).astype("datetime64[ns]")
        elif column in _INT_COLUMNS:
            frame[column] = pd.array(frame[column].tolist(), dtype="Int64")
        elif column in _BOOL_COLUMNS:
            frame[column] = pd.array(frame[column].tolist(), dtype="boolean")
        elif kind == "float" or column == "vas_0_10":
            frame[column] = pd.to_numeric(frame[column], errors="raise").astype("float64")
        else:
            frame[column] = pd.Series(
                [
                    "" if value is None or value is pd.NA or value != value else str(value)
                    for value in frame[column]
                ],
                dtype=object,
                index=frame.index,
            )
    return frame


def export_frames_from_session(session: Session, study_code: str) -> dict[str, pd.DataFrame]:
    """The exchange tables of one study, read through ``session``."""
    study = records.get_study(session, study_code)
    patients = session.scalars(
        select(Patient)
        .where(Patient.study_id == study.id)
        .options(
            selectinload(Patient.procedures).selectinload(Procedure.treated_levels),
            selectinload(Patient.visits).selectinload(Visit.assessment),
            selectinload(Patient.new_vcf_events),
        )
        .order_by(Patient.code)
    ).all()
    current = records.current_measurements(session, study=study)
    by_visit: dict[int, list[VertebraMeasurement]] = {}
    for measurement in current:
        by_visit.setdefault(measurement.visit_id, []).append(measurement)
    patient_rows: list[dict[str, object]] = []
    procedure_rows: list[dict[str, object]] = []
    clinical_rows: list[dict[str, object]] = []
    measurement_rows: list[dict[str, object]] = []
    for patient in patients:
        patient_rows.append(
            {
                "patient_code": patient.code,
                "sex": patient.sex,
                "birth_year": patient.birth_year,
                "enrolled_date": patient.enrolled_date,
                "notes": patient.notes,
            }
        )
        for procedure in sorted(patient.procedures, key=lambda p: p.procedure_date):
            for treated in sorted(procedure.treated_levels, key=lambda t: t.label):
                procedure_rows.append(
                    {
                        "patient_code": patient.code,
                        "procedure_date": procedure.procedure_date,
                        "procedure_type": procedure.procedure_type.value,
                        "level": treated.level,
                        "cement_volume_ml": treated.cement_volume_ml,
                        "notes": procedure.notes,
                    }
                )
        for visit in sorted(patient.visits, key=lambda v: v.visit_date):
            clinical = visit.assessment
            new_vcf = sorted(
                (e.level for e in patient.new_vcf_events if e.visit_id == visit.id),
                key=level_sort_key,
            )
            clinical_rows.append(
                {
                    "patient_code": patient.code,
                    "visit_date": visit.visit_date,
                    "nominal_month": visit.nominal_month,
                    "vas": clinical.vas_entered if clinical else None,
                    "vas_unit": clinical.vas_unit if clinical else "",
                    "analgesic_drugs": clinical.analgesic_drugs if clinical else "",
                    "analgesic_class": clinical.analgesic_class if clinical else None,
                    "pain_other_level": clinical.pain_other_level if clinical else None,
                    "new_vcf_levels": ";".join(new_vcf),
                    "notes": clinical.notes if clinical else "",
                    "window_status": visit.window_status.value,
                    "days_from_procedure": visit.days_from_procedure,
                    "vas_0_10": clinical.vas if clinical else None,
                }
            )
            for m in sorted(by_visit.get(visit.id, []), key=lambda m: m.label):
                measurement_rows.append(
                    {
                        "patient_code": patient.code,
                        "visit_date": visit.visit_date,
                        **{
                            name: getattr(m, name)
                            for name in TABLES["measurements"].column_names
                            if name not in {"patient_code", "visit_date", "source", "reader"}
                        },
                        "source": m.source.value,
                        "reader": m.created_by,
                        "overridden_by": m.overridden_by,
                        "override_reason": m.override_reason,
                    }
                )
    return {
        "patients": _frame("patients", patient_rows),
        "procedures": _frame("procedures", procedure_rows),
        "clinical": _frame("clinical", clinical_rows),
        "measurements": _frame("measurements", measurement_rows),
    }


def export_frames(engine: Engine, study_code: str) -> dict[str, pd.DataFrame]:
    """The exchange tables of study ``study_code`` from the database.

    Returns
    -------
    dict of str to DataFrame
        ``patients``, ``procedures``, ``clinical``, ``measurements`` with the
        schema's columns in order, then the extra columns (see module docs).
    """
    with session_scope(engine) as session:
        return export_frames_from_session(session, study_code)


def _csv_frame(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    for column in out.columns:
        series = out[column]
        if isinstance(series.dtype, pd.BooleanDtype):
            out[column] = series.map({True: "yes", False: "no"}).astype(object).fillna("")
        elif pd.api.types.is_datetime64_any_dtype(series):
            out[column] = series.dt.strftime("%Y-%m-%d").astype(object).fillna("")
    return out


def write_csv(frames: dict[str, pd.DataFrame], folder: str | Path) -> dict[str, Path]:
    """Write each table to ``folder/<name>.csv`` (UTF-8, ',' separated, yes/no, ISO dates)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, frame in frames.items():
        path = folder / f"{name}.csv"
        _csv_frame(frame).to_csv(path, index=False, lineterminator="\n")
        written[name] = path
    return written


def template_csv(name: str) -> str:
    """An empty CSV of table ``name``: a '# ' comment block describing each column, the header.

    The template imports as-is (zero rows).
    """
    spec = table_spec(name)
    lines = [
        f"# bmetrack exchange table '{spec.name}': one row per {spec.row_is}.",
        "# Lines starting with '#' are ignored. Dates YYYY-MM-DD; decimals with '.'; UTF-8.",
        f"# Key (unique per row): {', '.join(spec.key)}.",
        "#",
    ]
    for column in spec.columns:
        facts = ["required" if column.required else "optional"]
        if column.unit:
            facts.append(f"unit {column.unit}")
        if column.choices:
            facts.append(f"one of {', '.join(column.choices)}")
        head = f"# {column.name} ({'; '.join(facts)}): "
        wrapped = textwrap.wrap(
            column.description, width=96, initial_indent=head, subsequent_indent="#     "
        )
        lines.extend(wrapped or [head.rstrip()])
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(spec.column_names)
    return "\n".join(lines) + "\n" + buffer.getvalue()
