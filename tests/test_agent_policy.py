"""
Tests for the agent's signing policy: transcripts made by our TLS client
against a real OpenSSL server, accepted as they are and refused once
altered; the submission-set SignedInfo; and, through a running agent, the
403s, the rate limit, the audit log and the whole chain from our TLS client
through the agent and the card to the sandbox DMP.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import random
import sys
import uuid
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from lxml import etree
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface import implementer

import cpsdmp
from cpsdmp.agent import policy as policy_module
from cpsdmp.agent import problems, tap
from cpsdmp.agent.audit import (
    DEFAULT_RATE_LIMIT,
    AuditLog,
    RateLimit,
    RateLimiter,
    context_id,
)
from cpsdmp.agent.card import KeyUsage
from cpsdmp.agent.client import AgentError, CpsAgentClient, open_session
from cpsdmp.agent.policy import (
    DMP_SERVERS,
    REPLAY_WINDOW,
    RecentRandoms,
    SigningPolicy,
)
from cpsdmp.agent.transcript import Refused
from cpsdmp.protocols.soap import read_message
from cpsdmp.protocols.tls.endpoint import TLSAgentEndpointFactory, TLSClientEndpoint
from cpsdmp.protocols.tls.handshake import TLSClientConfig
from cpsdmp.protocols.tls.interfaces import IRemoteKey
from cpsdmp.protocols.tls.messages import (
    CertificateRequest,
    HandshakeReassembler,
    HandshakeType,
    Reader,
    decode_certificate,
    encode_certificate,
    handshake,
    vector,
)
from cpsdmp.protocols.tls.schemes import SignatureScheme
from cpsdmp.protocols.tls.suites import NamedGroup
from cpsdmp.sandbox.tap import SandboxService
from cpsdmp.xds.signature import (
    _skeleton,
    document_uri,
    sign_submission,
    to_be_signed,
)
from cpsdmp.xds.transactions import (
    DmpEndpoints,
    existence_test,
    new_submission,
    read_existence,
)
from cpsdmp.xds.vihf import VihfRequest
from tests.agent_support import (
    RunningAgent,
    signature_request,
    start_agent,
    token_backend,
)
from tests.conformance.test_transactions import cda_entries
from tests.pki import self_signed
from tests.test_agent_http import AgentTestCase
from tests.test_sandbox import CDA_PATIENT, _professional
from tests.tlssupport import ServerContext, pki
from tests.xdsvalues import DEFAULTS, PROFESSIONAL, SOFTWARE, STRUCTURE

# Transcript ----------------------------------------------------------------


@implementer(IRemoteKey)
class RecordingKey:
    """
    A local key that keeps what the TLS client asks it to sign.
    """

    def __init__(self, identity: str = "client-rsa") -> None:
        self._key = pki()[identity].local_key()
        self.supported_signature_schemes = self._key.supported_signature_schemes
        self.signed: list[bytes] = []

    def certificate_chain(self) -> Deferred[list[x509.Certificate]]:
        return self._key.certificate_chain()

    def sign(self, data: bytes, scheme: SignatureScheme) -> Deferred[bytes]:
        self.signed.append(data)
        return self._key.sign(data, scheme)


@inlineCallbacks
def capture(testcase: TestCase, host: str, **config: Any) -> Any:
    """
    Run our TLS client, with a local key, against a pyOpenSSL server
    asking for a client certificate; C{config} goes to the client's
    L{TLSClientConfig}.

    @return: a Deferred that fires with the transcript the client had signed.
    """
    port = reactor.listenSSL(  # type: ignore[attr-defined]
        0, Factory.forProtocol(Protocol), ServerContext(), interface="127.0.0.1"
    )
    testcase.addCleanup(port.stopListening)
    key = RecordingKey()
    config = TLSClientConfig(roots=[pki().root], remote_key=key, **config)
    endpoint = TLSClientEndpoint.for_host(reactor, host, port.getHost().port, config)
    protocol = yield endpoint.connect(Factory.forProtocol(Protocol))
    protocol.transport.loseConnection()
    testcase.assertEqual(len(key.signed), 1)
    return key.signed[0]


def messages(transcript: bytes) -> list[bytes]:
    """
    @return: the transcript's messages, raw, header included.
    """
    reassembler = HandshakeReassembler()
    reassembler.feed(transcript)
    raws = []
    while (message := reassembler.next_message()) is not None:
        raws.append(message[2])
    return raws


# The card's chain as the agent serves it, DER: what the policy compares
# the client Certificate with. The test PKI's client certificate has no
# intermediate.
CARD = [c.public_bytes(Encoding.DER) for c in pki()["client-rsa"].chain]


def hello_fields(body: bytes, server: bool = False) -> dict[str, Any]:
    """
    @return: the fields of a ClientHello body (or a ServerHello's), raw,
        the extensions as a list of (type, data).
    """
    reader = Reader(body, "hello")
    fields: dict[str, Any] = {"version": reader.take(2), "random": reader.take(32)}
    fields["session_id"] = reader.vector(1)
    if server:
        fields["suites"], fields["compression"] = reader.take(2), reader.take(1)
    else:
        fields["suites"], fields["compression"] = reader.vector(2), reader.vector(1)
    listed = Reader(reader.vector(2), "extensions")
    reader.done()
    fields["extensions"] = []
    while listed.remaining():
        fields["extensions"].append((listed.uint(2), listed.vector(2)))
    fields["server"] = server
    return fields


def build_hello(fields: dict[str, Any]) -> bytes:
    """
    @return: the hello body L{hello_fields} read, from its fields.
    """
    suites, compression = fields["suites"], fields["compression"]
    if not fields["server"]:
        suites, compression = vector(suites, 2), vector(compression, 1)
    extensions = b"".join(
        t.to_bytes(2, "big") + vector(d, 2) for t, d in fields["extensions"]
    )
    return (
        fields["version"]
        + fields["random"]
        + vector(fields["session_id"], 1)
        + suites
        + compression
        + vector(extensions, 2)
        + fields.get("trailer", b"")
    )


def fields_extensions(fields: dict[str, Any]) -> list[tuple[int, bytes]]:
    extensions: list[tuple[int, bytes]] = fields["extensions"]
    return extensions


def replace(fields: dict[str, Any], ext_type: int, data: bytes) -> None:
    """
    Put C{data} in the hello's extension C{ext_type}, in its place.
    """
    fields["extensions"] = [
        (t, data if t == ext_type else d) for t, d in fields["extensions"]
    ]


def policy(**kw: Any) -> SigningPolicy:
    kw.setdefault("allowed_servers", ["localhost", "127.0.0.1"])
    return SigningPolicy(kw.pop("roots", [pki().root]), **kw)


class TranscriptTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def setUp(self) -> Any:
        self.transcript = yield capture(self, "localhost")

    def refused(
        self,
        data: bytes,
        why: str,
        card: list[bytes] = CARD,
        algorithm: str = "SHA256WithRSA",
        **kw: Any,
    ) -> None:
        decision = policy(**kw).check_authentication(data, card, algorithm)
        self.assertFalse(decision.allowed)
        self.assertIn(why, decision.reason)

    def test_genuine(self) -> None:
        """
        The transcript of a real handshake with an allowed server is
        accepted, named by its server_name.
        """
        decision = policy().check_authentication(self.transcript, CARD)
        self.assertTrue(decision.allowed, decision.reason)
        self.assertEqual(decision.subject, "localhost")
        self.assertEqual(len(messages(self.transcript)), 8)

    @inlineCallbacks
    def test_ip_address(self) -> Any:
        """
        To an IP address the client sends no server_name: the certificate
        must then be valid for an IP entry of the allow-list; a DNS entry
        alone does not do.
        """
        transcript = yield capture(self, "127.0.0.1")
        decision = policy().check_authentication(transcript, CARD)
        self.assertTrue(decision.allowed, decision.reason)
        self.assertEqual(decision.subject, "127.0.0.1")
        self.refused(
            transcript, "no IP address is allowed", allowed_servers=["localhost"]
        )

    def test_arbitrary_bytes(self) -> None:
        """
        What is not a transcript is said to be so by its first byte, never
        by a length read out of text.
        """
        self.refused(b"hello", "not a TLS 1.2 handshake transcript")
        self.refused(b"", "ends before its client_hello")
        self.refused(bytes(range(256)) * 8, "transcript")
        decision = policy().check_authentication(b"secret data to sign", CARD)
        self.assertEqual(
            decision.reason,
            "not a TLS 1.2 handshake transcript: it starts with 's' (0x73), "
            "where a transcript starts with a ClientHello (handshake type 1)",
        )
        decision = policy().check_authentication(b"\x00\x00\x00\x00", CARD)
        self.assertIn("it starts with a hello_request (type 0)", decision.reason)

    def test_oversized_message(self) -> None:
        """
        A message longer than any our TLS client sends or accepts is
        refused by name and size, before its bytes are read.
        """
        raws = messages(self.transcript)
        hello = raws[0][:1] + (1 << 20).to_bytes(3, "big") + raws[0][4:]
        self.refused(
            hello + b"".join(raws[1:]),
            "the client_hello is 1048576 bytes, more than the 8192",
        )
        request = raws[4][:1] + (60000).to_bytes(3, "big") + raws[4][4:]
        self.refused(
            b"".join([*raws[:4], request, *raws[5:]]),
            "the certificate_request is 60000 bytes, more than the 16384",
        )

    def test_bare_hash(self) -> None:
        """
        A digest of the transcript, what a naive caller might send, is refused.
        """
        for digest in (
            hashlib.sha256(self.transcript).digest(),
            hashlib.sha384(self.transcript).digest(),
        ):
            decision = policy().check_authentication(digest, CARD)
            self.assertFalse(decision.allowed)

    def test_reordered(self) -> None:
        raws = messages(self.transcript)
        raws[3], raws[4] = raws[4], raws[3]
        self.refused(b"".join(raws), "message 4 of the transcript is")

    def test_truncated(self) -> None:
        raws = messages(self.transcript)
        self.refused(b"".join(raws[:-1]), "ends before its client_key_exchange")
        self.refused(self.transcript[:-1], "ends before its client_key_exchange")
        self.refused(self.transcript[:200], "ends before")

    def test_trailing(self) -> None:
        raws = messages(self.transcript)
        self.refused(self.transcript + b"\x00", "goes on after")
        self.refused(self.transcript + raws[-1], "goes on after")

    def test_inconsistent_length(self) -> None:
        """
        A ClientHello whose own length disagrees with its content is refused.
        """
        raws = messages(self.transcript)
        hello = bytearray(raws[0])
        hello[4 + 2 + 32] += 1  # the session_id's length
        self.refused(
            bytes(hello) + b"".join(raws[1:]), "not a TLS 1.2 handshake transcript"
        )

    def test_unlisted_server(self) -> None:
        self.refused(
            self.transcript,
            "the server 'localhost' is not allowed",
            allowed_servers=DMP_SERVERS,
        )

    def test_untrusted_chain(self) -> None:
        self.refused(
            self.transcript,
            "the server chain is not accepted",
            roots=[pki().other_root],
        )

    def test_randoms_swapped(self) -> None:
        """
        The ServerKeyExchange signature covers the randoms: with the client's
        and the server's random swapped, it no longer verifies.
        """
        raws = [bytearray(r) for r in messages(self.transcript)]
        client_random, server_random = raws[0][6:38], raws[1][6:38]
        raws[0][6:38], raws[1][6:38] = server_random, client_random
        self.refused(
            b"".join(bytes(r) for r in raws),
            "the ServerKeyExchange signature does not verify",
        )

    @inlineCallbacks
    def test_key_exchange_from_another_handshake(self) -> Any:
        """
        A transcript made up from the server's public chain and the
        ServerKeyExchange of another handshake does not pass.
        """
        other = yield capture(self, "localhost")
        raws = messages(self.transcript)
        raws[3] = messages(other)[3]
        self.refused(b"".join(raws), "the ServerKeyExchange signature does not verify")

    def test_replay(self) -> None:
        """
        A transcript is signed once: the same one again is a replay,
        whatever algorithm is asked; a genuine transcript from another
        handshake still passes. The random is forgotten after the window.
        """
        now = [1000.0]
        checker = policy(clock=lambda: now[0])
        decision = checker.check_authentication(self.transcript, CARD)
        self.assertTrue(decision.allowed, decision.reason)
        now[0] += 30
        decision = checker.check_authentication(self.transcript, CARD)
        self.assertFalse(decision.allowed)
        self.assertEqual(
            decision.reason,
            "this transcript was signed 30 s ago, and a TLS client makes a new "
            "random for every handshake: a replay",
        )
        self.assertEqual(len(checker.recent), 1)
        now[0] += REPLAY_WINDOW
        decision = checker.check_authentication(self.transcript, CARD)
        self.assertTrue(decision.allowed, decision.reason)

    def test_replay_memory_bounded(self) -> None:
        """
        Beyond its capacity the memory of randoms forgets the oldest first.
        """
        recent = RecentRandoms(lambda: 0.0, capacity=3)
        for n in range(5):
            recent.claim(bytes([n]) * 32)
        self.assertEqual(len(recent), 3)
        recent.claim(b"\x00" * 32)
        self.assertRaises(Refused, recent.claim, b"\x04" * 32)

    def with_request(self, schemes: list[int], types: bytes = b"\x01\x40") -> bytes:
        """
        @return: the transcript with a CertificateRequest offering
            C{schemes} for C{types} of certificates (the server's signature
            does not cover it: anyone can edit it).
        """
        raws = messages(self.transcript)
        request = CertificateRequest.decode(raws[4][4:])
        body = (
            vector(types, 1)
            + vector(b"".join(s.to_bytes(2, "big") for s in schemes), 2)
            + vector(b"".join(vector(a, 2) for a in request.authorities), 2)
        )
        raws[4] = handshake(HandshakeType.certificate_request, body)
        return b"".join(raws)

    def test_algorithm_implied(self) -> None:
        """
        The algorithm asked for is the one the project's TLS client signs
        the CertificateVerify with: the first of the card's schemes
        (SHA-256, SHA-384, SHA-512) the CertificateRequest accepts; any
        other, a scheme the server accepts included, is refused.
        """
        self.assertNotIn(
            SignatureScheme.rsa_pkcs1_sha1,
            CertificateRequest.decode(
                messages(self.transcript)[4][4:]
            ).signature_schemes,
        )
        decision = policy().check_authentication(self.transcript, CARD)
        self.assertTrue(decision.allowed, decision.reason)
        for name in ("SHA384WithRSA", "SHA512WithRSA", "MD5WithRSA"):
            self.refused(
                self.transcript,
                "this handshake's CertificateVerify is made with SHA256WithRSA "
                f"(the first of the card's schemes that the server's "
                f"CertificateRequest accepts), not {name}",
                algorithm=name,
            )
        only_384 = self.with_request([SignatureScheme.rsa_pkcs1_sha384, 0x0403])
        decision = policy().check_authentication(only_384, CARD, "SHA384WithRSA")
        self.assertTrue(decision.allowed, decision.reason)
        self.refused(only_384, "made with SHA384WithRSA", algorithm="SHA256WithRSA")
        self.refused(
            self.with_request([SignatureScheme.rsa_pkcs1_sha256], b"\x40"),
            "does not take an RSA certificate",
        )

    def test_sha1_refused(self) -> None:
        """
        SHA-1 is refused for a transcript, the CertificateRequest edited to
        offer rsa_pkcs1_sha1 or not: the project's TLS client never offers
        it (neither in its ClientHello nor as a scheme of the card's).
        """
        sha1 = SignatureScheme.rsa_pkcs1_sha1
        self.assertNotIn(sha1, CpsAgentClient.supported_signature_schemes)
        offered = dict(hello_fields(messages(self.transcript)[0][4:])["extensions"])
        schemes = offered[13][2:]
        self.assertNotIn(
            sha1,
            [int.from_bytes(schemes[i : i + 2]) for i in range(0, len(schemes), 2)],
        )
        for transcript in (self.transcript, self.with_request([sha1])):
            self.refused(
                transcript,
                "SHA1WithRSA is refused for TLS client authentication",
                algorithm="SHA1WithRSA",
            )
        self.refused(
            self.with_request([sha1]),
            "accepts none of the schemes the card signs with (rsa_pkcs1_sha256, "
            "rsa_pkcs1_sha384, rsa_pkcs1_sha512)",
        )

    def with_hello(self, change: Any, index: int = 0) -> bytes:
        """
        @return: the transcript with its ClientHello (or, with C{index} 1,
            its ServerHello) rebuilt after C{change} had its fields.
        """
        raws = messages(self.transcript)
        fields = hello_fields(raws[index][4:], server=index == 1)
        change(fields)
        raws[index] = handshake(raws[index][0], build_hello(fields))
        return b"".join(raws)

    def test_client_hello_as_sent(self) -> None:
        """
        The ClientHello is one the project's TLS client sends: its
        extensions only, each in its shape and size, its suites, groups
        and schemes only, no compression, nothing after the extensions.
        The genuine one, rebuilt unchanged, passes.
        """
        decision = policy().check_authentication(self.with_hello(lambda f: None), CARD)
        self.assertTrue(decision.allowed, decision.reason)
        ext = fields_extensions
        for change, why in [
            (lambda f: ext(f).append((21, bytes(1000))), "carries extension 21"),
            (lambda f: ext(f).append((0xFF01, b"\x00")), "repeats its renegotiation"),
            (
                lambda f: ext(f).remove(next(e for e in ext(f) if e[0] == 23)),
                "lacks extended_master_secret",
            ),
            (lambda f: replace(f, 11, b"\x02\x00\x01"), "ec_point_formats is not"),
            (lambda f: replace(f, 23, b"x"), "extended_master_secret is not"),
            (lambda f: replace(f, 35, bytes(5000)), "session ticket is 5000 bytes"),
            (lambda f: replace(f, 10, vector(b"\x00\x19", 2)), "offers group 0x0019"),
            (
                lambda f: replace(f, 10, vector(b"\x00\x1d\x00\x1d", 2)),
                "lists a group twice",
            ),
            (
                lambda f: replace(f, 13, vector(b"\x02\x01\x04\x01", 2)),
                "accepts signature scheme 0x0201",
            ),
            (lambda f: f.update(suites=b"\x00\x2f"), "offers cipher suite 0x002f"),
            (lambda f: f.update(compression=b"\x01\x00"), "offers compression"),
            (lambda f: f.update(trailer=b"\x00"), "not a TLS 1.2 handshake"),
            (
                lambda f: ext(f).append((16, vector(vector(b"\x01" * 40, 1), 2))),
                "ALPN protocol name",
            ),
        ]:
            self.refused(self.with_hello(change), why)

    @inlineCallbacks
    def test_client_hello_with_alpn(self) -> Any:
        """
        A ClientHello offering ALPN, as the facade's client does, passes.
        """
        transcript = yield capture(self, "localhost", alpn=[b"http/1.1"])
        decision = policy().check_authentication(transcript, CARD)
        self.assertTrue(decision.allowed, decision.reason)

    def test_server_hello_as_accepted(self) -> None:
        """
        The ServerHello answers only extensions the client offered, each
        in its shape; no compression.
        """
        ext = fields_extensions
        for change, why in [
            (lambda f: ext(f).append((0xAAAA, bytes(500))), "extension 43690"),
            (lambda f: ext(f).append((10, vector(b"\x00\x1d", 2))), "extension 10"),
            (lambda f: replace(f, 0xFF01, b"\x01\x00"), "renegotiation_info"),
            (lambda f: f.update(compression=b"\x01"), "compression"),
        ]:
            self.refused(self.with_hello(change, 1), why)

    def with_key_exchange(self, transcript: bytes, body: bytes) -> bytes:
        raws = messages(transcript)
        raws[7] = handshake(HandshakeType.client_key_exchange, body)
        return b"".join(raws)

    def test_key_exchange_x25519(self) -> None:
        """
        The ClientKeyExchange is one X25519 key (the server's group here),
        nothing after it: 201 arbitrary bytes, a key of 31 bytes or one
        followed by more are refused.
        """
        self.assertEqual(messages(self.transcript)[3][5:7], b"\x00\x1d")
        self.refused(
            self.with_key_exchange(self.transcript, os.urandom(201)),
            "the client_key_exchange is 201 bytes, more than the 98",
        )
        self.refused(
            self.with_key_exchange(self.transcript, vector(os.urandom(31), 1)),
            "the ClientKeyExchange is not one x25519 public value: 31 bytes, "
            "where X25519 takes 32",
        )
        self.refused(
            self.with_key_exchange(self.transcript, vector(os.urandom(32), 1) + b"x"),
            "the ClientKeyExchange goes on after its public value",
        )
        self.refused(
            self.with_key_exchange(self.transcript, vector(os.urandom(40), 1)[:20]),
            "malformed ClientKeyExchange",
        )

    @inlineCallbacks
    def test_key_exchange_nist_curves(self) -> Any:
        """
        With P-256 or P-384, the ClientKeyExchange is one uncompressed point
        of that curve: a genuine one passes, one off the curve, compressed,
        or of the other curve's size does not.
        """
        for group, size in [(NamedGroup.secp256r1, 65), (NamedGroup.secp384r1, 97)]:
            transcript = yield capture(self, "localhost", groups=[group])
            decision = policy().check_authentication(transcript, CARD)
            self.assertTrue(decision.allowed, decision.reason)
            point = messages(transcript)[7][5:]
            self.assertEqual(len(point), size)
            off_curve = point[:-1] + bytes([point[-1] ^ 1])
            self.refused(
                self.with_key_exchange(transcript, vector(off_curve, 1)),
                f"not one {group.name} public value: not a point of the curve",
            )
            compressed = bytes([2 + point[-1] % 2]) + point[1 : 1 + size // 2]
            self.refused(
                self.with_key_exchange(transcript, vector(compressed, 1)),
                f"where an uncompressed point is {size} bytes starting with 04",
            )
        self.refused(
            self.with_key_exchange(transcript, vector(b"\x04" + bytes(64), 1)),
            "where an uncompressed point is 97 bytes",
        )

    def test_other_client_certificate(self) -> None:
        self.refused(
            self.transcript,
            "not this card's authentication certificate",
            card=[pki()["client-ec"].chain[0].public_bytes(Encoding.DER)],
        )

    def test_client_certificate_with_more(self) -> None:
        """
        The client Certificate is the card's chain as the agent serves it,
        byte for byte: a second "certificate" of arbitrary bytes after the
        card's is refused, small or of 48 KB, and so is the card's chain
        without the intermediate the agent serves.
        """
        raws = messages(self.transcript)
        for extra in (os.urandom(1000), os.urandom(48 * 1024)):
            raws[6] = encode_certificate([*CARD, extra])
            decision = policy().check_authentication(b"".join(raws), CARD)
            self.assertFalse(decision.allowed)
            self.assertTrue(
                "not exactly the card's certificate and its chain" in decision.reason
                or "the certificate is" in decision.reason,
                decision.reason,
            )
        raws[6] = encode_certificate([*CARD, os.urandom(1000)])
        self.refused(
            b"".join(raws),
            "not exactly the card's certificate and its chain as the agent "
            "serves them (2 certificates where the agent serves 1)",
        )
        served = [*CARD, pki()["server-rsa"].chain[1].public_bytes(Encoding.DER)]
        self.refused(self.transcript, "not exactly the card's certificate", served)
        raws = messages(self.transcript)
        raws[6] = handshake(raws[6][0], raws[6][4:] + b"\x00")
        self.refused(b"".join(raws), "it does not parse whole")

    def with_server_leaf(self, leaf: bytes) -> bytes:
        """
        @return: the transcript with C{leaf} in place of the server's
            certificate, the rest of its chain kept.
        """
        raws = messages(self.transcript)
        chain = decode_certificate(raws[2][4:])
        raws[2] = encode_certificate([leaf, *chain[1:]])
        return b"".join(raws)

    def test_malformed_server_certificate(self) -> None:
        """
        A server certificate that loads but whose version, names or
        extensions do not parse is refused with a reason, never an error.
        """
        raws = messages(self.transcript)
        der = decode_certificate(raws[2][4:])[0]
        version = der.index(bytes.fromhex("a003020102"))
        bad_version = der[: version + 4] + b"\x20" + der[version + 5 :]
        bad_names = der.replace(b"localhost", b"localhos\xff")
        for leaf in (bad_version, bad_names):
            self.refused(self.with_server_leaf(leaf), "certificate")

    def test_server_certificate_without_names(self) -> None:
        """
        A server certificate without subjectAltName is refused (no name to
        check), not an error.
        """
        _, leaf = self_signed(rsa.generate_private_key(65537, 2048), "localhost")
        der = leaf.public_bytes(Encoding.DER)
        self.refused(self.with_server_leaf(der), "subjectAltName")

    def test_server_chain_in_words(self) -> None:
        """
        A server chain that does not lead to a trusted root is refused in
        plain words: certificates by their subject, extensions by their
        name, none of the path builder's phrasing or of Python's
        representation of its objects.
        """
        _, agent_certificate = tap.self_signed_identity()
        without_key_id = self.with_server_leaf(
            agent_certificate.public_bytes(Encoding.DER)
        )
        _, other_root = self_signed(rsa.generate_private_key(65537, 2048), "other")
        for data, roots, said in [
            (
                without_key_id,
                [pki().root],
                "the server chain does not lead to a trusted root: the "
                "certificate of CN=cpsdmp agent lacks the authority key "
                "identifier extension",
            ),
            (
                self.transcript,
                [other_root],
                "the server chain does not lead to a trusted root: no trusted "
                "root issued the certificate of CN=localhost,O=cpsdmp tests "
                "(issuer CN=cpsdmp test intermediate,O=cpsdmp tests)",
            ),
        ]:
            decision = policy(roots=roots).check_authentication(data, CARD)
            self.assertFalse(decision.allowed)
            self.assertIn(said, decision.reason)
            for internal in ("<Certificate", "Name(", "encountered", "candidates"):
                self.assertNotIn(internal, decision.reason)

    def test_mutated_transcripts(self) -> None:
        """
        Thousands of transcripts mutated at random (bytes changed, cut or
        added, messages shuffled or repeated, certificates corrupted): each
        one that differs from the genuine transcript is refused with a
        reason, never an exception, unless the change lies only inside the
        fields no check can hold to one value, the client's and the server's
        own choices (L{_chosen_bytes}); the genuine transcript itself is
        signed, by the same checker, after them.
        """
        rng = random.Random(20240611)
        raws = messages(self.transcript)
        chosen = _chosen_bytes(raws)
        checker = policy()
        refused = 0
        for _ in range(3000):
            data = self.transcript
            for _ in range(rng.randint(1, 3)):
                data = _mutate(rng, data, raws)
            if data == self.transcript:
                continue
            decision = checker.check_authentication(data, CARD)
            if not decision.allowed:
                self.assertTrue(decision.reason)
                refused += 1
                continue
            outside = sorted(
                i
                for i, (a, b) in enumerate(zip(data, self.transcript, strict=False))
                if a != b and i not in chosen
            )
            if len(data) != len(self.transcript) or outside:
                self.fail(
                    f"a transcript of {len(data)} bytes (genuine: "
                    f"{len(self.transcript)}) changed at {outside[:8]} is allowed"
                )
            # That transcript's client random is now spent: a new checker
            # for the next ones, so that none is refused only as a replay.
            checker = policy()
        self.assertGreater(refused, 2500)
        decision = checker.check_authentication(self.transcript, CARD)
        self.assertTrue(decision.allowed, decision.reason)


class FailClosedTests(SynchronousTestCase):
    def test_error_in_a_check_refuses(self) -> None:
        """
        A check that fails by an error of its own (a bug, a library raising
        what it did not document) refuses the signature and logs the error.
        """
        checker = policy()

        def broken(*args: object) -> str:
            raise RuntimeError("a bug")

        for owner, method, check in [
            (
                checker,
                "_check_transcript",
                lambda: checker.check_authentication(b"", CARD),
            ),
            (
                policy_module,
                "check_signature_request",
                lambda: checker.check_signature(b"", "x", [CERTIFICATE]),
            ),
        ]:
            self.patch(owner, method, broken)
            decision = check()
            self.assertFalse(decision.allowed)
            self.assertIn("could not check", decision.reason)
            self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


def _chosen_bytes(raws: list[bytes]) -> set[int]:
    """
    @return: the offsets, in the transcript made of C{raws}, of the bytes
        that the client or the server chooses freely and that no check can
        hold to one value: the session_ids of both hellos and the client's
        session ticket (the server's opaque state), the CertificateRequest
        (the server's lists, which the server's signature does not cover,
        and of which the policy holds only the algorithm they imply), and
        the client's ECDHE public value (any X25519 key).
    """
    starts = [sum(len(r) for r in raws[:i]) for i in range(len(raws))]
    chosen: set[int] = set()

    def take(message: int, offset: int, size: int) -> None:
        begin = starts[message] + 4 + offset
        chosen.update(range(begin, begin + size))

    def length(message: int, offset: int, size: int) -> int:
        body = raws[message][4:]
        return int.from_bytes(body[offset : offset + size], "big")

    # ClientHello: version, random, session_id, suites, compression, extensions.
    offset = 2 + 32
    take(0, offset + 1, length(0, offset, 1))
    offset += 1 + length(0, offset, 1)
    offset += 2 + length(0, offset, 2)
    offset += 1 + length(0, offset, 1)
    end = offset + 2 + length(0, offset, 2)
    offset += 2
    while offset < end:
        ext_type, size = length(0, offset, 2), length(0, offset + 2, 2)
        if ext_type == 35:  # session_ticket (RFC 5077)
            take(0, offset + 4, size)
        offset += 4 + size
    # ServerHello: version, random, session_id.
    take(1, 2 + 32 + 1, length(1, 2 + 32, 1))
    # The CertificateRequest, whole: the policy reads in it only the
    # algorithm it implies, which these tests ask for.
    take(4, 0, len(raws[4]) - 4)
    # ClientKeyExchange: the public value.
    take(7, 1, length(7, 0, 1))
    return chosen


def _mutate(rng: random.Random, data: bytes, raws: list[bytes]) -> bytes:
    """
    @return: C{data} changed in one random way, with a bias towards the
        parts a parser reads last (certificates, extensions).
    """
    kind = rng.randrange(7)
    if kind == 0:
        changed = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            changed[rng.randrange(len(changed))] = rng.randrange(256)
        return bytes(changed)
    if kind == 1:
        start = rng.randrange(len(data))
        return data[:start] + data[start + rng.randint(1, 64) :]
    if kind == 2:
        start = rng.randrange(len(data) + 1)
        return data[:start] + rng.randbytes(rng.randint(1, 64)) + data[start:]
    if kind == 3:
        shuffled = list(raws)
        rng.shuffle(shuffled)
        return b"".join(shuffled)
    if kind == 4:
        repeated = list(raws)
        repeated[rng.randrange(len(repeated))] = rng.choice(raws)
        return b"".join(repeated)
    if kind == 5:
        return rng.randbytes(rng.randint(0, 4096))
    # Inside one message, past its header: most often a certificate.
    corrupted = [bytearray(r) for r in raws]
    targets = [2, 2, 2, 6, 0, 1, 3, 4] if len(raws) == 8 else range(len(raws))
    message = corrupted[rng.choice(targets)]
    for _ in range(rng.randint(1, 4)):
        if len(message) > 4:
            message[rng.randrange(4, len(message))] = rng.randrange(256)
    return b"".join(bytes(r) for r in corrupted)


# Signature requests ------------------------------------------------------------

KEY, CERTIFICATE = self_signed(rsa.generate_private_key(65537, 2048), "Dr LIBRE")
DS = "http://www.w3.org/2000/09/xmldsig#"
NS = {"ds": DS}


def c14n(element: etree._Element) -> bytes:
    return etree.tostring(element, method="c14n", exclusive=True)


def own_manifest(request: bytes, document: bytes, redigest: bool = True) -> bytes:
    """
    @return: C{request} whose manifest lists, in place of its first
        document, one of its maker's own (C{document} under uniqueId
        1.2.3.4), the SignedInfo's digest of the manifest recomputed when
        C{redigest}, as its maker would.
    """
    root = etree.fromstring(request)
    manifest = root.find("ds:Object/ds:Manifest", NS)
    manifest[0].set("URI", "urn:oid:1.2.3.4")
    manifest[0].find("ds:DigestValue", NS).text = base64.b64encode(
        hashlib.sha256(document).digest()
    ).decode()
    if redigest:
        reference = root.find("ds:SignedInfo/ds:Reference[@URI='#IHEManifest']", NS)
        reference.find("ds:DigestValue", NS).text = base64.b64encode(
            hashlib.sha256(c14n(manifest)).digest()
        ).decode()
    return etree.tostring(root, encoding="UTF-8", xml_declaration=True)


class SignatureRequestTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.request = signature_request(CERTIFICATE)

    def decide(self, data: bytes, algorithm: str = "SHA256WithRSA", **kw: Any) -> Any:
        return policy(**kw).check_signature(data, algorithm, [CERTIFICATE])

    def refused(self, data: bytes, why: str, algorithm: str = "SHA256WithRSA") -> None:
        decision = self.decide(data, algorithm)
        self.assertFalse(decision.allowed)
        self.assertIn(why, decision.reason)

    def test_submission_request(self) -> None:
        """
        The request L{sign_submission} makes is allowed: the card signs its
        SignedInfo's exclusive C14N, and the decision says, for the audit
        log, the submission set and each document's reference and SHA-256.
        """
        decision = self.decide(self.request)
        self.assertTrue(decision.allowed, decision.reason)
        root = etree.fromstring(self.request)
        self.assertEqual(decision.payload, c14n(root.find("ds:SignedInfo", NS)))
        set_id = root.findtext(".//ds:SignatureProperty[@Id='setId']", namespaces=NS)
        self.assertEqual(decision.subject, f"submission set {set_id}, 2 documents")
        self.assertEqual(decision.details["submissionSet"], set_id)
        self.assertEqual(
            decision.details["documents"],
            [
                {
                    "reference": r.get("URI"),
                    "sha256": base64.b64decode(
                        r.findtext("ds:DigestValue", namespaces=NS)
                    ).hex(),
                }
                for r in root.iterfind("ds:Object/ds:Manifest/ds:Reference", NS)
            ],
        )

    def test_arbitrary(self) -> None:
        """
        Arbitrary bytes, a bare SignedInfo (what the agent used to sign),
        XML with a DTD: refused, each with its reason.
        """
        root = etree.fromstring(self.request)
        self.refused(b"hello", "not a submission-set signature")
        self.refused(c14n(root.find("ds:SignedInfo", NS)), "not an XML-DSig Signature")
        self.refused(b"<!DOCTYPE a><a/>", "not a submission-set signature")
        self.refused(hashlib.sha256(self.request).digest(), "not a submission-set")

    def test_own_manifest(self) -> None:
        """
        A manifest its maker wrote about a document of his own: with the
        SignedInfo's digest left as it was, refused; recomputed, the shape
        is the project's and the agent cannot tell, but the decision names
        the document, so that it is on record.
        """
        self.refused(
            own_manifest(self.request, b"mine", redigest=False),
            "the digest of #IHEManifest does not match",
        )
        decision = self.decide(own_manifest(self.request, b"mine"))
        self.assertTrue(decision.allowed, decision.reason)
        self.assertEqual(
            decision.details["documents"][0],
            {
                "reference": "urn:oid:1.2.3.4",
                "sha256": hashlib.sha256(b"mine").hexdigest(),
            },
        )

    def test_other_card(self) -> None:
        """
        A request made for another signature certificate than the card's.
        """
        _, other = self_signed(rsa.generate_private_key(65537, 2048), "Dr AUTRE")
        decision = policy().check_signature(self.request, "SHA256WithRSA", [other])
        self.assertFalse(decision.allowed)
        self.assertIn("not the card's signature certificate", decision.reason)

    def test_other_algorithm(self) -> None:
        self.refused(self.request, "SignatureMethod", "SHA256WithECDSA")
        self.refused(self.request, "not a submission-set signature", "SHA512WithRSA")

    def test_mutated(self) -> None:
        """
        Requests mutated at random: each one that differs from the genuine
        request is refused with a reason, never an error, unless the change
        lies only inside its KeyInfo, which nothing signs and the agent does
        not check: then the card signs exactly what it signs for the genuine
        request, which is allowed.
        """
        rng = random.Random(20240612)
        checker = policy()
        genuine = checker.check_signature(self.request, "SHA256WithRSA", [CERTIFICATE])
        self.assertTrue(genuine.allowed, genuine.reason)
        head = self.request.index(b"<ds:KeyInfo>")
        tail = len(self.request) - (
            self.request.index(b"</ds:KeyInfo>") + len(b"</ds:KeyInfo>")
        )
        refused = 0
        for _ in range(800):
            data = self.request
            for _ in range(rng.randint(1, 3)):
                data = _mutate(rng, data, [self.request])
            if data == self.request:
                continue
            decision = checker.check_signature(data, "SHA256WithRSA", [CERTIFICATE])
            if not decision.allowed:
                self.assertTrue(decision.reason)
                refused += 1
                continue
            if (
                data[:head] != self.request[:head]
                or data[len(data) - tail :] != self.request[-tail:]
                or decision.payload != genuine.payload
                or decision.details != genuine.details
            ):
                self.fail(f"a request changed outside its KeyInfo is allowed: {data!r}")
        self.assertGreater(refused, 400)


# Through the agent ------------------------------------------------------------


class PolicyAgentTestCase(AgentTestCase):
    """
    An agent with the policy of C{twist cpsagent --testcard}, its rate limit
    and an audit log.
    """

    timeout = 120
    rate_limit: RateLimit | None = None
    audit_file: str | None = None

    @inlineCallbacks
    def setUp(self) -> Any:
        from tests.agent_support import shared_testcard

        self.testcard = shared_testcard()
        self.audit_path = Path(self.audit_file or self.mktemp())
        self.policy = tap.signing_policy({"testcard": self.testcard.directory})
        assert self.policy is not None
        self.agent: RunningAgent = yield start_agent(
            self,
            token_backend(),
            policy=self.policy,
            rate_limit=self.rate_limit or DEFAULT_RATE_LIMIT,
            audit=AuditLog(self.audit_path, reactor),  # type: ignore[arg-type]
        )

    def audit_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]


class SignatureEndpointTests(PolicyAgentTestCase):
    @inlineCallbacks
    def test_submission_signature(self) -> Any:
        """
        The card signs, through the agent, the request L{sign_submission}
        sends (the signature verifies), and its audit line names the
        submission set and each document's reference and SHA-256; anything
        else is refused with a 403 naming the reason.
        """
        client = yield self.client()
        chain = yield client.signature_certificate_chain()
        submission = new_submission(
            cda_entries()[:2], PROFESSIONAL, STRUCTURE, SOFTWARE, DEFAULTS
        )
        signed = yield sign_submission(
            submission, client.sign_for_signature, chain[0], PROFESSIONAL, STRUCTURE
        )
        self.assertEqual(len(signed.documents), 3)
        [line] = self.audit_lines()
        self.assertEqual(line["outcome"], "signed")
        self.assertEqual(line["submissionSet"], signed.submission_set.uniqueId)
        self.assertEqual(
            line["documents"],
            [
                {
                    "reference": document_uri(d.entry.uniqueId),
                    "sha256": hashlib.sha256(d.data).hexdigest(),
                }
                for d in signed.documents[:2]
            ],
        )
        self.assertEqual(
            line["subject"],
            f"submission set {signed.submission_set.uniqueId}, 2 documents",
        )

        request = signature_request(chain[0])
        not_by_unique_id = etree.tostring(
            _skeleton(
                [("not an oid <>&", hashlib.sha256(b"mine").digest())],
                "2.25.1",
                chain[0],
                chain[1:],
                "SHA256WithRSA",
                datetime.datetime.now(datetime.UTC),
                f"sig-{uuid.uuid4()}",
            ),
            encoding="UTF-8",
            xml_declaration=True,
        )
        for data, algorithm in [
            (b"hello", "SHA256WithRSA"),
            (request, "SHA512WithRSA"),
            (request.replace(b"IHEManifest", b"Elsewhere"), "SHA256WithRSA"),
            (own_manifest(request, b"mine", redigest=False), "SHA256WithRSA"),
            (signature_request(CERTIFICATE), "SHA256WithRSA"),
            (not_by_unique_id, "SHA256WithRSA"),
        ]:
            error = yield self.assertFailure(
                client.sign_for_signature(data, algorithm), AgentError
            )
            self.assertEqual(error.problem["status"], 403)
            self.assertEqual(error.problem["type"], problems.POLICY_REFUSED)
            self.assertIn("the card's signature key does not sign this", str(error))
            self.assertNotIn("the agent: the agent", str(error))
        outcomes = [line["outcome"] for line in self.audit_lines()]
        self.assertEqual(outcomes, ["signed"] + ["refused"] * 6)
        self.assertIn("documents by uniqueId", self.audit_lines()[-1]["reason"])

    @inlineCallbacks
    def test_own_manifest_on_record(self) -> Any:
        """
        What the agent cannot judge, a manifest about documents of the
        caller's choosing, is signed, and on record: the audit line names
        the document's reference and digest.
        """
        client = yield self.client()
        chain = yield client.signature_certificate_chain()
        request = own_manifest(signature_request(chain[0]), b"mine")
        signature = yield client.sign_for_signature(request, "SHA256WithRSA")
        public_key = chain[0].public_key()
        assert isinstance(public_key, rsa.RSAPublicKey)
        public_key.verify(
            signature, to_be_signed(request), padding.PKCS1v15(), hashes.SHA256()
        )
        [line] = self.audit_lines()
        self.assertEqual(
            line["documents"][0],
            {
                "reference": "urn:oid:1.2.3.4",
                "sha256": hashlib.sha256(b"mine").hexdigest(),
            },
        )

    @inlineCallbacks
    def test_authentication_refused(self) -> Any:
        """
        Arbitrary data for the authentication key: 403, a security event
        with the caller and the reason, an audit line, and no token or data
        in either.
        """
        context = yield self.session()
        events: list[dict[str, Any]] = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        answer = yield self.request(
            "POST",
            "/cps/sign/for/authentication/SHA256WithRSA",
            {"Content-Type": "application/octet-stream"},
            b"secret data to sign",
            context["token"],
        )
        document = self.assertProblem(answer, 403, problems.POLICY_REFUSED)
        self.assertIn("not a TLS 1.2 handshake transcript", document["detail"])
        security = [e for e in events if "security:" in e.get("log_format", "")]
        self.assertEqual(len(security), 1)
        self.assertEqual(security[0]["log_level"].name, "warn")
        self.assertEqual(security[0]["caller"], "127.0.0.1")
        self.assertIn("transcript", security[0]["reason"])
        flat = repr(events) + self.audit_path.read_text()
        self.assertNotIn(context["token"], flat)
        self.assertNotIn("secret data", flat)
        [line] = self.audit_lines()
        self.assertEqual(line["context"], context_id(context["token"]))
        self.assertEqual(line["key"], "authentication")
        self.assertEqual(line["algorithm"], "SHA256WithRSA")
        self.assertEqual(line["outcome"], "refused")
        self.assertEqual(
            document["detail"],
            "the card's authentication key does not sign this: " + line["reason"],
        )
        self.assertTrue(line["reason"].startswith("not a TLS 1.2 handshake transcript"))


class AuditEveryRequestTests(PolicyAgentTestCase):
    @inlineCallbacks
    def test_every_request_recorded(self) -> Any:
        """
        Every request that reaches a signing endpoint has its line, the
        ones refused before the policy too (an unknown algorithm, bad
        base64, bad JSON), each with its outcome and reason; the file is
        readable by its owner only.
        """
        self.assertEqual(self.audit_path.stat().st_mode & 0o777, 0o600)
        context = yield self.session()
        for path, headers, body, status in [
            (
                "/cps/sign/for/authentication/MD5WithRSA",
                {"Content-Type": "application/json"},
                b'{"data": "aGVsbG8="}',
                400,
            ),
            (
                "/cps/sign/for/signature/SHA256WithRSA",
                {"Content-Type": "application/json"},
                b'{"data": "not base64!"}',
                400,
            ),
            (
                "/cps/sign/for/authentication/SHA256WithRSA",
                {"Content-Type": "application/json"},
                b"{",
                400,
            ),
        ]:
            answer = yield self.request("POST", path, headers, body, context["token"])
            self.assertEqual(answer.code, status, answer.body)
        lines = self.audit_lines()
        self.assertEqual(
            [(line["key"], line["algorithm"], line["outcome"]) for line in lines],
            [
                ("authentication", "MD5WithRSA", "refused"),
                ("signature", "SHA256WithRSA", "refused"),
                ("authentication", "SHA256WithRSA", "refused"),
            ],
        )
        self.assertIn("unknown signature algorithm", lines[0]["reason"])
        self.assertIn("base64", lines[1]["reason"])
        self.assertIn("JSON", lines[2]["reason"])
        for line in lines:
            self.assertEqual(line["context"], context_id(context["token"]))


class AuditFailClosedTests(PolicyAgentTestCase):
    # Every write to /dev/full fails, as on a full disk.
    audit_file = "/dev/full"

    @inlineCallbacks
    def test_unwritable_audit_log(self) -> Any:
        """
        When the audit log cannot be written, the agent does not hand out
        a signature: 503 audit-unavailable, and the error in its log.
        """
        client = yield self.client()
        chain = yield client.signature_certificate_chain()
        submission = new_submission(
            cda_entries()[:1], PROFESSIONAL, STRUCTURE, SOFTWARE, DEFAULTS
        )
        error = yield self.assertFailure(
            sign_submission(
                submission, client.sign_for_signature, chain[0], PROFESSIONAL, STRUCTURE
            ),
            AgentError,
        )
        self.assertEqual(error.problem["status"], 503)
        self.assertEqual(error.problem["type"], problems.AUDIT_UNAVAILABLE)
        self.assertIn("audit log", error.problem["detail"])

        # While the log fails, the card is not even asked.
        card = self.agent.card
        asked: list[KeyUsage] = []
        sign = card.sign

        def counted(usage: KeyUsage, *args: Any) -> Any:
            asked.append(usage)
            return sign(usage, *args)

        self.patch(card, "sign", counted)
        submission = new_submission(
            cda_entries()[:1], PROFESSIONAL, STRUCTURE, SOFTWARE, DEFAULTS
        )
        error = yield self.assertFailure(
            sign_submission(
                submission, client.sign_for_signature, chain[0], PROFESSIONAL, STRUCTURE
            ),
            AgentError,
        )
        self.assertEqual(error.problem["type"], problems.AUDIT_UNAVAILABLE)
        self.assertEqual(asked, [])
        self.assertTrue(self.flushLoggedErrors(OSError))


class MalformedTranscriptTests(PolicyAgentTestCase):
    @inlineCallbacks
    def test_malformed_certificate_is_403(self) -> Any:
        """
        A transcript whose server certificate does not parse is a 403 with
        the reason, like any other refusal, not an agent error.
        """
        transcript = yield capture(self, "localhost")
        raws = messages(transcript)
        der = decode_certificate(raws[2][4:])[0]
        raws[2] = encode_certificate([der.replace(b"localhost", b"localhos\xff")])
        context = yield self.session()
        answer = yield self.request(
            "POST",
            "/cps/sign/for/authentication/SHA256WithRSA",
            {"Content-Type": "application/octet-stream"},
            b"".join(raws),
            context["token"],
        )
        document = self.assertProblem(answer, 403, problems.POLICY_REFUSED)
        self.assertIn("certificate", document["detail"])
        [line] = self.audit_lines()
        self.assertEqual(line["outcome"], "refused")


class RateLimitTests(PolicyAgentTestCase):
    rate_limit = RateLimit(3, 60)

    @inlineCallbacks
    def test_limit(self) -> Any:
        """
        With 3 signatures a minute, the 4th request of a session is refused
        with 429 and Retry-After, refused requests counting too; another
        session has its own count.
        """
        context = yield self.session()
        client = CpsAgentClient.from_context(context, timeout=20)
        self.addCleanup(client.close)
        chain = yield client.signature_certificate_chain()
        for _ in range(2):
            submission = new_submission(
                cda_entries()[:1], PROFESSIONAL, STRUCTURE, SOFTWARE, DEFAULTS
            )
            yield sign_submission(
                submission, client.sign_for_signature, chain[0], PROFESSIONAL, STRUCTURE
            )
        yield self.assertFailure(
            client.sign_for_signature(b"x", "SHA256WithRSA"), AgentError
        )
        answer = yield self.request(
            "POST",
            "/cps/sign/for/signature/SHA256WithRSA",
            {"Content-Type": "application/octet-stream"},
            signature_request(chain[0]),
            context["token"],
        )
        self.assertProblem(answer, 429, problems.RATE_LIMITED)
        retry = int(answer.header("retry-after") or 0)
        self.assertTrue(55 <= retry <= 60, retry)

        other = yield self.client()
        yield other.sign_for_signature(signature_request(chain[0]), "SHA256WithRSA")
        outcomes = [(line["context"], line["outcome"]) for line in self.audit_lines()]
        mine, theirs = context_id(context["token"]), outcomes[-1][0]
        self.assertNotEqual(mine, theirs)
        self.assertEqual(
            outcomes,
            [
                (mine, "signed"),
                (mine, "signed"),
                (mine, "refused"),
                (mine, "refused"),
                (theirs, "signed"),
            ],
        )
        self.assertIn("rate limit", self.audit_lines()[3]["reason"])


class SandboxAgentTestCase(PolicyAgentTestCase):
    """
    The policy-on agent and a sandbox DMP on the test card's server
    certificate.
    """

    @inlineCallbacks
    def setUp(self) -> Any:
        yield super().setUp()
        card = self.testcard
        self.sandbox = SandboxService(
            "tcp:0:interface=127.0.0.1",
            str(Path(self.mktemp() + ".sqlite").absolute()),
            card.sandbox_cert,
            card.sandbox_key,
            [card.ca_root, *card.ca_intermediates],
        )
        port = yield self.sandbox.start()
        self.addCleanup(self.sandbox.stopService)
        self.port = port.getHost().port

    @inlineCallbacks
    def existence(self, host: str, client: CpsAgentClient) -> Any:
        import treq.client

        config = TLSClientConfig(
            roots=[self.testcard.ca_root_certificate()], remote_key=client
        )
        pool = HTTPConnectionPool(reactor, persistent=False)
        http = treq.client.HTTPClient(
            Agent.usingEndpointFactory(
                reactor, TLSAgentEndpointFactory(reactor, config), pool=pool
            )
        )
        professional = _professional(self.testcard)
        vihf = VihfRequest(
            professional,
            STRUCTURE,
            SOFTWARE,
            issuer="CN=" + professional.identifier,
            patient=CDA_PATIENT,
        )
        endpoints = DmpEndpoints(
            f"https://{host}:{self.port}/si-dmp-server/v2/services"
        )
        message = existence_test(endpoints, vihf, CDA_PATIENT)
        response = yield http.post(
            message.url,
            data=message.body(),
            headers={"Content-Type": [message.content_type]},
        )
        body = yield response.content()
        content_type = response.headers.getRawHeaders("content-type", [""])[0]
        return read_existence(read_message(content_type, body))


class SandboxChainTests(SandboxAgentTestCase):
    """
    Our TLS client, its key the card behind a real agent with the policy on,
    to the sandbox DMP.
    """

    @inlineCallbacks
    def test_existence(self) -> Any:
        """
        A TD0.2 through 127.0.0.1 (no server_name) and through localhost:
        each handshake is signed by the card, each answered by the sandbox,
        each in the audit log under the server's name.
        """
        client = yield self.client()
        for host in ("127.0.0.1", "localhost"):
            existence = yield self.existence(host, client)
            self.assertTrue(existence.exists)
        lines = self.audit_lines()
        self.assertEqual(
            [(line["subject"], line["outcome"], line["key"]) for line in lines],
            [
                ("127.0.0.1", "signed", "authentication"),
                ("localhost", "signed", "authentication"),
            ],
        )

    @inlineCallbacks
    def test_sandbox_not_allowed(self) -> Any:
        """
        With the DMP's hosts only in the allow-list, the handshake with the
        sandbox fails: the card is not asked to sign.
        """
        self.policy.allowed_servers = list(DMP_SERVERS)
        client = yield self.client()
        error = yield self.assertFailure(self.existence("localhost", client), Exception)
        self.assertIn("'localhost' is not allowed", str(error))
        [line] = self.audit_lines()
        self.assertEqual(line["outcome"], "refused")


class RateLimiterTests(SynchronousTestCase):
    def test_sliding_window(self) -> None:
        """
        N requests in the window, then a wait until the oldest leaves it;
        each context counts on its own.
        """
        clock = Clock()
        limiter = RateLimiter(RateLimit(2, 10), clock)
        self.assertIsNone(limiter.take("a"))
        clock.advance(4)
        self.assertIsNone(limiter.take("a"))
        self.assertEqual(limiter.take("a"), 6)
        self.assertIsNone(limiter.take("b"))
        clock.advance(6)
        self.assertIsNone(limiter.take("a"))
        self.assertEqual(limiter.take("a"), 4)


@implementer(IRemoteKey)
class RecordingAgentKey:
    """
    The agent client as the TLS client's key, keeping what it had signed.
    """

    def __init__(self, client: CpsAgentClient) -> None:
        self._client = client
        self.supported_signature_schemes = client.supported_signature_schemes
        self.signed: list[bytes] = []

    def certificate_chain(self) -> Deferred[list[x509.Certificate]]:
        return self._client.certificate_chain()

    def sign(self, data: bytes, scheme: SignatureScheme) -> Deferred[bytes]:
        self.signed.append(data)
        return self._client.sign(data, scheme)


class CapturedTranscriptTests(SandboxAgentTestCase):
    """
    What a user did with a transcript captured from a real handshake of
    the card with the sandbox DMP.
    """

    @inlineCallbacks
    def captured(self) -> Any:
        """
        @return: the client, and the transcript the card signed for one
            handshake of our TLS client with the sandbox.
        """
        client = yield self.client()
        key = RecordingAgentKey(client)
        config = TLSClientConfig(
            roots=[self.testcard.ca_root_certificate()], remote_key=key
        )
        endpoint = TLSClientEndpoint.for_host(reactor, "localhost", self.port, config)
        protocol = yield endpoint.connect(Factory.forProtocol(Protocol))
        protocol.transport.loseConnection()
        [transcript] = key.signed
        return client, transcript

    @inlineCallbacks
    def test_edited_transcripts_refused(self) -> Any:
        """
        The card's certificate followed by a 48 KB "certificate" and a
        201-byte ClientKeyExchange; the CertificateRequest edited to offer
        rsa_pkcs1_sha1, signed with SHA1WithRSA; the transcript replayed:
        each 403, on record.
        """
        client, transcript = yield self.captured()
        raws = messages(transcript)
        chain = decode_certificate(raws[6][4:])
        raws[6] = encode_certificate([*chain, os.urandom(48 * 1024)])
        raws[7] = handshake(HandshakeType.client_key_exchange, os.urandom(201))
        error = yield self.assertFailure(
            client.sign(b"".join(raws), "SHA256WithRSA"), AgentError
        )
        self.assertEqual(error.problem["status"], 403)
        self.assertIn("the certificate is", error.problem["detail"])

        raws = messages(transcript)
        request = CertificateRequest.decode(raws[4][4:])
        raws[4] = handshake(
            HandshakeType.certificate_request,
            vector(request.certificate_types, 1)
            + vector(SignatureScheme.rsa_pkcs1_sha1.to_bytes(2, "big"), 2)
            + vector(b"".join(vector(a, 2) for a in request.authorities), 2),
        )
        error = yield self.assertFailure(
            client.sign(b"".join(raws), "SHA1WithRSA"), AgentError
        )
        self.assertEqual(error.problem["status"], 403)
        self.assertIn("SHA1WithRSA is refused", error.problem["detail"])

        error = yield self.assertFailure(
            client.sign(transcript, "SHA256WithRSA"), AgentError
        )
        self.assertEqual(error.problem["status"], 403)
        self.assertIn("a replay", error.problem["detail"])
        lines = self.audit_lines()
        self.assertEqual(
            [(line["algorithm"], line["outcome"]) for line in lines],
            [
                ("SHA256WithRSA", "signed"),
                ("SHA256WithRSA", "refused"),
                ("SHA1WithRSA", "refused"),
                ("SHA256WithRSA", "refused"),
            ],
        )


class ProbeThroughTheCardTests(SandboxAgentTestCase):
    @inlineCallbacks
    def test_probe_with_agent_context(self) -> Any:
        """
        C{cpsdmp probe --agent-context} makes the handshake with the card
        through the agent, policy on, and the second connection resumes
        without asking the card again.
        """
        context = yield open_session(
            self.agent.url, self.testcard.pin, self.agent.fingerprint
        )
        path = Path(self.mktemp())
        path.write_text(json.dumps(context))
        root = str(Path(cpsdmp.__file__).resolve().parent.parent)
        out, err, status = yield getProcessOutputAndValue(
            sys.executable,
            [
                "-m",
                "cpsdmp.cli",
                "probe",
                f"https://127.0.0.1:{self.port}/si-dmp-server/v2/services/patients",
                "--agent-context",
                str(path),
                "--ca",
                self.testcard.ca_root,
                "--reconnect",
            ],
            env={**os.environ, "PYTHONPATH": root},
            reactor=reactor,
        ).addTimeout(60, reactor)
        report = out.decode()
        self.assertEqual(status, 0, report + err.decode())
        self.assertIn("Protocol version: TLSv1.2", report)
        self.assertIn(f"CN={self.testcard.professional['id']}/", report)
        self.assertIn("Second connection resumed: yes", report)
        signed = [
            line
            for line in self.audit_lines()
            if line["key"] == "authentication" and line["outcome"] == "signed"
        ]
        self.assertEqual(len(signed), 1)


class ConcurrentLimitTests(SandboxAgentTestCase):
    @inlineCallbacks
    def test_replays_at_once(self) -> Any:
        """
        A transcript the card signed for a handshake, sent again thirty
        more times at once than an agent with the default limit allows:
        none is signed again (each a replay, 403, even in flight together),
        and those over the limit are 429; the card signed once.
        """
        client = yield self.client()
        key = RecordingAgentKey(client)
        config = TLSClientConfig(
            roots=[self.testcard.ca_root_certificate()], remote_key=key
        )
        endpoint = TLSClientEndpoint.for_host(reactor, "localhost", self.port, config)
        protocol = yield endpoint.connect(Factory.forProtocol(Protocol))
        protocol.transport.loseConnection()
        [transcript] = key.signed

        results = yield gatherResults(
            [
                client.sign(transcript, SignatureScheme.rsa_pkcs1_sha256).addErrback(
                    lambda f: f.trap(AgentError) and f.value
                )
                for _ in range(DEFAULT_RATE_LIMIT.count + 29)
            ]
        )
        self.assertTrue(all(isinstance(r, AgentError) for r in results))
        statuses = [r.problem["status"] for r in results]
        self.assertEqual(
            (statuses.count(403), statuses.count(429)),
            (DEFAULT_RATE_LIMIT.count - 1, 30),
        )
        outcomes = [line["outcome"] for line in self.audit_lines()]
        self.assertEqual(outcomes.count("signed"), 1)
        self.assertEqual(outcomes.count("refused"), DEFAULT_RATE_LIMIT.count + 29)
