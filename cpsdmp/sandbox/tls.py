"""
The local DMP's TLS settings, through OpenSSL: TLS 1.2 only, the DMP's four
ECDHE_RSA suites, and a client certificate required and validated against
the test PKI, as the real DMP validates CPS certificates against IGC-Santé.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion

from cpsdmp.protocols.server_tls import HTTPServerOptions

# The suites the DMP accepts from software (OpenSSL names).
DMP_CIPHERS = ":".join(
    [
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-SHA384",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)


class _DmpServerOptions(HTTPServerOptions):
    """
    HTTP/1.1 server options that also name the accepted authorities in the
    CertificateRequest, as the DMP does, so that a client can pick its card.
    """

    def __init__(
        self, *, client_ca_names: list[crypto.X509Name], **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        # OpenSSL forbids changing a context once a connection used it: name
        # the authorities once, on the context every connection shares.
        super().getContext().set_client_ca_list(client_ca_names)


def dmp_server_options(
    certificate_chain: str | Path,
    private_key: str | Path,
    client_cas: Sequence[str | Path],
) -> CertificateOptions:
    """
    @param certificate_chain: PEM file, the server certificate first, then
        its intermediates.
    @param private_key: PEM file of the server's key.
    @param client_cas: PEM files of the authorities whose card certificates
        are accepted (the root and the persons intermediate).
    @return: options for C{twisted.internet.endpoints.SSL4ServerEndpoint} or
        C{wrapServer} that behave like the DMP's front end.
    """
    chain = x509.load_pem_x509_certificates(Path(certificate_chain).read_bytes())
    key = serialization.load_pem_private_key(
        Path(private_key).read_bytes(), password=None
    )
    authorities = [
        crypto.X509.from_cryptography(certificate)
        for path in client_cas
        for certificate in x509.load_pem_x509_certificates(Path(path).read_bytes())
    ]
    return _DmpServerOptions(
        client_ca_names=[a.get_subject() for a in authorities],
        privateKey=crypto.PKey.from_cryptography_key(key),  # type: ignore[arg-type]
        certificate=crypto.X509.from_cryptography(chain[0]),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
        verify=True,
        caCerts=authorities,
        requireCertificate=True,
        raiseMinimumTo=TLSVersion.TLSv1_2,
        lowerMaximumSecurityTo=TLSVersion.TLSv1_2,
        acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(  # type: ignore[no-untyped-call]
            DMP_CIPHERS
        ),
        enableSessions=True,
        enableSessionTickets=True,
    )
