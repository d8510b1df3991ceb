"""Benchmark: time and peak memory of ``quantify`` per study, against pydicom alone.

For each phantom study (STIR + T1, default 15 slices of 512 x 512, written as DICOM to a
temporary folder) two kinds of measurement are made, each in a fresh Python process pinned
to ONE core (``os.sched_setaffinity``) with OMP/OpenBLAS/MKL threads = 1, so that the peak RSS is
that measurement's own peak (VmHWM):

- ``quantify``: read both series (`load_image`, as ``bmetrack quantify`` does) and
  `quantify_study` (built-in segmentation + quantification);
- ``pydicom``: ``pydicom.dcmread`` of every file of both series plus ``.pixel_array``.

Both are timed in-process after the imports (``seconds``); the process wall time including
interpreter start and imports is reported too (``process_seconds``).  The two kinds are
interleaved, repeated (default 3 times) and summarised by their medians; the ratio is
median quantify time / median pydicom time of the same study, measured in the same run.
CPU time (``time.process_time``) is reported beside wall time: on a shared machine the
wall time includes waiting for the core, the CPU time does not.

Usage: python benchmarks/speed.py [--n-studies 3] [--repetitions 3] [--out FILE]
Targets (issue 3): <= 3 s per study, ratio <= 10, peak memory <= 1 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "speed.json"
DEFAULT_FIRST_SEED = 6000
TIME_TARGET_S = 3.0
RATIO_TARGET = 10.0
MEMORY_TARGET_MB = 1024.0
KINDS = ("pydicom", "quantify")
_THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)


def _pin_one_core() -> int | None:
    if not hasattr(os, "sched_setaffinity"):
        return None
    core = sorted(os.sched_getaffinity(0))[0]
    os.sched_setaffinity(0, {core})
    return core


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (MB).

    VmHWM of /proc/self/status belongs to the process's own address space; ru_maxrss is not
    used on Linux because exec() carries the parent's high-water mark over into it.
    """
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(kind: str, stir: str, t1: str, lowest_level: str | None) -> dict[str, Any]:
    """Run in the child process: one measurement, returned as a dict."""
    core = _pin_one_core()
    files = sorted(p for folder in (stir, t1) for p in Path(folder).iterdir() if p.is_file())
    if kind == "pydicom":
        import pydicom

        rss_before_mb = _peak_rss_mb()
        start, cpu_start = time.perf_counter(), time.process_time()
        n_pixels = 0
        for path in files:
            n_pixels += int(pydicom.dcmread(path).pixel_array.size)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        extra: dict[str, Any] = {"n_pixels": n_pixels}
    elif kind == "quantify":
        from bmetrack.imaging.quantify import load_image, quantify_study

        rss_before_mb = _peak_rss_mb()
        start, cpu_start = time.perf_counter(), time.process_time()
        error = ""
        n_vertebrae = 0
        try:
            study = quantify_study(load_image(stir), load_image(t1), lowest_level=lowest_level)
            n_vertebrae = len(study.quantification.vertebrae)
        except Exception as exc:  # the time to a clean error counts
            error = f"{type(exc).__name__}: {exc}"
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        extra = {"n_vertebrae": n_vertebrae, "error": error}
    else:
        msg = f"kind must be one of {KINDS}, got {kind!r}"
        raise ValueError(msg)
    return {
        "kind": kind,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "rss_after_imports_mb": rss_before_mb,
        "n_files": len(files),
        "core": core,
        **extra,
    }


def measure(kind: str, study: dict[str, Any]) -> dict[str, Any]:
    """One measurement in a fresh single-core subprocess."""
    env = dict(os.environ)
    env.update(dict.fromkeys(_THREAD_VARIABLES, "1"))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind,
           "--stir", str(study["stir"]), "--t1", str(study["t1"])]  # fmt: skip
    if study.get("lowest_level"):
        cmd += ["--lowest-level", str(study["lowest_level"])]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    process_seconds = time.perf_counter() - start
    if done.returncode != 0:
        msg = f"speed child ({kind}) failed with exit {done.returncode}: {done.stderr[-2000:]}"
        raise RuntimeError(msg)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_seconds"] = process_seconds
    return result


def prepare_studies(seeds: Sequence[int], folder: Path, params: Any = None) -> list[dict]:
    """Write one DICOM study (stir/ and t1/ series) per seed under ``folder``."""
    from bmetrack.simulate.phantom import make_phantom

    studies = []
    for seed in seeds:
        phantom = make_phantom(params, seed=int(seed))
        paths = phantom.write_dicom(folder / f"study_{seed}", patient_id=f"SPEED{seed}")
        studies.append(
            {
                "seed": int(seed),
                "stir": str(paths["stir"]),
                "t1": str(paths["t1"]),
                "lowest_level": None if phantom.sacrum_in_view else phantom.lowest_level or None,
                "stir_shape": list(phantom.stir.shape),
                "t1_shape": list(phantom.t1.shape),
                "bytes": sum(
                    p.stat().st_size
                    for key in ("stir", "t1")
                    for p in Path(paths[key]).iterdir()
                    if p.is_file()
                ),
            }
        )
    return studies


def _median(runs: list[dict], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def run_speed(
    seeds: Sequence[int],
    repetitions: int = 3,
    params: Any = None,
    *,
    out: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure every study ``repetitions`` times (kinds interleaved) and summarise."""
    if repetitions < 1:
        msg = f"repetitions must be >= 1, got {repetitions}"
        raise ValueError(msg)
    per_study = []
    with tempfile.TemporaryDirectory(prefix="bench3_speed_") as tmp:
        studies = prepare_studies(seeds, Path(tmp), params)
        for study in studies:
            runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
            for _ in range(repetitions):
                for kind in KINDS:
                    runs[kind].append(measure(kind, study))
            q, p = runs["quantify"], runs["pydicom"]
            row = {
                **{k: v for k, v in study.items() if k not in ("stir", "t1")},
                "n_files": q[0]["n_files"],
                "quantify_seconds": _median(q, "seconds"),
                "quantify_cpu_seconds": _median(q, "cpu_seconds"),
                "quantify_process_seconds": _median(q, "process_seconds"),
                "quantify_peak_rss_mb": max(r["peak_rss_mb"] for r in q),
                "quantify_rss_after_imports_mb": _median(q, "rss_after_imports_mb"),
                "pydicom_seconds": _median(p, "seconds"),
                "pydicom_cpu_seconds": _median(p, "cpu_seconds"),
                "pydicom_process_seconds": _median(p, "process_seconds"),
                "pydicom_peak_rss_mb": max(r["peak_rss_mb"] for r in p),
                "n_vertebrae": q[0]["n_vertebrae"],
                "quantify_errors": sorted({r["error"] for r in q if r["error"]}),
                "runs": runs,
            }
            row["ratio_quantify_to_pydicom"] = row["quantify_seconds"] / row["pydicom_seconds"]
            row["cpu_ratio_quantify_to_pydicom"] = (
                row["quantify_cpu_seconds"] / row["pydicom_cpu_seconds"]
            )
            per_study.append(row)
            if progress:
                print(
                    f"seed {study['seed']}: quantify {row['quantify_seconds']:.2f} s "
                    f"(peak {row['quantify_peak_rss_mb']:.0f} MB), pydicom "
                    f"{row['pydicom_seconds']:.3f} s, ratio {row['ratio_quantify_to_pydicom']:.1f}",
                    file=sys.stderr,
                    flush=True,
                )
    seconds = [r["quantify_seconds"] for r in per_study]
    ratios = [r["ratio_quantify_to_pydicom"] for r in per_study]
    peaks = [r["quantify_peak_rss_mb"] for r in per_study]
    summary = {
        "quantify_seconds_median": statistics.median(seconds),
        "quantify_seconds_max": max(seconds),
        "quantify_process_seconds_median": statistics.median(
            r["quantify_process_seconds"] for r in per_study
        ),
        "pydicom_seconds_median": statistics.median(r["pydicom_seconds"] for r in per_study),
        "quantify_cpu_seconds_max": max(r["quantify_cpu_seconds"] for r in per_study),
        "ratio_median": statistics.median(ratios),
        "cpu_ratio_max": max(r["cpu_ratio_quantify_to_pydicom"] for r in per_study),
        "load_average_after": list(os.getloadavg()),
        "ratio_max": max(ratios),
        "quantify_peak_rss_mb_max": max(peaks),
        "n_studies_with_quantify_error": sum(bool(r["quantify_errors"]) for r in per_study),
    }
    summary["targets"] = {
        "seconds_per_study": {
            "value": summary["quantify_seconds_max"],
            "target": TIME_TARGET_S,
            "comparison": "<=",
            "target_met": summary["quantify_seconds_max"] <= TIME_TARGET_S,
        },
        "ratio_to_pydicom": {
            "value": summary["ratio_max"],
            "target": RATIO_TARGET,
            "comparison": "<=",
            "target_met": summary["ratio_max"] <= RATIO_TARGET,
        },
        "cpu_seconds_per_study": {
            "value": summary["quantify_cpu_seconds_max"],
            "target": TIME_TARGET_S,
            "comparison": "<=",
            "target_met": summary["quantify_cpu_seconds_max"] <= TIME_TARGET_S,
        },
        "cpu_ratio_to_pydicom": {
            "value": summary["cpu_ratio_max"],
            "target": RATIO_TARGET,
            "comparison": "<=",
            "target_met": summary["cpu_ratio_max"] <= RATIO_TARGET,
        },
        "peak_memory_mb": {
            "value": summary["quantify_peak_rss_mb_max"],
            "target": MEMORY_TARGET_MB,
            "comparison": "<=",
            "target_met": summary["quantify_peak_rss_mb_max"] <= MEMORY_TARGET_MB,
        },
    }
    from bmetrack import __version__

    result = {
        "benchmark": "speed",
        "config": {
            "seeds": [int(s) for s in seeds],
            "repetitions": repetitions,
            "phantom": "defaults" if params is None else repr(params),
            "one_core": hasattr(os, "sched_setaffinity"),
            "thread_variables": list(_THREAD_VARIABLES),
            "statistic": "median over repetitions per study; targets on the worst study",
            "bmetrack_version": __version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "processor": platform.processor(),
        },
        "summary": summary,
        "studies": per_study,
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-studies", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=DEFAULT_FIRST_SEED)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--stir", help=argparse.SUPPRESS)
    parser.add_argument("--t1", help=argparse.SUPPRESS)
    parser.add_argument("--lowest-level", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.stir, args.t1, args.lowest_level)))
        return 0
    if args.n_studies < 1:
        parser.error(f"--n-studies must be >= 1, got {args.n_studies}")
    seeds = list(range(args.first_seed, args.first_seed + args.n_studies))
    result = run_speed(seeds, args.repetitions, out=args.out)
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
