"""One study from images to measurements: read, align, segment, quantify.

The function behind ``bmetrack quantify`` and the batch pipeline; it returns
plain results and knows nothing of the database.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bmetrack import __version__
from bmetrack.anatomy import label_from_level
from bmetrack.imaging.dicom import read_series
from bmetrack.imaging.edema import Quantification, quantify_vertebrae
from bmetrack.imaging.errors import ImagingError
from bmetrack.imaging.labelmaps import external_segmentation
from bmetrack.imaging.nifti import read_nifti
from bmetrack.imaging.segment import UNNAMED_LABEL_OFFSET, Segmentation, segment_vertebral_bodies
from bmetrack.imaging.volume import Volume
from bmetrack.jsonsafe import json_safe
from bmetrack.settings import Settings, resolve_settings

__all__ = [
    "StudyQuantification",
    "level_names_of",
    "load_image",
    "quantify_study",
    "write_vertebra_overlays",
]

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def load_image(path: str | Path, *, strict: bool = False) -> Volume:
    """Read a DICOM series folder or a NIfTI file into a Volume."""
    path = Path(path)
    if not path.exists():
        msg = (
            f"{path} does not exist; give a folder holding one DICOM series or a .nii/.nii.gz file."
        )
        raise FileNotFoundError(msg)
    if path.is_file() and path.name.lower().endswith(_NIFTI_SUFFIXES):
        volume = read_nifti(path)
    elif path.is_dir():
        volume = read_series(path, strict=strict)
    else:
        msg = f"{path} is neither a folder of DICOM files nor a NIfTI file (.nii or .nii.gz)."
        raise ImagingError(msg)
    volume.metadata.setdefault("source_path", str(path))
    return volume


def level_names_of(segmentation: Segmentation) -> dict[int, str]:
    """Label value -> level name, including unnamed ``V1..Vn`` bodies."""
    names = {}
    for level in segmentation.levels:
        if level.startswith("V") and level[1:].isdigit():
            names[UNNAMED_LABEL_OFFSET + int(level[1:])] = level
        else:
            names[label_from_level(level)] = level
    return names


@dataclass
class StudyQuantification:
    """Everything measured in one STIR + T1 study, on the STIR grid."""

    stir: Volume
    t1_on_stir: Volume
    segmentation: Segmentation
    quantification: Quantification
    warnings: list[str] = field(default_factory=list)

    @property
    def level_names(self) -> dict[int, str]:
        return level_names_of(self.segmentation)

    def provenance(self) -> dict[str, Any]:
        """Algorithm versions, parameters and input series of this measurement."""
        return {
            "bmetrack_version": __version__,
            "segmentation": {
                "method_version": self.segmentation.method_version,
                "parameters": json_safe(self.segmentation.parameters),
            },
            "quantification": json_safe(self.quantification.provenance),
            "input_series_uids": [
                uid
                for uid in (self.stir.series_instance_uid, self.t1_on_stir.series_instance_uid)
                if uid
            ],
        }

    def to_contract_dict(self) -> dict[str, Any]:
        """The ``bmetrack quantify`` JSON (CLI-CONTRACT.md), plus provenance."""
        result = self.quantification.to_contract_dict()
        result["warnings"] = list(dict.fromkeys([*self.warnings, *result["warnings"]]))
        result["provenance"] = self.provenance()
        return result


def quantify_study(
    stir: Volume,
    t1: Volume,
    settings: Settings | None = None,
    *,
    lowest_level: str | None = None,
    reference_levels: Sequence[str] | None = None,
    labels: Volume | None = None,
    label_subregions: Volume | None = None,
) -> StudyQuantification:
    """Segment and measure every vertebral body of one study.

    T1 is resampled onto the STIR grid using both series' geometry (they need
    not share it); bodies are segmented on both sequences, or taken from ``labels``
    (an external label map, see :mod:`bmetrack.imaging.labelmaps`), and edema,
    cement, rim and deformity are measured per METHOD.md 3-4.
    """
    settings = settings or resolve_settings()
    warnings: list[str] = [*stir.warnings, *t1.warnings]
    if stir.has_same_geometry(t1):
        t1_on_stir = t1
    else:
        t1_on_stir = t1.resample_to(stir, order=1, fill_value=np.nan)
        t1_on_stir.series_instance_uid = t1.series_instance_uid
        covered = np.isfinite(t1_on_stir.array).mean()
        if covered < 0.5:
            msg = (
                f"The T1 series covers only {covered:.0%} of the STIR field of view; check that "
                "both series are from the same study and patient."
            )
            raise ImagingError(msg)
    if labels is not None:
        segmentation = external_segmentation(
            labels,
            stir,
            subregions=label_subregions,
            source=str(labels.metadata.get("source_path", "")),
        )
    else:
        # STIR finds the canal (bright CSF), T1 the discs; labels land on the STIR grid.
        segmentation = segment_vertebral_bodies(
            stir,
            "stir",
            other=t1_on_stir.with_array(np.nan_to_num(t1_on_stir.array, nan=0.0)),
            other_contrast="t1",
            lowest_level=lowest_level,
            settings=settings,
        )
    warnings += segmentation.warnings
    warnings += [
        f"{level} is only partly inside the field of view and was left out."
        for level in segmentation.partial
    ]
    quantification = quantify_vertebrae(
        stir,
        t1_on_stir,
        segmentation.labels,
        settings,
        reference_levels=reference_levels,
        level_names=level_names_of(segmentation),
    )
    return StudyQuantification(
        stir=stir,
        t1_on_stir=t1_on_stir,
        segmentation=segmentation,
        quantification=quantification,
        warnings=warnings,
    )


def write_vertebra_overlays(
    study: StudyQuantification, folder: str | Path, *, caption: str = ""
) -> dict[str, Path]:
    """One STIR | T1 PNG per vertebra with edema, cement and rim overlays.

    Returns level -> path. ``caption`` (e.g. "month 3") starts each title.
    """
    from bmetrack.imaging.render import render_vertebra_panel, write_png

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t1 = study.t1_on_stir.with_array(np.nan_to_num(study.t1_on_stir.array, nan=0.0))
    masks = study.quantification.masks
    paths = {}
    for vertebra in study.quantification.vertebrae:
        title = " · ".join(
            part
            for part in (
                vertebra.level,
                caption,
                f"BME {vertebra.bme_percent:.0f}%",
                f"cement {vertebra.cement_volume_ml:.1f} ml" if vertebra.cement_volume_ml else "",
                f"Genant {vertebra.genant_grade}" if vertebra.genant_grade else "",
            )
            if part
        )
        png = render_vertebra_panel(
            study.stir,
            t1,
            study.segmentation.labels,
            vertebra.label,
            overlays=masks,
            title=title,
            level_names=study.level_names,
        )
        paths[vertebra.level] = write_png(png, folder / f"{vertebra.level}.png")
    return paths
