"""
From a CDA R2 document to the XDS DocumentEntry that submits it to the DMP,
following the CI-SIS rules for deriving metadata from the CDA header.

Only the header is read: the document is parsed incrementally and the
parser stops at the body's first element (enough to tell a structured body
from an N1 body and its media type), so a large document costs the memory
of its header, not of its body. The hash and size are those of the exact
bytes given.

What the header lacks comes from the L{Structure} configuration
(healthcareFacilityTypeCode, practiceSettingCode); what no table gives
(classCode of an unlisted typeCode, formatCode of an unlisted template) must
be given in C{overrides}, and a missing mandatory element is a L{CdaError}
naming it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone

from lxml import etree

from cpsdmp.protocols.safexml import XmlRefused, chunked, iter_events
from cpsdmp.xds.context import Structure, SubmissionDefaults
from cpsdmp.xds.ebrim import (
    IDNPS_OID,
    IDNST_OID,
    INS_OIDS,
    Author,
    CodedValue,
    DocumentEntry,
    DocumentHash,
    MetadataError,
    Organization,
    PatientId,
    Person,
    new_entry_uuid,
    source_patient_id,
    xds_time,
)
from cpsdmp.xds.values import (
    CLASS_CODE_SYSTEM,
    CLASS_DISPLAYS,
    check_dtm,
    check_entry,
    check_overrides,
)

HL7 = "urn:hl7-org:v3"
NS = {"h": HL7}
#: Largest header we read before the body must have started.
MAX_HEADER_BYTES = 8 * 1024 * 1024


class CdaError(MetadataError):
    """
    The document is not a CDA the DMP can take, or lacks a mandatory header
    element (named in the message).
    """


class UnknownClassCode(CdaError):
    """
    The document's typeCode has no classCode in the table. The message ends
    with how to give one; each caller words it its own way (L{hinting}).
    """

    def __init__(
        self, type_code: CodedValue, hint: str = "give it as the classCode override"
    ) -> None:
        super().__init__(
            f"no classCode is known for the typeCode {type_code.code} "
            f"({type_code.display}) in this version's table; {hint}"
        )
        self.type_code = type_code

    def hinting(self, hint: str) -> UnknownClassCode:
        """
        @return: the same error, its message ending with C{hint}.
        """
        return UnknownClassCode(self.type_code, hint)


# Tables ---------------------------------------------------------------------------
COMPTE_RENDU = CodedValue("10", CLASS_CODE_SYSTEM, "Compte rendu")
SYNTHESE = CodedValue("11", CLASS_CODE_SYSTEM, "Synthèse")

#: typeCode (LOINC) -> classCode: the entries of the CI-SIS table
#: ASS_X04-CorrespondanceType-Classe that this module knows. It is a partial
#: transcription: a typeCode not listed needs C{classCode} in the overrides.
CLASS_BY_TYPE: dict[tuple[str, str], CodedValue] = {
    ("11502-2", "2.16.840.1.113883.6.1"): COMPTE_RENDU,
    ("11488-4", "2.16.840.1.113883.6.1"): COMPTE_RENDU,
    ("11490-0", "2.16.840.1.113883.6.1"): COMPTE_RENDU,
    ("87273-9", "2.16.840.1.113883.6.1"): COMPTE_RENDU,
    ("34133-9", "2.16.840.1.113883.6.1"): SYNTHESE,
    ("60591-5", "2.16.840.1.113883.6.1"): SYNTHESE,
}

#: IHE format codes (TRE_A11) and the CI-SIS complementary ones (TRE_A06).
IHE_FORMAT_SYSTEM = "1.3.6.1.4.1.19376.1.2.3"
CISIS_FORMAT_SYSTEM = "1.2.250.1.213.1.1.4.2.282"

#: CDA templateId -> formatCode, from the CI-SIS table
#: ASS_A11-CorresModeleCDA-XdsFormatCode (the CI-SIS model templates first).
FORMAT_BY_TEMPLATE: dict[str, CodedValue] = {
    "1.2.250.1.213.1.1.1.55": CodedValue(
        "urn:ihe:lab:xd-lab:2008", IHE_FORMAT_SYSTEM, "CR d'examens biologiques"
    ),
    "1.3.6.1.4.1.19376.1.3.3": CodedValue(
        "urn:ihe:lab:xd-lab:2008", IHE_FORMAT_SYSTEM, "CR d'examens biologiques"
    ),
    "1.2.250.1.213.1.1.1.22": CodedValue(
        "urn:asip:ci-sis:dlu:2015", CISIS_FORMAT_SYSTEM, "DLU"
    ),
    "1.2.250.1.213.1.1.1.23": CodedValue(
        "urn:asip:ci-sis:fludt:2017", CISIS_FORMAT_SYSTEM, "DLU-FLUDT"
    ),
    "1.2.250.1.213.1.1.1.24": CodedValue(
        "urn:asip:ci-sis:fludr:2017", CISIS_FORMAT_SYSTEM, "DLU-FLUDR"
    ),
    "1.2.250.1.213.1.1.1.37": CodedValue(
        "urn:asip:ci-sis:vac:2019", CISIS_FORMAT_SYSTEM, "Carnet de vaccination"
    ),
    "1.2.250.1.213.1.1.1.46": CodedValue(
        "urn:asip:ci-sis:vac-note:2021", CISIS_FORMAT_SYSTEM, "Note de vaccination"
    ),
    "1.2.250.1.213.1.1.1.13": CodedValue(
        "urn:asip:ci-sis:vsm:2012", CISIS_FORMAT_SYSTEM, "Volet de synthèse médicale"
    ),
    "1.2.250.1.213.1.1.1.21": CodedValue(
        "urn:asip:ci-sis:ldl-ees:2017", CISIS_FORMAT_SYSTEM, "Lettre de liaison"
    ),
}

#: Unstructured (N1) body: nonXMLBody/text/@mediaType -> formatCode
#: (ASS_A12-CorresMediaTypeCDANonStructure-XdsFormatCode).
FORMAT_BY_MEDIA_TYPE: dict[str, CodedValue] = {
    "application/pdf": CodedValue(
        "urn:ihe:iti:xds-sd:pdf:2008", IHE_FORMAT_SYSTEM, "Document PDF"
    ),
    "text/plain": CodedValue(
        "urn:ihe:iti:xds-sd:text:2008", IHE_FORMAT_SYSTEM, "Document texte brut"
    ),
    "text/rtf": CodedValue(
        "urn:ihe:iti-fr:xds-sd:rtf:2010", IHE_FORMAT_SYSTEM, "Document RTF"
    ),
    "image/jpeg": CodedValue(
        "urn:ihe:iti-fr:xds-sd:jpeg:2010", IHE_FORMAT_SYSTEM, "Image JPEG"
    ),
    "image/tiff": CodedValue(
        "urn:ihe:iti-fr:xds-sd:tiff:2010", IHE_FORMAT_SYSTEM, "Image TIFF"
    ),
}

#: referenceIdList types the DMP takes (JDV_J231).
REFERENCE_ID_ORDER = "urn:ihe:iti:xds:2013:order"


# Times -------------------------------------------------------------------------------
_TS = re.compile(
    r"^(?P<date>\d{4}(\d{2}(\d{2})?)?)"
    r"(?P<time>\d{2}(\d{2}(\d{2})?)?)?"
    r"(?P<fraction>\.\d+)?"
    r"(?P<zone>[+-]\d{4})?$"
)


def hl7_time_to_utc(value: str, where: str) -> str:
    """
    Convert an HL7 TS to the XDS DTM in UTC.

    A date alone is kept as it is (XDS allows a truncated precision); a time
    of day needs its zone offset, without which its UTC value is unknown.

    @param where: the element's path, for the error message.
    @raise CdaError: a malformed value or a time without zone.
    """
    match = _TS.match(value or "")
    if match is None:
        raise CdaError(f"{where} value {value!r} is not an HL7 date/time")
    if match["time"] is None:
        # Kept at its precision, but only if it is a real date.
        try:
            return check_dtm(match["date"], f"{where} value")
        except MetadataError as error:
            raise CdaError(str(error)) from None
    if match["zone"] is None:
        raise CdaError(
            f"{where} value {value!r} has a time of day but no zone offset "
            "(like +0100); its UTC value is unknown"
        )
    digits = (match["date"] + match["time"]).ljust(14, "0")
    zone = match["zone"]
    if int(zone[3:5]) > 59:
        raise CdaError(f"{where} value {value!r} has an invalid zone offset")
    offset = timedelta(hours=int(zone[1:3]), minutes=int(zone[3:5]))
    try:
        moment = datetime.strptime(digits, "%Y%m%d%H%M%S").replace(
            tzinfo=timezone(offset if zone[0] == "+" else -offset)
        )
    except ValueError:
        raise CdaError(f"{where} value {value!r} is not a valid date") from None
    return xds_time(moment)


# The header ---------------------------------------------------------------------------
@dataclass
class CdaHeader:
    """
    The parsed header of a CDA and what was seen of its body.

    @ivar body: C{"structuredBody"} or C{"nonXMLBody"}.
    @ivar media_type: for an N1 body, the embedded document's media type.
    """

    root: etree._Element
    body: str
    media_type: str | None = None


def read_header(
    document: bytes | memoryview | Iterable[bytes],
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> CdaHeader:
    """
    Parse a CDA until its body starts.

    @param document: the document's bytes, whole or as chunks.
    @raise CdaError: not a CDA, or no body.
    @raise XmlRefused: unsafe or malformed XML.
    """
    chunks = (
        chunked(document)
        if isinstance(document, bytes | bytearray | memoryview)
        else document
    )
    root = None
    body = None
    in_component = False
    depth = 0
    for event, element in iter_events(
        chunks, what="CDA document", max_bytes=max_header_bytes
    ):
        if event == "start":
            depth += 1
        else:
            depth -= 1
            continue
        if root is None:
            root = element
            if element.tag != f"{{{HL7}}}ClinicalDocument":
                raise CdaError(
                    f"not a CDA document: the root element is {element.tag}, "
                    f"not ClinicalDocument in the {HL7} namespace"
                )
            continue
        if depth == 2 and element.tag == f"{{{HL7}}}component":
            in_component = True
        elif in_component and depth == 3 and body is None:
            body = etree.QName(element).localname
            if body != "nonXMLBody":
                return CdaHeader(root, body)
        elif body == "nonXMLBody" and element.tag == f"{{{HL7}}}text":
            return CdaHeader(root, body, element.get("mediaType"))
    if root is None:
        raise CdaError("not a CDA document: no root element")
    raise CdaError("ClinicalDocument/component (the document body) is missing")


# Derivation -------------------------------------------------------------------
def _one(root: etree._Element, path: str) -> etree._Element | None:
    found = root.xpath(path, namespaces=NS)
    return found[0] if found else None


def _required(root: etree._Element, path: str, attribute: str | None = None) -> str:
    element = _one(root, path)
    shown = path.replace("h:", "") + (f"/@{attribute}" if attribute else "")
    if element is None:
        raise CdaError(f"the CDA header has no {shown}")
    value = element.get(attribute) if attribute else (element.text or "").strip()
    if not value:
        raise CdaError(f"the CDA header has an empty {shown}")
    return value


def _code(element: etree._Element | None) -> CodedValue | None:
    if element is None or not element.get("code"):
        return None
    return CodedValue(
        element.get("code", ""),
        element.get("codeSystem", ""),
        element.get("displayName", ""),
    )


def _person(entity: etree._Element, where: str) -> Person:
    identifier = _one(entity, "h:id[@extension]")
    if identifier is None:
        raise CdaError(f"{where}/id with an extension is missing")
    root = identifier.get("root", "")
    if root == IDNPS_OID:
        kind = "IDNPS"
    elif root in INS_OIDS:
        kind = "NH"
    else:
        kind = ""
    name = _one(entity, "h:assignedPerson/h:name")
    family = given = ""
    if name is not None:
        family = " ".join(
            (f.text or "").strip() for f in name.findall(f"{{{HL7}}}family")[:1]
        )
        given = " ".join(
            (g.text or "").strip() for g in name.findall(f"{{{HL7}}}given")[:1]
        )
    return Person(identifier.get("extension", ""), family, given, root, kind)


def _organization(element: etree._Element | None) -> Organization | None:
    if element is None:
        return None
    identifier = _one(element, f"h:id[@root='{IDNST_OID}']")
    name = (element.findtext(f"{{{HL7}}}name") or "").strip()
    if identifier is None:
        return None
    return Organization(name, identifier.get("extension", ""))


def _authors(root: etree._Element) -> list[Author]:
    authors = []
    for index, author in enumerate(
        root.xpath("h:author/h:assignedAuthor", namespaces=NS), start=1
    ):
        where = f"author[{index}]/assignedAuthor"
        person = None
        if _one(author, "h:assignedPerson") is not None:
            person = _person(author, where)
        institution = _organization(_one(author, "h:representedOrganization"))
        specialty = _code(_one(author, "h:code"))
        function = _one(author, "../h:functionCode")
        role = function.get("displayName") if function is not None else None
        authors.append(
            Author(
                person=person,
                institutions=(institution,) if institution else (),
                roles=(role,) if role else (),
                specialties=(specialty,) if specialty else (),
            )
        )
    if not authors:
        raise CdaError("the CDA header has no author/assignedAuthor")
    return authors


def _patient_id(root: etree._Element) -> PatientId:
    for identifier in root.xpath("h:recordTarget/h:patientRole/h:id", namespaces=NS):
        if identifier.get("root") in INS_OIDS and identifier.get("extension"):
            return PatientId(identifier.get("extension"), identifier.get("root"))
    raise CdaError(
        "the CDA header has no recordTarget/patientRole/id with an INS root "
        f"({', '.join(sorted(INS_OIDS))}): the DMP needs the patient's INS"
    )


def _source_patient_id(root: etree._Element, patient: PatientId) -> str:
    # The producer's own identifier (IPP) when the CDA gives one, else the
    # INS (CI-SIS mapping of sourcePatientId).
    for identifier in root.xpath("h:recordTarget/h:patientRole/h:id", namespaces=NS):
        extension, authority = identifier.get("extension"), identifier.get("root")
        if extension and authority and authority not in INS_OIDS:
            return source_patient_id(extension, authority, "PI")
    return str(patient)


def _unique_id(root: etree._Element) -> str:
    identifier = _one(root, "h:id")
    if identifier is None or not identifier.get("root"):
        raise CdaError("the CDA header has no id/@root")
    extension = identifier.get("extension")
    value = identifier.get("root", "")
    return f"{value}^{extension}" if extension else value


def _format_code(header: CdaHeader) -> CodedValue | None:
    if header.body == "nonXMLBody":
        return FORMAT_BY_MEDIA_TYPE.get(header.media_type or "")
    for template in header.root.xpath("h:templateId/@root", namespaces=NS):
        if template in FORMAT_BY_TEMPLATE:
            return FORMAT_BY_TEMPLATE[template]
    return None


def _as_code(value: object) -> object:
    """
    @return: C{value}, a code given as C{{code, codingScheme, display}}
        (or a list of them) made a L{CodedValue}; anything else unchanged.
    """
    if isinstance(value, list):
        return [_as_code(item) for item in value]
    if isinstance(value, Mapping) and {"code", "codingScheme"} <= set(value):
        return CodedValue(
            str(value["code"]),
            str(value["codingScheme"]),
            str(value.get("display", "")),
        )
    return value


def document_entry(
    document: bytes | memoryview,
    structure: Structure | None = None,
    defaults: SubmissionDefaults | None = None,
    overrides: dict[str, object] | None = None,
) -> DocumentEntry:
    """
    Derive the DocumentEntry of a CDA document.

    @param document: the exact bytes that will be submitted.
    @param structure: supplies healthcareFacilityTypeCode and
        practiceSettingCode when the CDA does not.
    @param overrides: XDS attribute name -> value, applied last; a code as
        a L{CodedValue} or as C{{code, codingScheme, display}}.
    @raise CdaError: a mandatory element is missing, or a value has no
        mapping (the message names it).
    @raise MetadataError: an override, or a value of the CDA, is one the DMP
        refuses (L{cpsdmp.xds.values}): a time that is not a real XDS time,
        a service start after its stop, a text too long, a classCode not of
        TRE_A03.
    @raise XmlRefused: the document is unsafe or not well-formed XML.
    """
    overrides = {name: _as_code(value) for name, value in (overrides or {}).items()}
    check_overrides(overrides)
    defaults = defaults or SubmissionDefaults()
    header = read_header(document)
    root = header.root

    type_code = _code(_one(root, "h:code"))
    if type_code is None:
        raise CdaError("the CDA header has no code/@code (the document type)")
    confidentiality = _code(_one(root, "h:confidentialityCode"))
    if confidentiality is None:
        raise CdaError("the CDA header has no confidentialityCode/@code")

    class_code = overrides.pop("classCode", None) or CLASS_BY_TYPE.get(
        (type_code.code, type_code.scheme)
    )
    if (
        isinstance(class_code, CodedValue)
        and not class_code.display
        and class_code.scheme == CLASS_CODE_SYSTEM
        and class_code.code in CLASS_DISPLAYS
    ):
        class_code = replace(class_code, display=CLASS_DISPLAYS[class_code.code])
    if class_code is None:
        raise UnknownClassCode(type_code)
    format_code = overrides.pop("formatCode", None) or _format_code(header)
    if format_code is None:
        what = (
            f"the media type {header.media_type}"
            if header.body == "nonXMLBody"
            else "its templateIds"
        )
        raise CdaError(f"no formatCode is known for this CDA from {what}; give one")

    facility = _code(
        _one(
            root,
            "h:componentOf/h:encompassingEncounter/h:location/"
            "h:healthCareFacility/h:code",
        )
    ) or (structure.activity_sector if structure else None)
    if facility is None and "healthcareFacilityTypeCode" not in overrides:
        raise CdaError(
            "the CDA header has no componentOf/encompassingEncounter/location/"
            "healthCareFacility/code and no structure is configured"
        )
    practice = _code(
        _one(
            root,
            "h:documentationOf/h:serviceEvent/h:performer/h:assignedEntity/"
            "h:representedOrganization/h:standardIndustryClassCode",
        )
    ) or (structure.practice_setting if structure else None)
    if practice is None and "practiceSettingCode" not in overrides:
        raise CdaError(
            "the CDA header has no documentationOf/serviceEvent/performer/"
            "assignedEntity/representedOrganization/standardIndustryClassCode "
            "and no structure is configured"
        )

    where = "documentationOf/serviceEvent/effectiveTime"
    low = _one(root, f"h:{where.replace('/', '/h:')}/h:low/@value")
    if low is None and "serviceStartTime" not in overrides:
        raise CdaError(f"the CDA header has no {where}/low/@value (serviceStartTime)")
    high = _one(root, f"h:{where.replace('/', '/h:')}/h:high/@value")
    start = hl7_time_to_utc(str(low), f"{where}/low") if low else None
    stop = hl7_time_to_utc(str(high), f"{where}/high") if high else None

    legal = _one(root, "h:legalAuthenticator/h:assignedEntity")
    if legal is None and "legalAuthenticator" not in overrides:
        raise CdaError("the CDA header has no legalAuthenticator/assignedEntity")
    references = [
        f"{i.get('extension')}^^^&{i.get('root')}&ISO^{REFERENCE_ID_ORDER}"
        for i in root.xpath("h:inFulfillmentOf/h:order/h:id", namespaces=NS)
        if i.get("extension") and i.get("root")
    ]
    digest = DocumentHash.of(document)
    patient = _patient_id(root)

    entry = DocumentEntry(
        entryUUID=new_entry_uuid(),
        uniqueId=_unique_id(root),
        patientId=patient,
        sourcePatientId=_source_patient_id(root, patient),
        mimeType="text/xml",
        classCode=class_code,  # type: ignore[arg-type]
        typeCode=type_code,
        formatCode=format_code,  # type: ignore[arg-type]
        confidentialityCode=[confidentiality, *defaults.confidentiality],
        healthcareFacilityTypeCode=facility,  # type: ignore[arg-type]
        practiceSettingCode=practice,  # type: ignore[arg-type]
        creationTime=hl7_time_to_utc(
            _required(root, "h:effectiveTime", "value"), "effectiveTime"
        ),
        languageCode=_required(root, "h:languageCode", "code"),
        title=_required(root, "h:title"),
        authors=_authors(root),
        hash=digest.sha1,
        size=digest.size,
        serviceStartTime=start,
        serviceStopTime=stop,
        legalAuthenticator=(
            _person(legal, "legalAuthenticator/assignedEntity")
            if legal is not None
            else None
        ),
        referenceIdList=references,
    )
    for name, value in overrides.items():
        if not hasattr(entry, name):
            raise MetadataError(f"{name} is not a DocumentEntry attribute")
        setattr(entry, name, value)
    return check_entry(entry)


__all__ = [
    "CLASS_CODE_SYSTEM",
    "CLASS_DISPLAYS",
    "CdaError",
    "CdaHeader",
    "UnknownClassCode",
    "XmlRefused",
    "document_entry",
    "hl7_time_to_utc",
    "read_header",
]
