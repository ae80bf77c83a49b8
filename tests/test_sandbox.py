"""
The local DMP over real sockets: an OpenSSL client holding the soft card's
key and certificate sends the requests that L{cpsdmp.xds.transactions}
builds, for every ANS example CDA, and the sandbox answers as the DMP does,
its refusals included; what it stores survives a restart.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import os
import socket
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import pkcs12
from OpenSSL import SSL, crypto
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
    readBody,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IPolicyForHTTPS
from zope.interface import implementer

from cpsdmp.agent.testcard import TestCard, init_testcard
from cpsdmp.protocols.soap import SoapFault, SoapResponse, read_message
from cpsdmp.sandbox.tap import SandboxService
from cpsdmp.xds.cda import CLASS_CODE_SYSTEM, CdaError, document_entry
from cpsdmp.xds.context import Professional
from cpsdmp.xds.ebrim import (
    INS_OID_TEST,
    RIM,
    CodedValue,
    DocumentEntry,
    DocumentEntryScheme,
    PatientId,
    Slot,
    Status,
    new_entry_uuid,
    uuid_oid,
)
from cpsdmp.xds.responses import PartialSuccess, RegistryFailure
from cpsdmp.xds.signature import local_signer
from cpsdmp.xds.submit import SigningIdentity, prepare_td21
from cpsdmp.xds.transactions import (
    DMP_REPOSITORY_ID,
    MASQUE_PS,
    DmpEndpoints,
    FindDocuments,
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
from cpsdmp.xds.vihf import WSSE, VihfRequest
from tests.conformance.material import QUERY_XSD, RS_XSD, assert_valid, example_cdas
from tests.conformance.test_transactions import HL7_XSD
from tests.xdsvalues import DEFAULTS, SOFTWARE, STRUCTURE
from tests.xdsvalues import PROFESSIONAL as SOMEONE_ELSE

#: classCode for the CDAs whose typeCode has no classCode in the mapping.
SYNTHESE = CodedValue("11", "1.2.250.1.213.1.1.4.1", "Synthèse")
#: The patient of the ANS example CDAs, seeded in every sandbox.
CDA_PATIENT = PatientId("279035121518989", INS_OID_TEST)
REPOSITORY = Path(__file__).resolve().parents[1]


@functools.cache
def _card() -> TestCard:
    return init_testcard(Path("sandbox-card").absolute(), softhsm=False)


def _professional(card: TestCard) -> Professional:
    holder = card.professional
    return Professional(
        identifier=holder["id"],
        family=holder["family_name"],
        given=holder["given_name"],
        profession=CodedValue("10", "1.2.250.1.71.1.2.7", "Médecin"),
    )


@implementer(IPolicyForHTTPS)
class _Options:
    def __init__(self, options: Any) -> None:
        self.options = options

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return self.options


def _client_options(card: TestCard, with_certificate: bool = True) -> Any:
    loaded = pkcs12.load_pkcs12(Path(card.soft_card).read_bytes(), card.pin.encode())
    root = ssl.Certificate.loadPEM(Path(card.ca_root).read_bytes())
    client = None
    if with_certificate:
        assert loaded.key is not None and loaded.cert is not None
        client = ssl.PrivateCertificate.fromCertificateAndKeyPair(
            ssl.Certificate(crypto.X509.from_cryptography(loaded.cert.certificate)),
            ssl.KeyPair(crypto.PKey.from_cryptography_key(loaded.key)),
        )
    return ssl.optionsForClientTLS(
        "localhost", trustRoot=root, clientCertificate=client
    )


class SandboxTestCase(TestCase):
    """
    Starts a sandbox on a free loopback port and talks to it as the card
    holder.
    """

    timeout = 120
    max_request_bytes = 64 * 1024 * 1024

    def setUp(self) -> Deferred[None]:
        self.card = _card()
        self.db = str(Path(self.mktemp() + ".sqlite").absolute())
        self.professional = _professional(self.card)
        self.issuer = "CN=" + self.professional.identifier
        self.agent = Agent(reactor, contextFactory=_Options(_client_options(self.card)))
        return self.start()

    @inlineCallbacks
    def start(self) -> Any:
        card = self.card
        self.service = SandboxService(
            "tcp:0:interface=127.0.0.1",
            self.db,
            card.sandbox_cert,
            card.sandbox_key,
            [card.ca_root, *card.ca_intermediates],
            self.max_request_bytes,
        )
        port = yield self.service.start()
        self.endpoints = DmpEndpoints(
            f"https://127.0.0.1:{port.getHost().port}/si-dmp-server/v2/services"
        )
        self.addCleanup(self.stop)

    def stop(self) -> Deferred[None]:
        return self.service.stopService()

    def vihf(self, patient: PatientId | None = CDA_PATIENT, **kw: Any) -> VihfRequest:
        return VihfRequest(
            kw.get("professional", self.professional),
            STRUCTURE,
            SOFTWARE,
            issuer=self.issuer,
            patient=patient,
        )

    @inlineCallbacks
    def post(
        self, message: OutgoingMessage, url: str | None = None, agent: Any = None
    ) -> Any:
        """
        @return: a Deferred firing with the read SOAP answer.
        """
        response = yield (agent or self.agent).request(
            b"POST",
            (url or message.url).encode(),
            Headers({b"content-type": [message.content_type]}),
            FileBodyProducer(io.BytesIO(message.body())),
        )
        body = yield readBody(response)
        self.last_status = response.code
        content_type = response.headers.getRawHeaders(b"content-type", [b""])[0]
        return read_message(content_type.decode(), body)

    @inlineCallbacks
    def submit(self, message: OutgoingMessage) -> Any:
        answer = yield self.post(message)
        return read_registry_response(answer)

    @inlineCallbacks
    def refused(self, message: OutgoingMessage, reader: Any = None) -> Any:
        """
        @return: a Deferred firing with the codes of the DMP's refusal.
        """
        answer = yield self.post(message)
        failure = self.assertRaises(
            RegistryFailure, reader or read_registry_response, answer
        )
        return [e.code for e in failure.errors]

    @inlineCallbacks
    def find(self, patient: PatientId = CDA_PATIENT, **kw: Any) -> Any:
        answer = yield self.post(
            find_documents(
                self.endpoints, self.vihf(patient), FindDocuments(patient, **kw)
            )
        )
        return read_query(answer).entries

    @inlineCallbacks
    def get(self, unique_id: str) -> Any:
        answer = yield self.post(
            get_documents(self.endpoints, self.vihf(), unique_ids=[unique_id])
        )
        return read_query(answer).entries

    def td21(
        self,
        entries: list[tuple[DocumentEntry, bytes]],
        patient: PatientId = CDA_PATIENT,
    ) -> OutgoingMessage:
        submission = new_submission(
            entries, self.professional, STRUCTURE, SOFTWARE, DEFAULTS
        )
        return provide_and_register(self.endpoints, self.vihf(patient), submission)

    def update(
        self,
        entry: DocumentEntry,
        new_status: str,
        patient: PatientId | None = CDA_PATIENT,
    ) -> OutgoingMessage:
        return update_status(
            self.endpoints,
            self.vihf(patient),
            entry,
            new_status,
            self.professional,
            STRUCTURE,
            SOFTWARE,
            DEFAULTS,
        )

    def mask(self, entry: DocumentEntry, masked: bool = True) -> OutgoingMessage:
        return update_visibility(
            self.endpoints,
            self.vihf(),
            entry,
            masked=masked,
            professional=self.professional,
            structure=STRUCTURE,
            software=SOFTWARE,
            defaults=DEFAULTS,
        )


def _cda(prefix: str = "BIO") -> bytes:
    return next(p for p in example_cdas() if p.name.startswith(prefix)).read_bytes()


def _overrides(data: bytes) -> dict[str, object]:
    """
    @return: a classCode for the example CDAs whose typeCode the mapping
        does not know, as a producer would configure it; nothing otherwise.
    """
    try:
        document_entry(data, STRUCTURE, DEFAULTS)
    except CdaError as error:
        if "classCode" not in str(error):
            raise
        return {"classCode": SYNTHESE}
    return {}


def _entry(data: bytes, **changes: Any) -> tuple[DocumentEntry, bytes]:
    """
    @return: the metadata of a CDA under a fresh uniqueId, with C{changes}.
    """
    entry = document_entry(data, STRUCTURE, DEFAULTS, _overrides(data))
    return dataclasses.replace(entry, **{"uniqueId": uuid_oid(), **changes}), data


class ScenarioTests(SandboxTestCase):
    @inlineCallbacks
    def test_every_example_cda(self):  # type: ignore[no-untyped-def]
        """
        For each ANS example CDA: the patient's DMP exists, the signed
        submission is stored, found by status, date and type, retrieved byte
        for byte, then masked and archived; after a restart on the same
        database every change is still there.
        """
        answer = yield self.post(
            existence_test(self.endpoints, self.vihf(), CDA_PATIENT)
        )
        existence = read_existence(answer)
        self.assertTrue(existence.exists)
        self.assertEqual(existence.authorization, "VALIDE")
        self.assertEqual(existence.family, "PAT-TROIS")

        signature = pkcs12.load_pkcs12(
            Path(self.card.soft_card_signature).read_bytes(), self.card.pin.encode()
        )
        assert signature.key is not None and signature.cert is not None
        signing = SigningIdentity(
            local_signer(signature.key), signature.cert.certificate
        )
        cdas = example_cdas()
        self.assertGreaterEqual(len(cdas), 6)
        stored = {}
        for path in cdas:
            data = path.read_bytes()
            prepared = yield prepare_td21(
                [data],
                professional=self.professional,
                structure=STRUCTURE,
                software=SOFTWARE,
                defaults=DEFAULTS,
                endpoints=self.endpoints,
                issuer=self.issuer,
                signing=signing,
                overrides=[_overrides(data)],
            )
            result = yield self.submit(prepared.message)
            self.assertTrue(result.success, path.name)
            entry = prepared.submission.documents[0].entry

            found = yield self.find(type_codes=[entry.typeCode])
            self.assertIn(entry.uniqueId, [e.uniqueId for e in found], path.name)
            mine = next(e for e in found if e.uniqueId == entry.uniqueId)
            self.assertEqual(mine.availabilityStatus, Status.Approved)
            self.assertEqual((mine.hash, mine.size), (entry.hash, entry.size))
            later = yield self.find(
                creation_from=str(int(entry.creationTime) + 1).ljust(14, "0"),
                type_codes=[entry.typeCode],
            )
            self.assertNotIn(entry.uniqueId, [e.uniqueId for e in later])
            within = yield self.find(
                creation_from=entry.creationTime[:8],
                creation_to="99991231",
                type_codes=[entry.typeCode],
            )
            self.assertIn(entry.uniqueId, [e.uniqueId for e in within])

            answer = yield self.post(
                retrieve_documents(self.endpoints, self.vihf(), [entry.uniqueId])
            )
            (document,) = read_retrieve(answer)
            self.assertEqual(bytes(document.data), data, path.name)
            self.assertEqual(document.mime_type, "text/xml")

            yield self.submit(self.mask(mine))
            (masked,) = yield self.get(entry.uniqueId)
            self.assertIn(MASQUE_PS.code, [c.code for c in masked.confidentialityCode])
            self.assertEqual(masked.version, "2")
            yield self.submit(self.update(masked, Status.Archived))
            approved = yield self.find(type_codes=[entry.typeCode])
            self.assertNotIn(entry.uniqueId, [e.uniqueId for e in approved])
            stored[entry.uniqueId] = data

        self.assertEqual(len(stored), len(cdas))
        yield self.service.stopService()
        yield self.start()
        archived = yield self.find(statuses=[Status.Archived])
        by_id = {e.uniqueId: e for e in archived}
        for unique_id, data in stored.items():
            self.assertIn(
                MASQUE_PS.code, [c.code for c in by_id[unique_id].confidentialityCode]
            )
            answer = yield self.post(
                retrieve_documents(self.endpoints, self.vihf(), [unique_id])
            )
            self.assertEqual(bytes(read_retrieve(answer)[0].data), data)

        yield self.submit(self.update(by_id[next(iter(stored))], Status.Approved))
        approved = yield self.find()
        self.assertEqual(
            [e.uniqueId for e in approved if e.uniqueId in stored], [next(iter(stored))]
        )
        signatures = [e for e in approved if e.uniqueId not in stored]
        self.assertEqual(len(signatures), len(cdas))


class RefusalTests(SandboxTestCase):
    @inlineCallbacks
    def test_vihf_missing(self):  # type: ignore[no-untyped-def]
        """
        A request without VIHF is answered with a WS-Security fault.
        """
        message = existence_test(self.endpoints, self.vihf(), CDA_PATIENT)
        header = message.envelope.find(
            "{http://www.w3.org/2003/05/soap-envelope}Header"
        )
        header.remove(header.find(f"{{{WSSE}}}Security"))
        error = yield self.assertFailure(self.post(message), SoapFault)
        self.assertEqual(error.subcodes, ["wsse:InvalidSecurity"])
        self.assertIn("no VIHF", error.reason)

    @inlineCallbacks
    def test_vihf_of_someone_else(self):  # type: ignore[no-untyped-def]
        """
        A VIHF naming another professional than the card holder is refused,
        and nothing is stored.
        """
        message = provide_and_register(
            self.endpoints,
            self.vihf(professional=SOMEONE_ELSE),
            new_submission(
                [_entry(_cda())], SOMEONE_ELSE, STRUCTURE, SOFTWARE, DEFAULTS
            ),
        )
        error = yield self.assertFailure(self.post(message), SoapFault)
        self.assertEqual(error.subcodes, ["wsse:FailedAuthentication"])
        self.assertIn(SOMEONE_ELSE.identifier, error.reason)
        self.assertIn(self.professional.identifier, error.reason)
        self.assertEqual((yield self.service.store.count("documents")), 0)

    @inlineCallbacks
    def test_unknown_patient(self):  # type: ignore[no-untyped-def]
        """
        A patient without DMP: NF to TD0.2, XDSUnknownPatientId to TD2.1 and
        TD3.1.
        """
        stranger = PatientId("100017512345603", INS_OID_TEST)
        answer = yield self.post(
            existence_test(self.endpoints, self.vihf(stranger), stranger)
        )
        result = read_existence(answer)
        self.assertEqual((result.exists, result.response_code), (False, "NF"))
        codes = yield self.refused(
            self.td21([_entry(_cda(), patientId=stranger)], stranger)
        )
        self.assertEqual(codes, ["XDSUnknownPatientId"])
        codes = yield self.refused(
            find_documents(
                self.endpoints, self.vihf(stranger), FindDocuments(stranger)
            ),
            lambda answer: read_query(answer),
        )
        self.assertEqual(codes, ["XDSUnknownPatientId"])

    @inlineCallbacks
    def test_missing_mandatory_field(self):  # type: ignore[no-untyped-def]
        """
        A DocumentEntry without creationTime, or without typeCode, is refused
        with XDSRepositoryMetadataError.
        """
        codes = yield self.refused(self.td21([_entry(_cda(), creationTime="")]))
        self.assertEqual(codes, ["XDSRepositoryMetadataError"])

        message = self.td21([_entry(_cda())])
        for classification in message.envelope.iter(
            "{urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0}Classification"
        ):
            if (
                classification.get("classificationScheme")
                == DocumentEntryScheme.typeCode
            ):
                classification.getparent().remove(classification)
        answer = yield self.post(message)
        failure = self.assertRaises(RegistryFailure, read_registry_response, answer)
        self.assertEqual(failure.code, "XDSRepositoryMetadataError")
        self.assertIn("typeCode", str(failure))
        self.assertEqual((yield self.service.store.count("documents")), 0)

    @inlineCallbacks
    def test_metadata_values_refused(self):  # type: ignore[no-untyped-def]
        """
        Values the DMP refuses, whoever made the metadata: a time that is
        not an XDS time or not a real date, a service start after its
        stop, a title over what the registry stores, a classCode of
        TRE_A03 that the table has not, a uniqueId whose extension is over
        16 characters. Nothing is stored.
        """
        for changes, named in [
            ({"creationTime": "yesterday"}, "creationTime"),
            ({"creationTime": "20201301"}, "creationTime"),
            ({"serviceStartTime": "20301301"}, "serviceStartTime"),
            (
                {"serviceStartTime": "20300101", "serviceStopTime": "20200101"},
                "serviceStartTime 20300101 is after serviceStopTime 20200101",
            ),
            ({"title": "x" * 100_000}, "title is 100000 characters long"),
            ({"classCode": CodedValue("ZZZ", CLASS_CODE_SYSTEM, "")}, "'ZZZ'"),
            ({"uniqueId": "1.2.3^A2345678901234567"}, "its extension has 17"),
        ]:
            answer = yield self.post(self.td21([_entry(_cda(), **changes)]))
            failure = self.assertRaises(RegistryFailure, read_registry_response, answer)
            self.assertEqual(failure.code, "XDSRegistryMetadataError", changes)
            self.assertIn(named, str(failure))
        self.assertEqual((yield self.service.store.count("documents")), 0)

    @inlineCallbacks
    def test_search_times_checked(self):  # type: ignore[no-untyped-def]
        """
        A FindDocuments whose creation time is not a real date is refused.
        """
        query = find_documents(self.endpoints, self.vihf(), FindDocuments(CDA_PATIENT))
        for slot in query.envelope.iter(
            "{urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0}AdhocQuery"
        ):
            slot.append(
                Slot("$XDSDocumentEntryCreationTimeFrom", ["20201301"]).to_element()
            )
        codes = yield self.refused(query, lambda answer: read_query(answer))
        self.assertEqual(codes, ["XDSRegistryError"])

    @inlineCallbacks
    def test_duplicate_unique_id(self):  # type: ignore[no-untyped-def]
        """
        A document whose uniqueId is already in the DMP is refused.
        """
        entry = _entry(_cda())
        yield self.submit(self.td21([entry]))
        again = dataclasses.replace(entry[0], entryUUID=new_entry_uuid())
        codes = yield self.refused(self.td21([(again, entry[1])]))
        self.assertEqual(codes, ["XDSDuplicateUniqueIdInRegistry"])
        self.assertEqual((yield self.service.store.count("documents")), 1)

    @inlineCallbacks
    def test_same_submission_twice(self):  # type: ignore[no-untyped-def]
        """
        The very same TD2.1 sent again (a client retrying) is refused and
        stores nothing more.
        """
        message = self.td21([_entry(_cda())])
        yield self.submit(message)
        codes = yield self.refused(message)
        self.assertEqual(codes, ["XDSDuplicateUniqueIdInRegistry"])
        for table in ["documents", "entries", "submission_sets", "associations"]:
            self.assertEqual((yield self.service.store.count(table)), 1, table)

    @inlineCallbacks
    def test_hash_and_size(self):  # type: ignore[no-untyped-def]
        """
        Metadata whose hash or size is not that of the bytes is refused.
        """
        codes = yield self.refused(self.td21([_entry(_cda(), hash="0" * 40)]))
        self.assertEqual(codes, ["XDSNonIdenticalHash"])
        data = _cda()
        codes = yield self.refused(self.td21([_entry(data, size=len(data) + 1)]))
        self.assertEqual(codes, ["XDSNonIdenticalSize"])

    @inlineCallbacks
    def test_whole_or_nothing(self):  # type: ignore[no-untyped-def]
        """
        Two documents, the second with a wrong hash: neither is stored.
        """
        good = _entry(_cda("BIO"))
        bad = _entry(_cda("VAC"), hash="1" * 40)
        codes = yield self.refused(self.td21([good, bad]))
        self.assertEqual(codes, ["XDSNonIdenticalHash"])
        for table in ["documents", "entries", "submission_sets", "associations"]:
            self.assertEqual((yield self.service.store.count(table)), 0, table)
        self.assertEqual((yield self.get(good[0].uniqueId)), [])
        codes = yield self.refused(
            retrieve_documents(self.endpoints, self.vihf(), [good[0].uniqueId]),
            read_retrieve,
        )
        self.assertEqual(codes, ["XDSMissingDocument"])

    @inlineCallbacks
    def test_store_refusal_rolls_back(self):  # type: ignore[no-untyped-def]
        """
        A refusal found while storing (the second document's uniqueId is
        already known) leaves the first document unstored too.
        """
        known = _entry(_cda("VAC"))
        yield self.submit(self.td21([known]))
        fresh = _entry(_cda("BIO"))
        again = (dataclasses.replace(known[0], entryUUID=new_entry_uuid()), known[1])
        codes = yield self.refused(self.td21([fresh, again]))
        self.assertEqual(codes, ["XDSDuplicateUniqueIdInRegistry"])
        self.assertEqual((yield self.get(fresh[0].uniqueId)), [])
        self.assertEqual((yield self.service.store.count("documents")), 1)

    @inlineCallbacks
    def test_unknown_document(self):  # type: ignore[no-untyped-def]
        """
        TD3.2 and TD3.3 of a document the DMP does not have are refused.
        """
        codes = yield self.refused(
            retrieve_documents(self.endpoints, self.vihf(), ["1.2.3.4.5"]),
            read_retrieve,
        )
        self.assertEqual(codes, ["XDSMissingDocument"])
        ghost = dataclasses.replace(
            _entry(_cda())[0], availabilityStatus=Status.Approved, version="1"
        )
        codes = yield self.refused(self.update(ghost, Status.Archived))
        self.assertEqual(codes, ["UnresolvedReferenceException"])
        codes = yield self.refused(self.mask(ghost))
        self.assertEqual(codes, ["UnresolvedReferenceException"])

    @inlineCallbacks
    def test_other_patient(self):  # type: ignore[no-untyped-def]
        """
        The DMP answers only about the patient the VIHF names: another
        patient's document is unknown to GetDocuments, TD3.2 and TD3.3, and
        a FindDocuments or a submission about another patient, or a request
        whose VIHF names no patient, is refused; nothing changes.
        """
        other = PatientId("185127505612306", INS_OID_TEST)
        entry = _entry(_cda(), patientId=other)
        unique_id = entry[0].uniqueId
        stored = yield self.submit(self.td21([entry], other))
        self.assertTrue(stored.success)
        (theirs,) = yield self.post(
            get_documents(self.endpoints, self.vihf(other), unique_ids=[unique_id])
        ).addCallback(lambda answer: read_query(answer).entries)

        self.assertEqual((yield self.get(unique_id)), [])
        answer = yield self.post(
            get_documents(self.endpoints, self.vihf(), entry_uuids=[theirs.entryUUID])
        )
        self.assertEqual(read_query(answer).entries, [])
        codes = yield self.refused(
            retrieve_documents(self.endpoints, self.vihf(), [unique_id]),
            read_retrieve,
        )
        self.assertEqual(codes, ["XDSMissingDocument"])
        # The status change of B's document under a VIHF of A...
        codes = yield self.refused(self.update(theirs, Status.Archived))
        self.assertEqual(codes, ["XDSPatientIdDoesNotMatch"])
        # ...or dressed as a document of A: unknown.
        forged = dataclasses.replace(theirs, patientId=CDA_PATIENT)
        codes = yield self.refused(self.update(forged, Status.Archived))
        self.assertEqual(codes, ["UnresolvedReferenceException"])
        codes = yield self.refused(self.mask(forged))
        self.assertEqual(codes, ["UnresolvedReferenceException"])
        codes = yield self.refused(
            find_documents(self.endpoints, self.vihf(), FindDocuments(other)),
            read_query,
        )
        self.assertEqual(codes, ["XDSPatientIdDoesNotMatch"])
        submission = new_submission(
            [_entry(_cda(), patientId=other)],
            self.professional,
            STRUCTURE,
            SOFTWARE,
            DEFAULTS,
        )
        codes = yield self.refused(
            provide_and_register(self.endpoints, self.vihf(), submission)
        )
        self.assertEqual(codes, ["XDSPatientIdDoesNotMatch"])
        answer = yield self.post(
            get_documents(self.endpoints, self.vihf(None), unique_ids=[unique_id])
        )
        self.assertRaises(RegistryFailure, read_query, answer)
        codes = yield self.refused(
            retrieve_documents(self.endpoints, self.vihf(None), [unique_id]),
            read_retrieve,
        )
        self.assertEqual(codes, ["XDSRegistryError"])

        (still,) = yield self.post(
            get_documents(self.endpoints, self.vihf(other), unique_ids=[unique_id])
        ).addCallback(lambda answer: read_query(answer).entries)
        self.assertEqual(
            (still.availabilityStatus, still.version), (Status.Approved, "1")
        )
        self.assertEqual((yield self.service.store.count("documents")), 1)
        answer = yield self.post(
            retrieve_documents(self.endpoints, self.vihf(other), [unique_id])
        )
        self.assertEqual(bytes(read_retrieve(answer)[0].data), entry[1])

    @inlineCallbacks
    def test_stale_update(self):  # type: ignore[no-untyped-def]
        """
        A status change from a status the document no longer has, or a new
        version of an old version, is refused.
        """
        entry = _entry(_cda())
        yield self.submit(self.td21([entry]))
        (current,) = yield self.get(entry[0].uniqueId)
        yield self.submit(self.update(current, Status.Archived))
        codes = yield self.refused(self.update(current, Status.Archived))
        self.assertEqual(codes, ["XDSMetadataUpdateError"])
        (archived,) = yield self.get(entry[0].uniqueId)
        yield self.submit(self.mask(archived))
        codes = yield self.refused(self.mask(archived))
        self.assertEqual(codes, ["XDSMetadataVersionError"])

    @inlineCallbacks
    def test_update_to_same_state(self):  # type: ignore[no-untyped-def]
        """
        A status change to the status the document has (archiving an
        archived one, unarchiving an approved one) is refused as the DMP
        refuses it, and changes nothing.
        """
        entry = _entry(_cda())
        yield self.submit(self.td21([entry]))
        (approved,) = yield self.get(entry[0].uniqueId)
        codes = yield self.refused(self.update(approved, Status.Approved))
        self.assertEqual(codes, ["XDSMetadataUpdateError"])
        answer = yield self.post(self.update(approved, Status.Approved))
        self.assertIn(
            "already approved",
            str(self.assertRaises(RegistryFailure, read_registry_response, answer)),
        )
        yield self.submit(self.update(approved, Status.Archived))
        (archived,) = yield self.get(entry[0].uniqueId)
        codes = yield self.refused(self.update(archived, Status.Archived))
        self.assertEqual(codes, ["XDSMetadataUpdateError"])
        (still,) = yield self.get(entry[0].uniqueId)
        self.assertEqual(
            (still.availabilityStatus, still.version), (Status.Archived, "1")
        )
        self.assertEqual((yield self.service.store.count("submission_sets")), 2)

    @inlineCallbacks
    def test_deleted_no_longer_changes(self):  # type: ignore[no-untyped-def]
        """
        Once deleted, a document's status and metadata no longer change:
        a second deletion, an unarchiving, a masking are refused; its
        retrieval says it was deleted, where an unknown one is unknown.
        """
        entry = _entry(_cda())
        yield self.submit(self.td21([entry]))
        (current,) = yield self.get(entry[0].uniqueId)
        yield self.submit(self.update(current, Status.Deleted))
        (deleted,) = yield self.get(entry[0].uniqueId)
        self.assertEqual(deleted.availabilityStatus, Status.Deleted)
        for message in [
            self.update(deleted, Status.Deleted),
            self.update(deleted, Status.Approved),
            self.update(deleted, Status.Archived),
            self.mask(deleted),
        ]:
            answer = yield self.post(message)
            failure = self.assertRaises(RegistryFailure, read_registry_response, answer)
            self.assertEqual(
                [e.code for e in failure.errors], ["XDSMetadataUpdateError"]
            )
        (still,) = yield self.get(entry[0].uniqueId)
        self.assertEqual(
            (still.availabilityStatus, still.version), (Status.Deleted, "1")
        )
        for unique_id, said in [
            (entry[0].uniqueId, "was deleted"),
            ("1.2.3.4.5", "no document"),
        ]:
            answer = yield self.post(
                retrieve_documents(self.endpoints, self.vihf(), [unique_id])
            )
            failure = self.assertRaises(RegistryFailure, read_retrieve, answer)
            self.assertEqual([e.code for e in failure.errors], ["XDSMissingDocument"])
            self.assertIn(said, failure.errors[0].context)

    @inlineCallbacks
    def test_wrong_service(self):  # type: ignore[no-untyped-def]
        """
        An action sent to a service that does not take it is a WS-Addressing
        fault.
        """
        message = existence_test(self.endpoints, self.vihf(), CDA_PATIENT)
        error = yield self.assertFailure(
            self.post(message, url=self.endpoints.registry), SoapFault
        )
        self.assertEqual(error.subcodes, ["wsa:ActionNotSupported"])

    @inlineCallbacks
    def test_no_client_certificate(self):  # type: ignore[no-untyped-def]
        """
        Without a client certificate the TLS handshake fails: no HTTP at all.
        """
        anonymous = Agent(
            reactor,
            contextFactory=_Options(_client_options(self.card, with_certificate=False)),
        )
        message = existence_test(self.endpoints, self.vihf(), CDA_PATIENT)
        failure = yield self.assertFailure(
            self.post(message, agent=anonymous),
            RequestTransmissionFailed,
            ResponseNeverReceived,
            ResponseFailed,
        )
        self.assertTrue(
            any(reason.check(SSL.Error) for reason in failure.reasons), failure.reasons
        )
        self.assertIn("handshake failure", str(failure.reasons[0].value))


class QueryTests(SandboxTestCase):
    @inlineCallbacks
    def stored(self, *prefixes: str) -> Any:
        """
        @return: a Deferred firing with the entries, as the registry shows
            them, of one submission of the example CDAs named.
        """
        entries = [_entry(_cda(prefix)) for prefix in prefixes]
        yield self.submit(self.td21(entries))
        shown = []
        for entry, _ in entries:
            (found,) = yield self.get(entry.uniqueId)
            shown.append(found)
        return shown

    @inlineCallbacks
    def test_references_and_entry_uuids(self):  # type: ignore[no-untyped-def]
        """
        FindDocuments answers ObjectRefs when asked; GetDocuments finds by
        entryUUID; the registry adds status, version, hash, size and the
        repository.
        """
        first, second = yield self.stored("BIO", "VAC-NOTE")
        answer = yield self.post(
            find_documents(
                self.endpoints,
                self.vihf(),
                FindDocuments(CDA_PATIENT),
                return_type="ObjectRef",
            )
        )
        result = read_query(answer)
        self.assertEqual(result.entries, [])
        self.assertEqual(result.references, [first.entryUUID, second.entryUUID])
        answer = yield self.post(
            get_documents(self.endpoints, self.vihf(), entry_uuids=[second.entryUUID])
        )
        (entry,) = read_query(answer).entries
        # An entryUUID is found whatever its case; asked twice, answered once.
        for asked in [
            {"entry_uuids": [second.entryUUID.upper(), second.entryUUID]},
            {"unique_ids": [second.uniqueId, second.uniqueId]},
        ]:
            answer = yield self.post(
                get_documents(self.endpoints, self.vihf(), **asked)
            )
            self.assertEqual(read_query(answer).entries, [entry], asked)
        self.assertEqual(entry.uniqueId, second.uniqueId)
        self.assertEqual(entry.availabilityStatus, Status.Approved)
        self.assertEqual(entry.version, "1")
        self.assertEqual(entry.logicalId, second.entryUUID)
        self.assertEqual(entry.repositoryUniqueId, DMP_REPOSITORY_ID)
        data = _cda("VAC-NOTE")
        self.assertEqual(entry.size, len(data))
        self.assertEqual(entry.hash, hashlib.sha1(data).hexdigest())

    @inlineCallbacks
    def test_confidentiality_and_class_filters(self):  # type: ignore[no-untyped-def]
        """
        Only the masked document has MASQUE_PS; a classCode filter keeps the
        documents of that class.
        """
        first, second = yield self.stored("BIO", "VAC-NOTE")
        yield self.submit(self.mask(second))
        masked = yield self.find(confidentiality_codes=[MASQUE_PS])
        self.assertEqual([e.uniqueId for e in masked], [second.uniqueId])
        same_class = yield self.find(class_codes=[first.classCode])
        self.assertIn(first.uniqueId, [e.uniqueId for e in same_class])
        yield self.submit(self.mask(masked[0], masked=False))
        self.assertEqual((yield self.find(confidentiality_codes=[MASQUE_PS])), [])
        (current,) = yield self.get(second.uniqueId)
        self.assertEqual(current.version, "3")

    @inlineCallbacks
    def test_deleted(self):  # type: ignore[no-untyped-def]
        """
        A deleted document is found only when deleted ones are asked for,
        and can no longer be retrieved.
        """
        (entry,) = yield self.stored("VAC-NOTE")
        yield self.submit(self.update(entry, Status.Deleted))
        self.assertEqual((yield self.find()), [])
        deleted = yield self.find(statuses=[Status.Deleted])
        self.assertEqual([e.uniqueId for e in deleted], [entry.uniqueId])
        codes = yield self.refused(
            retrieve_documents(self.endpoints, self.vihf(), [entry.uniqueId]),
            read_retrieve,
        )
        self.assertEqual(codes, ["XDSMissingDocument"])

    @inlineCallbacks
    def test_partial_retrieval(self):  # type: ignore[no-untyped-def]
        """
        Asked for a known and an unknown document, the DMP answers
        PartialSuccess with the known one and an error for the other.
        """
        (entry,) = yield self.stored("VAC-NOTE")
        answer = yield self.post(
            retrieve_documents(self.endpoints, self.vihf(), [entry.uniqueId, "1.2.3"])
        )
        failure = self.assertRaises(PartialSuccess, read_retrieve, answer)
        self.assertEqual(failure.code, "XDSMissingDocument")
        parts = list(answer.attachments.values())
        self.assertEqual([bytes(p) for p in parts], [_cda("VAC-NOTE")])

    @inlineCallbacks
    def test_query_parameters(self):  # type: ignore[no-untyped-def]
        """
        A FindDocuments without status, a GetDocuments without identifiers
        and an unknown stored query are refused with the IHE codes.
        """
        codes = yield self.refused(
            find_documents(
                self.endpoints, self.vihf(), FindDocuments(CDA_PATIENT, statuses=())
            ),
            read_query,
        )
        self.assertEqual(codes, ["XDSStoredQueryParamNumber"])
        message = get_documents(self.endpoints, self.vihf(), unique_ids=["1.2.3"])
        query = message.envelope.find(f".//{{{RIM}}}AdhocQuery")
        for slot in list(query):
            query.remove(slot)
        codes = yield self.refused(message, read_query)
        self.assertEqual(codes, ["XDSStoredQueryParamNumber"])
        query.set("id", "urn:uuid:00000000-0000-0000-0000-000000000000")
        codes = yield self.refused(message, read_query)
        self.assertEqual(codes, ["XDSUnknownStoredQuery"])

    @inlineCallbacks
    def test_unsafe_xml(self):  # type: ignore[no-untyped-def]
        """
        A request with a DOCTYPE is not parsed: a sender fault says why.
        """
        response = yield self.agent.request(
            b"POST",
            self.endpoints.patients.encode(),
            Headers({b"content-type": [b"application/soap+xml"]}),
            FileBodyProducer(
                io.BytesIO(
                    b'<?xml version="1.0"?><!DOCTYPE e [<!ENTITY x "y">]>'
                    b'<e xmlns="http://www.w3.org/2003/05/soap-envelope">&x;</e>'
                )
            ),
        )
        body = yield readBody(response)
        self.assertEqual(response.code, 500)
        fault = self.assertRaises(
            SoapFault,
            read_message,
            response.headers.getRawHeaders(b"content-type")[0].decode(),
            body,
        )
        self.assertEqual((fault.code, fault.subcodes), ("soap:Sender", []))
        self.assertIn("DOCTYPE", fault.reason)

    @inlineCallbacks
    def test_answers_valid(self):  # type: ignore[no-untyped-def]
        """
        The sandbox's answers are valid against the DMP's schemas: a refusal,
        a query answer with entries, a TD0.2 answer.
        """
        yield self.stored("BIO")
        answer = yield self.post(
            self.td21([_entry(_cda(), hash="0" * 40)]),
        )
        assert_valid(self, RS_XSD, answer.body)
        answer = yield self.post(
            find_documents(self.endpoints, self.vihf(), FindDocuments(CDA_PATIENT))
        )
        self.assertEqual(len(read_query(answer).entries), 1)
        assert_valid(self, QUERY_XSD, answer.body)
        answer = yield self.post(
            existence_test(self.endpoints, self.vihf(), CDA_PATIENT)
        )
        assert_valid(self, HL7_XSD + "PRPA_IN201308UV02.xsd", answer.body)


class LimitTests(SandboxTestCase):
    max_request_bytes = 48 * 1024

    @inlineCallbacks
    def test_request_too_large(self):  # type: ignore[no-untyped-def]
        """
        A request over the limit is answered 413 and nothing is stored;
        one under it is served.
        """
        small = _cda("VAC-NOTE")
        self.assertLess(len(small), 32 * 1024)
        yield self.submit(self.td21([_entry(small)]))
        big = _entry(_cda("VAC_"))
        self.assertGreater(len(big[1]), self.max_request_bytes)
        message = self.td21([big])
        response = yield self.agent.request(
            b"POST",
            message.url.encode(),
            Headers({b"content-type": [message.content_type]}),
            FileBodyProducer(io.BytesIO(message.body())),
        )
        yield readBody(response)
        self.assertEqual(response.code, 413)
        self.assertEqual((yield self.service.store.count("documents")), 1)

    @inlineCallbacks
    def test_chunked_request_too_large(self):  # type: ignore[no-untyped-def]
        """
        A body without announced length is counted as it comes and refused
        once over the limit.
        """
        message = self.td21([_entry(_cda("VAC_"))])
        producer = FileBodyProducer(io.BytesIO(message.body()))
        producer.length = UNKNOWN_LENGTH
        response = yield self.agent.request(
            b"POST",
            message.url.encode(),
            Headers({b"content-type": [message.content_type]}),
            producer,
        )
        yield readBody(response)
        self.assertEqual(response.code, 413)
        self.assertEqual((yield self.service.store.count("documents")), 0)


class _Output(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class TwistTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_twist_dmpsandbox(self):  # type: ignore[no-untyped-def]
        """
        C{twist dmpsandbox --testcard DIR} runs as a process, answers a
        TD0.2 over mutual TLS, and logs the transaction without the INS.
        """
        card = _card()
        port = _free_port()
        output = _Output()
        environment = dict(os.environ, PYTHONPATH=str(REPOSITORY))
        process = reactor.spawnProcess(  # type: ignore[attr-defined]
            output,
            sys.executable,
            [
                sys.executable,
                "-m",
                "twisted",
                "--log-format=text",
                "dmpsandbox",
                "--testcard",
                card.directory,
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
                "--db",
                str(Path("twist.sqlite").absolute()),
            ],
            env=environment,
            path=str(Path(".").absolute()),
        )

        def stop() -> Deferred[None]:
            try:
                process.signalProcess("TERM")
            except Exception:
                pass
            return output.ended

        self.addCleanup(stop)
        agent = Agent(reactor, contextFactory=_Options(_client_options(card)))
        endpoints = DmpEndpoints(f"https://127.0.0.1:{port}/si-dmp-server/v2/services")
        professional = _professional(card)
        message = existence_test(
            endpoints,
            VihfRequest(professional, STRUCTURE, SOFTWARE, issuer="CN=x"),
            CDA_PATIENT,
        )
        answer: SoapResponse | None = None
        for _ in range(100):
            try:
                response = yield agent.request(
                    b"POST",
                    message.url.encode(),
                    Headers({b"content-type": [message.content_type]}),
                    FileBodyProducer(io.BytesIO(message.body())),
                )
            except Exception:
                if output.ended.called:
                    break
                yield deferLater(reactor, 0.2, lambda: None)
                continue
            body = yield readBody(response)
            answer = read_message(
                response.headers.getRawHeaders(b"content-type")[0].decode(), body
            )
            break
        self.assertIsNotNone(answer, output.output.decode(errors="replace"))
        assert answer is not None
        self.assertTrue(read_existence(answer).exists)
        yield stop()
        log = output.output.decode(errors="replace")
        self.assertIn("TD0.2 PRPA_IN201307UV02 patient 279…: OK", log)
        self.assertNotIn(CDA_PATIENT.ins, log)
