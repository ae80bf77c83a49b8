"""
Each ANS example CDA gives a DocumentEntry whose fields match the CDA
header, read here with independent XPath, whose codes belong to the ANS
value sets of the material, and whose ebRIM form is valid against rim.xsd.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime

from lxml import etree
from twisted.trial.unittest import SynchronousTestCase

from cpsdmp.sandbox.store import TEST_PATIENTS
from cpsdmp.xds.cda import (
    CLASS_BY_TYPE,
    CdaError,
    document_entry,
)
from cpsdmp.xds.ebrim import CodedValue, DocumentEntry, check_ins
from tests.conformance.material import (
    CDA_XSD,
    RIM_XSD,
    assert_valid,
    example_cdas,
    material,
    schema,
    value_set,
)

NS = {"h": "urn:hl7-org:v3"}
INS_ROOTS = (
    "1.2.250.1.213.1.4.8",
    "1.2.250.1.213.1.4.9",
    "1.2.250.1.213.1.4.10",
    "1.2.250.1.213.1.4.11",
)
#: The start of every INS authority OID, as a pattern.
INS_OID = r"1\.2\.250\.1\.213\.1\.4\.(?:8|9|10|11)\b"
SOME_CLASS = CodedValue("11", "1.2.250.1.213.1.1.4.1", "Synthèse")
IDNPS = "1.2.250.1.71.4.2.1"
IDNST = "1.2.250.1.71.4.2.2"
IHE_FORMAT = "1.3.6.1.4.1.19376.1.2.3"
CISIS_FORMAT = "1.2.250.1.213.1.1.4.2.282"

#: Each example's formatCode, written out here from the public NOS tables
#: ASS_A11 (CDA template -> formatCode) and ASS_A12 (N1 media type ->
#: formatCode), not taken from the code under test.
EXPECTED_FORMAT = {
    "BIO-CR-BIO_2024.01_TSH_1.xml": ("urn:ihe:lab:xd-lab:2008", IHE_FORMAT),
    "DLU-EHPAD-FLUDR_2022.01.xml": ("urn:asip:ci-sis:fludr:2017", CISIS_FORMAT),
    "DLU-EHPAD-FLUDT_2022.01.xml": ("urn:asip:ci-sis:fludt:2017", CISIS_FORMAT),
    "DOC_NON_STRUCTURE_CDA-R2-N1.xml": ("urn:ihe:iti:xds-sd:pdf:2008", IHE_FORMAT),
    "VAC-NOTE_2023.01.xml": ("urn:asip:ci-sis:vac-note:2021", CISIS_FORMAT),
    "VAC_2023.01.xml": ("urn:asip:ci-sis:vac:2019", CISIS_FORMAT),
}


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


def xcn(entity: etree._Element) -> str:
    # An HL7 v2 XCN written from the CDA: identifier, family and given name,
    # the identifier's authority, and its type (IDNPS for a professional's
    # national identifier, NH for an INS).
    identifier = entity.find("h:id", NS)
    root = identifier.get("root")
    kind = "IDNPS" if root == IDNPS else "NH" if root in INS_ROOTS else ""
    family = first(entity, "h:assignedPerson/h:name/h:family")
    given = first(entity, "h:assignedPerson/h:name/h:given")
    return f"{identifier.get('extension')}^{family}^{given}^^^^^^&{root}&ISO^D^^^{kind}"


def pair(code: CodedValue) -> tuple[str, str]:
    return code.code, code.scheme


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
            self.assertEqual(first(cda_author, "h:id/@root"), IDNPS, name)
            self.assertEqual(author.person.to_xcn(), xcn(cda_author), name)
            organization = cda_author.find("h:representedOrganization", NS)
            self.assertEqual(first(organization, "h:id/@root"), IDNST, name)
            self.assertEqual(
                [i.to_xon() for i in author.institutions],
                [
                    f"{first(organization, 'h:name')}^^^^^&{IDNST}&ISO^IDNST^^^"
                    + first(organization, "h:id/@extension")
                ],
            )
            self.assertEqual(
                [pair(s) for s in author.specialties],
                [
                    (
                        first(cda_author, "h:code/@code"),
                        first(cda_author, "h:code/@codeSystem"),
                    )
                ],
            )

        self.assertEqual(
            entry.legalAuthenticator.to_xcn(),
            xcn(tree.find("h:legalAuthenticator/h:assignedEntity", NS)),
            name,
        )
        facility = tree.find(
            "h:componentOf/h:encompassingEncounter/h:location/"
            "h:healthCareFacility/h:code",
            NS,
        )
        self.assertEqual(
            pair(entry.healthcareFacilityTypeCode),
            (facility.get("code"), facility.get("codeSystem")),
        )
        practice = tree.xpath(
            "h:documentationOf/h:serviceEvent/h:performer/h:assignedEntity/"
            "h:representedOrganization/h:standardIndustryClassCode",
            namespaces=NS,
        )[0]
        self.assertEqual(
            pair(entry.practiceSettingCode),
            (practice.get("code"), practice.get("codeSystem")),
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

        self.assertEqual(pair(entry.formatCode), EXPECTED_FORMAT[name], name)
        self.assertEqual(entry.classCode.scheme, "1.2.250.1.213.1.1.4.1")
        orders = tree.xpath("h:inFulfillmentOf/h:order/h:id", namespaces=NS)
        self.assertEqual(
            entry.referenceIdList,
            [
                f"{o.get('extension')}^^^&{o.get('root')}&ISO^"
                "urn:ihe:iti:xds:2013:order"
                for o in orders
            ],
        )
        self.check_value_sets(entry, name)

        assert_valid(self, RIM_XSD, entry.to_element())
        back = DocumentEntry.from_element(entry.to_element())
        self.assertEqual(back.as_dict(), entry.as_dict())

    def check_value_sets(self, entry: DocumentEntry, name: str) -> None:
        # The ANS value sets for XDS metadata (CI-SIS) that the material
        # holds; the DMP's own referenceId types are JDV_J231.
        for value_set_name, codes in [
            ("JDV_J07", [entry.typeCode]),
            ("JDV_J08", entry.confidentialityCode),
            ("JDV_J02", [entry.healthcareFacilityTypeCode]),
            ("JDV_J04", [entry.practiceSettingCode]),
            ("JDV_J01", [s for a in entry.authors for s in a.specialties]),
        ]:
            for code in codes:
                self.assertIn(pair(code), value_set(value_set_name), name)
        for reference in entry.referenceIdList:
            kind = reference.rsplit("^", 1)[-1]
            self.assertIn(
                (kind, "1.2.250.1.213.1.1.4.347"), value_set("JDV_J231"), name
            )

    def test_class_table_type_codes(self) -> None:
        """
        Every typeCode of the classCode table is one of the CI-SIS XDS
        typeCodes (JDV_J07), and each maps into TRE_A03 (its OID).
        """
        for (code, system), class_code in CLASS_BY_TYPE.items():
            self.assertIn((code, system), value_set("JDV_J07"))
            self.assertEqual(class_code.scheme, "1.2.250.1.213.1.1.4.1")


class InsKeyTests(SynchronousTestCase):
    """
    The patients of the public material, those of the ANS example CDAs and
    of the official example messages, have the shape and the key that
    L{check_ins} requires, so that the check refuses a typo and not these;
    so do the local DMP's seeded patients. (One example CDA names a
    participant, not the patient, by an INS whose key does not match:
    276059205062865 in VAC_2023.01.xml; the facade reads only the patient's.)
    """

    def test_material_ins(self) -> None:
        found = set()
        for path in example_cdas():
            tree = etree.parse(str(path))
            for identifier in tree.xpath(
                "h:recordTarget/h:patientRole/h:id", namespaces=NS
            ):
                if identifier.get("root") in INS_ROOTS:
                    found.add(identifier.get("extension"))
        messages = material() / "gie-sv-dmp-package" / "exemples-messages"
        for path in messages.rglob("*.xml"):
            text = path.read_bytes().decode("utf-8", "replace")
            # As a CX (INS^^^&OID&ISO^NH) and as an HL7 v3 id.
            found.update(re.findall(r"([0-9A-Z]{15})\^\^\^&amp;" + INS_OID, text))
            found.update(
                re.findall(r'extension="([0-9A-Z]{15})" root="' + INS_OID, text)
            )
        self.assertGreaterEqual(len(found), 4, found)
        for ins in sorted(found):
            self.assertEqual(check_ins(ins), ins)

    def test_seeded_patients(self) -> None:
        for record in TEST_PATIENTS:
            self.assertEqual(check_ins(record.patient.ins), record.patient.ins)
