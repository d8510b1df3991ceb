"""Tests of bmetrack.imaging.volume.Volume against hand-computed geometry."""

from __future__ import annotations

import numpy as np
import pytest

from bmetrack.imaging.errors import ImagingError, VolumeGeometryError
from bmetrack.imaging.volume import LPS_TO_RAS, Volume


def rotation(axis: str, degrees: float) -> np.ndarray:
    """Right-handed rotation matrix about x, y or z."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def affine_from(direction: np.ndarray, spacing: tuple[float, ...], origin: tuple[float, ...]):
    aff = np.eye(4)
    aff[:3, :3] = np.asarray(direction) * np.asarray(spacing)
    aff[:3, 3] = origin
    return aff


# ---------------------------------------------------------------- construction
@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 4, 5), (0, 3, 4)])
def test_array_must_be_3d_and_non_empty(shape):
    with pytest.raises(VolumeGeometryError, match="array"):
        Volume(np.zeros(shape), np.eye(4))


def test_array_must_be_numeric():
    with pytest.raises(VolumeGeometryError, match="dtype"):
        Volume(np.empty((2, 2, 2), dtype=object), np.eye(4))


@pytest.mark.parametrize(
    ("affine", "match"),
    [
        (np.eye(3), "4x4"),
        (np.where(np.eye(4) == 1, np.nan, 0.0), "finite"),
        (np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]), "last row"),
        (np.diag([1.0, 1.0, 0.0, 1.0]), "singular"),
        (np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), "singular"),
        ("not an affine", "4x4"),
    ],
)
def test_affine_validation(affine, match):
    with pytest.raises(VolumeGeometryError, match=match):
        Volume(np.zeros((2, 2, 2)), affine)


def test_geometry_errors_are_value_errors():
    assert issubclass(VolumeGeometryError, ImagingError)
    assert issubclass(VolumeGeometryError, ValueError)


def test_affine_is_copied_and_read_only():
    aff = np.diag([2.0, 3.0, 4.0, 1.0])
    vol = Volume(np.zeros((2, 2, 2)), aff)
    aff[0, 0] = 99.0
    assert vol.affine[0, 0] == 2.0
    with pytest.raises(ValueError, match="read-only"):
        vol.affine[0, 0] = 5.0


# ---------------------------------------------------------------- properties
def test_properties_of_an_oblique_grid():
    direction = rotation("z", 30) @ rotation("x", 10)
    spacing = (4.0, 0.9, 0.8)
    origin = (10.0, -20.0, 30.0)
    vol = Volume(np.zeros((3, 4, 5)), affine_from(direction, spacing, origin))
    assert vol.shape == (3, 4, 5)
    np.testing.assert_allclose(vol.spacing_mm, spacing)
    np.testing.assert_allclose(vol.origin_lps, origin)
    np.testing.assert_allclose(vol.direction, direction, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(vol.direction, axis=0), 1.0)
    assert vol.voxel_volume_ml == pytest.approx(4.0 * 0.9 * 0.8 / 1000.0)
    assert not vol.has_shear


def test_from_geometry_matches_explicit_affine():
    direction = rotation("y", -25)
    vol = Volume.from_geometry(
        np.ones((2, 3, 4)), spacing_mm=(3.0, 1.0, 0.5), origin_lps=(1, 2, 3), direction=direction
    )
    np.testing.assert_allclose(vol.affine, affine_from(direction, (3.0, 1.0, 0.5), (1, 2, 3)))
    with pytest.raises(VolumeGeometryError, match="spacing_mm"):
        Volume.from_geometry(np.ones((2, 2, 2)), spacing_mm=(1.0, 0.0, 1.0))


def test_sheared_grid_volume_and_flag():
    # slice axis tilted 20 degrees toward the row axis: a parallelepiped voxel whose volume
    # is base area x height = (1 x 1) x (2 cos 20deg).
    aff = np.eye(4)
    tilt = np.radians(20)
    aff[:3, 0] = [0.0, 2 * np.sin(tilt), 2 * np.cos(tilt)]  # slice step
    aff[:3, 1] = [0.0, 1.0, 0.0]
    aff[:3, 2] = [1.0, 0.0, 0.0]
    vol = Volume(np.zeros((2, 2, 2)), aff)
    assert vol.has_shear
    assert vol.spacing_mm[0] == pytest.approx(2.0)
    assert vol.voxel_volume_ml == pytest.approx(2 * np.cos(tilt) / 1000.0)


@pytest.mark.parametrize(
    ("direction", "expected"),
    [
        (np.eye(3), "LPS"),
        (np.diag([-1.0, -1.0, 1.0]), "RAS"),
        # sagittal DICOM: slices along -x, rows along -z, columns along +y
        (np.array([[-1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]), "RIP"),
        # axial DICOM: slices up (+z), rows toward posterior (+y), columns to the left (+x)
        (np.array([[0, 0, 1.0], [0, 1.0, 0], [1.0, 0, 0]]), "SPL"),
        # 20-degree oblique sagittal keeps its dominant letters
        (rotation("z", 20) @ np.array([[-1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]), "RIP"),
    ],
)
def test_orientation_codes(direction, expected):
    vol = Volume(np.zeros((2, 2, 2)), affine_from(direction, (1, 1, 1), (0, 0, 0)))
    assert vol.orientation == expected


def test_orientation_letters_are_distinct_at_45_degrees():
    vol = Volume(np.zeros((2, 2, 2)), affine_from(rotation("z", 45), (1, 1, 1), (0, 0, 0)))
    code = vol.orientation
    assert sorted(code[i] in "LRPASI" for i in range(3)) == [True] * 3
    assert len({c.replace("R", "L").replace("A", "P").replace("I", "S") for c in code}) == 3


# ---------------------------------------------------------------- coordinates
def test_world_coordinates_hand_computed():
    aff = affine_from(np.diag([-1.0, 1.0, 1.0]), (4.0, 0.5, 0.25), (100.0, -50.0, 20.0))
    vol = Volume(np.zeros((5, 6, 7)), aff)
    # index (2, 4, 8): x = 100 - 2*4, y = -50 + 4*0.5, z = 20 + 8*0.25
    np.testing.assert_allclose(vol.world_coordinates([2, 4, 8]), [92.0, -48.0, 22.0])
    pts = np.array([[[0, 0, 0], [1, 1, 1]], [[4, 5, 6], [0.5, 0, 0]]])
    out = vol.world_coordinates(pts)
    assert out.shape == (2, 2, 3)
    np.testing.assert_allclose(out[1, 1], [98.0, -50.0, 20.0])


def test_index_of_inverts_world_coordinates():
    aff = affine_from(rotation("x", 33) @ rotation("z", -12), (3.3, 0.7, 0.6), (5, 6, 7))
    aff[:3, 0] += [0.4, 0.0, 0.2]  # shear too
    vol = Volume(np.zeros((4, 4, 4)), aff)
    idx = np.random.default_rng(1).uniform(-2, 6, size=(20, 3))
    np.testing.assert_allclose(vol.index_of(vol.world_coordinates(idx)), idx, atol=1e-10)
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        vol.index_of([1.0, 2.0])


def test_ras_conversion_of_identity():
    # An identity RAS affine: index (1, 0, 0) is 1 mm to the Right, i.e. LPS x = -1.
    vol = Volume.from_ras_affine(np.zeros((2, 2, 2)), np.eye(4))
    np.testing.assert_allclose(vol.world_coordinates([1, 0, 0]), [-1.0, 0.0, 0.0])
    np.testing.assert_allclose(vol.world_coordinates([0, 1, 0]), [0.0, -1.0, 0.0])
    np.testing.assert_allclose(vol.world_coordinates([0, 0, 1]), [0.0, 0.0, 1.0])
    np.testing.assert_allclose(vol.to_ras_affine(), np.eye(4))
    assert vol.orientation == "RAS"
    np.testing.assert_array_equal(LPS_TO_RAS @ LPS_TO_RAS, np.eye(4))


def test_ras_roundtrip_general_affine():
    ras = affine_from(rotation("y", 17), (2.0, 1.0, 1.5), (-3.0, 4.0, 5.0))
    vol = Volume.from_ras_affine(np.zeros((2, 3, 4)), ras)
    np.testing.assert_allclose(vol.to_ras_affine(), ras)
    # a point: RAS (x, y, z) is LPS (-x, -y, z)
    p_ras = ras @ [1, 2, 3, 1]
    np.testing.assert_allclose(vol.world_coordinates([1, 2, 3]), [-p_ras[0], -p_ras[1], p_ras[2]])


# ---------------------------------------------------------------- derived volumes
def test_with_array_keeps_geometry_and_metadata():
    vol = Volume(
        np.zeros((2, 3, 4)),
        np.diag([2.0, 1.0, 1.0, 1.0]),
        series_instance_uid="1.2.3",
        modality="MR",
        metadata={"a": 1},
        warnings=["w"],
    )
    labels = vol.with_array(np.ones((2, 3, 4), dtype=np.uint8))
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels.affine, vol.affine)
    assert (labels.series_instance_uid, labels.modality) == ("1.2.3", "MR")
    labels.metadata["a"] = 2
    labels.warnings.append("x")
    assert vol.metadata == {"a": 1} and vol.warnings == ["w"]
    with pytest.raises(VolumeGeometryError, match="shape"):
        vol.with_array(np.zeros((3, 3, 4)))


def test_same_geometry():
    a = Volume(np.zeros((2, 3, 4)), np.eye(4))
    assert a.has_same_geometry(Volume(np.ones((2, 3, 4)), np.eye(4)))
    assert not a.has_same_geometry(Volume(np.ones((2, 3, 5)), np.eye(4)))
    assert not a.has_same_geometry(Volume(np.ones((2, 3, 4)), np.diag([1, 1, 1.1, 1])))


# ---------------------------------------------------------------- resampling
def linear_field(points: np.ndarray) -> np.ndarray:
    return 3.0 + 0.5 * points[..., 0] - 0.25 * points[..., 1] + 0.125 * points[..., 2]


def smooth_field(points: np.ndarray) -> np.ndarray:
    return np.sin(points[..., 0] / 9.0) * np.cos(points[..., 1] / 11.0) + points[..., 2] / 20.0


def sample(vol_geometry: Volume, func) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in vol_geometry.shape], indexing="ij"), -1)
    return func(vol_geometry.world_coordinates(idx))


def grid(shape, direction, spacing, origin) -> Volume:
    return Volume(np.zeros(shape), affine_from(direction, spacing, origin))


def test_resample_onto_same_grid_is_exact():
    src = grid((5, 6, 7), rotation("z", 10), (2.0, 1.0, 0.7), (1, 2, 3))
    src = src.with_array(np.random.default_rng(0).normal(size=src.shape))
    for order in (0, 1, 3):
        out = src.resample_to(src, order=order)
        np.testing.assert_allclose(out.array, src.array, atol=1e-12)


def test_resample_rotated_shifted_grid_linear_field_is_exact():
    # Trilinear interpolation reproduces a linear function exactly, so every output voxel
    # inside the source must equal the function at its own world position.
    src = grid((20, 22, 24), rotation("x", 5), (2.0, 1.5, 1.2), (-15.0, -16.0, -14.0))
    src = src.with_array(sample(src, linear_field))
    ref = grid((10, 12, 12), rotation("z", 25) @ rotation("y", 15), (1.7, 1.3, 1.1), (-6, -7, -5))
    out = src.resample_to(ref, order=1, fill_value=np.nan)
    truth = sample(ref, linear_field)
    inside = np.isfinite(out.array)
    assert inside.mean() > 0.9  # the reference grid lies mostly inside the source
    np.testing.assert_allclose(out.array[inside], truth[inside], atol=1e-9)
    np.testing.assert_array_equal(out.affine, ref.affine)
    assert out.shape == ref.shape


def test_resample_smooth_field_cubic_close():
    src = grid((30, 30, 30), np.eye(3), (1.0, 1.0, 1.0), (-15.0, -15.0, -15.0))
    src = src.with_array(sample(src, smooth_field))
    ref = grid((12, 12, 12), rotation("z", 30), (1.3, 1.1, 0.9), (-6.0, -5.0, -4.0))
    truth = sample(ref, smooth_field)
    cubic = src.resample_to(ref, order=3).array
    linear = src.resample_to(ref, order=1).array
    err_cubic = np.max(np.abs(cubic - truth))
    err_linear = np.max(np.abs(linear - truth))
    # linear interpolation error <= h^2/8 max|f''|: h = 1, |f''| <= (1/9)^2 + (1/11)^2
    assert err_linear <= (1 / 8) * ((1 / 9) ** 2 + (1 / 11) ** 2) * 3 + 1e-9
    assert err_cubic < err_linear / 5


def test_resample_outside_is_fill_value():
    src = Volume(np.ones((4, 3, 3)), np.eye(4))
    shifted = np.eye(4)
    shifted[0, 3] = 2.0  # the reference starts 2 slices further: its slices 2, 3 fall outside
    out = src.resample_to(Volume(np.zeros((4, 3, 3)), shifted), order=1, fill_value=-7.0)
    np.testing.assert_array_equal(out.array[:2], 1.0)
    np.testing.assert_array_equal(out.array[2:], -7.0)


def test_resample_labels_nearest_keeps_dtype_and_values():
    labels = np.zeros((6, 6, 6), dtype=np.uint8)
    labels[1:3, 2:5, 1:4] = 20
    labels[4, :, :] = 26
    src = Volume(labels, affine_from(np.eye(3), (2.0, 1.0, 1.0), (0, 0, 0)))
    # reference: 1 mm slices, same origin -> output slice k takes source slice round(k / 2)
    ref = Volume(np.zeros((11, 6, 6)), affine_from(np.eye(3), (1.0, 1.0, 1.0), (0, 0, 0)))
    out = src.resample_to(ref, order=0)
    assert out.dtype == np.uint8
    assert set(np.unique(out.array)) <= {0, 20, 26}
    for k in (0, 2, 4, 6, 8, 10):  # exact positions of source slices
        np.testing.assert_array_equal(out.array[k], labels[k // 2])


def test_resample_flipped_grid_reverses_axis():
    arr = np.arange(4 * 3 * 2, dtype=float).reshape(4, 3, 2)
    src = Volume(arr, np.eye(4))
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0])
    flipped[0, 3] = 3.0  # index k sits at x = 3 - k
    out = src.resample_to(Volume(np.zeros((4, 3, 2)), flipped), order=1)
    np.testing.assert_allclose(out.array, arr[::-1])


def test_resample_argument_checks():
    vol = Volume(np.zeros((2, 2, 2), dtype=np.uint8), np.eye(4))
    with pytest.raises(ValueError, match="order"):
        vol.resample_to(vol, order=7)
    with pytest.raises(TypeError, match="reference"):
        vol.resample_to(np.eye(4))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fill_value"):
        vol.resample_to(vol, order=0, fill_value=-1)


def test_repr_mentions_shape_and_orientation():
    text = repr(Volume(np.zeros((2, 3, 4)), np.eye(4), modality="MR"))
    assert "(2, 3, 4)" in text and "'LPS'" in text and "MR" in text
