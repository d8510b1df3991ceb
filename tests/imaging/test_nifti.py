"""Tests of bmetrack.imaging.nifti: RAS <-> LPS, axis order, sform/qform, shear, 4-D."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest

from bmetrack.imaging.dicom import read_series
from bmetrack.imaging.errors import NiftiError
from bmetrack.imaging.nifti import read_nifti, write_nifti
from bmetrack.imaging.volume import Volume


def save_nifti(path, data, affine, *, sform_code=1, qform_code=1):
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine if sform_code else None, code=sform_code)
    img.set_qform(affine if qform_code else None, code=qform_code)
    nib.save(img, path)
    return path


def ras_world(nifti_affine: np.ndarray, ijk) -> np.ndarray:
    return (nifti_affine @ [*ijk, 1.0])[:3]


def lps_of(ras_point: np.ndarray) -> np.ndarray:
    return np.array([-ras_point[0], -ras_point[1], ras_point[2]])


def test_identity_ras_nifti_maps_to_lps(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    vol = read_nifti(save_nifti(tmp_path / "id.nii.gz", data, np.eye(4)))
    # NIfTI (i, j, k) -> Volume (slice, row, column) = (k, j, i)
    assert vol.shape == (6, 5, 4)
    assert vol.array[3, 2, 1] == data[1, 2, 3]
    assert vol.dtype == np.int16
    # NIfTI voxel (1, 0, 0) is RAS (1, 0, 0), i.e. 1 mm right: LPS (-1, 0, 0)
    np.testing.assert_allclose(vol.world_coordinates([0, 0, 1]), [-1.0, 0.0, 0.0])
    np.testing.assert_allclose(vol.world_coordinates([0, 1, 0]), [0.0, -1.0, 0.0])
    np.testing.assert_allclose(vol.world_coordinates([1, 0, 0]), [0.0, 0.0, 1.0])
    assert vol.metadata["affine_source"] == "sform"
    assert vol.warnings == []


def test_flipped_axes_roundtrip(tmp_path):
    # LPS affine with the row axis flipped and a negative slice step, as DICOM sagittals are.
    aff = np.array(
        [
            [-4.0, 0.0, 0.0, 30.0],
            [0.0, 0.0, 0.8, -100.0],
            [0.0, -0.9, 0.0, 120.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    arr = np.random.default_rng(0).normal(size=(5, 7, 9)).astype(np.float32)
    vol = Volume(arr, aff)
    path = write_nifti(vol, tmp_path / "sub" / "flip.nii.gz")
    back = read_nifti(path)
    np.testing.assert_array_equal(back.array, arr)
    np.testing.assert_allclose(back.affine, aff, atol=1e-4)
    assert back.orientation == vol.orientation == "RIP"
    # Independent check through nibabel: NIfTI voxel (i, j, k) is Volume (k, j, i) and its
    # RAS position has x, y negated relative to LPS.
    img = nib.load(path)
    assert img.shape == (9, 7, 5)
    for ijk in [(0, 0, 0), (8, 0, 0), (0, 6, 0), (0, 0, 4), (3, 2, 1)]:
        expected = vol.world_coordinates([ijk[2], ijk[1], ijk[0]])
        np.testing.assert_allclose(lps_of(ras_world(img.affine, ijk)), expected, atol=1e-4)
        assert img.get_fdata()[ijk] == pytest.approx(arr[ijk[2], ijk[1], ijk[0]])
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1


def test_shear_is_kept_exactly_with_a_warning(tmp_path, caplog):
    aff = np.eye(4)
    aff[:3, 0] = [0.0, 1.2, 3.8]  # slice step tilted toward the row axis
    aff[:3, 1] = [0.0, 0.9, 0.0]
    aff[:3, 2] = [0.8, 0.0, 0.0]
    vol = Volume(np.ones((3, 4, 5), dtype=np.float32), aff)
    assert vol.has_shear
    path = write_nifti(vol, tmp_path / "shear.nii")
    img = nib.load(path)
    assert int(img.header["qform_code"]) == 0  # qform cannot hold shear
    with caplog.at_level(logging.WARNING, logger="bmetrack.imaging.nifti"):
        back = read_nifti(path)
    np.testing.assert_allclose(back.affine, aff, atol=1e-5)
    assert back.has_shear
    assert any("shear" in w for w in back.warnings)
    assert "shear" in caplog.text


def test_qform_only(tmp_path):
    ras = np.diag([-2.0, 1.5, 3.0, 1.0])
    ras[:3, 3] = [10, 20, 30]
    vol = read_nifti(save_nifti(tmp_path / "q.nii", np.zeros((2, 3, 4)), ras, sform_code=0))
    assert vol.metadata["affine_source"] == "qform"
    # NIfTI voxel (1, 0, 0): RAS (8, 20, 30) -> LPS (-8, -20, 30)
    np.testing.assert_allclose(vol.world_coordinates([0, 0, 1]), [-8.0, -20.0, 30.0], atol=1e-5)


def test_no_coded_affine_warns(tmp_path):
    path = save_nifti(
        tmp_path / "n.nii", np.zeros((2, 3, 4)), np.eye(4), sform_code=0, qform_code=0
    )
    vol = read_nifti(path)
    assert vol.metadata["affine_source"] == "pixdim"
    assert any("neither sform nor qform" in w for w in vol.warnings)


def test_sform_qform_disagree_warns_and_uses_sform(tmp_path):
    sform = np.diag([1.0, 1.0, 1.0, 1.0])
    sform[:3, 3] = [5.0, 0.0, 0.0]
    img = nib.Nifti1Image(np.zeros((2, 2, 2)), np.eye(4))
    img.set_qform(np.eye(4), code=1)
    img.set_sform(sform, code=2)
    nib.save(img, tmp_path / "d.nii")
    vol = read_nifti(tmp_path / "d.nii")
    np.testing.assert_allclose(vol.origin_lps, [-5.0, 0.0, 0.0])
    assert any("sform and qform differ" in w for w in vol.warnings)


def test_scaling_is_applied(tmp_path):
    img = nib.Nifti1Image(np.full((2, 2, 2), 10, dtype=np.int16), np.eye(4))
    img.header.set_slope_inter(2.0, -5.0)
    nib.save(img, tmp_path / "s.nii")
    np.testing.assert_allclose(read_nifti(tmp_path / "s.nii").array, 15.0)


def test_4d_is_a_clear_error_but_trailing_singleton_is_dropped(tmp_path):
    save_nifti(tmp_path / "t.nii.gz", np.zeros((3, 3, 3, 2), dtype=np.float32), np.eye(4))
    with pytest.raises(NiftiError, match=r"3-D.*Extract one volume"):
        read_nifti(tmp_path / "t.nii.gz")
    save_nifti(tmp_path / "one.nii.gz", np.ones((3, 4, 5, 1), dtype=np.float32), np.eye(4))
    assert read_nifti(tmp_path / "one.nii.gz").shape == (5, 4, 3)


def test_2d_and_garbage_and_missing(tmp_path):
    save_nifti(tmp_path / "flat.nii", np.zeros((3, 4), dtype=np.float32), np.eye(4))
    with pytest.raises(NiftiError, match="3-D"):
        read_nifti(tmp_path / "flat.nii")
    (tmp_path / "junk.nii").write_text("not a nifti file at all" * 20)
    with pytest.raises(NiftiError, match="cannot read"):
        read_nifti(tmp_path / "junk.nii")
    with pytest.raises(FileNotFoundError):
        read_nifti(tmp_path / "absent.nii.gz")


def test_write_checks_and_dtype_conversions(tmp_path):
    vol = Volume(np.ones((2, 3, 4), dtype=bool), np.eye(4))
    with pytest.raises(NiftiError, match=r"\.nii"):
        write_nifti(vol, tmp_path / "x.png")
    assert read_nifti(write_nifti(vol, tmp_path / "b.nii.gz")).dtype == np.uint8
    labels = Volume(np.full((2, 3, 4), 26, dtype=np.int64), np.eye(4))
    back = read_nifti(write_nifti(labels, tmp_path / "l.nii.gz"))
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back.array, 26)


def test_dicom_to_nifti_roundtrip(tmp_path, dicom_factory):
    series = dicom_factory.write_series(tmp_path / "dcm")
    vol = read_series(series.folder)
    back = read_nifti(write_nifti(vol, tmp_path / "stir.nii.gz"))
    np.testing.assert_allclose(back.affine, series.affine, atol=1e-4)
    np.testing.assert_array_equal(back.array, series.values.astype(np.float32))
    assert back.orientation == "RIP"
