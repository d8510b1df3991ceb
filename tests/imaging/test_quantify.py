"""One study from images to the quantify JSON: external label maps and the orchestration."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from bmetrack.cli import app
from bmetrack.imaging.errors import ImagingError
from bmetrack.imaging.labelmaps import external_segmentation
from bmetrack.imaging.quantify import quantify_study
from bmetrack.imaging.volume import Volume
from bmetrack.simulate.phantom import FractureSpec, PhantomParameters, make_phantom

SAGITTAL = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])  # slice L-R, rows S->I, cols A->P
CONTRACT_KEYS = {
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


def _grid(shape=(6, 40, 40), spacing=(4.0, 1.0, 1.0)) -> Volume:
    return Volume.from_geometry(np.zeros(shape, np.float32), spacing_mm=spacing, direction=SAGITTAL)


def test_spineps_map_keeps_bodies_only():
    reference = _grid()
    labels = np.zeros(reference.shape, np.int16)
    labels[1:5, 5:15, 5:30] = 20  # L1 whole vertebra
    labels[1:5, 16:18, 5:30] = 120  # L1-L2 disc (SPINEPS 100 + label)
    labels[1:5, 19:30, 5:30] = 21
    subregions = np.zeros(reference.shape, np.int16)
    subregions[1:5, :, 5:20] = 49  # corpus border / corpus in front ...
    subregions[1:5, :, 10:20] = 50
    subregions[1:5, :, 20:30] = 41  # ... posterior elements behind
    segmentation = external_segmentation(
        reference.with_array(labels), reference, subregions=reference.with_array(subregions)
    )
    result = segmentation.labels.array
    assert segmentation.levels == ["L2", "L1"]
    assert set(np.unique(result)) == {0, 20, 21}
    assert not result[:, :, 20:].any()  # posterior elements removed
    assert np.count_nonzero(result == 20) == 4 * 10 * 15


def test_label_map_on_another_grid_is_resampled_by_geometry():
    reference = _grid()
    fine = Volume.from_geometry(
        np.zeros((12, 80, 80), np.int16),
        spacing_mm=(2.0, 0.5, 0.5),
        direction=SAGITTAL,
        origin_lps=(-1.0, 0.0, 0.25),
    )
    array = np.zeros(fine.shape, np.int16)
    array[2:10, 10:30, 10:60] = 26
    segmentation = external_segmentation(fine.with_array(array), reference)
    assert segmentation.levels == ["S1"]
    # 10 mm of rows and 25 mm of columns at 1 mm spacing, on the coarse grid.
    body = segmentation.labels.array == 26
    assert 200 <= body[2].sum() <= 300


def test_partial_and_unknown_labels():
    reference = _grid()
    labels = np.zeros(reference.shape, np.int16)
    labels[1:5, 0:10, 5:30] = 19  # T12 touches the top edge: partly visible
    labels[1:5, 15:30, 5:30] = 20
    segmentation = external_segmentation(reference.with_array(labels), reference)
    assert segmentation.levels == ["L1"]
    assert segmentation.partial == ["T12"]
    labels[1:5, 15:30, 5:30] = 27
    with pytest.raises(ImagingError, match=r"labels \[27\]"):
        external_segmentation(reference.with_array(labels), reference)
    with pytest.raises(ImagingError, match="non-integer"):
        external_segmentation(reference.with_array(labels.astype(float) + 0.5), reference)


@pytest.fixture(scope="module")
def phantom():
    params = PhantomParameters(
        n_rows=256,
        n_columns=256,
        pixel_spacing_mm=1.2,
        sacrum_in_view=True,
        fractures=(FractureSpec("L1", "wedge", 2, "diffuse", 60.0, 0.0, False),),
        hemangioma_probability=0.0,
    )
    return make_phantom(params, seed=21)


@pytest.mark.slow
def test_quantify_study_with_true_labels_matches_truth(phantom):
    stir = phantom.stir.with_array(phantom.stir.array)
    t1 = phantom.t1.with_array(phantom.t1.array)
    stir.series_instance_uid, t1.series_instance_uid = "1.2.826.0.1.1", "1.2.826.0.1.2"
    study = quantify_study(stir, t1, labels=phantom.labels)
    result = study.to_contract_dict()
    measured = {v["level"]: v for v in result["vertebrae"]}
    truth = phantom.truth.set_index("level")
    visible = truth[~truth["partially_visible"]]
    assert set(measured) == set(visible.index)
    for vertebra in result["vertebrae"]:
        assert set(vertebra) == CONTRACT_KEYS
    l1 = measured["L1"]
    assert l1["bme_percent"] == pytest.approx(truth.at["L1", "bme_percent"], abs=10)
    assert l1["bme_present"] and l1["genant_grade"] >= 1 and l1["deformity"] == "wedge"
    assert l1["body_volume_ml"] == pytest.approx(truth.at["L1", "body_volume_ml"], rel=0.1)
    normal = [v for v in result["vertebrae"] if v["level"] in ("L3", "L4")]
    assert all(v["bme_percent"] < 5 and v["cement_volume_ml"] < 0.5 for v in normal)
    provenance = result["provenance"]
    assert provenance["segmentation"]["method_version"] == "external label map"
    assert provenance["input_series_uids"] == ["1.2.826.0.1.1", "1.2.826.0.1.2"]
    assert "edema_k_sd" in json.dumps(provenance["quantification"])


@pytest.mark.slow
def test_quantify_cli_on_dicom_with_label_map(phantom, tmp_path):
    paths = phantom.write_dicom(tmp_path / "study", patient_id="P1", study_date="20200101")
    nifti = phantom.write_nifti(tmp_path / "nii")
    out = tmp_path / "q.json"
    result = CliRunner().invoke(
        app,
        [
            "quantify",
            "--stir",
            str(paths["stir"]),
            "--t1",
            str(paths["t1"]),
            "--labels",
            str(nifti["labels"]),
            "--json",
            str(out),
            "--overlays",
            str(tmp_path / "overlays"),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert {"vertebrae", "reference", "warnings"} <= set(data)
    assert len(data["provenance"]["input_series_uids"]) == 2
    assert (tmp_path / "overlays" / "L1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quantify_cli_bad_input_is_one_line(tmp_path):
    result = CliRunner().invoke(
        app, ["quantify", "--stir", str(tmp_path / "none"), "--t1", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "does not exist" in result.output


@pytest.mark.slow
def test_export_dicom_cli_writes_seg_and_sr(phantom, tmp_path):
    import pydicom

    paths = phantom.write_dicom(tmp_path / "study", patient_id="P1", study_date="20200101")
    nifti = phantom.write_nifti(tmp_path / "nii")
    result = CliRunner().invoke(
        app,
        [
            "export-dicom",
            "--stir",
            str(paths["stir"]),
            "--t1",
            str(paths["t1"]),
            "--labels",
            str(nifti["labels"]),
            "--out",
            str(tmp_path / "export"),
        ],
    )
    assert result.exit_code == 0, result.output
    seg = pydicom.dcmread(tmp_path / "export" / "seg.dcm")
    sr = pydicom.dcmread(tmp_path / "export" / "sr.dcm")
    assert seg.Modality == "SEG" and sr.Modality == "SR"
    stir_uid = pydicom.dcmread(next(paths["stir"].iterdir())).SeriesInstanceUID
    referenced = {item.SeriesInstanceUID for item in seg.ReferencedSeriesSequence}
    assert stir_uid in referenced
