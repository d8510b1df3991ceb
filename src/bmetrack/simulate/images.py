"""Synthetic MRI for a simulated cohort: one STIR + T1 DICOM study per imaged visit.

Each patient keeps one spine (anatomy, fracture shapes, cement casts) across
visits; the edema at each treated level follows the cohort's simulated BME
percent, so measurements made from these images can be compared with the
simulation's truth.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from bmetrack.simulate.cohort import SimulatedCohort
from bmetrack.simulate.phantom import PhantomParameters, phantom_for_visit

__all__ = ["DEMO_PHANTOM_PARAMETERS", "CohortImages", "patient_seed", "write_cohort_dicom"]

# Half the in-plane matrix of a clinical scan (same field of view): a demo cohort of ~240
# studies is generated and measured in minutes on two cores.
DEMO_PHANTOM_PARAMETERS = PhantomParameters(
    n_rows=256, n_columns=256, pixel_spacing_mm=1.2, sacrum_in_view=True
)
_FRACTURE_TYPES = {"wedge", "biconcave", "crush"}


@dataclass(frozen=True)
class CohortImages:
    """Where the studies were written and the phantom truth of each treated level."""

    folder: Path
    n_studies: int
    truth: pd.DataFrame  # patient_code, visit_date, level, bme_percent, cement_volume_ml, ...


def patient_seed(patient_code: str, cohort_seed: int) -> int:
    """A stable per-patient image seed (same spine at every visit)."""
    return zlib.crc32(f"{cohort_seed}:{patient_code}".encode()) & 0x7FFFFFFF


def _vcf_specs(rows: pd.DataFrame) -> list[dict[str, Any]]:
    specs = []
    for row in rows.itertuples(index=False):
        spec: dict[str, Any] = {
            "level": row.level,
            "bme_percent": float(row.bme_percent),
            "cement_volume_ml": 0.0
            if pd.isna(row.cement_volume_ml)
            else float(row.cement_volume_ml),
        }
        if not pd.isna(row.genant_grade) and int(row.genant_grade) >= 1:
            spec["grade"] = int(row.genant_grade)
        if isinstance(row.deformity, str) and row.deformity in _FRACTURE_TYPES:
            spec["fracture_type"] = row.deformity
        specs.append(spec)
    return specs


def _write_study(
    task: tuple[str, str, int, int, list[dict[str, Any]], str, PhantomParameters],
) -> pd.DataFrame:
    code, visit_date, month, seed, specs, folder, params = task
    phantom = phantom_for_visit(specs, month, seed, params=params)
    phantom.write_dicom(
        Path(folder) / code / visit_date,
        patient_id=code,
        study_date=visit_date.replace("-", ""),
    )
    truth = phantom.truth
    treated = truth[truth["level"].isin([spec["level"] for spec in specs])]
    return treated.assign(patient_code=code, visit_date=visit_date, month=month)


def write_cohort_dicom(
    cohort: SimulatedCohort,
    folder: str | Path,
    *,
    params: PhantomParameters = DEMO_PHANTOM_PARAMETERS,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> CohortImages:
    """Write one DICOM study (``folder/<patient>/<date>/{stir,t1}``) per imaged visit.

    The imaged visits and the levels to show are the rows of the cohort's
    ``measurements`` table; their ``bme_percent``, cement volume, Genant grade
    and deformity drive the phantom.
    """
    folder = Path(folder)
    measurements = cohort.frames["measurements"]
    procedures = cohort.frames["procedures"]
    first = procedures.groupby("patient_code")["procedure_date"].min()
    tasks = []
    for (code, date), rows in measurements.groupby(["patient_code", "visit_date"], sort=True):
        days = (pd.Timestamp(date) - first[code]).days
        month = max(0, round(days / (365.25 / 12)))
        tasks.append(
            (
                str(code),
                pd.Timestamp(date).date().isoformat(),
                int(month),
                patient_seed(str(code), cohort.seed),
                _vcf_specs(rows),
                str(folder),
                params,
            )
        )
    truths: list[pd.DataFrame] = []
    if workers <= 1:
        for i, task in enumerate(tasks, start=1):
            truths.append(_write_study(task))
            if progress:
                progress(i, len(tasks))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for i, truth in enumerate(pool.map(_write_study, tasks, chunksize=4), start=1):
                truths.append(truth)
                if progress:
                    progress(i, len(tasks))
    truth = pd.concat(truths, ignore_index=True) if truths else pd.DataFrame()
    return CohortImages(folder=folder, n_studies=len(tasks), truth=truth)
