"""Tests of bmetrack.imaging.dicom on synthetic MR series written with pydicom.

Expected geometry comes from the DICOM definition (PS3.3 C.7.6.2.1.1): the centre of pixel
(row r, column c) of a slice is IPP + c * PixelSpacing[1] * IOP[0:3] + r * PixelSpacing[0] *
IOP[3:6].  The conftest factory writes it into every header independently of the reader.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.uid import JPEGLSLossless, RLELossless

from bmetrack.imaging.dicom import (
    FolderScan,
    Orientation,
    SequenceClass,
    SeriesInfo,
    classify_series,
    read_series,
    scan_folder,
)
from bmetrack.imaging.errors import (
    DicomSeriesError,
    DuplicatePositionError,
    EmptySeriesError,
    ImagingError,
    InconsistentMatrixError,
    MissingGeometryError,
    MissingSliceError,
    MixedOrientationError,
    MultipleSeriesError,
    NonOriginalImageError,
    NonUniformSpacingError,
    UnreadableFileError,
    UnsupportedTransferSyntaxError,
    WrongModalityError,
)


def pixel_centre(ds: pydicom.Dataset, row: int, col: int) -> np.ndarray:
    """LPS centre of pixel (row, col) from the header alone (DICOM PS3.3 C.7.6.2.1.1)."""
    ipp = np.array(ds.ImagePositionPatient, dtype=float)
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    dr, dc = (float(v) for v in ds.PixelSpacing)
    return ipp + col * dc * iop[:3] + row * dr * iop[3:]


def extra_image(factory, series, path: Path, **overrides):
    """Write one more image into ``series`` (same UIDs), with header overrides."""
    kwargs = {
        "pixels": factory.raw_pixels(0, 10, 8),
        "position": series.positions[0],
        "series_uid": series.series_uid,
        "study_uid": series.study_uid,
    }
    kwargs.update(overrides)
    return factory.save(factory.make_dataset(**kwargs), path)


# ---------------------------------------------------------------- geometry
def test_geometry_roundtrip_every_slice_and_corner(tmp_path, dicom_factory):
    series = dicom_factory.write_series(tmp_path / "s", n_slices=7, rows=10, cols=8)
    vol = read_series(series.folder, strict=True)
    assert vol.shape == (7, 10, 8)
    assert vol.warnings == []
    np.testing.assert_allclose(vol.affine, series.affine, atol=1e-9)
    # every slice, every corner pixel, from its own header
    for k, path in enumerate(series.paths):
        ds = pydicom.dcmread(path)
        for r, c in [(0, 0), (9, 0), (0, 7), (9, 7), (4, 3)]:
            np.testing.assert_allclose(vol.world_coordinates([k, r, c]), pixel_centre(ds, r, c))
    np.testing.assert_array_equal(vol.array, series.values.astype(np.float32))
    assert vol.orientation == "RIP"
    assert vol.spacing_mm == pytest.approx((4.0, 0.9, 0.8))
    assert vol.modality == "MR" and vol.series_instance_uid == series.series_uid


def test_order_ignores_file_names_and_instance_numbers(tmp_path, dicom_factory):
    series = dicom_factory.write_series(tmp_path / "s", n_slices=8, seed=3)
    instance = [int(pydicom.dcmread(p).InstanceNumber) for p in series.paths]
    names = [p.name for p in series.paths]
    # the factory really shuffled both (otherwise this test could not fail)
    assert instance != sorted(instance) and names != sorted(names)
    vol = read_series(series.folder)
    np.testing.assert_array_equal(vol.array, series.values.astype(np.float32))
    assert vol.metadata["source_files"] == [str(p) for p in series.paths]


def test_rescale_slope_intercept_applied(tmp_path, dicom_factory):
    series = dicom_factory.write_series(tmp_path / "s", rescale=(0.5, 100.0))
    vol = read_series(series.folder)
    raw0 = dicom_factory.raw_pixels(0, 10, 8).astype(float)
    np.testing.assert_allclose(vol.array[0], raw0 * 0.5 + 100.0)
    assert vol.dtype == np.float32


def test_oblique_sagittal(tmp_path, dicom_factory):
    # rotate the sagittal cosines 15 deg about z and 8 deg about x
    cz, sz = np.cos(np.radians(15)), np.sin(np.radians(15))
    cx, sx = np.cos(np.radians(8)), np.sin(np.radians(8))
    rot = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array(
        [[1, 0, 0], [0, cx, -sx], [0, sx, cx]]
    )
    row_dir, col_dir = rot @ [0, 1, 0], rot @ [0, 0, -1]
    series = dicom_factory.write_series(
        tmp_path / "s", orientation=(row_dir, col_dir), slice_spacing_mm=3.3
    )
    vol = read_series(series.folder, strict=True)
    np.testing.assert_allclose(vol.affine, series.affine, atol=1e-6)
    assert not vol.has_shear
    assert vol.spacing_mm[0] == pytest.approx(3.3)
    assert vol.orientation == "RIP"
    for k, path in enumerate(series.paths):
        ds = pydicom.dcmread(path)
        np.testing.assert_allclose(vol.world_coordinates([k, 9, 7]), pixel_centre(ds, 9, 7))
    info = scan_folder(series.folder)[0]
    assert info.orientation is Orientation.SAGITTAL


def test_sheared_stack_is_kept_with_warning(tmp_path, dicom_factory):
    # slice positions step 4 mm along the normal (-x) and 1 mm along +y (gantry-tilt-like)
    series = dicom_factory.write_series(tmp_path / "s", slice_step=(-4.0, 1.0, 0.0))
    vol = read_series(series.folder)
    np.testing.assert_allclose(vol.affine, series.affine, atol=1e-9)
    assert vol.has_shear
    assert any("sheared" in w for w in vol.warnings)


# ---------------------------------------------------------------- missing / uneven slices
def test_missing_slice_strict_raises_naming_the_file(tmp_path, dicom_factory):
    series = dicom_factory.write_series(tmp_path / "s", n_slices=6, skip=[2])
    with pytest.raises(MissingSliceError, match="missing slice") as info:
        read_series(series.folder, strict=True)
    assert info.value.path == series.paths[3]  # the slice after the gap
    assert "fix:" in str(info.value) and "8.00 mm" in str(info.value)


def test_missing_slice_lenient_interpolates_with_warning(tmp_path, dicom_factory):
    series = dicom_factory.write_series(tmp_path / "s", n_slices=6, skip=[2])
    vol = read_series(series.folder)
    assert vol.shape[0] == 6
    np.testing.assert_allclose(vol.affine, series.affine, atol=1e-9)
    assert vol.metadata["interpolated_slices"] == [2]
    assert any("missing slice" in w for w in vol.warnings)
    # neighbours are exact; the filled slice is their mean (the test signal is linear in k)
    for k in (0, 1, 3, 4, 5):
        np.testing.assert_array_equal(vol.array[k], series.values[k])
    np.testing.assert_allclose(vol.array[2], (series.values[1] + series.values[3]) / 2)


def test_too_many_missing_slices_raise_in_both_modes(tmp_path, dicom_factory):
    series = dicom_factory.write_series(tmp_path / "s", n_slices=8, skip=[2, 3, 4, 5])
    with pytest.raises(MissingSliceError, match="too many"):
        read_series(series.folder)


def test_non_uniform_spacing(tmp_path, dicom_factory):
    series = dicom_factory.write_series(tmp_path / "s", n_slices=6)
    ds = pydicom.dcmread(series.paths[3])
    ds.ImagePositionPatient = list(series.positions[3] + [-1.0, 0.0, 0.0])  # 1 mm further
    ds.save_as(series.paths[3])
    with pytest.raises(NonUniformSpacingError, match="non-uniform"):
        read_series(series.folder, strict=True)
    vol = read_series(series.folder)
    assert vol.shape[0] == 6
    np.testing.assert_allclose(vol.affine, series.affine, atol=1e-9)
    assert any("non-uniform" in w for w in vol.warnings)
    # target slice 3 (at 12 mm) lies between acquired 2 (8 mm) and 3 (13 mm): weight 4/5
    expected = series.values[2] + 0.8 * (series.values[3] - series.values[2])
    np.testing.assert_allclose(vol.array[3], expected, rtol=1e-6)


def test_positions_off_one_line_raise_in_both_modes(tmp_path, dicom_factory):
    series = dicom_factory.write_series(tmp_path / "s", n_slices=5)
    ds = pydicom.dcmread(series.paths[2])
    ds.ImagePositionPatient = list(series.positions[2] + [0.0, 20.0, 0.0])
    ds.save_as(series.paths[2])
    with pytest.raises(NonUniformSpacingError, match="one line"):
        read_series(series.folder)


# ---------------------------------------------------------------- bad files in a series
def test_mixed_orientation(tmp_path, dicom_factory):
    series = dicom_factory.write_series(tmp_path / "s", n_slices=5)
    axial = extra_image(
        dicom_factory, series, tmp_path / "s" / "axial", orientation=dicom_factory.AXIAL
    )
    with pytest.raises(MixedOrientationError) as info:
        read_series(series.folder, strict=True)
    assert info.value.path == axial
    vol = read_series(series.folder)
    assert vol.shape[0] == 5
    assert any("axial" in w and "ImageOrientationPatient" in w for w in vol.warnings)
    assert scan_folder(series.folder)[0].orientation is Orientation.MIXED


def test_localizer_in_series(tmp_path, dicom_factory):
    series = dicom_factory.write_series(tmp_path / "s", n_slices=5)
    scout = extra_image(
        dicom_factory,
        series,
        tmp_path / "s" / "scout",
        orientation=dicom_factory.CORONAL,
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    )
    with pytest.raises(NonOriginalImageError, match="localizer") as info:
        read_series(series.folder, strict=True)
    assert info.value.path == scout
    vol = read_series(series.folder)
    np.testing.assert_array_equal(vol.array, series.values.astype(np.float32))
    assert any("localizer" in w for w in vol.warnings)


def test_derived_images(tmp_path, dicom_factory):
    series = dicom_factory.write_series(tmp_path / "s", n_slices=4)
    for path in series.paths:
        ds = pydicom.dcmread(path)
        ds.ImageType = ["DERIVED", "SECONDARY", "MPR"]
        ds.save_as(path)
    with pytest.raises(NonOriginalImageError, match="DERIVED"):
        read_series(series.folder, strict=True)
    vol = read_series(series.folder)  # all derived: kept, with a warning
    assert vol.shape[0] == 4 and any("DERIVED" in w for w in vol.warnings)
    # one original among derived ones would win
    ds = pydicom.dcmread(series.paths[0])
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.save_as(series.paths[0])
    assert read_series(series.folder).shape[0] == 1


def test_ct_series_and_ct_image_in_mr_series(tmp_path, dicom_factory):
    ct = dicom_factory.write_series(tmp_path / "ct", n_slices=4, modality="CT", params=None)
    with pytest.raises(WrongModalityError, match="CT, not MR"):
        read_series(ct.folder, strict=True)
    vol = read_series(ct.folder)
    assert vol.modality == "CT" and any("not MR" in w for w in vol.warnings)
    assert vol.metadata["sequence_class"] == "other"

    mr = dicom_factory.write_series(tmp_path / "mr", n_slices=4)
    stray = extra_image(dicom_factory, mr, tmp_path / "mr" / "ct", modality="CT")
    with pytest.raises(WrongModalityError) as info:
        read_series(mr.folder, strict=True)
    assert info.value.path == stray
    vol = read_series(mr.folder)
    assert vol.shape[0] == 4 and vol.modality == "MR"


def test_truncated_file(tmp_path, dicom_factory):
    series = dicom_factory.write_series(tmp_path / "s", n_slices=5)
    last = series.paths[-1]
    last.write_bytes(last.read_bytes()[:-60])
    with pytest.raises(UnreadableFileError) as info:
        read_series(series.folder, strict=True)
    assert info.value.path == last
    vol = read_series(series.folder)
    assert vol.shape[0] == 4
    np.testing.assert_array_equal(vol.array, series.values[:4].astype(np.float32))
    assert any(str(last) in w for w in vol.warnings)
    scan = scan_folder(series.folder)
    assert scan[0].n_files == 4
    assert [r.path for r in scan[0].rejected] == [last]
    assert "truncated" in scan[0].rejected[0].reason


def test_truncated_middle_file_leaves_a_gap(tmp_path, dicom_factory):
    series = dicom_factory.write_series(tmp_path / "s", n_slices=5)
    mid = series.paths[2]
    mid.write_bytes(mid.read_bytes()[:300])
    vol = read_series(series.folder)
    assert vol.shape[0] == 5 and vol.metadata["interpolated_slices"] == [2]
    assert any(str(mid) in w for w in vol.warnings)
    assert any("missing slice" in w for w in vol.warnings)


def test_non_dicom_file(tmp_path, dicom_factory):
    series = dicom_factory.write_series(tmp_path / "s", n_slices=4)
    junk = series.folder / "README.txt"
    junk.write_text("exported by PACS\n" * 50)
    with pytest.raises(UnreadableFileError, match="not a DICOM file") as info:
        read_series(series.folder, strict=True)
    assert info.value.path == junk
    vol = read_series(series.folder)
    assert vol.shape[0] == 4 and any("README.txt" in w for w in vol.warnings)


def test_missing_geometry(tmp_path, dicom_factory):
    series = dicom_factory.write_series(tmp_path / "s", n_slices=5)
    ds = pydicom.dcmread(series.paths[0])
    del ds.ImagePositionPatient
    ds.save_as(series.paths[0])
    with pytest.raises(MissingGeometryError, match="ImagePositionPatient"):
        read_series(series.folder, strict=True)
    vol = read_series(series.folder)
    np.testing.assert_array_equal(vol.array, series.values[1:].astype(np.float32))
    np.testing.assert_allclose(vol.origin_lps, series.positions[1])


def test_different_matrix(tmp_path, dicom_factory):
    series = dicom_factory.write_series(tmp_path / "s", n_slices=5)
    odd = extra_image(
        dicom_factory,
        series,
        tmp_path / "s" / "odd",
        pixels=np.zeros((12, 12), np.uint16),
        position=series.positions[-1] + (series.positions[1] - series.positions[0]),
    )
    with pytest.raises(InconsistentMatrixError) as info:
        read_series(series.folder, strict=True)
    assert info.value.path == odd
    assert read_series(series.folder).shape == (5, 10, 8)


def test_duplicates(tmp_path, dicom_factory):
    series = dicom_factory.write_series(tmp_path / "s", n_slices=4)
    shutil.copy(series.paths[1], tmp_path / "s" / "copy_of_1")
    with pytest.raises(DuplicatePositionError):
        read_series(series.folder, strict=True)
    vol = read_series(series.folder)
    assert vol.shape[0] == 4 and any("duplicate" in w for w in vol.warnings)
    # a different image at an occupied position is ambiguous: error in both modes
    extra_image(
        dicom_factory,
        series,
        tmp_path / "s" / "echo2",
        position=series.positions[2],
        pixels=np.full((10, 8), 7, np.uint16),
    )
    with pytest.raises(DuplicatePositionError, match="same slice position"):
        read_series(series.folder)


def test_several_series_need_a_uid(tmp_path, dicom_factory):
    a = dicom_factory.write_series(tmp_path / "mix", n_slices=3)
    b = dicom_factory.write_series(
        tmp_path / "mix", n_slices=4, params=dicom_factory.SIEMENS_T1, seed=1
    )
    with pytest.raises(MultipleSeriesError, match="2 series") as info:
        read_series(tmp_path / "mix")
    assert "t1_tse_sag" in str(info.value) and "series_uid" in str(info.value)
    assert read_series(tmp_path / "mix", series_uid=b.series_uid).shape[0] == 4
    assert read_series(tmp_path / "mix", series_uid=a.series_uid).shape[0] == 3
    with pytest.raises(EmptySeriesError, match="not found"):
        read_series(tmp_path / "mix", series_uid="1.2.3")


def test_file_list_input_and_empty_inputs(tmp_path, dicom_factory):
    series = dicom_factory.write_series(tmp_path / "s", n_slices=4)
    vol = read_series([str(p) for p in reversed(series.paths)])
    np.testing.assert_array_equal(vol.array, series.values.astype(np.float32))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptySeriesError):
        read_series(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        read_series(tmp_path / "nowhere")


def test_single_slice_uses_thickness(tmp_path, dicom_factory):
    series = dicom_factory.write_series(tmp_path / "s", n_slices=1)
    vol = read_series(series.folder)
    assert vol.shape[0] == 1
    assert vol.spacing_mm[0] == pytest.approx(3.6)  # SliceThickness written by the factory
    assert any("single-slice" in w for w in vol.warnings)


def test_error_hierarchy():
    for exc in (MissingSliceError, UnreadableFileError, UnsupportedTransferSyntaxError):
        assert issubclass(exc, DicomSeriesError)
        assert issubclass(exc, ImagingError)
        assert issubclass(exc, ValueError)


# ---------------------------------------------------------------- compressed syntaxes
def test_rle_lossless_series(tmp_path, dicom_factory):
    series = dicom_factory.write_series(tmp_path / "s", n_slices=4, transfer_syntax=RLELossless)
    assert pydicom.dcmread(series.paths[0]).file_meta.TransferSyntaxUID == RLELossless
    vol = read_series(series.folder, strict=True)
    np.testing.assert_array_equal(vol.array, series.values.astype(np.float32))
    assert vol.metadata["transfer_syntax_uid"] == RLELossless


def test_missing_decoder_is_a_clear_error(tmp_path, dicom_factory, monkeypatch):
    series = dicom_factory.write_series(tmp_path / "s", n_slices=3, transfer_syntax=RLELossless)

    class NoDecoder:
        is_available = False
        missing_dependencies = ("pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-rle>=2.0",)

    monkeypatch.setattr("pydicom.pixels.get_decoder", lambda uid: NoDecoder())
    for strict in (True, False):
        with pytest.raises(UnsupportedTransferSyntaxError, match="RLE Lossless") as info:
            read_series(series.folder, strict=strict)
        assert "pylibjpeg-rle" in str(info.value)


def test_jpeg_ls_without_plugin():
    from pydicom.pixels import get_decoder

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed")
    path = get_testdata_file("MR_small_jpeg_ls_lossless.dcm")
    with pytest.raises(UnsupportedTransferSyntaxError, match="JPEG-LS") as info:
        read_series([path])
    assert "pyjpegls" in str(info.value) or "pylibjpeg" in str(info.value)


# ---------------------------------------------------------------- folder scan
def test_scan_pacs_like_export(tmp_path, dicom_factory):
    root = tmp_path / "export"
    stir = dicom_factory.write_series(root / "A" / "1", n_slices=5, series_number=3)
    t1 = dicom_factory.write_series(
        root / "A" / "2",
        n_slices=4,
        params=dicom_factory.SIEMENS_T1,
        study_uid=stir.study_uid,
        series_number=4,
        extension=".dcm",
    )
    axial = dicom_factory.write_series(
        root / "B",
        n_slices=3,
        orientation=dicom_factory.AXIAL,
        params=dicom_factory.PHILIPS_T2_SPAIR,
        series_number=5,
    )
    shutil.copy(get_testdata_file("DICOMDIR"), root / "DICOMDIR")
    (root / "notes.txt").write_text("hello")
    (root / "empty.dcm").write_bytes(b"")
    # a header-only object of the STIR series: belongs to it but has no pixel data
    ds = pydicom.dcmread(stir.paths[0])
    del ds.PixelData
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(root / "A" / "1" / "nopix")

    scan = scan_folder(root)
    assert isinstance(scan, FolderScan) and isinstance(scan, list)
    by_uid = {s.series_instance_uid: s for s in scan}
    assert set(by_uid) == {stir.series_uid, t1.series_uid, axial.series_uid}
    s = by_uid[stir.series_uid]
    assert (s.n_files, s.modality, s.patient_id) == (5, "MR", "PAT001")
    assert s.study_instance_uid == stir.study_uid and str(s.study_date) == "2024-01-15"
    assert s.series_description == "t2_tirm_sag" and s.series_number == 3
    assert s.orientation is Orientation.SAGITTAL and s.sequence_class is SequenceClass.STIR
    assert set(s.files) == set(stir.paths)
    assert [r.path.name for r in s.rejected] == ["nopix"]
    assert "no pixel data" in s.rejected[0].reason
    assert by_uid[t1.series_uid].sequence_class is SequenceClass.T1
    assert by_uid[axial.series_uid].orientation is Orientation.AXIAL
    assert by_uid[axial.series_uid].sequence_class is SequenceClass.T2
    reasons = {r.path.name: r.reason for r in scan.rejected}
    assert set(reasons) == {"DICOMDIR", "notes.txt", "empty.dcm"}
    assert "DICOMDIR" in reasons["DICOMDIR"]
    assert "not a DICOM file" in reasons["notes.txt"]
    # the STIR series reads from the export folder by UID despite the DICOMDIR and junk
    vol = read_series(root / "A" / "1", series_uid=stir.series_uid)
    np.testing.assert_array_equal(vol.array, stir.values.astype(np.float32))


def test_scan_pydicom_test_files_never_raises(tmp_path):
    files = [Path(f) for f in get_testdata_files() if Path(f).is_file()]
    assert len(files) > 50
    folder = tmp_path / "pydicom"
    folder.mkdir()
    copies = []
    for n, f in enumerate(files):  # flat copy, no extensions kept for half of them
        name = f"{n:03d}_{f.name}" if n % 2 else f"{n:03d}"
        copies.append(Path(shutil.copy(f, folder / name)))
    source_of = dict(zip(copies, files, strict=True))
    scan = scan_folder(folder)
    grouped = [p for info in scan for p in info.files]
    rejected = [r.path for r in scan.all_rejected]
    assert len(grouped) == len(set(grouped))
    assert sorted(map(str, grouped + rejected)) == sorted(map(str, copies))
    assert all(r.reason for r in scan.all_rejected)
    assert len(scan) > 10
    for info in scan:
        assert isinstance(info.orientation, Orientation)
        assert isinstance(info.sequence_class, SequenceClass)
        assert info.n_files == len(info.files) > 0
    mr_small = next(s for s in scan if any(source_of[p].name == "MR_small.dcm" for p in s.files))
    assert mr_small.modality == "MR"
    # reading any found series gives a Volume or an ImagingError, nothing else
    for info in scan:
        with contextlib.suppress(ImagingError):
            read_series(info.files, series_uid=info.series_instance_uid)


def test_scan_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        scan_folder(tmp_path / "nope")


# ---------------------------------------------------------------- classification
def info(**kwargs) -> SeriesInfo:
    kwargs.setdefault("modality", "MR")
    return SeriesInfo(series_instance_uid="1.2.3", **kwargs)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        # Siemens
        (dict(series_description="t1_tse_sag", repetition_time_ms=600, echo_time_ms=11,
              scanning_sequence=("SE",)), SequenceClass.T1),
        (dict(series_description="t2_tirm_sag", repetition_time_ms=4000, echo_time_ms=62,
              inversion_time_ms=160, scanning_sequence=("SE", "IR")), SequenceClass.STIR),
        (dict(series_description="t2_tse_sag", repetition_time_ms=3500, echo_time_ms=95,
              scanning_sequence=("SE",)), SequenceClass.T2),
        # 3 T STIR: TI 230 ms
        (dict(series_description="t2_tirm_sag_3T", repetition_time_ms=5000, echo_time_ms=40,
              inversion_time_ms=230, scanning_sequence=("SE", "IR")), SequenceClass.STIR),
        # T1-FLAIR ("dark fluid" TIRM, TI 860): not STIR; the T1 token decides
        (dict(series_description="t1_tirm_sag_dark-fluid", repetition_time_ms=2000,
              echo_time_ms=9, inversion_time_ms=860, scanning_sequence=("SE", "IR")),
         SequenceClass.T1),
        (dict(series_description="t1_vibe_fs_sag", repetition_time_ms=5.2, echo_time_ms=2.4,
              scanning_sequence=("GR",)), SequenceClass.T1),
        (dict(series_description="me2d_sag", repetition_time_ms=500, echo_time_ms=15,
              scanning_sequence=("GR",)), SequenceClass.OTHER),
        # GE
        (dict(series_description="SAG STIR", repetition_time_ms=3500, echo_time_ms=42,
              inversion_time_ms=150, scanning_sequence=("SE", "IR")), SequenceClass.STIR),
        # GE STIR whose ScanningSequence lacks IR but TI is short and TE long
        (dict(series_description="SAG STIR", repetition_time_ms=4000, echo_time_ms=70,
              inversion_time_ms=150, scanning_sequence=("SE",)), SequenceClass.STIR),
        (dict(series_description="SAG T1 FSE", repetition_time_ms=550, echo_time_ms=9.5,
              scanning_sequence=("SE",)), SequenceClass.T1),
        # Philips
        (dict(series_description="T1W_TSE", repetition_time_ms=500, echo_time_ms=8,
              scanning_sequence=("SE",)), SequenceClass.T1),
        (dict(series_description="T2W_SPAIR", repetition_time_ms=3200, echo_time_ms=90,
              scanning_sequence=("SE",)), SequenceClass.T2),
        # SPAIR flagged as IR with a short TI is still fat-sat T2, not STIR
        (dict(series_description="T2W_SPAIR", repetition_time_ms=3200, echo_time_ms=90,
              inversion_time_ms=110, scanning_sequence=("SE", "IR")), SequenceClass.T2),
        # description only (no timing): tokens, not substrings
        (dict(series_description="T2W_SPAIR"), SequenceClass.T2),
        (dict(series_description="sag T1"), SequenceClass.T1),
        (dict(series_description="STIR_SAG"), SequenceClass.STIR),
        (dict(series_description="L1-T12 sag"), SequenceClass.OTHER),
        (dict(series_description="T1 T2 combined"), SequenceClass.OTHER),
        # proton density: long TR, short TE
        (dict(series_description="pd_tse_sag", repetition_time_ms=2500, echo_time_ms=12,
              scanning_sequence=("SE",)), SequenceClass.OTHER),
        # physics beats a misleading name
        (dict(series_description="sag T2", repetition_time_ms=600, echo_time_ms=10,
              scanning_sequence=("SE",)), SequenceClass.T1),
        (dict(series_description="t1_tse_sag", repetition_time_ms=600, echo_time_ms=11,
              modality="CT"), SequenceClass.OTHER),
        (dict(series_description="localizer", repetition_time_ms=8, echo_time_ms=4,
              image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")), SequenceClass.OTHER),
        (dict(series_description="FAST LOCALIZER", repetition_time_ms=8, echo_time_ms=4),
         SequenceClass.OTHER),
    ],
)  # fmt: skip
def test_classify_series(fields, expected):
    assert classify_series(info(**fields)) is expected


def test_classify_overrides():
    t1 = info(series_description="t1_tse_sag", repetition_time_ms=600, echo_time_ms=11)
    assert classify_series(t1, {"1.2.3": "stir"}) is SequenceClass.STIR
    assert classify_series(t1, {"1.2.3": SequenceClass.T2}) is SequenceClass.T2
    assert classify_series(t1, {"9.9": "t2"}) is SequenceClass.T1
    with pytest.raises(ValueError, match="overrides"):
        classify_series(t1, {"1.2.3": "flair"})


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("SIEMENS_T1", SequenceClass.T1),
        ("SIEMENS_STIR", SequenceClass.STIR),
        ("GE_STIR", SequenceClass.STIR),
        ("GE_T1", SequenceClass.T1),
        ("PHILIPS_T1", SequenceClass.T1),
        ("PHILIPS_T2_SPAIR", SequenceClass.T2),
    ],
)
def test_classification_from_written_headers(tmp_path, dicom_factory, preset, expected):
    series = dicom_factory.write_series(
        tmp_path / "s", n_slices=2, params=getattr(dicom_factory, preset)
    )
    assert scan_folder(series.folder)[0].sequence_class is expected
    assert read_series(series.folder).metadata["sequence_class"] == expected.value
