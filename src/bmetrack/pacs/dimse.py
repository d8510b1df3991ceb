"""DIMSE networking: C-FIND + C-MOVE or C-GET pulls and a C-STORE receiver that de-identifies.

Needs the optional dependency ``pynetdicom`` (extra ``pacs``). For C-MOVE the PACS must know
our AE title, host and port (its modality list): it opens its own association to the
receiver that `pull_dimse` starts in-process. C-GET needs no receiver: the PACS sends the
instances back over our own association, as C-STOREs for the storage SOP classes we offer to
take (SCP/SCU role selection, PS3.7 D.3.3.4); it suits sites where the PACS cannot reach us.
"""

from __future__ import annotations

import datetime as dt
import enum
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pydicom import Dataset

from bmetrack.pacs.deidentify import Deidentifier
from bmetrack.pacs.dicomweb import PullReport, date_range

__all__ = [
    "DimseError",
    "Listener",
    "Retrieve",
    "find_studies",
    "listen",
    "parse_dimse_address",
    "parse_retrieve",
    "pull_dimse",
]

_SUCCESS = 0x0000
_PENDING = (0xFF00, 0xFF01)
_counter = itertools.count(1)

OnStudy = Callable[[Path, list[Path]], None]
_SUBOPERATIONS_DONE_WITH_FAILURES = 0xB000

#: Storage SOP classes (pynetdicom names) we take over a C-GET association: MR images and what
#: an MR study commonly also holds (results, screenshots, key images). At most 127 fit beside
#: the C-GET context; instances of other classes are reported as not sent.
GET_STORAGE_CLASSES: tuple[str, ...] = (
    "MRImageStorage",
    "EnhancedMRImageStorage",
    "EnhancedMRColorImageStorage",
    "LegacyConvertedEnhancedMRImageStorage",
    "MRSpectroscopyStorage",
    "SecondaryCaptureImageStorage",
    "SegmentationStorage",
    "BasicTextSRStorage",
    "EnhancedSRStorage",
    "ComprehensiveSRStorage",
    "Comprehensive3DSRStorage",
    "KeyObjectSelectionDocumentStorage",
    "GrayscaleSoftcopyPresentationStateStorage",
    "EncapsulatedPDFStorage",
    "RawDataStorage",
)


class Retrieve(enum.StrEnum):
    """How `pull_dimse` retrieves the studies it found."""

    MOVE = "move"  # C-MOVE to our C-STORE receiver (the PACS must know our AE)
    GET = "get"  # C-GET: the instances come back on our own association


class DimseError(RuntimeError):
    """The PACS refused an association or a query/retrieve request."""


def parse_dimse_address(address: str) -> tuple[str, int, str]:
    """``"HOST:PORT:AET"`` -> (host, port, AE title)."""
    parts = address.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2]:
        msg = f"DIMSE address must be HOST:PORT:AET (e.g. pacs:104:PACS), got {address!r}"
        raise ValueError(msg)
    return parts[0], int(parts[1]), parts[2]


def parse_retrieve(value: Retrieve | str) -> Retrieve:
    """``"move"`` / ``"get"`` (any case) -> `Retrieve`; ValueError naming the choices."""
    try:
        return Retrieve(str(value).strip().lower())
    except ValueError:
        msg = f"retrieve must be 'move' (C-MOVE) or 'get' (C-GET), got {value!r}"
        raise ValueError(msg) from None


def _pynetdicom() -> Any:
    try:
        import pynetdicom
    except ImportError as error:  # pragma: no cover - depends on the install
        msg = "DIMSE needs pynetdicom: pip install 'bmetrack[pacs]'"
        raise ImportError(msg) from error
    return pynetdicom


class Listener:
    """C-STORE receiver (storage SCP) on ``host:port`` that de-identifies what it receives.

    Each association's instances go to their own folder ``out_folder/assoc-<time>-<n>``; when
    the association ends, ``on_study(folder, files)`` is called (e.g. to file them with
    `bmetrack.study.dicom_import.import_dicom`). Instances of PatientIDs without a pseudonym
    are acknowledged but not written (counted in ``unmapped``).

    Use as a context manager, or `start` / `stop`.
    """

    def __init__(
        self,
        port: int,
        ae_title: str,
        out_folder: str | Path,
        *,
        host: str = "127.0.0.1",
        pseudonym_map: Mapping[str, str] | None = None,
        uid_secret: str = "",
        deidentify: bool = True,
        on_study: OnStudy | None = None,
    ) -> None:
        self.port = int(port)
        self.ae_title = ae_title
        self.host = host
        self.out_folder = Path(out_folder)
        self.pseudonym_map = pseudonym_map
        self.uid_secret = uid_secret
        self.deidentify = deidentify
        self.on_study = on_study
        self.files: list[Path] = []
        self.unmapped: dict[str, int] = {}
        self._open: dict[int, Deidentifier] = {}
        self._lock = threading.Lock()
        self._server: Any = None

    def _store_for(self, assoc: Any) -> Deidentifier:
        with self._lock:
            key = id(assoc)
            if key not in self._open:
                stamp = time.strftime("%Y%m%dT%H%M%S")
                folder = self.out_folder / f"assoc-{stamp}-{next(_counter)}"
                self._open[key] = Deidentifier(
                    folder, self.pseudonym_map, self.uid_secret, deidentify=self.deidentify
                )
            return self._open[key]

    def _handle_store(self, event: Any) -> int:
        dataset: Dataset = event.dataset
        dataset.file_meta = event.file_meta
        path = self._store_for(event.assoc).store(dataset)
        if path is not None:
            with self._lock:
                self.files.append(path)
        return _SUCCESS

    def _handle_end(self, event: Any) -> None:
        self._finish(event.assoc)

    def _finish(self, assoc: Any) -> None:
        """Close the association's folder: count unmapped patients, call ``on_study``."""
        with self._lock:
            store = self._open.pop(id(assoc), None)
            if store is None:
                return
            for patient_id, n in store.unmapped.items():
                self.unmapped[patient_id] = self.unmapped.get(patient_id, 0) + n
        if store.written and self.on_study is not None:
            self.on_study(store.out_folder, list(store.written))

    def _ae(self) -> Any:
        pnd = _pynetdicom()
        ae = pnd.AE(ae_title=self.ae_title)
        ae.supported_contexts = pnd.AllStoragePresentationContexts
        ae.add_supported_context(pnd.sop_class.Verification)
        return ae

    def start(self) -> Listener:
        """Start listening in background threads."""
        evt = _pynetdicom().evt
        handlers = [
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_RELEASED, self._handle_end),
            (evt.EVT_ABORTED, self._handle_end),
        ]
        self._server = self._ae().start_server(
            (self.host, self.port), block=False, evt_handlers=handlers
        )
        return self

    def stop(self) -> None:
        """Stop listening (open associations are ended)."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> Listener:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def listen(
    port: int,
    ae_title: str,
    out_folder: str | Path,
    *,
    on_study: OnStudy | None = None,
    host: str = "127.0.0.1",
    pseudonym_map: Mapping[str, str] | None = None,
    uid_secret: str = "",
    deidentify: bool = True,
) -> None:
    """Run a de-identifying C-STORE receiver until interrupted (Ctrl-C). See `Listener`."""
    listener = Listener(
        port,
        ae_title,
        out_folder,
        host=host,
        pseudonym_map=pseudonym_map,
        uid_secret=uid_secret,
        deidentify=deidentify,
        on_study=on_study,
    )
    with listener:
        try:
            while True:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass


def _associate(ae: Any, host: str, port: int, called_ae: str) -> Any:
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        msg = (
            f"the PACS {called_ae}@{host}:{port} refused the association from "
            f"{ae.ae_title}: check host, port, AE titles and that the PACS knows our AE"
        )
        raise DimseError(msg)
    return assoc


def find_studies(
    host: str,
    port: int,
    called_ae: str,
    patient_id: str,
    *,
    calling_ae: str = "BMETRACK",
    dates: tuple[dt.date | str | None, dt.date | str | None] | None = None,
) -> list[str]:
    """StudyInstanceUIDs of the MR studies of ``patient_id`` (C-FIND, study root)."""
    pnd = _pynetdicom()
    find = pnd.sop_class.StudyRootQueryRetrieveInformationModelFind
    ae = pnd.AE(ae_title=calling_ae)
    ae.add_requested_context(find)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = patient_id
    query.StudyDate = date_range(dates)
    query.ModalitiesInStudy = "MR"
    query.StudyInstanceUID = ""
    uids: list[str] = []
    assoc = _associate(ae, host, port, called_ae)
    try:
        for status, identifier in assoc.send_c_find(query, find):
            code = getattr(status, "Status", None)
            if code in _PENDING and identifier is not None:
                modalities = identifier.get("ModalitiesInStudy") or ["MR"]
                modalities = [modalities] if isinstance(modalities, str) else list(modalities)
                uid = str(identifier.get("StudyInstanceUID", "") or "")
                if uid and "MR" in modalities and uid not in uids:
                    uids.append(uid)
            elif code is not None and code != _SUCCESS:
                msg = f"C-FIND for PatientID {patient_id!r} failed with status 0x{code:04X}"
                raise DimseError(msg)
    finally:
        assoc.release()
    return uids


def _move_study(ae: Any, host: str, port: int, called_ae: str, uid: str, dest: str) -> None:
    move = _pynetdicom().sop_class.StudyRootQueryRetrieveInformationModelMove
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = uid
    assoc = _associate(ae, host, port, called_ae)
    try:
        final = None
        for status, _ in assoc.send_c_move(query, dest, move):
            final = getattr(status, "Status", None)
        if final != _SUCCESS:
            shown = "no response" if final is None else f"status 0x{final:04X}"
            msg = (
                f"C-MOVE of study {uid} to {dest} ended with {shown}: check that the PACS "
                f"lists AE {dest} with our host and port"
            )
            raise DimseError(msg)
    finally:
        assoc.release()


def _get_ae(ae_title: str) -> tuple[Any, list[Any]]:
    """An AE requesting C-GET plus the storage contexts we take, and the SCP role items."""
    pnd = _pynetdicom()
    ae = pnd.AE(ae_title=ae_title)
    ae.add_requested_context(pnd.sop_class.StudyRootQueryRetrieveInformationModelGet)
    roles = []
    for name in GET_STORAGE_CLASSES:
        uid = getattr(pnd.sop_class, name)
        ae.add_requested_context(uid, pnd.ALL_TRANSFER_SYNTAXES)
        roles.append(pnd.build_role(uid, scp_role=True))
    return ae, roles


def _get_study(
    host: str, port: int, called_ae: str, uid: str, ae_title: str, listener: Listener
) -> str | None:
    """C-GET one study; the instances are stored by ``listener``'s handler as they arrive.

    Returns a warning when the PACS could not send some instances (e.g. a SOP class we do not
    take), None when everything came.
    """
    pnd = _pynetdicom()
    ae, roles = _get_ae(ae_title)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = uid
    assoc = ae.associate(
        host,
        port,
        ae_title=called_ae,
        ext_neg=roles,
        evt_handlers=[(pnd.evt.EVT_C_STORE, listener._handle_store)],
    )
    if not assoc.is_established:
        msg = (
            f"the PACS {called_ae}@{host}:{port} refused the C-GET association from {ae_title}: "
            "check host, port, AE titles and that the PACS allows C-GET"
        )
        raise DimseError(msg)
    final: Dataset | None = None
    try:
        model = pnd.sop_class.StudyRootQueryRetrieveInformationModelGet
        for status, _ in assoc.send_c_get(query, model):
            if status is not None and getattr(status, "Status", None) is not None:
                final = status
    finally:
        assoc.release()
        listener._finish(assoc)
    code = None if final is None else int(final.Status)
    if code == _SUCCESS:
        return None
    if code == _SUBOPERATIONS_DONE_WITH_FAILURES and final is not None:
        failed = int(final.get("NumberOfFailedSuboperations", 0) or 0)
        done = int(final.get("NumberOfCompletedSuboperations", 0) or 0)
        return (
            f"C-GET of study {uid}: {failed} instances were not sent ({done} were); they are "
            "of a SOP class bmetrack does not take by C-GET (non-MR objects?) or the PACS "
            "failed to send them: use --retrieve move to fetch everything"
        )
    shown = "no response" if code is None else f"status 0x{code:04X}"
    msg = f"C-GET of study {uid} ended with {shown}: check that the PACS allows C-GET for us"
    raise DimseError(msg)


def pull_dimse(
    address: str,
    patient_ids: Iterable[str],
    *,
    out_folder: str | Path,
    ae_title: str = "BMETRACK",
    listen_port: int = 11112,
    listen_host: str = "127.0.0.1",
    dates: tuple[dt.date | str | None, dt.date | str | None] | None = None,
    pseudonym_map: Mapping[str, str] | None = None,
    deidentify: bool = True,
    uid_secret: str = "",
    retrieve: Retrieve | str = Retrieve.MOVE,
) -> PullReport:
    """C-FIND the MR studies of ``patient_ids`` and retrieve them with C-MOVE or C-GET.

    Parameters
    ----------
    address : str
        The PACS as ``HOST:PORT:AET``.
    patient_ids : iterable of str
        DICOM PatientIDs to search.
    out_folder : str or Path
        Where the de-identified files go (one subfolder per received association).
    ae_title, listen_port, listen_host : str, int, str
        Our AE title and receiver address: for C-MOVE the PACS must have them as a move
        destination (the receiver is not started for C-GET).
    dates, pseudonym_map, deidentify, uid_secret
        As `bmetrack.pacs.dicomweb.pull_dicomweb`.
    retrieve : {"move", "get"}
        C-MOVE to an in-process receiver, or C-GET over our own association. Instances a
        C-GET could not bring are listed in the report's ``warnings``.

    Returns
    -------
    PullReport

    Raises
    ------
    DimseError
        Association refused, query or move failed.
    """
    method = parse_retrieve(retrieve)
    host, port, called_ae = parse_dimse_address(address)
    pnd = _pynetdicom()
    report = PullReport(Path(out_folder))
    listener = Listener(
        listen_port,
        ae_title,
        out_folder,
        host=listen_host,
        pseudonym_map=pseudonym_map,
        uid_secret=uid_secret,
        deidentify=deidentify,
    )
    for patient_id in dict.fromkeys(patient_ids):
        found = find_studies(host, port, called_ae, patient_id, calling_ae=ae_title, dates=dates)
        report.studies.extend(uid for uid in found if uid not in report.studies)
    if method is Retrieve.GET:
        for uid in report.studies:
            warning = _get_study(host, port, called_ae, uid, ae_title, listener)
            if warning is not None:
                report.warnings.append(warning)
    else:
        with listener:
            ae = pnd.AE(ae_title=ae_title)
            ae.add_requested_context(pnd.sop_class.StudyRootQueryRetrieveInformationModelMove)
            for uid in report.studies:
                _move_study(ae, host, port, called_ae, uid, ae_title)
    report.files = list(listener.files)
    deid = Deidentifier(Path(out_folder), pseudonym_map)
    deid.unmapped = listener.unmapped
    report.skipped = deid.unmapped_message()
    return report
