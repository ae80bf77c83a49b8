"""
The DMP transactions: what we build is valid against the XSDs of the DMP
package and shaped like the official examples; the official examples and
answers built like the DMP's read back through our readers.
"""

from __future__ import annotations

import base64
import copy

from lxml import etree
from twisted.trial.unittest import SynchronousTestCase

from cpsdmp.protocols.soap import (
    SOAP12,
    XOP,
    Addressing,
    Attachment,
    MtomMessage,
    envelope,
    read_message,
    xop_include,
)
from cpsdmp.xds.cda import SYNTHESE, document_entry
from cpsdmp.xds.ebrim import (
    LCM,
    QUERY,
    RIM,
    RS,
    XDSB,
    AssociationType,
    DocumentEntry,
    Status,
    registry_object_list,
)
from cpsdmp.xds.responses import (
    FAILURE,
    PARTIAL_SUCCESS,
    SUCCESS,
    PartialSuccess,
    RegistryFailure,
)
from cpsdmp.xds.transactions import (
    ACTION_EXISTENCE,
    ACTION_PROVIDE_AND_REGISTER,
    ACTION_RETRIEVE,
    ACTION_STORED_QUERY,
    ACTION_UPDATE,
    MASQUE_PS,
    DmpEndpoints,
    FindDocuments,
    HL7Error,
    OutgoingMessage,
    existence_test,
    find_documents,
    get_documents,
    new_submission,
    provide_and_register,
    read_existence,
    read_query,
    read_registry_response,
    read_retrieve,
    retrieve_documents,
    update_status,
    update_visibility,
)
from cpsdmp.xds.vihf import VihfRequest
from tests.conformance.material import (
    LCM_XSD,
    QUERY_XSD,
    RS_XSD,
    XDSB_XSD,
    assert_valid,
    example_cdas,
    example_message,
    material,
    value_set,
)
from tests.xdsvalues import DEFAULTS, PATIENT, PROFESSIONAL, SOFTWARE, STRUCTURE

ENDPOINTS = DmpEndpoints("https://dmp.example/si-dmp-server/v2/services")
VIHF = VihfRequest(PROFESSIONAL, STRUCTURE, SOFTWARE, issuer="CN=test", patient=PATIENT)
SOAP_XML = "application/soap+xml; charset=UTF-8"
HL7_XSD = "gie-sv-dmp-package/schema/HL7V3/NE2009/multicacheschemas/"


def example(name: str):
    return read_message(SOAP_XML, example_message(name))


def round_trip(message: OutgoingMessage):
    # What the DMP would receive, read back as it would.
    return read_message(message.content_type, message.body())


def body_of(message: OutgoingMessage) -> etree._Element:
    return round_trip(message).body


def inline_xop(message: OutgoingMessage) -> etree._Element:
    # The XOP infoset: each xop:Include replaced by the base64 of its part,
    # which is what the schema describes.
    body = copy.deepcopy(message.envelope.find(f"{{{SOAP12}}}Body")[0])
    parts = {a.content_id: bytes(a.data) for a in message.attachments}
    for include in body.iter(f"{{{XOP}}}Include"):
        holder = include.getparent()
        holder.remove(include)
        holder.text = base64.b64encode(parts[include.get("href")[4:]]).decode()
    return body


def cda_entries() -> list[tuple[DocumentEntry, bytes]]:
    result = []
    for path in example_cdas():
        data = path.read_bytes()
        try:
            entry = document_entry(data)
        except ValueError:
            entry = document_entry(data, overrides={"classCode": SYNTHESE})
        # Every example is about the same test patient.
        result.append((entry, data))
    return result


class CommonTests(SynchronousTestCase):
    def test_headers(self) -> None:
        """
        Every request carries the WS-Addressing headers with its action and
        service URL, and the VIHF in wsse:Security.
        """
        entry, data = cda_entries()[0]
        submission = new_submission(
            [(entry, data)], PROFESSIONAL, STRUCTURE, SOFTWARE, DEFAULTS
        )
        cases = [
            (existence_test(ENDPOINTS, VIHF, PATIENT), ACTION_EXISTENCE, "patients"),
            (
                provide_and_register(ENDPOINTS, VIHF, submission),
                ACTION_PROVIDE_AND_REGISTER,
                "repository",
            ),
            (
                find_documents(ENDPOINTS, VIHF, FindDocuments(PATIENT)),
                ACTION_STORED_QUERY,
                "registry",
            ),
            (
                retrieve_documents(ENDPOINTS, VIHF, ["1.2.3"]),
                ACTION_RETRIEVE,
                "repository",
            ),
        ]
        for message, action, service in cases:
            response = round_trip(message)
            self.assertEqual(response.addressing("Action"), action)
            self.assertEqual(response.addressing("To"), f"{ENDPOINTS.base}/{service}")
            self.assertEqual(response.addressing("MessageID"), message.message_id)
            header = response.header
            self.assertEqual(
                len(
                    header.xpath(
                        "//*[local-name()='Security']/*[local-name()='Assertion']"
                    )
                ),
                1,
            )
            self.assertIn(f'action="{action}"', message.content_type)

    def test_official_examples_parse(self) -> None:
        """
        Every official example message reads as a SOAP 1.2 envelope; the
        DMP's own (TDx.y) carry an Action.
        """
        folder = material() / "gie-sv-dmp-package/exemples-messages"
        names = sorted(p.name for p in folder.glob("*.xml"))
        self.assertGreater(len(names), 30)
        for name in names:
            response = example(name)
            self.assertIsNotNone(response.body, name)
            if name.startswith("td"):
                self.assertTrue(response.addressing("Action"), name)


class ExistenceTests(SynchronousTestCase):
    def test_request_valid(self) -> None:
        """
        TD0.2 is a valid PRPA_IN201307UV02 shaped like the official one.
        """
        body = body_of(existence_test(ENDPOINTS, VIHF, PATIENT))
        assert_valid(self, HL7_XSD + "PRPA_IN201307UV02.xsd", body)
        official = example("td0.2_request.xml").body
        ns = {"h": "urn:hl7-org:v3"}
        for path in [
            "h:interactionId/@extension",
            "h:controlActProcess/h:reasonCode/@code",
            "h:receiver/h:device/h:id/@root",
            "h:controlActProcess/h:queryByParameter/h:parameterList/"
            "h:patientIdentifier/h:semanticsText/text()",
        ]:
            self.assertEqual(
                body.xpath(path, namespaces=ns), official.xpath(path, namespaces=ns)
            )
        self.assertEqual(
            body.xpath(
                "h:controlActProcess/h:queryByParameter/h:parameterList/"
                "h:patientIdentifier/h:value/@extension",
                namespaces=ns,
            ),
            [PATIENT.ins],
        )

    def test_official_response(self) -> None:
        """
        The official TD0.2 answer reads as an existing DMP with a valid
        authorisation.
        """
        result = read_existence(example("td0.2_response.xml"))
        self.assertTrue(result.exists)
        self.assertEqual(result.authorization, "VALIDE")
        self.assertEqual(result.status, "active")
        self.assertIn(("1.2.250.1.213.1.4.10", "207058575627097"), result.identifiers)
        self.assertEqual(result.attentions["STATUT_MT"], "true")

    def test_not_found(self) -> None:
        """
        An answer without patient and with queryResponseCode NF says the
        DMP does not exist.
        """
        data = example_message("td0.2_response.xml")
        start = data.index(b"<subject contextConductionInd")
        end = data.index(b"</subject>", start) + len(b"</subject>")
        data = (data[:start] + data[end:]).replace(
            b'<queryResponseCode code="OK"/>', b'<queryResponseCode code="NF"/>'
        )
        result = read_existence(read_message(SOAP_XML, data))
        self.assertFalse(result.exists)
        self.assertEqual(result.response_code, "NF")

    def test_application_error(self) -> None:
        """
        An AE acknowledgement raises with the DMP's code and text.
        """
        data = example_message("td0.2_response.xml").replace(
            b'<acknowledgement typeCode="AA">',
            b'<acknowledgement typeCode="AE"><acknowledgementDetail typeCode="E">'
            b'<code code="DMP_INS_INCONNU" codeSystem="1.2.250.1.213.4.1.2.1"/>'
            b"<text>INS inconnu</text></acknowledgementDetail>",
        )
        self.assertIn(b'typeCode="AE"', data)
        error = self.assertRaises(
            HL7Error, read_existence, read_message(SOAP_XML, data)
        )
        self.assertEqual(error.code, "DMP_INS_INCONNU")
        self.assertIn("INS inconnu", str(error))


class SubmissionTests(SynchronousTestCase):
    def build(self) -> tuple[OutgoingMessage, list[tuple[DocumentEntry, bytes]]]:
        entries = cda_entries()
        submission = new_submission(
            entries, PROFESSIONAL, STRUCTURE, SOFTWARE, DEFAULTS, title="Lot"
        )
        return provide_and_register(ENDPOINTS, VIHF, submission), entries

    def test_valid(self) -> None:
        """
        The TD2.1 request of all the example CDAs is valid against the XDS.b
        schema (XOP infoset) and its SubmitObjectsRequest against lcm.xsd.
        """
        message, _ = self.build()
        assert_valid(self, XDSB_XSD, inline_xop(message))
        assert_valid(
            self, LCM_XSD, body_of(message).find(f"{{{LCM}}}SubmitObjectsRequest")
        )

    def test_documents_as_binary_parts(self) -> None:
        """
        Each document travels as its own binary part, not base64, and reads
        back to the exact bytes; its Document element names its entry.
        """
        message, entries = self.build()
        body = message.body()
        for _, data in entries:
            self.assertIn(data, body)
            self.assertNotIn(base64.b64encode(data[:300])[:200], body)
        response = read_message(message.content_type, body)
        holders = response.body.findall(f"{{{XDSB}}}Document")
        self.assertEqual(len(holders), len(entries))
        for holder, (entry, data) in zip(holders, entries, strict=True):
            self.assertEqual(holder.get("id"), entry.entryUUID)
            self.assertEqual(bytes(response.binary(holder)), data)

    def test_associations(self) -> None:
        """
        The submission set has one HasMember (Original) per document, and
        carries the card holder as author.
        """
        message, entries = self.build()
        objects = body_of(message).find(f"{{{LCM}}}SubmitObjectsRequest")[0]
        package = objects.find(f"{{{RIM}}}RegistryPackage")
        members = objects.findall(f"{{{RIM}}}Association")
        self.assertEqual(
            sorted(a.get("targetObject") for a in members),
            sorted(e.entryUUID for e, _ in entries),
        )
        for association in members:
            self.assertEqual(
                association.get("associationType"), AssociationType.HasMember
            )
            self.assertEqual(association.get("sourceObject"), package.get("id"))
            self.assertEqual(
                association.xpath(
                    "rim:Slot[@name='SubmissionSetStatus']//rim:Value/text()",
                    namespaces={"rim": RIM},
                ),
                ["Original"],
            )
        people = package.xpath(
            "rim:Classification/rim:Slot[@name='authorPerson']//rim:Value/text()",
            namespaces={"rim": RIM},
        )
        self.assertEqual(
            people, ["899900063480^LIBRE^MAX^^^^^^&1.2.250.1.71.4.2.1&ISO^D^^^IDNPS"]
        )
        (specialty,) = package.xpath(
            "rim:Classification/rim:Slot[@name='authorSpecialty']//rim:Value/text()",
            namespaces={"rim": RIM},
        )
        code, _, system = specialty.split("^")
        self.assertIn((code, system), value_set("JDV_J01"))
        institution = package.xpath(
            "rim:Classification/rim:Slot[@name='authorInstitution']//rim:Value/text()",
            namespaces={"rim": RIM},
        )
        self.assertEqual(
            institution,
            ["CABINET DR LIBRE^^^^^&1.2.250.1.71.4.2.2&ISO^IDNST^^^499900063480001"],
        )

    def test_official_response(self) -> None:
        """
        The official TD2.1 answer is a success.
        """
        result = read_registry_response(example("td2.1_response.xml"))
        self.assertTrue(result.success)
        self.assertEqual(result.errors, [])


def registry_response(status: str, errors: list[tuple[str, str, str, str]]) -> bytes:
    response = etree.Element(
        f"{{{RS}}}RegistryResponse", status=status, nsmap={"rs": RS}
    )
    if errors:
        holder = etree.SubElement(response, f"{{{RS}}}RegistryErrorList")
        for code, context, severity, location in errors:
            etree.SubElement(
                holder,
                f"{{{RS}}}RegistryError",
                errorCode=code,
                codeContext=context,
                severity=f"urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:{severity}",
                location=location,
            )
    root = envelope(response, Addressing("urn:x", "urn:y"))
    return etree.tostring(root)


class RegistryResponseTests(SynchronousTestCase):
    def test_failure(self) -> None:
        """
        A Failure is raised with each RegistryError, code and context kept.
        """
        data = registry_response(
            FAILURE,
            [
                (
                    "XDSPatientIdDoesNotMatch",
                    "Le patient ne correspond pas",
                    "Error",
                    "doc1",
                ),
                ("DMPWarning", "Attention", "Warning", ""),
            ],
        )
        failure = self.assertRaises(
            RegistryFailure, read_registry_response, read_message(SOAP_XML, data)
        )
        self.assertNotIsInstance(failure, PartialSuccess)
        self.assertEqual(failure.code, "XDSPatientIdDoesNotMatch")
        self.assertEqual(
            [(e.code, e.context, e.location, e.is_error) for e in failure.errors],
            [
                (
                    "XDSPatientIdDoesNotMatch",
                    "Le patient ne correspond pas",
                    "doc1",
                    True,
                ),
                ("DMPWarning", "Attention", "", False),
            ],
        )
        self.assertIn("Le patient ne correspond pas", str(failure))
        assert_valid(self, RS_XSD, etree.fromstring(data)[1][0])

    def test_partial(self) -> None:
        """
        A PartialSuccess is not a success.
        """
        data = registry_response(
            PARTIAL_SUCCESS, [("XDSRegistryError", "x", "Error", "")]
        )
        self.assertRaises(
            PartialSuccess, read_registry_response, read_message(SOAP_XML, data)
        )

    def test_success_with_warning(self) -> None:
        """
        A Success may carry warnings, which are kept.
        """
        data = registry_response(SUCCESS, [("W1", "note", "Warning", "")])
        result = read_registry_response(read_message(SOAP_XML, data))
        self.assertEqual([w.code for w in result.warnings], ["W1"])


class QueryTests(SynchronousTestCase):
    def test_find_documents(self) -> None:
        """
        FindDocuments with status, date and type filters is valid against
        query.xsd and written like the official example.
        """
        parameters = FindDocuments(
            PATIENT,
            statuses=(Status.Approved, Status.Archived),
            creation_from="20240101",
            creation_to="20241231235959",
            type_codes=[SYNTHESE.__class__("11502-2", "2.16.840.1.113883.6.1")],
        )
        body = body_of(find_documents(ENDPOINTS, VIHF, parameters))
        assert_valid(self, QUERY_XSD, body)
        ns = {"rim": RIM}

        def slot(tree: etree._Element, name: str) -> list[str]:
            return tree.xpath(
                f"rim:AdhocQuery/rim:Slot[@name='{name}']//rim:Value/text()",
                namespaces=ns,
            )

        official = example("td3.1_request.xml").body
        self.assertEqual(
            body.find(f"{{{RIM}}}AdhocQuery").get("id"),
            official.find(f"{{{RIM}}}AdhocQuery").get("id"),
        )
        self.assertEqual(
            slot(body, "$XDSDocumentEntryPatientId"),
            slot(official, "$XDSDocumentEntryPatientId"),
        )
        self.assertEqual(
            slot(body, "$XDSDocumentEntryStatus"),
            [
                "('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved',"
                "'urn:asip:ci-sis:2010:StatusType:Archived')"
            ],
        )
        self.assertEqual(slot(body, "$XDSDocumentEntryCreationTimeFrom"), ["20240101"])
        self.assertEqual(
            slot(body, "$XDSDocumentEntryTypeCode"),
            ["('11502-2^^2.16.840.1.113883.6.1')"],
        )

    def test_get_documents(self) -> None:
        """
        GetDocuments by entryUUID is valid.
        """
        body = body_of(
            get_documents(ENDPOINTS, VIHF, entry_uuids=["urn:uuid:1", "urn:uuid:2"])
        )
        assert_valid(self, QUERY_XSD, body)
        self.assertRaises(ValueError, get_documents, ENDPOINTS, VIHF)

    def test_read_answer(self) -> None:
        """
        An AdhocQueryResponse carrying DocumentEntries reads back to them.
        """
        entries = [entry for entry, _ in cda_entries()]
        response = etree.Element(
            f"{{{QUERY}}}AdhocQueryResponse", status=SUCCESS, nsmap={"query": QUERY}
        )
        objects = []
        for entry in entries:
            element = entry.to_element()
            element.set("status", Status.Approved)
            objects.append(element)
        response.append(registry_object_list(objects))
        assert_valid(self, QUERY_XSD, response)
        data = etree.tostring(envelope(response, Addressing("urn:x", "urn:y")))
        result = read_query(read_message(SOAP_XML, data))
        self.assertEqual(
            [e.uniqueId for e in result.entries], [e.uniqueId for e in entries]
        )
        self.assertEqual(
            {e.availabilityStatus for e in result.entries}, {Status.Approved}
        )
        self.assertEqual(result.entries[0].hash, entries[0].hash)

    def test_read_failure(self) -> None:
        """
        A failed query raises with its errors.
        """
        response = etree.Element(
            f"{{{QUERY}}}AdhocQueryResponse", status=FAILURE, nsmap={"query": QUERY}
        )
        errors = etree.SubElement(response, f"{{{RS}}}RegistryErrorList")
        etree.SubElement(
            errors,
            f"{{{RS}}}RegistryError",
            errorCode="DMPAccessDenied",
            codeContext="Non",
        )
        data = etree.tostring(envelope(response, Addressing("urn:x", "urn:y")))
        failure = self.assertRaises(
            RegistryFailure, read_query, read_message(SOAP_XML, data)
        )
        self.assertEqual(failure.code, "DMPAccessDenied")


class RetrieveTests(SynchronousTestCase):
    def test_request(self) -> None:
        """
        RetrieveDocumentSet is valid and written like the official example.
        """
        body = body_of(retrieve_documents(ENDPOINTS, VIHF, ["1.2.250.1.999.1"]))
        assert_valid(self, XDSB_XSD, body)
        official = example("td3.2_request.xml").body
        path = "xdsb:DocumentRequest/xdsb:RepositoryUniqueId/text()"
        ns = {"xdsb": XDSB}
        self.assertEqual(
            body.xpath(path, namespaces=ns), official.xpath(path, namespaces=ns)
        )

    def test_mtom_answer(self) -> None:
        """
        An MTOM RetrieveDocumentSetResponse reads back to the exact bytes of
        each document.
        """
        documents = [(entry.uniqueId, data) for entry, data in cda_entries()[:2]]
        response = etree.Element(
            f"{{{XDSB}}}RetrieveDocumentSetResponse", nsmap={"xdsb": XDSB}
        )
        etree.SubElement(response, f"{{{RS}}}RegistryResponse", status=SUCCESS)
        attachments = []
        for index, (unique_id, data) in enumerate(documents):
            item = etree.SubElement(response, f"{{{XDSB}}}DocumentResponse")
            etree.SubElement(
                item, f"{{{XDSB}}}RepositoryUniqueId"
            ).text = "1.2.250.1.213.4.1.1.1.2"
            etree.SubElement(item, f"{{{XDSB}}}DocumentUniqueId").text = unique_id
            etree.SubElement(item, f"{{{XDSB}}}mimeType").text = "text/xml"
            xop_include(etree.SubElement(item, f"{{{XDSB}}}Document"), f"d{index}@dmp")
            attachments.append(Attachment(f"d{index}@dmp", data))
        action = "urn:ihe:iti:2007:RetrieveDocumentSetResponse"
        message = MtomMessage(
            envelope(response, Addressing(action, "urn:y")), attachments, action
        )
        read = read_retrieve(
            read_message(message.content_type, b"".join(message.parts()))
        )
        self.assertEqual([(d.unique_id, bytes(d.data)) for d in read], documents)
        self.assertEqual({d.mime_type for d in read}, {"text/xml"})


class UpdateTests(SynchronousTestCase):
    def entry(self) -> DocumentEntry:
        entry = cda_entries()[0][0]
        entry.availabilityStatus = Status.Approved
        entry.version = "1"
        entry.logicalId = entry.entryUUID
        return entry

    def test_archive_like_official(self) -> None:
        """
        Archiving is an UpdateAvailabilityStatus association from a new
        submission set, valid against lcm.xsd, with the official example's
        slots.
        """
        entry = self.entry()
        body = body_of(
            update_status(
                ENDPOINTS,
                VIHF,
                entry,
                Status.Archived,
                PROFESSIONAL,
                STRUCTURE,
                SOFTWARE,
                DEFAULTS,
            )
        )
        assert_valid(self, LCM_XSD, body)
        official = example("td3.3d_request.xml").body
        ns = {"rim": RIM}

        def describe(tree: etree._Element) -> list[tuple[str, list[str]]]:
            association = tree.find(f"{{{RIM}}}RegistryObjectList/{{{RIM}}}Association")
            return [
                (association.get("associationType"), []),
                *[
                    (
                        s.get("name"),
                        [
                            v.strip()
                            for v in s.xpath(".//rim:Value/text()", namespaces=ns)
                        ],
                    )
                    for s in association.findall(f"{{{RIM}}}Slot")
                ],
            ]

        self.assertEqual(describe(body), describe(official))
        association = body.find(f"{{{RIM}}}RegistryObjectList/{{{RIM}}}Association")
        self.assertEqual(association.get("targetObject"), entry.entryUUID)
        self.assertEqual(
            association.get("sourceObject"),
            body.find(f"{{{RIM}}}RegistryObjectList/{{{RIM}}}RegistryPackage").get(
                "id"
            ),
        )

    def test_delete_like_official(self) -> None:
        """
        Deleting an archived document moves it to Deleted, as in TD3.3c.
        """
        entry = self.entry()
        entry.availabilityStatus = Status.Archived
        body = body_of(
            update_status(
                ENDPOINTS,
                VIHF,
                entry,
                Status.Deleted,
                PROFESSIONAL,
                STRUCTURE,
                SOFTWARE,
                DEFAULTS,
            )
        )
        assert_valid(self, LCM_XSD, body)
        ns = {"rim": RIM}
        path = "rim:RegistryObjectList/rim:Association/rim:Slot//rim:Value/text()"
        official = example("td3.3c_request.xml").body
        self.assertEqual(
            [v.strip() for v in body.xpath(path, namespaces=ns)],
            [v.strip() for v in official.xpath(path, namespaces=ns)],
        )

    def test_official_responses(self) -> None:
        """
        The official TD3.3 answers are successes.
        """
        for name in ["td3.3c_response.xml", "td3.3d_response.xml"]:
            self.assertTrue(read_registry_response(example(name)).success)

    def test_mask_and_unmask(self) -> None:
        """
        Masking submits a new version of the entry, same logical id, with
        MASQUE_PS added, a member of the update set with PreviousVersion;
        unmasking removes it; asking for the current state is refused.
        """
        entry = self.entry()
        message = update_visibility(
            ENDPOINTS,
            VIHF,
            entry,
            masked=True,
            professional=PROFESSIONAL,
            structure=STRUCTURE,
            software=SOFTWARE,
            defaults=DEFAULTS,
        )
        self.assertEqual(message.action, ACTION_UPDATE)
        body = body_of(message)
        assert_valid(self, LCM_XSD, body)
        objects = body.find(f"{{{RIM}}}RegistryObjectList")
        new = DocumentEntry.from_element(objects.find(f"{{{RIM}}}ExtrinsicObject"))
        self.assertNotEqual(new.entryUUID, entry.entryUUID)
        self.assertEqual(new.logicalId, entry.entryUUID)
        self.assertIn(MASQUE_PS, new.confidentialityCode)
        association = objects.find(f"{{{RIM}}}Association")
        self.assertEqual(association.get("targetObject"), new.entryUUID)
        self.assertEqual(
            association.xpath(
                "rim:Slot[@name='PreviousVersion']//rim:Value/text()",
                namespaces={"rim": RIM},
            ),
            ["1"],
        )
        self.assertRaises(
            ValueError,
            update_visibility,
            ENDPOINTS,
            VIHF,
            entry,
            masked=False,
            professional=PROFESSIONAL,
            structure=STRUCTURE,
            software=SOFTWARE,
            defaults=DEFAULTS,
        )
        new.version = "2"
        unmasked = body_of(
            update_visibility(
                ENDPOINTS,
                VIHF,
                new,
                masked=False,
                professional=PROFESSIONAL,
                structure=STRUCTURE,
                software=SOFTWARE,
                defaults=DEFAULTS,
            )
        )
        again = DocumentEntry.from_element(
            unmasked.find(f"{{{RIM}}}RegistryObjectList/{{{RIM}}}ExtrinsicObject")
        )
        self.assertNotIn(MASQUE_PS, again.confidentialityCode)


class ProducerTests(SynchronousTestCase):
    def test_both_kinds(self) -> None:
        """
        Plain and MTOM requests both give a body producer whose output is
        the body, with its length announced.
        """
        from twisted.internet import task
        from twisted.internet.testing import StringTransport

        from cpsdmp.protocols.soap import MtomBodyProducer

        entry, data = cda_entries()[0]
        submission = new_submission(
            [(entry, data)], PROFESSIONAL, STRUCTURE, SOFTWARE, DEFAULTS
        )
        clock = task.Clock()
        cooperator = task.Cooperator(
            scheduler=lambda call: clock.callLater(0, call), started=True
        )
        for message in [
            existence_test(ENDPOINTS, VIHF, PATIENT),
            provide_and_register(ENDPOINTS, VIHF, submission),
        ]:
            producer = message.producer(cooperator)
            self.assertEqual(isinstance(producer, MtomBodyProducer), message.mtom)
            transport = StringTransport()
            done = producer.startProducing(transport)
            while not done.called:
                clock.advance(0)
            self.assertEqual(transport.value(), message.body())
            self.assertEqual(producer.length, len(transport.value()))
