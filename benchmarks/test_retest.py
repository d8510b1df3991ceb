"""Benchmark: test-retest repeatability of BME percent (same anatomy, new noise).

Each of N phantom studies is generated twice with the same anatomy and the same acquisition
(positioning, scanner, sequence, bias field) and only a new noise realisation
(`PhantomParameters.noise_seed`), then measured in both modes of ``benchmarks/accuracy.py``
(``pipeline`` and ``truth_labels``).  A body enters the comparison when it is matched
(best-overlap Dice > 0.5 with its truth body) in both repeats.

Reported per mode: the per-body differences of BME percent (repeat 2 - repeat 1): max
absolute difference, mean absolute difference, share within 2 points (the issue's target:
"the same phantom with new noise gives BME percent within 2 points"); and intraclass
correlation coefficients computed from the two-way ANOVA mean squares of Shrout & Fleiss
(1979), "Intraclass correlations: uses in assessing rater reliability", Psychol Bull
86:420-428:

- ICC(2,1): two-way random effects, single measurement, absolute agreement (equal to
  McGraw & Wong's ICC(A,1), which is also the absolute-agreement ICC of the mixed model);
- ICC(3,1): two-way mixed effects, single measurement, consistency;
- ICC(1,1): one-way random effects (for completeness).

Seeds: 7000.. by default (development used seeds < 3000; the accuracy benchmark 5000..).

Usage: python benchmarks/test_retest.py [--n-studies 20] [--first-seed 7000] [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "test_retest.json"
DEFAULT_FIRST_SEED = 7000
DEFAULT_N_STUDIES = 20
NOISE_SEEDS = (1, 2)
WITHIN_POINTS = 2.0


def _accuracy_module() -> ModuleType:
    """benchmarks/accuracy.py (benchmarks/ is not a package)."""
    name = "bmetrack_bench_accuracy"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "accuracy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def icc(ratings: npt.ArrayLike) -> dict[str, float]:
    """Shrout & Fleiss (1979) intraclass correlations of an n targets x k raters table.

    Parameters
    ----------
    ratings : array (n, k)
        One row per target (vertebral body), one column per rater (repeat); no missing values.

    Returns
    -------
    dict
        ``icc1_1``, ``icc2_1`` (absolute agreement), ``icc3_1`` (consistency), the mean
        squares ``bms`` (between targets), ``jms`` (between raters), ``ems`` (residual),
        ``wms`` (within targets), and ``n``, ``k``.  ICCs are NaN when undefined (zero
        denominator, e.g. every rating equal, or n < 2).
    """
    x = np.asarray(ratings, dtype=float)
    if x.ndim != 2 or x.shape[1] < 2:
        msg = f"ratings must be a 2-D array of n targets x k >= 2 raters, got shape {x.shape}"
        raise ValueError(msg)
    if not np.all(np.isfinite(x)):
        msg = "ratings must not contain NaN or infinite values; drop incomplete targets first"
        raise ValueError(msg)
    n, k = x.shape
    nan = {"icc1_1": math.nan, "icc2_1": math.nan, "icc3_1": math.nan}
    if n < 2:
        return {**nan, "bms": math.nan, "jms": math.nan, "ems": math.nan, "wms": math.nan,
                "n": n, "k": k}  # fmt: skip
    grand = x.mean()
    ss_total = float(((x - grand) ** 2).sum())
    ss_targets = float(k * ((x.mean(axis=1) - grand) ** 2).sum())
    ss_raters = float(n * ((x.mean(axis=0) - grand) ** 2).sum())
    ss_error = ss_total - ss_targets - ss_raters
    bms = ss_targets / (n - 1)
    jms = ss_raters / (k - 1)
    ems = ss_error / ((n - 1) * (k - 1))
    wms = (ss_total - ss_targets) / (n * (k - 1))

    def ratio(num: float, den: float) -> float:
        return num / den if den > 0 else math.nan

    return {
        "icc1_1": ratio(bms - wms, bms + (k - 1) * wms),
        "icc2_1": ratio(bms - ems, bms + (k - 1) * ems + k * (jms - ems) / n),
        "icc3_1": ratio(bms - ems, bms + (k - 1) * ems),
        "bms": bms,
        "jms": jms,
        "ems": ems,
        "wms": wms,
        "n": n,
        "k": k,
    }


def paired_bodies(bodies: pd.DataFrame) -> pd.DataFrame:
    """One row per (mode, seed, label) matched in both repeats: bme_1, bme_2, truth_1, truth_2."""
    m = bodies[bodies["matched"]]
    cols = ["mode", "seed", "level", "label"]
    first = m[m["repeat"] == 0][
        [*cols, "bme_percent", "truth_bme_percent", "truth_edema_volume_ml"]
    ]
    second = m[m["repeat"] == 1][[*cols, "bme_percent", "truth_bme_percent"]]
    pairs = first.merge(second, on=cols, suffixes=("_1", "_2"))
    return pairs.rename(
        columns={
            "bme_percent_1": "bme_1",
            "bme_percent_2": "bme_2",
            "truth_bme_percent_1": "truth_1",
            "truth_bme_percent_2": "truth_2",
        }
    )


def summarise_pairs(pairs: pd.DataFrame) -> dict[str, Any]:
    """Differences and ICCs of the paired BME percent values of one mode."""
    diff = (pairs["bme_2"] - pairs["bme_1"]).to_numpy(dtype=float)
    out: dict[str, Any] = {
        "n_bodies": len(pairs),
        "max_abs_difference": float(np.abs(diff).max()) if diff.size else math.nan,
        "mean_abs_difference": float(np.abs(diff).mean()) if diff.size else math.nan,
        "mean_difference": float(diff.mean()) if diff.size else math.nan,
        "share_within_2_points": float((np.abs(diff) <= WITHIN_POINTS).mean())
        if diff.size
        else math.nan,
        "n_outside_2_points": int((np.abs(diff) > WITHIN_POINTS).sum()),
        "max_truth_difference": float((pairs["truth_2"] - pairs["truth_1"]).abs().max())
        if len(pairs)
        else math.nan,
        "icc": icc(pairs[["bme_1", "bme_2"]].to_numpy()) if len(pairs) else icc(np.zeros((0, 2))),
    }
    edematous = pairs[pairs["truth_edema_volume_ml"] > 0]
    d_e = (edematous["bme_2"] - edematous["bme_1"]).to_numpy(dtype=float)
    out["edematous"] = {
        "n_bodies": len(edematous),
        "max_abs_difference": float(np.abs(d_e).max()) if d_e.size else math.nan,
        "share_within_2_points": float((np.abs(d_e) <= WITHIN_POINTS).mean())
        if d_e.size
        else math.nan,
        "icc": icc(edematous[["bme_1", "bme_2"]].to_numpy())
        if len(edematous)
        else icc(np.zeros((0, 2))),
    }
    worst = pairs.assign(abs_diff=np.abs(diff)).sort_values("abs_diff", ascending=False)
    out["largest_differences"] = worst.head(5)[
        ["seed", "level", "truth_1", "bme_1", "bme_2", "abs_diff"]
    ].to_dict(orient="records")
    out["target_within_2_points_met"] = bool(len(pairs) > 0 and out["n_outside_2_points"] == 0)
    return out


def run_test_retest(
    seeds: Sequence[int],
    params: Any = None,
    *,
    noise_seeds: Sequence[int] = NOISE_SEEDS,
    modes: Sequence[str] | None = None,
    out: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate each seed with every noise seed, measure, pair the bodies and summarise."""
    from bmetrack.settings import resolve_settings
    from bmetrack.simulate.phantom import PhantomParameters, make_phantom

    acc = _accuracy_module()
    modes = tuple(modes or acc.MODES)
    if len(noise_seeds) != 2 or noise_seeds[0] == noise_seeds[1]:
        msg = f"noise_seeds must be two different integers, got {noise_seeds!r}"
        raise ValueError(msg)
    base = params if params is not None else PhantomParameters()
    settings = resolve_settings()
    rows: list[dict] = []
    failures: list[dict] = []
    start = time.perf_counter()
    for i, seed in enumerate(seeds):
        for repeat, noise_seed in enumerate(noise_seeds):
            phantom = make_phantom(replace(base, noise_seed=int(noise_seed)), seed=int(seed))
            for mode in modes:
                try:
                    study = acc.measure_study(phantom, mode, settings)
                    error = ""
                except Exception as exc:  # a failure is a benchmark result
                    study, error = None, f"{type(exc).__name__}: {exc}"
                    failures.append(
                        {
                            "seed": int(seed),
                            "noise_seed": int(noise_seed),
                            "mode": mode,
                            "error": error,
                        }
                    )
                for row in acc.evaluate_bodies(phantom, study, mode, error):
                    rows.append({**row, "repeat": repeat, "noise_seed": int(noise_seed)})
        if progress:
            print(f"[{i + 1}/{len(seeds)}] seed {seed} done", file=sys.stderr, flush=True)
    bodies = pd.DataFrame(rows)
    pairs = paired_bodies(bodies)
    summary = {}
    for mode in modes:
        s = summarise_pairs(pairs[pairs["mode"] == mode].reset_index(drop=True))
        s["n_failed_measurements"] = sum(f["mode"] == mode for f in failures)
        s["n_truth_bodies"] = int(((bodies["mode"] == mode) & (bodies["repeat"] == 0)).sum())
        summary[mode] = s
    result: dict[str, Any] = {
        "benchmark": "test_retest",
        "config": {
            "n_studies": len(seeds),
            "seeds": [int(s) for s in seeds],
            "noise_seeds": [int(s) for s in noise_seeds],
            "acquisition_seed": int(base.acquisition_seed),
            "modes": list(modes),
            "within_points": WITHIN_POINTS,
            "icc_reference": "Shrout PE, Fleiss JL. Psychol Bull 1979;86:420-428",
            "total_seconds": time.perf_counter() - start,
        },
        "summary": summary,
        "failures": failures,
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        acc_clean = acc._clean
        out.write_text(json.dumps(acc_clean(result), indent=2) + "\n", encoding="utf-8")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-studies", type=int, default=DEFAULT_N_STUDIES)
    parser.add_argument("--first-seed", type=int, default=DEFAULT_FIRST_SEED)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.n_studies < 2:
        parser.error(f"--n-studies must be >= 2 (an ICC needs 2 bodies), got {args.n_studies}")
    seeds = list(range(args.first_seed, args.first_seed + args.n_studies))
    result = run_test_retest(seeds, out=args.out)
    for mode, s in result["summary"].items():
        print(
            f"{mode}: {s['n_bodies']} bodies, max |diff| {s['max_abs_difference']:.2f}, "
            f"within 2 points {s['share_within_2_points']:.1%}, "
            f"ICC(2,1) {s['icc']['icc2_1']:.4f}, ICC(3,1) {s['icc']['icc3_1']:.4f}; "
            f"edematous: n {s['edematous']['n_bodies']}, "
            f"ICC(2,1) {s['edematous']['icc']['icc2_1']:.4f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
