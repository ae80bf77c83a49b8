"""
What the agent agrees to sign. The card's authentication key signs only the
transcript of a genuine TLS 1.2 handshake between this card and an allowed
server; its signature key signs only the canonical SignedInfo of a
submission-set signature whose request it has checked whole (the manifest,
the signature properties and the signed properties the SignedInfo covers).
Everything else is refused with a reason.

A transcript is genuine when it parses as the client's view of a full
handshake with client authentication, the server chain leads to a trusted
root for the server's name, and the ServerKeyExchange signature verifies
over the transcript's own randoms: that signature is made by the server's
private key, so no one can build such a transcript from the server's public
chain alone. What that signature does not cover (the ClientHello but its
random, the ServerHello but its random, the CertificateRequest, the client's
Certificate and ClientKeyExchange) is held to what the project's TLS client
sends (L{cpsdmp.agent.transcript}), the algorithm asked for must be the one
that client would sign the handshake with, and a transcript is signed once.

The server's name is the ClientHello's server_name. A client sends none for
an IP address (RFC 6066, section 3); then the certificate must be valid for
one of the IP-literal entries of the allow-list, and a DNS entry never
matches a handshake without server_name.
"""

from __future__ import annotations

import datetime
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from service_identity import CertificateError
from twisted.logger import Logger

from cpsdmp.agent.transcript import (
    Refused,
    check_client_hello,
    check_client_key_exchange,
    check_server_hello,
    client_certificate_mismatch,
    server_certificate,
    split_transcript,
)
from cpsdmp.protocols.tls.alerts import ProtocolViolation
from cpsdmp.protocols.tls.messages import (
    CertificateRequest,
    ServerKeyExchange,
    decode_certificate,
    encode_certificate,
)
from cpsdmp.protocols.tls.schemes import (
    SignatureScheme,
    UnsupportedKey,
    verify_signature,
)
from cpsdmp.protocols.tls.suites import NamedGroup
from cpsdmp.protocols.tls.validation import VerifiedChains, is_ip_literal
from cpsdmp.xds.signature import (
    SignatureRequest,
    SignatureRequestRefused,
    check_signature_request,
    document_uri,
)

_log = Logger()

#: The DMP's hosts: production, then the test platform.
DMP_SERVERS = ("lps2.dmp.gouv.fr", "lps.dev1.dmp.gouv.fr")

#: The sandbox's names, allowed too when the agent runs on a test card.
SANDBOX_SERVERS = ("localhost", "127.0.0.1")

#: The TLS 1.2 signature schemes the card's authentication key signs
#: with, in the order the project's TLS client prefers them (it takes the
#: first one the server's CertificateRequest accepts), and the agent's name
#: of each (RFC 5246, section 7.4.1.4.1). SHA-1 is not among them.
CARD_TLS_SCHEMES: Mapping[SignatureScheme, str] = {
    SignatureScheme.rsa_pkcs1_sha256: "SHA256WithRSA",
    SignatureScheme.rsa_pkcs1_sha384: "SHA384WithRSA",
    SignatureScheme.rsa_pkcs1_sha512: "SHA512WithRSA",
}

# ClientCertificateType rsa_sign (RFC 5246, section 7.4.4).
_RSA_SIGN = 1


@dataclass(frozen=True)
class PolicyDecision:
    """
    Whether to sign; C{reason} says why not, C{subject} what was asked for
    (the server's name, or the submission set), for the audit log.
    """

    allowed: bool
    subject: str
    reason: str = ""
    #: What the card signs once allowed (not always the data asked).
    payload: bytes = b""
    #: More for the audit log: what a document signature is about.
    details: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def allow(
        cls, subject: str, payload: bytes, details: Mapping[str, Any] | None = None
    ) -> PolicyDecision:
        return cls(True, subject, "", payload, details or {})

    @classmethod
    def refuse(cls, reason: str, subject: str = "") -> PolicyDecision:
        return cls(False, subject, reason)


def _name_matches(name: str, allowed: str) -> bool:
    return name.rstrip(".").lower() == allowed.rstrip(".").lower()


#: How long, and how many, client randoms of signed transcripts the agent
#: remembers to refuse them again: a day, and far more handshakes than a
#: professional's software makes in one (TLS resumption spares most
#: connections a handshake signature).
REPLAY_WINDOW = 24 * 3600.0
REPLAY_CAPACITY = 10_000


class RecentRandoms:
    """
    The client randoms of the transcripts signed lately. A TLS client makes
    a new random for every handshake (RFC 5246, section 7.4.1.2), so a
    transcript whose random was signed already is a replay. Bounded: a
    random is forgotten after C{window} seconds, the oldest first beyond
    C{capacity}.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        window: float = REPLAY_WINDOW,
        capacity: int = REPLAY_CAPACITY,
    ) -> None:
        self._clock = clock
        self.window = window
        self.capacity = capacity
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def claim(self, random: bytes) -> None:
        """
        Remember C{random} as signed now.

        @raise Refused: if it was signed within the window.
        """
        now = self._clock()
        while self._seen and next(iter(self._seen.values())) <= now - self.window:
            self._seen.popitem(last=False)
        signed = self._seen.get(random)
        if signed is not None:
            raise Refused(
                f"this transcript was signed {now - signed:.0f} s ago, and a TLS "
                "client makes a new random for every handshake: a replay"
            )
        self._seen[random] = now
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)

    def __len__(self) -> int:
        return len(self._seen)


class SigningPolicy:
    """
    The agent's rules for signing, with the roots server chains must lead to
    and the server names the card may authenticate to.
    """

    def __init__(
        self,
        roots: Sequence[x509.Certificate],
        allowed_servers: Iterable[str] = DMP_SERVERS,
        now: datetime.datetime | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.roots = list(roots)
        self.allowed_servers = [s.strip() for s in allowed_servers if s.strip()]
        self._now = now
        self._chains = VerifiedChains()
        self.recent = RecentRandoms(clock)

    # The authentication key

    def check_authentication(
        self,
        data: bytes,
        card_chain: Sequence[bytes],
        algorithm: str = "SHA256WithRSA",
    ) -> PolicyDecision:
        """
        Check that C{data} is the transcript of a TLS 1.2 handshake, up to
        the client's ClientKeyExchange, between the card whose
        authentication certificate and intermediates are C{card_chain}
        (DER, as the agent serves them) and an allowed server, made by the
        project's TLS client, which signs it with C{algorithm}, and not
        signed before.
        """
        try:
            return PolicyDecision.allow(
                self._check_transcript(data, card_chain, algorithm), data
            )
        except Refused as e:
            return PolicyDecision.refuse(str(e))
        except ProtocolViolation as e:
            return PolicyDecision.refuse(f"not a TLS 1.2 handshake transcript: {e}")
        except Exception:
            return _unchecked("transcript")

    def _check_transcript(
        self, data: bytes, card_chain: Sequence[bytes], algorithm: str
    ) -> str:
        if algorithm == "SHA1WithRSA":
            raise Refused(
                "SHA1WithRSA is refused for TLS client authentication: SHA-1 is "
                "broken for signatures (chosen-prefix collisions), and the "
                "project's TLS client never signs with it"
            )
        messages = split_transcript(data)
        offered = check_client_hello(messages[0])
        hello = offered.hello
        server_hello = check_server_hello(messages[1], offered)

        server_chain = [
            server_certificate(der) for der in decode_certificate(messages[2])
        ]
        if not server_chain:
            raise Refused("the server sent no certificate")
        name = self._check_server(hello.server_name, server_chain)

        exchange = ServerKeyExchange.decode(messages[3])
        if exchange.group not in hello.groups:
            raise Refused(
                f"the server chose group {exchange.group}, which the ClientHello "
                "did not offer"
            )
        # One of the project's groups: the ClientHello offers no other.
        group = NamedGroup(exchange.group)
        if exchange.scheme not in hello.signature_schemes:
            raise Refused(
                f"the server signed its key exchange with scheme "
                f"{exchange.scheme:#06x}, which the ClientHello did not offer"
            )
        try:
            scheme = SignatureScheme(exchange.scheme)
            signed = hello.random + server_hello.random + exchange.signed_params
            good = verify_signature(
                server_chain[0].public_key(), scheme, exchange.signature, signed
            )
        except (ValueError, UnsupportedKey):
            good = False
        if not good:
            raise Refused(
                f"the ServerKeyExchange signature does not verify with the "
                f"certificate of {name} over this handshake's randoms"
            )

        request = CertificateRequest.decode(messages[4])
        implied = _implied_algorithm(request)
        if algorithm != implied:
            raise Refused(
                f"this handshake's CertificateVerify is made with {implied} (the "
                "first of the card's schemes that the server's CertificateRequest "
                f"accepts), not {algorithm}"
            )
        if messages[5]:
            raise Refused("the ServerHelloDone is not empty")
        # The project's TLS client sends the chain the agent serves, as is:
        # nothing else may ride in it.
        if messages[6] != encode_certificate(list(card_chain))[4:]:
            raise Refused(client_certificate_mismatch(messages[6], card_chain))
        check_client_key_exchange(messages[7], group)

        # Last, once everything else holds: a transcript is signed once.
        self.recent.claim(hello.random)
        return name

    def _check_server(
        self, server_name: str | None, chain: list[x509.Certificate]
    ) -> str:
        """
        @return: the allowed name the chain was verified for.
        """
        if server_name is not None:
            candidates = [
                s for s in self.allowed_servers if _name_matches(server_name, s)
            ]
            if not candidates:
                raise Refused(
                    f"the server {server_name!r} is not allowed (the agent "
                    "authenticates only to the servers of its --allow-server list)"
                )
        else:
            candidates = [s for s in self.allowed_servers if is_ip_literal(s)]
            if not candidates:
                raise Refused(
                    "the handshake names no server (no server_name) and no IP "
                    "address is allowed (--allow-server)"
                )
        reasons = []
        for name in candidates:
            try:
                self._chains.check(chain, self.roots, name, self._now)
            except (ProtocolViolation, CertificateError) as e:
                # service_identity raises CertificateError, not a mismatch,
                # for a certificate that names no server at all.
                reasons.append(str(e))
                continue
            return name
        raise Refused(f"the server chain is not accepted: {'; '.join(reasons)}")

    # The signature key

    def check_signature(
        self,
        data: bytes,
        algorithm: str,
        card_chain: Sequence[x509.Certificate],
    ) -> PolicyDecision:
        """
        Check that C{data} is a submission-set signature request (the
        signature without its value) as L{cpsdmp.xds.signature} makes it
        for the card whose signature certificate and intermediates are
        C{card_chain}, with C{algorithm} (the endpoint's name): every
        reference's digest recomputed, the manifest's shape, the signing
        certificate, the signing time. Allowed, the card signs its
        SignedInfo's exclusive C14N.
        """
        try:
            checked = check_signature_request(data, algorithm, card_chain[0], self._now)
        except SignatureRequestRefused as e:
            return PolicyDecision.refuse(str(e))
        except Exception:
            return _unchecked("signature request")
        count = len(checked.documents)
        return PolicyDecision.allow(
            f"submission set {checked.set_id}, {count} document"
            + ("s" if count > 1 else ""),
            checked.to_be_signed,
            signature_details(checked),
        )


def signature_details(checked: SignatureRequest) -> dict[str, Any]:
    """
    @return: what the audit log keeps of a document signature: the
        submission set's uniqueId, and each document's manifest reference
        and SHA-256, so that what the professional signed is on record.
    """
    return {
        "submissionSet": checked.set_id,
        "documents": [
            {"reference": document_uri(unique_id), "sha256": digest.hex()}
            for unique_id, digest in checked.documents
        ],
    }


def _implied_algorithm(request: CertificateRequest) -> str:
    """
    @return: the agent's name of the scheme the project's TLS client signs
        its CertificateVerify with after C{request}: the first of the
        card's that the server accepts, for an RSA certificate.
    """
    if _RSA_SIGN not in request.certificate_types:
        raise Refused(
            "the server's CertificateRequest does not take an RSA certificate"
        )
    for scheme, name in CARD_TLS_SCHEMES.items():
        if scheme in request.signature_schemes:
            return name
    raise Refused(
        "the server's CertificateRequest accepts none of the schemes the card "
        f"signs with ({', '.join(s.name for s in CARD_TLS_SCHEMES)})"
    )


def _unchecked(what: str) -> PolicyDecision:
    """
    Refuse what a check failed on by an error of its own rather than by a
    reason: the card signs only what was checked through. The error is
    logged for whoever maintains the agent.
    """
    _log.failure("the signing policy failed on a {what}", what=what)
    return PolicyDecision.refuse(
        f"the agent could not check this {what} (its log has the error); "
        "it signs only what it has checked"
    )
