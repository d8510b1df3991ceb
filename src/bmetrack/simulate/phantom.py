"""Synthetic sagittal STIR + T1 spine MRI with exact ground truth (issue 3, item 2).

The anatomy is defined once in world (DICOM LPS) millimetres -- +x patient left, +y posterior,
+z superior -- and sampled on each series' own grid, so STIR and T1 may have different slice
counts, offsets, in-plane resolutions, flips or oblique planes and still show the same patient.

What is modelled
----------------
- A column from T1 to the coccygeal end of the sacrum following a smooth sagittal curve
  (lordosis, thoracolumbar kyphosis, sacral slope), slight scoliosis and axial rotation, rarely a
  transitional L6.  Vertebral bodies are rounded boxes (superellipse footprint, flat posterior
  wall, waist) with a cortical shell, concave endplates and level-dependent size; the sacrum is
  fused (rudimentary discs, alae, dorsal plate).
- Discs (annulus, nucleus bright on STIR when young, dark when degenerated, posterior bulge),
  canal with epidural fat, ligamentum flavum, dural sac (CSF), cord with conus (T12-L2) and
  cauda equina strands, posterior elements with marrow signal (pedicles, articular pillars with
  facet joints, laminae, spinous and transverse processes), paraspinal and psoas muscles,
  subcutaneous and retroperitoneal fat, aorta and IVC, crura, abdominal viscera, liver,
  bladder, lung bases and heart above the diaphragm, skin and air.
- Fractures of Genant type wedge / biconcave / crush with a chosen grade (height loss calibrated
  against the adjacent normal vertebrae as in METHOD.md 4), edema patterns band-like,
  diffuse and patchy with a requested BME percent (exact on the STIR grid), PMMA cement casts
  of a requested volume with an optional STIR-bright rim, hemangiomas (bright on T1 and STIR),
  Modic type 2 fat, chronic fractures without edema.
- Acquisition: partial volume over the slice thickness (sub-slice sampling), k-space
  truncation with apodisation (blur and Gibbs ringing), complex Gaussian noise (Rician
  magnitude, spatially correlated as after zero filling), a coil-like smooth bias field,
  random scanner gain and offset and vendor-style quantisation.

The ground truth (`Phantom.labels`, `Phantom.masks`, `Phantom.truth`) is computed on the STIR
grid: a voxel belongs to a structure when most of its sub-slice samples do.  The DICOM writer
lives in `bmetrack.simulate.phantom_dicom`.
"""

from __future__ import annotations

import math
import time
import warnings as _warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy import fft as sfft
from scipy import ndimage
from scipy.interpolate import CubicSpline
from scipy.spatial import cKDTree

from bmetrack.anatomy import label_from_level, normalise_level
from bmetrack.imaging.volume import Volume
from bmetrack.settings import Settings, resolve_settings

__all__ = [
    "TISSUES",
    "TRUTH_COLUMNS",
    "EdemaPattern",
    "FractureSpec",
    "FractureType",
    "Phantom",
    "PhantomParameters",
    "expected_height_mm",
    "genant_grade_from_loss",
    "make_phantom",
    "phantom_for_visit",
]

F32 = np.float32
FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]

#: Columns of `Phantom.truth`, in order.
TRUTH_COLUMNS: tuple[str, ...] = (
    "level",
    "label",
    "body_volume_ml",
    "edema_volume_ml",
    "cement_volume_ml",
    "rim_volume_ml",
    "bme_percent",
    "bme_present",
    "height_anterior_mm",
    "height_middle_mm",
    "height_posterior_mm",
    "height_loss_percent",
    "genant_grade",
    "deformity",
    "fracture_type",
    "edema_pattern",
    "has_hemangioma",
    "partially_visible",
    "hemangioma_volume_ml",
    "expected_height_mm",
    "requested_bme_percent",
)

# Positions (fraction of the antero-posterior depth, from anterior) of the anterior, middle and
# posterior heights measured on the mid-sagittal plane.
HEIGHT_POSITIONS: tuple[float, float, float] = (0.1, 0.5, 0.9)

_THORACIC = [f"T{i}" for i in range(1, 13)]
_LUMBAR = [f"L{i}" for i in range(1, 6)]
_SACRAL = ["S1", "S2", "S3", "S4", "S5"]

# Nominal body (height, depth, width) and the disc above each level, mm (adult averages).
_BODY_MM: dict[str, tuple[float, float, float]] = {
    "T1": (15.0, 17.0, 26.0), "T2": (16.0, 18.0, 26.0), "T3": (16.5, 19.0, 26.0),
    "T4": (17.0, 20.0, 27.0), "T5": (17.5, 22.0, 28.0), "T6": (18.5, 23.0, 29.0),
    "T7": (19.0, 24.0, 30.0), "T8": (20.0, 26.0, 32.0), "T9": (21.0, 27.5, 34.0),
    "T10": (22.0, 29.0, 36.0), "T11": (23.0, 31.0, 38.0), "T12": (24.5, 33.0, 40.0),
    "L1": (26.0, 35.5, 42.0), "L2": (27.0, 37.5, 44.0), "L3": (27.5, 39.5, 46.0),
    "L4": (27.5, 40.5, 48.0), "L5": (27.0, 40.5, 49.0), "L6": (26.5, 40.0, 48.0),
    "S1": (27.0, 40.0, 48.0), "S2": (21.0, 30.0, 36.0), "S3": (17.0, 22.0, 28.0),
    "S4": (13.0, 16.0, 22.0), "S5": (10.0, 12.0, 16.0),
}  # fmt: skip
_DISC_ABOVE_MM: dict[str, float] = {
    **{f"T{i}": 4.5 + 0.15 * i for i in range(1, 12)},
    "T12": 6.5, "L1": 7.5, "L2": 8.5, "L3": 9.5, "L4": 10.0, "L5": 10.5, "L6": 10.5,
    "S1": 10.0, "S2": 2.2, "S3": 1.8, "S4": 1.5, "S5": 1.2,
}  # fmt: skip
# Change of the column's sagittal angle across the joint above each level (deg, negative =
# lordotic), mean and spread.
_JOINT_DEG: dict[str, tuple[float, float]] = {
    "S1": (-15.0, 3.5), "L6": (-10.0, 2.0), "L5": (-11.0, 2.5), "L4": (-8.0, 2.0),
    "L3": (-5.0, 2.0), "L2": (-2.5, 1.5), "L1": (1.0, 1.5), "T12": (2.5, 1.2),
    **{f"T{i}": (4.0, 1.0) for i in range(1, 12)},
}  # fmt: skip

# Random fracture levels (thoracolumbar junction most often).
_RANDOM_FRACTURE_LEVELS: tuple[tuple[str, float], ...] = (
    ("T10", 0.05), ("T11", 0.1), ("T12", 0.22), ("L1", 0.25), ("L2", 0.16),
    ("L3", 0.12), ("L4", 0.1),
)  # fmt: skip

# Height-loss ranges used when a grade is requested without an explicit loss (percent); the
# margins keep the requested grade robust to sub-voxel measurement error.
_GRADE_LOSS_RANGE: dict[int, tuple[float, float]] = {
    0: (4.0, 12.0),
    1: (21.0, 24.0),
    2: (27.5, 37.5),
    3: (43.0, 58.0),
}


# ============================================================== public specification
class FractureType(StrEnum):
    """Genant deformity type of a fracture (METHOD.md 4)."""

    WEDGE = "wedge"
    BICONCAVE = "biconcave"
    CRUSH = "crush"


class EdemaPattern(StrEnum):
    """Spatial pattern of bone marrow edema inside a fractured body."""

    NONE = "none"
    BAND = "band"
    DIFFUSE = "diffuse"
    PATCHY = "patchy"


@dataclass(frozen=True)
class FractureSpec:
    """One fractured (optionally treated) vertebral body.

    Parameters
    ----------
    level : str
        Level name (``"L1"``, ``"T12"``...); thoracic or lumbar.
    fracture_type : FractureType or str
        ``"wedge"`` (anterior height loss), ``"biconcave"`` (middle) or ``"crush"`` (whole
        body, posterior too).
    grade : int
        Genant grade 0-3 to produce; 0 is an edematous body without height loss.
    edema_pattern : EdemaPattern or str
        ``"band"`` (sub-endplate band), ``"diffuse"``, ``"patchy"`` or ``"none"``.
    bme_percent : float
        Edema volume / (body volume - cement volume) x 100 to produce (exact on the STIR grid,
        capped at the marrow share of the body; the cap is reported in `Phantom.warnings`).
    cement_volume_ml : float
        PMMA cement volume inside the body (0: untreated).
    rim : bool
        Whether a STIR-bright fluid rim surrounds the cement.
    height_loss_percent : float, optional
        Exact height loss instead of a random value within the grade.
    """

    level: str
    fracture_type: FractureType | str = FractureType.WEDGE
    grade: int = 2
    edema_pattern: EdemaPattern | str = EdemaPattern.BAND
    bme_percent: float = 50.0
    cement_volume_ml: float = 0.0
    rim: bool = False
    height_loss_percent: float | None = None

    def __post_init__(self) -> None:
        level = normalise_level(self.level)
        if level[0] not in "TL":
            msg = f"FractureSpec.level must be a thoracic or lumbar level, got {self.level!r}"
            raise ValueError(msg)
        object.__setattr__(self, "level", level)
        object.__setattr__(self, "fracture_type", _enum(FractureType, self.fracture_type))
        object.__setattr__(self, "edema_pattern", _enum(EdemaPattern, self.edema_pattern))
        if int(self.grade) not in (0, 1, 2, 3):
            msg = f"FractureSpec.grade must be 0, 1, 2 or 3, got {self.grade!r}"
            raise ValueError(msg)
        object.__setattr__(self, "grade", int(self.grade))
        if not 0.0 <= float(self.bme_percent) <= 100.0:
            msg = f"FractureSpec.bme_percent must be within 0..100, got {self.bme_percent!r}"
            raise ValueError(msg)
        if self.edema_pattern is EdemaPattern.NONE and self.bme_percent > 0:
            object.__setattr__(self, "edema_pattern", EdemaPattern.BAND)
        if not 0.0 <= float(self.cement_volume_ml) <= 15.0:
            msg = (
                f"FractureSpec.cement_volume_ml must be within 0..15 ml, got "
                f"{self.cement_volume_ml!r}"
            )
            raise ValueError(msg)
        hl = self.height_loss_percent
        if hl is not None and not 0.0 <= float(hl) <= 75.0:
            msg = f"FractureSpec.height_loss_percent must be within 0..75, got {hl!r}"
            raise ValueError(msg)

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any] | FractureSpec) -> FractureSpec:
        """Build from a dict (keys as the fields; ``type``, ``pattern``, ``bme_fraction``
        (0-1) and ``cement_ml`` are accepted as aliases)."""
        if isinstance(spec, FractureSpec):
            return spec
        d = dict(spec)
        aliases = {
            "type": "fracture_type",
            "pattern": "edema_pattern",
            "cement_ml": "cement_volume_ml",
        }
        for old, new in aliases.items():
            if old in d:
                d[new] = d.pop(old)
        if "bme_fraction" in d:
            d["bme_percent"] = 100.0 * float(d.pop("bme_fraction"))
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            msg = f"fracture spec has unknown keys {unknown}; allowed: {sorted(known)}"
            raise ValueError(msg)
        return cls(**d)


@dataclass(frozen=True)
class PhantomParameters:
    """Everything that can be fixed about a phantom; the rest is drawn from the seed.

    Parameters
    ----------
    n_slices, n_rows, n_columns : int
        STIR matrix (sagittal slices x rows x columns).
    pixel_spacing_mm : float
        In-plane pixel size of the STIR series (square pixels).  May be changed to fit both
        `top_level` and `sacrum_in_view` when both are given.
    slice_thickness_mm, slice_gap_mm : float
        Slice thickness and the gap between slices (spacing = thickness + gap).
    top_level : str, optional
        Highest vertebral body fully inside the field of view (the one above is cut).
    sacrum_in_view : bool, optional
        Whether S1 is fully in view (None: yes with probability 0.85).  When not, levels must
        come from an anchor (`Phantom.lowest_level`).
    fractures : "random" or sequence of FractureSpec / dict
        The fractured bodies; ``"random"`` draws 0-3 (with random types, grades, edema,
        cement and rims); an empty sequence gives a spine without fractures.
    hemangioma_probability : float
        Probability that an unfractured body holds a hemangioma.
    snr_stir_range, snr_t1_range : (float, float)
        Signal-to-noise ranges (CSF on STIR, fat on T1, over the noise SD).
    bias_strength : float
        Strength of the smooth multiplicative receive-coil field (0: none).
    t1_grid : {"random", "same", "different"}
        Whether the T1 series shares the STIR grid or has its own slice count, offset and
        in-plane resolution.
    lateral_offset_max_mm : float
        Largest left-right offset of the slab centre from the spine (mid-sagittal plane not in
        the centre slice).
    oblique_max_deg : float
        Largest rotation of the imaging planes about the antero-posterior and cranio-caudal
        axes.
    flip_probability : float
        Probability of each of: rows running inferior->superior, columns running
        posterior->anterior.
    scoliosis_max_mm : float
        Largest lateral deviation of the column.
    transitional_l6_probability : float
        Probability of a sixth lumbar vertebra.
    degenerated_disc_probability : float
        Base probability that a disc is degenerated (higher at L4-S1).
    partial_volume_samples : int
        Sub-slice samples per slice (odd; >= 1) for partial volume and the truth.
    acquisition_seed : int
        Varies positioning, scanner, sequence and noise while keeping the anatomy (follow-up
        visits of one patient).
    noise_seed : int
        Varies only the noise (test-retest).
    vendor : str, optional
        ``"siemens"``, ``"ge"`` or ``"philips"`` (None: random).
    field_strength_t : float, optional
        1.5 or 3.0 (None: random).
    """

    n_slices: int = 15
    n_rows: int = 512
    n_columns: int = 512
    pixel_spacing_mm: float = 0.6
    slice_thickness_mm: float = 4.0
    slice_gap_mm: float = 0.4
    top_level: str | None = None
    sacrum_in_view: bool | None = None
    fractures: str | Sequence[FractureSpec | Mapping[str, Any]] = "random"
    hemangioma_probability: float = 0.06
    snr_stir_range: tuple[float, float] = (12.0, 30.0)
    snr_t1_range: tuple[float, float] = (20.0, 50.0)
    bias_strength: float = 0.35
    t1_grid: str = "random"
    lateral_offset_max_mm: float = 8.0
    oblique_max_deg: float = 3.0
    flip_probability: float = 0.1
    scoliosis_max_mm: float = 6.0
    transitional_l6_probability: float = 0.03
    degenerated_disc_probability: float = 0.3
    partial_volume_samples: int = 3
    acquisition_seed: int = 0
    noise_seed: int = 0
    vendor: str | None = None
    field_strength_t: float | None = None

    def __post_init__(self) -> None:
        for name in ("n_slices", "n_rows", "n_columns"):
            value = getattr(self, name)
            if int(value) != value or value < (1 if name == "n_slices" else 32):
                msg = (
                    f"PhantomParameters.{name} must be an integer >= 32 (n_slices >= 1), "
                    f"got {value!r}"
                )
                raise ValueError(msg)
        for name in ("pixel_spacing_mm", "slice_thickness_mm"):
            if not getattr(self, name) > 0:
                msg = f"PhantomParameters.{name} must be > 0, got {getattr(self, name)!r}"
                raise ValueError(msg)
        if self.slice_gap_mm < 0:
            msg = f"PhantomParameters.slice_gap_mm must be >= 0, got {self.slice_gap_mm!r}"
            raise ValueError(msg)
        if self.top_level is not None:
            object.__setattr__(self, "top_level", normalise_level(self.top_level))
        if isinstance(self.fractures, str):
            if self.fractures != "random":
                msg = (
                    f"PhantomParameters.fractures must be 'random' or a list of fracture "
                    f"specs, got {self.fractures!r}"
                )
                raise ValueError(msg)
        else:
            specs = tuple(FractureSpec.from_mapping(s) for s in self.fractures)
            levels = [s.level for s in specs]
            if len(set(levels)) != len(levels):
                msg = f"PhantomParameters.fractures names a level twice: {levels}"
                raise ValueError(msg)
            object.__setattr__(self, "fractures", specs)
        if self.t1_grid not in ("random", "same", "different"):
            msg = (
                f"PhantomParameters.t1_grid must be random, same or different, got {self.t1_grid!r}"
            )
            raise ValueError(msg)
        if self.partial_volume_samples < 1:
            msg = (
                "PhantomParameters.partial_volume_samples must be >= 1, got "
                f"{self.partial_volume_samples!r}"
            )
            raise ValueError(msg)
        for name in ("snr_stir_range", "snr_t1_range"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                msg = f"PhantomParameters.{name} must be (low, high) with 0 < low <= high"
                raise ValueError(msg)
        if self.vendor is not None and self.vendor.lower() not in ("siemens", "ge", "philips"):
            msg = f"PhantomParameters.vendor must be siemens, ge or philips, got {self.vendor!r}"
            raise ValueError(msg)

    @property
    def fracture_specs(self) -> tuple[FractureSpec, ...] | None:
        """The fracture specifications, or None when they are drawn at random."""
        return None if isinstance(self.fractures, str) else tuple(self.fractures)  # type: ignore[arg-type]


def _enum(kind: Any, value: Any) -> Any:
    try:
        return kind(str(value).lower())
    except ValueError:
        allowed = ", ".join(m.value for m in kind)
        msg = f"{kind.__name__} must be one of {allowed}, got {value!r}"
        raise ValueError(msg) from None


# ============================================================== smooth random fields
class _Waves:
    """A smooth random field: a sum of random plane waves (world mm in, ~unit variance out).

    Analytic in world coordinates, so every grid sees the same field.
    """

    def __init__(self, rng: np.random.Generator, scale_mm: float, n: int = 8) -> None:
        direction = rng.normal(size=(n, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        magnitude = 2 * np.pi / scale_mm * rng.uniform(0.6, 1.4, size=n)
        self.k = (direction * magnitude[:, None]).astype(np.float64)
        self.phase = rng.uniform(0, 2 * np.pi, size=n)
        self.amp = math.sqrt(2.0 / n)

    def __call__(self, x: FloatArray, y: FloatArray, z: FloatArray) -> FloatArray:
        out = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), dtype=F32)
        for (kx, ky, kz), ph in zip(self.k, self.phase, strict=True):
            out += np.cos(F32(kx) * x + F32(ky) * y + F32(kz) * z + F32(ph))
        out *= F32(self.amp)
        return out


class _Lattice:
    """Periodic smoothed white noise on a world lattice, sampled by trilinear lookup.

    The lattice is a fixed-size periodic tile (so it costs the same whatever the field of
    view) and is indexed by world coordinates, so every grid sees the same texture.
    """

    def __init__(
        self, rng: np.random.Generator, step_mm: float, sigma_mm: float, n: int = 64
    ) -> None:
        raw = rng.standard_normal(size=(n, n, n)).astype(F32)
        smooth = ndimage.gaussian_filter(raw, sigma_mm / step_mm, mode="wrap")
        smooth /= max(float(smooth.std()), 1e-6)
        self.data = np.pad(smooth, ((0, 1), (0, 1), (0, 1)), mode="wrap").astype(F32)
        self.n = F32(n)
        self.step = F32(step_mm)

    def __call__(self, x: FloatArray, y: FloatArray, z: FloatArray) -> FloatArray:
        shape = np.broadcast_shapes(x.shape, y.shape, z.shape)
        coords = np.empty((3, *shape), dtype=F32)
        for a, q in enumerate((x, y, z)):
            coords[a] = np.mod(q / self.step, self.n)
        return ndimage.map_coordinates(self.data, coords, order=1, mode="nearest", prefilter=False)


# ============================================================== tissues and signal
class _T(IntEnum):
    AIR = 0
    SKIN = 1
    FAT = 2
    MUSCLE = 3
    VISCERA = 4
    FLUID = 5
    LUNG = 6
    HEART = 7
    LIVER = 8
    AORTA = 9
    IVC = 10
    LIGAMENT = 11
    PE_CORTEX = 12
    PE_MARROW = 13
    CSF = 14
    CORD = 15
    NERVE = 16
    ANNULUS = 17
    NUCLEUS = 18
    CORTEX = 19
    MARROW = 20
    EDEMA = 21
    CEMENT = 22
    RIM = 23
    HEMANGIOMA = 24
    INTERSPINOUS = 25
    FACET = 26
    MODIC = 27


#: Tissue names and their codes in `Phantom.tissue`.
TISSUES: dict[str, int] = {t.name.lower(): int(t) for t in _T}

# (T1, STIR) relative signal; fat = 1 on T1, CSF = 1 on STIR.
_SIGNAL: dict[_T, tuple[float, float]] = {
    _T.AIR: (0.0, 0.0), _T.SKIN: (0.62, 0.32), _T.FAT: (1.0, 0.07), _T.MUSCLE: (0.33, 0.2),
    _T.VISCERA: (0.42, 0.33), _T.FLUID: (0.16, 0.92), _T.LUNG: (0.04, 0.04),
    _T.HEART: (0.3, 0.22), _T.LIVER: (0.5, 0.2), _T.AORTA: (0.05, 0.05), _T.IVC: (0.2, 0.38),
    _T.LIGAMENT: (0.07, 0.08), _T.PE_CORTEX: (0.06, 0.06), _T.PE_MARROW: (0.8, 0.17),
    _T.CSF: (0.13, 1.0), _T.CORD: (0.4, 0.48), _T.NERVE: (0.36, 0.42),
    _T.ANNULUS: (0.28, 0.13), _T.NUCLEUS: (0.34, 0.7), _T.CORTEX: (0.05, 0.05),
    _T.MARROW: (0.8, 0.17), _T.EDEMA: (0.35, 0.8), _T.CEMENT: (0.02, 0.02),
    _T.RIM: (0.2, 0.88), _T.HEMANGIOMA: (1.08, 0.62), _T.INTERSPINOUS: (0.45, 0.14),
    _T.FACET: (0.15, 0.55), _T.MODIC: (1.0, 0.09),
}  # fmt: skip
# Multiplicative texture amplitude (T1, STIR) by tissue.
_TEXTURE: dict[_T, tuple[float, float]] = {
    _T.MARROW: (0.06, 0.12), _T.PE_MARROW: (0.06, 0.12), _T.EDEMA: (0.08, 0.08),
    _T.MUSCLE: (0.06, 0.08), _T.FAT: (0.03, 0.15), _T.VISCERA: (0.25, 0.3),
    _T.HEART: (0.3, 0.4), _T.LIVER: (0.05, 0.08), _T.LUNG: (0.5, 0.5),
    _T.HEMANGIOMA: (0.1, 0.15), _T.NUCLEUS: (0.06, 0.1), _T.ANNULUS: (0.08, 0.1),
    _T.INTERSPINOUS: (0.1, 0.15), _T.MODIC: (0.05, 0.1),
}  # fmt: skip


# ============================================================== internal scene
@dataclass
class _Lesions:
    """Lesion geometry of one body (local frame), thresholds calibrated on the STIR grid."""

    edema_pattern: EdemaPattern = EdemaPattern.NONE
    bme_percent: float = 0.0
    edema_field: _Waves | None = None
    edema_fine: _Waves | None = None
    edema_threshold: float = math.inf
    edema_halo: float = 1.0
    edema_t1_muscle_ratio: float = 1.0  # full-replacement edema T1 / muscle T1
    cement_ml: float = 0.0
    cement_blobs: list[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]] = field(
        default_factory=list
    )
    cement_noise: _Waves | None = None
    cement_threshold: float = -math.inf
    rim: bool = False
    rim_width_mm: float = 1.5
    rim_cover: _Waves | None = None
    rim_cover_threshold: float = -0.3
    hemangioma: tuple[npt.NDArray[np.float64], float] | None = None
    modic_top_mm: float = 0.0
    modic_bottom_mm: float = 0.0


@dataclass
class _Vert:
    level: str
    label: int
    kind: str  # thoracic | lumbar | sacral
    height: float
    depth: float
    width: float
    disc_above: float
    wedge_mm: float
    conc_top: float
    conc_bot: float
    cortex_mm: float
    endplate_mm: float
    canal_ap: float
    canal_hw: float
    ped_w: float
    ped_h: float
    lam_t: float
    sp_len: float
    sp_h: float
    sp_angle: float
    tp_len: float
    marrow_t1: float
    marrow_stir: float
    fracture: FractureSpec | None = None
    loss_mm: float = 0.0
    loss_share_top: float = 1.0
    endplate_rough: _Waves | None = None
    lesions: _Lesions = field(default_factory=_Lesions)
    disc_degenerated: bool = False  # the disc ABOVE this body
    disc_nucleus_stir: float = 0.7
    disc_bulge: float = 1.0
    # placement (filled by _stack)
    s: float = 0.0
    theta: float = 0.0
    center: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(3))
    basis: npt.NDArray[np.float64] = field(default_factory=lambda: np.eye(3))

    @property
    def posterior_elements(self) -> bool:
        return self.kind != "sacral" or self.level in ("S1", "S2", "S3")

    # ---------------------------------------------------------------- shape
    def profile(self, t: FloatArray) -> FloatArray:
        """Fracture height-loss profile over the AP position t (0 anterior, 1 posterior)."""
        if self.fracture is None or self.loss_mm <= 0:
            return np.zeros_like(t)
        kind = self.fracture.fracture_type
        tc = np.clip(t, 0.0, 1.0)
        if kind is FractureType.WEDGE:
            return np.clip((0.9 - tc) / 0.7, 0.0, 1.0).astype(F32)
        if kind is FractureType.BICONCAVE:
            return np.clip((0.4 - np.abs(tc - 0.5)) / 0.26, 0.0, 1.0).astype(F32)
        return np.ones_like(t)

    def endplates(self, t: FloatArray, wn: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Local u of the superior and inferior body surfaces at AP position t, width wn."""
        h2 = F32(self.height / 2)
        tilt = F32(self.wedge_mm / 2) * (F32(0.5) - t)
        dome = np.clip(1 - ((t - 0.5) / 0.45) ** 2 - (wn / 0.9) ** 2, 0, 1).astype(F32)
        top = h2 + tilt - F32(self.conc_top) * dome
        bot = -h2 - tilt + F32(self.conc_bot) * dome
        if self.loss_mm > 0:
            loss = F32(self.loss_mm) * self.profile(t)
            top = top - F32(self.loss_share_top) * loss
            bot = bot + F32(1 - self.loss_share_top) * loss
            if self.endplate_rough is not None:
                zero = np.zeros_like(t)
                rough = F32(0.5) * self.endplate_rough(t * F32(self.depth), wn * 20, zero)
                top = top + rough * np.clip(loss, 0, 1)
        return top, bot

    def body_f(
        self,
        u: FloatArray,
        v: FloatArray,
        w: FloatArray,
        shrink: float = 0.0,
        shrink_ep: float = 0.0,
    ) -> FloatArray:
        """Implicit body function: <= 1 inside (shrink > 0 gives the marrow cavity)."""
        t = (v + F32(self.depth / 2)) / F32(self.depth)
        wn = w / F32(self.width / 2)
        top, bot = self.endplates(t, wn)
        top = top - F32(shrink_ep)
        bot = bot + F32(shrink_ep)
        half = np.maximum((top - bot) * F32(0.5), F32(0.3))
        b = np.abs(u - (top + bot) * F32(0.5)) / half
        aw = w / F32(self.width / 2 - shrink)
        av = v / F32(self.depth / 2 - shrink)
        aw2 = aw * aw
        av2 = av * av
        # Footprint: ellipse anteriorly, squarer (exponent 4) posterior wall; a2 = radius^2.
        a2 = np.where(v < 0, aw2 + av2, np.sqrt(aw2 * aw2 + av2 * av2))
        waist = F32(0.05 if self.kind != "sacral" else 0.02)
        b2 = b * b
        a2 = a2 / (1 - waist * (1 - np.minimum(b2, F32(1)))) ** 2
        a4 = a2 * a2
        b4 = b2 * b2
        # Rounded-box blend of footprint and height (exponent 10); <= 1 inside.
        return a4 * a4 * a2 + b4 * b4 * b2

    def heights_mm(self) -> tuple[float, float, float]:
        """Anterior, middle and posterior height on the mid-sagittal plane (exact model)."""
        u = np.linspace(-self.height * 1.2, self.height * 1.2, 4801).astype(F32)
        out = []
        for tpos in HEIGHT_POSITIONS:
            v = np.full_like(u, F32((tpos - 0.5) * self.depth))
            inside = self.body_f(u, v, np.zeros_like(u)) <= 1
            idx = np.flatnonzero(inside)
            out.append(float(u[idx[-1]] - u[idx[0]]) if idx.size else 0.0)
        return out[0], out[1], out[2]

    # ---------------------------------------------------------------- frames
    def local(self, x: FloatArray, y: FloatArray, z: FloatArray) -> tuple[FloatArray, ...]:
        c = self.center
        dx, dy, dz = x - F32(c[0]), y - F32(c[1]), z - F32(c[2])
        b = self.basis.astype(F32)
        u = dx * b[0, 0] + dy * b[1, 0] + dz * b[2, 0]
        v = dx * b[0, 1] + dy * b[1, 1] + dz * b[2, 1]
        w = dx * b[0, 2] + dy * b[1, 2] + dz * b[2, 2]
        return u, v, w

    def extent_local(self) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
        """Local bounding box (u, v, w) of the body, its disc above and posterior elements."""
        h = self.height / 2 + self.disc_above + 6
        back = self.depth / 2 + self.canal_ap + self.lam_t + self.sp_len + 8
        if self.kind == "sacral":
            back = self.depth / 2 + 30
        side = max(self.width / 2, self.canal_hw + 6 + self.tp_len) + 6
        if self.level in ("S1", "S2"):
            side = 60.0
        return (-h - 8, h), (-self.depth / 2 - 6, back), (-side, side)


def _basis(theta: float, beta: float, rho: float) -> npt.NDArray[np.float64]:
    """Columns: superior (u), posterior (v), left (w) unit vectors of a body frame."""
    eu = np.array([0.0, -math.sin(theta), math.cos(theta)])
    ev = np.array([0.0, math.cos(theta), math.sin(theta)])
    ew = np.array([1.0, 0.0, 0.0])
    eu, ew = math.cos(beta) * eu + math.sin(beta) * ew, -math.sin(beta) * eu + math.cos(beta) * ew
    ev, ew = math.cos(rho) * ev + math.sin(rho) * ew, -math.sin(rho) * ev + math.cos(rho) * ew
    return np.stack([eu, ev, ew], axis=1)


@dataclass
class _Grid:
    shape: tuple[int, int, int]
    affine: npt.NDArray[np.float64]
    thickness_mm: float

    @property
    def spacing(self) -> tuple[float, float, float]:
        n = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(n[0]), float(n[1]), float(n[2])

    def corners_index(self, pts: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        inv = np.linalg.inv(self.affine)
        return pts @ inv[:3, :3].T + inv[:3, 3]


@dataclass
class _Acquisition:
    vendor: str
    field_t: float
    snr: dict[str, float]
    gain: dict[str, float]
    offset: dict[str, float]
    slope: dict[str, float]
    intercept: dict[str, float]
    kspace_fraction: dict[str, tuple[float, float]]
    contrast: dict[str, dict[_T, float]]
    bias: dict[str, npt.NDArray[np.float64]]
    sequence: dict[str, dict[str, Any]]


@dataclass
class _Scene:
    verts: list[_Vert]
    s_knots: npt.NDArray[np.float64]
    curve: CubicSpline  # s -> (x, y, z)
    lattice_sd: tuple[npt.NDArray[np.float32], npt.NDArray[np.float64], float] | None
    profiles: _Profiles
    tex_coarse: _Lattice
    tex_fine: _Lattice
    tex_viscera: _Lattice
    s_conus: float
    s_sac_end: float
    strands: npt.NDArray[np.float64]  # (n, 2): normalised (d, w) of cauda strands
    torso: dict[str, Any]
    marrow_t1: float
    marrow_stir: float
    warnings: list[str]
    seed: int = 0


# ============================================================== scene construction
def _levels(rng: np.random.Generator, params: PhantomParameters) -> list[str]:
    lumbar = list(_LUMBAR)
    if rng.random() < params.transitional_l6_probability:
        lumbar.append("L6")
    return [*_THORACIC, *lumbar, *_SACRAL]


def _random_fractures(rng: np.random.Generator, levels: list[str]) -> tuple[FractureSpec, ...]:
    n = int(rng.choice([0, 1, 2, 3], p=[0.2, 0.45, 0.23, 0.12]))
    names = [lv for lv, _ in _RANDOM_FRACTURE_LEVELS if lv in levels]
    weights = np.array([w for lv, w in _RANDOM_FRACTURE_LEVELS if lv in levels])
    chosen: list[str] = (
        [str(c) for c in rng.choice(names, size=n, replace=False, p=weights / weights.sum())]
        if n
        else []
    )
    specs = []
    for level in chosen:
        chronic = rng.random() < 0.2
        ftype = rng.choice(["wedge", "biconcave", "crush"], p=[0.55, 0.25, 0.2])
        grade = int(rng.choice([0, 1, 2, 3], p=[0.1, 0.3, 0.4, 0.2]))
        if chronic:
            grade = max(grade, 1)
        pattern = (
            "none" if chronic else str(rng.choice(["band", "diffuse", "patchy"], p=[0.5, 0.3, 0.2]))
        )
        bme = 0.0 if chronic else float(rng.uniform(8, 85))
        cement = 0.0 if chronic or rng.random() < 0.5 else float(rng.uniform(1.5, 7.0))
        specs.append(
            FractureSpec(
                level=str(level),
                fracture_type=str(ftype),
                grade=grade,
                edema_pattern=pattern,
                bme_percent=bme,
                cement_volume_ml=cement,
                rim=bool(cement > 0 and rng.random() < 0.4),
            )
        )
    return tuple(specs)


def _make_verts(
    rng: np.random.Generator, levels: list[str], params: PhantomParameters
) -> tuple[list[_Vert], float, float]:
    scale = rng.uniform(0.9, 1.1)
    marrow_t1 = rng.uniform(0.62, 0.9)
    marrow_stir = rng.uniform(0.12, 0.22)
    verts = []
    for level in levels:
        kind = "sacral" if level.startswith("S") else "lumbar" if level[0] == "L" else "thoracic"
        h, d, w = _BODY_MM[level]
        jit = rng.normal(1.0, 0.035, size=3)
        lumbar = kind == "lumbar"
        wedge = {"thoracic": -1.5, "lumbar": 0.0, "sacral": 0.0}[kind] + rng.normal(0, 0.6)
        if level in ("L5", "L6"):
            wedge += 2.5
        if level == "S1":
            wedge += 3.0
        disc = _DISC_ABOVE_MM[level] * rng.normal(1.0, 0.08) * scale
        p_deg = params.degenerated_disc_probability
        if level in ("L4", "L5", "L6"):
            p_deg = min(0.9, p_deg * 2)
        degenerated = kind != "sacral" and rng.random() < p_deg
        if degenerated:
            disc *= rng.uniform(0.45, 0.8)
        if kind == "sacral" and level != "S1":
            degenerated = True
        vert = _Vert(
            level=level,
            label=label_from_level(level) if kind != "sacral" else (26 if level == "S1" else 0),
            kind=kind,
            height=h * scale * jit[0],
            depth=d * scale * jit[1],
            width=w * scale * jit[2],
            disc_above=disc,
            wedge_mm=wedge,
            conc_top=rng.uniform(0.4, 1.3) if kind != "sacral" else 0.3,
            conc_bot=rng.uniform(0.4, 1.3) if kind != "sacral" else 0.3,
            cortex_mm=rng.uniform(0.6, 1.0),
            endplate_mm=rng.uniform(0.8, 1.3),
            canal_ap=(rng.uniform(15, 19) if lumbar else rng.uniform(13, 16))
            if kind != "sacral"
            else rng.uniform(7, 10),
            canal_hw=(rng.uniform(10, 12.5) if lumbar else rng.uniform(8, 9.5))
            if kind != "sacral"
            else 12.0,
            ped_w=rng.uniform(8, 10.5) if lumbar else rng.uniform(6, 8),
            ped_h=rng.uniform(13, 16) if lumbar else rng.uniform(11, 14),
            lam_t=rng.uniform(5, 7),
            sp_len=rng.uniform(24, 32) if lumbar else rng.uniform(30, 40),
            sp_h=rng.uniform(14, 20) if lumbar else rng.uniform(7, 10),
            sp_angle=math.radians(rng.uniform(5, 18) if lumbar else rng.uniform(35, 50)),
            tp_len=rng.uniform(14, 24) if lumbar else rng.uniform(12, 16),
            marrow_t1=marrow_t1 * rng.normal(1.0, 0.04),
            marrow_stir=marrow_stir * rng.normal(1.0, 0.08),
            disc_degenerated=degenerated,
            disc_nucleus_stir=rng.uniform(0.15, 0.3) if degenerated else rng.uniform(0.5, 0.85),
            disc_bulge=rng.uniform(1.5, 3.5) if degenerated else rng.uniform(0.3, 1.5),
        )
        if level == "S1":
            vert.disc_nucleus_stir = rng.uniform(0.15, 0.7)
        verts.append(vert)
    return verts, marrow_t1, marrow_stir


def _assign_lesions(
    rng: np.random.Generator,
    verts: list[_Vert],
    specs: Sequence[FractureSpec],
    params: PhantomParameters,
) -> None:
    by_level = {v.level: v for v in verts}
    for spec in specs:
        if spec.level not in by_level:
            msg = f"fracture level {spec.level!r} is not in this spine ({', '.join(by_level)})"
            raise ValueError(msg)
        v = by_level[spec.level]
        v.fracture = spec
        v.loss_share_top = (
            0.5 if spec.fracture_type is FractureType.BICONCAVE else rng.uniform(0.7, 1.0)
        )
        v.endplate_rough = _Waves(rng, 6.0, 6)
        v.cortex_mm = min(v.cortex_mm, rng.uniform(0.5, 0.8))  # osteoporotic thin cortex
        les = v.lesions
        les.edema_pattern = EdemaPattern(spec.edema_pattern)
        les.bme_percent = float(spec.bme_percent)
        scale = {"band": 9.0, "diffuse": 16.0, "patchy": 7.0, "none": 10.0}[les.edema_pattern]
        les.edema_field = _Waves(rng, scale, 10)
        les.edema_fine = _Waves(rng, 3.0, 8)
        les.cement_ml = float(spec.cement_volume_ml)
        les.rim = bool(spec.rim)
        les.rim_width_mm = rng.uniform(1.0, 2.0)
        les.rim_cover = _Waves(rng, 10.0, 6)
        les.rim_cover_threshold = rng.uniform(-0.9, 0.1)
        les.cement_noise = _Waves(rng, 5.0, 8)
        # Cement casts: bipedicular (two lateral blobs) or unipedicular (one central), in the
        # anterior two thirds, joined by smaller satellites.
        n_main = 2 if rng.random() < 0.6 else 1
        blobs = []
        for j in range(n_main):
            side = 0.0 if n_main == 1 else (-1) ** j * v.width * rng.uniform(0.12, 0.2)
            centre = np.array(
                [
                    rng.uniform(-0.1, 0.1) * v.height,
                    -v.depth * rng.uniform(0.05, 0.2),
                    side,
                ]
            )
            radii = np.array(
                [v.height * rng.uniform(0.25, 0.35), v.depth * rng.uniform(0.2, 0.3), 0.0]
            )
            radii[2] = v.width * rng.uniform(0.15, 0.25)
            blobs.append((centre, radii))
        for _ in range(int(rng.integers(1, 4))):
            centre = np.array(
                [
                    rng.uniform(-0.3, 0.3) * v.height,
                    rng.uniform(-0.35, 0.15) * v.depth,
                    rng.uniform(-0.25, 0.25) * v.width,
                ]
            )
            radii = np.array([v.height * 0.15, v.depth * 0.12, v.width * 0.1]) * rng.uniform(
                0.6, 1.3, size=3
            )
            blobs.append((centre, radii))
        les.cement_blobs = blobs
    for v in verts:
        if v.fracture is None and v.kind != "sacral":
            if rng.random() < params.hemangioma_probability:
                r = rng.uniform(3.5, min(9.0, v.height * 0.3))
                lim = np.array([v.height / 2, v.depth / 2, v.width / 2]) - r - 2.0
                centre = rng.uniform(-1, 1, size=3) * np.maximum(lim, 0) * 0.8
                v.lesions.hemangioma = (centre, r)
            if v.disc_degenerated and rng.random() < 0.35:
                v.lesions.modic_top_mm = rng.uniform(2.0, 5.0)


def _calibrate_fractures(rng: np.random.Generator, verts: list[_Vert]) -> None:
    """Set each fracture's loss_mm so that the METHOD.md 4 height loss hits its target."""
    for i, v in enumerate(verts):
        spec = v.fracture
        if spec is None:
            continue
        if spec.height_loss_percent is not None:
            target = float(spec.height_loss_percent)
        else:
            lo, hi = _GRADE_LOSS_RANGE[spec.grade]
            target = float(rng.uniform(lo, hi))
        if spec.fracture_type is FractureType.CRUSH:
            v.conc_top *= 0.3
            v.conc_bot *= 0.3
        neighbour_heights = [n.heights_mm() for n in _normal_neighbours(verts, i, visible=None)]

        def loss_of(mm: float, v: _Vert = v, nh: list[Any] = neighbour_heights) -> float:
            v.loss_mm = mm
            heights = v.heights_mm()
            return 100.0 * (1.0 - min(heights) / expected_height_mm(nh, heights))

        lo_mm, hi_mm = 0.0, v.height * 0.8
        if loss_of(0.0) >= target:
            v.loss_mm = 0.0
            continue
        for _ in range(30):
            mid = 0.5 * (lo_mm + hi_mm)
            if loss_of(mid) < target:
                lo_mm = mid
            else:
                hi_mm = mid
        v.loss_mm = 0.5 * (lo_mm + hi_mm)


def _normal_neighbours(verts: list[_Vert], i: int, visible: set[str] | None) -> list[_Vert]:
    out = []
    for j in (i - 1, i + 1):
        if 0 <= j < len(verts):
            n = verts[j]
            if n.kind == "sacral" or n.fracture is not None:
                continue
            if visible is not None and n.level not in visible:
                continue
            out.append(n)
    return out


def expected_height_mm(
    neighbour_heights: Sequence[Sequence[float]], own_heights: Sequence[float]
) -> float:
    """Expected (pre-fracture) height per METHOD.md 4.

    The mean posterior height of the adjacent normal vertebrae (one above and one below when
    available); the body's own posterior height when there is none.

    Parameters
    ----------
    neighbour_heights : sequence of (anterior, middle, posterior) mm
        Heights of the adjacent normal, fully visible vertebral bodies.
    own_heights : (anterior, middle, posterior) mm
        The body's own heights.
    """
    if neighbour_heights:
        return float(np.mean([h[2] for h in neighbour_heights]))
    return float(own_heights[2])


def genant_grade_from_loss(height_loss_percent: float, settings: Settings | None = None) -> int:
    """Genant semiquantitative grade of a height loss (METHOD.md 4, thresholds from settings)."""
    s = settings if settings is not None else resolve_settings()
    if height_loss_percent >= s["genant_grade3_min_percent"]:
        return 3
    if height_loss_percent >= s["genant_grade2_min_percent"]:
        return 2
    if height_loss_percent >= s["genant_grade1_min_percent"]:
        return 1
    return 0


def _stack(rng: np.random.Generator, verts: list[_Vert], params: PhantomParameters) -> CubicSpline:
    """Place the bodies along a smooth sagittal curve; return the centreline spline s->xyz."""
    names = [v.level for v in verts]
    i_s1 = names.index("S1")
    joint = {lv: math.radians(rng.normal(*_JOINT_DEG[lv])) for lv in names if lv in _JOINT_DEG}
    # Angle of each body axis (0 = vertical, > 0 = tilted forward going up).
    theta = np.zeros(len(verts))
    lumbar_idx = [k for k, n in enumerate(names) if n[0] == "L"]
    apex = lumbar_idx[len(lumbar_idx) // 2]  # around L3: vertical
    theta[apex] = math.radians(rng.normal(0.0, 4.0))
    for k in range(apex + 1, len(verts)):  # downward: undo the joint above each lower body
        if k <= i_s1:
            theta[k] = theta[k - 1] - joint[names[k]]
        else:
            theta[k] = theta[k - 1] + math.radians(rng.uniform(8, 14))
    for k in range(apex - 1, -1, -1):
        theta[k] = theta[k + 1] + joint[names[k + 1]]
    # Local kyphosis above wedge fractures.
    for k, v in enumerate(verts):
        if v.fracture is not None and v.loss_mm > 0:
            top_a, _ = v.endplates(np.array([0.1], F32), np.zeros(1, F32))
            top_p, _ = v.endplates(np.array([0.9], F32), np.zeros(1, F32))
            tilt = math.atan2(float(top_p[0] - top_a[0]), 0.8 * v.depth)
            theta[k] += 0.5 * tilt
            theta[:k] += tilt
    # Centres, from S1 upward and downward.
    amp = rng.uniform(-1, 1) * params.scoliosis_max_mm
    phase = rng.uniform(0, 2 * np.pi)
    centres = np.zeros((len(verts), 3))
    s = np.zeros(len(verts))

    def half_top(v: _Vert) -> float:
        return v.height / 2 - v.loss_share_top * v.loss_mm * 0.6

    def half_bot(v: _Vert) -> float:
        return v.height / 2 - (1 - v.loss_share_top) * v.loss_mm * 0.6

    for k in range(i_s1 - 1, -1, -1):
        lower, upper = verts[k + 1], verts[k]
        step = half_top(lower) + lower.disc_above + half_bot(upper)
        mid = 0.5 * (theta[k] + theta[k + 1])
        centres[k] = centres[k + 1] + step * np.array([0.0, -math.sin(mid), math.cos(mid)])
        s[k] = s[k + 1] + step
    for k in range(i_s1 + 1, len(verts)):
        upper, lower = verts[k - 1], verts[k]
        step = half_bot(upper) + lower.disc_above + half_top(lower)
        mid = 0.5 * (theta[k] + theta[k - 1])
        centres[k] = centres[k - 1] - step * np.array([0.0, -math.sin(mid), math.cos(mid)])
        s[k] = s[k - 1] - step
    lateral = amp * np.sin(s / 260.0 * np.pi + phase)
    lateral -= lateral[i_s1]
    centres[:, 0] = lateral
    dlat = np.gradient(lateral, s)
    for k, v in enumerate(verts):
        v.s = float(s[k])
        v.theta = float(theta[k])
        v.center = centres[k]
        beta = math.atan(dlat[k]) if v.kind != "sacral" else 0.0
        rho = math.radians(rng.normal(0, 0.7)) + 0.3 * math.atan(lateral[k] / 60.0)
        if v.kind == "sacral":
            rho = 0.0
        v.basis = _basis(v.theta, beta, rho)
    order = np.argsort(s)
    s_sorted = s[order]
    return CubicSpline(s_sorted, centres[order], bc_type="natural", extrapolate=True)


def _curvilinear_lattice(
    curve: CubicSpline, s_lo: float, s_hi: float, lo: npt.NDArray[np.float64],
    hi: npt.NDArray[np.float64], step: float,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64], float]:  # fmt: skip
    """(s, d) of the sagittal centreline on a (y, z) lattice: arc length and posterior offset."""
    ss = np.arange(s_lo - 200, s_hi + 200, 2.0)
    pts = curve(ss)
    # Extend linearly beyond the knots rather than with the cubic's curvature.
    tang = curve(ss, 1)
    for end, mask in ((s_lo, ss < s_lo), (s_hi, ss > s_hi)):
        p0, t0 = curve(end), curve(end, 1)
        pts[mask] = p0 + (ss[mask] - end)[:, None] * t0
        tang[mask] = t0
    tang_yz = tang[:, 1:] / np.linalg.norm(tang[:, 1:], axis=1, keepdims=True)
    ny = np.arange(lo[0], hi[0] + step, step)
    nz = np.arange(lo[1], hi[1] + step, step)
    gy, gz = np.meshgrid(ny, nz, indexing="ij")
    q = np.stack([gy.ravel(), gz.ravel()], axis=1)
    tree = cKDTree(pts[:, 1:])
    _, idx = tree.query(q, workers=1)
    rel = q - pts[idx, 1:]
    t = tang_yz[idx]
    n = np.stack([t[:, 1], -t[:, 0]], axis=1)  # posterior normal: (cos, sin) for t=(-sin, cos)
    s_val = ss[idx] + np.sum(rel * t, axis=1)
    d_val = np.sum(rel * n, axis=1)
    out = np.stack([s_val.reshape(gy.shape), d_val.reshape(gy.shape)]).astype(F32)
    return out, np.array([lo[0], lo[1]]), step


def _grids_lattice(
    scene: _Scene, grids: Sequence[_Grid]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64], float]:
    """The (s, d) lattice over the (y, z) extent of the grids (deterministic, no randomness)."""
    corners = []
    for g in grids:
        n = np.array(g.shape, dtype=float) - 1
        for a in (0, n[0]):
            for b in (0, n[1]):
                for c in (0, n[2]):
                    corners.append(g.affine[:3, :3] @ np.array([a, b, c]) + g.affine[:3, 3])
    pts = np.array(corners)
    lo = pts.min(axis=0)[1:] - 10.0
    hi = pts.max(axis=0)[1:] + 10.0
    s_vals = scene.s_knots
    return _curvilinear_lattice(scene.curve, float(s_vals.min()), float(s_vals.max()), lo, hi, 2.0)


def _build_scene(params: PhantomParameters, seed: int) -> _Scene:
    rng = np.random.default_rng([int(seed), 101])
    levels = _levels(rng, params)
    verts, marrow_t1, marrow_stir = _make_verts(rng, levels, params)
    specs = params.fracture_specs
    if specs is None:
        specs = _random_fractures(rng, levels)
    _assign_lesions(rng, verts, specs, params)
    # T1 of fully edematous marrow per lesion, from its own stream (the anatomy stream above
    # and below is unchanged).  Edema replaces marrow fat with water, so its T1 approaches
    # that of muscle / disc (T1-hypointense to fatty marrow; acute osteoporotic VCF show
    # bands iso- to slightly hyperintense to muscle): 0.85-1.3 x muscle.
    t1_rng = np.random.default_rng([int(seed), 505])
    for v in verts:
        v.lesions.edema_t1_muscle_ratio = float(t1_rng.uniform(0.85, 1.3))
    _calibrate_fractures(rng, verts)
    curve = _stack(rng, verts, params)
    s_vals = np.array([v.s for v in verts])
    tex_fine = _Lattice(rng, 1.0, 1.0)
    tex_coarse = _Lattice(rng, 4.0, 4.0)
    tex_viscera = _Lattice(rng, 2.0, 3.5)
    by_level = {v.level: v for v in verts}
    conus_level = rng.choice(["T12", "L1", "L1", "L2"])
    s_conus = by_level[str(conus_level)].s + rng.uniform(-0.5, 0.5) * by_level["L1"].height
    s_sac_end = by_level["S2"].s + rng.uniform(-5, 5)
    n_strands = int(rng.integers(8, 14))
    strands = np.stack(
        [rng.uniform(-0.1, 0.75, n_strands), rng.uniform(-0.7, 0.7, n_strands)], axis=1
    )
    l3 = by_level["L3"]
    bladder_r = float(rng.uniform(25, 45))
    torso: dict[str, Any] = {
        "fat_back": float(rng.uniform(8, 45)),
        "fat_front": float(rng.uniform(10, 45)),
        "abdomen_depth": float(rng.uniform(120, 230)),
        "belly": float(rng.uniform(0, 40)),
        "back_lift": float(rng.uniform(0, 12)),
        "retro": float(rng.uniform(3, 9)),
        "mesentery": float(rng.uniform(0.12, 0.3)),
        "muscle_fat": float(rng.uniform(0.0, 0.2)),
        "liver_depth": float(rng.uniform(90, 150)),
        "aorta_r": float(rng.uniform(9, 12.5)),
        "aorta_x": float(rng.uniform(10, 20)),
        "ivc_x": float(rng.uniform(-26, -18)),
        "ivc_r": float(rng.uniform(8, 11)),
        "z_dia": float(by_level["T12"].center[2] + rng.uniform(-25, 25)),
        "dia_slope": float(rng.uniform(0.25, 0.5)),
        "heart_x": float(rng.uniform(-10, 25)),
        "bladder_r": bladder_r,
        "bladder_c": (0.0, float(l3.center[1]) - 90.0, float(by_level["S3"].center[2]) - 20.0),
        "l3_y": float(l3.center[1]),
        "s_L1": by_level["L1"].s,
        "s_L2": by_level["L2"].s,
        "s_L4": by_level["L4"].s,
        "s_T12": by_level["T12"].s,
        "s_S1": by_level["S1"].s,
        "l3_z": float(l3.center[2]),
        "sp_tip_y": float(
            max(
                v.center[1]
                + (v.depth / 2 + v.canal_ap + v.lam_t + v.sp_len * 0.9) * math.cos(v.theta)
                for v in verts
                if v.kind != "sacral" and abs(v.center[2] - l3.center[2]) < 200
            )
        ),
    }
    return _Scene(
        verts=verts,
        s_knots=s_vals,
        curve=curve,
        lattice_sd=None,
        profiles=_Profiles.build(verts),
        tex_coarse=tex_coarse,
        tex_fine=tex_fine,
        tex_viscera=tex_viscera,
        s_conus=float(s_conus),
        s_sac_end=float(s_sac_end),
        strands=strands,
        torso=torso,
        marrow_t1=float(marrow_t1),
        marrow_stir=float(marrow_stir),
        warnings=[],
        seed=int(seed),
    )


# ============================================================== acquisition geometry
def _rotation(axis: npt.NDArray[np.float64], angle: float) -> npt.NDArray[np.float64]:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def _place_grids(
    scene: _Scene, params: PhantomParameters, rng: np.random.Generator
) -> tuple[_Grid, _Grid]:
    by_level = {v.level: v for v in scene.verts}
    d_col = np.array([0.0, 1.0, 0.0])
    d_row = np.array([0.0, 0.0, -1.0])
    if rng.random() < params.flip_probability:
        d_row = -d_row
    if rng.random() < params.flip_probability:
        d_col = -d_col
    # Oblique planes in about a third of the studies (small rotations about AP and SI).
    rot = np.eye(3)
    if rng.random() < 0.35:
        tilt = math.radians(rng.uniform(-1, 1) * params.oblique_max_deg)
        turn = math.radians(rng.uniform(-1, 1) * params.oblique_max_deg)
        rot = _rotation(np.array([0.0, 1.0, 0.0]), tilt) @ _rotation(
            np.array([0.0, 0.0, 1.0]), turn
        )
    d_col, d_row = rot @ d_col, rot @ d_row
    d_slice = np.cross(d_col, d_row)
    n_k, n_r, n_c = params.n_slices, params.n_rows, params.n_columns
    pix = params.pixel_spacing_mm
    spacing_k = params.slice_thickness_mm + params.slice_gap_mm
    down = -np.array([0.0, 0.0, 1.0])  # inferior
    sup_axis = d_row if d_row @ down > 0 else -d_row  # row-axis vector pointing inferior
    # Positions along the (inferior-pointing) row axis, relative to S1's centre.
    s1 = by_level["S1"]

    def along(v: _Vert, u: float) -> float:
        return float((v.center + v.basis[:, 0] * u - s1.center) @ sup_axis)

    sacrum = params.sacrum_in_view
    if sacrum is None:
        sacrum = bool(rng.random() < 0.85)
    fov = (n_r - 1) * pix
    if sacrum:
        bottom = along(s1, -s1.height / 2) + rng.uniform(8, 40)
    else:
        lumbar = [v for v in scene.verts if v.kind == "lumbar"]
        cut = lumbar[-1] if rng.random() < 0.7 else lumbar[-2]
        bottom = along(cut, rng.uniform(-0.25, 0.25) * cut.height)
    if params.top_level is not None:
        if params.top_level not in by_level:
            msg = f"top_level {params.top_level!r} is not in this spine"
            raise ValueError(msg)
        tv = by_level[params.top_level]
        idx = scene.verts.index(tv)
        above = scene.verts[idx - 1] if idx > 0 else tv
        top = along(tv, tv.height / 2 + 1.5) - (
            tv.disc_above + rng.uniform(0.25, 0.6) * above.height
        )
        if params.sacrum_in_view is not None:
            fov = bottom - top
            pix = fov / (n_r - 1)
            if not 0.6 <= pix / params.pixel_spacing_mm <= 1.6:
                msg = (
                    f"top_level {params.top_level} and sacrum_in_view need a pixel spacing of "
                    f"{pix:.2f} mm for {n_r} rows; change n_rows or drop one constraint"
                )
                raise ValueError(msg)
        else:
            bottom = top + fov
    row_centre = s1.center + sup_axis * (bottom - fov / 2)
    # Antero-posterior: bodies left of centre (anterior), back near the right edge.
    col_centre_y = scene.torso["l3_y"] + rng.uniform(15, 40)
    lateral = rng.uniform(-1, 1) * params.lateral_offset_max_mm
    centre = np.array([by_level["L3"].center[0] + lateral, col_centre_y, row_centre[2]])
    # Project the centre's row component correctly (row axis may be oblique).
    spacing = (spacing_k, pix, pix)
    stir = _grid_from_centre(
        centre, (d_slice, d_row, d_col), (n_k, n_r, n_c), spacing, params.slice_thickness_mm
    )
    mode = params.t1_grid
    if mode == "random":
        mode = "same" if rng.random() < 0.4 else "different"
    if mode == "same":
        t1 = _Grid(stir.shape, stir.affine.copy(), stir.thickness_mm)
    else:
        n_k1 = max(1, n_k + int(rng.integers(-2, 3)))
        factor = float(rng.choice([0.875, 0.75, 1.0, 1.25]))
        n_r1 = max(32, round(n_r * factor))
        n_c1 = max(32, round(n_c * factor))
        fov_scale = rng.uniform(0.95, 1.08)
        pix_r1 = fov / max(n_r1 - 1, 1) * fov_scale
        pix_c1 = (n_c - 1) * pix / max(n_c1 - 1, 1) * fov_scale
        shift = (
            d_slice * rng.uniform(-0.5, 0.5) * spacing_k
            + d_row * rng.uniform(-10, 10)
            + d_col * rng.uniform(-8, 8)
        )
        thick = params.slice_thickness_mm * float(rng.choice([1.0, 1.0, 0.875, 1.1]))
        gap = max(0.0, spacing_k - thick) if rng.random() < 0.7 else params.slice_gap_mm
        t1 = _grid_from_centre(
            centre + shift, (d_slice, d_row, d_col), (n_k1, n_r1, n_c1),
            (thick + gap, pix_r1, pix_c1), thick,
        )  # fmt: skip
    return stir, t1


def _grid_from_centre(
    centre: npt.NDArray[np.float64],
    dirs: tuple[npt.NDArray[np.float64], ...],
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    thickness: float,
) -> _Grid:
    affine = np.eye(4)
    for a in range(3):
        affine[:3, a] = dirs[a] / np.linalg.norm(dirs[a]) * spacing[a]
    half = (np.array(shape, dtype=float) - 1) / 2
    affine[:3, 3] = centre - affine[:3, :3] @ half
    return _Grid(shape, affine, thickness)


def _acquisition(params: PhantomParameters, rng: np.random.Generator) -> _Acquisition:
    vendor = (
        params.vendor.lower() if params.vendor else str(rng.choice(["siemens", "ge", "philips"]))
    )
    field_t = params.field_strength_t or float(rng.choice([1.5, 1.5, 3.0]))
    contrast: dict[str, dict[_T, float]] = {"t1": {}, "stir": {}}
    for t, (s_t1, s_stir) in _SIGNAL.items():
        contrast["t1"][t] = s_t1 * rng.normal(1.0, 0.05)
        contrast["stir"][t] = s_stir * rng.normal(1.0, 0.06)
    contrast["t1"][_T.FAT] = 1.0
    contrast["stir"][_T.CSF] = 1.0
    contrast["stir"][_T.FAT] = _SIGNAL[_T.FAT][1] * rng.uniform(0.6, 1.6)  # fat suppression
    snr = {
        "stir": float(rng.uniform(*params.snr_stir_range)),
        "t1": float(rng.uniform(*params.snr_t1_range)),
    }
    gain = {
        "stir": float(np.exp(rng.uniform(np.log(300), np.log(2500)))),
        "t1": float(np.exp(rng.uniform(np.log(500), np.log(3500)))),
    }
    offset = {k: float(rng.uniform(0, 0.04) * g) for k, g in gain.items()}
    if vendor == "philips":
        slope = {k: float(rng.uniform(0.8, 3.0)) for k in gain}
    else:
        slope = {k: 1.0 for k in gain}
    intercept = {k: 0.0 for k in gain}
    kspace = {
        k: (float(rng.uniform(0.5, 0.75)), float(rng.uniform(0.55, 0.8))) for k in ("stir", "t1")
    }
    bias = {k: rng.normal(0, 1, size=6) for k in ("stir", "t1")}
    sequence = _sequence_parameters(vendor, field_t, rng)
    return _Acquisition(
        vendor, field_t, snr, gain, offset, slope, intercept, kspace, contrast, bias, sequence
    )


def _sequence_parameters(
    vendor: str, field_t: float, rng: np.random.Generator
) -> dict[str, dict[str, Any]]:
    ti = rng.uniform(140, 170) if field_t < 2 else rng.uniform(200, 235)
    stir: dict[str, Any] = {
        "RepetitionTime": round(float(rng.uniform(3000, 5200)), 1),
        "EchoTime": round(float(rng.uniform(30, 70)), 2),
        "InversionTime": round(float(ti), 1),
        "EchoTrainLength": int(rng.integers(9, 21)),
        "FlipAngle": 150.0 if vendor == "siemens" else 90.0,
    }
    t1: dict[str, Any] = {
        "RepetitionTime": round(float(rng.uniform(450, 680)), 1),
        "EchoTime": round(float(rng.uniform(8, 14)), 2),
        "EchoTrainLength": int(rng.integers(2, 6)),
        "FlipAngle": 150.0 if vendor == "siemens" else 90.0,
    }
    if vendor == "siemens":
        stir |= {
            "SeriesDescription": str(
                rng.choice(["t2_tirm_sag", "T2_TIRM_SAG_p2", "t2_tirm_sag_384"])
            ),
            "ScanningSequence": ["SE", "IR"],
            "SequenceVariant": ["SK", "SP", "MP"],
            "ScanOptions": ["IR"],
            "SequenceName": "*tir2d1_15",
        }
        t1 |= {
            "SeriesDescription": str(rng.choice(["t1_tse_sag", "T1_TSE_SAG_320", "t1_tse_sag_p2"])),
            "ScanningSequence": ["SE"],
            "SequenceVariant": ["SK", "SP", "OSP"],
            "ScanOptions": [],
            "SequenceName": "*tse2d1_3",
        }
    elif vendor == "ge":
        stir |= {
            "SeriesDescription": str(rng.choice(["SAG STIR", "Sag STIR", "SAG T2 STIR"])),
            "ScanningSequence": ["SE", "IR"],
            "SequenceVariant": ["SK", "SS"],
            "ScanOptions": ["IR_GEMS", "FAST_GEMS"],
            "SequenceName": "fse-ir",
        }
        t1 |= {
            "SeriesDescription": str(rng.choice(["SAG T1", "Sag T1 FSE", "SAG T1 FSE"])),
            "ScanningSequence": ["SE"],
            "SequenceVariant": ["SK"],
            "ScanOptions": ["FAST_GEMS"],
            "SequenceName": "fse",
        }
    else:
        stir |= {
            "SeriesDescription": str(rng.choice(["STIR SAG", "sT2W_STIR", "T2W_STIR_SAG"])),
            "ScanningSequence": ["SE", "IR"],
            "SequenceVariant": ["SK"],
            "ScanOptions": ["FS"],
            "SequenceName": "TSE",
        }
        t1 |= {
            "SeriesDescription": str(rng.choice(["T1W_TSE SAG", "sT1W_TSE", "T1 TSE SAG"])),
            "ScanningSequence": ["SE"],
            "SequenceVariant": ["SK"],
            "ScanOptions": [],
            "SequenceName": "TSE",
        }
    return {"stir": stir, "t1": t1}


# ============================================================== rendering
@dataclass
class _Buffers:
    """Per-slice sub-sample buffers."""

    tis: npt.NDArray[np.uint8]
    img: FloatArray
    lab: npt.NDArray[np.int16] | None
    les: npt.NDArray[np.uint8] | None  # 1 edema, 2 cement, 3 rim, 4 hemangioma


_LES_EDEMA, _LES_CEMENT, _LES_RIM, _LES_HEMANGIOMA = 1, 2, 3, 4


def _paint(
    buf: _Buffers,
    sl: tuple[slice, ...],
    mask: BoolArray,
    tissue: _T,
    value: float | np.floating[Any] | FloatArray,
) -> None:
    np.copyto(buf.tis[sl], np.uint8(tissue), where=mask)
    np.copyto(buf.img[sl], value, where=mask, casting="unsafe")


def _smoothstep_inside(f: FloatArray) -> BoolArray:
    return f <= 1


@dataclass
class _BodyEval:
    body: BoolArray
    marrow: BoolArray
    cement: BoolArray
    rim: BoolArray
    hemangioma: BoolArray
    edema_score: FloatArray  # edema field (eligible marrow) or -inf
    severity: FloatArray
    modic: BoolArray
    cement_score: FloatArray | None = None  # -distance to the cast (marrow) or -inf


def _eval_body(v: _Vert, x: FloatArray, y: FloatArray, z: FloatArray) -> _BodyEval:
    u, vv, w = v.local(x, y, z)
    body = v.body_f(u, vv, w) <= 1
    marrow = v.body_f(u, vv, w, shrink=v.cortex_mm, shrink_ep=v.endplate_mm) <= 1
    les = v.lesions
    shape = body.shape
    cement = np.zeros(shape, dtype=bool)
    rim = np.zeros(shape, dtype=bool)
    hem = np.zeros(shape, dtype=bool)
    modic = np.zeros(shape, dtype=bool)
    score = np.full(shape, -np.inf, dtype=F32)
    severity = np.zeros(shape, dtype=F32)
    if les.hemangioma is not None:
        c, r = les.hemangioma
        dist = np.sqrt((u - F32(c[0])) ** 2 + (vv - F32(c[1])) ** 2 + (w - F32(c[2])) ** 2)
        hem = marrow & (dist <= F32(r))
    if les.modic_top_mm > 0:
        t = (vv + F32(v.depth / 2)) / F32(v.depth)
        top, _ = v.endplates(t, w / F32(v.width / 2))
        modic = marrow & (top - u < F32(les.modic_top_mm + v.endplate_mm))
    if v.fracture is None:
        return _BodyEval(body, marrow, cement, rim, hem, score, severity, modic)
    if les.cement_ml > 0 and les.cement_noise is not None:
        dist_c = np.full(shape, np.inf, dtype=F32)
        for centre, radii in les.cement_blobs:
            q = (
                ((u - F32(centre[0])) / F32(radii[0])) ** 2
                + ((vv - F32(centre[1])) / F32(radii[1])) ** 2
                + ((w - F32(centre[2])) / F32(radii[2])) ** 2
            )
            dist_c = np.minimum(dist_c, (np.sqrt(q) - 1) * F32(np.mean(radii)))
        dist_c = dist_c + F32(1.2) * les.cement_noise(u, vv, w)
        g = -dist_c
        cement = marrow & (g > F32(les.cement_threshold))
        if les.rim and les.rim_cover is not None:
            cover = les.rim_cover(u, vv, w) > F32(les.rim_cover_threshold)
            rim = marrow & ~cement & (g > F32(les.cement_threshold - les.rim_width_mm)) & cover
        score_c = np.where(marrow, g, -np.inf).astype(F32)
    else:
        score_c = np.full(shape, -np.inf, dtype=F32)
    if les.bme_percent > 0 and les.edema_field is not None and les.edema_fine is not None:
        t = (vv + F32(v.depth / 2)) / F32(v.depth)
        top, bot = v.endplates(t, w / F32(v.width / 2))
        fld = les.edema_field(u, vv, w)
        pattern = les.edema_pattern
        ftype = v.fracture.fracture_type
        if pattern is EdemaPattern.BAND:
            d_top = top - u
            d_bot = u - bot
            if ftype is FractureType.BICONCAVE:
                dist = np.minimum(d_top, d_bot)
            elif v.loss_share_top > 0.85:
                dist = d_top
            else:
                dist = np.minimum(d_top, d_bot + F32(4.0))
            f = -dist + F32(2.5) * fld - F32(2.0) * t * F32(ftype is FractureType.WEDGE)
        elif pattern is EdemaPattern.DIFFUSE:
            f = fld + F32(0.35) * les.edema_fine(u, vv, w)
        else:
            f = fld + F32(0.6) * les.edema_fine(u, vv, w) - F32(0.25) * np.abs(u) / F32(v.height)
        eligible = marrow & ~cement & ~rim & ~hem
        score = np.where(eligible, f, -np.inf).astype(F32)
        sev = F32(0.82) + F32(0.13) * les.edema_fine(u + 31.0, vv, w)
        severity = np.clip(sev, 0.62, 1.0).astype(F32)
    return _BodyEval(body, marrow, cement, rim, hem, score, severity, modic, score_c)


def _kth_largest(a: FloatArray, k: int) -> FloatArray:
    """k-th largest value along axis 0 (k = 1 is the maximum)."""
    return np.sort(a, axis=0)[a.shape[0] - k]


def _majority(mask: BoolArray) -> BoolArray:
    n = mask.shape[0]
    return mask.sum(axis=0) * 2 > n


def _sub_offsets(grid: _Grid, n_sub: int) -> npt.NDArray[np.float64]:
    frac = (np.arange(n_sub) + 0.5) / n_sub - 0.5
    return frac * grid.thickness_mm / grid.spacing[0]


def _plane_coords(
    grid: _Grid, k: float, rows: slice, cols: slice
) -> tuple[FloatArray, FloatArray, FloatArray]:
    a = grid.affine
    i = np.arange(rows.start, rows.stop, dtype=np.float64)[:, None]
    j = np.arange(cols.start, cols.stop, dtype=np.float64)[None, :]
    out = []
    for ax in range(3):
        out.append((a[ax, 3] + k * a[ax, 0] + i * a[ax, 1] + j * a[ax, 2]).astype(F32))
    return out[0], out[1], out[2]


_Ext = tuple[tuple[float, float], tuple[float, float], tuple[float, float]]
_Box = tuple[slice, slice, int, int]


def _box_from_local(
    grid: _Grid,
    centre: npt.NDArray[np.float64],
    basis: npt.NDArray[np.float64],
    ext: tuple[tuple[float, float], tuple[float, float], tuple[float, float]],
) -> tuple[slice, slice, int, int] | None:
    """Row/column slices and slice-index range of a local box on ``grid`` (None: outside)."""
    n_k, n_r, n_c = grid.shape
    (u0, u1), (v0, v1), (w0, w1) = ext
    corners = np.array([[a, b, c] for a in (u0, u1) for b in (v0, v1) for c in (w0, w1)])
    idx = grid.corners_index(centre + corners @ basis.T)
    lo = np.floor(idx.min(axis=0)).astype(int)
    hi = np.ceil(idx.max(axis=0)).astype(int) + 1
    k0, k1 = max(lo[0] - 1, 0), min(hi[0] + 1, n_k)
    r0, r1 = max(lo[1], 0), min(hi[1], n_r)
    c0, c1 = max(lo[2], 0), min(hi[2], n_c)
    if k0 >= k1 or r0 >= r1 or c0 >= c1:
        return None
    return slice(r0, r1), slice(c0, c1), k0, k1


def _body_extent(v: _Vert) -> _Ext:
    h = v.height / 2 + abs(v.wedge_mm) / 2 + 2.0
    return (-h, h), (-v.depth / 2 - 2, v.depth / 2 + 2), (-v.width / 2 - 2, v.width / 2 + 2)


def _pe_extent(v: _Vert) -> _Ext:
    back = v.depth / 2
    if v.kind == "sacral":
        side = 62.0 if v.level in ("S1", "S2") else 32.0
        return (
            (-v.height / 2 - 4, v.height / 2 + 4),
            (-v.depth / 2 - 6, back + v.canal_ap + 12),
            (
                -side,
                side,
            ),
        )
    down = v.sp_len * math.sin(v.sp_angle) + v.sp_h + v.height * 0.6
    up = v.height / 2 + v.disc_above * 0.6 + 8
    reach = back + v.canal_ap + v.lam_t + v.sp_len + 8
    side = v.canal_hw + v.ped_w + v.tp_len + 8
    return (-down, up), (back - 6, reach), (-side, side)


def _disc_extent(lower: _Vert, upper: _Vert) -> _Ext:
    _, _, gap = _disc_frame(lower, upper)
    h = max(gap, 0.8) / 2 + 3.5
    d = max(lower.depth, upper.depth) / 2 + lower.disc_bulge + 3
    w = max(lower.width, upper.width) / 2 + lower.disc_bulge + 3
    return (-h, h), (-d, d), (-w, w)


def _disc_frame(
    lower: _Vert, upper: _Vert
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], float]:
    """Centre, orthonormal basis and central height of the disc between two bodies."""
    p_l = lower.center + lower.basis[:, 0] * (lower.height / 2)
    p_u = upper.center - upper.basis[:, 0] * (upper.height / 2)
    centre = 0.5 * (p_l + p_u)
    b = lower.basis + upper.basis
    q, _ = np.linalg.qr(b)
    q = q * np.sign(np.sum(q * b, axis=0))
    gap = float((p_u - p_l) @ q[:, 0])
    return centre, q, gap


@dataclass
class _Boxes:
    pe: list[tuple[slice, slice, int, int] | None]
    disc: list[tuple[slice, slice, int, int] | None]
    body: list[tuple[slice, slice, int, int] | None]


def _boxes(scene: _Scene, grid: _Grid) -> _Boxes:
    pe: list[_Box | None] = []
    disc: list[_Box | None] = []
    body: list[_Box | None] = []
    for i, v in enumerate(scene.verts):
        body.append(_box_from_local(grid, v.center, v.basis, _body_extent(v)))
        pe.append(
            _box_from_local(grid, v.center, v.basis, _pe_extent(v))
            if v.posterior_elements
            else None
        )
        if i == 0:
            disc.append(None)
        else:
            upper = scene.verts[i - 1]
            centre, basis, _ = _disc_frame(v, upper)
            disc.append(_box_from_local(grid, centre, basis, _disc_extent(v, upper)))
    return _Boxes(pe, disc, body)


def _render(
    scene: _Scene,
    grid: _Grid,
    contrast: str,
    acq: _Acquisition,
    n_sub: int,
    noise_rng: np.random.Generator,
    truth: bool,
    bias_strength: float,
) -> tuple[FloatArray, dict[str, Any]]:
    """Render one series; with ``truth`` also the label map and lesion masks on its grid."""
    ci = 0 if contrast == "t1" else 1
    sig = acq.contrast[contrast]
    n_k, n_r, n_c = grid.shape
    offsets = _sub_offsets(grid, n_sub)
    step = grid.affine[:3, 0]
    off = [(offsets * step[a]).astype(F32)[:, None, None] for a in range(3)]
    boxes = _boxes(scene, grid)
    image = np.empty(grid.shape, dtype=F32)
    labels = np.zeros(grid.shape, dtype=np.int16) if truth else None
    lesion_map = np.zeros(grid.shape, dtype=np.uint8) if truth else None
    tissue_map = np.zeros(grid.shape, dtype=np.uint8) if truth else None
    tex_amp = np.zeros(len(_T), dtype=F32)
    for t, amps in _TEXTURE.items():
        tex_amp[t] = amps[ci]
    full = (slice(0, n_r), slice(0, n_c))
    grain = _grain(scene, grid, contrast)
    # (s, d) depend on (y, z) only: shared by all slices of an exactly sagittal stack.
    sagittal = bool(np.allclose(grid.affine[1:3, 0], 0.0, atol=1e-9))
    cached: tuple[FloatArray, FloatArray, dict[str, FloatArray]] | None = None
    for k in range(n_k):
        x0, y0, z0 = _plane_coords(grid, float(k), *full)
        if cached is None or not sagittal:
            s_c, d_c = _coarse_plane(
                [lambda x, y, z: _sample_sd(scene, y, z)[0],
                 lambda x, y, z: _sample_sd(scene, y, z)[1]], grid, float(k), factor=4,
            )  # fmt: skip
            cached = (s_c, d_c, scene.profiles.lookup(s_c))
        s_c, d_c, prof = cached
        step_mm = grid.spacing[1]
        slow = _coarse_plane(
            [
                scene.tex_coarse,
                lambda x, y, z: scene.tex_coarse(x * F32(0.3), y * F32(0.3) + F32(7.0), z),
                lambda x, y, z: scene.tex_fine(x * F32(0.4), y * F32(1.2), z * F32(0.2)),
            ],
            grid,
            float(k),
            factor=max(1, round(4.0 / step_mm)),
        )
        visc = _coarse_plane(
            [
                scene.tex_viscera,
                lambda x, y, z: scene.tex_viscera(x + F32(41.0), y - F32(17.0), z + F32(23.0)),
            ],
            grid,
            float(k),
            factor=max(1, round(2.0 / step_mm)),
        )
        smooth = [slow[0], slow[1], visc[0], visc[1], slow[2]]
        # Soft tissues at half resolution (their boundaries are smooth and the k-space
        # low-pass of the acquisition is coarser than 2 pixels); the spine is full resolution.
        h2 = (slice(None, None, 2), slice(None, None, 2))
        half_shape = ((n_r + 1) // 2, (n_c + 1) // 2)
        tis_h = np.zeros(half_shape, dtype=np.uint8)
        img_h = np.zeros(half_shape, dtype=F32)
        _background(
            scene,
            sig,
            x0[h2],
            y0[h2],
            z0[h2],
            s_c[h2],
            d_c[h2],
            {key: val[h2] for key, val in prof.items()},
            [f[h2] for f in smooth],
            tis_h,
            img_h,
        )
        tis2 = np.repeat(np.repeat(tis_h, 2, axis=0), 2, axis=1)[:n_r, :n_c]
        # Bilinear for the values: smooth soft-tissue edges (about the acquired resolution).
        i_r, f_r = _upsample_index(n_r, half_shape[0], 2)
        i_c, f_c = _upsample_index(n_c, half_shape[1], 2)
        wide = img_h[:, i_c] * (1 - f_c) + img_h[:, i_c + 1] * f_c
        img2 = wide[i_r] * (1 - f_r)[:, None] + wide[i_r + 1] * f_r[:, None]
        buf = _Buffers(
            tis=np.repeat(tis2[None], n_sub, axis=0),
            img=np.repeat(img2[None], n_sub, axis=0),
            lab=np.zeros((n_sub, n_r, n_c), dtype=np.int16) if truth else None,
            les=np.zeros((n_sub, n_r, n_c), dtype=np.uint8) if truth else None,
        )
        _canal(scene, sig, x0, s_c, d_c, prof, off[0], buf)

        def sub(
            rs: slice, cs: slice, x0: FloatArray = x0, y0: FloatArray = y0, z0: FloatArray = z0
        ) -> tuple[FloatArray, FloatArray, FloatArray]:
            return (x0[rs, cs][None] + off[0], y0[rs, cs][None] + off[1], z0[rs, cs][None] + off[2])

        def live(box: _Box | None, k: int = k) -> bool:
            return box is not None and box[2] <= k < box[3]

        for v, box in zip(scene.verts, boxes.pe, strict=True):
            if live(box):
                assert box is not None
                sl = (slice(None), box[0], box[1])
                _posterior(v, sig, *sub(box[0], box[1]), buf, sl)
        for i, box in enumerate(boxes.disc):
            if live(box):
                assert box is not None
                sl = (slice(None), box[0], box[1])
                _disc(scene.verts[i], scene.verts[i - 1], sig, *sub(box[0], box[1]), buf, sl)
        for v, box in zip(scene.verts, boxes.body, strict=True):
            if live(box):
                assert box is not None
                sl = (slice(None), box[0], box[1])
                _body(v, sig, contrast, *sub(box[0], box[1]), buf, sl, truth)
        # Partial volume over the slice thickness, then anatomical texture.
        img = buf.img.mean(axis=0)
        centre_t = buf.tis[n_sub // 2]
        amp = tex_amp[centre_t]
        tex = smooth[0] * F32(0.5)
        spine = (centre_t >= _T.PE_CORTEX) & (amp > 0)
        if np.any(spine):
            r_idx, c_idx = np.nonzero(spine)
            rs = slice(int(r_idx.min()), int(r_idx.max()) + 1)
            cs = slice(int(c_idx.min()), int(c_idx.max()) + 1)
            fine = grain[k % grain.shape[0], rs, cs]
            tex[rs, cs] = np.where(spine[rs, cs], fine, tex[rs, cs])
        img *= 1 + amp * tex
        image[k] = img
        if truth and buf.lab is not None and buf.les is not None:
            assert labels is not None and lesion_map is not None
            labels[k] = _majority_label(buf.lab)
            lesion_map[k] = _majority_label(buf.les.astype(np.int16)).astype(np.uint8)
            lesion_map[k][labels[k] == 0] = 0
            assert tissue_map is not None
            tissue_map[k] = centre_t
    image = _acquire(image, grid, contrast, acq, noise_rng, bias_strength, scene)
    extra: dict[str, Any] = {}
    if truth:
        extra = {"labels": labels, "lesions": lesion_map, "tissue": tissue_map}
    return image, extra


def _grain(scene: _Scene, grid: _Grid, contrast: str) -> FloatArray:
    """Fine trabecular grain (~1 mm) for the marrow, per slice of ``grid`` (unit SD).

    Drawn from the anatomy seed (not the noise seed), so test-retest keeps it.
    """
    n_k, n_r, n_c = grid.shape
    n_tiles = min(n_k, 4)
    rng = np.random.default_rng([scene.seed, 606, 0 if contrast == "t1" else 1, *grid.shape])
    sigma_px = max(0.6, 0.8 / grid.spacing[1])
    raw = rng.standard_normal((n_tiles, n_r, n_c), dtype=np.float32)
    out = ndimage.gaussian_filter(raw, (0, sigma_px, sigma_px), mode="wrap")
    out /= max(float(out.std()), 1e-6)
    return out.astype(F32)


def _majority_label(lab: npt.NDArray[np.int16]) -> npt.NDArray[np.int16]:
    """Per voxel, the non-zero value held by more than half of the sub-samples (else 0)."""
    n = lab.shape[0]
    if n == 1:
        return lab[0].copy()
    if n == 3:
        a, b, c = lab
        return np.where((a == b) | (a == c), a, np.where(b == c, b, 0)).astype(np.int16)
    out = np.zeros(lab.shape[1:], dtype=np.int16)
    for value in np.unique(lab):
        if value != 0:
            out[(lab == value).sum(axis=0) * 2 > n] = value
    return out


def _coarse_plane(
    fields: Sequence[Any], grid: _Grid, k: float, factor: int = 4
) -> list[FloatArray]:
    """Smooth fields sampled every ``factor`` pixels on slice k, upsampled bilinearly.

    Only for fields much smoother than ``factor`` pixels (textures, organ shapes, bias).
    """
    n_r, n_c = grid.shape[1], grid.shape[2]
    rows = np.arange(0, n_r + factor, factor, dtype=np.float64)
    cols = np.arange(0, n_c + factor, factor, dtype=np.float64)
    a = grid.affine
    xyz = [
        (a[ax, 3] + k * a[ax, 0] + rows[:, None] * a[ax, 1] + cols[None, :] * a[ax, 2]).astype(F32)
        for ax in range(3)
    ]
    i_r, f_r = _upsample_index(n_r, rows.size, factor)
    i_c, f_c = _upsample_index(n_c, cols.size, factor)
    out = []
    for f in fields:
        small = f(*xyz)
        wide = small[:, i_c] * (1 - f_c) + small[:, i_c + 1] * f_c
        out.append(wide[i_r] * (1 - f_r)[:, None] + wide[i_r + 1] * f_r[:, None])
    return out


def _upsample_index(n: int, m: int, factor: int) -> tuple[npt.NDArray[np.intp], FloatArray]:
    """Left sample index and fraction for linear interpolation from every ``factor``-th pixel."""
    pos = np.arange(n, dtype=np.float64) / factor
    i0 = np.minimum(np.floor(pos).astype(np.intp), m - 2)
    return i0, (pos - i0).astype(F32)


def _sample_sd(scene: _Scene, y: FloatArray, z: FloatArray) -> tuple[FloatArray, FloatArray]:
    assert scene.lattice_sd is not None
    data, lo, step = scene.lattice_sd
    coords = np.stack([(y - F32(lo[0])) / F32(step), (z - F32(lo[1])) / F32(step)])
    s = ndimage.map_coordinates(data[0], coords, order=1, mode="nearest", prefilter=False)
    d = ndimage.map_coordinates(data[1], coords, order=1, mode="nearest", prefilter=False)
    return s, d


@dataclass
class _Profiles:
    """Properties of the column tabulated along the centreline arc length s."""

    s0: float
    step: float
    table: dict[str, FloatArray]

    @classmethod
    def build(cls, verts: list[_Vert], step: float = 0.5) -> _Profiles:
        knots = np.array([v.s for v in verts])
        order = np.argsort(knots)
        s_grid = np.arange(knots.min() - 400, knots.max() + 400, step)
        table = {}
        for name in ("depth", "width", "canal_ap", "canal_hw"):
            vals = np.array([getattr(v, name) for v in verts])[order]
            table[name] = np.interp(s_grid, knots[order], vals).astype(F32)
        xs = np.array([v.center[0] for v in verts])[order]
        table["xc"] = np.interp(s_grid, knots[order], xs).astype(F32)
        return cls(float(s_grid[0]), step, table)

    def lookup(self, s: FloatArray) -> dict[str, FloatArray]:
        n = next(iter(self.table.values())).size
        idx = np.clip(((s - F32(self.s0)) / F32(self.step)).astype(np.int32), 0, n - 1)
        return {name: tab[idx] for name, tab in self.table.items()}


def _background(
    scene: _Scene,
    sig: dict[_T, float],
    x: FloatArray,
    y: FloatArray,
    z: FloatArray,
    s: FloatArray,
    d: FloatArray,
    prof: dict[str, FloatArray],
    smooth: list[FloatArray],
    tis: npt.NDArray[np.uint8],
    img: FloatArray,
) -> None:
    """Soft tissues outside the spine on one slice-centre plane (no partial volume needed)."""
    tor = scene.torso
    depth = prof["depth"]
    width = prof["width"]
    canal = prof["canal_ap"]
    w = x - prof["xc"]
    half = depth * F32(0.5)
    zl = z - F32(tor["l3_z"])
    coarse, vn, vn2 = smooth[1], smooth[2], smooth[3]
    # Back surface: flattened on the table, lifted under the lordosis.
    y_back = F32(tor["sp_tip_y"] + tor["fat_back"]) - F32(tor["back_lift"]) * np.exp(
        -((zl / F32(90.0)) ** 2)
    )
    y_back = y_back + F32(2.0) * np.sin(zl / F32(37.0) + F32(tor["back_lift"]))
    front = (
        F32(tor["l3_y"] - tor["abdomen_depth"])
        - F32(tor["belly"]) * np.exp(-(((zl - F32(40)) / F32(140.0)) ** 2))
        + F32(0.0006) * zl**2
    )
    inside = (y < y_back) & (y > front)
    tis[...] = _T.AIR
    img[...] = 0

    def put(
        mask: BoolArray, t: _T, value: float | np.floating[Any] | FloatArray | None = None
    ) -> None:
        np.copyto(tis, np.uint8(t), where=mask)
        np.copyto(img, sig[t] if value is None else value, where=mask, casting="unsafe")

    put(inside, _T.SKIN)
    put(inside & (y < y_back - 2.2) & (y > front + 2.2), _T.FAT)
    fat_back = F32(tor["fat_back"]) * (1 + F32(0.08) * coarse)
    muscle_back = (d > half + 2) & (y < y_back - fat_back) & inside
    muscle_back &= d < half + canal + 95
    # Paraspinal muscle with fatty streaks along the fibres (more in the elderly).
    fatty = np.clip(F32(tor["muscle_fat"]) + F32(0.1) * smooth[4], 0, 0.7)
    muscle_val = F32(sig[_T.MUSCLE]) + (F32(sig[_T.FAT]) - F32(sig[_T.MUSCLE])) * fatty
    put(muscle_back, _T.MUSCLE, muscle_val)
    put(
        (np.abs(w) < 2.5) & (d > half + canal + 3) & (d < half + canal + 40) & muscle_back,
        _T.INTERSPINOUS,
    )
    # Anterior abdominal wall muscle.
    wall_in = front + F32(tor["fat_front"])
    put(inside & (y > wall_in) & (y < wall_in + 11), _T.MUSCLE)
    # Compartment anterior to the spine.
    retro = F32(tor["retro"])
    anterior = inside & (d < -(half + retro)) & (y > wall_in + 11)
    # Diaphragm: a dome rising anteriorly from the crura, with some lateral curvature.
    ya = np.clip(F32(tor["l3_y"]) - y - half, 0, None)  # mm anterior to the bodies
    z_dia = (
        F32(tor["z_dia"])
        + F32(tor["dia_slope"]) * F32(130.0) * np.sqrt(np.clip(ya / F32(130.0), 0, 1))
        - F32(0.004) * (x - F32(tor["heart_x"])) ** 2
        + F32(4.0) * coarse
    )
    thorax = anterior & (z > z_dia)
    abdomen = anterior & ~thorax
    if np.any(abdomen):
        # Bowel loops with mottled content, a winding network of mesenteric fat between
        # them, fluid pockets (bright on STIR) and gas (dark on both).
        base = F32(sig[_T.VISCERA]) * (1 + F32(0.3) * vn2)
        put(abdomen, _T.VISCERA, base)
        put(abdomen & (np.abs(vn) < F32(tor["mesentery"])), _T.FAT)
        put(abdomen & (vn2 > 1.25) & (np.abs(vn) > 0.35), _T.FLUID)
        put(abdomen & (vn2 < -1.6) & (np.abs(vn) > 0.35), _T.AIR, F32(0.02))
        liver = abdomen & (z > z_dia - F32(tor["liver_depth"]) * (1 - (ya / F32(260.0)) ** 2))
        put(liver & (x < F32(tor["heart_x"] + 25) + F32(8.0) * vn), _T.LIVER)
        bc = tor["bladder_c"]
        br = F32(tor["bladder_r"])
        bl = ((x - F32(bc[0])) / (br * 1.2)) ** 2 + ((y - F32(bc[1])) / br) ** 2 + (
            (z - F32(bc[2])) / (br * 0.9)
        ) ** 2 < 1
        put(abdomen & bl, _T.FLUID)
    if np.any(thorax):
        put(thorax, _T.LUNG)
        put(thorax & (np.abs(x - F32(tor["heart_x"])) < 45) & (d < -(half + 35)), _T.HEART)
        put(thorax & (d >= -(half + 35)) & (np.abs(w) < 12), _T.FAT)
    # Prevertebral and paravertebral fat, psoas, crura, vessels.
    prev = inside & (d >= -(half + retro)) & (d < half + 2)
    put(prev, _T.FAT)
    s_l1, s_s1 = F32(tor["s_L1"]), F32(tor["s_S1"])
    psoas_w = F32(8.0) + F32(0.12) * np.clip(s_l1 - s, 0, 200)
    psoas = (
        prev & (s < s_l1 + 10) & (s > s_s1 + 5)
        & (np.abs(w) > width * 0.5 - 4) & (np.abs(w) < width * 0.5 + 2 * psoas_w)
        & (d > -(half + psoas_w))
    )  # fmt: skip
    put(psoas, _T.MUSCLE)
    crus = (
        prev & (s > F32(tor["s_L2"])) & (s < F32(tor["s_T12"])) & (np.abs(w) > 4)
        & (np.abs(w) < 16) & (d < -(half + 1)) & (d > -(half + 7))
    )  # fmt: skip
    put(crus, _T.MUSCLE)
    near = inside & (d < 0) & (d > -(half + 40))
    s_bif = F32(tor["s_L4"])
    ar = F32(tor["aorta_r"])
    spread = np.clip(s_bif - s, 0, None) * F32(0.6)
    d_a = -(half + ar + 1.5)
    r_local = np.where(s < s_bif, ar * F32(0.7), ar)
    for sign in (1.0, -1.0):
        ax = np.where(
            s < s_bif,
            F32(tor["aorta_x"] * 0.5 + sign * 1.0) + F32(sign) * spread,
            F32(tor["aorta_x"]),
        )
        tube = ((x - ax) / r_local) ** 2 + ((d - d_a) / r_local) ** 2 < 1
        put(tube & near, _T.AORTA)
    ir = F32(tor["ivc_r"])
    d_i = -(half + ir * 0.8 + 3)
    ivc = ((x - F32(tor["ivc_x"])) / ir) ** 2 + ((d - d_i) / (ir * 0.8)) ** 2 < 1
    put(ivc & near & (z < z_dia + 20), _T.IVC)


def _canal(
    scene: _Scene,
    sig: dict[_T, float],
    x0: FloatArray,
    s_c: FloatArray,
    d_c: FloatArray,
    prof: dict[str, FloatArray],
    off_x: FloatArray,
    buf: _Buffers,
) -> None:
    """Epidural fat, ligamentum flavum, dural sac (CSF), cord and cauda equina."""
    depth, ap, hw = prof["depth"], prof["canal_ap"], prof["canal_hw"]
    band = (d_c > depth * 0.5 - 2) & (d_c < depth * 0.5 + ap + 1)
    idx = np.flatnonzero(band)
    if idx.size == 0:
        return
    n_sub = buf.tis.shape[0]
    s = s_c.ravel()[idx]
    d = d_c.ravel()[idx]
    depth, ap, hw = depth.ravel()[idx], ap.ravel()[idx], hw.ravel()[idx]
    w = (x0.ravel()[idx] - prof["xc"].ravel()[idx])[None] + off_x[:, :, 0]  # (n_sub, N)
    tis_flat = buf.tis.reshape(n_sub, -1)
    img_flat = buf.img.reshape(n_sub, -1)
    pts = _Buffers(tis=tis_flat[:, idx], img=img_flat[:, idx], lab=None, les=None)
    sl = (slice(None), slice(None))
    ant = depth * 0.5 - 0.3
    rad_d = np.abs((d - (ant + ap * 0.5)) / (ap * 0.5))
    rad_w = np.abs(w) / hw
    canal = (rad_d**3 + rad_w**3 < 1) & (d > ant)
    _paint(pts, sl, canal, _T.FAT, sig[_T.FAT])
    _paint(pts, sl, canal & (d > ant + ap - 2.5), _T.LIGAMENT, sig[_T.LIGAMENT])
    epi_post = np.where(s < F32(scene.s_conus + 40), F32(4.5), F32(2.0))
    sac_ap = (ap - epi_post - 1.2) * 0.5
    sac_c = ant + 0.8 + sac_ap
    sac_hw = hw - 1.5
    taper = np.clip((s - F32(scene.s_sac_end)) / 18.0, 0, 1)
    sac = ((d - sac_c) / (sac_ap * taper + 1e-3)) ** 2 + (w / (sac_hw * taper + 1e-3)) ** 2 < 1
    _paint(pts, sl, sac, _T.CSF, sig[_T.CSF])
    # Cord above the conus, lying slightly dorsal (supine).
    t_cord = np.sqrt(np.clip((s - F32(scene.s_conus)) / 18.0, 0, 1))
    cord = ((d - sac_c - 0.6) / (4.0 * t_cord + 1e-3)) ** 2 + (w / (5.2 * t_cord + 1e-3)) ** 2 < 1
    _paint(pts, sl, cord & sac, _T.CORD, sig[_T.CORD])
    # Cauda equina strands below the conus, layered dorsally.
    below = (s < F32(scene.s_conus + 4)) & (s > F32(scene.s_sac_end))
    if np.any(below):
        strands = np.zeros(w.shape, dtype=bool)
        for dn, wn in scene.strands:
            wobble = F32(0.15) * np.sin(s / F32(23.0) + F32(dn * 5))
            cd = sac_c + (F32(dn) + wobble) * sac_ap
            cw = (F32(wn) + wobble) * sac_hw
            strands |= (d - cd) ** 2 + (w - cw) ** 2 < F32(0.64)
        _paint(pts, sl, strands & sac & below, _T.NERVE, sig[_T.NERVE])
    tis_flat[:, idx] = pts.tis
    img_flat[:, idx] = pts.img


def _rbox(
    a: FloatArray, b: FloatArray, c: FloatArray, ha: float, hb: float, hc: float
) -> FloatArray:
    qa = (a / F32(ha)) ** 2
    qb = (b / F32(hb)) ** 2
    qc = (c / F32(hc)) ** 2
    return qa * qa + qb * qb + qc * qc


def _pe_shapes(v: _Vert, u: FloatArray, vv: FloatArray, w: FloatArray, shr: float) -> BoolArray:
    """Union of the posterior-element shapes of ``v`` (shrunk by ``shr`` mm for the marrow)."""
    aw = np.abs(w)
    back = v.depth / 2
    if v.kind == "sacral":
        # Dorsal plate (fused laminae) and, for S1-S2, the alae.
        pc_v = back + v.canal_ap + 4.5
        out = _rbox(u, vv - F32(pc_v), w, v.height / 2 + 2 - shr, 4.5 - shr, 28 - shr) < 1
        if v.level in ("S1", "S2"):
            reach = 52.0 if v.level == "S1" else 40.0
            out |= (
                _rbox(
                    u + F32(1.0),
                    vv - F32(0.15 * v.depth),
                    aw - F32(reach / 2 + 8),
                    v.height / 2 - shr,
                    v.depth / 2 + 4 - shr,
                    reach / 2 - shr,
                )
                < 1
            )
        return out
    wp = v.canal_hw + v.ped_w / 2
    up = v.height / 2 - v.ped_h / 2 - 1.5
    v_lam = back + v.canal_ap + v.lam_t / 2
    lam = math.radians(22.0)
    cl, sn = F32(math.cos(lam)), F32(math.sin(lam))
    ul = u - F32(v.height * 0.05)
    vl = vv - F32(v_lam)
    ga = v.sp_angle
    e_u, e_v = -math.sin(ga), math.cos(ga)
    du = u - F32(v.height * 0.05 + e_u * (v.sp_len / 2 + 3))
    dv = vv - F32(v_lam + e_v * (v.sp_len / 2 + 3))
    out = ((u - F32(up)) / F32(v.ped_h / 2 - shr)) ** 2 + (
        (aw - F32(wp)) / F32(v.ped_w / 2 - shr)
    ) ** 2 < 1
    out &= (vv > F32(back - 4)) & (vv < F32(back + v.canal_ap + 3))
    out |= (
        _rbox(
            u - F32(v.height * 0.08),
            vv - F32(back + v.canal_ap + 2),
            aw - F32(wp + 1),
            v.height / 2 + v.disc_above * 0.55 - shr,
            7 - shr,
            5.5 - shr,
        )
        < 1
    )
    out |= (
        _rbox(
            ul * cl - vl * sn,
            ul * sn + vl * cl,
            aw,
            v.height * 0.42 - shr,
            v.lam_t / 2 - shr,
            wp + 2 - shr,
        )
        < 1
    ) & (vv > F32(back + v.canal_ap - 1))
    out |= (
        _rbox(
            du * F32(e_u) + dv * F32(e_v),
            -du * F32(e_v) + dv * F32(e_u),
            w,
            v.sp_len / 2 + 3 - shr,
            v.sp_h / 2 - shr,
            4.0 - shr,
        )
        < 1
    )
    out |= (
        _rbox(
            u,
            vv - F32(back + v.canal_ap * 0.3),
            aw - F32(wp + v.tp_len / 2),
            3.8 - shr,
            4.0 - shr,
            v.tp_len / 2 + 2 - shr,
        )
        < 1
    )
    return out


def _posterior(
    v: _Vert,
    sig: dict[_T, float],
    x: FloatArray,
    y: FloatArray,
    z: FloatArray,
    buf: _Buffers,
    sl: tuple[slice, ...],
) -> None:
    """Paint cortex, marrow and facet joints of the posterior elements of ``v``."""
    u, vv, w = v.local(x, y, z)
    outer = _pe_shapes(v, u, vv, w, 0.0)
    idx = np.flatnonzero(outer)
    if idx.size == 0:
        return
    # The marrow lies inside the outer shape: evaluate it there only.
    uf, vf, wf = u.ravel()[idx], vv.ravel()[idx], w.ravel()[idx]
    inner_f = _pe_shapes(v, uf, vf, wf, 0.9)
    joint_f = np.zeros(idx.size, dtype=bool)
    if v.kind != "sacral":
        # Facet joint: a thin fluid line where the pillars of neighbouring levels meet.
        wp = v.canal_hw + v.ped_w / 2
        joint_f = (np.abs(uf - F32(v.height / 2 + v.disc_above * 0.5 + 1.0)) < 0.7) & (
            np.abs(wf) > F32(wp - 3)
        )
        inner_f &= ~joint_f
    inner = np.zeros(outer.size, dtype=bool)
    inner[idx] = inner_f
    joint = np.zeros(outer.size, dtype=bool)
    joint[idx] = joint_f
    marrow = v.marrow_t1 if sig[_T.FAT] == 1.0 else v.marrow_stir
    _paint(buf, sl, outer, _T.PE_CORTEX, sig[_T.PE_CORTEX])
    _paint(buf, sl, inner.reshape(outer.shape), _T.PE_MARROW, F32(marrow * 0.97))
    _paint(buf, sl, joint.reshape(outer.shape), _T.FACET, sig[_T.FACET])


def _disc(
    lower: _Vert,
    upper: _Vert,
    sig: dict[_T, float],
    x: FloatArray,
    y: FloatArray,
    z: FloatArray,
    buf: _Buffers,
    sl: tuple[slice, ...],
) -> None:
    centre, basis, gap = _disc_frame(lower, upper)
    dx, dy, dz = x - F32(centre[0]), y - F32(centre[1]), z - F32(centre[2])
    b = basis.astype(F32)
    u = dx * b[0, 0] + dy * b[1, 0] + dz * b[2, 0]
    v = dx * b[0, 1] + dy * b[1, 1] + dz * b[2, 1]
    w = dx * b[0, 2] + dy * b[1, 2] + dz * b[2, 2]
    half_gap = max(gap / 2, 0.4)
    sel = np.abs(u) < F32(half_gap + 3.0)
    if not np.any(sel):
        return
    a_w = (lower.width + upper.width) / 4 + lower.disc_bulge * 0.6
    a_v_ant = (lower.depth + upper.depth) / 4 + lower.disc_bulge * 0.6
    a_v_post = (lower.depth + upper.depth) / 4 + lower.disc_bulge
    a_v = np.where(v < 0, F32(a_v_ant), F32(a_v_post))
    e = np.where(v < 0, F32(2.3), F32(3.2))
    bulge_taper = 1 - F32(0.15) * (u / F32(half_gap + 3.0)) ** 2
    foot = ((np.abs(w) / F32(a_w)) ** e + (np.abs(v) / a_v) ** e) ** (1 / e) / bulge_taper
    annulus = sel & (foot < 1)
    _paint(buf, sl, annulus, _T.ANNULUS, sig[_T.ANNULUS])
    nucleus_stir = lower.disc_nucleus_stir
    is_stir = sig[_T.FAT] != 1.0
    value = nucleus_stir if is_stir else sig[_T.NUCLEUS] * (0.85 if lower.disc_degenerated else 1)
    if lower.kind == "sacral" and lower.level != "S1":
        return
    nfoot = (w / F32(a_w * 0.62)) ** 2 + ((v - F32(0.06 * a_v_post)) / F32(a_v_post * 0.55)) ** 2
    nucleus = annulus & (nfoot < 1) & (np.abs(u) < F32(half_gap + 1.5 - 0.8))
    if lower.level == "S1" and lower.disc_nucleus_stir < 0.4:
        return
    _paint(buf, sl, nucleus, _T.NUCLEUS, F32(value))
    if is_stir and not lower.disc_degenerated:
        cleft = nucleus & (np.abs(u) < 0.45) & (nfoot > 0.15)
        _paint(buf, sl, cleft, _T.NUCLEUS, F32(value * 0.55))


def _body(
    v: _Vert,
    sig: dict[_T, float],
    contrast: str,
    x: FloatArray,
    y: FloatArray,
    z: FloatArray,
    buf: _Buffers,
    sl: tuple[slice, ...],
    truth: bool,
) -> None:
    ev = _eval_body(v, x, y, z)
    if not np.any(ev.body):
        return
    is_t1 = contrast == "t1"
    marrow_val = F32(v.marrow_t1 if is_t1 else v.marrow_stir)
    _paint(buf, sl, ev.body, _T.CORTEX, sig[_T.CORTEX])
    _paint(buf, sl, ev.marrow, _T.MARROW, marrow_val)
    _paint(buf, sl, ev.modic, _T.MODIC, sig[_T.MODIC])
    les = v.lesions
    edema = ev.edema_score > F32(les.edema_threshold)
    if np.any(np.isfinite(ev.edema_score)):
        halo = (ev.edema_score > F32(les.edema_threshold - les.edema_halo)) & ~edema
        if is_t1:
            # Water replacing fat darkens T1 towards muscle/disc (0.3-0.4 of fat; fatty
            # marrow 0.62-0.9).  Fat loss is near complete wherever STIR is clearly bright,
            # so the T1 fraction of full contrast is 0.81-1.0 (STIR: 0.62-1.0, same field).
            e_val = sig[_T.MUSCLE] * les.edema_t1_muscle_ratio
            sev = F32(0.5) + F32(0.5) * ev.severity
        else:
            e_val = sig[_T.EDEMA]
            sev = ev.severity
        val = marrow_val + (F32(e_val) - marrow_val) * sev
        _paint(buf, sl, edema, _T.EDEMA, val)
        # Partial-volume / transition halo: 22 % of the edema contrast on both sequences.
        hval = marrow_val + (F32(e_val) - marrow_val) * F32(0.22)
        _paint(buf, sl, halo & np.isfinite(ev.edema_score), _T.MARROW, hval)
    _paint(buf, sl, ev.hemangioma, _T.HEMANGIOMA, sig[_T.HEMANGIOMA])
    _paint(buf, sl, ev.rim, _T.RIM, sig[_T.RIM])
    _paint(buf, sl, ev.cement, _T.CEMENT, sig[_T.CEMENT])
    if truth and buf.lab is not None and buf.les is not None:
        buf.lab[sl][ev.body] = v.label
        les_arr = buf.les[sl]
        les_arr[edema] = _LES_EDEMA
        les_arr[ev.hemangioma] = _LES_HEMANGIOMA
        les_arr[ev.rim] = _LES_RIM
        les_arr[ev.cement] = _LES_CEMENT


def _acquire(
    image: FloatArray,
    grid: _Grid,
    contrast: str,
    acq: _Acquisition,
    rng: np.random.Generator,
    bias_strength: float,
    scene: _Scene,
) -> FloatArray:
    """Bias field, k-space truncation, complex noise, scanner scaling and quantisation."""
    n_k, n_r, n_c = grid.shape
    # Bias: receive coil posterior (brighter near the back), falling off cranio-caudally,
    # plus a random low-order component.
    c = acq.bias[contrast]
    l3_y, l3_z = F32(scene.torso["l3_y"]), F32(scene.torso["l3_z"])

    def bias(x: FloatArray, y: FloatArray, z: FloatArray) -> FloatArray:
        yn = (y - l3_y) / F32(150.0)
        zn = (z - l3_z) / F32(180.0)
        xn = x / F32(150.0)
        field = (
            F32(0.9) * yn
            - F32(0.45) * zn**2
            + F32(0.15)
            * (F32(c[0]) * zn + F32(c[1]) * yn * zn + F32(c[2]) * xn + F32(c[3]) * yn**2)
        )
        return np.exp(F32(bias_strength) * field)

    if bias_strength > 0:
        for k in range(n_k):
            image[k] *= _coarse_plane([bias], grid, float(k), factor=16)[0]
    # k-space: keep the acquired fraction with a Tukey taper (blur + mild Gibbs ringing).
    fr_r, fr_c = acq.kspace_fraction[contrast]
    win = np.outer(_taper(n_r, fr_r), _taper(n_c, fr_c)).astype(F32)
    acquired = win > 0
    w_acq = win[acquired]
    # Complex noise in k-space, filtered by the same window: after the inverse FFT each
    # component has SD sigma (fat on T1 and CSF on STIR have relative signal 1).
    sigma = 1.0 / acq.snr[contrast]
    sigma_k = F32(sigma * n_r * n_c / math.sqrt(float(np.sum(w_acq**2))))
    out = np.empty_like(image)
    for k in range(n_k):
        spec = sfft.fft2(image[k], workers=1) * win
        noise = rng.standard_normal((2, w_acq.size), dtype=np.float32)
        spec[acquired] += sigma_k * w_acq * (noise[0] + 1j * noise[1])
        out[k] = np.abs(sfft.ifft2(spec, workers=1))
    # Scanner scaling, offset and quantisation to the stored integer representation.
    g, off = acq.gain[contrast], acq.offset[contrast]
    slope, icpt = acq.slope[contrast], acq.intercept[contrast]
    values = out * F32(g) + F32(off)
    stored = np.clip(np.rint((values - icpt) / slope), 0, 4095 if acq.vendor != "ge" else 32767)
    return (stored * F32(slope) + F32(icpt)).astype(F32)


def _taper(n: int, fraction: float) -> npt.NDArray[np.float64]:
    """Symmetric k-space window (FFT order): 1 in the centre, cosine taper, 0 outside."""
    k = np.abs(np.fft.fftfreq(n)) * 2  # 0 at centre, 1 at Nyquist
    edge = fraction
    inner = edge * 0.8
    w = np.where(k <= inner, 1.0, 0.5 * (1 + np.cos(np.pi * (k - inner) / (edge - inner))))
    return np.where(k <= edge, w, 0.0)


# ============================================================== calibration of lesions
def _calibrate_lesions(scene: _Scene, grid: _Grid, n_sub: int) -> None:
    """Cement and edema thresholds giving the requested volumes on the STIR grid."""
    boxes = _boxes(scene, grid).body
    voxel_ml = abs(np.linalg.det(grid.affine[:3, :3])) / 1000.0
    k_major = n_sub // 2 + 1
    offsets = _sub_offsets(grid, n_sub)
    for v, box in zip(scene.verts, boxes, strict=True):
        les = v.lesions
        if v.fracture is None or box is None:
            continue
        rs, cs, k0, k1 = box
        evals = []
        for k in range(k0, k1):
            x0, y0, z0 = _plane_coords(grid, float(k), rs, cs)
            xs = np.stack([x0 + F32(o * grid.affine[0, 0]) for o in offsets])
            ys = np.stack([y0 + F32(o * grid.affine[1, 0]) for o in offsets])
            zs = np.stack([z0 + F32(o * grid.affine[2, 0]) for o in offsets])
            evals.append((xs, ys, zs))
        # Cement first: its threshold fixes the rim and the edema-eligible marrow.
        les.cement_threshold = math.inf
        les.edema_threshold = math.inf
        body_vox = 0
        scores_c = []
        for xs, ys, zs in evals:
            ev = _eval_body(v, xs, ys, zs)
            body_vox += int(_majority(ev.body).sum())
            sc = ev.cement_score
            if sc is not None:
                scores_c.append(_kth_largest(sc, k_major).ravel())
        if les.cement_ml > 0 and scores_c:
            n_target = round(les.cement_ml / voxel_ml)
            les.cement_threshold = _threshold_for_count(np.concatenate(scores_c), n_target)
        cement_maps = []
        scores_e = []
        for xs, ys, zs in evals:
            ev = _eval_body(v, xs, ys, zs)
            cement_maps.append(_majority(ev.cement))
            scores_e.append(_kth_largest(ev.edema_score, k_major))
        cement_vox = int(sum(int(m.sum()) for m in cement_maps))
        if les.bme_percent > 0:
            # Edema within the rim width of the cement is rim by METHOD.md 3 (relabelled in
            # `_edema_near_cement_to_rim`): the requested percent applies to edema beyond it.
            scores_3d = np.stack(scores_e)
            if cement_vox > 0:
                near = _near_cement(np.stack(cement_maps), _rim_width_mm(), grid.spacing)
                scores_3d = np.where(near, -np.inf, scores_3d)
            allowed = scores_3d.ravel()
            n_target = round(les.bme_percent / 100.0 * (body_vox - cement_vox))
            n_max = int(np.isfinite(allowed).sum())
            if n_target > n_max:
                achieved = 100.0 * n_max / max(body_vox - cement_vox, 1)
                scene.warnings.append(
                    f"{v.level}: requested BME {les.bme_percent:.1f}% exceeds the marrow share "
                    f"of the body; produced {achieved:.1f}%"
                )
                n_target = n_max
            les.edema_threshold = _threshold_for_count(allowed, n_target)
            finite = allowed[np.isfinite(allowed)]
            spread = float(np.std(finite)) if finite.size else 1.0
            les.edema_halo = 0.12 * spread if les.edema_pattern is not EdemaPattern.BAND else 1.2


def _ball_mm(radius_mm: float, spacing: tuple[float, float, float]) -> BoolArray:
    """Voxel offsets within ``radius_mm`` of the centre (mm per axis), the METHOD.md 3 ball."""
    half = [int(np.floor(radius_mm / sp + 1e-9)) for sp in spacing]
    axes = [np.arange(-h, h + 1) * sp for h, sp in zip(half, spacing, strict=True)]
    grids = np.meshgrid(*axes, indexing="ij")
    return np.asarray(sum(g**2 for g in grids) <= radius_mm**2 + 1e-9)


def _near_cement(
    cement: BoolArray, radius_mm: float, spacing: tuple[float, float, float]
) -> BoolArray:
    """Voxels within ``radius_mm`` of a cement voxel (cement included)."""
    if not cement.any():
        return cement.copy()
    return np.asarray(ndimage.binary_dilation(cement, structure=_ball_mm(radius_mm, spacing)))


def _rim_width_mm() -> float:
    """METHOD.md 3 peri-cement rim width from the settings registry."""
    return float(resolve_settings()["rim_width_mm"])


def _edema_near_cement_to_rim(
    labels: npt.NDArray[np.int16],
    lesions: npt.NDArray[np.uint8],
    spacing: tuple[float, float, float],
) -> None:
    """Relabel, in place, edema voxels within the rim width of their body's cement as rim.

    METHOD.md 3: the peri-cement rim is the STIR-bright shell within ``rim_width_mm`` of the
    cement and is NOT BME; every edema voxel drawn there is STIR-bright (at least 62 % of full
    edema contrast), so by that definition it is rim, not edema.
    """
    cement = lesions == _LES_CEMENT
    if not cement.any():
        return
    width = _rim_width_mm()
    pad = [int(np.floor(width / sp + 1e-9)) + 1 for sp in spacing]
    for label in np.unique(labels[cement]).tolist():
        body = labels == label
        idx = np.nonzero(body)
        box = tuple(
            slice(max(int(i.min()) - p, 0), min(int(i.max()) + 1 + p, n))
            for i, p, n in zip(idx, pad, labels.shape, strict=True)
        )
        near = _near_cement(cement[box] & body[box], width, spacing)
        les = lesions[box]
        les[near & body[box] & (les == _LES_EDEMA)] = _LES_RIM


def _threshold_for_count(scores: FloatArray, n: int) -> float:
    """A threshold t with exactly n scores > t (ties broken towards fewer)."""
    finite = np.sort(scores[np.isfinite(scores)])[::-1]
    if n <= 0 or finite.size == 0:
        return math.inf
    if n >= finite.size:
        return float(finite[-1]) - 1e-3
    return float(0.5 * (finite[n - 1] + finite[n]))


# ============================================================== phantom
@dataclass
class Phantom:
    """A synthetic study: STIR and T1 volumes with ground truth on the STIR grid.

    Attributes
    ----------
    stir, t1 : Volume
        Float32 images in scanner units (already quantised as the DICOM writer stores them),
        each on its own grid.
    labels : Volume
        int16 VerSe labels of the vertebral bodies (posterior elements excluded) on the STIR
        grid; S1 is label 26 (only the S1 segment of the sacrum).
    masks : dict of str to Volume
        ``"edema"``, ``"cement"``, ``"rim"``, ``"hemangioma"``: boolean, STIR grid.
    truth : pandas.DataFrame
        One row per vertebral body with voxels in the field of view (`TRUTH_COLUMNS`).
        ``partially_visible`` is 3D: True when the body's box leaves the field of view in
        plane (top, bottom, front, back) OR sideways (left-right, beyond the outer sagittal
        slices), since a laterally cut body cannot be measured over all its sagittal images.
    lowest_level : str
        Lowest body a reader sees whole on the sagittal images (the anchor a user gives as
        ``lowest_level`` when the sacrum is not in view); empty when there is none.
    sacrum_in_view : bool
        Whether S1 is seen whole on the sagittal images.
    levels : list of str
        Bodies seen whole on the sagittal images, bottom-up.

    Notes
    -----
    `lowest_level`, `sacrum_in_view` and `levels` use IN-PLANE visibility only -- the body's
    section is not cut by the top, bottom, front or back edge of the field of view and the
    body's centre lies within the slab -- because that is what a reader naming the lowest
    visible body sees.  A body cut only laterally (its box leaves the slab left or right, e.g.
    a wide L5/S1 with an off-centre slab) is therefore in `levels` although its truth row says
    ``partially_visible``.
    params : PhantomParameters
    seed : int
    header : dict
        Acquisition details for the DICOM writer (vendor, field strength, sequences, scaling).
    warnings : list of str
    tissue : Volume
        uint8 tissue code (`TISSUES`) at the centre of each STIR voxel's slab, for evaluation.
    """

    stir: Volume
    t1: Volume
    labels: Volume
    masks: dict[str, Volume]
    truth: pd.DataFrame
    lowest_level: str
    sacrum_in_view: bool
    levels: list[str]
    params: PhantomParameters
    seed: int
    header: dict[str, Any]
    warnings: list[str]
    tissue: Volume

    def write_dicom(self, folder: str | Path, **kwargs: Any) -> dict[str, Path]:
        """Write ``stir/`` and ``t1/`` series folders of single-frame MR Image Storage files.

        See `bmetrack.simulate.phantom_dicom.write_phantom_dicom` for the keyword arguments
        (patient_id, patient_name, study_date, study_instance_uid, ...).
        """
        from bmetrack.simulate.phantom_dicom import write_phantom_dicom

        return write_phantom_dicom(self, folder, **kwargs)

    def write_nifti(self, folder: str | Path) -> dict[str, Path]:
        """Write stir, t1, labels and the masks as NIfTI files in ``folder``."""
        from bmetrack.imaging.nifti import write_nifti

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "stir": write_nifti(self.stir, out / "stir.nii.gz"),
            "t1": write_nifti(self.t1, out / "t1.nii.gz"),
            "labels": write_nifti(self.labels, out / "labels.nii.gz"),
        }
        for name, vol in self.masks.items():
            paths[name] = write_nifti(vol, out / f"{name}.nii.gz")
        return paths


def make_phantom(params: PhantomParameters | None = None, *, seed: int) -> Phantom:
    """Generate a synthetic sagittal STIR + T1 spine study with ground truth.

    Parameters
    ----------
    params : PhantomParameters, optional
        Fixed choices; defaults otherwise (15 x 512 x 512 STIR, random fractures).
    seed : int
        Anatomy seed: the same seed and parameters give the same study.  Follow-up visits of
        one patient use the same seed with another ``params.acquisition_seed``.

    Returns
    -------
    Phantom
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        msg = f"seed must be an integer, got {seed!r}"
        raise TypeError(msg)
    params = params if params is not None else PhantomParameters()
    scene = _build_scene(params, int(seed))
    acq_rng = np.random.default_rng([int(seed), 202, int(params.acquisition_seed)])
    noise_rng = np.random.default_rng(
        [int(seed), 303, int(params.acquisition_seed), int(params.noise_seed)]
    )
    stir_grid, t1_grid = _place_grids(scene, params, acq_rng)
    scene.lattice_sd = _grids_lattice(scene, (stir_grid, t1_grid))
    acq = _acquisition(params, acq_rng)
    n_sub = int(params.partial_volume_samples)
    _calibrate_lesions(scene, stir_grid, n_sub)
    stir_img, extra = _render(
        scene, stir_grid, "stir", acq, n_sub, noise_rng, True, params.bias_strength
    )
    t1_img, _ = _render(scene, t1_grid, "t1", acq, n_sub, noise_rng, False, params.bias_strength)
    labels = extra["labels"]
    lesions = extra["lesions"]
    _edema_near_cement_to_rim(labels, lesions, stir_grid.spacing)
    stir_vol = Volume(
        stir_img,
        stir_grid.affine,
        modality="MR",
        metadata={"sequence_class": "stir", "slice_thickness_mm": stir_grid.thickness_mm},
    )
    t1_vol = Volume(
        t1_img,
        t1_grid.affine,
        modality="MR",
        metadata={"sequence_class": "t1", "slice_thickness_mm": t1_grid.thickness_mm},
    )
    label_vol = Volume(labels, stir_grid.affine, modality="SEG")
    masks = {
        "edema": label_vol.with_array(lesions == _LES_EDEMA),
        "cement": label_vol.with_array(lesions == _LES_CEMENT),
        "rim": label_vol.with_array(lesions == _LES_RIM),
        "hemangioma": label_vol.with_array(lesions == _LES_HEMANGIOMA),
    }
    for m in masks.values():
        m.modality = None
    visible, partial, seen = _visibility(scene, stir_grid, labels)
    truth = _truth_table(scene, stir_grid, labels, lesions, visible, partial)
    # What a reader sees on the sagittal images (in-plane visibility), not the 3D `visible`.
    levels_up = [v.level for v in reversed(scene.verts) if v.level in seen]
    sacrum = "S1" in seen
    header = {
        "vendor": acq.vendor,
        "field_strength_t": acq.field_t,
        "sequence": acq.sequence,
        "slope": acq.slope,
        "intercept": acq.intercept,
        "thickness_mm": {"stir": stir_grid.thickness_mm, "t1": t1_grid.thickness_mm},
        "kspace_fraction": acq.kspace_fraction,
        "snr": acq.snr,
    }
    return Phantom(
        stir=stir_vol,
        t1=t1_vol,
        labels=label_vol,
        masks=masks,
        truth=truth,
        lowest_level=levels_up[0] if levels_up else "",
        sacrum_in_view=sacrum,
        levels=levels_up,
        params=params,
        seed=int(seed),
        header=header,
        warnings=list(scene.warnings),
        tissue=label_vol.with_array(extra["tissue"]),
    )


def _visibility(
    scene: _Scene, grid: _Grid, labels: npt.NDArray[np.int16]
) -> tuple[set[str], set[str], set[str]]:
    """Visibility of the levels with voxels in the grid.

    Returns
    -------
    visible, partial : set of str
        Bodies whose 3D box lies inside the field of view, and the others (cut in plane or
        sideways by the slab).
    seen : set of str
        Bodies seen whole on the sagittal images: box inside the field of view in plane and
        centre inside the slab (a lateral cut does not count).
    """
    n_k, n_r, n_c = grid.shape
    present = set(np.unique(labels).tolist())
    visible: set[str] = set()
    partial: set[str] = set()
    seen: set[str] = set()
    for v in scene.verts:
        if v.label not in present or (v.kind == "sacral" and v.level != "S1"):
            continue
        h = v.height / 2 + 0.5
        corners = np.array(
            [[a, b, c] for a in (-h, h) for b in (-v.depth / 2, v.depth / 2)
             for c in (-v.width / 2, v.width / 2)]
        )  # fmt: skip
        idx = grid.corners_index(v.center + corners @ v.basis.T)
        in_plane = np.all(
            (idx[:, 1] >= 0) & (idx[:, 1] <= n_r - 1) & (idx[:, 2] >= 0) & (idx[:, 2] <= n_c - 1)
        )
        lateral = np.all((idx[:, 0] >= -1.0) & (idx[:, 0] <= n_k))
        if in_plane and lateral:
            visible.add(v.level)
        else:
            partial.add(v.level)
        centre_k = float(grid.corners_index(v.center[None, :])[0, 0])
        if in_plane and -0.5 <= centre_k <= n_k - 0.5:
            seen.add(v.level)
    return visible, partial, seen


def _truth_table(
    scene: _Scene,
    grid: _Grid,
    labels: npt.NDArray[np.int16],
    lesions: npt.NDArray[np.uint8],
    visible: set[str],
    partial: set[str],
) -> pd.DataFrame:
    settings = resolve_settings()
    voxel_ml = abs(np.linalg.det(grid.affine[:3, :3])) / 1000.0
    rows = []
    # Voxel counts for all labels at once.
    lab = labels.ravel()
    les = lesions.ravel()
    n_lab = int(lab.max()) + 1 if lab.size else 1
    counts = {
        name: np.bincount(lab[les == code], minlength=n_lab)
        for name, code in (("edema", 1), ("cement", 2), ("rim", 3), ("hem", 4))
    }
    body = np.bincount(lab, minlength=n_lab)
    for i, v in enumerate(scene.verts):
        if v.level not in visible and v.level not in partial:
            continue
        body_ml = body[v.label] * voxel_ml
        edema_ml = counts["edema"][v.label] * voxel_ml
        cement_ml = counts["cement"][v.label] * voxel_ml
        rim_ml = counts["rim"][v.label] * voxel_ml
        hem_ml = counts["hem"][v.label] * voxel_ml
        denom = body_ml - cement_ml
        bme = 100.0 * edema_ml / denom if denom > 0 else 0.0
        heights = v.heights_mm()
        neighbours = _normal_neighbours(scene.verts, i, visible)
        expected = expected_height_mm([n.heights_mm() for n in neighbours], heights)
        loss = max(0.0, 100.0 * (1.0 - min(heights) / expected)) if v.kind != "sacral" else 0.0
        grade = genant_grade_from_loss(loss, settings) if v.kind != "sacral" else 0
        ftype = str(v.fracture.fracture_type) if v.fracture is not None else "none"
        deformity = ftype if grade >= 1 and v.fracture is not None else "none"
        if grade >= 1 and v.fracture is None:
            deformity = "wedge" if heights[0] == min(heights) else "biconcave"
        rows.append(
            {
                "level": v.level,
                "label": v.label,
                "body_volume_ml": body_ml,
                "edema_volume_ml": edema_ml,
                "cement_volume_ml": cement_ml,
                "rim_volume_ml": rim_ml,
                "bme_percent": bme,
                "bme_present": bool(bme >= settings["bme_present_threshold_percent"]),
                "height_anterior_mm": heights[0],
                "height_middle_mm": heights[1],
                "height_posterior_mm": heights[2],
                "height_loss_percent": loss,
                "genant_grade": grade,
                "deformity": deformity,
                "fracture_type": ftype,
                "edema_pattern": v.lesions.edema_pattern.value
                if v.lesions.bme_percent > 0
                else "none",
                "has_hemangioma": bool(hem_ml > 0),
                "partially_visible": v.level in partial,
                "hemangioma_volume_ml": hem_ml,
                "expected_height_mm": expected,
                "requested_bme_percent": v.lesions.bme_percent if v.fracture is not None else 0.0,
            }
        )
    return pd.DataFrame(rows, columns=list(TRUTH_COLUMNS))


# ============================================================== visits for the demo
def phantom_for_visit(
    vcf_specs: Iterable[Mapping[str, Any]],
    month: int,
    seed: int,
    *,
    params: PhantomParameters | None = None,
) -> Phantom:
    """Images of one patient at one visit, for the demo cohort.

    The anatomy (and each fracture's shape, edema pattern and cement cast) depends only on
    ``seed``, so the visits of a patient show the same spine; positioning, scanner and noise
    change with ``month``.  Edema regions shrink consistently as the BME percent falls.

    Parameters
    ----------
    vcf_specs : iterable of dict
        Treated levels at this visit: ``level`` and ``bme_percent`` (required),
        ``cement_volume_ml`` (0 before the procedure), optional ``fracture_type``, ``grade``,
        ``edema_pattern``, ``rim`` (default: derived from the seed and level, so constant
        over visits).
    month : int
        Visit month (0, 3, 6, 12...).
    seed : int
        Patient seed.
    params : PhantomParameters, optional
        Base parameters; ``fractures`` and ``acquisition_seed`` are replaced.  By default the
        sacrum is in view so that levels can be counted.

    Returns
    -------
    Phantom
        ``truth.bme_percent`` of each treated level equals the request within ~1 point
        (unless capped; see `Phantom.warnings`).
    """
    base = params if params is not None else PhantomParameters(sacrum_in_view=True)
    specs = []
    for raw in vcf_specs:
        d = dict(raw)
        if "level" not in d or "bme_percent" not in d:
            msg = f"each vcf spec needs 'level' and 'bme_percent', got keys {sorted(d)}"
            raise ValueError(msg)
        level = normalise_level(str(d["level"]))
        rng = np.random.default_rng([int(seed), 404, label_from_level(level)])
        defaults = {
            "fracture_type": str(rng.choice(["wedge", "biconcave", "crush"], p=[0.6, 0.25, 0.15])),
            "grade": int(rng.choice([1, 2, 3], p=[0.35, 0.45, 0.2])),
            "edema_pattern": str(rng.choice(["band", "diffuse", "patchy"], p=[0.5, 0.35, 0.15])),
            "rim": bool(rng.random() < 0.35 and month <= 6),
            "cement_volume_ml": 0.0,
        }
        merged = {**defaults, **d, "level": level}
        specs.append(FractureSpec.from_mapping(merged))
    new = replace(base, fractures=tuple(specs), acquisition_seed=int(month) + 1)
    return make_phantom(new, seed=seed)


def _timed(params: PhantomParameters, seed: int) -> float:  # pragma: no cover - dev helper
    start = time.perf_counter()
    with _warnings.catch_warnings():
        make_phantom(params, seed=seed)
    return time.perf_counter() - start
