"""
A twisted.web request whose body has a size limit: past it, the rest of the
body is read off the connection but never kept, and the request is answered
413 by the subclass's own means instead of being processed.
"""

from __future__ import annotations

from twisted.web import server


class BoundedRequest(server.Request):
    """
    Set C{max_body} on a subclass (or with C{type(...)}) and implement
    L{refuse_too_large}.
    """

    max_body = 64 * 1024 * 1024
    _too_large = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body:
            self._too_large = True
            length = 0
        super().gotLength(length)  # type: ignore[no-untyped-call]

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > self.max_body:
            self._too_large = True
        if not self._too_large:
            super().handleContentChunk(data)  # type: ignore[no-untyped-call]

    def process(self) -> None:
        if self._too_large:
            self.refuse_too_large()
        else:
            super().process()  # type: ignore[no-untyped-call]

    def refuse_too_large(self) -> None:
        """
        Answer 413 and finish the request; the connection should close.
        """
        raise NotImplementedError()
