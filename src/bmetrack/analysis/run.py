"""The report workflow shared by the CLI, the demo, the web app and the benchmark.

exchange tables -> tidy tables -> results -> figures -> report files.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import Engine, select

from bmetrack.analysis.analyse import analyse
from bmetrack.analysis.figures import save_figures
from bmetrack.analysis.tables import StudyTables, build_study_tables
from bmetrack.settings import Settings, resolve_settings

__all__ = ["AnalysisRun", "analyse_and_draw", "report_from_database", "run_demo"]

DEMO_STUDY_CODE = "PV-BME-DEMO"
DEMO_STUDY_TITLE = (
    "Bone marrow edema after percutaneous vertebroplasty: simulated cohort calibrated to "
    "Voormolen et al., AJNR 2006"
)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class AnalysisRun:
    tables: StudyTables
    results: dict[str, Any]
    figures: dict[str, Path]


def _quiet(_step: str) -> None:
    return None


def analyse_and_draw(
    frames: Mapping[str, pd.DataFrame],
    figure_dir: Path,
    settings: Settings | None = None,
    *,
    study_code: str = "",
    study_title: str = "",
    progress: Progress | None = None,
) -> AnalysisRun:
    """Tidy tables, every analysis and every figure, from the exchange tables."""
    step = progress or _quiet
    step("building analysis tables")
    tables = build_study_tables(
        frames, settings or resolve_settings(), study_code=study_code, study_title=study_title
    )
    results = analyse(tables, progress=step)
    step("drawing figures")
    figures = save_figures(tables, results, Path(figure_dir))
    return AnalysisRun(tables=tables, results=results, figures=figures)


def report_from_frames(
    frames: Mapping[str, pd.DataFrame],
    out_dir: Path,
    settings: Settings | None = None,
    *,
    study_code: str = "",
    study_title: str = "",
    write_pdf: bool = True,
    progress: Progress | None = None,
) -> dict[str, Path]:
    """Write report.html, report.pdf, figures/, tables/ and results.json into ``out_dir``."""
    from bmetrack.analysis.report import write_report

    step = progress or _quiet
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = analyse_and_draw(
        frames,
        out_dir / "figures",
        settings,
        study_code=study_code,
        study_title=study_title,
        progress=step,
    )
    step("writing the report")
    files = write_report(
        run.results, run.figures, out_dir, tables=run.tables.as_frames(), write_pdf=write_pdf
    )
    return {**files.as_dict(), "figures": out_dir / "figures"}


def report_from_database(
    engine: Engine,
    study_code: str,
    out_dir: Path,
    settings: Settings | None = None,
    *,
    write_pdf: bool = True,
    progress: Progress | None = None,
) -> dict[str, Path]:
    """Export a study from the database and write its report."""
    from bmetrack.study.db import session_scope
    from bmetrack.study.exporters import export_frames
    from bmetrack.study.models import Study

    with session_scope(engine) as session:
        study = session.scalar(select(Study).where(Study.code == study_code))
        if study is None:
            codes = session.scalars(select(Study.code)).all()
            msg = (
                f"No study {study_code!r} in the database; studies there: "
                f"{', '.join(codes) or 'none'}. Import data with 'bmetrack import --study ...'."
            )
            raise KeyError(msg)
        title = study.title
    (progress or _quiet)("reading the database")
    frames = export_frames(engine, study_code)
    return report_from_frames(
        frames,
        out_dir,
        settings,
        study_code=study_code,
        study_title=title,
        write_pdf=write_pdf,
        progress=progress,
    )


def run_demo(
    out_dir: Path,
    parameters: Any = None,
    *,
    seed: int = 2006,
    images: bool = False,
    workers: int = 2,
    write_pdf: bool = True,
    progress: Progress | None = None,
) -> dict[str, Path]:
    """Simulate the reference study and run the whole chain into ``out_dir``.

    With ``images``, the clinical tables are imported from CSV,
    a synthetic STIR + T1 DICOM study is written for every imaged visit, filed
    with ``import-dicom`` and measured with ``quantify-all``, so the report's
    BME numbers come from the images. Without (the default until the built-in
    segmenter meets its accuracy targets), the simulated measurements are
    imported from CSV as well. Either way the files go through the same
    importers a user's files do.
    """
    from bmetrack.simulate.cohort import simulate_cohort
    from bmetrack.study import db
    from bmetrack.study.exporters import write_csv
    from bmetrack.study.importers import import_tables

    step = progress or _quiet
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    step("simulating the cohort")
    cohort = simulate_cohort(parameters, seed=seed)
    csv_paths = write_csv(cohort.frames, out_dir / "input")
    database_path = out_dir / "study.db"
    database_path.unlink(missing_ok=True)
    engine = db.make_engine(database_path)
    step("creating the database")
    db.upgrade(engine)
    step("importing the CSV files")
    if images:
        csv_paths = {name: path for name, path in csv_paths.items() if name != "measurements"}
    import_tables(engine, DEMO_STUDY_CODE, csv_paths, "demo", title=DEMO_STUDY_TITLE)
    files: dict[str, Path] = {"database": database_path, "input_csv": out_dir / "input"}
    if images:
        files |= _demo_images(engine, cohort, out_dir, workers, step)
    files |= report_from_database(
        engine, DEMO_STUDY_CODE, out_dir, write_pdf=write_pdf, progress=progress
    )
    engine.dispose()
    return files


def _demo_images(
    engine: Engine, cohort: Any, out_dir: Path, workers: int, step: Progress
) -> dict[str, Path]:
    """Synthetic DICOM -> import-dicom -> quantify-all, with the phantom truth beside it."""
    import shutil

    from bmetrack.pipeline import quantify_all
    from bmetrack.simulate.images import write_cohort_dicom
    from bmetrack.study.dicom_import import import_dicom

    dicom_dir = out_dir / "dicom"
    shutil.rmtree(dicom_dir, ignore_errors=True)
    step("writing synthetic MRI (STIR + T1 DICOM) for every imaged visit")
    images = write_cohort_dicom(cohort, dicom_dir, workers=workers)
    truth_path = out_dir / "tables" / "phantom_truth.csv"
    truth_path.parent.mkdir(parents=True, exist_ok=True)
    images.truth.to_csv(truth_path, index=False)
    step(f"filing {images.n_studies} DICOM studies")
    import_dicom(engine, DEMO_STUDY_CODE, dicom_dir, actor="demo")
    step("measuring BME, cement and deformity from the images")
    overlay_dir = out_dir / "overlays"
    shutil.rmtree(overlay_dir, ignore_errors=True)
    report = quantify_all(
        engine, DEMO_STUDY_CODE, workers=workers, overlay_dir=overlay_dir, actor="demo"
    )
    if report.failed:
        step(report.summary())
    return {"dicom": dicom_dir, "overlays": overlay_dir, "phantom_truth": truth_path}
