"""
The cipher suites and named groups this client offers, with what each means
for the key exchange signature, the record protection and the PRF hash.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes


class BulkCipher(enum.Enum):
    AES_GCM = "AESGCM"
    CHACHA20_POLY1305 = "CHACHA20-POLY1305"
    AES_CBC = "AES-CBC"


@dataclass(frozen=True)
class CipherSuite:
    """
    One TLS 1.2 ECDHE suite: its code point, its IANA name, the server
    certificate kind (C{"RSA"} or C{"ECDSA"}) and the record protection.
    """

    code: int
    name: str
    authentication: str
    cipher: BulkCipher
    key_length: int
    fixed_iv_length: int
    mac_length: int
    prf_hash: type[hashes.HashAlgorithm]

    @property
    def openssl_name(self) -> str:
        return _OPENSSL_NAMES[self.code]


_SUITES = [
    # RFC 5289
    CipherSuite(
        0xC02F,
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        "RSA",
        BulkCipher.AES_GCM,
        16,
        4,
        0,
        hashes.SHA256,
    ),
    CipherSuite(
        0xC030,
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
        "RSA",
        BulkCipher.AES_GCM,
        32,
        4,
        0,
        hashes.SHA384,
    ),
    CipherSuite(
        0xC028,
        "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384",
        "RSA",
        BulkCipher.AES_CBC,
        32,
        0,
        48,
        hashes.SHA384,
    ),
    # RFC 7905
    CipherSuite(
        0xCCA8,
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        "RSA",
        BulkCipher.CHACHA20_POLY1305,
        32,
        12,
        0,
        hashes.SHA256,
    ),
    CipherSuite(
        0xC02B,
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        "ECDSA",
        BulkCipher.AES_GCM,
        16,
        4,
        0,
        hashes.SHA256,
    ),
    CipherSuite(
        0xC02C,
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        "ECDSA",
        BulkCipher.AES_GCM,
        32,
        4,
        0,
        hashes.SHA384,
    ),
    CipherSuite(
        0xC024,
        "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384",
        "ECDSA",
        BulkCipher.AES_CBC,
        32,
        0,
        48,
        hashes.SHA384,
    ),
    CipherSuite(
        0xCCA9,
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        "ECDSA",
        BulkCipher.CHACHA20_POLY1305,
        32,
        12,
        0,
        hashes.SHA256,
    ),
]

_OPENSSL_NAMES = {
    0xC02F: "ECDHE-RSA-AES128-GCM-SHA256",
    0xC030: "ECDHE-RSA-AES256-GCM-SHA384",
    0xC028: "ECDHE-RSA-AES256-SHA384",
    0xCCA8: "ECDHE-RSA-CHACHA20-POLY1305",
    0xC02B: "ECDHE-ECDSA-AES128-GCM-SHA256",
    0xC02C: "ECDHE-ECDSA-AES256-GCM-SHA384",
    0xC024: "ECDHE-ECDSA-AES256-SHA384",
    0xCCA9: "ECDHE-ECDSA-CHACHA20-POLY1305",
}

SUITES_BY_CODE = {suite.code: suite for suite in _SUITES}
SUITES_BY_NAME = {suite.name: suite for suite in _SUITES}
ALL_SUITES: tuple[CipherSuite, ...] = tuple(_SUITES)
# The default order: AEAD first, ECDSA before RSA as OpenSSL does.
DEFAULT_SUITES: tuple[CipherSuite, ...] = tuple(
    SUITES_BY_CODE[code]
    for code in (0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8, 0xC024, 0xC028)
)


class NamedGroup(enum.IntEnum):
    """
    The supported_groups code points (RFC 8422 section 5.1.1).
    """

    secp256r1 = 23
    secp384r1 = 24
    x25519 = 29


DEFAULT_GROUPS: tuple[NamedGroup, ...] = (
    NamedGroup.x25519,
    NamedGroup.secp256r1,
    NamedGroup.secp384r1,
)
