"""
The DMP transactions the facade performs, each as a request builder and an
answer reader:

  - TD0.2, existence test of a patient's DMP (HL7 v3 PRPA_IN201307UV02);
  - TD2.1, submission of documents (ProvideAndRegisterDocumentSet-b, MTOM);
  - TD3.1, search (RegistryStoredQuery FindDocuments and GetDocuments);
  - TD3.2, retrieval (RetrieveDocumentSet, MTOM answer);
  - TD3.3, status and visibility updates (UpdateDocumentSet): archive,
    unarchive, delete, mask to and unmask from professionals.

A builder returns an L{OutgoingMessage}: the service URL, the SOAP action and
the body to POST. Every message carries the VIHF of the L{VihfRequest} it is
given. Readers take the L{SoapResponse} that L{cpsdmp.protocols.soap.read_message}
made of the HTTP answer. Nothing here opens a connection.
"""

from __future__ import annotations

import copy
import io
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from lxml import etree
from twisted.internet import task
from twisted.web.client import FileBodyProducer

from cpsdmp.protocols.soap import (
    Addressing,
    Attachment,
    MtomBodyProducer,
    MtomMessage,
    SoapResponse,
    envelope,
    plain_content_type,
    plain_message,
    xop_include,
)
from cpsdmp.xds.context import (
    Professional,
    Software,
    Structure,
    SubmissionDefaults,
)
from cpsdmp.xds.ebrim import (
    LCM,
    QUERY,
    RIM,
    XDSB,
    Association,
    AssociationType,
    Author,
    CodedValue,
    DocumentEntry,
    MetadataError,
    PatientId,
    Slot,
    Status,
    SubmissionSet,
    new_entry_uuid,
    registry_object_list,
    uuid_oid,
    xds_time,
)
from cpsdmp.xds.responses import (
    RegistryResult,
    UnexpectedAnswer,
    find_registry_response,
    raise_for_status,
    registry_result,
)
from cpsdmp.xds.values import check_dtm, check_time_order
from cpsdmp.xds.vihf import VihfRequest, security_header

HL7 = "urn:hl7-org:v3"
XSI = "http://www.w3.org/2001/XMLSchema-instance"

# SOAP actions, from the DMP's WSDLs.
ACTION_EXISTENCE = "urn:hl7-org:v3:PRPA_IN201307UV02"
ACTION_PROVIDE_AND_REGISTER = "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-b"
ACTION_STORED_QUERY = "urn:ihe:iti:2007:RegistryStoredQuery"
ACTION_RETRIEVE = "urn:ihe:iti:2007:RetrieveDocumentSet"
ACTION_UPDATE = "urn:ihe:iti:2010:UpdateDocumentSet"

# Stored queries, IHE ITI TF-2a 3.18.4.1.2.3.7.
FIND_DOCUMENTS = "urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d"
GET_DOCUMENTS = "urn:uuid:5c4f972b-d56b-40ac-a5fc-c8ca9b40b9d4"

#: The DMP as an HL7 v3 device, and its repository's uniqueId.
DMP_DEVICE_OID = "1.2.250.1.213.4.1.1.1"
DMP_REPOSITORY_ID = "1.2.250.1.213.4.1.1.1.2"

#: Visibility codes (confidentialityCode), JDV_J08.
VISIBILITY_SYSTEM = "1.2.250.1.213.1.1.4.13"
MASQUE_PS = CodedValue(
    "MASQUE_PS", VISIBILITY_SYSTEM, "Masqué aux professionnels de santé"
)
INVISIBLE_PATIENT = CodedValue(
    "INVISIBLE_PATIENT", VISIBILITY_SYSTEM, "Non visible par le patient"
)
INVISIBLE_REPRESENTANTS_LEGAUX = CodedValue(
    "INVISIBLE_REPRESENTANTS_LEGAUX",
    VISIBILITY_SYSTEM,
    "Non visible par les représentants légaux du patient",
)


@dataclass(frozen=True)
class DmpEndpoints:
    """
    Where the DMP's services are, under one base URL
    (C{https://.../si-dmp-server/v2/services}).
    """

    base: str

    def service(self, name: str) -> str:
        return f"{self.base.rstrip('/')}/{name}"

    @property
    def patients(self) -> str:
        return self.service("patients")

    @property
    def registry(self) -> str:
        return self.service("registry")

    @property
    def repository(self) -> str:
        return self.service("repository")


@dataclass
class OutgoingMessage:
    """
    A request ready to POST: URL, SOAP action, Content-Type and body.
    """

    url: str
    action: str
    message_id: str
    envelope: etree._Element
    attachments: list[Attachment] = field(default_factory=list)
    mtom: bool = False

    def __post_init__(self) -> None:
        self._mtom = (
            MtomMessage(self.envelope, self.attachments, self.action)
            if self.mtom
            else None
        )

    @property
    def content_type(self) -> str:
        if self._mtom is not None:
            return self._mtom.content_type
        return plain_content_type(self.action)

    def parts(self) -> Iterator[bytes | memoryview]:
        """
        @return: the body in pieces, attachments as the caller's own bytes.
        """
        if self._mtom is not None:
            yield from self._mtom.parts()
        else:
            yield plain_message(self.envelope)

    def body(self) -> bytes:
        """
        @return: the whole body in one string (a copy: prefer L{producer}
            for large documents).
        """
        return b"".join(self.parts())

    def producer(
        self, cooperator: task.Cooperator | None = None
    ) -> MtomBodyProducer | FileBodyProducer:
        """
        @param cooperator: schedules the writes (the global one by default).
        @return: an C{IBodyProducer} for C{twisted.web}'s Agent; an MTOM body
            is written in slices, without copying its documents.
        """
        if self._mtom is None:
            return FileBodyProducer(  # type: ignore[no-untyped-call]
                io.BytesIO(self.body()), cooperator or task
            )
        return MtomBodyProducer(self._mtom, cooperator)


def _message(
    url: str,
    action: str,
    body: etree._Element,
    vihf: VihfRequest,
    attachments: list[Attachment] | None = None,
    mtom: bool = False,
) -> OutgoingMessage:
    addressing = Addressing(action, url)
    root = envelope(body, addressing, [security_header(vihf)])
    return OutgoingMessage(
        url, action, addressing.message_id, root, attachments or [], mtom
    )


# TD0.2: existence test -------------------------------------------------------
def existence_test(
    endpoints: DmpEndpoints, vihf: VihfRequest, patient: PatientId
) -> OutgoingMessage:
    """
    @return: the TD0.2 request asking whether C{patient} has a DMP and
        whether this professional is authorised on it.
    """
    software = vihf.software
    h = f"{{{HL7}}}"
    root = etree.Element(
        f"{h}PRPA_IN201307UV02", ITSVersion="XML_1.0", nsmap={None: HL7, "xsi": XSI}
    )
    etree.SubElement(
        root, f"{h}id", root=f"{software.source_oid}.1", extension=str(uuid.uuid4())
    )
    etree.SubElement(
        root, f"{h}creationTime", value=datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    )
    etree.SubElement(
        root,
        f"{h}interactionId",
        root="2.16.840.1.113883.1.6",
        extension="PRPA_IN201307UV02",
    )
    etree.SubElement(root, f"{h}processingCode", code="P")
    etree.SubElement(root, f"{h}processingModeCode", code="T")
    etree.SubElement(root, f"{h}acceptAckCode", code="AL")
    for role, oid, name in [
        ("receiver", DMP_DEVICE_OID, "DMP"),
        ("sender", software.source_oid, software.name),
    ]:
        party = etree.SubElement(
            root, f"{h}{role}", typeCode="RCV" if role == "receiver" else "SND"
        )
        device = etree.SubElement(
            party, f"{h}device", classCode="DEV", determinerCode="INSTANCE"
        )
        etree.SubElement(device, f"{h}id", root=oid)
        etree.SubElement(device, f"{h}softwareName").text = name
    control = etree.SubElement(
        root, f"{h}controlActProcess", classCode="CACT", moodCode="EVN"
    )
    etree.SubElement(
        control,
        f"{h}reasonCode",
        code="TEST_EXST",
        codeSystem="1.2.250.1.213.1.1.4.11",
        displayName="Test d'existence de dossier",
    )
    query = etree.SubElement(control, f"{h}queryByParameter")
    etree.SubElement(
        query,
        f"{h}queryId",
        root=f"{software.source_oid}.2",
        extension=str(uuid.uuid4()),
    )
    etree.SubElement(query, f"{h}statusCode", code="new")
    parameters = etree.SubElement(query, f"{h}parameterList")
    identifier = etree.SubElement(parameters, f"{h}patientIdentifier")
    etree.SubElement(
        identifier, f"{h}value", root=patient.authority, extension=patient.ins
    )
    etree.SubElement(identifier, f"{h}semanticsText").text = "Patient.id"
    return _message(endpoints.patients, ACTION_EXISTENCE, root, vihf)


@dataclass
class ExistenceResult:
    """
    The answer to TD0.2.

    @ivar exists: the patient has a DMP.
    @ivar authorization: the professional's authorisation on it
        (C{VALIDE}, C{EXPIREE}, C{BLOQUEE}, C{NON_EXISTANTE}...), if given.
    @ivar attentions: every attentionLine keyword with its value.
    @ivar status: the DMP's status (C{active}...), if it exists.
    """

    exists: bool
    response_code: str
    authorization: str | None
    attentions: dict[str, str]
    status: str | None = None
    identifiers: list[tuple[str, str]] = field(default_factory=list)
    family: str | None = None
    given: str | None = None


class HL7Error(UnexpectedAnswer):
    """
    The DMP answered TD0.2 with an application error acknowledgement.
    """

    def __init__(self, code: str, text: str) -> None:
        self.code = code
        super().__init__(f"the DMP refused the request: {code} {text}".strip())


def read_existence(response: SoapResponse) -> ExistenceResult:
    """
    @raise HL7Error: the acknowledgement is not AA.
    @raise UnexpectedAnswer: the body is not a PRPA_IN201308UV02.
    """
    body = response.body
    ns = {"h": HL7}
    if body.tag != f"{{{HL7}}}PRPA_IN201308UV02":
        raise UnexpectedAnswer(f"expected PRPA_IN201308UV02, got {body.tag}")
    ack = body.find("h:acknowledgement", ns)
    ack_code = ack.get("typeCode") if ack is not None else None
    if ack_code != "AA":
        detail = body.find("h:acknowledgement/h:acknowledgementDetail", ns)
        code = detail.findtext("h:code", namespaces=ns) if detail is not None else ""
        if detail is not None and detail.find("h:code", ns) is not None:
            code = detail.find("h:code", ns).get("code", code)
        text = detail.findtext("h:text", namespaces=ns) if detail is not None else ""
        raise HL7Error(code or str(ack_code), (text or "").strip())
    attentions: dict[str, str] = {}
    for line in body.iterfind("h:attentionLine", ns):
        keyword = line.find("h:keyWordText", ns)
        value = line.find("h:value", ns)
        if keyword is None or value is None:
            continue
        attentions[keyword.get("code", "")] = value.get("code") or value.get(
            "value", ""
        )
    response_code = body.find("h:controlActProcess/h:queryAck/h:queryResponseCode", ns)
    code = response_code.get("code", "") if response_code is not None else ""
    patient = body.find(
        "h:controlActProcess/h:subject/h:registrationEvent/h:subject1/h:patient", ns
    )
    result = ExistenceResult(
        exists=code == "OK" and patient is not None,
        response_code=code,
        authorization=attentions.get("AUTORISATION"),
        attentions=attentions,
    )
    if patient is not None:
        result.identifiers = [
            (i.get("root", ""), i.get("extension", ""))
            for i in patient.iterfind("h:id", ns)
        ]
        status = patient.find("h:statusCode", ns)
        result.status = status.get("code") if status is not None else None
        name = patient.find("h:patientPerson/h:name", ns)
        if name is not None:
            result.family = name.findtext("h:family", namespaces=ns)
            result.given = name.findtext("h:given", namespaces=ns)
    return result


# TD2.1: submission -----------------------------------------------------------
@dataclass
class SubmittedDocument:
    """
    A document of a submission: its metadata and its exact bytes.
    """

    entry: DocumentEntry
    data: bytes | memoryview


@dataclass
class Submission:
    """
    Everything a ProvideAndRegisterDocumentSet-b carries: the submission set,
    its documents (the signature among them once added), the associations.
    """

    submission_set: SubmissionSet
    documents: list[SubmittedDocument]
    associations: list[Association]

    def registry_objects(self) -> list[etree._Element]:
        return [
            self.submission_set.to_element(),
            *(d.entry.to_element() for d in self.documents),
            *(a.to_element() for a in self.associations),
        ]


def author_of(professional: Professional, structure: Structure) -> Author:
    """
    @return: the XDS author for the card holder working for C{structure}.
    """
    return Author(
        person=professional.person(),
        institutions=(structure.organization(),),
        specialties=(professional.author_specialty(),),
    )


def new_submission(
    entries: Sequence[tuple[DocumentEntry, bytes | memoryview]],
    professional: Professional,
    structure: Structure,
    software: Software,
    defaults: SubmissionDefaults,
    *,
    title: str | None = None,
    replaces: dict[str, str] | None = None,
    now: datetime | None = None,
) -> Submission:
    """
    Put documents in a new submission set authored by the card holder.

    @param entries: each document's metadata and exact bytes; all must be
        about the same patient.
    @param replaces: new entryUUID -> entryUUID of the document it replaces
        (an RPLC association).
    @raise MetadataError: no document, several patients, or no
        contentTypeCode configured.
    """
    if not entries:
        raise MetadataError("a submission needs at least one document")
    patients = sorted(
        {f"{e.patientId.ins} (authority {e.patientId.authority})" for e, _ in entries}
    )
    if len(patients) != 1:
        raise MetadataError(
            "the documents of a submission must be about one patient; these are "
            f"about {len(patients)}: {', '.join(patients)}"
        )
    if defaults.content_type is None:
        raise MetadataError(
            "no contentTypeCode is configured for submission sets "
            "(SubmissionDefaults.content_type)"
        )
    submission_set = SubmissionSet(
        entryUUID=new_entry_uuid(),
        uniqueId=uuid_oid(),
        sourceId=software.source_oid,
        patientId=entries[0][0].patientId,
        submissionTime=xds_time(now or datetime.now(UTC)),
        contentTypeCode=defaults.content_type,
        authors=[author_of(professional, structure)],
        title=title,
    )
    documents = [SubmittedDocument(entry, data) for entry, data in entries]
    associations = [
        Association.has_member(submission_set.entryUUID, entry.entryUUID)
        for entry, _ in entries
    ]
    for new, old in (replaces or {}).items():
        associations.append(Association(AssociationType.RPLC, new, old))
    return Submission(submission_set, documents, associations)


def provide_and_register(
    endpoints: DmpEndpoints, vihf: VihfRequest, submission: Submission
) -> OutgoingMessage:
    """
    @return: the TD2.1 request, MTOM with each document as a binary part.
    """
    request = etree.Element(
        f"{{{XDSB}}}ProvideAndRegisterDocumentSetRequest",
        nsmap={"xdsb": XDSB, "lcm": LCM, "rim": RIM},
    )
    submit = etree.SubElement(request, f"{{{LCM}}}SubmitObjectsRequest")
    submit.append(registry_object_list(submission.registry_objects()))
    attachments = []
    for document in submission.documents:
        content_id = f"{uuid.uuid4().hex}@cpsdmp"
        holder = etree.SubElement(
            request, f"{{{XDSB}}}Document", id=document.entry.entryUUID
        )
        xop_include(holder, content_id)
        attachments.append(Attachment(content_id, document.data))
    return _message(
        endpoints.repository,
        ACTION_PROVIDE_AND_REGISTER,
        request,
        vihf,
        attachments,
        mtom=True,
    )


def read_registry_response(response: SoapResponse) -> RegistryResult:
    """
    Read the answer to TD2.1 or TD3.3.

    @return: the result, on C{Success} (warnings included).
    @raise PartialSuccess: on C{PartialSuccess}.
    @raise RegistryFailure: on C{Failure}.
    """
    return raise_for_status(registry_result(find_registry_response(response.body)))


# TD3.1: search ---------------------------------------------------------------
def _quoted(values: Sequence[str]) -> str:
    return "(" + ",".join("'" + v.replace("'", "''") + "'" for v in values) + ")"


def _code_list(codes: Sequence[CodedValue]) -> str:
    return _quoted([f"{c.code}^^{c.scheme}" for c in codes])


@dataclass
class FindDocuments:
    """
    The parameters of a FindDocuments stored query.

    @ivar statuses: availability statuses wanted (default: approved only).
    @ivar creation_from: lower bound of creationTime (XDS DTM, UTC),
        inclusive; the other bounds likewise.
    """

    patient: PatientId
    statuses: Sequence[str] = (Status.Approved,)
    creation_from: str | None = None
    creation_to: str | None = None
    service_start_from: str | None = None
    service_start_to: str | None = None
    service_stop_from: str | None = None
    service_stop_to: str | None = None
    type_codes: Sequence[CodedValue] = ()
    class_codes: Sequence[CodedValue] = ()
    format_codes: Sequence[CodedValue] = ()
    practice_setting_codes: Sequence[CodedValue] = ()
    facility_type_codes: Sequence[CodedValue] = ()
    confidentiality_codes: Sequence[CodedValue] = ()

    def slots(self) -> list[Slot]:
        slots = [
            Slot("$XDSDocumentEntryPatientId", [f"'{self.patient}'"]),
            Slot("$XDSDocumentEntryStatus", [_quoted(list(self.statuses))]),
        ]
        bounds = {
            "CreationTimeFrom": self.creation_from,
            "CreationTimeTo": self.creation_to,
            "ServiceStartTimeFrom": self.service_start_from,
            "ServiceStartTimeTo": self.service_start_to,
            "ServiceStopTimeFrom": self.service_stop_from,
            "ServiceStopTimeTo": self.service_stop_to,
        }
        for name, value in bounds.items():
            if value is not None:
                check_dtm(value, name)
                slots.append(Slot(f"$XDSDocumentEntry{name}", [value]))
        for first, last in [
            ("CreationTimeFrom", "CreationTimeTo"),
            ("ServiceStartTimeFrom", "ServiceStartTimeTo"),
            ("ServiceStopTimeFrom", "ServiceStopTimeTo"),
        ]:
            check_time_order(bounds[first], bounds[last], first, last)
        for name, codes in [
            ("TypeCode", self.type_codes),
            ("ClassCode", self.class_codes),
            ("FormatCode", self.format_codes),
            ("PracticeSettingCode", self.practice_setting_codes),
            ("HealthcareFacilityTypeCode", self.facility_type_codes),
            ("ConfidentialityCode", self.confidentiality_codes),
        ]:
            if codes:
                slots.append(Slot(f"$XDSDocumentEntry{name}", [_code_list(codes)]))
        return slots


def _adhoc_query(query_id: str, slots: list[Slot], return_type: str) -> etree._Element:
    request = etree.Element(
        f"{{{QUERY}}}AdhocQueryRequest", nsmap={"query": QUERY, "rim": RIM}
    )
    etree.SubElement(
        request,
        f"{{{QUERY}}}ResponseOption",
        returnComposedObjects="true",
        returnType=return_type,
    )
    query = etree.SubElement(request, f"{{{RIM}}}AdhocQuery", id=query_id)
    for slot in slots:
        query.append(slot.to_element())
    return request


def find_documents(
    endpoints: DmpEndpoints,
    vihf: VihfRequest,
    parameters: FindDocuments,
    return_type: str = "LeafClass",
) -> OutgoingMessage:
    """
    @return: the TD3.1 FindDocuments request.
    """
    request = _adhoc_query(FIND_DOCUMENTS, parameters.slots(), return_type)
    return _message(endpoints.registry, ACTION_STORED_QUERY, request, vihf)


def get_documents(
    endpoints: DmpEndpoints,
    vihf: VihfRequest,
    *,
    entry_uuids: Sequence[str] = (),
    unique_ids: Sequence[str] = (),
) -> OutgoingMessage:
    """
    @return: the TD3.1 GetDocuments request, by entryUUIDs or uniqueIds.
    """
    if bool(entry_uuids) == bool(unique_ids):
        raise MetadataError("GetDocuments wants either entryUUIDs or uniqueIds")
    slot = (
        Slot("$XDSDocumentEntryEntryUUID", [_quoted(list(entry_uuids))])
        if entry_uuids
        else Slot("$XDSDocumentEntryUniqueId", [_quoted(list(unique_ids))])
    )
    request = _adhoc_query(GET_DOCUMENTS, [slot], "LeafClass")
    return _message(endpoints.registry, ACTION_STORED_QUERY, request, vihf)


@dataclass
class QueryResult:
    """
    The answer to a stored query: the document entries (LeafClass) or their
    entryUUIDs (ObjectRef), and the warnings.
    """

    result: RegistryResult
    entries: list[DocumentEntry]
    references: list[str]


def read_query(response: SoapResponse) -> QueryResult:
    """
    @raise RegistryFailure: the query failed.
    @raise UnexpectedAnswer: not an AdhocQueryResponse.
    """
    body = response.body
    if body.tag != f"{{{QUERY}}}AdhocQueryResponse":
        raise UnexpectedAnswer(f"expected AdhocQueryResponse, got {body.tag}")
    result = raise_for_status(registry_result(body))
    objects = body.find(f"{{{RIM}}}RegistryObjectList")
    entries: list[DocumentEntry] = []
    references: list[str] = []
    if objects is not None:
        entries = [
            DocumentEntry.from_element(e)
            for e in objects.iterfind(f"{{{RIM}}}ExtrinsicObject")
        ]
        references = [r.get("id", "") for r in objects.iterfind(f"{{{RIM}}}ObjectRef")]
    return QueryResult(result, entries, references)


# TD3.2: retrieval ------------------------------------------------------------
def retrieve_documents(
    endpoints: DmpEndpoints,
    vihf: VihfRequest,
    unique_ids: Sequence[str],
    repository: str = DMP_REPOSITORY_ID,
) -> OutgoingMessage:
    """
    @return: the TD3.2 request for documents of the DMP's repository.
    """
    request = etree.Element(
        f"{{{XDSB}}}RetrieveDocumentSetRequest", nsmap={"xdsb": XDSB}
    )
    for unique_id in unique_ids:
        document = etree.SubElement(request, f"{{{XDSB}}}DocumentRequest")
        etree.SubElement(document, f"{{{XDSB}}}RepositoryUniqueId").text = repository
        etree.SubElement(document, f"{{{XDSB}}}DocumentUniqueId").text = unique_id
    return _message(endpoints.repository, ACTION_RETRIEVE, request, vihf, mtom=True)


@dataclass
class RetrievedDocument:
    """
    A retrieved document: identifiers, media type and the exact bytes (a
    view into the received body).
    """

    repository: str
    unique_id: str
    mime_type: str
    data: memoryview


def read_retrieve(response: SoapResponse) -> list[RetrievedDocument]:
    """
    @raise RegistryFailure: the retrieval failed, wholly or partly.
    """
    body = response.body
    if body.tag != f"{{{XDSB}}}RetrieveDocumentSetResponse":
        raise UnexpectedAnswer(f"expected RetrieveDocumentSetResponse, got {body.tag}")
    raise_for_status(registry_result(find_registry_response(body)))
    documents = []
    for item in body.iterfind(f"{{{XDSB}}}DocumentResponse"):
        holder = item.find(f"{{{XDSB}}}Document")
        if holder is None:
            raise UnexpectedAnswer("a DocumentResponse has no Document")
        documents.append(
            RetrievedDocument(
                repository=item.findtext(f"{{{XDSB}}}RepositoryUniqueId") or "",
                unique_id=item.findtext(f"{{{XDSB}}}DocumentUniqueId") or "",
                mime_type=item.findtext(f"{{{XDSB}}}mimeType") or "",
                data=response.binary(holder),
            )
        )
    return documents


# TD3.3: updates --------------------------------------------------------------
def _update_set(
    patient: PatientId,
    professional: Professional,
    structure: Structure,
    software: Software,
    defaults: SubmissionDefaults,
) -> SubmissionSet:
    if defaults.content_type is None:
        raise MetadataError("no contentTypeCode is configured for submission sets")
    return SubmissionSet(
        entryUUID=new_entry_uuid(),
        uniqueId=uuid_oid(),
        sourceId=software.source_oid,
        patientId=patient,
        submissionTime=xds_time(datetime.now(UTC)),
        contentTypeCode=defaults.content_type,
        authors=[author_of(professional, structure)],
    )


def _update_request(objects: list[etree._Element]) -> etree._Element:
    request = etree.Element(
        f"{{{LCM}}}SubmitObjectsRequest", nsmap={"lcm": LCM, "rim": RIM}
    )
    request.append(registry_object_list(objects))
    return request


def update_status(
    endpoints: DmpEndpoints,
    vihf: VihfRequest,
    entry: DocumentEntry,
    new_status: str,
    professional: Professional,
    structure: Structure,
    software: Software,
    defaults: SubmissionDefaults,
) -> OutgoingMessage:
    """
    @return: the TD3.3 request moving a document from its current status to
        C{new_status} (L{Status.Archived} to archive, L{Status.Approved} to
        unarchive, L{Status.Deleted} to delete).
    @raise MetadataError: the entry's current status is unknown.
    """
    if not entry.availabilityStatus:
        raise MetadataError(
            f"the current status of {entry.entryUUID} is unknown: read the "
            "entry with TD3.1 first"
        )
    submission_set = _update_set(
        entry.patientId, professional, structure, software, defaults
    )
    association = Association(
        AssociationType.UpdateAvailabilityStatus,
        submission_set.entryUUID,
        entry.entryUUID,
        [
            Slot("OriginalStatus", [entry.availabilityStatus]),
            Slot("NewStatus", [new_status]),
        ],
    )
    request = _update_request([submission_set.to_element(), association.to_element()])
    return _message(endpoints.registry, ACTION_UPDATE, request, vihf)


def update_visibility(
    endpoints: DmpEndpoints,
    vihf: VihfRequest,
    entry: DocumentEntry,
    *,
    masked: bool,
    professional: Professional,
    structure: Structure,
    software: Software,
    defaults: SubmissionDefaults,
) -> OutgoingMessage:
    """
    @return: the TD3.3 request masking a document from professionals
        (C{masked=True}) or unmasking it: a new version of its metadata with
        C{MASQUE_PS} added to or removed from its confidentialityCode.
    @raise MetadataError: the entry's version is unknown, or the document is
        already in the state asked for.
    """
    codes = [c for c in entry.confidentialityCode if c.code != MASQUE_PS.code]
    already = len(codes) != len(entry.confidentialityCode)
    if already == masked:
        state = "masked" if masked else "not masked"
        raise MetadataError(f"document {entry.uniqueId} is already {state}")
    if not entry.version:
        raise MetadataError(
            f"the metadata version of {entry.entryUUID} is unknown: read the "
            "entry with TD3.1 first"
        )
    new_entry = replace(
        copy.deepcopy(entry),
        entryUUID=new_entry_uuid(),
        logicalId=entry.logicalId or entry.entryUUID,
        confidentialityCode=[*codes, MASQUE_PS] if masked else codes,
        availabilityStatus=None,
        version=None,
    )
    submission_set = _update_set(
        entry.patientId, professional, structure, software, defaults
    )
    association = Association.has_member(
        submission_set.entryUUID,
        new_entry.entryUUID,
        SubmissionSetStatus="Original",
        PreviousVersion=entry.version,
    )
    request = _update_request(
        [submission_set.to_element(), new_entry.to_element(), association.to_element()]
    )
    return _message(endpoints.registry, ACTION_UPDATE, request, vihf)
