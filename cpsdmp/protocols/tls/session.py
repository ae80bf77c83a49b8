"""
The client's session cache: what a later connection needs to resume a
session by ID or by RFC 5077 ticket, keyed by (server, client identity) so
that one professional's session never serves another.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from cryptography import x509
from twisted.internet.interfaces import IReactorTime

from cpsdmp.protocols.tls.suites import CipherSuite


@dataclass
class Session:
    """
    A session whose server Finished was verified: everything needed to
    resume it, and what the full handshake had established.
    """

    suite: CipherSuite
    master_secret: bytes
    session_id: bytes
    ticket: bytes | None
    extended_master_secret: bool
    server_chain: list[x509.Certificate]
    client_chain: list[x509.Certificate] | None
    alpn: bytes | None
    created: float
    group: str = ""
    lifetime_hint: int = 0
    # The server chain as verified, leaf to root.
    verified_chain: list[x509.Certificate] = field(default_factory=list)


CacheKey = tuple[str, Hashable]


class SessionCache:
    """
    Keeps the latest session per key for C{lifetime} seconds by C{clock}.
    """

    def __init__(self, clock: IReactorTime, lifetime: float = 3600.0) -> None:
        self._clock = clock
        self._lifetime = lifetime
        self._sessions: dict[CacheKey, Session] = {}

    def get(self, key: CacheKey) -> Session | None:
        session = self._sessions.get(key)
        if session is None:
            return None
        limit = self._lifetime
        if session.ticket is not None and session.lifetime_hint:
            limit = min(limit, session.lifetime_hint)
        if self._clock.seconds() - session.created > limit:
            del self._sessions[key]
            return None
        return session

    def put(self, key: CacheKey, session: Session) -> None:
        self._sessions[key] = session

    def discard(self, key: CacheKey) -> None:
        self._sessions.pop(key, None)

    def __len__(self) -> int:
        return len(self._sessions)
