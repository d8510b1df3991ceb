"""Pull a study's MRI from a PACS, de-identified, and file it: fetch -> de-identify ->
`bmetrack.study.dicom_import.import_dicom`.

The patients searched are the keys of the pseudonym map (DICOM PatientID -> patient code, the
CSV of ``import-dicom --pseudonym-map``); without a map, the study's patient codes are used as
PatientIDs. Files are written with PatientID = patient code, so the import needs no map.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from pathlib import Path

from sqlalchemy import Engine, select

from bmetrack.pacs.deidentify import uid_secret_or_default
from bmetrack.pacs.dicomweb import PullReport, pull_dicomweb
from bmetrack.pacs.dimse import Retrieve, parse_retrieve, pull_dimse
from bmetrack.settings import Settings
from bmetrack.study.db import session_scope
from bmetrack.study.dicom_import import DicomImportReport, import_dicom, read_pseudonym_map
from bmetrack.study.models import Patient, Study
from bmetrack.study.records import get_study

__all__ = ["pull_study", "study_patient_codes"]

DateRange = tuple[dt.date | str | None, dt.date | str | None]


def study_patient_codes(engine: Engine, study_code: str) -> list[str]:
    """The patient codes of study ``study_code`` (sorted); RecordNotFoundError for an unknown
    study."""
    with session_scope(engine) as session:
        get_study(session, study_code)
        codes = session.scalars(
            select(Patient.code)
            .join(Study, Patient.study_id == Study.id)
            .where(Study.code == study_code)
        ).all()
    return sorted(codes)


def pull_study(
    engine: Engine,
    study_code: str,
    out_folder: str | Path,
    *,
    actor: str,
    dicomweb: str | None = None,
    dimse: str | None = None,
    pseudonym_map: Mapping[str, str] | str | Path | None = None,
    dates: DateRange | None = None,
    uid_secret: str | None = None,
    deidentify: bool = True,
    ae_title: str = "BMETRACK",
    listen_port: int = 11112,
    retrieve: Retrieve | str = Retrieve.MOVE,
    settings: Settings | None = None,
    strict: bool = False,
) -> tuple[PullReport, DicomImportReport]:
    """Fetch the study's MR studies from a PACS, de-identify them and file them.

    Parameters
    ----------
    engine : Engine
        The study database (patients and procedures already imported).
    study_code : str
        Study to file into.
    out_folder : str or Path
        Where the de-identified files are kept (the imaging sessions point at them).
    actor : str
        Recorded in the audit trail.
    dicomweb : str, optional
        DICOMweb root URL. Exactly one of ``dicomweb`` and ``dimse``.
    dimse : str, optional
        ``HOST:PORT:AET`` of the PACS; it must list ``ae_title`` at this host's
        ``listen_port`` as a move destination.
    pseudonym_map : mapping or CSV path, optional
        DICOM PatientID -> patient code.
    dates : (start, end), optional
        Study date range (inclusive).
    uid_secret : str, optional
        Secret of the UID remapping; default (None or empty) the study code (reproducible but
        guessable: give a real secret, and the same one on every pull).
    deidentify : bool
        False files the PACS's data unchanged (the map is then used by the import).
    ae_title, listen_port : str, int
        Our AE title and C-STORE receiver port (DIMSE only; the port is used by C-MOVE).
    retrieve : {"move", "get"}
        DIMSE retrieval: C-MOVE to our receiver, or C-GET over our own association.
    settings, strict
        As `bmetrack.study.dicom_import.import_dicom`.

    Returns
    -------
    (PullReport, DicomImportReport)

    Raises
    ------
    RecordNotFoundError
        For an unknown study, before any network traffic.
    ValueError
        For a study without patients (and no map), or inconsistent source options.
    """
    if (dicomweb is None) == (dimse is None):
        msg = "give exactly one source: dicomweb (a URL) or dimse (HOST:PORT:AET)"
        raise ValueError(msg)
    method = parse_retrieve(retrieve)
    if dicomweb is not None and method is not Retrieve.MOVE:
        msg = f"retrieve={retrieve!r} applies to dimse only; drop it for a DICOMweb pull"
        raise ValueError(msg)
    # An unknown study, or one without patients, is refused before any traffic.
    codes = study_patient_codes(engine, study_code)
    mapping = None if pseudonym_map is None else read_pseudonym_map(pseudonym_map)
    patient_ids = list(mapping) if mapping else codes
    if not patient_ids:
        msg = (
            f"study {study_code!r} has no patients, so there is nothing to ask the PACS for: "
            "import the cohort first (bmetrack import) or give a pseudonym map"
        )
        raise ValueError(msg)
    secret = uid_secret_or_default(uid_secret, study_code)
    if dicomweb is not None:
        pulled = pull_dicomweb(
            dicomweb,
            patient_ids,
            out_folder=out_folder,
            dates=dates,
            pseudonym_map=mapping,
            deidentify=deidentify,
            uid_secret=secret,
        )
    else:
        assert dimse is not None
        pulled = pull_dimse(
            dimse,
            patient_ids,
            out_folder=out_folder,
            ae_title=ae_title,
            listen_port=listen_port,
            retrieve=method,
            dates=dates,
            pseudonym_map=mapping,
            deidentify=deidentify,
            uid_secret=secret,
        )
    filed = import_dicom(
        engine,
        study_code,
        out_folder,
        actor=actor,
        settings=settings,
        pseudonym_map=None if deidentify else mapping,
        strict=strict,
    )
    return pulled, filed
