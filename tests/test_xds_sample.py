"""
The CDA the project makes itself for the demo: valid CDA R2 as the ANS
extends it, and a complete DocumentEntry derived from it.
"""

from __future__ import annotations

import base64

from lxml import etree
from twisted.trial.unittest import SynchronousTestCase

from cpsdmp._fixtures import fixtures_dir
from cpsdmp.agent.testcard import DEFAULT_PROFESSIONAL
from cpsdmp.xds.cda import document_entry
from cpsdmp.xds.sample import DEFAULT_PATIENT, sample_cda

PROFESSIONAL = {
    "id": DEFAULT_PROFESSIONAL.id,
    "given_name": DEFAULT_PROFESSIONAL.given_name,
    "family_name": DEFAULT_PROFESSIONAL.family_name,
    "specialty": DEFAULT_PROFESSIONAL.specialty,
    "organization": DEFAULT_PROFESSIONAL.organization,
}


class SampleCdaTests(SynchronousTestCase):
    def test_schema_valid(self) -> None:
        """
        The document validates against the ANS's CDA schema.
        """
        fixtures = fixtures_dir()
        if fixtures is None:
            self.fail("the CDA schema is read from the fixtures: set CPSDMP_FIXTURES")
        schema = etree.XMLSchema(
            etree.parse(
                str(
                    fixtures
                    / "ans-testcontenucda-3-0/infrastructure/cda/CDA_extended.xsd"
                )
            )
        )
        document = etree.fromstring(sample_cda(PROFESSIONAL))
        self.assertTrue(schema.validate(document), schema.error_log)

    def test_metadata(self) -> None:
        """
        Its DocumentEntry names the patient, the professional as author and
        legal authenticator, a consultation report of class Compte rendu in
        plain text, and the hash of the exact bytes.
        """
        data = sample_cda(PROFESSIONAL, text="Examen normal.")
        entry = document_entry(data).as_dict()
        self.assertEqual(
            entry["patientId"], f"{DEFAULT_PATIENT.ins}^^^&1.2.250.1.213.1.4.10&ISO^NH"
        )
        self.assertEqual(entry["typeCode"]["code"], "11488-4")
        self.assertEqual(entry["classCode"]["code"], "10")
        self.assertEqual(entry["formatCode"]["code"], "urn:ihe:iti:xds-sd:text:2008")
        self.assertTrue(entry["legalAuthenticator"].startswith(DEFAULT_PROFESSIONAL.id))
        self.assertTrue(entry["authorPerson"][0].startswith(DEFAULT_PROFESSIONAL.id))
        self.assertEqual(entry["size"], len(data))
        body = etree.fromstring(data).find(
            ".//{urn:hl7-org:v3}nonXMLBody/{urn:hl7-org:v3}text"
        )
        assert body is not None and body.text is not None
        self.assertEqual(base64.b64decode(body.text), b"Examen normal.")

    def test_each_document_is_new(self) -> None:
        """
        Two documents made one after the other have different uniqueIds, so
        the demo can submit one at each run.
        """
        first = document_entry(sample_cda(PROFESSIONAL)).as_dict()
        second = document_entry(sample_cda(PROFESSIONAL)).as_dict()
        self.assertNotEqual(first["uniqueId"], second["uniqueId"])
