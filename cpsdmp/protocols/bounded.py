"""
A twisted.web request whose body has a size limit: a body its
Content-Length announces over the limit is refused as soon as the headers
are read, the rest of the connection's bytes drained a little then
dropped; a chunked body is read off the connection past the limit but
never kept, and the request is answered 413 by the subclass's own means
instead of being processed.
"""

from __future__ import annotations

from twisted.web import server

#: A body refused by its Content-Length, up to this size, is read and
#: dropped before the connection closes, so that a client that sends it
#: without waiting reads the 413 rather than a connection reset; past it,
#: the connection closes at once.
DRAIN_LIMIT = 1024 * 1024


class BoundedRequest(server.Request):
    """
    Set C{max_body} on a subclass (or with C{type(...)}) and implement
    L{refuse_too_large} and L{too_large_answer}; serve it with a
    L{cpsdmp.protocols.httpserver.HeaderLimitChannel}, which calls
    L{refuse_at_once}.
    """

    max_body = 64 * 1024 * 1024
    #: Set by L{refuse_at_once}: the request is answered and never processed.
    refused = False
    _too_large = False
    _received = 0
    _drained = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body:
            self._too_large = True
            length = 0
        super().gotLength(length)  # type: ignore[no-untyped-call]

    def handleContentChunk(self, data: bytes) -> None:
        if self.refused:
            self._drained += len(data)
            if self._drained > DRAIN_LIMIT:
                self._close()
            return
        self._received += len(data)
        if self._received > self.max_body:
            self._too_large = True
        if not self._too_large:
            super().handleContentChunk(data)  # type: ignore[no-untyped-call]

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.refused:
            # Its whole body drained: the 413 is already sent.
            self._close()
            return
        super().requestReceived(command, path, version)  # type: ignore[no-untyped-call]

    def process(self) -> None:
        if self._too_large:
            self.refuse_too_large()
        else:
            super().process()  # type: ignore[no-untyped-call]

    def refuse_at_once(self, length: int) -> None:
        """
        Answer 413 as soon as the headers announce a body of C{length}
        bytes, over the limit, before reading any of it; the connection
        then closes.
        """
        self.refused = True
        assert self.channel is not None and self.channel.transport is not None
        self.channel.transport.write(self.too_large_answer())
        if length > DRAIN_LIMIT:
            self._close()

    def _close(self) -> None:
        if self.channel is not None:
            self.channel.loseConnection()  # type: ignore[no-untyped-call]

    def refuse_too_large(self) -> None:
        """
        Answer 413 and finish the request; the connection should close.
        """
        raise NotImplementedError()

    def too_large_answer(self) -> bytes:
        """
        @return: the whole 413 answer, as
            L{cpsdmp.protocols.httpserver.closing_answer} makes it, for a
            body refused before a byte of it is read.
        """
        raise NotImplementedError()
