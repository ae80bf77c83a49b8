"""
Reading XML that comes from outside: DMP answers, CDA documents, example
messages. Every parse in cpsdmp goes through here so that no entity is ever
expanded, no DTD or network resource is ever loaded, and a document type
declaration (the vehicle of XXE and "billion laughs" payloads) is refused
outright: neither SOAP 1.2 nor a CDA document needs one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from lxml import etree

#: Largest XML text we accept in one piece (SOAP envelope, CDA header).
DEFAULT_MAX_BYTES = 32 * 1024 * 1024


class XmlRefused(ValueError):
    """
    The XML was not parsed because it is unsafe, malformed or too large.
    """


def _parser_options() -> dict[str, bool]:
    return {
        "resolve_entities": False,
        "no_network": True,
        "load_dtd": False,
        "dtd_validation": False,
        "huge_tree": False,
        "remove_comments": False,
    }


def make_parser(encoding: str | None = None) -> etree.XMLParser:
    """
    @return: an lxml parser with entity expansion, DTD loading and network
        access switched off, for the rare caller that needs one directly.
    """
    return etree.XMLParser(encoding=encoding, **_parser_options())


def _prolog_declares_doctype(data: bytes) -> bool:
    # Walk the prolog (declarations, comments, processing instructions) up
    # to the root element's start tag, looking for a DOCTYPE.
    position = 0
    while True:
        position = data.find(b"<", position)
        if position < 0:
            return False
        if data.startswith(b"<?", position):
            position = data.find(b"?>", position)
        elif data.startswith(b"<!--", position):
            position = data.find(b"-->", position)
        elif data.startswith(b"<!DOCTYPE", position):
            return True
        else:
            return False
        if position < 0:
            return False


def _refuse_doctype(tree: etree._ElementTree, what: str) -> None:
    docinfo = tree.docinfo
    if docinfo.doctype or docinfo.internalDTD is not None:
        _doctype_refused(what)


def _doctype_refused(what: str) -> None:
    raise XmlRefused(
        f"{what}: a document type declaration (DOCTYPE) is not accepted; "
        "it can carry external or recursive entities"
    )


#: The limits libxml2 keeps without its huge-tree option, which stays off:
#: how it words each one, and how we do.
_LIMITS = (
    ("Excessive depth in document", "elements nested more than 256 deep"),
    ("Text node too long", "a text of more than 10000000 characters"),
    (
        "Buffer size limit exceeded",
        "an attribute value, a comment or another single piece of more than "
        "10000000 characters",
    ),
    ("Name too long", "a name of more than 50000 characters"),
)
_LIMIT_ERRORS = (
    etree.ErrorTypes.ERR_RESOURCE_LIMIT,
    etree.ErrorTypes.ERR_NAME_TOO_LONG,
)


_LXML_SOURCE = re.compile(r" \(<string>, line \d+\)$")


def _syntax_refused(what: str, error: etree.XMLSyntaxError) -> XmlRefused:
    """
    @return: the refusal of a document lxml could not parse: not
        well-formed, or past one of the parser's limits, said in our words
        rather than libxml2's, whose advice to switch its huge-tree option
        on is not for the sender of a document to follow.
    """
    message = error.msg or str(error)
    if error.code not in _LIMIT_ERRORS and "XML_PARSE_HUGE" not in message:
        # libxml2 ends some messages with a newline, mid-sentence in lxml's
        # text: an error is said in one line.
        said = " ".join(str(error).split()).replace(" ,", ",")
        said = _LXML_SOURCE.sub("", said)  # "(<string>, line 2)" says it again
        return XmlRefused(f"{what} is not well-formed XML: {said}")
    reason = "a resource limit"
    for words, ours in _LIMITS:
        if words in message:
            reason = ours
            break
    line, column = error.position
    return XmlRefused(
        f"{what} exceeds the XML parser's limits: {reason} (line {line}, "
        f"column {column}); it is not read past them"
    )


def parse_xml(
    data: bytes,
    *,
    what: str = "XML",
    max_bytes: int = DEFAULT_MAX_BYTES,
    encoding: str | None = None,
) -> etree._Element:
    """
    Parse C{data} safely.

    @param what: names the document in error messages ("DMP answer", ...).
    @param encoding: forces an encoding when the document does not declare
        the one it uses (the official VIHF samples are ISO-8859-1 without a
        declaration).
    @return: the root element.
    @raise XmlRefused: too large, not well-formed, or with a DOCTYPE.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError("parse_xml wants bytes")
    if len(data) > max_bytes:
        raise XmlRefused(
            f"{what}: {len(data)} bytes is more than the {max_bytes} accepted"
        )
    data = bytes(data)
    if _prolog_declares_doctype(data[:65536]):
        _doctype_refused(what)
    try:
        root = etree.fromstring(data, make_parser(encoding))
    except etree.XMLSyntaxError as error:
        raise _syntax_refused(what, error) from None
    if root is None:
        raise XmlRefused(f"{what} is empty")
    _refuse_doctype(root.getroottree(), what)
    return root


def iter_events(
    chunks: Iterable[bytes],
    *,
    what: str = "XML",
    max_bytes: int = DEFAULT_MAX_BYTES,
    events: tuple[str, ...] = ("start", "end"),
) -> Iterator[tuple[str, etree._Element]]:
    """
    Parse a document incrementally from byte chunks, yielding lxml events.

    The caller stops iterating when it has what it needs, so that only the
    part read so far is ever held in memory; C{max_bytes} bounds how much may
    be fed before the caller stops.

    @raise XmlRefused: as L{parse_xml}.
    """
    parser = etree.XMLPullParser(events=events, **_parser_options())
    fed = 0
    checked = False
    try:
        for chunk in chunks:
            fed += len(chunk)
            if fed > max_bytes:
                raise XmlRefused(
                    f"{what}: more than {max_bytes} bytes read before the "
                    "needed part ended"
                )
            if not fed - len(chunk) and _prolog_declares_doctype(chunk):
                _doctype_refused(what)
            parser.feed(chunk)
            for event, element in parser.read_events():
                if not checked:
                    _refuse_doctype(element.getroottree(), what)
                    checked = True
                yield event, element
        parser.close()
        for event, element in parser.read_events():
            yield event, element
    except etree.XMLSyntaxError as error:
        raise _syntax_refused(what, error) from None


def chunked(data: bytes | memoryview, size: int = 64 * 1024) -> Iterator[bytes]:
    """
    @return: C{data} cut into slices of C{size} bytes, without copying more
        than one slice at a time.
    """
    view = memoryview(data)
    for start in range(0, len(view), size):
        yield bytes(view[start : start + size])
