"""Overlay PNGs a radiologist can check at a glance (the reference paper's Fig 2 look).

Every image is shown in the radiological display convention, derived from the affine (never
from the row/column order of the array): for a sagittal slice anterior is on the viewer's
left and superior at the top; for a coronal slice the patient's right is on the viewer's
left; for an axial slice anterior is at the top and the patient's right on the left.
Pixels are square in millimetres, so anisotropic pixel spacing does not distort anatomy.

Rendering is pure numpy compositing plus Pillow (no matplotlib), so one 512 x 512 slice takes
a few tens of milliseconds, which the web viewer needs to serve slices on demand.

Colours: edema yellow-orange, cement cyan, peri-cement rim magenta, hemangioma violet,
vertebral body outlines thin green; level names in white beside each body (anterior side).
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

from bmetrack.anatomy import LevelError, level_from_label
from bmetrack.imaging.volume import Volume

__all__ = [
    "BODY_OUTLINE_COLOUR",
    "OVERLAY_COLOURS",
    "auto_window",
    "render_pair",
    "render_slice",
    "render_timeline",
    "render_vertebra_panel",
    "write_png",
]

RGB = tuple[int, int, int]
FontType = ImageFont.FreeTypeFont | ImageFont.ImageFont

#: Fill and contour colour of each named overlay mask (keys compared case-insensitively).
OVERLAY_COLOURS: dict[str, RGB] = {
    "edema": (255, 176, 0),
    "oedema": (255, 176, 0),
    "bme": (255, 176, 0),
    "cement": (0, 224, 255),
    "rim": (255, 0, 255),
    "hemangioma": (150, 100, 255),
}
#: Colours for overlay names not in `OVERLAY_COLOURS`, used in order.
_EXTRA_COLOURS: tuple[RGB, ...] = ((255, 64, 64), (64, 128, 255), (255, 255, 255))
#: Thin outline of every vertebral body of the label map.
BODY_OUTLINE_COLOUR: RGB = (0, 215, 0)
_TEXT_COLOUR: RGB = (255, 255, 255)
_DIM_TEXT_COLOUR: RGB = (200, 200, 200)
_BACKGROUND: RGB = (0, 0, 0)

_FONT_PATH = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
_BOLD_FONT_PATH = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"

# Auto window: percentiles of the voxels inside the body (METHOD-independent display choice).
_WINDOW_PERCENTILES = (1.0, 99.5)
# "Inside the body": above this fraction of the way from the minimum to the 99.5th percentile
# of all voxels; air in magnitude MRI stays well below it, fat-suppressed tissue above it.
_BODY_FRACTION = 0.08
# The window is estimated from at most this many voxels (a regular sub-sample), so that it
# costs a few milliseconds even for large volumes.
_WINDOW_MAX_SAMPLES = 1 << 18
# Native-resolution renders are limited to this many pixels on the longest side.
_MAX_NATIVE_PX = 2048
_DEFAULT_ALPHA = 0.3
# zlib level 1: noisy MR slices barely compress better at higher levels, which cost 2-4x
_PNG_COMPRESS_LEVEL = 1

# World directions (LPS) pointing down and right on screen, for the plane closest to the
# slice, in radiological convention.
_SUPERIOR = np.array([0.0, 0.0, 1.0])
_POSTERIOR = np.array([0.0, 1.0, 0.0])
_LEFT = np.array([1.0, 0.0, 0.0])
_SCREEN_AXES = {
    # plane index = world axis of the slice normal: 0 sagittal, 1 coronal, 2 axial
    0: (-_SUPERIOR, _POSTERIOR, ("S", "I", "A", "P")),
    1: (-_SUPERIOR, _LEFT, ("S", "I", "R", "L")),
    2: (_POSTERIOR, _LEFT, ("A", "P", "R", "L")),
}


# ---------------------------------------------------------------------------------- public API
def auto_window(image: Volume | npt.ArrayLike) -> tuple[float, float]:
    """Display window from robust percentiles of the voxels inside the body.

    The window runs from the 1st to the 99.5th percentile of the voxels whose value lies above
    8 % of the way from the minimum to the 99.5th percentile of all voxels (air is excluded,
    fat-suppressed tissue is kept); when fewer than 5 % of the voxels pass, all are used.
    Volumes larger than 2**18 voxels are sub-sampled on a
    regular grid first.

    Parameters
    ----------
    image : Volume or array_like
        The whole volume (so that every slice of a series shares one window) or one slice.

    Returns
    -------
    (float, float)
        ``(low, high)`` with ``high > low``.
    """
    arr = image.array if isinstance(image, Volume) else np.asarray(image)
    if arr.size == 0:
        msg = "image must not be empty"
        raise ValueError(msg)
    sample = _regular_sample(arr).astype(np.float64, copy=False)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return (0.0, 1.0)
    lowest = float(sample.min())
    top = float(np.percentile(sample, _WINDOW_PERCENTILES[1]))
    inside = sample[sample > lowest + _BODY_FRACTION * (top - lowest)]
    if inside.size < max(16, sample.size // 20):  # no body/air contrast: use everything
        inside = sample
    low, high = (float(v) for v in np.percentile(inside, _WINDOW_PERCENTILES))
    if not high > low:
        high = low + 1.0
    return (low, high)


def render_slice(
    image: Volume,
    slice_index: int,
    *,
    overlays: Mapping[str, npt.ArrayLike | Volume] | None = None,
    labels: npt.ArrayLike | Volume | None = None,
    level_names: Mapping[int, str] | None = None,
    window: tuple[float, float] | None = None,
    size_px: int | None = None,
    overlay_alpha: float = _DEFAULT_ALPHA,
    orientation_letters: bool = True,
) -> bytes:
    """Render one slice (radiological convention, square pixels) with overlays, as PNG bytes.

    Parameters
    ----------
    image : Volume
        The image; slices are ``image.array[k]`` (the slice axis).
    slice_index : int
        Index along the slice axis, ``0 <= slice_index < image.shape[0]``.
    overlays : mapping of str to array or Volume, optional
        Boolean masks on the image grid (shape ``image.shape``), drawn as semi-transparent
        fills with a crisp contour.  Known names get fixed colours (`OVERLAY_COLOURS`: edema
        yellow-orange, cement cyan, rim magenta, hemangioma violet); drawn in mapping order.
    labels : array or Volume, optional
        Integer label map on the image grid (0 background); each label is outlined in thin
        green.
    level_names : mapping of int to str, optional
        Text written beside each labelled body present in the slice, on its anterior side at
        the height of its centroid (e.g. ``{20: "L1"}``).  Needs ``labels``.
    window : (float, float), optional
        Display window ``(low, high)``; default `auto_window` of the whole volume, so every
        slice of a series looks the same.
    size_px : int, optional
        Length of the longest side of the output in pixels; default: native resolution (the
        finest pixel spacing), at most 2048 pixels.
    overlay_alpha : float, default 0.3
        Opacity of the overlay fills (contours are opaque).
    orientation_letters : bool, default True
        Write the orientation letters (e.g. ``A``/``P``/``S``) at the middle of each edge.

    Returns
    -------
    bytes
        An RGB PNG image.

    Raises
    ------
    ValueError
        For a slice index out of range, masks or labels off the image grid, a bad window,
        size or opacity.
    """
    plane = _prepare_plane(
        image, slice_index, overlays=overlays, labels=labels, level_names=level_names
    )
    picture = _compose(
        plane,
        window=_checked_window(window) if window is not None else auto_window(image),
        size_px=size_px,
        level_names=level_names,
        overlay_alpha=overlay_alpha,
        orientation_letters=orientation_letters,
    )
    return _png_bytes(picture)


def render_pair(
    stir: Volume,
    t1: Volume,
    slice_index: int,
    *,
    overlays: Mapping[str, npt.ArrayLike | Volume] | None = None,
    labels: npt.ArrayLike | Volume | None = None,
    level_names: Mapping[int, str] | None = None,
    title: str | None = None,
    stir_window: tuple[float, float] | None = None,
    t1_window: tuple[float, float] | None = None,
    size_px: int | None = None,
    overlay_alpha: float = _DEFAULT_ALPHA,
) -> bytes:
    """STIR and T1 of the same slice side by side (STIR left), with overlays and a title.

    Parameters
    ----------
    stir, t1 : Volume
        Both on ONE grid (same shape and affine): resample first with
        ``t1.resample_to(stir)``.
    slice_index : int
        Index along the slice axis.
    overlays, labels, level_names
        As in `render_slice`, drawn on both images.
    title : str, optional
        Text above both images, e.g. ``"L1 · month 3 · BME 25% · cement 3.1 ml"``.
    stir_window, t1_window : (float, float), optional
        Display windows; default `auto_window` of each volume.
    size_px : int, optional
        Longest side of EACH image in pixels; default native resolution.
    overlay_alpha : float, default 0.3
        Opacity of the overlay fills.

    Returns
    -------
    bytes
        An RGB PNG image.

    Raises
    ------
    ValueError
        If the two volumes are not on the same grid, and as `render_slice`.
    """
    _require_same_grid(stir, t1)
    images = _stir_and_t1_pictures(
        stir,
        t1,
        slice_index,
        windows=(stir_window, t1_window),
        overlays=overlays,
        labels=labels,
        level_names=level_names,
        size_px=size_px,
        overlay_alpha=overlay_alpha,
    )
    return _png_bytes(_side_by_side(images, title))


def _stir_and_t1_pictures(
    stir: Volume,
    t1: Volume,
    slice_index: int,
    *,
    windows: tuple[tuple[float, float] | None, tuple[float, float] | None] = (None, None),
    overlays: Mapping[str, npt.ArrayLike | Volume] | None,
    labels: npt.ArrayLike | Volume | None,
    level_names: Mapping[int, str] | None,
    size_px: int | None,
    overlay_alpha: float,
    crop_label: int | None = None,
    margin_mm: float = 0.0,
) -> list[Image.Image]:
    """The STIR and the T1 picture of one slice (named in a corner), optionally cropped
    around one body; the window of each defaults to its whole volume's."""
    images = []
    for volume, window, name in ((stir, windows[0], "STIR"), (t1, windows[1], "T1")):
        plane = _prepare_plane(
            volume, slice_index, overlays=overlays, labels=labels, level_names=level_names
        )
        if crop_label is not None:
            plane = _crop_to_label(plane, crop_label, margin_mm)
        picture = _compose(
            plane,
            window=_checked_window(window) if window is not None else auto_window(volume),
            size_px=size_px,
            level_names=level_names,
            overlay_alpha=overlay_alpha,
            orientation_letters=crop_label is None,
        )
        _draw_corner_text(picture, name)
        images.append(picture)
    return images


def render_vertebra_panel(
    stir: Volume,
    t1: Volume,
    labels: npt.ArrayLike | Volume,
    label: int,
    *,
    overlays: Mapping[str, npt.ArrayLike | Volume] | None = None,
    title: str | None = None,
    margin_mm: float = 15.0,
    level_names: Mapping[int, str] | None = None,
    size_px: int = 320,
    overlay_alpha: float = _DEFAULT_ALPHA,
) -> bytes:
    """STIR | T1 cropped around one vertebral body on its mid-sagittal slice.

    The slice shown is the one where the body has the largest area.  Windows come from the
    whole volumes, so panels of one visit are directly comparable.

    Parameters
    ----------
    stir, t1 : Volume
        Both on one grid (resample T1 first with ``t1.resample_to(stir)``).
    labels : array or Volume
        Integer label map of the vertebral bodies on the same grid.
    label : int
        The body to show (e.g. 20 for L1).
    overlays : mapping of str to array or Volume, optional
        Masks as in `render_slice`.
    title : str, optional
        Text above the panel, e.g. ``"L1 · month 3 · BME 25% · cement 3.1 ml"``.
    margin_mm : float, default 15
        Space kept around the body's bounding box on each side.
    level_names : mapping of int to str, optional
        Names written beside bodies; default: the VerSe level name of ``label`` only.
    size_px : int, default 320
        Longest side of each of the two images in pixels.
    overlay_alpha : float, default 0.3
        Opacity of the overlay fills.

    Returns
    -------
    bytes
        An RGB PNG image.

    Raises
    ------
    ValueError
        If ``label`` is absent from ``labels``, the grids differ, or ``margin_mm < 0``.
    """
    _require_same_grid(stir, t1)
    label_array = _grid_array(labels, stir, "labels")
    if not margin_mm >= 0:
        msg = f"margin_mm must be >= 0, got {margin_mm!r}"
        raise ValueError(msg)
    area_per_slice = np.count_nonzero(label_array == label, axis=(1, 2))
    if not area_per_slice.any():
        present = sorted(int(v) for v in np.unique(label_array) if v != 0)
        msg = f"label {label} is not in labels (labels present: {present}); pass one of those"
        raise ValueError(msg)
    slice_index = int(np.argmax(area_per_slice))
    if level_names is None:
        level_names = {int(label): _default_level_name(int(label))}
    images = _stir_and_t1_pictures(
        stir,
        t1,
        slice_index,
        overlays=overlays,
        labels=label_array,
        level_names=level_names,
        size_px=size_px,
        overlay_alpha=overlay_alpha,
        crop_label=int(label),
        margin_mm=margin_mm,
    )
    return _png_bytes(_side_by_side(images, title))


def render_timeline(
    panels: Sequence[bytes],
    captions: Sequence[str],
    *,
    max_per_row: int | None = None,
) -> bytes:
    """Panels (e.g. months 0/3/6/12 of one vertebra) in a row with a caption under each.

    Parameters
    ----------
    panels : sequence of bytes
        PNG images, typically from `render_vertebra_panel`; scaled to a common height.
    captions : sequence of str
        One caption per panel (e.g. ``"month 3 · VAS 2 · BME 25%"``).
    max_per_row : int, optional
        Wrap onto several rows after this many panels; default all in one row.

    Returns
    -------
    bytes
        An RGB PNG image.

    Raises
    ------
    ValueError
        If there are no panels, the counts differ, or a panel is not a readable image.
    """
    if len(panels) == 0:
        msg = "panels must hold at least one PNG image"
        raise ValueError(msg)
    if len(panels) != len(captions):
        msg = (
            f"captions must have one entry per panel: got {len(panels)} panels and "
            f"{len(captions)} captions"
        )
        raise ValueError(msg)
    per_row = len(panels) if max_per_row is None else int(max_per_row)
    if per_row < 1:
        msg = f"max_per_row must be >= 1, got {max_per_row!r}"
        raise ValueError(msg)
    images = []
    for i, data in enumerate(panels):
        try:
            with Image.open(io.BytesIO(data)) as opened:
                images.append(opened.convert("RGB"))
        except Exception as exc:  # Pillow raises several types for bad data
            msg = f"panels[{i}] is not a readable image ({exc}); pass PNG bytes"
            raise ValueError(msg) from exc
    height = max(im.height for im in images)
    images = [
        im
        if im.height == height
        else im.resize(
            (max(1, round(im.width * height / im.height)), height), Image.Resampling.LANCZOS
        )
        for im in images
    ]
    font = _font(int(np.clip(round(height / 16), 12, 36)))
    caption_h = round(font.size * 1.8) if isinstance(font, ImageFont.FreeTypeFont) else 20
    gap = max(12, height // 20)  # visits clearly apart (the STIR/T1 gap is narrower)
    cell_w = max(im.width for im in images)
    n_rows = -(-len(images) // per_row)
    n_cols = min(per_row, len(images))
    canvas = Image.new(
        "RGB",
        (n_cols * cell_w + (n_cols - 1) * gap, n_rows * (height + caption_h) + (n_rows - 1) * gap),
        _BACKGROUND,
    )
    draw = ImageDraw.Draw(canvas)
    for i, (im, caption) in enumerate(zip(images, captions, strict=True)):
        row, col = divmod(i, per_row)
        x0 = col * (cell_w + gap) + (cell_w - im.width) // 2
        y0 = row * (height + caption_h + gap)
        canvas.paste(im, (x0, y0))
        cap_font = _fitting_font(draw, str(caption), cell_w - 4, font)
        left, top, right, bottom = draw.textbbox((0, 0), str(caption), font=cap_font)
        x = col * (cell_w + gap) + (cell_w - (right - left)) // 2 - left
        y = y0 + height + (caption_h - (bottom - top)) // 2 - top
        draw.text((x, y), str(caption), font=cap_font, fill=_TEXT_COLOUR)
    return _png_bytes(canvas)


def write_png(data: bytes, path: str | Path) -> Path:
    """Write PNG bytes to ``path`` (parent folders created) and return the path.

    Raises
    ------
    ValueError
        If ``data`` does not start with the PNG signature.
    """
    if bytes(data[:8]) != _PNG_SIGNATURE:
        msg = f"data must be PNG bytes (from a render_* function), got {bytes(data[:8])!r}..."
        raise ValueError(msg)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return out


# ---------------------------------------------------------------------------------- internals
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class _Plane:
    """One slice in display orientation: rows go down the screen, columns to the right."""

    gray: npt.NDArray[np.float32]
    masks: tuple[tuple[str, npt.NDArray[np.bool_]], ...]
    labels: npt.NDArray[np.integer] | None
    spacing_mm: tuple[float, float]  # (down, right)
    letters: tuple[str, str, str, str]  # top, bottom, left, right


@dataclass(frozen=True)
class _DisplayFrame:
    transpose: bool
    flip_down: bool
    flip_right: bool
    spacing_mm: tuple[float, float]
    letters: tuple[str, str, str, str]

    def orient(self, a: np.ndarray) -> np.ndarray:
        out = a.T if self.transpose else a
        if self.flip_down:
            out = out[::-1]
        if self.flip_right:
            out = out[:, ::-1]
        return out


def _display_frame(volume: Volume) -> _DisplayFrame:
    """How to transpose/flip (row, column) so the slice shows in radiological convention."""
    lin = volume.affine[:3, :3]
    row_dir = lin[:, 1] / np.linalg.norm(lin[:, 1])
    col_dir = lin[:, 2] / np.linalg.norm(lin[:, 2])
    normal = np.cross(row_dir, col_dir)
    down, right, letters = _SCREEN_AXES[int(np.argmax(np.abs(normal)))]
    # The in-plane axis closer to the screen's "down" world direction becomes vertical.
    transpose = abs(col_dir @ down) > abs(row_dir @ down)
    vertical, horizontal = (col_dir, row_dir) if transpose else (row_dir, col_dir)
    row_mm, col_mm = volume.spacing_mm[1], volume.spacing_mm[2]
    return _DisplayFrame(
        transpose=bool(transpose),
        flip_down=bool(vertical @ down < 0),
        flip_right=bool(horizontal @ right < 0),
        spacing_mm=(col_mm, row_mm) if transpose else (row_mm, col_mm),
        letters=letters,
    )


def _prepare_plane(
    image: Volume,
    slice_index: int,
    *,
    overlays: Mapping[str, npt.ArrayLike | Volume] | None,
    labels: npt.ArrayLike | Volume | None,
    level_names: Mapping[int, str] | None = None,
) -> _Plane:
    if not isinstance(image, Volume):
        msg = f"image must be a Volume, got {type(image).__name__}"
        raise TypeError(msg)
    if level_names and labels is None:
        msg = "level_names needs labels: pass the label map the names refer to"
        raise ValueError(msg)
    n_slices = image.shape[0]
    if isinstance(slice_index, bool) or not isinstance(slice_index, int | np.integer):
        msg = f"slice_index must be an integer, got {slice_index!r}"
        raise ValueError(msg)
    if not 0 <= slice_index < n_slices:
        msg = (
            f"slice_index {slice_index} is out of range: the image has {n_slices} slices, "
            f"use 0..{n_slices - 1}"
        )
        raise ValueError(msg)
    k = int(slice_index)
    frame = _display_frame(image)
    gray = frame.orient(np.asarray(image.array[k], dtype=np.float32))
    masks = []
    for name, mask in (overlays or {}).items():
        arr = _grid_array(mask, image, f"overlays[{name!r}]")
        masks.append((str(name), frame.orient(arr[k].astype(bool, copy=False))))
    label_plane = None
    if labels is not None:
        lab = _grid_array(labels, image, "labels")
        if lab.dtype.kind not in "biu" and not np.array_equal(lab[k], np.round(lab[k])):
            msg = f"labels must hold integers, got dtype {lab.dtype} with fractions"
            raise ValueError(msg)
        label_plane = frame.orient(lab[k].astype(np.int64, copy=False))
    return _Plane(
        gray=gray,
        masks=tuple(masks),
        labels=label_plane,
        spacing_mm=frame.spacing_mm,
        letters=frame.letters,
    )


def _grid_array(data: npt.ArrayLike | Volume, image: Volume, name: str) -> np.ndarray:
    """The array of a mask or label map, checked to lie on ``image``'s grid."""
    if isinstance(data, Volume):
        if not data.has_same_geometry(image):
            msg = (
                f"{name} is on another grid than the image ({data!r} vs {image!r}); "
                "resample it first with .resample_to(image, order=0)"
            )
            raise ValueError(msg)
        return data.array
    arr = np.asarray(data)
    if arr.shape != image.shape:
        msg = (
            f"{name} must have the image's shape {image.shape}, got {arr.shape}; "
            "resample it onto the image grid first"
        )
        raise ValueError(msg)
    return arr


def _require_same_grid(stir: Volume, t1: Volume) -> None:
    for name, vol in (("stir", stir), ("t1", t1)):
        if not isinstance(vol, Volume):
            msg = f"{name} must be a Volume, got {type(vol).__name__}"
            raise TypeError(msg)
    if not t1.has_same_geometry(stir):
        msg = (
            f"stir and t1 must be on the same grid, got stir {stir!r} and t1 {t1!r}; "
            "resample first with t1 = t1.resample_to(stir)"
        )
        raise ValueError(msg)


def _checked_window(window: tuple[float, float]) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in window)
    except (TypeError, ValueError) as exc:
        msg = f"window must be two numbers (low, high), got {window!r}"
        raise ValueError(msg) from exc
    if not (np.isfinite(low) and np.isfinite(high) and high > low):
        msg = f"window must be finite with high > low, got {window!r}"
        raise ValueError(msg)
    return (low, high)


def _regular_sample(arr: np.ndarray) -> np.ndarray:
    if arr.size <= _WINDOW_MAX_SAMPLES:
        return arr.ravel()
    step = int(np.ceil((arr.size / _WINDOW_MAX_SAMPLES) ** (1.0 / arr.ndim)))
    return arr[(slice(None, None, step),) * arr.ndim].ravel()


def _crop_to_label(plane: _Plane, label: int, margin_mm: float) -> _Plane:
    assert plane.labels is not None
    rows, cols = np.nonzero(plane.labels == label)
    n_rows, n_cols = plane.gray.shape
    pad_r = round(margin_mm / plane.spacing_mm[0])
    pad_c = round(margin_mm / plane.spacing_mm[1])
    r0, r1 = max(0, rows.min() - pad_r), min(n_rows, rows.max() + 1 + pad_r)
    c0, c1 = max(0, cols.min() - pad_c), min(n_cols, cols.max() + 1 + pad_c)
    box = (slice(r0, r1), slice(c0, c1))
    return _Plane(
        gray=plane.gray[box],
        masks=tuple((name, m[box]) for name, m in plane.masks),
        labels=plane.labels[box],
        spacing_mm=plane.spacing_mm,
        letters=plane.letters,
    )


def _output_shape(plane: _Plane, size_px: int | None) -> tuple[int, int]:
    n_rows, n_cols = plane.gray.shape
    height_mm = n_rows * plane.spacing_mm[0]
    width_mm = n_cols * plane.spacing_mm[1]
    if size_px is None:
        pixel_mm = min(plane.spacing_mm)
        pixel_mm = max(pixel_mm, max(height_mm, width_mm) / _MAX_NATIVE_PX)
    else:
        if isinstance(size_px, bool) or int(size_px) != size_px or size_px < 16:
            msg = f"size_px must be an integer >= 16 (longest side in pixels), got {size_px!r}"
            raise ValueError(msg)
        pixel_mm = max(height_mm, width_mm) / int(size_px)
    return (max(1, round(height_mm / pixel_mm)), max(1, round(width_mm / pixel_mm)))


def _nearest_index(n_source: int, n_out: int) -> npt.NDArray[np.intp]:
    idx = ((np.arange(n_out) + 0.5) * (n_source / n_out)).astype(np.intp)
    return np.minimum(idx, n_source - 1)


def _nearest_resizer(
    source_shape: tuple[int, ...], out_shape: tuple[int, int]
) -> Callable[[np.ndarray], np.ndarray]:
    """Nearest-neighbour resampling of 2-D masks/labels (voxels stay crisp), shared indices."""
    if tuple(source_shape) == out_shape:
        return np.ascontiguousarray
    index = np.ix_(
        _nearest_index(source_shape[0], out_shape[0]),
        _nearest_index(source_shape[1], out_shape[1]),
    )
    return lambda a: a[index]


def _bounding_box(mask: npt.NDArray[np.bool_], pad: int) -> tuple[slice, slice]:
    """Slices of the smallest box holding every True pixel of a non-empty mask, padded."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return (
        slice(max(0, rows[0] - pad), min(mask.shape[0], rows[-1] + 1 + pad)),
        slice(max(0, cols[0] - pad), min(mask.shape[1], cols[-1] + 1 + pad)),
    )


def _inner_edge(mask: npt.NDArray[np.bool_], width: int) -> npt.NDArray[np.bool_]:
    """Pixels of ``mask`` within ``width`` pixels (4-connected) of its outside."""
    inner = mask
    for _ in range(width):
        eroded = inner.copy()
        eroded[1:] &= inner[:-1]
        eroded[:-1] &= inner[1:]
        eroded[:, 1:] &= inner[:, :-1]
        eroded[:, :-1] &= inner[:, 1:]
        eroded[0] = eroded[-1] = False
        eroded[:, 0] = eroded[:, -1] = False
        inner = eroded
    return mask & ~inner


def _label_edges(labels: np.ndarray) -> npt.NDArray[np.bool_]:
    """Pixels of a non-zero label whose 4-neighbour has another label (or is outside)."""
    edge = np.zeros(labels.shape, dtype=bool)
    diff_v = labels[1:] != labels[:-1]
    diff_h = labels[:, 1:] != labels[:, :-1]
    edge[1:] |= diff_v
    edge[:-1] |= diff_v
    edge[:, 1:] |= diff_h
    edge[:, :-1] |= diff_h
    edge[0] = edge[-1] = True
    edge[:, 0] = edge[:, -1] = True
    return edge & (labels != 0)


def _overlay_colour(name: str, extra_index: int) -> tuple[RGB, int]:
    colour = OVERLAY_COLOURS.get(name.lower())
    if colour is not None:
        return colour, extra_index
    return _EXTRA_COLOURS[extra_index % len(_EXTRA_COLOURS)], extra_index + 1


def _compose(
    plane: _Plane,
    *,
    window: tuple[float, float],
    size_px: int | None,
    level_names: Mapping[int, str] | None,
    overlay_alpha: float,
    orientation_letters: bool,
) -> Image.Image:
    if not 0.0 <= overlay_alpha <= 1.0:
        msg = f"overlay_alpha must be between 0 and 1, got {overlay_alpha!r}"
        raise ValueError(msg)
    out_h, out_w = _output_shape(plane, size_px)
    low, high = window
    scaled = (plane.gray - np.float32(low)) * np.float32(255.0 / (high - low))
    gray8 = np.clip(np.nan_to_num(scaled, nan=0.0), 0.0, 255.0).astype(np.uint8)
    # Bilinear (antialiased when shrinking) for the image, nearest for masks: crisp voxels.
    gray_img = Image.fromarray(gray8).resize((out_w, out_h), Image.Resampling.BILINEAR)
    if not plane.masks and plane.labels is None:
        rgb_img = gray_img.convert("RGB")
    else:
        resize = _nearest_resizer(plane.gray.shape, (out_h, out_w))
        rgb = np.array(gray_img.convert("RGB"))
        contour_px = max(1, round(min(out_h, out_w) / 300))
        contours = []
        extra = 0
        for name, mask in plane.masks:
            if not mask.any():
                continue
            colour, extra = _overlay_colour(name, extra)
            shown = resize(mask)
            # Work inside the mask's bounding box (plus the contour width): masks cover a
            # small part of the slice, so this keeps overlays nearly free.
            box = _bounding_box(shown, pad=contour_px + 1)
            sub_mask = shown[box]
            sub_rgb = rgb[box]
            blended = sub_rgb[sub_mask] * np.float32(1.0 - overlay_alpha) + np.asarray(
                colour, dtype=np.float32
            ) * np.float32(overlay_alpha)
            sub_rgb[sub_mask] = np.rint(blended).astype(np.uint8)
            contours.append((box, _inner_edge(sub_mask, contour_px), colour))
        label_shown = None
        if plane.labels is not None:
            label_shown = resize(plane.labels)
            rgb[_label_edges(label_shown)] = BODY_OUTLINE_COLOUR
        for box, edge, colour in contours:  # overlay contours on top of the body outline
            rgb[box][edge] = colour
        rgb_img = Image.fromarray(rgb, "RGB")
        if level_names and label_shown is not None:
            _draw_level_names(rgb_img, label_shown, level_names)
    if orientation_letters:
        _draw_orientation_letters(rgb_img, plane.letters)
    return rgb_img


def _draw_level_names(
    picture: Image.Image, labels: np.ndarray, level_names: Mapping[int, str]
) -> None:
    """Write each body's name left of (anterior to) the body, at its centroid's height."""
    flat = labels.ravel()
    if flat.min() < 0:
        flat = np.where(flat < 0, 0, flat)
    top_label = int(flat.max())
    if top_label == 0:
        return
    counts = np.bincount(flat, minlength=top_label + 1)
    row_sum = np.bincount(flat, weights=np.repeat(np.arange(labels.shape[0]), labels.shape[1]))
    draw = ImageDraw.Draw(picture)
    font = _font(int(np.clip(round(min(picture.size) / 22), 14, 40)))
    gap = max(3, min(picture.size) // 100)
    for label, name in level_names.items():
        lab = int(label)
        if not 0 < lab <= top_label or counts[lab] == 0:
            continue
        centre_row = round(row_sum[lab] / counts[lab])
        # Anterior edge of the body around the centroid's height (the nearest rows present).
        band = labels[max(0, centre_row - 2) : centre_row + 3] == lab
        if not band.any():
            band = labels == lab
        anterior_col = int(np.nonzero(band.any(axis=0))[0].min())
        text = str(name)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x = max(1 - left, anterior_col - gap - right)
        y = centre_row - (top + bottom) // 2
        y = int(np.clip(y, -top, picture.height - bottom))
        draw.text((x, y), text, font=font, fill=_TEXT_COLOUR, stroke_width=2, stroke_fill=(0, 0, 0))


def _draw_orientation_letters(picture: Image.Image, letters: tuple[str, str, str, str]) -> None:
    draw = ImageDraw.Draw(picture)
    font = _font(int(np.clip(round(min(picture.size) / 40), 9, 24)))
    w, h = picture.size
    pad = 2
    top, bottom, left, right = letters
    for text, (ax, ay) in (
        (top, (0.5, 0.0)),
        (bottom, (0.5, 1.0)),
        (left, (0.0, 0.5)),
        (right, (1.0, 0.5)),
    ):
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
        x = round(pad + ax * (w - 2 * pad - (x1 - x0))) - x0
        y = round(pad + ay * (h - 2 * pad - (y1 - y0))) - y0
        draw.text((x, y), text, font=font, fill=_DIM_TEXT_COLOUR, stroke_width=1, stroke_fill=0)


def _draw_corner_text(picture: Image.Image, text: str) -> None:
    draw = ImageDraw.Draw(picture)
    font = _font(int(np.clip(round(min(picture.size) / 18), 12, 32)), bold=True)
    pad = max(3, min(picture.size) // 80)
    x0, y0, _, _ = draw.textbbox((0, 0), text, font=font)
    draw.text(
        (pad - x0, pad - y0), text, font=font, fill=_TEXT_COLOUR, stroke_width=2, stroke_fill=0
    )


def _side_by_side(images: Sequence[Image.Image], title: str | None) -> Image.Image:
    height = max(im.height for im in images)
    gap = max(2, height // 120)
    width = sum(im.width for im in images) + gap * (len(images) - 1)
    title_h = 0
    font: FontType | None = None
    if title:
        font = _font(int(np.clip(round(height / 18), 14, 32)), bold=True)
        title_h = round(getattr(font, "size", 12) * 1.9)
    canvas = Image.new("RGB", (width, height + title_h), _BACKGROUND)
    x = 0
    for im in images:
        canvas.paste(im, (x, title_h))
        x += im.width + gap
    if title and font is not None:
        draw = ImageDraw.Draw(canvas)
        font = _fitting_font(draw, title, width - 8, font, bold=True)
        left, top, right, bottom = draw.textbbox((0, 0), title, font=font)
        draw.text(
            ((width - (right - left)) // 2 - left, (title_h - (bottom - top)) // 2 - top),
            title,
            font=font,
            fill=_TEXT_COLOUR,
        )
    return canvas


def _fitting_font(
    draw: ImageDraw.ImageDraw, text: str, max_width: int, font: FontType, *, bold: bool = False
) -> FontType:
    """``font``, or a smaller size of it when ``text`` would be wider than ``max_width``."""
    size = getattr(font, "size", None)
    if not isinstance(size, int | float):
        return font
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    if right - left <= max_width or size <= 8:
        return font
    new_size = max(8, int(size * max_width / (right - left)))
    return _font(new_size, bold=bold)


@functools.lru_cache(maxsize=64)
def _font(size: int, *, bold: bool = False) -> FontType:
    path = _BOLD_FONT_PATH if bold else _FONT_PATH
    for candidate in (path, _FONT_PATH, "DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(candidate, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size)
    except TypeError:  # very old Pillow: fixed-size bitmap font
        return ImageFont.load_default()


def _default_level_name(label: int) -> str:
    try:
        return level_from_label(label)
    except LevelError:
        return f"#{label}"


def _png_bytes(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    return buffer.getvalue()
