"""
The server chain and name checks, and the memory of verified chains.
"""

from __future__ import annotations

import datetime

from cryptography.hazmat.primitives.serialization import Encoding
from twisted.trial.unittest import SynchronousTestCase

from cpsdmp.protocols.tls.alerts import AlertDescription, ProtocolViolation
from cpsdmp.protocols.tls.validation import VerifiedChains, check_server_chain
from tests.tlssupport import pki


class CheckServerChainTests(SynchronousTestCase):
    def _refused(self, identity: str, host: str = "localhost") -> ProtocolViolation:
        with self.assertRaises(ProtocolViolation) as e:
            check_server_chain(pki()[identity].chain, [pki().root], host)
        return e.exception

    def test_good_by_name_and_ip(self) -> None:
        chain = pki()["server-rsa"].chain
        for host in ("localhost", "127.0.0.1"):
            verified = check_server_chain(chain, [pki().root], host)
            self.assertEqual(verified[-1], pki().root)

    def test_wrong_name(self) -> None:
        e = self._refused("server-wrong-name")
        self.assertEqual(e.description, AlertDescription.bad_certificate)

    def test_wrong_ip(self) -> None:
        e = self._refused("server-rsa", "127.0.0.2")
        self.assertEqual(e.description, AlertDescription.bad_certificate)

    def test_untrusted(self) -> None:
        e = self._refused("server-untrusted")
        self.assertEqual(e.description, AlertDescription.unknown_ca)

    def test_missing_intermediate(self) -> None:
        with self.assertRaises(ProtocolViolation) as e:
            check_server_chain(pki()["server-rsa"].chain[:1], [pki().root], "localhost")
        self.assertEqual(e.exception.description, AlertDescription.unknown_ca)

    def test_no_subject_alt_name(self) -> None:
        """
        A certificate naming its host only in the subject's CN: bad_certificate,
        saying so.
        """
        for host in ("localhost", "127.0.0.1"):
            e = self._refused("server-no-san", host)
            self.assertEqual(e.description, AlertDescription.bad_certificate)
            self.assertIn("subjectAltName", str(e))

    def test_expired(self) -> None:
        e = self._refused("server-expired")
        self.assertEqual(e.description, AlertDescription.certificate_expired)


class VerifiedChainsTests(SynchronousTestCase):
    def test_remembered_then_expired(self) -> None:
        """
        The second check of the same chain comes from memory; once the
        leaf has expired, memory does not hide it.
        """
        cache = VerifiedChains()
        chain = pki()["server-rsa"].chain
        first = cache.check(chain, [pki().root], "localhost")
        self.assertIs(cache.check(chain, [pki().root], "localhost"), first)
        later = chain[0].not_valid_after_utc + datetime.timedelta(days=1)
        with self.assertRaises(ProtocolViolation) as e:
            cache.check(chain, [pki().root], "localhost", later)
        self.assertEqual(e.exception.description, AlertDescription.certificate_expired)

    def test_other_host_or_roots_checked_again(self) -> None:
        cache = VerifiedChains()
        chain = pki()["server-rsa"].chain
        cache.check(chain, [pki().root], "localhost")
        with self.assertRaises(ProtocolViolation):
            cache.check(chain, [pki().root], "elsewhere.example")
        with self.assertRaises(ProtocolViolation):
            cache.check(chain, [pki().other_root], "localhost")

    def test_encoded_remembered_then_expired(self) -> None:
        """
        A chain as sent (DER) is parsed and verified once; the same bytes
        again give the same certificates, and an expired leaf is still
        refused as such.
        """
        cache = VerifiedChains()
        chain = pki()["server-rsa"].chain
        encoded = [c.public_bytes(Encoding.DER) for c in chain]
        parsed, verified = cache.check_encoded(encoded, [pki().root], "localhost")
        self.assertEqual(parsed, chain)
        self.assertEqual(verified[-1], pki().root)
        again, verified_again = cache.check_encoded(
            list(encoded), [pki().root], "localhost"
        )
        self.assertEqual(again, parsed)
        self.assertIs(again[0], parsed[0])
        self.assertEqual(verified_again, verified)
        later = chain[0].not_valid_after_utc + datetime.timedelta(days=1)
        with self.assertRaises(ProtocolViolation) as e:
            cache.check_encoded(encoded, [pki().root], "localhost", later)
        self.assertEqual(e.exception.description, AlertDescription.certificate_expired)
        with self.assertRaises(ProtocolViolation):
            cache.check_encoded(encoded, [pki().root], "elsewhere.example")

    def test_encoded_unreadable(self) -> None:
        with self.assertRaises(ProtocolViolation) as e:
            VerifiedChains().check_encoded([b"\x30\x03junk"], [pki().root], "localhost")
        self.assertEqual(e.exception.description, AlertDescription.bad_certificate)
        self.assertIn("unreadable certificate", str(e.exception))
