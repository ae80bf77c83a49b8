"""
The agent's record of every signature asked of it: a JSON line per request,
saying who asked (a non-secret id of the session), for what server or
document, with which algorithm, and what came of it. Also the rate limit
that keeps one session from making the card sign without end.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IReactorTime


def context_id(token: str) -> str:
    """
    @return: a name for the session of C{token} that logs may carry: the
        first 8 hex digits of its SHA-256, which tell sessions apart without
        revealing the token.
    """
    return hashlib.sha256(token.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class RateLimit:
    """
    At most C{count} signatures per session in any C{seconds} window.
    """

    count: int
    seconds: float

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        """
        @param text: C{"N/SECONDS"}, as C{--rate-limit} takes it.
        @raise ValueError: naming the expected form.
        """
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)\s*", text)
        if not match or int(match[1]) < 1 or float(match[2]) <= 0:
            raise ValueError(
                f"{text!r} is not a rate limit: give N/SECONDS, as in 120/60"
            )
        return cls(int(match[1]), float(match[2]))

    def __str__(self) -> str:
        return f"{self.count} signatures per {self.seconds:g} s"


#: 120 signatures a minute for one session: each submission costs one
#: signature-key signature, and a lab may submit more than a document a
#: second for one professional; TLS session resumption spares most
#: handshakes a signature.
DEFAULT_RATE_LIMIT = RateLimit(120, 60.0)


class RateLimiter:
    """
    Counts each session's signature requests over a sliding window.
    """

    def __init__(self, limit: RateLimit, clock: IReactorTime) -> None:
        self.limit = limit
        self._clock = clock
        self._requests: dict[str, deque[float]] = {}

    def take(self, context: str) -> float | None:
        """
        Count one request for C{context} if the limit allows it.

        @return: C{None} when allowed, else the seconds until it would be.
        """
        now = self._clock.seconds()
        start = now - self.limit.seconds
        for key in [k for k, times in self._requests.items() if times[-1] <= start]:
            del self._requests[key]
        times = self._requests.setdefault(context, deque())
        while times and times[0] <= start:
            times.popleft()
        if len(times) >= self.limit.count:
            return times[0] + self.limit.seconds - now
        times.append(now)
        return None


def create_private(path: str | Path) -> int:
    """
    Open C{path} for appending, created readable and writable by its owner
    only (0600): the log names who signed what.

    @return: the file descriptor.
    @raise OSError: when it cannot be opened.
    """
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)


class AuditLog:
    """
    Appends one JSON object per line to a file, each line in one unbuffered
    write, so that a crash loses nothing already answered and a failed
    write leaves nothing behind to be written later. C{failing} says
    whether the last write failed.
    """

    def __init__(self, path: str | Path, clock: IReactorTime) -> None:
        self.path = Path(path)
        self._clock = clock
        self._fd: int | None = create_private(self.path)
        self.failing = False

    def record(
        self,
        *,
        context: str,
        usage: str,
        algorithm: str,
        outcome: str,
        subject: str = "",
        reason: str = "",
        caller: str = "",
        **details: Any,
    ) -> None:
        """
        Write one line: C{outcome} is C{signed}, C{refused} or C{error};
        C{details} are further members (what a document signature covers).

        @raise OSError: when the line could not be written whole.
        """
        moment = datetime.datetime.fromtimestamp(self._clock.seconds(), datetime.UTC)
        line: dict[str, Any] = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "context": context,
            "caller": caller,
            "key": usage,
            "subject": subject,
            "algorithm": algorithm,
            "outcome": outcome,
        }
        if reason:
            line["reason"] = reason
        line.update(details)
        data = (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            if self._fd is None:
                raise OSError(errno.EBADF, "the audit log is closed")
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(
                    errno.EIO, f"wrote {written} of the line's {len(data)} bytes"
                )
        except OSError:
            self.failing = True
            raise
        self.failing = False

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
