"""
The TLS identity of this project's own HTTPS servers (the agent, the
facade): a private key and its certificate chain read from PEM files, and
the OpenSSL server settings that send the whole chain, so that a client
that trusts only the root can build the path, and that answer a client's
application protocols (ALPN) the way an HTTP/1.1 server should.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL import SSL, crypto
from twisted.internet import ssl

#: The one application protocol this project's servers speak (RFC 7301).
HTTP_1_1 = b"http/1.1"


def select_application_protocol(
    connection: SSL.Connection, offered: list[bytes]
) -> bytes | SSL._NoOverlappingProtocols:
    """
    Choose among the application protocols a client offers (RFC 7301,
    section 3.2): HTTP/1.1 when offered; otherwise none, and the handshake
    goes on without ALPN, as with a server that does not take part in it.
    An HTTP/1.0 client is served that way (twisted.web answers HTTP/1.0),
    and an HTTP/2-only one learns that its protocol was not chosen.

    Twisted's own callback answers an empty name in that case, which
    OpenSSL turns into an internal_error alert.
    """
    if HTTP_1_1 in offered:
        return HTTP_1_1
    return SSL.NO_OVERLAPPING_PROTOCOLS


class HTTPServerOptions(ssl.CertificateOptions):
    """
    OpenSSL server settings for an HTTP/1.1 server: those of
    L{ssl.CertificateOptions}, ALPN answered by
    L{select_application_protocol}.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Set once, on the context every connection shares, before any
        # connection uses it (OpenSSL forbids changing it afterwards).
        self.getContext().set_alpn_select_callback(select_application_protocol)


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
        whole chain and speak HTTP/1.1.
    """
    return HTTPServerOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),  # type: ignore[arg-type]
        certificate=crypto.X509.from_cryptography(chain[0]),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )
