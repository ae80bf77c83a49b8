"""
TLS signature schemes (RFC 8446, section 4.2.3, the registry TLS 1.2 shares
through RFC 5246's SignatureAndHashAlgorithm pairs) and how each one maps to
`cryptography` verification parameters.
"""

from __future__ import annotations

import enum

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed


class SignatureScheme(enum.IntEnum):
    """
    The code points a TLS 1.2 peer puts on the wire as (hash, signature).
    """

    rsa_pkcs1_sha1 = 0x0201
    ecdsa_sha1 = 0x0203
    rsa_pkcs1_sha256 = 0x0401
    rsa_pkcs1_sha384 = 0x0501
    rsa_pkcs1_sha512 = 0x0601
    ecdsa_secp256r1_sha256 = 0x0403
    ecdsa_secp384r1_sha384 = 0x0503
    ecdsa_secp521r1_sha512 = 0x0603
    rsa_pss_rsae_sha256 = 0x0804
    rsa_pss_rsae_sha384 = 0x0805
    rsa_pss_rsae_sha512 = 0x0806

    @property
    def hash_algorithm(self) -> hashes.HashAlgorithm:
        return _HASHES[self.value >> 8 if self.value < 0x0800 else self.value]()

    @property
    def is_rsa_pkcs1(self) -> bool:
        return self.value & 0xFF == 0x01

    @property
    def is_rsa_pss(self) -> bool:
        return 0x0804 <= self.value <= 0x0806

    @property
    def is_ecdsa(self) -> bool:
        return self.value & 0xFF == 0x03


_HASHES: dict[int, type[hashes.HashAlgorithm]] = {
    2: hashes.SHA1,
    4: hashes.SHA256,
    5: hashes.SHA384,
    6: hashes.SHA512,
    0x0804: hashes.SHA256,
    0x0805: hashes.SHA384,
    0x0806: hashes.SHA512,
}


class UnsupportedKey(Exception):
    """
    A signature scheme that cannot apply to the given key.
    """


def verify_signature(
    public_key: PublicKeyTypes,
    scheme: SignatureScheme,
    signature: bytes,
    data: bytes,
    prehashed: bool = False,
) -> bool:
    """
    Check C{signature} over C{data} with C{public_key} under C{scheme}.

    @param prehashed: C{data} is already the digest of the signed bytes
        under the scheme's hash.
    @return: C{True} when it verifies, C{False} otherwise.
    @raise UnsupportedKey: when the scheme does not fit the key type.
    """
    algorithm = scheme.hash_algorithm
    digest: hashes.HashAlgorithm | Prehashed = (
        Prehashed(algorithm) if prehashed else algorithm
    )
    try:
        if isinstance(public_key, rsa.RSAPublicKey) and scheme.is_rsa_pkcs1:
            public_key.verify(signature, data, padding.PKCS1v15(), digest)
        elif isinstance(public_key, rsa.RSAPublicKey) and scheme.is_rsa_pss:
            pss = padding.PSS(
                mgf=padding.MGF1(algorithm), salt_length=padding.PSS.DIGEST_LENGTH
            )
            public_key.verify(signature, data, pss, digest)
        elif isinstance(public_key, ec.EllipticCurvePublicKey) and scheme.is_ecdsa:
            public_key.verify(signature, data, ec.ECDSA(digest))
        else:
            raise UnsupportedKey(
                f"signature scheme {scheme.name} does not apply to a "
                f"{type(public_key).__name__}"
            )
    except InvalidSignature:
        return False
    return True
