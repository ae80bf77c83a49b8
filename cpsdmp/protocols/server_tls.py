"""
The TLS identity of this project's own HTTPS servers (the agent, the
facade): a private key and its certificate chain read from PEM files, and
the OpenSSL server settings that send the whole chain, so that a client
that trusts only the root can build the path.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL import crypto
from twisted.internet import ssl


def load_server_identity(
    cert_path: str,
    key_path: str,
    cert_option: str = "--tls-cert",
    key_option: str = "--tls-key",
) -> tuple[PrivateKeyTypes, list[x509.Certificate]]:
    """
    Read a server's key and its chain: C{cert_path} holds the server's
    certificate first, then the intermediates that issued it, each the
    issuer of the one before.

    @return: the private key and the chain, leaf first.
    @raise ValueError: naming the option and the file that cannot serve.
    """
    try:
        chain = x509.load_pem_x509_certificates(Path(cert_path).read_bytes())
    except OSError as e:
        raise ValueError(
            f"{cert_option} {cert_path}: cannot read it ({e.strerror})"
        ) from None
    except ValueError:
        raise ValueError(
            f"{cert_option} {cert_path}: not a PEM certificate chain"
        ) from None
    for index, (certificate, issuer) in enumerate(pairwise(chain), start=1):
        try:
            certificate.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            raise ValueError(
                f"{cert_option} {cert_path}: certificate {index + 1} "
                f"({issuer.subject.rfc4514_string()}) did not issue certificate "
                f"{index} ({certificate.subject.rfc4514_string()}); give the "
                "server's certificate first, then each issuer in turn"
            ) from None
    try:
        key = serialization.load_pem_private_key(
            Path(key_path).read_bytes(), password=None
        )
    except OSError as e:
        raise ValueError(
            f"{key_option} {key_path}: cannot read it ({e.strerror})"
        ) from None
    except (ValueError, TypeError):
        raise ValueError(
            f"{key_option} {key_path}: not an unencrypted PEM private key"
        ) from None
    if key.public_key() != chain[0].public_key():
        raise ValueError(
            f"{key_option} {key_path} does not match the certificate in "
            f"{cert_option} {cert_path}"
        )
    return key, chain


def server_tls_options(
    key: PrivateKeyTypes, chain: Sequence[x509.Certificate]
) -> ssl.CertificateOptions:
    """
    @param chain: the server's certificate, then its intermediates.
    @return: OpenSSL server settings, TLS 1.2 or later, that send the
        whole chain.
    """
    return ssl.CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),  # type: ignore[arg-type]
        certificate=crypto.X509.from_cryptography(chain[0]),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )
