"""quantify-all on a real loopback Dask cluster (a scheduler and two worker processes
started by the test): killing one worker process midway loses no study, half-stores none,
and a rerun does exactly what is left."""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from bmetrack.cli import app
from bmetrack.pipeline import measure_session, pending_sessions, quantify_all
from bmetrack.settings import resolve_settings
from bmetrack.simulate.phantom import PhantomParameters, phantom_for_visit
from bmetrack.study import db
from bmetrack.study.db import session_scope
from bmetrack.study.dicom_import import import_dicom
from bmetrack.study.importers import import_tables
from bmetrack.study.models import VertebraMeasurement

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.slow

N_PATIENTS = 10  # x 2 visits = 20 studies
PROCEDURE = dt.date(2021, 3, 1)
VISITS = [(0, 0, 55.0, 0.0), (92, 3, 25.0, 3.0)]  # days after PV, month, BME %, cement ml
# A quarter of the clinical in-plane matrix over the same field of view: ~1 s per study.
SMALL = PhantomParameters(n_rows=128, n_columns=128, pixel_spacing_mm=2.4, sacrum_in_view=True)
START_TIMEOUT_S = 60


def _write_study(task: tuple[str, int, int, float, float, str]) -> None:
    code, days, month, bme, cement, folder = task
    phantom = phantom_for_visit(
        [{"level": "L1", "bme_percent": bme, "cement_volume_ml": cement}],
        month,
        seed=1000 + int(code[1:]),
        params=SMALL,
    )
    date = PROCEDURE + dt.timedelta(days=days)
    phantom.write_dicom(
        Path(folder) / code / str(month), patient_id=code, study_date=f"{date:%Y%m%d}"
    )


def _filed(root: Path, n_patients: int, visits: list[tuple[int, int, float, float]]):
    """A migrated SQLite database with the patients' DICOM studies filed."""
    engine = db.make_engine(root / "study.db")
    db.upgrade(engine)
    codes = [f"P{i:02d}" for i in range(n_patients)]
    import_tables(
        engine,
        "S",
        {
            "patients": pd.DataFrame({"patient_code": codes, "sex": ["F"] * n_patients}),
            "procedures": pd.DataFrame(
                {
                    "patient_code": codes,
                    "procedure_date": [PROCEDURE] * n_patients,
                    "procedure_type": ["vertebroplasty"] * n_patients,
                    "level": ["L1"] * n_patients,
                }
            ),
        },
        "test",
    )
    tasks = [(code, *visit, str(root / "dicom")) for code in codes for visit in visits]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # fork: the children already hold this module, nothing to re-import.
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
            list(pool.map(_write_study, tasks))
    report = import_dicom(engine, "S", root / "dicom", actor="test")
    assert len(report.by_status("created")) == len(tasks), report.summary()
    return engine


@pytest.fixture(scope="module")
def filed_db(tmp_path_factory):
    """10 patients x 2 visits = 20 filed studies."""
    root = tmp_path_factory.mktemp("dask_pipeline")
    return _filed(root, N_PATIENTS, VISITS), root


def _dask_command(*args: str) -> list[str]:
    return [sys.executable, "-c", "from dask.cli import run_cli; run_cli()", *args]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, request):
    """A scheduler and two single-threaded worker processes (no nanny, so a killed worker
    stays dead) on 127.0.0.1; returns the address and the worker processes."""
    folder = tmp_path_factory.mktemp("dask_cluster")
    scheduler_file = folder / "scheduler.json"
    processes: list[subprocess.Popen[bytes]] = []

    def stop() -> None:
        for process in reversed(processes):
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    request.addfinalizer(stop)
    log = (folder / "cluster.log").open("wb")
    processes.append(
        subprocess.Popen(
            _dask_command(
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                str(scheduler_file),
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while not scheduler_file.exists() or not scheduler_file.read_text().strip():
        assert processes[0].poll() is None, "the Dask scheduler exited at start"
        assert time.monotonic() < deadline, "the Dask scheduler did not start"
        time.sleep(0.2)
    address = json.loads(scheduler_file.read_text())["address"]
    workers = []
    for i in range(2):
        worker = subprocess.Popen(
            _dask_command(
                "worker",
                address,
                "--host",
                "127.0.0.1",
                "--nthreads",
                "1",
                "--no-nanny",
                "--no-dashboard",
                "--name",
                f"w{i}",
                "--local-directory",
                str(folder / f"w{i}"),
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        processes.append(worker)
        workers.append(worker)
    with distributed.Client(address, timeout=START_TIMEOUT_S) as client:
        client.wait_for_workers(2, timeout=START_TIMEOUT_S)
    return address, workers


def _rows_per_session(engine) -> Counter[int]:
    with session_scope(engine) as session:
        return Counter(session.scalars(select(VertebraMeasurement.imaging_session_id)))


def test_killed_worker_loses_no_study_and_a_rerun_does_the_rest(filed_db, cluster):
    engine, root = filed_db
    address, workers = cluster
    jobs = pending_sessions(engine, "S")
    assert len(jobs) == 2 * N_PATIENTS
    all_ids = {job.imaging_session_id for job in jobs}
    killed: dict[str, object] = {}

    def kill_a_busy_worker(done: int, total: int) -> None:
        # After the first few studies are finished, SIGKILL a worker process that is in
        # the middle of a study (no nanny: it does not come back).
        if killed or done < 3:
            return
        with distributed.Client(address, timeout=START_TIMEOUT_S) as monitor:
            busy = {addr for addr, keys in monitor.processing().items() if keys}
            pids = monitor.run(os.getpid)  # worker address -> process id
        by_pid = {pid: addr for addr, pid in pids.items()}
        victim = next((w for w in workers if by_pid.get(w.pid) in busy), workers[0])
        killed["busy"] = by_pid.get(victim.pid) in busy
        killed["done"] = done
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=10)

    report = quantify_all(
        engine, "S", dask_address=address, retries=1, progress=kill_a_busy_worker, actor="dask"
    )
    assert killed, "the progress callback never ran"
    assert killed["done"] < len(jobs), "the worker was killed after the run was over"
    assert killed["busy"], "the killed worker held no running study"
    assert sum(w.poll() is None for w in workers) == 1

    measured = {job.imaging_session_id for job in report.measured}
    failed = {job.imaging_session_id for job, _ in report.failed}
    # Every study is accounted for exactly once: stored or reported, none lost.
    assert measured.isdisjoint(failed)
    assert measured | failed == all_ids
    assert len(report.measured) + len(report.failed) == len(jobs)
    assert all(error for _, error in report.failed)
    # Nothing half-stored: exactly the measured sessions have rows, and their row count is
    # what the report counted.
    rows = _rows_per_session(engine)
    assert set(rows) == measured
    assert sum(rows.values()) == report.n_measurements
    # All vertebrae of a session are there: re-measure one stored session here, in this
    # process, and count its named levels.
    if report.measured:
        job = report.measured[0]
        again = measure_session(job, resolve_settings().to_dict())
        assert again.error is None, again.error
        named = [v for v in again.measurements["vertebrae"] if not v["level"].startswith("V")]
        assert rows[job.imaging_session_id] == len(named)
    # What is left to do is exactly what failed.
    assert {job.imaging_session_id for job in pending_sessions(engine, "S")} == failed

    # A rerun through the command line, on the surviving worker, tries only the failed
    # sessions and leaves the stored ones alone.
    engine.dispose()
    result = CliRunner().invoke(
        app,
        ["quantify-all", "--study", "S", "--db", str(root / "study.db"), "--dask", address],
        catch_exceptions=False,
    )
    summary = re.search(
        r"(\d+) imaging sessions measured, (\d+) vertebrae stored, (\d+) failed", result.output
    )
    assert summary, result.output
    rerun_measured, rerun_rows, rerun_failed = map(int, summary.groups())
    assert rerun_measured + rerun_failed == len(failed)
    assert result.exit_code == (1 if rerun_failed else 0)
    after = _rows_per_session(engine)
    assert {key: after[key] for key in rows} == dict(rows)  # stored sessions untouched
    assert sum(after.values()) - sum(rows.values()) == rerun_rows
    assert len(set(after) - measured) == rerun_measured
    left = {job.imaging_session_id for job in pending_sessions(engine, "S")}
    assert len(left) == rerun_failed
    assert left == all_ids - set(after)


def test_killed_local_pool_worker_is_retried_in_a_fresh_pool(tmp_path, monkeypatch):
    """The same guarantee for --workers N: a pool process killed mid-study breaks the
    process pool; its studies are retried in a new pool and none is lost."""
    import bmetrack.imaging.quantify as quantify_module

    if multiprocessing.get_start_method() != "fork":
        pytest.skip("the patched measurement reaches pool processes only when they are forked")
    engine = _filed(tmp_path, 3, VISITS[:1])
    marker = tmp_path / "killed-once"
    real = quantify_module.quantify_study

    def dies_once(*args, **kwargs):
        # Runs in a forked pool process, which inherits this patch.
        if not marker.exists():
            marker.write_text("")
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    monkeypatch.setattr(quantify_module, "quantify_study", dies_once)
    jobs = pending_sessions(engine, "S")
    report = quantify_all(engine, "S", workers=2, retries=1)
    assert marker.exists()
    measured = {job.imaging_session_id for job in report.measured}
    failed = {job.imaging_session_id for job, _ in report.failed}
    assert measured.isdisjoint(failed)
    assert measured | failed == {job.imaging_session_id for job in jobs}
    assert not any("worker failed" in error for _, error in report.failed)
    assert set(_rows_per_session(engine)) == measured
    assert {job.imaging_session_id for job in pending_sessions(engine, "S")} == failed
