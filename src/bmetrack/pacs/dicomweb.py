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

__all__ = ["PullReport", "StowResult", "date_range", "pull_dicomweb", "push_stow", "stow_and_check"]


@dataclass
class PullReport:
    """What a pull fetched and wrote."""

    out_folder: Path
    studies: list[str] = field(default_factory=list)  # original StudyInstanceUIDs fetched
    files: list[Path] = field(default_factory=list)  # de-identified files written
    skipped: str = ""  # PatientIDs without pseudonym, as a message
    warnings: list[str] = field(default_factory=list)  # e.g. instances the PACS did not send

    def summary(self) -> str:
        """One line for people (and one per warning)."""
        line = f"fetched {len(self.studies)} studies, wrote {len(self.files)} files"
        line = f"{line}; {self.skipped}" if self.skipped else line
        return "\n".join([line, *(f"  warning: {text}" for text in self.warnings)])


_HTTP_ATTEMPTS = 3
_HTTP_BACKOFF_MS = 500


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
    client = DICOMwebClient(url=url.rstrip("/"))
    # The default (5 tries, exponential back-off, on any error) waits 30 s for a server that
    # is down; 3 tries over 3 s still ride out a restart without stalling a batch per study.
    client.set_http_retry_params(
        retry=True, max_attempts=_HTTP_ATTEMPTS, wait_exponential_multiplier=_HTTP_BACKOFF_MS
    )
    return client


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


@dataclass
class StowResult:
    """What a STOW-RS server answered for a set of objects."""

    url: str
    stored: list[str] = field(default_factory=list)  # SOPInstanceUIDs the server stored
    failed: list[str] = field(default_factory=list)  # "UID: reason" of what it refused
    error: str = ""  # the request itself failed (network, HTTP status)

    @property
    def ok(self) -> bool:
        """Everything was stored."""
        return not self.failed and not self.error

    def summary(self) -> str:
        """One line for people."""
        if self.error:
            return f"push to {self.url} failed: {self.error}"
        line = f"pushed {len(self.stored)} objects to {self.url}"
        return f"{line}; refused: {'; '.join(self.failed)}" if self.failed else line


def stow_and_check(url: str, datasets: Sequence[Dataset]) -> StowResult:
    """`push_stow`, with the server's answer checked per object; never raises for a server
    or network failure (it is in the result), so a caller can go on with other studies.

    An object the server neither lists as stored nor as failed counts as failed.
    """
    if not datasets:
        msg = "datasets is empty: give at least one DICOM object to store"
        raise ValueError(msg)
    result = StowResult(url)
    try:
        response = push_stow(url, datasets)
    except Exception as error:  # requests' HTTP and connection errors, and the like
        result.error = f"{type(error).__name__}: {error}"
        return result
    result.stored = [
        str(item.ReferencedSOPInstanceUID) for item in response.get("ReferencedSOPSequence", [])
    ]
    for item in response.get("FailedSOPSequence", []):
        reason = item.get("FailureReason")
        shown = f"failure reason 0x{int(reason):04X}" if reason is not None else "no reason"
        result.failed.append(f"{item.get('ReferencedSOPInstanceUID', '?')}: {shown}")
    missing = [
        str(ds.SOPInstanceUID)
        for ds in datasets
        if str(ds.SOPInstanceUID) not in result.stored
        and not any(text.startswith(str(ds.SOPInstanceUID)) for text in result.failed)
    ]
    result.failed += [f"{uid}: not in the server's answer" for uid in missing]
    return result
