"""
Tests for L{cpsdmp.protocols.soap}: SOAP 1.2 envelopes with WS-Addressing,
MTOM/XOP bodies that the standard library's MIME parser reads back to the
exact bytes, and faults.
"""

from __future__ import annotations

import email.parser
import email.policy
import os

from lxml import etree
from twisted.internet import task
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from cpsdmp.protocols.soap import (
    SOAP12,
    WSA,
    XOP,
    Addressing,
    Attachment,
    MtomBodyProducer,
    MtomMessage,
    SoapError,
    SoapFault,
    envelope,
    plain_content_type,
    plain_message,
    read_message,
    xop_include,
)

# Bytes that would trip a careless MIME writer or reader.
AWKWARD = b"\r\n--not-the-boundary\r\n\x00\xff" + os.urandom(4096) + b"\r\n"


def mtom(data: bytes) -> MtomMessage:
    body = etree.Element("{urn:x}Request")
    xop_include(etree.SubElement(body, "{urn:x}Document"), "doc1@cpsdmp")
    root = envelope(body, Addressing("urn:x:Action", "https://dmp.example/x"))
    return MtomMessage(root, [Attachment("doc1@cpsdmp", data)], "urn:x:Action")


class EnvelopeTests(SynchronousTestCase):
    def test_addressing(self) -> None:
        """
        The header carries Action and To (must understand), a MessageID and
        an anonymous ReplyTo; the body holds the request.
        """
        body = etree.Element("{urn:x}Request")
        root = envelope(body, Addressing("urn:x:Action", "https://dmp.example/x"))
        ns = {"s": SOAP12, "a": WSA}
        must = f"{{{SOAP12}}}mustUnderstand"
        self.assertEqual(
            root.findtext("s:Header/a:Action", namespaces=ns), "urn:x:Action"
        )
        self.assertEqual(
            root.find("s:Header/a:Action", namespaces=ns).get(must), "true"
        )
        self.assertEqual(
            root.findtext("s:Header/a:To", namespaces=ns), "https://dmp.example/x"
        )
        self.assertTrue(
            root.findtext("s:Header/a:MessageID", namespaces=ns).startswith("urn:uuid:")
        )
        self.assertEqual(
            root.findtext("s:Header/a:ReplyTo/a:Address", namespaces=ns),
            "http://www.w3.org/2005/08/addressing/anonymous",
        )
        self.assertIs(root.find("s:Body", namespaces=ns)[0], body)

    def test_plain_round_trip(self) -> None:
        """
        A plain SOAP message reads back with its addressing headers.
        """
        root = envelope(etree.Element("{urn:x}R"), Addressing("urn:x:A", "urn:to"))
        response = read_message(plain_content_type("urn:x:A"), plain_message(root))
        self.assertEqual(response.addressing("Action"), "urn:x:A")
        self.assertEqual(response.body.tag, "{urn:x}R")


class MtomTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """
        An MTOM body reads back to the exact attachment bytes, through the
        xop:Include of the element that names it.
        """
        message = mtom(AWKWARD)
        body = b"".join(message.parts())
        self.assertEqual(len(body), len(message))
        response = read_message(message.content_type, body)
        holder = response.body.find("{urn:x}Document")
        self.assertEqual(bytes(response.binary(holder)), AWKWARD)
        self.assertEqual(
            holder.find(f"{{{XOP}}}Include").get("href"), "cid:doc1@cpsdmp"
        )

    def test_no_copy(self) -> None:
        """
        The attachment is yielded as the caller's own object, never
        base64-encoded, and read back as a view into the received body.
        """
        data = b"A" * 1000
        message = mtom(data)
        parts = list(message.parts())
        self.assertTrue(any(part is data for part in parts))
        body = b"".join(parts)
        self.assertNotIn(b"QUFB", body)
        response = read_message(message.content_type, body)
        view = response.attachments["doc1@cpsdmp"]
        self.assertIs(view.obj, body)

    def test_standard_mime_parser(self) -> None:
        """
        The standard library's MIME parser, reading the same bytes, finds
        the XOP root part first and the attachment's exact bytes.
        """
        message = mtom(AWKWARD)
        raw = (
            f"Content-Type: {message.content_type}\r\nMIME-Version: 1.0\r\n\r\n"
        ).encode() + b"".join(message.parts())
        parsed = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
        self.assertTrue(parsed.is_multipart())
        parts = list(parsed.iter_parts())
        self.assertEqual(len(parts), 2)
        self.assertEqual(parts[0].get_content_type(), "application/xop+xml")
        self.assertEqual(parts[0]["Content-ID"], f"<{message.root_id}>")
        self.assertEqual(parts[1]["Content-ID"], "<doc1@cpsdmp>")
        self.assertEqual(parts[1].get_payload(decode=True), AWKWARD)
        self.assertIn('type="application/xop+xml"', message.content_type)
        self.assertIn('start-info="application/soap+xml"', message.content_type)

    def test_transfer_encodings(self) -> None:
        """
        A part that a peer sent with a base64 or quoted-printable
        Content-Transfer-Encoding reads back to the bytes it encodes, not to
        its encoded form; an unknown encoding is an error, never passed on.
        """
        import base64
        import binascii

        def body(encoding: str, content: bytes) -> bytes:
            envelope_part = plain_message(
                envelope(
                    etree.fromstring(
                        f'<R xmlns="urn:x"><D><xop:Include xmlns:xop="{XOP}" '
                        'href="cid:d@x"/></D></R>'
                    ),
                    Addressing("urn:x:A", "urn:to"),
                )
            )
            return (
                b"--b\r\nContent-Type: application/xop+xml\r\nContent-ID: <r>\r\n\r\n"
                + envelope_part
                + b"\r\n--b\r\nContent-Type: application/octet-stream\r\n"
                + f"Content-Transfer-Encoding: {encoding}\r\n".encode()
                + b"Content-ID: <d@x>\r\n\r\n"
                + content
                + b"\r\n--b--\r\n"
            )

        content_type = 'multipart/related; boundary="b"; start="<r>"'
        for encoding, encoded in [
            ("base64", base64.encodebytes(AWKWARD)),
            ("quoted-printable", binascii.b2a_qp(AWKWARD, istext=False)),
            ("Binary", AWKWARD),
        ]:
            response = read_message(content_type, body(encoding, encoded))
            holder = response.body.find("{urn:x}D")
            self.assertEqual(bytes(response.binary(holder)), AWKWARD, encoding)
        error = self.assertRaises(
            SoapError, read_message, content_type, body("x-gzip", b"...")
        )
        self.assertIn("x-gzip", str(error))

    def test_boundary_in_data(self) -> None:
        """
        An attachment containing the boundary is refused rather than sent
        broken.
        """
        body = etree.Element("{urn:x}R")
        root = envelope(body, Addressing("a", "b"))
        self.assertRaises(
            SoapError,
            MtomMessage,
            root,
            [Attachment("x", b"..--B--..")],
            "a",
            boundary="--B--",
        )

    def test_missing_part(self) -> None:
        """
        An xop:Include naming an absent part, a missing start part and a
        missing boundary are errors.
        """
        message = mtom(b"data")
        message.attachments.clear()
        response = read_message(message.content_type, b"".join(message.parts()))
        self.assertRaises(
            SoapError, response.binary, response.body.find("{urn:x}Document")
        )
        message = mtom(b"data")
        broken = message.content_type.replace(message.root_id, "other@x")
        self.assertRaises(SoapError, read_message, broken, b"".join(message.parts()))
        self.assertRaises(
            SoapError, read_message, "multipart/related; type=x", b"--x\r\n"
        )

    def test_producer(self) -> None:
        """
        The body producer writes exactly the message's bytes, in slices, and
        announces their length.
        """
        message = mtom(AWKWARD * 100)
        clock = task.Clock()
        cooperator = task.Cooperator(
            scheduler=lambda call: clock.callLater(0, call), started=True
        )
        producer = MtomBodyProducer(message, cooperator)
        producer.slice_size = 1000
        transport = StringTransport()
        done = producer.startProducing(transport)
        while not done.called:
            clock.advance(0)
        self.successResultOf(done)
        self.assertEqual(transport.value(), b"".join(message.parts()))
        self.assertEqual(producer.length, len(transport.value()))


FAULT = b"""<?xml version="1.0"?>
<soap:Envelope xmlns:soap="http://www.w3.org/2003/05/soap-envelope">
 <soap:Body><soap:Fault>
  <soap:Code><soap:Value>soap:Sender</soap:Value>
   <soap:Subcode><soap:Value>wsse:InvalidSecurityToken</soap:Value></soap:Subcode>
  </soap:Code>
  <soap:Reason><soap:Text xml:lang="fr">Jeton VIHF invalide</soap:Text></soap:Reason>
  <soap:Detail><code>DMPVIHF01</code></soap:Detail>
 </soap:Fault></soap:Body>
</soap:Envelope>"""


class FaultTests(SynchronousTestCase):
    def test_fault(self) -> None:
        """
        A SOAP 1.2 fault is raised as L{SoapFault} with its code, subcode,
        reason and detail.
        """
        fault = self.assertRaises(
            SoapFault, read_message, "application/soap+xml", FAULT
        )
        self.assertEqual(fault.code, "soap:Sender")
        self.assertEqual(fault.subcodes, ["wsse:InvalidSecurityToken"])
        self.assertEqual(fault.reason, "Jeton VIHF invalide")
        self.assertEqual(fault.detail, "DMPVIHF01")
        self.assertIn("Jeton VIHF invalide", str(fault))

    def test_soap11(self) -> None:
        """
        A SOAP 1.1 envelope is not taken for SOAP 1.2.
        """
        data = (
            b'<e:Envelope xmlns:e="http://schemas.xmlsoap.org/soap/envelope/">'
            b"<e:Body/></e:Envelope>"
        )
        error = self.assertRaises(SoapError, read_message, "text/xml", data)
        self.assertIn("SOAP 1.2", str(error))


class HostileAnswerTests(SynchronousTestCase):
    def test_billion_laughs_and_xxe(self) -> None:
        """
        A DMP answer carrying a DOCTYPE (billion laughs or external entity)
        is refused before any expansion, in a plain or an MTOM body.
        """
        from cpsdmp.protocols.safexml import XmlRefused
        from tests.test_xds_safexml import BILLION_LAUGHS, xxe

        for payload in [BILLION_LAUGHS, xxe("/etc/passwd")]:
            self.assertRaises(XmlRefused, read_message, "application/soap+xml", payload)
            mime = (
                b"--b\r\nContent-Type: application/xop+xml\r\n"
                b"Content-ID: <r>\r\n\r\n" + payload + b"\r\n--b--\r\n"
            )
            self.assertRaises(
                XmlRefused,
                read_message,
                'multipart/related; boundary="b"; start="<r>"',
                mime,
            )
