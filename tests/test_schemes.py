"""
Tests for the signature schemes and the in-process L{IRemoteKey}.
"""

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from cpsdmp.protocols.tls.interfaces import IRemoteKey
from cpsdmp.protocols.tls.localkey import LocalKey
from cpsdmp.protocols.tls.schemes import (
    SignatureScheme,
    UnsupportedKey,
    verify_signature,
)
from tests.pki import self_signed


class SignatureSchemeTests(SynchronousTestCase):
    def test_hashes(self) -> None:
        """
        Each scheme names the hash its code point carries.
        """
        self.assertIsInstance(
            SignatureScheme.rsa_pkcs1_sha256.hash_algorithm, hashes.SHA256
        )
        self.assertIsInstance(
            SignatureScheme.ecdsa_secp384r1_sha384.hash_algorithm, hashes.SHA384
        )
        self.assertIsInstance(
            SignatureScheme.rsa_pss_rsae_sha512.hash_algorithm, hashes.SHA512
        )
        self.assertIsInstance(
            SignatureScheme.rsa_pkcs1_sha1.hash_algorithm, hashes.SHA1
        )

    def test_wrong_key_type(self) -> None:
        """
        An ECDSA scheme over an RSA key is an error, not a failed verification.
        """
        key = rsa.generate_private_key(65537, 2048)
        with self.assertRaises(UnsupportedKey):
            verify_signature(
                key.public_key(), SignatureScheme.ecdsa_secp256r1_sha256, b"x", b"y"
            )


class LocalKeyTests(SynchronousTestCase):
    def test_rsa_round_trip(self) -> None:
        """
        Every scheme a local RSA key offers produces a signature that verifies
        with the certificate's key, and not over other data.
        """
        key, cert = self_signed(rsa.generate_private_key(65537, 2048))
        remote = LocalKey(key, [cert])
        verifyObject(IRemoteKey, remote)
        self.assertEqual(self.successResultOf(remote.certificate_chain()), [cert])
        for scheme in remote.supported_signature_schemes:
            signature = self.successResultOf(remote.sign(b"transcript", scheme))
            self.assertTrue(
                verify_signature(cert.public_key(), scheme, signature, b"transcript")
            )
            self.assertFalse(
                verify_signature(cert.public_key(), scheme, signature, b"other")
            )

    def test_ec_schemes_follow_curve(self) -> None:
        """
        A P-384 key offers only ecdsa_secp384r1_sha384.
        """
        key, cert = self_signed(ec.generate_private_key(ec.SECP384R1()))
        remote = LocalKey(key, [cert])
        self.assertEqual(
            tuple(remote.supported_signature_schemes),
            (SignatureScheme.ecdsa_secp384r1_sha384,),
        )
        signature = self.successResultOf(
            remote.sign(b"data", SignatureScheme.ecdsa_secp384r1_sha384)
        )
        self.assertTrue(
            verify_signature(
                cert.public_key(),
                SignatureScheme.ecdsa_secp384r1_sha384,
                signature,
                b"data",
            )
        )

    def test_refuses_unsupported_scheme(self) -> None:
        """
        Asking a key for a scheme it did not offer fails the Deferred.
        """
        key, cert = self_signed(rsa.generate_private_key(65537, 2048))
        remote = LocalKey(key, [cert], schemes=[SignatureScheme.rsa_pkcs1_sha256])
        failure = self.failureResultOf(
            remote.sign(b"x", SignatureScheme.rsa_pkcs1_sha384), ValueError
        )
        self.assertIn("rsa_pkcs1_sha384", str(failure.value))

    def test_empty_chain(self) -> None:
        key = rsa.generate_private_key(65537, 2048)
        with self.assertRaises(ValueError):
            LocalKey(key, [])
