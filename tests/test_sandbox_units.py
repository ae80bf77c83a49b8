"""
The local DMP's small parts, without sockets: its command line, how it
names the card holder and the patient in its log.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from cpsdmp.agent.testcard import init_testcard
from cpsdmp.sandbox.service import card_holder, mask_patient
from cpsdmp.sandbox.store import TEST_PATIENTS
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
