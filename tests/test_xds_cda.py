"""
Tests for L{cpsdmp.xds.cda} with documents built here: what a professional
may hand us by mistake is refused with a message naming what is wrong.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

from twisted.trial.unittest import SynchronousTestCase

from cpsdmp.protocols.safexml import XmlRefused
from cpsdmp.xds.cda import CdaError, document_entry, hl7_time_to_utc, read_header
from cpsdmp.xds.context import Structure, StructureIdentifier
from cpsdmp.xds.ebrim import (
    INS_OID_TEST,
    CodedValue,
    MetadataError,
    PatientId,
    check_ins,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTOR = CodedValue("SA07", "1.2.250.1.71.4.2.4", "Cabinet individuel")
PRACTICE = CodedValue("AMBULATOIRE", "1.2.250.1.213.1.1.4.9", "Ambulatoire")
CLASS = "1.2.250.1.213.1.1.4.1"
STRUCTURE = Structure(
    "Cabinet du Dr Test",
    StructureIdentifier.RPPS_PRACTICE,
    "99990006348",
    SECTOR,
    PRACTICE,
)


LEGAL = (
    '<legalAuthenticator><time value="20240102"/><signatureCode code="S"/>'
    '<assignedEntity><id root="1.2.250.1.71.4.2.1" extension="899900063480"/>'
    "</assignedEntity></legalAuthenticator>"
)


def cda(
    *,
    patient: str = '<id root="1.2.250.1.213.1.4.10" extension="279035121518989"/>',
    effective: str = "20240102103000+0100",
    title: str = "<title>Compte rendu</title>",
    body: str = "<structuredBody><component><section/></component></structuredBody>",
    legal: str = LEGAL,
    start: str = "20240102100000+0100",
) -> bytes:
    return textwrap.dedent(
        f"""\
        <?xml version="1.0" encoding="UTF-8"?>
        <ClinicalDocument xmlns="urn:hl7-org:v3">
          <typeId root="2.16.840.1.113883.1.3" extension="POCD_HD000040"/>
          <templateId root="1.2.250.1.213.1.1.1.55"/>
          <id root="1.2.3.4.5" extension="42"/>
          <code code="11502-2" codeSystem="2.16.840.1.113883.6.1"
                displayName="CR d'examens biologiques"/>
          {title}
          <effectiveTime value="{effective}"/>
          <confidentialityCode code="N" codeSystem="2.16.840.1.113883.5.25"/>
          <languageCode code="fr-FR"/>
          <recordTarget><patientRole>{patient}</patientRole></recordTarget>
          <author><time value="20240102"/><assignedAuthor>
            <id root="1.2.250.1.71.4.2.1" extension="899900063480"/>
            <assignedPerson><name><given>Max</given><family>LIBRE</family></name>
            </assignedPerson>
          </assignedAuthor></author>
          {legal}
          <documentationOf><serviceEvent><effectiveTime>
            <low value="{start}"/></effectiveTime></serviceEvent></documentationOf>
          <component>{body}</component>
        </ClinicalDocument>
        """
    ).encode()


class DeriveTests(SynchronousTestCase):
    def test_minimal(self) -> None:
        """
        A minimal CDA with a configured structure gives a complete entry:
        the facility and practice codes come from the structure.
        """
        entry = document_entry(cda(), STRUCTURE)
        self.assertEqual(entry.uniqueId, "1.2.3.4.5^42")
        self.assertEqual(entry.creationTime, "20240102093000")
        self.assertEqual(entry.healthcareFacilityTypeCode, SECTOR)
        self.assertEqual(entry.practiceSettingCode, PRACTICE)
        self.assertEqual(entry.classCode.code, "10")
        self.assertEqual(entry.authors[0].institutions, ())

    def test_memoryview(self) -> None:
        """
        A document given as a memoryview (a part of a received body) gives
        the same entry as its bytes.
        """
        data = cda()
        entry = document_entry(memoryview(data), STRUCTURE)
        self.assertEqual(entry.hash, document_entry(data, STRUCTURE).hash)
        self.assertEqual(entry.size, len(data))

    def test_overrides(self) -> None:
        """
        An override wins over the CDA; an unknown attribute is refused.
        """
        entry = document_entry(cda(), STRUCTURE, overrides={"title": "Autre"})
        self.assertEqual(entry.title, "Autre")
        self.assertRaises(
            ValueError, document_entry, cda(), STRUCTURE, overrides={"nope": 1}
        )

    def test_class_code_display(self) -> None:
        """
        A classCode given without its display name gets the TRE_A03 one, so
        that its classification is named; a display given is kept.
        """
        entry = document_entry(
            cda(), STRUCTURE, overrides={"classCode": CodedValue("11", CLASS)}
        )
        self.assertEqual(entry.classCode, CodedValue("11", CLASS, "Synthèse"))
        name = entry.to_element().xpath(
            "rim:Classification[@nodeRepresentation='11']/rim:Name/"
            "rim:LocalizedString/@value",
            namespaces={"rim": "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"},
        )
        self.assertEqual(name, ["Synthèse"])
        given = CodedValue("31", CLASS, "Imagerie")
        entry = document_entry(cda(), STRUCTURE, overrides={"classCode": given})
        self.assertEqual(entry.classCode, given)

    def test_not_a_cda(self) -> None:
        """
        XML that is not a ClinicalDocument is refused as such.
        """
        error = self.assertRaises(
            CdaError, document_entry, b"<html><body/></html>", STRUCTURE
        )
        self.assertIn("not a CDA", str(error))

    def test_no_ins(self) -> None:
        """
        A CDA whose patient has only a local identifier has no INS.
        """
        error = self.assertRaises(
            CdaError,
            document_entry,
            cda(patient='<id root="1.2.3.4.567" extension="123"/>'),
            STRUCTURE,
        )
        self.assertIn("recordTarget/patientRole/id", str(error))
        self.assertIn("INS", str(error))

    def test_bad_dates(self) -> None:
        """
        A malformed effectiveTime, and a time of day without zone, are
        refused naming the element.
        """
        for value in ["2024-01-02", "20241302103000+0100", "20240102103000"]:
            error = self.assertRaises(
                CdaError, document_entry, cda(effective=value), STRUCTURE
            )
            self.assertIn("effectiveTime", str(error))

    def test_missing_legal_and_service(self) -> None:
        """
        The DMP requires a legalAuthenticator and a service start time: their
        absence is named.
        """
        error = self.assertRaises(CdaError, document_entry, cda(legal=""), STRUCTURE)
        self.assertIn("legalAuthenticator", str(error))
        data = cda().replace(b"<low", b"<high")
        error = self.assertRaises(CdaError, document_entry, data, STRUCTURE)
        self.assertIn("documentationOf/serviceEvent/effectiveTime/low", str(error))

    def test_source_patient_id(self) -> None:
        """
        The producer's own patient identifier becomes the sourcePatientId;
        without one, the INS does.
        """
        entry = document_entry(cda(), STRUCTURE)
        self.assertEqual(entry.sourcePatientId, str(entry.patientId))
        ipp = '<id root="1.2.3.4.567" extension="IPP42"/>'
        patient = '<id root="1.2.250.1.213.1.4.10" extension="279035121518989"/>'
        entry = document_entry(cda(patient=patient + ipp), STRUCTURE)
        self.assertEqual(entry.sourcePatientId, "IPP42^^^&1.2.3.4.567&ISO^PI")

    def test_missing_title(self) -> None:
        """
        A missing mandatory element is named.
        """
        error = self.assertRaises(CdaError, document_entry, cda(title=""), STRUCTURE)
        self.assertIn("title", str(error))

    def test_no_structure(self) -> None:
        """
        Without facility code in the CDA nor a structure, the element is
        named.
        """
        error = self.assertRaises(CdaError, document_entry, cda())
        self.assertIn("healthCareFacility", str(error))

    def test_no_body(self) -> None:
        """
        A CDA without component is refused.
        """
        data = cda().replace(b"<component>", b"<x>").replace(b"</component>", b"</x>")
        self.assertRaises(CdaError, document_entry, data, STRUCTURE)

    def test_xxe(self) -> None:
        """
        A CDA carrying an external entity is refused.
        """
        data = (
            cda()
            .replace(
                b'<?xml version="1.0" encoding="UTF-8"?>',
                b'<?xml version="1.0"?><!DOCTYPE ClinicalDocument '
                b'[<!ENTITY x SYSTEM "file:///etc/passwd">]>',
            )
            .replace(b"Compte rendu", b"&x;")
        )
        self.assertRaises(XmlRefused, document_entry, data, STRUCTURE)

    def test_n1_media_type(self) -> None:
        """
        An N1 body gives the formatCode of its media type.
        """
        body = (
            '<nonXMLBody><text mediaType="text/plain" representation="B64">'
            "SGVsbG8=</text></nonXMLBody>"
        )
        entry = document_entry(cda(body=body), STRUCTURE)
        self.assertEqual(entry.formatCode.code, "urn:ihe:iti:xds-sd:text:2008")
        header = read_header(cda(body=body))
        self.assertEqual((header.body, header.media_type), ("nonXMLBody", "text/plain"))


class TimeTests(SynchronousTestCase):
    def test_conversions(self) -> None:
        """
        Zone offsets are applied; dates stay dates.
        """
        self.assertEqual(hl7_time_to_utc("20240101003000+0100", "x"), "20231231233000")
        self.assertEqual(hl7_time_to_utc("202401010030-0230", "x"), "20240101030000")
        self.assertEqual(hl7_time_to_utc("20240101", "x"), "20240101")
        self.assertEqual(hl7_time_to_utc("202402", "x"), "202402")
        self.assertEqual(hl7_time_to_utc("20240229", "x"), "20240229")

    def test_impossible_dates(self) -> None:
        """
        A date alone is kept as it is, but only when it is a real date; a
        zone offset must be one.
        """
        for value in [
            "20241399",
            "20230229",
            "202413",
            "20240100",
            "20240101103000+0160",
            "20240101103000+2400",
        ]:
            error = self.assertRaises(CdaError, hl7_time_to_utc, value, "here")
            self.assertIn("here", str(error))
            self.assertIn(value, str(error))

    def test_impossible_service_date(self) -> None:
        """
        A service start that is no date is refused naming the element.
        """
        error = self.assertRaises(
            CdaError, document_entry, cda(start="20241399"), STRUCTURE
        )
        self.assertIn("documentationOf/serviceEvent/effectiveTime/low", str(error))


LARGE = """
import resource, sys, time
from cpsdmp.xds.cda import document_entry
from cpsdmp.xds.context import Structure, StructureIdentifier
from cpsdmp.xds.ebrim import CodedValue
code = CodedValue("X", "1.2.3")
structure = Structure("S", StructureIdentifier.FINESS, "123456789", code, code)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with open(sys.argv[1], "rb") as f:
    data = f.read()
entry = document_entry(data, structure)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before, after, entry.size)
"""


class LargeDocumentTests(SynchronousTestCase):
    def test_hundred_megabytes(self) -> None:
        """
        Deriving the metadata of a 100 MB N1 document costs little more than
        the document itself: the body is never parsed. Measured in a fresh
        process with getrusage.
        """
        size = 100 * 1024 * 1024
        head, tail = cda(
            body='<nonXMLBody><text mediaType="application/pdf" '
            'representation="B64">@@</text></nonXMLBody>'
        ).split(b"@@")
        with tempfile.NamedTemporaryFile(delete=False, suffix=".xml") as f:
            f.write(head)
            block = b"QUJD" * (1024 * 1024 // 4)
            for _ in range(size // len(block)):
                f.write(block)
            f.write(tail)
        self.addCleanup(os.unlink, f.name)
        result = subprocess.run(
            [sys.executable, "-c", LARGE, f.name],
            capture_output=True,
            check=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONPATH": ROOT},
        )
        before, after, measured = (int(v) for v in result.stdout.split())
        self.assertEqual(measured, os.path.getsize(f.name))
        growth = (after - before) * 1024
        # The bytes themselves (100 MB) plus a bounded margin.
        self.assertLess(growth, measured * 1.3, f"peak RSS grew by {growth} bytes")


class InsTests(SynchronousTestCase):
    """
    A patient's INS: 15 characters, 13 digits (the 6th and 7th may be 2A or
    2B, Corsica) and the key, 97 minus the first 13 modulo 97, 2A counted
    as 19 and 2B as 18.
    """

    def test_valid(self) -> None:
        for ins in [
            "279035121518989",
            "185127505612306",
            # Corsica: the key is that of the number with 19 for 2A, 18 for 2B.
            f"185082A123456{97 - 1850819123456 % 97:02d}",
            f"185082B123456{97 - 1850818123456 % 97:02d}",
        ]:
            self.assertEqual(check_ins(ins), ins)
            self.assertEqual(PatientId(ins, INS_OID_TEST).ins, ins)

    def test_shape(self) -> None:
        for ins in [
            "27903512151898X",
            "2790351215189",
            "2790351215189890",
            "2790A5121518989",
            "185082C12345600",
            "279035121518989 ",
            "",
        ]:
            error = self.assertRaises(MetadataError, PatientId, ins, INS_OID_TEST)
            self.assertIn("is not an INS: 15 characters", str(error))

    def test_key(self) -> None:
        for ins in ["279035121518988", "279035121518998", "18508" + "2A" + "12345600"]:
            error = self.assertRaises(MetadataError, check_ins, ins)
            self.assertIn("does not match its first 13 characters", str(error))


class MetadataValueTests(SynchronousTestCase):
    """
    The values of a DocumentEntry, the CDA's and the overrides', pass the
    checks the DMP makes: XDS times that are real dates, a service start
    not after its stop, texts within the registry's lengths, a TRE_A03
    classCode of the table.
    """

    def refused(self, overrides: dict[str, object], data: bytes | None = None) -> str:
        error = self.assertRaises(
            MetadataError, document_entry, data or cda(), STRUCTURE, None, overrides
        )
        return str(error)

    def test_times(self) -> None:
        for value in ["yesterday", "2024-01-01", "20201301", "20240230", "2024010124"]:
            for name in ["creationTime", "serviceStartTime", "serviceStopTime"]:
                self.assertIn(name, self.refused({name: value}))
        said = self.refused(
            {"serviceStartTime": "20301301", "serviceStopTime": "20200101"}
        )
        self.assertIn("serviceStartTime '20301301' is not a real date", said)
        said = self.refused(
            {"serviceStartTime": "20300101", "serviceStopTime": "20200101"}
        )
        self.assertIn(
            "serviceStartTime 20300101 is after serviceStopTime 20200101", said
        )
        # The CDA's own start (2024-01-02) after an overridden stop.
        said = self.refused({"serviceStopTime": "2023"})
        self.assertIn("is after serviceStopTime 2023", said)
        entry = document_entry(
            cda(),
            STRUCTURE,
            overrides={
                "creationTime": "20240229",
                "serviceStartTime": "2024",
                "serviceStopTime": "20240105120000",
            },
        )
        self.assertEqual(entry.serviceStartTime, "2024")

    def test_texts(self) -> None:
        self.assertIn(
            "title is 100000 characters long", self.refused({"title": "x" * 100000})
        )
        self.assertIn("title is empty", self.refused({"title": ""}))
        self.assertIn("U+0001", self.refused({"comments": "a\x01b"}))
        self.assertIn("comments is 1025", self.refused({"comments": "x" * 1025}))
        self.assertIn("languageCode", self.refused({"languageCode": "français"}))
        entry = document_entry(cda(), STRUCTURE, overrides={"title": "t" * 1024})
        self.assertEqual(len(entry.title), 1024)

    def test_class_code(self) -> None:
        said = self.refused({"classCode": CodedValue("ZZZ", CLASS, "")})
        self.assertIn("classCode 'ZZZ' is not a class of TRE_A03", said)
        self.assertIn("11 (Synthèse)", said)
        entry = document_entry(
            cda(), STRUCTURE, overrides={"classCode": CodedValue("11", CLASS, "")}
        )
        self.assertEqual(entry.classCode.display, "Synthèse")
        # As JSON gives it: {code, codingScheme, display}.
        entry = document_entry(
            cda(),
            STRUCTURE,
            overrides={
                "classCode": {"code": "11", "codingScheme": CLASS, "display": ""}
            },
        )
        self.assertEqual(entry.classCode, CodedValue("11", CLASS, "Synthèse"))
        said = self.refused({"classCode": {"code": "ZZZ", "codingScheme": CLASS}})
        self.assertIn("classCode 'ZZZ' is not a class of TRE_A03", said)

    def test_codes(self) -> None:
        said = self.refused({"formatCode": CodedValue("x" * 300, "1.2.3", "")})
        self.assertIn("formatCode code is 300 characters long", said)
        said = self.refused({"eventCodeList": [CodedValue("", "1.2.3", "")]})
        self.assertIn("eventCodeList[0] code is empty", said)

    def test_cda_service_times_in_order(self) -> None:
        data = cda().replace(
            b'<low value="20240102100000+0100"/>',
            b'<low value="20240102100000+0100"/><high value="20230102100000+0100"/>',
        )
        error = self.assertRaises(MetadataError, document_entry, data, STRUCTURE)
        self.assertIn("is after serviceStopTime 20230102090000", str(error))
