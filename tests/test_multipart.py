"""
Tests for L{cpsdmp.protocols.multipart}: finding a multipart body's parts by
its delimiter lines.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from cpsdmp.protocols.multipart import (
    MAX_HEADER_BYTES,
    MultipartError,
    TooManyParts,
    split_parts,
)


def read(body: bytes, boundary: str = "b", **kwargs: int) -> list[tuple[bytes, bytes]]:
    return [
        (part.header_block, bytes(part.content))
        for part in split_parts(body, boundary, **kwargs)
    ]


class SplitPartsTests(SynchronousTestCase):
    def test_parts(self) -> None:
        """
        The preamble and the epilogue are ignored; delimiter lines may carry
        transport padding; a part may have no headers or no content; what
        looks like a delimiter but is not followed by padding and CRLF, or
        by C{--}, is content.
        """
        body = (
            b"preamble\r\n--b \t\r\nA: 1\r\nB: 2\r\n\r\none\r\n--bb\r\n"
            b"\r\n--b\r\n\r\ntwo\n\r\r\n--b\r\nC: 3\r\n\r\n\r\n--b-- \r\nepilogue"
        )
        self.assertEqual(
            read(body),
            [
                (b"A: 1\r\nB: 2\r\n", b"one\r\n--bb\r\n"),
                (b"", b"two\n\r"),
                (b"C: 3\r\n", b""),
            ],
        )
        self.assertEqual(read(b"--b\r\nA: 1\r\n\r\n--b--"), [(b"A: 1\r\n", b"")])

    def test_malformed(self) -> None:
        """
        No delimiter line, no close delimiter (a truncated body), a header
        block too long, or a boundary RFC 2046 does not allow: an error
        saying which.
        """
        for body, boundary, said in [
            (b"garbage", "b", "not found"),
            (b"--bx\r\n\r\n", "b", "not found"),
            (b"--b\n\nx\n--b--\n", "b", "not found"),
            (b"--b\r\nA: 1\r\n\r\nx\r\n", "b", "truncated"),
            (b"--b\r\nA: 1\r\n\r\nx\r\n--b\r\n", "b", "truncated"),
            (
                b"--b\r\n" + b"A: 1\r\n" * MAX_HEADER_BYTES + b"\r\n\r\n--b--",
                "b",
                "header block of its part 1",
            ),
            (b"--\xc3\xa9\r\n\r\n\r\n--\xc3\xa9--", "\xe9", "ASCII"),
            (b"", "b" * 71, "1 to 70"),
        ]:
            error = self.assertRaises(MultipartError, split_parts, body, boundary)
            self.assertIn(said, str(error))

    def test_too_many_parts(self) -> None:
        """
        With C{max_parts}, the body is refused as soon as a part after the
        last one taken begins, even before the rest of it.
        """
        body = b"--b\r\n\r\nx\r\n" * 3
        self.assertEqual(len(read(body + b"--b--", max_parts=3)), 3)
        error = self.assertRaises(TooManyParts, split_parts, body, "b", max_parts=2)
        self.assertIn("more than 2 parts", str(error))
