"""
The bearer tokens the agent hands out when the card is unlocked: random,
expiring when idle, kept in memory only, so that a restart drops them all.
"""

from __future__ import annotations

import hmac
import re
import secrets
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

# What L{secrets.token_urlsafe} makes of 32 bytes: 43 base64url characters.
TOKEN_BYTES = 32
_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{43}")


def is_token_shaped(text: str) -> bool:
    """
    @return: whether C{text} could be a token this agent handed out; what
        cannot is refused without being compared to any.
    """
    return _TOKEN_SHAPE.fullmatch(text) is not None


@dataclass
class _Entry:
    token: str
    last_used: float


class TokenStore:
    """
    The tokens alive now. Each use pushes its expiry C{idle} seconds later.
    """

    def __init__(self, clock: IReactorTime, idle: float) -> None:
        self._clock = clock
        self.idle = idle
        self._entries: list[_Entry] = []

    def issue(self) -> tuple[str, float]:
        """
        @return: a new token (256 random bits) and the time it expires if unused.
        """
        self._forget_expired()
        token = secrets.token_urlsafe(TOKEN_BYTES)
        now = self._clock.seconds()
        self._entries.append(_Entry(token, now))
        return token, now + self.idle

    def _find(self, token: str) -> _Entry | None:
        found = None
        # Compare against every entry, each in constant time.
        for entry in self._entries:
            if hmac.compare_digest(entry.token.encode(), token.encode()):
                found = entry
        return found

    def check(self, token: str) -> bool:
        """
        @return: whether C{token} is alive; using it renews its idle time.
        """
        self._forget_expired()
        entry = self._find(token)
        if entry is None:
            return False
        entry.last_used = self._clock.seconds()
        return True

    def drop(self, token: str) -> None:
        entry = self._find(token)
        if entry is not None:
            self._entries.remove(entry)

    def drop_all(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        self._forget_expired()
        return len(self._entries)

    def _forget_expired(self) -> None:
        now = self._clock.seconds()
        self._entries = [e for e in self._entries if now - e.last_used < self.idle]
