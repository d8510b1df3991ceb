"""The exchange tables of a study: columns, types and meaning, declared once.

The CSV templates (``bmetrack template NAME``), the CSV importer and exporter,
the REDCap data dictionary and the cohort simulator all use these
definitions. One row of a table is one record a user would type:

- ``patients``: one row per patient.
- ``procedures``: one row per treated level (a procedure that treats two
  levels has two rows with the same date).
- ``clinical``: one row per visit (VAS, analgesics, pain at another level,
  new VCF seen at that visit).
- ``measurements``: one row per vertebral body per visit (BME, volumes,
  heights, Genant grade), as the imaging pipeline writes them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TABLES", "Column", "TableSpec", "table_spec"]


@dataclass(frozen=True)
class Column:
    """One column of an exchange table."""

    name: str
    kind: str  # "text", "code", "date", "int", "float", "bool", "level", "level_list", "enum"
    required: bool
    description: str
    choices: tuple[str, ...] = ()
    unit: str = ""


@dataclass(frozen=True)
class TableSpec:
    """One exchange table: its name, what a row is and its columns."""

    name: str
    row_is: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]

    @property
    def column_names(self) -> list[str]:
        return [column.name for column in self.columns]

    def column(self, name: str) -> Column:
        for column in self.columns:
            if column.name == name:
                return column
        msg = f"Table {self.name!r} has no column {name!r}; columns: {self.column_names}."
        raise KeyError(msg)


_PATIENT = Column(
    "patient_code",
    "code",
    True,
    "Pseudonymous study code (letters, digits, - and _). Never a name or hospital number.",
)

PATIENTS = TableSpec(
    "patients",
    "one patient",
    (
        _PATIENT,
        Column("sex", "enum", True, "F, M or U (unknown).", choices=("F", "M", "U")),
        Column("birth_year", "int", False, "Year of birth (no full date is stored)."),
        Column("enrolled_date", "date", False, "Date of inclusion, YYYY-MM-DD."),
        Column("notes", "text", False, "Free text; no identifying information."),
    ),
    key=("patient_code",),
)

PROCEDURES = TableSpec(
    "procedures",
    "one treated level of one procedure",
    (
        _PATIENT,
        Column("procedure_date", "date", True, "Date of the procedure, YYYY-MM-DD."),
        Column(
            "procedure_type",
            "enum",
            True,
            "vertebroplasty, kyphoplasty or conservative.",
            choices=("vertebroplasty", "kyphoplasty", "conservative"),
        ),
        Column("level", "level", True, "Treated level, e.g. T12 or L1 (C1-C7, T1-T12, L1-L6)."),
        Column("cement_volume_ml", "float", False, "Cement injected at this level.", unit="ml"),
        Column("notes", "text", False, "Free text."),
    ),
    key=("patient_code", "procedure_date", "level"),
)

CLINICAL = TableSpec(
    "clinical",
    "one visit of one patient",
    (
        _PATIENT,
        Column("visit_date", "date", True, "Date of the visit, YYYY-MM-DD."),
        Column(
            "nominal_month",
            "int",
            False,
            "Nominal time point (0, 3, 6, 12). Leave empty to match the date to the nearest "
            "visit window; a date outside every window is kept and flagged.",
            unit="month",
        ),
        Column(
            "vas",
            "float",
            False,
            "Pain on the visual analog scale: 0-10, or 0-100 when vas_unit is mm.",
        ),
        Column(
            "vas_unit",
            "enum",
            False,
            "0-10 (default) or mm (0-100 mm line; stored as mm / 10).",
            choices=("0-10", "mm"),
        ),
        Column(
            "analgesic_drugs",
            "text",
            False,
            "Analgesics taken, separated by ';' (e.g. paracetamol; tramadol), or none. "
            "Unknown drug names are an error.",
        ),
        Column(
            "analgesic_class",
            "int",
            False,
            "WHO ladder 0-3. Leave empty to derive it from analgesic_drugs; when both are "
            "given they must agree.",
        ),
        Column(
            "pain_other_level",
            "bool",
            False,
            "Pain at an untreated level: yes or no.",
        ),
        Column(
            "new_vcf_levels",
            "level_list",
            False,
            "New VCF first seen at this visit, levels separated by ';' (e.g. L2;L3).",
        ),
        Column("notes", "text", False, "Free text."),
    ),
    key=("patient_code", "visit_date"),
)

MEASUREMENTS = TableSpec(
    "measurements",
    "one vertebral body at one visit",
    (
        _PATIENT,
        Column("visit_date", "date", True, "Date of the visit (imaging date), YYYY-MM-DD."),
        Column("level", "level", True, "Vertebral level, e.g. T12."),
        Column("bme_percent", "float", True, "Edema volume / (body - cement) x 100.", unit="%"),
        Column("body_volume_ml", "float", False, "Vertebral body volume.", unit="ml"),
        Column("edema_volume_ml", "float", False, "Edema volume.", unit="ml"),
        Column("cement_volume_ml", "float", False, "Cement volume.", unit="ml"),
        Column("rim_volume_ml", "float", False, "Peri-cement rim volume.", unit="ml"),
        Column("height_anterior_mm", "float", False, "Anterior height.", unit="mm"),
        Column("height_middle_mm", "float", False, "Middle height.", unit="mm"),
        Column("height_posterior_mm", "float", False, "Posterior height.", unit="mm"),
        Column("height_loss_percent", "float", False, "Genant height loss.", unit="%"),
        Column("genant_grade", "int", False, "Genant semiquantitative grade 0-3."),
        Column(
            "deformity",
            "enum",
            False,
            "none, wedge, biconcave or crush.",
            choices=("none", "wedge", "biconcave", "crush"),
        ),
        Column(
            "source",
            "enum",
            False,
            "imported (default), manual, automatic or simulated.",
            choices=("imported", "manual", "automatic", "simulated"),
        ),
        Column("method_version", "text", False, "Software/method that produced the value."),
        Column("reader", "text", False, "Who measured it (for manual readings)."),
    ),
    key=("patient_code", "visit_date", "level"),
)

TABLES: dict[str, TableSpec] = {
    spec.name: spec for spec in (PATIENTS, PROCEDURES, CLINICAL, MEASUREMENTS)
}


def table_spec(name: str) -> TableSpec:
    """Return the spec of an exchange table by name, with a helpful error."""
    try:
        return TABLES[name]
    except KeyError:
        msg = f"Unknown table {name!r}; choose one of: {', '.join(TABLES)}."
        raise KeyError(msg) from None
