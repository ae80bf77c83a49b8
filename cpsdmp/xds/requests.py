"""
Reading the requests of the DMP transactions, as the DMP would: the
submission in a TD2.1 or TD3.3 (submission set, document entries,
associations, documents), the stored query of a TD3.1, the documents asked
for in a TD3.2, the patient of a TD0.2. The sandbox DMP serves them with
these readers; the tests read the official examples with them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lxml import etree

from cpsdmp.protocols.soap import SoapResponse
from cpsdmp.xds.ebrim import (
    LCM,
    QUERY,
    RIM,
    XDSB,
    Association,
    DocumentEntry,
    MetadataError,
    PatientId,
    SubmissionSet,
)

HL7 = "urn:hl7-org:v3"


@dataclass
class SubmittedObjects:
    """
    The registry objects of a SubmitObjectsRequest.
    """

    submission_set: SubmissionSet
    entries: list[DocumentEntry] = field(default_factory=list)
    associations: list[Association] = field(default_factory=list)


def read_submit_objects(request: etree._Element) -> SubmittedObjects:
    """
    @param request: an C{lcm:SubmitObjectsRequest}.
    @raise MetadataError: no submission set, or a malformed object.
    """
    objects = request.find(f"{{{RIM}}}RegistryObjectList")
    if request.tag != f"{{{LCM}}}SubmitObjectsRequest" or objects is None:
        raise MetadataError("not a SubmitObjectsRequest with a RegistryObjectList")
    packages = objects.findall(f"{{{RIM}}}RegistryPackage")
    if len(packages) != 1:
        raise MetadataError(
            f"{len(packages)} RegistryPackages; one submission set expected"
        )
    return SubmittedObjects(
        submission_set=SubmissionSet.from_element(packages[0]),
        entries=[
            DocumentEntry.from_element(e)
            for e in objects.iterfind(f"{{{RIM}}}ExtrinsicObject")
        ],
        associations=[
            Association.from_element(a)
            for a in objects.iterfind(f"{{{RIM}}}Association")
        ],
    )


def read_provide_and_register(
    message: SoapResponse,
) -> tuple[SubmittedObjects, dict[str, memoryview]]:
    """
    @return: the submitted objects and each document's bytes by entryUUID.
    @raise MetadataError: a document without entry, or an entry without
        document.
    """
    body = message.body
    if body.tag != f"{{{XDSB}}}ProvideAndRegisterDocumentSetRequest":
        raise MetadataError(f"not a ProvideAndRegisterDocumentSetRequest: {body.tag}")
    submitted = read_submit_objects(body.find(f"{{{LCM}}}SubmitObjectsRequest"))
    documents = {
        holder.get("id", ""): message.binary(holder)
        for holder in body.iterfind(f"{{{XDSB}}}Document")
    }
    entries = {e.entryUUID for e in submitted.entries}
    if set(documents) != entries:
        raise MetadataError(
            "documents and DocumentEntries do not match: "
            f"{sorted(set(documents) ^ entries)}"
        )
    return submitted, documents


@dataclass
class StoredQuery:
    """
    A stored query: its id and its parameters, values unparsed (a quoted
    string, a list in parentheses, or a number).
    """

    query_id: str
    return_type: str
    parameters: dict[str, list[str]]

    def values(self, name: str) -> list[str]:
        """
        @return: the parameter's values with the quotes and parentheses of
            the stored-query syntax removed.
        """
        result = []
        for raw in self.parameters.get(name, []):
            text = raw.strip()
            if text.startswith("(") and text.endswith(")"):
                text = text[1:-1]
            for item in _split_quoted(text):
                result.append(item)
        return result


def _split_quoted(text: str) -> list[str]:
    items, current, quoted, index = [], "", False, 0
    while index < len(text):
        char = text[index]
        if char == "'":
            if quoted and text[index + 1 : index + 2] == "'":
                current += "'"
                index += 1
            else:
                quoted = not quoted
        elif char == "," and not quoted:
            items.append(current.strip())
            current = ""
        else:
            current += char
        index += 1
    if current.strip():
        items.append(current.strip())
    return items


def read_adhoc_query(request: etree._Element) -> StoredQuery:
    """
    @param request: a C{query:AdhocQueryRequest}.
    """
    query = request.find(f"{{{RIM}}}AdhocQuery")
    if request.tag != f"{{{QUERY}}}AdhocQueryRequest" or query is None:
        raise MetadataError("not an AdhocQueryRequest")
    option = request.find(f"{{{QUERY}}}ResponseOption")
    parameters: dict[str, list[str]] = {}
    for slot in query.iterfind(f"{{{RIM}}}Slot"):
        parameters.setdefault(slot.get("name", ""), []).extend(
            (v.text or "") for v in slot.iterfind(f"{{{RIM}}}ValueList/{{{RIM}}}Value")
        )
    return StoredQuery(
        query.get("id", ""),
        option.get("returnType", "ObjectRef") if option is not None else "ObjectRef",
        parameters,
    )


def read_retrieve_request(request: etree._Element) -> list[tuple[str, str]]:
    """
    @return: (repositoryUniqueId, documentUniqueId) of each document asked.
    """
    if request.tag != f"{{{XDSB}}}RetrieveDocumentSetRequest":
        raise MetadataError("not a RetrieveDocumentSetRequest")
    return [
        (
            (item.findtext(f"{{{XDSB}}}RepositoryUniqueId") or "").strip(),
            (item.findtext(f"{{{XDSB}}}DocumentUniqueId") or "").strip(),
        )
        for item in request.iterfind(f"{{{XDSB}}}DocumentRequest")
    ]


def read_existence_request(request: etree._Element) -> PatientId:
    """
    @return: the patient a TD0.2 asks about.
    """
    value = request.find(
        f"{{{HL7}}}controlActProcess/{{{HL7}}}queryByParameter/"
        f"{{{HL7}}}parameterList/{{{HL7}}}patientIdentifier/{{{HL7}}}value"
    )
    if request.tag != f"{{{HL7}}}PRPA_IN201307UV02" or value is None:
        raise MetadataError("not a PRPA_IN201307UV02 with a patient identifier")
    return PatientId(value.get("extension", ""), value.get("root", ""))
