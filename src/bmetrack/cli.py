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
    from bmetrack.imaging.errors import ImagingError
    from bmetrack.settings import SettingsError
    from bmetrack.study.analgesics import UnknownDrugError
    from bmetrack.study.db import DatabaseError
    from bmetrack.study.records import RecordNotFoundError, StaleRecordError, ValidationError

    return (
        LevelError,
        ImagingError,
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
    redcap_foreign: Annotated[
        Path | None,
        typer.Option(help="Flat export of another REDCap project (needs the next two)."),
    ] = None,
    redcap_dictionary: Annotated[
        Path | None, typer.Option(help="Data dictionary CSV of that project.")
    ] = None,
    mapping: Annotated[
        Path | None, typer.Option(help="Mapping file (.json, .toml, .yaml) of that project.")
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
    foreign = (redcap_foreign, redcap_dictionary, mapping)
    if any(p is not None for p in foreign) and any(p is None for p in foreign):
        err_console.print(
            "[bold red]error:[/] --redcap-foreign needs --redcap-dictionary and --mapping."
        )
        raise typer.Exit(2)
    if not sources and redcap is None and redcap_foreign is None:
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
            if redcap_foreign is not None and redcap_dictionary and mapping:
                from bmetrack.study.redcap_mapping import import_foreign_redcap

                report = import_foreign_redcap(
                    engine, study, redcap_foreign, redcap_dictionary, mapping, actor, settings
                )
            elif redcap is not None:
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
    images: Annotated[
        bool,
        typer.Option(
            help="Measure BME from synthetic MRI with the built-in segmenter (experimental), "
            "instead of importing the simulated values."
        ),
    ] = False,
    workers: Annotated[int, typer.Option(help="Worker processes for the images.", min=1)] = 2,
    pdf: Annotated[bool, typer.Option(help="Also write report.pdf.")] = True,
) -> None:
    """Simulate the reference study, store it in a database and write the full report."""
    from bmetrack.analysis.run import run_demo

    with _reported_errors():
        parameters = _cohort_options(n_patients, None, bme_pain_coupling, recurrence_probability)
        files = run_demo(
            out,
            parameters,
            seed=seed,
            images=images,
            workers=workers,
            write_pdf=pdf,
            progress=_progress_printer(),
        )
    _print_files(files)


ImageOption = Annotated[
    Path, typer.Option(help="A folder holding one DICOM series, or a NIfTI file (.nii/.nii.gz).")
]
LowestLevelOption = Annotated[
    str | None,
    typer.Option(
        "--lowest-level",
        help="Level of the lowest fully visible body, when the sacrum is not in view (e.g. L3).",
    ),
]


@app.command("quantify")
def quantify_command(
    stir: ImageOption,
    t1: ImageOption,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Write the JSON here (default: stdout).")
    ] = None,
    lowest_level: LowestLevelOption = None,
    overlays: Annotated[
        Path | None, typer.Option(help="Folder for one overlay PNG per vertebra.")
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(
            help="External label map (NIfTI, VerSe integers, e.g. SPINEPS seg-vert) to use "
            "instead of the built-in segmenter."
        ),
    ] = None,
    labels_subregions: Annotated[
        Path | None,
        typer.Option(help="SPINEPS seg-spine map: keeps only the vertebral bodies of --labels."),
    ] = None,
    set_: SetOption = None,
) -> None:
    """Segment, label and measure every vertebral body of one STIR + T1 study."""
    import json

    with _reported_errors():
        study = _measure_study(stir, t1, set_, lowest_level, labels, labels_subregions)
        if overlays is not None:
            from bmetrack.imaging.quantify import write_vertebra_overlays

            write_vertebra_overlays(study, overlays)
    text = json.dumps(study.to_contract_dict(), indent=2) + "\n"
    if json_file is None:
        sys.stdout.write(text)
    else:
        json_file.write_text(text, encoding="utf-8")


def _measure_study(
    stir: Path,
    t1: Path,
    assignments: list[str] | None,
    lowest_level: str | None,
    labels: Path | None = None,
    labels_subregions: Path | None = None,
) -> Any:
    """Read the images (and an optional label map) and measure the study."""
    from bmetrack.imaging.quantify import load_image, quantify_study

    return quantify_study(
        load_image(stir),
        load_image(t1),
        _settings(assignments),
        lowest_level=lowest_level,
        labels=None if labels is None else load_image(labels),
        label_subregions=None if labels_subregions is None else load_image(labels_subregions),
    )


def _export_dicom_form_error(
    folder_options: dict[str, object], database_options: dict[str, object], study: str | None
) -> str | None:
    """Why the options mix or miss the two forms of export-dicom, or None when they are fine."""
    given_folder = [name for name, value in folder_options.items() if value]
    given_database = [name for name, value in database_options.items() if value]
    if study is not None and given_folder:
        return (
            f"{', '.join(given_folder)} (folder form) cannot be combined with --study: the "
            "database form uses each session's filed images and stored settings. Give either "
            "--stir/--t1 or --study."
        )
    if study is None and given_database:
        return f"{', '.join(given_database)} (database form) need --study."
    if study is None and not ({"--stir", "--t1"} <= set(given_folder)):
        return (
            "give --stir and --t1 (measure two series folders), or --study [--db URL] "
            "[--session UID ...] (export the measured sessions stored in the database)."
        )
    return None


@app.command("export-dicom")
def export_dicom_command(
    out: Annotated[Path, typer.Option(help="Folder for seg.dcm and sr.dcm.")],
    stir: Annotated[
        Path | None, typer.Option(help="Folder holding the STIR DICOM series (folder form).")
    ] = None,
    t1: Annotated[
        Path | None, typer.Option(help="Folder holding the T1 DICOM series (folder form).")
    ] = None,
    labels: Annotated[
        Path | None, typer.Option(help="External label map instead of the built-in segmenter.")
    ] = None,
    lowest_level: LowestLevelOption = None,
    set_: SetOption = None,
    study: Annotated[
        str | None,
        typer.Option(
            "--study",
            help="Database form: export every measured imaging session of this study to "
            "OUT/<patient>/<visit date>/.",
        ),
    ] = None,
    session: Annotated[
        list[str] | None,
        typer.Option(
            "--session", metavar="STUDY_UID", help="Only this session (repeatable; --study)."
        ),
    ] = None,
    db: DbOption = None,
    push: Annotated[
        str | None,
        typer.Option("--push", metavar="URL", help="Also store both objects here (STOW-RS)."),
    ] = None,
) -> None:
    """Write a DICOM SEG and a TID 1500 SR: of --stir/--t1, or per session of --study."""
    folder_options: dict[str, object] = {"--stir": stir, "--t1": t1, "--labels": labels}
    folder_options |= {"--lowest-level": lowest_level, "--set": set_}
    database_options: dict[str, object] = {"--db": db, "--session": session}
    problem = _export_dicom_form_error(folder_options, database_options, study)
    if problem is not None:
        err_console.print(f"[bold red]error:[/] {problem}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    if study is not None:
        _export_sessions(study, out, db, session, push)
        return
    assert stir is not None and t1 is not None
    from bmetrack.imaging.dicom_export import write_dicom_exports

    with _reported_errors():
        measured = _measure_study(stir, t1, set_, lowest_level, labels)
        paths = write_dicom_exports(stir, measured, out, t1_folder=t1)
    for name, path in paths.items():
        typer.echo(f"{name}  {path}")
    if push is not None:
        import pydicom

        from bmetrack.pacs.dicomweb import stow_and_check

        result = stow_and_check(push, [pydicom.dcmread(path) for path in paths.values()])
        typer.echo(result.summary())
        if not result.ok:
            raise typer.Exit(1)


def _export_sessions(
    study: str, out: Path, db: str | None, sessions: list[str] | None, push: str | None
) -> None:
    from bmetrack.pacs.session_export import export_sessions
    from bmetrack.study.db import make_engine, require_current_schema

    with _reported_errors():
        engine = make_engine(db)
        require_current_schema(engine)
        report = export_sessions(engine, study, out, session_uids=sessions, push_url=push)
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(1)


@app.command("segment")
def segment_command(
    image: ImageOption,
    out: Annotated[Path, typer.Option(help="Label map to write (.nii.gz).")],
    contrast: Annotated[str, typer.Option(help="t1, t2 or stir.")] = "t1",
    lowest_level: LowestLevelOption = None,
) -> None:
    """Write a label map of the vertebral bodies on the input's grid and print the levels."""
    from bmetrack.imaging.nifti import write_nifti
    from bmetrack.imaging.quantify import load_image
    from bmetrack.imaging.segment import segment_vertebral_bodies

    try:
        with _reported_errors():
            segmentation = segment_vertebral_bodies(
                load_image(image), contrast, lowest_level=lowest_level
            )
            write_nifti(segmentation.labels, out)
    except ValueError as error:  # an unknown --contrast
        err_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    for warning in segmentation.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    typer.echo(" ".join(segmentation.levels))


@app.command("import-dicom")
def import_dicom_command(
    path: Annotated[Path, typer.Argument(help="Folder of DICOM files (e.g. a PACS export).")],
    study: StudyOption,
    db: DbOption = None,
    pseudonym_map: Annotated[
        Path | None,
        typer.Option(help="CSV with columns dicom_patient_id,patient_code."),
    ] = None,
    override: Annotated[
        list[str] | None,
        typer.Option(help="Sequence of a series as SERIES_UID=stir|t1|t2|other (repeatable)."),
    ] = None,
    strict: Annotated[bool, typer.Option(help="Abort (write nothing) on any rejection.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Check and report, write nothing.")] = False,
    actor: ActorOption = "cli",
    set_: SetOption = None,
) -> None:
    """File whole DICOM studies: patient by PatientID (or pseudonym map), visit by date."""
    from bmetrack.settings import parse_assignments
    from bmetrack.study.db import make_engine, require_current_schema
    from bmetrack.study.dicom_import import DicomImportError, import_dicom

    with _reported_errors():
        engine = make_engine(db)
        require_current_schema(engine)
        try:
            report = import_dicom(
                engine,
                study,
                path,
                actor=actor,
                settings=_settings(set_),
                pseudonym_map=pseudonym_map,
                sequence_overrides=parse_assignments(override or []),
                dry_run=dry_run,
                strict=strict,
            )
        except DicomImportError as error:
            err_console.print(error.report.summary(), highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
    typer.echo(report.summary())


UidSecretOption = Annotated[
    str | None,
    typer.Option(
        "--uid-secret",
        envvar="BMETRACK_UID_SECRET",
        help="Secret of the UID remapping (default: the study code); same on every pull.",
    ),
]


def _uid_secret(study: str, given: str | None) -> str:
    """The UID remapping secret (`uid_secret_or_default`), with a warning for the default."""
    from bmetrack.pacs.deidentify import uid_secret_or_default

    if not given:
        err_console.print(
            "[yellow]warning:[/] UIDs are remapped with the study code as the secret: anyone "
            "who knows the code can link the remapped UIDs to the hospital's; set "
            "BMETRACK_UID_SECRET (or --uid-secret) to a secret the site keeps, the same on "
            "every pull",
            highlight=False,
            soft_wrap=True,
        )
    return uid_secret_or_default(given, study)


PseudonymMapOption = Annotated[
    Path | None,
    typer.Option(
        help="CSV with columns dicom_patient_id,patient_code (default: PatientID = code)."
    ),
]


@app.command("pull")
def pull_command(
    study: StudyOption,
    dicomweb: Annotated[
        str | None, typer.Option("--dicomweb", metavar="URL", help="DICOMweb root URL.")
    ] = None,
    dimse: Annotated[
        str | None,
        typer.Option(
            "--dimse", metavar="HOST:PORT:AET", help="PACS for C-FIND + C-MOVE (or C-GET)."
        ),
    ] = None,
    retrieve: Annotated[
        str,
        typer.Option(
            "--retrieve",
            metavar="move|get",
            help="DIMSE retrieval: C-MOVE to our --port, or C-GET over our own association "
            "(when the PACS cannot connect to us).",
        ),
    ] = "move",
    pseudonym_map: PseudonymMapOption = None,
    date_from: Annotated[
        str | None, typer.Option("--from", metavar="DATE", help="First study date.")
    ] = None,
    date_to: Annotated[
        str | None, typer.Option("--to", metavar="DATE", help="Last study date.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for the de-identified files (default: pacs/<study>)."),
    ] = None,
    ae_title: Annotated[str, typer.Option(help="Our AE title (DIMSE).")] = "BMETRACK",
    port: Annotated[int, typer.Option(help="Our C-STORE port the PACS moves to (DIMSE).")] = 11112,
    uid_secret: UidSecretOption = None,
    db: DbOption = None,
    actor: ActorOption = "cli",
    set_: SetOption = None,
) -> None:
    """Fetch the study's MR studies from a PACS, de-identify them (PS3.15) and file them."""
    from bmetrack.pacs.dimse import DimseError
    from bmetrack.pacs.pull import pull_study
    from bmetrack.study.db import make_engine, require_current_schema

    dates = None if date_from is None and date_to is None else (date_from, date_to)
    with _reported_errors():
        engine = make_engine(db)
        require_current_schema(engine)
        try:
            pulled, filed = pull_study(
                engine,
                study,
                out if out is not None else Path("pacs") / study,
                actor=actor,
                dicomweb=dicomweb,
                dimse=dimse,
                pseudonym_map=pseudonym_map,
                dates=dates,
                uid_secret=_uid_secret(study, uid_secret),
                ae_title=ae_title,
                listen_port=port,
                retrieve=retrieve,
                settings=_settings(set_),
            )
        except (DimseError, ValueError, OSError) as error:
            err_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
    typer.echo(pulled.summary())
    typer.echo(filed.summary())


@app.command("listen")
def listen_command(
    study: StudyOption,
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = 11112,
    ae_title: Annotated[str, typer.Option(help="Our AE title.")] = "BMETRACK",
    host: Annotated[
        str, typer.Option(help="Address to listen on (0.0.0.0 for the network).")
    ] = "127.0.0.1",
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for the de-identified files (default: pacs/<study>)."),
    ] = None,
    pseudonym_map: PseudonymMapOption = None,
    uid_secret: UidSecretOption = None,
    db: DbOption = None,
    actor: ActorOption = "listener",
) -> None:
    """Receive DICOM (C-STORE), de-identify it and file each association; Ctrl-C stops."""
    from bmetrack.pacs.dimse import listen
    from bmetrack.study.db import make_engine, require_current_schema
    from bmetrack.study.dicom_import import import_dicom, read_pseudonym_map

    with _reported_errors():
        engine = make_engine(db)
        require_current_schema(engine)
        mapping = None if pseudonym_map is None else read_pseudonym_map(pseudonym_map)

        def file_study(folder: Path, files: list[Path]) -> None:
            try:
                report = import_dicom(engine, study, folder, actor=actor)
            except Exception as error:  # keep listening; the files stay for import-dicom
                err_console.print(f"[red]could not file {folder}:[/] {error}", highlight=False)
                return
            typer.echo(f"{folder}: {len(files)} files; {report.summary()}")

        err_console.print(f"listening as {ae_title} on {host}:{port} (Ctrl-C stops)")
        listen(
            port,
            ae_title,
            out if out is not None else Path("pacs") / study,
            on_study=file_study,
            host=host,
            pseudonym_map=mapping,
            uid_secret=_uid_secret(study, uid_secret),
        )


@app.command("quantify-all")
def quantify_all_command(
    study: StudyOption,
    db: DbOption = None,
    workers: Annotated[int, typer.Option(help="Parallel worker processes.", min=1)] = 1,
    dask: Annotated[
        str | None,
        typer.Option(
            "--dask",
            metavar="ADDRESS",
            help=(
                "Run on the Dask cluster of this scheduler (tcp://host:8786) instead of local "
                "processes (--workers is then ignored). Workers must see the DICOM files and "
                "the overlay folder under the same paths."
            ),
        ),
    ] = None,
    overlays: Annotated[
        Path | None, typer.Option(help="Folder for overlay PNGs (patient/date/level.png).")
    ] = None,
    set_: SetOption = None,
    actor: ActorOption = "pipeline",
) -> None:
    """Measure every filed imaging session that has no automatic measurement yet."""
    from rich.progress import Progress

    from bmetrack.pipeline import quantify_all
    from bmetrack.study.db import make_engine, require_current_schema

    with _reported_errors():
        engine = make_engine(db)
        require_current_schema(engine)
        with Progress(console=err_console, transient=True) as bar:
            task = bar.add_task("measuring imaging sessions", total=None)

            def advance(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            try:
                report = quantify_all(
                    engine,
                    study,
                    settings=_settings(set_),
                    workers=workers,
                    dask_address=dask,
                    overlay_dir=overlays,
                    actor=actor,
                    progress=advance,
                )
            except OSError as error:
                if dask is None:
                    raise
                err_console.print(
                    f"[bold red]error:[/] cannot reach the Dask scheduler at {dask}: {error}. "
                    "Start it (dask scheduler) or check the address.",
                    highlight=False,
                    soft_wrap=True,
                )
                raise typer.Exit(2) from None
    typer.echo(report.summary())
    if report.failed:
        raise typer.Exit(1)


user_app = typer.Typer(help="Users of the web app.", no_args_is_help=True)
app.add_typer(user_app, name="user")


@user_app.command("add")
def user_add(
    username: Annotated[str, typer.Argument(help="Login name (letters, digits, . - _).")],
    role: Annotated[
        str, typer.Option("--role", help="admin, radiologist, data_entry or viewer.")
    ] = "admin",
    db: DbOption = None,
    actor: ActorOption = "cli",
) -> None:
    """Create a web app user (e.g. the first admin); the password is asked twice."""
    from bmetrack.study import db as database
    from bmetrack.study.users import create_user

    password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    with _reported_errors():
        engine = database.make_engine(db)
        database.require_current_schema(engine)
        with database.session_scope(engine) as session:
            create_user(session, username, password, role, actor=actor)
    console.print(f"User {username} ({role}) created.", highlight=False)


@app.command("serve")
def serve(
    db: DbOption = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    access_log: Annotated[
        bool, typer.Option(help="Log every request (turn off under heavy load).")
    ] = True,
) -> None:
    """Serve the web app (log in with a user made by 'bmetrack user add')."""
    import uvicorn

    from bmetrack.web.app import create_app

    with _reported_errors():
        web_app = create_app(db)
    uvicorn.run(web_app, host=host, port=port, log_level="info", access_log=access_log)


def _print_files(files: Any) -> None:
    # Plain lines: paths must never be shortened, whatever the terminal width.
    width = max(len(name) for name in files)
    for name, path in files.items():
        typer.echo(f"{name.replace('_', ' '):<{width}}  {path}")


if __name__ == "__main__":  # pragma: no cover
    app()
