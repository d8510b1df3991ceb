"""Tests of the MRI phantom generator `bmetrack.simulate.phantom`.

Small matrices (15 slices of 128 x 128 at 2.4 mm, same field of view as the default) keep the
file fast.  Truth is checked against hand computations from the label maps and masks (voxel
counts x the voxel volume from the affine, the METHOD.md 3-4 formulas), never against the
generator's own bookkeeping.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from bmetrack.anatomy import label_from_level
from bmetrack.simulate.phantom import (
    TISSUES,
    TRUTH_COLUMNS,
    FractureSpec,
    Phantom,
    PhantomParameters,
    make_phantom,
    phantom_for_visit,
)

SMALL = {"n_slices": 15, "n_rows": 128, "n_columns": 128, "pixel_spacing_mm": 2.4}
FRACTURES = (
    FractureSpec("L1", "wedge", grade=2, edema_pattern="band", bme_percent=45.0),
    FractureSpec(
        "T12", "biconcave", grade=3, edema_pattern="diffuse", bme_percent=60.0,
        cement_volume_ml=4.0, rim=True,
    ),
    FractureSpec("L3", "crush", grade=1, edema_pattern="patchy", bme_percent=20.0),
)  # fmt: skip


def _params(**kw: object) -> PhantomParameters:
    base: dict[str, object] = {
        **SMALL,
        "fractures": FRACTURES,
        "sacrum_in_view": True,
        "hemangioma_probability": 0.0,
    }
    base.update(kw)
    return PhantomParameters(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_phantom(_params(t1_grid="same", hemangioma_probability=0.5), seed=11)


@pytest.fixture(scope="module")
def medium() -> Phantom:
    """1.2 mm pixels: fine enough for intensity statistics of small structures."""
    return make_phantom(
        _params(n_rows=256, n_columns=256, pixel_spacing_mm=1.2, t1_grid="same"), seed=15
    )


def _voxel_ml(ph: Phantom) -> float:
    # Independent of Volume.voxel_volume_ml: spacing along the three affine columns.
    cols = ph.labels.affine[:3, :3]
    return float(np.prod(np.linalg.norm(cols, axis=0)) / 1000.0)


def _row(ph: Phantom, level: str) -> dict[str, object]:
    rows = ph.truth[ph.truth.level == level]
    assert len(rows) == 1, f"{level} not in truth: {ph.truth.level.tolist()}"
    return rows.iloc[0].to_dict()


# --------------------------------------------------------------------------- reproducibility
def test_same_seed_gives_identical_study() -> None:
    a = make_phantom(_params(), seed=3)
    b = make_phantom(_params(), seed=3)
    assert np.array_equal(a.stir.array, b.stir.array)
    assert np.array_equal(a.t1.array, b.t1.array)
    assert np.array_equal(a.labels.array, b.labels.array)
    assert a.truth.equals(b.truth)


def test_other_seed_gives_other_anatomy() -> None:
    a = make_phantom(_params(), seed=3)
    b = make_phantom(_params(), seed=4)
    assert not np.array_equal(a.labels.array, b.labels.array)


def test_noise_seed_changes_only_the_noise() -> None:
    a = make_phantom(_params(), seed=5)
    b = make_phantom(_params(noise_seed=1), seed=5)
    assert np.array_equal(a.labels.array, b.labels.array)
    assert np.allclose(a.stir.affine, b.stir.affine)
    assert a.truth.equals(b.truth)
    assert np.any(a.stir.array != b.stir.array)
    # Same underlying image: the two T1 images are highly correlated, not identical.
    r = np.corrcoef(a.t1.array.ravel(), b.t1.array.ravel())[0, 1]
    assert 0.85 < r < 1.0


# --------------------------------------------------------------------------- truth consistency
def test_truth_columns_and_levels(phantom: Phantom) -> None:
    assert tuple(phantom.truth.columns) == TRUTH_COLUMNS
    for _, row in phantom.truth.iterrows():
        assert row.label == label_from_level(row.level)
    assert phantom.sacrum_in_view
    assert phantom.lowest_level == "S1"
    assert phantom.levels[0] == "S1"
    assert {"T12", "L1", "L2", "L3", "L4", "L5"} <= set(phantom.levels)


def test_volumes_are_voxel_counts_times_voxel_volume(phantom: Phantom) -> None:
    vml = _voxel_ml(phantom)
    lab = phantom.labels.array
    for _, row in phantom.truth.iterrows():
        body = lab == row.label
        assert row.body_volume_ml == pytest.approx(body.sum() * vml, rel=1e-9)
        for name, col in (("edema", "edema_volume_ml"), ("cement", "cement_volume_ml"),
                          ("rim", "rim_volume_ml")):  # fmt: skip
            count = (phantom.masks[name].array & body).sum()
            assert row[col] == pytest.approx(count * vml, rel=1e-9, abs=1e-12)


def test_bme_percent_follows_method_formula_and_request(phantom: Phantom) -> None:
    lab = phantom.labels.array
    for spec in FRACTURES:
        row = _row(phantom, spec.level)
        body = lab == label_from_level(spec.level)
        n_edema = (phantom.masks["edema"].array & body).sum()
        n_cement = (phantom.masks["cement"].array & body).sum()
        expected = 100.0 * n_edema / (body.sum() - n_cement)
        assert row["bme_percent"] == pytest.approx(expected, rel=1e-9)
        assert abs(row["bme_percent"] - spec.bme_percent) <= 1.0
        assert row["bme_present"] == (row["bme_percent"] >= 5.0)
    for _, row in phantom.truth.iterrows():
        if row.level not in {s.level for s in FRACTURES}:
            assert row.bme_percent == 0.0


def test_cement_volume_matches_request_and_stays_in_treated_body(phantom: Phantom) -> None:
    lab = phantom.labels.array
    cement = phantom.masks["cement"].array
    t12 = label_from_level("T12")
    assert cement.any()
    assert np.all(lab[cement] == t12)
    assert _row(phantom, "T12")["cement_volume_ml"] == pytest.approx(4.0, abs=0.1)
    rim = phantom.masks["rim"].array
    assert np.all(lab[rim] == t12)
    # The rim is a shell around the cement: every rim voxel is within 2 mm + one voxel of it.
    from scipy import ndimage

    spacing = np.linalg.norm(phantom.labels.affine[:3, :3], axis=0)
    dist = ndimage.distance_transform_edt(~cement, sampling=spacing)
    assert np.all(dist[rim] <= 2.0 + spacing.max())


def test_edema_truth_leaves_the_rim_zone_to_the_rim(medium: Phantom) -> None:
    # METHOD.md 3: STIR-bright voxels within rim_width_mm of the cement are rim, not BME.
    from scipy import ndimage

    from bmetrack.settings import resolve_settings

    phantom = medium  # 1.2 mm pixels: the 2 mm zone holds whole voxels
    width = float(resolve_settings()["rim_width_mm"])
    cement = phantom.masks["cement"].array
    spacing = np.linalg.norm(phantom.labels.affine[:3, :3], axis=0)
    dist = ndimage.distance_transform_edt(~cement, sampling=spacing)
    zone = (dist > 0) & (dist <= width + 1e-6) & (phantom.labels.array == label_from_level("T12"))
    assert not np.any(phantom.masks["edema"].array & zone)
    # T12 (60 % BME around 4 ml of cement) has edema drawn up to the cement: it is rim now.
    rim = phantom.masks["rim"].array
    assert (rim & zone).sum() > 0.2 * zone.sum()
    assert _row(phantom, "T12")["rim_volume_ml"] == pytest.approx(
        (rim & (phantom.labels.array == label_from_level("T12"))).sum() * _voxel_ml(phantom)
    )


def test_masks_only_inside_bodies_and_disjoint(phantom: Phantom) -> None:
    lab = phantom.labels.array
    masks = phantom.masks
    for name in ("edema", "cement", "rim", "hemangioma"):
        assert masks[name].array.dtype == bool
        assert masks[name].has_same_geometry(phantom.stir)
        assert np.all(lab[masks[name].array] > 0), name
    total = sum(m.array.astype(int) for m in masks.values())
    assert total.max() <= 1
    # Hemangiomas are fat-containing lesions, never edema.
    assert not np.any(masks["hemangioma"].array & masks["edema"].array)


def test_labels_are_bodies_without_posterior_elements(phantom: Phantom) -> None:
    lab = phantom.labels.array
    ijk = np.argwhere(lab > 0)
    world = phantom.labels.world_coordinates(ijk)
    values = lab[lab > 0]
    for label in np.unique(values):
        pts = world[values == label]
        # Antero-posterior extent of a body is < 55 mm; posterior elements reach 60-90 mm back.
        assert np.ptp(pts[:, 1]) < 55.0, label
    # Posterior-element marrow exists in the images but carries no label.
    pe = phantom.tissue.array == TISSUES["pe_marrow"]
    assert pe.sum() > 50
    assert np.all(lab[pe] == 0)


def test_hemangioma_truth(phantom: Phantom) -> None:
    hem = phantom.masks["hemangioma"].array
    rows = phantom.truth[phantom.truth.has_hemangioma]
    assert hem.any() == (len(rows) > 0)
    for _, row in rows.iterrows():
        assert row.edema_volume_ml == 0.0
        assert row.fracture_type == "none"


# --------------------------------------------------------------------------- deformity
def test_genant_grade_equals_request_and_formula(phantom: Phantom) -> None:
    truth = phantom.truth.set_index("level")
    for spec in FRACTURES:
        row = truth.loc[spec.level]
        assert row.genant_grade == spec.grade
        assert row.deformity == spec.fracture_type
        assert row.fracture_type == spec.fracture_type
    # Recompute METHOD.md 4 from the table: expected = mean posterior height of the adjacent
    # normal (unfractured, fully visible, non-sacral) bodies, else the own posterior height.
    order = ["T11", "T12", "L1", "L2", "L3", "L4", "L5"]
    fractured = {s.level for s in FRACTURES}
    for i, level in enumerate(order[1:-1], start=1):
        row = truth.loc[level]
        neighbours = [
            truth.loc[n].height_posterior_mm
            for n in (order[i - 1], order[i + 1])
            if n in truth.index and n not in fractured and not truth.loc[n].partially_visible
        ]
        expected = np.mean(neighbours) if neighbours else row.height_posterior_mm
        heights = [row.height_anterior_mm, row.height_middle_mm, row.height_posterior_mm]
        loss = max(0.0, 100 * (1 - min(heights) / expected))
        assert row.height_loss_percent == pytest.approx(loss, abs=1e-6)
        grade = 3 if loss >= 40 else 2 if loss >= 25 else 1 if loss >= 20 else 0
        assert row.genant_grade == grade


def test_deformity_shapes() -> None:
    ph = make_phantom(_params(), seed=12)
    t = ph.truth.set_index("level")
    wedge, bic, crush = t.loc["L1"], t.loc["T12"], t.loc["L3"]
    assert wedge.height_anterior_mm < wedge.height_middle_mm < wedge.height_posterior_mm
    assert bic.height_middle_mm < min(bic.height_anterior_mm, bic.height_posterior_mm)
    # Crush: the posterior wall collapses too (>= 15 % of the expected height).
    assert crush.height_posterior_mm < 0.85 * crush.expected_height_mm
    for level in ("L2", "L4"):
        assert t.loc[level].genant_grade == 0


# --------------------------------------------------------------------------- intensities
def test_intensity_statistics(medium: Phantom) -> None:
    from scipy import ndimage

    phantom = medium
    stir, t1, tis = phantom.stir.array, phantom.t1.array, phantom.tissue.array
    lab = phantom.labels.array
    edema = phantom.masks["edema"].array
    # Cement core (one voxel in from its surface in-plane), away from the bright rim.
    cement = ndimage.binary_erosion(phantom.masks["cement"].array, np.ones((1, 3, 3), bool))
    marrow = (tis == TISSUES["marrow"]) & (lab > 0) & ~edema
    # Normal marrow of unfractured bodies, away from lesions.
    normal_labels = [label_from_level(lv) for lv in ("L2", "L4", "L5")]
    normal = marrow & np.isin(lab, normal_labels)
    sd = stir[normal].std()
    assert stir[edema].mean() > stir[normal].mean() + 3 * sd
    assert t1[edema].mean() < t1[normal].mean()
    # Edema replaces marrow fat: its T1 (core, away from partial volume) lies at least
    # halfway from fatty marrow down to muscle.
    core = ndimage.binary_erosion(edema, np.ones((1, 3, 3), bool))
    muscle_t1 = np.median(t1[tis == TISSUES["muscle"]])
    marrow_t1 = np.median(t1[normal])
    assert np.median(t1[core]) < marrow_t1 - 0.5 * (marrow_t1 - muscle_t1)
    assert cement.sum() > 20
    assert np.median(stir[cement]) < np.median(stir[normal])
    assert np.median(t1[cement]) < 0.5 * np.median(t1[normal])
    fat = tis == TISSUES["fat"]
    muscle = tis == TISSUES["muscle"]
    csf = tis == TISSUES["csf"]
    assert t1[fat].mean() > 2 * t1[muscle].mean()
    assert t1[fat].mean() > t1[normal].mean() > t1[csf].mean()
    assert stir[csf].mean() > 3 * stir[fat].mean()
    assert stir[csf].mean() > 2 * stir[normal].mean()


def test_scanner_scaling_varies_between_studies() -> None:
    medians = []
    for seed in (21, 22, 23):
        ph = make_phantom(_params(fractures=()), seed=seed)
        marrow = (ph.tissue.array == TISSUES["marrow"]) & (ph.labels.array > 0)
        medians.append(float(np.median(ph.stir.array[marrow])))
    assert max(medians) / min(medians) > 1.3


# --------------------------------------------------------------------------- geometry
def test_t1_on_its_own_grid_shows_the_same_anatomy() -> None:
    ph = make_phantom(
        _params(n_rows=256, n_columns=256, pixel_spacing_mm=1.2, t1_grid="different"), seed=8
    )
    assert not ph.t1.has_same_geometry(ph.stir)
    t1_on_stir = ph.t1.resample_to(ph.stir, order=1).array
    tis = ph.tissue.array
    marrow = (tis == TISSUES["marrow"]) & (ph.labels.array > 0)
    csf = tis == TISSUES["csf"]
    fat = tis == TISSUES["fat"]
    assert np.median(t1_on_stir[marrow]) > 2 * np.median(t1_on_stir[csf])
    assert np.median(t1_on_stir[fat]) > 2 * np.median(t1_on_stir[csf])


def test_sacrum_out_of_view_gives_lumbar_anchor() -> None:
    ph = make_phantom(_params(sacrum_in_view=False, fractures=()), seed=9)
    assert not ph.sacrum_in_view
    assert "S1" not in ph.levels
    assert ph.lowest_level.startswith("L")
    assert ph.levels[0] == ph.lowest_level


def test_laterally_cut_bodies_count_for_the_anchor_but_are_partial_in_truth() -> None:
    # A 9-slice slab (40 mm) is narrower than L5 and S1 (~48 mm wide): they leave the slab
    # sideways, while the field of view holds them whole in plane (sacrum requested in view).
    ph = make_phantom(_params(n_slices=9, fractures=(), lateral_offset_max_mm=8.0), seed=21)
    lab = ph.labels.array
    rows = ph.truth.set_index("level")
    for level in ("S1", "L5"):
        body = lab == label_from_level(level)
        # Hand check of the cut from the label map: voxels in an outer slice (k = 0 or last),
        # none on the top/bottom/front/back edge of any slice.
        assert body[0].any() or body[-1].any()
        assert not (body[:, 0, :].any() or body[:, -1, :].any())
        assert not (body[:, :, 0].any() or body[:, :, -1].any())
        assert bool(rows.loc[level].partially_visible)
    assert ph.sacrum_in_view
    assert ph.lowest_level == "S1"
    assert ph.levels[:2] == ["S1", "L5"]


def test_top_level_is_highest_fully_visible_body() -> None:
    ph = make_phantom(_params(top_level="T11", fractures=()), seed=10)
    assert ph.levels[-1] == "T11"
    assert bool(ph.truth.set_index("level").loc["T10"].partially_visible)


def test_flipped_and_oblique_grids_keep_truth_in_world_space() -> None:
    ph = make_phantom(_params(flip_probability=1.0, oblique_max_deg=4.0), seed=13)
    d = ph.stir.direction
    assert d[2, 1] > 0.9  # rows run inferior -> superior
    assert d[1, 2] < -0.9  # columns run posterior -> anterior
    ref = make_phantom(_params(flip_probability=0.0, oblique_max_deg=0.0), seed=13)
    # Same anatomy: the analytic heights do not depend on the acquisition.
    a = ph.truth.set_index("level")
    b = ref.truth.set_index("level")
    common = a.index.intersection(b.index)
    assert len(common) >= 6
    assert np.allclose(a.loc[common].height_middle_mm, b.loc[common].height_middle_mm)


# --------------------------------------------------------------------------- visits
def test_phantom_for_visit_matches_requested_bme_and_keeps_anatomy() -> None:
    specs0 = [{"level": "T12", "bme_percent": 75.0}]
    specs12 = [{"level": "T12", "bme_percent": 20.0, "cement_volume_ml": 3.0}]
    base = PhantomParameters(**SMALL, sacrum_in_view=True)  # type: ignore[arg-type]
    v0 = phantom_for_visit(specs0, 0, 77, params=base)
    v12 = phantom_for_visit(specs12, 12, 77, params=base)
    r0, r12 = _row(v0, "T12"), _row(v12, "T12")
    assert abs(r0["bme_percent"] - 75.0) <= 1.0
    assert abs(r12["bme_percent"] - 20.0) <= 1.0
    assert r0["cement_volume_ml"] == 0.0
    assert r12["cement_volume_ml"] == pytest.approx(3.0, abs=0.1)
    assert r0["genant_grade"] == r12["genant_grade"] >= 1
    assert r0["height_middle_mm"] == pytest.approx(r12["height_middle_mm"])


def test_request_beyond_marrow_share_is_capped_with_warning() -> None:
    ph = make_phantom(_params(fractures=(FractureSpec("L2", bme_percent=100.0),)), seed=14)
    row = _row(ph, "L2")
    assert 50.0 < row["bme_percent"] < 100.0
    assert any("L2" in w for w in ph.warnings)


# --------------------------------------------------------------------------- DICOM
def test_dicom_round_trip(tmp_path: Path, phantom: Phantom) -> None:
    paths = phantom.write_dicom(tmp_path, patient_id="P001", study_date="20240301")
    assert set(paths) == {"stir", "t1"}
    for name in ("stir", "t1"):
        files = sorted(paths[name].iterdir())
        vol = getattr(phantom, name)
        assert len(files) == vol.shape[0]
        headers = [pydicom.dcmread(f) for f in files]
        ds = headers[0]
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
        assert ds.Modality == "MR"
        assert ds.PatientID == "P001"
        assert ds.StudyDate == "20240301"
        assert ds.MagneticFieldStrength in (1.5, 3.0)
        assert len({h.SeriesInstanceUID for h in headers}) == 1
        assert len({h.SOPInstanceUID for h in headers}) == len(headers)
        if name == "stir":
            assert "IR" in ds.ScanningSequence
            assert 100 <= float(ds.InversionTime) <= 260
        else:
            assert "IR" not in ds.ScanningSequence
            assert float(ds.RepetitionTime) < 800 and float(ds.EchoTime) < 20
        # Independent reconstruction: sort by position along the normal.
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        headers.sort(key=lambda h: float(np.dot(h.ImagePositionPatient, normal)))
        pos = np.array([h.ImagePositionPatient for h in headers], dtype=float)
        step = (pos[-1] - pos[0]) / (len(pos) - 1)
        affine = vol.affine
        assert np.allclose(pos[0], affine[:3, 3], atol=1e-4)
        assert np.allclose(step, affine[:3, 0], atol=1e-4)
        assert np.allclose(iop[3:] * float(ds.PixelSpacing[0]), affine[:3, 1], atol=1e-5)
        assert np.allclose(iop[:3] * float(ds.PixelSpacing[1]), affine[:3, 2], atol=1e-5)
        slope, icpt = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        stack = np.stack([h.pixel_array.astype(float) * slope + icpt for h in headers])
        assert np.allclose(stack, vol.array, atol=slope * 0.51 + 1e-3)


def test_dicom_reads_back_with_project_reader(tmp_path: Path, phantom: Phantom) -> None:
    dicom = pytest.importorskip("bmetrack.imaging.dicom")
    paths = phantom.write_dicom(tmp_path)
    for name in ("stir", "t1"):
        vol = dicom.read_series(paths[name], strict=True)
        ref = getattr(phantom, name)
        assert vol.has_same_geometry(ref, atol_mm=1e-3)
        assert np.allclose(vol.array, ref.array, atol=float(phantom.header["slope"][name]))
        assert vol.metadata["sequence_class"] == name


def test_write_nifti(tmp_path: Path, phantom: Phantom) -> None:
    nifti = pytest.importorskip("bmetrack.imaging.nifti")
    paths = phantom.write_nifti(tmp_path)
    labels = nifti.read_nifti(paths["labels"])
    assert labels.has_same_geometry(phantom.labels, atol_mm=1e-3)
    assert np.array_equal(labels.array, phantom.labels.array)


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs",
    [
        {"fractures": "some"},
        {"fractures": ({"level": "S1"},)},
        {"fractures": ({"level": "L1", "grade": 5},)},
        {"fractures": ({"level": "L1"}, {"level": "L1"})},
        {"t1_grid": "other"},
        {"n_rows": 8},
        {"vendor": "toshiba"},
    ],
)
def test_invalid_parameters_raise(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        PhantomParameters(**kwargs)  # type: ignore[arg-type]
