"""
HTTP over our TLS client, unchanged: C{twisted.web.client.Agent} with a
persistent C{HTTPConnectionPool}, and treq, against a twisted.web HTTPS
server (OpenSSL through pyOpenSSL) that requires a client certificate.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from OpenSSL import SSL
from OpenSSL.SSL import _lib
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from cpsdmp.protocols.tls.endpoint import TLSAgentEndpointFactory
from cpsdmp.protocols.tls.handshake import TLSClientConfig
from cpsdmp.protocols.tls.session import SessionCache
from tests.tlssupport import CountingKey, ServerContext, pki


class WhoAmI(Resource):
    """
    Answers with the client certificate's subject, the client's port (the
    same port means the same connection) and whether OpenSSL resumed.
    """

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        tls: SSL.Connection = request.channel.transport.getHandle()
        peer = tls.get_peer_certificate()
        subject = peer.to_cryptography().subject.rfc4514_string() if peer else "none"
        port = request.getClientAddress().port
        # pyOpenSSL has no public call for this; ask OpenSSL directly.
        reused = bool(_lib.SSL_session_reused(tls._ssl))
        return f"{subject}|{port}|{reused}".encode()

    def render_POST(self, request: Request) -> bytes:
        body = request.content.read()
        return f"{len(body)}|{hashlib.sha256(body).hexdigest()}".encode()


class AgentTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.listening = reactor.listenSSL(
            0, Site(WhoAmI()), ServerContext(), interface="127.0.0.1"
        )
        self.addCleanup(self.listening.stopListening)
        self.url = f"https://localhost:{self.listening.getHost().port}/".encode()
        self.card = CountingKey(pki()["client-rsa"].local_key())
        self.config = TLSClientConfig(
            roots=[pki().root],
            remote_key=self.card,
            session_cache=SessionCache(reactor),
        )
        self.pool = HTTPConnectionPool(reactor)
        self.addCleanup(self.pool.closeCachedConnections)
        self.agent = Agent.usingEndpointFactory(
            reactor, TLSAgentEndpointFactory(reactor, self.config), pool=self.pool
        )

    @inlineCallbacks
    def _get(self) -> Any:
        response = yield self.agent.request(b"GET", self.url)
        self.assertEqual(response.code, 200)
        body = yield readBody(response)
        return body.decode().split("|")

    @inlineCallbacks
    def test_connection_reused(self) -> Any:
        """
        Two requests through the pool go over one TLS connection, with one
        signature; the server saw our client certificate.
        """
        subject1, port1, _ = yield self._get()
        subject2, port2, _ = yield self._get()
        self.assertIn("CN=Dr Test CPS", subject1)
        self.assertEqual(subject1, subject2)
        self.assertEqual(port1, port2)
        self.assertEqual(self.card.sign_calls, 1)

    @inlineCallbacks
    def test_new_connection_resumes(self) -> Any:
        """
        Once the pooled connection is closed, the next request opens a new
        connection that resumes the session: no new signature.
        """
        subject1, port1, reused1 = yield self._get()
        yield self.pool.closeCachedConnections()
        subject2, port2, reused2 = yield self._get()
        self.assertNotEqual(port1, port2)
        self.assertEqual(subject1, subject2)
        self.assertEqual(self.card.sign_calls, 1)
        self.assertEqual((reused1, reused2), ("False", "True"))

    @inlineCallbacks
    def test_treq(self) -> Any:
        """
        treq over the same Agent, GET and POST.
        """
        client = HTTPClient(self.agent)
        response = yield client.get(self.url.decode())
        text = yield response.text()
        self.assertIn("CN=Dr Test CPS", text)
        body = os.urandom(3 * 2**20 + 5)  # several records, through a producer
        response = yield client.post(self.url.decode(), data=body)
        text = yield response.text()
        self.assertEqual(text, f"{len(body)}|{hashlib.sha256(body).hexdigest()}")
        self.assertEqual(self.card.sign_calls, 1)

    @inlineCallbacks
    def test_handshake_error_reaches_the_caller(self) -> Any:
        """
        An untrusted server: the Agent's request fails with our error.
        """
        from cpsdmp.protocols.tls.alerts import HandshakeFailed

        self.config.roots = [pki().other_root]
        failure = yield self.assertFailure(
            self.agent.request(b"GET", self.url), HandshakeFailed
        )
        self.assertIn("trusted root", str(failure))


class ExtendedMasterSecretOverTCPTests(TestCase):
    """
    A Twisted/OpenSSL server with the extended master secret turned off.
    """

    timeout = 30

    def _agent(self, **kw: Any) -> tuple[Agent, str]:
        listening = reactor.listenSSL(
            0,
            Site(WhoAmI()),
            ServerContext(extended_master_secret=False),
            interface="127.0.0.1",
        )
        self.addCleanup(listening.stopListening)
        pool = HTTPConnectionPool(reactor, persistent=False)
        config = TLSClientConfig(
            roots=[pki().root], remote_key=pki()["client-rsa"].local_key(), **kw
        )
        agent = Agent.usingEndpointFactory(
            reactor, TLSAgentEndpointFactory(reactor, config), pool=pool
        )
        return agent, f"https://localhost:{listening.getHost().port}/"

    @inlineCallbacks
    def test_refused(self) -> Any:
        from cpsdmp.protocols.tls.alerts import HandshakeFailed

        agent, url = self._agent()
        failure = yield self.assertFailure(
            agent.request(b"GET", url.encode()), HandshakeFailed
        )
        self.assertIn("extended master secret", str(failure))

    @inlineCallbacks
    def test_allowed(self) -> Any:
        agent, url = self._agent(allow_no_extended_master_secret=True)
        response = yield agent.request(b"GET", url.encode())
        body = yield readBody(response)
        self.assertIn(b"Dr Test CPS", body)
