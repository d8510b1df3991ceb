"""Import a foreign REDCap project (data dictionary + flat export) through a mapping file.

An existing study kept in REDCap has its own field names, events and codes.
A mapping file (JSON, TOML, or YAML when PyYAML is installed) says how its
flat record export becomes bmetrack's exchange tables::

    {
      "record_id": "study_id",
      "events": {"screening_arm_1": 0, "fu_3m_arm_1": 3, "extra_arm_1": null},
      "tables": {
        "patients": {"columns": {"sex": {"field": "gender",
                                         "values": {"1": "F", "2": "M"}},
                                 "birth_year": "yob"}},
        "procedures": {"instrument": "vertebroplasty",
                       "columns": {"procedure_date": "vp_date",
                                   "procedure_type": {"value": "vertebroplasty"},
                                   "level": {"field": "vp_level", "labels": true}}},
        "clinical": {"columns": {"visit_date": "visit_dt", "vas": "pain_scale",
                                 "vas_unit": {"value": "mm"},
                                 "analgesic_drugs": {"field": "analgesics", "labels": true,
                                                     "none_value": "none"},
                                 "pain_other_level": "other_pain"}},
        "measurements": {"instrument": "mri_level",
                         "columns": {"visit_date": {"field": "visit_dt", "event_field": true},
                                     "level": "mri_vert", "bme_percent": "bme_pct"}}
      }
    }

- ``record_id``: the foreign field holding the patient code.
- ``events``: unique event name -> nominal month; ``null`` leaves the month
  empty so the visit date decides it (visit windows). Without ``events`` every
  visit is matched by its date (also for projects without events).
- ``tables``: per exchange table, the rows it comes from (``instrument``: a
  repeating instrument, else the non-repeating rows; ``events``: optionally
  only these events) and, per exchange column, a column spec:

  * ``"field"`` - the cell as is (yes/no 1/0 -> yes/no; levels normalised,
    ``Th12`` -> ``T12``);
  * ``{"field": ..., "values": {code: value}}`` - coded values mapped;
  * ``{"field": ..., "labels": true}`` - the choice label of the data
    dictionary (checkbox: the labels of the ticked boxes joined by ``;``;
    ``none_value`` when every box is 0);
  * ``{"field": ..., "event_field": true}`` - taken from the record's
    non-repeating row of the same event (e.g. a visit date for the
    measurements of a repeating instrument);
  * ``{"value": ...}`` - a constant (e.g. ``vas_unit`` ``mm`` for a 0-100
    scale).

  A table may also be a list of such objects: several sources of one table
  (e.g. a project without repeating instruments that has fields
  ``level_1`` and ``level_2`` for a second treated level; give each a
  ``when`` so a shared date field alone makes no row).

A flat row makes a row of a table when at least one mapped field of it holds
a value (a ticked box for checkboxes), or, when the table gives ``when``
(a field or a list), one of those fields does. The data dictionary (REDCap's 18
columns, or the API's ``field_name``/``form_name``/... headers) validates the
mapping first; every problem is reported at once. The converted tables go
through :func:`bmetrack.study.importers.import_tables`, so validation and
the all-or-nothing transaction are those of every import, with problems naming
the line of the foreign file and the foreign field.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import Engine

from bmetrack.anatomy import LevelError, normalise_level
from bmetrack.settings import Settings
from bmetrack.study.importers import (
    ImportReport,
    ImportValidationError,
    ProgressCallback,
    import_tables,
)
from bmetrack.study.records import Problem, ValidationError
from bmetrack.study.redcap import read_redcap_csv
from bmetrack.study.schema import TABLES

__all__ = [
    "ColumnMap",
    "RedcapDictionaryField",
    "RedcapMapping",
    "RedcapMappingError",
    "TableMap",
    "foreign_redcap_to_frames",
    "import_foreign_redcap",
    "load_mapping",
    "parse_mapping",
    "read_data_dictionary",
    "validate_mapping",
]

# Foreign field types each kind of exchange column accepts.
_TEXT_TYPES = {"text", "notes"}
_CODED_TYPES = {"radio", "dropdown"}
_COMPATIBLE: dict[str, set[str]] = {
    "code": _TEXT_TYPES,
    "text": _TEXT_TYPES | _CODED_TYPES | {"checkbox", "yesno", "truefalse", "calc"},
    "date": {"text", "calc"},
    "int": {"text", "calc", "slider", "yesno", "truefalse"} | _CODED_TYPES,
    "float": {"text", "calc", "slider"} | _CODED_TYPES,
    "bool": {"yesno", "truefalse", "text"} | _CODED_TYPES,
    "level": _TEXT_TYPES | _CODED_TYPES,
    "level_list": _TEXT_TYPES | _CODED_TYPES | {"checkbox"},
    "enum": _TEXT_TYPES | _CODED_TYPES | {"yesno", "truefalse"},
}
_YESNO_CODES = {"1": "yes", "0": "no"}
_MAPPING_KEYS = {"record_id", "events", "tables"}
_TABLE_KEYS = {"instrument", "events", "columns", "when"}
_COLUMN_KEYS = {"field", "values", "labels", "none_value", "event_field", "value"}
# Column names of the 18-column dictionary (CSV download) and of the API export.
_DICTIONARY_HEADERS = (
    ("Variable / Field Name", "field_name"),
    ("Form Name", "form_name"),
    ("Field Type", "field_type"),
    ("Choices, Calculations, OR Slider Labels", "select_choices_or_calculations"),
    ("Text Validation Type OR Show Slider Number", "text_validation_type_or_show_slider_number"),
)


class RedcapMappingError(ValidationError):
    """The mapping file does not fit the foreign project; ``problems`` lists every one."""


@dataclass(frozen=True)
class RedcapDictionaryField:
    """One field of a foreign data dictionary."""

    name: str
    form: str
    field_type: str
    choices: dict[str, str] = field(default_factory=dict)  # code -> label
    validation: str = ""


@dataclass(frozen=True)
class ColumnMap:
    """Where one exchange column comes from."""

    column: str
    field: str = ""  # foreign field; "" for a constant
    values: dict[str, str] | None = None  # code -> our value
    labels: bool = False
    none_value: str = ""
    event_field: bool = False
    value: str | None = None  # constant


@dataclass(frozen=True)
class TableMap:
    """Which flat rows make one exchange table, and its columns."""

    table: str
    instrument: str = ""  # repeating instrument; "" for non-repeating rows
    events: tuple[str, ...] = ()  # empty: every event
    columns: tuple[ColumnMap, ...] = ()
    where: str = ""  # its place in the mapping file, for messages
    when: tuple[str, ...] = ()  # foreign fields of which one must hold a value; () = any mapped


@dataclass(frozen=True)
class RedcapMapping:
    """A parsed mapping file."""

    record_id: str
    events: dict[str, int | None] | None
    tables: tuple[TableMap, ...]
    source: str = "mapping"


# --------------------------------------------------------------------------- reading


def _problem(source: str, where: str, value: Any, reason: str) -> Problem:
    return Problem(source, where, value, reason, table="mapping")


def load_mapping(path: str | Path) -> RedcapMapping:
    """Read a mapping file (``.json``, ``.toml``, or ``.yaml``/``.yml`` with PyYAML).

    Raises
    ------
    RedcapMappingError
        When the file's structure is wrong (every problem listed).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in {".json", ".toml", ".yaml", ".yml"}:
        msg = f"mapping {path}: unknown format {suffix!r}; use .json, .toml or .yaml."
        raise ValueError(msg)
    text = path.read_text(encoding="utf-8-sig")
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        else:
            data = _yaml_load(text, path)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        msg = f"mapping {path} is not valid {suffix[1:].upper()}: {error}"
        raise ValueError(msg) from None
    return parse_mapping(data, source=path.name)


def _yaml_load(text: str, path: Path) -> Any:
    """Parse YAML with PyYAML (optional: not a bmetrack dependency)."""
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML is usually present
        msg = f"mapping {path}: YAML needs PyYAML; install it or write JSON/TOML."
        raise ValueError(msg) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        msg = f"mapping {path} is not valid YAML: {error}"
        raise ValueError(msg) from None


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "" if value is None else str(value).strip()


def parse_mapping(data: Mapping[str, Any], source: str = "mapping") -> RedcapMapping:
    """Build a :class:`RedcapMapping` from parsed JSON/TOML/YAML (structure checks only)."""
    problems: list[Problem] = []

    def flag(where: str, value: Any, reason: str) -> None:
        problems.append(_problem(source, where, value, reason))

    if not isinstance(data, Mapping):
        flag("(top level)", type(data).__name__, "the mapping must be an object/table")
        raise RedcapMappingError(problems, f"Invalid REDCap mapping {source}")
    for key in data:
        if key not in _MAPPING_KEYS:
            flag(str(key), None, f"unknown key; use {', '.join(sorted(_MAPPING_KEYS))}")
    record_id = _text(data.get("record_id"))
    if not record_id:
        flag("record_id", None, "required: the foreign field holding the patient code")
    events: dict[str, int | None] | None = None
    if data.get("events") is not None:
        events = {}
        raw_events = data["events"]
        if not isinstance(raw_events, Mapping):
            flag("events", raw_events, "must map event names to nominal months (or null)")
            raw_events = {}
        for name, month in raw_events.items():
            if month is None or (isinstance(month, str) and month.lower() in {"", "date"}):
                events[str(name)] = None
            elif isinstance(month, int) and not isinstance(month, bool) and month >= 0:
                events[str(name)] = month
            else:
                flag(f"events.{name}", month, "use a month >= 0, or null to match by date")
    tables: list[TableMap] = []
    raw_tables = data.get("tables")
    if not isinstance(raw_tables, Mapping) or not raw_tables:
        flag("tables", raw_tables, f"required: map one or more of {', '.join(TABLES)}")
        raw_tables = {}
    for name, table_spec in raw_tables.items():
        if name not in TABLES:
            flag(f"tables.{name}", name, f"unknown exchange table; use {', '.join(TABLES)}")
            continue
        # A list: several sources of one table (e.g. fields level_1, level_2 of one form).
        specs = table_spec if isinstance(table_spec, list) else [table_spec]
        for number, spec in enumerate(specs):
            where = f"tables.{name}" + (f"[{number}]" if isinstance(table_spec, list) else "")
            parsed = _parse_table(str(name), spec, where, flag)
            if parsed is not None:
                tables.append(parsed)
    if problems:
        raise RedcapMappingError(problems, f"Invalid REDCap mapping {source}")
    return RedcapMapping(record_id, events, tuple(tables), source)


def _parse_table(name: str, spec: Any, where: str, flag: Any) -> TableMap | None:
    if not isinstance(spec, Mapping):
        flag(where, spec, "must be an object with 'columns' (or a list of them)")
        return None
    for key in spec:
        if key not in _TABLE_KEYS:
            flag(f"{where}.{key}", None, f"unknown key; use {', '.join(sorted(_TABLE_KEYS))}")
    table_events = spec.get("events", ())
    table_events = (table_events,) if isinstance(table_events, str) else table_events
    columns = []
    raw_columns = spec.get("columns")
    if not isinstance(raw_columns, Mapping) or not raw_columns:
        flag(f"{where}.columns", raw_columns, "map exchange columns to foreign fields")
        raw_columns = {}
    for column, column_spec in raw_columns.items():
        parsed = _parse_column(str(column), column_spec, f"{where}.columns.{column}", flag)
        if parsed is not None:
            columns.append(parsed)
    when = spec.get("when", ())
    when = [when] if isinstance(when, str) else when
    return TableMap(
        name,
        _text(spec.get("instrument")),
        tuple(str(e) for e in table_events),
        tuple(columns),
        where,
        tuple(str(f) for f in when),
    )


def _parse_column(column: str, spec: Any, where: str, flag: Any) -> ColumnMap | None:
    if isinstance(spec, str):
        return ColumnMap(column, field=spec.strip())
    if not isinstance(spec, Mapping):
        flag(where, spec, "use a field name, {'field': ...} or {'value': ...}")
        return None
    unknown = [key for key in spec if key not in _COLUMN_KEYS]
    if unknown:
        flag(where, unknown, f"unknown keys; use {', '.join(sorted(_COLUMN_KEYS))}")
    if "value" in spec:
        if "field" in spec:
            flag(where, spec["field"], "give either 'field' or a constant 'value', not both")
        return ColumnMap(column, value=_text(spec["value"]))
    name = _text(spec.get("field"))
    if not name:
        flag(where, None, "'field' is required (or a constant 'value')")
        return None
    values = spec.get("values")
    if values is not None and not isinstance(values, Mapping):
        flag(f"{where}.values", values, "must map codes to values")
        values = None
    return ColumnMap(
        column,
        field=name,
        values={str(k): _text(v) for k, v in values.items()} if values is not None else None,
        labels=bool(spec.get("labels", False)),
        none_value=_text(spec.get("none_value")),
        event_field=bool(spec.get("event_field", False)),
    )


def _parse_choices(text: str) -> dict[str, str]:
    choices: dict[str, str] = {}
    for part in str(text).split("|"):
        code, sep, label = part.partition(",")
        if sep and code.strip():
            choices[code.strip()] = label.strip()
    return choices


def read_data_dictionary(source: str | Path | pd.DataFrame) -> dict[str, RedcapDictionaryField]:
    """Fields of a REDCap data dictionary (CSV download or API headers), by name."""
    frame = source if isinstance(source, pd.DataFrame) else read_redcap_csv(source)
    columns = [str(c).strip() for c in frame.columns]
    picked: list[str] = []
    for names in _DICTIONARY_HEADERS:
        found = next((c for c in columns if c in names), None)
        if found is None:
            msg = (
                f"data dictionary: column {names[0]!r} is missing; give REDCap's data "
                f"dictionary CSV (18 columns), found columns {columns}."
            )
            raise ValueError(msg)
        picked.append(found)
    frame = frame.set_axis(columns, axis=1)
    fields: dict[str, RedcapDictionaryField] = {}
    for row in frame[picked].itertuples(index=False):
        name, form, kind, choices, validation = (str(v).strip() for v in row)
        if not name:
            continue
        coded = kind in _CODED_TYPES | {"checkbox"}
        if kind in {"yesno", "truefalse"}:
            coded_choices = (
                {"1": "Yes", "0": "No"} if kind == "yesno" else {"1": "True", "0": "False"}
            )
        else:
            coded_choices = _parse_choices(choices) if coded else {}
        fields[name] = RedcapDictionaryField(name, form, kind, coded_choices, validation)
    return fields


# --------------------------------------------------------------------------- validation


def validate_mapping(
    mapping: RedcapMapping, dictionary: Mapping[str, RedcapDictionaryField]
) -> list[Problem]:
    """Every problem of a mapping against the foreign data dictionary (empty list: fine)."""
    problems: list[Problem] = []

    def flag(where: str, value: Any, reason: str) -> None:
        problems.append(_problem(mapping.source, where, value, reason))

    forms = {f.form for f in dictionary.values()}
    if mapping.record_id not in dictionary:
        flag("record_id", mapping.record_id, "not a field of the data dictionary")
    for table in mapping.tables:
        spec = TABLES[table.table]
        where = table.where or f"tables.{table.table}"
        if table.instrument and table.instrument not in forms:
            flag(
                f"{where}.instrument",
                table.instrument,
                f"not an instrument of the data dictionary; use one of {', '.join(sorted(forms))}",
            )
        for name in table.when:
            if name not in dictionary:
                flag(f"{where}.when", name, "field not in the data dictionary; check its name")
        for event in table.events:
            if mapping.events is not None and event not in mapping.events:
                flag(f"{where}.events", event, "not listed in 'events'; add it there")
        mapped = {c.column for c in table.columns}
        for column in spec.columns:
            if column.required and column.name not in mapped and column.name != "patient_code":
                flag(
                    f"{where}.columns",
                    column.name,
                    "required exchange column is not mapped; map it to a field or a 'value'",
                )
        for column_map in table.columns:
            _validate_column(table, column_map, dictionary, flag)
    return problems


def _validate_column(
    table: TableMap,
    column_map: ColumnMap,
    dictionary: Mapping[str, RedcapDictionaryField],
    flag: Any,
) -> None:
    spec = TABLES[table.table]
    where = f"{table.where or 'tables.' + table.table}.columns.{column_map.column}"
    if column_map.column == "patient_code":
        flag(where, column_map.column, "the patient code comes from 'record_id'; remove it here")
        return
    if column_map.column not in spec.column_names:
        flag(
            where,
            column_map.column,
            f"not a column of {table.table}; use one of {', '.join(spec.column_names[1:])}",
        )
        return
    kind = spec.column(column_map.column).kind
    if column_map.value is not None:
        return
    foreign = dictionary.get(column_map.field)
    if foreign is None:
        flag(where, column_map.field, "field not in the data dictionary; check its name")
        return
    if foreign.field_type not in _COMPATIBLE[kind]:
        flag(
            where,
            column_map.field,
            f"a {foreign.field_type} field cannot fill a {kind} column; map a field of type "
            f"{', '.join(sorted(_COMPATIBLE[kind]))}",
        )
        return
    if column_map.values is not None:
        if not foreign.choices:
            flag(
                f"{where}.values",
                column_map.field,
                f"value map given, but {foreign.field_type} field has no choices; remove it",
            )
        for code in column_map.values:
            if foreign.choices and code not in foreign.choices:
                flag(
                    f"{where}.values",
                    code,
                    f"choice code not in {column_map.field}'s choices "
                    f"({', '.join(f'{k}={v}' for k, v in foreign.choices.items())})",
                )
    if column_map.labels and not foreign.choices:
        flag(where, column_map.field, f"'labels' needs a coded field, not {foreign.field_type}")
    if foreign.field_type == "checkbox" and column_map.values is None and not column_map.labels:
        flag(where, column_map.field, "a checkbox needs a 'values' map or 'labels': true")
    if foreign.field_type == "checkbox" and kind not in {"text", "level_list"}:
        flag(where, column_map.field, f"a checkbox cannot fill a {kind} column")
    if table.instrument and not column_map.event_field and foreign.form != table.instrument:
        flag(
            where,
            column_map.field,
            f"field is on instrument {foreign.form!r}, not on the repeating instrument "
            f"{table.instrument!r}; use 'event_field': true for a field of the event's row",
        )


# --------------------------------------------------------------------------- conversion


@dataclass
class _Context:
    source: str
    dictionary: Mapping[str, RedcapDictionaryField]
    event_rows: dict[tuple[str, str], dict[str, str]]
    problems: list[Problem] = field(default_factory=list)


def _checkbox_cells(cells: Mapping[str, str], name: str) -> dict[str, str]:
    prefix = f"{name}___"
    return {k[len(prefix) :]: v for k, v in cells.items() if k.startswith(prefix)}


def _has_value(cells: Mapping[str, str], column_map: ColumnMap, foreign: Any) -> bool:
    if column_map.value is not None or column_map.event_field:
        return False
    if foreign is not None and foreign.field_type == "checkbox":
        return "1" in _checkbox_cells(cells, column_map.field).values()
    return bool(cells.get(column_map.field, ""))


def _convert_cell(
    column_map: ColumnMap,
    kind: str,
    cells: Mapping[str, str],
    context: _Context,
    record: str,
    line: int,
) -> str:
    def flag(name: str, value: Any, reason: str) -> None:
        context.problems.append(Problem(record, name, value, reason, "redcap", line))

    if column_map.value is not None:
        return column_map.value
    foreign = context.dictionary[column_map.field]
    if foreign.field_type == "checkbox":
        chosen = []
        for code, cell in _checkbox_cells(cells, column_map.field).items():
            if cell == "1":
                chosen.append(code)
            elif cell not in {"", "0"}:
                flag(f"{column_map.field}___{code}", cell, "a checkbox holds 1 (checked) or 0")
        parts = []
        for code in chosen:
            label = _decode(column_map, foreign, code)
            if label is None:
                flag(f"{column_map.field}___{code}", "1", _unmapped(column_map, foreign))
            elif kind == "level_list":
                parts.append(_level(label, f"{column_map.field}___{code}", flag))
            else:
                parts.append(label)
        if not chosen:
            return column_map.none_value
        return ";".join(p for p in parts if p)
    cell = cells.get(column_map.field, "").strip()
    if not cell:
        return ""
    if column_map.values is not None or column_map.labels:
        decoded = _decode(column_map, foreign, cell)
        if decoded is None:
            flag(column_map.field, cell, _unmapped(column_map, foreign))
            return ""
        cell = decoded
    elif kind == "bool" and foreign.field_type in {"yesno", "truefalse"}:
        cell = _YESNO_CODES.get(cell, cell)
    if kind == "level":
        return _level(cell, column_map.field, flag)
    if kind == "level_list":
        return ";".join(_level(p, column_map.field, flag) for p in re.split(r"[;,]", cell) if p)
    return cell


def _decode(column_map: ColumnMap, foreign: RedcapDictionaryField, code: str) -> str | None:
    if column_map.values is not None:
        return column_map.values.get(code)
    return foreign.choices.get(code)


def _unmapped(column_map: ColumnMap, foreign: RedcapDictionaryField) -> str:
    if column_map.values is not None:
        return (
            f"code has no entry in the mapping's 'values' for {column_map.column}; "
            f"add it (mapped: {', '.join(column_map.values)})"
        )
    return f"code is not a choice of {foreign.name} in the data dictionary"


def _level(text: str, name: str, flag: Any) -> str:
    try:
        return normalise_level(text)
    except LevelError as error:
        flag(name, text, str(error))
        return ""


def foreign_redcap_to_frames(
    flat: pd.DataFrame,
    mapping: RedcapMapping,
    dictionary: Mapping[str, RedcapDictionaryField],
    source: str = "REDCap file",
) -> tuple[dict[str, pd.DataFrame], list[Problem]]:
    """Exchange tables (text cells) from a foreign flat export, and the problems found.

    The mapping must have passed :func:`validate_mapping`. Each frame carries
    ``attrs["source_lines"]`` (line of the foreign file, header = 1) and
    ``attrs["foreign_fields"]`` (exchange column -> foreign field).
    """
    columns = [str(c) for c in flat.columns]
    problems: list[Problem] = []
    if mapping.record_id not in columns:
        problems.append(
            Problem(
                f"{source} header (line 1)",
                mapping.record_id,
                None,
                "record id column is missing; export the records with the record id field",
                "redcap",
                1,
            )
        )
        return {}, problems
    rows = [
        (position + 2, {str(k): str(v).strip() for k, v in row.items()})
        for position, row in enumerate(flat.to_dict("records"))
    ]
    context = _Context(source, dictionary, {}, problems)
    for _, cells in rows:
        if not cells.get("redcap_repeat_instrument", ""):
            key = (cells[mapping.record_id], cells.get("redcap_event_name", ""))
            merged = context.event_rows.setdefault(key, {})
            merged.update({k: v for k, v in cells.items() if v and not merged.get(k)})
    out: dict[str, list[dict[str, str]]] = {t.table: [] for t in mapping.tables}
    lines: dict[str, list[int]] = {t.table: [] for t in mapping.tables}
    for line, cells in rows:
        code = cells[mapping.record_id]
        event = cells.get("redcap_event_name", "")
        record = f"{source} line {line} (record {code}" + (f", {event})" if event else ")")
        if mapping.events is not None and event not in mapping.events:
            problems.append(
                Problem(
                    record,
                    "redcap_event_name",
                    event,
                    f"event not in the mapping's 'events' ({', '.join(mapping.events)}); "
                    "add it (null: matched by the visit date)",
                    "redcap",
                    line,
                )
            )
            continue
        instrument = cells.get("redcap_repeat_instrument", "")
        for table in mapping.tables:
            if instrument != table.instrument or (table.events and event not in table.events):
                continue
            triggers = [ColumnMap("", field=f) for f in table.when] or table.columns
            if not any(_has_value(cells, c, dictionary.get(c.field)) for c in triggers):
                continue
            kinds = {c.name: c.kind for c in TABLES[table.table].columns}
            values = {"patient_code": code}
            event_cells = context.event_rows.get((code, event), {})
            for column_map in table.columns:
                use = event_cells if column_map.event_field else cells
                values[column_map.column] = _convert_cell(
                    column_map, kinds[column_map.column], use, context, record, line
                )
            if table.table == "clinical" and "nominal_month" not in values:
                month = (mapping.events or {}).get(event)
                values["nominal_month"] = "" if month is None else str(month)
            out[table.table].append(values)
            lines[table.table].append(line)
    frames: dict[str, pd.DataFrame] = {}
    for name in out:
        maps = [t for t in mapping.tables if t.table == name]
        names = ["patient_code", *dict.fromkeys(c.column for t in maps for c in t.columns)]
        if name == "clinical" and "nominal_month" not in names:
            names.append("nominal_month")
        foreign: dict[str, list[str]] = {"patient_code": [mapping.record_id]}
        for column_map in (c for t in maps for c in t.columns if c.value is None):
            foreign.setdefault(column_map.column, []).append(column_map.field)
        frame = pd.DataFrame(out[name], columns=names, dtype=object).fillna("")
        frame.attrs["source_name"] = source
        frame.attrs["source_lines"] = lines[name]
        frame.attrs["foreign_fields"] = {
            column: "/".join(dict.fromkeys(fields)) for column, fields in foreign.items()
        }
        frames[name] = frame
    return frames, problems


def _name_foreign_fields(
    problems: list[Problem], frames: Mapping[str, pd.DataFrame]
) -> list[Problem]:
    """Problems of the exchange-table rules, with the foreign field named next to ours."""
    named = []
    for problem in problems:
        foreign: dict[str, str] = {}
        if problem.table is not None and problem.table in frames:
            foreign = frames[problem.table].attrs.get("foreign_fields", {})
        text = problem.field
        if problem.field in foreign and foreign[problem.field] != problem.field:
            text = f"{problem.field} (REDCap field {foreign[problem.field]})"
        named.append(
            Problem(
                problem.record,
                text,
                problem.value,
                problem.reason,
                problem.table,
                problem.line,
                problem.file_line,
            )
        )
    return named


def import_foreign_redcap(
    engine: Engine,
    study_code: str,
    flat: str | Path | pd.DataFrame,
    dictionary: str | Path | pd.DataFrame | Mapping[str, RedcapDictionaryField],
    mapping: str | Path | RedcapMapping | Mapping[str, Any],
    actor: str,
    settings: Settings | None = None,
    *,
    title: str = "",
    progress: ProgressCallback | None = None,
) -> ImportReport:
    """Import a foreign REDCap project's flat export through a mapping file.

    Parameters
    ----------
    engine : sqlalchemy.Engine
        The study database (migrated).
    study_code : str
        Study to import into (created if new).
    flat : path or DataFrame
        The foreign project's flat record export (raw codes, not labels).
    dictionary : path, DataFrame or parsed fields
        The foreign project's data dictionary.
    mapping : path, RedcapMapping or dict
        The mapping (see the module docstring).
    actor : str
        Who imports (audit log).
    settings : Settings, optional
        Visit windows etc.; METHOD.md defaults when omitted.

    Raises
    ------
    RedcapMappingError
        When the mapping does not fit the data dictionary (every problem listed).
    ImportValidationError
        When rows are invalid; problems name the foreign file's lines and fields;
        nothing is written.
    """
    if isinstance(mapping, RedcapMapping):
        parsed = mapping
    elif isinstance(mapping, Mapping):
        parsed = parse_mapping(mapping)
    else:
        parsed = load_mapping(mapping)
    fields = (
        read_data_dictionary(dictionary)
        if isinstance(dictionary, str | Path | pd.DataFrame)
        else dictionary
    )
    mapping_problems = validate_mapping(parsed, fields)
    if mapping_problems:
        raise RedcapMappingError(
            mapping_problems, f"REDCap mapping {parsed.source} does not fit the data dictionary"
        )
    name = "REDCap data" if isinstance(flat, pd.DataFrame) else Path(flat).name
    records_frame = flat if isinstance(flat, pd.DataFrame) else read_redcap_csv(flat)
    frames, problems = foreign_redcap_to_frames(records_frame, parsed, fields, name)
    if problems:
        raise ImportValidationError(ImportReport(study_code, {"redcap": name}, problems=problems))
    try:
        return import_tables(
            engine, study_code, frames, actor, settings, title=title, progress=progress
        )
    except ImportValidationError as error:
        report = error.report
        report.problems = _name_foreign_fields(report.problems, frames)
        raise ImportValidationError(report) from None
