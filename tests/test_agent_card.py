"""
Tests for card access: the SoftHSM2 test card signs the way a CPS card does,
the PKCS#12 soft card signs the same way, the PKCS#11 faults a token cannot
be made to produce map to the right errors, and every operation runs on the
one worker thread.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pkcs11
import pkcs11.exceptions as p11errors
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cpsdmp.agent.card import (
    ALGORITHMS,
    CardRemoved,
    CardTimeout,
    KeyUsage,
    NoCard,
    NotLoggedIn,
    PinBlocked,
    Pkcs11Backend,
    SoftCardBackend,
    UnknownAlgorithm,
    WorkerCard,
    WrongPin,
    algorithm_named,
    build_chain,
    pkcs12_problem,
)
from cpsdmp.agent.holder import holder_from_certificate
from cpsdmp.agent.pki import verify_card_chain
from tests.agent_support import shared_testcard, token_backend


def _verify(
    certificate: x509.Certificate, signature: bytes, data: bytes, name: str
) -> None:
    """
    Raise unless C{signature} is C{name}'s PKCS#1 v1.5 signature of C{data}.
    """
    public_key = certificate.public_key()
    assert isinstance(public_key, rsa.RSAPublicKey)
    public_key.verify(signature, data, padding.PKCS1v15(), ALGORITHMS[name].hash())


class TokenTests(SynchronousTestCase):
    """
    The PKCS#11 backend on the SoftHSM2 test card.
    """

    def setUp(self) -> None:
        self.testcard = shared_testcard()
        self.backend = token_backend()
        self.backend.login(self.testcard.pin)
        self.addCleanup(self.backend.close)

    def test_each_algorithm_verifies(self) -> None:
        """
        Both keys sign with each algorithm; the signature verifies with the
        key's certificate over the data (not over its hash).
        """
        data = b"<ds:SignedInfo>...</ds:SignedInfo>"
        for usage in KeyUsage:
            leaf = self.backend.chain(usage)[0]
            for name, algorithm in ALGORITHMS.items():
                signature = self.backend.sign_digest(
                    usage, algorithm, algorithm.digest(data)
                )
                self.assertEqual(len(signature), 256)
                _verify(leaf, signature, data, name)

    def test_authentication_key_refuses_hashing_mechanisms(self) -> None:
        """
        The token really restricts the authentication key to CKM_RSA_PKCS, as
        a CPS card does: hash-and-sign mechanisms are refused, and so is raw
        RSA, which would sign any padding.
        """
        self.backend.close()
        lib = self.backend.library()
        token = lib.get_token(token_label=self.testcard.token_label)
        with token.open(user_pin=self.testcard.pin) as session:
            key = session.get_key(
                object_class=pkcs11.ObjectClass.PRIVATE_KEY, label="CPS_PRIV_AUT"
            )
            for mechanism, data in (
                (pkcs11.Mechanism.SHA256_RSA_PKCS, b"data"),
                (pkcs11.Mechanism.SHA1_RSA_PKCS, b"data"),
                (pkcs11.Mechanism.RSA_X_509, b"\x00\x01" + b"\xff" * 254),
            ):
                self.assertRaises(
                    p11errors.MechanismInvalid, key.sign, data, mechanism=mechanism
                )
            # What the agent does is accepted.
            self.assertEqual(
                len(key.sign(b"\x00" * 51, mechanism=pkcs11.Mechanism.RSA_PKCS)), 256
            )

    def test_digest_info_signature_equals_hash_and_sign(self) -> None:
        """
        CKM_RSA_PKCS over our DigestInfo gives, bit for bit, the signature
        the token makes itself with CKM_SHA256_RSA_PKCS (on the signature
        key, the one that accepts both).
        """
        data = b"a submission set"
        algorithm = algorithm_named("SHA256WithRSA")
        ours = self.backend.sign_digest(
            KeyUsage.signature, algorithm, algorithm.digest(data)
        )
        self.backend.close()
        token = self.backend.library().get_token(token_label=self.testcard.token_label)
        with token.open(user_pin=self.testcard.pin) as session:
            key = session.get_key(
                object_class=pkcs11.ObjectClass.PRIVATE_KEY, label="CPS_PRIV_SIG"
            )
            theirs = key.sign(data, mechanism=pkcs11.Mechanism.SHA256_RSA_PKCS)
        self.assertEqual(ours, theirs)

    def test_chain_validates_to_the_test_root(self) -> None:
        """
        The chain is the leaf found by CKA_ID and the persons intermediate,
        and it validates as a client certificate against the test root.
        """
        chain = self.backend.chain(KeyUsage.authentication)
        self.assertEqual(len(chain), 2)
        self.assertEqual(chain[0].issuer, chain[1].subject)
        verify_card_chain(chain, [self.testcard.ca_root_certificate()])

    def test_holder(self) -> None:
        """
        The holder comes from the authentication certificate's subject.
        """
        holder = holder_from_certificate(self.backend.chain(KeyUsage.authentication)[0])
        professional = self.testcard.professional
        self.assertEqual(holder.id, professional["id"])
        self.assertEqual(holder.name, professional["name"])
        self.assertEqual(holder.profession, professional["profession"])

    def test_wrong_pin_locks_and_says_tries_unknown(self) -> None:
        """
        SoftHSM2 does not count tries down: the error says so, and the card
        is locked afterwards (the earlier login is gone).
        """
        with self.assertRaises(WrongPin) as raised:
            self.backend.login("0000")
        self.assertIsNone(raised.exception.tries_left)
        self.assertIn("wrong PIN", str(raised.exception))
        self.assertRaises(NotLoggedIn, self.backend.chain, KeyUsage.authentication)
        self.backend.login(self.testcard.pin)
        self.assertEqual(len(self.backend.chain(KeyUsage.signature)), 2)

    def test_no_such_token(self) -> None:
        """
        A token label that no slot holds is "no card".
        """
        backend = token_backend("NO SUCH CARD")
        with self.assertRaises(NoCard) as raised:
            backend.login(self.testcard.pin)
        self.assertIn("NO SUCH CARD", str(raised.exception))

    def test_locked_card_refuses(self) -> None:
        """
        After logout, signing asks for the PIN again.
        """
        self.backend.logout()
        algorithm = algorithm_named("SHA256WithRSA")
        self.assertRaises(
            NotLoggedIn,
            self.backend.sign_digest,
            KeyUsage.authentication,
            algorithm,
            algorithm.digest(b"x"),
        )


class SoftCardTests(SynchronousTestCase):
    """
    The PKCS#12 soft card.
    """

    def setUp(self) -> None:
        self.testcard = shared_testcard()
        self.backend = SoftCardBackend(
            Path(self.testcard.soft_card),
            Path(self.testcard.soft_card_signature),
            self.testcard.ca_intermediate_certificates(),
        )

    def test_signs_like_a_card(self) -> None:
        """
        The soft card's signature of a hash is the deterministic PKCS#1 v1.5
        signature of the data by the same key.
        """
        self.backend.login(self.testcard.pin)
        key, _, _ = pkcs12.load_key_and_certificates(
            Path(self.testcard.soft_card).read_bytes(), self.testcard.pin.encode()
        )
        assert isinstance(key, rsa.RSAPrivateKey)
        for name, algorithm in ALGORITHMS.items():
            signature = self.backend.sign_digest(
                KeyUsage.authentication, algorithm, algorithm.digest(b"data")
            )
            expected = key.sign(b"data", padding.PKCS1v15(), algorithm.hash())
            self.assertEqual(signature, expected, name)

    def test_wrong_pin(self) -> None:
        self.assertRaises(WrongPin, self.backend.login, "0000")
        self.assertRaises(NotLoggedIn, self.backend.chain, KeyUsage.authentication)

    def test_not_pkcs12(self) -> None:
        """
        A soft card file that is not PKCS#12 is no card, said as such, not
        a wrong PIN: the PIN was never tried.
        """
        backend = SoftCardBackend(Path(self.testcard.ca_root))
        with self.assertRaises(NoCard) as raised:
            backend.login(self.testcard.pin)
        self.assertIn("a PEM file, not PKCS#12", str(raised.exception))
        self.assertIsNone(pkcs12_problem(Path(self.testcard.soft_card).read_bytes()))
        for data in [b"", b"\x30", b"\x30\x03\x02\x01\x03", bytes(100)]:
            self.assertEqual(pkcs12_problem(data), "not a PKCS#12 file")

    def test_chain_and_holder(self) -> None:
        self.backend.login(self.testcard.pin)
        chain = self.backend.chain(KeyUsage.signature)
        self.assertEqual(chain[0].issuer, chain[1].subject)
        self.assertEqual(
            holder_from_certificate(chain[0]).id, self.testcard.professional["id"]
        )


class AlgorithmTests(SynchronousTestCase):
    def test_unknown_names_the_supported(self) -> None:
        with self.assertRaises(UnknownAlgorithm) as raised:
            algorithm_named("SHA256WithECDSA")
        for name in ("SHA256WithRSA", "SHA384WithRSA", "SHA512WithRSA", "SHA1WithRSA"):
            self.assertIn(name, str(raised.exception))

    def test_digest_info_is_der(self) -> None:
        """
        Our DigestInfo prefixes are what PKCS#1 v1.5 signing embeds: a
        signature of prefix + hash made with raw RSA verifies as the
        algorithm's signature.
        """
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        numbers = key.private_numbers()
        n = numbers.public_numbers.n
        for name, algorithm in ALGORITHMS.items():
            digest_info = algorithm.digest_info(algorithm.digest(b"m"))
            padded = b"\x00\x01" + b"\xff" * (256 - 3 - len(digest_info)) + b"\x00"
            encoded = int.from_bytes(padded + digest_info, "big")
            signature = pow(encoded, numbers.d, n).to_bytes(256, "big")
            key.public_key().verify(
                signature, b"m", padding.PKCS1v15(), algorithm.hash()
            )
            self.assertEqual(
                signature, key.sign(b"m", padding.PKCS1v15(), algorithm.hash()), name
            )

    def test_build_chain_stops_before_root(self) -> None:
        testcard = shared_testcard()
        root = testcard.ca_root_certificate()
        intermediates = testcard.ca_intermediate_certificates()
        persons = next(
            c for c in intermediates if "PERSONNES" in c.subject.rfc4514_string()
        )
        self.assertEqual(build_chain(persons, [root, *intermediates]), [persons])
        self.assertEqual(build_chain(root, intermediates), [root])


class _FakeToken:
    """
    A PKCS#11 token that fails its login the way a real card does and
    SoftHSM2 cannot: counting tries down, blocking the PIN.
    """

    def __init__(self, error: type[Exception] | None, flags: pkcs11.TokenFlag) -> None:
        self.error = error
        self.flags = pkcs11.TokenFlag(0)
        self._after = flags
        self.slot = self
        self.logins = 0

    removed = False

    def get_token(self) -> _FakeToken:
        if self.removed:
            raise p11errors.TokenNotPresent()
        fresh = _FakeToken(None, self._after)
        fresh.flags = self._after
        return fresh

    def open(self, user_pin: str) -> Any:
        self.logins += 1
        if self.error is not None:
            raise self.error()
        return _FakeSession()


class _FakeSession:
    def __init__(self, error: type[Exception] = p11errors.DeviceRemoved) -> None:
        self.error = error

    def get_key(self, **kwargs: Any) -> Any:
        raise self.error()

    def close(self) -> None:
        pass


class _FakeTokenBackend(Pkcs11Backend):
    def __init__(self, token: _FakeToken) -> None:
        super().__init__("fake-module.so", "CPS")
        self.fake = token

    def _token(self) -> Any:
        return self.fake


class Pkcs11FaultTests(SynchronousTestCase):
    """
    How the backend reads faults only a real card produces, from a fake
    token behind python-pkcs11's interface.
    """

    def test_final_try(self) -> None:
        token = _FakeToken(p11errors.PinIncorrect, pkcs11.TokenFlag.USER_PIN_FINAL_TRY)
        backend = _FakeTokenBackend(token)
        with self.assertRaises(WrongPin) as raised:
            backend.login("1111")
        self.assertEqual(raised.exception.tries_left, 1)
        self.assertIn("1 try left", str(raised.exception))
        self.assertEqual(token.logins, 1, "the agent retried a wrong PIN")

    def test_count_low(self) -> None:
        """
        CKF_USER_PIN_COUNT_LOW says that a wrong PIN was entered since the
        last right one, not that few tries remain: the error says what it
        means, and that the card does not tell the tries left.
        """
        token = _FakeToken(p11errors.PinIncorrect, pkcs11.TokenFlag.USER_PIN_COUNT_LOW)
        with self.assertRaises(WrongPin) as raised:
            _FakeTokenBackend(token).login("1111")
        self.assertIsNone(raised.exception.tries_left)
        message = str(raised.exception)
        self.assertIn("a wrong PIN was entered since the last right one", message)
        self.assertIn("does not tell how many tries remain", message)
        self.assertNotIn("few tries remain", message)

    def test_final_try_told_before_a_pin(self) -> None:
        """
        Before any PIN, the backend reads from the token's flags whether the
        next wrong PIN blocks the card, asking the card to check none.
        """
        for flags, final in [
            (pkcs11.TokenFlag.USER_PIN_FINAL_TRY, True),
            (pkcs11.TokenFlag.USER_PIN_COUNT_LOW, False),
            (pkcs11.TokenFlag(0), False),
        ]:
            token = _FakeToken(None, flags)
            token.flags = flags
            self.assertIs(_FakeTokenBackend(token).pin_final_try(), final)
            self.assertEqual(token.logins, 0)

    def test_blocked_by_this_try(self) -> None:
        token = _FakeToken(p11errors.PinIncorrect, pkcs11.TokenFlag.USER_PIN_LOCKED)
        self.assertRaises(PinBlocked, _FakeTokenBackend(token).login, "1111")

    def test_already_blocked(self) -> None:
        token = _FakeToken(p11errors.PinLocked, pkcs11.TokenFlag.USER_PIN_LOCKED)
        backend = _FakeTokenBackend(token)
        with self.assertRaises(PinBlocked) as raised:
            backend.login("1111")
        self.assertIn("PUK", str(raised.exception))

    def test_removed_between_uses(self) -> None:
        """
        The presence check notices a card taken out, and forgets the session.
        """
        token = _FakeToken(None, pkcs11.TokenFlag(0))
        backend = _FakeTokenBackend(token)
        backend.login("1234")
        backend.check_present()
        token.removed = True
        self.assertRaises(CardRemoved, backend.check_present)
        self.assertRaises(NotLoggedIn, backend.chain, KeyUsage.authentication)

    def test_removed_during_use(self) -> None:
        for error in (
            p11errors.DeviceRemoved,
            p11errors.TokenNotPresent,
            p11errors.SessionHandleInvalid,
        ):
            backend = _FakeTokenBackend(_FakeToken(None, pkcs11.TokenFlag(0)))
            backend.login("1234")
            backend._session = _FakeSession(error)  # type: ignore[assignment]
            self.assertRaises(CardRemoved, backend.chain, KeyUsage.authentication)
            # The session is gone: the next call asks for the PIN again.
            self.assertRaises(NotLoggedIn, backend.chain, KeyUsage.authentication)


class _RecordingBackend:
    """
    A backend that notes which thread runs each call.
    """

    description = "recording"

    def __init__(self) -> None:
        self.threads: set[int] = set()
        self.order: list[int] = []

    def login(self, pin: str) -> None:
        self.threads.add(threading.get_ident())

    def logout(self) -> None:
        pass

    def check_present(self) -> None:
        pass

    def chain(self, usage: KeyUsage) -> list[x509.Certificate]:
        raise NotImplementedError

    def sign_digest(self, usage: KeyUsage, algorithm: Any, digest: bytes) -> bytes:
        self.threads.add(threading.get_ident())
        self.order.append(len(self.order))
        return digest

    def close(self) -> None:
        pass


class WorkerTests(TestCase):
    """
    The worker thread.
    """

    def test_one_thread_in_order(self) -> None:
        """
        Fifty concurrent signatures run one after the other on one thread
        that is not the reactor's, each answered.
        """
        backend = _RecordingBackend()
        card = WorkerCard(backend, reactor)  # type: ignore[arg-type]
        card.start()
        self.addCleanup(card.stop)
        algorithm = algorithm_named("SHA256WithRSA")
        ds = [
            card.sign(KeyUsage.authentication, algorithm, b"%d" % i) for i in range(50)
        ]

        def check(results: list[tuple[bytes, float]]) -> None:
            self.assertEqual(
                [r[0] for r in results],
                [hashes_of(b"%d" % i) for i in range(50)],
            )
            self.assertEqual(len(backend.threads), 1)
            self.assertNotIn(threading.get_ident(), backend.threads)
            self.assertEqual(backend.order, list(range(50)))

        return gatherResults(ds).addCallback(check)  # type: ignore[return-value]


class _HungBackend(_RecordingBackend):
    """
    A card whose signatures hang until the test lets them go.
    """

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.closed = False

    def sign_digest(self, usage: KeyUsage, algorithm: Any, digest: bytes) -> bytes:
        self.release.wait(30)
        return super().sign_digest(usage, algorithm, digest)

    def close(self) -> None:
        self.closed = True


class WorkerTimeoutTests(TestCase):
    """
    A card that hangs.
    """

    @inlineCallbacks
    def test_operations_time_out(self) -> Any:
        """
        An operation that takes longer than the timeout fails with
        CardTimeout, and so does the one queued behind it; once the card
        answers, the worker is idle again and signs.
        """
        backend = _HungBackend()
        self.addCleanup(backend.release.set)
        card = WorkerCard(backend, reactor, timeout=0.3)
        card.start()
        self.addCleanup(card.stop)
        algorithm = algorithm_named("SHA256WithRSA")
        started = reactor.seconds()  # type: ignore[attr-defined]
        first = card.sign(KeyUsage.authentication, algorithm, b"1")
        second = card.sign(KeyUsage.authentication, algorithm, b"2")
        error = yield self.assertFailure(first, CardTimeout)
        self.assertIn("did not answer within 0.3 s", str(error))
        yield self.assertFailure(second, CardTimeout)
        self.assertLess(reactor.seconds() - started, 5)  # type: ignore[attr-defined]
        idle = card.when_idle()
        self.assertNoResult(idle)
        backend.release.set()
        yield idle
        signature, _ = yield card.sign(KeyUsage.authentication, algorithm, b"3")
        self.assertEqual(signature, hashes_of(b"3"))

    @inlineCallbacks
    def test_stop_does_not_wait_forever(self) -> Any:
        """
        Stopping with the card's thread stuck in the card ends after the
        timeout, not when the card answers; the thread is a daemon, so that
        the process can exit.
        """
        backend = _HungBackend()
        self.addCleanup(backend.release.set)
        card = WorkerCard(backend, reactor, timeout=0.3)
        card.start()
        algorithm = algorithm_named("SHA256WithRSA")
        signing = card.sign(KeyUsage.authentication, algorithm, b"1")
        signing.addErrback(lambda f: f.trap(CardTimeout))
        started = reactor.seconds()  # type: ignore[attr-defined]
        yield card.stop().addTimeout(10, reactor)
        self.assertLess(reactor.seconds() - started, 5)  # type: ignore[attr-defined]
        self.assertFalse(backend.closed)
        self.assertTrue(all(t.daemon for t in card._pool.threads))
        yield signing


def hashes_of(data: bytes) -> bytes:
    hasher = hashes.Hash(hashes.SHA256())
    hasher.update(data)
    return hasher.finalize()
