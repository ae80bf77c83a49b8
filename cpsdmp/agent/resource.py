"""
The agent's REST face: open a session with the PIN, read the card's
certificates and have its keys sign, every call but the first carrying the
session's bearer token. Errors are RFC 9457 problem documents.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import hmac
import json
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import IO, Any, Protocol, cast

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from cpsdmp.agent import problems
from cpsdmp.agent.audit import (
    DEFAULT_RATE_LIMIT,
    AuditLog,
    RateLimit,
    RateLimiter,
    context_id,
)
from cpsdmp.agent.card import (
    KEY_LABELS,
    Algorithm,
    CardError,
    CardFault,
    CardRemoved,
    CardTimeout,
    KeyNotFound,
    KeyUsage,
    LastTry,
    NoCard,
    NoSignatureKey,
    NotLoggedIn,
    PinBlocked,
    UnknownAlgorithm,
    WrongPin,
    algorithm_named,
)
from cpsdmp.agent.holder import Holder
from cpsdmp.agent.policy import PolicyDecision, SigningPolicy
from cpsdmp.agent.tokens import TokenStore, is_token_shaped
from cpsdmp.protocols import strictjson
from cpsdmp.protocols.httpserver import (
    IDLE_TIMEOUT,
    HeaderLimitChannel,
    closing_answer,
    peer_name,
    reason_phrase,
)
from cpsdmp.xds.signature import SignatureRequestRefused, to_be_signed

_log = Logger()

# The largest request body the agent reads; larger ones are refused from
# their announced length, before their body is read.
MAX_BODY = 64 * 1024

# PIN lengths PKCS#11 tokens accept; a CPS card's PIN is 4 digits.
MIN_PIN_LENGTH = 4
MAX_PIN_LENGTH = 16

# Seconds during which, after a wrong PIN, the agent refuses to try another:
# a local program cannot run through the card's few tries, nor guess a soft
# card's PIN at the card's speed. The pause doubles with each wrong PIN in a
# row, up to MAX_WRONG_PIN_PAUSE (or the pause itself, if longer).
WRONG_PIN_PAUSE = 5.0
MAX_WRONG_PIN_PAUSE = 300.0


class Request(Protocol):
    """
    The parts of L{twisted.web.server.Request} the resource uses (twisted.web
    carries no annotations of its own).
    """

    method: bytes
    postpath: list[bytes] | None
    content: IO[bytes] | None
    finished: int
    _disconnected: bool

    def getHeader(self, key: bytes) -> bytes | None: ...

    def setHeader(self, name: bytes, value: bytes) -> None: ...

    def setResponseCode(self, code: int, message: bytes | None = None) -> None: ...

    def write(self, data: bytes) -> None: ...

    def finish(self) -> None: ...

    def getClientAddress(self) -> Any: ...


class ICardLike(Protocol):
    """
    What the resource needs from a card (see L{cpsdmp.agent.card.WorkerCard}).
    """

    def login(self, pin: str, last_try: bool = False) -> Deferred[None]: ...

    def logout(self) -> Deferred[None]: ...

    def chain(self, usage: KeyUsage) -> Deferred[list[x509.Certificate]]: ...

    def holder(self) -> Deferred[Holder]: ...

    def check_present(self) -> Deferred[None]: ...

    def when_idle(self) -> Deferred[None]: ...

    def sign(
        self, usage: KeyUsage, algorithm: Algorithm, data: bytes
    ) -> Deferred[tuple[bytes, float]]: ...


class Problem(Exception):
    """
    An answer other than success, rendered as a problem document.
    """

    def __init__(
        self,
        status: int,
        type: str,
        title: str,
        detail: str,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.type = type
        self.title = title
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra

    def document(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            **self.extra,
        }


def check_pin_format(pin: str) -> None:
    """
    Refuse a PIN that no card could accept before it reaches the card, where
    it would cost one of the few tries left.

    @raise Problem: 400, saying the card was not asked.
    """
    if not (MIN_PIN_LENGTH <= len(pin) <= MAX_PIN_LENGTH) or not all(
        "!" <= c <= "~" for c in pin
    ):
        raise Problem(
            400,
            problems.BAD_REQUEST,
            "Malformed PIN",
            f"a PIN is {MIN_PIN_LENGTH} to {MAX_PIN_LENGTH} ASCII characters "
            "without spaces (a CPS card's PIN is 4 digits); the card was not asked",
        )


_BEARER_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="cpsagent"'}


def _card_problem(error: CardError) -> Problem:
    if isinstance(error, WrongPin):
        detail = str(error)
        if error.tries_left == 1:
            detail += (
                "; the agent presents the next PIN only if the request says "
                '"lastTry": true, once the professional knows that a wrong '
                "one blocks the card"
            )
        return Problem(
            401,
            problems.WRONG_PIN,
            "Wrong PIN",
            detail,
            triesLeft=error.tries_left,
        )
    if isinstance(error, LastTry):
        return Problem(
            409,
            problems.PIN_LAST_TRY,
            "One try left before the card blocks",
            str(error),
            triesLeft=1,
        )
    if isinstance(error, PinBlocked):
        return Problem(423, problems.PIN_BLOCKED, "PIN blocked", str(error))
    if isinstance(error, CardRemoved):
        return Problem(503, problems.CARD_REMOVED, "Card removed", str(error))
    if isinstance(error, NoCard):
        return Problem(503, problems.NO_CARD, "No card", str(error))
    if isinstance(error, NotLoggedIn):
        return Problem(
            401, problems.CARD_LOCKED, "Card locked", str(error), _BEARER_CHALLENGE
        )
    if isinstance(error, CardFault):
        return Problem(503, problems.CARD_FAULT, "Card error", str(error))
    if isinstance(error, CardTimeout):
        return Problem(503, problems.CARD_TIMEOUT, "Card timeout", str(error))
    if isinstance(error, NoSignatureKey):
        return Problem(
            409, problems.NO_SIGNATURE_KEY, "No signature key on the card", str(error)
        )
    if isinstance(error, KeyNotFound):
        return Problem(503, problems.KEY_NOT_FOUND, "Key not on the card", str(error))
    return Problem(503, problems.NO_CARD, "Card unavailable", str(error))


def _set_status(request: Request, code: int) -> None:
    request.setResponseCode(code, reason_phrase(code))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _rfc3339(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(int(seconds), datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


Handler = Callable[[Request, list[str]], Awaitable[Any]]


class AgentResource(Resource):
    """
    The whole C{/cps} tree. C{url} and C{tls_fingerprint} go into every agent
    context; the service sets them once it listens.

    Every signature goes through C{policy} (C{None} turns the checks off,
    for development only), C{rate_limit} per session (C{None}: unlimited)
    and, when given, the C{audit} log.
    """

    isLeaf = True

    def __init__(
        self,
        card: ICardLike,
        clock: IReactorTime,
        session_idle: float = 900.0,
        allow_origin: str | None = None,
        *,
        wrong_pin_pause: float = WRONG_PIN_PAUSE,
        policy: SigningPolicy | None,
        rate_limit: RateLimit | None = DEFAULT_RATE_LIMIT,
        audit: AuditLog | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.card = card
        self.clock = clock
        self.wrong_pin_pause = wrong_pin_pause
        self._wrong_pins = 0
        self._pin_pause = wrong_pin_pause
        self._pin_retry_at = 0.0
        self._checking_pin = False
        # The HMAC of the PIN that unlocked the card, under a key of this
        # process only, kept while sessions are open: a PIN sent then is
        # compared with it, and never reaches the card. The PIN itself is
        # never kept.
        self._pin_key = secrets.token_bytes(32)
        self._pin_mac: bytes | None = None
        self.tokens = TokenStore(clock, session_idle)
        self.allow_origin = allow_origin
        self.policy = policy
        self.limiter = RateLimiter(rate_limit, clock) if rate_limit else None
        self.audit = audit
        # The card's chains, read once per session: the authentication one
        # in DER, as transcripts carry it.
        self._card_chain: list[bytes] | None = None
        self._card_signature_chain: list[x509.Certificate] | None = None
        self.url = ""
        self.tls_fingerprint = ""
        self._routes: dict[tuple[bytes, str], tuple[Handler, bool]] = {
            (b"POST", "session"): (self._open_session, False),
            (b"DELETE", "session"): (self._lock, True),
            (b"GET", "card"): (self._card, True),
            (b"GET", "authenticationCertificate"): (self._authentication_chain, True),
            (b"GET", "signatureCertificate"): (self._signature_chain, True),
            (b"POST", "sign"): (self._sign, True),
        }

    def watch_card(self) -> Deferred[None]:
        """
        Ask whether the card is still in the reader; if it left, end every
        session at once rather than at the next call.

        @return: a Deferred that fires with C{None} once checked.
        """
        return Deferred.fromCoroutine(self._watch_card())

    async def _watch_card(self) -> None:
        try:
            await self.card.check_present()
        except (CardRemoved, NoCard):
            self._end_sessions("the card is out of the reader")
        except CardError as error:
            # The card dropped its session with the error: so do the tokens.
            self._end_sessions(f"the card check failed: {error}")
        except Exception:
            _log.failure("could not check that the card is in the reader")

    # Dispatch

    def render(self, request: http.Request) -> int:
        exchange = cast(Request, request)
        d = ensureDeferred(self._answer(exchange))
        d.addErrback(self._internal_error, exchange)
        return server.NOT_DONE_YET

    async def _answer(self, request: Request) -> None:
        try:
            self._check_origin(request)
            if request.method == b"OPTIONS":
                self._preflight(request)
                return
            segments = [s.decode("utf-8", "replace") for s in request.postpath or []]
            if len(segments) < 2 or segments[0] != "cps":
                raise Problem(404, problems.NOT_FOUND, "Not found", "no such endpoint")
            route = self._routes.get((request.method, segments[1]))
            if route is None:
                allowed = sorted(
                    method.decode()
                    for method, name in self._routes
                    if name == segments[1]
                )
                if allowed:
                    raise Problem(
                        405,
                        problems.METHOD_NOT_ALLOWED,
                        "Method not allowed",
                        f"{request.method.decode()} is not allowed on this "
                        f"endpoint; use {', '.join(allowed)}",
                        {"Allow": ", ".join(allowed)},
                    )
                raise Problem(404, problems.NOT_FOUND, "Not found", "no such endpoint")
            handler, needs_token = route
            if needs_token:
                self._authorize(request)
            await handler(request, segments[2:])
        except Problem as problem:
            self._write_problem(request, problem)
        except CardError as error:
            if isinstance(
                error, (CardRemoved, CardFault, NoCard, NotLoggedIn, PinBlocked)
            ):
                self._end_sessions(f"the card answered: {error}")
            self._write_problem(request, _card_problem(error))

    def _end_sessions(self, why: str) -> None:
        """
        End every session, and forget the PIN that unlocked the card: the
        next PIN goes to the card.
        """
        count = len(self.tokens)
        self.tokens.drop_all()
        self._pin_mac = None
        self._card_chain = None
        self._card_signature_chain = None
        if count:
            _log.warn(
                "security: all sessions ended ({count} open): {why}",
                count=count,
                why=why,
            )

    def _internal_error(self, failure: Failure, request: Request) -> None:
        """
        Log a bug and answer 500 rather than leave the caller waiting.
        """
        _log.failure("the agent failed to answer", failure)
        if not request.finished and not request._disconnected:
            self._write_problem(
                request,
                Problem(500, problems.INTERNAL, "Agent error", "see the agent's log"),
            )

    # CORS

    def _check_origin(self, request: Request) -> None:
        origin = request.getHeader(b"origin")
        if origin is None:
            return
        if self.allow_origin is None or origin.decode("latin-1") != self.allow_origin:
            raise Problem(
                403,
                problems.FORBIDDEN_ORIGIN,
                "Origin not allowed",
                "the agent answers only the origin it was started with "
                "(--allow-origin)",
            )
        request.setHeader(b"Access-Control-Allow-Origin", origin)
        request.setHeader(b"Vary", b"Origin")

    def _preflight(self, request: Request) -> None:
        if request.getHeader(b"origin") is None:
            raise Problem(
                405,
                problems.METHOD_NOT_ALLOWED,
                "Method not allowed",
                "not a preflight",
            )
        _set_status(request, 204)
        request.setHeader(
            b"Access-Control-Allow-Methods", b"GET, POST, DELETE, OPTIONS"
        )
        request.setHeader(
            b"Access-Control-Allow-Headers", b"Authorization, Content-Type, Accept"
        )
        request.setHeader(b"Access-Control-Max-Age", b"600")
        if request.getHeader(b"access-control-request-private-network") == b"true":
            request.setHeader(b"Access-Control-Allow-Private-Network", b"true")
        request.finish()

    # Tokens

    def _authorize(self, request: Request) -> None:
        header = request.getHeader(b"authorization")
        scheme, _, token = (header or b"").decode("latin-1").partition(" ")
        if header is None or scheme.lower() != "bearer" or not token.strip():
            raise Problem(
                401,
                problems.TOKEN_MISSING,
                "Token missing",
                "this call needs the agent context's token in an "
                "'Authorization: Bearer' header",
                _BEARER_CHALLENGE,
            )
        if not is_token_shaped(token.strip()):
            raise Problem(
                401,
                problems.TOKEN_EXPIRED,
                "Token expired",
                "this is not a token of this agent (a token is 43 characters: "
                "letters, digits, '-' and '_'): take the token of the agent "
                "context, or enter the PIN again for a new one",
                {"WWW-Authenticate": 'Bearer realm="cpsagent", error="invalid_token"'},
            )
        if not self.tokens.check(token.strip()):
            raise Problem(
                401,
                problems.TOKEN_EXPIRED,
                "Token expired",
                "the token is expired or unknown (the card was locked, removed or "
                "the agent restarted): enter the PIN again",
                {"WWW-Authenticate": 'Bearer realm="cpsagent", error="invalid_token"'},
            )

    # Bodies

    def _json_body(self, request: Request) -> dict[str, Any]:
        assert request.content is not None
        raw = request.content.read()
        try:
            body = strictjson.loads(raw)
        except strictjson.JsonRefused as error:
            raise Problem(
                400, problems.BAD_REQUEST, "Bad JSON", f"the body {error}"
            ) from None
        if not isinstance(body, dict):
            raise Problem(
                400, problems.BAD_REQUEST, "Bad JSON", "the body must be a JSON object"
            )
        return body

    @staticmethod
    def _only_members(body: dict[str, Any], *names: str) -> None:
        """
        Refuse a body with a member this endpoint does not know: a misspelt
        option must not be silently ignored.
        """
        unknown = sorted(set(body) - set(names))
        if unknown:
            known = ", ".join(repr(n) for n in names)
            raise Problem(
                400,
                problems.BAD_REQUEST,
                "Bad request",
                f"unknown member {unknown[0]!r} in the body (it takes {known})",
            )

    @staticmethod
    def _string_member(body: dict[str, Any], name: str) -> str:
        value = body.get(name)
        if not isinstance(value, str):
            raise Problem(
                400,
                problems.BAD_REQUEST,
                "Bad request",
                f"the body needs a string member {name!r}",
            )
        return value

    @staticmethod
    def _content_type(request: Request) -> str:
        value = request.getHeader(b"content-type") or b"application/json"
        return value.decode("latin-1").split(";")[0].strip().lower()

    @staticmethod
    def _wants_raw(request: Request) -> bool:
        accept = (request.getHeader(b"accept") or b"").decode("latin-1").lower()
        return "application/octet-stream" in accept and "json" not in accept

    @staticmethod
    def _accepts_json(request: Request) -> bool:
        accept = (request.getHeader(b"accept") or b"").decode("latin-1").lower()
        return "json" in accept

    def _write_json(
        self, request: Request, body: dict[str, Any], code: int = 200
    ) -> None:
        if request._disconnected:
            return  # the caller gave up; the card's work is done anyway
        payload = json.dumps(body).encode()
        _set_status(request, code)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Content-Length", str(len(payload)).encode())
        request.write(payload)
        request.finish()

    def _write_problem(self, request: Request, problem: Problem) -> None:
        if request.finished or request._disconnected:
            return
        payload = json.dumps(problem.document()).encode()
        _set_status(request, problem.status)
        request.setHeader(b"Content-Type", problems.CONTENT_TYPE.encode())
        request.setHeader(b"Cache-Control", b"no-store")
        for name, value in problem.headers.items():
            request.setHeader(name.encode(), value.encode())
        request.setHeader(b"Content-Length", str(len(payload)).encode())
        request.write(payload)
        request.finish()

    # Endpoints

    async def _open_session(self, request: Request, rest: list[str]) -> None:
        if rest:
            raise Problem(404, problems.NOT_FOUND, "Not found", "no such endpoint")
        body = self._json_body(request)
        self._only_members(body, "pin", "lastTry")
        pin = self._string_member(body, "pin")
        last_try = body.get("lastTry", False)
        if not isinstance(last_try, bool):
            raise Problem(
                400,
                problems.BAD_REQUEST,
                "Bad request",
                "'lastTry' is true or false: true once the professional knows "
                "that a wrong PIN blocks the card; the card was not asked",
            )
        check_pin_format(pin)
        wait = self._pin_retry_at - self.clock.seconds()
        if wait > 0:
            seconds = math.ceil(wait)
            after = (
                "a wrong PIN"
                if self._wrong_pins <= 1
                else f"{self._wrong_pins} wrong PINs in a row"
            )
            raise Problem(
                429,
                problems.PIN_PAUSE,
                "Too soon after a wrong PIN",
                f"after {after} the agent accepts the next one only after "
                f"{self._pin_pause:g} s; try again in {seconds} s (the card "
                "was not asked)",
                {"Retry-After": str(seconds)},
                retryAfter=seconds,
            )
        if self._checking_pin:
            # PINs sent at once would all reach the card before the pause
            # after a wrong one could apply.
            raise Problem(
                429,
                problems.PIN_PAUSE,
                "Another PIN is being checked",
                "the card is checking another PIN; try again in 1 s (the card "
                "was not asked)",
                {"Retry-After": "1"},
                retryAfter=1,
            )
        caller = peer_name(request.getClientAddress())
        if self._pin_mac is not None and not len(self.tokens):
            # The sessions lapsed: the card is asked again.
            self._pin_mac = None
        if self._pin_mac is not None:
            await self._open_another_session(request, pin, caller)
            return
        self._checking_pin = True
        checked = True
        try:
            await self.card.login(pin, last_try)
        except LastTry:
            _log.warn(
                "security: a PIN from {caller} was not presented: the card has "
                "one try left, and the request did not say lastTry",
                caller=caller,
            )
            raise
        except WrongPin as error:
            self._pause_after_wrong_pin()
            _log.warn(
                "security: wrong PIN from {caller}, checked by the card; "
                "tries left: {tries_left}",
                caller=caller,
                tries_left="unknown" if error.tries_left is None else error.tries_left,
            )
            # The card dropped its session to check this PIN.
            self._end_sessions(f"a wrong PIN from {caller} locked the card")
            raise
        except PinBlocked:
            _log.warn(
                "security: the card's PIN is blocked (PIN from {caller})", caller=caller
            )
            self._end_sessions("the card's PIN is blocked")
            raise
        except NoCard as error:
            # The card is locked now: no earlier token may use it.
            self._end_sessions(f"no card: {error}")
            raise
        except CardTimeout:
            # The card may still be checking this PIN: no other PIN reaches
            # it until it is done, and then only after the pause, as after
            # a wrong one.
            self._end_sessions("the card did not answer a PIN in time")
            checked = False
            self.card.when_idle().addCallback(self._pin_check_ended)
            raise
        finally:
            if checked:
                self._checking_pin = False
        self._wrong_pins = 0
        self._card_chain = None
        self._card_signature_chain = None
        self._pin_mac = self._mac(pin)
        self._issue(request, caller)

    async def _open_another_session(
        self, request: Request, pin: str, caller: str
    ) -> None:
        """
        Open one more session on the card an earlier PIN unlocked, if C{pin}
        is that PIN, without presenting it to the card: a wrong one neither
        costs a try nor locks the card under the sessions already open.

        @raise Problem: 401 for another PIN.
        """
        known = self._pin_mac
        assert known is not None
        if not hmac.compare_digest(self._mac(pin), known):
            self._pause_after_wrong_pin()
            _log.warn(
                "security: wrong PIN from {caller}, not the one that unlocked "
                "the card: the card was not asked; tries left: unknown",
                caller=caller,
            )
            raise Problem(
                401,
                problems.WRONG_PIN,
                "Wrong PIN",
                "wrong PIN: it is not the PIN that unlocked the card; the card "
                "was not asked, so it does not tell how many tries remain, and "
                "the sessions open stay open",
                triesLeft=None,
            )
        # The card is still in the reader, or the sessions end here.
        await self.card.check_present()
        if self._pin_mac is None:
            # The card was locked while it was checked.
            raise NotLoggedIn()
        self._wrong_pins = 0
        self._issue(request, caller)

    def _mac(self, pin: str) -> bytes:
        return hmac.new(self._pin_key, pin.encode(), hashlib.sha256).digest()

    def _issue(self, request: Request, caller: str) -> None:
        token, expires = self.tokens.issue()
        _log.info("session opened for {caller}", caller=caller)
        self._write_json(
            request,
            {
                "url": self.url,
                "token": token,
                "tlsFingerprint": self.tls_fingerprint,
                "expires": _rfc3339(expires),
            },
            201,
        )

    def _pin_check_ended(self, _: object) -> None:
        self._checking_pin = False
        self._pause_after_wrong_pin()

    def _pause_after_wrong_pin(self) -> None:
        """
        Count one more wrong PIN in a row, and take no other PIN for the
        pause that follows it: L{wrong_pin_pause}, doubled for each wrong
        PIN in a row before it, at most L{MAX_WRONG_PIN_PAUSE} (or
        L{wrong_pin_pause}, if longer).
        """
        self._wrong_pins += 1
        doubled = self.wrong_pin_pause * 2.0 ** min(self._wrong_pins - 1, 32)
        self._pin_pause = min(doubled, max(self.wrong_pin_pause, MAX_WRONG_PIN_PAUSE))
        self._pin_retry_at = self.clock.seconds() + self._pin_pause

    async def _lock(self, request: Request, rest: list[str]) -> None:
        caller = peer_name(request.getClientAddress())
        self._end_sessions(f"card locked by {caller}")
        await self.card.logout()
        _log.info("card locked by {caller}", caller=caller)
        if not request._disconnected:
            _set_status(request, 204)
            request.finish()

    async def _card(self, request: Request, rest: list[str]) -> None:
        holder = await self.card.holder()
        self._write_json(
            request,
            {
                "present": True,
                "holder": {
                    "id": holder.id,
                    "name": holder.name,
                    "profession": holder.profession,
                },
            },
        )

    async def _chain(self, request: Request, usage: KeyUsage) -> None:
        chain = await self.card.chain(usage)
        self._write_json(
            request,
            {
                "certificate": _b64(chain[0].public_bytes(Encoding.DER)),
                "chain": [_b64(c.public_bytes(Encoding.DER)) for c in chain[1:]],
            },
        )

    async def _authentication_chain(self, request: Request, rest: list[str]) -> None:
        await self._chain(request, KeyUsage.authentication)

    async def _signature_chain(self, request: Request, rest: list[str]) -> None:
        await self._chain(request, KeyUsage.signature)

    async def _sign(self, request: Request, rest: list[str]) -> None:
        if (
            len(rest) != 3
            or rest[0] != "for"
            or rest[1] not in ("authentication", "signature")
        ):
            raise Problem(404, problems.NOT_FOUND, "Not found", "no such endpoint")
        usage = KeyUsage(rest[1])
        record = _AuditRecord(
            self,
            context=self._context(request),
            usage=usage.value,
            algorithm=_loggable(rest[2]),
            caller=peer_name(request.getClientAddress()),
        )
        try:
            await self._sign_with(request, usage, rest[2], record)
        except Problem as problem:
            record.write(outcome="refused", reason=problem.detail)
            raise
        except CardError as error:
            record.write(outcome="error", reason=str(error))
            raise
        except Exception as error:
            record.write(outcome="error", reason=type(error).__name__)
            raise

    async def _sign_with(
        self, request: Request, usage: KeyUsage, name: str, record: _AuditRecord
    ) -> None:
        """
        Check, sign and answer one signature request; every way out leaves
        one line in C{record}.
        """
        caller, context = record.fields["caller"], record.fields["context"]
        if self.limiter is not None:
            wait = self.limiter.take(context)
            if wait is not None:
                reason = f"more than {self.limiter.limit}"
                _log.warn(
                    "security: signature refused to {caller} (context {context}): "
                    "{reason} for this session",
                    caller=caller,
                    context=context,
                    reason=reason,
                )
                seconds = max(1, math.ceil(wait))
                record.write(outcome="refused", reason="rate limit: " + reason)
                raise Problem(
                    429,
                    problems.RATE_LIMITED,
                    "Too many signatures",
                    f"this session asked for {reason}; try again in {seconds} s",
                    {"Retry-After": str(seconds)},
                    retryAfter=seconds,
                )
        try:
            algorithm = algorithm_named(name)
        except UnknownAlgorithm as e:
            raise Problem(
                400, problems.UNKNOWN_ALGORITHM, "Unknown algorithm", str(e)
            ) from None

        raw_request = self._content_type(request) == "application/octet-stream"
        if raw_request:
            assert request.content is not None
            data = request.content.read()
        else:
            body = self._json_body(request)
            self._only_members(body, "data")
            encoded = self._string_member(body, "data")
            try:
                data = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise Problem(
                    400,
                    problems.BAD_REQUEST,
                    "Bad base64",
                    "'data' is not valid base64",
                ) from None

        decision = await self._decide(usage, algorithm.name, data)
        record.subject = decision.subject
        if not decision.allowed:
            _log.warn(
                "security: signature with the {usage} key refused to {caller} "
                "(context {context}): {reason}",
                usage=usage.value,
                caller=caller,
                context=context,
                reason=decision.reason,
            )
            record.write(outcome="refused", reason=decision.reason)
            raise Problem(
                403,
                problems.POLICY_REFUSED,
                "Signature refused",
                f"the card's {usage.value} key does not sign this: {decision.reason}",
            )
        if self.audit is not None and self.audit.failing:
            raise _audit_unavailable()

        started = time.perf_counter()
        signature, card_seconds = await self.card.sign(
            usage, algorithm, decision.payload
        )
        if not record.write(outcome="signed", **decision.details):
            # Nothing the card signed leaves the agent without its line.
            raise _audit_unavailable()
        if self.policy is None:
            _log.warn(
                "INSECURE: the card signed {length} bytes with the {usage} key "
                "without any check (--insecure-sign-anything)",
                length=len(decision.payload),
                usage=usage.value,
            )
        _log.info(
            "signed {length} bytes with {algorithm} by key {key} for {caller} "
            "in {duration_ms} ms (card {card_ms} ms)",
            length=len(decision.payload),
            algorithm=algorithm.name,
            key=KEY_LABELS[usage],
            caller=peer_name(request.getClientAddress()),
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
            card_ms=round(card_seconds * 1000, 2),
        )
        if request._disconnected:
            return
        if self._wants_raw(request) or (
            raw_request and not self._accepts_json(request)
        ):
            request.setHeader(b"Content-Type", b"application/octet-stream")
            request.setHeader(b"Cache-Control", b"no-store")
            request.setHeader(b"Content-Length", str(len(signature)).encode())
            request.write(signature)
            request.finish()
        else:
            self._write_json(
                request, {"signature": _b64(signature), "algorithm": algorithm.name}
            )

    # Signing policy

    @staticmethod
    def _context(request: Request) -> str:
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        return context_id(header.partition(" ")[2].strip())

    async def _decide(
        self, usage: KeyUsage, algorithm: str, data: bytes
    ) -> PolicyDecision:
        if self.policy is None:
            return PolicyDecision.allow("unchecked", _payload(usage, data))
        if usage is KeyUsage.signature:
            if self._card_signature_chain is None:
                chain = await self.card.chain(KeyUsage.signature)
                self._card_signature_chain = chain
            return self.policy.check_signature(
                data, algorithm, self._card_signature_chain
            )
        if self._card_chain is None:
            chain = await self.card.chain(KeyUsage.authentication)
            self._card_chain = [c.public_bytes(Encoding.DER) for c in chain]
        return self.policy.check_authentication(data, self._card_chain, algorithm)


def _payload(usage: KeyUsage, data: bytes) -> bytes:
    """
    @return: what the card signs for C{data} without a policy: the data
        itself with the authentication key, the SignedInfo of a signature
        request with the signature key.
    @raise Problem: 400 for a signature request without a SignedInfo.
    """
    if usage is KeyUsage.authentication:
        return data
    try:
        return to_be_signed(data)
    except SignatureRequestRefused as e:
        raise Problem(
            400,
            problems.BAD_REQUEST,
            "Not a signature request",
            f"the signature key signs the SignedInfo of a signature request: {e}",
        ) from None


def _loggable(name: str) -> str:
    """
    @return: an algorithm name as the caller gave it, cut to a length an
        audit line can carry.
    """
    return name if len(name) <= 64 else name[:64] + "..."


def _audit_unavailable() -> Problem:
    return Problem(
        503,
        problems.AUDIT_UNAVAILABLE,
        "Audit log unavailable",
        "the agent cannot write its audit log, and it hands out no signature "
        "that is not on record: see the agent's log",
    )


class _AuditRecord:
    """
    The one audit line of one signature request, written at most once,
    whatever way the request ends.
    """

    def __init__(self, resource: AgentResource, **fields: str) -> None:
        self._audit = resource.audit
        self.fields = fields
        self.subject = ""
        self.written = False

    def write(self, *, outcome: str, reason: str = "", **details: Any) -> bool:
        """
        @return: whether the line is on record (or there is no audit log).
        """
        if self.written:
            return True
        self.written = True
        if self._audit is None:
            return True
        try:
            self._audit.record(
                outcome=outcome,
                reason=reason,
                subject=self.subject,
                **details,
                **self.fields,
            )
        except (OSError, ValueError):
            _log.failure("could not write the audit log {path}", path=self._audit.path)
            return False
        return True


# A refused body up to this size is drained before the connection closes, so
# that the caller reads the 413 rather than a connection reset; beyond it the
# connection closes at once.
_DRAIN_LIMIT = 1024 * 1024


class _LimitedRequest(server.Request):
    """
    A request that refuses a body over L{MAX_BODY} as soon as its length is
    known (or, when chunked, as soon as it grows past it): the 413 goes out
    at once and the rest of the body is discarded, never stored.
    """

    _refused = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_BODY:
            self._refuse(close_now=length > _DRAIN_LIMIT)
            return
        super().gotLength(length)  # type: ignore[no-untyped-call]

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._refused:
            if self._received > _DRAIN_LIMIT:
                self._close()
            return
        if self._received > MAX_BODY:
            self._refuse(close_now=False)
            return
        super().handleContentChunk(data)  # type: ignore[no-untyped-call]

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            self._close()
            return
        super().requestReceived(command, path, version)  # type: ignore[no-untyped-call]

    def _close(self) -> None:
        if self.channel is not None:
            self.channel.loseConnection()  # type: ignore[no-untyped-call]

    def _refuse(self, close_now: bool) -> None:
        self._refused = True
        problem = Problem(
            413,
            problems.BODY_TOO_LARGE,
            "Body too large",
            f"the agent accepts request bodies of at most {MAX_BODY} bytes",
        )
        site = getattr(self.channel, "site", None)
        allowed = getattr(getattr(site, "resource", None), "allow_origin", None)
        origin = self.getHeader(b"origin")
        headers: list[tuple[bytes, bytes]] = []
        if origin is not None and allowed is not None and origin == allowed.encode():
            headers.append((b"Access-Control-Allow-Origin", origin))
        assert self.channel is not None and self.channel.transport is not None
        self.channel.transport.write(_problem_answer(problem, headers))
        if close_now:
            self._close()


def _problem_answer(problem: Problem, headers: list[tuple[bytes, bytes]]) -> bytes:
    """
    @return: a whole HTTP/1.1 answer carrying C{problem}, that closes the
        connection, for what is refused before a request exists.
    """
    payload = json.dumps(problem.document()).encode()
    return closing_answer(problem.status, problems.CONTENT_TYPE, payload, headers)


class _AgentChannel(HeaderLimitChannel):
    """
    The agent's HTTP/1.1 connections: a header line too long to read (a
    bearer token of 100 KB) is answered 431 with a problem document.
    """

    def header_too_large(self) -> bytes:
        problem = Problem(
            431,
            problems.HEADER_TOO_LARGE,
            "Header too large",
            f"a request line or header of the agent's requests is at most "
            f"{self.MAX_LENGTH} bytes (a token is 43 characters)",
        )
        return _problem_answer(problem, [])


def agent_site(resource: AgentResource) -> server.Site:
    """
    @return: a site serving C{resource} at its root with the body and
        header limits, and the idle timeout of the project's servers
        (L{IDLE_TIMEOUT}).
    """
    site = server.Site(  # type: ignore[no-untyped-call]
        resource, requestFactory=_LimitedRequest, timeout=IDLE_TIMEOUT
    )
    # HTTP/1.1 only (no HTTP/2 is negotiated), so the plain channel serves.
    site.protocol = _AgentChannel  # type: ignore[method-assign,assignment]
    site.displayTracebacks = False
    return site
