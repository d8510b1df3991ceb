"""Smoke tests of the imaging benchmarks (benchmarks/*.py) on tiny phantoms.

The metric helpers are checked against hand computations and published values; each
script's core function is run end to end on two small phantoms.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest

from bmetrack.simulate.phantom import PhantomParameters

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    module_name = f"bmetrack_bench_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def accuracy() -> ModuleType:
    return _load("accuracy")


@pytest.fixture(scope="module")
def test_retest() -> ModuleType:
    return _load("test_retest")


@pytest.fixture(scope="module")
def tiny_params() -> PhantomParameters:
    # 13 slices keep whole bodies inside the slab; 144 x 144 at 2.2 mm covers about T9-S1.
    return PhantomParameters(
        n_slices=13, n_rows=144, n_columns=144, pixel_spacing_mm=2.2, partial_volume_samples=1
    )


def test_overlap_and_dice_by_hand(accuracy: ModuleType) -> None:
    truth = np.array([[1, 1, 1, 0], [2, 2, 0, 0]])
    predicted = np.array([[1, 1, 0, 0], [2, 3, 3, 0]])
    pairs, t_sizes, p_sizes = accuracy.overlap_table(truth, predicted)
    assert pairs == {(1, 1): 2, (2, 2): 1, (2, 3): 1}
    assert t_sizes == {1: 3, 2: 2}
    assert p_sizes == {1: 2, 2: 1, 3: 2}
    # Dice(1) = 2*2 / (3 + 2) = 0.8; Dice(2 vs 2) = 2*1 / (2 + 1).
    assert accuracy.dice(2, 3, 2) == pytest.approx(0.8)
    assert accuracy.dice(1, 2, 1) == pytest.approx(2 / 3)
    assert accuracy.dice(0, 0, 0) == 0.0


def test_bland_altman_by_hand(accuracy: ModuleType) -> None:
    measured = [10.0, 22.0, 31.0, 39.0]
    truth = [8.0, 20.0, 30.0, 40.0]
    # differences 2, 2, 1, -1: mean 1, sample SD sqrt(((1+1+0+4)/3)) = sqrt(2)
    ba = accuracy.bland_altman(measured, truth)
    assert ba["n"] == 4
    assert ba["mean_difference"] == pytest.approx(1.0)
    assert ba["sd_difference"] == pytest.approx(math.sqrt(2.0))
    assert ba["loa_lower"] == pytest.approx(1.0 - 1.96 * math.sqrt(2.0))
    assert ba["loa_upper"] == pytest.approx(1.0 + 1.96 * math.sqrt(2.0))


def test_icc_matches_shrout_fleiss_table(test_retest: ModuleType) -> None:
    # Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges; their Table 4 gives
    # ICC(1,1) = .17, ICC(2,1) = .29, ICC(3,1) = .71 and Table 3 the mean squares.
    ratings = [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]]
    result = test_retest.icc(ratings)
    assert result["bms"] == pytest.approx(11.24, abs=0.01)
    assert result["wms"] == pytest.approx(6.26, abs=0.01)
    assert result["jms"] == pytest.approx(32.49, abs=0.01)
    assert result["ems"] == pytest.approx(1.02, abs=0.01)
    assert result["icc1_1"] == pytest.approx(0.17, abs=0.005)
    assert result["icc2_1"] == pytest.approx(0.29, abs=0.005)
    assert result["icc3_1"] == pytest.approx(0.71, abs=0.005)


def test_icc_perfect_agreement_and_bias(test_retest: ModuleType) -> None:
    x = np.array([1.0, 4.0, 9.0, 16.0])
    assert test_retest.icc(np.column_stack([x, x]))["icc2_1"] == pytest.approx(1.0)
    # A constant offset between repeats keeps consistency (ICC 3,1 = 1) but not agreement.
    shifted = test_retest.icc(np.column_stack([x, x + 5.0]))
    assert shifted["icc3_1"] == pytest.approx(1.0)
    assert shifted["icc2_1"] < 0.9
    assert math.isnan(test_retest.icc(np.ones((3, 2)))["icc2_1"])
    with pytest.raises(ValueError, match="ratings"):
        test_retest.icc(np.ones(3))


def test_summary_counts_missed_bodies_as_zero(accuracy: ModuleType) -> None:
    bodies = pd.DataFrame(
        {
            "mode": "pipeline",
            "label": [20, 21, 22, 26],
            "dice": [0.9, 0.8, 0.0, 0.7],
            "label_correct": [True, False, False, True],
            "matched": [True, True, False, True],
            "bme_percent": [10.0, 0.0, np.nan, 0.0],
            "truth_bme_percent": [14.0, 1.0, 50.0, 0.0],
            "truth_edema_volume_ml": [3.0, 0.2, 9.0, 0.0],
            "bme_present": [True, False, np.nan, False],
            "truth_bme_present": [True, False, True, False],
            "cement_volume_ml": [2.0, 0.0, np.nan, 0.0],
            "truth_cement_volume_ml": [2.5, 0.0, 0.0, 0.0],
            "genant_grade": [2, 0, np.nan, 1],
            "truth_genant_grade": [2, 1, 0, 0],
            "has_hemangioma": [False, False, False, False],
            "hemangioma_volume_ml": 0.0,
            "false_edema_in_hemangioma_ml": 0.0,
        }
    )
    studies = pd.DataFrame(
        {"seed": [1], "failed": [False], "error": [""], "seconds": [1.0]}
        | {"n_labelled_correctly": [2], "n_bodies": [4]}
    )
    s = accuracy.summarise_mode(bodies, studies)
    assert s["level_labelling_accuracy"] == pytest.approx(0.5)
    assert s["dice_mean"] == pytest.approx((0.9 + 0.8 + 0.0 + 0.7) / 4)
    # matched errors 4, 1, 0 -> median 1
    assert s["bme_abs_error_median"] == pytest.approx(1.0)
    assert s["bme_presence"] == {"tp": 1, "fn": 0, "tn": 2, "fp": 0}
    assert s["cement_abs_error_ml_median"] == pytest.approx(0.5)
    assert s["cement_relative_abs_error_median"] == pytest.approx(0.2)
    # Genant leaves out S1 (26): bodies 20 (2 vs 2) and 21 (0 vs 1) -> 50 %.
    assert s["genant_exact_agreement"] == pytest.approx(0.5)
    assert s["targets"]["level_labelling_accuracy"]["target_met"] is False
    assert s["targets"]["bme_abs_error_median"]["target_met"] is True


def test_table_shows_more_digits_when_a_missed_target_would_look_met(
    accuracy: ModuleType,
) -> None:
    stored = json.loads((BENCHMARKS / "results" / "accuracy.json").read_text())
    result = {"config": stored["config"], "summary": {"pipeline": stored["summary"]["pipeline"]}}
    pipeline = result["summary"]["pipeline"]

    def genant_row(value: float) -> str:
        pipeline["genant_exact_agreement"] = value
        pipeline["targets"]["genant_exact_agreement"]["target_met"] = value >= 0.85
        table = accuracy.markdown_table(result)
        return next(line for line in table.splitlines() if "Genant exact" in line)

    assert "| 84.97 % (NOT met) |" in genant_row(0.8497)
    assert "| 86.0 % (met) |" in genant_row(0.86)
    assert "| 85.0 % (met) |" in genant_row(0.85)
    assert "| 84.999 % (NOT met) |" in genant_row(0.84999)


def test_accuracy_runs_on_two_tiny_phantoms(
    accuracy: ModuleType, tiny_params: PhantomParameters, tmp_path: Path
) -> None:
    accuracy.run_accuracy([11, 12], tiny_params, out_dir=tmp_path, progress=False)
    for name in ("accuracy.json", "accuracy.md", "bland_altman_bme.png", "accuracy_bodies.csv"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "accuracy.json").read_text())
    assert set(saved["summary"]) == {"pipeline", "truth_labels"}
    truth = saved["summary"]["truth_labels"]
    # The true label map measured as an external map must match itself exactly.
    assert truth["n_failed_studies"] == 0
    assert truth["dice_mean"] == pytest.approx(1.0)
    assert truth["level_labelling_accuracy"] == pytest.approx(1.0)
    assert set(truth["targets"]) == set(accuracy.TARGETS)
    assert saved["summary"]["pipeline"]["n_studies"] == 2
    assert (tmp_path / "bland_altman_bme.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_test_retest_runs_on_two_tiny_phantoms(
    test_retest: ModuleType, tiny_params: PhantomParameters, tmp_path: Path
) -> None:
    out = tmp_path / "tr.json"
    result = test_retest.run_test_retest(
        [11], tiny_params, modes=["truth_labels"], out=out, progress=False
    )
    s = result["summary"]["truth_labels"]
    assert s["n_bodies"] == s["n_truth_bodies"] > 0
    assert s["max_truth_difference"] == 0.0  # same anatomy: same truth
    assert 0.0 <= s["share_within_2_points"] <= 1.0
    assert json.loads(out.read_text())["config"]["noise_seeds"] == [1, 2]


def test_speed_runs_on_a_tiny_phantom(tiny_params: PhantomParameters) -> None:
    speed = _load("speed")
    result = speed.run_speed([11], repetitions=1, params=tiny_params, progress=False)
    study = result["studies"][0]
    assert study["n_files"] == sum(s[0] for s in (study["stir_shape"], study["t1_shape"]))
    assert study["ratio_quantify_to_pydicom"] == pytest.approx(
        study["quantify_seconds"] / study["pydicom_seconds"]
    )
    assert study["quantify_peak_rss_mb"] > 0
    assert set(result["summary"]["targets"]) == {
        "seconds_per_study", "ratio_to_pydicom", "peak_memory_mb",
        "cpu_seconds_per_study", "cpu_ratio_to_pydicom"
    }  # fmt: skip
