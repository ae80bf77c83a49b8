"""
Access to the professional's card: the keys and certificates of a CPS card
through PKCS#11, or of a PKCS#12 soft card, behind one asynchronous face whose
every operation runs, in order, on a single worker thread.
"""

from __future__ import annotations

import enum
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pkcs11
import pkcs11.exceptions as p11errors
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from cryptography.hazmat.primitives.serialization import pkcs12
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from cpsdmp.agent.holder import Holder, holder_from_certificate

_log = Logger()
_T = TypeVar("_T")


class KeyUsage(enum.Enum):
    """
    The two keys of a CPS card.
    """

    authentication = "authentication"
    signature = "signature"


# The labels of the private keys on a CPS card.
KEY_LABELS = {
    KeyUsage.authentication: "CPS_PRIV_AUT",
    KeyUsage.signature: "CPS_PRIV_SIG",
}


@dataclass(frozen=True)
class Algorithm:
    """
    A signature algorithm the agent offers: PKCS#1 v1.5 over one hash.
    """

    name: str
    hash: type[hashes.HashAlgorithm]
    # The DER encoding of DigestInfo up to the digest itself
    # (RFC 8017, section 9.2, note 1).
    digest_info_prefix: bytes

    def digest(self, data: bytes) -> bytes:
        hasher = hashes.Hash(self.hash())
        hasher.update(data)
        return hasher.finalize()

    def digest_info(self, digest: bytes) -> bytes:
        """
        @return: the DER DigestInfo that CKM_RSA_PKCS signs for C{digest}.
        """
        return self.digest_info_prefix + digest


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm(
            "SHA256WithRSA",
            hashes.SHA256,
            bytes.fromhex("3031300d060960864801650304020105000420"),
        ),
        Algorithm(
            "SHA384WithRSA",
            hashes.SHA384,
            bytes.fromhex("3041300d060960864801650304020205000430"),
        ),
        Algorithm(
            "SHA512WithRSA",
            hashes.SHA512,
            bytes.fromhex("3051300d060960864801650304020305000440"),
        ),
        Algorithm(
            "SHA1WithRSA",
            hashes.SHA1,
            bytes.fromhex("3021300906052b0e03021a05000414"),
        ),
    )
}


class UnknownAlgorithm(ValueError):
    """
    A signature algorithm the agent does not offer.
    """


def algorithm_named(name: str) -> Algorithm:
    """
    @return: the algorithm called C{name}.
    @raise UnknownAlgorithm: naming the supported ones.
    """
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise UnknownAlgorithm(
            f"unknown signature algorithm {name!r}; the card signs with "
            + ", ".join(ALGORITHMS)
        ) from None


class CardError(Exception):
    """
    The card refused or could not do what was asked; the message says what the
    professional can do about it.
    """


class WrongPin(CardError):
    """
    The PIN was refused. C{tries_left} is C{None} when the card does not say;
    C{count_low} is PKCS#11's CKF_USER_PIN_COUNT_LOW, which says that a wrong
    PIN was entered since the last right one, not how many tries remain.
    """

    def __init__(self, tries_left: int | None, count_low: bool = False) -> None:
        self.tries_left = tries_left
        if tries_left is not None:
            plural = "try" if tries_left == 1 else "tries"
            message = f"wrong PIN: {tries_left} {plural} left before the card blocks"
        elif count_low:
            message = (
                "wrong PIN: the card does not tell how many tries remain, only "
                "that a wrong PIN was entered since the last right one; it "
                "blocks after a few wrong PINs"
            )
        else:
            message = (
                "wrong PIN: the card does not tell how many tries remain; "
                "it blocks after a few wrong PINs"
            )
        super().__init__(message)


class LastTry(CardError):
    """
    The card's next wrong PIN blocks it, and the request did not say that
    the professional knows: the PIN was not presented.
    """

    def __init__(self) -> None:
        super().__init__(
            "one try left: a wrong PIN now blocks the card, so the PIN was not "
            "presented; ask the professional to check it, then send it again "
            'with "lastTry": true'
        )


class CardFault(CardError):
    """
    The card answered with an error of its own (not a PIN, not a removal):
    the agent dropped its session, and the next PIN opens a new one.
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(
            f"the card failed ({type(error).__name__}): the agent closed its "
            "session with it; take the card out and put it back, then enter "
            "the PIN again"
        )


class PinBlocked(CardError):
    """
    The PIN is blocked; the card must be unblocked with its PUK.
    """

    def __init__(self, message: str = "") -> None:
        super().__init__(
            message
            or "PIN blocked: 0 tries left; unblock the card with its PUK "
            "(unblocking code) before using it again"
        )


class NoCard(CardError):
    """
    No card, or not the expected one, is in the reader.
    """


class CardRemoved(CardError):
    """
    The card was taken out while the agent was using it.
    """

    def __init__(self, message: str = "") -> None:
        super().__init__(
            message or "the card was removed: insert it and enter the PIN again"
        )


class NotLoggedIn(CardError):
    """
    The card is locked: no PIN has been entered since it was inserted or locked.
    """

    def __init__(self, message: str = "") -> None:
        super().__init__(message or "the card is locked: enter the PIN again")


class KeyNotFound(CardError):
    """
    The card lacks the key or certificate asked for.
    """


class NoSignatureKey(KeyNotFound):
    """
    The card has no signature key (or no certificate for it): it
    authenticates its holder but cannot sign submissions.
    """

    def __init__(self, why: str) -> None:
        super().__init__(
            f"the card has no signature key ({why}): it cannot sign submissions"
        )


def _key_missing(usage: KeyUsage, why: str) -> KeyNotFound:
    """
    @return: the error for a card that lacks the key for C{usage}.
    """
    if usage is KeyUsage.signature:
        return NoSignatureKey(why)
    return KeyNotFound(f"the card lacks its {usage.value} key: {why}")


class CardTimeout(CardError):
    """
    The card did not answer in time; the operation may still be under way
    on the card's thread, and what comes after it waits for it.
    """

    def __init__(self, seconds: float) -> None:
        super().__init__(
            f"the card did not answer within {seconds:g} s: check the reader, "
            "take the card out and put it back"
        )


#: Seconds a card operation may take before the agent answers without it.
#: A CPS card signs in well under a second, and checks a PIN in about one.
DEFAULT_CARD_TIMEOUT = 30.0


class CardBackend(Protocol):
    """
    The blocking operations of one card. Only the worker thread of a
    L{WorkerCard} calls them, one at a time.
    """

    description: str

    def login(self, pin: str) -> None:
        """
        Unlock the card with C{pin}, verified by the card even when it was
        already unlocked. Raise L{WrongPin}, L{PinBlocked} or L{NoCard}.
        """

    def pin_final_try(self) -> bool:
        """
        @return: whether the card says that its next wrong PIN blocks it
            (PKCS#11's CKF_USER_PIN_FINAL_TRY). Raise L{NoCard} if there is
            no card.
        """

    def logout(self) -> None:
        """
        Lock the card.
        """

    def load(self) -> None:
        """
        Make ready what every card operation needs, the card itself aside
        (a PKCS#11 module loaded and initialised), once, at start. Raise
        L{NoCard} saying why it cannot be.
        """

    def check_present(self) -> None:
        """
        Raise L{CardRemoved} if the card left the reader since the login (the
        session is then gone), L{NoCard} if there is no card at all.
        """

    def chain(self, usage: KeyUsage) -> list[x509.Certificate]:
        """
        @return: the certificate of the key for C{usage}, then its issuers up
            to, not including, the root.
        """

    def sign_digest(
        self, usage: KeyUsage, algorithm: Algorithm, digest: bytes
    ) -> bytes:
        """
        @return: the PKCS#1 v1.5 signature of C{digest}, a hash by C{algorithm}.
        """

    def close(self) -> None:
        """
        Release the card for good.
        """


class _CardThread(threading.Thread):
    """
    The card's worker thread: a daemon, so that a card that hangs does not
    keep the process from exiting.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.daemon = True


class WorkerCard:
    """
    A card whose operations run on one dedicated thread, in the order they
    are asked, so that concurrent callers queue rather than fail and the
    reactor never waits on the card. An operation that takes longer than
    C{timeout} seconds fails with L{CardTimeout}; the thread cannot be
    interrupted, so what is queued behind it waits on, each with its own
    timeout.
    """

    def __init__(
        self,
        backend: CardBackend,
        reactor: Any = None,
        timeout: float = DEFAULT_CARD_TIMEOUT,
    ):
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        assert reactor is not None
        self.backend = backend
        self.timeout = timeout
        self._reactor = reactor
        self._pool = ThreadPool(1, 1, name="cpsdmp-card")
        self._pool.threadFactory = _CardThread
        self._outstanding = 0
        self._idle: list[Deferred[None]] = []
        self._stopping = False

    @property
    def description(self) -> str:
        return self.backend.description

    def start(self) -> None:
        if not self._pool.started:
            self._pool.start()

    def stop(self) -> Deferred[None]:
        """
        Finish the queued operations, then release the card; a card that
        hangs is given up on after the timeout.

        @return: a Deferred that fires once the card is released or given
            up on.
        """
        if not self._pool.started or self._stopping:
            return succeed(None)
        closed = self._run(self.backend.close)
        self._stopping = True

        def let_go(result: object) -> None:
            if isinstance(result, Failure):
                _log.warn(
                    "the card was not released: {reason}",
                    reason=result.getErrorMessage(),
                )
            if self._outstanding:
                # The thread is stuck in the card: join it on a thread of
                # its own, which the process does not wait for either.
                threading.Thread(target=self._pool.stop, daemon=True).start()
            else:
                self._pool.stop()

        return closed.addBoth(let_go)

    def when_idle(self) -> Deferred[None]:
        """
        @return: a Deferred that fires once every operation asked so far
            has ended on the card's thread, timed out or not.
        """
        if not self._outstanding:
            return succeed(None)
        waiting: Deferred[None] = Deferred()
        self._idle.append(waiting)
        return waiting

    def _ended(self) -> None:
        self._outstanding -= 1
        if not self._outstanding:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    def _run(self, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        def run() -> _T:
            try:
                return f(*args)
            finally:
                self._reactor.callFromThread(self._ended)

        def timed_out(result: object, timeout: float) -> _T:
            raise CardTimeout(timeout)

        if self._stopping:
            # A request on a connection that outlived the agent's port.
            return fail(NoCard("the agent is stopping: it has let go of the card"))
        self._outstanding += 1
        d: Deferred[_T] = deferToThreadPool(self._reactor, self._pool, run)
        return d.addTimeout(self.timeout, self._reactor, onTimeoutCancel=timed_out)

    def login(self, pin: str, last_try: bool = False) -> Deferred[None]:
        """
        Present C{pin} to the card, unless the card says that a wrong PIN
        now blocks it and C{last_try} does not say that the professional
        knows: a program trying PINs blindly cannot block the card. Both
        happen in one turn of the card's thread, nothing in between.

        @return: a Deferred that fires with C{None} once the card accepted
            C{pin}, or fails with a L{CardError}: L{LastTry} when the PIN
            was not presented.
        """

        def login() -> None:
            if not last_try and self.backend.pin_final_try():
                raise LastTry()
            self.backend.login(pin)

        return self._run(login)

    def logout(self) -> Deferred[None]:
        return self._run(self.backend.logout)

    def load(self) -> Deferred[None]:
        """
        @return: a Deferred that fires with C{None} once what the card needs
            is ready (see L{CardBackend.load}), or fails with a L{CardError}
            saying why it cannot be.
        """
        return self._run(self.backend.load)

    def chain(self, usage: KeyUsage) -> Deferred[list[x509.Certificate]]:
        """
        @return: a Deferred that fires with the chain of the key for
            C{usage}, leaf first, root excluded.
        """
        return self._run(self.backend.chain, usage)

    def holder(self) -> Deferred[Holder]:
        """
        @return: a Deferred that fires with the holder named by the
            authentication certificate.
        """

        def read() -> Holder:
            self.backend.check_present()
            return holder_from_certificate(
                self.backend.chain(KeyUsage.authentication)[0]
            )

        return self._run(read)

    def check_present(self) -> Deferred[None]:
        """
        @return: a Deferred that fires with C{None} if the card is in the
            reader, or fails with L{CardRemoved} or L{NoCard}.
        """
        return self._run(self.backend.check_present)

    def sign(
        self, usage: KeyUsage, algorithm: Algorithm, data: bytes
    ) -> Deferred[tuple[bytes, float]]:
        """
        Hash C{data} and have the card sign the hash.

        @return: a Deferred that fires with the signature and the seconds
            the card took.
        """

        def sign() -> tuple[bytes, float]:
            started = time.perf_counter()
            signature = self.backend.sign_digest(
                usage, algorithm, algorithm.digest(data)
            )
            return signature, time.perf_counter() - started

        return self._run(sign)


def build_chain(
    leaf: x509.Certificate, candidates: Iterable[x509.Certificate]
) -> list[x509.Certificate]:
    """
    @return: C{leaf} followed by its issuers found among C{candidates}, up to
        and excluding the self-signed root.
    """
    pool = list(candidates)
    chain = [leaf]
    while chain[-1].issuer != chain[-1].subject:
        issuer = next(
            (
                c
                for c in pool
                if c.subject == chain[-1].issuer
                and c.subject != c.issuer
                and c not in chain
            ),
            None,
        )
        if issuer is None:
            break
        chain.append(issuer)
    return chain


def _load_problem(module: str, error: Exception) -> str:
    """
    @return: why the dynamic loader or the module's C_Initialize refused
        C{module}, in words, from python-pkcs11's C{error}.
    """
    text = str(error).removeprefix(f"OS exception while loading {module}: ")
    text = text.removeprefix(f"{module}: ")
    if "C_GetFunctionList" in text:
        return "not a PKCS#11 module (no C_GetFunctionList)"
    if "file too short" in text or "invalid ELF header" in text:
        return f"not a shared library ({text})"
    if "cannot open shared object file: " in text:
        reason = text.partition("cannot open shared object file: ")[2]
        if "/" in module:
            return f"cannot open it ({reason})"
        return f"the dynamic loader finds no such library ({reason})"
    if not text:
        # A PKCS#11 return value from C_Initialize, which python-pkcs11
        # raises as an exception of its own name, without words.
        return f"its C_Initialize failed ({type(error).__name__})"
    return text


# What PKCS#11 answers when the token left the reader under our session.
_REMOVED = (
    p11errors.DeviceRemoved,
    p11errors.TokenNotPresent,
    p11errors.SessionHandleInvalid,
    p11errors.SessionClosed,
    p11errors.DeviceError,
)


class Pkcs11Backend:
    """
    A CPS card, or a SoftHSM2 token made like one, through a PKCS#11 module.
    It keeps one session, logged in, for as long as the card stays unlocked.
    """

    def __init__(
        self,
        module: str,
        token_label: str | None = None,
        intermediates: Sequence[x509.Certificate] = (),
        environment: Mapping[str, str] | None = None,
    ) -> None:
        self.module = module
        self.token_label = token_label
        self._environment = dict(environment or {})
        self.description = (
            f"PKCS#11 token {token_label or '(first present)'} in {module}"
        )
        self._intermediates = list(intermediates)
        self._session: pkcs11.Session | None = None
        self._slot: Any = None
        self._keys: dict[
            KeyUsage, tuple[pkcs11.PrivateKey, list[x509.Certificate]]
        ] = {}

    def library(self) -> Any:
        """
        Load and initialise the module, with C{environment} set for the time
        of its C_Initialize only (SoftHSM2 reads SOFTHSM2_CONF then).
        """
        saved = {name: os.environ.get(name) for name in self._environment}
        os.environ.update(self._environment)
        try:
            return pkcs11.lib(self.module)
        except (p11errors.PKCS11Error, OSError) as e:
            raise NoCard(
                f"cannot load the PKCS#11 module {self.module}: "
                + _load_problem(self.module, e)
            ) from e
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def load(self) -> None:
        self.library()

    def _token(self) -> Any:
        lib = self.library()
        try:
            if self.token_label:
                return lib.get_token(token_label=self.token_label)
            for slot in lib.get_slots(token_present=True):
                return slot.get_token()
        except p11errors.NoSuchToken:
            pass
        except p11errors.TokenNotPresent:
            pass
        except p11errors.PKCS11Error as e:
            raise CardFault(e) from e
        which = f"labelled {self.token_label!r} " if self.token_label else ""
        raise NoCard(f"no card {which}in the reader: insert the CPS card")

    def _drop_session(self) -> None:
        session, self._session = self._session, None
        self._keys.clear()
        if session is not None:
            try:
                session.close()
            except p11errors.PKCS11Error:
                pass

    def login(self, pin: str) -> None:
        self._drop_session()
        token = self._token()
        if token.flags & pkcs11.TokenFlag.USER_PIN_LOCKED:
            raise PinBlocked()
        try:
            # python-pkcs11 opens the session and logs in as one call; when
            # the login fails, the session it opened stays open (not logged
            # in) until the module is finalised, one per refused PIN.
            self._session = token.open(user_pin=pin)
            self._slot = token.slot
        except p11errors.PinIncorrect:
            flags = self._fresh_flags(token)
            if flags & pkcs11.TokenFlag.USER_PIN_LOCKED:
                raise PinBlocked() from None
            final = bool(flags & pkcs11.TokenFlag.USER_PIN_FINAL_TRY)
            count_low = bool(flags & pkcs11.TokenFlag.USER_PIN_COUNT_LOW)
            raise WrongPin(1 if final else None, count_low) from None
        except (p11errors.PinLenRange, p11errors.PinInvalid):
            raise WrongPin(None) from None
        except p11errors.PinLocked:
            raise PinBlocked() from None
        except _REMOVED as e:
            raise NoCard(f"the card left the reader during login ({e!r})") from e
        except p11errors.PKCS11Error as e:
            self._drop_session()
            raise CardFault(e) from e
        _log.info("card unlocked: {description}", description=self.description)

    def pin_final_try(self) -> bool:
        flags: pkcs11.TokenFlag = self._token().flags
        return bool(flags & pkcs11.TokenFlag.USER_PIN_FINAL_TRY)

    @staticmethod
    def _fresh_flags(token: Any) -> pkcs11.TokenFlag:
        try:
            flags: pkcs11.TokenFlag = token.slot.get_token().flags
            return flags
        except p11errors.PKCS11Error:
            return pkcs11.TokenFlag(0)

    def logout(self) -> None:
        self._drop_session()

    def check_present(self) -> None:
        if self._session is None:
            self._token()
            return
        try:
            self._slot.get_token()
        except (*_REMOVED, p11errors.NoSuchToken) as e:
            self._gone()
            raise CardRemoved() from e
        except p11errors.PKCS11Error as e:
            self._drop_session()
            raise CardFault(e) from e

    def _key(self, usage: KeyUsage) -> tuple[Any, list[x509.Certificate]]:
        if usage in self._keys:
            return self._keys[usage]
        if self._session is None:
            raise NotLoggedIn()
        session = self._session
        label = KEY_LABELS[usage]
        try:
            key = session.get_key(
                object_class=pkcs11.ObjectClass.PRIVATE_KEY, label=label
            )
            certificates = [
                x509.load_der_x509_certificate(obj[pkcs11.Attribute.VALUE])
                for obj in session.get_objects(
                    {pkcs11.Attribute.CLASS: pkcs11.ObjectClass.CERTIFICATE}
                )
            ]
            leaf_objects = list(
                session.get_objects(
                    {
                        pkcs11.Attribute.CLASS: pkcs11.ObjectClass.CERTIFICATE,
                        pkcs11.Attribute.ID: key.id,
                    }
                )
            )
        except p11errors.NoSuchKey:
            raise _key_missing(usage, f"no private key labelled {label}") from None
        except p11errors.UserNotLoggedIn:
            self._drop_session()
            raise NotLoggedIn() from None
        except _REMOVED as e:
            self._gone()
            raise CardRemoved() from e
        except p11errors.PKCS11Error as e:
            self._drop_session()
            raise CardFault(e) from e
        if not leaf_objects:
            raise _key_missing(usage, f"no certificate for its key {label}")
        leaf = x509.load_der_x509_certificate(leaf_objects[0][pkcs11.Attribute.VALUE])
        found: tuple[Any, list[x509.Certificate]] = (
            key,
            build_chain(leaf, certificates + self._intermediates),
        )
        self._keys[usage] = found
        return found

    def _gone(self) -> None:
        self._session = None
        self._keys.clear()

    def chain(self, usage: KeyUsage) -> list[x509.Certificate]:
        return list(self._key(usage)[1])

    def sign_digest(
        self, usage: KeyUsage, algorithm: Algorithm, digest: bytes
    ) -> bytes:
        key, _ = self._key(usage)
        try:
            # The card's way: CKM_RSA_PKCS over a DigestInfo we encode.
            signature: bytes = key.sign(
                algorithm.digest_info(digest), mechanism=pkcs11.Mechanism.RSA_PKCS
            )
        except p11errors.UserNotLoggedIn:
            self._drop_session()
            raise NotLoggedIn() from None
        except _REMOVED as e:
            self._gone()
            raise CardRemoved() from e
        except p11errors.PKCS11Error as e:
            self._drop_session()
            raise CardFault(e) from e
        return signature

    def close(self) -> None:
        self._drop_session()


# The OIDs a PKCS#12 file's authSafe content is (RFC 7292, section 4):
# PKCS#7 data or signedData, DER-encoded with their tag and length.
_PKCS7_CONTENT_TYPES = (
    bytes.fromhex("06092a864886f70d010701"),
    bytes.fromhex("06092a864886f70d010702"),
)


def _der_length(data: bytes, offset: int) -> tuple[int, int] | None:
    """
    @return: the length that starts at C{offset} of DER C{data} and the
        offset of the content after it, or C{None} if there is none.
    """
    if offset >= len(data):
        return None
    first = data[offset]
    if first < 0x80:
        return first, offset + 1
    size = first & 0x7F
    if not 1 <= size <= 4 or offset + 1 + size > len(data):
        return None
    return int.from_bytes(
        data[offset + 1 : offset + 1 + size], "big"
    ), offset + 1 + size


def pkcs12_problem(data: bytes) -> str | None:
    """
    Tell, without the password, whether C{data} is shaped like a PKCS#12
    file: a DER PFX (RFC 7292, section 4) of version 3 whose authSafe is
    PKCS#7 data or signedData. C{cryptography} cannot tell a wrong password
    from a file that is not PKCS#12 at all.

    @return: C{None} if it is, else what it is instead.
    """
    if data.lstrip().startswith(b"-----BEGIN"):
        return "a PEM file, not PKCS#12 (a soft card is a .p12 file)"
    outer = _der_length(data, 1) if data[:1] == b"\x30" else None
    if outer is not None and outer[0] + outer[1] == len(data):
        start = outer[1]
        version = data[start : start + 3]
        content = (
            _der_length(data, start + 4)
            if data[start + 3 : start + 4] == b"\x30"
            else None
        )
        if version == b"\x02\x01\x03" and content is not None:
            kind = data[content[1] : content[1] + 11]
            if kind in _PKCS7_CONTENT_TYPES:
                return None
    return "not a PKCS#12 file"


class SoftCardBackend:
    """
    A card made of PKCS#12 files (one per key, each with its chain), unlocked
    by their password as PIN: for machines without a PKCS#11 token.
    """

    def __init__(
        self,
        authentication: Path,
        signature: Path | None = None,
        intermediates: Sequence[x509.Certificate] = (),
    ) -> None:
        self._files = {KeyUsage.authentication: authentication}
        if signature is not None:
            self._files[KeyUsage.signature] = signature
        self._intermediates = list(intermediates)
        self.description = f"soft card {authentication}"
        self.has_signature_key = signature is not None
        self._keys: dict[
            KeyUsage, tuple[rsa.RSAPrivateKey, list[x509.Certificate]]
        ] = {}

    def load(self) -> None:
        """
        Nothing to load: the files are read at each PIN.
        """

    def login(self, pin: str) -> None:
        self._keys.clear()
        keys = {}
        for usage, path in self._files.items():
            try:
                data = path.read_bytes()
            except OSError as e:
                raise NoCard(f"cannot read the soft card {path}: {e.strerror}") from e
            problem = pkcs12_problem(data)
            if problem is not None:
                # Not a wrong PIN: the PIN was never tried.
                raise NoCard(f"the soft card {path} is {problem}")
            try:
                key, leaf, extra = pkcs12.load_key_and_certificates(data, pin.encode())
            except ValueError:
                raise WrongPin(None) from None
            if not isinstance(key, rsa.RSAPrivateKey) or leaf is None:
                raise KeyNotFound(
                    f"the soft card {path} holds no RSA key and certificate"
                )
            keys[usage] = (key, build_chain(leaf, list(extra) + self._intermediates))
        self._keys = keys

    def pin_final_try(self) -> bool:
        """
        A PKCS#12 file has no try counter: it never blocks.
        """
        return False

    def logout(self) -> None:
        self._keys.clear()

    def check_present(self) -> None:
        path = self._files[KeyUsage.authentication]
        if not path.is_file():
            self._keys.clear()
            raise NoCard(f"the soft card {path} is gone")

    def _key(self, usage: KeyUsage) -> tuple[rsa.RSAPrivateKey, list[x509.Certificate]]:
        if not self._keys:
            raise NotLoggedIn()
        try:
            return self._keys[usage]
        except KeyError:
            raise _key_missing(
                usage, "the soft card was given no PKCS#12 file for it"
            ) from None

    def chain(self, usage: KeyUsage) -> list[x509.Certificate]:
        return list(self._key(usage)[1])

    def sign_digest(
        self, usage: KeyUsage, algorithm: Algorithm, digest: bytes
    ) -> bytes:
        key, _ = self._key(usage)
        return key.sign(digest, padding.PKCS1v15(), utils.Prehashed(algorithm.hash()))

    def close(self) -> None:
        self._keys.clear()
