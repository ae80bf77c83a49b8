"""
The shape of what the project's TLS client has the card sign: the
transcript of a TLS 1.2 handshake with client authentication, from the
ClientHello to the ClientKeyExchange (RFC 5246, section 7.4.8). Each message
is checked to be what that client sends, or what it accepts from a server,
whole and with nothing after it, so that nothing rides in a transcript the
card signs but the fields of a handshake. A few of them no check can hold to
one value, being the client's or the server's own choice: the session ids,
a session ticket, the CertificateRequest's lists (of which only the
signature algorithm they imply matters) and the client's public value. The
checks that need trust (the server's chain, its ServerKeyExchange
signature) are the signing policy's.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from cpsdmp.protocols.tls.alerts import ProtocolViolation
from cpsdmp.protocols.tls.handshake import SERVER_SIGNATURE_SCHEMES
from cpsdmp.protocols.tls.messages import (
    ClientHello,
    ExtensionType,
    HandshakeType,
    Reader,
    ServerHello,
    decode_certificate,
    handshake_type_name,
)
from cpsdmp.protocols.tls.suites import SUITES_BY_CODE, NamedGroup


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

# What the project's TLS client puts in a ClientHello (see
# cpsdmp.protocols.tls.messages.ClientHello.encode): the extensions it
# names (_SENT) and no other, these five always.
_ALWAYS_SENT = (
    ExtensionType.supported_groups,
    ExtensionType.ec_point_formats,
    ExtensionType.signature_algorithms,
    ExtensionType.extended_master_secret,
    ExtensionType.renegotiation_info,
)
_SENT = frozenset(ExtensionType)
# The schemes it accepts for a server's signature, SHA-1 not among them.
_SCHEMES = frozenset(int(s) for s in SERVER_SIGNATURE_SCHEMES)
# What a server may answer of them in its ServerHello (RFC 5246, 7.4.1.4).
_ANSWERED = frozenset(
    {
        ExtensionType.server_name,
        ExtensionType.ec_point_formats,
        ExtensionType.application_layer_protocol_negotiation,
        ExtensionType.extended_master_secret,
        ExtensionType.session_ticket,
        ExtensionType.renegotiation_info,
    }
)
# A session ticket the client offers back is the server's, opaque: a few
# hundred bytes from OpenSSL, more when the server keeps the client's
# certificate in it.
MAX_TICKET = 4096
# An ALPN name the project's client offers: "http/1.1" and the like.
MAX_ALPN_NAMES = 8
MAX_ALPN_NAME = 32


@dataclass
class Hello:
    """
    A ClientHello, checked, with what the later checks need of it.
    """

    hello: ClientHello
    extensions: dict[int, bytes]
    alpn: list[bytes]


def check_client_hello(body: bytes) -> Hello:
    """
    Check that the ClientHello is one the project's TLS client sends: TLS
    1.2, its suites, groups and signature schemes only, no compression, its
    extensions only and each in the shape it sends, nothing after them.
    """
    reader = Reader(body, "ClientHello")
    if reader.uint(2) != 0x0303:
        raise Refused("the ClientHello is not TLS 1.2")
    reader.take(32)
    if len(reader.vector(1)) > 32:
        raise Refused("the ClientHello's session_id is longer than 32 bytes")
    suites = _uint16s(reader.vector(2), "cipher suites")
    _only(suites, SUITES_BY_CODE, "cipher suite", "offers")
    if reader.vector(1) != b"\x00":
        raise Refused(
            "the ClientHello offers compression; the project's client never does"
        )
    listed = Reader(reader.vector(2), "ClientHello extensions")
    reader.done()
    extensions: dict[int, bytes] = {}
    while listed.remaining():
        ext_type = listed.uint(2)
        data = listed.vector(2)
        if ext_type not in _SENT:
            raise Refused(
                f"the ClientHello carries extension {ext_type}, which the "
                "project's TLS client never sends"
            )
        if ext_type in extensions:
            raise Refused(f"the ClientHello repeats its {_ext_name(ext_type)}")
        extensions[ext_type] = data
    for ext_type in _ALWAYS_SENT:
        if ext_type not in extensions:
            raise Refused(
                f"the ClientHello lacks {ext_type.name}, which the project's TLS "
                "client always sends"
            )

    groups = _uint16_vector(extensions[ExtensionType.supported_groups], "groups")
    _only(groups, NamedGroup._value2member_map_, "group", "offers")
    schemes = _uint16_vector(
        extensions[ExtensionType.signature_algorithms], "signature_algorithms"
    )
    _only(
        schemes,
        {int(s) for s in SERVER_SIGNATURE_SCHEMES},
        "signature scheme",
        "accepts",
    )
    for ext_type, expected, what in [
        (ExtensionType.ec_point_formats, b"\x01\x00", "uncompressed points only"),
        (ExtensionType.extended_master_secret, b"", "empty"),
        (ExtensionType.renegotiation_info, b"\x00", "empty, for an initial handshake"),
    ]:
        if extensions[ext_type] != expected:
            raise Refused(
                f"the ClientHello's {ext_type.name} is not the project's TLS "
                f"client's ({what})"
            )
    ticket = extensions.get(ExtensionType.session_ticket, b"")
    if len(ticket) > MAX_TICKET:
        raise Refused(
            f"the ClientHello's session ticket is {len(ticket)} bytes, more than "
            f"the {MAX_TICKET} a server's ticket takes"
        )
    alpn = _alpn_names(
        extensions.get(ExtensionType.application_layer_protocol_negotiation)
    )
    # The fields the policy reads (randoms, server_name, lists) as the TLS
    # client's own decoder reads them.
    return Hello(ClientHello.decode(body), extensions, alpn)


def check_server_hello(body: bytes, offered: Hello) -> ServerHello:
    """
    Check that the ServerHello is one the project's TLS client accepts
    after C{offered}: TLS 1.2, a suite offered, no compression, only answers
    to extensions offered, each in its shape.
    """
    hello = ServerHello.decode(body)
    if hello.version != 0x0303:
        raise Refused("the ServerHello is not TLS 1.2")
    if hello.cipher_suite not in offered.hello.cipher_suites:
        raise Refused("the server chose a cipher suite the client did not offer")
    if hello.compression != 0:
        raise Refused("the server chose a compression method the client did not offer")
    for ext_type, data in hello.extensions.items():
        if ext_type not in _ANSWERED or ext_type not in offered.extensions:
            raise Refused(
                f"the ServerHello carries extension {ext_type}, which the client "
                "did not offer or a server does not answer"
            )
        if ext_type == ExtensionType.renegotiation_info:
            good = data == b"\x00"
        elif ext_type == ExtensionType.ec_point_formats:
            good = 1 <= len(data) - 1 == data[0] <= 8 and 0 in data[1:]
        elif ext_type == ExtensionType.application_layer_protocol_negotiation:
            names = _alpn_names(data)
            good = len(names) == 1 and names[0] in offered.alpn
        else:
            good = data == b""
        if not good:
            raise Refused(
                f"the ServerHello's {_ext_name(ext_type)} is not one the project's "
                "TLS client accepts"
            )
    return hello


def _uint16s(data: bytes, what: str) -> list[int]:
    if not data or len(data) % 2:
        raise Refused(f"the ClientHello's {what} are not a list of 16-bit values")
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


def _uint16_vector(data: bytes, what: str) -> list[int]:
    reader = Reader(data, f"ClientHello {what}")
    values = _uint16s(reader.vector(2), what)
    reader.done()
    return values


def _only(values: list[int], known: Container[int], what: str, verb: str) -> None:
    """
    Refuse a list with a value the project's TLS client never puts in it,
    or with one value twice.
    """
    for value in values:
        if value not in known:
            raise Refused(
                f"the ClientHello {verb} {what} {value:#06x}, which the project's "
                "TLS client never does"
            )
    if len(set(values)) != len(values):
        raise Refused(f"the ClientHello lists a {what} twice")


def _alpn_names(data: bytes | None) -> list[bytes]:
    """
    @return: the protocol names of an ALPN extension (RFC 7301, section
        3.1), each a short printable name.
    """
    if data is None:
        return []
    reader = Reader(data, "ALPN extension")
    names_reader = Reader(reader.vector(2), "ALPN protocol list")
    reader.done()
    names = []
    while names_reader.remaining():
        name = names_reader.vector(1)
        if not 1 <= len(name) <= MAX_ALPN_NAME or not all(
            0x21 <= c <= 0x7E for c in name
        ):
            raise Refused("an ALPN protocol name is not a short printable name")
        names.append(name)
    if not 1 <= len(names) <= MAX_ALPN_NAMES:
        raise Refused(f"the ALPN extension names {len(names)} protocols")
    return names


def _ext_name(ext_type: int) -> str:
    try:
        return f"{ExtensionType(ext_type).name} extension"
    except ValueError:
        return f"extension {ext_type}"


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
                f"{handshake_type_name(msg_type)}, not {expected.name}"
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
