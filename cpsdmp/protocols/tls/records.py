"""
The TLS 1.2 record layer (RFC 5246 section 6.2): framing, fragmenting at
2^14 bytes and the record protections of the suites we offer: AES-GCM with
RFC 5288 nonces, ChaCha20-Poly1305 with RFC 7905 nonces, AES-CBC with
HMAC-SHA384. It knows nothing of handshake messages.
"""

from __future__ import annotations

import enum
import os
import struct
from typing import Protocol

from cryptography.hazmat.primitives import constant_time, hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from cpsdmp.protocols.tls.alerts import AlertDescription, ProtocolViolation
from cpsdmp.protocols.tls.suites import BulkCipher, CipherSuite

# A plaintext fragment: a view into the caller's data, to avoid a copy.
Data = bytes | memoryview

TLS12 = 0x0303
MAX_PLAINTEXT = 2**14  # RFC 5246, section 6.2.1
MAX_CIPHERTEXT = 2**14 + 2048  # RFC 5246, section 6.2.3
# RFC 5246, section 6.1: sequence numbers never wrap. We never renegotiate,
# so a connection ends there; the last number is kept for its closing alert.
MAX_SEQUENCE = 2**64 - 1
_HEADER = struct.Struct(">BHH")
_AAD = struct.Struct(">QBHH")
_SEQ = struct.Struct(">Q")


class ContentType(enum.IntEnum):
    change_cipher_spec = 20
    alert = 21
    handshake = 22
    application_data = 23


def _bad_mac() -> ProtocolViolation:
    return ProtocolViolation(
        AlertDescription.bad_record_mac, "a record failed its integrity check"
    )


def _sequence_exhausted() -> ProtocolViolation:
    return ProtocolViolation(
        AlertDescription.internal_error,
        "the write sequence number has reached its limit of 2^64 - 1 "
        "records: the connection must end",
    )


class RecordProtection(Protocol):
    """
    One direction's record protection: C{seal} turns a plaintext fragment
    into the pieces of the record body (kept apart to save a copy on the
    hot path), C{open} the reverse, both under sequence number C{seq}.
    """

    def seal(self, content_type: int, seq: int, plaintext: Data) -> list[bytes]: ...

    def open(self, content_type: int, seq: int, fragment: Data) -> bytes: ...


class NullProtection:
    """
    The protection before the first ChangeCipherSpec: none.
    """

    def seal(self, content_type: int, seq: int, plaintext: Data) -> list[bytes]:
        return [bytes(plaintext)]

    def open(self, content_type: int, seq: int, fragment: Data) -> bytes:
        return bytes(fragment)


class AESGCMProtection:
    """
    AES-GCM as RFC 5288 uses it: a 4-byte salt from the key block and an
    8-byte explicit nonce, here the sequence number, sent in each record.
    """

    def __init__(self, key: bytes, salt: bytes) -> None:
        self._aead = AESGCM(key)
        self._salt = salt

    def seal(self, content_type: int, seq: int, plaintext: Data) -> list[bytes]:
        explicit = _SEQ.pack(seq)
        aad = _AAD.pack(seq, content_type, TLS12, len(plaintext))
        return [explicit, self._aead.encrypt(self._salt + explicit, plaintext, aad)]

    def open(self, content_type: int, seq: int, fragment: Data) -> bytes:
        if len(fragment) < 8 + 16:
            raise _bad_mac()
        aad = _AAD.pack(seq, content_type, TLS12, len(fragment) - 24)
        try:
            return self._aead.decrypt(self._salt + fragment[:8], fragment[8:], aad)
        except Exception:
            raise _bad_mac() from None


class ChaCha20Poly1305Protection:
    """
    ChaCha20-Poly1305 as RFC 7905 uses it: the 12-byte IV from the key block
    XORed with the padded sequence number, nothing explicit on the wire.
    """

    def __init__(self, key: bytes, iv: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._iv = int.from_bytes(iv, "big")

    def _nonce(self, seq: int) -> bytes:
        return (self._iv ^ seq).to_bytes(12, "big")

    def seal(self, content_type: int, seq: int, plaintext: Data) -> list[bytes]:
        aad = _AAD.pack(seq, content_type, TLS12, len(plaintext))
        return [self._aead.encrypt(self._nonce(seq), plaintext, aad)]

    def open(self, content_type: int, seq: int, fragment: Data) -> bytes:
        if len(fragment) < 16:
            raise _bad_mac()
        aad = _AAD.pack(seq, content_type, TLS12, len(fragment) - 16)
        try:
            return self._aead.decrypt(self._nonce(seq), fragment, aad)
        except Exception:
            raise _bad_mac() from None


class AESCBCProtection:
    """
    AES-CBC with an explicit IV per record and HMAC over the plaintext
    (MAC-then-encrypt, RFC 5246 section 6.2.3.2).
    """

    def __init__(
        self, key: bytes, mac_key: bytes, mac_hash: hashes.HashAlgorithm
    ) -> None:
        self._algorithm = algorithms.AES(key)
        self._mac = hmac.HMAC(mac_key, mac_hash)
        self._mac_length = mac_hash.digest_size

    def _tag(self, seq: int, content_type: int, plaintext: Data) -> bytes:
        h = self._mac.copy()
        h.update(_AAD.pack(seq, content_type, TLS12, len(plaintext)))
        h.update(plaintext)
        return h.finalize()

    def seal(self, content_type: int, seq: int, plaintext: Data) -> list[bytes]:
        iv = os.urandom(16)
        body = bytes(plaintext) + self._tag(seq, content_type, plaintext)
        pad = 15 - len(body) % 16
        body += bytes((pad,)) * (pad + 1)
        encryptor = Cipher(self._algorithm, modes.CBC(iv)).encryptor()
        return [iv, encryptor.update(body) + encryptor.finalize()]

    def open(self, content_type: int, seq: int, fragment: Data) -> bytes:
        mac_length = self._mac_length
        size = len(fragment) - 16
        if size < mac_length + 1 or size % 16:
            raise _bad_mac()
        iv = bytes(fragment[:16])
        decryptor = Cipher(self._algorithm, modes.CBC(iv)).decryptor()
        plain = decryptor.update(fragment[16:]) + decryptor.finalize()

        # Check the padding and the MAC without leaving early on the first
        # bad byte, so that a padding error and a MAC error look alike (as
        # far as Python allows: the MAC's own cost still depends on the
        # length, which Lucky Thirteen exploits; we do not equalise it).
        n = len(plain)
        pad = plain[-1]
        bad = ((n - mac_length - 1 - pad) >> 16) & 1
        # The last 256 bytes against 256 copies of the padding byte, as
        # integers, masked to the padding's length: the same operations
        # whatever the bytes are.
        window = plain[-256:]
        width = len(window)
        diff = int.from_bytes(window, "big") ^ int.from_bytes(
            bytes((pad,)) * width, "big"
        )
        mask = (1 << (8 * min(pad + 1, width))) - 1
        bad |= int(diff & mask != 0)
        length = n - mac_length - 1 - (0 if bad else pad)
        content = plain[:length]
        expected = self._tag(seq, content_type, content)
        good_mac = constant_time.bytes_eq(expected, plain[length : length + mac_length])
        if bad or not good_mac:
            raise _bad_mac()
        return content


def protections_for(
    suite: CipherSuite, key_block: bytes
) -> tuple[RecordProtection, RecordProtection]:
    """
    Cut the key block into the client's and the server's keys.

    @return: the client-write and server-write protections.
    """
    mac, key, iv = suite.mac_length, suite.key_length, suite.fixed_iv_length
    parts = []
    offset = 0
    for size in (mac, mac, key, key, iv, iv):
        parts.append(key_block[offset : offset + size])
        offset += size
    client_mac, server_mac, client_key, server_key, client_iv, server_iv = parts
    if suite.cipher is BulkCipher.AES_GCM:
        return AESGCMProtection(client_key, client_iv), AESGCMProtection(
            server_key, server_iv
        )
    if suite.cipher is BulkCipher.CHACHA20_POLY1305:
        return ChaCha20Poly1305Protection(
            client_key, client_iv
        ), ChaCha20Poly1305Protection(server_key, server_iv)
    mac_hash = suite.prf_hash()
    return AESCBCProtection(client_key, client_mac, mac_hash), AESCBCProtection(
        server_key, server_mac, mac_hash
    )


def key_block_length(suite: CipherSuite) -> int:
    return 2 * (suite.mac_length + suite.key_length + suite.fixed_iv_length)


class RecordLayer:
    """
    Frames outgoing data into protected records and takes incoming records
    apart one at a time, so that the caller can switch the read protection
    right after a ChangeCipherSpec.
    """

    def __init__(self, max_fragment: int = MAX_PLAINTEXT) -> None:
        self._data = b""
        self._view = memoryview(b"")
        self._offset = 0
        self._read: RecordProtection = NullProtection()
        self._write: RecordProtection = NullProtection()
        self._read_seq = 0
        self._write_seq = 0
        self._max_fragment = max_fragment
        self.write_protected = False
        self.read_protected = False

    def set_write_protection(self, protection: RecordProtection) -> None:
        self._write = protection
        self._write_seq = 0
        self.write_protected = True

    def set_read_protection(self, protection: RecordProtection) -> None:
        self._read = protection
        self._read_seq = 0
        self.read_protected = True

    def seal_pieces(self, content_type: int, data: bytes) -> list[bytes]:
        """
        @return: the records carrying C{data}, fragmented as needed, as
            pieces to write in order (for C{writeSequence}).
        """
        step = self._max_fragment
        if len(data) <= step:
            # One record: every handshake message, most writes.
            seq = self._write_seq
            if seq > MAX_SEQUENCE - (content_type != ContentType.alert):
                raise _sequence_exhausted()
            pieces = self._write.seal(content_type, seq, data)
            self._write_seq = seq + 1
            return [_HEADER.pack(content_type, TLS12, sum(map(len, pieces))), *pieces]
        out: list[bytes] = []
        last = self._write_seq + max(1, -(-len(data) // step)) - 1
        if last > MAX_SEQUENCE - (content_type != ContentType.alert):
            raise _sequence_exhausted()
        write = self._write
        view = memoryview(data)
        for start in range(0, max(len(data), 1), step):
            pieces = write.seal(
                content_type, self._write_seq, view[start : start + step]
            )
            self._write_seq += 1
            out.append(_HEADER.pack(content_type, TLS12, sum(map(len, pieces))))
            out += pieces
        return out

    def seal(self, content_type: int, data: bytes) -> bytes:
        """
        @return: the records carrying C{data}, fragmented as needed.
        """
        return b"".join(self.seal_pieces(content_type, data))

    def feed(self, data: bytes) -> None:
        # Records are read in place through a view of the received bytes;
        # only the tail of an incomplete record is ever copied.
        if self._offset < len(self._data):
            self._data = self._data[self._offset :] + data
        else:
            self._data = data
        self._view = memoryview(self._data)
        self._offset = 0

    def next_record(self) -> tuple[int, bytes] | None:
        """
        Take the next complete record off the buffer.

        @return: its content type and plaintext, or C{None} if incomplete.
        @raise ProtocolViolation: on a malformed, oversized or forged record.
        """
        data = self._data
        start = self._offset
        if len(data) - start < 5:
            return None
        content_type, version, length = _HEADER.unpack_from(data, start)
        if content_type not in _CONTENT_TYPES:
            raise ProtocolViolation(
                AlertDescription.unexpected_message,
                f"record of unknown content type {content_type}",
            )
        if version >> 8 != 3:
            raise ProtocolViolation(
                AlertDescription.protocol_version,
                f"record version {version:#06x} is not TLS",
            )
        if length > MAX_CIPHERTEXT:
            raise ProtocolViolation(
                AlertDescription.record_overflow,
                f"record of {length} bytes exceeds the 2^14 + 2048 limit",
            )
        end = start + 5 + length
        if len(data) < end:
            return None
        fragment = self._view[start + 5 : end]
        self._offset = end
        if self._read_seq > MAX_SEQUENCE:
            raise ProtocolViolation(
                AlertDescription.internal_error,
                "the server's sequence number has passed its limit of 2^64 - 1 "
                "records: the connection must end",
            )
        plaintext = self._read.open(content_type, self._read_seq, fragment)
        self._read_seq += 1
        if len(plaintext) > MAX_PLAINTEXT:
            raise ProtocolViolation(
                AlertDescription.record_overflow,
                f"record plaintext of {len(plaintext)} bytes exceeds 2^14",
            )
        return content_type, plaintext


_CONTENT_TYPES = frozenset(int(t) for t in ContentType)
