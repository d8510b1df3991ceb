"""Visit windows and the BME-pain subgroup (METHOD.md 1).

Plain, vectorised functions over pandas objects, shared by the importer (which
stores each visit's nominal month and window status) and the analysis tables
(which must give the same answer for a simulated cohort that never went
through the database).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from bmetrack.settings import Settings
from bmetrack.study.models import WindowStatus

__all__ = [
    "DAYS_PER_MONTH",
    "SubgroupRule",
    "VisitWindowAssignment",
    "assign_visit_windows",
    "subgroup_membership",
]

# Nominal month m is m * 365.25 / 12 days after the procedure.
DAYS_PER_MONTH = 365.25 / 12


@dataclass(frozen=True)
class VisitWindowAssignment:
    """Result of matching visit dates to nominal months, aligned with the input."""

    nominal_month: pd.Series  # Int64, <NA> when outside every window
    window_status: pd.Series  # WindowStatus values as str
    days_from_procedure: pd.Series  # int64
    days_from_nominal: pd.Series  # Int64: signed distance to the matched nominal date


def assign_visit_windows(
    visit_date: pd.Series,
    procedure_date: pd.Series,
    settings: Settings,
    given_month: pd.Series | None = None,
) -> VisitWindowAssignment:
    """Match each visit date to the nearest nominal month within its window.

    Month 0 is any date from ``baseline_max_days_before_procedure`` days before
    the procedure up to the procedure day. A follow-up date goes to the nearest
    nominal month whose window (``visit_window_days_month_M``) contains it; a
    date in no window gets ``<NA>`` and status ``outside_window`` (kept and
    flagged, never dropped). When ``given_month`` holds a month for a row, that
    month is kept and the status says whether the date is inside its window.

    Parameters
    ----------
    visit_date, procedure_date : pandas.Series of datetime64 or date
        Aligned series; ``procedure_date`` is the patient's (first) procedure.
    settings : Settings
        Supplies ``nominal_months`` and the window widths.
    given_month : pandas.Series, optional
        Nominal months stated by the user (``<NA>`` where not stated).
    """
    visit = pd.to_datetime(visit_date).reset_index(drop=True)
    procedure = pd.to_datetime(procedure_date).reset_index(drop=True)
    if len(visit) != len(procedure):
        msg = (
            f"visit_date has {len(visit)} rows but procedure_date has {len(procedure)}; "
            "they must be aligned."
        )
        raise ValueError(msg)
    days = (visit - procedure).dt.days.to_numpy(dtype="int64")
    months = np.asarray(settings["nominal_months"], dtype="int64")
    nominal_days = np.rint(months * DAYS_PER_MONTH).astype("int64")
    windows = np.array([settings.visit_window_days(int(m)) for m in months], dtype="int64")

    # Distance from each visit to each nominal date; ineligible pairs get +inf.
    distance = np.abs(days[:, None] - nominal_days[None, :]).astype("float64")
    eligible = distance <= windows[None, :]
    baseline_column = months == 0
    baseline_ok = (days <= 0) & (days >= -int(settings["baseline_max_days_before_procedure"]))
    eligible[:, baseline_column] = baseline_ok[:, None]
    distance[~eligible] = np.inf
    best = np.argmin(distance, axis=1)
    matched = np.isfinite(distance[np.arange(len(days)), best])

    month = pd.array(np.where(matched, months[best], 0), dtype="Int64")
    month[~matched] = pd.NA
    status = np.where(
        matched,
        np.where(months[best] == 0, WindowStatus.BASELINE.value, WindowStatus.IN_WINDOW.value),
        WindowStatus.OUTSIDE_WINDOW.value,
    ).astype(object)

    if given_month is not None:
        given = pd.array(given_month.reset_index(drop=True), dtype="Int64")
        stated = ~pd.isna(given)
        if stated.any():
            given_values = np.asarray(given[stated], dtype="int64")
            unknown = sorted(set(given_values) - set(months.tolist()))
            if unknown:
                msg = (
                    f"nominal_month {unknown} is not a nominal month of this study "
                    f"({list(months)}); leave it empty or change setting 'nominal_months'."
                )
                raise ValueError(msg)
            matched_month = np.asarray(month[stated].fillna(-1), dtype="int64")
            agrees = (matched_month == given_values) & matched[stated]
            month[stated] = given[stated]
            stated_index = np.flatnonzero(stated)
            status[stated_index] = np.where(
                agrees,
                status[stated_index],
                WindowStatus.OUTSIDE_WINDOW.value,
            )
            # A stated month 0 on a day up to the procedure is a baseline visit.
            stated_zero = stated_index[given_values == 0]
            status[stated_zero] = np.where(
                baseline_ok[stated_zero],
                WindowStatus.BASELINE.value,
                WindowStatus.OUTSIDE_WINDOW.value,
            )

    month_days = np.rint(np.asarray(month.fillna(0), dtype="float64") * DAYS_PER_MONTH)
    from_nominal = pd.array((days - month_days).astype("int64"), dtype="Int64")
    from_nominal[pd.isna(month)] = pd.NA
    return VisitWindowAssignment(
        nominal_month=pd.Series(month, name="nominal_month"),
        window_status=pd.Series(status, name="window_status", dtype=object),
        days_from_procedure=pd.Series(days, name="days_from_procedure"),
        days_from_nominal=pd.Series(from_nominal, name="days_from_nominal"),
    )


@dataclass(frozen=True)
class SubgroupRule:
    """Why a patient is in or out of the BME-pain subgroup."""

    MULTIPLE_VCF: str = "more than one treated VCF"
    NEW_VCF: str = "new VCF during follow-up"
    PAIN_OTHER_LEVEL: str = "pain at another untreated level"


def subgroup_membership(
    patient_codes: pd.Series,
    n_treated_vcf: pd.Series,
    any_new_vcf: pd.Series,
    any_pain_other_level: pd.Series,
) -> pd.DataFrame:
    """The reference study's subgroup: one treated VCF, no new VCF, no other pain.

    Returns a frame indexed like the inputs with ``patient_code``,
    ``in_subgroup`` and ``exclusion_reasons`` ("; "-joined, empty for members).
    Unknown (missing) new-VCF or pain answers count as "no": the reference
    study excluded patients on documented events only.
    """
    rule = SubgroupRule()
    multiple = n_treated_vcf.to_numpy() > 1
    new_vcf = any_new_vcf.fillna(False).to_numpy(dtype=bool)
    other_pain = any_pain_other_level.fillna(False).to_numpy(dtype=bool)
    reasons = [
        "; ".join(
            text
            for flag, text in (
                (m, rule.MULTIPLE_VCF),
                (n, rule.NEW_VCF),
                (p, rule.PAIN_OTHER_LEVEL),
            )
            if flag
        )
        for m, n, p in zip(multiple, new_vcf, other_pain, strict=True)
    ]
    return pd.DataFrame(
        {
            "patient_code": patient_codes.to_numpy(),
            "in_subgroup": ~(multiple | new_vcf | other_pain),
            "exclusion_reasons": reasons,
        },
        index=patient_codes.index,
    )
