"""
The DMP's side of the transactions: the answers a DMP gives, built the way
the official examples show them (RegistryResponse, AdhocQueryResponse, an
MTOM RetrieveDocumentSetResponse, the PRPA_IN201308UV02 of TD0.2). The
sandbox DMP answers with these; the readers in L{cpsdmp.xds.transactions}
read them.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from lxml import etree

from cpsdmp.protocols.soap import (
    Addressing,
    Attachment,
    MtomMessage,
    envelope,
    plain_content_type,
    plain_message,
    xop_include,
)
from cpsdmp.xds.ebrim import (
    QUERY,
    RS,
    XDSB,
    DocumentEntry,
    PatientId,
    registry_object_list,
)
from cpsdmp.xds.responses import SEVERITY_ERROR, SUCCESS, RegistryError
from cpsdmp.xds.transactions import DMP_DEVICE_OID

HL7 = "urn:hl7-org:v3"
XSI = "http://www.w3.org/2001/XMLSchema-instance"

ACTION_PROVIDE_AND_REGISTER_ANSWER = (
    "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-bResponse"
)
ACTION_STORED_QUERY_ANSWER = "urn:ihe:iti:2007:RegistryStoredQueryResponse"
ACTION_RETRIEVE_ANSWER = "urn:ihe:iti:2007:RetrieveDocumentSetResponse"
ACTION_UPDATE_ANSWER = "urn:ihe:iti:2010:UpdateDocumentSet-Response"
ACTION_EXISTENCE_ANSWER = "urn:hl7-org:v3:PRPA_IN201308UV02"


@dataclass
class Answer:
    """
    An answer ready to write as an HTTP body.
    """

    content_type: str
    body: bytes | MtomMessage

    def parts(self) -> list[bytes | memoryview]:
        if isinstance(self.body, MtomMessage):
            return list(self.body.parts())
        return [self.body]


def _error_list(parent: etree._Element, errors: Sequence[RegistryError]) -> None:
    if not errors:
        return
    holder = etree.SubElement(parent, f"{{{RS}}}RegistryErrorList")
    for error in errors:
        element = etree.SubElement(
            holder,
            f"{{{RS}}}RegistryError",
            errorCode=error.code,
            codeContext=error.context,
            severity=error.severity or SEVERITY_ERROR,
        )
        if error.location:
            element.set("location", error.location)


def registry_response(
    status: str = SUCCESS, errors: Sequence[RegistryError] = ()
) -> etree._Element:
    """
    @return: an C{rs:RegistryResponse}.
    """
    response = etree.Element(
        f"{{{RS}}}RegistryResponse", status=status, nsmap={"rs": RS}
    )
    _error_list(response, errors)
    return response


def query_response(
    entries: Sequence[DocumentEntry],
    status: str = SUCCESS,
    errors: Sequence[RegistryError] = (),
) -> etree._Element:
    """
    @return: a C{query:AdhocQueryResponse} with C{entries} as LeafClass.
    """
    response = etree.Element(
        f"{{{QUERY}}}AdhocQueryResponse",
        status=status,
        nsmap={"query": QUERY, "rs": RS},
    )
    _error_list(response, errors)
    response.append(registry_object_list(e.to_element() for e in entries))
    return response


def plain_answer(body: etree._Element, action: str, request_id: str | None) -> Answer:
    """
    @return: a SOAP 1.2 answer to the request C{request_id}.
    """
    root = envelope(body, Addressing.answer(action, request_id))
    return Answer(plain_content_type(action), plain_message(root))


def retrieve_answer(
    documents: Sequence[tuple[str, str, str, bytes | memoryview]],
    request_id: str | None,
    status: str = SUCCESS,
    errors: Sequence[RegistryError] = (),
) -> Answer:
    """
    @param documents: (repositoryUniqueId, documentUniqueId, mimeType,
        bytes) of each document found.
    @return: the MTOM RetrieveDocumentSetResponse, each document a binary
        part.
    """
    response = etree.Element(
        f"{{{XDSB}}}RetrieveDocumentSetResponse", nsmap={"xdsb": XDSB, "rs": RS}
    )
    response.append(registry_response(status, errors))
    attachments = []
    for repository, unique_id, mime_type, data in documents:
        item = etree.SubElement(response, f"{{{XDSB}}}DocumentResponse")
        etree.SubElement(item, f"{{{XDSB}}}RepositoryUniqueId").text = repository
        etree.SubElement(item, f"{{{XDSB}}}DocumentUniqueId").text = unique_id
        etree.SubElement(item, f"{{{XDSB}}}mimeType").text = mime_type
        content_id = f"{uuid.uuid4().hex}@dmp"
        xop_include(etree.SubElement(item, f"{{{XDSB}}}Document"), content_id)
        attachments.append(Attachment(content_id, data))
    root = envelope(response, Addressing.answer(ACTION_RETRIEVE_ANSWER, request_id))
    message = MtomMessage(root, attachments, ACTION_RETRIEVE_ANSWER)
    return Answer(message.content_type, message)


@dataclass
class DmpRecord:
    """
    What a TD0.2 answer says of an existing DMP.
    """

    patient: PatientId
    family: str
    given: str
    gender: str
    birth_date: str
    authorization: str = "VALIDE"
    status: str = "active"


def existence_response(
    request: etree._Element, record: DmpRecord | None
) -> etree._Element:
    """
    @param request: the TD0.2 PRPA_IN201307UV02 being answered.
    @param record: the DMP found, or C{None} for "no DMP" (NF).
    @return: the PRPA_IN201308UV02.
    """
    h = f"{{{HL7}}}"
    ns = {"h": HL7}
    root = etree.Element(
        f"{h}PRPA_IN201308UV02", ITSVersion="XML_1.0", nsmap={None: HL7, "xsi": XSI}
    )
    etree.SubElement(root, f"{h}id", root=str(uuid.uuid4()))
    etree.SubElement(
        root, f"{h}creationTime", value=datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    )
    etree.SubElement(
        root,
        f"{h}interactionId",
        extension="PRPA_IN201308UV02",
        root="2.16.840.1.113883.1.6",
    )
    etree.SubElement(root, f"{h}processingCode", code="P")
    etree.SubElement(root, f"{h}processingModeCode", code="T")
    etree.SubElement(root, f"{h}acceptAckCode", code="NE")
    sender = request.find("h:sender/h:device", ns)
    for role, device_id, name in [
        (
            "receiver",
            sender.find("h:id", ns).get("root", "") if sender is not None else "",
            sender.findtext("h:softwareName", namespaces=ns)
            if sender is not None
            else "",
        ),
        ("sender", DMP_DEVICE_OID, "DMP"),
    ]:
        party = etree.SubElement(
            root, f"{h}{role}", typeCode="RCV" if role == "receiver" else "SND"
        )
        device = etree.SubElement(
            party, f"{h}device", classCode="DEV", determinerCode="INSTANCE"
        )
        etree.SubElement(device, f"{h}id", root=device_id)
        etree.SubElement(device, f"{h}softwareName").text = name
    if record is not None:
        line = etree.SubElement(root, f"{h}attentionLine")
        etree.SubElement(
            line,
            f"{h}keyWordText",
            code="AUTORISATION",
            codeSystem="1.2.250.1.213.4.1.2.6.1",
        )
        etree.SubElement(
            line,
            f"{h}value",
            {f"{{{XSI}}}type": "CV"},
            code=record.authorization,
            codeSystem="1.2.250.1.213.4.1.2.6.2",
        )
    acknowledgement = etree.SubElement(root, f"{h}acknowledgement", typeCode="AA")
    target = etree.SubElement(acknowledgement, f"{h}targetMessage")
    request_id = request.find("h:id", ns)
    etree.SubElement(
        target,
        f"{h}id",
        root=request_id.get("root", "") if request_id is not None else "",
        extension=request_id.get("extension", "") if request_id is not None else "",
    )
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
    if record is not None:
        subject = etree.SubElement(
            control, f"{h}subject", contextConductionInd="false", typeCode="SUBJ"
        )
        event = etree.SubElement(
            subject, f"{h}registrationEvent", classCode="REG", moodCode="EVN"
        )
        etree.SubElement(event, f"{h}statusCode", code="completed")
        subject1 = etree.SubElement(event, f"{h}subject1", typeCode="SBJ")
        patient = etree.SubElement(subject1, f"{h}patient", classCode="PAT")
        etree.SubElement(
            patient,
            f"{h}id",
            extension=record.patient.ins,
            root=record.patient.authority,
        )
        etree.SubElement(patient, f"{h}statusCode", code=record.status)
        person = etree.SubElement(
            patient, f"{h}patientPerson", classCode="PSN", determinerCode="INSTANCE"
        )
        name = etree.SubElement(person, f"{h}name")
        etree.SubElement(name, f"{h}given").text = record.given
        etree.SubElement(name, f"{h}family").text = record.family
        etree.SubElement(person, f"{h}administrativeGenderCode", code=record.gender)
        etree.SubElement(person, f"{h}birthTime", value=record.birth_date)
        custodian = etree.SubElement(event, f"{h}custodian", typeCode="CST")
        entity = etree.SubElement(custodian, f"{h}assignedEntity", classCode="ASSIGNED")
        etree.SubElement(entity, f"{h}id", root=DMP_DEVICE_OID)
    query_ack = etree.SubElement(control, f"{h}queryAck")
    query_id = request.find("h:controlActProcess/h:queryByParameter/h:queryId", ns)
    if query_id is not None:
        etree.SubElement(
            query_ack,
            f"{h}queryId",
            extension=query_id.get("extension", ""),
            root=query_id.get("root", ""),
        )
    etree.SubElement(
        query_ack, f"{h}queryResponseCode", code="OK" if record is not None else "NF"
    )
    return root
