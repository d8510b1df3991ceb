"""Tests of edema, cement, rim and reference marrow on synthetic spines of known geometry.

The synthetic spine: five box-shaped bodies L1..L5 (10 sagittal slices of 4 mm, 42 rows x 55
columns of 0.6 mm) with a 2-pixel dark cortex, marrow whose value alternates between
slices (STIR 190 / 210 with T1 480 / 520), so the reference statistics are known by hand:
median 200 and 500, MAD 10 and 20, SD = 1.4826 x MAD.  Thresholds at k = 3:
STIR > 244.478, T1 < 411.044.  Lesions are boxes with intensities far from every threshold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pytest

from bmetrack.imaging.edema import (
    MAD_TO_SD,
    Quantification,
    ReferenceMarrowError,
    quantify_vertebrae,
    robust_stats,
)
from bmetrack.imaging.volume import Volume

SPACING = (4.0, 0.6, 0.6)
VOXEL_ML = 4.0 * 0.6 * 0.6 / 1000.0
SAGITTAL = np.column_stack([(-1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0)])
N_SLICES, N_COLS = 14, 100
BODY_SLICES = slice(2, 12)
BODY_ROWS, BODY_COLS = 42, 55
COL0 = 20
TOP_MARGIN, DISC_ROWS = 10, 13
BODY_VOXELS = 10 * BODY_ROWS * BODY_COLS
LEVELS = {20: "L1", 21: "L2", 22: "L3", 23: "L4", 24: "L5"}

EDEMA = (600.0, 200.0)  # (STIR, T1): bright STIR, dark T1
CEMENT = (10.0, 20.0)
RIM = (800.0, 250.0)
HEMANGIOMA = (500.0, 900.0)
STIR_ONLY = (600.0, 500.0)
T1_ONLY = (200.0, 200.0)
MILD = (230.0, 450.0)  # edema for k = 1 (STIR > 214.8, T1 < 470.3), not for k = 3

REF_STIR_SD = MAD_TO_SD * 10.0
REF_T1_SD = MAD_TO_SD * 20.0


@dataclass
class Spine:
    stir: np.ndarray
    t1: np.ndarray
    labels: np.ndarray
    body_rows: dict[int, int] = field(default_factory=dict)  # label -> first row

    def volumes(self) -> tuple[Volume, Volume, Volume]:
        def vol(a: np.ndarray, uid: str) -> Volume:
            return Volume.from_geometry(
                a, spacing_mm=SPACING, direction=SAGITTAL, series_instance_uid=uid
            )

        return vol(self.stir, "1.2.3.1"), vol(self.t1, "1.2.3.2"), vol(self.labels, "1.2.3.3")

    def region(
        self, label: int, slices: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int]
    ) -> tuple[slice, slice, slice]:
        """Array index of a box given in body-relative rows and columns."""
        r0 = self.body_rows[label]
        return (
            slice(*slices),
            slice(r0 + rows[0], r0 + rows[1]),
            slice(COL0 + cols[0], COL0 + cols[1]),
        )

    def paint(self, index: tuple[slice, ...] | np.ndarray, values: tuple[float, float]) -> None:
        self.stir[index] = values[0]
        self.t1[index] = values[1]

    def add_noise(self, sd: float, seed: int = 7) -> None:
        """Gaussian noise, SD ``sd`` on STIR and ``2 sd`` on T1 (same SNR as the marrow)."""
        rng = np.random.default_rng(seed)
        self.stir += rng.normal(0.0, sd, self.stir.shape)
        self.t1 += rng.normal(0.0, 2 * sd, self.t1.shape)

    def quantify(self, **kwargs: object) -> Quantification:
        return quantify_vertebrae(*self.volumes(), **kwargs)  # type: ignore[arg-type]


def make_spine(labels: tuple[int, ...] = (20, 21, 22, 23, 24), *, cortex_px: int = 2) -> Spine:
    n_rows = TOP_MARGIN * 2 + len(labels) * (BODY_ROWS + DISC_ROWS)
    shape = (N_SLICES, n_rows, N_COLS)
    stir = np.full(shape, 50.0)
    t1 = np.full(shape, 100.0)
    lab = np.zeros(shape, dtype=np.int16)
    spine = Spine(stir, t1, lab)
    even = (np.arange(N_SLICES) % 2 == 0)[:, None, None]
    for i, label in enumerate(labels):
        r0 = TOP_MARGIN + i * (BODY_ROWS + DISC_ROWS)
        spine.body_rows[label] = r0
        box = (BODY_SLICES, slice(r0, r0 + BODY_ROWS), slice(COL0, COL0 + BODY_COLS))
        lab[box] = label
        stir[box] = np.where(even, 190.0, 210.0)[BODY_SLICES]
        t1[box] = np.where(even, 480.0, 520.0)[BODY_SLICES]
        if cortex_px:
            shell = np.ones((BODY_ROWS, BODY_COLS), dtype=bool)
            shell[cortex_px:-cortex_px, cortex_px:-cortex_px] = False
            for s in range(BODY_SLICES.start, BODY_SLICES.stop):
                stir[s, r0 : r0 + BODY_ROWS, COL0 : COL0 + BODY_COLS][shell] = 20.0
                t1[s, r0 : r0 + BODY_ROWS, COL0 : COL0 + BODY_COLS][shell] = 40.0
    return spine


def by_level(q: Quantification) -> dict[str, dict[str, object]]:
    return {v["level"]: v for v in q.to_contract_dict()["vertebrae"]}


# ------------------------------------------------------------------------------ basics
def test_robust_stats_by_hand() -> None:
    med, sd = robust_stats([1.0, 2.0, 3.0, 4.0, 100.0])
    assert med == 3.0
    assert sd == pytest.approx(1.4826 * 1.0)


def test_normal_spine_has_no_edema_cement_or_rim_and_hand_reference() -> None:
    q = make_spine().quantify()
    assert q.reference["levels"] == ["L1", "L2", "L3", "L4", "L5"]
    assert q.reference["stir_median"] == pytest.approx(200.0)
    assert q.reference["t1_median"] == pytest.approx(500.0)
    assert q.reference["stir_sd"] == pytest.approx(REF_STIR_SD)
    assert q.reference["t1_sd"] == pytest.approx(REF_T1_SD)
    for v in q.vertebrae:
        # the dark 2-pixel cortex must not be taken for cement
        assert v.cement_volume_ml == 0.0
        assert v.edema_volume_ml == 0.0
        assert v.rim_volume_ml == 0.0
        assert v.body_volume_ml == pytest.approx(BODY_VOXELS * VOXEL_ML)
        assert v.genant_grade == 0
        assert v.deformity == "none"
        assert v.bme_present is False
        assert v.heights_mm["middle"] == pytest.approx(BODY_ROWS * 0.6, abs=0.05)
    assert not any(m.any() for m in q.masks.values())
    assert q.warnings == []


def test_edema_box_gives_hand_computed_bme_percent() -> None:
    spine = make_spine()
    spine.paint(spine.region(20, (4, 9), (8, 23), (10, 30)), EDEMA)  # 5 x 15 x 20 voxels
    q = spine.quantify()
    v = by_level(q)["L1"]
    expected = 100.0 * 1500 / BODY_VOXELS
    assert q.vertebrae[0].bme_percent == pytest.approx(expected, abs=1e-9)
    assert q.vertebrae[0].edema_volume_ml == pytest.approx(1500 * VOXEL_ML)
    assert v["bme_percent"] == round(expected, 1)
    assert v["bme_present"] is True
    assert int(q.masks["edema"].sum()) == 1500
    assert "L1" not in q.reference["levels"]  # edematous body is not reference marrow
    assert q.reference["stir_median"] == pytest.approx(200.0)
    for level in ("L2", "L3", "L4", "L5"):
        assert by_level(q)[level]["edema_volume_ml"] == 0.0


def test_noisy_edema_within_tolerance() -> None:
    spine = make_spine()
    spine.paint(spine.region(20, (4, 9), (8, 23), (10, 30)), EDEMA)
    spine.paint(spine.region(21, (5, 9), (12, 27), (15, 30)), CEMENT)
    spine.add_noise(15.0)
    q = spine.quantify()
    levels = by_level(q)
    assert q.vertebrae[0].bme_percent == pytest.approx(100.0 * 1500 / BODY_VOXELS, abs=0.3)
    assert q.vertebrae[1].cement_volume_ml == pytest.approx(900 * VOXEL_ML, rel=0.05)
    for level in ("L3", "L4", "L5"):
        assert levels[level]["bme_percent"] < 0.5
        assert levels[level]["cement_volume_ml"] < 0.05


def test_cement_volume_exact_and_rim_not_edema() -> None:
    spine = make_spine()
    idx = spine.region(21, (5, 9), (12, 27), (15, 30))  # 4 x 15 x 15 = 900 voxels
    # Rim: every voxel of the same slices within 2 mm of the cement box (computed by hand).
    r0 = spine.body_rows[21]
    rows = np.arange(spine.labels.shape[1])[:, None]
    cols = np.arange(N_COLS)[None, :]
    dr = np.maximum(0, np.maximum((r0 + 12) - rows, rows - (r0 + 26))) * 0.6
    dc = np.maximum(0, np.maximum((COL0 + 15) - cols, cols - (COL0 + 29))) * 0.6
    dist = np.hypot(dr, dc)
    ring = (dist > 0) & (dist <= 2.0)
    rim_index = np.zeros(spine.labels.shape, dtype=bool)
    rim_index[5:9] = ring
    spine.paint(rim_index, RIM)
    spine.paint(idx, CEMENT)
    q = spine.quantify()
    l2 = q.vertebrae[1]
    assert l2.level == "L2"
    assert l2.cement_volume_ml == pytest.approx(900 * VOXEL_ML)
    assert l2.rim_volume_ml == pytest.approx(int(rim_index.sum()) * VOXEL_ML)
    assert l2.edema_volume_ml == 0.0
    assert l2.bme_percent == 0.0
    assert np.array_equal(q.masks["rim"], rim_index)
    assert "L2" not in q.reference["levels"]  # treated body is not reference marrow


def test_bme_percent_denominator_excludes_cement() -> None:
    spine = make_spine()
    spine.paint(spine.region(21, (5, 9), (12, 27), (15, 30)), CEMENT)  # 900 voxels
    spine.paint(spine.region(21, (3, 11), (30, 38), (10, 40)), EDEMA)  # 8 x 8 x 30 = 1920
    v = spine.quantify().vertebrae[1]
    assert v.bme_percent == pytest.approx(100.0 * 1920 / (BODY_VOXELS - 900))


def test_hemangioma_is_not_edema_for_any_rule() -> None:
    spine = make_spine()
    spine.paint(spine.region(22, (4, 8), (10, 30), (10, 35)), HEMANGIOMA)
    for rule in ("stir_and_t1", "stir_only", "t1_only"):
        q = spine.quantify(settings={"edema_rule": rule})
        assert q.vertebrae[2].edema_volume_ml == 0.0, rule


def test_edema_rule_variants() -> None:
    spine = make_spine()
    spine.paint(spine.region(20, (4, 8), (8, 18), (10, 30)), EDEMA)  # 800: every rule
    spine.paint(spine.region(20, (4, 8), (24, 34), (10, 30)), STIR_ONLY)  # 800
    spine.paint(spine.region(20, (4, 8), (8, 18), (34, 48)), T1_ONLY)  # 4 x 10 x 14 = 560
    counts = {
        rule: int(spine.quantify(settings={"edema_rule": rule}).masks["edema"].sum())
        for rule in ("stir_and_t1", "stir_only", "t1_only")
    }
    assert counts == {"stir_and_t1": 800, "stir_only": 1600, "t1_only": 1360}


def test_k_setting_changes_threshold() -> None:
    spine = make_spine()
    spine.paint(spine.region(20, (4, 9), (8, 23), (10, 30)), EDEMA)  # 1500
    spine.paint(spine.region(20, (4, 9), (26, 36), (10, 30)), MILD)  # 5 x 10 x 20 = 1000
    assert int(spine.quantify().masks["edema"].sum()) == 1500
    q1 = spine.quantify(settings={"edema_k_sd": 1.0})
    assert int(q1.masks["edema"].sum()) == 2500
    assert q1.provenance["parameters"]["edema_k_sd"] == 1.0


def test_surface_margin_excludes_a_one_voxel_shell() -> None:
    spine = make_spine(cortex_px=0)
    r0 = spine.body_rows[20]
    whole = (BODY_SLICES, slice(r0, r0 + BODY_ROWS), slice(COL0, COL0 + BODY_COLS))
    spine.paint(whole, EDEMA)
    margins = {0.0: BODY_VOXELS, 1.0: 10 * 40 * 53, 2.0: 10 * 36 * 49}
    for margin, voxels in margins.items():
        q = spine.quantify(settings={"edema_surface_margin_mm": margin})
        assert int(q.masks["edema"].sum()) == voxels, margin
    # Across 4 mm slices a 5 mm margin also removes the outermost slice on each side.
    q = spine.quantify(settings={"edema_surface_margin_mm": 5.0})
    assert int(q.masks["edema"].sum()) == 8 * (BODY_ROWS - 16) * (BODY_COLS - 16)


def test_small_clusters_are_removed() -> None:
    spine = make_spine()
    spine.paint(spine.region(20, (5, 6), (8, 14), (10, 20)), EDEMA)  # 60 voxels = 0.0864 ml
    spine.paint(spine.region(20, (5, 6), (20, 28), (10, 20)), EDEMA)  # 80 voxels = 0.1152 ml
    assert int(spine.quantify().masks["edema"].sum()) == 80
    q0 = spine.quantify(settings={"edema_min_cluster_ml": 0.0})
    assert int(q0.masks["edema"].sum()) == 140


def test_fewer_than_min_reference_bodies_warns() -> None:
    spine = make_spine((20, 21))
    spine.paint(spine.region(20, (3, 11), (6, 36), (6, 49)), EDEMA)
    q = spine.quantify()
    assert q.reference["levels"] == ["L2"]
    assert any("Only 1 usable reference body" in w for w in q.warnings)


def test_reference_levels_are_honoured() -> None:
    spine = make_spine()
    r0 = spine.body_rows[22]
    spine.stir[BODY_SLICES, r0 + 2 : r0 + BODY_ROWS - 2, COL0 + 2 : COL0 + BODY_COLS - 2] = 300.0
    spine.t1[BODY_SLICES, r0 + 2 : r0 + BODY_ROWS - 2, COL0 + 2 : COL0 + BODY_COLS - 2] = 700.0
    q = spine.quantify(reference_levels=["L3"])
    assert q.reference["levels"] == ["L3"]
    assert q.reference["stir_median"] == 300.0
    assert q.reference["t1_median"] == 700.0
    with pytest.raises(ReferenceMarrowError, match="T9"):
        spine.quantify(reference_levels=["T9"])


def test_no_usable_reference_is_an_error() -> None:
    spine = make_spine((20, 21))
    spine.paint(spine.region(20, (5, 9), (12, 27), (15, 30)), CEMENT)  # L1 treated
    r0 = spine.body_rows[21]
    spine.labels[BODY_SLICES, r0 : r0 + 14, COL0 : COL0 + BODY_COLS] = 0  # L2 crushed
    with pytest.raises(ReferenceMarrowError, match="reference"):
        spine.quantify()
    q = spine.quantify(reference_levels=["L1"])  # the user can still name one
    assert q.reference["levels"] == ["L1"]


def test_grids_must_match() -> None:
    stir, t1, labels = make_spine((20, 21)).volumes()
    shifted = Volume.from_geometry(
        t1.array, spacing_mm=SPACING, direction=SAGITTAL, origin_lps=(0.0, 0.0, 5.0)
    )
    with pytest.raises(ValueError, match="resample"):
        quantify_vertebrae(stir, shifted, labels)


def test_abnormal_bodies_are_judged_against_the_others_not_the_pool() -> None:
    """Two of five bodies STIR-bright throughout with a weak T1 change (T1 430 > 411.044,
    so not edema by the stir_and_t1 rule against the normal marrow).  Pooled with the
    three normal bodies they would raise the T1 SD to about 59 (threshold about 302) and hide
    the T1 380 edema box in L4; judged against the other bodies they are dropped, the
    reference is the hand one and the box is edema."""
    spine = make_spine()
    for label in (20, 21):
        spine.paint(spine.region(label, (2, 12), (2, 40), (2, 53)), (600.0, 430.0))
    spine.paint(spine.region(23, (4, 9), (8, 23), (10, 30)), (600.0, 380.0))  # 1500 voxels
    q = spine.quantify()
    assert q.reference["levels"] == ["L3", "L5"]  # L4 holds edema (8.5% of its core)
    assert q.reference["stir_median"] == pytest.approx(200.0)
    assert q.reference["t1_median"] == pytest.approx(500.0)
    assert q.reference["t1_sd"] == pytest.approx(REF_T1_SD, rel=0.05)
    assert by_level(q)["L4"]["edema_volume_ml"] == pytest.approx(1500 * VOXEL_ML)


def test_fractured_body_is_graded_and_excluded_from_reference() -> None:
    spine = make_spine()
    r0 = spine.body_rows[22]
    # Crush L3 to 28 rows (16.8 mm vs 25.2 mm neighbours: 33 % loss, grade 2).
    spine.labels[BODY_SLICES, r0 : r0 + 14, COL0 : COL0 + BODY_COLS] = 0
    q = spine.quantify()
    l3 = by_level(q)["L3"]
    assert l3["genant_grade"] == 2
    assert l3["deformity"] == "crush"
    assert l3["height_loss_percent"] == pytest.approx(100 / 3, abs=1.0)
    assert "L3" not in q.reference["levels"]


def test_contract_dict_shape_and_provenance() -> None:
    spine = make_spine()
    spine.paint(spine.region(20, (4, 9), (8, 23), (10, 30)), EDEMA)
    q = spine.quantify()
    d = q.to_contract_dict()
    assert set(d) == {"vertebrae", "reference", "warnings"}
    assert set(d["reference"]) >= {"levels", "stir_median", "t1_median"}
    keys = {
        "level",
        "label",
        "body_volume_ml",
        "edema_volume_ml",
        "cement_volume_ml",
        "rim_volume_ml",
        "bme_percent",
        "bme_present",
        "heights_mm",
        "height_loss_percent",
        "genant_grade",
        "deformity",
    }
    for v in d["vertebrae"]:
        assert set(v) == keys
        assert set(v["heights_mm"]) == {"anterior", "middle", "posterior"}
        assert isinstance(v["bme_present"], bool)
        assert isinstance(v["genant_grade"], int)
    assert [v["label"] for v in d["vertebrae"]] == [20, 21, 22, 23, 24]

    json.dumps(d)
    assert q.provenance["algorithm"] == "bmetrack.edema"
    assert q.provenance["version"] == "1.1.0"
    assert q.provenance["input_series_uids"] == {
        "stir": "1.2.3.1",
        "t1": "1.2.3.2",
        "labels": "1.2.3.3",
    }
    params = q.provenance["parameters"]
    assert params["edema_rule"] == "stir_and_t1"
    assert params["cement_min_component_ml"] == 0.05
    json.dumps(q.provenance)
    assert q.masks["edema"].shape == spine.labels.shape
    assert q.masks["edema"].dtype == bool


def test_flipped_rows_and_columns_give_the_same_results() -> None:
    spine = make_spine()
    spine.paint(spine.region(20, (4, 9), (8, 23), (10, 30)), EDEMA)
    r0 = spine.body_rows[22]
    spine.labels[BODY_SLICES, r0 : r0 + 14, COL0 : COL0 + BODY_COLS] = 0  # crushed L3
    base = spine.quantify().to_contract_dict()
    flipped_dir = SAGITTAL.copy()
    flipped_dir[:, 1:] *= -1  # rows run upward, columns forward
    vols = [
        Volume.from_geometry(
            np.ascontiguousarray(a[:, ::-1, ::-1]), spacing_mm=SPACING, direction=flipped_dir
        )
        for a in (spine.stir, spine.t1, spine.labels)
    ]
    flipped = quantify_vertebrae(*vols).to_contract_dict()
    assert flipped["vertebrae"] == base["vertebrae"]


def test_body_touching_the_image_edge_is_warned() -> None:
    spine = make_spine((20, 21))
    r0 = spine.body_rows[20]
    spine.labels[BODY_SLICES, 0:r0, COL0 : COL0 + BODY_COLS] = 20  # L1 reaches the top row
    q = spine.quantify()
    assert any("L1 touches the edge" in w for w in q.warnings)


def test_phantom_study_agrees_with_truth() -> None:
    """A small phantom (own anatomy, noise, bias field, partial volume, T1 on another grid)
    measured with its true labels agrees with its ground truth."""
    phantom_mod = pytest.importorskip("bmetrack.simulate.phantom")
    params = phantom_mod.PhantomParameters(
        n_slices=15,
        n_rows=320,
        n_columns=256,
        pixel_spacing_mm=0.9,
        top_level="T12",
        sacrum_in_view=True,
        fractures=[
            phantom_mod.FractureSpec("L1", "wedge", 2, "band", 40.0, 0.0, False),
            phantom_mod.FractureSpec("L3", "crush", 2, "band", 30.0, 4.0, False),
        ],
        hemangioma_probability=0.0,
        t1_grid="different",
    )
    ph = phantom_mod.make_phantom(params, seed=11)
    truth = ph.truth[~ph.truth["partially_visible"].astype(bool)]
    labels = np.asarray(ph.labels.array).copy()
    labels[~np.isin(labels, truth["label"].to_numpy())] = 0
    q = quantify_vertebrae(
        ph.stir, ph.t1.resample_to(ph.stir, fill_value=np.nan), ph.labels.with_array(labels)
    )
    got = {v.label: v for v in q.vertebrae}
    for row in truth.itertuples():
        v = got[int(row.label)]
        assert v.body_volume_ml == pytest.approx(row.body_volume_ml, rel=1e-6)
        if row.bme_percent > 0:
            assert v.bme_percent == pytest.approx(row.bme_percent, abs=10.0), row.level
        else:
            assert v.bme_percent < 2.0, row.level
        if row.cement_volume_ml > 0:
            assert v.cement_volume_ml == pytest.approx(row.cement_volume_ml, rel=0.3)
        else:
            assert v.cement_volume_ml < 0.1, row.level
        assert v.bme_present == bool(row.bme_present), row.level
        if row.level in ("L1", "L3"):
            assert v.genant_grade >= 1, row.level
        else:
            assert v.genant_grade <= 1, row.level
