"""
The local DMP's small parts, without sockets: its command line, how it
names the card holder and the patient in its log.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from cpsdmp.agent.testcard import init_testcard
from cpsdmp.sandbox.service import card_holder, make_site, mask_patient
from cpsdmp.sandbox.store import TEST_PATIENTS, Store
from cpsdmp.sandbox.tap import DEFAULT_DB, DEFAULT_LISTEN, Options
from cpsdmp.xds.ebrim import INS_OID_TEST
from tests.pki import self_signed


class OptionsTests(SynchronousTestCase):
    def test_testcard(self) -> None:
        """
        C{--testcard} gives the server's chain and key and the authorities
        of the test PKI; the listening endpoint and database have defaults.
        """
        card = init_testcard(Path("units-card").absolute(), softhsm=False)
        options = Options()
        options.parseOptions(["--testcard", card.directory])
        self.assertEqual(options["cert"], card.sandbox_cert)
        self.assertEqual(options["key"], card.sandbox_key)
        self.assertEqual(options["client-cas"], [card.ca_root, *card.ca_intermediates])
        self.assertEqual(options["listen"], DEFAULT_LISTEN)
        self.assertEqual(options["db"], DEFAULT_DB)

    def test_explicit_files(self) -> None:
        """
        Without test card, C{--cert}, C{--key} and at least one
        C{--client-ca} are needed; C{--client-ca} repeats.
        """
        self.assertRaises(usage.UsageError, Options().parseOptions, [])
        error = self.assertRaises(
            usage.UsageError, Options().parseOptions, ["--testcard", "nowhere"]
        )
        self.assertIn("cpsdmp testcard init", str(error))
        card = init_testcard(Path("units-card").absolute(), softhsm=False)
        files = ["--cert", card.sandbox_cert, "--key", card.sandbox_key]
        self.assertRaises(usage.UsageError, Options().parseOptions, files)
        options = Options()
        options.parseOptions(
            [
                *files,
                "--client-ca",
                card.ca_root,
                "--client-ca",
                card.ca_intermediates[0],
            ]
        )
        self.assertEqual(
            options["client-cas"], [card.ca_root, card.ca_intermediates[0]]
        )


class NamesTests(SynchronousTestCase):
    def test_card_holder(self) -> None:
        """
        The holder's identifier is the CN's part before the slash.
        """
        _, certificate = self_signed(
            rsa.generate_private_key(65537, 2048), "810001234567/Marie DURAND-TEST"
        )
        self.assertEqual(card_holder(certificate), "810001234567")

    def test_patient_masked(self) -> None:
        """
        The log shows three characters of the INS, never the whole.
        """
        patient = TEST_PATIENTS[0].patient
        self.assertEqual(patient.authority, INS_OID_TEST)
        self.assertEqual(mask_patient(patient), patient.ins[:3] + "…")
        self.assertEqual(mask_patient(None), "-")

    def test_seeded_keys(self) -> None:
        """
        Every seeded INS-NIR has a valid key (97 minus the number mod 97).
        """
        for record in TEST_PATIENTS:
            ins = record.patient.ins
            self.assertEqual(int(ins[13:]), 97 - int(ins[:13]) % 97, ins)


class EarlyAnswerTests(SynchronousTestCase):
    """
    What the local DMP answers before a request's body is read, on an
    in-memory connection: the database is never opened.
    """

    def connect(self) -> tuple[Any, StringTransport]:
        site = make_site(Store(self.mktemp()), max_request_bytes=1000)
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        # Closed at the end, its idle timeout with it, as a real transport
        # would once the answer is sent.
        self.addCleanup(protocol.connectionLost, Failure(ConnectionDone()))
        return protocol, transport

    def test_huge_content_length_refused_at_once(self) -> None:
        """
        A Content-Length over the limit is answered 413 as soon as the
        headers are read, and the connection closes: the body is not waited
        for.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(
            b"POST /si-dmp-server/v2/services/registry HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 99999999999999\r\n\r\n"
        )
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 413 "), head)
        self.assertIn(b"X-Content-Type-Options: nosniff", head)
        self.assertEqual(body, b"request body over 1000 bytes\n")
        self.assertTrue(transport.disconnecting)

    def test_header_too_large(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET /" + b"a" * 17000 + b" HTTP/1.1\r\n")
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 431 "), head)
        self.assertIn(b"request line or header line", body)
        self.assertTrue(transport.disconnecting)
