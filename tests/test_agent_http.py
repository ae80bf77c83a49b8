"""
Tests of the agent over real HTTPS on the loopback, with the SoftHSM2 test
card behind it, through CpsAgentClient and through plain treq requests.
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
from collections.abc import Mapping
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pkcs11
import pkcs11.exceptions as p11errors
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import Clock, deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer
from zope.interface.verify import verifyObject

from cpsdmp.agent import problems
from cpsdmp.agent.card import ALGORITHMS, KeyUsage, Pkcs11Backend, SoftCardBackend
from cpsdmp.agent.client import (
    MAX_ANSWER_BYTES,
    MAX_HEAD_BYTES,
    MAX_QUOTED,
    AgentCertificateMismatch,
    AgentError,
    AgentUnreachable,
    CardRemoved,
    CardTimeout,
    CpsAgentClient,
    NoCard,
    NoSignatureKey,
    PinBlocked,
    PinLastTry,
    PinnedCertificatePolicy,
    PinPause,
    RateLimited,
    TokenExpired,
    WrongPin,
    open_session,
)
from cpsdmp.agent.pki import verify_card_chain
from cpsdmp.agent.tap import CARD_WATCH_INTERVAL
from cpsdmp.protocols.httpserver import peer_name
from cpsdmp.protocols.tls.interfaces import IRemoteKey
from cpsdmp.protocols.tls.schemes import SignatureScheme, verify_signature
from cpsdmp.xds.signature import to_be_signed
from tests.agent_support import (
    HostileAgent,
    RunningAgent,
    shared_testcard,
    signature_request,
    start_agent,
    token_backend,
)


def _verify(
    certificate: x509.Certificate, signature: bytes, data: bytes, name: str
) -> None:
    public_key = certificate.public_key()
    assert isinstance(public_key, rsa.RSAPublicKey)
    public_key.verify(signature, data, padding.PKCS1v15(), ALGORITHMS[name].hash())


@implementer(IBodyProducer)
class _UnknownLength:
    """
    A body whose length is not announced, so that it goes chunked.
    """

    length = UNKNOWN_LENGTH

    def __init__(self, body: bytes) -> None:
        self._body = body

    def startProducing(self, consumer: Any) -> Deferred[None]:
        for start in range(0, len(self._body), 8192):
            consumer.write(self._body[start : start + 8192])
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Collector(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        self.closed.callback(None)


class _Answer:
    def __init__(
        self, code: int, headers: Any, body: bytes, phrase: bytes = b""
    ) -> None:
        self.code = code
        self.headers = headers
        self.body = body
        self.phrase = phrase

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def json(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.body)
        return value


class AgentTestCase(TestCase):
    """
    An agent on the test card's token, and raw HTTPS requests to it.
    """

    clock: Clock | None = None
    allow_origin: str | None = None

    @inlineCallbacks
    def setUp(self) -> Any:
        self.testcard = shared_testcard()
        kwargs: dict[str, Any] = {"allow_origin": self.allow_origin}
        if self.clock is not None:
            kwargs["clock"] = self.clock
        self.agent: RunningAgent = yield start_agent(self, self.backend(), **kwargs)

    def backend(self) -> Any:
        return token_backend()

    def raw(self, agent: RunningAgent | None = None) -> HTTPClient:
        agent = agent or self.agent
        pool = HTTPConnectionPool(reactor, persistent=False)
        return HTTPClient(
            Agent(
                reactor,
                contextFactory=PinnedCertificatePolicy(agent.fingerprint),
                pool=pool,
            )
        )

    @inlineCallbacks
    def request(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        token: str | None = None,
    ) -> Any:
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        response = yield self.raw().request(
            method,
            self.agent.url + path,
            headers={k: [v] for k, v in all_headers.items()},
            data=body,
        )
        content = yield response.content()
        return _Answer(
            response.code, response.headers, content, response.original.phrase
        )

    @inlineCallbacks
    def session(self, pin: str | None = None) -> Any:
        context = yield open_session(
            self.agent.url, pin or self.testcard.pin, self.agent.fingerprint
        )
        return context

    @inlineCallbacks
    def client(self) -> Any:
        context = yield self.session()
        client = CpsAgentClient.from_context(context, timeout=20)
        self.addCleanup(client.close)
        return client

    def assertProblem(self, answer: _Answer, status: int, type: str) -> dict[str, Any]:
        self.assertEqual(answer.code, status, answer.body)
        self.assertEqual(answer.header("content-type"), "application/problem+json")
        document = answer.json()
        self.assertEqual(document["status"], status)
        self.assertEqual(document["type"], type)
        self.assertTrue(document["title"])
        self.assertTrue(document["detail"])
        return document


class SessionTests(AgentTestCase):
    @inlineCallbacks
    def test_context(self) -> Any:
        """
        The PIN opens a session whose context names this agent, its
        certificate and a 256-bit token.
        """
        context = yield self.session()
        self.assertEqual(set(context), {"url", "token", "tlsFingerprint", "expires"})
        self.assertEqual(context["url"], self.agent.url)
        self.assertTrue(context["url"].startswith("https://127.0.0.1:"))
        self.assertEqual(context["tlsFingerprint"], self.agent.fingerprint)
        self.assertEqual(len(base64.urlsafe_b64decode(context["token"] + "=")), 32)
        self.assertRegex(context["expires"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")

    @inlineCallbacks
    def test_card(self) -> Any:
        client = yield self.client()
        card = yield client.card()
        professional = self.testcard.professional
        self.assertEqual(
            card,
            {
                "present": True,
                "holder": {
                    "id": professional["id"],
                    "name": professional["name"],
                    "profession": professional["profession"],
                },
            },
        )

    @inlineCallbacks
    def test_wrong_pin(self) -> Any:
        """
        A wrong PIN sent while a session is open is 401, saying that the card
        was not asked and does not tell the tries left; the session stays
        open.
        """
        client = yield self.client()
        answer = yield self.request(
            "POST",
            "/cps/session",
            {"Content-Type": "application/json"},
            b'{"pin": "0000"}',
        )
        document = self.assertProblem(answer, 401, problems.WRONG_PIN)
        self.assertIn("triesLeft", document)
        self.assertIsNone(document["triesLeft"])
        self.assertIn("wrong PIN", document["detail"])
        self.assertIn("the card was not asked", document["detail"])
        yield client.card()

    @inlineCallbacks
    def test_malformed_pin_never_reaches_the_card(self) -> Any:
        """
        PINs no card could accept are 400 and cost no try: the right PIN
        works at once afterwards, with no pause.
        """
        for pin in ["", "12", "1" * 60000, "1234\u0000", "\uff11\uff12\uff13\uff14"]:
            body = json.dumps({"pin": pin}).encode()
            answer = yield self.request(
                "POST", "/cps/session", {"Content-Type": "application/json"}, body
            )
            document = self.assertProblem(answer, 400, problems.BAD_REQUEST)
            self.assertIn("the card was not asked", document["detail"])
        context = yield open_session(
            self.agent.url, self.testcard.pin, self.agent.fingerprint
        )
        self.assertIn("token", context)

    @inlineCallbacks
    def test_missing_token(self) -> Any:
        for path in ("/cps/card", "/cps/authenticationCertificate"):
            answer = yield self.request("GET", path)
            self.assertProblem(answer, 401, problems.TOKEN_MISSING)
            self.assertEqual(
                answer.header("www-authenticate"), 'Bearer realm="cpsagent"'
            )
        answer = yield self.request("GET", "/cps/card", token="not-a-token")
        self.assertProblem(answer, 401, problems.TOKEN_EXPIRED)
        self.assertIn("invalid_token", answer.header("www-authenticate") or "")

    @inlineCallbacks
    def test_token_of_another_shape(self) -> Any:
        """
        A token is 43 base64url characters: anything else is 401 at once,
        and one far too long for a header (100 KB) is a 431 problem at
        once, not a connection dropped with no answer.
        """
        yield self.session()
        for token in ["x" * 42, "x" * 44, "é" * 43, "a b" + "c" * 40, "x" * 8000]:
            answer = yield self.request("GET", "/cps/card", token=token)
            document = self.assertProblem(answer, 401, problems.TOKEN_EXPIRED)
            self.assertIn("not a token of this agent", document["detail"])
        started = reactor.seconds()  # type: ignore[attr-defined]
        answer = yield self.request("GET", "/cps/card", token="A" * 100_000)
        self.assertLess(reactor.seconds() - started, 5)  # type: ignore[attr-defined]
        document = self.assertProblem(answer, 431, problems.HEADER_TOO_LARGE)
        self.assertIn("16384 bytes", document["detail"])
        client = CpsAgentClient(
            self.agent.url, "A" * 100_000, self.agent.fingerprint, timeout=20
        )
        self.addCleanup(client.close)
        error = yield self.assertFailure(client.card(), AgentError)
        self.assertIn("header", str(error))

    @inlineCallbacks
    def test_delete_drops_token(self) -> Any:
        """
        Locking ends the session: the token no longer works.
        """
        client = yield self.client()
        yield client.card()
        yield client.lock()
        yield self.assertFailure(client.sign(b"x", "SHA256WithRSA"), TokenExpired)

    @inlineCallbacks
    def test_bad_json(self) -> Any:
        for body in (b"{not json", b'["pin"]', b'{"pin": 1234}', b"\xff\xfe"):
            answer = yield self.request(
                "POST", "/cps/session", {"Content-Type": "application/json"}, body
            )
            self.assertProblem(answer, 400, problems.BAD_REQUEST)

    @inlineCallbacks
    def test_unknown_members(self) -> Any:
        """
        A member the endpoint does not know is refused, named, before the
        card is asked: a misspelt C{lastTry} must not be taken for its
        absence, and the right PIN with it opens nothing.
        """
        body = b'{"pin": "%s", "lastry": true}' % self.testcard.pin.encode()
        answer = yield self.request(
            "POST", "/cps/session", {"Content-Type": "application/json"}, body
        )
        document = self.assertProblem(answer, 400, problems.BAD_REQUEST)
        self.assertIn("'lastry'", document["detail"])
        context = yield self.session()
        answer = yield self.request(
            "POST",
            "/cps/sign/for/signature/SHA256WithRSA",
            {"Content-Type": "application/json"},
            b'{"data": "eA==", "algorithm": "SHA1WithRSA"}',
            context["token"],
        )
        document = self.assertProblem(answer, 400, problems.BAD_REQUEST)
        self.assertIn("'algorithm'", document["detail"])

    @inlineCallbacks
    def test_strict_json(self) -> Any:
        """
        JSON is read strictly, as the facade reads it: a member twice in one
        object (which one would the agent act on?), NaN or Infinity, or a
        number of thousands of digits is refused, said in words, and the
        card is not asked.
        """
        context = yield self.session()
        for path, body, said in [
            (
                "/cps/session",
                b'{"pin": "0000", "pin": "%s"}' % self.testcard.pin.encode(),
                "has the member 'pin' twice in one object",
            ),
            ("/cps/session", b'{"pin": NaN}', "has NaN, which is not JSON"),
            (
                "/cps/session",
                b'{"pin": "0000", "lastTry": -Infinity}',
                "has -Infinity, which is not JSON",
            ),
            (
                "/cps/sign/for/signature/SHA256WithRSA",
                b'{"data": "AAAA", "n": %s}' % (b"9" * 5000),
                "has a number of 5000 digits (at most 64 are taken)",
            ),
        ]:
            answer = yield self.request(
                "POST",
                path,
                {"Content-Type": "application/json"},
                body,
                context["token"],
            )
            document = self.assertProblem(answer, 400, problems.BAD_REQUEST)
            self.assertEqual(document["detail"], "the body " + said)
        # No wrong PIN reached the card: the session is still open.
        answer = yield self.request("GET", "/cps/card", token=context["token"])
        self.assertEqual(answer.code, 200, answer.body)

    @inlineCallbacks
    def test_unknown_endpoint(self) -> Any:
        answer = yield self.request("GET", "/cps/nothing")
        self.assertProblem(answer, 404, problems.NOT_FOUND)
        answer = yield self.request("GET", "/cps/session")
        self.assertProblem(answer, 405, problems.METHOD_NOT_ALLOWED)


class StatusLineTests(AgentTestCase):
    allow_origin = "https://frontend.example"

    @inlineCallbacks
    def test_reason_phrases(self) -> Any:
        """
        Every status the agent answers with comes with its reason phrase in
        the status line (RFC 9110), 423 and 429 included, never "Unknown
        Status".
        """
        json_type = {"Content-Type": "application/json"}
        pin = json.dumps({"pin": self.testcard.pin}).encode()
        opened = yield self.request("POST", "/cps/session", json_type, pin)
        token = opened.json()["token"]
        answers = [opened]
        for method, path, headers, body, with_token in [
            ("GET", "/cps/card", {}, None, True),
            ("POST", "/cps/session", json_type, b"{", False),
            ("GET", "/cps/card", {}, None, False),
            ("GET", "/cps/card", {"Origin": "https://evil.example"}, None, True),
            ("GET", "/cps/nothing", {}, None, False),
            ("PUT", "/cps/card", {}, None, True),
            ("POST", "/cps/session", json_type, b" " * (70 * 1024), False),
            ("OPTIONS", "/cps/card", {"Origin": "https://frontend.example"}, None, 0),
            ("POST", "/cps/session", json_type, b'{"pin": "0000"}', False),
            ("POST", "/cps/session", json_type, pin, False),
            ("DELETE", "/cps/session", {}, None, True),
        ]:
            answer = yield self.request(
                method, path, headers, body, token if with_token else None
            )
            answers.append(answer)
        codes = [a.code for a in answers]
        # The wrong PIN left the session open: DELETE still finds it.
        self.assertEqual(
            codes, [201, 200, 400, 401, 403, 404, 405, 413, 204, 401, 429, 204]
        )
        for answer in answers:
            self.assertEqual(
                answer.phrase, HTTPStatus(answer.code).phrase.encode(), answer.code
            )


class AlpnTests(AgentTestCase):
    """
    TLS clients offering application protocols (ALPN, RFC 7301), seen with
    OpenSSL's own client.
    """

    def s_client(self, *arguments: str) -> Deferred[tuple[bytes, bytes, int]]:
        host = self.agent.url.removeprefix("https://")
        return getProcessOutputAndValue(
            "openssl",
            ["s_client", "-connect", host, "-ign_eof", *arguments],
            env=dict(os.environ),
            reactor=reactor,
            stdinBytes=b"GET /cps/card HTTP/1.0\r\n\r\n",
        )

    @inlineCallbacks
    def test_alpn(self) -> Any:
        """
        A client offering http/1.1 gets it; one offering only protocols the
        agent does not speak (h2, http/1.0) goes on without ALPN instead of
        being cut off with an internal_error alert, and its HTTP/1.0
        request is answered.
        """
        out, err, code = yield self.s_client("-alpn", "h2,http/1.1")
        text = (out + err).decode(errors="replace")
        self.assertEqual(code, 0, text)
        self.assertIn("ALPN protocol: http/1.1", text)
        for offered in ("h2", "http/1.0"):
            out, err, code = yield self.s_client("-alpn", offered)
            text = (out + err).decode(errors="replace")
            self.assertEqual(code, 0, text)
            self.assertNotIn("alert", text)
            self.assertIn("No ALPN negotiated", text)
            self.assertIn("HTTP/1.0 401 Unauthorized", text)


class PinPauseTests(AgentTestCase):
    def setUp(self) -> Any:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        return super().setUp()

    @inlineCallbacks
    def test_pause_after_wrong_pin(self) -> Any:
        """
        Right after a wrong PIN, the next PIN (even the right one) is refused
        with 429 and Retry-After, without asking the card; once the pause is
        over, the right PIN opens a session.
        """
        assert self.clock is not None
        agent = self.agent
        yield self.assertFailure(
            open_session(agent.url, "0000", agent.fingerprint), WrongPin
        )
        paused = yield self.assertFailure(
            open_session(agent.url, self.testcard.pin, agent.fingerprint), PinPause
        )
        self.assertEqual(paused.retry_after, 5)
        self.assertIn("the card was not asked", str(paused))
        self.clock.advance(5)
        context = yield open_session(agent.url, self.testcard.pin, agent.fingerprint)
        self.assertIn("token", context)


class GrowingPauseTests(AgentTestCase):
    def setUp(self) -> Any:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        return super().setUp()

    @inlineCallbacks
    def pin(self, pin: str, expected: type[Exception] | None) -> Any:
        """
        Send C{pin}; check that the agent answers with C{expected}, or a
        context when C{None}.

        @return: a Deferred that fires with the error or the context.
        """
        opened = open_session(self.agent.url, pin, self.agent.fingerprint)
        if expected is None:
            context = yield opened
            return context
        error = yield self.assertFailure(opened, expected)
        return error

    @inlineCallbacks
    def test_pause_doubles(self) -> Any:
        """
        The pause after a wrong PIN doubles with each wrong PIN in a row,
        from --wrong-pin-pause (5 s) up to 300 s, said in the 429; a right
        PIN brings it back to 5 s.
        """
        assert self.clock is not None
        for pause in (5, 10, 20, 40, 80, 160, 300, 300):
            yield self.pin("0000", WrongPin)
            paused = yield self.pin(self.testcard.pin, PinPause)
            self.assertEqual(paused.retry_after, pause)
            self.assertIn(f"only after {pause} s", str(paused))
            self.clock.advance(pause - 1)
            paused = yield self.pin("0000", PinPause)
            self.assertEqual(paused.retry_after, 1)
            self.clock.advance(1)
        self.assertIn("8 wrong PINs in a row", str(paused))
        yield self.pin(self.testcard.pin, None)
        yield self.pin("0000", WrongPin)
        paused = yield self.pin(self.testcard.pin, PinPause)
        self.assertEqual(paused.retry_after, 5)
        self.assertIn("after a wrong PIN", str(paused))


class _CountingToken:
    """
    The test card's SoftHSM2 token behind the PIN counter of a CPS card,
    which SoftHSM2 lacks: three tries, the third one final, the PIN blocked
    after it, the flags PKCS#11 defines for each (CKF_USER_PIN_COUNT_LOW,
    CKF_USER_PIN_FINAL_TRY, CKF_USER_PIN_LOCKED), as python-pkcs11 shows a
    token.
    """

    def __init__(self, card: _CardWithTries, real: Any) -> None:
        self.card = card
        self.real = real

    @property
    def slot(self) -> _CountingToken:
        return self

    def get_token(self) -> _CountingToken:
        return self

    @property
    def flags(self) -> pkcs11.TokenFlag:
        flags = pkcs11.TokenFlag(self.real.flags) & ~(
            pkcs11.TokenFlag.USER_PIN_COUNT_LOW
            | pkcs11.TokenFlag.USER_PIN_FINAL_TRY
            | pkcs11.TokenFlag.USER_PIN_LOCKED
        )
        if self.card.tries == 0:
            return flags | pkcs11.TokenFlag.USER_PIN_LOCKED
        if self.card.tries == 1:
            flags |= pkcs11.TokenFlag.USER_PIN_FINAL_TRY
        if self.card.tries < _CardWithTries.TRIES:
            flags |= pkcs11.TokenFlag.USER_PIN_COUNT_LOW
        return flags

    def open(self, user_pin: str, **kwargs: Any) -> Any:
        self.card.presented.append(user_pin)
        if self.card.tries == 0:
            raise p11errors.PinLocked()
        if user_pin != self.card.pin:
            self.card.tries -= 1
            raise p11errors.PinIncorrect()
        self.card.tries = _CardWithTries.TRIES
        return self.real.open(user_pin=user_pin, **kwargs)


class _CardWithTries(Pkcs11Backend):
    """
    The agent's own PKCS#11 backend on the test card, whose token counts
    the PIN's tries like a CPS card (L{_CountingToken}).
    """

    TRIES = 3

    def __init__(self) -> None:
        card = shared_testcard()
        assert card.pkcs11_module is not None
        super().__init__(
            card.pkcs11_module,
            card.token_label,
            card.ca_intermediate_certificates(),
            card.environment(),
        )
        self.pin = card.pin
        self.tries = self.TRIES
        self.presented: list[str] = []

    def _token(self) -> Any:
        return _CountingToken(self, super()._token())


class LastTryTests(AgentTestCase):
    """
    A card that counts its PIN's tries, as a CPS card does: the agent does
    not spend its last try unless the request says the professional knows.
    """

    def setUp(self) -> Any:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        return super().setUp()

    def backend(self) -> Any:
        self.card = _CardWithTries()
        return self.card

    @inlineCallbacks
    def post(self, body: dict[str, Any]) -> Any:
        """
        POST C{body} to /cps/session, then let the pause after a wrong PIN
        run out.
        """
        assert self.clock is not None
        answer = yield self.request(
            "POST",
            "/cps/session",
            {"Content-Type": "application/json"},
            json.dumps(body).encode(),
        )
        self.clock.advance(3600)
        return answer

    @inlineCallbacks
    def test_blind_script_cannot_block_the_card(self) -> Any:
        """
        Wrong PINs sent one after the other, each after the pause: the
        first two reach the card, the second saying one try is left and how
        to spend it; from then on the agent presents no PIN (409
        pin-last-try, the card not asked), the right one included, and the
        card is never blocked.
        """
        answers = []
        for _ in range(4):
            answer = yield self.post({"pin": "0000"})
            answers.append(answer)
        self.assertEqual([a.code for a in answers], [401, 401, 409, 409])
        second = self.assertProblem(answers[1], 401, problems.WRONG_PIN)
        self.assertEqual(second["triesLeft"], 1)
        self.assertIn('"lastTry": true', second["detail"])
        for answer in answers[2:]:
            document = self.assertProblem(answer, 409, problems.PIN_LAST_TRY)
            self.assertEqual(document["triesLeft"], 1)
            self.assertIn("one try left", document["detail"])
            self.assertIn("the PIN was not presented", document["detail"])
            self.assertIn('"lastTry": true', document["detail"])
        answer = yield self.post({"pin": self.testcard.pin})
        self.assertProblem(answer, 409, problems.PIN_LAST_TRY)
        answer = yield self.post({"pin": self.testcard.pin, "lastTry": False})
        self.assertProblem(answer, 409, problems.PIN_LAST_TRY)
        self.assertEqual(self.card.presented, ["0000", "0000"])
        self.assertEqual(self.card.tries, 1)

    @inlineCallbacks
    def test_last_try_spent_when_asked(self) -> Any:
        """
        With "lastTry": true the agent presents the PIN on the last try: the
        right one opens a session and gives the card its tries back; a
        wrong one blocks the card (423). Through the client, the same.
        """
        for _ in range(2):
            yield self.post({"pin": "0000"})
        held = yield self.assertFailure(
            open_session(self.agent.url, self.testcard.pin, self.agent.fingerprint),
            PinLastTry,
        )
        self.assertEqual(held.problem["status"], 409)
        context = yield open_session(
            self.agent.url, self.testcard.pin, self.agent.fingerprint, last_try=True
        )
        self.assertIn("token", context)
        self.assertEqual(self.card.tries, _CardWithTries.TRIES)
        client = CpsAgentClient.from_context(context)
        self.addCleanup(client.close)
        yield client.card()

        # Locked, so that the next PINs reach the card rather than being
        # compared with the one that unlocked it.
        yield client.lock()
        for _ in range(2):
            yield self.post({"pin": "0000"})
        answer = yield self.post({"pin": "0000", "lastTry": True})
        self.assertProblem(answer, 423, problems.PIN_BLOCKED)
        self.assertEqual(self.card.tries, 0)
        self.assertEqual(self.card.presented[-1], "0000")
        self.assertEqual(len(self.card.presented), 6)

    @inlineCallbacks
    def test_no_try_spent_while_unlocked(self) -> Any:
        """
        Wrong PINs sent while a session is open never reach the card: they
        spend none of its tries, and the session stays open.
        """
        context = yield open_session(
            self.agent.url, self.testcard.pin, self.agent.fingerprint
        )
        assert self.clock is not None
        for _ in range(3):
            answer = yield self.request(
                "POST",
                "/cps/session",
                {"Content-Type": "application/json"},
                b'{"pin": "0000", "lastTry": true}',
            )
            self.assertProblem(answer, 401, problems.WRONG_PIN)
            # Past the pause, within the session's idle time.
            self.clock.advance(60)
        self.assertEqual(self.card.presented, [self.testcard.pin])
        self.assertEqual(self.card.tries, _CardWithTries.TRIES)
        client = CpsAgentClient.from_context(context)
        self.addCleanup(client.close)
        yield client.card()

    @inlineCallbacks
    def test_last_try_must_be_true_or_false(self) -> Any:
        for value in ("yes", 1, None, [True]):
            answer = yield self.post({"pin": "0000", "lastTry": value})
            document = self.assertProblem(answer, 400, problems.BAD_REQUEST)
            self.assertIn("lastTry", document["detail"])
        self.assertEqual(self.card.presented, [])


class _SlowLogin:
    """
    The test card, whose PIN check waits until the test lets it finish, and
    that counts the PINs it was asked to check.
    """

    def __init__(self) -> None:
        self.inner = token_backend()
        self.description = self.inner.description
        self.logins = 0
        self.entered = threading.Event()
        self.release = threading.Event()

    def login(self, pin: str) -> None:
        self.logins += 1
        self.entered.set()
        self.release.wait(10)
        self.inner.login(pin)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class ConcurrentPinTests(AgentTestCase):
    def backend(self) -> Any:
        self.slow = _SlowLogin()
        self.addCleanup(self.slow.release.set)
        return self.slow

    @inlineCallbacks
    def test_one_pin_at_a_time(self) -> Any:
        """
        While the card checks a PIN, other PINs are refused with 429 without
        asking the card: PINs sent at once cannot run through the card's
        few tries before the pause after a wrong one applies.
        """
        agent = self.agent
        first = open_session(agent.url, "0000", agent.fingerprint)
        deadline = reactor.seconds() + 10  # type: ignore[attr-defined]
        while not self.slow.entered.is_set() and reactor.seconds() < deadline:  # type: ignore[attr-defined]
            yield deferLater(reactor, 0.01)
        reactor.callLater(1, self.slow.release.set)  # type: ignore[attr-defined]
        others = yield gatherResults(
            [
                open_session(agent.url, pin, agent.fingerprint).addErrback(
                    lambda f: f.value
                )
                for pin in ("1111", self.testcard.pin)
            ]
        )
        for refused in others:
            self.assertIsInstance(refused, PinPause)
            self.assertIn("the card was not asked", str(refused))
        yield self.assertFailure(first, WrongPin)
        self.assertEqual(self.slow.logins, 1)


class _CountingLogin:
    """
    The test card, counting the PINs it was asked to check.
    """

    def __init__(self) -> None:
        self.inner = token_backend()
        self.description = self.inner.description
        self.logins = 0

    def login(self, pin: str) -> None:
        self.logins += 1
        self.inner.login(pin)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class WrongPinStormTests(AgentTestCase):
    def setUp(self) -> Any:
        # A clock that never moves: the pause after the wrong PIN lasts for
        # the whole test, however slowly the machine serves the requests.
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        return super().setUp()

    def backend(self) -> Any:
        self.counting = _CountingLogin()
        return self.counting

    @inlineCallbacks
    def test_eighty_wrong_pins_at_once(self) -> Any:
        """
        Eighty wrong PINs sent at once, each on its own HTTPS connection:
        the card is asked exactly once; that PIN is 401, every other one is
        429 pin-pause without reaching the card.
        """
        agent = self.agent
        answers = yield gatherResults(
            [
                open_session(
                    agent.url, f"{9000 + i:04d}", agent.fingerprint
                ).addErrback(lambda f: f.value)
                for i in range(80)
            ]
        )
        wrong = [a for a in answers if isinstance(a, WrongPin)]
        paused = [a for a in answers if isinstance(a, PinPause)]
        self.assertEqual((len(wrong), len(paused)), (1, 79), answers)
        for refused in paused:
            self.assertIn("the card was not asked", str(refused))
        self.assertEqual(self.counting.logins, 1)


class UnlockedCardTests(AgentTestCase):
    """
    PINs sent while the card is unlocked, sessions open: compared with the
    PIN that unlocked it, never presented to the card.
    """

    def setUp(self) -> Any:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        return super().setUp()

    def backend(self) -> Any:
        self.counting = _CountingLogin()
        return self.counting

    def security(self) -> list[str]:
        """
        @return: the security events logged so far, formatted.
        """
        said = [formatEvent(e) for e in self.events]
        return [line for line in said if line.startswith("security: ")]

    @inlineCallbacks
    def test_wrong_pin_keeps_the_sessions(self) -> Any:
        """
        A wrong PIN while a session is open: 401 wrong-pin with the card not
        asked, the session still open, the pause after a wrong PIN applied;
        after it, the right PIN opens a second session, without the card
        either.
        """
        assert self.clock is not None
        first = yield self.client()
        error = yield self.assertFailure(
            open_session(self.agent.url, "0000", self.agent.fingerprint), WrongPin
        )
        self.assertIsNone(error.tries_left)
        self.assertIn("the card was not asked", str(error))
        yield first.card()
        paused = yield self.assertFailure(
            open_session(self.agent.url, self.testcard.pin, self.agent.fingerprint),
            PinPause,
        )
        self.assertEqual(paused.retry_after, 5)
        self.clock.advance(5)
        second = yield self.client()
        yield gatherResults([first.card(), second.card()])
        self.assertEqual(self.counting.logins, 1)

    @inlineCallbacks
    def test_card_asked_again_once_locked(self) -> Any:
        """
        Once the sessions are over (locked, or lapsed), the PIN that unlocked
        the card is forgotten: the next PIN, right or wrong, goes to the
        card, and a wrong one is said as the card's answer.
        """
        assert self.clock is not None
        client = yield self.client()
        yield client.lock()
        error = yield self.assertFailure(
            open_session(self.agent.url, "0000", self.agent.fingerprint), WrongPin
        )
        self.assertNotIn("the card was not asked", str(error))
        self.assertEqual(self.counting.logins, 2)
        self.clock.advance(5)
        yield self.client()
        self.assertEqual(self.counting.logins, 3)
        self.clock.advance(900)
        yield self.client()
        self.assertEqual(self.counting.logins, 4)

    @inlineCallbacks
    def test_security_events(self) -> Any:
        """
        A wrong PIN is a security event naming the caller, whether the card
        was asked and the tries left; so is the end of every session, with
        why. Neither the PIN nor a token is in the log.
        """
        assert self.clock is not None
        yield self.assertFailure(
            open_session(self.agent.url, "0000", self.agent.fingerprint), WrongPin
        )
        self.clock.advance(5)
        context = yield self.session()
        yield self.assertFailure(
            open_session(self.agent.url, "1111", self.agent.fingerprint), WrongPin
        )
        client = CpsAgentClient.from_context(context)
        self.addCleanup(client.close)
        yield client.lock()
        self.assertEqual(
            self.security(),
            [
                "security: wrong PIN from 127.0.0.1, checked by the card; "
                "tries left: unknown",
                "security: wrong PIN from 127.0.0.1, not the one that unlocked "
                "the card: the card was not asked; tries left: unknown",
                "security: all sessions ended (1 open): card locked by 127.0.0.1",
            ],
        )
        said = "\n".join(
            formatEvent(e) + repr([v for k, v in e.items() if not k.startswith("log_")])
            for e in self.events
            if e.get("log_namespace", "").startswith("cpsdmp")
        )
        for secret in ("0000", "1111", self.testcard.pin, context["token"]):
            self.assertNotIn(secret, said)


class ExpiryTests(AgentTestCase):
    def setUp(self) -> Any:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        return super().setUp()

    @inlineCallbacks
    def test_idle_token_expires(self) -> Any:
        """
        A token unused for the idle time (900 s) is refused; each use pushes
        the expiry back.
        """
        assert self.clock is not None
        client = yield self.client()
        self.clock.advance(899)
        yield client.card()
        self.clock.advance(899)
        yield client.card()
        self.clock.advance(900)
        failure = yield self.assertFailure(client.card(), TokenExpired)
        self.assertEqual(failure.problem["status"], 401)


class SignTests(AgentTestCase):
    @inlineCallbacks
    def test_each_algorithm(self) -> Any:
        """
        Each algorithm, with each key, signs through the agent; the signature
        verifies with the certificate the agent serves, whose chain
        validates against the test root. The authentication key signs the
        data; the signature key, the SignedInfo of the signature request it
        is handed (the policy, off here, would check the request).
        """
        client = yield self.client()
        data = b"the bytes a CertificateVerify covers"
        auth_chain = yield client.certificate_chain()
        sig_chain = yield client.signature_certificate_chain()
        verify_card_chain(auth_chain, [self.testcard.ca_root_certificate()])
        self.assertNotEqual(auth_chain[0], sig_chain[0])
        request = signature_request(sig_chain[0])
        for name in ALGORITHMS:
            signature = yield client.sign(data, name)
            _verify(auth_chain[0], signature, data, name)
            signature = yield client.sign_for_signature(request, name)
            _verify(sig_chain[0], signature, to_be_signed(request), name)
        error = yield self.assertFailure(
            client.sign_for_signature(data, "SHA256WithRSA"), AgentError
        )
        self.assertEqual(error.problem["status"], 400)
        self.assertIn("signs the SignedInfo of a signature request", str(error))

    @inlineCallbacks
    def test_json_and_raw(self) -> Any:
        """
        The JSON form and the octet-stream form give the same signature.
        """
        context = yield self.session()
        token = context["token"]
        path = "/cps/sign/for/authentication/SHA384WithRSA"
        data = bytes(range(256)) * 4
        as_json = yield self.request(
            "POST",
            path,
            {"Content-Type": "application/json"},
            json.dumps({"data": base64.b64encode(data).decode()}).encode(),
            token,
        )
        self.assertEqual(as_json.code, 200, as_json.body)
        self.assertEqual(as_json.json()["algorithm"], "SHA384WithRSA")
        raw = yield self.request(
            "POST",
            path,
            {
                "Content-Type": "application/octet-stream",
                "Accept": "application/octet-stream",
            },
            data,
            token,
        )
        self.assertEqual(raw.code, 200)
        self.assertEqual(raw.header("content-type"), "application/octet-stream")
        self.assertEqual(base64.b64decode(as_json.json()["signature"]), raw.body)

    @inlineCallbacks
    def test_remote_key(self) -> Any:
        """
        The client is an IRemoteKey whose signatures verify under each scheme
        it offers, and that refuses the others.
        """
        client = yield self.client()
        verifyObject(IRemoteKey, client)
        chain = yield client.certificate_chain()
        for scheme in client.supported_signature_schemes:
            signature = yield client.sign(b"transcript", scheme)
            self.assertTrue(
                verify_signature(
                    chain[0].public_key(), scheme, signature, b"transcript"
                )
            )
        yield self.assertFailure(
            client.sign(b"x", SignatureScheme.rsa_pss_rsae_sha256), ValueError
        )

    @inlineCallbacks
    def test_fifty_concurrent(self) -> Any:
        """
        Fifty signatures asked at once are all answered, each valid (the
        agent of these tests has its signing policy off and no rate limit;
        the policy-on case is in test_agent_policy).
        """
        client = yield self.client()
        chain = yield client.certificate_chain()
        messages = [b"message %d" % i for i in range(50)]
        signatures = yield gatherResults(
            [client.sign(m, "SHA256WithRSA") for m in messages]
        )
        self.assertEqual(len(signatures), 50)
        for message, signature in zip(messages, signatures, strict=True):
            _verify(chain[0], signature, message, "SHA256WithRSA")

    @inlineCallbacks
    def test_unknown_algorithm(self) -> Any:
        context = yield self.session()
        answer = yield self.request(
            "POST",
            "/cps/sign/for/authentication/SHA256WithECDSA",
            {"Content-Type": "application/json"},
            b'{"data": "AAAA"}',
            context["token"],
        )
        document = self.assertProblem(answer, 400, problems.UNKNOWN_ALGORITHM)
        for name in ALGORITHMS:
            self.assertIn(name, document["detail"])

    @inlineCallbacks
    def test_bad_base64(self) -> Any:
        context = yield self.session()
        for body in (b'{"data": "not base64!"}', b'{"data": 12}', b"{"):
            answer = yield self.request(
                "POST",
                "/cps/sign/for/signature/SHA256WithRSA",
                {"Content-Type": "application/json"},
                body,
                context["token"],
            )
            self.assertProblem(answer, 400, problems.BAD_REQUEST)

    @inlineCallbacks
    def test_body_too_large(self) -> Any:
        """
        A body over 64 KiB is refused with 413, by its announced length; one
        of exactly 64 KiB is signed.
        """
        context = yield self.session()
        path = "/cps/sign/for/authentication/SHA256WithRSA"
        headers = {"Content-Type": "application/octet-stream"}
        answer = yield self.request(
            "POST", path, headers, b"x" * (64 * 1024 + 1), context["token"]
        )
        self.assertProblem(answer, 413, problems.BODY_TOO_LARGE)
        answer = yield self.request(
            "POST", path, headers, b"x" * 64 * 1024, context["token"]
        )
        self.assertEqual(answer.code, 200)

    @inlineCallbacks
    def test_body_refused_before_it_is_sent(self) -> Any:
        """
        A request announcing 10 MB gets its 413 right after its head, without
        sending a byte of body, and the connection closes.
        """
        context = yield self.session()
        host, port = self.agent.url.removeprefix("https://").split(":")
        endpoint = wrapClientTLS(
            PinnedCertificatePolicy(self.agent.fingerprint).creatorForNetloc(
                host.encode(), int(port)
            ),
            TCP4ClientEndpoint(reactor, host, int(port)),
        )
        collector = _Collector()
        yield connectProtocol(endpoint, collector)
        collector.transport.write(  # type: ignore[union-attr]
            b"POST /cps/sign/for/authentication/SHA256WithRSA HTTP/1.1\r\n"
            b"Host: 127.0.0.1\r\n"
            b"Authorization: Bearer " + context["token"].encode() + b"\r\n"
            b"Content-Type: application/octet-stream\r\n"
            b"Content-Length: 10000000\r\n\r\n"
        )
        yield collector.closed.addTimeout(10, reactor)
        self.assertTrue(collector.data.startswith(b"HTTP/1.1 413 "), collector.data)
        self.assertIn(problems.BODY_TOO_LARGE.encode(), collector.data)

    @inlineCallbacks
    def test_chunked_body_too_large(self) -> Any:
        """
        A body sent without a length (chunked) is refused once it passes
        64 KiB.
        """
        context = yield self.session()
        response = yield self.raw().request(
            "POST",
            self.agent.url + "/cps/sign/for/authentication/SHA256WithRSA",
            headers={
                "Content-Type": ["application/octet-stream"],
                "Authorization": [f"Bearer {context['token']}"],
            },
            data=_UnknownLength(b"x" * (80 * 1024)),
        )
        answer = _Answer(response.code, response.headers, (yield response.content()))
        self.assertProblem(answer, 413, problems.BODY_TOO_LARGE)

    @inlineCallbacks
    def test_log(self) -> Any:
        """
        Each signature is logged with its algorithm, length, key, caller and
        duration, and no event carries the PIN (right or wrong), the token or
        the data.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        context = yield self.session()
        client = CpsAgentClient.from_context(context)
        self.addCleanup(client.close)
        data = b"SECRET-DOCUMENT-CONTENT"
        yield client.sign(data, "SHA512WithRSA")
        signed = [e for e in events if e.get("log_format", "").startswith("signed")]
        self.assertEqual(len(signed), 1)
        event = signed[0]
        self.assertEqual(event["algorithm"], "SHA512WithRSA")
        self.assertEqual(event["length"], len(data))
        self.assertEqual(event["key"], "CPS_PRIV_AUT")
        self.assertEqual(event["caller"], "127.0.0.1")
        self.assertGreater(event["duration_ms"], 0)
        self.assertIn("log_time", event)
        wrong_pin = "86429753"
        yield self.assertFailure(
            open_session(self.agent.url, wrong_pin, self.agent.fingerprint), WrongPin
        )
        # The test card's PIN is short: look for it as a value of its own.
        pin = re.compile(
            rf"(?<![0-9A-Za-z]){re.escape(self.testcard.pin)}(?![0-9A-Za-z])"
        )
        secrets = (context["token"], "SECRET-DOCUMENT", wrong_pin)
        leaks = [
            text
            for text in (repr(e) + formatEvent(e) for e in events)
            if pin.search(text) or any(secret in text for secret in secrets)
        ]
        self.assertEqual(leaks, [])


class NoTokenTests(AgentTestCase):
    def backend(self) -> Any:
        return token_backend("NO SUCH CARD")

    @inlineCallbacks
    def test_no_card(self) -> Any:
        """
        No token with the card's label: 503, naming what to do.
        """
        answer = yield self.request(
            "POST",
            "/cps/session",
            {"Content-Type": "application/json"},
            b'{"pin": "1234"}',
        )
        document = self.assertProblem(answer, 503, problems.NO_CARD)
        self.assertIn("insert the CPS card", document["detail"])
        yield self.assertFailure(
            open_session(self.agent.url, "1234", self.agent.fingerprint), NoCard
        )


class PinningTests(AgentTestCase):
    @inlineCallbacks
    def test_other_certificate_refused(self) -> Any:
        """
        A client whose context names another agent's certificate refuses this
        one, without saying which certificate it saw.
        """
        other: RunningAgent = yield start_agent(self, token_backend())
        context = yield self.session()
        forged = dict(context, tlsFingerprint=other.fingerprint)
        client = CpsAgentClient.from_context(forged)
        self.addCleanup(client.close)
        failure = yield self.assertFailure(client.card(), AgentCertificateMismatch)
        self.assertIn("does not match the agent context's", str(failure))
        self.assertIn(other.fingerprint, str(failure))
        seen = self.agent.fingerprint
        for shown in [seen, seen.partition(":")[2], seen.partition(":")[2][:16]]:
            self.assertNotIn(shown, str(failure))
        # The right context works on the same port.
        genuine = CpsAgentClient.from_context(context)
        self.addCleanup(genuine.close)
        card = yield genuine.card()
        self.assertTrue(card["present"])

    @inlineCallbacks
    def test_unreachable(self) -> Any:
        context = yield self.session()
        yield self.agent.service.stopService()
        client = CpsAgentClient.from_context(context, timeout=5)
        self.addCleanup(client.close)
        failure = yield self.assertFailure(client.card(), AgentUnreachable)
        self.assertIn(self.agent.url, str(failure))


class RestartTests(AgentTestCase):
    @inlineCallbacks
    def test_tokens_do_not_survive(self) -> Any:
        """
        A token of an agent that stopped is unknown to the agent started
        after it on the same card.
        """
        context = yield self.session()
        yield self.agent.service.stopService()
        restarted: RunningAgent = yield start_agent(self, self.backend())
        client = CpsAgentClient(
            restarted.url, context["token"], restarted.fingerprint, timeout=20
        )
        self.addCleanup(client.close)
        yield self.assertFailure(client.card(), TokenExpired)

    @inlineCallbacks
    def test_kept_connections_end_with_the_agent(self) -> Any:
        """
        A caller's kept-alive connection ends when the agent stops: its next
        call finds no agent, at once, rather than a card let go of.
        """
        client = yield self.client()
        yield client.card()
        yield self.agent.service.stopService()
        started = reactor.seconds()  # type: ignore[attr-defined]
        yield self.assertFailure(client.card(), AgentUnreachable)
        self.assertLess(reactor.seconds() - started, 5)  # type: ignore[attr-defined]


class CorsTests(AgentTestCase):
    allow_origin = "https://frontend.example"

    @inlineCallbacks
    def test_preflight(self) -> Any:
        answer = yield self.request(
            "OPTIONS",
            "/cps/sign/for/authentication/SHA256WithRSA",
            {
                "Origin": self.allow_origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        self.assertEqual(answer.code, 204)
        self.assertEqual(
            answer.header("access-control-allow-origin"), self.allow_origin
        )
        self.assertIn("POST", answer.header("access-control-allow-methods") or "")
        self.assertIn(
            "Authorization", answer.header("access-control-allow-headers") or ""
        )

    @inlineCallbacks
    def test_allowed_origin(self) -> Any:
        answer = yield self.request(
            "POST",
            "/cps/session",
            {"Origin": self.allow_origin, "Content-Type": "application/json"},
            json.dumps({"pin": self.testcard.pin}).encode(),
        )
        self.assertEqual(answer.code, 201)
        self.assertEqual(
            answer.header("access-control-allow-origin"), self.allow_origin
        )

    @inlineCallbacks
    def test_other_origin_refused(self) -> Any:
        """
        Another origin gets no CORS grant, and its requests are not run: a
        page elsewhere cannot try PINs.
        """
        answer = yield self.request(
            "OPTIONS", "/cps/session", {"Origin": "https://evil.example"}
        )
        self.assertProblem(answer, 403, problems.FORBIDDEN_ORIGIN)
        self.assertIsNone(answer.header("access-control-allow-origin"))
        answer = yield self.request(
            "POST",
            "/cps/session",
            {"Origin": "https://evil.example", "Content-Type": "text/plain"},
            b'{"pin": "0000"}',
        )
        self.assertProblem(answer, 403, problems.FORBIDDEN_ORIGIN)

    @inlineCallbacks
    def test_body_too_large_readable_by_the_origin(self) -> Any:
        """
        A body over 64 KiB, refused before it is read, is answered with the
        CORS grant for the allowed origin, so that its page can read the
        413, and with none for another origin.
        """
        body = b" " * (70 * 1024)
        for origin, granted in [
            (self.allow_origin, self.allow_origin),
            ("https://evil.example", None),
        ]:
            answer = yield self.request(
                "POST",
                "/cps/session",
                {"Origin": origin, "Content-Type": "application/json"},
                body,
            )
            self.assertProblem(answer, 413, problems.BODY_TOO_LARGE)
            self.assertEqual(answer.header("access-control-allow-origin"), granted)


class _FaultBackend:
    """
    A card that fails the way a real CPS card can and SoftHSM2 cannot.
    """

    description = "a card that fails"

    def __init__(
        self, login_error: Exception | None, sign_error: Exception | None
    ) -> None:
        self.login_error = login_error
        self.sign_error = sign_error
        self.logins = 0
        self.present = True
        self.check_error: Exception | None = None
        self.hold: threading.Event | None = None
        self.login_hold: threading.Event | None = None
        self.inner = token_backend()

    def login(self, pin: str) -> None:
        self.logins += 1
        if self.login_hold is not None:
            self.login_hold.wait(30)
        if self.login_error is not None:
            raise self.login_error
        self.inner.login(pin)

    def load(self) -> None:
        self.inner.load()

    def pin_final_try(self) -> bool:
        return self.inner.pin_final_try()

    def logout(self) -> None:
        self.inner.logout()

    def check_present(self) -> None:
        if not self.present:
            from cpsdmp.agent.card import CardRemoved as CardCardRemoved

            raise CardCardRemoved()
        if self.check_error is not None:
            raise self.check_error
        self.inner.check_present()

    def chain(self, usage: KeyUsage) -> list[x509.Certificate]:
        return self.inner.chain(usage)

    def sign_digest(self, usage: KeyUsage, algorithm: Any, digest: bytes) -> bytes:
        if self.hold is not None:
            self.hold.wait(30)
        if self.sign_error is not None:
            raise self.sign_error
        return self.inner.sign_digest(usage, algorithm, digest)

    def close(self) -> None:
        self.inner.close()


class FaultTests(TestCase):
    """
    The faults only a real card produces, from a fake card behind the card
    interface, one fault each.
    """

    @inlineCallbacks
    def start(self, backend: _FaultBackend, **kwargs: Any) -> Any:
        agent: RunningAgent = yield start_agent(self, backend, **kwargs)
        return agent

    @inlineCallbacks
    def test_card_that_hangs(self) -> Any:
        """
        A card that does not answer a signature within --card-timeout: 503
        card-timeout, for it and for the request queued behind it, each
        after the timeout and not when the card answers; once it answers,
        the agent signs again.
        """
        backend = _FaultBackend(None, None)
        backend.hold = threading.Event()
        self.addCleanup(backend.hold.set)  # runs before the agent stops
        agent = yield self.start(backend, card_timeout=0.5)
        context = yield open_session(
            agent.url, shared_testcard().pin, agent.fingerprint
        )
        client = CpsAgentClient.from_context(context, timeout=20)
        self.addCleanup(client.close)
        started = reactor.seconds()  # type: ignore[attr-defined]
        errors = yield gatherResults(
            [
                self.assertFailure(client.sign(b"x", "SHA256WithRSA"), CardTimeout)
                for _ in range(2)
            ]
        )
        self.assertLess(reactor.seconds() - started, 5)  # type: ignore[attr-defined]
        for error in errors:
            self.assertEqual(error.problem["status"], 503)
            self.assertIn("did not answer within 0.5 s", str(error))
        backend.hold.set()
        yield agent.card.when_idle()
        backend.hold = None
        yield client.sign(b"x", "SHA256WithRSA")

    @inlineCallbacks
    def test_pin_check_that_hangs(self) -> Any:
        """
        A card that does not answer a PIN in time: 503 card-timeout; no
        other PIN reaches it while it may still be checking that one, and
        the pause after a wrong PIN follows its answer.
        """
        backend = _FaultBackend(None, None)
        backend.login_hold = threading.Event()
        self.addCleanup(backend.login_hold.set)
        agent = yield self.start(backend, card_timeout=0.5)
        error = yield self.assertFailure(
            open_session(agent.url, "1111", agent.fingerprint), CardTimeout
        )
        self.assertEqual(error.problem["status"], 503)
        paused = yield self.assertFailure(
            open_session(agent.url, "2222", agent.fingerprint), PinPause
        )
        self.assertIn("checking another PIN", str(paused))
        backend.login_hold.set()
        yield agent.card.when_idle()
        paused = yield self.assertFailure(
            open_session(agent.url, "3333", agent.fingerprint), PinPause
        )
        self.assertIn("after a wrong PIN", str(paused))
        self.assertEqual(backend.logins, 1)

    @inlineCallbacks
    def test_stop_with_a_card_that_hangs(self) -> Any:
        """
        Stopping the agent while the card hangs ends after the timeout.
        """
        backend = _FaultBackend(None, None)
        backend.hold = threading.Event()
        self.addCleanup(backend.hold.set)
        agent = yield self.start(backend, card_timeout=0.5)
        context = yield open_session(
            agent.url, shared_testcard().pin, agent.fingerprint
        )
        client = CpsAgentClient.from_context(context, timeout=20)
        self.addCleanup(client.close)
        yield self.assertFailure(client.sign(b"x", "SHA256WithRSA"), CardTimeout)
        started = reactor.seconds()  # type: ignore[attr-defined]
        yield agent.service.stopService().addTimeout(10, reactor)
        self.assertLess(reactor.seconds() - started, 5)  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_pin_blocked(self) -> Any:
        from cpsdmp.agent.card import PinBlocked as CardPinBlocked

        backend = _FaultBackend(CardPinBlocked(), None)
        agent = yield self.start(backend)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        failure = yield self.assertFailure(
            open_session(agent.url, "1234", agent.fingerprint), PinBlocked
        )
        self.assertIn(
            "security: the card's PIN is blocked (PIN from 127.0.0.1)",
            [formatEvent(e) for e in events],
        )
        self.assertEqual(failure.problem["status"], 423)
        self.assertIn("PUK", failure.problem["detail"])
        http = HTTPClient(
            Agent(
                reactor,
                contextFactory=PinnedCertificatePolicy(agent.fingerprint),
                pool=HTTPConnectionPool(reactor, persistent=False),
            )
        )
        response = yield http.post(agent.url + "/cps/session", b'{"pin": "1234"}')
        yield response.content()
        self.assertEqual((response.code, response.original.phrase), (423, b"Locked"))

    @inlineCallbacks
    def test_tries_left(self) -> Any:
        from cpsdmp.agent.card import WrongPin as CardWrongPin

        backend = _FaultBackend(CardWrongPin(1), None)
        agent = yield self.start(backend)
        failure = yield self.assertFailure(
            open_session(agent.url, "1111", agent.fingerprint), WrongPin
        )
        self.assertEqual(failure.tries_left, 1)
        self.assertEqual(failure.problem["triesLeft"], 1)
        self.assertEqual(backend.logins, 1)

    @inlineCallbacks
    def test_card_removed(self) -> Any:
        """
        A card taken out during a signature: 503, and every token is dropped.
        """
        from cpsdmp.agent.card import CardRemoved as CardCardRemoved

        backend = _FaultBackend(None, CardCardRemoved())
        agent = yield self.start(backend)
        context = yield open_session(
            agent.url, shared_testcard().pin, agent.fingerprint
        )
        client = CpsAgentClient.from_context(context)
        self.addCleanup(client.close)
        failure = yield self.assertFailure(
            client.sign(b"x", "SHA256WithRSA"), CardRemoved
        )
        self.assertEqual(failure.problem["status"], 503)
        backend.sign_error = None
        yield self.assertFailure(client.sign(b"x", "SHA256WithRSA"), TokenExpired)

    @inlineCallbacks
    def test_card_taken_out_between_calls(self) -> Any:
        """
        The agent notices a card taken out while nobody calls, and ends the
        sessions then; GET /cps/card says so too.
        """
        backend = _FaultBackend(None, None)
        agent = yield self.start(backend)
        context = yield open_session(
            agent.url, shared_testcard().pin, agent.fingerprint
        )
        client = CpsAgentClient.from_context(context)
        self.addCleanup(client.close)
        yield client.card()
        yield agent.resource.watch_card()
        yield client.card()
        backend.present = False
        yield agent.resource.watch_card()
        yield self.assertFailure(client.card(), TokenExpired)
        context = yield open_session(
            agent.url, shared_testcard().pin, agent.fingerprint
        )
        client = CpsAgentClient.from_context(context)
        self.addCleanup(client.close)
        yield self.assertFailure(client.card(), CardRemoved)

    @inlineCallbacks
    def test_card_watched_while_idle(self) -> Any:
        """
        The running agent checks the card on its own, every few seconds:
        a card taken out ends the sessions without any call.
        """
        backend = _FaultBackend(None, None)
        agent = yield self.start(backend)
        yield open_session(agent.url, shared_testcard().pin, agent.fingerprint)
        self.assertEqual(len(agent.resource.tokens), 1)
        backend.present = False
        deadline = reactor.seconds() + 2 * CARD_WATCH_INTERVAL + 1  # type: ignore[attr-defined]
        while len(agent.resource.tokens) and reactor.seconds() < deadline:  # type: ignore[attr-defined]
            yield deferLater(reactor, 0.1)
        self.assertEqual(len(agent.resource.tokens), 0)

    @inlineCallbacks
    def test_card_failing_its_check(self) -> Any:
        """
        A card that answers the presence check with an error of its own has
        lost its session: the sessions end, said in one line, not a
        traceback at every check.
        """
        from cpsdmp.agent.card import CardFault

        backend = _FaultBackend(None, None)
        agent = yield self.start(backend)
        context = yield open_session(
            agent.url, shared_testcard().pin, agent.fingerprint
        )
        backend.check_error = CardFault(RuntimeError("reader error"))
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for _ in range(2):
            yield agent.resource.watch_card()
        self.assertEqual(len(agent.resource.tokens), 0)
        ended = [e for e in events if "sessions ended" in e.get("log_format", "")]
        self.assertEqual(len(ended), 1)
        self.assertIn("the card failed", formatEvent(ended[0]))
        client = CpsAgentClient.from_context(context)
        self.addCleanup(client.close)
        yield self.assertFailure(client.card(), TokenExpired)

    @inlineCallbacks
    def test_timeout(self) -> Any:
        """
        A card that does not answer in time: the client gives up after its
        timeout with an error that says so.
        """
        backend = _FaultBackend(None, None)
        backend.hold = threading.Event()
        agent = yield self.start(backend)
        self.addCleanup(backend.hold.set)  # runs before the agent stops
        context = yield open_session(
            agent.url, shared_testcard().pin, agent.fingerprint
        )
        client = CpsAgentClient.from_context(context, timeout=0.5)
        self.addCleanup(client.close)
        started = reactor.seconds()  # type: ignore[attr-defined]
        failure = yield self.assertFailure(
            client.sign(b"x", "SHA256WithRSA"), AgentUnreachable
        )
        self.assertLess(reactor.seconds() - started, 5)  # type: ignore[attr-defined]
        self.assertIn("did not answer", str(failure))
        self.assertIn("0.5 s", str(failure))


class SoftCardAgentTests(AgentTestCase):
    """
    The same agent over the PKCS#12 soft card.
    """

    def backend(self) -> Any:
        card = shared_testcard()
        return SoftCardBackend(
            Path(card.soft_card),
            Path(card.soft_card_signature),
            card.ca_intermediate_certificates(),
        )

    @inlineCallbacks
    def test_sign_and_card(self) -> Any:
        client = yield self.client()
        card = yield client.card()
        self.assertEqual(card["holder"]["id"], self.testcard.professional["id"])
        chain = yield client.certificate_chain()
        verify_card_chain(chain, [self.testcard.ca_root_certificate()])
        for name in ALGORITHMS:
            signature = yield client.sign(b"soft", name)
            _verify(chain[0], signature, b"soft", name)
        yield self.assertFailure(
            open_session(self.agent.url, "0000", self.agent.fingerprint), WrongPin
        )


class NoSignatureKeyTests(AgentTestCase):
    """
    A card without a signature key: a soft card given no
    --soft-card-signature.
    """

    def backend(self) -> Any:
        card = shared_testcard()
        return SoftCardBackend(
            Path(card.soft_card), None, card.ca_intermediate_certificates()
        )

    @inlineCallbacks
    def test_no_signature_key(self) -> Any:
        """
        The signature certificate and signatures with the signature key
        are 409 no-signature-key, saying that the card cannot sign
        submissions, not 503 "no card"; the authentication key serves.
        """
        context = yield self.session()
        # A request as the project's signer makes it (with the signing
        # policy off, as here, only its SignedInfo is read).
        some = self.testcard.ca_root_certificate()
        request = json.dumps(
            {"data": base64.b64encode(signature_request(some)).decode()}
        ).encode()
        for method, path, body in [
            ("GET", "/cps/signatureCertificate", None),
            ("POST", "/cps/sign/for/signature/SHA256WithRSA", request),
        ]:
            answer = yield self.request(
                method,
                path,
                {"Content-Type": "application/json"},
                body,
                context["token"],
            )
            document = self.assertProblem(answer, 409, problems.NO_SIGNATURE_KEY)
            self.assertIn("no signature key", document["detail"])
            self.assertIn("cannot sign submissions", document["detail"])
        client = CpsAgentClient.from_context(context)
        self.addCleanup(client.close)
        yield self.assertFailure(client.signature_certificate_chain(), NoSignatureKey)
        yield client.certificate_chain()


class _Endless(Resource):
    """
    A 200 whose chunked body never ends: 64 KiB chunks for as long as the
    connection lasts.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0
        self.lost: Deferred[None] = Deferred()

    def render_GET(self, request: Request) -> Any:
        request.setHeader(b"content-type", b"application/json")
        ended = request.notifyFinish()
        ended.addBoth(lambda _: self.lost.callback(None))

        def more() -> None:
            if ended.called:
                return
            request.write(b" " * 65536)
            self.sent += 65536
            reactor.callLater(0, more)  # type: ignore[attr-defined]

        more()
        return NOT_DONE_YET


class _Announced(Resource):
    """
    A 200 that announces a gigabyte of body and sends none of it.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.lost: Deferred[None] = Deferred()

    def render_GET(self, request: Request) -> Any:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"1000000000")
        request.notifyFinish().addBoth(lambda _: self.lost.callback(None))
        request.write(b"{")
        return NOT_DONE_YET


class _Fixed(Resource):
    """
    Fixed answers by path: C{answers[path] = (code, headers, body)}.
    """

    isLeaf = True

    def __init__(self, answers: Mapping[str, tuple[int, dict[str, str], bytes]]):
        super().__init__()
        self.answers = answers

    def render(self, request: Request) -> bytes:
        code, headers, body = self.answers[request.path.decode()]
        request.setResponseCode(code)
        for name, value in headers.items():
            request.setHeader(name, value)
        return body


class _EndlessHeader(Protocol):
    """
    Answers a request with a status line, then 8 KiB header lines, 64 KiB a
    turn, for as long as the connection lasts: what no HTTP server sends.
    """

    factory: _EndlessHeaders

    def dataReceived(self, data: bytes) -> None:
        if self.factory.sent:
            return
        self.transport.write(b"HTTP/1.1 200 OK\r\n")  # type: ignore[union-attr]
        self.more()

    def more(self) -> None:
        if self.factory.lost.called:
            return
        line = b"x-filler: " + b"a" * 8180 + b"\r\n"
        self.transport.write(line * 8)  # type: ignore[union-attr]
        self.factory.sent += len(line) * 8
        reactor.callLater(0, self.more)  # type: ignore[attr-defined]

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.lost.callback(None)


class _EndlessHeaders(ServerFactory):
    protocol = _EndlessHeader

    def __init__(self) -> None:
        self.sent = 0
        self.lost: Deferred[None] = Deferred()


_JSON = {"content-type": "application/json"}


class HostileAnswerTests(TestCase):
    """
    CpsAgentClient in front of something that answers as no agent does.
    """

    def client(self, resource: Resource | ServerFactory) -> CpsAgentClient:
        hostile = HostileAgent(self, resource)
        client = CpsAgentClient.from_context(hostile.context(), timeout=10)
        self.addCleanup(client.close)
        return client

    @inlineCallbacks
    def test_endless_answer(self) -> Any:
        """
        An endless chunked answer is read up to the limit, then refused and
        its connection closed, long before the timeout.
        """
        endless = _Endless()
        client = self.client(endless)
        failure = yield self.assertFailure(client.card(), AgentError)
        self.assertNotIsInstance(failure, AgentUnreachable)
        self.assertIn(
            f"the agent's answer to GET /cps/card exceeds {MAX_ANSWER_BYTES} bytes",
            str(failure),
        )
        yield endless.lost
        self.assertLess(endless.sent, 64 * MAX_ANSWER_BYTES)

    @inlineCallbacks
    def test_endless_headers(self) -> Any:
        """
        Header lines that never end are read up to the limit of a whole
        answer, then refused and their connection dropped, long before the
        timeout.
        """
        endless = _EndlessHeaders()
        client = self.client(endless)
        failure = yield self.assertFailure(client.card(), AgentError)
        self.assertNotIsInstance(failure, AgentUnreachable)
        self.assertIn(
            "the agent's answer to GET /cps/card exceeds "
            f"{MAX_ANSWER_BYTES + MAX_HEAD_BYTES} bytes, headers included",
            str(failure),
        )
        yield endless.lost
        self.assertLess(endless.sent, 64 * (MAX_ANSWER_BYTES + MAX_HEAD_BYTES))

    @inlineCallbacks
    def test_limit_is_per_answer(self) -> Any:
        """
        Answers on one kept connection are each held to the limit, not all
        of them together.
        """
        body = json.dumps(
            {
                "present": True,
                "holder": {"id": "8", "name": "A", "profession": "B"},
                "padding": " " * (MAX_ANSWER_BYTES - 1000),
            }
        ).encode()
        client = self.client(_Fixed({"/cps/card": (200, _JSON, body)}))
        for _ in range(3):
            card = yield client.card()
            self.assertEqual(card["holder"]["id"], "8")

    @inlineCallbacks
    def test_announced_too_large(self) -> Any:
        """
        A Content-Length over the limit is refused as soon as it is read,
        without waiting for the body.
        """
        announced = _Announced()
        client = self.client(announced)
        failure = yield self.assertFailure(client.certificate_chain(), AgentError)
        self.assertIn(
            "the agent's answer to GET /cps/authenticationCertificate exceeds "
            f"{MAX_ANSWER_BYTES} bytes",
            str(failure),
        )
        yield announced.lost

    @inlineCallbacks
    def test_redirect_refused(self) -> Any:
        """
        A 302 is not followed, and is an error, not a card.
        """
        card = json.dumps(
            {"present": True, "holder": {"id": "8", "name": "A", "profession": "B"}}
        ).encode()
        client = self.client(
            _Fixed(
                {
                    "/cps/card": (302, {"location": "/elsewhere"}, b""),
                    "/elsewhere": (200, _JSON, card),
                }
            )
        )
        failure = yield self.assertFailure(client.card(), AgentError)
        self.assertIn("the agent answered GET /cps/card: HTTP 302", str(failure))

    @inlineCallbacks
    def test_problem_quoted_in_one_short_line(self) -> Any:
        """
        A problem's long, many-lined detail and title are quoted in one line
        cut to L{MAX_QUOTED} characters, in the error and in its problem.
        """
        detail = "the card said:\n" + "line\r\n\tof words\x1b[2J " * 10000
        problem = {
            "type": problems.TOKEN_EXPIRED,
            "title": "expired\n" * 1000,
            "detail": detail,
            "status": 401,
        }
        client = self.client(
            _Fixed(
                {
                    "/cps/card": (
                        401,
                        {"content-type": "application/problem+json"},
                        json.dumps(problem).encode(),
                    )
                }
            )
        )
        failure = yield self.assertFailure(client.card(), TokenExpired)
        said = str(failure)
        self.assertTrue(
            said.startswith(
                "the agent answered GET /cps/card: the card said: line of words"
            ),
            said,
        )
        self.assertTrue(said.endswith("…"), said)
        self.assertLessEqual(len(said), MAX_QUOTED + 40)
        for name in ("title", "detail"):
            quoted = failure.problem[name]
            self.assertLessEqual(len(quoted), MAX_QUOTED)
            self.assertTrue(quoted.endswith("…"), quoted)
            self.assertTrue(quoted.isprintable(), quoted)
        self.assertIn(failure.problem["detail"], said)
        self.assertEqual(failure.problem["status"], 401)

    @inlineCallbacks
    def test_retry_after_bounded(self) -> Any:
        """
        A wait of the agent's is taken when it is a whole number of seconds
        from 1 to 3600; any other is taken as none, so that it is not
        passed on.
        """
        for given, taken in [
            (10, 10),
            (3600, 3600),
            (10**30, None),
            (0, None),
            (-5, None),
            (True, None),
            (1.5, None),
            ("10", None),
        ]:
            problem = {"type": problems.RATE_LIMITED, "retryAfter": given}
            client = self.client(
                _Fixed({"/cps/card": (429, _JSON, json.dumps(problem).encode())})
            )
            failure = yield self.assertFailure(client.card(), RateLimited)
            self.assertEqual(failure.retry_after, taken, given)

    @inlineCallbacks
    def test_deeply_nested_answer(self) -> Any:
        """
        An answer nested deeper than Python's stack reads is refused as the
        agent's error, in words, not as an agent that did not answer.
        """
        body = b"[" * 100_000 + b"]" * 100_000
        client = self.client(_Fixed({"/cps/card": (200, _JSON, body)}))
        failure = yield self.assertFailure(client.card(), AgentError)
        self.assertNotIsInstance(failure, AgentUnreachable)
        self.assertEqual(
            str(failure),
            "the agent's answer to GET /cps/card is JSON nested too deeply",
        )

    @inlineCallbacks
    def test_member_twice(self) -> Any:
        """
        An answer with a member twice in one object is refused, as the
        agent's requests are.
        """
        body = b'{"present": true, "present": false}'
        client = self.client(_Fixed({"/cps/card": (200, _JSON, body)}))
        failure = yield self.assertFailure(client.card(), AgentError)
        self.assertEqual(
            str(failure),
            "the agent's answer to GET /cps/card has the member 'present' twice "
            "in one object",
        )

    @inlineCallbacks
    def test_short_problem_quoted_whole(self) -> Any:
        """
        A detail of one short line is quoted as the agent said it.
        """
        problem = {"type": problems.NO_CARD, "detail": "no card in the reader"}
        client = self.client(
            _Fixed({"/cps/card": (503, _JSON, json.dumps(problem).encode())})
        )
        failure = yield self.assertFailure(client.card(), NoCard)
        self.assertEqual(
            str(failure), "the agent answered GET /cps/card: no card in the reader"
        )
        self.assertEqual(failure.problem["detail"], "no card in the reader")

    @inlineCallbacks
    def test_holder_checked(self) -> Any:
        """
        A holder whose members are not short strings is refused, naming the
        member.
        """
        for holder, said in [
            ({"id": "8" * 300, "name": "A", "profession": "B"}, "'holder.id' longer"),
            ({"id": "8", "name": ["A"], "profession": "B"}, "'holder.name' as a"),
            ({"id": "8", "name": "A"}, "lacks 'holder.profession'"),
            (None, "lacks the 'holder' object"),
        ]:
            body = json.dumps({"present": True, "holder": holder}).encode()
            client = self.client(_Fixed({"/cps/card": (200, _JSON, body)}))
            failure = yield self.assertFailure(client.card(), AgentError)
            self.assertIn(said, str(failure))

    @inlineCallbacks
    def test_malformed_answers_named(self) -> Any:
        """
        JSON that lacks what the client needs is refused naming the member
        and the request, not with a KeyError's representation.
        """
        path = "/cps/authenticationCertificate"
        for body, said in [
            (b"{}", "lacks 'certificate'"),
            (b'{"certificate": 3}', "lacks 'certificate'"),
            (b'{"certificate": "AAAA", "chain": "x"}', "'chain' that is not"),
            (b'{"certificate": "AAAA"}', "holds an unreadable certificate"),
        ]:
            client = self.client(_Fixed({path: (200, _JSON, body)}))
            failure = yield self.assertFailure(client.certificate_chain(), AgentError)
            self.assertIn(f"the agent's answer to GET {path}", str(failure))
            self.assertIn(said, str(failure))
        signing = "/cps/sign/for/authentication/SHA256WithRSA"
        client = self.client(_Fixed({signing: (200, _JSON, b'{"sig": "AA=="}')}))
        failure = yield self.assertFailure(
            client.sign(b"data", "SHA256WithRSA"), AgentError
        )
        self.assertIn(f"the agent's answer to POST {signing}", str(failure))
        self.assertIn("lacks 'signature'", str(failure))


class PeerNameTests(SynchronousTestCase):
    """
    How a caller is named in the agent's logs and audit records, whatever
    kind of address it has.
    """

    def test_ip_addresses(self) -> None:
        self.assertEqual(peer_name(IPv4Address("TCP", "127.0.0.1", 5000)), "127.0.0.1")
        self.assertEqual(peer_name(IPv6Address("TCP", "::1", 5000)), "::1")

    def test_other_addresses(self) -> None:
        """
        A UNIX socket's caller has no host: it is named all the same, rather
        than failing the request.
        """
        self.assertEqual(peer_name(UNIXAddress(b"/run/x/asock")), "unix:/run/x/asock")
        self.assertEqual(peer_name(UNIXAddress(None)), "unix:(unnamed)")
        self.assertEqual(peer_name(None), "unknown")
