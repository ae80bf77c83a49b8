"""
The VIHF we build has the structure of the official direct-mode sample:
same issuer format, subject, authentication context, and the same
attributes in the same order with the same value shapes.
"""

from __future__ import annotations

from datetime import UTC, datetime

from lxml import etree
from twisted.trial.unittest import SynchronousTestCase

from cpsdmp.protocols.safexml import parse_xml
from cpsdmp.xds.vihf import SAML2, VihfRequest, assertion, security_header
from tests.conformance.material import material
from tests.xdsvalues import PATIENT, PROFESSIONAL, SOFTWARE, STRUCTURE

NS = {"saml2": SAML2, "xsi": "http://www.w3.org/2001/XMLSchema-instance"}
XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"


def sample() -> etree._Element:
    path = (
        material()
        / "gie-sv-dmp-package/exemples-messages/vihf/vihf_directe_unsigned.xml"
    )
    # The direct-mode samples are ISO-8859-1 without an XML declaration.
    return parse_xml(path.read_bytes(), encoding="iso-8859-1")


def shape(root: etree._Element) -> list[tuple[str, list[tuple[str, str | None]]]]:
    # Each attribute's name, and per value: the child element (or the
    # xsi:type of a plain value).
    result = []
    for attribute in root.iterfind(".//saml2:Attribute", NS):
        values = []
        for value in attribute.iterfind("saml2:AttributeValue", NS):
            if len(value):
                values.append((value[0].tag, value[0].get(XSI_TYPE)))
            else:
                values.append(("text", value.get(XSI_TYPE)))
        result.append((attribute.get("Name"), values))
    return result


class VihfTests(SynchronousTestCase):
    def build(self) -> etree._Element:
        return assertion(
            VihfRequest(
                PROFESSIONAL,
                STRUCTURE,
                SOFTWARE,
                issuer=PROFESSIONAL.subject_name,
                patient=PATIENT,
                instant=datetime(2024, 1, 2, 9, 30, 0, 123000, tzinfo=UTC),
            )
        )

    def test_same_structure(self) -> None:
        """
        Attributes, their order and their value shapes match the sample.
        """
        self.assertEqual(shape(self.build()), shape(sample()))

    def test_same_skeleton(self) -> None:
        """
        Issuer format, NameID, authentication context and version match.
        """
        ours, theirs = self.build(), sample()
        for path in [
            "saml2:Issuer/@Format",
            "saml2:AuthnStatement/saml2:AuthnContext/saml2:AuthnContextClassRef/text()",
            "@Version",
        ]:
            self.assertEqual(
                ours.xpath(path, namespaces=NS), theirs.xpath(path, namespaces=NS)
            )
        self.assertEqual(
            [etree.QName(e).localname for e in ours],
            [etree.QName(e).localname for e in theirs],
        )
        self.assertIsNone(ours.find("{http://www.w3.org/2000/09/xmldsig#}Signature"))

    def test_values(self) -> None:
        """
        The values come from the card holder, the structure and the software.
        """
        root = self.build()

        def value(name: str) -> list[str]:
            return root.xpath(
                f"//saml2:Attribute[@Name='{name}']/saml2:AttributeValue/text()",
                namespaces=NS,
            )

        self.assertEqual(
            root.findtext("saml2:Subject/saml2:NameID", namespaces=NS), "899900063480"
        )
        self.assertEqual(value("Identifiant_Structure"), ["499900063480001"])
        self.assertEqual(value("Secteur_Activite"), ["SA07^1.2.250.1.71.4.2.4"])
        self.assertEqual(
            value("urn:oasis:names:tc:xacml:2.0:resource:resource-id"),
            ["207058575627097^^^&1.2.250.1.213.1.4.10&ISO^NH"],
        )
        self.assertEqual(value("LPS_ID_HOMOLOGATION_DMP"), ["NumAutorisation"])
        self.assertEqual(value("LPS_Nom"), ["cpsdmp tests"])
        self.assertEqual(
            root.xpath("//*[local-name()='Role']/@code", namespaces=NS), ["10", "SM26"]
        )
        self.assertEqual(root.get("IssueInstant"), "2024-01-02T09:30:00.123Z")

    def test_security_header(self) -> None:
        """
        The assertion travels in wsse:Security.
        """
        header = security_header(
            VihfRequest(PROFESSIONAL, STRUCTURE, SOFTWARE, issuer="CN=x")
        )
        self.assertEqual(etree.QName(header).localname, "Security")
        self.assertEqual(header[0].tag, f"{{{SAML2}}}Assertion")
        # Without a patient, no resource-id attribute.
        self.assertNotIn(
            "urn:oasis:names:tc:xacml:2.0:resource:resource-id",
            [a.get("Name") for a in header.iterfind(".//saml2:Attribute", NS)],
        )
