"""Benchmark: throughput of ``quantify-all`` with 1 and 2 local workers and on a loopback
Dask cluster (scheduler + 2 single-threaded worker processes), and the per-study cost.

N phantom studies (STIR + T1 DICOM, default the demo matrix 256 x 256 x 15) are generated
once and filed by ``import_dicom`` into a template SQLite database; every configuration then
runs `bmetrack.pipeline.quantify_all` (with overlay PNGs) on its own copy of that database.
Per configuration: wall time, studies per minute (stored + reported failed, i.e. processed),
and, for the in-process run, the CPU seconds per study (``time.process_time``, which a busy
machine does not inflate the way it inflates wall time).  Scaling efficiency is
``throughput(2) / (2 * throughput(1))``.  Storage per study (DICOM, database growth,
overlays) and the peak resident memory of a worker process measuring one study are
recorded too, and optionally the same for one study at the clinical matrix (512 x 512).

Usage: python benchmarks/pipeline_scaling.py [--n-studies 8] [--matrix 256]
       [--no-clinical-probe] [--out benchmarks/results/pipeline_scaling.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import platform
import resource
import shutil
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "pipeline_scaling.json"
PROCEDURE = dt.date(2021, 3, 1)
STUDY = "BENCH"
FIRST_SEED = 7000


def _params(matrix: int) -> Any:
    from bmetrack.simulate.phantom import PhantomParameters

    # Same field of view as a clinical 512 x 512 scan at 0.6 mm.
    return PhantomParameters(
        n_rows=matrix, n_columns=matrix, pixel_spacing_mm=0.6 * 512 / matrix, sacrum_in_view=True
    )


def _write_study(task: tuple[str, int, str, int]) -> None:
    from bmetrack.simulate.phantom import phantom_for_visit

    code, seed, folder, matrix = task
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        phantom = phantom_for_visit(
            [{"level": "L1", "bme_percent": 40.0}], 0, seed=seed, params=_params(matrix)
        )
        phantom.write_dicom(Path(folder) / code, patient_id=code, study_date=f"{PROCEDURE:%Y%m%d}")


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _build(root: Path, n_studies: int, matrix: int, workers: int) -> Path:
    """Phantom DICOM for n patients (one study each), filed into a template database."""
    from bmetrack.study import db
    from bmetrack.study.dicom_import import import_dicom
    from bmetrack.study.importers import import_tables

    codes = [f"B{i:03d}" for i in range(n_studies)]
    tasks = [(code, FIRST_SEED + i, str(root / "dicom"), matrix) for i, code in enumerate(codes)]
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        list(pool.map(_write_study, tasks))
    path = root / "template.db"
    engine = db.make_engine(path)
    db.upgrade(engine)
    import_tables(
        engine,
        STUDY,
        {
            "patients": pd.DataFrame({"patient_code": codes, "sex": ["F"] * n_studies}),
            "procedures": pd.DataFrame(
                {
                    "patient_code": codes,
                    "procedure_date": [PROCEDURE] * n_studies,
                    "procedure_type": ["vertebroplasty"] * n_studies,
                    "level": ["L1"] * n_studies,
                }
            ),
        },
        "benchmark",
    )
    report = import_dicom(engine, STUDY, root / "dicom", actor="benchmark")
    created = len(report.by_status("created"))
    if created != n_studies:
        msg = f"import_dicom filed {created} of {n_studies} studies: {report.summary()}"
        raise RuntimeError(msg)
    engine.dispose()
    return path


def _run(template: Path, root: Path, name: str, **options: Any) -> dict[str, Any]:
    """One quantify_all run on a fresh copy of the template database."""
    from bmetrack.pipeline import quantify_all
    from bmetrack.study import db

    path = root / f"{name}.db"
    shutil.copyfile(template, path)
    overlays = root / f"overlays-{name}"
    engine = db.make_engine(path)
    size_before = path.stat().st_size
    cpu_start = time.process_time()
    start = time.perf_counter()
    report = quantify_all(engine, STUDY, overlay_dir=overlays, retries=0, **options)
    wall_s = time.perf_counter() - start
    cpu_s = time.process_time() - cpu_start
    engine.dispose()
    processed = len(report.measured) + len(report.failed)
    measured = len(report.measured)
    sessions_with_overlays = {png.parent for png in overlays.rglob("*.png")}
    return {
        "configuration": name,
        "wall_seconds": wall_s,
        "parent_cpu_seconds": cpu_s,
        "studies_processed": processed,
        "studies_measured": measured,
        "studies_failed": len(report.failed),
        "vertebrae_stored": report.n_measurements,
        "studies_per_minute": 60.0 * processed / wall_s,
        "seconds_per_study": wall_s / processed,
        "db_bytes_per_measured_study": (path.stat().st_size - size_before) / measured
        if measured
        else None,
        # Overlays are written by the worker for every quantified study, stored or not.
        "studies_with_overlays": len(sessions_with_overlays),
        "overlay_bytes_per_study": _folder_bytes(overlays) / len(sessions_with_overlays)
        if sessions_with_overlays
        else None,
        "failures": sorted({error.splitlines()[0][:120] for _, error in report.failed}),
    }


def _peak_rss_child(job: Any, overlay_dir: str) -> dict[str, float]:
    """In a fresh worker process: RSS after the imports, then peak RSS and cost of one study
    (read, quantify, overlays; not storing, which the parent does)."""
    import bmetrack.imaging.quantify  # noqa: F401  (the imports a worker pays once)
    from bmetrack.pipeline import measure_session
    from bmetrack.settings import resolve_settings

    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu_start = time.process_time()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = measure_session(job, resolve_settings().to_dict(), overlay_dir)
    return {
        "rss_after_imports_mb": baseline_kb / 1024,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cpu_seconds": time.process_time() - cpu_start,
        "wall_seconds": time.perf_counter() - start,
        "ok": result.error is None,
        "overlay_bytes": float(_folder_bytes(Path(overlay_dir))),
    }


def _worker_probe(template: Path, overlay_dir: Path) -> dict[str, float]:
    from bmetrack.pipeline import pending_sessions
    from bmetrack.study import db

    job = pending_sessions(db.make_engine(template), STUDY)[0]
    context = multiprocessing.get_context("spawn")  # a clean process, as a worker starts
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_peak_rss_child, job, str(overlay_dir)).result()


def _dask_run(template: Path, root: Path) -> tuple[dict[str, Any], float]:
    from distributed import LocalCluster

    start = time.perf_counter()
    with LocalCluster(
        n_workers=2,
        processes=True,
        threads_per_worker=1,
        host="127.0.0.1",
        dashboard_address=None,
    ) as cluster:
        startup_s = time.perf_counter() - start
        row = _run(template, root, "dask-2", dask_address=cluster.scheduler_address)
    return row, startup_s


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-studies", type=int, default=8)
    parser.add_argument("--matrix", type=int, default=256, help="in-plane matrix (rows=cols)")
    parser.add_argument("--no-clinical-probe", action="store_true")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.n_studies < 2:
        parser.error(f"--n-studies {args.n_studies}: give at least 2")

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bmetrack-scaling-") as folder:
        root = Path(folder)
        start = time.perf_counter()
        template = _build(root, args.n_studies, args.matrix, workers=2)
        build_s = time.perf_counter() - start
        dicom_bytes = _folder_bytes(root / "dicom") / args.n_studies
        import bmetrack.imaging.quantify  # noqa: F401  (imports outside the timed run)

        rows = [
            _run(template, root, "local-1", workers=1),
            _run(template, root, "local-2", workers=2),
        ]
        dask_row, dask_startup_s = _dask_run(template, root)
        rows.append(dask_row)
        worker = _worker_probe(template, root / "overlays-probe")
        clinical = None
        if not args.no_clinical_probe:
            clinical_root = root / "clinical"
            clinical_root.mkdir()
            clinical_template = _build(clinical_root, 1, 512, workers=1)
            clinical = _worker_probe(clinical_template, clinical_root / "overlays")
            clinical["dicom_bytes_per_study"] = _folder_bytes(clinical_root / "dicom")
            clinical["matrix"] = 512
    load_after = os.getloadavg()

    by_name = {row["configuration"]: row for row in rows}
    one = by_name["local-1"]["studies_per_minute"]
    result = {
        "benchmark": "quantify-all throughput: 1 and 2 local workers, loopback Dask (2 workers)",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "load_average_1min_before": load_before[0],
            "load_average_1min_after": load_after[0],
        },
        "n_studies": args.n_studies,
        "matrix": [15, args.matrix, args.matrix],
        "build_seconds": build_s,
        "dicom_bytes_per_study": dicom_bytes,
        "dask_cluster_startup_seconds": dask_startup_s,
        "runs": rows,
        "scaling_efficiency_local_2": by_name["local-2"]["studies_per_minute"] / (2 * one),
        "scaling_efficiency_dask_2": by_name["dask-2"]["studies_per_minute"] / (2 * one),
        "cpu_seconds_per_study_in_process": by_name["local-1"]["parent_cpu_seconds"]
        / by_name["local-1"]["studies_processed"],
        "worker_one_study": worker,
        "clinical_probe_512": clinical,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
