"""
The ebXML Registry Information Model 3.0 as IHE XDS.b uses it, with the
formats the DMP expects in its metadata.

A L{DocumentEntry} is an C{ExtrinsicObject}, a L{SubmissionSet} a
C{RegistryPackage}; their coded attributes are C{Classification}s and their
identifiers C{ExternalIdentifier}s under the standard XDS scheme UUIDs
(IHE ITI TF-3, section 4.2.5). Values use HL7 v2 data types: the patient is a
CX (C{INS^^^&OID&ISO^NH}), a person an XCN, an organisation an XON, a code a
CE (C{code^display^scheme}).

Objects render to lxml elements with L{to_element} and read back from them
with C{from_element}, so that the same classes build requests and read
query answers.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from lxml import etree

# Namespaces -----------------------------------------------------------------
RIM = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"
RS = "urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0"
LCM = "urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0"
QUERY = "urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0"
XDSB = "urn:ihe:iti:xds-b:2007"


def _rim(local: str) -> str:
    return f"{{{RIM}}}{local}"


# Object types, classification schemes and identification schemes -----------
# IHE ITI TF-3, section 4.2.5.
DOCUMENT_ENTRY_OBJECT_TYPE = "urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1"
SUBMISSION_SET_NODE = "urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd"
CLASSIFICATION_OBJECT_TYPE = (
    "urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:Classification"
)
EXTERNAL_IDENTIFIER_OBJECT_TYPE = (
    "urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:ExternalIdentifier"
)
REGISTRY_PACKAGE_OBJECT_TYPE = (
    "urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:RegistryPackage"
)
ASSOCIATION_OBJECT_TYPE = (
    "urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:Association"
)


class DocumentEntryScheme:
    """
    Classification and identification schemes of an XDSDocumentEntry.
    """

    author = "urn:uuid:93606bcf-9494-43ec-9b4e-a7748d1a838d"
    classCode = "urn:uuid:41a5887f-8865-4c09-adf7-e362475b143a"
    confidentialityCode = "urn:uuid:f4f85eac-e6cb-4883-b524-f2705394840f"
    eventCodeList = "urn:uuid:2c6b8cb7-8b2a-4051-b291-b1ae6a575ef4"
    formatCode = "urn:uuid:a09d5840-386c-46f2-b5ad-9c3699a4309d"
    healthcareFacilityTypeCode = "urn:uuid:f33fb8ac-18af-42cc-ae0e-ed0b0bdb91e1"
    practiceSettingCode = "urn:uuid:cccf5598-8b07-4b77-a05e-ae952c785ead"
    typeCode = "urn:uuid:f0306f51-975f-434e-a61c-c59651d33983"
    patientId = "urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427"
    uniqueId = "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"


class SubmissionSetScheme:
    """
    Classification and identification schemes of an XDSSubmissionSet.
    """

    author = "urn:uuid:a7058bb9-b4e4-4307-ba5b-e3f0ab85e12d"
    contentTypeCode = "urn:uuid:aa543740-bdda-424e-8c96-df4873be8500"
    patientId = "urn:uuid:6b5aea1a-874d-4603-a4bc-96a0a7b38446"
    sourceId = "urn:uuid:554ac39e-e3fe-47fe-b233-965d2a147832"
    uniqueId = "urn:uuid:96fdda7c-d067-4183-912e-bf5ee74998a8"


class AssociationType:
    """
    Association types of XDS, its metadata update option and IHE DSG.
    """

    HasMember = "urn:oasis:names:tc:ebxml-regrep:AssociationType:HasMember"
    RPLC = "urn:ihe:iti:2007:AssociationType:RPLC"
    XFRM = "urn:ihe:iti:2007:AssociationType:XFRM"
    APND = "urn:ihe:iti:2007:AssociationType:APND"
    XFRM_RPLC = "urn:ihe:iti:2007:AssociationType:XFRM_RPLC"
    signs = "urn:ihe:iti:2007:AssociationType:signs"
    UpdateAvailabilityStatus = (
        "urn:ihe:iti:2010:AssociationType:UpdateAvailabilityStatus"
    )


class Status:
    """
    Availability statuses: the XDS ones and the DMP's own (CI-SIS).
    """

    Approved = "urn:oasis:names:tc:ebxml-regrep:StatusType:Approved"
    Deprecated = "urn:oasis:names:tc:ebxml-regrep:StatusType:Deprecated"
    Archived = "urn:asip:ci-sis:2010:StatusType:Archived"
    Deleted = "urn:asip:ci-sis:2010:StatusType:Deleted"


REFERENCE_ID_LIST_SLOT = "urn:ihe:iti:xds:2013:referenceIdList"

# Identifier authorities (OIDs) ----------------------------------------------
#: INS-NIR in production, the test one, the demonstration one, and the NIA.
INS_OID_PRODUCTION = "1.2.250.1.213.1.4.8"
INS_OID_NIA = "1.2.250.1.213.1.4.9"
INS_OID_TEST = "1.2.250.1.213.1.4.10"
INS_OID_DEMO = "1.2.250.1.213.1.4.11"
INS_OIDS = frozenset({INS_OID_PRODUCTION, INS_OID_NIA, INS_OID_TEST, INS_OID_DEMO})
#: Professionals' national identifiers (IDNPS: RPPS prefixed 8, ADELI 0).
IDNPS_OID = "1.2.250.1.71.4.2.1"
#: Structures' national identifiers (IDNST: FINESS prefixed 1, SIRET 3...).
IDNST_OID = "1.2.250.1.71.4.2.2"


class MetadataError(ValueError):
    """
    A metadata value is missing or does not have the form the DMP expects.
    """


# HL7 v2 data types ------------------------------------------------------------
def source_patient_id(identifier: str, authority: str, kind: str = "PI") -> str:
    """
    @return: a CX for the sourcePatientId: the producer's own patient
        identifier (IPP, type C{PI}) or the INS (type C{NH}).
    """
    return f"{_hl7_escape(identifier)}^^^&{authority}&ISO^{kind}"


def _hl7_escape(text: str) -> str:
    # HL7 v2 escapes for the delimiters ^ & ~ | and the escape \.
    return (
        text.replace("\\", "\\E\\")
        .replace("|", "\\F\\")
        .replace("^", "\\S\\")
        .replace("&", "\\T\\")
        .replace("~", "\\R\\")
    )


def _hl7_unescape(text: str) -> str:
    return (
        text.replace("\\F\\", "|")
        .replace("\\S\\", "^")
        .replace("\\T\\", "&")
        .replace("\\R\\", "~")
        .replace("\\E\\", "\\")
    )


def _components(value: str, count: int) -> list[str]:
    parts = value.split("^")
    return parts + [""] * (count - len(parts))


_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
#: The longest OID XDS takes (IHE ITI TF-3, 4.2.3.2.26).
MAX_OID = 64


def is_oid(value: str) -> bool:
    """
    @return: whether C{value} is a dotted OID of at most L{MAX_OID}
        characters.
    """
    return len(value) <= MAX_OID and _OID.fullmatch(value) is not None


@dataclass(frozen=True)
class CodedValue:
    """
    A code from a coding scheme, with its display name.
    """

    code: str
    scheme: str
    display: str = ""

    def to_ce(self) -> str:
        """
        @return: the HL7 v2 CE form C{code^display^scheme}.
        """
        return "^".join(
            [_hl7_escape(self.code), _hl7_escape(self.display), self.scheme]
        )

    @classmethod
    def from_ce(cls, value: str) -> CodedValue:
        code, display, scheme = _components(value, 3)[:3]
        return cls(_hl7_unescape(code), scheme, _hl7_unescape(display))

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "codingScheme": self.scheme, "display": self.display}


#: An INS (NIR or NIA): sex, year and month of birth, the department
#: (2A or 2B for Corsica), the commune, the order number, then a 2-digit key.
_INS = re.compile(r"[0-9]{5}(?:[0-9]{2}|2A|2B)[0-9]{6}[0-9]{2}")


def check_ins(ins: str) -> str:
    """
    @return: C{ins} if it is an INS: 15 characters, 13 digits (the 6th and
        7th may be 2A or 2B, Corsica) then the key, 97 minus the number of
        the first 13 modulo 97 (2A counted as 19, 2B as 18).
    @raise MetadataError: saying which of the two it fails.
    """
    shown = ins if len(ins) <= 20 else ins[:20] + f"... ({len(ins)} characters)"
    if not _INS.fullmatch(ins):
        raise MetadataError(
            f"patient INS {shown!r} is not an INS: 15 characters, 13 digits "
            "(the 6th and 7th may be 2A or 2B for Corsica) and a 2-digit key"
        )
    number = int(ins[:13].replace("2A", "19").replace("2B", "18"))
    if int(ins[13:]) != 97 - number % 97:
        raise MetadataError(
            f"patient INS {shown!r} has a key, {ins[13:]}, that does not match "
            "its first 13 characters: one of them is wrong"
        )
    return ins


@dataclass(frozen=True)
class PatientId:
    """
    The patient's INS under its authority OID, as the CX C{INS^^^&OID&ISO^NH}.
    """

    ins: str
    authority: str = INS_OID_PRODUCTION

    def __post_init__(self) -> None:
        check_ins(self.ins)
        if self.authority not in INS_OIDS:
            raise MetadataError(
                f"patient identifier authority {self.authority!r} is not an INS "
                f"authority (expected one of {', '.join(sorted(INS_OIDS))})"
            )

    def __str__(self) -> str:
        return f"{self.ins}^^^&{self.authority}&ISO^NH"

    @classmethod
    def parse(cls, value: str) -> PatientId:
        """
        Read a CX; anything after the identifier type (the DMP appends a
        timestamp in some examples) is ignored.
        """
        parts = _components(value.strip("'"), 5)
        authority = parts[3].split("&")
        if len(authority) < 3 or authority[2] != "ISO":
            raise MetadataError(f"patient identifier {value!r} is not a CX with OID")
        return cls(parts[0], authority[1])


@dataclass(frozen=True)
class Person:
    """
    A person as an XCN: identifier under its authority, family and given
    names, and the identifier type (C{IDNPS} for RPPS/ADELI, C{NH} for INS).
    """

    identifier: str
    family: str = ""
    given: str = ""
    authority: str = IDNPS_OID
    identifier_type: str = "IDNPS"

    def to_xcn(self) -> str:
        fields = [
            _hl7_escape(self.identifier),
            _hl7_escape(self.family),
            _hl7_escape(self.given),
            "",
            "",
            "",
            "",
            "",
            f"&{self.authority}&ISO",
            "D",
            "",
            "",
            self.identifier_type,
        ]
        return "^".join(fields)

    @classmethod
    def from_xcn(cls, value: str) -> Person:
        parts = _components(value, 13)
        authority = parts[8].split("&")
        return cls(
            identifier=_hl7_unescape(parts[0]),
            family=_hl7_unescape(parts[1]),
            given=_hl7_unescape(parts[2]),
            authority=authority[1] if len(authority) > 1 else "",
            identifier_type=parts[12],
        )


@dataclass(frozen=True)
class Organization:
    """
    An organisation as an XON: name and IDNST (FINESS prefixed with 1,
    SIRET with 3, a professional's own practice with 4) under
    1.2.250.1.71.4.2.2.
    """

    name: str
    identifier: str
    authority: str = IDNST_OID
    identifier_type: str = "IDNST"

    def to_xon(self) -> str:
        fields = [
            _hl7_escape(self.name),
            "",
            "",
            "",
            "",
            f"&{self.authority}&ISO",
            self.identifier_type,
            "",
            "",
            _hl7_escape(self.identifier),
        ]
        return "^".join(fields)

    @classmethod
    def from_xon(cls, value: str) -> Organization:
        parts = _components(value, 10)
        authority = parts[5].split("&")
        return cls(
            name=_hl7_unescape(parts[0]),
            identifier=_hl7_unescape(parts[9]),
            authority=authority[1] if len(authority) > 1 else "",
            identifier_type=parts[6],
        )


@dataclass(frozen=True)
class Author:
    """
    One author: the person, their institutions, roles and specialties.
    """

    person: Person | None
    institutions: tuple[Organization, ...] = ()
    roles: tuple[str, ...] = ()
    specialties: tuple[CodedValue, ...] = ()

    def slots(self) -> list[Slot]:
        slots = []
        if self.person is not None:
            slots.append(Slot("authorPerson", [self.person.to_xcn()]))
        if self.institutions:
            slots.append(
                Slot("authorInstitution", [o.to_xon() for o in self.institutions])
            )
        if self.roles:
            slots.append(Slot("authorRole", list(self.roles)))
        if self.specialties:
            slots.append(Slot("authorSpecialty", [s.to_ce() for s in self.specialties]))
        return slots

    @classmethod
    def from_slots(cls, slots: dict[str, list[str]]) -> Author:
        people = slots.get("authorPerson", [])
        return cls(
            person=Person.from_xcn(people[0]) if people else None,
            institutions=tuple(
                Organization.from_xon(v) for v in slots.get("authorInstitution", [])
            ),
            roles=tuple(slots.get("authorRole", [])),
            specialties=tuple(
                CodedValue.from_ce(v) for v in slots.get("authorSpecialty", [])
            ),
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "authorPerson": self.person.to_xcn() if self.person else None,
            "authorInstitution": [o.to_xon() for o in self.institutions],
            "authorRole": list(self.roles),
            "authorSpecialty": [s.to_ce() for s in self.specialties],
        }


# Identifiers ------------------------------------------------------------------
def new_entry_uuid() -> str:
    """
    @return: a fresh entryUUID, C{urn:uuid:...}.
    """
    return uuid.uuid4().urn


def uuid_oid(value: uuid.UUID | None = None) -> str:
    """
    @return: an OID under 2.25 made from a UUID (ITU-T X.667), usable as a
        uniqueId without registering a root.
    """
    return f"2.25.{(value or uuid.uuid4()).int}"


def xds_time(moment: datetime) -> str:
    """
    @return: C{moment} in UTC as the XDS DTM C{YYYYMMDDHHMMSS}.
    @raise MetadataError: if C{moment} carries no time zone.
    """
    if moment.tzinfo is None:
        raise MetadataError(f"time {moment.isoformat()} has no time zone")
    return moment.astimezone(UTC).strftime("%Y%m%d%H%M%S")


@dataclass
class DocumentHash:
    """
    The SHA-1 hash (lowercase hex) and size of the exact document bytes.
    """

    sha1: str
    size: int

    @classmethod
    def of(cls, data: bytes | memoryview | Iterable[bytes]) -> DocumentHash:
        """
        @param data: the document, whole or as chunks.
        """
        digest = hashlib.sha1()
        size = 0
        chunks = [data] if isinstance(data, bytes | bytearray | memoryview) else data
        for chunk in chunks:
            digest.update(chunk)
            size += len(chunk)
        return cls(digest.hexdigest(), size)


# Building blocks ---------------------------------------------------------------
@dataclass
class Slot:
    name: str
    values: list[str]

    def to_element(self) -> etree._Element:
        slot = etree.Element(_rim("Slot"), name=self.name)
        value_list = etree.SubElement(slot, _rim("ValueList"))
        for value in self.values:
            etree.SubElement(value_list, _rim("Value")).text = value
        return slot


def _name(parent: etree._Element, tag: str, text: str) -> None:
    holder = etree.SubElement(parent, _rim(tag))
    etree.SubElement(
        holder,
        _rim("LocalizedString"),
        value=text,
        attrib={"{http://www.w3.org/XML/1998/namespace}lang": "fr-FR"},
        charset="UTF-8",
    )


def _classification(
    parent: etree._Element,
    *,
    ident: str,
    scheme: str,
    classified: str,
    node: str,
    slots: list[Slot],
    name: str | None = None,
) -> None:
    element = etree.SubElement(
        parent,
        _rim("Classification"),
        id=ident,
        objectType=CLASSIFICATION_OBJECT_TYPE,
        classificationScheme=scheme,
        classifiedObject=classified,
        nodeRepresentation=node,
    )
    for slot in slots:
        element.append(slot.to_element())
    if name is not None:
        _name(element, "Name", name)


def _coded(
    parent: etree._Element,
    ident: str,
    scheme: str,
    classified: str,
    value: CodedValue,
) -> None:
    _classification(
        parent,
        ident=ident,
        scheme=scheme,
        classified=classified,
        node=value.code,
        slots=[Slot("codingScheme", [value.scheme])],
        name=value.display,
    )


def _external_identifier(
    parent: etree._Element,
    *,
    ident: str,
    scheme: str,
    registry_object: str,
    value: str,
    name: str,
) -> None:
    element = etree.SubElement(
        parent,
        _rim("ExternalIdentifier"),
        id=ident,
        objectType=EXTERNAL_IDENTIFIER_OBJECT_TYPE,
        identificationScheme=scheme,
        registryObject=registry_object,
        value=value,
    )
    _name(element, "Name", name)


class _Ids:
    # Identifiers of the classifications and external identifiers: they are
    # required by ebRIM but only need to be unique within the submission.
    def __call__(self) -> str:
        return uuid.uuid4().urn


# XDSDocumentEntry ----------------------------------------------------------------
@dataclass
class DocumentEntry:
    """
    The XDS metadata of one document (IHE ITI TF-3, section 4.2.3.2), named
    with the XDS attribute names.
    """

    entryUUID: str
    uniqueId: str
    patientId: PatientId
    mimeType: str
    classCode: CodedValue
    typeCode: CodedValue
    formatCode: CodedValue
    confidentialityCode: list[CodedValue]
    healthcareFacilityTypeCode: CodedValue
    practiceSettingCode: CodedValue
    creationTime: str
    languageCode: str
    title: str
    authors: list[Author]
    sourcePatientId: str | None = None
    hash: str | None = None
    size: int | None = None
    serviceStartTime: str | None = None
    serviceStopTime: str | None = None
    legalAuthenticator: Person | None = None
    eventCodeList: list[CodedValue] = field(default_factory=list)
    referenceIdList: list[str] = field(default_factory=list)
    comments: str | None = None
    availabilityStatus: str | None = None
    repositoryUniqueId: str | None = None
    logicalId: str | None = None
    version: str | None = None

    def to_element(self) -> etree._Element:
        """
        @return: the C{rim:ExtrinsicObject}, children in the order rim.xsd
            wants (slots, name, description, version, classifications,
            external identifiers).
        """
        attributes = {
            "id": self.entryUUID,
            "mimeType": self.mimeType,
            "objectType": DOCUMENT_ENTRY_OBJECT_TYPE,
        }
        if self.logicalId:
            attributes["lid"] = self.logicalId
        if self.availabilityStatus:
            attributes["status"] = self.availabilityStatus
        element = etree.Element(_rim("ExtrinsicObject"), attributes)
        for slot in self._slots():
            element.append(slot.to_element())
        _name(element, "Name", self.title)
        if self.comments:
            _name(element, "Description", self.comments)
        if self.version:
            etree.SubElement(element, _rim("VersionInfo"), versionName=self.version)

        ids = _Ids()
        me = self.entryUUID
        for author in self.authors:
            _classification(
                element,
                ident=ids(),
                scheme=DocumentEntryScheme.author,
                classified=me,
                node="",
                slots=author.slots(),
            )
        _coded(element, ids(), DocumentEntryScheme.classCode, me, self.classCode)
        for code in self.confidentialityCode:
            _coded(element, ids(), DocumentEntryScheme.confidentialityCode, me, code)
        for code in self.eventCodeList:
            _coded(element, ids(), DocumentEntryScheme.eventCodeList, me, code)
        _coded(element, ids(), DocumentEntryScheme.formatCode, me, self.formatCode)
        _coded(
            element,
            ids(),
            DocumentEntryScheme.healthcareFacilityTypeCode,
            me,
            self.healthcareFacilityTypeCode,
        )
        _coded(
            element,
            ids(),
            DocumentEntryScheme.practiceSettingCode,
            me,
            self.practiceSettingCode,
        )
        _coded(element, ids(), DocumentEntryScheme.typeCode, me, self.typeCode)
        _external_identifier(
            element,
            ident=ids(),
            scheme=DocumentEntryScheme.patientId,
            registry_object=me,
            value=str(self.patientId),
            name="XDSDocumentEntry.patientId",
        )
        _external_identifier(
            element,
            ident=ids(),
            scheme=DocumentEntryScheme.uniqueId,
            registry_object=me,
            value=self.uniqueId,
            name="XDSDocumentEntry.uniqueId",
        )
        return element

    def _slots(self) -> list[Slot]:
        slots = [Slot("creationTime", [self.creationTime])]
        if self.hash is not None:
            slots.append(Slot("hash", [self.hash]))
        slots.append(Slot("languageCode", [self.languageCode]))
        if self.legalAuthenticator is not None:
            slots.append(Slot("legalAuthenticator", [self.legalAuthenticator.to_xcn()]))
        if self.referenceIdList:
            slots.append(Slot(REFERENCE_ID_LIST_SLOT, list(self.referenceIdList)))
        if self.repositoryUniqueId:
            slots.append(Slot("repositoryUniqueId", [self.repositoryUniqueId]))
        if self.serviceStartTime:
            slots.append(Slot("serviceStartTime", [self.serviceStartTime]))
        if self.serviceStopTime:
            slots.append(Slot("serviceStopTime", [self.serviceStopTime]))
        if self.size is not None:
            slots.append(Slot("size", [str(self.size)]))
        source = self.sourcePatientId or str(self.patientId)
        slots.append(Slot("sourcePatientId", [source]))
        return slots

    @classmethod
    def from_element(cls, element: etree._Element) -> DocumentEntry:
        """
        Read a C{rim:ExtrinsicObject} of a query answer.

        @raise MetadataError: if a mandatory attribute is absent.
        """
        slots = _slot_map(element)
        classifications = _classifications(element)
        identifiers = _identifiers(element)
        me = element.get("id", "")

        def one_code(scheme: str, name: str) -> CodedValue:
            values = classifications.get(scheme)
            if not values:
                raise MetadataError(f"DocumentEntry {me} has no {name}")
            return values[0][0]

        def first(name: str) -> str | None:
            values = slots.get(name)
            return values[0] if values else None

        patient = identifiers.get(DocumentEntryScheme.patientId)
        unique = identifiers.get(DocumentEntryScheme.uniqueId)
        if patient is None or unique is None:
            raise MetadataError(f"DocumentEntry {me} has no patientId or uniqueId")
        authors = [
            Author.from_slots(author_slots)
            for _, author_slots in classifications.get(DocumentEntryScheme.author, [])
        ]
        size = first("size")
        legal = first("legalAuthenticator")
        version = element.find(_rim("VersionInfo"))
        return cls(
            entryUUID=me,
            uniqueId=unique,
            patientId=PatientId.parse(patient),
            mimeType=element.get("mimeType", ""),
            classCode=one_code(DocumentEntryScheme.classCode, "classCode"),
            typeCode=one_code(DocumentEntryScheme.typeCode, "typeCode"),
            formatCode=one_code(DocumentEntryScheme.formatCode, "formatCode"),
            confidentialityCode=[
                c
                for c, _ in classifications.get(
                    DocumentEntryScheme.confidentialityCode, []
                )
            ],
            healthcareFacilityTypeCode=one_code(
                DocumentEntryScheme.healthcareFacilityTypeCode,
                "healthcareFacilityTypeCode",
            ),
            practiceSettingCode=one_code(
                DocumentEntryScheme.practiceSettingCode, "practiceSettingCode"
            ),
            creationTime=first("creationTime") or "",
            languageCode=first("languageCode") or "",
            title=_localized(element, "Name") or "",
            authors=authors,
            sourcePatientId=first("sourcePatientId"),
            hash=first("hash"),
            size=int(size) if size is not None else None,
            serviceStartTime=first("serviceStartTime"),
            serviceStopTime=first("serviceStopTime"),
            legalAuthenticator=Person.from_xcn(legal) if legal else None,
            eventCodeList=[
                c for c, _ in classifications.get(DocumentEntryScheme.eventCodeList, [])
            ],
            referenceIdList=slots.get(REFERENCE_ID_LIST_SLOT, []),
            comments=_localized(element, "Description"),
            availabilityStatus=element.get("status"),
            repositoryUniqueId=first("repositoryUniqueId"),
            logicalId=element.get("lid"),
            version=version.get("versionName") if version is not None else None,
        )

    def as_dict(self) -> dict[str, object]:
        """
        @return: the metadata as JSON-ready values keyed by XDS attribute name.
        """
        return {
            "entryUUID": self.entryUUID,
            "uniqueId": self.uniqueId,
            "patientId": str(self.patientId),
            "sourcePatientId": self.sourcePatientId or str(self.patientId),
            "mimeType": self.mimeType,
            "title": self.title,
            "comments": self.comments,
            "creationTime": self.creationTime,
            "serviceStartTime": self.serviceStartTime,
            "serviceStopTime": self.serviceStopTime,
            "languageCode": self.languageCode,
            "classCode": self.classCode.as_dict(),
            "typeCode": self.typeCode.as_dict(),
            "formatCode": self.formatCode.as_dict(),
            "confidentialityCode": [c.as_dict() for c in self.confidentialityCode],
            "healthcareFacilityTypeCode": self.healthcareFacilityTypeCode.as_dict(),
            "practiceSettingCode": self.practiceSettingCode.as_dict(),
            "eventCodeList": [c.as_dict() for c in self.eventCodeList],
            "author": [a.as_dict() for a in self.authors],
            "authorPerson": [a.person.to_xcn() for a in self.authors if a.person],
            "legalAuthenticator": (
                self.legalAuthenticator.to_xcn() if self.legalAuthenticator else None
            ),
            "referenceIdList": list(self.referenceIdList),
            "hash": self.hash,
            "size": self.size,
            "availabilityStatus": self.availabilityStatus,
            "repositoryUniqueId": self.repositoryUniqueId,
        }


# XDSSubmissionSet ----------------------------------------------------------------
@dataclass
class SubmissionSet:
    """
    The XDS metadata of one submission (IHE ITI TF-3, section 4.2.3.3).
    """

    entryUUID: str
    uniqueId: str
    sourceId: str
    patientId: PatientId
    submissionTime: str
    contentTypeCode: CodedValue
    authors: list[Author]
    title: str | None = None
    comments: str | None = None

    def to_element(self) -> etree._Element:
        """
        @return: the C{rim:RegistryPackage}, classified as a submission set.
        """
        element = etree.Element(
            _rim("RegistryPackage"),
            id=self.entryUUID,
            objectType=REGISTRY_PACKAGE_OBJECT_TYPE,
        )
        element.append(Slot("submissionTime", [self.submissionTime]).to_element())
        if self.title:
            _name(element, "Name", self.title)
        if self.comments:
            _name(element, "Description", self.comments)
        ids = _Ids()
        me = self.entryUUID
        for author in self.authors:
            _classification(
                element,
                ident=ids(),
                scheme=SubmissionSetScheme.author,
                classified=me,
                node="",
                slots=author.slots(),
            )
        _coded(
            element,
            ids(),
            SubmissionSetScheme.contentTypeCode,
            me,
            self.contentTypeCode,
        )
        etree.SubElement(
            element,
            _rim("Classification"),
            id=ids(),
            objectType=CLASSIFICATION_OBJECT_TYPE,
            classifiedObject=me,
            classificationNode=SUBMISSION_SET_NODE,
        )
        for scheme, value, name in [
            (SubmissionSetScheme.patientId, str(self.patientId), "patientId"),
            (SubmissionSetScheme.sourceId, self.sourceId, "sourceId"),
            (SubmissionSetScheme.uniqueId, self.uniqueId, "uniqueId"),
        ]:
            _external_identifier(
                element,
                ident=ids(),
                scheme=scheme,
                registry_object=me,
                value=value,
                name=f"XDSSubmissionSet.{name}",
            )
        return element

    @classmethod
    def from_element(cls, element: etree._Element) -> SubmissionSet:
        """
        Read a C{rim:RegistryPackage} classified as a submission set.

        @raise MetadataError: a mandatory attribute is absent.
        """
        me = element.get("id", "")
        slots = _slot_map(element)
        classifications = _classifications(element)
        identifiers = _identifiers(element)
        content = classifications.get(SubmissionSetScheme.contentTypeCode)
        patient = identifiers.get(SubmissionSetScheme.patientId)
        unique = identifiers.get(SubmissionSetScheme.uniqueId)
        source = identifiers.get(SubmissionSetScheme.sourceId)
        times = slots.get("submissionTime")
        if not (content and patient and unique and source and times):
            raise MetadataError(
                f"SubmissionSet {me} lacks contentTypeCode, patientId, uniqueId, "
                "sourceId or submissionTime"
            )
        return cls(
            entryUUID=me,
            uniqueId=unique,
            sourceId=source,
            patientId=PatientId.parse(patient),
            submissionTime=times[0],
            contentTypeCode=content[0][0],
            authors=[
                Author.from_slots(author_slots)
                for _, author_slots in classifications.get(
                    SubmissionSetScheme.author, []
                )
            ],
            title=_localized(element, "Name"),
            comments=_localized(element, "Description"),
        )


# Associations ---------------------------------------------------------------------
@dataclass
class Association:
    """
    A typed link between two registry objects, with its slots.
    """

    associationType: str
    sourceObject: str
    targetObject: str
    slots: list[Slot] = field(default_factory=list)
    id: str = field(default_factory=new_entry_uuid)

    def to_element(self) -> etree._Element:
        element = etree.Element(
            _rim("Association"),
            id=self.id,
            objectType=ASSOCIATION_OBJECT_TYPE,
            associationType=self.associationType,
            sourceObject=self.sourceObject,
            targetObject=self.targetObject,
        )
        for slot in self.slots:
            element.append(slot.to_element())
        return element

    @classmethod
    def from_element(cls, element: etree._Element) -> Association:
        """
        Read a C{rim:Association}.
        """
        return cls(
            associationType=element.get("associationType", ""),
            sourceObject=element.get("sourceObject", ""),
            targetObject=element.get("targetObject", ""),
            slots=[Slot(name, values) for name, values in _slot_map(element).items()],
            id=element.get("id", ""),
        )

    def slot(self, name: str) -> str | None:
        """
        @return: the first value of the slot C{name}, if any.
        """
        for slot in self.slots:
            if slot.name == name and slot.values:
                return slot.values[0].strip()
        return None

    @classmethod
    def has_member(cls, submission_set: str, target: str, **slots: str) -> Association:
        """
        @return: the HasMember association from a submission set to a new
            document entry (status Original) or to an existing one.
        """
        slot_list = [Slot(name, [value]) for name, value in slots.items()]
        if not slot_list:
            slot_list = [Slot("SubmissionSetStatus", ["Original"])]
        return cls(AssociationType.HasMember, submission_set, target, slot_list)


# Reading helpers --------------------------------------------------------------------
def _slot_map(element: etree._Element) -> dict[str, list[str]]:
    slots: dict[str, list[str]] = {}
    for slot in element.findall(_rim("Slot")):
        values = [
            v.text or "" for v in slot.iterfind(f"{_rim('ValueList')}/{_rim('Value')}")
        ]
        slots.setdefault(slot.get("name", ""), []).extend(values)
    return slots


def _localized(element: etree._Element, tag: str) -> str | None:
    string = element.find(f"{_rim(tag)}/{_rim('LocalizedString')}")
    return string.get("value") if string is not None else None


def _classifications(
    element: etree._Element,
) -> dict[str, list[tuple[CodedValue, dict[str, list[str]]]]]:
    found: dict[str, list[tuple[CodedValue, dict[str, list[str]]]]] = {}
    for classification in element.findall(_rim("Classification")):
        scheme = classification.get("classificationScheme")
        if scheme is None:
            continue
        slots = _slot_map(classification)
        coding = slots.get("codingScheme", [""])
        code = CodedValue(
            classification.get("nodeRepresentation", ""),
            coding[0] if coding else "",
            _localized(classification, "Name") or "",
        )
        found.setdefault(scheme, []).append((code, slots))
    return found


def _identifiers(element: etree._Element) -> dict[str, str]:
    return {
        identifier.get("identificationScheme", ""): identifier.get("value", "")
        for identifier in element.findall(_rim("ExternalIdentifier"))
    }


def registry_object_list(objects: Iterable[etree._Element]) -> etree._Element:
    """
    @return: a C{rim:RegistryObjectList} holding C{objects}.
    """
    holder = etree.Element(_rim("RegistryObjectList"), nsmap={"rim": RIM})
    for item in objects:
        holder.append(item)
    return holder
