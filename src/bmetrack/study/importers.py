"""Import the exchange tables (CSV files or DataFrames) into the study database.

:func:`import_tables` first validates every row of every table and collects
all problems (file, line, column, value, reason). If there is any, it raises
:class:`ImportValidationError` and writes nothing. Otherwise it writes
everything through :mod:`bmetrack.study.records` in ONE transaction, so an
error or a killed process midway leaves the database as it was.

Re-importing a file is safe: rows whose key exists with the same values are
left alone, changed values become audited updates, and the report counts
created, updated and unchanged rows per table. A column absent from a file
leaves the stored values of that column unchanged; an empty cell in a present
column clears the value.

CSV files may start with comment lines (``#``), be UTF-8 with or without BOM,
and use ``,``, ``;`` (European, then ``,`` is the decimal mark) or tab as
separator. Line numbers in problems count the header as line 1 and skip
comment and blank lines (``file_line`` is the line an editor shows).
"""

from __future__ import annotations

import csv
import datetime as dt
import math
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, selectinload

from bmetrack.settings import Settings, resolve_settings
from bmetrack.study import records
from bmetrack.study.db import session_scope
from bmetrack.study.models import (
    MeasurementSource,
    Patient,
    Procedure,
    Study,
    VertebraMeasurement,
    Visit,
)
from bmetrack.study.records import Problem, ValidationError
from bmetrack.study.schema import TABLES, TableSpec

__all__ = [
    "DERIVED_COLUMNS",
    "EXTRA_COLUMNS",
    "TABLE_ORDER",
    "ImportReport",
    "ImportValidationError",
    "ProgressCallback",
    "RawTable",
    "TableCounts",
    "cell_text",
    "frame_to_raw",
    "import_tables",
    "read_csv_table",
    "validate_tables",
]

TABLE_ORDER = ("patients", "procedures", "clinical", "measurements")
# Columns the exporter adds that are computed from the others: accepted and ignored.
DERIVED_COLUMNS: dict[str, tuple[str, ...]] = {
    "patients": (),
    "procedures": (),
    "clinical": ("window_status", "days_from_procedure", "vas_0_10"),
    "measurements": (),
}
# Columns the exporter adds that are stored: accepted and restored.
EXTRA_COLUMNS: dict[str, tuple[str, ...]] = {
    "patients": (),
    "procedures": (),
    "clinical": (),
    "measurements": ("overridden_by", "override_reason"),
}
_NUMERIC_KINDS = {"int", "float"}
_IMPORT_REASON = "import"

ProgressCallback = Callable[[str, int, int], None]
"""Called as ``progress(table, rows_done, rows_total)`` while writing."""


# --------------------------------------------------------------------------- reports


@dataclass
class TableCounts:
    """What an import did to one table's rows."""

    rows: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0


@dataclass
class ImportReport:
    """Outcome of an import: counts per table and every problem found."""

    study_code: str
    sources: dict[str, str] = field(default_factory=dict)
    counts: dict[str, TableCounts] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    written: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """Human-readable lines for the CLI."""
        lines = []
        for name, counts in self.counts.items():
            lines.append(
                f"{name}: {counts.rows} rows - {counts.created} created, {counts.updated} "
                f"updated, {counts.unchanged} unchanged"
            )
        if self.problems:
            lines.append(f"{len(self.problems)} problems, nothing was written:")
            lines += [f"  - {problem}" for problem in self.problems]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        return {
            "study_code": self.study_code,
            "written": self.written,
            "sources": dict(self.sources),
            "counts": {name: vars(counts).copy() for name, counts in self.counts.items()},
            "problems": [problem.to_dict() for problem in self.problems],
        }


class ImportValidationError(ValidationError):
    """The input has problems; nothing was written. ``report`` holds them all."""

    def __init__(self, report: ImportReport) -> None:
        self.report = report
        super().__init__(report.problems, "Import refused, nothing was written")


# --------------------------------------------------------------------------- reading


@dataclass
class RawTable:
    """One exchange table as text cells, with the line number of each row."""

    name: str
    source: str
    columns: list[str]
    rows: list[dict[str, str]]
    lines: list[int]
    file_lines: list[int]
    header_file_line: int = 1
    decimal_comma: bool = False


def _detect_delimiter(header: str) -> str:
    counts = {sep: _count_outside_quotes(header, sep) for sep in (",", ";", "\t")}
    best = max(counts, key=lambda sep: counts[sep])
    return best if counts[best] > 0 else ","


def _count_outside_quotes(text: str, char: str) -> int:
    inside, count = False, 0
    for c in text:
        if c == '"':
            inside = not inside
        elif c == char and not inside:
            count += 1
    return count


def read_csv_table(path: str | Path, name: str) -> tuple[RawTable, list[Problem]]:
    """Read one exchange table from a CSV file, keeping line numbers for messages."""
    path = Path(path)
    source = path.name
    problems: list[Problem] = []
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        problems.append(
            Problem(
                f"{source}",
                "(file)",
                str(path),
                f"is not UTF-8 text ({error.reason} at byte {error.start}); save it as "
                "'CSV UTF-8' and import again",
                table=name,
            )
        )
        return RawTable(name, source, [], [], [], []), problems
    kept: list[tuple[int, str]] = [
        (number, line)
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not kept:
        problems.append(
            Problem(source, "(header)", "", "has no header row; start from the template", name)
        )
        return RawTable(name, source, [], [], [], []), problems
    delimiter = _detect_delimiter(kept[0][1])
    reader = csv.reader((line for _, line in kept), delimiter=delimiter)
    header = [cell.strip() for cell in next(reader)]
    header_file_line = kept[0][0]
    rows: list[dict[str, str]] = []
    lines: list[int] = []
    file_lines: list[int] = []
    consumed = reader.line_num
    for cells in reader:
        start = consumed  # index in ``kept`` of this record's first line
        consumed = reader.line_num
        line, file_line = start + 1, kept[start][0]
        if len(cells) != len(header):
            problems.append(
                Problem(
                    f"{source} line {line}",
                    "(row)",
                    delimiter.join(cells),
                    f"has {len(cells)} cells but the header has {len(header)}; check the "
                    f"separators ({delimiter!r}) and quotes",
                    table=name,
                    line=line,
                    file_line=file_line,
                )
            )
            continue
        rows.append({column: cell.strip() for column, cell in zip(header, cells, strict=True)})
        lines.append(line)
        file_lines.append(file_line)
    raw = RawTable(
        name, source, header, rows, lines, file_lines, header_file_line, delimiter == ";"
    )
    return raw, problems


def cell_text(value: Any) -> str:
    if value is None or value is pd.NA or value is pd.NaT:
        return ""
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, pd.Timestamp | dt.datetime | np.datetime64):
        stamp = pd.Timestamp(value)
        return stamp.date().isoformat() if stamp.time() == dt.time(0) else stamp.isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, float | np.floating):
        number = float(value)
        return "" if math.isnan(number) else repr(number)
    if isinstance(value, int | np.integer):
        return str(int(value))
    return str(value).strip()


def frame_to_raw(frame: pd.DataFrame, name: str) -> RawTable:
    """Turn a DataFrame into text cells so it goes through the CSV validation path.

    Line numbers are ``frame.attrs["source_lines"]`` when given (e.g. lines of a
    REDCap file), else the row position + 2 (as if written with a header).
    ``frame.attrs["source_name"]`` names the source in messages.
    """
    columns = [str(column) for column in frame.columns]
    source = str(frame.attrs.get("source_name", f"{name} table"))
    lines = list(frame.attrs.get("source_lines", range(2, len(frame) + 2)))
    cells = [[cell_text(value) for value in frame[column].tolist()] for column in frame.columns]
    rows = [{column: cells[j][i] for j, column in enumerate(columns)} for i in range(len(frame))]
    return RawTable(name, source, columns, rows, lines, lines, 1, False)


def _load_inputs(
    inputs: Mapping[str, pd.DataFrame | str | Path],
) -> tuple[dict[str, RawTable], list[Problem]]:
    tables: dict[str, RawTable] = {}
    problems: list[Problem] = []
    for name, value in inputs.items():
        if name not in TABLES:
            problems.append(
                Problem(
                    "import",
                    "table",
                    name,
                    f"unknown table; name each input one of {', '.join(TABLE_ORDER)}",
                )
            )
            continue
        if isinstance(value, pd.DataFrame):
            tables[name] = frame_to_raw(value, name)
        else:
            raw, read_problems = read_csv_table(value, name)
            problems += read_problems
            tables[name] = raw
    return tables, problems


# --------------------------------------------------------------------------- parsed rows


@dataclass
class _Row:
    table: str
    line: int
    file_line: int
    record: str
    code: str
    present: set[str]
    values: dict[str, Any] = field(default_factory=dict)


def _check_columns(raw: RawTable, spec: TableSpec) -> list[Problem]:
    allowed = spec.column_names + list(DERIVED_COLUMNS[spec.name] + EXTRA_COLUMNS[spec.name])
    problems = []
    record = f"{raw.source} header (line 1)"
    for column in raw.columns:
        if column not in allowed:
            problems.append(
                Problem(
                    record,
                    column,
                    column,
                    f"unknown column in table {spec.name!r}; expected columns: "
                    f"{', '.join(spec.column_names)}",
                    table=spec.name,
                    line=1,
                    file_line=raw.header_file_line,
                )
            )
    seen: set[str] = set()
    for column in raw.columns:
        if column in seen:
            problems.append(Problem(record, column, column, "column appears twice", spec.name, 1))
        seen.add(column)
    for spec_column in spec.columns:
        if spec_column.required and spec_column.name not in raw.columns:
            problems.append(
                Problem(
                    record,
                    spec_column.name,
                    None,
                    f"required column is missing from table {spec.name!r}; add it (see "
                    f"'bmetrack template {spec.name}')",
                    table=spec.name,
                    line=1,
                    file_line=raw.header_file_line,
                )
            )
    return problems


def _row_values(raw: RawTable, spec: TableSpec, row: dict[str, str]) -> dict[str, str]:
    ignored = set(DERIVED_COLUMNS[spec.name])
    values = {k: v for k, v in row.items() if k not in ignored}
    if raw.decimal_comma:
        for column in spec.columns:
            if column.kind in _NUMERIC_KINDS and column.name in values:
                values[column.name] = values[column.name].replace(",", ".")
    return values


# --------------------------------------------------------------------------- validation


@dataclass
class _State:
    """The study as stored, loaded once with everything validation needs."""

    study: Study | None
    patients: dict[str, Patient]


def _load_state(session: Session, study_code: str) -> _State:
    study = session.scalars(
        select(Study)
        .where(Study.code == study_code)
        .options(
            selectinload(Study.patients)
            .selectinload(Patient.procedures)
            .selectinload(Procedure.treated_levels),
            selectinload(Study.patients)
            .selectinload(Patient.visits)
            .selectinload(Visit.assessment),
            selectinload(Study.patients)
            .selectinload(Patient.visits)
            .selectinload(Visit.measurements),
            selectinload(Study.patients).selectinload(Patient.new_vcf_events),
        )
    ).one_or_none()
    patients = {p.code: p for p in study.patients} if study is not None else {}
    return _State(study, patients)


@dataclass
class _Parsed:
    patients: list[_Row] = field(default_factory=list)
    procedures: list[_Row] = field(default_factory=list)
    clinical: list[_Row] = field(default_factory=list)
    measurements: list[_Row] = field(default_factory=list)

    def rows(self, name: str) -> list[_Row]:
        rows: list[_Row] = getattr(self, name)
        return rows


def _locate(problems: list[Problem], row: _Row) -> list[Problem]:
    return [
        Problem(p.record, p.field, p.value, p.reason, row.table, row.line, row.file_line)
        for p in problems
    ]


def _record_name(raw: RawTable, line: int, file_line: int, what: str) -> str:
    where = f"{raw.source} line {line}"
    if file_line != line and not raw.source.endswith(" table"):
        where += f" (file line {file_line})"
    return f"{where} ({what})" if what else where


def _parse_rows(
    raw: RawTable, state: _State, settings: Settings
) -> tuple[list[_Row], list[Problem]]:
    spec = TABLES[raw.name]
    problems: list[Problem] = []
    parsed: list[_Row] = []
    for row, line, file_line in zip(raw.rows, raw.lines, raw.file_lines, strict=True):
        if not any(row.values()):
            continue
        values = _row_values(raw, spec, row)
        code = values.get("patient_code", "")
        what = [f"patient {code}" if code else ""]
        for key in ("procedure_date", "visit_date", "level"):
            if values.get(key):
                what.append(values[key])
        record = _record_name(raw, line, file_line, ", ".join(w for w in what if w))
        item = _Row(raw.name, line, file_line, record, code, set(values))
        row_problems = _parse_one(item, values, state, settings)
        problems += _locate(row_problems, item)
        parsed.append(item)
    return parsed, problems


def _parse_one(
    item: _Row, values: dict[str, str], state: _State, settings: Settings
) -> list[Problem]:
    record = item.record
    if item.table == "patients":
        clean, problems = records.validate_patient(values, record)
        item.values = clean
        return problems
    problems = []
    if not records.PATIENT_CODE_PATTERN.fullmatch(item.code):
        problems += records.validate_patient({"patient_code": item.code}, record)[1]
    if item.table == "procedures":
        clean, more = records.validate_procedure_level(values, record)
        item.values = clean
        return problems + more
    check = records.FieldChecker(record)
    item.values["visit_date"] = check.parse(values, "visit_date", records.parse_date, required=True)
    if item.table == "clinical":
        month = check.parse(values, "nominal_month", records.parse_int, minimum=0)
        item.values["nominal_month"] = month
        if month is not None:
            problems += records.check_nominal_month(month, record, settings)
        assessment_raw = {k: values[k] for k in records.ASSESSMENT_FIELDS if k in values}
        existing = _existing_visit(state, item.code, item.values["visit_date"])
        if (
            "vas" in assessment_raw
            and "vas_unit" not in assessment_raw
            and existing is not None
            and existing.assessment is not None
        ):
            assessment_raw["vas_unit"] = existing.assessment.vas_unit
        item.values["assessment_raw"] = assessment_raw
        clean, more = records.validate_assessment(assessment_raw, record)
        item.values["assessment"] = clean
        problems += more
        if "new_vcf_levels" in values:
            levels = []
            for part in values["new_vcf_levels"].replace(",", ";").split(";"):
                level = check.parse({"new_vcf_levels": part}, "new_vcf_levels", records.parse_level)
                if level is not None:
                    levels.append(level)
            item.values["new_vcf_levels"] = levels
        return problems + check.problems
    # measurements
    item.values["level"] = check.parse(values, "level", records.parse_level, required=True)
    measures = {k: values[k] for k in records.MEASUREMENT_FIELDS if k in values}
    clean, more = records.validate_measurement(measures, record, settings)
    item.values["measures"] = clean
    sources = [m.value for m in MeasurementSource]
    item.values["source"] = check.parse(
        values, "source", lambda v: records.parse_choice(v, sources)
    )
    for name in ("method_version", "reader", "overridden_by", "override_reason"):
        if name in values:
            item.values[name] = values[name]
    return problems + more + check.problems


def _existing_visit(state: _State, code: str, date: dt.date | None) -> Visit | None:
    patient = state.patients.get(code)
    if patient is None or date is None:
        return None
    return next((v for v in patient.visits if v.visit_date == date), None)


def _cross_check(parsed: _Parsed, state: _State, settings: Settings) -> list[Problem]:
    """Rules that need several rows or tables: keys, patients, dates, levels."""
    problems: list[Problem] = []

    def flag(row: _Row, field_name: str, value: Any, reason: str) -> None:
        problems.append(
            Problem(row.record, field_name, value, reason, row.table, row.line, row.file_line)
        )

    # Patients: file rows over stored ones.
    birth_year: dict[str, int | None] = {c: p.birth_year for c, p in state.patients.items()}
    seen_patients: dict[str, int] = {}
    for row in parsed.patients:
        code = row.values.get("code", row.code)
        if code in seen_patients:
            flag(row, "patient_code", code, f"duplicate of line {seen_patients[code]}")
        seen_patients[code] = row.line
        if "birth_year" in row.values:
            birth_year[code] = row.values["birth_year"]
    known = set(state.patients) | set(seen_patients)

    def check_patient(row: _Row) -> bool:
        if row.code and row.code not in known:
            flag(
                row,
                "patient_code",
                row.code,
                "unknown patient; add a row for this patient to the patients table",
            )
            return False
        return bool(row.code)

    # Procedures: one row per level; all rows of one date describe one procedure.
    first_procedure: dict[str, dt.date] = {}
    treated: dict[str, set[str]] = defaultdict(set)
    for code, patient in state.patients.items():
        for procedure in patient.procedures:
            first_procedure[code] = min(
                first_procedure.get(code, procedure.procedure_date), procedure.procedure_date
            )
            treated[code] |= {t.level for t in procedure.treated_levels}
    level_lines: dict[tuple[str, Any, Any], int] = {}
    procedure_rows: dict[tuple[str, Any], _Row] = {}
    for row in parsed.procedures:
        date, level = row.values.get("procedure_date"), row.values.get("level")
        if not check_patient(row) or date is None:
            continue
        for problem in records.check_procedure_date(date, birth_year.get(row.code), row.record):
            flag(row, problem.field, problem.value, problem.reason)
        first_procedure[row.code] = min(first_procedure.get(row.code, date), date)
        if level is not None:
            treated[row.code].add(level)
            level_key = (row.code, date, level)
            if level_key in level_lines:
                flag(
                    row,
                    "level",
                    level,
                    f"level treated twice in one procedure (also line {level_lines[level_key]}); "
                    "list each treated level once",
                )
            level_lines[level_key] = row.line
        first = procedure_rows.setdefault((row.code, date), row)
        for name in ("procedure_type", "notes"):
            if name in row.values and row.values[name] != first.values.get(name):
                flag(
                    row,
                    name,
                    row.values[name],
                    f"differs from line {first.line} of the same procedure "
                    f"({first.values.get(name)!r}); give every level of a procedure the same "
                    f"{name}",
                )

    def check_visit_date(row: _Row) -> None:
        date = row.values.get("visit_date")
        if date is None:
            return
        existing = _existing_visit(state, row.code, date)
        for problem in records.validate_visit_date(
            date,
            row.record,
            birth_year=birth_year.get(row.code),
            first_procedure_date=first_procedure.get(row.code),
            settings=settings,
        ):
            # A stored visit that is already valid stays valid; still report new issues.
            if existing is None or "birth year" in problem.reason:
                flag(row, problem.field, problem.value, problem.reason)

    # Clinical: one row per visit; new VCF only at untreated levels and only once.
    visit_lines: dict[tuple[str, Any], int] = {}
    vcf_at: dict[str, dict[str, dt.date]] = defaultdict(dict)
    for code, patient in state.patients.items():
        for vcf in patient.new_vcf_events:
            vcf_at[code][vcf.level] = vcf.detected_date
    for row in parsed.clinical:
        if "new_vcf_levels" in row.values and row.values.get("visit_date") is not None:
            date = row.values["visit_date"]
            vcf_at[row.code] = {k: v for k, v in vcf_at[row.code].items() if v != date}
    for row in parsed.clinical:
        if not check_patient(row):
            continue
        key: tuple[str, Any] = (row.code, row.values.get("visit_date"))
        if key[1] is not None and key in visit_lines:
            flag(
                row,
                "visit_date",
                key[1],
                f"duplicate visit date (also line {visit_lines[key]}); one row per visit",
            )
        visit_lines.setdefault(key, row.line)
        check_visit_date(row)
        for level in row.values.get("new_vcf_levels", []):
            if level in treated[row.code]:
                flag(
                    row,
                    "new_vcf_levels",
                    level,
                    "is a treated level, not a new VCF; remove it from new_vcf_levels",
                )
            elif level in vcf_at[row.code] and vcf_at[row.code][level] != key[1]:
                flag(
                    row,
                    "new_vcf_levels",
                    level,
                    f"a new VCF at {level} is already recorded on {vcf_at[row.code][level]}; "
                    "list it only at the visit where it was first seen",
                )
            elif key[1] is not None:
                vcf_at[row.code][level] = key[1]

    measurement_lines: dict[tuple[str, Any, Any], int] = {}
    for row in parsed.measurements:
        if not check_patient(row):
            continue
        key3 = (row.code, row.values.get("visit_date"), row.values.get("level"))
        if None not in key3 and key3 in measurement_lines:
            flag(
                row,
                "level",
                key3[2],
                f"duplicate measurement of this level at this visit (also line "
                f"{measurement_lines[key3]}); one row per vertebra and visit",
            )
        measurement_lines.setdefault(key3, row.line)
        if (row.code, row.values.get("visit_date")) not in visit_lines:
            check_visit_date(row)
    return problems


def validate_tables(
    session: Session,
    study_code: str,
    tables: Mapping[str, RawTable],
    settings: Settings,
) -> tuple[_Parsed, _State, list[Problem]]:
    """Check every row of every table against the stored study; return all problems."""
    state = _load_state(session, study_code)
    if state.study is not None:
        settings = records.study_settings(state.study, settings)
    parsed = _Parsed()
    problems: list[Problem] = []
    for name in TABLE_ORDER:
        raw = tables.get(name)
        if raw is None:
            continue
        column_problems = _check_columns(raw, TABLES[name])
        problems += column_problems
        if column_problems:
            continue
        rows, row_problems = _parse_rows(raw, state, settings)
        parsed.rows(name).extend(rows)
        problems += row_problems
    problems += _cross_check(parsed, state, settings)
    problems.sort(
        key=lambda p: (TABLE_ORDER.index(p.table) if p.table in TABLES else -1, p.line or 0)
    )
    return parsed, state, problems


# --------------------------------------------------------------------------- writing


class _Writer:
    def __init__(
        self,
        session: Session,
        study: Study,
        state: _State,
        actor: str,
        settings: Settings,
        report: ImportReport,
        progress: ProgressCallback | None,
    ) -> None:
        self.session = session
        self.study = study
        self.patients = dict(state.patients)
        self.actor = actor
        self.settings = settings
        self.report = report
        self.progress = progress

    def tick(self, table: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(table, done, total)

    def patients_table(self, rows: list[_Row]) -> None:
        counts = self.report.counts["patients"]
        for number, row in enumerate(rows, start=1):
            clean = dict(row.values)
            code = clean.pop("code")
            existing = self.patients.get(code)
            if existing is None:
                self.patients[code] = records.add_patient(
                    self.session, self.study, code, actor=self.actor, **clean
                )
                counts.created += 1
            else:
                changes = {
                    k: v
                    for k, v in clean.items()
                    if not records.same_value(getattr(existing, k), v)
                }
                if changes:
                    records.update_patient(
                        self.session, existing.id, changes, actor=self.actor, reason=_IMPORT_REASON
                    )
                    counts.updated += 1
                else:
                    counts.unchanged += 1
            self.tick("patients", number, len(rows))
        self.session.flush()

    def procedures_table(self, rows: list[_Row]) -> None:
        counts = self.report.counts["procedures"]
        groups: dict[tuple[str, dt.date], list[_Row]] = defaultdict(list)
        for row in rows:
            groups[(row.code, row.values["procedure_date"])].append(row)
        done = 0
        for (code, date), group in groups.items():
            patient = self.patients[code]
            first = group[0].values
            procedure = next((p for p in patient.procedures if p.procedure_date == date), None)
            if procedure is None:
                records.add_procedure(
                    self.session,
                    patient,
                    date,
                    first.get("procedure_type", "vertebroplasty"),
                    [(r.values["level"], r.values.get("cement_volume_ml")) for r in group],
                    actor=self.actor,
                    notes=first.get("notes", ""),
                    settings=self.settings,
                )
                counts.created += len(group)
            else:
                changes: dict[str, Any] = {
                    k: first[k]
                    for k in ("procedure_type", "notes")
                    if k in first and not records.same_value(getattr(procedure, k), first[k])
                }
                if changes:
                    records.update_procedure(
                        self.session,
                        procedure.id,
                        changes,
                        actor=self.actor,
                        reason=_IMPORT_REASON,
                        settings=self.settings,
                    )
                for row in group:
                    level = row.values["level"]
                    treated = next((t for t in procedure.treated_levels if t.level == level), None)
                    if treated is None:
                        records.add_treated_level(
                            self.session,
                            procedure,
                            level,
                            row.values.get("cement_volume_ml"),
                            actor=self.actor,
                        )
                        counts.created += 1
                    elif "cement_volume_ml" in row.values and not records.same_value(
                        treated.cement_volume_ml, row.values["cement_volume_ml"]
                    ):
                        records.update_treated_level(
                            self.session,
                            treated.id,
                            {"cement_volume_ml": row.values["cement_volume_ml"]},
                            actor=self.actor,
                            reason=_IMPORT_REASON,
                        )
                        counts.updated += 1
                    elif changes:
                        counts.updated += 1
                    else:
                        counts.unchanged += 1
            done += len(group)
            self.tick("procedures", done, len(rows))
        self.session.flush()

    def visits(self, clinical: list[_Row], measurements: list[_Row]) -> None:
        counts = self.report.counts.get("clinical", TableCounts())
        new: list[records.NewVisit] = []
        existing_rows: list[tuple[_Row, Visit]] = []
        planned: set[tuple[str, dt.date]] = set()
        for row in clinical:
            patient = self.patients[row.code]
            date = row.values["visit_date"]
            visit = next((v for v in patient.visits if v.visit_date == date), None)
            if visit is None:
                new.append(
                    records.NewVisit(
                        patient,
                        date,
                        row.values.get("nominal_month"),
                        row.values.get("assessment_raw"),
                        row.values.get("new_vcf_levels", ()),
                        record=row.record,
                    )
                )
                planned.add((row.code, date))
                counts.created += 1
            else:
                existing_rows.append((row, visit))
        for row in measurements:
            date = row.values["visit_date"]
            patient = self.patients[row.code]
            if (row.code, date) in planned or any(v.visit_date == date for v in patient.visits):
                continue
            new.append(records.NewVisit(patient, date, record=row.record))
            planned.add((row.code, date))
        records.add_visits(self.session, new, actor=self.actor, settings=self.settings)
        self.tick("clinical", len(new), len(clinical))
        self._update_visits(existing_rows, counts)
        self.session.flush()

    def _update_visits(self, rows: list[tuple[_Row, Visit]], counts: TableCounts) -> None:
        with_month = [(row, visit) for row, visit in rows if "nominal_month" in row.present]
        windows = records.compute_visit_windows(
            [visit.visit_date for _, visit in with_month],
            [
                records.first_procedure_date(visit.patient) or visit.visit_date
                for _, visit in with_month
            ],
            [row.values.get("nominal_month") for row, _ in with_month],
            self.settings,
        )
        changed: set[int] = set()
        for (row, visit), window in zip(with_month, windows, strict=True):
            stored = (visit.nominal_month, visit.window_status, visit.days_from_procedure)
            if stored != window:
                records.update_visit(
                    self.session,
                    visit.id,
                    {"nominal_month": row.values.get("nominal_month")},
                    actor=self.actor,
                    reason=_IMPORT_REASON,
                    settings=self.settings,
                )
                changed.add(id(row))
        # New-VCF removals first, so a level can move from one visit to another.
        additions: list[tuple[_Row, Visit, list[str]]] = []
        for row, visit in rows:
            if "new_vcf_levels" not in row.values:
                continue
            wanted = row.values["new_vcf_levels"]
            for vcf in list(visit.patient.new_vcf_events):
                if vcf.visit_id == visit.id and vcf.level not in wanted:
                    records.remove_new_vcf_event(
                        self.session, vcf, actor=self.actor, reason=_IMPORT_REASON
                    )
                    changed.add(id(row))
            present = {v.level for v in visit.patient.new_vcf_events if v.visit_id == visit.id}
            missing = [level for level in wanted if level not in present]
            if missing:
                additions.append((row, visit, missing))
                changed.add(id(row))
        self.session.flush()
        for _row, visit, missing in additions:
            for level in missing:
                records.add_new_vcf_event(
                    self.session,
                    visit.patient,
                    level,
                    visit.visit_date,
                    actor=self.actor,
                    visit=visit,
                )
        for row, visit in rows:
            clean = row.values.get("assessment", {})
            raw = row.values.get("assessment_raw", {})
            assessment = visit.assessment
            if assessment is None:
                if raw and not records.assessment_is_empty(raw):
                    records.update_assessment(
                        self.session, visit.id, raw, actor=self.actor, reason=_IMPORT_REASON
                    )
                    changed.add(id(row))
            elif any(not records.same_value(getattr(assessment, k), v) for k, v in clean.items()):
                records.update_assessment(
                    self.session, visit.id, raw, actor=self.actor, reason=_IMPORT_REASON
                )
                changed.add(id(row))
            if id(row) in changed:
                counts.updated += 1
            else:
                counts.unchanged += 1

    def measurements_table(self, rows: list[_Row]) -> None:
        counts = self.report.counts["measurements"]
        new: list[records.NewMeasurement] = []
        for number, row in enumerate(rows, start=1):
            patient = self.patients[row.code]
            date, level = row.values["visit_date"], row.values["level"]
            visit = next(v for v in patient.visits if v.visit_date == date)
            old = records.current_measurement_at(visit, level)
            extra = {
                "source": row.values.get("source") or MeasurementSource.IMPORTED.value,
                "method_version": row.values.get("method_version", ""),
                "created_by": row.values.get("reader") or None,
                "overridden_by": row.values.get("overridden_by") or None,
                "override_reason": row.values.get("override_reason") or None,
            }
            measures = dict(row.values["measures"])
            if old is None:
                new.append(
                    records.NewMeasurement(
                        patient, date, level, measures, record=row.record, **extra
                    )
                )
                counts.created += 1
                continue
            if self._same_measurement(old, row, measures):
                counts.unchanged += 1
            else:
                # A changed value supersedes the stored row; absent columns keep their value.
                keep = {k: getattr(old, k) for k in records.MEASUREMENT_FIELDS}
                stored_extra = {
                    "source": old.source.value,
                    "method_version": old.method_version,
                    "created_by": old.created_by,
                    "overridden_by": old.overridden_by,
                    "override_reason": old.override_reason,
                }
                extra = {k: (extra[k] if _present(row, k) else stored_extra[k]) for k in extra}
                records.add_measurement(
                    self.session,
                    patient,
                    date,
                    level,
                    {**keep, **measures},
                    actor=self.actor,
                    replace_manual=True,
                    settings=self.settings,
                    **extra,
                )
                counts.updated += 1
            self.tick("measurements", number, len(rows))
        self.session.flush()
        records.add_measurements(self.session, new, actor=self.actor, settings=self.settings)
        self.tick("measurements", len(rows), len(rows))

    @staticmethod
    def _same_measurement(old: VertebraMeasurement, row: _Row, measures: dict[str, Any]) -> bool:
        if any(not records.same_value(getattr(old, k), v) for k, v in measures.items()):
            return False
        pairs = {
            "source": (old.source.value, row.values.get("source") or "imported"),
            "method_version": (old.method_version, row.values.get("method_version", "")),
            "reader": (old.created_by, row.values.get("reader", "")),
            "overridden_by": (old.overridden_by or "", row.values.get("overridden_by", "")),
            "override_reason": (old.override_reason or "", row.values.get("override_reason", "")),
        }
        return all(
            stored == given for name, (stored, given) in pairs.items() if _present(row, name)
        )


def _present(row: _Row, name: str) -> bool:
    column = "reader" if name == "created_by" else name
    return column in row.present


def import_tables(
    engine: Engine,
    study_code: str,
    frames_or_paths: Mapping[str, pd.DataFrame | str | Path],
    actor: str,
    settings: Settings | None = None,
    *,
    title: str = "",
    progress: ProgressCallback | None = None,
) -> ImportReport:
    """Validate and import exchange tables into study ``study_code`` (created if new).

    Parameters
    ----------
    engine : sqlalchemy.Engine
        The study database (migrated).
    study_code : str
        Code of the study to import into.
    frames_or_paths : mapping
        Table name (``patients``, ``procedures``, ``clinical``, ``measurements``)
        -> CSV path or DataFrame with the columns of :mod:`bmetrack.study.schema`.
    actor : str
        Who imports (written to the audit log).
    settings : Settings, optional
        Visit windows etc.; METHOD.md defaults when omitted.
    progress : callable, optional
        ``progress(table, rows_done, rows_total)`` while writing.

    Returns
    -------
    ImportReport
        Counts of created, updated and unchanged rows per table.

    Raises
    ------
    ImportValidationError
        When any row of any table is invalid; every problem is listed and
        nothing is written.
    """
    records.require_actor(actor)
    settings = settings if settings is not None else resolve_settings()
    report = ImportReport(study_code)
    tables, problems = _load_inputs(frames_or_paths)
    for name, raw in tables.items():
        report.sources[name] = raw.source
    for name in TABLE_ORDER:
        report.counts[name] = TableCounts()
        if name in tables:
            report.counts[name] = TableCounts(
                rows=sum(1 for r in tables[name].rows if any(r.values()))
            )
    if not records.PATIENT_CODE_PATTERN.fullmatch(study_code):
        problems.append(Problem("import", "study_code", study_code, "use letters, digits, - or _"))
    with session_scope(engine) as session:
        parsed, state, row_problems = validate_tables(session, study_code, tables, settings)
        report.problems = problems + row_problems
        if report.problems:
            raise ImportValidationError(report)
        study = state.study or records.get_or_create_study(
            session, study_code, title, actor=actor, nominal_months=settings["nominal_months"]
        )
        settings = records.study_settings(study, settings)
        writer = _Writer(session, study, state, actor, settings, report, progress)
        with session.no_autoflush:
            writer.patients_table(parsed.patients)
            writer.procedures_table(parsed.procedures)
            writer.visits(parsed.clinical, parsed.measurements)
            writer.measurements_table(parsed.measurements)
        session.flush()
    report.written = True
    return report


def read_csv_frame(path: str | Path, name: str) -> pd.DataFrame:
    """Read an exchange CSV (comments, BOM, ';' handled) into a DataFrame of text cells."""
    raw, problems = read_csv_table(path, name)
    if problems:
        raise ValidationError(problems, f"Cannot read {path}")
    return pd.DataFrame(raw.rows, columns=raw.columns, dtype=object)
