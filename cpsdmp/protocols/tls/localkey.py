"""
An L{IRemoteKey} over a private key held in this process: for tests, for the
benchmarks' reference client, and for servers that have their key at hand.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from cpsdmp.protocols.tls.interfaces import IRemoteKey
from cpsdmp.protocols.tls.schemes import SignatureScheme

_RSA_SCHEMES = (
    SignatureScheme.rsa_pkcs1_sha256,
    SignatureScheme.rsa_pkcs1_sha384,
    SignatureScheme.rsa_pkcs1_sha512,
    SignatureScheme.rsa_pss_rsae_sha256,
    SignatureScheme.rsa_pss_rsae_sha384,
    SignatureScheme.rsa_pss_rsae_sha512,
    SignatureScheme.rsa_pkcs1_sha1,
)

_EC_SCHEMES = {
    "secp256r1": (SignatureScheme.ecdsa_secp256r1_sha256,),
    "secp384r1": (SignatureScheme.ecdsa_secp384r1_sha384,),
    "secp521r1": (SignatureScheme.ecdsa_secp521r1_sha512,),
}


@implementer(IRemoteKey)
class LocalKey:
    """
    A client identity whose key is a C{cryptography} RSA or EC private key.
    """

    supported_signature_schemes: Sequence[SignatureScheme]

    def __init__(
        self,
        private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
        chain: Sequence[x509.Certificate],
        schemes: Sequence[SignatureScheme] | None = None,
    ) -> None:
        if not chain:
            raise ValueError("a client identity needs at least its own certificate")
        self._key = private_key
        self._chain = list(chain)
        if isinstance(private_key, rsa.RSAPrivateKey):
            possible: Sequence[SignatureScheme] = _RSA_SCHEMES
        else:
            possible = _EC_SCHEMES.get(private_key.curve.name, ())
        self.supported_signature_schemes = (
            tuple(s for s in schemes if s in possible) if schemes else possible
        )

    def certificate_chain(self) -> Deferred[list[x509.Certificate]]:
        return succeed(list(self._chain))

    def sign(self, data: bytes, scheme: SignatureScheme) -> Deferred[bytes]:
        if scheme not in self.supported_signature_schemes:
            return fail(ValueError(f"this key does not sign with {scheme.name}"))
        algorithm = scheme.hash_algorithm
        if isinstance(self._key, rsa.RSAPrivateKey):
            if scheme.is_rsa_pss:
                pad: padding.AsymmetricPadding = padding.PSS(
                    mgf=padding.MGF1(algorithm),
                    salt_length=padding.PSS.DIGEST_LENGTH,
                )
            else:
                pad = padding.PKCS1v15()
            return succeed(self._key.sign(data, pad, algorithm))
        return succeed(self._key.sign(data, ec.ECDSA(algorithm)))
