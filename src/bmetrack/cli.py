"""Command-line interface: a thin layer over the library.

Every command parses its options, calls one library function and prints what
it returned. Known input errors exit with status 2 and a message that says what
is wrong and how to fix it; no traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from bmetrack import __version__

app = typer.Typer(
    name="bmetrack",
    help="Longitudinal imaging-outcome studies of vertebral compression fractures.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Create and migrate the study database.", no_args_is_help=True)
app.add_typer(db_app, name="db")

console = Console()
err_console = Console(stderr=True)

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="Database URL or SQLite file (default: $BMETRACK_DB, else bmetrack.db).",
        show_default=False,
    ),
]
StudyOption = Annotated[str, typer.Option("--study", help="Study code, e.g. PV-BME-2006.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Method setting as name=value (repeatable); see 'bmetrack settings'."
    ),
]
ActorOption = Annotated[
    str, typer.Option("--actor", help="Who makes the change (recorded in the audit trail).")
]


def _user_errors() -> tuple[type[BaseException], ...]:
    from bmetrack.anatomy import LevelError
    from bmetrack.settings import SettingsError
    from bmetrack.study.analgesics import UnknownDrugError
    from bmetrack.study.db import DatabaseError
    from bmetrack.study.records import RecordNotFoundError, StaleRecordError, ValidationError

    return (
        LevelError,
        SettingsError,
        UnknownDrugError,
        DatabaseError,
        ValidationError,
        StaleRecordError,
        RecordNotFoundError,
        FileNotFoundError,
        IsADirectoryError,
        KeyError,
    )


@contextmanager
def _reported_errors() -> Iterator[None]:
    """Turn expected input errors into a clear message and exit status 2."""
    from sqlalchemy.exc import OperationalError

    try:
        yield
    except _user_errors() as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except OperationalError as error:
        err_console.print(
            f"[bold red]error:[/] the database could not be used: {error.orig}. "
            "Check --db / BMETRACK_DB and that the server is running.",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(2) from None


def _settings(assignments: list[str] | None) -> Any:
    from bmetrack.settings import parse_assignments, resolve_settings

    return resolve_settings(parse_assignments(assignments or []))


def _progress_printer() -> Callable[[str], None]:
    def show(step: str) -> None:
        err_console.print(f"[dim]… {step}[/]", highlight=False)

    return show


@app.callback(invoke_without_command=True)
def main(
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
) -> None:
    if version:
        console.print(f"bmetrack {__version__}")
        raise typer.Exit()


@db_app.command("upgrade")
def db_upgrade(db: DbOption = None) -> None:
    """Create the database or apply pending schema migrations."""
    from bmetrack.study import db as database

    with _reported_errors():
        engine = database.make_engine(db)
        revision = database.upgrade(engine)
    console.print(f"{engine.url.render_as_string(hide_password=True)} is at revision {revision}")


@app.command("settings")
def settings_command(
    set_: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List every method setting with its value, default and METHOD.md section."""
    import json

    with _reported_errors():
        rows = _settings(set_).describe()
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table("name", "value", "unit", "§", "description")
    for row in rows:
        value = str(row["value"]) + (" (changed)" if row["changed"] else "")
        table.add_row(row["name"], value, row["unit"], row["method_section"], row["description"])
    console.print(table)


@app.command("template")
def template(
    name: Annotated[str, typer.Argument(help="patients, procedures, clinical or measurements.")],
) -> None:
    """Print an empty CSV template with a header comment explaining each column."""
    from bmetrack.study.exporters import template_csv

    with _reported_errors():
        sys.stdout.write(template_csv(name))


@app.command("import")
def import_command(
    study: StudyOption,
    patients: Annotated[Path | None, typer.Option(help="patients.csv")] = None,
    procedures: Annotated[Path | None, typer.Option(help="procedures.csv")] = None,
    clinical: Annotated[Path | None, typer.Option(help="clinical.csv (visits)")] = None,
    measurements: Annotated[Path | None, typer.Option(help="measurements.csv")] = None,
    redcap: Annotated[
        Path | None, typer.Option(help="REDCap flat record export (instead of the CSVs).")
    ] = None,
    title: Annotated[str, typer.Option(help="Study title (for a new study).")] = "",
    db: DbOption = None,
    actor: ActorOption = "cli",
    set_: SetOption = None,
) -> None:
    """Import CSV files (or a REDCap export): all rows or none, every bad row listed."""
    from bmetrack.study.db import make_engine, require_current_schema
    from bmetrack.study.importers import ImportValidationError, import_tables
    from bmetrack.study.redcap import import_redcap

    given = {
        "patients": patients,
        "procedures": procedures,
        "clinical": clinical,
        "measurements": measurements,
    }
    sources = {name: path for name, path in given.items() if path is not None}
    if not sources and redcap is None:
        err_console.print(
            "[bold red]error:[/] nothing to import; give --patients, --procedures, "
            "--clinical, --measurements or --redcap."
        )
        raise typer.Exit(2)
    with _reported_errors():
        settings = _settings(set_)
        engine = make_engine(db)
        require_current_schema(engine)
        try:
            if redcap is not None:
                report = import_redcap(engine, study, redcap, actor, settings)
            else:
                report = import_tables(engine, study, sources, actor, settings, title=title)
        except ImportValidationError as error:
            err_console.print(error.report.summary(), highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
    console.print(report.summary(), highlight=False)


@app.command("export")
def export_command(
    study: StudyOption,
    out: Annotated[Path, typer.Option(help="Output folder (csv) or file (redcap).")],
    format_: Annotated[str, typer.Option("--format", help="csv or redcap.")] = "csv",
    db: DbOption = None,
) -> None:
    """Export a study as CSV exchange tables or a REDCap flat record file."""
    from bmetrack.study.db import make_engine, require_current_schema
    from bmetrack.study.exporters import export_frames, write_csv

    with _reported_errors():
        engine = make_engine(db)
        require_current_schema(engine)
        if format_ == "csv":
            for path in write_csv(export_frames(engine, study), out).values():
                console.print(str(path))
        elif format_ == "redcap":
            from bmetrack.study.redcap import export_redcap

            out.parent.mkdir(parents=True, exist_ok=True)
            export_redcap(engine, study).to_csv(out, index=False)
            console.print(str(out))
        else:
            err_console.print(
                f"[bold red]error:[/] --format must be csv or redcap, not {format_!r}."
            )
            raise typer.Exit(2)


@app.command("redcap-dictionary")
def redcap_dictionary(
    out: Annotated[Path | None, typer.Option(help="File to write (default: stdout).")] = None,
) -> None:
    """Write a REDCap data dictionary describing bmetrack's fields."""
    from bmetrack.study.redcap import redcap_data_dictionary

    with _reported_errors():
        text = redcap_data_dictionary().to_csv(index=False)
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text, encoding="utf-8")
        console.print(str(out))


def _cohort_options(
    n_patients: int,
    n_vcf: int | None,
    bme_pain_coupling: float,
    recurrence_probability: float,
) -> Any:
    from bmetrack.simulate.cohort import CohortParameters

    return CohortParameters(
        n_patients=n_patients,
        n_vcf=n_vcf,
        bme_pain_coupling=bme_pain_coupling,
        recurrence_probability=recurrence_probability,
    )


PatientsOption = Annotated[int, typer.Option("--patients", help="Number of patients.", min=1)]
VcfOption = Annotated[
    int | None,
    typer.Option("--vcf", help="Number of treated VCF (default: 89 for 64 patients, scaled)."),
]
SeedOption = Annotated[int, typer.Option(help="Random seed (same seed, same cohort).")]
CouplingOption = Annotated[
    float,
    typer.Option(
        "--bme-pain-coupling",
        help="VAS points added per 25% BME (one extent category) at follow-up; "
        "0 = no relation, as published.",
    ),
]
RecurrenceOption = Annotated[
    float,
    typer.Option(
        "--recurrence-probability", help="Chance that resolved BME returns (0 as published)."
    ),
]


@app.command("simulate")
def simulate_command(
    out: Annotated[Path, typer.Option(help="Folder for the CSV exchange tables.")],
    seed: SeedOption = 2006,
    n_patients: PatientsOption = 64,
    n_vcf: VcfOption = None,
    bme_pain_coupling: CouplingOption = 0.0,
    recurrence_probability: RecurrenceOption = 0.0,
) -> None:
    """Simulate a cohort calibrated to the reference study and write its CSV tables."""
    from bmetrack.simulate.cohort import simulate_cohort
    from bmetrack.study.exporters import write_csv

    with _reported_errors():
        parameters = _cohort_options(n_patients, n_vcf, bme_pain_coupling, recurrence_probability)
        cohort = simulate_cohort(parameters, seed=seed)
        for path in write_csv(cohort.frames, out).values():
            console.print(str(path))


@app.command("report")
def report_command(
    study: StudyOption,
    out: Annotated[Path, typer.Option(help="Output folder.")],
    db: DbOption = None,
    set_: SetOption = None,
    pdf: Annotated[bool, typer.Option(help="Also write report.pdf.")] = True,
) -> None:
    """Run the study analysis and write the report, figures, tables and results.json."""
    from bmetrack.analysis.run import report_from_database
    from bmetrack.study.db import make_engine, require_current_schema

    with _reported_errors():
        engine = make_engine(db)
        require_current_schema(engine)
        files = report_from_database(
            engine, study, out, _settings(set_), write_pdf=pdf, progress=_progress_printer()
        )
    _print_files(files)


@app.command("demo")
def demo_command(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("demo-output"),
    seed: SeedOption = 2006,
    n_patients: PatientsOption = 64,
    bme_pain_coupling: CouplingOption = 0.0,
    recurrence_probability: RecurrenceOption = 0.0,
    pdf: Annotated[bool, typer.Option(help="Also write report.pdf.")] = True,
) -> None:
    """Simulate the reference study, store it in a database and write the full report."""
    from bmetrack.analysis.run import run_demo

    with _reported_errors():
        parameters = _cohort_options(n_patients, None, bme_pain_coupling, recurrence_probability)
        files = run_demo(out, parameters, seed=seed, write_pdf=pdf, progress=_progress_printer())
    _print_files(files)


def _print_files(files: Any) -> None:
    # Plain lines: paths must never be shortened, whatever the terminal width.
    width = max(len(name) for name in files)
    for name, path in files.items():
        typer.echo(f"{name.replace('_', ' '):<{width}}  {path}")


if __name__ == "__main__":  # pragma: no cover
    app()
