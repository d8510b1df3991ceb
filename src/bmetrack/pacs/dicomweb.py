"""DICOMweb client: find and fetch the study's MR studies (QIDO-RS + WADO-RS), store results
back (STOW-RS).

Needs the optional dependency ``dicomweb-client`` (extra ``pacs``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset

from bmetrack.pacs.deidentify import Deidentifier

__all__ = ["PullReport", "date_range", "pull_dicomweb", "push_stow"]


@dataclass
class PullReport:
    """What a pull fetched and wrote."""

    out_folder: Path
    studies: list[str] = field(default_factory=list)  # original StudyInstanceUIDs fetched
    files: list[Path] = field(default_factory=list)  # de-identified files written
    skipped: str = ""  # PatientIDs without pseudonym, as a message

    def summary(self) -> str:
        """One line for people."""
        line = f"fetched {len(self.studies)} studies, wrote {len(self.files)} files"
        return f"{line}; {self.skipped}" if self.skipped else line


def _da(value: dt.date | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, dt.date):
        return value.strftime("%Y%m%d")
    text = str(value).replace("-", "")
    try:
        dt.datetime.strptime(text, "%Y%m%d")
    except ValueError:
        msg = f"date must be YYYY-MM-DD or YYYYMMDD, got {value!r}"
        raise ValueError(msg) from None
    return text


def date_range(dates: tuple[dt.date | str | None, dt.date | str | None] | None) -> str:
    """A DICOM date range matching key ``"YYYYMMDD-YYYYMMDD"`` ('' = any date); either end may
    be None (open range)."""
    if dates is None:
        return ""
    start, end = _da(dates[0]), _da(dates[1])
    return f"{start}-{end}" if start or end else ""


def _client(url: str) -> Any:
    try:
        from dicomweb_client.api import DICOMwebClient
    except ImportError as error:  # pragma: no cover - depends on the install
        msg = "DICOMweb needs dicomweb-client: pip install 'bmetrack[pacs]'"
        raise ImportError(msg) from error
    return DICOMwebClient(url=url.rstrip("/"))


def _value(result: Mapping[str, Any], tag: str) -> str:
    values = result.get(tag, {}).get("Value") or [""]
    return str(values[0])


def pull_dicomweb(
    url: str,
    patient_ids: Iterable[str],
    *,
    out_folder: str | Path,
    dates: tuple[dt.date | str | None, dt.date | str | None] | None = None,
    pseudonym_map: Mapping[str, str] | None = None,
    deidentify: bool = True,
    uid_secret: str = "",
) -> PullReport:
    """Fetch every MR study of ``patient_ids`` in ``dates`` and write it, de-identified.

    Parameters
    ----------
    url : str
        DICOMweb service root, e.g. ``http://pacs:8042/dicom-web``.
    patient_ids : iterable of str
        DICOM PatientIDs to search (the keys of the pseudonym map).
    out_folder : str or Path
        Where the files go (see `bmetrack.pacs.deidentify.Deidentifier`); file them with
        `bmetrack.study.dicom_import.import_dicom`.
    dates : (start, end), optional
        Study date range (inclusive; either end None = open).
    pseudonym_map : mapping, optional
        PatientID -> patient code; without it the PatientIDs are the patient codes.
    deidentify : bool
        False writes what the PACS sends unchanged.
    uid_secret : str
        Secret of the UID remapping (same for every pull of a study).

    Returns
    -------
    PullReport
    """
    client = _client(url)
    store = Deidentifier(
        Path(out_folder), pseudonym_map, uid_secret=uid_secret, deidentify=deidentify
    )
    report = PullReport(Path(out_folder))
    when = date_range(dates)
    for patient_id in dict.fromkeys(patient_ids):
        filters = {"PatientID": patient_id, "ModalitiesInStudy": "MR"}
        if when:
            filters["StudyDate"] = when
        for result in client.search_for_studies(search_filters=filters):
            study_uid = _value(result, "0020000D")
            # Some servers ignore ModalitiesInStudy: check it here too.
            modalities = result.get("00080061", {}).get("Value") or ["MR"]
            if not study_uid or "MR" not in modalities or study_uid in report.studies:
                continue
            report.studies.append(study_uid)
            for instance in client.retrieve_study(study_uid):
                path = store.store(instance)
                if path is not None:
                    report.files.append(path)
    report.skipped = store.unmapped_message()
    return report


def push_stow(url: str, datasets: Sequence[Dataset]) -> Dataset:
    """Store ``datasets`` (e.g. a SEG and an SR of one study) with STOW-RS.

    Returns
    -------
    pydicom.Dataset
        The server's response (ReferencedSOPSequence lists what was stored; a
        FailedSOPSequence what was not).

    Raises
    ------
    ValueError
        ``datasets`` is empty.
    """
    if not datasets:
        msg = "datasets is empty: give at least one DICOM object to store"
        raise ValueError(msg)
    response: Dataset = _client(url).store_instances(list(datasets))
    return response
