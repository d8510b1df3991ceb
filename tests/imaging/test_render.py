"""Tests of the overlay PNG renderer (`bmetrack.imaging.render`).

Expected pixels are derived by hand from the world geometry of small synthetic volumes and the
documented colours and opacity, not from the renderer's own helpers.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bmetrack.imaging import render
from bmetrack.imaging.volume import Volume

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SUPERIOR = np.array([0.0, 0.0, 1.0])
INFERIOR = -SUPERIOR
POSTERIOR = np.array([0.0, 1.0, 0.0])
ANTERIOR = -POSTERIOR
RIGHT = np.array([-1.0, 0.0, 0.0])


def decode(png: bytes) -> np.ndarray:
    """RGB array (height, width, 3) of PNG bytes."""
    assert png[:8] == PNG_SIGNATURE
    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def sagittal(
    array: np.ndarray,
    *,
    row_dir: np.ndarray = INFERIOR,
    col_dir: np.ndarray = POSTERIOR,
    spacing_mm: tuple[float, float, float] = (3.0, 1.0, 1.0),
) -> Volume:
    """A sagittal volume (slices toward the patient's right) with the given in-plane axes."""
    direction = np.column_stack([RIGHT, row_dir, col_dir])
    return Volume.from_geometry(array, spacing_mm=spacing_mm, direction=direction)


def world_volume(
    row_dir: np.ndarray, col_dir: np.ndarray, n_rows: int, n_cols: int, marker: bool = True
) -> Volume:
    """1 mm grid covering y in [-30, 30) and z in [-20, 20) mm (whatever the axis order), value
    1000 in the superior-anterior corner box y < -22, z > 12, and 100 elsewhere."""
    direction = np.column_stack([RIGHT, row_dir, col_dir])
    origin = np.zeros(3)
    for axis_dir in (row_dir, col_dir):
        world_axis = int(np.argmax(np.abs(axis_dir)))
        low, high = (-30.0, 30.0) if world_axis == 1 else (-20.0, 20.0)
        # first voxel centre: half a millimetre inside the box, at the end the axis starts from
        origin[world_axis] = low + 0.5 if axis_dir[world_axis] > 0 else high - 0.5
    affine = np.eye(4)
    affine[:3, :3] = direction
    affine[:3, 3] = origin
    k, i, j = np.meshgrid(np.arange(1), np.arange(n_rows), np.arange(n_cols), indexing="ij")
    world = np.stack([k, i, j], axis=-1) @ direction.T + origin
    array = np.full((1, n_rows, n_cols), 100.0)
    if marker:
        array[(world[..., 1] < -22.0) & (world[..., 2] > 12.0)] = 1000.0
    return Volume(array, affine)


# ------------------------------------------------------------------------ size and format
def test_png_signature_and_native_size() -> None:
    vol = sagittal(np.random.default_rng(0).uniform(0, 500, (5, 64, 48)))
    png = render.render_slice(vol, 2)
    assert png[:8] == PNG_SIGNATURE
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG"
        assert im.size == (48, 64)  # (width, height): 1 mm pixels, rows down, columns across


def test_size_px_sets_longest_side() -> None:
    vol = sagittal(np.ones((2, 64, 48)))
    assert decode(render.render_slice(vol, 0, size_px=128)).shape == (128, 96, 3)


def test_anisotropic_pixels_give_physical_aspect_ratio() -> None:
    # 0.5 mm rows x 1.0 mm columns: 40 rows = 20 mm tall, 40 columns = 40 mm wide -> 2:1.
    vol = sagittal(np.ones((1, 40, 40)), spacing_mm=(3.0, 0.5, 1.0))
    assert decode(render.render_slice(vol, 0)).shape == (40, 80, 3)
    assert decode(render.render_slice(vol, 0, size_px=200)).shape == (100, 200, 3)


def test_anisotropic_pixels_stretch_the_content() -> None:
    # A 10 x 10 voxel square with 0.5 x 1.0 mm pixels is 5 mm x 10 mm: twice as wide as tall.
    array = np.zeros((1, 40, 40))
    array[0, 10:20, 10:20] = 1000.0
    vol = sagittal(array, spacing_mm=(3.0, 0.5, 1.0))
    rgb = decode(render.render_slice(vol, 0, window=(0, 1000), orientation_letters=False))
    rows, cols = np.nonzero(rgb[..., 0] > 127)  # half maximum: bilinear edges are soft
    assert rows.max() - rows.min() + 1 == 10
    assert cols.max() - cols.min() + 1 == 20


# ------------------------------------------------------------------------ orientation
@pytest.mark.parametrize(
    ("row_dir", "col_dir", "n_rows", "n_cols"),
    [
        (INFERIOR, POSTERIOR, 40, 60),  # the usual scanner layout
        (SUPERIOR, POSTERIOR, 40, 60),  # rows flipped
        (INFERIOR, ANTERIOR, 40, 60),  # columns flipped
        (SUPERIOR, ANTERIOR, 40, 60),  # both flipped
        (POSTERIOR, INFERIOR, 60, 40),  # transposed: rows along y, columns along z
        (ANTERIOR, SUPERIOR, 60, 40),  # transposed and flipped
    ],
)
def test_superior_anterior_marker_shows_top_left(
    row_dir: np.ndarray, col_dir: np.ndarray, n_rows: int, n_cols: int
) -> None:
    vol = world_volume(row_dir, col_dir, n_rows, n_cols)
    rgb = decode(render.render_slice(vol, 0, window=(0, 1000), orientation_letters=False))
    # Display: 60 mm (y) wide, 40 mm (z) tall; the marker box is y in [-30, -22) (first 8
    # columns from the anterior side) and z in (12, 20] (first 8 rows from the top).
    assert rgb.shape == (40, 60, 3)
    rows, cols = np.nonzero(rgb[..., 0] > 200)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (0, 7, 0, 7)
    assert rows.size == 64


def test_orientation_letters_are_drawn_at_the_edges() -> None:
    vol = world_volume(INFERIOR, POSTERIOR, 40, 60, marker=False)
    with_letters = decode(render.render_slice(vol, 0, window=(0, 1000), size_px=240))
    without = decode(
        render.render_slice(vol, 0, window=(0, 1000), size_px=240, orientation_letters=False)
    )
    changed = np.any(with_letters != without, axis=2)
    h, w = changed.shape
    assert changed[: h // 8, w // 3 : 2 * w // 3].any()  # top
    assert changed[h // 3 : 2 * h // 3, : w // 8].any()  # left
    assert not changed[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].any()  # centre untouched


# ------------------------------------------------------------------------ overlays and labels
GRAY_100 = 127  # value 100 in window (0, 200): int(100 * 255 / 200)


def test_overlay_fill_and_contour_colours_at_masked_pixels_only() -> None:
    vol = sagittal(np.full((1, 30, 30), 100.0))
    cement = np.zeros(vol.shape, dtype=bool)
    cement[0, 5:15, 5:15] = True
    edema = np.zeros(vol.shape, dtype=bool)
    edema[0, 18:26, 10:25] = True
    rgb = decode(
        render.render_slice(
            vol,
            0,
            overlays={"cement": cement, "edema": edema},
            window=(0, 200),
            orientation_letters=False,
        )
    )
    alpha = 0.3  # documented default opacity
    for mask, colour in ((cement[0], (0, 224, 255)), (edema[0], (255, 176, 0))):
        rows, cols = np.nonzero(mask)
        r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
        border = np.zeros_like(mask)
        border[r0, c0 : c1 + 1] = border[r1, c0 : c1 + 1] = True
        border[r0 : r1 + 1, c0] = border[r0 : r1 + 1, c1] = True
        assert np.all(rgb[border] == colour)  # crisp opaque contour
        fill = np.round(GRAY_100 * (1 - alpha) + np.array(colour) * alpha)
        assert np.all(np.abs(rgb[mask & ~border] - fill) <= 1)  # semi-transparent fill
    outside = ~(cement[0] | edema[0])
    assert np.all(rgb[outside] == GRAY_100)


def test_unknown_overlay_names_still_get_a_colour() -> None:
    vol = sagittal(np.full((1, 20, 20), 100.0))
    mask = np.zeros(vol.shape, dtype=bool)
    mask[0, 5:10, 5:10] = True
    rgb = decode(
        render.render_slice(
            vol, 0, overlays={"something": mask}, window=(0, 200), orientation_letters=False
        )
    )
    assert not np.all(rgb[5, 5] == GRAY_100)
    assert np.all(rgb[15, 15] == GRAY_100)


def test_body_outline_is_thin_green_and_interior_untouched() -> None:
    vol = sagittal(np.full((1, 30, 30), 100.0))
    labels = np.zeros(vol.shape, dtype=np.int16)
    labels[0, 5:15, 5:20] = 20
    labels[0, 15:25, 5:20] = 21  # touching neighbour: the shared border is outlined too
    rgb = decode(
        render.render_slice(vol, 0, labels=labels, window=(0, 200), orientation_letters=False)
    )
    green = np.all(rgb == render.BODY_OUTLINE_COLOUR, axis=2)
    assert green[5, 5:20].all() and green[24, 5:20].all()  # outer top and bottom edges
    assert green[14, 5:20].all() and green[15, 5:20].all()  # the border between the bodies
    assert not green[7:13, 7:18].any() and np.all(rgb[7:13, 7:18] == GRAY_100)
    assert not green[:5].any() and not green[:, 20:].any()


def test_level_names_drawn_anterior_to_the_body_at_its_centroid() -> None:
    vol = sagittal(np.full((1, 200, 200), 100.0))
    labels = np.zeros(vol.shape, dtype=np.int16)
    labels[0, 80:120, 100:160] = 20  # centroid row 99.5, anterior edge at column 100
    kwargs = {"labels": labels, "window": (0.0, 200.0), "orientation_letters": False}
    plain = decode(render.render_slice(vol, 0, **kwargs))
    named = decode(render.render_slice(vol, 0, level_names={20: "L1"}, **kwargs))
    rows, cols = np.nonzero(np.any(plain != named, axis=2))
    assert rows.size > 20  # text was drawn
    assert cols.max() < 100  # left of the body = anterior side
    assert rows.min() < 100 < rows.max()  # spans the centroid's height
    assert rows.min() >= 80 and rows.max() < 120
    # A label absent from the slice draws nothing.
    absent = decode(render.render_slice(vol, 0, level_names={21: "L2"}, **kwargs))
    assert np.array_equal(absent, plain)


# ------------------------------------------------------------------------ window
def test_auto_window_is_percentiles_of_voxels_inside_the_body() -> None:
    body = np.arange(500.0, 1500.0)  # 1000 values; background of 1000 zeros (air)
    array = np.concatenate([np.zeros(1000), np.random.default_rng(1).permutation(body)])
    vol = sagittal(array.reshape(2, 40, 25))
    low, high = render.auto_window(vol)
    # numpy's linear percentiles of 500..1499: position p/100 * 999 from 500.
    assert low == pytest.approx(500 + 0.01 * 999)
    assert high == pytest.approx(500 + 0.995 * 999)


def test_auto_window_maps_to_black_and_white() -> None:
    values = np.linspace(0.0, 1000.0, 40 * 40).reshape(1, 40, 40)
    vol = sagittal(values)
    low, high = render.auto_window(vol)
    rgb = decode(render.render_slice(vol, 0, orientation_letters=False))
    gray = rgb[..., 0]
    assert np.all(gray[values[0] <= low] == 0)
    assert np.all(gray[values[0] >= high] == 255)
    mid = (values[0] > low + 0.2 * (high - low)) & (values[0] < high - 0.2 * (high - low))
    assert np.all((gray[mid] > 40) & (gray[mid] < 215))


def test_constant_image_does_not_fail() -> None:
    vol = sagittal(np.full((1, 10, 10), 7.0))
    low, high = render.auto_window(vol)
    assert high > low
    assert decode(render.render_slice(vol, 0)).shape == (10, 10, 3)


# ------------------------------------------------------------------------ errors
@pytest.mark.parametrize("bad", [-1, 3, 10])
def test_bad_slice_index_is_reported(bad: int) -> None:
    vol = sagittal(np.ones((3, 8, 8)))
    with pytest.raises(ValueError, match=r"slice_index .* 3 slices, use 0\.\.2"):
        render.render_slice(vol, bad)


def test_mismatched_grids_are_reported() -> None:
    stir = sagittal(np.ones((3, 8, 8)))
    t1 = sagittal(np.ones((3, 8, 8)), spacing_mm=(3.0, 1.2, 1.2))
    with pytest.raises(ValueError, match=r"same grid.*t1\.resample_to\(stir\)"):
        render.render_pair(stir, t1, 1)
    with pytest.raises(ValueError, match="overlays\\['edema'\\] must have the image's shape"):
        render.render_slice(stir, 0, overlays={"edema": np.zeros((3, 8, 9), bool)})
    with pytest.raises(ValueError, match="labels is on another grid"):
        render.render_slice(stir, 0, labels=t1.with_array(np.zeros((3, 8, 8), np.int16)))


def test_bad_window_and_size_are_reported() -> None:
    vol = sagittal(np.ones((1, 8, 8)))
    with pytest.raises(ValueError, match="level_names needs labels"):
        render.render_slice(vol, 0, level_names={20: "L1"})
    with pytest.raises(ValueError, match="high > low"):
        render.render_slice(vol, 0, window=(5.0, 5.0))
    with pytest.raises(ValueError, match="size_px"):
        render.render_slice(vol, 0, size_px=3)


# ------------------------------------------------------------------------ composite figures
def pair_volumes() -> tuple[Volume, Volume, np.ndarray]:
    stir_arr = np.full((5, 60, 60), 100.0)
    t1_arr = np.full((5, 60, 60), 500.0)
    labels = np.zeros((5, 60, 60), dtype=np.int16)
    labels[1, 22:38, 20:40] = 20  # small section on slice 1
    labels[2, 20:40, 15:45] = 20  # largest area: the mid-sagittal slice
    labels[3, 24:36, 20:40] = 20
    stir_arr[2][labels[2] == 20] = 400.0  # the body is bright on STIR only on slice 2
    t1_arr[labels == 20] = 100.0  # dark on T1
    return sagittal(stir_arr), sagittal(t1_arr), labels


def test_render_pair_puts_stir_left_and_t1_right_with_a_title() -> None:
    stir, t1, _labels = pair_volumes()
    untitled = decode(render.render_pair(stir, t1, 2, stir_window=(0, 500), t1_window=(0, 500)))
    titled = decode(
        render.render_pair(
            stir, t1, 2, title="L1 · month 3", stir_window=(0, 500), t1_window=(0, 500)
        )
    )
    assert untitled.shape[0] == 60 and untitled.shape[1] > 120
    assert titled.shape[0] > 60 and titled.shape[1] == untitled.shape[1]
    # Body centre (row 30, column 30): STIR 400 -> 204; T1 100 -> 51 in window (0, 500).
    assert np.all(untitled[30, 30] == 204)
    right_x = untitled.shape[1] - 60
    assert np.all(untitled[30, right_x + 30] == 51)
    assert np.all(untitled[50, right_x + 50] == 255)  # T1 background 500


def test_vertebra_panel_uses_mid_sagittal_slice_and_crops_with_margin() -> None:
    stir, t1, labels = pair_volumes()
    png = render.render_vertebra_panel(stir, t1, labels, 20, margin_mm=5, size_px=120)
    rgb = decode(png)
    # Body on slice 2: rows 20..39, columns 15..44 (20 x 30 mm); +5 mm each side: 30 x 40 mm.
    assert rgb.shape[0] == 90  # 40 mm -> 120 px, so 30 mm -> 90 px
    left = rgb[:, :120]
    # Body centre on STIR shows the slice-2 value (bright), not slices 1 or 3 (100).
    low, high = render.auto_window(stir)
    expected = np.clip((400 - low) * 255 / (high - low), 0, 255)
    assert abs(left[45, 60, 0] - expected) <= 2 and expected > 200
    with pytest.raises(ValueError, match=r"label 21 is not in labels .*\[20\]"):
        render.render_vertebra_panel(stir, t1, labels, 21)


def test_render_timeline_places_panels_with_captions() -> None:
    panels = [
        render.render_slice(sagittal(np.full((1, 40, 30), v)), 0, window=(0, 100))
        for v in (20.0, 50.0, 80.0)
    ]
    panels.append(render.render_slice(sagittal(np.ones((1, 20, 15))), 0))  # smaller: scaled up
    rgb = decode(render.render_timeline(panels, ["month 0", "month 3", "month 6", "month 12"]))
    assert rgb.shape[0] > 40  # caption band below the panels
    assert rgb.shape[1] >= 4 * 30
    # The first panel is pasted at the top left unchanged (value 20 -> 51).
    assert np.all(rgb[20, 15] == 51)
    caption_band = rgb[40:]
    assert caption_band.max() > 200  # white caption text
    wrapped = decode(render.render_timeline(panels, ["a", "b", "c", "d"], max_per_row=2))
    assert wrapped.shape[0] > 2 * 40 and wrapped.shape[1] < rgb.shape[1]
    with pytest.raises(ValueError, match="one entry per panel"):
        render.render_timeline(panels, ["month 0"])
    with pytest.raises(ValueError, match="at least one"):
        render.render_timeline([], [])
    with pytest.raises(ValueError, match=r"panels\[0\] is not a readable image"):
        render.render_timeline([b"not a png"], ["x"])


def test_write_png(tmp_path: Path) -> None:
    png = render.render_slice(sagittal(np.ones((1, 8, 8))), 0)
    out = render.write_png(png, tmp_path / "a" / "b" / "slice.png")
    assert out.read_bytes() == png
    with pytest.raises(ValueError, match="PNG bytes"):
        render.write_png(b"GIF89a", tmp_path / "x.png")
