"""
The parts of a MIME multipart body (RFC 2046, section 5.1.1), found by
scanning for its delimiter lines: the MTOM messages the DMP answers with and
the multipart/form-data forms the facade takes.

Reading costs one pass over the body and no line splitting: each part's
content is a view of the caller's bytes, and its header block is returned
unparsed, bounded in size, for the caller to read the headers it needs. A
caller that limits the number of parts has the body refused as soon as one
part too many begins, before the rest is scanned.
"""

from __future__ import annotations

import email.message
import email.policy
import re
from dataclasses import dataclass

_CRLF = b"\r\n"
#: What ends a delimiter line: transport padding, then CRLF.
_LINE_END = re.compile(rb"[ \t]*\r\n")
#: RFC 2046, section 5.1.1: a boundary is 1 to 70 characters.
MAX_BOUNDARY = 70
#: The header block of a part (its Content-Disposition, Content-Type, ...)
#: is small; one that is not ended within this many bytes is refused.
MAX_HEADER_BYTES = 8192


class MultipartError(ValueError):
    """
    A multipart body that cannot be read: its message says why, in words.
    """


class TooManyParts(MultipartError):
    """
    A multipart body has more parts than its reader takes.
    """


@dataclass(frozen=True)
class Part:
    """
    One body part: its header block (the header lines, each ended by CRLF,
    without the empty line that ends them) and its content.
    """

    header_block: bytes
    content: memoryview


def content_type_params(value: str) -> tuple[str, dict[str, str]]:
    """
    @return: the media type of a Content-Type header, lower case, and its
        parameters by lower-case name, their values as given.
    """
    message = email.message.Message(policy=email.policy.HTTP)
    message["Content-Type"] = value
    params: dict[str, str] = {}
    for key, param in message.get_params(failobj=[])[1:]:
        params[key.lower()] = str(param)
    return message.get_content_type(), params


def _line_end(body: bytes, position: int) -> int:
    """
    @return: where the line that follows a dash-boundary at C{position}
        starts (after its transport padding and CRLF), or -1 when what
        follows is neither that nor C{--}; -2 when it is C{--} (the close
        delimiter).
    """
    if body.startswith(b"--", position):
        return -2
    line_end = _LINE_END.match(body, position)
    return -1 if line_end is None else line_end.end()


def split_parts(body: bytes, boundary: str, max_parts: int | None = None) -> list[Part]:
    """
    Split a multipart body at its delimiter lines: C{--boundary}, optional
    transport padding (spaces and tabs) and CRLF, each but the first after
    the CRLF that ends the previous part; the last one C{--boundary--}.
    The preamble and the epilogue are ignored.

    @param max_parts: if given, a body with more parts is refused as soon
        as the part after the last one taken begins.
    @raise TooManyParts: there are more than C{max_parts} parts.
    @raise MultipartError: the boundary is not one (RFC 2046), no delimiter
        line is found, a part's header block is not ended by an empty line
        within L{MAX_HEADER_BYTES}, or the body ends before its close
        delimiter.
    """
    if not 0 < len(boundary) <= MAX_BOUNDARY or not boundary.isascii():
        raise MultipartError(
            f"the boundary must be 1 to {MAX_BOUNDARY} ASCII characters (RFC 2046)"
        )
    dash_boundary = b"--" + boundary.encode("ascii")
    delimiter = _CRLF + dash_boundary
    view = memoryview(body)

    # The first delimiter line begins the body or follows the preamble.
    found = 0 if body.startswith(dash_boundary) else body.find(delimiter) + 2
    while True:
        if found < 2 and not (found == 0 and body.startswith(dash_boundary)):
            raise MultipartError(
                f"its boundary {boundary!r} is not found in it as a delimiter "
                f"line (--{boundary}, then CRLF)"
            )
        start = _line_end(body, found + len(dash_boundary))
        if start != -1:
            break
        found = body.find(delimiter, found + 1) + 2

    parts: list[Part] = []
    while start != -2:
        if max_parts is not None and len(parts) == max_parts:
            raise TooManyParts(f"it has more than {max_parts} parts")
        # The part ends at the next delimiter line; CRLF--boundary followed
        # by anything else is the part's content.
        end = start
        while True:
            end = body.find(delimiter, end)
            if end < 0:
                raise MultipartError(
                    f"it ends before its close delimiter --{boundary}--: it is "
                    "truncated"
                )
            following = _line_end(body, end + len(delimiter))
            if following != -1:
                break
            end += 1

        # The empty line that ends the header block; from the CRLF before
        # the part, for a part without headers, to the CRLF that is the
        # delimiter's, for a part without content.
        limit = min(end + 2, start + MAX_HEADER_BYTES)
        headers_end = body.find(_CRLF + _CRLF, start - 2, limit)
        if headers_end < 0:
            raise MultipartError(
                f"the header block of its part {len(parts) + 1} is not ended by "
                f"an empty line within {MAX_HEADER_BYTES} bytes"
            )
        content_start = min(headers_end + 4, end)
        parts.append(
            Part(body[start : max(headers_end + 2, start)], view[content_start:end])
        )
        start = following
    return parts
