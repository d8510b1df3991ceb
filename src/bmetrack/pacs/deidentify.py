"""De-identification of DICOM on arrival (PS3.15 Annex E, Basic Application Level Confidentiality
Profile), with the options a longitudinal study needs.

Applied to every instance pulled from a PACS or received by the C-STORE listener, before it
touches the disk:

- the attributes of the basic profile table (names, identifiers, birth date, addresses,
  institution, physicians, accession number, comments, ...) are removed (action X) or emptied
  (actions Z/D, kept present because they are Type 2 in the IODs);
- PatientID is replaced by the study's pseudonym (the patient code), so that
  `bmetrack.study.dicom_import.import_dicom` files the result without a pseudonym map;
- every instance UID (study, series, SOP instance, frame of reference, referenced instances,
  ...) is replaced by a deterministic UID derived from the original and a secret, so that the
  study/series/instance relations and references hold across instances, pulls and listeners,
  and a re-pull is recognised as the same study; well-known UIDs (SOP classes, transfer
  syntaxes, coding schemes) are kept;
- private tags, curve data and overlay data/comments are removed;
- dates and times are kept ("Retain Longitudinal Temporal Information With Full Dates Option",
  DCM 113106), because the visit windows are computed from the study date relative to the
  procedure date. ``date_offset_days`` shifts every date of a patient by the same number of
  days instead ("... With Modified Dates Option", DCM 113107); the procedure dates in the
  database must then be shifted by the same offset;
- SeriesDescription, ProtocolName and StudyDescription are kept after cleaning ("Clean
  Descriptors Option", DCM 113105): a descriptor that contains any component of the patient's
  name or identifiers is emptied. The series classification of the importer needs them;
- PatientIdentityRemoved = YES, DeidentificationMethod and DeidentificationMethodCodeSequence
  record what was done.

To push results (SEG, SR) made from de-identified images back to the hospital's PACS,
`reverse_uid_map` rebuilds de-identified -> original UIDs from the originals the PACS lists and
the pull's secret (nothing identifying is stored), and `restore_uids` puts them back.

The pseudonym map (DICOM PatientID -> patient code) is the same CSV as ``import-dicom
--pseudonym-map`` (`bmetrack.study.dicom_import.read_pseudonym_map`); it stays with the user
(or the PACS gateway), never in the database or the de-identified files.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRLittleEndian

from bmetrack import __version__

__all__ = [
    "BASIC_PROFILE_EMPTY",
    "BASIC_PROFILE_REMOVE",
    "CLEANED_DESCRIPTORS",
    "DeidentificationError",
    "Deidentifier",
    "deidentify_dataset",
    "remap_uid",
    "restore_uids",
    "reverse_uid_map",
    "uid_secret_or_default",
]


class DeidentificationError(ValueError):
    """An instance cannot be de-identified (e.g. its patient has no pseudonym)."""


#: Basic profile attributes emptied (actions Z and D of PS3.15 Table E.1-1; the IODs make them
#: Type 2, so they stay present with no value).
BASIC_PROFILE_EMPTY: tuple[str, ...] = (
    "AccessionNumber",
    "ContentCreatorName",
    "PatientBirthDate",
    "PatientName",
    "PatientSex",
    "ReferringPhysicianName",
    "StudyID",
    "VerifyingObserverName",
    "PersonName",
)

#: Basic profile attributes removed (action X, and X/Z, X/D, X/Z/D of Table E.1-1).
BASIC_PROFILE_REMOVE: tuple[str, ...] = (
    "AcquisitionComments",
    "AcquisitionDeviceProcessingDescription",
    "ActualHumanPerformersSequence",
    "AdditionalPatientHistory",
    "AdmissionID",
    "AdmittingDiagnosesCodeSequence",
    "AdmittingDiagnosesDescription",
    "Allergies",
    "Arbitrary",
    "AuthorObserverSequence",
    "BranchOfService",
    "CommentsOnThePerformedProcedureStep",
    "ConfidentialityConstraintOnPatientDataDescription",
    "ConsultingPhysicianName",
    "ContentSequence",
    "ContributionDescription",
    "CountryOfResidence",
    "CurrentPatientLocation",
    "CustodialOrganizationSequence",
    "DerivationDescription",
    "DeviceSerialNumber",
    "DischargeDiagnosisDescription",
    "DistributionAddress",
    "DistributionName",
    "EthnicGroup",
    "FillerOrderNumberImagingServiceRequest",
    "FrameComments",
    "GantryID",
    "GeneratorID",
    "HumanPerformerName",
    "HumanPerformerOrganization",
    "IconImageSequence",
    "IdentifyingComments",
    "ImageComments",
    "ImagePresentationComments",
    "ImagingServiceRequestComments",
    "InstitutionAddress",
    "InstitutionCodeSequence",
    "InstitutionName",
    "InstitutionalDepartmentName",
    "InsurancePlanIdentification",
    "IntendedRecipientsOfResultsIdentificationSequence",
    "InterpretationApproverSequence",
    "InterpretationAuthor",
    "InterpretationIDIssuer",
    "InterpretationRecorder",
    "InterpretationText",
    "InterpretationTranscriber",
    "IssuerOfAdmissionID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "MedicalAlerts",
    "MedicalRecordLocator",
    "MilitaryRank",
    "ModifiedAttributesSequence",
    "ModifyingDeviceID",
    "ModifyingDeviceManufacturer",
    "NameOfPhysiciansReadingStudy",
    "NamesOfIntendedRecipientsOfResults",
    "Occupation",
    "OperatorIdentificationSequence",
    "OperatorsName",
    "OrderCallbackPhoneNumber",
    "OrderEnteredBy",
    "OrderEntererLocation",
    "OriginalAttributesSequence",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "ParticipantSequence",
    "PatientAddress",
    "PatientAge",
    "PatientBirthName",
    "PatientBirthTime",
    "PatientComments",
    "PatientInsurancePlanCodeSequence",
    "PatientMotherBirthName",
    "PatientPrimaryLanguageCodeSequence",
    "PatientReligiousPreference",
    "PatientSize",
    "PatientState",
    "PatientTelephoneNumbers",
    "PatientTransportArrangements",
    "PatientWeight",
    "PerformedLocation",
    "PerformedProcedureStepDescription",
    "PerformedProcedureStepID",
    "PerformedStationAETitle",
    "PerformedStationGeographicLocationCodeSequence",
    "PerformedStationName",
    "PerformedStationNameCodeSequence",
    "PerformingPhysicianIdentificationSequence",
    "PerformingPhysicianName",
    "PersonAddress",
    "PersonIdentificationCodeSequence",
    "PersonTelephoneNumbers",
    "PhysicianApprovingInterpretation",
    "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence",
    "PhysiciansReadingStudyIdentificationSequence",
    "PlacerOrderNumberImagingServiceRequest",
    "PreMedication",
    "PregnancyStatus",
    "ReasonForTheImagingServiceRequest",
    "ReasonForStudy",
    "ReferencedDigitalSignatureSequence",
    "ReferencedPatientAliasSequence",
    "ReferencedPatientSequence",
    "ReferencedPerformedProcedureStepSequence",
    "ReferencedSOPInstanceMACSequence",
    "ReferringPhysicianAddress",
    "ReferringPhysicianIdentificationSequence",
    "ReferringPhysicianTelephoneNumbers",
    "RegionOfResidence",
    "RequestAttributesSequence",
    "RequestedContrastAgent",
    "RequestedProcedureComments",
    "RequestedProcedureID",
    "RequestedProcedureLocation",
    "RequestingPhysician",
    "RequestingService",
    "ResponsibleOrganization",
    "ResponsiblePerson",
    "ResultsComments",
    "ResultsDistributionListSequence",
    "ResultsIDIssuer",
    "ScheduledHumanPerformersSequence",
    "ScheduledPatientInstitutionResidence",
    "ScheduledPerformingPhysicianIdentificationSequence",
    "ScheduledPerformingPhysicianName",
    "ScheduledProcedureStepLocation",
    "ScheduledStationAETitle",
    "ScheduledStationGeographicLocationCodeSequence",
    "ScheduledStationName",
    "ScheduledStationNameCodeSequence",
    "ScheduledStudyLocation",
    "ScheduledStudyLocationAETitle",
    "ServiceEpisodeDescription",
    "ServiceEpisodeID",
    "SmokingStatus",
    "SpecialNeeds",
    "StationName",
    "StudyComments",
    "TextComments",
    "TextString",
    "TopicAuthor",
    "TopicKeywords",
    "TopicSubject",
    "TopicTitle",
    "VerifyingObserverIdentificationCodeSequence",
    "VerifyingObserverSequence",
    "VerifyingOrganization",
    "VisitComments",
)

#: Descriptors kept under the Clean Descriptors Option (emptied when they name the patient).
CLEANED_DESCRIPTORS: tuple[str, ...] = ("SeriesDescription", "ProtocolName", "StudyDescription")

_BASIC_PROFILE = ("113100", "Basic Application Confidentiality Profile")
_CLEAN_DESCRIPTORS = ("113105", "Clean Descriptors Option")
_FULL_DATES = ("113106", "Retain Longitudinal Temporal Information Full Dates Option")
_MODIFIED_DATES = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")
_IDENTITY_KEYWORDS = ("PatientName", "PatientID", "OtherPatientIDs", "PatientBirthName")


def uid_secret_or_default(uid_secret: str | None, study_code: str) -> str:
    """The UID remapping secret: ``uid_secret``, else (None or empty) the study code, which is
    reproducible but guessable by anyone who knows the code."""
    return uid_secret or study_code


def remap_uid(uid: str, secret: str) -> str:
    """The de-identified UID of ``uid``: ``2.25.<integer>`` from an HMAC-SHA256 of ``uid``
    keyed with ``secret``.

    Deterministic (the same UID and secret always give the same result, so relations between
    instances and repeated pulls stay consistent); without the secret it cannot be reversed
    or confirmed by hashing a guessed original UID. Well-known UIDs (SOP classes, transfer
    syntaxes, ...) are returned unchanged.
    """
    if not uid or UID(uid).name != uid:  # a registered UID has a name in pydicom's dictionary
        return uid
    digest = hmac.new(secret.encode(), uid.encode(), hashlib.sha256).digest()
    # A 128-bit integer under the UUID root 2.25 (PS3.5 B.2): at most 44 characters.
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def _shift_date(value: str, offset_days: int) -> str:
    if not value or offset_days == 0:
        return value
    parsed = dt.datetime.strptime(value[:8], "%Y%m%d").date() + dt.timedelta(days=offset_days)
    return parsed.strftime("%Y%m%d") + value[8:]


def _identity_tokens(ds: Dataset) -> set[str]:
    tokens: set[str] = set()
    for keyword in _IDENTITY_KEYWORDS:
        value = str(ds.get(keyword, "") or "")
        tokens.update(t.upper() for t in re.split(r"[\^\s,\\]+", value) if len(t) >= 3)
    return tokens


def _clean_descriptor(value: str, tokens: set[str]) -> str:
    upper = value.upper()
    return "" if any(token in upper for token in tokens) else value


def _walk(ds: Dataset, secret: str, offset_days: int) -> None:
    """Remove private and basic-profile attributes, remap UIDs, shift dates, recursively."""
    to_delete: list[BaseTag] = []
    for elem in ds:
        group = elem.tag.group
        if elem.tag.is_private:
            to_delete.append(elem.tag)
        elif 0x5000 <= group <= 0x50FF or (
            0x6000 <= group <= 0x60FF and elem.tag.element in (0x3000, 0x4000)
        ):
            to_delete.append(elem.tag)  # curve data, overlay data and comments
        elif elem.keyword in BASIC_PROFILE_REMOVE:
            to_delete.append(elem.tag)
        elif elem.keyword in BASIC_PROFILE_EMPTY:
            elem.value = [] if elem.VR == "SQ" else ""
        elif elem.VR == "UI" and elem.value:
            _remap_element(elem, secret)
        elif elem.VR in ("DA", "DT") and elem.value and offset_days:
            _shift_element(elem, offset_days)
        elif elem.VR == "SQ":
            for item in elem.value:
                _walk(item, secret, offset_days)
    for tag in to_delete:
        del ds[tag]


def _remap_element(elem: DataElement, secret: str) -> None:
    if elem.VM > 1:
        elem.value = [remap_uid(str(v), secret) for v in elem.value]
    else:
        elem.value = remap_uid(str(elem.value), secret)


def reverse_uid_map(original_uids: Iterable[str], secret: str) -> dict[str, str]:
    """De-identified UID -> original UID, for the given originals (e.g. the UIDs of the
    patient's studies, series and instances listed by the PACS) and the pull's secret."""
    return {remap_uid(uid, secret): uid for uid in original_uids}


def restore_uids(
    dataset: Dataset,
    reverse: Mapping[str, str],
    *,
    patient_id: str | None = None,
    patient_name: str | None = None,
) -> Dataset:
    """A copy of ``dataset`` (e.g. a SEG or SR made from de-identified images) with every UID
    found in ``reverse`` (see `reverse_uid_map`) put back to the original, so that the result
    references the hospital's study, series and instances when pushed back to its PACS.

    With ``patient_id`` (and ``patient_name``) the patient identity is restored too, so the
    PACS files the object under its patient; the de-identification attributes are dropped.
    """
    out = copy.deepcopy(dataset)
    if patient_id is not None:
        out.PatientID = patient_id
        out.PatientName = patient_name or ""
        for keyword in (
            "PatientIdentityRemoved",
            "DeidentificationMethod",
            "DeidentificationMethodCodeSequence",
        ):
            if keyword in out:
                delattr(out, keyword)

    def visit(ds: Dataset) -> None:
        for elem in ds:
            if elem.VR == "UI" and elem.value:
                if elem.VM > 1:
                    elem.value = [reverse.get(str(v), str(v)) for v in elem.value]
                else:
                    elem.value = reverse.get(str(elem.value), str(elem.value))
            elif elem.VR == "SQ":
                for item in elem.value:
                    visit(item)

    visit(out)
    meta = getattr(out, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    return out


def _shift_element(elem: DataElement, offset_days: int) -> None:
    if elem.VM > 1:
        elem.value = [_shift_date(str(v), offset_days) for v in elem.value]
    else:
        elem.value = _shift_date(str(elem.value), offset_days)


def _code_item(code: tuple[str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue = code[0]
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = code[1]
    return item


@dataclass(frozen=True)
class _Options:
    codes: tuple[tuple[str, str], ...]
    method: str


def _options(offset_days: int) -> _Options:
    dates = _MODIFIED_DATES if offset_days else _FULL_DATES
    codes = (_BASIC_PROFILE, _CLEAN_DESCRIPTORS, dates)
    method = f"bmetrack {__version__}: " + "; ".join(meaning for _, meaning in codes)
    return _Options(codes, method[:64])


def deidentify_dataset(
    dataset: Dataset,
    patient_code: str,
    *,
    uid_secret: str,
    date_offset_days: int = 0,
) -> Dataset:
    """A de-identified copy of ``dataset`` (the input is not modified).

    Parameters
    ----------
    dataset : pydicom.Dataset
        One instance as received (with or without file meta information).
    patient_code : str
        The pseudonym: becomes PatientID (PatientName is emptied).
    uid_secret : str
        Secret mixed into every remapped UID (see `remap_uid`). Use the same secret for every
        pull of a study so that the same DICOM study is recognised; keep it out of the files.
    date_offset_days : int
        0 (default) keeps all dates (Full Dates Option); otherwise every DA/DT value is shifted
        by this many days (Modified Dates Option) -- use one offset per patient.

    Returns
    -------
    pydicom.Dataset

    Raises
    ------
    DeidentificationError
        ``patient_code`` is empty.
    """
    if not patient_code or not str(patient_code).strip():
        msg = f"patient_code must be a non-empty pseudonym, got {patient_code!r}"
        raise DeidentificationError(msg)
    ds = copy.deepcopy(dataset)
    tokens = _identity_tokens(ds)
    for keyword in CLEANED_DESCRIPTORS:
        if keyword in ds:
            ds[keyword].value = _clean_descriptor(str(ds[keyword].value or ""), tokens)
    _walk(ds, uid_secret, int(date_offset_days))
    ds.PatientID = str(patient_code)
    ds.PatientName = ""
    ds.PatientIdentityRemoved = "YES"
    options = _options(int(date_offset_days))
    ds.DeidentificationMethod = options.method
    ds.DeidentificationMethodCodeSequence = DicomSequence([_code_item(c) for c in options.codes])
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _with_file_meta(ds: Dataset) -> Dataset:
    """``ds`` with the file meta information a Part 10 file needs."""
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = FileMetaDataset()
        ds.file_meta = meta
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


@dataclass
class Deidentifier:
    """De-identifies instances with a pseudonym map and writes them as DICOM files.

    Files go to ``out_folder/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``
    (the de-identified UIDs), which `bmetrack.study.dicom_import.import_dicom` scans.

    Parameters
    ----------
    out_folder : Path
        Where to write (created).
    pseudonym_map : mapping of str -> str, optional
        DICOM PatientID -> patient code. Without a map, the PatientID must already be the
        patient code (it is kept; everything else is still de-identified).
    uid_secret : str
        See `deidentify_dataset`.
    date_offsets_days : mapping of str -> int, optional
        Patient code -> date shift (default: dates kept).
    deidentify : bool
        False writes the instances unchanged (for a PACS that already de-identifies).
    """

    out_folder: Path
    pseudonym_map: Mapping[str, str] | None = None
    uid_secret: str = ""
    date_offsets_days: Mapping[str, int] = field(default_factory=dict)
    deidentify: bool = True
    written: list[Path] = field(default_factory=list)
    unmapped: dict[str, int] = field(default_factory=dict)

    def patient_code(self, patient_id: str) -> str | None:
        """The pseudonym of a DICOM PatientID, or None when the map lacks it."""
        if self.pseudonym_map is None:
            return patient_id or None
        return self.pseudonym_map.get(patient_id)

    def store(self, dataset: Dataset) -> Path | None:
        """De-identify and write one instance; None (and counted in ``unmapped``) when its
        PatientID has no pseudonym: such an instance is never written."""
        patient_id = str(dataset.get("PatientID", "") or "")
        if self.deidentify:
            code = self.patient_code(patient_id)
            if code is None:
                self.unmapped[patient_id] = self.unmapped.get(patient_id, 0) + 1
                return None
            dataset = deidentify_dataset(
                dataset,
                code,
                uid_secret=self.uid_secret,
                date_offset_days=self.date_offsets_days.get(code, 0),
            )
        dataset = _with_file_meta(dataset)
        folder = Path(self.out_folder) / dataset.StudyInstanceUID / dataset.SeriesInstanceUID
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{dataset.SOPInstanceUID}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        self.written.append(path)
        return path

    def unmapped_message(self) -> str:
        """One line naming the PatientIDs skipped for lack of a pseudonym ('' when none)."""
        if not self.unmapped:
            return ""
        ids = ", ".join(f"{pid!r} ({n} instances)" for pid, n in sorted(self.unmapped.items()))
        return (
            f"skipped instances of PatientIDs without a pseudonym: {ids}; add rows "
            "dicom_patient_id,patient_code to the pseudonym map to pull them"
        )
