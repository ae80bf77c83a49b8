"""
Our TLS client against real OpenSSL servers (C{openssl s_server}) over
loopback TCP, with a local client key: every suite and group, the server
variants of the DMP's world, resumption, and the failures a user meets;
then every suite and group again with the key on the SoftHSM2 test card,
through a real agent.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from cpsdmp.protocols.tls.alerts import AlertReceived, HandshakeFailed
from cpsdmp.protocols.tls.endpoint import TLSClientEndpoint
from cpsdmp.protocols.tls.handshake import TLSClientConfig
from cpsdmp.protocols.tls.schemes import SignatureScheme
from cpsdmp.protocols.tls.session import SessionCache
from cpsdmp.protocols.tls.suites import ALL_SUITES, NamedGroup
from tests.test_agent_http import AgentTestCase
from tests.tlssupport import (
    Collector,
    CollectorFactory,
    CountingKey,
    OpenSSLServer,
    pki,
)

GET = b"GET / HTTP/1.0\r\n\r\n"


class OpenSSLServerMixin:
    def start_server(
        self,
        *args: str,
        identity: str = "server-rsa",
        client_auth: bool = True,
        tls12_only: bool = True,
        ssl_options: str = "",
    ) -> OpenSSLServer:
        extra = list(args)
        if client_auth:
            extra += ["-Verify", "1", "-CAfile", pki().client_root_file]
        server = OpenSSLServer(
            extra, identity=identity, tls12_only=tls12_only, ssl_options=ssl_options
        )
        self.addCleanup(server.stop)  # type: ignore[attr-defined]
        server.wait_ready()
        return server

    def config(self, key: Any = "client-rsa", **kw: Any) -> TLSClientConfig:
        remote = pki()[key].local_key() if isinstance(key, str) else key
        kw.setdefault("roots", [pki().root])
        return TLSClientConfig(remote_key=remote, **kw)

    @inlineCallbacks
    def fetch(
        self,
        server: OpenSSLServer,
        config: TLSClientConfig,
        host: str = "localhost",
        request: bytes = GET,
    ) -> Any:
        """
        Connect, send C{request}, read until the server closes.

        @return: (TLSInfo, received bytes, reason of the close)
        """
        endpoint = TLSClientEndpoint.for_host(reactor, host, server.port, config)
        factory = CollectorFactory(request)
        protocol = yield endpoint.connect(factory)
        assert isinstance(protocol, Collector)
        info = protocol.transport.negotiated
        yield protocol.done
        return info, bytes(protocol.received), protocol.reason


class SuiteAndGroupTests(OpenSSLServerMixin, TestCase):
    timeout = 60

    @inlineCallbacks
    def test_every_suite(self) -> Any:
        """
        Each of the eight suites completes a handshake with client
        authentication against OpenSSL, which reports the same suite and
        our client certificate.
        """
        for suite in ALL_SUITES:
            identity = "server-rsa" if suite.authentication == "RSA" else "server-ec"
            server = self.start_server(
                "-www", "-cipher", suite.openssl_name, identity=identity
            )
            info, page, reason = yield self.fetch(server, self.config())
            self.assertEqual(info.cipher_suite, suite.name)
            self.assertIn(b"Cipher is " + suite.openssl_name.encode(), page)
            self.assertIn(b"Dr Test CPS", page)  # the server saw our certificate
            self.assertTrue(info.extended_master_secret)
            self.assertEqual(info.client_signature_scheme, "rsa_pkcs1_sha256")
            server.stop()

    @inlineCallbacks
    def test_every_group(self) -> Any:
        """
        X25519, P-256 and P-384 each work when the server allows only it.
        """
        for group, openssl_name in [
            (NamedGroup.x25519, "X25519"),
            (NamedGroup.secp256r1, "P-256"),
            (NamedGroup.secp384r1, "P-384"),
        ]:
            server = self.start_server("-www", "-groups", openssl_name)
            info, page, _ = yield self.fetch(server, self.config())
            self.assertEqual(info.group, group.name)
            self.assertIn(b"New, TLSv1.2", page)
            server.stop()


class ServerVariantTests(OpenSSLServerMixin, TestCase):
    timeout = 60

    @inlineCallbacks
    def test_fragmenting_server(self) -> Any:
        """
        A server that sends records of at most 512 bytes splits its
        Certificate across records; the handshake and a large page survive.
        """
        server = self.start_server("-www", "-max_send_frag", "512")
        info, page, _ = yield self.fetch(server, self.config())
        self.assertIn(b"New, TLSv1.2", page)
        self.assertGreater(len(page), 512)

    @inlineCallbacks
    def test_no_ca_names(self) -> Any:
        """
        A CertificateRequest with an empty CA list still gets our
        certificate.
        """
        server = self.start_server(
            "-www",
            "-Verify",
            "1",
            "-verifyCAfile",
            pki().client_root_file,
            client_auth=False,
        )
        info, page, _ = yield self.fetch(server, self.config())
        self.assertTrue(info.client_certificate_requested)
        self.assertIn(b"Dr Test CPS", page)

    @inlineCallbacks
    def test_ecdsa_server_and_ecdsa_client(self) -> Any:
        """
        An ECDSA server certificate with an ECDSA client key.
        """
        server = self.start_server("-www", identity="server-ec")
        info, page, _ = yield self.fetch(server, self.config("client-ec"))
        self.assertIn("ECDSA", info.cipher_suite)
        self.assertEqual(info.client_signature_scheme, "ecdsa_secp256r1_sha256")
        self.assertIn(b"Dr Test EC", page)

    @inlineCallbacks
    def test_server_prefers_schemes_the_card_cannot_do(self) -> Any:
        """
        The server lists RSA-PSS first; a card doing PKCS#1 v1.5 only signs
        with the first scheme both accept.
        """
        card = pki()["client-rsa"].local_key(
            [SignatureScheme.rsa_pkcs1_sha256, SignatureScheme.rsa_pkcs1_sha384]
        )
        server = self.start_server(
            "-www", "-client_sigalgs", "RSA-PSS+SHA512:RSA-PSS+SHA256:RSA+SHA384"
        )
        info, page, _ = yield self.fetch(server, self.config(card))
        self.assertEqual(info.client_signature_scheme, "rsa_pkcs1_sha384")
        self.assertIn(b"Dr Test CPS", page)

    @inlineCallbacks
    def test_no_scheme_in_common(self) -> Any:
        """
        A server taking only RSA-PSS client signatures and a PKCS#1-only
        card: a clear error, and the card is never asked.
        """
        card = CountingKey(
            pki()["client-rsa"].local_key([SignatureScheme.rsa_pkcs1_sha256])
        )
        server = self.start_server("-www", "-client_sigalgs", "RSA-PSS+SHA256")
        failure = yield self.assertFailure(
            self.fetch(server, self.config(card)), HandshakeFailed
        )
        self.assertIn("no signature scheme in common", str(failure))
        self.assertIn("rsa_pss_rsae_sha256", str(failure))
        self.assertEqual((card.chain_calls, card.sign_calls), (0, 0))

    @inlineCallbacks
    def test_no_certificate_request_no_key_call(self) -> Any:
        """
        A server that does not ask for a client certificate: the key is
        never called.
        """
        card = CountingKey(pki()["client-rsa"].local_key())
        server = self.start_server("-www", client_auth=False)
        info, page, _ = yield self.fetch(server, self.config(card))
        self.assertFalse(info.client_certificate_requested)
        self.assertEqual((card.chain_calls, card.sign_calls), (0, 0))

    @inlineCallbacks
    def test_no_extended_master_secret(self) -> Any:
        """
        A server with the extended master secret turned off is refused
        before the card is asked anything, unless the caller allows it;
        then its sessions resume without it too.
        """
        server = self.start_server("-www", ssl_options="-ExtendedMasterSecret")
        card = CountingKey(pki()["client-rsa"].local_key())
        failure = yield self.assertFailure(
            self.fetch(server, self.config(card)), HandshakeFailed
        )
        self.assertIn("does not support the extended master secret", str(failure))
        self.assertEqual(failure.alert.name, "handshake_failure")
        self.assertEqual((card.chain_calls, card.sign_calls), (0, 0))
        config = self.config(
            card,
            allow_no_extended_master_secret=True,
            session_cache=SessionCache(reactor),
        )
        first, page, _ = yield self.fetch(server, config)
        self.assertFalse(first.extended_master_secret)
        self.assertIn(b"Dr Test CPS", page)
        second, page, _ = yield self.fetch(server, config)
        self.assertTrue(second.resumed)
        self.assertIn(b"Reused, TLSv1.2", page)

    @inlineCallbacks
    def test_ip_literal_sends_no_sni(self) -> Any:
        """
        Connecting by IP: no server_name extension, and the certificate's
        IP address SAN is what is checked.
        """
        server = self.start_server(
            "-www",
            "-servername",
            "localhost",
            "-cert2",
            pki()["server-wrong-name"].cert_file,
            "-key2",
            pki()["server-wrong-name"].key_file,
        )
        info, page, _ = yield self.fetch(server, self.config(), host="127.0.0.1")
        self.assertIn(b"New, TLSv1.2", page)
        # The same server, asked by name, answers with its other certificate:
        # the one above was chosen because no server_name was sent.
        failure = yield self.assertFailure(
            self.fetch(server, self.config(), host="localhost"), HandshakeFailed
        )
        self.assertIn("not valid for 'localhost'", str(failure))


class ServerSignatureTests(OpenSSLServerMixin, TestCase):
    timeout = 60

    @inlineCallbacks
    def test_server_signature_schemes(self) -> Any:
        """
        The ServerKeyExchange signature verifies whichever scheme the
        server is limited to: PKCS#1 v1.5 or PSS, any hash, RSA or ECDSA.
        """
        for identity, sigalgs, expected in [
            ("server-rsa", "RSA+SHA256", "rsa_pkcs1_sha256"),
            ("server-rsa", "RSA+SHA512", "rsa_pkcs1_sha512"),
            ("server-rsa", "RSA-PSS+SHA384", "rsa_pss_rsae_sha384"),
            ("server-ec", "ECDSA+SHA256", "ecdsa_secp256r1_sha256"),
        ]:
            server = self.start_server(
                "-www",
                "-sigalgs",
                sigalgs,
                # without it, -sigalgs also limits the client's signature
                "-client_sigalgs",
                "RSA+SHA256",
                identity=identity,
            )
            info, page, _ = yield self.fetch(server, self.config())
            self.assertEqual(info.server_signature_scheme, expected)
            self.assertIn(b"New, TLSv1.2", page)
            server.stop()


class ALPNTests(OpenSSLServerMixin, TestCase):
    timeout = 30

    @inlineCallbacks
    def test_alpn(self) -> Any:
        """
        Offered protocols, the server picks one it knows.
        """
        server = self.start_server("-www", "-alpn", "http/1.1")
        info, page, _ = yield self.fetch(server, self.config(alpn=[b"h2", b"http/1.1"]))
        self.assertEqual(info.alpn, b"http/1.1")


class RenegotiationTests(OpenSSLServerMixin, TestCase):
    timeout = 30

    @inlineCallbacks
    def test_hello_request_refused(self) -> Any:
        """
        A HelloRequest after the handshake gets our no_renegotiation
        warning, which OpenSSL reads (it logs "no renegotiation"). OpenSSL 3
        then ends the connection with handshake_failure, which we surface
        as the server's alert; the in-memory tests show that we ourselves
        go on after the warning.
        """
        server = self.start_server()
        endpoint = TLSClientEndpoint.for_host(
            reactor, "localhost", server.port, self.config()
        )
        protocol = yield endpoint.connect(CollectorFactory())
        protocol.transport.write(b"before renegotiation\n")
        yield _wait_for(lambda: "before renegotiation" in server.output())
        server.command(b"R\n")
        yield protocol.done
        # s_server may log its error just after closing: give it time.
        yield _wait_for(lambda: "no renegotiation" in server.output())
        self.assertIsInstance(protocol.reason.value, AlertReceived)
        self.assertEqual(protocol.reason.value.name, "handshake_failure")


def _wait_for(condition: Any, timeout: float = 10.0) -> Deferred[None]:
    """
    @return: a Deferred that fires once C{condition()} is true, polled every
        20 ms, or fails after C{timeout} seconds.
    """
    from twisted.internet.task import LoopingCall

    def check() -> None:
        if condition():
            loop.stop()

    loop = LoopingCall(check)
    d = loop.start(0.02)
    d.addTimeout(timeout, reactor)
    return d


class ResumptionTests(OpenSSLServerMixin, TestCase):
    timeout = 60

    @inlineCallbacks
    def _twice(self, *args: str) -> Any:
        server = self.start_server("-www", *args)
        card = CountingKey(pki()["client-rsa"].local_key())
        config = self.config(card, session_cache=SessionCache(reactor))
        first, page1, _ = yield self.fetch(server, config)
        second, page2, _ = yield self.fetch(server, config)
        return card, first, page1, second, page2

    @inlineCallbacks
    def test_tls13_capable_server(self) -> Any:
        """
        A server that also speaks TLS 1.3 settles on 1.2 with us, and
        resumes.
        """
        server = self.start_server("-www", tls12_only=False)
        card = CountingKey(pki()["client-rsa"].local_key())
        config = self.config(card, session_cache=SessionCache(reactor))
        first, page1, _ = yield self.fetch(server, config)
        second, page2, _ = yield self.fetch(server, config)
        self.assertIn(b"New, TLSv1.2", page1)
        self.assertIn(b"Reused, TLSv1.2", page2)
        self.assertEqual(card.sign_calls, 1)

    @inlineCallbacks
    def test_resumption_by_session_id(self) -> Any:
        """
        With tickets off, the second connection resumes by session ID: the
        server says "Reused" and the card signed only once.
        """
        card, first, page1, second, page2 = yield self._twice("-no_ticket")
        self.assertFalse(first.resumed)
        self.assertFalse(first.ticket_received)
        self.assertTrue(second.resumed)
        self.assertIn(b"New, TLSv1.2", page1)
        self.assertIn(b"Reused, TLSv1.2", page2)
        self.assertEqual((card.chain_calls, card.sign_calls), (1, 1))
        self.assertIn(b"Dr Test CPS", page2)  # the session keeps our identity

    @inlineCallbacks
    def test_resumption_by_ticket(self) -> Any:
        """
        With a session ticket (and no server-side cache), the second
        connection resumes by ticket, without a signature.
        """
        card, first, page1, second, page2 = yield self._twice("-no_cache")
        self.assertTrue(first.ticket_received)
        self.assertTrue(second.resumed)
        self.assertIn(b"Reused, TLSv1.2", page2)
        self.assertEqual(card.sign_calls, 1)

    @inlineCallbacks
    def test_other_identity_does_not_resume(self) -> Any:
        """
        The cache is keyed by client identity: another professional's
        connection to the same server makes a full handshake.
        """
        server = self.start_server("-www")
        cache = SessionCache(reactor)
        first, _, _ = yield self.fetch(
            server, self.config("client-rsa", session_cache=cache)
        )
        other = CountingKey(pki()["client-ec"].local_key())
        second, page, _ = yield self.fetch(
            server, self.config(other, session_cache=cache)
        )
        self.assertFalse(second.resumed)
        self.assertEqual(other.sign_calls, 1)
        self.assertIn(b"Dr Test EC", page)


class FailureTests(OpenSSLServerMixin, TestCase):
    timeout = 60

    @inlineCallbacks
    def _refused(self, identity: str, expected: str) -> Any:
        card = CountingKey(pki()["client-rsa"].local_key())
        server = self.start_server("-www", identity=identity)
        failure = yield self.assertFailure(
            self.fetch(server, self.config(card)), HandshakeFailed
        )
        self.assertIn(expected, str(failure))
        self.assertEqual(failure.step, "waiting for the server Certificate")
        self.assertEqual(card.sign_calls, 0)
        return failure

    @inlineCallbacks
    def test_wrong_name(self) -> Any:
        failure = yield self._refused("server-wrong-name", "not valid for 'localhost'")
        self.assertEqual(failure.alert.name, "bad_certificate")

    @inlineCallbacks
    def test_untrusted_chain(self) -> Any:
        failure = yield self._refused(
            "server-untrusted", "does not lead to a trusted root"
        )
        self.assertEqual(failure.alert.name, "unknown_ca")

    @inlineCallbacks
    def test_no_subject_alt_name(self) -> Any:
        failure = yield self._refused("server-no-san", "no subjectAltName")
        self.assertEqual(failure.alert.name, "bad_certificate")

    @inlineCallbacks
    def test_expired_certificate(self) -> Any:
        failure = yield self._refused("server-expired", "not now")
        self.assertEqual(failure.alert.name, "certificate_expired")

    @inlineCallbacks
    def test_client_certificate_rejected(self) -> Any:
        """
        A client certificate from a CA the server does not trust: the
        server's alert reaches the caller, naming the step.
        """
        server = self.start_server("-www", "-verify_return_error")
        failure = yield self.assertFailure(
            self.fetch(server, self.config("client-stranger")), AlertReceived
        )
        self.assertEqual(failure.name, "unknown_ca")
        self.assertIn("after our Finished", str(failure))


class CardTests(OpenSSLServerMixin, AgentTestCase):
    """
    The same OpenSSL servers with the client key on the SoftHSM2 test card,
    through a real agent (one that signs anything: the signing policy has
    its own tests).
    """

    timeout = 120

    def card_roots(self) -> str:
        """
        @return: a PEM file of the card's CA, for the server's -CAfile.
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            for name in [self.testcard.ca_root, *self.testcard.ca_intermediates]:
                with open(name, "rb") as ca:
                    f.write(ca.read())
        return path

    @inlineCallbacks
    def test_every_suite_and_group(self) -> Any:
        """
        Each suite, then each group, with the card signing the handshake;
        OpenSSL reports the card holder's certificate; a reconnection
        resumes without asking the card again.
        """
        client = yield self.client()
        card = CountingKey(client)
        holder = self.testcard.professional["id"].encode()
        auth = ["-Verify", "1", "-CAfile", self.card_roots()]
        variants = [
            (
                ["-cipher", suite.openssl_name],
                "server-rsa" if suite.authentication == "RSA" else "server-ec",
            )
            for suite in ALL_SUITES
        ] + [
            (["-groups", group], "server-rsa") for group in ("X25519", "P-256", "P-384")
        ]
        for args, identity in variants:
            server = self.start_server(
                "-www", *args, *auth, identity=identity, client_auth=False
            )
            info, page, _ = yield self.fetch(server, self.config(card))
            self.assertIn(b"New, TLSv1.2", page)
            self.assertIn(holder, page)
            self.assertEqual(info.client_signature_scheme, "rsa_pkcs1_sha256")
            server.stop()
        self.assertEqual(card.sign_calls, len(variants))

        server = self.start_server("-www", *auth, client_auth=False)
        config = self.config(card, session_cache=SessionCache(reactor))
        first, _, _ = yield self.fetch(server, config)
        second, page, _ = yield self.fetch(server, config)
        self.assertTrue(second.resumed)
        self.assertIn(b"Reused, TLSv1.2", page)
        self.assertEqual(card.sign_calls, len(variants) + 1)
