# twisted.web, twisted.enterprise and twisted.application are not annotated.
# mypy: disable-error-code="no-untyped-call"
"""
The local DMP's web services: the DMP's paths under
C{/si-dmp-server/v2/services}, each taking the SOAP 1.2 actions the DMP's
WSDLs give it, answering with the DMP's shapes and error codes.

  - C{patients}: TD0.2 (PRPA_IN201307UV02);
  - C{repository}: TD2.1 (ProvideAndRegisterDocumentSet-b, MTOM) and TD3.2
    (RetrieveDocumentSet, MTOM answer);
  - C{registry}: TD3.1 (RegistryStoredQuery: FindDocuments, GetDocuments)
    and TD3.3 (UpdateDocumentSet).

Every request must come over mutual TLS and carry a VIHF whose professional
is the holder of the TLS client certificate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from lxml import etree
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from cpsdmp.protocols import bounded
from cpsdmp.protocols.httpserver import HeaderLimitChannel, closing_answer
from cpsdmp.protocols.safexml import parse_xml
from cpsdmp.protocols.soap import (
    SOAP12,
    WSA,
    Addressing,
    SoapError,
    SoapResponse,
    envelope,
    plain_content_type,
    plain_message,
    read_message,
)
from cpsdmp.sandbox.store import (
    FindFilter,
    NewDocument,
    NewSubmission,
    NewVersion,
    StatusChange,
    Store,
    StoredEntry,
    StoreRefusal,
    Update,
    serialize,
)
from cpsdmp.xds.answers import (
    ACTION_EXISTENCE_ANSWER,
    ACTION_PROVIDE_AND_REGISTER_ANSWER,
    ACTION_STORED_QUERY_ANSWER,
    ACTION_UPDATE_ANSWER,
    Answer,
    existence_response,
    plain_answer,
    query_response,
    registry_response,
    retrieve_answer,
)
from cpsdmp.xds.ebrim import (
    LCM,
    RIM,
    Association,
    AssociationType,
    DocumentEntry,
    DocumentHash,
    MetadataError,
    PatientId,
    Status,
)
from cpsdmp.xds.requests import (
    StoredQuery,
    read_adhoc_query,
    read_existence_request,
    read_provide_and_register,
    read_retrieve_request,
    read_submit_objects,
)
from cpsdmp.xds.responses import (
    FAILURE,
    PARTIAL_SUCCESS,
    SEVERITY_ERROR,
    SUCCESS,
    RegistryError,
)
from cpsdmp.xds.transactions import (
    ACTION_EXISTENCE,
    ACTION_PROVIDE_AND_REGISTER,
    ACTION_RETRIEVE,
    ACTION_STORED_QUERY,
    ACTION_UPDATE,
    DMP_REPOSITORY_ID,
    FIND_DOCUMENTS,
    GET_DOCUMENTS,
)
from cpsdmp.xds.values import check_dtm, check_entry
from cpsdmp.xds.vihf import RESOURCE_ID, SAML2, WSSE

_log = Logger()

SERVICES_PATH = (b"si-dmp-server", b"v2", b"services")

#: Which SOAP actions each service takes (the DMP's WSDLs).
SERVICE_ACTIONS = {
    "patients": (ACTION_EXISTENCE,),
    "repository": (ACTION_PROVIDE_AND_REGISTER, ACTION_RETRIEVE),
    "registry": (ACTION_STORED_QUERY, ACTION_UPDATE),
}

#: Largest request body accepted, MTOM parts included.
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024

WSA_FAULT_ACTION = "http://www.w3.org/2005/08/addressing/soap/fault"
#: WS-Security 1.1 fault codes (OASIS WSS SOAP Message Security, table 12).
INVALID_SECURITY = "InvalidSecurity"
FAILED_AUTHENTICATION = "FailedAuthentication"

#: The DMP transaction of each action, for the log.
TRANSACTIONS = {
    ACTION_EXISTENCE: "TD0.2",
    ACTION_PROVIDE_AND_REGISTER: "TD2.1",
    ACTION_STORED_QUERY: "TD3.1",
    ACTION_RETRIEVE: "TD3.2",
    ACTION_UPDATE: "TD3.3",
}

_STATUS_NAMES = {
    Status.Approved: "approved",
    Status.Archived: "archived",
    Status.Deleted: "deleted",
}


class Fault(Exception):
    """
    A request the sandbox answers with a SOAP 1.2 sender fault; C{subcode}
    names the standard fault (WS-Security, WS-Addressing) when there is one.
    """

    def __init__(
        self,
        subcode: str | None,
        reason: str,
        namespace: str = WSSE,
        prefix: str = "wsse",
    ) -> None:
        super().__init__(reason)
        self.subcode = subcode
        self.namespace = namespace
        self.prefix = prefix
        self.reason = reason

    @property
    def code(self) -> str:
        return f"{self.prefix}:{self.subcode}" if self.subcode else "soap:Sender"


class Refused(Exception):
    """
    A request the sandbox answers with a C{Failure} RegistryResponse.
    """

    def __init__(self, errors: Sequence[RegistryError]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = list(errors)


def _error(code: str, context: str, location: str = "") -> RegistryError:
    return RegistryError(code, context, SEVERITY_ERROR, location)


def _not_vihf_patient(patient: PatientId, location: str = "") -> RegistryError:
    return _error(
        "XDSPatientIdDoesNotMatch",
        f"the request is about patient {patient}, not the patient its VIHF "
        "names (resource-id): the DMP answers only about the VIHF's patient",
        location,
    )


def _no_vihf_patient() -> RegistryError:
    return _error(
        "XDSRegistryError",
        "the VIHF names no patient (resource-id): the DMP answers only about "
        "the patient the professional acts for",
    )


def mask_patient(patient: PatientId | None) -> str:
    """
    @return: a patient's INS shortened for the log, never the whole.
    """
    return f"{patient.ins[:3]}…" if patient is not None else "-"


def card_holder(certificate: x509.Certificate) -> str:
    """
    @return: the national identifier of a CPS certificate's holder: its
        C{serialNumber} attribute, or the part of its CN before the C{/}
        (C{810001234567/Marie DURAND-TEST}).
    """
    subject = certificate.subject
    for oid in (NameOID.SERIAL_NUMBER, NameOID.COMMON_NAME):
        values = subject.get_attributes_for_oid(oid)
        if values:
            return str(values[0].value).split("/", 1)[0].strip()
    return ""


def fault_message(fault: Fault, request_id: str | None) -> bytes:
    """
    @return: the SOAP 1.2 envelope of a sender fault.
    """
    s = f"{{{SOAP12}}}"
    element = etree.Element(f"{s}Fault", nsmap={fault.prefix: fault.namespace})
    code = etree.SubElement(element, f"{s}Code")
    etree.SubElement(code, f"{s}Value").text = "soap:Sender"
    if fault.subcode:
        subcode = etree.SubElement(code, f"{s}Subcode")
        etree.SubElement(subcode, f"{s}Value").text = fault.code
    reason = etree.SubElement(element, f"{s}Reason")
    text = etree.SubElement(reason, f"{s}Text")
    text.set("{http://www.w3.org/XML/1998/namespace}lang", "en")
    text.text = fault.reason
    return plain_message(
        envelope(element, Addressing.answer(WSA_FAULT_ACTION, request_id))
    )


class Sandbox:
    """
    The DMP's behaviour over a L{Store}: one coroutine per transaction, each
    taking the read SOAP request and returning the L{Answer}, the outcome
    to log and the patient concerned.
    """

    def __init__(self, store: Store) -> None:
        self.store = store

    # TD0.2 ------------------------------------------------------------------
    async def existence(
        self, message: SoapResponse, request_id: str | None, vihf: PatientId | None
    ) -> tuple[Answer, str, PatientId | None]:
        try:
            patient = read_existence_request(message.body)
        except MetadataError as error:
            raise Fault(None, str(error)) from None
        record = await self.store.patient(patient)
        answer = plain_answer(
            existence_response(message.body, record),
            ACTION_EXISTENCE_ANSWER,
            request_id,
        )
        return answer, "OK" if record is not None else "NF", patient

    # TD2.1 ------------------------------------------------------------------
    async def provide_and_register(
        self, message: SoapResponse, request_id: str | None, vihf: PatientId | None
    ) -> tuple[Answer, str, PatientId | None]:
        def answer(
            errors: Sequence[RegistryError] = (), patient: PatientId | None = None
        ) -> tuple[Answer, str, PatientId | None]:
            status = FAILURE if errors else SUCCESS
            body = registry_response(status, errors)
            return (
                plain_answer(body, ACTION_PROVIDE_AND_REGISTER_ANSWER, request_id),
                _outcome(status, errors),
                patient,
            )

        try:
            submitted, documents = read_provide_and_register(message)
        except (MetadataError, SoapError) as error:
            return answer([_error("XDSRepositoryMetadataError", str(error))])
        submission_set = submitted.submission_set
        patient = submission_set.patientId
        objects = _objects_by_id(message.body.find(f"{{{LCM}}}SubmitObjectsRequest"))

        errors = _unidentified(submitted.associations, objects)
        if patient != vihf:
            errors.append(_not_vihf_patient(patient, submission_set.entryUUID))
        elif await self.store.patient(patient) is None:
            errors.append(
                _error(
                    "XDSUnknownPatientId",
                    f"patient {patient} has no DMP",
                    submission_set.entryUUID,
                )
            )
        members = {
            a.targetObject
            for a in submitted.associations
            if a.associationType == AssociationType.HasMember
            and a.sourceObject == submission_set.entryUUID
        }
        seen: set[str] = set()
        new_documents = []
        for entry in submitted.entries:
            content = bytes(documents[entry.entryUUID])
            digest = DocumentHash.of(content)
            errors += _entry_errors(entry, patient)
            if entry.entryUUID not in members:
                errors.append(
                    _error(
                        "XDSRepositoryMetadataError",
                        f"DocumentEntry {entry.entryUUID} is not a member of "
                        "the submission set",
                        entry.entryUUID,
                    )
                )
            if entry.uniqueId in seen:
                errors.append(
                    _error(
                        "XDSRegistryDuplicateUniqueIdInMessage",
                        f"uniqueId {entry.uniqueId} occurs twice in the submission",
                        entry.uniqueId,
                    )
                )
            seen.add(entry.uniqueId)
            if entry.hash is not None and entry.hash.lower() != digest.sha1:
                errors.append(
                    _error(
                        "XDSNonIdenticalHash",
                        f"the hash of document {entry.uniqueId} is {digest.sha1}, "
                        f"not {entry.hash} as its metadata says",
                        entry.uniqueId,
                    )
                )
            if entry.size is not None and entry.size != digest.size:
                errors.append(
                    _error(
                        "XDSNonIdenticalSize",
                        f"document {entry.uniqueId} is {digest.size} bytes, not "
                        f"{entry.size} as its metadata says",
                        entry.uniqueId,
                    )
                )
            new_documents.append(
                NewDocument(
                    entry,
                    serialize(objects[entry.entryUUID]),
                    content,
                    digest.sha1,
                    digest.size,
                )
            )
        if not submitted.entries:
            errors.append(
                _error(
                    "XDSRepositoryMetadataError",
                    "the submission holds no document",
                    submission_set.entryUUID,
                )
            )
        if errors:
            return answer(errors, patient)
        try:
            await self.store.submit(
                NewSubmission(
                    submission_set,
                    serialize(objects[submission_set.entryUUID]),
                    new_documents,
                    [(a, serialize(objects[a.id])) for a in submitted.associations],
                )
            )
        except StoreRefusal as refusal:
            return answer(
                [_error(refusal.code, str(refusal), refusal.location)], patient
            )
        return answer(patient=patient)

    # TD3.1 ------------------------------------------------------------------
    async def stored_query(
        self, message: SoapResponse, request_id: str | None, vihf: PatientId | None
    ) -> tuple[Answer, str, PatientId | None]:
        def answer(
            found: Sequence[StoredEntry] = (),
            errors: Sequence[RegistryError] = (),
            return_type: str = "LeafClass",
            patient: PatientId | None = None,
        ) -> tuple[Answer, str, PatientId | None]:
            status = FAILURE if errors else SUCCESS
            if return_type == "ObjectRef":
                body = query_response([], status, errors)
                objects = body.find(f"{{{RIM}}}RegistryObjectList")
                for stored in found:
                    etree.SubElement(
                        objects, f"{{{RIM}}}ObjectRef", id=stored.entry_uuid
                    )
            else:
                body = query_response(
                    [_registry_entry(s) for s in found], status, errors
                )
            return (
                plain_answer(body, ACTION_STORED_QUERY_ANSWER, request_id),
                _outcome(status, errors),
                patient,
            )

        try:
            query = read_adhoc_query(message.body)
            if query.query_id == FIND_DOCUMENTS:
                find = _find_filter(query)
                if find.patient != vihf:
                    raise Refused([_not_vihf_patient(find.patient)])
                if await self.store.patient(find.patient) is None:
                    return answer(
                        errors=[
                            _error(
                                "XDSUnknownPatientId",
                                f"patient {find.patient} has no DMP",
                            )
                        ]
                    )
                found = await self.store.find(find)
                return answer(found, (), query.return_type, find.patient)
            if query.query_id == GET_DOCUMENTS:
                entry_uuids = query.values("$XDSDocumentEntryEntryUUID")
                unique_ids = query.values("$XDSDocumentEntryUniqueId")
                if bool(entry_uuids) == bool(unique_ids):
                    raise Refused(
                        [
                            _error(
                                "XDSStoredQueryParamNumber",
                                "GetDocuments needs either $XDSDocumentEntryEntryUUID "
                                "or $XDSDocumentEntryUniqueId",
                            )
                        ]
                    )
                if vihf is None:
                    raise Refused([_no_vihf_patient()])
                found = await self.store.get(
                    vihf, entry_uuids=entry_uuids, unique_ids=unique_ids
                )
                return answer(found, (), query.return_type, vihf)
        except Refused as refused:
            return answer(errors=refused.errors)
        except MetadataError as error:
            return answer(errors=[_error("XDSRegistryError", str(error))])
        return answer(
            errors=[
                _error(
                    "XDSUnknownStoredQuery",
                    f"stored query {query.query_id} is not served here",
                )
            ]
        )

    # TD3.2 ------------------------------------------------------------------
    async def retrieve(
        self, message: SoapResponse, request_id: str | None, vihf: PatientId | None
    ) -> tuple[Answer, str, PatientId | None]:
        try:
            asked = read_retrieve_request(message.body)
        except MetadataError as error:
            raise Fault(None, str(error)) from None
        documents = []
        errors = []
        if vihf is None:
            errors.append(_no_vihf_patient())
            asked = []
        for repository, unique_id in asked:
            if repository != DMP_REPOSITORY_ID:
                errors.append(
                    _error(
                        "XDSUnknownRepositoryId",
                        f"repository {repository} is not the DMP's",
                        repository,
                    )
                )
                continue
            assert vihf is not None  # nothing is asked without it
            found = await self.store.document(unique_id, vihf)
            if found is None:
                entries = await self.store.get(vihf, unique_ids=[unique_id])
                deleted = any(e.status == Status.Deleted for e in entries)
                errors.append(
                    _error(
                        "XDSMissingDocument",
                        f"document {unique_id} was deleted"
                        if deleted
                        else f"no document {unique_id} in the DMP",
                        unique_id,
                    )
                )
                continue
            documents.append((repository, unique_id, found[0], found[1]))
        if not asked and not errors:
            errors.append(_error("XDSRegistryError", "no document asked for"))
        status = SUCCESS
        if errors:
            status = PARTIAL_SUCCESS if documents else FAILURE
        return (
            retrieve_answer(documents, request_id, status, errors),
            _outcome(status, errors),
            vihf,
        )

    # TD3.3 ------------------------------------------------------------------
    async def update(
        self, message: SoapResponse, request_id: str | None, vihf: PatientId | None
    ) -> tuple[Answer, str, PatientId | None]:
        def answer(
            errors: Sequence[RegistryError] = (), patient: PatientId | None = None
        ) -> tuple[Answer, str, PatientId | None]:
            status = FAILURE if errors else SUCCESS
            body = registry_response(status, errors)
            return (
                plain_answer(body, ACTION_UPDATE_ANSWER, request_id),
                _outcome(status, errors),
                patient,
            )

        try:
            submitted = read_submit_objects(message.body)
        except MetadataError as error:
            return answer([_error("XDSRegistryMetadataError", str(error))])
        submission_set = submitted.submission_set
        patient = submission_set.patientId
        objects = _objects_by_id(message.body)
        if patient != vihf:
            return answer([_not_vihf_patient(patient, submission_set.entryUUID)])
        if await self.store.patient(patient) is None:
            return answer(
                [_error("XDSUnknownPatientId", f"patient {patient} has no DMP")]
            )

        errors = _unidentified(submitted.associations, objects)
        changes = []
        previous: dict[str, str] = {}
        for association in submitted.associations:
            if association.associationType == AssociationType.UpdateAvailabilityStatus:
                original = association.slot("OriginalStatus") or ""
                new = association.slot("NewStatus") or ""
                if new not in _STATUS_NAMES or not original:
                    errors.append(
                        _error(
                            "XDSMetadataUpdateError",
                            f"status change from {original!r} to {new!r} is not "
                            "one the DMP makes",
                            association.targetObject,
                        )
                    )
                elif new == original:
                    errors.append(
                        _error(
                            "XDSMetadataUpdateError",
                            f"document entry {association.targetObject} is "
                            f"already {_STATUS_NAMES[new]}",
                            association.targetObject,
                        )
                    )
                changes.append(StatusChange(association.targetObject, original, new))
            elif association.associationType == AssociationType.HasMember:
                version = association.slot("PreviousVersion")
                if version is not None:
                    previous[association.targetObject] = version
        versions = []
        for entry in submitted.entries:
            errors += _entry_errors(entry, patient, registry=True)
            if entry.entryUUID not in previous or not entry.logicalId:
                errors.append(
                    _error(
                        "XDSMetadataVersionError",
                        f"DocumentEntry {entry.entryUUID} is not a new version: "
                        "no logical id or no PreviousVersion",
                        entry.entryUUID,
                    )
                )
                continue
            versions.append(
                NewVersion(
                    entry,
                    serialize(objects[entry.entryUUID]),
                    previous[entry.entryUUID],
                )
            )
        if not changes and not versions:
            errors.append(
                _error("XDSMetadataUpdateError", "the update changes nothing")
            )
        if errors:
            return answer(errors, patient)
        try:
            await self.store.update(
                Update(
                    submission_set,
                    serialize(objects[submission_set.entryUUID]),
                    changes,
                    versions,
                    [(a, serialize(objects[a.id])) for a in submitted.associations],
                )
            )
        except StoreRefusal as refusal:
            return answer(
                [_error(refusal.code, str(refusal), refusal.location)], patient
            )
        return answer(patient=patient)


def _transaction(action: str) -> str:
    name = action.rsplit(":", 1)[-1]
    return f"{TRANSACTIONS[action]} {name}" if action in TRANSACTIONS else name


def _outcome(status: str, errors: Sequence[RegistryError]) -> str:
    name = status.rsplit(":", 1)[-1]
    codes = ",".join(sorted({e.code for e in errors}))
    return f"{name} {codes}" if codes else name


def _objects_by_id(holder: etree._Element | None) -> dict[str, etree._Element]:
    if holder is None:
        return {}
    return {
        element.get("id", ""): element
        for element in holder.iterfind(f"{{{RIM}}}RegistryObjectList/*")
    }


def _unidentified(
    associations: Sequence[Association], objects: dict[str, etree._Element]
) -> list[RegistryError]:
    """
    @return: an error for each association without an id of its own.
    """
    return [
        _error(
            "XDSRegistryMetadataError",
            f"an association from {a.sourceObject} to {a.targetObject} has no id",
            a.sourceObject,
        )
        for a in associations
        if not a.id
        or objects.get(a.id) is None
        or objects[a.id].tag != f"{{{RIM}}}Association"
    ]


def _entry_errors(
    entry: DocumentEntry, patient: PatientId, registry: bool = False
) -> list[RegistryError]:
    """
    @return: the errors of a DocumentEntry lacking a field the DMP requires
        or about another patient than its submission set.
    """
    code = "XDSRegistryMetadataError" if registry else "XDSRepositoryMetadataError"
    missing = [
        name
        for name, value in [
            ("mimeType", entry.mimeType),
            ("creationTime", entry.creationTime),
            ("languageCode", entry.languageCode),
            ("title", entry.title),
            ("confidentialityCode", entry.confidentialityCode),
            ("author", entry.authors),
            ("serviceStartTime", entry.serviceStartTime),
            ("legalAuthenticator", entry.legalAuthenticator),
        ]
        if not value
    ]
    errors = [
        _error(
            code,
            f"DocumentEntry {entry.uniqueId} lacks the mandatory {name}",
            entry.entryUUID,
        )
        for name in missing
    ]
    if not missing:
        # The values the registry refuses: times that are not real XDS
        # times or out of order, texts too long, a classCode not of TRE_A03.
        try:
            check_entry(entry)
        except MetadataError as error:
            errors.append(
                _error(
                    "XDSRegistryMetadataError",
                    f"DocumentEntry {entry.uniqueId}: {error}",
                    entry.entryUUID,
                )
            )
    if entry.patientId != patient:
        errors.append(
            _error(
                "XDSPatientIdDoesNotMatch",
                f"DocumentEntry {entry.uniqueId} is about another patient than "
                "its submission set",
                entry.entryUUID,
            )
        )
    return errors


def _registry_entry(stored: StoredEntry) -> DocumentEntry:
    """
    @return: a stored entry as the registry shows it: the submitted metadata
        with the registry's status, version, logical id, hash and size.
    """
    element = parse_xml(stored.metadata, what="stored DocumentEntry")
    return dataclasses.replace(
        DocumentEntry.from_element(element),
        availabilityStatus=stored.status,
        version=str(stored.version),
        logicalId=stored.logical_id,
        repositoryUniqueId=DMP_REPOSITORY_ID,
        hash=stored.hash,
        size=stored.size,
    )


def _find_filter(query: StoredQuery) -> FindFilter:
    patients = query.values("$XDSDocumentEntryPatientId")
    statuses = query.values("$XDSDocumentEntryStatus")
    if len(patients) != 1 or not statuses:
        raise Refused(
            [
                _error(
                    "XDSStoredQueryParamNumber",
                    "FindDocuments needs one $XDSDocumentEntryPatientId and at "
                    "least one $XDSDocumentEntryStatus",
                )
            ]
        )

    def one(name: str) -> str | None:
        values = query.values(f"$XDSDocumentEntry{name}")
        if len(values) > 1:
            raise Refused(
                [_error("XDSStoredQueryParamNumber", f"$XDSDocumentEntry{name} twice")]
            )
        if values:
            try:
                check_dtm(values[0], f"$XDSDocumentEntry{name}")
            except MetadataError as error:
                raise Refused([_error("XDSRegistryError", str(error))]) from None
        return values[0] if values else None

    return FindFilter(
        patient=PatientId.parse(patients[0]),
        statuses=statuses,
        creation_from=one("CreationTimeFrom"),
        creation_to=one("CreationTimeTo"),
        service_start_from=one("ServiceStartTimeFrom"),
        service_start_to=one("ServiceStartTimeTo"),
        type_codes=query.values("$XDSDocumentEntryTypeCode"),
        class_codes=query.values("$XDSDocumentEntryClassCode"),
        format_codes=query.values("$XDSDocumentEntryFormatCode"),
        confidentiality_codes=query.values("$XDSDocumentEntryConfidentialityCode"),
    )


def check_vihf(message: SoapResponse, certificate: x509.Certificate | None) -> str:
    """
    @return: the professional the VIHF names, when it is the holder of the
        TLS client certificate.
    @raise Fault: no VIHF, or one naming someone else.
    """
    header = message.header
    assertion = (
        header.find(f"{{{WSSE}}}Security/{{{SAML2}}}Assertion")
        if header is not None
        else None
    )
    if assertion is None:
        raise Fault(
            INVALID_SECURITY,
            "the request carries no VIHF (SAML assertion in wsse:Security)",
        )
    name_id = (
        assertion.findtext(f"{{{SAML2}}}Subject/{{{SAML2}}}NameID") or ""
    ).strip()
    if not name_id:
        raise Fault(INVALID_SECURITY, "the VIHF names no professional (NameID)")
    if certificate is None:
        raise Fault(FAILED_AUTHENTICATION, "no TLS client certificate")
    holder = card_holder(certificate)
    if name_id != holder:
        raise Fault(
            FAILED_AUTHENTICATION,
            f"the VIHF names professional {name_id}, but the TLS client "
            f"certificate belongs to {holder}",
        )
    return name_id


def vihf_patient(message: SoapResponse) -> PatientId | None:
    """
    @return: the patient the VIHF names (its XACML C{resource-id}, a CX),
        or C{None} when it names none.
    @raise Fault: a resource-id that is not a patient identifier.
    """
    header = message.header
    if header is None:
        return None
    path = (
        f"{{{WSSE}}}Security/{{{SAML2}}}Assertion/{{{SAML2}}}AttributeStatement/"
        f"{{{SAML2}}}Attribute[@Name='{RESOURCE_ID}']/{{{SAML2}}}AttributeValue"
    )
    value = (header.findtext(path) or "").strip()
    if not value:
        return None
    try:
        return PatientId.parse(value)
    except MetadataError as error:
        raise Fault(INVALID_SECURITY, f"the VIHF's resource-id: {error}") from None


class SoapService(Resource):
    """
    One DMP service: reads the SOAP request, checks the VIHF against the
    TLS client certificate, and hands the request to the L{Sandbox}.
    """

    isLeaf = True

    def __init__(self, sandbox: Sandbox, name: str) -> None:
        super().__init__()
        self.sandbox = sandbox
        self.name = name
        self.actions = SERVICE_ACTIONS[name]

    def render_GET(self, request: server.Request) -> bytes:
        request.setResponseCode(405)
        request.setHeader(b"allow", b"POST")
        return b"POST SOAP 1.2 requests here\n"

    def render_POST(self, request: server.Request) -> Any:
        finished = [False]
        request.notifyFinish().addBoth(lambda _: finished.__setitem__(0, True))
        Deferred.fromCoroutine(self._answer(request, finished)).addErrback(
            self._crashed, request, finished
        )
        return server.NOT_DONE_YET

    async def _answer(self, request: server.Request, finished: list[bool]) -> None:
        content_type = (request.getHeader(b"content-type") or b"").decode("latin-1")
        assert request.content is not None
        body = request.content.read()
        request_id = None
        action = "-"
        patient: PatientId | None = None
        try:
            try:
                message = read_message(content_type, body)
            except (SoapError, ValueError) as error:
                raise Fault(None, str(error)) from None
            request_id = message.addressing("MessageID")
            action = message.addressing("Action") or "-"
            if action not in self.actions:
                raise Fault(
                    "ActionNotSupported",
                    f"the {self.name} service does not take action {action}",
                    WSA,
                    "wsa",
                )
            check_vihf(message, _peer_certificate(request))
            vihf = vihf_patient(message)
            handler = {
                ACTION_EXISTENCE: self.sandbox.existence,
                ACTION_PROVIDE_AND_REGISTER: self.sandbox.provide_and_register,
                ACTION_RETRIEVE: self.sandbox.retrieve,
                ACTION_STORED_QUERY: self.sandbox.stored_query,
                ACTION_UPDATE: self.sandbox.update,
            }[action]
            answer, outcome, patient = await handler(message, request_id, vihf)
        except Fault as fault:
            _log.info(
                "{action} patient {patient}: fault {code}",
                action=_transaction(action),
                patient="-",
                code=fault.code,
            )
            # SOAP 1.2 would have 400 for a sender fault; the DMP, like
            # most SOAP stacks, answers every fault with 500.
            self._write(
                request,
                finished,
                500,
                plain_content_type(WSA_FAULT_ACTION),
                [fault_message(fault, request_id)],
            )
            return
        _log.info(
            "{action} patient {patient}: {outcome}",
            action=_transaction(action),
            patient=mask_patient(patient),
            outcome=outcome,
        )
        self._write(request, finished, 200, answer.content_type, answer.parts())

    def _write(
        self,
        request: server.Request,
        finished: list[bool],
        code: int,
        content_type: str,
        parts: Sequence[bytes | memoryview],
    ) -> None:
        if finished[0]:
            return  # the client left: nobody to answer
        request.setResponseCode(code)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"content-length", str(sum(len(p) for p in parts)).encode())
        for part in parts:
            request.write(bytes(part))
        request.finish()

    def _crashed(
        self, failure: Failure, request: server.Request, finished: list[bool]
    ) -> None:
        _log.failure(
            "the sandbox failed on a {service} request", failure, service=self.name
        )
        if not finished[0] and not request.finished:
            request.setResponseCode(500)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.write(b"internal error of the DMP sandbox\n")
            request.finish()


def _peer_certificate(request: server.Request) -> x509.Certificate | None:
    transport = request.transport
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    certificate = get()
    return certificate.to_cryptography() if certificate is not None else None


class BoundedRequest(bounded.BoundedRequest):
    """
    A request whose body is refused (413) above C{max_body} bytes: at once
    when its Content-Length says so; else what is over the limit is read
    off the connection but never kept.
    """

    max_body = DEFAULT_MAX_REQUEST_BYTES

    def _refusal(self) -> bytes:
        _log.info("request refused: body over {limit} bytes", limit=self.max_body)
        return f"request body over {self.max_body} bytes\n".encode()

    def refuse_too_large(self) -> None:
        self.setResponseCode(413)
        self.setHeader(b"content-type", _TEXT)
        self.setHeader(b"connection", b"close")
        self.write(self._refusal())
        self.finish()

    def too_large_answer(self) -> bytes:
        return closing_answer(413, _TEXT.decode(), self._refusal())


_TEXT = b"text/plain; charset=utf-8"


class _SandboxChannel(HeaderLimitChannel):
    """
    The local DMP's HTTP/1.1 connections: a body announced over the limit
    is refused before it is read, a header line too long answered 431.
    """

    def header_too_large(self) -> bytes:
        said = f"a request line or header line is at most {self.MAX_LENGTH} bytes\n"
        return closing_answer(431, _TEXT.decode(), said.encode())


def make_site(
    store: Store, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
) -> server.Site:
    """
    @return: the web site of the local DMP, its services at the DMP's paths.
    """
    sandbox = Sandbox(store)
    root = Resource()
    parent = root
    for segment in SERVICES_PATH:
        child = Resource()
        parent.putChild(segment, child)
        parent = child
    for name in SERVICE_ACTIONS:
        parent.putChild(name.encode(), SoapService(sandbox, name))
    site = server.Site(root)
    site.requestFactory = type(  # type: ignore[assignment]
        "BoundedRequest", (BoundedRequest,), {"max_body": max_request_bytes}
    )
    # HTTP/1.1 only (no HTTP/2 is negotiated), so the plain channel serves.
    site.protocol = _SandboxChannel  # type: ignore[assignment]
    return site
