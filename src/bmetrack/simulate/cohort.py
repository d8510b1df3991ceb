"""Simulated cohorts of vertebroplasty patients (clinical trajectories and BME).

:func:`simulate_cohort` writes the four exchange tables of
:mod:`bmetrack.study.schema` (patients, procedures, clinical, measurements) for a
cohort calibrated to the reference study (METHOD.md 1; Voormolen et al., AJNR
2006): 64 patients with 89 treated VCF, visits at months 0, 3, 6 and 12, BME
decreasing gradually so that about 29% of treated VCF still show BME at month
12 and never returns once absent, pain relief mostly within 3 months, and about
31 of 64 patients in the BME-pain subgroup (single treated VCF, no new VCF, no
pain at another untreated level).

The model, per patient ``i``, treated VCF ``v`` and nominal month ``t``:

- BME (latent, percent): ``b0_v * exp(-k_v * t)``, 0 once below
  ``bme_resolved_below_percent``; ``b0_v = min + (max - min) * Beta(a, b)`` and
  ``log k_v ~ Normal(decay_rate_log_mean, decay_rate_log_sd)``. Recorded value:
  latent + Normal(0, ``bme_noise_sd_percent``) when the latent value is not 0,
  then a running minimum over visits so that a VCF never gets BME back by
  measurement noise alone (recurrences only with ``recurrence_probability``).
- VAS: ``baseline_i * (1 - r_i * (1 - exp(-t / tau)))`` + noise, clipped to
  0-10 and rounded to one decimal; ``r_i ~ Beta`` (relief fraction). With
  ``bme_pain_coupling`` = c, each follow-up VAS gets
  ``c * (bme_i(t) - E[bme(t)]) / 25`` where ``bme_i(t)`` is the patient's mean
  latent BME over treated levels and ``E[bme(t)]`` its model expectation: c is in
  VAS points per 25 percentage points of BME (one extent category), and the mean
  VAS trajectory does not move with c (apart from clipping to 0-10). BME is
  drawn from its own random stream: with c = 0 BME and pain are independent,
  and changing c leaves the BME values unchanged.
- Analgesic class: a latent ``vas + Normal(0, analgesic_noise_sd)`` cut at
  month-specific thresholds (baseline: many opioids; follow-up: mostly 0-1);
  drug names are drawn from lists checked against the packaged lookup.

Everything is generated with numpy arrays over patients, VCF and visits (no loop
per patient): 100,000 patients take about 2 seconds.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from scipy import stats

from bmetrack import __version__
from bmetrack.anatomy import label_from_level, level_from_label, normalise_level
from bmetrack.settings import resolve_settings
from bmetrack.study.analgesics import analgesic_class_of, split_drug_list
from bmetrack.study.cohort import DAYS_PER_MONTH
from bmetrack.study.models import ProcedureType
from bmetrack.study.schema import TABLES

__all__ = [
    "DEFAULT_LEVEL_WEIGHTS",
    "DRUG_CHOICES",
    "CohortParameters",
    "SimulatedCohort",
    "expected_bme_percent",
    "simulate_cohort",
]

# Share of treated levels T5-L5 (most at the thoracolumbar junction T11-L2).
DEFAULT_LEVEL_WEIGHTS: tuple[tuple[str, float], ...] = (
    ("T5", 0.02),
    ("T6", 0.03),
    ("T7", 0.05),
    ("T8", 0.06),
    ("T9", 0.05),
    ("T10", 0.06),
    ("T11", 0.10),
    ("T12", 0.22),
    ("L1", 0.20),
    ("L2", 0.10),
    ("L3", 0.06),
    ("L4", 0.04),
    ("L5", 0.01),
)

# Drug lists per WHO class (entries of the 'analgesic_drugs' column). Checked against
# the packaged lookup on every call, so the importer re-derives the same class.
DRUG_CHOICES: dict[int, tuple[str, ...]] = {
    0: ("none",),
    1: ("paracetamol", "paracetamol; ibuprofen", "diclofenac", "naproxen", "paracetamol; naproxen"),
    2: ("tramadol", "paracetamol; tramadol", "codeine", "paracetamol; codeine"),
    3: ("morphine", "oxycodone", "paracetamol; oxycodone", "fentanyl", "paracetamol; morphine"),
}

# The reference study: 89 treated VCF in 64 patients.
_VCF_PER_PATIENT = 89 / 64
# bme_pain_coupling is in VAS points per this many percentage points of BME.
_COUPLING_UNIT_PERCENT = 25.0
_TABLE_NAMES = ("patients", "procedures", "clinical", "measurements")
# Genant height-loss bounds (percent) of grades 1, 2, 3 used to draw baseline deformity.
_GRADE_BOUNDS_PERCENT = ((20.0, 25.0), (25.0, 40.0), (40.0, 60.0))
_GRADE_EDGES_PERCENT = np.array([20.0, 25.0, 40.0])
_DEFORMITY_TYPES = np.array(["wedge", "biconcave", "crush"], dtype=object)


@dataclass(frozen=True)
class CohortParameters:
    """Parameters of a simulated cohort; the defaults mimic the reference study.

    Cohort and levels
    -----------------
    n_patients : int
        Number of patients (64).
    n_vcf : int or None
        Total treated VCF; None -> ``round(n_patients * 89 / 64)`` (89 for 64
        patients). Must lie between ``n_patients`` and ``3 * n_patients``: every
        patient has 1-3 treated levels and the total is exact.
    three_level_fraction : float
        Share of multi-level patients with three (not two) levels (0.2: for the
        default cohort 43 single, 17 double, 4 triple).
    level_weights : tuple of (level, weight)
        Distribution of the (central) treated level; multi-level patients get
        adjacent levels around it. Default :data:`DEFAULT_LEVEL_WEIGHTS`.
    female_fraction, age_mean_years, age_sd_years : float
        Sex and age at the procedure (77% female, 72 +- 9 years, clipped 50-95).
    study_start : datetime.date
        First possible procedure date.
    accrual_days : int
        Procedure dates are uniform over this many days from ``study_start`` (730).
    procedure_type : ProcedureType or str
        "vertebroplasty" (default), "kyphoplasty" or "conservative"
        (conservative: no cement).

    Visits
    ------
    nominal_months : tuple of int
        Visit schedule, starting with 0 (0, 3, 6, 12).
    window_days : tuple of int or None
        Half-width of the window of each follow-up month; None -> the default
        settings (30, 45, 60 days).
    baseline_max_days_before : int
        The month-0 visit is 0 to this many days before the procedure (14).
    visit_jitter_sd_days : float
        SD of follow-up dates around the nominal date, truncated to the window (10).
    outside_window_fraction : float
        Share of follow-up visits deliberately outside every window (0.02); their
        ``nominal_month`` is left empty.
    missing_fraction : tuple of float
        Share of patients missing each follow-up visit (0.03, 0.06, 0.10).
    dropout_share : float
        Part of that missingness that is monotone dropout (0.6); the rest is
        intermittent. Missingness is completely at random.

    Pain and analgesics
    -------------------
    vas_baseline_mean, vas_baseline_sd : float
        Baseline VAS 0-10 (7.5 +- 1.5).
    vas_relief_fraction_mean : float
        Mean share of baseline pain relieved at the plateau (0.63: 7.5 -> ~2.8).
    vas_relief_concentration : float
        Concentration ``a + b`` of the Beta distribution of the relief fraction (6).
    vas_relief_time_constant_months : float
        Relief follows ``1 - exp(-t / tau)`` (0.95 months: ~96% by month 3).
    vas_noise_sd : float
        Visit-to-visit VAS noise in points (0.7).
    vas_unit_mm_fraction : float
        Share of visits recorded in mm 0-100 (``vas_unit`` "mm"), to exercise the
        conversion (0.0).
    bme_pain_coupling : float
        VAS points per 25 percentage points of BME (one extent category of
        METHOD.md 3) added at follow-up visits, centred on the expected BME of
        that month (0.0: no relation). Share of 400 default 64-patient cohorts
        with a Spearman correlation of BME and VAS significant at 0.05 in the
        ~31-patient subgroup at months 3 / 6 / 12: coupling 4.0 (16 VAS points per
        100% BME) 100% / 99% / 82%; 1.0 63% / 37% / 16%; 0.0 6.5% / 4.5% / 6%.
    analgesic_noise_sd : float
        SD of the latent analgesic need around VAS (1.5).
    analgesic_thresholds_baseline, analgesic_thresholds_follow_up : tuple of float
        Cut points of the latent need between classes 0|1, 1|2, 2|3.

    Events
    ------
    new_vcf_probability : float
        Patients with a new VCF during follow-up (0.165), adjacent to the treated
        levels, occurring by month 3, 6 or 12 (equally likely) and recorded at the
        first attended visit from then on (not recorded when there is none).
    other_pain_probability : float
        Patients with pain at another untreated level (0.145), from month 0, 3, 6
        or 12 (equally likely) onwards, recorded at attended visits. With 43
        single-level patients of 64 the latent subgroup is 43 x 0.835 x 0.855 =
        30.7 patients; events hidden by missed visits bring the recorded subgroup
        to about 31.

    BME and morphometry
    -------------------
    bme_baseline_min_percent, bme_baseline_max_percent : float
        Range of baseline BME (40-100%).
    bme_baseline_beta : tuple of float
        Beta shape of baseline BME in that range ((2, 2): median 70%).
    decay_rate_log_mean, decay_rate_log_sd : float
        Natural log of the per-VCF decay rate (per month) is normal with these
        parameters (-0.97, 1.0: median half-life 1.8 months). Solved by quadrature
        so that 29.0% of VCF have latent BME >= 5% at month 12 (55.5% at month 6,
        79.6% at month 3).
    bme_resolved_below_percent : float
        Latent BME below this is 0 exactly (2.0).
    bme_noise_sd_percent : float
        Measurement noise of BME in percentage points (1.0).
    bme_present_threshold_percent : float
        BME present from this percent (5.0, the setting of METHOD.md 3).
    recurrence_probability : float
        Chance that a VCF whose BME became absent before the last visit gets it
        back at a later visit (0.0: the reference study found none).
    cement_volume_range_ml : tuple of float
        Injected cement per level, uniform in this range (2-6 ml).
    progression_probability : float
        Share of treated VCF whose height loss still increases after PV (0.15), by
        1-8 percentage points by month 3.
    """

    n_patients: int = 64
    n_vcf: int | None = None
    three_level_fraction: float = 0.2
    level_weights: tuple[tuple[str, float], ...] = DEFAULT_LEVEL_WEIGHTS
    female_fraction: float = 0.77
    age_mean_years: float = 72.0
    age_sd_years: float = 9.0
    study_start: dt.date = dt.date(2003, 1, 1)
    accrual_days: int = 730
    procedure_type: ProcedureType | str = ProcedureType.VERTEBROPLASTY
    nominal_months: tuple[int, ...] = (0, 3, 6, 12)
    window_days: tuple[int, ...] | None = None
    baseline_max_days_before: int = 14
    visit_jitter_sd_days: float = 10.0
    outside_window_fraction: float = 0.02
    missing_fraction: tuple[float, ...] = (0.03, 0.06, 0.10)
    dropout_share: float = 0.6
    vas_baseline_mean: float = 7.5
    vas_baseline_sd: float = 1.5
    vas_relief_fraction_mean: float = 0.63
    vas_relief_concentration: float = 6.0
    vas_relief_time_constant_months: float = 0.95
    vas_noise_sd: float = 0.7
    vas_unit_mm_fraction: float = 0.0
    bme_pain_coupling: float = 0.0
    analgesic_noise_sd: float = 1.5
    analgesic_thresholds_baseline: tuple[float, float, float] = (4.8, 6.7, 8.3)
    analgesic_thresholds_follow_up: tuple[float, float, float] = (3.3, 5.6, 7.1)
    new_vcf_probability: float = 0.165
    other_pain_probability: float = 0.145
    bme_baseline_min_percent: float = 40.0
    bme_baseline_max_percent: float = 100.0
    bme_baseline_beta: tuple[float, float] = (2.0, 2.0)
    decay_rate_log_mean: float = -0.97
    decay_rate_log_sd: float = 1.0
    bme_resolved_below_percent: float = 2.0
    bme_noise_sd_percent: float = 1.0
    bme_present_threshold_percent: float = 5.0
    recurrence_probability: float = 0.0
    cement_volume_range_ml: tuple[float, float] = (2.0, 6.0)
    progression_probability: float = 0.15
    _resolved_window_days: tuple[int, ...] = field(default=(), init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "procedure_type", _procedure_type(self.procedure_type))
        object.__setattr__(self, "study_start", _as_date(self.study_start))
        self._validate()
        months = self.nominal_months
        if self.window_days is None:
            settings = resolve_settings({"nominal_months": list(months)})
            windows = tuple(settings.visit_window_days(int(m)) for m in months[1:])
        else:
            windows = tuple(int(w) for w in self.window_days)
        object.__setattr__(self, "_resolved_window_days", windows)

    @property
    def total_vcf(self) -> int:
        """The number of treated VCF the cohort will have."""
        if self.n_vcf is None:
            return round(self.n_patients * _VCF_PER_PATIENT)
        return int(self.n_vcf)

    @property
    def follow_up_window_days(self) -> tuple[int, ...]:
        """Window half-width of each follow-up month (resolved from the settings)."""
        return self._resolved_window_days

    def _validate(self) -> None:
        if self.n_patients < 1:
            msg = f"n_patients must be >= 1; got {self.n_patients}."
            raise ValueError(msg)
        total = self.total_vcf
        if not self.n_patients <= total <= 3 * self.n_patients:
            msg = (
                f"n_vcf={total} is not feasible for n_patients={self.n_patients}: each patient "
                f"has 1-3 treated levels, so use {self.n_patients}-{3 * self.n_patients} "
                "or None."
            )
            raise ValueError(msg)
        months = self.nominal_months
        if len(months) < 2 or months[0] != 0 or any(b <= a for a, b in itertools.pairwise(months)):
            msg = f"nominal_months must start at 0 and increase strictly; got {months}."
            raise ValueError(msg)
        n_follow = len(months) - 1
        for name in ("missing_fraction", "window_days"):
            value = getattr(self, name)
            if value is not None and len(value) != n_follow:
                msg = f"{name} needs one value per follow-up month {months[1:]}; got {value}."
                raise ValueError(msg)
        for name in (
            "three_level_fraction",
            "female_fraction",
            "outside_window_fraction",
            "dropout_share",
            "vas_unit_mm_fraction",
            "new_vcf_probability",
            "other_pain_probability",
            "recurrence_probability",
            "progression_probability",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                msg = f"{name} is a probability and must lie in [0, 1]; got {value}."
                raise ValueError(msg)
        if any(not 0.0 <= q < 1.0 for q in self.missing_fraction):
            msg = f"missing_fraction values must lie in [0, 1); got {self.missing_fraction}."
            raise ValueError(msg)
        if not 0.0 < self.vas_relief_fraction_mean < 1.0:
            msg = (
                f"vas_relief_fraction_mean must lie in (0, 1); got {self.vas_relief_fraction_mean}."
            )
            raise ValueError(msg)
        if not 0.0 <= self.bme_baseline_min_percent <= self.bme_baseline_max_percent <= 100.0:
            msg = (
                "bme_baseline_min_percent and bme_baseline_max_percent must satisfy "
                f"0 <= min <= max <= 100; got {self.bme_baseline_min_percent}, "
                f"{self.bme_baseline_max_percent}."
            )
            raise ValueError(msg)
        for level, weight in self.level_weights:
            normalise_level(level)
            if weight < 0:
                msg = f"level_weights must be >= 0; got {weight} for {level}."
                raise ValueError(msg)
        if sum(weight for _, weight in self.level_weights) <= 0:
            msg = "level_weights must contain a positive weight."
            raise ValueError(msg)
        labels = [label_from_level(level) for level, _ in self.level_weights]
        if max(labels) - min(labels) < 3:
            msg = (
                f"level_weights must span at least 4 adjacent levels (3 treated + a new VCF); "
                f"got {[level for level, _ in self.level_weights]}."
            )
            raise ValueError(msg)
        low, high = self.cement_volume_range_ml
        if not 0.0 <= low <= high:
            msg = (
                "cement_volume_range_ml must be (low, high) with 0 <= low <= high; "
                f"got {(low, high)}."
            )
            raise ValueError(msg)


@dataclass(frozen=True)
class SimulatedCohort:
    """A simulated cohort: the four exchange tables plus the latent truth.

    Attributes
    ----------
    frames : dict of str -> DataFrame
        "patients", "procedures", "clinical", "measurements", with exactly the
        columns of :data:`bmetrack.study.schema.TABLES`.
    parameters : CohortParameters
    seed : int
    truth : dict of str -> DataFrame
        "vcf": one row per treated VCF (patient_code, vcf_id, level,
        baseline_bme_percent, decay_rate_per_month, half_life_months,
        recurrence_month, latent_bme_percent_m<month> for each nominal month).
        "patients": one row per patient (n_treated_vcf, relief fraction, latent
        and recorded new VCF / other-level pain, dropout_month, in_subgroup as the
        recorded tables define it, in_subgroup_latent from the latent events).
        "expected_bme": month -> model expectation of latent BME (the centring of
        the BME-pain coupling).
    """

    frames: dict[str, pd.DataFrame]
    parameters: CohortParameters
    seed: int
    truth: dict[str, pd.DataFrame]


def simulate_cohort(params: CohortParameters | None = None, *, seed: int = 2006) -> SimulatedCohort:
    """Simulate a vertebroplasty cohort as the four exchange tables.

    Parameters
    ----------
    params : CohortParameters, optional
        Model parameters; the defaults mimic the reference study.
    seed : int
        Seed of ``numpy.random.default_rng``; the same seed and parameters give
        identical frames. Separate random streams are spawned for levels, visits,
        pain, BME, events and morphometry, so changing e.g. ``bme_pain_coupling``
        does not change the BME values.

    Returns
    -------
    SimulatedCohort
    """
    p = params if params is not None else CohortParameters()
    rng = np.random.default_rng(seed)
    r_pat, r_lvl, r_vis, r_vas, r_bme, r_evt, r_drug, r_morph = rng.spawn(8)
    months = np.asarray(p.nominal_months, dtype=np.int64)
    n_months = len(months)
    n_pat = p.n_patients

    # --- Patients and treated levels
    counts = r_pat.permutation(_level_counts(n_pat, p.total_vcf, p.three_level_fraction))
    female = r_pat.random(n_pat) < p.female_fraction
    age_years = np.clip(r_pat.normal(p.age_mean_years, p.age_sd_years, n_pat), 50, 95)
    start_day = np.datetime64(p.study_start, "D")
    procedure_day = start_day + r_pat.integers(0, max(p.accrual_days, 1), n_pat)
    procedure_year = procedure_day.astype("datetime64[Y]").astype(np.int64) + 1970
    birth_year = procedure_year - np.rint(age_years).astype(np.int64)

    level_names, level_weights = _level_table(p.level_weights)
    n_levels = len(level_names)
    # Adjacent levels must exist: a block of `count` levels around the central level.
    centre = r_lvl.choice(n_levels, size=n_pat, p=level_weights)
    offset = np.floor(r_lvl.random(n_pat) * counts).astype(np.int64)
    block_start = np.clip(centre - offset, 0, np.maximum(n_levels - counts, 0))
    vcf_patient = np.repeat(np.arange(n_pat), counts)
    first_vcf = np.cumsum(counts) - counts
    vcf_position = np.arange(len(vcf_patient)) - first_vcf[vcf_patient]
    vcf_level_index = np.minimum(block_start[vcf_patient] + vcf_position, n_levels - 1)
    n_vcf = len(vcf_patient)

    # --- Visits: attendance (dropout + intermittent) and dates
    attended, dropout_index = _attendance(r_vis, n_pat, p.missing_fraction, p.dropout_share)
    day_offset, outside = _visit_days(r_vis, n_pat, months, p)
    visit_day = procedure_day[:, None] + day_offset  # datetime64[D], (patients, months)

    # --- BME per VCF (own stream: independent of pain unless coupled)
    bme_latent, b0, decay, recurrence_index = _bme_latent(r_bme, n_vcf, months, p)
    bme_recorded = _bme_recorded(r_bme, bme_latent, recurrence_index, p)

    # --- Pain
    baseline_vas = np.clip(r_vas.normal(p.vas_baseline_mean, p.vas_baseline_sd, n_pat), 0, 10)
    a = p.vas_relief_fraction_mean * p.vas_relief_concentration
    b = (1 - p.vas_relief_fraction_mean) * p.vas_relief_concentration
    relief = r_vas.beta(a, b, n_pat)
    progress = 1 - np.exp(-months / p.vas_relief_time_constant_months)
    vas = baseline_vas[:, None] * (1 - relief[:, None] * progress[None, :])
    vas = vas + r_vas.normal(0, p.vas_noise_sd, (n_pat, n_months)) * (months > 0)
    expected = expected_bme_percent(p)
    if p.bme_pain_coupling != 0.0:
        patient_bme = np.stack(
            [np.bincount(vcf_patient, bme_latent[:, j], n_pat) / counts for j in range(n_months)],
            axis=1,
        )
        coupled = p.bme_pain_coupling * (patient_bme - expected[None, :]) / _COUPLING_UNIT_PERCENT
        vas = vas + coupled * (months > 0)
    vas = np.round(np.clip(vas, 0, 10), 1)

    # --- Analgesics: latent need around VAS, cut at month-specific thresholds
    need = vas + r_drug.normal(0, p.analgesic_noise_sd, vas.shape)
    analgesic_class = np.where(
        months[None, :] == 0,
        np.searchsorted(np.asarray(p.analgesic_thresholds_baseline), need),
        np.searchsorted(np.asarray(p.analgesic_thresholds_follow_up), need),
    ).astype(np.int64)
    drugs = _drug_strings(r_drug, analgesic_class)
    mm_unit = r_drug.random(vas.shape) < p.vas_unit_mm_fraction

    # --- Events: new VCF and pain at another untreated level
    follow_index = np.arange(n_months)
    has_new = r_evt.random(n_pat) < p.new_vcf_probability
    new_latent_index = r_evt.integers(1, n_months, n_pat)
    seen_new = attended & (follow_index[None, :] >= new_latent_index[:, None]) & has_new[:, None]
    new_observed = np.asarray(seen_new.any(axis=1), dtype=bool)
    new_index = np.where(new_observed, np.argmax(seen_new, axis=1), -1)
    above = r_evt.random(n_pat) < 0.5
    block_end = block_start + counts - 1
    new_level_index = np.where(above, block_start - 1, block_end + 1)
    new_level_index = np.where(new_level_index < 0, block_end + 1, new_level_index)
    new_level_index = np.where(new_level_index >= n_levels, block_start - 1, new_level_index)
    new_level_index = np.clip(new_level_index, 0, n_levels - 1)

    has_pain = r_evt.random(n_pat) < p.other_pain_probability
    pain_onset = r_evt.integers(0, n_months, n_pat)
    pain_yes = has_pain[:, None] & (follow_index[None, :] >= pain_onset[:, None])
    pain_observed = np.asarray((pain_yes & attended).any(axis=1), dtype=bool)

    in_subgroup = (counts == 1) & ~new_observed & ~pain_observed
    in_subgroup_latent = (counts == 1) & ~has_new & ~has_pain

    # --- Codes
    width = max(5, len(str(n_pat)))
    codes = np.char.add("SIM", np.char.zfill(np.arange(1, n_pat + 1).astype(str), width))
    codes_obj = codes.astype(object)
    level_obj = np.asarray(level_names, dtype=object)

    frames: dict[str, pd.DataFrame] = {}
    frames["patients"] = pd.DataFrame(
        {
            "patient_code": codes_obj,
            "sex": np.where(female, "F", "M").astype(object),
            "birth_year": pd.array(birth_year, dtype="Int64"),
            "enrolled_date": _ns(visit_day[:, 0]),
            "notes": np.full(n_pat, "", dtype=object),
        }
    )

    cement_low, cement_high = p.cement_volume_range_ml
    uses_cement = p.procedure_type != ProcedureType.CONSERVATIVE
    cement_ml = np.round(r_morph.uniform(cement_low, cement_high, n_vcf), 1) * uses_cement
    frames["procedures"] = pd.DataFrame(
        {
            "patient_code": codes_obj[vcf_patient],
            "procedure_date": _ns(procedure_day[vcf_patient]),
            "procedure_type": np.full(n_vcf, str(p.procedure_type), dtype=object),
            "level": level_obj[vcf_level_index],
            "cement_volume_ml": cement_ml.astype(np.float64),
            "notes": np.full(n_vcf, "", dtype=object),
        }
    )

    frames["clinical"] = _clinical_frame(
        codes_obj,
        months,
        attended,
        outside,
        visit_day,
        vas,
        mm_unit,
        drugs,
        analgesic_class,
        pain_yes,
        new_index,
        level_obj[new_level_index],
    )

    frames["measurements"] = _measurement_frame(
        r_morph,
        p,
        codes_obj,
        months,
        attended,
        visit_day,
        female,
        vcf_patient,
        vcf_level_index,
        bme_recorded,
        cement_ml,
        level_names,
        new_index,
        new_level_index,
    )
    for name in _TABLE_NAMES:
        frames[name] = frames[name][TABLES[name].column_names]

    truth = _truth(
        codes_obj,
        months,
        counts,
        vcf_patient,
        level_obj[vcf_level_index],
        b0,
        decay,
        recurrence_index,
        bme_latent,
        relief,
        baseline_vas,
        has_new,
        new_latent_index,
        new_observed,
        new_index,
        level_obj[new_level_index],
        has_pain,
        pain_onset,
        pain_observed,
        dropout_index,
        in_subgroup,
        in_subgroup_latent,
        expected,
    )
    return SimulatedCohort(frames=frames, parameters=p, seed=seed, truth=truth)


def expected_bme_percent(params: CohortParameters) -> NDArray[np.float64]:
    """Model expectation of latent BME (percent) at each nominal month, no recurrence.

    Computed by quadrature over the baseline-extent and decay-rate distributions
    (deterministic, independent of any sample); used to centre the BME-pain
    coupling so that it does not shift the mean VAS.
    """
    n_nodes = 200
    u = (np.arange(n_nodes) + 0.5) / n_nodes
    a, b = params.bme_baseline_beta
    b0 = params.bme_baseline_min_percent + (
        params.bme_baseline_max_percent - params.bme_baseline_min_percent
    ) * stats.beta.ppf(u, a, b)
    decay = np.exp(params.decay_rate_log_mean + params.decay_rate_log_sd * stats.norm.ppf(u))
    months = np.asarray(params.nominal_months, dtype=np.float64)
    latent = b0[:, None, None] * np.exp(-decay[None, :, None] * months[None, None, :])
    latent = np.where(latent < params.bme_resolved_below_percent, 0.0, latent)
    return np.asarray(latent.mean(axis=(0, 1)), dtype=np.float64)


# --------------------------------------------------------------------------- helpers


def _procedure_type(value: ProcedureType | str) -> ProcedureType:
    try:
        return ProcedureType(str(value).strip().lower())
    except ValueError:
        choices = ", ".join(member.value for member in ProcedureType)
        msg = f"procedure_type {value!r} is not known; choose one of: {choices}."
        raise ValueError(msg) from None


def _as_date(value: dt.date | str) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        msg = f"study_start {value!r} is not a date; give a datetime.date or 'YYYY-MM-DD'."
        raise ValueError(msg) from None


def _level_counts(n_patients: int, n_vcf: int, three_fraction: float) -> NDArray[np.int64]:
    """Levels per patient (1-3) summing exactly to ``n_vcf``, sorted 1s, 2s, 3s."""
    extra = n_vcf - n_patients
    # k2 + 2 k3 = extra and k3 = f (k2 + k3)  ->  k3 = f extra / (1 + f)
    n_three = round(three_fraction * extra / (1 + three_fraction))
    n_three = min(max(n_three, extra - n_patients, 0), extra // 2)
    n_two = extra - 2 * n_three
    n_one = n_patients - n_two - n_three
    return np.repeat(np.array([1, 2, 3], dtype=np.int64), [n_one, n_two, n_three])


def _level_table(weights: tuple[tuple[str, float], ...]) -> tuple[list[str], NDArray[np.float64]]:
    """Levels sorted cranio-caudally with normalised weights (a contiguous range)."""
    given = {normalise_level(level): float(weight) for level, weight in weights}
    labels = sorted(label_from_level(level) for level in given)
    by_label = {label_from_level(level): level for level in given}
    names: list[str] = []
    values: list[float] = []
    # Fill gaps with weight 0 so that adjacent levels are neighbours in the table.
    for label in range(labels[0], labels[-1] + 1):
        name = by_label.get(label, level_from_label(label))
        names.append(name)
        values.append(given.get(name, 0.0))
    array = np.asarray(values, dtype=np.float64)
    return names, array / array.sum()


def _attendance(
    rng: np.random.Generator,
    n_pat: int,
    missing: tuple[float, ...],
    dropout_share: float,
) -> tuple[NDArray[np.bool_], NDArray[np.int64]]:
    """Attended visits: month 0 always; follow-ups miss by dropout or intermittently.

    Cumulative dropout by month m is ``dropout_share * missing[m]`` (one uniform
    per patient against increasing thresholds gives nested, monotone dropout);
    the intermittent probability makes the marginal missing share ``missing[m]``.
    """
    q = np.asarray(missing, dtype=np.float64)
    dropped_by = np.maximum.accumulate(dropout_share * q)
    intermittent = np.clip(1 - (1 - q) / (1 - dropped_by), 0, 1)
    u = rng.random(n_pat)
    dropped = u[:, None] < dropped_by[None, :]
    skipped = rng.random((n_pat, len(q))) < intermittent[None, :]
    follow = ~(dropped | skipped)
    attended = np.concatenate([np.ones((n_pat, 1), dtype=bool), follow], axis=1)
    # Index of the nominal month from which the patient dropped out (len(months) if never).
    dropout_index = np.where(dropped.any(axis=1), np.argmax(dropped, axis=1) + 1, len(q) + 1)
    return attended, dropout_index


def _visit_days(
    rng: np.random.Generator,
    n_pat: int,
    months: NDArray[np.int64],
    p: CohortParameters,
) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
    """Days from the procedure of each visit, and which are deliberately outside windows.

    In-window dates: nominal day + Normal(0, jitter) truncated to the window.
    Outside dates: uniform over days that lie in no window, within 45 days of
    the month's own window and closer to its nominal day than to any other, so
    visits of one patient never share a date and stay in order.
    """
    n_months = len(months)
    nominal = np.rint(months * DAYS_PER_MONTH).astype(np.int64)
    windows = np.asarray((0, *p.follow_up_window_days), dtype=np.int64)
    days = np.empty((n_pat, n_months), dtype=np.int64)
    days[:, 0] = -rng.integers(0, p.baseline_max_days_before + 1, n_pat)
    outside = np.zeros((n_pat, n_months), dtype=bool)
    jitter = np.rint(rng.normal(0, p.visit_jitter_sd_days, (n_pat, n_months - 1)))
    days[:, 1:] = nominal[None, 1:] + np.clip(jitter, -windows[None, 1:], windows[None, 1:])
    wants_outside = rng.random((n_pat, n_months - 1)) < p.outside_window_fraction
    pick = rng.random((n_pat, n_months - 1))
    for j in range(1, n_months):
        low = (nominal[j - 1] + nominal[j]) / 2
        high = (nominal[j] + nominal[j + 1]) / 2 if j + 1 < n_months else math.inf
        span = np.arange(nominal[j] - windows[j] - 45, nominal[j] + windows[j] + 46)
        in_any = np.zeros(len(span), dtype=bool)
        for k in range(1, n_months):
            in_any |= np.abs(span - nominal[k]) <= windows[k]
        candidates = span[(span > low) & (span < high) & (span > 0) & ~in_any]
        if len(candidates) == 0:
            continue
        rows = wants_outside[:, j - 1]
        choice = np.floor(pick[rows, j - 1] * len(candidates)).astype(np.int64)
        days[rows, j] = candidates[choice]
        outside[rows, j] = True
    return days, outside


def _bme_latent(
    rng: np.random.Generator,
    n_vcf: int,
    months: NDArray[np.int64],
    p: CohortParameters,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], NDArray[np.int64]]:
    """Latent BME (VCF x month), baseline extent, decay rate and recurrence month index."""
    a, b = p.bme_baseline_beta
    span = p.bme_baseline_max_percent - p.bme_baseline_min_percent
    b0 = p.bme_baseline_min_percent + span * rng.beta(a, b, n_vcf)
    decay = np.exp(rng.normal(p.decay_rate_log_mean, p.decay_rate_log_sd, n_vcf))
    t = months.astype(np.float64)
    latent = b0[:, None] * np.exp(-decay[:, None] * t[None, :])
    latent = np.where(latent < p.bme_resolved_below_percent, 0.0, latent)

    # Recurrence: a VCF absent at some month before the last may get BME back later.
    n_months = len(months)
    absent = latent < p.bme_present_threshold_percent
    first_absent = np.where(absent.any(axis=1), np.argmax(absent, axis=1), n_months)
    eligible = first_absent < n_months - 1
    recurs = eligible & (rng.random(n_vcf) < p.recurrence_probability)
    u_month = rng.random(n_vcf)
    u_value = rng.uniform(10.0, 40.0, n_vcf)
    later = np.maximum(n_months - 1 - first_absent, 1)
    recurrence_index = np.where(
        recurs, first_absent + 1 + np.floor(u_month * later).astype(np.int64), -1
    )
    if recurs.any():
        since = t[None, :] - t[np.maximum(recurrence_index, 0)][:, None]
        returned = u_value[:, None] * np.exp(-decay[:, None] * np.maximum(since, 0.0))
        after = recurs[:, None] & (np.arange(n_months)[None, :] >= recurrence_index[:, None])
        latent = np.where(after, returned, latent)
    return latent, b0, decay, recurrence_index


def _bme_recorded(
    rng: np.random.Generator,
    latent: NDArray[np.float64],
    recurrence_index: NDArray[np.int64],
    p: CohortParameters,
) -> NDArray[np.float64]:
    """Latent BME plus small noise, non-increasing within each episode, 0-100, 1 decimal."""
    noise = rng.normal(0.0, p.bme_noise_sd_percent, latent.shape)
    noisy = np.clip(np.where(latent > 0, latent + noise, 0.0), 0.0, 100.0)
    after = (
        np.arange(latent.shape[1])[None, :]
        >= np.where(recurrence_index >= 0, recurrence_index, latent.shape[1])[:, None]
    )
    before_min = np.minimum.accumulate(np.where(after, np.inf, noisy), axis=1)
    after_min = np.minimum.accumulate(np.where(after, noisy, np.inf), axis=1)
    return np.asarray(np.round(np.where(after, after_min, before_min), 1), dtype=np.float64)


def _drug_strings(rng: np.random.Generator, classes: NDArray[np.int64]) -> NDArray[np.object_]:
    """One drug-list string per visit, of the visit's class (checked against the lookup)."""
    for analgesic_class, choices in DRUG_CHOICES.items():
        for text in choices:
            derived = analgesic_class_of(split_drug_list(text)) if text != "none" else 0
            if derived != analgesic_class:
                msg = f"Drug list {text!r} has class {derived}, not {analgesic_class}."
                raise RuntimeError(msg)
    table = np.array([text for c in range(4) for text in DRUG_CHOICES[c]], dtype=object)
    sizes = np.array([len(DRUG_CHOICES[c]) for c in range(4)], dtype=np.int64)
    starts = np.cumsum(sizes) - sizes
    pick = np.floor(rng.random(classes.shape) * sizes[classes]).astype(np.int64)
    return table[starts[classes] + pick]


def _ns(days: NDArray[np.datetime64]) -> NDArray[np.datetime64]:
    return np.asarray(days, dtype="datetime64[D]").astype("datetime64[ns]")


def _clinical_frame(
    codes: NDArray[np.object_],
    months: NDArray[np.int64],
    attended: NDArray[np.bool_],
    outside: NDArray[np.bool_],
    visit_day: NDArray[np.datetime64],
    vas: NDArray[np.float64],
    mm_unit: NDArray[np.bool_],
    drugs: NDArray[np.object_],
    analgesic_class: NDArray[np.int64],
    pain_yes: NDArray[np.bool_],
    new_index: NDArray[np.int64],
    new_level: NDArray[np.object_],
) -> pd.DataFrame:
    patient, month_index = np.nonzero(attended)  # row-major: patient, then month
    nominal = pd.array(months[month_index], dtype="Int64")
    nominal[outside[patient, month_index]] = pd.NA
    mm = mm_unit[patient, month_index]
    value = vas[patient, month_index]
    classes = analgesic_class[patient, month_index]
    is_new = new_index[patient] == month_index
    return pd.DataFrame(
        {
            "patient_code": codes[patient],
            "visit_date": _ns(visit_day[patient, month_index]),
            "nominal_month": nominal,
            "vas": np.where(mm, np.round(value * 10, 1), value),
            "vas_unit": np.where(mm, "mm", "0-10").astype(object),
            "analgesic_drugs": drugs[patient, month_index],
            "analgesic_class": pd.array(classes, dtype="Int64"),
            "pain_other_level": np.where(pain_yes[patient, month_index], "yes", "no").astype(
                object
            ),
            "new_vcf_levels": np.where(is_new, new_level[patient], "").astype(object),
            "notes": np.full(len(patient), "", dtype=object),
        }
    )


def _measurement_frame(
    rng: np.random.Generator,
    p: CohortParameters,
    codes: NDArray[np.object_],
    months: NDArray[np.int64],
    attended: NDArray[np.bool_],
    visit_day: NDArray[np.datetime64],
    female: NDArray[np.bool_],
    vcf_patient: NDArray[np.int64],
    vcf_level_index: NDArray[np.int64],
    bme_recorded: NDArray[np.float64],
    cement_ml: NDArray[np.float64],
    level_names: list[str],
    new_index: NDArray[np.int64],
    new_level_index: NDArray[np.int64],
) -> pd.DataFrame:
    """Treated levels at every attended visit, plus each new VCF at its first visit."""
    n_vcf, n_months = bme_recorded.shape
    n_levels = len(level_names)
    level_obj = np.asarray(level_names, dtype=object)
    level_labels = np.array([label_from_level(name) for name in level_names], dtype=np.int64)
    # Body size grows caudally: ~20 ml / 19 mm at T5 to ~35 ml / 28 mm at L5.
    caudal = (level_labels - 12) / 12.0
    body_mean_ml = 20.0 + 15.0 * caudal
    height_mean_mm = 19.0 + 9.0 * caudal
    size = np.where(female, 1.0, 1.1)

    # Per treated VCF: expected size, baseline deformity, progression.
    vcf_size = size[vcf_patient] * rng.normal(1.0, 0.06, n_vcf)
    body_ml = body_mean_ml[vcf_level_index] * vcf_size
    expected_mm = height_mean_mm[vcf_level_index] * np.cbrt(vcf_size)
    grade = rng.choice(3, size=n_vcf, p=[0.3, 0.45, 0.25])
    bounds = np.asarray(_GRADE_BOUNDS_PERCENT)
    margin = 2.5  # keep baseline loss clear of grade edges so noise does not regrade it
    loss0 = np.asarray(rng.uniform(bounds[grade, 0] + margin, bounds[grade, 1] - margin))
    progresses = rng.random(n_vcf) < p.progression_probability
    delta = np.where(progresses, rng.uniform(1.0, 8.0, n_vcf), 0.0)
    deformity = np.asarray(rng.choice(3, size=n_vcf, p=[0.55, 0.30, 0.15]))
    rim_peak = np.asarray(rng.uniform(0.1, 0.8, n_vcf), dtype=np.float64)

    t = months.astype(np.float64)
    loss_true = loss0[:, None] + delta[:, None] * np.minimum(t[None, :] / 3.0, 1.0)
    loss_noise = np.clip(rng.normal(0.0, 0.5, (n_vcf, n_months)), -2.0, 2.0)
    loss = np.clip(loss_true + loss_noise, 0.0, 90.0)
    body_visit = body_ml[:, None] + rng.normal(0.0, 0.3, (n_vcf, n_months))
    treated = t[None, :] > 0
    cement_visit = np.where(
        treated, np.maximum(cement_ml[:, None] + rng.normal(0, 0.1, (n_vcf, n_months)), 0), 0.0
    ) * (cement_ml[:, None] > 0)
    rim = np.where(treated, rim_peak[:, None] * np.exp(-np.maximum(t - 3.0, 0.0) / 6.0), 0.0)
    rim = rim * (cement_ml[:, None] > 0)

    vcf, month_index = np.nonzero(attended[vcf_patient])
    rows = {
        "patient_index": vcf_patient[vcf],
        "month_index": month_index,
        "level_index": vcf_level_index[vcf],
        "bme_percent": bme_recorded[vcf, month_index],
        "body_volume_ml": body_visit[vcf, month_index],
        "cement_volume_ml": cement_visit[vcf, month_index],
        "rim_volume_ml": rim[vcf, month_index],
        "loss_percent": loss[vcf, month_index],
        "expected_mm": expected_mm[vcf],
        "deformity": deformity[vcf],
    }

    # New VCF: seen once, at the visit it appears: BME present, grade 1-2, no cement.
    new_patient = np.flatnonzero(new_index >= 0)
    n_new = len(new_patient)
    new_size = size[new_patient] * rng.normal(1.0, 0.06, n_new)
    new_level = new_level_index[new_patient]
    new_grade = rng.choice(2, size=n_new, p=[0.6, 0.4])
    new_rows = {
        "patient_index": new_patient,
        "month_index": new_index[new_patient],
        "level_index": new_level,
        "bme_percent": np.round(rng.uniform(30.0, 100.0, n_new), 1),
        "body_volume_ml": body_mean_ml[new_level] * new_size,
        "cement_volume_ml": np.zeros(n_new),
        "rim_volume_ml": np.zeros(n_new),
        "loss_percent": rng.uniform(bounds[new_grade, 0] + margin, bounds[new_grade, 1] - margin),
        "expected_mm": height_mean_mm[new_level] * np.cbrt(new_size),
        "deformity": rng.choice(2, size=n_new),
    }
    merged = {key: np.concatenate([rows[key], new_rows[key]]) for key in rows}
    order = np.lexsort((merged["level_index"], merged["month_index"], merged["patient_index"]))
    m = {key: value[order] for key, value in merged.items()}

    patient = m["patient_index"]
    month_idx = m["month_index"]
    body = np.round(m["body_volume_ml"], 2)
    cement = np.round(m["cement_volume_ml"], 2)
    bme = m["bme_percent"]
    loss_fraction = m["loss_percent"] / 100.0
    expected = m["expected_mm"]
    kind = m["deformity"]
    # Heights: the smallest is anterior (wedge), middle (biconcave) or posterior (crush).
    anterior = expected * np.select(
        [kind == 0, kind == 1], [1 - loss_fraction, 0.95], 0.97 - loss_fraction * 0.9
    )
    middle = expected * np.select(
        [kind == 0, kind == 1],
        [1 - 0.6 * loss_fraction, 1 - loss_fraction],
        1 - 0.95 * loss_fraction,
    )
    posterior = expected * np.select([kind == 0, kind == 1], [0.98, 0.96], 1 - loss_fraction)
    heights = np.round(np.stack([anterior, middle, posterior]), 1)
    loss_percent = np.round(100.0 * (1 - heights.min(axis=0) / expected), 1)
    genant = np.searchsorted(_GRADE_EDGES_PERCENT, loss_percent, side="right")
    n_rows = len(patient)
    return pd.DataFrame(
        {
            "patient_code": codes[patient],
            "visit_date": _ns(visit_day[patient, month_idx]),
            "level": level_obj[np.clip(m["level_index"], 0, n_levels - 1)],
            "bme_percent": bme,
            "body_volume_ml": body,
            "edema_volume_ml": np.round(bme / 100.0 * (body - cement), 2),
            "cement_volume_ml": cement,
            "rim_volume_ml": np.round(m["rim_volume_ml"], 2),
            "height_anterior_mm": heights[0],
            "height_middle_mm": heights[1],
            "height_posterior_mm": heights[2],
            "height_loss_percent": loss_percent,
            "genant_grade": pd.array(genant, dtype="Int64"),
            "deformity": _DEFORMITY_TYPES[kind],
            "source": np.full(n_rows, "simulated", dtype=object),
            "method_version": np.full(n_rows, f"bmetrack-simulate {__version__}", dtype=object),
            "reader": np.full(n_rows, "", dtype=object),
        }
    )


def _truth(
    codes: NDArray[np.object_],
    months: NDArray[np.int64],
    counts: NDArray[np.int64],
    vcf_patient: NDArray[np.int64],
    vcf_level: NDArray[np.object_],
    b0: NDArray[np.float64],
    decay: NDArray[np.float64],
    recurrence_index: NDArray[np.int64],
    bme_latent: NDArray[np.float64],
    relief: NDArray[np.float64],
    baseline_vas: NDArray[np.float64],
    has_new: NDArray[np.bool_],
    new_latent_index: NDArray[np.int64],
    new_observed: NDArray[np.bool_],
    new_index: NDArray[np.int64],
    new_level: NDArray[np.object_],
    has_pain: NDArray[np.bool_],
    pain_onset: NDArray[np.int64],
    pain_observed: NDArray[np.bool_],
    dropout_index: NDArray[np.int64],
    in_subgroup: NDArray[np.bool_],
    in_subgroup_latent: NDArray[np.bool_],
    expected: NDArray[np.float64],
) -> dict[str, pd.DataFrame]:
    def month_or_na(index: NDArray[np.int64], valid: NDArray[np.bool_]) -> pd.arrays.IntegerArray:
        values = pd.array(months[np.clip(index, 0, len(months) - 1)], dtype="Int64")
        values[~valid] = pd.NA
        return values

    vcf_codes = codes[vcf_patient]
    vcf = pd.DataFrame(
        {
            "patient_code": vcf_codes,
            "vcf_id": (vcf_codes.astype(str).astype(object) + ":" + vcf_level.astype(str)).astype(
                object
            ),
            "level": vcf_level,
            "baseline_bme_percent": b0,
            "decay_rate_per_month": decay,
            "half_life_months": np.log(2.0) / decay,
            "recurrence_month": month_or_na(recurrence_index, recurrence_index >= 0),
        }
    )
    for j, month in enumerate(months):
        vcf[f"latent_bme_percent_m{month}"] = bme_latent[:, j]

    patients = pd.DataFrame(
        {
            "patient_code": codes,
            "n_treated_vcf": counts,
            "baseline_vas_latent": baseline_vas,
            "relief_fraction": relief,
            "new_vcf_latent": has_new,
            "new_vcf_latent_month": month_or_na(new_latent_index, has_new),
            "new_vcf_level": np.where(has_new, new_level, "").astype(object),
            "new_vcf_observed": new_observed,
            "new_vcf_month": month_or_na(new_index, new_index >= 0),
            "pain_other_level_latent": has_pain,
            "pain_other_level_onset_month": month_or_na(pain_onset, has_pain),
            "pain_other_level_observed": pain_observed,
            "dropout_month": month_or_na(dropout_index, dropout_index < len(months)),
            "in_subgroup": in_subgroup,
            "in_subgroup_latent": in_subgroup_latent,
        }
    )
    expected_frame = pd.DataFrame({"month": months, "expected_bme_percent": expected})
    return {"vcf": vcf, "patients": patients, "expected_bme": expected_frame}
