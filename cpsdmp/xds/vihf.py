"""
The VIHF ("Vecteur d'Identification et d'Habilitation Formelle"): the SAML
2.0 assertion that every DMP request carries in its C{wsse:Security} header
to say who acts, for which structure, with which software and why.

This is the direct mode (CPS card): the professional authenticated with the
card during the TLS handshake, so the assertion is not signed; its issuer is
the subject of the card's authentication certificate, its NameID the
professional's national identifier, its authentication context
C{SmartcardPKI}. The attributes follow the official direct-mode sample.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

from lxml import etree

from cpsdmp.xds.context import Professional, Software, Structure
from cpsdmp.xds.ebrim import CodedValue, PatientId

SAML2 = "urn:oasis:names:tc:SAML:2.0:assertion"
WSSE = (
    "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
)
XSI = "http://www.w3.org/2001/XMLSchema-instance"
XS = "http://www.w3.org/2001/XMLSchema"
HL7 = "urn:hl7-org:v3"

VIHF_VERSION = "3.0"
SMARTCARD_PKI = "urn:oasis:names:tc:SAML:2.0:ac:classes:SmartcardPKI"
X509_SUBJECT_NAME = "urn:oasis:names:tc:SAML:1.1:nameid-format:X509SubjectName"
ROLE = "urn:oasis:names:tc:xacml:2.0:subject:role"
RESOURCE_ID = "urn:oasis:names:tc:xacml:2.0:resource:resource-id"
PURPOSE_OF_USE = "urn:oasis:names:tc:xspa:1.0:subject:purposeofuse"

#: Modes of access (the VIHF purpose of use): normal, emergency ("bris de
#: glace"), regulation centre.
ACCESS_MODE_SYSTEM = "1.2.250.1.213.1.1.4.248"
NORMAL_ACCESS = CodedValue("normal", ACCESS_MODE_SYSTEM, "Accès normal")
EMERGENCY_ACCESS = CodedValue("bris_de_glace", ACCESS_MODE_SYSTEM, "Bris de glace")
REGULATION_ACCESS = CodedValue("centre_15", ACCESS_MODE_SYSTEM, "Centre de régulation")


@dataclass(frozen=True)
class VihfRequest:
    """
    What one VIHF states.

    @ivar issuer: the subject DN of the card's authentication certificate,
        in RFC 4514 form.
    @ivar patient: the patient concerned, for requests about one patient.
    """

    professional: Professional
    structure: Structure
    software: Software
    issuer: str
    patient: PatientId | None = None
    purpose_of_use: CodedValue = NORMAL_ACCESS
    instant: datetime = field(default_factory=lambda: datetime.now(UTC))


def _time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + (
        f"{moment.microsecond // 1000:03d}Z"
    )


def _attribute(statement: etree._Element, name: str) -> etree._Element:
    return etree.SubElement(statement, f"{{{SAML2}}}Attribute", Name=name)


def _string(statement: etree._Element, name: str, value: str) -> None:
    holder = etree.SubElement(
        _attribute(statement, name),
        f"{{{SAML2}}}AttributeValue",
        {f"{{{XSI}}}type": "xs:string"},
        nsmap={"xs": XS},
    )
    holder.text = value


def _coded(
    attribute: etree._Element, tag: str, value: CodedValue, system_name: str = ""
) -> None:
    holder = etree.SubElement(attribute, f"{{{SAML2}}}AttributeValue")
    element = etree.SubElement(holder, f"{{{HL7}}}{tag}", nsmap={None: HL7})
    element.set("code", value.code)
    element.set("codeSystem", value.scheme)
    if system_name:
        element.set("codeSystemName", system_name)
    element.set("displayName", value.display)
    element.set(f"{{{XSI}}}type", "CE")


def assertion(request: VihfRequest) -> etree._Element:
    """
    @return: the unsigned C{saml2:Assertion} of the direct mode.
    """
    instant = _time(request.instant)
    root = etree.Element(
        f"{{{SAML2}}}Assertion",
        ID=f"_{uuid.uuid4()}",
        IssueInstant=instant,
        Version="2.0",
        nsmap={"saml2": SAML2, "xsi": XSI},
    )
    issuer = etree.SubElement(root, f"{{{SAML2}}}Issuer", Format=X509_SUBJECT_NAME)
    issuer.text = request.issuer
    subject = etree.SubElement(root, f"{{{SAML2}}}Subject")
    etree.SubElement(
        subject, f"{{{SAML2}}}NameID"
    ).text = request.professional.identifier
    authn = etree.SubElement(root, f"{{{SAML2}}}AuthnStatement", AuthnInstant=instant)
    context = etree.SubElement(authn, f"{{{SAML2}}}AuthnContext")
    etree.SubElement(context, f"{{{SAML2}}}AuthnContextClassRef").text = SMARTCARD_PKI

    statement = etree.SubElement(root, f"{{{SAML2}}}AttributeStatement")
    _string(statement, "Identifiant_Structure", request.structure.idnst)
    sector = request.structure.activity_sector
    _string(statement, "Secteur_Activite", f"{sector.code}^{sector.scheme}")
    roles = _attribute(statement, ROLE)
    for role in request.professional.roles():
        _coded(roles, "Role", role)
    _string(statement, "VIHF_Version", VIHF_VERSION)
    _string(statement, "Authentification_mode", "DIRECTE")
    if request.patient is not None:
        _string(statement, RESOURCE_ID, str(request.patient))
    _string(statement, "Ressource_URN", "urn:dmp")
    _coded(
        _attribute(statement, PURPOSE_OF_USE),
        "PurposeOfUse",
        request.purpose_of_use,
        "mode acces VIHF 2.0",
    )
    software = request.software
    _string(statement, "LPS_ID", software.instance_id or software.source_oid)
    _string(statement, "LPS_Nom", software.name)
    _string(statement, "LPS_Version", software.version)
    _string(statement, "LPS_ID_HOMOLOGATION_DMP", software.homologation_id)
    return root


def security_header(request: VihfRequest) -> etree._Element:
    """
    @return: the C{wsse:Security} header block holding the VIHF.
    """
    security = etree.Element(f"{{{WSSE}}}Security", nsmap={"wsse": WSSE})
    security.append(assertion(request))
    return security
