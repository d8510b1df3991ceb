"""DICOM Segmentation and TID 1500 Structured Report of one measured imaging session.

``bmetrack export-dicom`` writes, per STIR + T1 study, two objects built with highdicom that
PACS viewers and other tools read without bmetrack:

- a binary DICOM Segmentation on the STIR grid: one segment per vertebral body (level in the
  segment label, the vertebra as anatomic region), then edema, cement and the peri-cement rim;
- a Comprehensive 3D SR holding a TID 1500 Measurement Report with one TID 1411 volumetric ROI
  group per vertebral body (referencing its segment): body, edema, cement and rim volumes, BME
  percent, anterior/middle/posterior heights, height loss, Genant grade and deformity type as
  qualitative evaluations, and the algorithm version and settings. A value a radiologist
  overrode is reported as overridden, with TEXT items naming who overrode it, why, and the
  automatic value it replaced.

Both reference the source STIR series (and the T1 series when given). Standard SNOMED CT /
DICOM codes are used where pydicom's code dictionaries hold one; concepts without a standard
code use the private coding scheme ``99BMETRACK``, declared in each object's Coding Scheme
Identification Sequence.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from bmetrack import __version__
from bmetrack.anatomy import label_from_level
from bmetrack.imaging.errors import ImagingError

__all__ = [
    "MASK_NAMES",
    "PRIVATE_SCHEME",
    "build_dicom_exports",
    "export_measurement_report",
    "export_segmentation",
    "read_measurement_report",
    "save_dicom_exports",
    "vertebra_code",
    "write_dicom_exports",
]

#: Designator of bmetrack's private codes (PS3.16 8.2: "99" prefix for private schemes).
PRIVATE_SCHEME = "99BMETRACK"
#: Masks exported as segments after the vertebral bodies, in this order.
MASK_NAMES: tuple[str, ...] = ("edema", "cement", "rim")

_Concept = hd.sr.CodedConcept


def _private(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value, PRIVATE_SCHEME, meaning)


# ------------------------------------------------------------------------------------ codes
VERTEBRAL_BODY = _private("VERTEBRAL-BODY", "Vertebral body")
BONE_CEMENT = _private("BONE-CEMENT", "Bone cement (PMMA)")
CEMENT_RIM = _private("CEMENT-RIM", "Peri-cement rim")
L6_VERTEBRA = _private("L6-VERTEBRA", "L6 vertebra (transitional)")

EDEMA_VOLUME = _private("EDEMA-VOLUME", "Bone marrow edema volume")
CEMENT_VOLUME = _private("CEMENT-VOLUME", "Bone cement volume")
RIM_VOLUME = _private("RIM-VOLUME", "Peri-cement rim volume")
BME_PERCENT = _private("BME-PERCENT", "Bone marrow edema percent of body")
HEIGHT_ANTERIOR = _private("HEIGHT-ANT", "Anterior vertebral body height")
HEIGHT_MIDDLE = _private("HEIGHT-MID", "Middle vertebral body height")
HEIGHT_POSTERIOR = _private("HEIGHT-POST", "Posterior vertebral body height")
HEIGHT_LOSS = _private("HEIGHT-LOSS", "Vertebral body height loss")
GENANT_GRADE = _private("GENANT-GRADE", "Genant semiquantitative grade")
DEFORMITY_TYPE = _private("DEFORMITY-TYPE", "Vertebral deformity type")
OVERRIDDEN_BY = _private("OVERRIDDEN-BY", "Value overridden by")
OVERRIDE_REASON = _private("OVERRIDE-REASON", "Reason for override")
OVERRIDE_DATETIME = _private("OVERRIDE-TIME", "Date and time of override")
AUTOMATIC_VALUE = _private("AUTOMATIC-VALUE", "Automatic value before override")

GENANT_VALUES: dict[int, hd.sr.CodedConcept] = {
    0: _private("GENANT-0", "Genant grade 0 (normal)"),
    1: _private("GENANT-1", "Genant grade 1 (mild)"),
    2: _private("GENANT-2", "Genant grade 2 (moderate)"),
    3: _private("GENANT-3", "Genant grade 3 (severe)"),
}
DEFORMITY_VALUES: dict[str, hd.sr.CodedConcept] = {
    "none": _private("DEFORMITY-NONE", "No vertebral deformity"),
    "wedge": _Concept.from_code(codes.SCT.WedgeShaped),
    "biconcave": _private("BICONCAVE", "Biconcave deformity"),
    "crush": _private("CRUSH", "Crush deformity"),
}

_ML = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
_MM = _Concept.from_code(codes.UCUM.Millimeter)
_PERCENT = _Concept.from_code(codes.UCUM.Percent)

#: (contract key, concept, unit) of the numeric measurements of each vertebral body; a key
#: "heights_mm.anterior" reads the nested heights dict.
MEASUREMENTS: tuple[tuple[str, hd.sr.CodedConcept, hd.sr.CodedConcept], ...] = (
    ("body_volume_ml", _Concept.from_code(codes.SCT.Volume), _ML),
    ("edema_volume_ml", EDEMA_VOLUME, _ML),
    ("cement_volume_ml", CEMENT_VOLUME, _ML),
    ("rim_volume_ml", RIM_VOLUME, _ML),
    ("bme_percent", BME_PERCENT, _PERCENT),
    ("heights_mm.anterior", HEIGHT_ANTERIOR, _MM),
    ("heights_mm.middle", HEIGHT_MIDDLE, _MM),
    ("heights_mm.posterior", HEIGHT_POSTERIOR, _MM),
    ("height_loss_percent", HEIGHT_LOSS, _PERCENT),
)

_MASK_SEGMENTS: dict[str, tuple[str, Any, Any, Any]] = {
    # name -> (segment label, property category, property type, algorithm family)
    "edema": (
        "Bone marrow edema",
        codes.SCT.MorphologicallyAbnormalStructure,
        codes.SCT.Edema,
        codes.cid7162.HistogramAnalysis,
    ),
    "cement": (
        "Bone cement",
        codes.SCT.PhysicalObject,
        BONE_CEMENT,
        codes.cid7162.HistogramAnalysis,
    ),
    "rim": (
        "Peri-cement rim",
        codes.SCT.MorphologicallyAbnormalStructure,
        CEMENT_RIM,
        codes.cid7162.MorphologicalOperations,
    ),
}

_BODY_SUFFIX = " vertebral body"


def vertebra_code(level: str) -> hd.sr.CodedConcept:
    """SNOMED CT code of the vertebra at ``level`` ("T12", "L1", "S1" (sacrum), ...).

    L6 gets a private code (SNOMED CT has none); unnamed bodies ("V1".."Vn") get "Vertebra".
    """
    level = level.strip().upper()
    if level == "S1":
        return _Concept.from_code(codes.SCT.Sacrum)
    if level == "L6":
        return L6_VERTEBRA
    if level[:1] in "CTL" and level[1:].isdigit():
        try:
            return _Concept.from_code(getattr(codes.SCT, f"{level}Vertebra"))
        except AttributeError:
            pass
    return _Concept.from_code(codes.SCT.Vertebra)


def _coding_scheme_item() -> Dataset:
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "bmetrack private codes"
    item.CodingSchemeResponsibleOrganization = "bmetrack project"
    item.CodingSchemeVersion = "1"
    return item


def _declare_private_scheme(dataset: Dataset) -> None:
    existing = list(getattr(dataset, "CodingSchemeIdentificationSequence", []))
    if not any(getattr(i, "CodingSchemeDesignator", "") == PRIVATE_SCHEME for i in existing):
        dataset.CodingSchemeIdentificationSequence = [*existing, _coding_scheme_item()]


def _algorithm(name: str, version: str, family: Any) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(name=name, family=family, version=version or "0")


# ------------------------------------------------------------------------------ segmentation
def _check_grid(source_datasets: Sequence[Dataset], shape: tuple[int, ...], what: str) -> None:
    if len(shape) != 3:
        msg = f"{what} must be 3-D (slice, row, column), got shape {shape}."
        raise ValueError(msg)
    if len(source_datasets) != shape[0]:
        msg = (
            f"{what} has {shape[0]} slices but source_datasets holds {len(source_datasets)} "
            "images; pass the STIR series' datasets in the Volume's slice order "
            "(Volume.metadata['source_files'])."
        )
        raise ValueError(msg)
    for ds in source_datasets:
        if (int(ds.Rows), int(ds.Columns)) != tuple(shape[1:]):
            msg = (
                f"{what} slices are {shape[1]}x{shape[2]} but source image "
                f"{ds.SOPInstanceUID} is {ds.Rows}x{ds.Columns}; the label map must be on the "
                "STIR grid."
            )
            raise ValueError(msg)


def export_segmentation(
    source_datasets: Sequence[Dataset],
    labels: npt.NDArray[np.integer[Any]],
    masks: Mapping[str, npt.NDArray[Any]],
    level_names: Mapping[int, str],
    *,
    series_number: int = 901,
    manufacturer: str = "bmetrack",
    software_version: str = __version__,
    further_source_datasets: Sequence[Dataset] = (),
    provenance: Mapping[str, Any] | None = None,
    device_serial_number: str = "0",
) -> hd.seg.Segmentation:
    """Binary DICOM Segmentation of vertebral bodies, edema, cement and rim on the STIR grid.

    Parameters
    ----------
    source_datasets : sequence of pydicom.Dataset
        The STIR series, one dataset per slice, in the slice order of ``labels`` (the order of
        ``Volume.metadata["source_files"]`` from `bmetrack.imaging.dicom.read_series`).
    labels : ndarray of int, shape (slice, row, column)
        VerSe labels of the vertebral bodies on that grid (0 = background).
    masks : mapping of str -> bool ndarray
        Any of "edema", "cement", "rim", each the shape of ``labels``.
    level_names : mapping of int -> str
        Label value -> level name ("L1", "V2", ...); labels present in ``labels`` but missing
        here are named by `bmetrack.anatomy.level_from_label`.
    series_number : int
        SeriesNumber of the new SEG series.
    manufacturer, software_version : str
        Equipment attributes of the SEG.
    further_source_datasets : sequence of pydicom.Dataset
        Other images of the same study to record as sources (e.g. the T1 series).
    provenance : mapping, optional
        `StudyQuantification.provenance()`; names the body segmentation and edema algorithms.
    device_serial_number : str
        DeviceSerialNumber (required by the IOD; no physical device here).

    Returns
    -------
    highdicom.seg.Segmentation
        Segments 1..n are the vertebral bodies in ascending label order (cranial first),
        followed by the masks in `MASK_NAMES` order that were given.
    """
    labels = np.asarray(labels)
    _check_grid(source_datasets, labels.shape, "labels")
    unknown = sorted(set(masks) - set(MASK_NAMES))
    if unknown:
        msg = f"masks has unknown keys {unknown}; allowed: {list(MASK_NAMES)}."
        raise ValueError(msg)
    for name, mask in masks.items():
        if np.shape(mask) != labels.shape:
            msg = (
                f"masks[{name!r}] has shape {np.shape(mask)} but labels has {labels.shape}; "
                "both must be on the STIR grid."
            )
            raise ValueError(msg)
    body_labels = [int(v) for v in np.unique(labels) if v != 0]
    if not body_labels and not masks:
        msg = "labels holds no vertebral body and masks is empty: nothing to export."
        raise ValueError(msg)

    provenance = provenance or {}
    segmentation_info = provenance.get("segmentation", {}) or {}
    quantification_info = provenance.get("quantification", {}) or {}
    body_algorithm = _algorithm(
        "bmetrack vertebral body segmentation",
        str(segmentation_info.get("method_version", software_version)),
        codes.cid7162.MorphologicalOperations,
    )
    quant_version = str(quantification_info.get("version", software_version))

    descriptions: list[hd.seg.SegmentDescription] = []
    planes: list[npt.NDArray[np.bool_]] = []
    for number, label in enumerate(body_labels, start=1):
        level = _level_name(label, level_names)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=f"{level}{_BODY_SUFFIX}",
                segmented_property_category=codes.SCT.AnatomicalStructure,
                segmented_property_type=VERTEBRAL_BODY,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=body_algorithm,
                tracking_id=f"{level}{_BODY_SUFFIX}",
                tracking_uid=hd.UID(),
                anatomic_regions=[vertebra_code(level)],
            )
        )
        planes.append(labels == label)
    for name in MASK_NAMES:
        if name not in masks:
            continue
        segment_label, category, property_type, family = _MASK_SEGMENTS[name]
        number = len(descriptions) + 1
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=segment_label,
                segmented_property_category=category,
                segmented_property_type=property_type,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=_algorithm("bmetrack edema", quant_version, family),
                tracking_id=segment_label,
                tracking_uid=hd.UID(),
                anatomic_regions=[codes.SCT.Spine],
            )
        )
        planes.append(np.asarray(masks[name], dtype=bool))

    pixel_array = np.stack(planes, axis=-1)  # (frames, rows, columns, segments)
    seg = hd.seg.Segmentation(
        source_images=list(source_datasets),
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name="bmetrack",
        software_versions=software_version,
        device_serial_number=device_serial_number,
        content_label="BMETRACK",
        content_description="Vertebral bodies, bone marrow edema, cement and rim",
        series_description="bmetrack segmentation",
        further_source_images=list(further_source_datasets) or None,
    )
    _declare_private_scheme(seg)
    return seg


def _level_name(label: int, level_names: Mapping[int, str]) -> str:
    if label in level_names:
        return str(level_names[label])
    from bmetrack.anatomy import level_from_label

    try:
        return str(level_from_label(label))
    except (KeyError, ValueError):
        return f"label {label}"


# ------------------------------------------------------------------------- measurement report
def _value(vertebra: Mapping[str, Any], key: str) -> float | None:
    value: Any = vertebra
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    if value is None:
        return None
    number = float(value)
    return number if np.isfinite(number) else None


def _parameters(provenance: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Flatten provenance into "key=value" strings (TID 4019 Algorithm Parameters)."""
    out: list[str] = []
    for key, value in provenance.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out += _parameters(value, f"{name}.")
        elif isinstance(value, list | tuple):
            out.append(f"{name}={','.join(str(v) for v in value)}")
        else:
            out.append(f"{name}={value}")
    return out


def _segment_numbers_by_level(segmentation: Dataset) -> dict[str, int]:
    numbers = {}
    for item in segmentation.SegmentSequence:
        label = str(item.SegmentLabel)
        if label.endswith(_BODY_SUFFIX):
            numbers[label[: -len(_BODY_SUFFIX)]] = int(item.SegmentNumber)
    return numbers


def _referenced_segment(segmentation: Dataset, number: int) -> hd.sr.ReferencedSegment:
    try:
        # Names the source images of the segment's own frames.
        return hd.sr.ReferencedSegment.from_segmentation(segmentation, number)
    except (AttributeError, ValueError):
        # highdicom 0.28 cannot read a SEG whose segment identification is shared by all
        # frames (a single segment); reference the source series instead.
        series_uid = segmentation.ReferencedSeriesSequence[0].SeriesInstanceUID
        return hd.sr.ReferencedSegment(
            sop_class_uid=segmentation.SOPClassUID,
            sop_instance_uid=segmentation.SOPInstanceUID,
            segment_number=number,
            source_series=hd.sr.SourceSeriesForSegmentation(series_uid),
        )


def export_measurement_report(
    source_datasets: Sequence[Dataset],
    segmentation: hd.seg.Segmentation | Dataset,
    vertebrae: Sequence[Mapping[str, Any]],
    provenance: Mapping[str, Any],
    *,
    series_number: int = 902,
    t1_datasets: Sequence[Dataset] = (),
    manufacturer: str = "bmetrack",
) -> hd.sr.Comprehensive3DSR:
    """TID 1500 Measurement Report with one volumetric ROI group per vertebral body.

    Parameters
    ----------
    source_datasets : sequence of pydicom.Dataset
        The STIR series (listed in the image library and as evidence).
    segmentation : highdicom.seg.Segmentation
        From `export_segmentation`; each group references its vertebral body segment.
    vertebrae : sequence of dict
        ``bmetrack quantify`` contract dicts (CLI-CONTRACT.md): level, label, body_volume_ml,
        edema_volume_ml, cement_volume_ml, rim_volume_ml, bme_percent, bme_present,
        heights_mm {anterior, middle, posterior}, height_loss_percent, genant_grade,
        deformity. Missing or non-finite numbers are left out of the report. Optional keys:
        ``segment_level``, the level of the body's segment when a radiologist relabelled it
        (default ``level``); ``override``, a dict with ``by`` (who), ``reason``, ``at``
        (datetime, optional) and ``automatic`` (field -> the automatic value it replaced),
        written as TEXT / DATETIME items of the group (see `read_measurement_report`).
    provenance : dict
        `StudyQuantification.provenance()`: written as the algorithm version and parameters.
    series_number : int
        SeriesNumber of the new SR series.
    t1_datasets : sequence of pydicom.Dataset
        The T1 series of the same study, also referenced (image library and evidence).
    manufacturer : str
        Manufacturer of the SR.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
    """
    study_uid = str(source_datasets[0].StudyInstanceUID) if source_datasets else ""
    for ds in t1_datasets:
        if str(ds.StudyInstanceUID) != study_uid:
            msg = (
                f"t1_datasets holds an image of study {ds.StudyInstanceUID}, not the STIR's "
                f"study {study_uid}; pass the T1 series of the same study or none."
            )
            raise ValueError(msg)
    segment_numbers = _segment_numbers_by_level(segmentation)
    version = str(provenance.get("bmetrack_version", __version__))
    algorithm = hd.sr.AlgorithmIdentification(
        name="bmetrack", version=version, parameters=_parameters(provenance) or None
    )

    groups = []
    for vertebra in vertebrae:
        level = str(vertebra["level"])
        segment_level = str(vertebra.get("segment_level") or level)
        if segment_level not in segment_numbers:
            msg = (
                f"vertebrae names level {segment_level!r} but the segmentation has no "
                f"'{segment_level}{_BODY_SUFFIX}' segment (it has {sorted(segment_numbers)}); "
                "build both from the same quantification."
            )
            raise ValueError(msg)
        measurements = [
            hd.sr.Measurement(name=concept, value=value, unit=unit)
            for key, concept, unit in MEASUREMENTS
            if (value := _value(vertebra, key)) is not None
        ]
        evaluations = []
        if vertebra.get("bme_present") is not None:
            present = codes.SCT.Present if vertebra["bme_present"] else codes.SCT.Absent
            evaluations.append(hd.sr.QualitativeEvaluation(name=codes.SCT.Edema, value=present))
        if vertebra.get("genant_grade") is not None:
            grade = int(vertebra["genant_grade"])
            if grade not in GENANT_VALUES:
                msg = f"vertebrae[{level}]['genant_grade'] must be 0..3, got {grade!r}."
                raise ValueError(msg)
            evaluations.append(
                hd.sr.QualitativeEvaluation(name=GENANT_GRADE, value=GENANT_VALUES[grade])
            )
        if vertebra.get("deformity") is not None:
            deformity = str(vertebra["deformity"]).lower()
            if deformity not in DEFORMITY_VALUES:
                msg = (
                    f"vertebrae[{level}]['deformity'] must be one of "
                    f"{sorted(DEFORMITY_VALUES)}, got {vertebra['deformity']!r}."
                )
                raise ValueError(msg)
            evaluations.append(
                hd.sr.QualitativeEvaluation(name=DEFORMITY_TYPE, value=DEFORMITY_VALUES[deformity])
            )
        group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=hd.UID(), identifier=f"{level}{_BODY_SUFFIX}"
            ),
            referenced_segment=_referenced_segment(segmentation, segment_numbers[segment_level]),
            finding_type=VERTEBRAL_BODY,
            finding_sites=[hd.sr.FindingSite(vertebra_code(level))],
            algorithm_id=algorithm,
            measurements=measurements,
            qualitative_evaluations=evaluations or None,
        )
        if vertebra.get("override"):
            # highdicom builds CODE evaluations only; TID 1501 groups may also CONTAIN TEXT.
            group[0].ContentSequence.extend(_override_items(vertebra["override"], level))
        groups.append(group)

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name="bmetrack", manufacturer_name=manufacturer, model_name="bmetrack"
        ),
    )
    images = [*source_datasets, *t1_datasets]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.MRISpineReport,
        imaging_measurements=groups,
        referenced_images=images,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*images, segmentation],
        content=report,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        is_complete=True,
        series_description="bmetrack measurements",
    )
    _declare_private_scheme(sr)
    return sr


def _format_value(value: Any) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def _parse_value(text: str) -> Any:
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return None if text == "None" else text


def _override_items(override: Mapping[str, Any], level: str) -> list[Any]:
    """TEXT (who, why, each replaced automatic value) and DATETIME (when) items."""
    by, reason = str(override.get("by") or ""), str(override.get("reason") or "")
    if not by or not reason:
        msg = (
            f"vertebrae[{level}]['override'] must name who overrode ('by') and why "
            f"('reason'); got by={by!r}, reason={reason!r}."
        )
        raise ValueError(msg)
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    items: list[Any] = [
        hd.sr.TextContentItem(OVERRIDDEN_BY, by, contains),
        hd.sr.TextContentItem(OVERRIDE_REASON, reason, contains),
    ]
    if override.get("at") is not None:
        items.append(hd.sr.DateTimeContentItem(OVERRIDE_DATETIME, override["at"], contains))
    for key, value in (override.get("automatic") or {}).items():
        text = f"{key}={_format_value(value)}"
        items.append(hd.sr.TextContentItem(AUTOMATIC_VALUE, text, contains))
    return items


def _read_override(group: Any) -> dict[str, Any] | None:
    override: dict[str, Any] = {}
    for item in getattr(group[0], "ContentSequence", []):
        name = item.ConceptNameCodeSequence[0]
        if name.get("CodingSchemeDesignator") != PRIVATE_SCHEME:
            continue
        code = name.get("CodeValue") or name.get("LongCodeValue")
        if code == OVERRIDDEN_BY.value:
            override["by"] = str(item.TextValue)
        elif code == OVERRIDE_REASON.value:
            override["reason"] = str(item.TextValue)
        elif code == OVERRIDE_DATETIME.value:
            override["at"] = str(item.DateTime)
        elif code == AUTOMATIC_VALUE.value:
            key, _, value = str(item.TextValue).partition("=")
            override.setdefault("automatic", {})[key] = _parse_value(value)
    return override or None


# ------------------------------------------------------------------------------- read back
def _code_key(code: Any) -> tuple[str, str]:
    return (str(code.scheme_designator), str(code.value))


def read_measurement_report(
    sr: hd.sr.Comprehensive3DSR | Dataset | str | Path,
) -> list[dict[str, Any]]:
    """Per-vertebra contract dicts back from a report written by `export_measurement_report`.

    Values missing from the report are absent from the dicts; ``label`` is set for named
    levels only. An overridden vertebra has ``override``: ``by``, ``reason``, ``at`` (DICOM
    DT string, when recorded) and ``automatic`` (field -> automatic value it replaced).
    """
    report: Any = sr.content if isinstance(sr, hd.sr.Comprehensive3DSR) else None
    if not isinstance(report, hd.sr.MeasurementReport):
        # A document read with srread already holds the parsed template; others are parsed.
        dataset = sr if isinstance(sr, Dataset) else pydicom.dcmread(sr)
        report = hd.sr.Comprehensive3DSR.from_dataset(dataset, copy=False).content
    if not isinstance(report, hd.sr.MeasurementReport):
        msg = "sr does not hold a TID 1500 Measurement Report; pass a report written by bmetrack."
        raise ValueError(msg)
    numbers = {_code_key(concept): key for key, concept, _ in MEASUREMENTS}
    genant = {_code_key(c): grade for grade, c in GENANT_VALUES.items()}
    deformities = {_code_key(c): name for name, c in DEFORMITY_VALUES.items()}
    out = []
    for group in report.get_volumetric_roi_measurement_groups():
        identifier = str(group.tracking_identifier)
        level = identifier[: -len(_BODY_SUFFIX)] if identifier.endswith(_BODY_SUFFIX) else ""
        vertebra: dict[str, Any] = {"level": level}
        with contextlib.suppress(KeyError, ValueError):
            vertebra["label"] = label_from_level(level)
        for measurement in group.get_measurements():
            key = numbers.get(_code_key(measurement.name))
            if key is None:
                continue
            if key.startswith("heights_mm."):
                vertebra.setdefault("heights_mm", {})[key.split(".", 1)[1]] = measurement.value
            else:
                vertebra[key] = measurement.value
        for evaluation in group.get_qualitative_evaluations():
            name, value = _code_key(evaluation.name), _code_key(evaluation.value)
            if name == _code_key(codes.SCT.Edema):
                vertebra["bme_present"] = value == _code_key(codes.SCT.Present)
            elif name == _code_key(GENANT_GRADE):
                vertebra["genant_grade"] = genant[value]
            elif name == _code_key(DEFORMITY_TYPE):
                vertebra["deformity"] = deformities[value]
        override = _read_override(group)
        if override is not None:
            vertebra["override"] = override
        out.append(vertebra)
    return out


# --------------------------------------------------------------------------------- one study
def _read_datasets(files: Sequence[str | Path]) -> list[Dataset]:
    return [pydicom.dcmread(str(f)) for f in files]


def _source_files(volume: Any, folder: Path | None) -> list[str]:
    files = list(volume.metadata.get("source_files") or [])
    if folder is not None and (
        not files or any(Path(f).resolve().parent != folder.resolve() for f in files)
    ):
        from bmetrack.imaging.dicom import read_series

        files = list(read_series(folder).metadata["source_files"])
    return [str(f) for f in files]


def _check_geometry(datasets: Sequence[Dataset], volume: Any) -> None:
    """The datasets must be the volume's slices, in its order (no interpolated slice)."""
    if len(datasets) != volume.shape[0]:
        msg = (
            f"The STIR series has {len(datasets)} files but the measured volume has "
            f"{volume.shape[0]} slices (a missing slice was interpolated?); a DICOM SEG needs "
            "one source image per slice."
        )
        raise ImagingError(msg)
    spacing = float(min(volume.spacing_mm))
    for k, ds in enumerate(datasets):
        expected = np.asarray(volume.world_coordinates((k, 0, 0)), dtype=float)
        found = np.asarray([float(v) for v in ds.ImagePositionPatient])
        if np.linalg.norm(expected - found) > 0.01 * spacing:
            msg = (
                f"STIR file {k} ({ds.SOPInstanceUID}) lies at {found.tolist()} mm, not at "
                f"slice {k} of the measured volume ({expected.tolist()} mm); pass the STIR "
                "folder that was quantified."
            )
            raise ImagingError(msg)


def build_dicom_exports(
    quantify_result: Any,
    *,
    stir_folder: str | Path | None = None,
    t1_folder: str | Path | None = None,
    vertebrae: Sequence[Mapping[str, Any]] | None = None,
    provenance: Mapping[str, Any] | None = None,
    seg_series_number: int = 901,
    sr_series_number: int = 902,
) -> tuple[hd.seg.Segmentation, hd.sr.Comprehensive3DSR]:
    """The SEG and the SR of one measured study (the one builder of every export path).

    Parameters
    ----------
    quantify_result : bmetrack.imaging.quantify.StudyQuantification
        Its measurements (labels, masks and vertebrae on the STIR grid).
    stir_folder, t1_folder : path, optional
        Folders of the STIR and T1 series that were quantified; by default the files recorded
        in the volumes' metadata (``source_files``).
    vertebrae : sequence of dict, optional
        What the SR reports (see `export_measurement_report`, overrides included); by default
        the automatic measurements of ``quantify_result``.
    provenance : mapping, optional
        Recorded in both objects; by default ``quantify_result.provenance()``.
    seg_series_number, sr_series_number : int
        SeriesNumber of the SEG and SR series.

    Returns
    -------
    (highdicom.seg.Segmentation, highdicom.sr.Comprehensive3DSR)
    """
    stir = quantify_result.stir
    stir_datasets = _read_datasets(
        _source_files(stir, Path(stir_folder) if stir_folder is not None else None)
    )
    _check_geometry(stir_datasets, stir)
    t1_files = _source_files(
        quantify_result.t1_on_stir, Path(t1_folder) if t1_folder is not None else None
    )
    study_uid = str(stir_datasets[0].StudyInstanceUID)
    t1_datasets = [
        ds
        for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in t1_files)
        if str(ds.StudyInstanceUID) == study_uid
    ]
    provenance = dict(provenance or quantify_result.provenance())
    quantification = quantify_result.quantification
    seg = export_segmentation(
        stir_datasets,
        quantify_result.segmentation.labels.array,
        {name: quantification.masks[name] for name in MASK_NAMES if name in quantification.masks},
        quantify_result.level_names,
        series_number=seg_series_number,
        software_version=str(provenance.get("bmetrack_version", __version__)),
        further_source_datasets=t1_datasets,
        provenance=provenance,
    )
    if vertebrae is None:
        vertebrae = quantification.to_contract_dict()["vertebrae"]
    sr = export_measurement_report(
        stir_datasets,
        seg,
        vertebrae,
        provenance,
        series_number=sr_series_number,
        t1_datasets=t1_datasets,
    )
    return seg, sr


def save_dicom_exports(
    segmentation: Dataset, report: Dataset, out_folder: str | Path
) -> dict[str, Path]:
    """Write ``seg.dcm`` and ``sr.dcm`` into ``out_folder`` (created if needed).

    Returns
    -------
    dict
        ``{"seg": path, "sr": path}``.
    """
    out = Path(out_folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"seg": out / "seg.dcm", "sr": out / "sr.dcm"}
    segmentation.save_as(paths["seg"])
    report.save_as(paths["sr"])
    return paths


def write_dicom_exports(
    stir_folder: str | Path,
    quantify_result: Any,
    out_folder: str | Path,
    *,
    t1_folder: str | Path | None = None,
    seg_series_number: int = 901,
    sr_series_number: int = 902,
) -> dict[str, Path]:
    """Write ``seg.dcm`` and ``sr.dcm`` of one measured study into ``out_folder``.

    Parameters
    ----------
    stir_folder : path
        Folder of the STIR series that was quantified.
    quantify_result : bmetrack.imaging.quantify.StudyQuantification
        Its measurements (labels, masks and vertebrae on the STIR grid).
    out_folder : path
        Created if needed.
    t1_folder : path, optional
        T1 series to reference; by default the files recorded in the T1 volume's metadata.
    seg_series_number, sr_series_number : int
        SeriesNumber of the SEG and SR series.

    Returns
    -------
    dict
        ``{"seg": path, "sr": path}``.
    """
    seg, sr = build_dicom_exports(
        quantify_result,
        stir_folder=stir_folder,
        t1_folder=t1_folder,
        seg_series_number=seg_series_number,
        sr_series_number=sr_series_number,
    )
    return save_dicom_exports(seg, sr, out_folder)
