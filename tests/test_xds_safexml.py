"""
Tests for L{cpsdmp.protocols.safexml}: hostile XML is refused before it can hurt.
"""

import os
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from cpsdmp.protocols.safexml import XmlRefused, chunked, iter_events, parse_xml

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<lolz>&lol9;</lolz>
"""


def xxe(path: str) -> bytes:
    return (
        b'<?xml version="1.0"?>\n<!DOCTYPE r [<!ENTITY x SYSTEM "file://'
        + path.encode()
        + b'">]>\n<r>&x;</r>'
    )


class ParseTests(SynchronousTestCase):
    def test_plain(self) -> None:
        """
        An ordinary document parses.
        """
        root = parse_xml(b"<a xmlns='urn:x'><b>1</b></a>")
        self.assertEqual(root.findtext("{urn:x}b"), "1")

    def test_billion_laughs(self) -> None:
        """
        A billion-laughs payload is refused with a message that names the
        DOCTYPE, and nothing is expanded.
        """
        error = self.assertRaises(
            XmlRefused, parse_xml, BILLION_LAUGHS, what="DMP answer"
        )
        self.assertIn("DMP answer", str(error))
        self.assertIn("DOCTYPE", str(error))

    def test_xxe_not_read(self) -> None:
        """
        An external entity pointing at a local file is refused, and the
        file's content appears nowhere.
        """
        with tempfile.NamedTemporaryFile("w", delete=False) as secret:
            secret.write("TOP-SECRET-CONTENT")
        self.addCleanup(os.unlink, secret.name)
        error = self.assertRaises(XmlRefused, parse_xml, xxe(secret.name))
        self.assertNotIn("TOP-SECRET", str(error))
        self.assertIn("DOCTYPE", str(error))

    def test_too_large(self) -> None:
        """
        A document larger than the limit is refused before parsing.
        """
        error = self.assertRaises(
            XmlRefused, parse_xml, b"<a>" + b"x" * 100 + b"</a>", max_bytes=50
        )
        self.assertIn("50", str(error))

    def test_malformed(self) -> None:
        """
        Malformed XML is an L{XmlRefused}, not an lxml error.
        """
        self.assertRaises(XmlRefused, parse_xml, b"<a><b></a>")
        self.assertRaises(XmlRefused, parse_xml, b"")

    def test_encoding_override(self) -> None:
        """
        An ISO-8859-1 document without declaration parses when told.
        """
        root = parse_xml("<a>Médecin</a>".encode("latin-1"), encoding="iso-8859-1")
        self.assertEqual(root.text, "Médecin")


class IterEventsTests(SynchronousTestCase):
    def test_events(self) -> None:
        """
        Events come in document order from chunks of any size.
        """
        data = b"<a><b>1</b><c/></a>"
        tags = [
            element.tag
            for event, element in iter_events(chunked(data, 3), events=("start",))
        ]
        self.assertEqual(tags, ["a", "b", "c"])

    def test_billion_laughs(self) -> None:
        """
        The incremental parser refuses a DOCTYPE as well.
        """
        self.assertRaises(XmlRefused, list, iter_events(chunked(BILLION_LAUGHS, 7)))

    def test_limit(self) -> None:
        """
        Feeding more than the limit stops with L{XmlRefused}.
        """
        data = b"<a>" + b"<b/>" * 1000 + b"</a>"
        self.assertRaises(
            XmlRefused, list, iter_events(chunked(data, 100), max_bytes=1000)
        )


class ParserLimitTests(SynchronousTestCase):
    """
    A document past libxml2's limits (without its huge-tree option, which
    stays off) is refused in our words, with where it stopped, and without
    libxml2's advice to switch that option on.
    """

    DEEP = b"<a>" * 300 + b"</a>" * 300
    LONG_TEXT = b"<a>" + b"x" * 11_000_000 + b"</a>"
    LONG_ATTRIBUTE = b'<a b="' + b"x" * 11_000_000 + b'"/>'

    def refused(self, data: bytes) -> list[str]:
        """
        @return: the messages of both parsers for C{data}.
        """
        messages = [str(self.assertRaises(XmlRefused, parse_xml, data, what="CDA"))]
        messages.append(
            str(
                self.assertRaises(
                    XmlRefused, list, iter_events(chunked(data), what="CDA")
                )
            )
        )
        for message in messages:
            self.assertTrue(
                message.startswith("CDA exceeds the XML parser's limits: "), message
            )
            self.assertNotIn("XML_PARSE_HUGE", message)
            self.assertNotIn("\n", message)
            self.assertRegex(message, r"line \d+, column \d+")
        return messages

    def test_depth(self) -> None:
        for message in self.refused(self.DEEP):
            self.assertIn("elements nested more than 256 deep", message)

    def test_long_text(self) -> None:
        for message in self.refused(self.LONG_TEXT):
            self.assertIn("a text of more than 10000000 characters", message)

    def test_long_attribute(self) -> None:
        for message in self.refused(self.LONG_ATTRIBUTE):
            self.assertIn("more than 10000000 characters", message)

    def test_malformed_said_as_before(self) -> None:
        """
        XML that is not well-formed is still said so.
        """
        error = self.assertRaises(XmlRefused, parse_xml, b"<a><b></a>", what="CDA")
        self.assertTrue(str(error).startswith("CDA is not well-formed XML: "))


class SyntaxErrorTests(SynchronousTestCase):
    def test_one_line(self) -> None:
        """
        A document that is not well-formed is said in one line, with the
        line and column, both when parsed whole and when read as events:
        libxml2 ends some of its messages with a newline mid-sentence.
        """
        document = b'<?xml version="1.0"?>\n<a>x\x00y</a>'
        with self.assertRaises(XmlRefused) as whole:
            parse_xml(document, what="the CDA")
        with self.assertRaises(XmlRefused) as events:
            list(iter_events(chunked(document, 4), what="the CDA"))
        for refused in (whole.exception, events.exception):
            said = str(refused)
            self.assertNotIn("\n", said)
            self.assertTrue(said.startswith("the CDA is not well-formed XML: "), said)
            self.assertIn("Char 0x0 out of allowed range, line 2", said)
