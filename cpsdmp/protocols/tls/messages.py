"""
TLS 1.2 handshake messages and hello extensions: encoding the ones a client
sends, decoding the ones a server sends (RFC 5246 section 7.4, RFC 8422,
RFC 7627, RFC 5746, RFC 5077, RFC 7301, RFC 6066), and reassembling the
handshake byte stream into messages whatever the record boundaries.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from cpsdmp.protocols.tls.alerts import AlertDescription, ProtocolViolation


class HandshakeType(enum.IntEnum):
    hello_request = 0
    client_hello = 1
    server_hello = 2
    new_session_ticket = 4
    certificate = 11
    server_key_exchange = 12
    certificate_request = 13
    server_hello_done = 14
    certificate_verify = 15
    client_key_exchange = 16
    finished = 20


def handshake_type_name(msg_type: int) -> str:
    """
    @return: the name of a handshake message type, or its number when it is
        none this client knows.
    """
    try:
        return HandshakeType(msg_type).name
    except ValueError:
        return f"type {msg_type}"


class ExtensionType(enum.IntEnum):
    server_name = 0
    supported_groups = 10
    ec_point_formats = 11
    signature_algorithms = 13
    application_layer_protocol_negotiation = 16
    extended_master_secret = 23
    session_ticket = 35
    renegotiation_info = 0xFF01


# RFC 5746, section 3.3
TLS_EMPTY_RENEGOTIATION_INFO_SCSV = 0xFF00
MAX_HANDSHAKE_MESSAGE = 2**16 * 4  # far above any chain we accept


def _decode_error(what: str) -> ProtocolViolation:
    return ProtocolViolation(AlertDescription.decode_error, f"malformed {what}")


class Reader:
    """
    Reads length-prefixed TLS structures out of one message body; running
    off its end is a decode_error naming the message.
    """

    # Called a few dozen times per handshake: each method does its own
    # bounds check rather than going through take().
    __slots__ = ("_data", "_offset", "_end", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._offset = 0
        self._end = len(data)
        self._what = what

    def take(self, n: int) -> bytes:
        start = self._offset
        end = start + n
        if end > self._end:
            raise _decode_error(self._what)
        self._offset = end
        return self._data[start:end]

    def uint(self, size: int) -> int:
        start = self._offset
        end = start + size
        if end > self._end:
            raise _decode_error(self._what)
        self._offset = end
        return int.from_bytes(self._data[start:end], "big")

    def vector(self, length_size: int) -> bytes:
        data = self._data
        start = self._offset + length_size
        if start > self._end:
            raise _decode_error(self._what)
        end = start + int.from_bytes(data[self._offset : start], "big")
        if end > self._end:
            raise _decode_error(self._what)
        self._offset = end
        return data[start:end]

    def remaining(self) -> int:
        return self._end - self._offset

    def done(self) -> None:
        if self._offset != self._end:
            raise _decode_error(self._what)


def vector(data: bytes, length_size: int) -> bytes:
    return len(data).to_bytes(length_size, "big") + data


def handshake(msg_type: int, body: bytes) -> bytes:
    """
    @return: one handshake message with its 4-byte header.
    """
    return struct.pack(">B", msg_type) + len(body).to_bytes(3, "big") + body


def _extension(ext_type: int, data: bytes) -> bytes:
    return struct.pack(">HH", ext_type, len(data)) + data


def _uint16_list(values: list[int]) -> bytes:
    return vector(struct.pack(f">{len(values)}H", *values), 2)


@dataclass
class ClientHello:
    random: bytes
    session_id: bytes
    cipher_suites: list[int]
    server_name: str | None
    groups: list[int]
    signature_schemes: list[int]
    alpn: list[bytes] = field(default_factory=list)
    session_ticket: bytes | None = None
    offer_ticket: bool = True

    def encode(self) -> bytes:
        extensions = []
        if self.server_name is not None:
            host = self.server_name.encode("idna")
            # RFC 6066, section 3: one host_name entry
            entry = b"\x00" + vector(host, 2)
            extensions.append(_extension(ExtensionType.server_name, vector(entry, 2)))
        extensions.append(
            _extension(ExtensionType.supported_groups, _uint16_list(self.groups))
        )
        # RFC 8422, section 5.1.2: uncompressed only
        extensions.append(_extension(ExtensionType.ec_point_formats, b"\x01\x00"))
        extensions.append(
            _extension(
                ExtensionType.signature_algorithms,
                _uint16_list(self.signature_schemes),
            )
        )
        if self.alpn:
            names = b"".join(vector(p, 1) for p in self.alpn)
            extensions.append(
                _extension(
                    ExtensionType.application_layer_protocol_negotiation,
                    vector(names, 2),
                )
            )
        extensions.append(_extension(ExtensionType.extended_master_secret, b""))
        if self.offer_ticket:
            extensions.append(
                _extension(ExtensionType.session_ticket, self.session_ticket or b"")
            )
        # An empty renegotiation_info on the initial handshake (RFC 5746)
        extensions.append(_extension(ExtensionType.renegotiation_info, b"\x00"))
        body = (
            struct.pack(">H", 0x0303)
            + self.random
            + vector(self.session_id, 1)
            + _uint16_list(self.cipher_suites)
            + b"\x01\x00"  # compression methods: null only
            + vector(b"".join(extensions), 2)
        )
        return handshake(HandshakeType.client_hello, body)

    @classmethod
    def decode(cls, body: bytes) -> ClientHello:
        """
        Read a TLS 1.2 ClientHello body back, as a party that checks what a
        client sent (the agent, before it signs a transcript) needs to.
        """
        r = Reader(body, "ClientHello")
        if r.uint(2) != 0x0303:
            raise _decode_error("ClientHello version")
        random = r.take(32)
        session_id = r.vector(1)
        suites = r.vector(2)
        if len(session_id) > 32 or not suites or len(suites) % 2:
            raise _decode_error("ClientHello")
        r.vector(1)  # compression methods
        extensions: dict[int, bytes] = {}
        ext = Reader(r.vector(2), "ClientHello extensions")
        r.done()
        while ext.remaining():
            ext_type = ext.uint(2)
            if ext_type in extensions:
                raise _decode_error(f"ClientHello: extension {ext_type} repeated")
            extensions[ext_type] = ext.vector(2)
        server_name = None
        if ExtensionType.server_name in extensions:
            server_name = _decode_server_name(extensions[ExtensionType.server_name])
        return cls(
            random=random,
            session_id=session_id,
            cipher_suites=_uint16s(suites),
            server_name=server_name,
            groups=_uint16_vector(
                extensions.get(ExtensionType.supported_groups), "supported_groups"
            ),
            signature_schemes=_uint16_vector(
                extensions.get(ExtensionType.signature_algorithms),
                "signature_algorithms",
            ),
            session_ticket=extensions.get(ExtensionType.session_ticket),
            offer_ticket=ExtensionType.session_ticket in extensions,
        )


def _uint16s(data: bytes) -> list[int]:
    if len(data) % 2:
        raise _decode_error("list of 16-bit values")
    return list(struct.unpack(f">{len(data) // 2}H", data))


def _uint16_vector(data: bytes | None, what: str) -> list[int]:
    if data is None:
        return []
    r = Reader(data, what)
    values = _uint16s(r.vector(2))
    r.done()
    return values


def _decode_server_name(data: bytes) -> str:
    # RFC 6066, section 3: a list holding one host_name (type 0) entry
    r = Reader(data, "server_name extension")
    names = Reader(r.vector(2), "server_name list")
    r.done()
    if names.uint(1) != 0:
        raise _decode_error("server_name entry type")
    host = names.vector(2)
    names.done()
    try:
        return host.decode("ascii")
    except UnicodeDecodeError:
        raise _decode_error("server_name host") from None


@dataclass
class ServerHello:
    version: int
    random: bytes
    session_id: bytes
    cipher_suite: int
    compression: int
    extensions: dict[int, bytes]

    @classmethod
    def decode(cls, body: bytes) -> ServerHello:
        r = Reader(body, "ServerHello")
        version = r.uint(2)
        random = r.take(32)
        session_id = r.vector(1)
        if len(session_id) > 32:
            raise _decode_error("ServerHello session_id")
        suite = r.uint(2)
        compression = r.uint(1)
        extensions: dict[int, bytes] = {}
        if r.remaining():
            ext = Reader(r.vector(2), "ServerHello extensions")
            while ext.remaining():
                ext_type = ext.uint(2)
                if ext_type in extensions:
                    raise ProtocolViolation(
                        AlertDescription.illegal_parameter,
                        f"ServerHello repeats extension {ext_type}",
                    )
                extensions[ext_type] = ext.vector(2)
        r.done()
        return cls(version, random, session_id, suite, compression, extensions)


def decode_certificate(body: bytes) -> list[bytes]:
    """
    @return: the DER certificates of a Certificate message, leaf first.
    """
    r = Reader(body, "Certificate")
    chain = Reader(r.vector(3), "Certificate list")
    r.done()
    certificates = []
    while chain.remaining():
        certificates.append(chain.vector(3))
    return certificates


def encode_certificate(chain: list[bytes]) -> bytes:
    entries = b"".join(vector(der, 3) for der in chain)
    return handshake(HandshakeType.certificate, vector(entries, 3))


@dataclass
class ServerKeyExchange:
    """
    ECDHE parameters (RFC 8422 section 5.4) and their signature.
    """

    group: int
    public: bytes
    scheme: int
    signature: bytes
    signed_params: bytes

    @classmethod
    def decode(cls, body: bytes) -> ServerKeyExchange:
        r = Reader(body, "ServerKeyExchange")
        curve_type = r.uint(1)
        if curve_type != 3:  # named_curve
            raise ProtocolViolation(
                AlertDescription.illegal_parameter,
                f"ServerKeyExchange curve type {curve_type} is not named_curve",
            )
        group = r.uint(2)
        public = r.vector(1)
        signed_params = body[: 4 + len(public)]
        scheme = r.uint(2)
        signature = r.vector(2)
        r.done()
        return cls(group, public, scheme, signature, signed_params)


@dataclass
class CertificateRequest:
    certificate_types: bytes
    signature_schemes: list[int]
    authorities: list[bytes]

    @classmethod
    def decode(cls, body: bytes) -> CertificateRequest:
        r = Reader(body, "CertificateRequest")
        types = r.vector(1)
        schemes_data = r.vector(2)
        if len(schemes_data) % 2:
            raise _decode_error("CertificateRequest signature algorithms")
        schemes = list(struct.unpack(f">{len(schemes_data) // 2}H", schemes_data))
        names = Reader(r.vector(2), "CertificateRequest authorities")
        r.done()
        authorities = []
        while names.remaining():
            authorities.append(names.vector(2))
        return cls(types, schemes, authorities)


@dataclass
class NewSessionTicket:
    lifetime_hint: int
    ticket: bytes

    @classmethod
    def decode(cls, body: bytes) -> NewSessionTicket:
        r = Reader(body, "NewSessionTicket")
        lifetime = r.uint(4)
        ticket = r.vector(2)
        r.done()
        return cls(lifetime, ticket)


def encode_client_key_exchange(public: bytes) -> bytes:
    return handshake(HandshakeType.client_key_exchange, vector(public, 1))


def encode_certificate_verify(scheme: int, signature: bytes) -> bytes:
    return handshake(
        HandshakeType.certificate_verify,
        struct.pack(">H", scheme) + vector(signature, 2),
    )


def encode_finished(verify_data: bytes) -> bytes:
    return handshake(HandshakeType.finished, verify_data)


def decode_alpn(data: bytes) -> bytes:
    r = Reader(data, "ALPN extension")
    names = Reader(r.vector(2), "ALPN protocol list")
    r.done()
    name = names.vector(1)
    names.done()
    if not name:
        raise _decode_error("ALPN protocol name")
    return name


class HandshakeReassembler:
    """
    Turns the handshake content of any number of records into whole
    messages: a message may span records, even inside its 4-byte header, and
    one record may hold several messages.
    """

    def __init__(self) -> None:
        # The bytes fed and not yet taken start at _offset; messages are
        # cut out of them without moving the rest.
        self._buffer = b""
        self._offset = 0

    def feed(self, data: bytes) -> None:
        if self._offset < len(self._buffer):
            self._buffer = self._buffer[self._offset :] + data
        else:
            self._buffer = bytes(data)
        self._offset = 0

    @property
    def pending(self) -> bool:
        return self._offset < len(self._buffer)

    def next_message(self) -> tuple[int, bytes, bytes] | None:
        """
        @return: the next message's type, body and raw bytes (header
            included, for the transcript), or C{None} until it is complete.
        """
        buffer = self._buffer
        start = self._offset
        if len(buffer) - start < 4:
            return None
        length = int.from_bytes(buffer[start + 1 : start + 4], "big")
        if length > MAX_HANDSHAKE_MESSAGE:
            raise ProtocolViolation(
                AlertDescription.decode_error,
                f"handshake message of {length} bytes is too large",
            )
        end = start + 4 + length
        if len(buffer) < end:
            return None
        self._offset = end
        raw = buffer if start == 0 and end == len(buffer) else buffer[start:end]
        return raw[0], raw[4:], raw
