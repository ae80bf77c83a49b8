"""
Each ANS example CDA gives a DocumentEntry whose fields match the CDA
header, read here with independent XPath, and whose ebRIM form is valid
against rim.xsd.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from lxml import etree
from twisted.trial.unittest import SynchronousTestCase

from cpsdmp.xds.cda import (
    CLASS_BY_TYPE,
    FORMAT_BY_TEMPLATE,
    CdaError,
    document_entry,
)
from cpsdmp.xds.ebrim import CodedValue, DocumentEntry
from tests.conformance.material import (
    CDA_XSD,
    RIM_XSD,
    assert_valid,
    example_cdas,
    schema,
)

NS = {"h": "urn:hl7-org:v3"}
INS_ROOTS = (
    "1.2.250.1.213.1.4.8",
    "1.2.250.1.213.1.4.9",
    "1.2.250.1.213.1.4.10",
    "1.2.250.1.213.1.4.11",
)
SOME_CLASS = CodedValue("11", "1.2.250.1.213.1.1.4.1", "Synthèse")


def utc(value: str) -> str:
    # An HL7 TS with zone to the XDS UTC form, independently of the code
    # under test: pad the digits to seconds and let strptime read the zone.
    digits, zone = value[:-5], value[-5:]
    moment = datetime.strptime(digits.ljust(14, "0") + zone, "%Y%m%d%H%M%S%z")
    return moment.astimezone(UTC).strftime("%Y%m%d%H%M%S")


def first(tree: etree._Element, path: str) -> str:
    found = tree.xpath(path, namespaces=NS)
    assert found, path
    value = found[0]
    return value if isinstance(value, str) else (value.text or "").strip()


class ExampleCdaTests(SynchronousTestCase):
    def derive(self, data: bytes) -> DocumentEntry:
        tree = etree.fromstring(data)
        code = tree.find("h:code", NS)
        key = (code.get("code"), code.get("codeSystem"))
        if key in CLASS_BY_TYPE:
            return document_entry(data)
        # A typeCode the table does not list must be refused by name...
        error = self.assertRaises(CdaError, document_entry, data)
        self.assertIn(code.get("code"), str(error))
        # ...and accepted with a classCode given by the caller.
        entry = document_entry(data, overrides={"classCode": SOME_CLASS})
        self.assertEqual(entry.classCode, SOME_CLASS)
        return entry

    def test_examples_exist(self) -> None:
        """
        The material holds the six ANS examples, all valid CDA.
        """
        paths = example_cdas()
        self.assertEqual(len(paths), 6)
        for path in paths:
            self.assertTrue(schema(CDA_XSD).validate(etree.parse(str(path))), path)

    def test_header_fields(self) -> None:
        """
        For each example, the DocumentEntry says what the CDA header says.
        """
        for path in example_cdas():
            data = path.read_bytes()
            tree = etree.fromstring(data)
            entry = self.derive(data)
            self.check(tree, data, entry, path.name)

    def check(
        self, tree: etree._Element, data: bytes, entry: DocumentEntry, name: str
    ) -> None:
        ins = [
            i
            for i in tree.xpath("h:recordTarget/h:patientRole/h:id", namespaces=NS)
            if i.get("root") in INS_ROOTS
        ][0]
        self.assertEqual(
            str(entry.patientId),
            f"{ins.get('extension')}^^^&{ins.get('root')}&ISO^NH",
            name,
        )
        others = [
            i
            for i in tree.xpath("h:recordTarget/h:patientRole/h:id", namespaces=NS)
            if i.get("root") not in INS_ROOTS
        ]
        self.assertEqual(
            entry.sourcePatientId,
            f"{others[0].get('extension')}^^^&{others[0].get('root')}&ISO^PI"
            if others
            else str(entry.patientId),
        )
        self.assertEqual(entry.typeCode.code, first(tree, "h:code/@code"))
        self.assertEqual(entry.typeCode.scheme, first(tree, "h:code/@codeSystem"))
        self.assertEqual(entry.title, first(tree, "h:title"))
        self.assertEqual(
            entry.creationTime, utc(first(tree, "h:effectiveTime/@value")), name
        )
        self.assertEqual(
            entry.confidentialityCode[0].code,
            first(tree, "h:confidentialityCode/@code"),
        )
        self.assertEqual(entry.languageCode, first(tree, "h:languageCode/@code"))
        identifier = tree.find("h:id", NS)
        expected_unique = identifier.get("root") + (
            "^" + identifier.get("extension") if identifier.get("extension") else ""
        )
        self.assertEqual(entry.uniqueId, expected_unique)
        self.assertEqual(entry.hash, hashlib.sha1(data).hexdigest())
        self.assertEqual(entry.size, len(data))
        self.assertEqual(entry.mimeType, "text/xml")

        authors = tree.xpath("h:author/h:assignedAuthor", namespaces=NS)
        self.assertEqual(len(entry.authors), len(authors))
        for author, cda_author in zip(entry.authors, authors, strict=True):
            self.assertEqual(
                author.person.identifier, first(cda_author, "h:id/@extension")
            )
            self.assertEqual(
                author.person.family,
                first(cda_author, "h:assignedPerson/h:name/h:family"),
            )
            self.assertEqual(
                author.specialties[0].code, first(cda_author, "h:code/@code")
            )
            self.assertEqual(
                author.institutions[0].identifier,
                first(cda_author, "h:representedOrganization/h:id/@extension"),
            )
            self.assertIn(
                "^IDNST^^^" + author.institutions[0].identifier,
                author.institutions[0].to_xon(),
            )
            self.assertTrue(
                author.person.to_xcn().endswith("^D^^^IDNPS"), author.person.to_xcn()
            )

        legal = first(tree, "h:legalAuthenticator/h:assignedEntity/h:id/@extension")
        self.assertEqual(entry.legalAuthenticator.identifier, legal)
        self.assertEqual(
            entry.healthcareFacilityTypeCode.code,
            first(
                tree,
                "h:componentOf/h:encompassingEncounter/h:location/"
                "h:healthCareFacility/h:code/@code",
            ),
        )
        self.assertEqual(
            entry.practiceSettingCode.code,
            first(
                tree,
                "h:documentationOf/h:serviceEvent/h:performer/h:assignedEntity/"
                "h:representedOrganization/h:standardIndustryClassCode/@code",
            ),
        )
        low = tree.xpath(
            "h:documentationOf[1]/h:serviceEvent/h:effectiveTime/h:low/@value",
            namespaces=NS,
        )
        self.assertEqual(entry.serviceStartTime, utc(low[0]) if low else None)
        high = tree.xpath(
            "h:documentationOf[1]/h:serviceEvent/h:effectiveTime/h:high/@value",
            namespaces=NS,
        )
        self.assertEqual(entry.serviceStopTime, utc(high[0]) if high else None)

        media = tree.xpath("h:component/h:nonXMLBody/h:text/@mediaType", namespaces=NS)
        if media:
            self.assertEqual(media, ["application/pdf"])
            self.assertEqual(entry.formatCode.code, "urn:ihe:iti:xds-sd:pdf:2008")
        else:
            templates = tree.xpath("h:templateId/@root", namespaces=NS)
            self.assertIn(
                entry.formatCode,
                [FORMAT_BY_TEMPLATE[t] for t in templates if t in FORMAT_BY_TEMPLATE],
            )
        orders = tree.xpath("h:inFulfillmentOf/h:order/h:id", namespaces=NS)
        self.assertEqual(
            [r.split("^")[0] for r in entry.referenceIdList],
            [o.get("extension") for o in orders],
        )

        assert_valid(self, RIM_XSD, entry.to_element())
        back = DocumentEntry.from_element(entry.to_element())
        self.assertEqual(back.as_dict(), entry.as_dict())
