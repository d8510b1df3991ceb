"""Measure every filed imaging session not yet measured, and store the results.

Each study is read, segmented and quantified in a worker of a
``concurrent.futures`` Executor (a local process pool by default; any Executor
with the same interface, such as a Dask client's, works), and stored by the
parent in its own transaction as soon as it is done. A study that fails is
reported and retried; nothing of it is stored, so a rerun picks it up again,
and a rerun skips every session that already has automatic measurements.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, exists, select

from bmetrack.settings import Settings, resolve_settings

__all__ = [
    "PipelineReport",
    "SessionJob",
    "SessionResult",
    "measure_session",
    "pending_sessions",
    "quantify_all",
]

METHOD_NAME = "bmetrack.quantify"


@dataclass(frozen=True)
class SessionJob:
    """One imaging session to measure; plain data, so it pickles to any worker."""

    imaging_session_id: int
    study_code: str
    patient_code: str
    visit_date: str
    nominal_month: int | None
    source_path: str
    stir_series_uid: str
    t1_series_uid: str


@dataclass(frozen=True)
class SessionResult:
    """What a worker sends back: the contract dict or the error."""

    job: SessionJob
    measurements: dict[str, Any] | None = None
    overlays: dict[str, str] = field(default_factory=dict)
    error: str | None = None


@dataclass
class PipelineReport:
    measured: list[SessionJob] = field(default_factory=list)
    failed: list[tuple[SessionJob, str]] = field(default_factory=list)
    skipped_levels: list[str] = field(default_factory=list)
    n_measurements: int = 0

    def summary(self) -> str:
        lines = [
            f"{len(self.measured)} imaging sessions measured, {self.n_measurements} vertebrae "
            f"stored, {len(self.failed)} failed."
        ]
        lines += [
            f"  failed: patient {job.patient_code}, {job.visit_date}: {error.splitlines()[0]}"
            for job, error in self.failed
        ]
        lines += [f"  note: {text}" for text in self.skipped_levels]
        return "\n".join(lines)


def pending_sessions(engine: Engine, study_code: str) -> list[SessionJob]:
    """Sessions of the study with STIR and T1 and no automatic measurement yet."""
    from bmetrack.study.db import session_scope
    from bmetrack.study.models import (
        ImagingSession,
        MeasurementSource,
        Patient,
        Study,
        VertebraMeasurement,
        Visit,
    )

    measured = exists().where(
        VertebraMeasurement.imaging_session_id == ImagingSession.id,
        VertebraMeasurement.source == MeasurementSource.AUTOMATIC,
    )
    query = (
        select(ImagingSession, Visit, Patient.code)
        .join(Visit, ImagingSession.visit_id == Visit.id)
        .join(Patient, Visit.patient_id == Patient.id)
        .join(Study, Patient.study_id == Study.id)
        .where(
            Study.code == study_code,
            ImagingSession.stir_series_uid.is_not(None),
            ImagingSession.t1_series_uid.is_not(None),
            ~measured,
        )
        .order_by(Patient.code, Visit.visit_date)
    )
    with session_scope(engine) as session:
        return [
            SessionJob(
                imaging_session_id=imaging.id,
                study_code=study_code,
                patient_code=code,
                visit_date=visit.visit_date.isoformat(),
                nominal_month=visit.nominal_month,
                source_path=imaging.source_path,
                stir_series_uid=str(imaging.stir_series_uid),
                t1_series_uid=str(imaging.t1_series_uid),
            )
            for imaging, visit, code in session.execute(query)
        ]


def measure_session(
    job: SessionJob, settings_values: dict[str, Any], overlay_dir: str | None = None
) -> SessionResult:
    """Worker side: read both series, quantify, optionally write overlays. Never raises."""
    try:
        from bmetrack.imaging.dicom import read_series
        from bmetrack.imaging.quantify import quantify_study, write_vertebra_overlays

        settings = resolve_settings(settings_values)
        stir = read_series(job.source_path, series_uid=job.stir_series_uid)
        t1 = read_series(job.source_path, series_uid=job.t1_series_uid)
        study = quantify_study(stir, t1, settings)
        overlays: dict[str, str] = {}
        if overlay_dir is not None:
            month = "" if job.nominal_month is None else f"month {job.nominal_month}"
            folder = Path(overlay_dir) / job.patient_code / job.visit_date
            written = write_vertebra_overlays(study, folder, caption=month)
            overlays = {level: str(path) for level, path in written.items()}
        return SessionResult(job, study.to_contract_dict(), overlays)
    except Exception as error:  # a worker reports every failure; the parent decides
        detail = "".join(traceback.format_exception_only(type(error), error)).strip()
        return SessionResult(job, error=detail)


def _store(engine: Engine, result: SessionResult, settings: Settings, actor: str) -> list[str]:
    """Store one study's vertebrae in one transaction; returns notes on skipped bodies."""
    from bmetrack.study.db import session_scope
    from bmetrack.study.models import Patient, Study
    from bmetrack.study.records import NewMeasurement, add_measurements

    assert result.measurements is not None
    job = result.job
    contract = result.measurements
    provenance = contract.get("provenance", {})
    version = f"{METHOD_NAME} {provenance.get('bmetrack_version', '')}".strip()
    notes = []
    with session_scope(engine) as session:
        patient = session.scalar(
            select(Patient)
            .join(Study)
            .where(Patient.code == job.patient_code, Study.code == job.study_code)
        )
        assert patient is not None
        items = []
        for vertebra in contract["vertebrae"]:
            if vertebra["level"].startswith("V"):
                notes.append(
                    f"patient {job.patient_code} {job.visit_date}: {vertebra['level']} has no "
                    "level name (no sacrum in view and no anchor); not stored."
                )
                continue
            heights = vertebra["heights_mm"]
            items.append(
                NewMeasurement(
                    patient=patient,
                    visit_date=job.visit_date,
                    level=vertebra["level"],
                    measures={
                        "bme_percent": vertebra["bme_percent"],
                        "body_volume_ml": vertebra["body_volume_ml"],
                        "edema_volume_ml": vertebra["edema_volume_ml"],
                        "cement_volume_ml": vertebra["cement_volume_ml"],
                        "rim_volume_ml": vertebra["rim_volume_ml"],
                        "height_anterior_mm": heights.get("anterior"),
                        "height_middle_mm": heights.get("middle"),
                        "height_posterior_mm": heights.get("posterior"),
                        "height_loss_percent": vertebra["height_loss_percent"],
                        "genant_grade": vertebra["genant_grade"],
                        "deformity": vertebra["deformity"],
                    },
                    source="automatic",
                    method_version=version,
                    settings_json={
                        "settings": settings.to_dict(),
                        "provenance": provenance,
                        "reference": contract.get("reference", {}),
                        "warnings": contract.get("warnings", []),
                        "overlay": result.overlays.get(vertebra["level"], ""),
                    },
                    input_series_uids=(job.stir_series_uid, job.t1_series_uid),
                    imaging_session_id=job.imaging_session_id,
                    created_by=actor,
                )
            )
        if not items:
            msg = (
                "no vertebral level could be named (no sacrum in view, no anchor); measure it "
                "with an external label map or with the lowest level given"
            )
            raise ValueError(msg)
        add_measurements(session, items, actor=actor, settings=settings)
    return notes


def quantify_all(
    engine: Engine,
    study_code: str,
    *,
    settings: Settings | None = None,
    workers: int = 1,
    executor: Executor | None = None,
    overlay_dir: Path | None = None,
    retries: int = 1,
    actor: str = "pipeline",
    progress: Callable[[int, int], None] | None = None,
) -> PipelineReport:
    """Measure every pending session of a study and store the results.

    Parameters
    ----------
    workers : int
        Size of the local process pool (1 runs in this process).
    executor : concurrent.futures.Executor, optional
        Use this executor instead (e.g. a Dask ``Client.get_executor()``).
    retries : int
        How many more times a failed study is tried before it is reported.
    """
    settings = settings or resolve_settings()
    jobs = pending_sessions(engine, study_code)
    report = PipelineReport()
    values = settings.to_dict()
    overlay = None if overlay_dir is None else str(overlay_dir)
    done = 0

    def run(batch: Iterable[SessionJob]) -> list[SessionResult]:
        batch = list(batch)
        if executor is None and workers <= 1:
            return [measure_session(job, values, overlay) for job in batch]
        pool = executor or ProcessPoolExecutor(max_workers=workers)
        try:
            futures: list[Future[SessionResult]] = [
                pool.submit(measure_session, job, values, overlay) for job in batch
            ]
            results = []
            for future in as_completed(futures):
                try:
                    results.append(future.result())
                except Exception as error:  # a worker died: its job is retried below
                    job = batch[futures.index(future)]
                    results.append(SessionResult(job, error=f"worker failed: {error}"))
            return results
        finally:
            if executor is None:
                pool.shutdown()

    remaining = jobs
    for attempt in range(retries + 1):
        failed: list[SessionResult] = []
        for result in run(remaining):
            if result.error is None:
                try:
                    report.skipped_levels += _store(engine, result, settings, actor)
                except Exception as error:  # stored nothing: report it, rerun picks it up
                    failed.append(SessionResult(result.job, error=f"storing failed: {error}"))
                    continue
                report.measured.append(result.job)
                report.n_measurements += sum(
                    not v["level"].startswith("V") for v in (result.measurements or {})["vertebrae"]
                )
                done += 1
                if progress:
                    progress(done, len(jobs))
            else:
                failed.append(result)
        remaining = [result.job for result in failed]
        if not remaining or attempt == retries:
            report.failed = [(result.job, result.error or "") for result in failed]
            break
    return report
