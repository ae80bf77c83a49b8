"""
What this project's HTTP servers (the agent, the facade) add to twisted.web
at the connection level: an idle timeout of their own, so that a client
that opens a connection and says nothing is let go whatever Twisted's
default; an answer to a request line or header too long to read, where
twisted.web's line reader drops the connection without a word (and, over
TLS, leaves the caller waiting); and a 413 as soon as the headers announce
a body over the limit, where twisted.web would read it all first.
"""

from __future__ import annotations

from collections.abc import Sequence
from http import HTTPStatus

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.web.http import HTTPChannel

from cpsdmp.protocols.bounded import BoundedRequest

#: Seconds a connection may stay silent while no request is being answered:
#: before a request's headers are complete, between the chunks of its body,
#: and between two requests on a kept connection. Twisted stops this clock
#: while a request is answered, however long the answer takes.
IDLE_TIMEOUT = 60.0


def peer_name(address: object) -> str:
    """
    @return: the host of an IP address, as logs and audit records give a
        caller (C{127.0.0.1}, C{::1}); for any other kind of address (a
        UNIX socket's, none at all), a printable name of it rather than an
        error.
    """
    if isinstance(address, IPv4Address | IPv6Address):
        return str(address.host)
    if isinstance(address, UNIXAddress):
        name = address.name
        if not name:
            return "unix:(unnamed)"
        if isinstance(name, bytes):
            return "unix:" + name.decode("utf-8", "replace")
        return f"unix:{name}"
    return "unknown" if address is None else str(address)


def reason_phrase(status: int) -> bytes:
    """
    @return: the reason phrase of C{status} (RFC 9110); twisted.web knows
        none for 422, 423, 429 or 431, and would send "Unknown Status".
    """
    return HTTPStatus(status).phrase.encode("ascii")


def closing_answer(
    status: int,
    content_type: str,
    payload: bytes,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> bytes:
    """
    @return: a whole HTTP/1.1 answer that closes the connection, for what is
        refused before a request exists (a header too long to read).
    """
    lines = [
        b"HTTP/1.1 %d %s" % (status, reason_phrase(status)),
        b"Content-Type: " + content_type.encode("ascii"),
        b"Cache-Control: no-store",
        b"X-Content-Type-Options: nosniff",
        b"Content-Length: %d" % len(payload),
        b"Connection: close",
        *(name + b": " + value for name, value in headers),
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + payload


class HeaderLimitChannel(HTTPChannel):
    """
    An HTTP/1.1 channel that answers a request line or header line over
    C{MAX_LENGTH} bytes with what L{header_too_large} makes (a 431) and
    closes the connection; and a L{BoundedRequest} whose Content-Length is
    over its limit with the request's own 413, before reading its body.
    """

    def allHeadersReceived(self) -> None:
        request = self.requests[-1]
        if (
            isinstance(request, BoundedRequest)
            and self.length is not None
            and self.length > request.max_body
        ):
            # Refused before its body is read, and before the 100 Continue
            # an Expect header asks for, which would have the client send it.
            self.persistent = False
            request.refuse_at_once(self.length)
            return
        super().allHeadersReceived()  # type: ignore[no-untyped-call]

    def header_too_large(self) -> bytes:
        """
        @return: the whole answer, as L{closing_answer} makes it.
        """
        raise NotImplementedError()

    def lineLengthExceeded(self, line: bytes) -> None:
        assert self.transport is not None
        self.transport.write(self.header_too_large())
        # HTTPChannel's own loseConnection lets go of the transport's
        # producer first; without it, TLS never closes.
        self.loseConnection()  # type: ignore[no-untyped-call]
