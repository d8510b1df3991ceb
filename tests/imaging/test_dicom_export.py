"""DICOM SEG + TID 1500 SR export: validated by dciodvfy, read back by highdicom unchanged."""

import shutil
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from bmetrack.imaging.dicom import read_series
from bmetrack.imaging.dicom_export import (
    PRIVATE_SCHEME,
    export_measurement_report,
    export_segmentation,
    read_measurement_report,
    vertebra_code,
    write_dicom_exports,
)
from bmetrack.imaging.quantify import quantify_study
from bmetrack.simulate.phantom import FractureSpec, PhantomParameters, make_phantom

DCIODVFY = shutil.which("dciodvfy")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A small phantom: cemented L1 with a rim, edematous L3; quantified with its own labels."""
    phantom = make_phantom(
        PhantomParameters(
            n_slices=9,
            n_rows=128,
            n_columns=128,
            pixel_spacing_mm=2.4,
            sacrum_in_view=True,
            transitional_l6_probability=0.0,
            fractures=[
                FractureSpec(
                    level="L1",
                    fracture_type="wedge",
                    grade=2,
                    bme_percent=50,
                    cement_volume_ml=6.0,
                    rim=True,
                ),
                FractureSpec(level="L3", fracture_type="biconcave", grade=2, bme_percent=60),
            ],
        ),
        seed=1,
    )
    folder = tmp_path_factory.mktemp("export")
    series = phantom.write_dicom(folder / "dicom", patient_id="P1", study_date="20200101")
    stir = read_series(series["stir"])
    t1 = read_series(series["t1"])
    result = quantify_study(stir, t1, labels=phantom.labels)
    paths = write_dicom_exports(series["stir"], result, folder / "out")
    stir_datasets = [pydicom.dcmread(f) for f in stir.metadata["source_files"]]
    t1_uid = pydicom.dcmread(t1.metadata["source_files"][0]).SeriesInstanceUID
    return {
        "phantom": phantom,
        "result": result,
        "paths": paths,
        "stir_datasets": stir_datasets,
        "t1_series_uid": t1_uid,
        "folder": folder,
    }


def _dciodvfy(path):
    if DCIODVFY is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, check=False)
    return (run.stdout + run.stderr).splitlines()


@pytest.mark.parametrize("kind", ["seg", "sr"])
def test_dciodvfy_reports_no_errors(study, kind):
    lines = _dciodvfy(study["paths"][kind])
    errors = [line for line in lines if line.startswith("Error")]
    assert errors == []
    # The only expected warning: dciodvfy does not know our (declared) private scheme.
    other = {line for line in lines if line.startswith("Warning") and PRIVATE_SCHEME not in line}
    assert other == set()


def _segment_arrays(seg, source_datasets):
    """Segment label -> bool volume in the order of the source slices."""
    uids = [ds.SOPInstanceUID for ds in source_datasets]
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=numbers, combine_segments=False
    )
    return {
        str(s.SegmentLabel): pixels[..., i].astype(bool) for i, s in enumerate(seg.SegmentSequence)
    }


def test_segmentation_reads_back_voxel_exact(study):
    result = study["result"]
    seg = hd.seg.segread(study["paths"]["seg"])
    arrays = _segment_arrays(seg, study["stir_datasets"])
    labels = result.segmentation.labels.array
    masks = result.quantification.masks
    levels = {v.level: v.label for v in result.quantification.vertebrae}
    assert masks["cement"].any() and masks["edema"].any()  # the phantom exercises both
    expected = {f"{level} vertebral body": labels == label for level, label in levels.items()}
    expected |= {
        "Bone marrow edema": masks["edema"],
        "Bone cement": masks["cement"],
        "Peri-cement rim": masks["rim"],
    }
    assert set(arrays) == set(expected)
    for name, mask in expected.items():
        assert np.array_equal(arrays[name], mask), name

    by_label = {str(s.SegmentLabel): s for s in seg.SegmentSequence}
    l1 = by_label["L1 vertebral body"]
    assert l1.AnatomicRegionSequence[0].CodeValue == "66794005"  # SNOMED CT "L1 vertebra"
    assert l1.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    edema = by_label["Bone marrow edema"].SegmentedPropertyTypeCodeSequence[0]
    assert (edema.CodingSchemeDesignator, edema.CodeValue) == ("SCT", "79654002")
    schemes = {i.CodingSchemeDesignator for i in seg.CodingSchemeIdentificationSequence}
    assert PRIVATE_SCHEME in schemes
    # Both source series are referenced, the geometry is the STIR's.
    referenced = {s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence}
    assert referenced == {study["stir_datasets"][0].SeriesInstanceUID, study["t1_series_uid"]}
    assert seg.FrameOfReferenceUID == study["stir_datasets"][0].FrameOfReferenceUID


def test_report_reads_back_measurements(study):
    result = study["result"]
    inputs = {v["level"]: v for v in result.quantification.to_contract_dict()["vertebrae"]}
    sr = hd.sr.srread(study["paths"]["sr"])
    seg = hd.seg.segread(study["paths"]["seg"])
    segment_numbers = {str(s.SegmentLabel): int(s.SegmentNumber) for s in seg.SegmentSequence}
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(inputs)
    voxel_ml = result.stir.voxel_volume_ml
    labels = result.segmentation.labels.array
    for group in groups:
        identifier = str(group.tracking_identifier)
        level = identifier.removesuffix(" vertebral body")
        vertebra = inputs[level]
        # The group points at this body's own segment of the SEG written alongside.
        ref = group.referenced_segment
        assert ref.referenced_segment_numbers == [segment_numbers[identifier]]
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        (volume,) = group.get_measurements(name=codes.SCT.Volume)
        assert volume.unit.value == "ml"
        assert volume.value == pytest.approx(vertebra["body_volume_ml"], abs=1e-9)
        # Independent check: voxel count x voxel volume of the label in the SEG's own grid.
        count = np.count_nonzero(labels == vertebra["label"])
        assert volume.value == pytest.approx(count * voxel_ml, abs=0.006)
        (site,) = group.finding_sites
        assert site.value.value == vertebra_code(level).value
    by_level = {v["level"]: v for v in read_measurement_report(sr)}
    assert set(by_level) == set(inputs)
    for level, vertebra in inputs.items():
        got = by_level[level]
        assert got["label"] == vertebra["label"]
        for key in ("bme_present", "genant_grade", "deformity"):
            assert got[key] == vertebra[key], (level, key)
        for key in (
            "body_volume_ml",
            "edema_volume_ml",
            "cement_volume_ml",
            "rim_volume_ml",
            "bme_percent",
            "height_loss_percent",
        ):
            assert got[key] == pytest.approx(vertebra[key], abs=1e-9), (level, key)
        assert got["heights_mm"] == pytest.approx(vertebra["heights_mm"], abs=1e-9)
    # The fractures are really in there (not a trivially empty report).
    assert by_level["L1"]["cement_volume_ml"] > 1.0
    assert by_level["L3"]["bme_percent"] > 5.0


def test_report_references_stir_t1_and_seg(study):
    sr = pydicom.dcmread(study["paths"]["sr"])
    seg = pydicom.dcmread(study["paths"]["seg"])
    evidence = {
        series.SeriesInstanceUID
        for item in sr.CurrentRequestedProcedureEvidenceSequence
        for series in item.ReferencedSeriesSequence
    }
    stir_uid = study["stir_datasets"][0].SeriesInstanceUID
    assert evidence == {stir_uid, study["t1_series_uid"], seg.SeriesInstanceUID}
    assert sr.StudyInstanceUID == seg.StudyInstanceUID == study["stir_datasets"][0].StudyInstanceUID
    assert sr.PatientID == "P1"
    assert sr.CompletionFlag == "COMPLETE"


def test_truth_masks_with_a_rim_round_trip(study, tmp_path):
    """export_segmentation alone, with the phantom's own (non-empty) edema/cement/rim masks."""
    phantom = study["phantom"]
    datasets = study["stir_datasets"]
    masks = {name: phantom.masks[name].array.astype(bool) for name in ("edema", "cement", "rim")}
    assert masks["rim"].any()
    labels = phantom.labels.array
    names = {int(v): f"X{int(v)}" for v in np.unique(labels) if v}  # any level names work
    seg = export_segmentation(datasets, labels, masks, names, series_number=77)
    path = tmp_path / "truth-seg.dcm"
    seg.save_as(path)
    assert not [line for line in _dciodvfy(path) if line.startswith("Error")]
    arrays = _segment_arrays(hd.seg.segread(path), datasets)
    assert np.array_equal(arrays["Peri-cement rim"], masks["rim"])
    assert np.array_equal(arrays["Bone cement"], masks["cement"])
    for label, name in names.items():
        assert np.array_equal(arrays[f"{name} vertebral body"], labels == label)


def test_vertebra_codes():
    assert (vertebra_code("L1").scheme_designator, vertebra_code("L1").value) == (
        "SCT",
        "66794005",
    )
    assert vertebra_code("t12").value == "23215003"
    assert vertebra_code("S1").value == "54735007"  # sacrum
    assert vertebra_code("L6").scheme_designator == PRIVATE_SCHEME
    assert vertebra_code("V2").value == "51282000"  # unnamed: "Vertebra"


def test_mismatched_inputs_are_rejected(study):
    datasets = study["stir_datasets"]
    labels = study["result"].segmentation.labels.array
    with pytest.raises(ValueError, match="source_datasets holds 8"):
        export_segmentation(datasets[:-1], labels, {}, {})
    with pytest.raises(ValueError, match="unknown keys"):
        export_segmentation(datasets, labels, {"haemangioma": labels > 0}, {})
    seg = export_segmentation(datasets, (labels == 20).astype(np.int16) * 20, {}, {20: "L1"})
    vertebra = {"level": "L2", "label": 21, "body_volume_ml": 30.0}
    with pytest.raises(ValueError, match="no 'L2 vertebral body' segment"):
        export_measurement_report(datasets, seg, [vertebra], {})
    with pytest.raises(ValueError, match="genant_grade"):
        export_measurement_report(datasets, seg, [{"level": "L1", "genant_grade": 5}], {})


def test_missing_numbers_are_left_out(study, tmp_path):
    datasets = study["stir_datasets"]
    labels = study["result"].segmentation.labels.array
    seg = export_segmentation(datasets, (labels == 20).astype(np.int16) * 20, {}, {20: "L1"})
    vertebra = {
        "level": "L1",
        "body_volume_ml": 25.5,
        "height_loss_percent": float("nan"),
        "heights_mm": {"anterior": 20.0, "middle": None, "posterior": 25.0},
        "genant_grade": 0,
        "deformity": "none",
        "bme_present": False,
    }
    sr = export_measurement_report(datasets, seg, [vertebra], {"bmetrack_version": "9.9"})
    (got,) = read_measurement_report(sr)
    # A single-segment SEG and its report are valid objects too.
    for name, dataset in (("seg", seg), ("sr", sr)):
        dataset.save_as(tmp_path / f"{name}.dcm")
        assert not [x for x in _dciodvfy(tmp_path / f"{name}.dcm") if x.startswith("Error")]
    assert got["body_volume_ml"] == 25.5
    assert "height_loss_percent" not in got
    assert got["heights_mm"] == {"anterior": 20.0, "posterior": 25.0}
    assert (got["genant_grade"], got["deformity"], got["bme_present"]) == (0, "none", False)


def test_overrides_are_reported_with_author_reason_and_automatic_value(study, tmp_path):
    """The SR reports what the analysis uses: a radiologist's value, who set it and why, and
    the automatic value it replaced; a relabelled body keeps pointing at its own segment."""
    import datetime as dt

    from bmetrack.anatomy import level_from_label
    from bmetrack.imaging.dicom_export import build_dicom_exports, save_dicom_exports

    result = study["result"]
    automatic = {v["level"]: v for v in result.quantification.to_contract_dict()["vertebrae"]}
    top = min(automatic.values(), key=lambda v: v["label"])
    above = level_from_label(top["label"] - 1)
    when = dt.datetime(2026, 1, 2, 3, 4, 5)
    edited = dict(automatic)
    edited["L3"] = {
        **automatic["L3"],
        "bme_percent": 12.5,
        "genant_grade": 1,
        "override": {
            "by": "dr.reader",
            "reason": "edema overestimated",
            "at": when,
            "automatic": {
                "bme_percent": automatic["L3"]["bme_percent"],
                "genant_grade": automatic["L3"]["genant_grade"],
            },
        },
    }
    edited[top["level"]] = {
        **top,
        "level": above,
        "label": top["label"] - 1,
        "segment_level": top["level"],
        "override": {
            "by": "dr.reader",
            "reason": "miscounted",
            "automatic": {"level": top["level"]},
        },
    }
    seg, sr = build_dicom_exports(result, vertebrae=list(edited.values()))
    paths = save_dicom_exports(seg, sr, tmp_path)
    assert not [line for line in _dciodvfy(paths["sr"]) if line.startswith("Error")]

    back = {v["level"]: v for v in read_measurement_report(paths["sr"])}
    assert set(back) == (set(automatic) - {top["level"]}) | {above}
    assert automatic["L3"]["bme_percent"] != 12.5  # the override really changes the value
    assert back["L3"]["bme_percent"] == 12.5
    assert back["L3"]["genant_grade"] == 1
    assert back["L3"]["override"] == {
        "by": "dr.reader",
        "reason": "edema overestimated",
        "at": "20260102030405",
        "automatic": {
            "bme_percent": automatic["L3"]["bme_percent"],
            "genant_grade": automatic["L3"]["genant_grade"],
        },
    }
    assert back[above]["override"]["automatic"] == {"level": top["level"]}
    assert back[above]["body_volume_ml"] == top["body_volume_ml"]
    untouched = set(automatic) - {"L3", top["level"]}
    assert untouched and not any("override" in back[level] for level in untouched)
    # The relabelled group references the segment of the body it was measured on.
    numbers = {str(s.SegmentLabel): int(s.SegmentNumber) for s in seg.SegmentSequence}
    group = next(
        g
        for g in hd.sr.srread(paths["sr"]).content.get_volumetric_roi_measurement_groups()
        if str(g.tracking_identifier) == f"{above} vertebral body"
    )
    assert group.referenced_segment.referenced_segment_numbers == [
        numbers[f"{top['level']} vertebral body"]
    ]
    with pytest.raises(ValueError, match="must name who overrode"):
        export_measurement_report(
            study["stir_datasets"], seg, [{**automatic["L3"], "override": {"by": "x"}}], {}
        )
