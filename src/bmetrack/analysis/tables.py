"""Tidy analysis tables built from a study's exchange tables.

The analysis reads these DataFrames, never ORM objects. They are built from the
exchange tables of :mod:`bmetrack.study.schema` whether those come from the
database (:func:`bmetrack.study.exporters.export_frames`) or straight from the
simulator, so both paths give the same numbers for the same data.

Conventions
-----------
- A treated VCF is a level of the patient's first (index) procedure date;
  ``vcf_id`` is ``"<patient_code>:<level>"``.
- Visits are matched to nominal months by :func:`assign_visit_windows`. A date
  in no window is kept in ``outside_window_visits`` and left out of the
  per-month analyses. When two visits match the same month, the one closest to
  the nominal date is used and the others are counted in ``duplicate_visits``.
- A new VCF is one named in ``new_vcf_levels`` at a visit, or an untreated level
  measured at follow-up with BME present or Genant grade >= 1 that was not so
  at month 0 (METHOD.md 4).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bmetrack.settings import Settings, resolve_settings
from bmetrack.study.analgesics import analgesic_class_of, split_drug_list
from bmetrack.study.cohort import assign_visit_windows, subgroup_membership
from bmetrack.study.schema import TABLES

__all__ = ["EXTENT_CATEGORIES", "StudyTables", "build_study_tables", "extent_category"]

EXTENT_CATEGORIES = ("0", "1-25", "26-50", "51-75", "76-100")


@dataclass(frozen=True)
class StudyTables:
    """The tidy tables one analysis reads (see module docstring for conventions)."""

    vcf_visits: pd.DataFrame
    patient_visits: pd.DataFrame
    patients: pd.DataFrame
    outside_window_visits: pd.DataFrame
    settings: Settings
    duplicate_visits: int = 0
    study_code: str = ""
    study_title: str = ""

    @property
    def nominal_months(self) -> tuple[int, ...]:
        return tuple(int(m) for m in self.settings["nominal_months"])

    def as_frames(self) -> dict[str, pd.DataFrame]:
        """The tables by name, for CSV export."""
        return {
            "vcf_visits": self.vcf_visits,
            "patient_visits": self.patient_visits,
            "patients": self.patients,
            "outside_window_visits": self.outside_window_visits,
        }


def extent_category(bme_percent: pd.Series, edges_percent: tuple[float, ...]) -> pd.Series:
    """BME extent category labels: exactly 0 -> "0", then (0, e1], (e1, e2], ...

    Labels are built from the edges, so the default edges (0, 25, 50, 75, 100)
    give "0", "1-25", "26-50", "51-75", "76-100" as in the reference paper.
    """
    edges = [float(e) for e in edges_percent]
    labels = ["0"] + [
        f"{int(lower) + 1}-{int(upper)}" for lower, upper in itertools.pairwise(edges)
    ]
    values = bme_percent.to_numpy(dtype="float64")
    codes = np.searchsorted(np.asarray(edges[1:]), values, side="left") + 1
    codes[values <= edges[0]] = 0
    codes = np.minimum(codes, len(labels) - 1)
    codes[np.isnan(values)] = -1
    return pd.Series(
        pd.Categorical.from_codes(codes, categories=labels, ordered=True),
        index=bme_percent.index,
        name="extent_category",
    )


def _require_columns(frames: Mapping[str, pd.DataFrame]) -> None:
    for name in ("patients", "procedures", "clinical", "measurements"):
        if name not in frames:
            msg = (
                f"Table {name!r} is missing; give all of patients, procedures, clinical "
                "and measurements."
            )
            raise ValueError(msg)
        missing = [
            column.name
            for column in TABLES[name].columns
            if column.required and column.name not in frames[name].columns
        ]
        if missing:
            msg = f"Table {name!r} lacks required column(s) {missing}."
            raise ValueError(msg)


def _yes_no(series: pd.Series) -> pd.Series:
    mapping = {"yes": True, "y": True, "1": True, "true": True, "no": False, "n": False}
    mapping.update({"0": False, "false": False})
    text = series.astype("string").str.strip().str.lower()
    result = text.map(mapping).astype("boolean")
    bools = series.map(lambda v: v if isinstance(v, bool | np.bool_) else None)
    return result.fillna(bools.astype("boolean"))


def _analgesic_classes(clinical: pd.DataFrame) -> pd.Series:
    given = pd.to_numeric(clinical.get("analgesic_class"), errors="coerce").astype("Int64")
    if "analgesic_drugs" not in clinical:
        return given
    drugs = clinical["analgesic_drugs"].astype("string").fillna("").str.strip()
    # Derive from names only where no class was given; one lookup per distinct text.
    need = given.isna() & (drugs != "")
    if need.any():
        derived = {text: analgesic_class_of(split_drug_list(text)) for text in drugs[need].unique()}
        given = given.copy()
        given[need] = drugs[need].map(derived).astype("Int64")
    return given


def _vas_0_10(clinical: pd.DataFrame) -> pd.Series:
    vas = pd.to_numeric(clinical.get("vas"), errors="coerce").astype("float64")
    if "vas_unit" in clinical:
        in_mm = clinical["vas_unit"].astype("string").str.strip().str.lower().eq("mm").fillna(False)
        vas = vas.where(~in_mm.to_numpy(dtype=bool), vas / 10.0)
    return vas


def _closest_per_month(frame: pd.DataFrame, keys: list[str]) -> tuple[pd.DataFrame, int]:
    ordered = frame.assign(_distance=frame["days_from_nominal"].abs()).sort_values(
        [*keys, "_distance", "visit_date"], kind="stable"
    )
    kept = ordered.drop_duplicates(keys, keep="first").drop(columns="_distance")
    return kept.sort_index(), len(frame) - len(kept)


def build_study_tables(
    frames: Mapping[str, pd.DataFrame],
    settings: Settings | None = None,
    *,
    study_code: str = "",
    study_title: str = "",
) -> StudyTables:
    """Build the tidy analysis tables from the four exchange tables.

    Parameters
    ----------
    frames : mapping of str to DataFrame
        ``patients``, ``procedures``, ``clinical`` and ``measurements`` with the
        columns of :mod:`bmetrack.study.schema` (extra columns are ignored).
    settings : Settings, optional
        Method settings; the registry defaults when omitted.
    """
    settings = settings or resolve_settings()
    _require_columns(frames)
    months = [int(m) for m in settings["nominal_months"]]

    patients_in = frames["patients"].copy()
    patients_in["patient_code"] = patients_in["patient_code"].astype(str)
    procedures = frames["procedures"].copy()
    procedures["patient_code"] = procedures["patient_code"].astype(str)
    procedures["procedure_date"] = pd.to_datetime(procedures["procedure_date"])
    index_date = procedures.groupby("patient_code", sort=False)["procedure_date"].min()
    index_rows = procedures[
        procedures["procedure_date"].to_numpy()
        == index_date.reindex(procedures["patient_code"]).to_numpy()
    ]
    treated = index_rows[["patient_code", "level"]].drop_duplicates()
    treated = treated.assign(level=treated["level"].astype(str))
    procedure_type = index_rows.groupby("patient_code", sort=False)["procedure_type"].first()

    # --- visits
    clinical = frames["clinical"].copy()
    clinical["patient_code"] = clinical["patient_code"].astype(str)
    clinical["visit_date"] = pd.to_datetime(clinical["visit_date"])
    known = clinical["patient_code"].isin(index_date.index)
    if not known.all():
        codes = sorted(set(clinical.loc[~known, "patient_code"]))[:5]
        msg = f"Clinical visits of patients without a procedure: {codes}; add their procedures."
        raise ValueError(msg)
    proc_date = index_date.reindex(clinical["patient_code"]).reset_index(drop=True)
    given = clinical.get("nominal_month")
    windows = assign_visit_windows(
        clinical["visit_date"].reset_index(drop=True), proc_date, settings, given
    )
    visits = pd.DataFrame(
        {
            "patient_code": clinical["patient_code"].to_numpy(),
            "month": windows.nominal_month.to_numpy(),
            "visit_date": clinical["visit_date"].to_numpy(),
            "days_from_procedure": windows.days_from_procedure.to_numpy(),
            "days_from_nominal": windows.days_from_nominal.to_numpy(),
            "window_status": windows.window_status.to_numpy(),
            "vas": _vas_0_10(clinical).to_numpy(),
            "analgesic_class": _analgesic_classes(clinical).to_numpy(),
            "pain_other_level": (
                _yes_no(clinical["pain_other_level"]).to_numpy()
                if "pain_other_level" in clinical
                else pd.array([pd.NA] * len(clinical), dtype="boolean")
            ),
            "new_vcf_levels": (
                clinical["new_vcf_levels"].astype("string").fillna("").str.strip().to_numpy()
                if "new_vcf_levels" in clinical
                else ""
            ),
        }
    )
    visits["new_vcf"] = visits["new_vcf_levels"] != ""
    outside = visits[visits["month"].isna()]
    in_window = visits[visits["month"].notna()].copy()
    in_window["month"] = in_window["month"].astype("int64")
    in_window, duplicate_visits = _closest_per_month(in_window, ["patient_code", "month"])

    # --- measurements
    measurements = frames["measurements"].copy()
    measurements["patient_code"] = measurements["patient_code"].astype(str)
    measurements["level"] = measurements["level"].astype(str)
    measurements["visit_date"] = pd.to_datetime(measurements["visit_date"])
    measurements = measurements[measurements["patient_code"].isin(index_date.index)]
    m_windows = assign_visit_windows(
        measurements["visit_date"].reset_index(drop=True),
        index_date.reindex(measurements["patient_code"]).reset_index(drop=True),
        settings,
    )
    measurements = measurements.reset_index(drop=True).assign(
        month=m_windows.nominal_month.to_numpy(),
        days_from_nominal=m_windows.days_from_nominal.to_numpy(),
    )
    measurements = measurements[measurements["month"].notna()].copy()
    measurements["month"] = measurements["month"].astype("int64")
    bme = pd.to_numeric(measurements["bme_percent"], errors="coerce").astype("float64")
    measurements["bme_percent"] = bme
    threshold = float(settings["bme_present_threshold_percent"])
    measurements["bme_present"] = pd.array(bme >= threshold, dtype="boolean")
    measurements.loc[bme.isna().to_numpy(), "bme_present"] = pd.NA
    grade = (
        pd.to_numeric(measurements["genant_grade"], errors="coerce").astype("Int64")
        if "genant_grade" in measurements
        else pd.Series(pd.NA, index=measurements.index, dtype="Int64")
    )
    measurements["genant_grade"] = grade
    measurements, duplicate_measurements = _closest_per_month(
        measurements, ["patient_code", "level", "month"]
    )

    is_treated = pd.MultiIndex.from_frame(measurements[["patient_code", "level"]]).isin(
        pd.MultiIndex.from_frame(treated)
    )
    vcf = measurements[is_treated].copy()
    untreated = measurements[~is_treated]
    imaging_new_vcf = _imaging_new_vcf(untreated)

    # --- patients
    n_treated = treated.groupby("patient_code", sort=False).size()
    levels_text = treated.groupby("patient_code", sort=False)["level"].agg(";".join)
    clinical_new = visits[visits["new_vcf"] & (visits["days_from_procedure"] > 0)]
    any_new = pd.Series(False, index=index_date.index)
    any_new[any_new.index.isin(clinical_new["patient_code"])] = True
    any_new[any_new.index.isin(imaging_new_vcf)] = True
    other_pain_codes = visits.loc[visits["pain_other_level"].fillna(False), "patient_code"]
    any_other = pd.Series(index_date.index.isin(other_pain_codes), index=index_date.index)
    membership = subgroup_membership(
        pd.Series(index_date.index, index=index_date.index),
        n_treated.reindex(index_date.index).fillna(0).astype("int64"),
        any_new,
        any_other,
    )
    info = patients_in.set_index("patient_code")
    codes = index_date.index
    month0_imaged = set(vcf.loc[vcf["month"] == 0, "patient_code"])
    patients = pd.DataFrame(
        {
            "patient_code": codes.to_numpy(),
            "sex": info["sex"].reindex(codes).fillna("U").to_numpy() if "sex" in info else "U",
            "birth_year": pd.to_numeric(info["birth_year"].reindex(codes), errors="coerce")
            .astype("Int64")
            .to_numpy()
            if "birth_year" in info
            else pd.NA,
            "procedure_date": index_date.to_numpy(),
            "procedure_type": procedure_type.reindex(codes).astype(str).to_numpy(),
            "n_treated_vcf": n_treated.reindex(codes).fillna(0).astype("int64").to_numpy(),
            "treated_levels": levels_text.reindex(codes).fillna("").to_numpy(),
            "any_new_vcf": any_new.to_numpy(),
            "any_pain_other_level": any_other.to_numpy(),
            "in_subgroup": membership["in_subgroup"].to_numpy(),
            "exclusion_reasons": membership["exclusion_reasons"].to_numpy(),
            "n_visits": in_window.groupby("patient_code")
            .size()
            .reindex(codes)
            .fillna(0)
            .astype("int64")
            .to_numpy(),
            "imaged_month_0": codes.isin(list(month0_imaged)),
        }
    )
    subgroup_codes = set(patients.loc[patients["in_subgroup"], "patient_code"])

    vcf_visits = pd.DataFrame(
        {
            "patient_code": vcf["patient_code"].to_numpy(),
            "vcf_id": (vcf["patient_code"] + ":" + vcf["level"]).to_numpy(),
            "level": vcf["level"].to_numpy(),
            "month": vcf["month"].to_numpy(dtype="int64"),
            "visit_date": vcf["visit_date"].to_numpy(),
            "bme_percent": vcf["bme_percent"].to_numpy(),
            "bme_present": vcf["bme_present"].to_numpy(),
            "extent_category": extent_category(
                vcf["bme_percent"], tuple(settings["bme_extent_edges_percent"])
            ).array,
            "edema_volume_ml": _numeric(vcf, "edema_volume_ml"),
            "body_volume_ml": _numeric(vcf, "body_volume_ml"),
            "cement_volume_ml": _numeric(vcf, "cement_volume_ml"),
            "genant_grade": vcf["genant_grade"].to_numpy(),
            "in_subgroup": vcf["patient_code"].isin(subgroup_codes).to_numpy(),
        }
    ).sort_values(["patient_code", "level", "month"], kind="stable", ignore_index=True)
    vcf_visits = vcf_visits[vcf_visits["month"].isin(months)].reset_index(drop=True)

    patient_visits = (
        in_window.drop(columns=["days_from_nominal", "new_vcf_levels"])
        .assign(in_subgroup=lambda f: f["patient_code"].isin(subgroup_codes))
        .sort_values(["patient_code", "month"], kind="stable", ignore_index=True)
    )
    patient_visits = patient_visits[patient_visits["month"].isin(months)].reset_index(drop=True)
    outside_window_visits = outside[
        ["patient_code", "visit_date", "days_from_procedure", "vas", "analgesic_class"]
    ].reset_index(drop=True)
    return StudyTables(
        vcf_visits=vcf_visits,
        patient_visits=patient_visits,
        patients=patients,
        outside_window_visits=outside_window_visits,
        settings=settings,
        duplicate_visits=int(duplicate_visits + duplicate_measurements),
        study_code=study_code,
        study_title=study_title,
    )


def _numeric(frame: pd.DataFrame, column: str) -> np.ndarray:
    if column not in frame:
        return np.full(len(frame), np.nan)
    return pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype="float64")


def _imaging_new_vcf(untreated: pd.DataFrame) -> set[str]:
    """Patients with an untreated level that became fractured or edematous after month 0."""
    if untreated.empty:
        return set()
    positive = untreated["bme_present"].fillna(False).to_numpy(dtype=bool) | (
        untreated["genant_grade"].fillna(0).to_numpy(dtype="int64") >= 1
    )
    frame = untreated[["patient_code", "level", "month"]].assign(positive=positive)
    at_baseline = frame[frame["month"] == 0].set_index(["patient_code", "level"])["positive"]
    later = frame[(frame["month"] > 0) & frame["positive"]]
    if later.empty:
        return set()
    keys = pd.MultiIndex.from_frame(later[["patient_code", "level"]])
    was_positive = at_baseline.reindex(keys).fillna(False).to_numpy(dtype=bool)
    return set(later.loc[~was_positive, "patient_code"])
