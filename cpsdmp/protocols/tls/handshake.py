"""
The client handshake as an explicit state machine: one named state per step
from ClientHello sent to Established, including the two states in which it
waits for the remote key (the client certificate, then the CertificateVerify
signature). It consumes whole handshake messages and ChangeCipherSpec, and
emits records through the record layer it is given; the Twisted protocol
around it owns the transport.
"""

from __future__ import annotations

import datetime
import enum
import os
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import constant_time, hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa, x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    maybeDeferred,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from cpsdmp.protocols.tls import prf
from cpsdmp.protocols.tls.alerts import (
    AlertDescription,
    HandshakeFailed,
    ProtocolViolation,
)
from cpsdmp.protocols.tls.interfaces import IRemoteKey
from cpsdmp.protocols.tls.messages import (
    CertificateRequest,
    ClientHello,
    ExtensionType,
    HandshakeType,
    NewSessionTicket,
    ServerHello,
    ServerKeyExchange,
    decode_alpn,
    decode_certificate,
    encode_certificate,
    encode_certificate_verify,
    encode_client_key_exchange,
    encode_finished,
    handshake_type_name,
)
from cpsdmp.protocols.tls.records import (
    ContentType,
    RecordLayer,
    RecordProtection,
    key_block_length,
    protections_for,
)
from cpsdmp.protocols.tls.schemes import (
    SignatureScheme,
    UnsupportedKey,
    verify_signature,
)
from cpsdmp.protocols.tls.session import Session, SessionCache
from cpsdmp.protocols.tls.suites import (
    DEFAULT_GROUPS,
    DEFAULT_SUITES,
    SUITES_BY_CODE,
    CipherSuite,
    NamedGroup,
)
from cpsdmp.protocols.tls.validation import VerifiedChains, is_ip_literal

_log = Logger()

# What we accept from the server's ServerKeyExchange, and offer in
# signature_algorithms, most preferred first.
SERVER_SIGNATURE_SCHEMES: tuple[SignatureScheme, ...] = (
    SignatureScheme.ecdsa_secp256r1_sha256,
    SignatureScheme.ecdsa_secp384r1_sha384,
    SignatureScheme.ecdsa_secp521r1_sha512,
    SignatureScheme.rsa_pss_rsae_sha256,
    SignatureScheme.rsa_pss_rsae_sha384,
    SignatureScheme.rsa_pss_rsae_sha512,
    SignatureScheme.rsa_pkcs1_sha256,
    SignatureScheme.rsa_pkcs1_sha384,
    SignatureScheme.rsa_pkcs1_sha512,
)

# ClientCertificateType, RFC 5246 section 7.4.4 and RFC 8422 section 5.5
_RSA_SIGN = 1
_ECDSA_SIGN = 64


class State(enum.Enum):
    """
    The handshake's steps; each value says what the client is waiting for.
    """

    START = "before ClientHello"
    WAIT_SERVER_HELLO = "waiting for ServerHello"
    WAIT_CERTIFICATE = "waiting for the server Certificate"
    WAIT_SERVER_KEY_EXCHANGE = "waiting for ServerKeyExchange"
    WAIT_CERTIFICATE_REQUEST = "waiting for CertificateRequest or ServerHelloDone"
    WAIT_SERVER_HELLO_DONE = "waiting for ServerHelloDone"
    WAIT_CLIENT_CERTIFICATE = "waiting for the client certificate from the key holder"
    WAIT_SIGNATURE = "waiting for the CertificateVerify signature from the key holder"
    WAIT_CHANGE_CIPHER_SPEC = (
        "waiting for the server ChangeCipherSpec after our Finished"
    )
    WAIT_FINISHED = "waiting for the server Finished"
    WAIT_RESUMED_CHANGE_CIPHER_SPEC = (
        "waiting for the server ChangeCipherSpec (resuming)"
    )
    WAIT_RESUMED_FINISHED = "waiting for the server Finished (resuming)"
    ESTABLISHED = "established"
    FAILED = "failed"


@dataclass
class TLSClientConfig:
    """
    What a connection needs: the roots the server chain must lead to, the
    client identity (any L{IRemoteKey}, or none), and the policy.
    """

    roots: Sequence[x509.Certificate]
    remote_key: IRemoteKey | None = None
    suites: Sequence[CipherSuite] = DEFAULT_SUITES
    groups: Sequence[NamedGroup] = DEFAULT_GROUPS
    alpn: Sequence[bytes] = ()
    session_cache: SessionCache | None = None
    # Who the sessions in the cache belong to (say, the card holder's
    # certificate fingerprint); defaults to the key object itself, so that
    # two key objects never share a session.
    client_identity: Hashable | None = None
    allow_no_extended_master_secret: bool = False
    allow_no_renegotiation_info: bool = False
    # Each call to the key holder; the whole handshake, those calls included.
    remote_key_timeout: float = 30.0
    handshake_timeout: float = 90.0
    # The time at which the server chain is checked; None means now.
    verification_time: datetime.datetime | None = None
    verified_chains: VerifiedChains = field(default_factory=VerifiedChains)
    # The last client chain sent and its Certificate message: a key holder
    # hands the same certificate objects at each handshake.
    _client_certificate: tuple[tuple[x509.Certificate, ...], bytes] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        # RFC 7301, section 3.1: each name 1 to 255 bytes, the list under
        # 2^16 bytes. Said now, rather than as a ClientHello that cannot be
        # encoded once connected.
        for name in self.alpn:
            if not isinstance(name, bytes) or not 1 <= len(name) <= 255:
                raise ValueError(
                    f"an ALPN protocol name is 1 to 255 bytes, not {name!r:.40}"
                )
        if sum(len(name) + 1 for name in self.alpn) > 0xFFFF - 2:
            raise ValueError("the ALPN protocol names are too long together")

    def identity(self) -> Hashable:
        if self.client_identity is not None:
            return self.client_identity
        return self.remote_key

    def client_certificate_message(self, chain: Sequence[x509.Certificate]) -> bytes:
        """
        @return: the Certificate message carrying C{chain}, encoded once for
            as long as the key holder hands the very same certificates.
        """
        cached = self._client_certificate
        if (
            cached is not None
            and len(cached[0]) == len(chain)
            and all(a is b for a, b in zip(cached[0], chain, strict=True))
        ):
            return cached[1]
        message = encode_certificate([c.public_bytes(Encoding.DER) for c in chain])
        self._client_certificate = (tuple(chain), message)
        return message


@dataclass
class TLSInfo:
    """
    What the handshake negotiated, readable from the transport once done.
    """

    version: str = "TLSv1.2"
    cipher_suite: str = ""
    openssl_cipher: str = ""
    group: str = ""
    resumed: bool = False
    extended_master_secret: bool = False
    server_chain: list[x509.Certificate] = field(default_factory=list)
    verified_chain: list[x509.Certificate] = field(default_factory=list)
    client_chain: list[x509.Certificate] | None = None
    client_signature_scheme: str | None = None
    server_signature_scheme: str | None = None
    client_certificate_requested: bool = False
    alpn: bytes | None = None
    session_id: bytes = b""
    ticket_received: bool = False
    # Seconds spent in each state, by the state's name.
    timings: dict[str, float] = field(default_factory=dict)


_KeyExchangePrivate = x25519.X25519PrivateKey | ec.EllipticCurvePrivateKey

_EC_CURVES: dict[int, ec.EllipticCurve] = {
    NamedGroup.secp256r1: ec.SECP256R1(),
    NamedGroup.secp384r1: ec.SECP384R1(),
}


def _violation(description: AlertDescription, message: str) -> ProtocolViolation:
    return ProtocolViolation(description, message)


class ClientHandshake:
    """
    One client handshake over C{records}, writing through C{write}. It calls
    C{on_established(info)} once, or C{on_failed(exception)} once.
    """

    def __init__(
        self,
        config: TLSClientConfig,
        host: str,
        port: int,
        records: RecordLayer,
        write: Callable[[bytes], None],
        clock: IReactorTime,
        on_established: Callable[[TLSInfo], None],
        on_failed: Callable[[Exception], None],
    ) -> None:
        self.config = config
        self.host = host
        self.port = port
        # RFC 6066, section 3: no server_name for an address literal
        self._host_is_ip = is_ip_literal(host)
        self._records = records
        self._write = write
        self._clock = clock
        self._on_established = on_established
        self._on_failed = on_failed
        self.state = State.START
        self.info = TLSInfo()
        self._entered = clock.seconds()
        self._transcript = bytearray()
        # The transcript under the PRF hash, kept up to date once first
        # asked for, so that each Finished hashes only what came since.
        self._running_hash: hashes.Hash | None = None
        self._prf_hash: hashes.HashAlgorithm | None = None
        self._client_random = b""
        self._server_random = b""
        self._offered_session: Session | None = None
        self._offered_session_id = b""
        self._suite: CipherSuite | None = None
        self._ems = False
        self._expect_ticket = False
        self._ticket: NewSessionTicket | None = None
        self._server_public: Any = None
        self._group: NamedGroup | None = None
        self._server_chain: list[x509.Certificate] = []
        self._client_scheme: SignatureScheme | None = None
        self._certificate_requested = False
        self._client_chain: list[x509.Certificate] | None = None
        self._master_secret = b""
        self._pending: Deferred[Any] | None = None
        self._flight: list[bytes] = []
        self._protections: tuple[RecordProtection, RecordProtection] | None = None

    # -- helpers

    def _enter(self, state: State) -> None:
        now = self._clock.seconds()
        name = self.state.name
        self.info.timings[name] = self.info.timings.get(name, 0.0) + now - self._entered
        self._entered = now
        self.state = state

    @property
    def _cache_key(self) -> tuple[str, Hashable]:
        return (f"{self.host}:{self.port}", self.config.identity())

    @property
    def _hash(self) -> hashes.HashAlgorithm:
        assert self._prf_hash is not None
        return self._prf_hash

    def _add_to_transcript(self, raw: bytes) -> None:
        self._transcript += raw
        if self._running_hash is not None:
            self._running_hash.update(raw)

    def _transcript_hash(self) -> bytes:
        running = self._running_hash
        if running is None:
            running = self._running_hash = hashes.Hash(self._hash)
            running.update(self._transcript)
        return running.copy().finalize()

    def _send_handshake(self, raw: bytes) -> None:
        self._add_to_transcript(raw)
        self._write(self._records.seal(ContentType.handshake, raw))

    def _install_keys(self) -> tuple[RecordProtection, RecordProtection]:
        assert self._suite is not None
        block = prf.key_block(
            self._hash,
            self._master_secret,
            self._client_random,
            self._server_random,
            key_block_length(self._suite),
        )
        return protections_for(self._suite, block)

    # -- entry points

    def start(self) -> None:
        """
        Send the ClientHello, offering a cached session if there is one.
        """
        config = self.config
        cache = config.session_cache
        session = cache.get(self._cache_key) if cache is not None else None
        session_id = b""
        if session is not None:
            # A ticket needs a session ID of our own to recognise resumption
            # (RFC 5077, section 3.4).
            session_id = session.session_id or os.urandom(32)
            if session.ticket is not None:
                session_id = os.urandom(32)
        self._offered_session = session
        self._offered_session_id = session_id
        self._client_random = os.urandom(32)
        hello = ClientHello(
            random=self._client_random,
            session_id=session_id,
            cipher_suites=[s.code for s in config.suites],
            server_name=None if self._host_is_ip else self.host,
            groups=[int(g) for g in config.groups],
            signature_schemes=[int(s) for s in SERVER_SIGNATURE_SCHEMES],
            alpn=list(config.alpn),
            session_ticket=session.ticket if session is not None else None,
        )
        self._send_handshake(hello.encode())
        self._enter(State.WAIT_SERVER_HELLO)

    def handle_message(self, msg_type: int, body: bytes, raw: bytes) -> None:
        """
        Process one whole handshake message from the server.
        """
        try:
            self._dispatch(msg_type, body, raw)
        except ProtocolViolation as e:
            self.fail(e.description, str(e))
        except Exception as e:
            # Our own error: the handshake still ends with an alert and a
            # reason, not with the connection dropped mid-step.
            _log.failure("TLS handshake with {host}: internal error", host=self.host)
            self.fail(
                AlertDescription.internal_error,
                f"internal error handling the server's "
                f"{handshake_type_name(msg_type)}: {e}",
            )

    def handle_change_cipher_spec(
        self, payload: bytes, pending_handshake: bool
    ) -> None:
        try:
            if payload != b"\x01":
                raise _violation(
                    AlertDescription.decode_error, "malformed ChangeCipherSpec"
                )
            if pending_handshake:
                raise _violation(
                    AlertDescription.unexpected_message,
                    "ChangeCipherSpec in the middle of a handshake message",
                )
            if self.state is State.WAIT_CHANGE_CIPHER_SPEC:
                next_state = State.WAIT_FINISHED
            elif self.state is State.WAIT_RESUMED_CHANGE_CIPHER_SPEC:
                next_state = State.WAIT_RESUMED_FINISHED
            else:
                raise _violation(
                    AlertDescription.unexpected_message,
                    "unexpected ChangeCipherSpec",
                )
            if self._expect_ticket and self._ticket is None:
                raise _violation(
                    AlertDescription.unexpected_message,
                    "the server announced a session ticket but sent none",
                )
            assert self._protections is not None
            _, server_protection = self._protections
            self._records.set_read_protection(server_protection)
            self._enter(next_state)
        except ProtocolViolation as e:
            self.fail(e.description, str(e))

    def fail(self, alert: AlertDescription | None, reason: str) -> None:
        """
        Stop the handshake: send the fatal C{alert} if any, then report.
        """
        if self.state in (State.FAILED, State.ESTABLISHED):
            return
        step = self.state.value
        self._enter(State.FAILED)
        self._cancel_pending()
        self._forget_offered_session()
        if alert is not None:
            self._write(self._records.seal(ContentType.alert, bytes((2, alert))))
        _log.info(
            "TLS handshake with {host} failed: {reason}", host=self.host, reason=reason
        )
        self._on_failed(HandshakeFailed(step, reason, alert))

    def abandon(self, exception: Exception) -> None:
        """
        The connection is gone or the peer sent a fatal alert: stop without
        writing anything, cancelling what we wait for.
        """
        if self.state in (State.FAILED, State.ESTABLISHED):
            return
        self._enter(State.FAILED)
        self._cancel_pending()
        self._on_failed(exception)

    def _forget_offered_session(self) -> None:
        # A session whose resumption went wrong is not offered again.
        cache = self.config.session_cache
        if cache is not None and self._offered_session is not None:
            cache.discard(self._cache_key)

    def _cancel_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()

    # -- the server's messages, in the order they come

    def _dispatch(self, msg_type: int, body: bytes, raw: bytes) -> None:
        state = self.state
        if msg_type == HandshakeType.hello_request:
            # Ignored during a handshake (RFC 5246, section 7.4.1.1); the
            # protocol answers it once established.
            if body:
                raise _violation(
                    AlertDescription.decode_error, "malformed HelloRequest"
                )
            return
        expected = _EXPECTED.get(state, ())
        if msg_type not in expected:
            name = handshake_type_name(msg_type)
            raise _violation(
                AlertDescription.unexpected_message,
                f"unexpected {name} message",
            )
        if msg_type == HandshakeType.finished:
            # Checked against the transcript before it joins it.
            self._finished(body, raw)
            return
        self._add_to_transcript(raw)
        if msg_type == HandshakeType.server_hello:
            self._server_hello(body)
        elif msg_type == HandshakeType.certificate:
            self._certificate(body)
        elif msg_type == HandshakeType.server_key_exchange:
            self._server_key_exchange(body)
        elif msg_type == HandshakeType.certificate_request:
            self._certificate_request(body)
        elif msg_type == HandshakeType.server_hello_done:
            if body:
                raise _violation(
                    AlertDescription.decode_error, "malformed ServerHelloDone"
                )
            self._server_hello_done()
        else:
            self._new_session_ticket(body)

    def _server_hello(self, body: bytes) -> None:
        config = self.config
        hello = ServerHello.decode(body)
        if hello.version != 0x0303:
            raise _violation(
                AlertDescription.protocol_version,
                f"the server chose version {hello.version:#06x}, not TLS 1.2",
            )
        suite = SUITES_BY_CODE.get(hello.cipher_suite)
        if suite is None or suite not in config.suites:
            raise _violation(
                AlertDescription.illegal_parameter,
                f"the server chose cipher suite {hello.cipher_suite:#06x}, "
                "which we did not offer",
            )
        if hello.compression != 0:
            raise _violation(
                AlertDescription.illegal_parameter,
                "the server chose a compression method we did not offer",
            )
        offered = {
            ExtensionType.renegotiation_info,
            ExtensionType.extended_master_secret,
            ExtensionType.ec_point_formats,
            ExtensionType.session_ticket,
        }
        if not self._host_is_ip:
            offered.add(ExtensionType.server_name)
        if config.alpn:
            offered.add(ExtensionType.application_layer_protocol_negotiation)
        for ext_type in hello.extensions:
            if ext_type not in offered:
                raise _violation(
                    AlertDescription.unsupported_extension,
                    f"the server sent extension {ext_type}, which we did not offer",
                )
        extensions = hello.extensions
        reneg = extensions.get(ExtensionType.renegotiation_info)
        if reneg is not None and reneg != b"\x00":
            raise _violation(
                AlertDescription.handshake_failure,
                "non-empty renegotiation_info on an initial handshake",
            )
        if reneg is None and not config.allow_no_renegotiation_info:
            # RFC 5746, section 4.1: such a server could take our handshake,
            # client certificate included, as the renegotiation of an
            # attacker's connection and run the attacker's request under it.
            raise _violation(
                AlertDescription.handshake_failure,
                "the server does not support secure renegotiation (no "
                "renegotiation_info, RFC 5746); refusing a server open to "
                "renegotiation prefix attacks",
            )
        formats = extensions.get(ExtensionType.ec_point_formats)
        if formats is not None and (not formats or 0 not in formats[1:]):
            raise _violation(
                AlertDescription.illegal_parameter,
                "the server does not accept uncompressed EC points",
            )
        for ext_type in (
            ExtensionType.server_name,
            ExtensionType.session_ticket,
            ExtensionType.extended_master_secret,
        ):
            if extensions.get(ext_type, b"") != b"":
                raise _violation(
                    AlertDescription.decode_error,
                    f"the server's {ext_type.name} extension is not empty",
                )
        if ExtensionType.application_layer_protocol_negotiation in extensions:
            protocol = decode_alpn(
                extensions[ExtensionType.application_layer_protocol_negotiation]
            )
            if protocol not in config.alpn:
                raise _violation(
                    AlertDescription.illegal_parameter,
                    f"the server chose application protocol {protocol!r}, "
                    "which we did not offer",
                )
            self.info.alpn = protocol

        self._ems = ExtensionType.extended_master_secret in extensions
        self._expect_ticket = ExtensionType.session_ticket in extensions
        self._server_random = hello.random
        self._suite = suite
        self._prf_hash = suite.prf_hash()
        self.info.cipher_suite = suite.name
        self.info.openssl_cipher = suite.openssl_name
        self.info.extended_master_secret = self._ems
        self.info.session_id = hello.session_id

        session = self._offered_session
        if (
            session is not None
            and self._offered_session_id
            and hello.session_id == self._offered_session_id
        ):
            self._resume(session, suite)
            return
        if not self._ems and not config.allow_no_extended_master_secret:
            raise _violation(
                AlertDescription.handshake_failure,
                "the server does not support the extended master secret "
                "(RFC 7627); refusing a handshake open to triple-handshake "
                "attacks",
            )
        self._enter(State.WAIT_CERTIFICATE)

    def _resume(self, session: Session, suite: CipherSuite) -> None:
        if suite != session.suite:
            raise _violation(
                AlertDescription.illegal_parameter,
                "the server resumed the session with another cipher suite",
            )
        if session.extended_master_secret != self._ems:
            raise _violation(
                AlertDescription.handshake_failure,
                "the server resumed the session without its extended master secret",
            )
        self._master_secret = session.master_secret
        self._protections = self._install_keys()
        self._server_chain = session.server_chain
        info = self.info
        info.resumed = True
        info.server_chain = list(session.server_chain)
        info.verified_chain = list(session.verified_chain)
        info.client_chain = session.client_chain
        info.group = session.group
        self._enter(State.WAIT_RESUMED_CHANGE_CIPHER_SPEC)

    def _certificate(self, body: bytes) -> None:
        assert self._suite is not None
        chain, verified = self.config.verified_chains.check_encoded(
            decode_certificate(body),
            self.config.roots,
            self.host,
            self.config.verification_time,
        )
        key = chain[0].public_key()
        wanted = (
            rsa.RSAPublicKey
            if self._suite.authentication == "RSA"
            else ec.EllipticCurvePublicKey
        )
        if not isinstance(key, wanted):
            raise _violation(
                AlertDescription.unsupported_certificate,
                f"the server chose {self._suite.name} but its certificate holds "
                f"a {type(key).__name__}",
            )
        self._server_chain = chain
        self.info.server_chain = chain
        self.info.verified_chain = verified
        self._enter(State.WAIT_SERVER_KEY_EXCHANGE)

    def _server_key_exchange(self, body: bytes) -> None:
        exchange = ServerKeyExchange.decode(body)
        if exchange.group not in [int(g) for g in self.config.groups]:
            raise _violation(
                AlertDescription.illegal_parameter,
                f"the server chose group {exchange.group}, which we did not offer",
            )
        try:
            scheme = SignatureScheme(exchange.scheme)
        except ValueError:
            scheme = None
        if scheme is None or scheme not in SERVER_SIGNATURE_SCHEMES:
            raise _violation(
                AlertDescription.illegal_parameter,
                f"the server signed its key exchange with scheme "
                f"{exchange.scheme:#06x}, which we did not offer",
            )
        signed = self._client_random + self._server_random + exchange.signed_params
        try:
            good = verify_signature(
                self._server_chain[0].public_key(), scheme, exchange.signature, signed
            )
        except UnsupportedKey as e:
            raise _violation(AlertDescription.illegal_parameter, str(e)) from None
        if not good:
            raise _violation(
                AlertDescription.decrypt_error,
                "the ServerKeyExchange signature does not verify with the "
                "server certificate",
            )
        self.info.server_signature_scheme = scheme.name
        group = NamedGroup(exchange.group)
        try:
            if group is NamedGroup.x25519:
                self._server_public = x25519.X25519PublicKey.from_public_bytes(
                    exchange.public
                )
            else:
                if exchange.public[:1] != b"\x04":
                    raise ValueError("not an uncompressed point")
                self._server_public = ec.EllipticCurvePublicKey.from_encoded_point(
                    _EC_CURVES[group], exchange.public
                )
        except ValueError:
            raise _violation(
                AlertDescription.illegal_parameter,
                f"the server's {group.name} public key is invalid",
            ) from None
        self._group = group
        self.info.group = group.name
        self._enter(State.WAIT_CERTIFICATE_REQUEST)

    def _certificate_request(self, body: bytes) -> None:
        request = CertificateRequest.decode(body)
        self._certificate_requested = True
        self.info.client_certificate_requested = True
        key = self.config.remote_key
        if key is not None:
            allowed_kinds = set(request.certificate_types)
            offered = set(request.signature_schemes)
            for scheme in key.supported_signature_schemes:
                kind = _ECDSA_SIGN if scheme.is_ecdsa else _RSA_SIGN
                if scheme in offered and kind in allowed_kinds:
                    self._client_scheme = scheme
                    break
            else:
                theirs = ", ".join(_scheme_name(s) for s in request.signature_schemes)
                ours = ", ".join(s.name for s in key.supported_signature_schemes)
                raise _violation(
                    AlertDescription.handshake_failure,
                    f"no signature scheme in common for the client certificate: "
                    f"the server accepts [{theirs}], the key can do [{ours}]",
                )
        self._enter(State.WAIT_SERVER_HELLO_DONE)

    def _server_hello_done(self) -> None:
        key = self.config.remote_key
        if self._certificate_requested and key is not None:
            self._enter(State.WAIT_CLIENT_CERTIFICATE)
            self._wait(maybeDeferred(key.certificate_chain), self._got_chain)
            return
        if self._certificate_requested:
            # No identity configured: an empty Certificate lets the server
            # decide (RFC 5246, section 7.4.6).
            self._flight.append(encode_certificate([]))
            self._add_to_transcript(self._flight[-1])
        self._key_exchange()
        self._send_finished()

    def _wait(self, d: Deferred[Any], callback: Callable[[Any], None]) -> None:
        """
        Suspend on a key holder's Deferred, with a timeout; it may fire at
        once, later, with an error, never, or be cancelled.
        """
        state = self.state
        self._pending = d
        # The timer is set only when the answer did not come at once: a
        # local key answers synchronously, and a timer set and cancelled at
        # each call would cost two reactor calls for nothing.
        timer: IDelayedCall | None = None
        answered = timed_out = False

        def time_out() -> None:
            nonlocal timed_out
            timed_out = True
            d.cancel()

        def fired(result: Any) -> None:
            nonlocal answered
            answered = True
            if timer is not None and timer.active():
                timer.cancel()
            if self._pending is not d or self.state is not state:
                return
            self._pending = None
            try:
                callback(result)
            except ProtocolViolation as e:
                self.fail(e.description, str(e))
            except Exception as e:
                _log.failure("TLS handshake: the key holder's answer is unusable")
                self.fail(
                    AlertDescription.internal_error,
                    f"the key holder's answer is unusable: {e}",
                )

        def failed(failure: Failure) -> None:
            nonlocal answered
            answered = True
            if timer is not None and timer.active():
                timer.cancel()
            if self._pending is not d or self.state is not state:
                return
            self._pending = None
            if timed_out and isinstance(failure.value, CancelledError):
                reason = (
                    "the key holder did not answer within "
                    f"{self.config.remote_key_timeout:g} seconds"
                )
            elif isinstance(failure.value, CancelledError):
                reason = "the request to the key holder was cancelled"
            else:
                reason = f"the key holder failed: {failure.getErrorMessage()}"
            self.fail(AlertDescription.internal_error, reason)

        d.addCallbacks(fired, failed)
        if not answered:
            timer = self._clock.callLater(self.config.remote_key_timeout, time_out)

    def _got_chain(self, chain: list[x509.Certificate]) -> None:
        if not chain:
            raise _violation(
                AlertDescription.internal_error,
                "the key holder returned an empty certificate chain",
            )
        if not all(isinstance(c, x509.Certificate) for c in chain):
            raise _violation(
                AlertDescription.internal_error,
                "the key holder returned a chain that is not made of certificates",
            )
        assert self._client_scheme is not None
        key = chain[0].public_key()
        if self._client_scheme.is_ecdsa != isinstance(key, ec.EllipticCurvePublicKey):
            raise _violation(
                AlertDescription.internal_error,
                f"the client certificate's {type(key).__name__} cannot sign "
                f"with {self._client_scheme.name}",
            )
        self._client_chain = list(chain)
        self.info.client_chain = self._client_chain
        self._flight.append(self.config.client_certificate_message(chain))
        self._add_to_transcript(self._flight[-1])
        self._key_exchange()

        self._enter(State.WAIT_SIGNATURE)
        assert self.config.remote_key is not None
        self._wait(
            maybeDeferred(
                self.config.remote_key.sign,
                bytes(self._transcript),
                self._client_scheme,
            ),
            self._got_signature,
        )

    def _got_signature(self, signature: bytes) -> None:
        assert self._client_chain is not None and self._client_scheme is not None
        started = self._entered
        scheme = self._client_scheme
        # The signed bytes are the transcript so far: under the PRF's own
        # hash, their digest is at hand already.
        prehashed = scheme.hash_algorithm.name == self._hash.name
        try:
            good = verify_signature(
                self._client_chain[0].public_key(),
                scheme,
                signature,
                self._transcript_hash() if prehashed else bytes(self._transcript),
                prehashed=prehashed,
            )
        except UnsupportedKey:
            good = False
        if not good:
            raise _violation(
                AlertDescription.internal_error,
                "the key holder returned a signature that does not verify with "
                "the client certificate; not sending it",
            )
        # One event for the request and its answer: events cost, and the
        # duration says all the asking did.
        _log.info(
            "TLS CertificateVerify signature ({scheme}) from the key holder "
            "in {duration:.3f} s",
            scheme=self._client_scheme.name,
            duration=self._clock.seconds() - started,
        )
        self.info.client_signature_scheme = self._client_scheme.name
        self._flight.append(encode_certificate_verify(self._client_scheme, signature))
        self._add_to_transcript(self._flight[-1])
        self._send_finished()

    def _key_exchange(self) -> None:
        """
        Add our ClientKeyExchange to the flight and derive the master secret.
        """
        group = self._group
        private: _KeyExchangePrivate
        if group is NamedGroup.x25519:
            private = x25519.X25519PrivateKey.generate()
            public = private.public_key().public_bytes_raw()
            try:
                shared = private.exchange(self._server_public)
            except ValueError:
                raise _violation(
                    AlertDescription.illegal_parameter,
                    "the server's X25519 key gives an all-zero secret",
                ) from None
        else:
            assert group is not None
            private = ec.generate_private_key(_EC_CURVES[group])
            public = private.public_key().public_bytes(
                Encoding.X962, PublicFormat.UncompressedPoint
            )
            shared = private.exchange(ec.ECDH(), self._server_public)
        self._flight.append(encode_client_key_exchange(public))
        self._add_to_transcript(self._flight[-1])
        if self._ems:
            self._master_secret = prf.extended_master_secret(
                self._hash, shared, self._transcript_hash()
            )
        else:
            self._master_secret = prf.master_secret(
                self._hash, shared, self._client_random, self._server_random
            )
        self._protections = self._install_keys()

    def _send_finished(self) -> None:
        """
        Send the whole flight, ChangeCipherSpec and our Finished.
        """
        flight, self._flight = self._flight, []
        data = []
        if flight:
            data.append(self._records.seal(ContentType.handshake, b"".join(flight)))
        data.append(self._records.seal(ContentType.change_cipher_spec, b"\x01"))
        assert self._protections is not None
        client_protection, _ = self._protections
        self._records.set_write_protection(client_protection)
        finished = encode_finished(
            prf.verify_data(
                self._hash,
                self._master_secret,
                b"client finished",
                self._transcript_hash(),
            )
        )
        self._add_to_transcript(finished)
        data.append(self._records.seal(ContentType.handshake, finished))
        self._write(b"".join(data))
        if self.state is not State.WAIT_RESUMED_FINISHED:
            self._enter(State.WAIT_CHANGE_CIPHER_SPEC)

    def _new_session_ticket(self, body: bytes) -> None:
        if not self._expect_ticket or self._ticket is not None:
            raise _violation(
                AlertDescription.unexpected_message,
                "NewSessionTicket the server did not announce",
            )
        self._ticket = NewSessionTicket.decode(body)

    def _finished(self, body: bytes, raw: bytes) -> None:
        expected = prf.verify_data(
            self._hash, self._master_secret, b"server finished", self._transcript_hash()
        )
        if not constant_time.bytes_eq(expected, body):
            raise _violation(
                AlertDescription.decrypt_error,
                "the server Finished does not match the handshake",
            )
        self._add_to_transcript(raw)
        if self.state is State.WAIT_RESUMED_FINISHED:
            # An abbreviated handshake: our Finished comes second.
            self._send_finished()
        self._established()

    def _established(self) -> None:
        assert self._suite is not None
        self._enter(State.ESTABLISHED)
        cache = self.config.session_cache
        # An empty ticket is the server taking its offer back (RFC 5077,
        # section 3.3): the session stays resumable by its ID alone.
        ticket = self._ticket if self._ticket and self._ticket.ticket else None
        if cache is not None:
            offered = self._offered_session
            if self.info.resumed and offered is not None:
                if ticket is not None:
                    offered.ticket = ticket.ticket
                    offered.lifetime_hint = ticket.lifetime_hint
                    offered.created = self._clock.seconds()
            elif self.info.session_id or ticket is not None:
                cache.put(
                    self._cache_key,
                    Session(
                        suite=self._suite,
                        master_secret=self._master_secret,
                        session_id=self.info.session_id,
                        ticket=ticket.ticket if ticket is not None else None,
                        extended_master_secret=self._ems,
                        server_chain=self._server_chain,
                        client_chain=self._client_chain,
                        alpn=self.info.alpn,
                        created=self._clock.seconds(),
                        group=self.info.group,
                        lifetime_hint=ticket.lifetime_hint if ticket else 0,
                        verified_chain=self.info.verified_chain,
                    ),
                )
        self.info.ticket_received = ticket is not None
        _log.info(
            "TLS handshake with {host} done: {suite}, resumed={resumed}",
            host=self.host,
            suite=self._suite.name,
            resumed=self.info.resumed,
        )
        self._on_established(self.info)


_EXPECTED: dict[State, tuple[int, ...]] = {
    State.WAIT_SERVER_HELLO: (HandshakeType.server_hello,),
    State.WAIT_CERTIFICATE: (HandshakeType.certificate,),
    State.WAIT_SERVER_KEY_EXCHANGE: (HandshakeType.server_key_exchange,),
    State.WAIT_CERTIFICATE_REQUEST: (
        HandshakeType.certificate_request,
        HandshakeType.server_hello_done,
    ),
    State.WAIT_SERVER_HELLO_DONE: (HandshakeType.server_hello_done,),
    State.WAIT_CHANGE_CIPHER_SPEC: (HandshakeType.new_session_ticket,),
    State.WAIT_RESUMED_CHANGE_CIPHER_SPEC: (HandshakeType.new_session_ticket,),
    State.WAIT_FINISHED: (HandshakeType.finished,),
    State.WAIT_RESUMED_FINISHED: (HandshakeType.finished,),
}


def _scheme_name(code: int) -> str:
    try:
        return SignatureScheme(code).name
    except ValueError:
        return f"{code:#06x}"
