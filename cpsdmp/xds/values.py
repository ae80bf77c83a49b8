"""
The checks a DocumentEntry's values must pass before they go to the DMP,
shared by what makes the metadata (the CDA reading, the overrides a caller
gives, the facade's search values) and by the local DMP, which refuses what
the real one refuses: XDS times that are real dates in the DTM format, a
start of service not after its end, texts and codes within what the ebRIM
schema lets the registry store, a classCode of the TRE_A03 table, and a
uniqueId as XDS writes it (which the agent also holds a signature's
manifest to).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime

from cpsdmp.xds.ebrim import (
    MAX_OID,
    CodedValue,
    DocumentEntry,
    MetadataError,
    is_oid,
)

#: TRE_A03 document classes (XDS classCode).
CLASS_CODE_SYSTEM = "1.2.250.1.213.1.1.4.1"

#: The classes of TRE_A03-ClasseDocument (NOS, version of 2023-12-15) and
#: their display names, for a classCode given by its code alone.
CLASS_DISPLAYS = {
    "10": "Compte rendu",
    "11": "Synthèse",
    "31": "Imagerie médicale",
    "42": "Prescription",
    "43": "Dispensation",
    "44": "Plan de soins, protocole de soins",
    "45": "Traitement administré",
    "52": "Certificat, déclaration",
    "60": "Données de remboursement",
    "90": "Autres documents déposés par le patient",
    "95": "Document de gestion",
    "99": "Document technique",
}

#: ebRIM 3.0 (rim.xsd): a LocalizedString (a title, a comment, a code's
#: display name) is a FreeFormText of at most 1024 characters; a code
#: (nodeRepresentation) and a slot value are LongNames of at most 256.
MAX_FREE_TEXT = 1024
MAX_LONG_NAME = 256

#: The XDS DTM: YYYY[MM[DD[hh[mm[ss]]]]], in UTC (IHE ITI TF-3, 4.2.3.1.4).
DTM_PATTERN = "^[0-9]{4}([0-9]{2}){0,5}$"
_DTM = re.compile(DTM_PATTERN)
#: What XML 1.0 cannot carry (its Char production).
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
#: A language tag (RFC 5646), as the CDA's languageCode gives it: fr-FR.
_LANGUAGE = re.compile(r"[A-Za-z]{2,8}(?:-[A-Za-z0-9]{1,8})*")


#: A uniqueId as XDS writes it (IHE ITI TF-3, 4.2.3.2.26 and 4.2.3.3.12):
#: an OID of at most 64 characters; a document's may also be the
#: root^extension of a CDA id, the extension at most 16 characters.
MAX_EXTENSION = 16


def _shown(value: str, longest: int = 40) -> str:
    return (
        repr(value)
        if len(value) <= longest
        else repr(value[:longest]) + (f"... ({len(value)} characters)")
    )


def is_unique_id(
    value: str, *, document: bool, longest_extension: int = MAX_EXTENSION
) -> bool:
    """
    @param longest_extension: the longest extension taken.
    @return: whether C{value} is a submission set's uniqueId (an OID of at
        most 64 characters) or, when C{document}, a document's (the same,
        or OID^extension with an extension of 1 to 16 characters, printable
        and without spaces, so that XML can carry it).
    """
    root, caret, extension = value.partition("^")
    if caret and not (
        document
        and 0 < len(extension) <= longest_extension
        and extension.isprintable()
        and not any(c.isspace() or c == "^" for c in extension)
    ):
        return False
    return is_oid(root)


def check_unique_id(value: str) -> str:
    """
    @return: C{value}, a document's uniqueId as XDS takes it
        (L{is_unique_id}), the rule the agent holds the manifest of a
        submission-set signature to.
    @raise MetadataError: saying the rule, and the length of the OID or of
        the extension when it is over.
    """
    if is_unique_id(value, document=True):
        return value
    root, _, extension = value.partition("^")
    longer = ""
    if len(root) > MAX_OID:
        longer = f" (its OID has {len(root)})"
    elif len(extension) > MAX_EXTENSION:
        longer = f" (its extension has {len(extension)})"
    raise MetadataError(
        f"uniqueId {_shown(value, 100)} is not a document uniqueId as XDS takes "
        f"it: an OID of at most {MAX_OID} characters, or the root^extension of "
        f"the CDA's id, the root such an OID and the extension at most "
        f"{MAX_EXTENSION} characters, without spaces{longer}"
    )


def check_asked_unique_id(value: str, what: str, longest: int) -> str:
    """
    Check a document's uniqueId a caller asks the DMP about (to find,
    retrieve or update it): an OID, or OID^extension, of at most
    C{longest} characters. The extension may be longer than what a
    submission takes (L{check_unique_id}): the DMP may hold documents
    other software stored so.

    @param what: the member that gave it, for the message.
    @return: C{value}.
    @raise MetadataError: naming C{what}, before the value goes into XML,
        which cannot carry a control character or a lone surrogate.
    """
    if len(value) <= longest and is_unique_id(
        value, document=True, longest_extension=longest
    ):
        return value
    raise MetadataError(
        f"{what} {_shown(value)} is not a uniqueId: an OID (digits and dots, "
        f"such as 1.2.250.1.213.1.1.9) or an OID^extension, the extension "
        f"printable characters without spaces, at most {longest} characters in all"
    )


def check_dtm(value: str, what: str) -> str:
    """
    @param what: the value's name, for the message.
    @return: C{value}, an XDS time: 4 to 14 digits (year, then month, day,
        hour, minute and second, each optional after the one before), and a
        real date and time.
    @raise MetadataError: saying which it is not.
    """
    if not _DTM.fullmatch(value):
        raise MetadataError(
            f"{what} {_shown(value)} is not an XDS time: YYYY[MM[DD[hh[mm[ss]]]]], "
            "digits only, in UTC"
        )
    # A missing month or day is checked as the first of it.
    padded = value + "0101000000"[len(value) - 4 :]
    month, day, hour, minute, second = (int(padded[i : i + 2]) for i in range(4, 14, 2))
    try:
        datetime(int(padded[:4]), month, day, hour, minute, second)
    except ValueError:
        raise MetadataError(
            f"{what} {_shown(value)} is not a real date and time"
        ) from None
    return value


def check_time_order(
    start: str | None, stop: str | None, start_name: str, stop_name: str
) -> None:
    """
    Refuse a start after a stop, the two compared at the precision they
    share (2024 is not after 20240105).

    @raise MetadataError: naming both.
    """
    if start is None or stop is None:
        return
    shared = min(len(start), len(stop))
    if start[:shared] > stop[:shared]:
        raise MetadataError(f"{start_name} {start} is after {stop_name} {stop}")


def check_text(
    value: str, what: str, longest: int = MAX_FREE_TEXT, empty: bool = False
) -> str:
    """
    @return: C{value}, a text XML can carry, of at most C{longest}
        characters, and not empty unless C{empty}.
    @raise MetadataError: naming C{what}.
    """
    if not value and not empty:
        raise MetadataError(f"{what} is empty")
    if len(value) > longest:
        raise MetadataError(
            f"{what} is {len(value)} characters long: at most {longest} are stored"
        )
    bad = _NOT_XML.search(value)
    if bad is not None:
        raise MetadataError(
            f"{what} has a character XML cannot carry (U+{ord(bad.group()):04X})"
        )
    return value


def check_code(code: CodedValue, what: str) -> CodedValue:
    """
    @return: C{code}, its code and scheme not empty and within the
        registry's LongName, its display name within FreeFormText; a
        classCode must be one of TRE_A03's (L{check_class_code}).
    @raise MetadataError: naming C{what}.
    """
    check_text(code.code, f"{what} code", MAX_LONG_NAME)
    check_text(code.scheme, f"{what} codingScheme", MAX_LONG_NAME)
    check_text(code.display, f"{what} display", MAX_FREE_TEXT, empty=True)
    return code


def check_class_code(code: CodedValue) -> CodedValue:
    """
    @return: C{code}, which, in the TRE_A03 system (the documents' classes),
        is one of its codes. Another system is left alone: the submission
        set's signature is of IHE DSG's class, in the URN system.
    @raise MetadataError: saying the codes there are.
    """
    check_code(code, "classCode")
    if code.scheme == CLASS_CODE_SYSTEM and code.code not in CLASS_DISPLAYS:
        known = ", ".join(f"{c} ({d})" for c, d in CLASS_DISPLAYS.items())
        raise MetadataError(
            f"classCode {_shown(code.code)} is not a class of TRE_A03 "
            f"({CLASS_CODE_SYSTEM}): one of {known}"
        )
    return code


def check_value(name: str, value: object) -> None:
    """
    Check one DocumentEntry attribute, as an override gives it.

    @param name: the XDS attribute name.
    @raise MetadataError: naming it.
    """
    if name in ("creationTime", "serviceStartTime", "serviceStopTime"):
        if not isinstance(value, str):
            raise MetadataError(f"{name} must be an XDS time")
        check_dtm(value, name)
    elif name == "title":
        check_text(_string(value, name), name)
    elif name == "comments":
        check_text(_string(value, name), name, empty=True)
    elif name == "languageCode":
        if not _LANGUAGE.fullmatch(_string(value, name)) or len(str(value)) > 64:
            raise MetadataError(
                f"{name} {_shown(str(value))} is not a language tag such as fr-FR"
            )
    elif name == "classCode":
        if not isinstance(value, CodedValue):
            raise MetadataError(f"{name} must be a code")
        check_class_code(value)
    elif isinstance(value, CodedValue):
        check_code(value, name)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if isinstance(item, CodedValue):
                check_code(item, f"{name}[{index}]")


def _string(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise MetadataError(f"{name} must be text")
    return value


def check_overrides(overrides: Mapping[str, object]) -> None:
    """
    Check the values a caller gives instead of the CDA's, each alone and
    the times together.

    @raise MetadataError: naming the attribute.
    """
    for name, value in overrides.items():
        check_value(name, value)
    start, stop = overrides.get("serviceStartTime"), overrides.get("serviceStopTime")
    if isinstance(start, str) and isinstance(stop, str):
        check_time_order(start, stop, "serviceStartTime", "serviceStopTime")


def check_entry(entry: DocumentEntry) -> DocumentEntry:
    """
    Check the values of a DocumentEntry the DMP would refuse: its times,
    texts, language, codes and uniqueId.

    @return: C{entry}.
    @raise MetadataError: naming the first attribute that fails.
    """
    check_dtm(entry.creationTime, "creationTime")
    for name in ("serviceStartTime", "serviceStopTime"):
        value = getattr(entry, name)
        if value is not None:
            check_dtm(value, name)
    check_time_order(
        entry.serviceStartTime,
        entry.serviceStopTime,
        "serviceStartTime",
        "serviceStopTime",
    )
    check_value("title", entry.title)
    if entry.comments is not None:
        check_value("comments", entry.comments)
    check_value("languageCode", entry.languageCode)
    check_class_code(entry.classCode)
    for name in (
        "typeCode",
        "formatCode",
        "healthcareFacilityTypeCode",
        "practiceSettingCode",
        "confidentialityCode",
        "eventCodeList",
    ):
        check_value(name, getattr(entry, name))
    check_unique_id(entry.uniqueId)
    return entry
