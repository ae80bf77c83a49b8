"""
The TLS 1.2 key schedule against the published PRF vectors, the published
key schedule of a whole handshake, and OpenSSL's own TLS1-PRF.
"""

from __future__ import annotations

import shutil
import subprocess

from cryptography.hazmat.primitives import hashes
from twisted.trial.unittest import SynchronousTestCase

from cpsdmp.protocols.tls import prf

# The TLS 1.2 PRF vectors circulated on the IETF TLS working group list
# (secret, seed, label "test label").
SHA256_SECRET = bytes.fromhex("9bbe436ba940f017b17652849a71db35")
SHA256_SEED = bytes.fromhex("a0ba9f936cda311827a6f796ffd5198c")
SHA256_OUTPUT = bytes.fromhex(
    "e3f229ba727be17b8d122620557cd453c2aab21d07c3d495329b52d4e61edb5a"
    "6b301791e90d35c9c9a46b4e14baf9af0fa022f7077def17abfd3797c0564bab"
    "4fbc91666e9def9b97fce34f796789baa48082d122ee42c5a72e5a5110fff701"
    "87347b66"
)
SHA384_SECRET = bytes.fromhex("b80b733d6ceefcdc71566ea48e5567df")
SHA384_SEED = bytes.fromhex("cd665cf6a8447dd6ff8b27555edb7465")
SHA384_OUTPUT = bytes.fromhex(
    "7b0c18e9ced410ed1804f2cfa34a336a1c14dffb4900bb5fd7942107e81c83cd"
    "e9ca0faa60be9fe34f82b1233c9146a0e534cb400fed2700884f9dc236f80edd"
    "8bfa961144c9e8d792eca722a7b32fc3d416d473ebc2c5fd4abfdad05d918425"
    "9b5bf8cd4d90fa0d31e2dec479e4f1a26066f2eea9a69236a3e52655c9e9aee6"
    "91c8f3a26854308d5eaa3be85e0990703d73e56f"
)

# "The Illustrated TLS 1.2 Connection" (https://tls12.xargs.org): a
# published handshake, TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA over X25519, with
# every intermediate value.
ILLUSTRATED_CLIENT_RANDOM = bytes(range(0x00, 0x20))
ILLUSTRATED_SERVER_RANDOM = bytes(range(0x70, 0x90))
ILLUSTRATED_PRE_MASTER = bytes.fromhex(
    "df4a291baa1eb7cfa6934b29b474baad2697e29f1f920dcc77c8a0a088447624"
)
ILLUSTRATED_MASTER = bytes.fromhex(
    "916abf9da55973e13614ae0a3f5d3f37b023ba129aee02cc9134338127cd7049"
    "781c8e19fc1eb2a7387ac06ae237344c"
)
ILLUSTRATED_KEYS = {
    "client MAC key": "1b7d117c7d5f690bc263cae8ef60af0f1878acc2",
    "server MAC key": "2ad8bdd8c601a617126f63540eb20906f781fad2",
    "client write key": "f656d037b173ef3e11169f27231a84b6",
    "server write key": "752a18e7a9fcb7cbcdd8f98dd8f769eb",
    "client write IV": "a0d2550c9238eebfef5c32251abb67d6",
    "server write IV": "434528db4937d540d393135e06a11bb8",
}
ILLUSTRATED_CLIENT_HANDSHAKE_HASH = bytes.fromhex(
    "061dda04b3c2217ff73bd79b9cf88a2bb6ec505404aac8722db03ef417b54cb4"
)
ILLUSTRATED_CLIENT_VERIFY_DATA = bytes.fromhex("cf919626f1360c536aaad73a")


def openssl_prf(digest: str, secret: bytes, seed: bytes, n: int) -> bytes:
    """
    @return: OpenSSL's TLS1-PRF of C{secret} over C{seed} (label included).
    """
    openssl = shutil.which("openssl")
    assert openssl is not None, "the openssl command is needed for this test"
    out = subprocess.run(
        [
            openssl,
            "kdf",
            "-binary",
            "-keylen",
            str(n),
            "-kdfopt",
            f"digest:{digest}",
            "-kdfopt",
            f"hexsecret:{secret.hex()}",
            "-kdfopt",
            f"hexseed:{seed.hex()}",
            "TLS1-PRF",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return out.stdout


class PRFTests(SynchronousTestCase):
    def test_sha256_vector(self) -> None:
        """
        P_SHA256 gives the published 100 bytes.
        """
        self.assertEqual(
            prf.prf(hashes.SHA256(), SHA256_SECRET, b"test label", SHA256_SEED, 100),
            SHA256_OUTPUT,
        )

    def test_sha384_vector(self) -> None:
        """
        P_SHA384 gives the published 148 bytes.
        """
        self.assertEqual(
            prf.prf(hashes.SHA384(), SHA384_SECRET, b"test label", SHA384_SEED, 148),
            SHA384_OUTPUT,
        )

    def test_shorter_output_is_a_prefix(self) -> None:
        self.assertEqual(
            prf.prf(hashes.SHA256(), SHA256_SECRET, b"test label", SHA256_SEED, 7),
            SHA256_OUTPUT[:7],
        )

    def test_master_secret_matches_openssl(self) -> None:
        """
        The master secret is PRF(pre_master_secret, "master secret",
        client_random + server_random), as OpenSSL computes it.
        """
        pms, cr, sr = b"\x11" * 32, b"\x22" * 32, b"\x33" * 32
        self.assertEqual(
            prf.master_secret(hashes.SHA256(), pms, cr, sr),
            openssl_prf("SHA2-256", pms, b"master secret" + cr + sr, 48),
        )

    def test_extended_master_secret_matches_openssl(self) -> None:
        """
        The RFC 7627 master secret takes the session hash as its seed.
        """
        pms, session_hash = b"\x44" * 32, bytes(range(48))
        self.assertEqual(
            prf.extended_master_secret(hashes.SHA384(), pms, session_hash),
            openssl_prf("SHA2-384", pms, b"extended master secret" + session_hash, 48),
        )

    def test_key_expansion_matches_openssl(self) -> None:
        """
        The key block's seed is server_random + client_random, in that order.
        """
        master, cr, sr = bytes(range(48)), b"\x01" * 32, b"\x02" * 32
        self.assertEqual(
            prf.key_block(hashes.SHA384(), master, cr, sr, 160),
            openssl_prf("SHA2-384", master, b"key expansion" + sr + cr, 160),
        )

    def test_verify_data(self) -> None:
        master, transcript_hash = bytes(range(48)), bytes(32)
        data = prf.verify_data(
            hashes.SHA256(), master, b"client finished", transcript_hash
        )
        self.assertEqual(len(data), 12)
        self.assertEqual(
            data,
            openssl_prf("SHA2-256", master, b"client finished" + transcript_hash, 12),
        )

    def test_published_key_schedule(self) -> None:
        """
        The master secret, the key expansion (MAC keys, keys and IVs cut in
        RFC 5246's order) and the client's verify_data of the published
        Illustrated TLS 1.2 handshake.
        """
        sha256 = hashes.SHA256()
        master = prf.master_secret(
            sha256,
            ILLUSTRATED_PRE_MASTER,
            ILLUSTRATED_CLIENT_RANDOM,
            ILLUSTRATED_SERVER_RANDOM,
        )
        self.assertEqual(master, ILLUSTRATED_MASTER)
        sizes = [20, 20, 16, 16, 16, 16]
        block = prf.key_block(
            sha256,
            master,
            ILLUSTRATED_CLIENT_RANDOM,
            ILLUSTRATED_SERVER_RANDOM,
            sum(sizes),
        )
        keys = {}
        offset = 0
        for name, size in zip(ILLUSTRATED_KEYS, sizes, strict=True):
            keys[name] = block[offset : offset + size].hex()
            offset += size
        self.assertEqual(keys, ILLUSTRATED_KEYS)
        self.assertEqual(
            prf.verify_data(
                sha256, master, b"client finished", ILLUSTRATED_CLIENT_HANDSHAKE_HASH
            ),
            ILLUSTRATED_CLIENT_VERIFY_DATA,
        )
