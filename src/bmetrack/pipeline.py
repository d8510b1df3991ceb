"""Measure every filed imaging session not yet measured, and store the results.

Each study is read, segmented and quantified in a worker of a
``concurrent.futures`` Executor (a local process pool, a Dask cluster given by
its scheduler address, or any Executor with the same interface), and stored by
the parent in its own transaction as soon as it is done. A study that fails,
or whose worker dies, is retried and then reported; nothing of it is stored,
so a rerun picks it up again, and a rerun skips every session that already
has automatic measurements.
"""

from __future__ import annotations

import traceback
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import (
    FIRST_COMPLETED,
    BrokenExecutor,
    Executor,
    Future,
    ProcessPoolExecutor,
    wait,
)
from contextlib import contextmanager
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
    "quantify_job",
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

    @classmethod
    def of(cls, imaging: Any, visit: Any, patient_code: str, study_code: str) -> SessionJob:
        """The job of a stored `ImagingSession` row and its `Visit`."""
        return cls(
            imaging_session_id=imaging.id,
            study_code=study_code,
            patient_code=patient_code,
            visit_date=visit.visit_date.isoformat(),
            nominal_month=visit.nominal_month,
            source_path=imaging.source_path,
            stir_series_uid=str(imaging.stir_series_uid or ""),
            t1_series_uid=str(imaging.t1_series_uid or ""),
        )


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
            SessionJob.of(imaging, visit, code, study_code)
            for imaging, visit, code in session.execute(query)
        ]


def _failure_detail(error: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(error), error)).strip()


def quantify_job(job: SessionJob, settings: Settings) -> Any:
    """Read the session's STIR and T1 from where import-dicom filed them and measure them.

    Returns the `bmetrack.imaging.quantify.StudyQuantification` (masks included).
    """
    from bmetrack.imaging.dicom import read_series
    from bmetrack.imaging.quantify import quantify_study

    stir = read_series(job.source_path, series_uid=job.stir_series_uid)
    t1 = read_series(job.source_path, series_uid=job.t1_series_uid)
    return quantify_study(stir, t1, settings)


def measure_session(
    job: SessionJob, settings_values: dict[str, Any], overlay_dir: str | None = None
) -> SessionResult:
    """Worker side: read both series, quantify, optionally write overlays. Never raises."""
    try:
        from bmetrack.imaging.quantify import write_vertebra_overlays

        study = quantify_job(job, resolve_settings(settings_values))
        overlays: dict[str, str] = {}
        if overlay_dir is not None:
            month = "" if job.nominal_month is None else f"month {job.nominal_month}"
            folder = Path(overlay_dir) / job.patient_code / job.visit_date
            written = write_vertebra_overlays(study, folder, caption=month)
            overlays = {level: str(path) for level, path in written.items()}
        return SessionResult(job, study.to_contract_dict(), overlays)
    except Exception as error:  # a worker reports every failure; the parent decides
        return SessionResult(job, error=_failure_detail(error))


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


@contextmanager
def _executor_for(
    workers: int, executor: Executor | None, dask_address: str | None
) -> Iterator[tuple[Executor | None, Callable[[], Executor] | None]]:
    """The executor to submit to (None: run in this process) and, for a pool this function
    owns, how to make a fresh one when a worker death broke it."""
    if executor is not None:
        yield executor, None
    elif dask_address is not None:
        try:
            from distributed import Client
        except ImportError as error:  # pragma: no cover - the extra is not installed
            msg = (
                f"dask_address={dask_address!r} needs Dask distributed; install "
                "bmetrack[dask] or run with local workers instead"
            )
            raise ImportError(msg) from error
        client = Client(dask_address)
        try:
            # pure=False: a retried job must get a new task key, not the erred future.
            yield client.get_executor(pure=False), None
        finally:
            client.close()
    elif workers <= 1:
        yield None, None
    else:
        pools = [ProcessPoolExecutor(max_workers=workers)]

        def fresh() -> Executor:
            pools[-1].shutdown(wait=False, cancel_futures=True)
            pools.append(ProcessPoolExecutor(max_workers=workers))
            return pools[-1]

        try:
            yield pools[0], fresh
        finally:
            pools[-1].shutdown(wait=True, cancel_futures=True)


def quantify_all(
    engine: Engine,
    study_code: str,
    *,
    settings: Settings | None = None,
    workers: int = 1,
    executor: Executor | None = None,
    dask_address: str | None = None,
    overlay_dir: Path | None = None,
    retries: int = 1,
    actor: str = "pipeline",
    progress: Callable[[int, int], None] | None = None,
) -> PipelineReport:
    """Measure every pending session of a study and store the results.

    Each result is stored (one transaction per imaging session) as soon as it
    arrives, so an interrupted run keeps what was done and a rerun does the rest.

    Parameters
    ----------
    engine : sqlalchemy.Engine
        The study database.
    study_code : str
        The study whose pending sessions (see `pending_sessions`) are measured.
    settings : Settings, optional
        Method settings (defaults of METHOD.md when omitted).
    workers : int
        Size of the local process pool (1 runs in this process).  Ignored when
        `executor` or `dask_address` is given.
    executor : concurrent.futures.Executor, optional
        Use this executor instead (e.g. a Dask ``Client.get_executor(pure=False)``).
    dask_address : str, optional
        Address of a Dask scheduler (``tcp://host:8786``): connect a client, run
        the jobs on the cluster's workers and close the client afterwards.  The
        workers need bmetrack installed and must see the DICOM files (and
        `overlay_dir`) under the same paths.
    overlay_dir : pathlib.Path, optional
        Folder for overlay PNGs (``patient/date/level.png``).
    retries : int
        How many more times a failed study is tried before it is reported.  A
        worker that dies (a killed process, a Dask ``KilledWorker``) counts as a
        failed try.  A result the database refuses as invalid (e.g. no level
        could be named) is reported at once: measuring again gives the same.
    actor : str
        Recorded as the creator of the measurements and in the audit trail.
    progress : callable, optional
        Called as ``progress(done, total)`` each time a session is finished,
        i.e. stored or finally reported failed.

    Returns
    -------
    PipelineReport
        Every pending session ends up in exactly one of ``measured`` and ``failed``.
    """
    if executor is not None and dask_address is not None:
        msg = (
            f"executor={executor!r} and dask_address={dask_address!r} were both given; "
            "pass only one"
        )
        raise ValueError(msg)
    if retries < 0:
        msg = f"retries={retries} is negative; give 0 (no retry) or more"
        raise ValueError(msg)
    settings = settings or resolve_settings()
    jobs = pending_sessions(engine, study_code)
    report = PipelineReport()
    if not jobs:
        return report
    values = settings.to_dict()
    overlay = None if overlay_dir is None else str(overlay_dir)
    tries: dict[int, int] = {}
    done = 0

    def finish(job: SessionJob, error: str | None = None) -> None:
        nonlocal done
        if error is not None:
            report.failed.append((job, error))
        done += 1
        if progress:
            progress(done, len(jobs))

    def handle(result: SessionResult) -> SessionJob | None:
        """Store or record one result; returns the job when it is to be tried again."""
        job = result.job
        tries[job.imaging_session_id] = tries.get(job.imaging_session_id, 0) + 1
        retry = tries[job.imaging_session_id] <= retries
        error = result.error
        if error is None:
            try:
                notes = _store(engine, result, settings, actor)
            except ValueError as invalid:  # deterministic: measuring again gives the same
                finish(job, f"storing failed: {invalid}")
                return None
            except Exception as failure:  # stored nothing (one transaction); try again
                error = f"storing failed: {_failure_detail(failure)}"
            else:
                report.skipped_levels += notes
                report.measured.append(job)
                report.n_measurements += sum(
                    not v["level"].startswith("V") for v in (result.measurements or {})["vertebrae"]
                )
                finish(job)
                return None
        if retry:
            return job
        finish(job, error)
        return None

    with _executor_for(workers, executor, dask_address) as (pool, fresh_pool):
        if pool is None:
            queue = deque(jobs)
            while queue:
                again = handle(measure_session(queue.popleft(), values, overlay))
                if again is not None:
                    queue.append(again)
            return report

        def submit(job: SessionJob) -> Future[SessionResult]:
            nonlocal pool
            assert pool is not None
            try:
                return pool.submit(measure_session, job, values, overlay)
            except BrokenExecutor:  # a local worker died and took the pool with it
                if fresh_pool is None:
                    raise
                pool = fresh_pool()
                return pool.submit(measure_session, job, values, overlay)

        pending = {submit(job): job for job in jobs}
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    job = pending.pop(future)
                    try:
                        result = future.result()
                    except Exception as error:  # worker died (KilledWorker, broken pool)
                        detail = f"worker failed: {_failure_detail(error)}"
                        result = SessionResult(job, error=detail)
                    again = handle(result)
                    if again is not None:
                        pending[submit(again)] = again
        finally:
            for future in pending:  # interrupted: leave nothing running for this run
                future.cancel()
    return report
