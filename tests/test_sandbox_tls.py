"""
The local DMP's TLS front end, checked with OpenSSL's own client: the test
card's certificate is accepted, anything less than the DMP's settings is not.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from cpsdmp.agent.testcard import TestCard, init_testcard
from cpsdmp.sandbox.tls import dmp_server_options

#: The DMP's four suites for software (OpenSSL names), written out here
#: rather than taken from the code under test.
DMP_SUITES = (
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-SHA384",
    "ECDHE-RSA-CHACHA20-POLY1305",
)


@functools.cache
def _card() -> TestCard:
    return init_testcard(Path("sandbox-tls-card").absolute(), softhsm=False)


class _Greeter(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"DMP sandbox ready\n")  # type: ignore[union-attr]


class DmpServerOptionsTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        card = _card()
        options = dmp_server_options(
            card.sandbox_cert, card.sandbox_key, [card.ca_root, *card.ca_intermediates]
        )
        self.port = reactor.listenSSL(  # type: ignore[attr-defined]
            0, Factory.forProtocol(_Greeter), options, interface="127.0.0.1"
        )
        self.addCleanup(self.port.stopListening)
        loaded = pkcs12.load_pkcs12(
            Path(card.soft_card).read_bytes(), card.pin.encode()
        )
        assert loaded.key is not None and loaded.cert is not None
        self.client_key = Path("client-key.pem").absolute()
        self.client_key.write_bytes(
            loaded.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self.client_cert = Path("client-cert.pem").absolute()
        self.client_cert.write_bytes(
            loaded.cert.certificate.public_bytes(serialization.Encoding.PEM)
            + b"".join(
                c.certificate.public_bytes(serialization.Encoding.PEM)
                for c in loaded.additional_certs
            )
        )
        self.card = card

    def s_client(self, *arguments: str) -> Deferred[tuple[bytes, bytes, int]]:
        port = self.port.getHost().port
        return getProcessOutputAndValue(
            "openssl",
            [
                "s_client",
                "-connect",
                f"127.0.0.1:{port}",
                "-servername",
                "localhost",
                "-verify_hostname",
                "localhost",
                "-CAfile",
                self.card.ca_root,
                "-verify_return_error",
                *arguments,
            ],
            env=dict(os.environ),
            reactor=reactor,
            stdinBytes=b"",
        )

    @inlineCallbacks
    def test_card_certificate_accepted(self):  # type: ignore[no-untyped-def]
        """
        With the card's certificate, the handshake is TLS 1.2 on one of the
        DMP's suites, and the server's chain verifies for localhost.
        """
        out, err, code = yield self.s_client(
            "-cert", str(self.client_cert), "-key", str(self.client_key), "-brief"
        )
        text = (out + err).decode()
        self.assertEqual(code, 0, text)
        self.assertIn("Protocol version: TLSv1.2", text)
        self.assertRegex(
            text,
            "Ciphersuite: ECDHE-RSA-(AES128-GCM-SHA256|AES256-GCM-SHA384|"
            "AES256-SHA384|CHACHA20-POLY1305)\n",
        )
        self.assertIn("Verification: OK", text)
        self.assertIn("DMP sandbox ready", text)

    @inlineCallbacks
    def test_acceptable_client_cas(self):  # type: ignore[no-untyped-def]
        """
        The server names the test authorities in its CertificateRequest.
        """
        out, err, code = yield self.s_client(
            "-cert", str(self.client_cert), "-key", str(self.client_key)
        )
        text = out.decode()
        self.assertEqual(code, 0, err)
        self.assertIn("Acceptable client certificate CA names", text)
        self.assertIn("TEST AC IGC-SANTE ELEMENTAIRE PERSONNES", text)

    @inlineCallbacks
    def test_no_client_certificate_refused(self):  # type: ignore[no-untyped-def]
        out, err, code = yield self.s_client("-brief")
        text = (out + err).decode()
        self.assertNotIn("DMP sandbox ready", text)
        self.assertIn("alert handshake failure", text)

    @inlineCallbacks
    def test_forged_card_refused(self):  # type: ignore[no-untyped-def]
        """
        A certificate with the card holder's subject and the test
        authority's name as issuer, but not signed by it, is refused: the
        holder a VIHF is checked against is one the test PKI vouches for.
        """
        card = x509.load_pem_x509_certificate(self.client_cert.read_bytes())
        key = rsa.generate_private_key(65537, 2048)
        forged = (
            x509.CertificateBuilder()
            .subject_name(card.subject)
            .issuer_name(card.issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(card.not_valid_before_utc)
            .not_valid_after(card.not_valid_after_utc)
            .sign(key, hashes.SHA256())
        )
        forged_cert = Path("forged-cert.pem").absolute()
        forged_cert.write_bytes(forged.public_bytes(serialization.Encoding.PEM))
        forged_key = Path("forged-key.pem").absolute()
        forged_key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        out, err, code = yield self.s_client(
            "-cert", str(forged_cert), "-key", str(forged_key), "-brief"
        )
        text = (out + err).decode()
        self.assertNotIn("DMP sandbox ready", text)
        self.assertRegex(text, "alert (decrypt error|bad certificate|unknown ca)")

    @inlineCallbacks
    def test_older_versions_refused(self):  # type: ignore[no-untyped-def]
        """
        TLS 1.1 and 1.0 are refused (offered here with every suite, at the
        lowest security level of OpenSSL's client).
        """
        for version in ("-tls1_1", "-tls1"):
            out, err, code = yield self.s_client(
                version,
                "-cipher",
                "ALL:@SECLEVEL=0",
                "-cert",
                str(self.client_cert),
                "-key",
                str(self.client_key),
            )
            self.assertNotEqual(code, 0, version)
            self.assertIn(b"alert protocol version", err, version)

    @inlineCallbacks
    def test_tls13_refused(self):  # type: ignore[no-untyped-def]
        out, err, code = yield self.s_client(
            "-tls1_3", "-cert", str(self.client_cert), "-key", str(self.client_key)
        )
        self.assertNotEqual(code, 0)
        self.assertIn(b"alert protocol version", err)

    @inlineCallbacks
    def test_other_suites_refused(self):  # type: ignore[no-untyped-def]
        """
        A client offering every TLS 1.2 suite OpenSSL knows but the DMP's
        four finds none in common.
        """
        others = ":".join(
            ["ALL", *(f"!{suite}" for suite in DMP_SUITES), "@SECLEVEL=0"]
        )
        out, err, code = yield self.s_client(
            "-tls1_2",
            "-cipher",
            others,
            "-cert",
            str(self.client_cert),
            "-key",
            str(self.client_key),
        )
        self.assertNotEqual(code, 0)
        self.assertIn(b"handshake failure", err)

    @inlineCallbacks
    def test_each_dmp_suite(self):  # type: ignore[no-untyped-def]
        """
        Each of the DMP's four suites can be negotiated.
        """
        for suite in DMP_SUITES:
            out, err, code = yield self.s_client(
                "-cipher",
                suite,
                "-cert",
                str(self.client_cert),
                "-key",
                str(self.client_key),
                "-brief",
            )
            self.assertEqual(code, 0, err[-500:])
            self.assertIn(f"Ciphersuite: {suite}\n", err.decode())

    @inlineCallbacks
    def test_application_protocols(self):  # type: ignore[no-untyped-def]
        """
        ALPN (RFC 7301): a client offering http/1.1 gets it; one offering
        only protocols the DMP does not speak (h2, http/1.0) goes on without
        ALPN, never cut off with an internal_error alert.
        """
        card = ["-cert", str(self.client_cert), "-key", str(self.client_key)]
        out, err, code = yield self.s_client("-alpn", "h2,http/1.1", *card)
        self.assertEqual(code, 0, err[-500:])
        self.assertIn(b"ALPN protocol: http/1.1", out)
        for offered in ("h2", "http/1.0"):
            out, err, code = yield self.s_client("-alpn", offered, *card)
            text = (out + err).decode(errors="replace")
            self.assertEqual(code, 0, text[-500:])
            self.assertNotIn("alert", text)
            self.assertIn("No ALPN negotiated", text)
            self.assertIn("DMP sandbox ready", text)
