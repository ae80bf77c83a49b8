"""
Our TLS client against real OpenSSL servers (C{openssl s_server}) over
loopback TCP, with a local client key: every suite and group, the server
variants of the DMP's world, resumption, and the failures a user meets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from cpsdmp.protocols.tls.alerts import AlertReceived, HandshakeFailed
from cpsdmp.protocols.tls.endpoint import TLSClientEndpoint
from cpsdmp.protocols.tls.handshake import TLSClientConfig, TLSInfo
from cpsdmp.protocols.tls.schemes import SignatureScheme
from cpsdmp.protocols.tls.session import SessionCache
from cpsdmp.protocols.tls.suites import ALL_SUITES, SUITES_BY_NAME, NamedGroup
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
        self, *args: str, identity: str = "server-rsa", client_auth: bool = True
    ) -> OpenSSLServer:
        extra = list(args)
        if client_auth:
            extra += ["-Verify", "1", "-CAfile", pki().client_root_file]
        server = OpenSSLServer(extra, identity=identity)
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
