"""
A CDA document the project makes itself: an unstructured (N1) consultation
report whose body is plain text, written by a given professional about a
given patient. The demo submits it when the ANS example documents are not at
hand, so that the whole chain runs from any clone.
"""

from __future__ import annotations

import base64
import datetime
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from lxml import etree
from lxml.builder import ElementMaker

from cpsdmp.xds.ebrim import uuid_oid

HL7 = "urn:hl7-org:v3"
XSI = "http://www.w3.org/2001/XMLSchema-instance"

_E = ElementMaker(namespace=HL7, nsmap={None: HL7, "xsi": XSI})

# OIDs of the identifiers and code systems the header uses.
INS_NIR_TEST_OID = "1.2.250.1.213.1.4.10"
RPPS_OID = "1.2.250.1.71.4.2.1"
STRUCTURE_OID = "1.2.250.1.71.4.2.2"
LOINC = "2.16.840.1.113883.6.1"
CONFIDENTIALITY = "2.16.840.1.113883.5.25"
GENDER = "2.16.840.1.113883.5.1"
AUTHOR_SPECIALTY = "1.2.250.1.213.1.1.4.5"
PRACTICE_SETTING = "1.2.250.1.213.1.1.4.9"
FACILITY_TYPE = "1.2.250.1.71.4.2.4"

# templateIds: French CDA header, CI-SIS, IHE XDS-SD (scanned/unstructured).
_TEMPLATES = ("2.16.840.1.113883.2.8.2.1", "1.2.250.1.213.1.1.1.1")
_XDS_SD = "1.3.6.1.4.1.19376.1.2.20"


@dataclass(frozen=True)
class SamplePatient:
    """
    A patient of the test INS range: NIR, names, sex, birth date (YYYYMMDD).
    """

    ins: str
    family: str
    given: str
    gender: str
    birth_date: str


#: A patient the local DMP knows (see cpsdmp.sandbox.store.TEST_PATIENTS).
DEFAULT_PATIENT = SamplePatient(
    "185127505612306", "SABLE-TEST", "PAUL", "M", "19851203"
)


def _hl7_time(moment: datetime.datetime) -> str:
    return moment.strftime("%Y%m%d%H%M%S%z")


def sample_cda(
    professional: Mapping[str, str],
    patient: SamplePatient = DEFAULT_PATIENT,
    text: str | None = None,
    now: datetime.datetime | None = None,
) -> bytes:
    """
    Write a consultation report (LOINC 11488-4) as an N1 CDA whose body is
    C{text} in plain text, base64-encoded as the CDA R2 schema wants it.

    @param professional: C{id} (national identifier, "8" + RPPS), C{given_name},
        C{family_name}, C{specialty} (JDV J01 code) and C{organization}, as a
        test card's description gives them.
    @return: the document's bytes, UTF-8.
    """
    moment = now or datetime.datetime.now(datetime.UTC).astimezone()
    stamp = _hl7_time(moment)
    start = _hl7_time(moment - datetime.timedelta(minutes=20))
    body = text or (
        f"Consultation du {moment:%d/%m/%Y}.\n"
        "Document de test produit par cpsdmp : aucune donnée réelle.\n"
    )
    document_id = uuid_oid(uuid.uuid4())

    def person(given: str, family: str) -> etree._Element:
        return _E.name(_E.given(given), _E.family(family))

    organization_id = _E.id(root=STRUCTURE_OID, extension="10000001")
    organization_name = professional.get("organization", "CABINET CPSDMP TEST")
    author_id = {"root": RPPS_OID, "extension": professional["id"]}
    author_name = (professional["given_name"], professional["family_name"])

    document = _E.ClinicalDocument(
        _E.realmCode(code="FR"),
        _E.typeId(root="2.16.840.1.113883.1.3", extension="POCD_HD000040"),
        *[_E.templateId(root=t) for t in (*_TEMPLATES, _XDS_SD)],
        _E.id(root=document_id),
        _E.code(
            code="11488-4",
            displayName="CR ou fiche de consultation ou de visite",
            codeSystem=LOINC,
        ),
        _E.title("Compte rendu de consultation (test cpsdmp)"),
        _E.effectiveTime(value=stamp),
        _E.confidentialityCode(
            code="N", displayName="Normal", codeSystem=CONFIDENTIALITY
        ),
        _E.languageCode(code="fr-FR"),
        _E.setId(root=document_id + ".1"),
        _E.versionNumber(value="1"),
        _E.recordTarget(
            _E.patientRole(
                _E.id(root=INS_NIR_TEST_OID, extension=patient.ins),
                _E.patient(
                    person(patient.given, patient.family),
                    _E.administrativeGenderCode(code=patient.gender, codeSystem=GENDER),
                    _E.birthTime(value=patient.birth_date),
                ),
            )
        ),
        _E.author(
            _E.time(value=stamp),
            _E.assignedAuthor(
                _E.id(**author_id),
                _E.code(
                    code=professional.get("specialty", "G15_10/SM54"),
                    codeSystem=AUTHOR_SPECIALTY,
                ),
                _E.assignedPerson(person(*author_name)),
                _E.representedOrganization(organization_id, _E.name(organization_name)),
            ),
        ),
        _E.custodian(
            _E.assignedCustodian(
                _E.representedCustodianOrganization(
                    _E.id(root=STRUCTURE_OID, extension="10000001"),
                    _E.name(organization_name),
                )
            )
        ),
        _E.legalAuthenticator(
            _E.time(value=stamp),
            _E.signatureCode(code="S"),
            _E.assignedEntity(
                _E.id(**author_id), _E.assignedPerson(person(*author_name))
            ),
        ),
        _E.documentationOf(
            _E.serviceEvent(
                _E.effectiveTime(_E.low(value=start), _E.high(value=stamp)),
                _E.performer(
                    _E.assignedEntity(
                        _E.id(**author_id),
                        _E.assignedPerson(person(*author_name)),
                        _E.representedOrganization(
                            _E.name(organization_name),
                            _E.standardIndustryClassCode(
                                code="AMBULATOIRE",
                                displayName="Ambulatoire",
                                codeSystem=PRACTICE_SETTING,
                            ),
                        ),
                    ),
                    typeCode="PRF",
                ),
            )
        ),
        _E.componentOf(
            _E.encompassingEncounter(
                _E.effectiveTime(_E.low(value=start), _E.high(value=stamp)),
                _E.location(
                    _E.healthCareFacility(
                        _E.code(
                            code="SA07",
                            displayName="Cabinet individuel",
                            codeSystem=FACILITY_TYPE,
                        )
                    )
                ),
            )
        ),
        _E.component(
            _E.nonXMLBody(
                _E.text(
                    base64.b64encode(body.encode("utf-8")).decode("ascii"),
                    mediaType="text/plain",
                    representation="B64",
                )
            )
        ),
        classCode="DOCCLIN",
        moodCode="EVN",
    )
    data: bytes = etree.tostring(document, xml_declaration=True, encoding="UTF-8")
    return data
