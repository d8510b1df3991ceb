"""Development aid: per-study report of the built-in segmenter on phantom studies.

Prints, per seed, the true and found levels (bottom-up; the phantom's levels are the bodies
seen whole on the sagittal images, laterally cut ones included), the partly visible bodies of
the truth (3D) and of the segmenter (with those it found cut by the slab's left/right edge),
whether the sacrum is in view and whether the segmenter found it, and per true body the
best-overlap Dice and the level of the predicted body carrying it; then a summary (labelling
accuracy, Dice mean / median / p10) and a tally of failure categories.  Optionally renders
the mid-sagittal STIR and T1 slices with the true (thin) and found (filled) labels to PNG for
visual checks.

Use development seeds only (2000-2999); the held-out benchmark (`accuracy.py`) uses 5000+.

Usage: python benchmarks/segment_dev.py [--first-seed 2000] [--n-studies 30]
       [--png-dir DIR] [--cache-dir DIR] [--seeds 2003 2017]
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

DEVELOPMENT_SEED_LIMIT = 3000


def load_case(seed: int, cache_dir: Path | None) -> dict[str, Any]:
    """Phantom inputs and truth of one seed (STIR, T1 on the STIR grid, labels, truth)."""
    path = cache_dir / f"phantom_{seed}.pkl" if cache_dir is not None else None
    if path is not None and path.exists():
        with path.open("rb") as fh:
            case: dict[str, Any] = pickle.load(fh)
        return case
    from bmetrack.simulate.phantom import make_phantom

    ph = make_phantom(None, seed=seed)
    t1 = ph.t1.resample_to(ph.stir, order=1, fill_value=np.nan)
    t1 = t1.with_array(np.nan_to_num(t1.array, nan=0.0))
    case = {
        "seed": seed,
        "stir": ph.stir,
        "t1": t1,
        "labels": ph.labels,
        "truth": ph.truth,
        "levels": list(ph.levels),
        "sacrum_in_view": bool(ph.sacrum_in_view),
        "lowest_level": ph.lowest_level,
    }
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as fh:
            pickle.dump(case, fh)
    return case


def evaluate(case: dict[str, Any]) -> dict[str, Any]:
    """Segment one case as `quantify_study` does and compare with the truth."""
    from bmetrack.anatomy import level_from_label
    from bmetrack.imaging.segment import segment_vertebral_bodies

    anchor = None if case["sacrum_in_view"] or not case["lowest_level"] else case["lowest_level"]
    start = time.perf_counter()
    error = ""
    try:
        seg = segment_vertebral_bodies(
            case["stir"], "stir", other=case["t1"], other_contrast="t1", lowest_level=anchor
        )
    except Exception as exc:  # a failure is a result here
        seg, error = None, f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - start
    truth = case["truth"]
    full = truth[~truth["partially_visible"].astype(bool)]
    t_map = np.asarray(case["labels"].array)
    p_map = np.asarray(seg.labels.array) if seg is not None else np.zeros_like(t_map)
    bodies = []
    for lab, lev in zip(full["label"], full["level"], strict=True):
        t = t_map == lab
        best, best_lab = 0.0, 0
        for p in np.unique(p_map[t]):
            if p == 0:
                continue
            pm = p_map == p
            d = 2.0 * np.count_nonzero(t & pm) / (t.sum() + pm.sum())
            if d > best:
                best, best_lab = d, int(p)
        same = p_map == lab
        d_same = 2.0 * np.count_nonzero(t & same) / (t.sum() + same.sum())
        if best_lab == 0:
            found = "-"
        elif best_lab > 100:
            found = f"V{best_lab - 100}"
        else:
            found = level_from_label(best_lab)
        bodies.append({"level": str(lev), "dice": best, "found": found, "correct": d_same > 0.5})
    return {
        "seed": case["seed"],
        "error": error,
        "seconds": seconds,
        "anchor": anchor,
        "sacrum_in_view": case["sacrum_in_view"],
        "sacrum_found": None if seg is None else bool(seg.parameters.get("sacrum_found")),
        "truth_levels": case["levels"],
        "found_levels": [] if seg is None else list(seg.levels),
        "truth_partial": [str(x) for x in truth.loc[truth["partially_visible"], "level"]],
        "found_partial": [] if seg is None else list(seg.partial),
        "lateral_cut": []
        if seg is None
        else [w.split()[1] for w in seg.warnings if "left/right" in w],
        "bodies": bodies,
        "warnings": [] if seg is None else list(seg.warnings),
        "seg": seg,
    }


def categorise(res: dict[str, Any]) -> list[str]:
    """Failure categories of one study (empty when every level is right and Dice >= 0.8)."""
    cats = []
    if res["error"]:
        return ["error"]
    if res["sacrum_in_view"] and not res["sacrum_found"]:
        cats.append("sacrum missed")
    if not res["sacrum_in_view"] and res["sacrum_found"]:
        cats.append("sacrum found out of view (anchor overridden)")
    wrong = [b for b in res["bodies"] if not b["correct"]]
    if wrong and not cats:
        if any(b["dice"] > 0.5 for b in wrong):
            cats.append("level shift (bodies found, misnamed)")
        else:
            cats.append("bodies missed/merged")
    if "L6" in res["truth_levels"]:
        cats.append("transitional L6")
    low = [b for b in res["bodies"] if b["correct"] and b["dice"] < 0.8]
    if low:
        cats.append(f"low Dice ({len(low)} bodies)")
    return cats


def render(case: dict[str, Any], res: dict[str, Any], out_dir: Path) -> Path:
    """Mid-sagittal STIR and T1 with true outlines and found labels, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bmetrack.imaging.segment_geometry import canonicalise

    t_map = case["labels"]
    seg = res["seg"]
    stir, geo = canonicalise(case["stir"])
    t1, _ = canonicalise(case["t1"])
    truth, _ = canonicalise(t_map)
    found = canonicalise(seg.labels)[0] if seg is not None else np.zeros_like(truth)
    k = int(np.argmax((truth > 0).sum(axis=(1, 2))))
    aspect = geo.spacing_mm[1] / geo.spacing_mm[2]
    fig, axes = plt.subplots(1, 2, figsize=(12, 7))
    for ax, img, name in ((axes[0], stir, "STIR"), (axes[1], t1, "T1")):
        ax.imshow(img[k], cmap="gray", aspect=aspect)
        ax.contour(truth[k] > 0, levels=[0.5], colors="lime", linewidths=0.6)
        lab = np.ma.masked_equal(found[k].astype(float), 0)
        ax.imshow(lab % 20, cmap="tab20", alpha=0.35, aspect=aspect, vmin=0, vmax=19)
        for val in np.unique(found[k]):
            if val == 0:
                continue
            r, c = np.argwhere(found[k] == val).mean(axis=0)
            ax.text(c, r, str(val), color="yellow", fontsize=7)
        ax.set_title(f"seed {res['seed']} {name} slice {k}")
        ax.axis("off")
    fig.suptitle(f"truth {res['truth_levels']}\nfound {res['found_levels']}", fontsize=8)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"seg_{res['seed']}.png"
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """Run the development report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--first-seed", type=int, default=2000)
    ap.add_argument("--n-studies", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="*", default=None)
    ap.add_argument("--png-dir", type=Path, default=None)
    ap.add_argument("--png-all", action="store_true", help="render every study, not only failures")
    ap.add_argument("--cache-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    seeds = args.seeds or list(range(args.first_seed, args.first_seed + args.n_studies))
    if max(seeds) >= DEVELOPMENT_SEED_LIMIT:
        msg = f"seeds >= {DEVELOPMENT_SEED_LIMIT} are held out for the benchmark; got {seeds}"
        raise SystemExit(msg)
    all_bodies: list[dict[str, Any]] = []
    tally: Counter[str] = Counter()
    for seed in seeds:
        case = load_case(seed, args.cache_dir)
        res = evaluate(case)
        all_bodies += res["bodies"]
        cats = categorise(res)
        tally.update(c.split(" (")[0] if c.startswith("low Dice") else c for c in cats)
        n_ok = sum(b["correct"] for b in res["bodies"])
        print(
            f"seed {seed}: sacrum view={res['sacrum_in_view']} found={res['sacrum_found']} "
            f"anchor={res['anchor']} ok {n_ok}/{len(res['bodies'])} {res['seconds']:.1f}s "
            f"{'; '.join(cats)}"
        )
        if res["error"]:
            print(f"    error: {res['error']}")
        print(f"    truth {res['truth_levels']}\n    found {res['found_levels']}")
        print(
            f"    partial truth {res['truth_partial']} found {res['found_partial']} "
            f"(cut sideways: {res['lateral_cut']})"
        )
        print(
            "    " + " ".join(f"{b['level']}:{b['dice']:.2f}/{b['found']}" for b in res["bodies"])
        )
        if args.png_dir is not None and (cats or args.png_all):
            print(f"    png {render(case, res, args.png_dir)}")
        sys.stdout.flush()
    d = np.array([b["dice"] for b in all_bodies])
    acc = np.mean([b["correct"] for b in all_bodies])
    print(
        f"\n{len(seeds)} studies, {len(d)} bodies: labelling {100 * acc:.1f}% | Dice mean "
        f"{d.mean():.3f} median {np.median(d):.3f} p10 {np.quantile(d, 0.1):.3f}"
    )
    for cat, n in tally.most_common():
        print(f"  {n:3d}  {cat}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
