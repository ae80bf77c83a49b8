"""
The session cache: keyed by server and identity, and forgetting in time.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cpsdmp.protocols.tls.session import Session, SessionCache
from cpsdmp.protocols.tls.suites import DEFAULT_SUITES


def _session(clock: Clock, ticket: bytes | None = None, hint: int = 0) -> Session:
    return Session(
        suite=DEFAULT_SUITES[0],
        master_secret=bytes(48),
        session_id=b"id",
        ticket=ticket,
        extended_master_secret=True,
        server_chain=[],
        client_chain=None,
        alpn=None,
        created=clock.seconds(),
        lifetime_hint=hint,
    )


class SessionCacheTests(SynchronousTestCase):
    def test_keyed_by_server_and_identity(self) -> None:
        clock = Clock()
        cache = SessionCache(clock)
        session = _session(clock)
        cache.put(("dmp:443", "Dr A"), session)
        self.assertIs(cache.get(("dmp:443", "Dr A")), session)
        self.assertIsNone(cache.get(("dmp:443", "Dr B")))
        self.assertIsNone(cache.get(("other:443", "Dr A")))

    def test_lifetime(self) -> None:
        clock = Clock()
        cache = SessionCache(clock, lifetime=600)
        cache.put(("dmp:443", "Dr A"), _session(clock))
        clock.advance(600)
        self.assertIsNotNone(cache.get(("dmp:443", "Dr A")))
        clock.advance(1)
        self.assertIsNone(cache.get(("dmp:443", "Dr A")))
        self.assertEqual(len(cache), 0)

    def test_ticket_lifetime_hint(self) -> None:
        """
        A ticket the server said lives 100 seconds is not offered after.
        """
        clock = Clock()
        cache = SessionCache(clock, lifetime=600)
        cache.put(("dmp:443", "Dr A"), _session(clock, ticket=b"t", hint=100))
        clock.advance(101)
        self.assertIsNone(cache.get(("dmp:443", "Dr A")))
