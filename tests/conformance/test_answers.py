"""
The answers a DMP gives, built by L{cpsdmp.xds.answers}: valid against the
schemas, shaped like the official answers, and read by our readers.
"""

from __future__ import annotations

from lxml import etree
from twisted.trial.unittest import SynchronousTestCase

from cpsdmp.protocols.soap import SOAP12, WSA, read_message
from cpsdmp.xds.answers import (
    ACTION_EXISTENCE_ANSWER,
    ACTION_PROVIDE_AND_REGISTER_ANSWER,
    ACTION_STORED_QUERY_ANSWER,
    DmpRecord,
    existence_response,
    plain_answer,
    query_response,
    registry_response,
    retrieve_answer,
)
from cpsdmp.xds.ebrim import Status
from cpsdmp.xds.responses import FAILURE, SEVERITY_ERROR, RegistryError, RegistryFailure
from cpsdmp.xds.transactions import (
    existence_test,
    read_existence,
    read_query,
    read_registry_response,
    read_retrieve,
)
from tests.conformance.material import QUERY_XSD, RS_XSD, XDSB_XSD, assert_valid
from tests.conformance.test_transactions import (
    ENDPOINTS,
    HL7_XSD,
    VIHF,
    cda_entries,
    example,
    round_trip,
)
from tests.xdsvalues import PATIENT


def read(answer):
    return read_message(answer.content_type, b"".join(answer.parts()))


class AnswerTests(SynchronousTestCase):
    def test_registry_response(self) -> None:
        """
        A success answers like the official TD2.1 answer, RelatesTo naming
        the request; a failure carries its errors to the reader.
        """
        answer = plain_answer(
            registry_response(), ACTION_PROVIDE_AND_REGISTER_ANSWER, "urn:uuid:req"
        )
        response = read(answer)
        official = example("td2.1_response.xml")
        self.assertEqual(response.addressing("Action"), official.addressing("Action"))
        self.assertEqual(response.addressing("RelatesTo"), "urn:uuid:req")
        self.assertIsNone(response.header.find(f"{{{WSA}}}ReplyTo"))
        self.assertTrue(read_registry_response(response).success)

        error = RegistryError("XDSRegistryError", "refus", SEVERITY_ERROR, "x")
        element = registry_response(FAILURE, [error])
        assert_valid(self, RS_XSD, element)
        failure = self.assertRaises(
            RegistryFailure,
            read_registry_response,
            read(plain_answer(element, ACTION_PROVIDE_AND_REGISTER_ANSWER, None)),
        )
        self.assertEqual(failure.errors, [error])
        self.assertEqual(str(error), "error XDSRegistryError: refus (location x)")

    def test_error_in_words(self) -> None:
        """
        An error's location is said when its context does not already name
        it, and only then.
        """
        for context, location, said in [
            ("refus", "", "error XDSRegistryError: refus"),
            (
                "refus",
                "urn:uuid:a",
                "error XDSRegistryError: refus (location urn:uuid:a)",
            ),
            (
                "document 1.2.3 refused",
                "1.2.3",
                "error XDSRegistryError: document 1.2.3 refused",
            ),
        ]:
            error = RegistryError("XDSRegistryError", context, SEVERITY_ERROR, location)
            self.assertEqual(str(error), said)

    def test_query_response(self) -> None:
        """
        A query answer of the example entries is valid and reads back.
        """
        entries = [entry for entry, _ in cda_entries()]
        for entry in entries:
            entry.availabilityStatus = Status.Approved
        element = query_response(entries)
        assert_valid(self, QUERY_XSD, element)
        result = read_query(
            read(plain_answer(element, ACTION_STORED_QUERY_ANSWER, None))
        )
        self.assertEqual(
            [e.as_dict() for e in result.entries], [e.as_dict() for e in entries]
        )

    def test_retrieve_answer(self) -> None:
        """
        An MTOM retrieve answer is valid (XOP infoset) and reads back to the
        exact bytes.
        """
        documents = [
            ("1.2.250.1.213.4.1.1.1.2", entry.uniqueId, "text/xml", data)
            for entry, data in cda_entries()[:3]
        ]
        answer = retrieve_answer(documents, "urn:uuid:req")
        retrieved = read_retrieve(read(answer))
        self.assertEqual(
            [(d.unique_id, bytes(d.data)) for d in retrieved],
            [(u, d) for _, u, _, d in documents],
        )
        body = answer.body.envelope.find(f"{{{SOAP12}}}Body")[0]
        self.assertEqual(etree.QName(body).localname, "RetrieveDocumentSetResponse")
        # The schema sees base64 where XOP puts a reference: check the
        # structure with an empty document, which is valid base64.
        for include in body.iter("{http://www.w3.org/2004/08/xop/include}Include"):
            include.getparent().remove(include)
        assert_valid(self, XDSB_XSD, body)

    def test_existence(self) -> None:
        """
        The TD0.2 answer is a valid PRPA_IN201308UV02, read as found (with
        the authorisation) or not found.
        """
        request = round_trip(existence_test(ENDPOINTS, VIHF, PATIENT)).body
        record = DmpRecord(PATIENT, "PAT-TROIS", "DOMINIQUE", "F", "19790328")
        for found in [record, None]:
            element = existence_response(request, found)
            assert_valid(self, HL7_XSD + "PRPA_IN201308UV02.xsd", element)
            result = read_existence(
                read(plain_answer(element, ACTION_EXISTENCE_ANSWER, None))
            )
            self.assertEqual(result.exists, found is not None)
            if found is not None:
                self.assertEqual(result.authorization, "VALIDE")
                self.assertEqual(result.identifiers, [(PATIENT.authority, PATIENT.ins)])
                self.assertEqual(result.family, "PAT-TROIS")
            else:
                self.assertEqual(result.response_code, "NF")
