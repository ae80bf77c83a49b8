"""
The record layer: framing and fragmenting, the limits of RFC 5246, and the
three protections checked against records OpenSSL itself produced and
accepts (through pyOpenSSL over memory BIOs, keys from its master secret).
"""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from OpenSSL import SSL, crypto
from twisted.trial.unittest import SynchronousTestCase

from cpsdmp.protocols.tls import prf
from cpsdmp.protocols.tls.alerts import AlertDescription, ProtocolViolation
from cpsdmp.protocols.tls.records import (
    MAX_PLAINTEXT,
    AESCBCProtection,
    AESGCMProtection,
    ChaCha20Poly1305Protection,
    ContentType,
    RecordLayer,
    key_block_length,
    protections_for,
)
from cpsdmp.protocols.tls.suites import ALL_SUITES, CipherSuite
from tests.pki import self_signed

_SSL_OP_NO_ENCRYPT_THEN_MAC = 0x00080000
_RSA = self_signed(rsa.generate_private_key(65537, 2048))
_EC = self_signed(ec.generate_private_key(ec.SECP256R1()))


def _openssl_session(suite: CipherSuite) -> tuple[SSL.Connection, SSL.Connection]:
    """
    @return: an OpenSSL client and server that completed a TLS 1.2
        handshake with C{suite} over memory BIOs.
    """
    key, cert = _RSA if suite.authentication == "RSA" else _EC
    contexts = []
    for _ in range(2):
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_cipher_list(suite.openssl_name.encode())
        # We do not offer encrypt-then-MAC (RFC 7366), so neither may they.
        ctx.set_options(_SSL_OP_NO_ENCRYPT_THEN_MAC)
        contexts.append(ctx)
    contexts[1].use_privatekey(crypto.PKey.from_cryptography_key(key))
    contexts[1].use_certificate(crypto.X509.from_cryptography(cert))
    client = SSL.Connection(contexts[0], None)
    client.set_connect_state()
    server = SSL.Connection(contexts[1], None)
    server.set_accept_state()
    for _ in range(10):
        for conn in (client, server):
            try:
                conn.do_handshake()
            except SSL.WantReadError:
                pass
        for a, b in ((client, server), (server, client)):
            try:
                b.bio_write(a.bio_read(1 << 20))
            except SSL.WantReadError:
                pass
    assert server.get_cipher_name() is not None
    return client, server


def _split_records(data: bytes) -> list[tuple[int, bytes]]:
    records = []
    while data:
        content_type, _, length = struct.unpack(">BHH", data[:5])
        records.append((content_type, data[5 : 5 + length]))
        data = data[5 + length :]
    return records


class OpenSSLRecordTests(SynchronousTestCase):
    """
    Our key expansion and record protection read what OpenSSL writes and
    write what OpenSSL reads, for each suite.
    """

    def test_every_suite_both_ways(self) -> None:
        for suite in ALL_SUITES:
            with self.subTest(suite=suite.name):
                client, server = _openssl_session(suite)
                self.assertEqual(
                    server.get_cipher_name(), suite.openssl_name, suite.name
                )
                block = prf.key_block(
                    suite.prf_hash(),
                    server.master_key(),
                    server.client_random(),
                    server.server_random(),
                    key_block_length(suite),
                )
                client_write, server_write = protections_for(suite, block)

                # OpenSSL's server record, sequence 1 (its Finished was 0)
                server.send(b"from OpenSSL " + suite.name.encode())
                records = _split_records(server.bio_read(1 << 20))
                self.assertEqual(
                    [t for t, _ in records], [ContentType.application_data]
                )
                plaintext = server_write.open(23, 1, records[0][1])
                self.assertEqual(plaintext, b"from OpenSSL " + suite.name.encode())

                # our record as the client, sequence 1, read by OpenSSL
                body = b"".join(client_write.seal(23, 1, b"from cpsdmp"))
                server.bio_write(struct.pack(">BHH", 23, 0x0303, len(body)) + body)
                self.assertEqual(server.recv(100), b"from cpsdmp")

    def test_forged_record_refused(self) -> None:
        """
        One flipped bit in an OpenSSL record is bad_record_mac.
        """
        suite = ALL_SUITES[0]
        client, server = _openssl_session(suite)
        block = prf.key_block(
            suite.prf_hash(),
            server.master_key(),
            server.client_random(),
            server.server_random(),
            key_block_length(suite),
        )
        _, server_write = protections_for(suite, block)
        server.send(b"payload")
        fragment = bytearray(_split_records(server.bio_read(1 << 20))[0][1])
        fragment[-1] ^= 1
        with self.assertRaises(ProtocolViolation) as e:
            server_write.open(23, 1, bytes(fragment))
        self.assertEqual(e.exception.description, AlertDescription.bad_record_mac)


class RecordLayerTests(SynchronousTestCase):
    def test_fragments_at_2_14(self) -> None:
        """
        Data over 2^14 bytes goes out as several records, each at most 2^14.
        """
        layer = RecordLayer()
        data = bytes(range(256)) * 130
        wire = layer.seal(ContentType.application_data, data)
        records = _split_records(wire)
        self.assertEqual(
            [len(r) for _, r in records], [MAX_PLAINTEXT, MAX_PLAINTEXT, 512]
        )
        reader = RecordLayer()
        reader.feed(wire[:7])
        self.assertIsNone(reader.next_record())
        reader.feed(wire[7:])
        got = [reader.next_record() for _ in range(4)]
        self.assertIsNone(got[3])
        self.assertEqual(b"".join(r[1] for r in got[:3] if r), data)

    def test_plaintext_overflow(self) -> None:
        """
        A record whose plaintext exceeds 2^14 is record_overflow.
        """
        layer = RecordLayer()
        layer.feed(
            struct.pack(">BHH", 23, 0x0303, MAX_PLAINTEXT + 1)
            + bytes(MAX_PLAINTEXT + 1)
        )
        with self.assertRaises(ProtocolViolation) as e:
            layer.next_record()
        self.assertEqual(e.exception.description, AlertDescription.record_overflow)

    def test_ciphertext_overflow(self) -> None:
        """
        A header announcing more than 2^14 + 2048 bytes is refused before
        the body arrives.
        """
        layer = RecordLayer()
        layer.feed(struct.pack(">BHH", 23, 0x0303, MAX_PLAINTEXT + 2049))
        with self.assertRaises(ProtocolViolation) as e:
            layer.next_record()
        self.assertEqual(e.exception.description, AlertDescription.record_overflow)

    def test_unknown_content_type(self) -> None:
        layer = RecordLayer()
        layer.feed(struct.pack(">BHH", 99, 0x0303, 1) + b"x")
        with self.assertRaises(ProtocolViolation) as e:
            layer.next_record()
        self.assertEqual(e.exception.description, AlertDescription.unexpected_message)

    def test_sequence_numbers_advance(self) -> None:
        """
        A record replayed (same bytes, next sequence number) fails.
        """
        writer, reader = RecordLayer(), RecordLayer()
        writer.set_write_protection(AESGCMProtection(bytes(16), bytes(4)))
        reader.set_read_protection(AESGCMProtection(bytes(16), bytes(4)))
        record = writer.seal(ContentType.application_data, b"once")
        reader.feed(record + record)
        self.assertEqual(reader.next_record(), (ContentType.application_data, b"once"))
        with self.assertRaises(ProtocolViolation):
            reader.next_record()

    def test_sequence_numbers_do_not_wrap(self) -> None:
        """
        RFC 5246, section 6.1: sequence numbers never wrap. The last one,
        2^64 - 1, is kept for the closing alert; past it nothing is read.
        """
        writer, reader = RecordLayer(), RecordLayer()
        writer.set_write_protection(AESGCMProtection(bytes(16), bytes(4)))
        reader.set_read_protection(AESGCMProtection(bytes(16), bytes(4)))
        writer._write_seq = reader._read_seq = 2**64 - 2
        reader.feed(writer.seal(ContentType.application_data, b"last data"))
        self.assertEqual(reader.next_record(), (23, b"last data"))
        with self.assertRaises(ProtocolViolation) as e:
            writer.seal(ContentType.application_data, b"one more")
        self.assertIn("sequence number", str(e.exception))
        reader.feed(writer.seal(ContentType.alert, b"\x01\x00"))
        self.assertEqual(reader.next_record(), (21, b"\x01\x00"))
        with self.assertRaises(ProtocolViolation):
            writer.seal(ContentType.alert, b"\x01\x00")
        reader.feed(struct.pack(">BHH", 23, 0x0303, 30) + bytes(30))
        with self.assertRaises(ProtocolViolation) as e:
            reader.next_record()
        self.assertIn("sequence number", str(e.exception))

    def test_several_records_checked_before_any(self) -> None:
        """
        Data that would need more sequence numbers than are left is refused
        before any record is sealed.
        """
        writer = RecordLayer()
        writer._write_seq = 2**64 - 3
        with self.assertRaises(ProtocolViolation):
            writer.seal(ContentType.application_data, bytes(MAX_PLAINTEXT * 2 + 1))
        self.assertEqual(writer._write_seq, 2**64 - 3)


class ProtectionTests(SynchronousTestCase):
    def test_gcm_nonce_layout(self) -> None:
        """
        RFC 5288: the record starts with the 8-byte explicit nonce (here the
        sequence number), and the salt stays implicit.
        """
        body = b"".join(AESGCMProtection(bytes(16), b"salt").seal(23, 0x0102, b"abc"))
        self.assertEqual(body[:8], (0x0102).to_bytes(8, "big"))
        self.assertEqual(len(body), 8 + 3 + 16)

    def test_chacha_nonce_is_xored(self) -> None:
        """
        RFC 7905: nothing explicit on the wire, the sequence number changes
        the nonce.
        """
        p = ChaCha20Poly1305Protection(bytes(32), bytes(12))
        self.assertEqual(len(b"".join(p.seal(23, 0, b"abc"))), 3 + 16)
        self.assertNotEqual(
            b"".join(p.seal(23, 0, b"abc")), b"".join(p.seal(23, 1, b"abc"))
        )
        with self.assertRaises(ProtocolViolation):
            p.open(23, 1, b"".join(p.seal(23, 0, b"abc")))

    def test_cbc_padding_and_mac_errors_look_alike(self) -> None:
        """
        A bad padding byte and a bad MAC both give bad_record_mac, with the
        same message.
        """
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        key, mac_key = bytes(range(32)), bytes(48)
        p = AESCBCProtection(key, mac_key, hashes.SHA384())
        body = b"".join(p.seal(23, 5, b"hello world"))
        self.assertEqual(p.open(23, 5, body), b"hello world")
        iv, ciphertext = body[:16], body[16:]
        plain = bytearray(
            Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor().update(ciphertext)
        )

        def reencrypt(data: bytes) -> bytes:
            enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
            return iv + enc.update(data) + enc.finalize()

        bad_padding = bytearray(plain)
        bad_padding[-2] ^= 0x01  # a padding byte that disagrees
        bad_mac = bytearray(plain)
        bad_mac[0] ^= 0x01  # the content, so the MAC no longer matches
        messages = []
        for forged in (bad_padding, bad_mac):
            with self.assertRaises(ProtocolViolation) as e:
                p.open(23, 5, reencrypt(bytes(forged)))
            self.assertEqual(e.exception.description, AlertDescription.bad_record_mac)
            messages.append(str(e.exception))
        self.assertEqual(messages[0], messages[1])
        with self.assertRaises(ProtocolViolation):
            p.open(23, 6, body)  # another sequence number


class PublishedRecordTests(SynchronousTestCase):
    def test_illustrated_cbc_record(self) -> None:
        """
        The client Finished record of the published Illustrated TLS 1.2
        handshake (https://tls12.xargs.org; AES-128-CBC with HMAC-SHA1,
        sequence 0, eleven bytes of padding) opens to its Finished, and one
        flipped bit in it does not.
        """
        from cryptography.hazmat.primitives import hashes

        from tests.test_tls_prf import (
            ILLUSTRATED_CLIENT_VERIFY_DATA,
            ILLUSTRATED_KEYS,
        )

        protection = AESCBCProtection(
            bytes.fromhex(ILLUSTRATED_KEYS["client write key"]),
            bytes.fromhex(ILLUSTRATED_KEYS["client MAC key"]),
            hashes.SHA1(),
        )
        record = bytes(range(0x40, 0x50)) + bytes.fromhex(
            "227bc9ba81ef30f2a8a78ff1df50844d5804b7eeb2e214c32b6892aca3db7b78"
            "077fdd90067c516bacb3ba90dedf720f"
        )
        self.assertEqual(
            protection.open(ContentType.handshake, 0, record),
            b"\x14\x00\x00\x0c" + ILLUSTRATED_CLIENT_VERIFY_DATA,
        )
        forged = bytearray(record)
        forged[20] ^= 1
        with self.assertRaises(ProtocolViolation):
            protection.open(ContentType.handshake, 0, bytes(forged))


class CBCPaddingTests(SynchronousTestCase):
    """
    Any padding length up to 255 is accepted when every byte is right, and
    one wrong byte anywhere in it is refused.
    """

    def _record(self, content: bytes, padding: bytes) -> tuple[AESCBCProtection, bytes]:
        from cryptography.hazmat.primitives import hashes, hmac
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        key, mac_key = bytes(range(32)), bytes(range(48))
        mac = hmac.HMAC(mac_key, hashes.SHA384())
        mac.update(struct.pack(">QBHH", 7, 23, 0x0303, len(content)) + content)
        body = content + mac.finalize() + padding
        iv = bytes(16)
        enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
        record = iv + enc.update(body) + enc.finalize()
        return AESCBCProtection(key, mac_key, hashes.SHA384()), record

    def test_long_paddings(self) -> None:
        for pad in (0, 15, 31, 255):
            # content + 48-byte MAC + padding fills whole AES blocks
            content = b"x" * (16 + (-(48 + pad + 1)) % 16)
            padding = bytes((pad,)) * (pad + 1)
            protection, record = self._record(content, padding)
            self.assertEqual(protection.open(23, 7, record), content, pad)
            if pad:
                for where in (0, pad // 2, pad - 1):
                    wrong = bytearray(padding)
                    wrong[where] ^= 0x80
                    protection, record = self._record(content, bytes(wrong))
                    with self.assertRaises(ProtocolViolation):
                        protection.open(23, 7, record)
