"""
SOAP 1.2 messages with WS-Addressing headers, and their MTOM/XOP packaging
(a C{multipart/related} body whose binary parts are referenced from the XML
by C{xop:Include}), in both directions.

Binary content is never base64-encoded: an attachment is kept as the
caller's own bytes (or a memoryview of them) and written out as a slice of
the output, so building or reading a message costs no copy of a large
document beyond the one the caller already holds. This module knows nothing
of what the messages mean.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast
from urllib.parse import quote, unquote

from lxml import etree
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from cpsdmp.protocols.multipart import (
    MultipartError,
    content_type_params,
    split_parts,
)
from cpsdmp.protocols.safexml import DEFAULT_MAX_BYTES, XmlRefused, parse_xml

SOAP12 = "http://www.w3.org/2003/05/soap-envelope"
WSA = "http://www.w3.org/2005/08/addressing"
XOP = "http://www.w3.org/2004/08/xop/include"
WSA_ANONYMOUS = "http://www.w3.org/2005/08/addressing/anonymous"
SOAP12_MEDIA_TYPE = "application/soap+xml"
XOP_MEDIA_TYPE = "application/xop+xml"

_CRLF = b"\r\n"


class SoapError(Exception):
    """
    A SOAP message could not be built or read.
    """


@dataclass
class SoapFault(SoapError):
    """
    The peer answered with a SOAP 1.2 Fault.

    @ivar code: the fault code's value (C{soap:Sender}, C{soap:Receiver}...).
    @ivar subcodes: the subcode values, outermost first.
    @ivar reason: the first reason text.
    @ivar detail: the detail element's text content, if any.
    """

    code: str
    subcodes: list[str]
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        codes = " / ".join([self.code, *self.subcodes])
        text = f"SOAP fault {codes}: {self.reason}"
        return f"{text} ({self.detail})" if self.detail else text


# Building -------------------------------------------------------------------
@dataclass(frozen=True)
class Addressing:
    """
    The WS-Addressing headers of a message: a request has a ReplyTo, an
    answer a RelatesTo naming the request's MessageID.
    """

    action: str
    to: str = WSA_ANONYMOUS
    message_id: str = field(default_factory=lambda: uuid.uuid4().urn)
    reply_to: str | None = WSA_ANONYMOUS
    relates_to: str | None = None

    @classmethod
    def answer(cls, action: str, request_id: str | None) -> Addressing:
        """
        @return: the headers of an answer to the request C{request_id}.
        """
        return cls(action, reply_to=None, relates_to=request_id)


def envelope(
    body: etree._Element,
    addressing: Addressing,
    header_blocks: Sequence[etree._Element] = (),
) -> etree._Element:
    """
    Wrap C{body} in a SOAP 1.2 envelope.

    @param header_blocks: further header blocks (a C{wsse:Security}...),
        placed after the addressing headers.
    @return: the C{soap:Envelope} element.
    """
    root = etree.Element(f"{{{SOAP12}}}Envelope", nsmap={"soap": SOAP12, "wsa": WSA})
    header = etree.SubElement(root, f"{{{SOAP12}}}Header")
    must = {f"{{{SOAP12}}}mustUnderstand": "true"}

    etree.SubElement(header, f"{{{WSA}}}Action", must).text = addressing.action
    etree.SubElement(header, f"{{{WSA}}}MessageID").text = addressing.message_id
    etree.SubElement(header, f"{{{WSA}}}To", must).text = addressing.to
    if addressing.reply_to is not None:
        reply_to = etree.SubElement(header, f"{{{WSA}}}ReplyTo")
        etree.SubElement(reply_to, f"{{{WSA}}}Address").text = addressing.reply_to
    if addressing.relates_to is not None:
        etree.SubElement(header, f"{{{WSA}}}RelatesTo").text = addressing.relates_to
    for block in header_blocks:
        header.append(block)

    etree.SubElement(root, f"{{{SOAP12}}}Body").append(body)
    return root


def xop_include(parent: etree._Element, content_id: str) -> None:
    """
    Make C{parent}'s content the binary part C{content_id}.
    """
    etree.SubElement(
        parent,
        f"{{{XOP}}}Include",
        href="cid:" + quote(content_id, safe="@.-_"),
        nsmap={"xop": XOP},
    )


@dataclass
class Attachment:
    """
    A binary part: its Content-ID (without angle brackets) and its bytes.
    """

    content_id: str
    data: bytes | memoryview
    content_type: str = "application/octet-stream"


@dataclass
class MtomMessage:
    """
    A SOAP envelope and the binary parts its C{xop:Include}s name, ready to
    be written as a C{multipart/related} body.
    """

    envelope: etree._Element
    attachments: list[Attachment]
    action: str
    boundary: str = field(default_factory=lambda: f"MIMEBoundary_{uuid.uuid4().hex}")
    root_id: str = field(default_factory=lambda: f"root.{uuid.uuid4().hex}@cpsdmp")

    def __post_init__(self) -> None:
        marker = self.boundary.encode("ascii")
        for attachment in self.attachments:
            if isinstance(attachment.data, bytes) and marker in attachment.data:
                raise SoapError("the MIME boundary occurs in an attachment")

    @property
    def content_type(self) -> str:
        """
        The HTTP Content-Type of the whole body (SOAP 1.2 binding of MTOM).
        """
        return (
            f'multipart/related; type="{XOP_MEDIA_TYPE}"; '
            f'boundary="{self.boundary}"; start="<{self.root_id}>"; '
            f'start-info="{SOAP12_MEDIA_TYPE}"; action="{self.action}"'
        )

    def parts(self) -> Iterator[bytes | memoryview]:
        """
        @return: the body as a sequence of byte strings; attachments are
            yielded as the caller's own objects, not copies.
        """
        delimiter = b"--" + self.boundary.encode("ascii")
        yield delimiter + _CRLF
        yield _headers(
            [
                (
                    "Content-Type",
                    f'{XOP_MEDIA_TYPE}; charset=UTF-8; type="{SOAP12_MEDIA_TYPE}"; '
                    f'action="{self.action}"',
                ),
                ("Content-Transfer-Encoding", "binary"),
                ("Content-ID", f"<{self.root_id}>"),
            ]
        )
        yield etree.tostring(self.envelope, encoding="UTF-8", xml_declaration=True)
        for attachment in self.attachments:
            yield _CRLF + delimiter + _CRLF
            yield _headers(
                [
                    ("Content-Type", attachment.content_type),
                    ("Content-Transfer-Encoding", "binary"),
                    ("Content-ID", f"<{attachment.content_id}>"),
                ]
            )
            yield attachment.data
        yield _CRLF + delimiter + b"--" + _CRLF

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts())


def _headers(headers: list[tuple[str, str]]) -> bytes:
    return b"".join(f"{k}: {v}".encode() + _CRLF for k, v in headers) + _CRLF


def plain_message(root: etree._Element) -> bytes:
    """
    @return: a SOAP envelope serialised for a C{application/soap+xml} body.
    """
    result: bytes = etree.tostring(root, encoding="UTF-8", xml_declaration=True)
    return result


def plain_content_type(action: str) -> str:
    return f'{SOAP12_MEDIA_TYPE}; charset=UTF-8; action="{action}"'


# Reading --------------------------------------------------------------------
@dataclass
class SoapResponse:
    """
    A received SOAP message: the parsed envelope and, for MTOM, the binary
    parts by Content-ID (views into the received body, not copies).
    """

    envelope: etree._Element
    attachments: dict[str, memoryview] = field(default_factory=dict)

    @property
    def header(self) -> etree._Element | None:
        return self.envelope.find(f"{{{SOAP12}}}Header")

    @property
    def body(self) -> etree._Element:
        body = self.envelope.find(f"{{{SOAP12}}}Body")
        if body is None or len(body) == 0:
            raise SoapError("the SOAP envelope has no Body content")
        child: etree._Element = body[0]
        return child

    def addressing(self, name: str) -> str | None:
        """
        @return: the text of the WS-Addressing header C{name} (C{Action},
            C{RelatesTo}...), if present.
        """
        header = self.header
        if header is None:
            return None
        value = header.findtext(f"{{{WSA}}}{name}")
        return value.strip() if value is not None else None

    def binary(self, holder: etree._Element) -> memoryview:
        """
        @return: the bytes of the element C{holder}, whether it names a
            binary part through C{xop:Include} or holds base64 inline.
        @raise SoapError: the named part is missing.
        """
        include = holder.find(f"{{{XOP}}}Include")
        if include is None:
            return memoryview(base64.b64decode((holder.text or "").strip()))
        href = include.get("href", "")
        if not href.startswith("cid:"):
            raise SoapError(f"xop:Include href {href!r} is not a cid: URL")
        content_id = unquote(href[4:])
        try:
            return self.attachments[content_id]
        except KeyError:
            raise SoapError(f"the MIME part {content_id} is missing") from None


def read_message(
    content_type: str, body: bytes, max_xml_bytes: int = DEFAULT_MAX_BYTES
) -> SoapResponse:
    """
    Read a SOAP 1.2 message, plain or MTOM, and raise its fault if it is one.

    @param content_type: the HTTP Content-Type header.
    @param body: the whole HTTP body.
    @raise SoapFault: the message is a SOAP fault.
    @raise SoapError: the message is not SOAP 1.2 or its MIME is malformed.
    @raise XmlRefused: the XML is unsafe, malformed or too large.
    """
    media_type, params = content_type_params(content_type)
    if media_type == "multipart/related":
        root, attachments = _read_multipart(body, params)
    else:
        root, attachments = memoryview(body), {}
    envelope_element = parse_xml(
        bytes(root), what="SOAP message", max_bytes=max_xml_bytes
    )
    if envelope_element.tag != f"{{{SOAP12}}}Envelope":
        raise SoapError(f"not a SOAP 1.2 envelope: root element {envelope_element.tag}")
    response = SoapResponse(envelope_element, attachments)
    fault = envelope_element.find(f"{{{SOAP12}}}Body/{{{SOAP12}}}Fault")
    if fault is not None:
        raise parse_fault(fault)
    return response


def _read_multipart(
    body: bytes, params: dict[str, str]
) -> tuple[memoryview, dict[str, memoryview]]:
    boundary = params.get("boundary")
    if not boundary:
        raise SoapError("multipart/related without boundary")
    start_id = params.get("start", "").strip("<>")
    try:
        parts = [
            (_part_headers(part.header_block), part.content)
            for part in split_parts(body, boundary)
        ]
    except MultipartError as error:
        raise SoapError(f"the MIME message cannot be read: {error}") from None
    if not parts:
        raise SoapError("multipart/related without parts")

    def content_id(headers: dict[str, str]) -> str:
        return unquote(headers.get("content-id", "").strip().strip("<>"))

    if start_id:
        matching = [
            content for headers, content in parts if content_id(headers) == start_id
        ]
        if not matching:
            raise SoapError(f"the start part <{start_id}> is missing")
        root = matching[0]
    else:
        root = parts[0][1]
    attachments = {
        content_id(headers): _decoded(headers, content)
        for headers, content in parts
        if content is not root
    }
    return root, attachments


def _decoded(headers: dict[str, str], content: memoryview) -> memoryview:
    # MTOM sends parts as binary (a view, no copy); a peer may still use a
    # transfer encoding, whose decoded bytes (a copy) are the part's.
    encoding = headers.get("content-transfer-encoding", "binary").lower()
    if encoding in ("binary", "8bit", "7bit", ""):
        return content
    if encoding == "base64":
        return memoryview(base64.b64decode(bytes(content)))
    if encoding == "quoted-printable":
        return memoryview(binascii.a2b_qp(bytes(content)))
    raise SoapError(f"a MIME part has the unknown transfer encoding {encoding!r}")


def _part_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.decode("latin-1").split("\r\n"):
        if not line:
            continue
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers


def parse_fault(fault: etree._Element) -> SoapFault:
    """
    @return: the L{SoapFault} that a C{soap:Fault} element describes.
    """
    ns = {"s": SOAP12}
    code = fault.findtext("s:Code/s:Value", namespaces=ns) or ""
    subcodes = []
    sub = fault.find("s:Code/s:Subcode", namespaces=ns)
    while sub is not None:
        subcodes.append((sub.findtext("s:Value", namespaces=ns) or "").strip())
        sub = sub.find("s:Subcode", namespaces=ns)
    reason = fault.findtext("s:Reason/s:Text", namespaces=ns) or ""
    detail_element = fault.find("s:Detail", namespaces=ns)
    detail = (
        " ".join(t.strip() for t in detail_element.itertext() if t.strip())
        if detail_element is not None
        else ""
    )
    return SoapFault(code.strip(), subcodes, reason.strip(), detail)


__all__ = [
    "Addressing",
    "Attachment",
    "MtomBodyProducer",
    "MtomMessage",
    "SoapError",
    "SoapFault",
    "SoapResponse",
    "XmlRefused",
    "envelope",
    "parse_fault",
    "plain_content_type",
    "plain_message",
    "read_message",
    "xop_include",
]


class _Writer(Protocol):
    def write(self, data: bytes) -> None: ...


@implementer(IBodyProducer)
class MtomBodyProducer:
    """
    Writes an L{MtomMessage} as an HTTP request body for C{twisted.web}'s
    Agent, slice by slice, so that a large attachment is never copied whole.
    """

    slice_size = 256 * 1024

    def __init__(
        self, message: MtomMessage, cooperator: task.Cooperator | None = None
    ) -> None:
        self._message = message
        self._cooperate = cooperator.cooperate if cooperator else task.cooperate
        self.length = len(message)
        self._task: task.CooperativeTask[Iterator[None]] | None = None

    def _slices(self, consumer: _Writer) -> Iterator[None]:
        for part in self._message.parts():
            view = memoryview(part)
            for start in range(0, len(view), self.slice_size):
                consumer.write(bytes(view[start : start + self.slice_size]))
                yield None

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        """
        @return: a Deferred that fires when the whole body is written.
        """
        self._task = self._cooperate(self._slices(cast(_Writer, consumer)))
        done: Deferred[None] = self._task.whenDone().addCallback(lambda _: None)
        return done

    def pauseProducing(self) -> None:
        if self._task is not None:
            self._task.pause()

    def resumeProducing(self) -> None:
        if self._task is not None:
            self._task.resume()

    def stopProducing(self) -> None:
        if self._task is not None:
            self._task.stop()
