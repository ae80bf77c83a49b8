"""
The TLS 1.2 key schedule: the PRF of RFC 5246 section 5 over HMAC-SHA256 or
HMAC-SHA384, the master secret (plain and extended, RFC 7627), the key block
and the Finished messages' verify_data.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes, hmac

MASTER_SECRET_LENGTH = 48
VERIFY_DATA_LENGTH = 12


def p_hash(
    algorithm: hashes.HashAlgorithm, secret: bytes, seed: bytes, n: int
) -> bytes:
    """
    P_hash of RFC 5246 section 5: HMAC chained over A(i), cut to C{n} bytes.
    """
    base = hmac.HMAC(secret, algorithm)

    def mac(data: bytes) -> bytes:
        h = base.copy()
        h.update(data)
        return h.finalize()

    out = bytearray()
    a = seed
    while len(out) < n:
        a = mac(a)
        out += mac(a + seed)
    return bytes(out[:n])


def prf(
    algorithm: hashes.HashAlgorithm, secret: bytes, label: bytes, seed: bytes, n: int
) -> bytes:
    """
    PRF(secret, label, seed) = P_<hash>(secret, label + seed), C{n} bytes.
    """
    return p_hash(algorithm, secret, label + seed, n)


def master_secret(
    algorithm: hashes.HashAlgorithm,
    pre_master_secret: bytes,
    client_random: bytes,
    server_random: bytes,
) -> bytes:
    """
    The RFC 5246 master secret, bound to the two hello randoms only.
    """
    return prf(
        algorithm,
        pre_master_secret,
        b"master secret",
        client_random + server_random,
        MASTER_SECRET_LENGTH,
    )


def extended_master_secret(
    algorithm: hashes.HashAlgorithm, pre_master_secret: bytes, session_hash: bytes
) -> bytes:
    """
    The RFC 7627 master secret, bound to the hash of the handshake up to and
    including ClientKeyExchange.
    """
    return prf(
        algorithm,
        pre_master_secret,
        b"extended master secret",
        session_hash,
        MASTER_SECRET_LENGTH,
    )


def key_block(
    algorithm: hashes.HashAlgorithm,
    master: bytes,
    client_random: bytes,
    server_random: bytes,
    n: int,
) -> bytes:
    """
    The key block (RFC 5246 section 6.3); note the randoms' order is the
    reverse of the master secret's.
    """
    return prf(algorithm, master, b"key expansion", server_random + client_random, n)


def verify_data(
    algorithm: hashes.HashAlgorithm, master: bytes, label: bytes, handshake_hash: bytes
) -> bytes:
    """
    The 12 bytes a Finished message carries (RFC 5246 section 7.4.9);
    C{label} is C{b"client finished"} or C{b"server finished"}.
    """
    return prf(algorithm, master, label, handshake_hash, VERIFY_DATA_LENGTH)
