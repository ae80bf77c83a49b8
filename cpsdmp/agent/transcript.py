"""
The shape of what the project's TLS client has the card sign: the
transcript of a TLS 1.2 handshake with client authentication, from the
ClientHello to the ClientKeyExchange (RFC 5246, section 7.4.8). Each message
is checked to be what that client sends, or what it accepts from a server,
whole and with nothing after it, so that no caller-chosen bytes ride in a
transcript the card signs. The checks that need trust (the server's chain,
its ServerKeyExchange signature) are the signing policy's.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from cpsdmp.protocols.tls.alerts import ProtocolViolation
from cpsdmp.protocols.tls.messages import (
    HandshakeType,
    Reader,
    decode_certificate,
)
from cpsdmp.protocols.tls.suites import NamedGroup


class Refused(Exception):
    """
    A check failed; the message is the reason given to the caller.
    """


# The messages a client has sent or received when it signs its
# CertificateVerify in a full handshake with client authentication
# (RFC 5246, section 7.4.8), in order.
TRANSCRIPT = (
    HandshakeType.client_hello,
    HandshakeType.server_hello,
    HandshakeType.certificate,
    HandshakeType.server_key_exchange,
    HandshakeType.certificate_request,
    HandshakeType.server_hello_done,
    HandshakeType.certificate,
    HandshakeType.client_key_exchange,
)

# The largest body of each message of the transcript, in the same order:
# well above what the project's TLS client sends (a ClientHello with a
# session ticket, a ClientKeyExchange of a P-384 point) and what a server
# sends it (a chain of a few certificates, the names of the CAs it accepts).
MAX_MESSAGE = (8192, 1024, 32768, 2048, 16384, 0, 16384, 1 + 97)

# The NIST curves of the groups the project's TLS client offers.
_CURVES: dict[NamedGroup, ec.EllipticCurve] = {
    NamedGroup.secp256r1: ec.SECP256R1(),
    NamedGroup.secp384r1: ec.SECP384R1(),
}


def check_client_key_exchange(body: bytes, group: NamedGroup) -> None:
    """
    Check that the ClientKeyExchange is what the project's TLS client sends:
    one ECDHE public value for the server's group (RFC 8422, section 5.7),
    nothing after it.
    """
    reader = Reader(body, "ClientKeyExchange")
    public = reader.vector(1)
    if reader.remaining():
        raise Refused("the ClientKeyExchange goes on after its public value")
    what = f"the ClientKeyExchange is not one {group.name} public value"
    if group is NamedGroup.x25519:
        if len(public) != 32:
            raise Refused(f"{what}: {len(public)} bytes, where X25519 takes 32")
        x25519.X25519PublicKey.from_public_bytes(public)
        return
    curve = _CURVES[group]
    size = 1 + 2 * ((curve.key_size + 7) // 8)
    if len(public) != size or public[0] != 4:
        raise Refused(
            f"{what}: {len(public)} bytes, where an uncompressed point is {size} "
            "bytes starting with 04"
        )
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(curve, public)
    except ValueError:
        raise Refused(f"{what}: not a point of the curve") from None


def client_certificate_mismatch(body: bytes, card_chain: Sequence[bytes]) -> str:
    """
    @return: how the client Certificate C{body} differs from the card's
        chain as the agent serves it.
    """
    exactly = "is not exactly the card's certificate and its chain as the agent serves"
    try:
        client_chain = decode_certificate(body)
    except ProtocolViolation:
        return f"the client Certificate {exactly} them: it does not parse whole"
    if not client_chain or client_chain[0] != card_chain[0]:
        return "the client Certificate is not this card's authentication certificate"
    return (
        f"the client Certificate {exactly} them ({len(client_chain)} "
        f"certificates where the agent serves {len(card_chain)})"
    )


def server_certificate(der: bytes) -> x509.Certificate:
    """
    Load one certificate of the server's chain and read at once the parts
    that C{cryptography} parses only when asked (names, extensions, key), so
    that a malformed one is refused here, by name.
    """
    try:
        certificate = x509.load_der_x509_certificate(der)
        _ = (certificate.subject, certificate.issuer, certificate.extensions)
        certificate.public_key()
    except (
        ValueError,
        x509.InvalidVersion,
        x509.DuplicateExtension,
        UnsupportedAlgorithm,
    ) as e:
        raise Refused(
            f"the server Certificate holds a malformed certificate ({e})"
        ) from None
    return certificate


def split_transcript(data: bytes) -> list[bytes]:
    """
    @return: the bodies of the transcript's messages, once their types,
        order and lengths are checked. Each message's type is checked
        before its length is read, so that what is not a transcript at all
        is said to be so, not taken for a huge message.
    """
    bodies: list[bytes] = []
    offset = 0
    for index, (expected, limit) in enumerate(
        zip(TRANSCRIPT, MAX_MESSAGE, strict=True)
    ):
        if offset == len(data):
            raise Refused(
                f"the transcript ends before its {expected.name} (truncated, "
                "or not handshake messages)"
            )
        msg_type = data[offset]
        if msg_type != expected:
            if index == 0:
                raise Refused(
                    "not a TLS 1.2 handshake transcript: it starts with "
                    f"{_first_byte(msg_type)}, where a transcript starts with a "
                    "ClientHello (handshake type 1)"
                )
            raise Refused(
                f"message {index + 1} of the transcript is "
                f"{_type_name(msg_type)}, not {expected.name}"
            )
        truncated = Refused(
            f"the transcript ends before its {expected.name} is whole (truncated)"
        )
        if offset + 4 > len(data):
            raise truncated
        length = int.from_bytes(data[offset + 1 : offset + 4], "big")
        if length > limit:
            raise Refused(
                f"the {expected.name} is {length} bytes, more than the {limit} "
                "the project's TLS client sends or accepts"
            )
        end = offset + 4 + length
        if end > len(data):
            raise truncated
        bodies.append(data[offset + 4 : end])
        offset = end
    if offset != len(data):
        raise Refused("the transcript goes on after the ClientKeyExchange")
    return bodies


def _first_byte(value: int) -> str:
    """
    @return: how to name the first byte of what is not a transcript: as a
        handshake type if it is one, else as a character or in hex.
    """
    try:
        return f"a {HandshakeType(value).name} (type {value})"
    except ValueError:
        pass
    if 0x20 < value < 0x7F:
        return f"{chr(value)!r} ({value:#04x})"
    return f"byte {value:#04x}"


def _type_name(msg_type: int) -> str:
    try:
        return HandshakeType(msg_type).name
    except ValueError:
        return f"type {msg_type}"
