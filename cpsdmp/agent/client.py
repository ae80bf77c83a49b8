"""
The agent seen from elsewhere: a treq client built from an agent context that
talks to exactly the agent whose TLS certificate the context names, and
serves the TLS client as an L{IRemoteKey}.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL, crypto
from treq.client import HTTPClient
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
    fail,
    succeed,
)
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import (
    IConsumer,
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    HTTPConnectionPool,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IPolicyForHTTPS
from zope.interface import implementer

from cpsdmp.agent import problems

# Re-exported: the facade reads the holder from the certificate as the agent
# does, and imports nothing of the agent but this module.
from cpsdmp.agent.holder import Holder as Holder
from cpsdmp.agent.holder import holder_from_certificate as holder_from_certificate
from cpsdmp.agent.policy import CARD_TLS_SCHEMES
from cpsdmp.protocols import strictjson
from cpsdmp.protocols.tls.interfaces import IRemoteKey
from cpsdmp.protocols.tls.schemes import SignatureScheme

DEFAULT_TIMEOUT = 30.0

#: The most read of one agent answer: its answers are a few KB (a certificate
#: chain, a signature), so anything far larger is not an agent's.
MAX_ANSWER_BYTES = 1024 * 1024

#: What an answer's status line and headers may add to its body, read from
#: the connection: the agent's take a few hundred bytes.
MAX_HEAD_BYTES = 256 * 1024

#: The most quoted of what the agent says in a problem (its title, its
#: detail), in characters: one line, for a log or a professional to read.
MAX_QUOTED = 300

#: The longest holder member taken from C{/cps/card}: an identifier, a name
#: and a profession are short.
MAX_HOLDER_MEMBER = 256

# The TLS signature schemes the card's keys serve, and the agent's name of
# each: the ones, in the order, the agent's policy expects of a handshake.
SCHEME_ALGORITHMS: Mapping[SignatureScheme, str] = CARD_TLS_SCHEMES


class AgentError(Exception):
    """
    The agent refused or failed; C{problem} is its problem document, if any,
    its title and detail cut to one short line (L{MAX_QUOTED}).
    """

    def __init__(self, message: str, problem: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.problem = dict(problem or {})


class AgentUnreachable(AgentError):
    """
    No answer from the agent: not started, not listening there, or too slow.
    """


class AgentCertificateMismatch(AgentError):
    """
    Something answered at the agent's address with another TLS certificate
    than the agent context names.
    """


class TokenExpired(AgentError):
    """
    The context's token is expired or unknown: the professional must enter
    the PIN again.
    """


class WrongPin(AgentError):
    """
    The PIN was refused: by the card, or, while sessions are open, by the
    agent, which then does not ask the card; C{tries_left} is C{None} when
    the card did not say.
    """

    @property
    def tries_left(self) -> int | None:
        value = self.problem.get("triesLeft")
        return value if isinstance(value, int) else None


class PinLastTry(AgentError):
    """
    The card's next wrong PIN blocks it: the agent did not present this
    one, and presents one only when the professional confirms that it is
    the last try (L{open_session}'s C{last_try}).
    """


class PinPause(AgentError):
    """
    A wrong PIN was entered moments ago, or the card is checking another
    one: the agent takes no other PIN before C{retry_after} seconds, and did
    not ask the card.
    """

    @property
    def retry_after(self) -> int | None:
        return _retry_after(self.problem)


class RateLimited(AgentError):
    """
    The session asked for more signatures than the agent allows in its
    window: the card was not asked; C{retry_after} seconds until it may be.
    """

    @property
    def retry_after(self) -> int | None:
        return _retry_after(self.problem)


#: The longest wait taken from an agent's C{retryAfter}, in seconds: its
#: pauses and windows are seconds to minutes, and the value may be passed
#: on to a backend as a Retry-After header.
MAX_RETRY_AFTER = 3600


def _retry_after(problem: Mapping[str, Any]) -> int | None:
    """
    @return: the problem's C{retryAfter}, when a whole number of seconds
        from 1 to L{MAX_RETRY_AFTER}; else C{None}, as if it had none.
    """
    value = problem.get("retryAfter")
    if isinstance(value, int) and not isinstance(value, bool):
        if 1 <= value <= MAX_RETRY_AFTER:
            return value
    return None


class PinBlocked(AgentError):
    """
    The card's PIN is blocked.
    """


class NoCard(AgentError):
    """
    No card (or not the right one) in the workstation's reader.
    """


class NoSignatureKey(AgentError):
    """
    The card has no signature key: it cannot sign submissions.
    """


class CardRemoved(AgentError):
    """
    The card was taken out during the operation.
    """


class CardTimeout(AgentError):
    """
    The card did not answer the agent in time (a reader or a card that
    hangs); the agent gave up waiting for it.
    """


_ERRORS: Mapping[str, type[AgentError]] = {
    problems.WRONG_PIN: WrongPin,
    problems.PIN_PAUSE: PinPause,
    problems.PIN_LAST_TRY: PinLastTry,
    problems.PIN_BLOCKED: PinBlocked,
    problems.RATE_LIMITED: RateLimited,
    problems.NO_CARD: NoCard,
    problems.KEY_NOT_FOUND: NoCard,
    problems.NO_SIGNATURE_KEY: NoSignatureKey,
    problems.CARD_REMOVED: CardRemoved,
    problems.CARD_FAULT: CardRemoved,
    problems.CARD_TIMEOUT: CardTimeout,
    problems.TOKEN_MISSING: TokenExpired,
    problems.TOKEN_EXPIRED: TokenExpired,
    problems.CARD_LOCKED: TokenExpired,
}


def parse_fingerprint(value: str) -> bytes:
    """
    @return: the digest of a C{"sha256:<hex>"} fingerprint.
    @raise ValueError: for anything else.
    """
    algorithm, _, hexdigest = value.partition(":")
    digest = bytes.fromhex(hexdigest.replace(":", "")) if algorithm == "sha256" else b""
    if len(digest) != 32:
        raise ValueError(f"not a sha256:<hex> certificate fingerprint: {value!r}")
    return digest


@implementer(IOpenSSLClientConnectionCreator)
class _PinnedCreator:
    def __init__(self, policy: PinnedCertificatePolicy) -> None:
        self._policy = policy

    def _verify(
        self,
        connection: SSL.Connection,
        certificate: crypto.X509,
        errno: int,
        depth: int,
        ok: int,
    ) -> bool:
        # Only the agent's own certificate matters; it is self-signed, so
        # OpenSSL's own verdict ("ok") is not what decides.
        if depth != 0:
            return True
        der = certificate.to_cryptography().public_bytes(Encoding.DER)
        digest = hashlib.sha256(der).digest()
        if hmac.compare_digest(digest, self._policy.digest):
            return True
        self._policy.refused = "sha256:" + digest.hex()
        return False

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_verify(SSL.VERIFY_PEER, self._verify)
        connection = SSL.Connection(context, None)
        connection.set_app_data(tlsProtocol)
        connection.set_connect_state()
        return connection


@implementer(IPolicyForHTTPS)
class PinnedCertificatePolicy:
    """
    Accept an HTTPS server only if its certificate's SHA-256 is the pinned
    one; C{refused} keeps the fingerprint of the last certificate refused.
    """

    def __init__(self, tls_fingerprint: str) -> None:
        self.fingerprint = tls_fingerprint
        self.digest = parse_fingerprint(tls_fingerprint)
        self.refused: str | None = None

    def creatorForNetloc(self, hostname: bytes, port: int) -> _PinnedCreator:
        return _PinnedCreator(self)


@implementer(IBodyProducer)
class _BytesProducer:
    """
    A request body written whole at once, so that it leaves in the same TCP
    segment as the request's head (treq's default producer writes it on a
    later turn of the reactor, a separate segment that costs a round trip).
    """

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _CappedBody(Protocol):
    """
    Collects a response body up to C{limit} bytes; past it, or when the
    announced length is past it, stops the connection at once (no TLS
    close, no reading on) and fails L{done} with C{too_large}.
    """

    def __init__(self, limit: int, announced: int, too_large: AgentError) -> None:
        self.done: Deferred[bytes] = Deferred()
        self._limit = limit
        self._announced = announced
        self._received = 0
        self._chunks: list[bytes] = []
        self._too_large = too_large

    def connectionMade(self) -> None:
        if self._announced > self._limit:
            self._stop()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._received += len(data)
        if self._received > self._limit:
            self._stop()
        else:
            self._chunks.append(data)

    def _stop(self) -> None:
        # The HTTP client's transport proxy hands stopProducing to the
        # connection, which closes without a TLS close or waiting for the peer.
        self.transport.stopProducing()  # type: ignore[union-attr]
        self.done.errback(self._too_large)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):  # type: ignore[no-untyped-call]
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)


class _OverBudget(Exception):
    """
    The connection was dropped: the answer read on it passed its budget.
    """


class _BudgetedConnection(ProtocolWrapper):
    """
    Between the HTTP client and the TLS connection: counts the bytes read
    since the client last wrote (a request), and past the factory's budget
    drops the connection, without reading on, and tells the client why.

    The HTTP client bounds each header line but not their number; this
    bounds everything an answer makes it hold. An answer whose body runs to
    the connection's close, cut here, reads as ended where it was cut (the
    client gives no reason for such an end): a body the agent could have
    sent as well, still bounded.
    """

    factory: _Budget

    def __init__(self, factory: _Budget, wrapped: IProtocol) -> None:
        super().__init__(factory, wrapped)
        self._read = 0
        self._dropped = False

    def write(self, data: bytes) -> None:
        self._read = 0
        super().write(data)  # type: ignore[no-untyped-call]

    def writeSequence(self, data: list[bytes]) -> None:
        self._read = 0
        super().writeSequence(data)  # type: ignore[no-untyped-call]

    def dataReceived(self, data: bytes) -> None:
        if self._dropped:
            return
        self._read += len(data)
        if self._read > self.factory.budget:
            self._dropped = True
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        super().dataReceived(data)  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._dropped:
            reason = Failure(_OverBudget())  # type: ignore[no-untyped-call]
        super().connectionLost(reason)  # type: ignore[no-untyped-call]


class _Budget(WrappingFactory[_BudgetedConnection]):
    protocol = _BudgetedConnection

    def __init__(self, wrapped: IProtocolFactory, budget: int) -> None:
        super().__init__(wrapped)  # type: ignore[no-untyped-call]
        self.budget = budget


@implementer(IStreamClientEndpoint)
class _BudgetedEndpoint:
    def __init__(self, wrapped: IStreamClientEndpoint, budget: int) -> None:
        self._wrapped = wrapped
        self._budget = budget

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        def unwrapped(wrapper: IProtocol) -> IProtocol:
            assert isinstance(wrapper, _BudgetedConnection)
            return wrapper.wrappedProtocol

        d = self._wrapped.connect(_Budget(protocolFactory, self._budget))
        return d.addCallback(unwrapped)


@implementer(IAgentEndpointFactory)
class _PinnedEndpoints:
    """
    The agent's connections: TLS only, to the certificate C{policy} pins,
    each holding at most C{budget} bytes of one answer.
    """

    def __init__(
        self, reactor: Any, policy: PinnedCertificatePolicy, timeout: float, budget: int
    ) -> None:
        self._reactor = reactor
        self._policy = policy
        self._timeout = timeout
        self._budget = budget

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        if uri.scheme != b"https":
            raise SchemeNotSupported(f"the agent answers on https, not {uri.scheme!r}")
        tcp = HostnameEndpoint(
            self._reactor, uri.host.decode("ascii"), uri.port, timeout=self._timeout
        )
        tls = wrapClientTLS(self._policy.creatorForNetloc(uri.host, uri.port), tcp)
        return _BudgetedEndpoint(tls, self._budget)


def _reactor_or_default(reactor: Any) -> Any:
    if reactor is None:
        from twisted.internet import reactor as default

        return default
    return reactor


class _Channel:
    """
    HTTPS to one agent with one persistent connection pool, pinned, with a
    timeout on every call, mapping failures and problems to exceptions.
    """

    def __init__(
        self,
        url: str,
        tls_fingerprint: str,
        reactor: Any,
        timeout: float,
        max_answer: int = MAX_ANSWER_BYTES,
    ):
        self.url = url.rstrip("/")
        self.reactor = _reactor_or_default(reactor)
        self.timeout = timeout
        self.max_answer = max_answer
        self.policy = PinnedCertificatePolicy(tls_fingerprint)
        # twisted.web.client carries no annotations: hence the Any.
        make_pool: Any = HTTPConnectionPool
        make_agent: Any = Agent
        self._pool = make_pool(self.reactor, persistent=True)
        self._pool.maxPersistentPerHost = 8
        # The body is capped as it is read (_CappedBody); the connection
        # itself, where the status line and headers are read, to a little
        # more.
        self.max_read = max_answer + MAX_HEAD_BYTES
        endpoints = _PinnedEndpoints(self.reactor, self.policy, timeout, self.max_read)
        agent = make_agent.usingEndpointFactory(self.reactor, endpoints, self._pool)
        self.http = HTTPClient(agent, data_to_body_producer=_BytesProducer)

    def request(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes | None = None,
    ) -> Deferred[tuple[int, Mapping[str, Any] | bytes]]:
        """
        @return: a Deferred that fires with the status and the JSON body (or
            the raw body when not JSON) of a 2xx answer, or fails with an
            L{AgentError}.
        """
        d = Deferred.fromCoroutine(self._request(method, path, headers, body))

        def timed_out(result: object, timeout: float) -> object:
            raise AgentUnreachable(
                f"the agent at {self.url} did not answer {method} {path} "
                f"within {timeout:g} s"
            )

        d.addTimeout(self.timeout, self.reactor, onTimeoutCancel=timed_out)
        d.addErrback(self._failed, method, path)
        return d

    async def _request(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes | None,
    ) -> tuple[int, Mapping[str, Any] | bytes]:
        # Redirects are not followed: an agent answers where it is asked.
        response = await self.http.request(
            method,
            self.url + path,
            headers=Headers({k: [v] for k, v in headers.items()}),
            data=body,
            allow_redirects=False,
            unbuffered=True,
        )
        content = await self._read(response, method, path)
        content_type = (response.headers.getRawHeaders("content-type") or [""])[0]
        is_json = content_type.split(";")[0].strip().endswith("json")
        if 200 <= response.code < 300:
            if is_json:
                return response.code, _json(content, method, path)
            return response.code, content
        problem = _json(content, method, path) if is_json else {}
        for name in ("title", "detail"):
            if problem.get(name):
                problem[name] = _one_line(str(problem[name]))
        detail = problem.get("detail") or f"HTTP {response.code}"
        error = _ERRORS.get(str(problem.get("type")), AgentError)
        raise error(f"the agent answered {method} {path}: {detail}", problem)

    async def _read(self, response: Any, method: str, path: str) -> bytes:
        """
        @return: the answer's body, read as it comes up to L{max_answer}
            bytes; past that, or when its Content-Length says it would be,
            the connection is stopped and the answer refused.
        """
        length = response.length
        body = _CappedBody(
            self.max_answer,
            length if isinstance(length, int) else 0,
            AgentError(
                f"the agent's answer to {method} {path} exceeds {self.max_answer} bytes"
            ),
        )
        response.deliverBody(body)
        content: bytes = await body.done
        return content

    def _failed(self, failure: Failure, method: str, path: str) -> Failure:
        error = failure.value
        if isinstance(error, AgentError):
            return failure
        if self.policy.refused is not None:
            # The certificate seen is not quoted: with a context naming any
            # address, that would tell who holds which certificate there.
            self.policy.refused = None
            raise AgentCertificateMismatch(
                f"refusing {self.url}: its TLS certificate does not match the "
                f"agent context's {self.policy.fingerprint}; it is another "
                "agent or a restarted one, so open a new session"
            )
        reasons = getattr(error, "reasons", [])
        if any(reason.check(_OverBudget) for reason in reasons):
            raise AgentError(
                f"the agent's answer to {method} {path} exceeds {self.max_read} "
                "bytes, headers included"
            )
        if isinstance(error, (TimeoutError, CancelledError)):
            raise AgentUnreachable(
                f"the agent at {self.url} did not answer {method} {path} "
                f"within {self.timeout:g} s"
            )
        if isinstance(error, ConnectError):
            raise AgentUnreachable(
                f"cannot reach the agent at {self.url} ({error}): is cpsagent "
                "running on the workstation?"
            )
        raise AgentUnreachable(
            f"no answer from the agent at {self.url} to {method} {path}: "
            f"{_in_words(error)}"
        )

    def close(self) -> Deferred[None]:
        closing: Deferred[None] = self._pool.closeCachedConnections()
        return closing


def _one_line(text: str) -> str:
    """
    @return: C{text}, from the agent, as one line of printable characters,
        cut to L{MAX_QUOTED} with an ellipsis.
    """
    printable = "".join(c if c.isprintable() else " " for c in text[: 4 * MAX_QUOTED])
    line = " ".join(printable.split())
    if len(line) > MAX_QUOTED or len(text) > 4 * MAX_QUOTED:
        return line[: MAX_QUOTED - 1].rstrip() + "…"
    return line


def _json(content: bytes, method: str, path: str) -> dict[str, Any]:
    # Read as the servers here read requests: a member twice, or nesting
    # deep enough to exhaust Python's stack, is refused in words.
    try:
        value = strictjson.loads(content)
    except strictjson.JsonRefused as error:
        raise AgentError(
            f"the agent's answer to {method} {path} {_one_line(str(error))}"
        ) from None
    if not isinstance(value, dict):
        raise AgentError(
            f"the agent answered {method} {path} with JSON that is not an object"
        )
    return value


def open_session(
    url: str,
    pin: str,
    tls_fingerprint: str,
    reactor: Any = None,
    timeout: float = DEFAULT_TIMEOUT,
    last_try: bool = False,
) -> Deferred[dict[str, Any]]:
    """
    Unlock the card with C{pin}, as the frontend does.

    @param last_try: the professional knows that a wrong PIN now blocks
        the card (after a L{PinLastTry}), and the agent may present it.
    @return: a Deferred that fires with the agent context.
    """
    channel = _Channel(url, tls_fingerprint, reactor, timeout)
    body = _dumps({"pin": pin, "lastTry": True} if last_try else {"pin": pin})
    d = channel.request(
        "POST", "/cps/session", {"Content-Type": "application/json"}, body
    )

    def context(answer: tuple[int, Mapping[str, Any] | bytes]) -> dict[str, Any]:
        _, content = answer
        if not isinstance(content, Mapping):
            raise AgentError("the agent answered a session with no JSON")
        return dict(content)

    def closed(result: Any) -> Any:
        return channel.close().addCallback(lambda _: result)

    return d.addCallback(context).addBoth(closed)


def _dumps(value: Mapping[str, Any]) -> bytes:
    import json

    return json.dumps(value).encode()


def _card(content: Mapping[str, Any] | bytes) -> dict[str, Any]:
    said = "the agent's answer to GET /cps/card"
    if not isinstance(content, Mapping):
        raise AgentError(f"{said} is not JSON")
    holder = content.get("holder")
    if not isinstance(holder, Mapping):
        raise AgentError(f"{said} lacks the 'holder' object")
    for name in ("id", "name", "profession"):
        value = holder.get(name)
        if not isinstance(value, str):
            raise AgentError(f"{said} lacks 'holder.{name}' as a string")
        if len(value) > MAX_HOLDER_MEMBER:
            raise AgentError(
                f"{said} has a 'holder.{name}' longer than {MAX_HOLDER_MEMBER} "
                "characters"
            )
    return dict(content)


def _certificates(
    content: Mapping[str, Any] | bytes, path: str
) -> list[x509.Certificate]:
    said = f"the agent's answer to GET {path}"
    if not isinstance(content, Mapping):
        raise AgentError(f"{said} is not JSON")
    leaf = content.get("certificate")
    chain = content.get("chain", [])
    if not isinstance(leaf, str):
        raise AgentError(f"{said} lacks 'certificate' as a base64 string")
    if not isinstance(chain, list) or not all(isinstance(c, str) for c in chain):
        raise AgentError(f"{said} has a 'chain' that is not a list of base64 strings")
    try:
        return [
            x509.load_der_x509_certificate(base64.b64decode(d, validate=True))
            for d in [leaf, *chain]
        ]
    except ValueError as e:
        raise AgentError(f"{said} holds an unreadable certificate: {e}") from None


#: What the HTTP client's failures mean, in words a professional can act on.
_HTTP_FAILURES: tuple[tuple[type[BaseException], str], ...] = (
    (ResponseNeverReceived, "the connection ended before the answer came"),
    (ResponseFailed, "the connection ended during the answer"),
    (RequestTransmissionFailed, "the connection ended while the request was sent"),
    (RequestGenerationFailed, "the request could not be sent"),
)


def _in_words(error: BaseException | None) -> str:
    """
    @return: what went wrong with an exchange, without the HTTP client's
        exception representation.
    """
    for kind, words in _HTTP_FAILURES:
        if isinstance(error, kind):
            return words
    return str(error or "") or type(error).__name__


@implementer(IRemoteKey)
class CpsAgentClient:
    """
    The professional's card, through the agent an agent context names.
    """

    supported_signature_schemes: Sequence[SignatureScheme] = tuple(SCHEME_ALGORITHMS)

    def __init__(
        self,
        url: str,
        token: str,
        tls_fingerprint: str,
        reactor: Any = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.url = url
        self._token = token
        self._channel = _Channel(url, tls_fingerprint, reactor, timeout)

    @classmethod
    def from_context(
        cls,
        context: Mapping[str, Any],
        reactor: Any = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> CpsAgentClient:
        """
        @param context: C{{"url", "token", "tlsFingerprint", ...}} as the
            agent handed it out.
        """
        try:
            return cls(
                str(context["url"]),
                str(context["token"]),
                str(context["tlsFingerprint"]),
                reactor,
                timeout,
            )
        except KeyError as e:
            raise ValueError(f"the agent context lacks {e.args[0]!r}") from None

    def __repr__(self) -> str:
        return f"<CpsAgentClient {self.url}>"

    def _headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}", **extra}

    def close(self) -> Deferred[None]:
        """
        Close the pooled connections to the agent.
        """
        return self._channel.close()

    def card(self) -> Deferred[dict[str, Any]]:
        """
        @return: a Deferred that fires with the card's description:
            C{{"present": True, "holder": {"id", "name", "profession"}}}.
        """
        d = self._channel.request("GET", "/cps/card", self._headers())
        return d.addCallback(lambda answer: _card(answer[1]))

    def _chain(self, path: str) -> Deferred[list[x509.Certificate]]:
        d = self._channel.request("GET", path, self._headers())
        return d.addCallback(lambda answer: _certificates(answer[1], path))

    def certificate_chain(self) -> Deferred[list[x509.Certificate]]:
        """
        @return: a Deferred that fires with the authentication certificate
            and its intermediates.
        """
        return self._chain("/cps/authenticationCertificate")

    def signature_certificate_chain(self) -> Deferred[list[x509.Certificate]]:
        """
        @return: a Deferred that fires with the signature certificate and its
            intermediates.
        """
        return self._chain("/cps/signatureCertificate")

    def _sign(self, usage: str, data: bytes, algorithm: str) -> Deferred[bytes]:
        d = self._channel.request(
            "POST",
            f"/cps/sign/for/{usage}/{algorithm}",
            self._headers(
                **{
                    "Content-Type": "application/octet-stream",
                    "Accept": "application/octet-stream",
                }
            ),
            data,
        )

        def signature(answer: tuple[int, Mapping[str, Any] | bytes]) -> bytes:
            content = answer[1]
            if not isinstance(content, Mapping):
                return content
            value = content.get("signature")
            try:
                if isinstance(value, str):
                    return base64.b64decode(value, validate=True)
            except ValueError:
                pass
            raise AgentError(
                f"the agent's answer to POST /cps/sign/for/{usage}/{algorithm} "
                "lacks 'signature' as a base64 string"
            )

        return d.addCallback(signature)

    def sign(self, data: bytes, algorithm: str | SignatureScheme) -> Deferred[bytes]:
        """
        Sign C{data} with the card's authentication key. C{algorithm} is an
        agent algorithm name (C{"SHA256WithRSA"}) or a TLS signature scheme.

        @return: a Deferred that fires with the PKCS#1 v1.5 signature.
        """
        if isinstance(algorithm, SignatureScheme):
            name = SCHEME_ALGORITHMS.get(algorithm)
            if name is None:
                return fail(
                    ValueError(f"the CPS card does not sign with {algorithm.name}")
                )
            algorithm = name
        return self._sign("authentication", data, algorithm)

    def sign_for_signature(self, request: bytes, algorithm: str) -> Deferred[bytes]:
        """
        Have the card's signature (non-repudiation) key sign a submission-set
        signature request: the signature without its value, as
        L{cpsdmp.xds.signature.sign_submission} hands it to its signer. The
        agent checks it and signs its SignedInfo's exclusive C14N; this is
        a L{cpsdmp.xds.signature.Signer}.

        @return: a Deferred that fires with the PKCS#1 v1.5 signature.
        """
        return self._sign("signature", request, algorithm)

    def lock(self) -> Deferred[None]:
        """
        Lock the card and end every session of the agent.

        @return: a Deferred that fires with C{None} once the agent locked it.
        """
        d = self._channel.request("DELETE", "/cps/session", self._headers())
        return d.addCallback(lambda _: None)
