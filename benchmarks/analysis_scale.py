"""Benchmark: analysis + figures for simulated cohorts of growing size.

Each size runs in a fresh process pinned to one core (BLAS threads = 1), so
time and peak memory are those of that size alone. The 64-patient run is the
baseline measured in the same run; the results file gives each size's ratio to
it and the growth exponent between sizes (log time / log size).

Usage: python benchmarks/analysis_scale.py [--sizes 64 1000 10000 100000] [--out FILE]
Targets (issue 2): 100,000 patients in under 120 s and 4 GB on one core.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

TIME_LIMIT_S = 120.0
MEMORY_LIMIT_MB = 4096.0
HERE = Path(__file__).resolve().parent


def _child(n_patients: int, seed: int) -> None:
    """Run in the child process: simulate, then time tables + analysis + figures."""
    import resource
    import time

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    from bmetrack.analysis.run import analyse_and_draw
    from bmetrack.simulate.cohort import CohortParameters, simulate_cohort

    # Untimed warm-up: imports, font and template caches would otherwise land on the first size.
    with tempfile.TemporaryDirectory() as folder:
        analyse_and_draw(
            simulate_cohort(CohortParameters(n_patients=16), seed=seed).frames, Path(folder)
        )
    cohort = simulate_cohort(CohortParameters(n_patients=n_patients), seed=seed)
    rss_before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        run = analyse_and_draw(cohort.frames, Path(folder))
        elapsed = time.perf_counter() - start
        n_figures = len(run.figures)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "n_patients": n_patients,
                "n_vcf": run.results["n_vcf"],
                "n_rows": len(run.tables.vcf_visits) + len(run.tables.patient_visits),
                "seconds": elapsed,
                "peak_rss_mb": peak_mb,
                "rss_before_analysis_mb": rss_before_mb,
                "n_figures": n_figures,
                "mixed_models_converged": bool(
                    run.results["bme"]["mixed_model"].get("converged")
                    and run.results["vas"]["mixed_model"].get("converged")
                ),
            }
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 1000, 10000, 100000])
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "analysis_scale.json")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        _child(args.child, args.seed)
        return 0

    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    rows = []
    for size in args.sizes:
        completed = subprocess.run(
            [sys.executable, __file__, "--child", str(size), "--seed", str(args.seed)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if completed.returncode != 0:
            print(completed.stderr, file=sys.stderr)
            return completed.returncode
        row = json.loads(completed.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{size:>7} patients: {row['seconds']:7.2f} s, peak {row['peak_rss_mb']:7.0f} MB",
            flush=True,
        )
    baseline = rows[0]
    for previous, row in zip([None, *rows[:-1]], rows, strict=True):
        row["time_ratio_to_baseline"] = row["seconds"] / baseline["seconds"]
        row["memory_ratio_to_baseline"] = row["peak_rss_mb"] / baseline["peak_rss_mb"]
        row["growth_exponent_vs_previous"] = (
            None
            if previous is None
            else math.log(row["seconds"] / previous["seconds"])
            / math.log(row["n_patients"] / previous["n_patients"])
        )
    largest = rows[-1]
    summary = {
        "benchmark": "analysis + figures (tables, statistics, mixed models, 7 PNG figures)",
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count()},
        "one_core": True,
        "baseline_n_patients": baseline["n_patients"],
        "rows": rows,
        "target": {"n_patients": 100000, "seconds": TIME_LIMIT_S, "peak_rss_mb": MEMORY_LIMIT_MB},
        "target_met": largest["n_patients"] < 100000
        or (largest["seconds"] < TIME_LIMIT_S and largest["peak_rss_mb"] < MEMORY_LIMIT_MB),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"results written to {args.out}; target met: {summary['target_met']}")
    return 0 if summary["target_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
