"""
The handshake state machine over in-memory transports: our protocol on a
StringTransport, the server a real OpenSSL (pyOpenSSL over memory BIOs) or
hand-made messages, time a L{Clock}. The remote key fires at once, later,
never, with an error, or is cancelled.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, x25519
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from cpsdmp.protocols.tls import prf
from cpsdmp.protocols.tls.alerts import (
    AlertDescription,
    HandshakeFailed,
    TruncatedConnection,
)
from cpsdmp.protocols.tls.handshake import State, TLSClientConfig, TLSInfo
from cpsdmp.protocols.tls.interfaces import IRemoteKey
from cpsdmp.protocols.tls.messages import (
    ClientHello,
    ExtensionType,
    HandshakeReassembler,
    HandshakeType,
    encode_certificate,
    encode_finished,
    handshake,
    vector,
)
from cpsdmp.protocols.tls.protocol import TLSClientProtocol
from cpsdmp.protocols.tls.records import (
    ContentType,
    RecordLayer,
    key_block_length,
    protections_for,
)
from cpsdmp.protocols.tls.schemes import SignatureScheme, verify_signature
from cpsdmp.protocols.tls.session import SessionCache
from cpsdmp.protocols.tls.suites import SUITES_BY_CODE
from cpsdmp.protocols.tls.validation import VerifiedChains
from tests.tlssupport import (
    Collector,
    ServerContext,
    pki,
)


@implementer(IRemoteKey)
class ControlledKey:
    """
    A remote key whose answers the test releases by hand: each call leaves
    a Deferred in C{calls}, with a canceller that records the cancel.
    """

    def __init__(self, identity: str = "client-rsa") -> None:
        self._local = pki()[identity].local_key()
        self.supported_signature_schemes = [SignatureScheme.rsa_pkcs1_sha256]
        self.calls: list[tuple[str, Deferred[Any], Any]] = []
        self.cancelled: list[str] = []

    def _call(self, name: str, argument: Any = None) -> Deferred[Any]:
        d: Deferred[Any] = Deferred(lambda _: self.cancelled.append(name))
        self.calls.append((name, d, argument))
        return d

    def certificate_chain(self) -> Deferred[Any]:
        return self._call("certificate_chain")

    def sign(self, data: bytes, scheme: SignatureScheme) -> Deferred[bytes]:
        return self._call("sign", (data, scheme))

    def release_chain(self) -> None:
        name, d, _ = self.calls[-1]
        assert name == "certificate_chain"
        d.callback(self.successResultOf(self._local.certificate_chain()))

    def release_signature(self) -> None:
        name, d, (data, scheme) = self.calls[-1]
        assert name == "sign"
        d.callback(self.successResultOf(self._local.sign(data, scheme)))

    @staticmethod
    def successResultOf(d: Deferred[Any]) -> Any:
        results: list[Any] = []
        d.addBoth(results.append)
        return results[0]


class Pair:
    """
    Our protocol against an OpenSSL server in memory; C{pump} moves bytes
    both ways until neither side has more to say.
    """

    def __init__(
        self, config: TLSClientConfig, server_context: ServerContext | None = None
    ) -> None:
        self.clock = Clock()
        context = server_context or ServerContext()
        self.server = SSL.Connection(context.getContext(), None)  # type: ignore[arg-type]
        self.server.set_accept_state()
        self.app = Collector()
        self.client = TLSClientProtocol(self.app, config, "localhost", 443, self.clock)
        self.transport = StringTransport()
        self.established: list[Any] = []
        self.server_error: Exception | None = None
        self.server_received = bytearray()
        self.client.makeConnection(self.transport)
        self.client.when_established().addBoth(self.established.append)
        self.pump()

    def pump(self) -> None:
        for _ in range(20):
            moved = False
            out = self.transport.value()
            self.transport.clear()
            if out:
                moved = True
                self.server.bio_write(out)
            try:
                self.server.do_handshake()
                while True:
                    self.server_received += self.server.recv(65536)
            except (SSL.WantReadError, SSL.ZeroReturnError):
                pass
            except SSL.Error as e:
                if self.server_error is None:
                    self.server_error = e
            try:
                data = self.server.bio_read(1 << 20)
            except SSL.WantReadError:
                data = b""
            if data:
                moved = True
                self.client.dataReceived(data)
            if not moved:
                return

    @property
    def state(self) -> State:
        assert self.client._handshake is not None
        return self.client._handshake.state


def _config(key: Any, **kw: Any) -> TLSClientConfig:
    return TLSClientConfig(roots=[pki().root], remote_key=key, **kw)


class RemoteKeyTimingTests(SynchronousTestCase):
    """
    The two waiting states, and every way the key holder can answer.
    """

    def test_at_once(self) -> None:
        """
        A key that answers synchronously: the handshake goes from
        ClientHello to Established in one pump, through every state.
        """
        pair = Pair(_config(pki()["client-rsa"].local_key()))
        self.assertEqual(pair.state, State.ESTABLISHED)
        info = pair.established[0]
        self.assertIsInstance(info, TLSInfo)
        self.assertEqual(
            set(info.timings),
            {
                "START",
                "WAIT_SERVER_HELLO",
                "WAIT_CERTIFICATE",
                "WAIT_SERVER_KEY_EXCHANGE",
                "WAIT_CERTIFICATE_REQUEST",
                "WAIT_SERVER_HELLO_DONE",
                "WAIT_CLIENT_CERTIFICATE",
                "WAIT_SIGNATURE",
                "WAIT_CHANGE_CIPHER_SPEC",
                "WAIT_FINISHED",
            },
        )
        self.assertEqual(pair.app.connected_with, pair.client)
        self.assertIsNone(pair.server_error)

    def test_later(self) -> None:
        """
        The handshake waits in WAIT_CLIENT_CERTIFICATE, then in
        WAIT_SIGNATURE, sending nothing meanwhile; time spent there is
        reported; the signature releases the whole flight.
        """
        key = ControlledKey()
        pair = Pair(_config(key))
        self.assertEqual(pair.state, State.WAIT_CLIENT_CERTIFICATE)
        self.assertEqual([c[0] for c in key.calls], ["certificate_chain"])
        pair.clock.advance(2)
        key.release_chain()
        self.assertEqual(pair.state, State.WAIT_SIGNATURE)
        self.assertEqual(pair.transport.value(), b"")  # nothing sent yet
        pair.clock.advance(3)
        key.release_signature()
        pair.pump()
        self.assertEqual(pair.state, State.ESTABLISHED)
        info = pair.established[0]
        self.assertEqual(info.timings["WAIT_CLIENT_CERTIFICATE"], 2)
        self.assertEqual(info.timings["WAIT_SIGNATURE"], 3)
        # the key holder's timers and the handshake's are all cancelled
        self.assertEqual(pair.clock.getDelayedCalls(), [])
        # application data both ways
        pair.client.write(b"ping")
        pair.pump()
        self.assertEqual(bytes(pair.server_received), b"ping")
        pair.server.send(b"pong")
        pair.pump()
        self.assertEqual(bytes(pair.app.received), b"pong")

    def _failed(self, pair: Pair, closing: bool = True) -> HandshakeFailed:
        [result] = pair.established
        self.assertIsInstance(result, Failure)
        self.assertIsInstance(result.value, HandshakeFailed)
        self.assertEqual(pair.state, State.FAILED)
        self.assertEqual(pair.transport.disconnecting, closing)
        error: HandshakeFailed = result.value
        return error

    def test_never(self) -> None:
        """
        A signature that never comes: after the timeout, the request is
        cancelled, internal_error is sent and the handshake fails naming
        the step.
        """
        key = ControlledKey()
        pair = Pair(_config(key, remote_key_timeout=30))
        key.release_chain()
        pair.clock.advance(29)
        self.assertEqual(pair.established, [])
        pair.clock.advance(1)
        error = self._failed(pair)
        self.assertEqual(key.cancelled, ["sign"])
        self.assertEqual(error.step, State.WAIT_SIGNATURE.value)
        self.assertIn("did not answer within 30 seconds", str(error))
        self.assertEqual(error.alert, AlertDescription.internal_error)
        pair.pump()
        self.assertIn("internal error", str(pair.server_error))

    def test_chain_never(self) -> None:
        key = ControlledKey()
        pair = Pair(_config(key, remote_key_timeout=5))
        pair.clock.advance(5)
        error = self._failed(pair)
        self.assertEqual(key.cancelled, ["certificate_chain"])
        self.assertEqual(error.step, State.WAIT_CLIENT_CERTIFICATE.value)

    def test_error(self) -> None:
        """
        The key holder's own error is in the handshake's error.
        """
        key = ControlledKey()
        pair = Pair(_config(key))
        key.release_chain()
        key.calls[-1][1].errback(RuntimeError("card removed from the reader"))
        error = self._failed(pair)
        self.assertIn("card removed from the reader", str(error))
        self.assertEqual(error.step, State.WAIT_SIGNATURE.value)

    def test_wrong_signature_not_sent(self) -> None:
        """
        A signature that does not verify with the certificate is not sent.
        """
        key = ControlledKey()
        pair = Pair(_config(key))
        key.release_chain()
        key.calls[-1][1].callback(os.urandom(256))
        error = self._failed(pair)
        self.assertIn("does not verify with the client certificate", str(error))
        # what went out is only the alert: one record of 2 + 5 bytes
        self.assertEqual(len(pair.transport.value()), 7)

    def test_connection_lost_cancels(self) -> None:
        """
        The connection closing while the card signs cancels the request;
        the handshake fails saying where it was.
        """
        key = ControlledKey()
        pair = Pair(_config(key))
        key.release_chain()
        pair.client.connectionLost(Failure(ConnectionLost("reset by peer")))
        self.assertEqual(key.cancelled, ["sign"])
        error = self._failed(pair, closing=False)
        self.assertIn("the connection closed", str(error))
        self.assertEqual(error.step, State.WAIT_SIGNATURE.value)
        self.assertIsNone(pair.app.reason)  # the application never started

    def test_cancel_when_established_aborts(self) -> None:
        key = ControlledKey()
        pair = Pair(_config(key))
        d = pair.client.when_established()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(pair.transport.disconnecting)

    def test_error_at_once(self) -> None:
        """
        A key holder whose Deferred has already failed when it is returned.
        """
        key = ControlledKey()
        key.sign = lambda data, scheme: fail(RuntimeError("PIN locked"))  # type: ignore[method-assign]
        pair = Pair(_config(key))
        key.release_chain()
        error = self._failed(pair)
        self.assertIn("PIN locked", str(error))
        self.assertEqual(error.step, State.WAIT_SIGNATURE.value)
        self.assertEqual(error.alert, AlertDescription.internal_error)

    def test_raises_instead_of_failing(self) -> None:
        """
        A key holder that raises instead of returning a failed Deferred,
        for the chain or for the signature: the handshake fails at once,
        naming the step, instead of hanging until its timeout.
        """
        for method, step in [
            ("certificate_chain", State.WAIT_CLIENT_CERTIFICATE),
            ("sign", State.WAIT_SIGNATURE),
        ]:
            key = ControlledKey()

            def broken(*args: Any) -> Deferred[Any]:
                raise RuntimeError("agent client misconfigured")

            setattr(key, method, broken)
            pair = Pair(_config(key))
            if method == "sign":
                key.release_chain()
            error = self._failed(pair)
            self.assertIn("agent client misconfigured", str(error))
            self.assertEqual(error.step, step.value)
            self.assertEqual(error.alert, AlertDescription.internal_error)

    def test_chain_not_certificates(self) -> None:
        """
        A chain that is not a list of certificates is the key holder's
        error, reported as such.
        """
        key = ControlledKey()
        pair = Pair(_config(key))
        key.calls[-1][1].callback([b"-----BEGIN CERTIFICATE-----"])
        error = self._failed(pair)
        self.assertEqual(error.step, State.WAIT_CLIENT_CERTIFICATE.value)
        self.assertIn("key holder", str(error))
        self.assertEqual(error.alert, AlertDescription.internal_error)

    def test_handshake_timeout(self) -> None:
        """
        A server that never answers: the handshake times out.
        """
        clock = Clock()
        client = TLSClientProtocol(
            Collector(), _config(None, handshake_timeout=10), "localhost", 443, clock
        )
        transport = StringTransport()
        client.makeConnection(transport)
        d = client.when_established()
        clock.advance(10)
        failure = self.failureResultOf(d, HandshakeFailed)
        self.assertIn("no answer within 10 seconds", str(failure.value))
        self.assertIn(State.WAIT_SERVER_HELLO.value, str(failure.value))


class NoClientKeyTests(SynchronousTestCase):
    def test_certificate_request_without_a_key(self) -> None:
        """
        Asked for a certificate with no key configured: an empty Certificate
        and no CertificateVerify (RFC 5246, section 7.4.6), straight from
        the CertificateRequest to our Finished; a server that requires a
        certificate answers with its alert, which names our flight.
        """
        from cpsdmp.protocols.tls.alerts import AlertReceived

        pair = Pair(_config(None))
        [result] = pair.established
        self.assertIsInstance(result.value, AlertReceived)
        self.assertIn("after our Finished", str(result.value))
        self.assertIn("peer did not return a certificate", str(pair.server_error))
        timings = pair.client._handshake.info.timings  # type: ignore[union-attr]
        self.assertNotIn("WAIT_CLIENT_CERTIFICATE", timings)
        self.assertNotIn("WAIT_SIGNATURE", timings)
        self.assertIn("WAIT_CHANGE_CIPHER_SPEC", timings)

    def test_server_asks_nothing(self) -> None:
        """
        No CertificateRequest and no key: from ServerKeyExchange to our
        Finished, and established.
        """
        pair = Pair(_config(None), ServerContext(client_auth=False))
        [info] = pair.established
        self.assertFalse(info.client_certificate_requested)
        self.assertNotIn("WAIT_SERVER_HELLO_DONE", info.timings)
        self.assertIsNone(info.client_chain)


class ExtendedMasterSecretTests(SynchronousTestCase):
    def test_refused_without(self) -> None:
        """
        A server without the extended master secret is refused, clearly.
        """
        key = ControlledKey()
        pair = Pair(_config(key), ServerContext(extended_master_secret=False))
        [result] = pair.established
        self.assertIn("extended master secret", str(result.value))
        self.assertEqual(result.value.alert, AlertDescription.handshake_failure)
        self.assertEqual(key.calls, [])

    def test_allowed_explicitly(self) -> None:
        pair = Pair(
            _config(
                pki()["client-rsa"].local_key(), allow_no_extended_master_secret=True
            ),
            ServerContext(extended_master_secret=False),
        )
        self.assertEqual(pair.state, State.ESTABLISHED)
        self.assertFalse(pair.established[0].extended_master_secret)


class ClosingTests(SynchronousTestCase):
    def _established(self) -> Pair:
        pair = Pair(_config(pki()["client-rsa"].local_key()))
        self.assertEqual(pair.state, State.ESTABLISHED)
        return pair

    def test_truncation(self) -> None:
        """
        TCP closing without close_notify is reported as truncation.
        """
        pair = self._established()
        pair.client.connectionLost(Failure(ConnectionDone()))
        self.assertIsInstance(pair.app.reason.value, TruncatedConnection)

    def test_close_notify_received(self) -> None:
        """
        The server's close_notify is answered with ours, and the
        application sees a clean close.
        """
        pair = self._established()
        pair.server.shutdown()
        pair.pump()
        self.assertTrue(pair.transport.disconnecting)
        self.assertEqual(
            pair.server.get_shutdown() & SSL.RECEIVED_SHUTDOWN, SSL.RECEIVED_SHUTDOWN
        )
        pair.client.connectionLost(Failure(ConnectionDone()))
        self.assertIsInstance(pair.app.reason.value, ConnectionDone)

    def test_close_notify_sent(self) -> None:
        pair = self._established()
        pair.client.loseConnection()
        pair.pump()
        self.assertEqual(
            pair.server.get_shutdown() & SSL.RECEIVED_SHUTDOWN, SSL.RECEIVED_SHUTDOWN
        )

    def test_hello_request_answered_and_connection_goes_on(self) -> None:
        """
        A HelloRequest gets a no_renegotiation warning (OpenSSL reads it),
        and the connection stays up on our side: data the server sent after
        its HelloRequest reaches the application.
        """
        pair = self._established()
        pair.server.renegotiate()
        try:
            pair.server.do_handshake()
        except SSL.WantReadError:
            pass
        pair.server.send(b"after the hello request")
        pair.client.dataReceived(pair.server.bio_read(1 << 20))
        self.assertEqual(bytes(pair.app.received), b"after the hello request")
        self.assertEqual(pair.transport.value()[0], 21)  # our alert record
        self.assertFalse(pair.transport.disconnecting)
        self.assertEqual(pair.state, State.ESTABLISHED)
        pair.pump()
        # OpenSSL took our warning as a refusal of its renegotiation
        self.assertIn("no renegotiation", str(pair.server_error))


class ResumptionTests(SynchronousTestCase):
    def test_resumed_handshake_calls_no_key(self) -> None:
        """
        A second connection with the same cache and identity resumes: no
        call to the key, the client chain kept from the first.
        """
        cache = SessionCache(Clock())
        context = ServerContext()
        first = Pair(
            _config(pki()["client-rsa"].local_key(), session_cache=cache), context
        )
        self.assertEqual(len(cache), 1)
        key = ControlledKey()
        second = Pair(
            _config(
                key, session_cache=cache, client_identity=first.client.config.identity()
            ),
            context,
        )
        self.assertEqual(second.state, State.ESTABLISHED)
        self.assertTrue(second.established[0].resumed)
        self.assertEqual(key.calls, [])
        self.assertEqual(
            set(second.established[0].timings),
            {
                "START",
                "WAIT_SERVER_HELLO",
                "WAIT_RESUMED_CHANGE_CIPHER_SPEC",
                "WAIT_RESUMED_FINISHED",
            },
        )
        # What the full handshake verified, leaf to root, is reported again.
        verified = first.established[0].verified_chain
        self.assertEqual(verified[-1], pki().root)
        self.assertEqual(second.established[0].verified_chain, verified)

    def test_not_cached_before_finished(self) -> None:
        """
        A handshake that fails before the server Finished leaves nothing in
        the cache.
        """
        cache = SessionCache(Clock())
        key = ControlledKey()
        pair = Pair(_config(key, session_cache=cache))
        key.release_chain()
        key.calls[-1][1].errback(RuntimeError("no"))
        self.assertEqual(pair.state, State.FAILED)
        self.assertEqual(len(cache), 0)


# What a genuine server answers to our ClientHello, at the least.
_GOOD_EXTENSIONS = [
    (ExtensionType.extended_master_secret, b""),
    (ExtensionType.renegotiation_info, b"\x00"),
]


def _server_hello(extensions: list[tuple[int, bytes]], suite: int = 0xC02F) -> bytes:
    ext = b"".join(struct.pack(">HH", t, len(d)) + d for t, d in extensions)
    body = (
        b"\x03\x03"
        + os.urandom(32)
        + vector(b"", 1)
        + struct.pack(">HB", suite, 0)
        + vector(ext, 2)
    )
    return handshake(HandshakeType.server_hello, body)


class ScriptedServerTests(SynchronousTestCase):
    """
    Hand-made server messages for what OpenSSL would never send.
    """

    def _client(self) -> tuple[TLSClientProtocol, StringTransport, list[Any]]:
        key = ControlledKey()
        client = TLSClientProtocol(Collector(), _config(key), "localhost", 443, Clock())
        transport = StringTransport()
        client.makeConnection(transport)
        results: list[Any] = []
        client.when_established().addBoth(results.append)
        hello = transport.value()
        self.assertEqual(hello[0], 22)
        transport.clear()
        return client, transport, results

    def _send(self, client: TLSClientProtocol, data: bytes) -> None:
        client.dataReceived(struct.pack(">BHH", 22, 0x0303, len(data)) + data)

    def _alert(self, transport: StringTransport) -> int:
        sent = transport.value()
        self.assertEqual(sent[:5], struct.pack(">BHH", 21, 0x0303, 2))
        self.assertEqual(sent[5], 2)
        return sent[6]

    def test_unoffered_extension(self) -> None:
        client, transport, results = self._client()
        self._send(
            client,
            _server_hello([(ExtensionType.extended_master_secret, b""), (0x1234, b"")]),
        )
        self.assertEqual(self._alert(transport), AlertDescription.unsupported_extension)
        self.assertIn("did not offer", str(results[0].value))

    def test_alpn_not_asked(self) -> None:
        client, transport, results = self._client()
        self._send(
            client,
            _server_hello(
                [
                    (ExtensionType.extended_master_secret, b""),
                    (
                        ExtensionType.application_layer_protocol_negotiation,
                        vector(vector(b"h2", 1), 2),
                    ),
                ]
            ),
        )
        self.assertEqual(self._alert(transport), AlertDescription.unsupported_extension)

    def test_unoffered_suite(self) -> None:
        client, transport, results = self._client()
        self._send(client, _server_hello([(23, b"")], suite=0x009C))
        self.assertEqual(self._alert(transport), AlertDescription.illegal_parameter)

    def test_unoffered_curve(self) -> None:
        """
        A ServerKeyExchange on secp521r1, which we did not offer.
        """
        client, transport, results = self._client()
        chain = [c.public_bytes(serialization_der()) for c in pki()["server-rsa"].chain]
        ske = (
            b"\x03"
            + struct.pack(">H", 25)
            + vector(b"\x04" + bytes(132), 1)
            + b"\x04\x01"
            + vector(bytes(256), 2)
        )
        # split the three messages across records, one inside a header
        data = (
            _server_hello(_GOOD_EXTENSIONS)
            + encode_certificate(chain)
            + handshake(HandshakeType.server_key_exchange, ske)
        )
        cut = len(data) - len(ske) - 2
        self._send(client, data[:cut])
        self._send(client, data[cut:])
        self.assertEqual(self._alert(transport), AlertDescription.illegal_parameter)
        self.assertIn("group 25", str(results[0].value))

    def test_forged_server_key_exchange(self) -> None:
        """
        An X25519 share whose signature does not verify with the server
        certificate is decrypt_error; a signature scheme we did not offer is
        illegal_parameter.
        """
        chain = [c.public_bytes(serialization_der()) for c in pki()["server-rsa"].chain]
        for scheme, alert in [
            (b"\x04\x01", AlertDescription.decrypt_error),
            (b"\x02\x01", AlertDescription.illegal_parameter),  # rsa_pkcs1_sha1
        ]:
            client, transport, results = self._client()
            ske = (
                b"\x03"
                + struct.pack(">H", 29)
                + vector(os.urandom(32), 1)
                + scheme
                + vector(os.urandom(256), 2)
            )
            self._send(
                client,
                _server_hello(_GOOD_EXTENSIONS)
                + encode_certificate(chain)
                + handshake(HandshakeType.server_key_exchange, ske),
            )
            self.assertEqual(self._alert(transport), alert)
            self.assertIn(State.WAIT_SERVER_KEY_EXCHANGE.value, str(results[0].value))

    def test_record_overflow_alert(self) -> None:
        """
        A record with more than 2^14 bytes of plaintext: record_overflow.
        """
        client, transport, results = self._client()
        self._send(client, bytes(2**14 + 1))
        self.assertEqual(self._alert(transport), AlertDescription.record_overflow)

    def test_unexpected_message(self) -> None:
        client, transport, results = self._client()
        self._send(client, handshake(HandshakeType.server_hello_done, b""))
        self.assertEqual(self._alert(transport), AlertDescription.unexpected_message)
        self.assertIn(State.WAIT_SERVER_HELLO.value, str(results[0].value))

    def test_fatal_alert_named(self) -> None:
        client, transport, results = self._client()
        client.dataReceived(struct.pack(">BHHBB", 21, 0x0303, 2, 2, 40))
        self.assertIn(
            "fatal alert handshake_failure while waiting for ServerHello",
            str(results[0].value),
        )
        self.assertEqual(transport.value(), b"")  # no alert answers an alert


class ScriptedServer:
    """
    A TLS 1.2 server written out message by message with the test PKI's RSA
    server key (X25519, TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, the extended
    master secret), for what OpenSSL would never send: our protocol on a
    StringTransport, each answer chosen by the test.
    """

    suite = SUITES_BY_CODE[0xC02F]

    def __init__(self, config: TLSClientConfig | None = None) -> None:
        self.clock = Clock()
        self.app = Collector()
        self.client = TLSClientProtocol(
            self.app, config or _config(None), "localhost", 443, self.clock
        )
        self.transport = StringTransport()
        self.results: list[Any] = []
        self.client.makeConnection(self.transport)
        self.client.when_established().addBoth(self.results.append)
        self.transcript = bytearray()
        self.incoming = RecordLayer()
        self.outgoing = RecordLayer()
        self.reassembler = HandshakeReassembler()
        self.received: list[int] = []
        self.server_random = os.urandom(32)
        self.read()
        assert self.received == [HandshakeType.client_hello], self.received

    # -- what the client says

    def read(self) -> list[tuple[int, bytes]]:
        """
        Take the records the client wrote since the last read, following
        its handshake messages (and switching keys at its ChangeCipherSpec).

        @return: the records, as content type and plaintext.
        """
        self.incoming.feed(self.transport.value())
        self.transport.clear()
        records = []
        while (record := self.incoming.next_record()) is not None:
            records.append(record)
            content_type, payload = record
            if content_type == ContentType.change_cipher_spec:
                self.incoming.set_read_protection(self.protections[0])
            elif content_type == ContentType.handshake:
                self.reassembler.feed(payload)
                while (message := self.reassembler.next_message()) is not None:
                    self._client_message(*message)
        return records

    def _client_message(self, msg_type: int, body: bytes, raw: bytes) -> None:
        self.received.append(msg_type)
        if msg_type == HandshakeType.client_hello:
            self.client_hello = ClientHello.decode(body)
        elif msg_type == HandshakeType.client_key_exchange:
            self.transcript += raw
            public = x25519.X25519PublicKey.from_public_bytes(body[1:])
            self.master_secret = prf.extended_master_secret(
                hashes.SHA256(), self.ecdhe.exchange(public), self._hash()
            )
            block = prf.key_block(
                hashes.SHA256(),
                self.master_secret,
                self.client_hello.random,
                self.server_random,
                key_block_length(self.suite),
            )
            self.protections = protections_for(self.suite, block)
            return
        elif msg_type == HandshakeType.finished:
            expected = prf.verify_data(
                hashes.SHA256(), self.master_secret, b"client finished", self._hash()
            )
            assert body == expected, "the client's Finished is wrong"
        self.transcript += raw

    def alert(self) -> int:
        """
        @return: the description of the fatal alert the client sent.
        """
        [(content_type, payload)] = self.read()
        assert content_type == ContentType.alert, content_type
        assert payload[0] == 2, payload
        return payload[1]

    def _hash(self) -> bytes:
        h = hashes.Hash(hashes.SHA256())
        h.update(bytes(self.transcript))
        return h.finalize()

    # -- what the server says

    def send(self, content_type: int, data: bytes) -> None:
        self.client.dataReceived(self.outgoing.seal(content_type, data))

    def send_handshake(self, message: bytes) -> None:
        self.transcript += message
        self.send(ContentType.handshake, message)

    def hello(
        self,
        extensions: list[tuple[int, bytes]] | None = None,
        session_id: bytes = b"",
    ) -> None:
        if extensions is None:
            extensions = _GOOD_EXTENSIONS
        ext = b"".join(struct.pack(">HH", t, len(d)) + d for t, d in extensions)
        body = (
            b"\x03\x03"
            + self.server_random
            + vector(session_id, 1)
            + struct.pack(">HB", self.suite.code, 0)
            + vector(ext, 2)
        )
        self.send_handshake(handshake(HandshakeType.server_hello, body))

    def certificate(self) -> None:
        chain = pki()["server-rsa"].chain
        self.send_handshake(
            encode_certificate([c.public_bytes(Encoding.DER) for c in chain])
        )

    def key_exchange(self) -> None:
        self.ecdhe = x25519.X25519PrivateKey.generate()
        params = b"\x03" + struct.pack(">H", 29)
        params += vector(self.ecdhe.public_key().public_bytes_raw(), 1)
        key = pki()["server-rsa"].key
        assert isinstance(key, rsa.RSAPrivateKey)
        signature = key.sign(
            self.client_hello.random + self.server_random + params,
            padding.PKCS1v15(),
            hashes.SHA256(),
        )
        body = params + b"\x04\x01" + vector(signature, 2)
        self.send_handshake(handshake(HandshakeType.server_key_exchange, body))

    def hello_done(self) -> None:
        self.send_handshake(handshake(HandshakeType.server_hello_done, b""))

    def up_to_client_finished(self, **hello: Any) -> None:
        """
        ServerHello (with C{hello}'s arguments) to ServerHelloDone, then
        read the client's flight up to its Finished.
        """
        self.hello(**hello)
        self.certificate()
        self.key_exchange()
        self.hello_done()
        self.read()
        assert self.received[-1] == HandshakeType.finished, self.received

    def new_session_ticket(self, ticket: bytes, lifetime: int = 300) -> None:
        body = struct.pack(">I", lifetime) + vector(ticket, 2)
        self.send_handshake(handshake(HandshakeType.new_session_ticket, body))

    def change_cipher_spec(self) -> None:
        self.send(ContentType.change_cipher_spec, b"\x01")
        self.outgoing.set_write_protection(self.protections[1])

    def finished(self, verify_data: bytes | None = None) -> None:
        if verify_data is None:
            verify_data = prf.verify_data(
                hashes.SHA256(), self.master_secret, b"server finished", self._hash()
            )
        self.send_handshake(encode_finished(verify_data))


class ScriptedHandshakeTests(SynchronousTestCase):
    """
    Whole handshakes against the scripted server: what it does right is
    accepted, each thing it does wrong ends with the right alert.
    """

    def test_genuine(self) -> None:
        """
        The scripted server itself completes a handshake: what the other
        tests change is what makes them fail.
        """
        server = ScriptedServer()
        server.up_to_client_finished()
        server.change_cipher_spec()
        server.finished()
        [info] = server.results
        self.assertIsInstance(info, TLSInfo)
        server.client.write(b"ping")
        self.assertEqual(server.read(), [(ContentType.application_data, b"ping")])

    def test_forged_finished(self) -> None:
        """
        A server Finished that does not match the handshake: decrypt_error
        (sent under the new keys), the step named, nothing cached.
        """
        cache = SessionCache(Clock())
        server = ScriptedServer(_config(None, session_cache=cache))
        server.up_to_client_finished(
            session_id=b"s" * 32,
        )
        server.change_cipher_spec()
        server.finished(bytes(12))
        self.assertEqual(server.alert(), AlertDescription.decrypt_error)
        [failure] = server.results
        self.assertIsInstance(failure.value, HandshakeFailed)
        self.assertEqual(failure.value.step, State.WAIT_FINISHED.value)
        self.assertIn("Finished does not match", str(failure.value))
        self.assertEqual(len(cache), 0)

    def test_change_cipher_spec_too_early(self) -> None:
        """
        A ChangeCipherSpec before the key exchange (the CCS injection of
        CVE-2014-0224) is unexpected_message.
        """
        server = ScriptedServer()
        server.hello()
        server.certificate()
        server.send(ContentType.change_cipher_spec, b"\x01")
        self.assertEqual(server.alert(), AlertDescription.unexpected_message)
        [failure] = server.results
        self.assertEqual(failure.value.step, State.WAIT_SERVER_KEY_EXCHANGE.value)

    def test_change_cipher_spec_once_established(self) -> None:
        server = ScriptedServer()
        server.up_to_client_finished()
        server.change_cipher_spec()
        server.finished()
        server.send(ContentType.change_cipher_spec, b"\x01")
        self.assertEqual(server.alert(), AlertDescription.unexpected_message)
        self.assertTrue(server.transport.disconnecting)

    def test_ticket_not_announced(self) -> None:
        """
        A NewSessionTicket without the session_ticket extension in the
        ServerHello is unexpected_message.
        """
        server = ScriptedServer()
        server.up_to_client_finished()
        server.new_session_ticket(b"ticket")
        self.assertEqual(server.alert(), AlertDescription.unexpected_message)
        self.assertIn("did not announce", str(server.results[0].value))

    def test_announced_ticket_missing(self) -> None:
        server = ScriptedServer()
        server.up_to_client_finished(
            extensions=[*_GOOD_EXTENSIONS, (ExtensionType.session_ticket, b"")]
        )
        server.send(ContentType.change_cipher_spec, b"\x01")
        self.assertEqual(server.alert(), AlertDescription.unexpected_message)
        self.assertIn("sent none", str(server.results[0].value))

    def test_ticket_cached_after_finished(self) -> None:
        """
        A ticket is cached with the session once the server Finished is
        verified, and offered by the next connection.
        """
        cache = SessionCache(Clock())
        server = ScriptedServer(_config(None, session_cache=cache))
        server.up_to_client_finished(
            extensions=[*_GOOD_EXTENSIONS, (ExtensionType.session_ticket, b"")]
        )
        server.new_session_ticket(b"opaque ticket")
        server.change_cipher_spec()
        self.assertEqual(len(cache), 0)
        server.finished()
        self.assertTrue(server.results[0].ticket_received)
        again = ScriptedServer(_config(None, session_cache=cache))
        self.assertEqual(again.client_hello.session_ticket, b"opaque ticket")
        self.assertEqual(len(again.client_hello.session_id), 32)

    def test_empty_ticket_is_no_ticket(self) -> None:
        """
        A NewSessionTicket with an empty ticket (RFC 5077, section 3.3: the
        server changed its mind) leaves the session resumable by its ID: the
        next connection offers that ID, not an empty ticket.
        """
        cache = SessionCache(Clock())
        server = ScriptedServer(_config(None, session_cache=cache))
        server.up_to_client_finished(
            extensions=[*_GOOD_EXTENSIONS, (ExtensionType.session_ticket, b"")],
            session_id=b"i" * 32,
        )
        server.new_session_ticket(b"")
        server.change_cipher_spec()
        server.finished()
        self.assertFalse(server.results[0].ticket_received)
        again = ScriptedServer(_config(None, session_cache=cache))
        self.assertEqual(again.client_hello.session_id, b"i" * 32)
        self.assertEqual(again.client_hello.session_ticket, b"")

    def test_extended_master_secret_not_empty(self) -> None:
        """
        RFC 7627, section 5.1: the server's extension is empty.
        """
        server = ScriptedServer()
        server.hello(
            extensions=[
                (ExtensionType.extended_master_secret, b"\x00"),
                (ExtensionType.renegotiation_info, b"\x00"),
            ]
        )
        self.assertEqual(server.alert(), AlertDescription.decode_error)
        self.assertIn("extended_master_secret", str(server.results[0].value))

    def test_renegotiation_info_not_empty(self) -> None:
        """
        RFC 5746, section 3.4: a non-empty renegotiation_info on an initial
        handshake is handshake_failure.
        """
        server = ScriptedServer()
        server.hello(
            extensions=[
                (ExtensionType.extended_master_secret, b""),
                (ExtensionType.renegotiation_info, b"\x0c" + bytes(12)),
            ]
        )
        self.assertEqual(server.alert(), AlertDescription.handshake_failure)

    def test_no_renegotiation_info(self) -> None:
        """
        A server that does not say it supports secure renegotiation (RFC
        5746) may splice our handshake, client certificate included, after
        an attacker's data as a renegotiation: refused, as OpenSSL's clients
        do, unless the caller explicitly allows it.
        """
        server = ScriptedServer()
        server.hello(extensions=[(ExtensionType.extended_master_secret, b"")])
        self.assertEqual(server.alert(), AlertDescription.handshake_failure)
        self.assertIn("renegotiation_info", str(server.results[0].value))

        allowed = ScriptedServer(_config(None, allow_no_renegotiation_info=True))
        allowed.up_to_client_finished(
            extensions=[(ExtensionType.extended_master_secret, b"")]
        )
        allowed.change_cipher_spec()
        allowed.finished()
        self.assertIsInstance(allowed.results[0], TLSInfo)


def serialization_der() -> Any:
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER


class ReassemblerTests(SynchronousTestCase):
    def test_byte_by_byte(self) -> None:
        """
        Messages fed one byte at a time, splitting headers, come out whole.
        """
        messages = [
            handshake(2, b"hello"),
            handshake(11, bytes(300)),
            handshake(14, b""),
        ]
        r = HandshakeReassembler()
        out = []
        for byte in b"".join(messages):
            r.feed(bytes((byte,)))
            m = r.next_message()
            if m is not None:
                out.append(m[2])
        self.assertEqual(out, messages)
        self.assertFalse(r.pending)

    def test_several_in_one(self) -> None:
        r = HandshakeReassembler()
        r.feed(handshake(2, b"a") + handshake(14, b"") + handshake(11, b"b")[:3])
        self.assertEqual(r.next_message(), (2, b"a", handshake(2, b"a")))
        self.assertEqual(r.next_message()[0], 14)
        self.assertIsNone(r.next_message())
        self.assertTrue(r.pending)


def _client_hello_extensions(host: str, **kw: Any) -> dict[int, bytes]:
    """
    @return: the extensions of the ClientHello our protocol sends to C{host}.
    """
    client = TLSClientProtocol(Collector(), _config(None, **kw), host, 443, Clock())
    transport = StringTransport()
    client.makeConnection(transport)
    record = transport.value()
    assert record[0] == 22
    body = record[5 + 4 :]
    offset = 2 + 32
    offset += 1 + body[offset]  # session_id
    offset += 2 + int.from_bytes(body[offset : offset + 2], "big")  # suites
    offset += 1 + body[offset]  # compression methods
    end = offset + 2 + int.from_bytes(body[offset : offset + 2], "big")
    offset += 2
    extensions = {}
    while offset < end:
        ext_type, length = struct.unpack(">HH", body[offset : offset + 4])
        extensions[ext_type] = body[offset + 4 : offset + 4 + length]
        offset += 4 + length
    assert offset == len(body)
    return extensions


class ClientHelloTests(SynchronousTestCase):
    def test_extensions_by_name(self) -> None:
        """
        To a DNS name: server_name with that host, the groups in order,
        uncompressed points, EMS, an empty renegotiation_info, an empty
        session_ticket, no ALPN unless asked.
        """
        ext = _client_hello_extensions("dmp.example")
        self.assertEqual(
            ext[ExtensionType.server_name], b"\x00\x0e\x00\x00\x0bdmp.example"
        )
        self.assertEqual(
            ext[ExtensionType.supported_groups], b"\x00\x06\x00\x1d\x00\x17\x00\x18"
        )
        self.assertEqual(ext[ExtensionType.ec_point_formats], b"\x01\x00")
        self.assertEqual(ext[ExtensionType.extended_master_secret], b"")
        self.assertEqual(ext[ExtensionType.renegotiation_info], b"\x00")
        self.assertEqual(ext[ExtensionType.session_ticket], b"")
        self.assertIn(b"\x04\x01", ext[ExtensionType.signature_algorithms])
        self.assertNotIn(ExtensionType.application_layer_protocol_negotiation, ext)

    def test_no_sni_for_ip(self) -> None:
        for host in ("127.0.0.1", "::1"):
            self.assertNotIn(ExtensionType.server_name, _client_hello_extensions(host))

    def test_alpn_when_asked(self) -> None:
        ext = _client_hello_extensions("dmp.example", alpn=[b"http/1.1"])
        self.assertEqual(
            ext[ExtensionType.application_layer_protocol_negotiation],
            b"\x00\x09\x08http/1.1",
        )


class ConfigTests(SynchronousTestCase):
    def test_alpn_names_checked(self) -> None:
        """
        ALPN names that a ClientHello cannot carry are refused when the
        configuration is made, not once connected.
        """
        for names in ([b""], [b"h" * 256], [b"h" * 255] * 300):
            with self.assertRaises(ValueError):
                _config(None, alpn=names)
        self.assertEqual(_config(None, alpn=[b"h" * 255]).alpn, [b"h" * 255])

    def test_client_hello_not_made(self) -> None:
        """
        A ClientHello that cannot be encoded (here a configuration changed
        after its checks) fails the handshake at once, its waiters told and
        the connection closed, rather than leaving them waiting.
        """
        config = _config(None)
        config.alpn = [b"h" * 256]
        client = TLSClientProtocol(Collector(), config, "localhost", 443, Clock())
        transport = StringTransport()
        results: list[Any] = []
        client.when_established().addBoth(results.append)
        client.makeConnection(transport)
        self.assertIsInstance(results[0].value, HandshakeFailed)
        self.assertIn("the ClientHello could not be made", str(results[0].value))
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)


class ClientCertificateMessageTests(SynchronousTestCase):
    def test_encoded_once_per_chain(self) -> None:
        """
        The same certificate objects give the message encoded the first
        time; other certificates, even equal ones, are encoded afresh.
        """
        config = _config(None)
        chain = pki()["client-rsa"].chain
        first = config.client_certificate_message(chain)
        self.assertEqual(
            first, encode_certificate([c.public_bytes(Encoding.DER) for c in chain])
        )
        self.assertIs(config.client_certificate_message(list(chain)), first)
        other = pki()["client-ec"].chain
        self.assertEqual(
            config.client_certificate_message(other),
            encode_certificate([c.public_bytes(Encoding.DER) for c in other]),
        )
        equal = [
            x509.load_der_x509_certificate(c.public_bytes(Encoding.DER)) for c in chain
        ]
        again = config.client_certificate_message(equal)
        self.assertEqual(again, first)
        self.assertIsNot(again, first)


class PrehashedVerificationTests(SynchronousTestCase):
    def test_same_answer_as_over_the_data(self) -> None:
        """
        A signature checked against the digest of the signed bytes gives
        the answer it gives against the bytes, for every scheme of each
        kind of key; a signature over other bytes fails both ways.
        """
        data = os.urandom(3000)
        for identity in ("client-rsa", "client-ec"):
            key = pki()[identity].local_key()
            public = pki()[identity].chain[0].public_key()
            for scheme in key.supported_signature_schemes:
                signature = ControlledKey.successResultOf(key.sign(data, scheme))
                h = hashes.Hash(scheme.hash_algorithm)
                h.update(data)
                digest = h.finalize()
                self.assertTrue(verify_signature(public, scheme, signature, data))
                self.assertTrue(
                    verify_signature(public, scheme, signature, digest, prehashed=True)
                )
                other = hashes.Hash(scheme.hash_algorithm)
                other.update(data + b"!")
                self.assertFalse(
                    verify_signature(
                        public, scheme, signature, other.finalize(), prehashed=True
                    )
                )


class UnexpectedErrorTests(SynchronousTestCase):
    def test_our_own_error(self) -> None:
        """
        An error of ours (here, in the chain check) while handling a server
        message still ends the handshake properly: internal_error sent, the
        step named, the error logged.
        """

        class Broken(VerifiedChains):
            def check_encoded(self, *args: Any, **kw: Any) -> Any:
                raise RuntimeError("no memory left for chains")

        pair = Pair(_config(pki()["client-rsa"].local_key(), verified_chains=Broken()))
        [result] = pair.established
        self.assertIsInstance(result.value, HandshakeFailed)
        self.assertEqual(result.value.step, State.WAIT_CERTIFICATE.value)
        self.assertEqual(result.value.alert, AlertDescription.internal_error)
        self.assertIn("no memory left for chains", str(result.value))
        self.assertIn("internal error", str(pair.server_error))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class EstablishedErrorTests(SynchronousTestCase):
    def test_forged_record_after_handshake(self) -> None:
        """
        A record that fails its check once established: bad_record_mac is
        sent and the application learns why the connection ended.
        """
        from cpsdmp.protocols.tls.alerts import ConnectionFailed

        pair = Pair(_config(pki()["client-rsa"].local_key()))
        pair.server.send(b"genuine")
        record = bytearray(pair.server.bio_read(1 << 20))
        record[-1] ^= 1
        pair.client.dataReceived(bytes(record))
        self.assertTrue(pair.transport.disconnecting)
        pair.pump()
        self.assertIn("bad record mac", str(pair.server_error))
        pair.client.connectionLost(Failure(ConnectionDone()))
        self.assertIsInstance(pair.app.reason.value, ConnectionFailed)
        self.assertIn("bad_record_mac", str(pair.app.reason.value))
        self.assertEqual(bytes(pair.app.received), b"")

    def test_sequence_numbers_run_out(self) -> None:
        """
        An application writing after the last sequence number available for
        data: the connection closes with our alert (under the number kept
        for it), the application learns why, and its write raises nothing.
        """
        from cpsdmp.protocols.tls.alerts import ConnectionFailed

        pair = Pair(_config(pki()["client-rsa"].local_key()))
        pair.client._records._write_seq = 2**64 - 2
        pair.client.write(b"last")
        self.assertEqual(pair.transport.value()[0], ContentType.application_data)
        pair.transport.clear()
        pair.client.write(b"one too many")
        self.assertEqual(pair.transport.value()[0], ContentType.alert)
        self.assertTrue(pair.transport.disconnecting)
        pair.client.connectionLost(Failure(ConnectionDone()))
        self.assertIsInstance(pair.app.reason.value, ConnectionFailed)
        self.assertIn("sequence number", str(pair.app.reason.value))


class ClientHelloDecodeTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """
        A ClientHello we encode decodes back to its random, suites, groups,
        signature schemes and server_name.
        """
        from cpsdmp.protocols.tls.messages import ClientHello

        hello = ClientHello(
            os.urandom(32),
            b"\x01" * 32,
            [0xC02F, 0xC030],
            "lps2.dmp.gouv.fr",
            [29, 23],
            [0x0401, 0x0804],
        )
        decoded = ClientHello.decode(hello.encode()[4:])
        self.assertEqual(decoded.random, hello.random)
        self.assertEqual(decoded.session_id, hello.session_id)
        self.assertEqual(decoded.cipher_suites, hello.cipher_suites)
        self.assertEqual(decoded.server_name, "lps2.dmp.gouv.fr")
        self.assertEqual(decoded.groups, [29, 23])
        self.assertEqual(decoded.signature_schemes, [0x0401, 0x0804])
        without = ClientHello(os.urandom(32), b"", [0xC02F], None, [29], [0x0401])
        self.assertIsNone(ClientHello.decode(without.encode()[4:]).server_name)

    def test_malformed(self) -> None:
        """
        Any cut or extra byte, or another version, is a decode_error.
        """
        from cpsdmp.protocols.tls.alerts import ProtocolViolation
        from cpsdmp.protocols.tls.messages import ClientHello

        body = ClientHello(
            os.urandom(32), b"", [0xC02F], "localhost", [29], [0x0401]
        ).encode()[4:]
        for bad in (body[:-1], body + b"\x00", b"\x03\x01" + body[2:], body[:40]):
            with self.assertRaises(ProtocolViolation) as caught:
                ClientHello.decode(bad)
            self.assertEqual(
                caught.exception.description, AlertDescription.decode_error
            )
