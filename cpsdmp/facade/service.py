# twisted.web is not annotated.
# mypy: disable-error-code="no-untyped-call"
"""
The DMP side of the facade: for each agent context, the professional's card
(through L{CpsAgentClient}), the card holder, and a pooled HTTPS client over
the remote-key TLS client, kept so that a second request by the same
professional reuses the connection or resumes the TLS session and needs no
new card signature. Each DMP transaction is sent, timed, logged once and
read into the values of L{cpsdmp.xds.transactions}.

A submission whose answer never came has an unknown outcome: before it is
ever sent again, L{DmpService.submit} asks the DMP by uniqueId whether it
was stored.
"""

from __future__ import annotations

import ipaddress
import re
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import treq
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    TimeoutError,
    ensureDeferred,
    maybeDeferred,
)
from twisted.internet.error import ConnectError, ConnectionLost, DNSLookupError
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

# The request a connection of HTTPConnectionPool.getConnection takes, and
# its refusal on a closed connection, are named only in twisted.web's
# _newclient (twisted.web.client uses them the same way).
from twisted.web._newclient import Request, RequestNotSent
from twisted.web.client import (
    URI,
    HTTPConnectionPool,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from cpsdmp.agent.client import (
    AgentError,
    CpsAgentClient,
    TokenExpired,
    holder_from_certificate,
)
from cpsdmp.facade.networks import (
    DEFAULT_AGENT_NETWORKS,
    AgentNetworkReactor,
    Network,
)
from cpsdmp.protocols.safexml import XmlRefused
from cpsdmp.protocols.soap import SoapFault, SoapResponse, read_message
from cpsdmp.protocols.tls import (
    HandshakeFailed,
    IRemoteKey,
    SessionCache,
    SignatureScheme,
    TLSAgentEndpointFactory,
    TLSClientConfig,
    TLSError,
)
from cpsdmp.protocols.tls.alerts import AlertDescription
from cpsdmp.protocols.tls.handshake import State
from cpsdmp.xds.cda import document_entry
from cpsdmp.xds.context import (
    PROFESSION_SYSTEM,
    Professional,
    Software,
    Structure,
    SubmissionDefaults,
)
from cpsdmp.xds.ebrim import (
    CodedValue,
    DocumentEntry,
    MetadataError,
    PatientId,
    Status,
)
from cpsdmp.xds.responses import RegistryFailure, RegistryResult
from cpsdmp.xds.signature import Signer, sign_submission
from cpsdmp.xds.submit import PreparedSubmission, SigningIdentity
from cpsdmp.xds.transactions import (
    DmpEndpoints,
    ExistenceResult,
    FindDocuments,
    OutgoingMessage,
    QueryResult,
    RetrievedDocument,
    Submission,
    existence_test,
    find_documents,
    get_documents,
    new_submission,
    provide_and_register,
    read_existence,
    read_query,
    read_registry_response,
    read_retrieve,
    retrieve_documents,
    update_status,
    update_visibility,
)
from cpsdmp.xds.vihf import NORMAL_ACCESS, VihfRequest

_log = Logger()
T = TypeVar("T")

#: TRE_G15 professions by the label a CPS card carries.
PROFESSIONS: Mapping[str, str] = {
    "médecin": "10",
    "pharmacien": "21",
    "chirurgien-dentiste": "40",
    "sage-femme": "50",
    "infirmier": "60",
    "masseur-kinésithérapeute": "70",
    "pédicure-podologue": "80",
}


class FacadeError(Exception):
    """
    Something the facade itself refuses or cannot do.
    """


class CardHolderError(FacadeError):
    """
    The card holder cannot act on the DMP, or the agent describes another
    one than its certificate names.
    """


class UnknownProfession(CardHolderError):
    """
    The card names a profession the facade has no TRE_G15 code for.
    """


class DmpTimeout(FacadeError):
    """
    The DMP did not answer in time.
    """


class DmpNotReached(DmpTimeout):
    """
    No connection to the DMP was made in time (or its TLS handshake did not
    finish): nothing was sent.
    """


class DmpUnreachable(FacadeError):
    """
    No connection to the DMP could be opened.
    """


class DmpAnswerLost(FacadeError):
    """
    The request went out but its answer never came: its outcome is unknown.
    """


class DmpRequestCut(DmpAnswerLost):
    """
    The connection died while the request was being sent: the DMP may have
    received all of it, part of it or none, so its outcome is unknown.
    """


class DmpHttpError(FacadeError):
    """
    The DMP answered with an HTTP error and no SOAP message.
    """


class DocumentRefused(FacadeError):
    """
    A document of a submission is not one the DMP can take: C{index} says
    which (from 0), C{error} why (a L{CdaError}, L{XmlRefused} or
    L{MetadataError}).
    """

    def __init__(self, index: int, error: Exception) -> None:
        super().__init__(f"documents[{index}]: {error}")
        self.index = index
        self.error = error


class FacadeStopping(FacadeError):
    """
    The facade is stopping: the request was stopped, or not begun.
    """


class TooManyDocuments(FacadeError):
    """
    A submission carries more documents than L{MAX_DOCUMENTS}.
    """


class UnknownOutcome(FacadeError):
    """
    A submission whose answer never came could not be confirmed either way.

    @ivar unique_ids: the uniqueIds of its documents.
    """

    def __init__(self, message: str, unique_ids: Sequence[str]) -> None:
        super().__init__(message)
        self.unique_ids = list(unique_ids)


#: The agent's tokens are 256 random bits in base64url (43 characters); a
#: context may carry another length, but only of those characters, bounded.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,512}")
#: A certificate's SHA-256 as the agent gives it, colons between bytes allowed.
_FINGERPRINT = re.compile(
    r"sha256:(?:[0-9A-Fa-f]{64}|[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){31})"
)
MAX_URL_LENGTH = 2048
#: The most documents one submission carries. The card's signature request
#: lists each document (its uniqueId and digest, some 230 bytes, and some
#: 275 with the longest uniqueId XDS takes, 81 characters) and must stay
#: within the agent's 64 KiB request body: a hundred documents leave room.
MAX_DOCUMENTS = 100


def excerpt(value: object, length: int = 40) -> str:
    """
    @return: the start of a value a request gave, quoted, to name it in an
        error without echoing all of it.
    """
    text = value if isinstance(value, str) else repr(value)
    if len(text) > length:
        return repr(text[:length]) + f"... ({len(text)} characters)"
    return repr(text)


#: A label of a DNS name (RFC 1123, 2.1): letters, digits and inner hyphens.
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", re.ASCII)
#: A port as plain decimal digits, without a leading zero.
_PORT = re.compile(r"[1-9][0-9]{0,4}", re.ASCII)


def _agent_host(host: str) -> bool:
    """
    @return: whether C{host} (lowercase, without a trailing dot) is an IPv4
        address in dotted-quad form, or a DNS name whose last label is not
        all digits: the shorthand forms an address resolver reads
        (C{127.1}, C{0x7f.1}, C{2130706433}) are neither.
    """
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        pass
    else:
        return True
    labels = host.split(".")
    return (
        len(host) <= 253
        and all(_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    )


def _agent_url(url: str) -> str:
    """
    @return: C{url} as the facade uses it, C{https://HOST[:PORT]}: its host
        an IPv4 address or a DNS name (lowercase, a trailing dot dropped),
        its port plain digits, and nothing else (no credentials, no path
        but C{/}, no query, no fragment).
    @raise ValueError: saying what is wrong with it.
    """
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"agentContext.url is over {MAX_URL_LENGTH} characters")
    if not url.startswith("https://"):
        raise ValueError(
            f"agentContext.url must be an https:// URL (the agent only speaks "
            f"HTTPS and the token must not travel in clear), not {excerpt(url)}"
        )
    parts = urlsplit(url)
    if "@" in parts.netloc or not parts.netloc:
        raise ValueError(
            f"agentContext.url must name a host, without credentials: {excerpt(url)}"
        )
    if parts.netloc.startswith("["):
        # The HTTP client's URL handling (hyperlink) fails on them.
        raise ValueError(
            "agentContext.url: an IPv6 address cannot be the agent's host; "
            f"give a name that resolves to it: {excerpt(url)}"
        )
    host, colon, port = parts.netloc.partition(":")
    if colon and not (_PORT.fullmatch(port) and int(port) < 65536):
        raise ValueError(
            "agentContext.url has an invalid port (digits from 1 to 65535, "
            f"without a leading zero): {excerpt(url)}"
        )
    host = host.lower()
    host = host[:-1] if host.endswith(".") else host
    if not _agent_host(host):
        raise ValueError(
            "agentContext.url must name its host by an IPv4 address (four "
            "decimal numbers) or a DNS name (labels of letters, digits and "
            "inner hyphens, at most 63 characters each, the last not all "
            f"digits; a non-ASCII name in its xn-- form): {excerpt(url)}"
        )
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError(
            f"agentContext.url must have no query or fragment: {excerpt(url)}"
        )
    if parts.path not in ("", "/"):
        raise ValueError(
            "agentContext.url must have no path: the agent's endpoints are at "
            f"its root: {excerpt(url)}"
        )
    return f"https://{host}{colon}{port}"


@dataclass(frozen=True)
class AgentContext:
    """
    Where the professional's agent is, the token of their session, and the
    agent's TLS certificate fingerprint.
    """

    url: str
    token: str
    tls_fingerprint: str

    @classmethod
    def from_json(cls, value: object) -> AgentContext:
        """
        Read an agent context, checking the shape of each member before
        anything is sent anywhere: an C{https://} URL, a token of the
        agent's alphabet and a bounded length, a SHA-256 fingerprint.

        @raise ValueError: not an object with the three members, or one of
            them malformed (the message names it; it never repeats the token).
        """
        if not isinstance(value, Mapping):
            raise ValueError(
                "agentContext must be an object {url, token, tlsFingerprint}"
            )
        members = []
        for name in ("url", "token", "tlsFingerprint"):
            member = value.get(name)
            if not isinstance(member, str) or not member:
                raise ValueError(f"agentContext lacks the string member {name!r}")
            members.append(member)
        url, token, fingerprint = members
        expires = value.get("expires", "")
        if not isinstance(expires, str) or len(expires) > 64:
            # Not used, but said in the API's description as the agent gives it.
            raise ValueError(
                "agentContext.expires must be a string of at most 64 characters, "
                f"the time the agent gave, not {excerpt(expires)}"
            )
        url = _agent_url(url)
        if not _TOKEN.fullmatch(token):
            raise ValueError(
                f"agentContext.token is not an agent token: 16 to 512 characters "
                f"of A-Z, a-z, 0-9, '-' and '_' (this one has {len(token)} "
                "characters)"
            )
        if not _FINGERPRINT.fullmatch(fingerprint):
            raise ValueError(
                "agentContext.tlsFingerprint must be sha256: and the 64 hex "
                f"digits of the agent's certificate, not {excerpt(fingerprint)}"
            )
        # One spelling of a fingerprint (lowercase, without colons), so that
        # the same agent context is one session, one pool and one TLS
        # session, however the frontend wrote it.
        fingerprint = "sha256:" + fingerprint[len("sha256:") :].replace(":", "").lower()
        return cls(url, token, fingerprint)

    def __repr__(self) -> str:
        # Never show the token.
        return f"AgentContext({self.url!r})"


@dataclass
class FacadeConfig:
    """
    The facade's settings: the DMP, its trust roots, who the software and
    structure are, and how long each wait may last.
    """

    dmp_url: str
    roots: Sequence[x509.Certificate]
    structure: Structure
    software: Software
    defaults: SubmissionDefaults
    agent_timeout: float = 30.0
    handshake_timeout: float = 60.0
    dmp_timeout: float = 60.0
    max_answer_bytes: int = 64 * 1024 * 1024
    max_sessions: int = 1000
    sign_submission_set: bool = True
    #: For benchmarks only: when C{False}, no TLS session is resumed and no
    #: connection kept, so that every exchange pays a full handshake (and a
    #: card signature).
    reuse_connections: bool = True
    #: The networks agents may be reached in: an agent context whose URL
    #: leads elsewhere is refused before anything is sent (403).
    agent_networks: Sequence[Network] = DEFAULT_AGENT_NETWORKS


@implementer(IRemoteKey)
class TimedKey:
    """
    The card's authentication key, counting and timing the signatures the
    TLS handshake asks for.
    """

    def __init__(self, agent: CpsAgentClient) -> None:
        self._agent = agent
        self.supported_signature_schemes: Sequence[SignatureScheme] = (
            agent.supported_signature_schemes
        )
        self.signatures = 0
        self.last_signature_seconds: float | None = None
        # The agent's own error when it failed a handshake's call, so that
        # the facade can say "token expired" rather than "handshake failed".
        self.last_error: Exception | None = None

    def _noted(self, d: Deferred[T]) -> Deferred[T]:
        def failed(failure: Any) -> Any:
            self.last_error = failure.value
            return failure

        return d.addErrback(failed)

    def certificate_chain(self) -> Deferred[list[x509.Certificate]]:
        return self._noted(self._agent.certificate_chain())

    def sign(self, data: bytes, scheme: SignatureScheme) -> Deferred[bytes]:
        started = time.monotonic()
        self.signatures += 1

        def done(signature: bytes) -> bytes:
            self.last_signature_seconds = time.monotonic() - started
            return signature

        return self._noted(self._agent.sign(data, scheme).addCallback(done))


@dataclass
class ConnectionInfo:
    """
    The handshakes of one professional's connections to the DMP.
    """

    handshakes: int = 0
    resumed: int = 0
    last_resumed: bool | None = None
    # While the first handshake is under way, the other connections wait
    # for it, so that they resume its session instead of each asking the
    # card for a signature.
    first_pending: bool = False
    waiting: list[Deferred[None]] = field(default_factory=list)
    # The TLS connections that carried a request already.
    seen: weakref.WeakSet[object] = field(default_factory=weakref.WeakSet)


@dataclass
class _Connection:
    """
    How a request's connection came to be: C{new handshake}, C{resumed} or
    C{reused}; how long its handshake took, when it made one; and the card's
    signature time when its handshake needed one.
    """

    label: str
    card_seconds: float | None = None
    handshake_seconds: float | None = None


def _connection_of(protocol: Any, info: ConnectionInfo) -> _Connection:
    """
    @return: how the connection of C{protocol}, an HTTP client connection
        the pool gave over our TLS transport, came to be.
    """
    tls = getattr(protocol, "transport", None)
    negotiated = getattr(tls, "negotiated", None)
    if tls is None or negotiated is None:
        return _Connection("unknown")
    if tls in info.seen:
        return _Connection("reused")
    info.seen.add(tls)
    # The handshake's time is the sum of the time spent in each of its steps.
    handshake = sum(negotiated.timings.values())
    if negotiated.resumed:
        return _Connection("resumed", None, handshake)
    return _Connection(
        "new handshake", negotiated.timings.get(State.WAIT_SIGNATURE.name), handshake
    )


@implementer(IStreamClientEndpoint)
class _RecordingEndpoint:
    """
    One of our TLS endpoints, noting whether each connection resumed a session.
    """

    def __init__(self, endpoint: IStreamClientEndpoint, info: ConnectionInfo) -> None:
        self._endpoint = endpoint
        self._info = info

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        info = self._info
        if info.handshakes == 0 and info.first_pending:
            waiter: Deferred[None] = Deferred()
            info.waiting.append(waiter)
            return waiter.addCallback(lambda _: self._connect(protocolFactory))
        if info.handshakes > 0:
            return self._connect(protocolFactory)
        info.first_pending = True

        def release(result: Any) -> Any:
            info.first_pending = False
            waiting, info.waiting = info.waiting, []
            for waiter in waiting:
                waiter.callback(None)
            return result

        return self._connect(protocolFactory).addBoth(release)

    def _connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        def established(protocol: IProtocol) -> IProtocol:
            transport = getattr(protocol, "transport", None)
            negotiated = getattr(transport, "negotiated", None)
            resumed = bool(getattr(negotiated, "resumed", False))
            self._info.handshakes += 1
            self._info.resumed += resumed
            self._info.last_resumed = resumed
            return protocol

        connecting: Deferred[IProtocol] = self._endpoint.connect(protocolFactory)
        return connecting.addCallback(established)


@implementer(IAgentEndpointFactory)
class _RecordingEndpoints:
    """
    Our TLS endpoints for the HTTP Agent, each recording its handshakes.
    """

    def __init__(self, reactor: Any, config: TLSClientConfig, info: ConnectionInfo):
        self._inner = TLSAgentEndpointFactory(reactor, config)
        self._info = info

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return _RecordingEndpoint(self._inner.endpointForURI(uri), self._info)


@dataclass
class ProfessionalSession:
    """
    What the facade keeps for one agent context and DMP: the agent client,
    the card holder, and the HTTP connection pool to the DMP with the
    endpoints (our TLS client) it opens connections through.
    """

    agent: CpsAgentClient
    key: TimedKey
    professional: Professional
    issuer: str
    dmp_endpoints: _RecordingEndpoints
    pool: HTTPConnectionPool
    connections: ConnectionInfo
    card_fingerprint: str
    #: The card's signature key and certificate, read from the agent when a
    #: submission first needs them (L{signing_identity}).
    signing: SigningIdentity | None = None

    async def signing_identity(self) -> SigningIdentity:
        """
        @return: the card's signature identity, asked of the agent the first
            time only: an agent without a signature key serves every other
            transaction.
        """
        if self.signing is None:
            chain = await self.agent.signature_certificate_chain()
            self.signing = SigningIdentity(
                self.agent.sign_for_signature, chain[0], chain[1:]
            )
        return self.signing

    def close(self) -> Deferred[Any]:
        return DeferredList([self.pool.closeCachedConnections(), self.agent.close()])


@dataclass(frozen=True)
class LateMessage:
    """
    A message made only once the connection that will carry it is up: its
    URL, and what makes it. The submission-set signature is made so, and
    the card's signature is not spent on a DMP that cannot be reached.
    """

    url: str
    make: Callable[[], Awaitable[OutgoingMessage]]


@dataclass
class Submitted:
    """
    The outcome of a TD2.1: the submission set and documents, how the
    outcome was learnt (C{answered}, C{stored-after-lost-answer},
    C{resent-after-lost-answer}), and the DMP's warnings.
    """

    prepared: PreparedSubmission
    result: RegistryResult | None
    outcome: str = "answered"
    warnings: list[Any] = field(default_factory=list)
    count: int = 0
    timings: dict[str, Any] = field(default_factory=dict)

    @property
    def documents(self) -> list[Any]:
        """
        The submitted CDA documents, without the submission set's signature.
        """
        return self.prepared.submission.documents[: self.count]


def _timed_signer(signer: Signer, timings: dict[str, Any]) -> Signer:
    """
    @return: C{signer}, noting in C{timings} how long the card took.
    """

    def sign(data: bytes, algorithm: str) -> Deferred[bytes]:
        started = time.monotonic()

        def done(signature: bytes) -> bytes:
            timings["submissionSetSignature"] = round(time.monotonic() - started, 6)
            return signature

        return signer(data, algorithm).addCallback(done)

    return sign


def card_fingerprint(certificate: x509.Certificate) -> str:
    """
    @return: C{sha256:<hex>} of the certificate, the key of its TLS sessions.
    """
    return "sha256:" + certificate.fingerprint(hashes.SHA256()).hex()


def professional_from(
    described: Mapping[str, Any], certificate: x509.Certificate
) -> Professional:
    """
    The card holder as the XDS builders want them, read from the
    authentication certificate (the one the DMP validates during the TLS
    handshake), never from the agent's word alone.

    @param described: the holder as the agent's C{/cps/card} describes them;
        it must say what the certificate says.
    @raise CardHolderError: the agent describes someone else.
    @raise UnknownProfession: no TRE_G15 code for the card's profession.
    """
    holder = holder_from_certificate(certificate)
    for member in ("id", "name", "profession"):
        if described.get(member) != getattr(holder, member):
            raise CardHolderError(
                f"the agent describes a card holder whose {member} is not the "
                "one its authentication certificate names: refusing to act "
                "for them"
            )

    def first(oid: x509.ObjectIdentifier) -> str:
        values = certificate.subject.get_attributes_for_oid(oid)
        return str(values[0].value) if values else ""

    label = holder.profession.strip()
    code = label if label.isdigit() else PROFESSIONS.get(label.lower())
    if code is None:
        raise UnknownProfession(
            f"the card's profession {label!r} has no TRE_G15 code known to the facade"
        )
    family = first(NameOID.SURNAME) or holder.name.rpartition(" ")[2]
    given = first(NameOID.GIVEN_NAME) or holder.name.rpartition(" ")[0]
    try:
        return Professional(
            identifier=holder.id,
            family=family,
            given=given,
            profession=CodedValue(code, PROFESSION_SYSTEM, label),
            subject_name=certificate.subject.rfc4514_string(),
        )
    except MetadataError as error:
        raise CardHolderError(f"the card holder cannot be used: {error}") from None


_ANSWER_LOST = (ResponseNeverReceived, ResponseFailed, ConnectionLost)

#: The registry's refusal of a uniqueId it already has (IHE ITI TF-3, 4.2.4).
DUPLICATE_UNIQUE_ID = "XDSDuplicateUniqueIdInRegistry"


class DmpService:
    """
    Runs DMP transactions for professionals named by agent contexts.
    """

    def __init__(self, config: FacadeConfig, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.config = config
        # The agent clients connect through this one: only to the networks
        # the operator allows.
        self.agent_reactor = AgentNetworkReactor(reactor, config.agent_networks)
        self.endpoints = DmpEndpoints(config.dmp_url)
        self.session_cache = SessionCache(reactor)
        self._sessions: OrderedDict[
            tuple[AgentContext, str], Deferred[ProfessionalSession]
        ] = OrderedDict()
        #: Set by L{close}: no new exchange starts.
        self.stopping = False
        #: Called by L{close} first, each returning a Deferred: what answers
        #: requests (the REST resource) stops the ones under way.
        self.on_close: list[Callable[[], Deferred[Any]]] = []

    # Sessions -----------------------------------------------------------------
    def session(self, context: AgentContext) -> Deferred[ProfessionalSession]:
        """
        @return: a Deferred that fires with the professional's session,
            made on first use: the card holder and certificates read through
            the agent (no signature yet).
        """
        self._check_running()
        key = (context, self.config.dmp_url)
        existing = self._sessions.get(key)
        if existing is not None:
            self._sessions.move_to_end(key)
            return _share(existing)
        d = ensureDeferred(self._open(context))

        def forget(failure: Any) -> Any:
            if self._sessions.get(key) is d:
                del self._sessions[key]
            return failure

        # Kept before the errback is added: a session that fails at once
        # (the agent client refusing its URL) is dropped as one that fails
        # later, and never shared as a spent result.
        self._sessions[key] = d
        d.addErrback(forget)
        while len(self._sessions) > self.config.max_sessions:
            _, oldest = self._sessions.popitem(last=False)
            oldest.addCallback(lambda s: s.close()).addErrback(lambda _: None)
        return _share(d)

    async def _open(self, context: AgentContext) -> ProfessionalSession:
        agent = CpsAgentClient(
            context.url,
            context.token,
            context.tls_fingerprint,
            self.agent_reactor,
            self.config.agent_timeout,
        )
        try:
            return await self._open_with(agent, context)
        except BaseException:
            await agent.close()
            raise

    async def _open_with(
        self, agent: CpsAgentClient, context: AgentContext
    ) -> ProfessionalSession:
        holder = await agent.card()
        chain = await agent.certificate_chain()
        professional = professional_from(holder["holder"], chain[0])
        fingerprint = card_fingerprint(chain[0])
        key = TimedKey(agent)
        tls = TLSClientConfig(
            roots=list(self.config.roots),
            remote_key=key,
            session_cache=self.session_cache if self.config.reuse_connections else None,
            # A TLS session is resumed only for the same card behind the same
            # agent: a certificate is public, so keying by it alone would let
            # anyone who runs an agent serving a copy of it resume this
            # professional's sessions; the agent's own TLS key is not public.
            client_identity=(fingerprint, context.tls_fingerprint),
            remote_key_timeout=self.config.agent_timeout,
            handshake_timeout=self.config.handshake_timeout,
        )
        connections = ConnectionInfo()
        pool = HTTPConnectionPool(self.reactor)
        pool.maxPersistentPerHost = 4
        pool.retryAutomatically = False
        pool.persistent = self.config.reuse_connections
        return ProfessionalSession(
            agent=agent,
            key=key,
            professional=professional,
            issuer=chain[0].subject.rfc4514_string(),
            dmp_endpoints=_RecordingEndpoints(self.reactor, tls, connections),
            pool=pool,
            connections=connections,
            card_fingerprint=fingerprint,
        )

    def forget(self, context: AgentContext) -> None:
        """
        Drop the session of C{context} (its token expired, say).
        """
        d = self._sessions.pop((context, self.config.dmp_url), None)
        if d is not None:
            d.addCallback(lambda s: s.close()).addErrback(lambda _: None)

    def close(self) -> Deferred[Any]:
        """
        Stop: the requests under way are stopped (L{on_close}), no new
        exchange starts, and every pooled connection is closed.

        @return: a Deferred that fires when they are closed.
        """
        self.stopping = True
        hooks, self.on_close = self.on_close, []
        stopped = DeferredList([maybeDeferred(hook) for hook in hooks])

        def close_sessions(_: object) -> Deferred[Any]:
            sessions, self._sessions = list(self._sessions.values()), OrderedDict()
            closing = []
            for d in sessions:
                closing.append(
                    _share(d)
                    .addCallback(lambda s: s.close())
                    .addErrback(lambda _: None)
                )
                # A session still being opened waits on the agent, which
                # may hang: it is given up.
                if not d.called:
                    d.cancel()
            return DeferredList(closing)

        return stopped.addCallback(close_sessions)

    def _check_running(self) -> None:
        """
        @raise FacadeStopping: the facade is stopping.
        """
        if self.stopping:
            raise FacadeStopping(
                "the facade is stopping: nothing more is sent to the agent or the DMP"
            )

    def vihf(
        self, session: ProfessionalSession, patient: PatientId | None
    ) -> VihfRequest:
        return VihfRequest(
            session.professional,
            self.config.structure,
            self.config.software,
            issuer=session.issuer,
            patient=patient,
            purpose_of_use=NORMAL_ACCESS,
        )

    # One exchange -------------------------------------------------------------
    async def exchange(
        self,
        session: ProfessionalSession,
        name: str,
        message: OutgoingMessage | LateMessage,
        reader: Callable[[SoapResponse], T],
        timings: dict[str, Any] | None = None,
        deadline: float | None = None,
    ) -> T:
        """
        POST one SOAP message to the DMP and read its answer: first the
        connection (a kept one, or a new one with its TLS handshake done),
        then, for a L{LateMessage}, the message made, then the exchange,
        each wait with the DMP's timeout. Log one event for it, and note in
        C{timings} its duration (the making of a late message left out),
        the connection used and the card's TLS signature.

        @param deadline: when given, a C{time.monotonic()} by which both
            waits must end, if it comes before their timeouts.

        @raise DmpUnreachable: no connection could be made.
        @raise DmpNotReached: none was made in time; nothing was sent.
        @raise DmpAnswerLost: the request went out, or started to, and the
            answer never came.
        @raise DmpTimeout: no answer in time.
        """
        self._check_running()
        started = time.monotonic()
        signatures = session.key.signatures
        connection: _Connection | None = None
        sent = False
        making = 0.0
        code = "-"
        reason = ""
        try:
            protocol = await self._connect(session, message.url, deadline)
            connection = _connection_of(protocol, session.connections)
            if isinstance(message, LateMessage):
                made_at = time.monotonic()
                try:
                    message = await message.make()
                except BaseException:
                    # Nothing went over it: closed rather than kept out of
                    # the pool for good.
                    protocol.transport.loseConnection()
                    raise
                making = time.monotonic() - made_at
            try:
                sent = True
                answer = await self._send(session, protocol, message, deadline)
            except RequestNotSent:
                # The kept connection closed while the message was made, and
                # nothing was sent: a new one resumes the TLS session.
                sent = False
                protocol = await self._connect(session, message.url, deadline)
                connection = _connection_of(protocol, session.connections)
                sent = True
                answer = await self._send(session, protocol, message, deadline)
            content_type, body, status = answer
            try:
                result = read_message(content_type, body)
            except SoapFault as fault:
                code = fault.subcodes[-1] if fault.subcodes else fault.code
                raise
            except Exception:
                if status >= 400:
                    raise DmpHttpError(
                        f"the DMP answered HTTP {status} without a SOAP message"
                    ) from None
                raise
            value = reader(result)
            code = _code_of(value)
            return value
        except Exception as error:
            if code == "-":
                # The DMP's own code when it gave one (a refusal), else the
                # failure in words.
                given = getattr(error, "code", None)
                code = given if isinstance(given, str) and given else "failed"
                if code == "failed":
                    reason = f" ({_in_words(error)})"
            raise
        finally:
            duration = time.monotonic() - started - making
            if connection is None:
                # None was made: a card signature may have been made in a
                # handshake that failed.
                used = "not established"
                signed = session.key.signatures > signatures
                card_seconds = session.key.last_signature_seconds if signed else None
                handshake_seconds = None
            else:
                used = connection.label if sent else f"{connection.label} (unused)"
                card_seconds = connection.card_seconds
                handshake_seconds = connection.handshake_seconds
            set_seconds = (timings or {}).get("submissionSetSignature")
            _log.info(
                "DMP {action}: {code}{reason} in {duration:.3f}s, connection "
                "{connection}, card signature {signature}{set_signature}",
                action=name,
                code=code,
                reason=reason,
                duration=duration,
                connection=used,
                signature="none" if card_seconds is None else f"{card_seconds:.3f}s",
                set_signature=(
                    ""
                    if set_seconds is None
                    else f", submission-set signature {set_seconds:.3f}s"
                ),
            )
            if timings is not None:
                timings.update(
                    dmp=round(duration, 6),
                    connection=used,
                    handshake=(
                        None
                        if handshake_seconds is None
                        else round(handshake_seconds, 6)
                    ),
                    handshakeSignature=(
                        None if card_seconds is None else round(card_seconds, 6)
                    ),
                )

    def _wait(self, deadline: float | None) -> float:
        """
        @return: the seconds a wait may last: the DMP's timeout, or less
            when C{deadline} comes first.
        """
        if deadline is None:
            return self.config.dmp_timeout
        return max(0.0, min(self.config.dmp_timeout, deadline - time.monotonic()))

    async def _connect(
        self, session: ProfessionalSession, url: str, deadline: float | None = None
    ) -> Any:
        """
        @return: an HTTP client connection to the DMP from the session's
            pool: a kept one, or a new one once its TLS handshake is done.
        @raise DmpUnreachable: no connection could be made.
        @raise DmpNotReached: none within the DMP's timeout (or by
            C{deadline}).
        """
        uri = URI.fromBytes(url.encode("ascii"))
        key = (uri.scheme, uri.host, uri.port)
        endpoint = session.dmp_endpoints.endpointForURI(uri)
        session.key.last_error = None
        connecting: Deferred[Any] = session.pool.getConnection(key, endpoint)
        seconds = self._wait(deadline)
        connecting.addTimeout(seconds, self.reactor)
        try:
            return await connecting
        except (TimeoutError, CancelledError) as error:
            raise DmpNotReached(
                f"no connection to the DMP within {seconds:g} seconds: nothing was sent"
            ) from error
        except TLSError as error:
            agent_error = session.key.last_error
            if isinstance(agent_error, AgentError):
                raise agent_error from error
            if (
                isinstance(error, HandshakeFailed)
                and error.alert is AlertDescription.user_canceled
            ):
                # Our handshake timer gave up (the only user_canceled we send):
                # a timeout, not a refusal by the DMP.
                raise DmpNotReached(
                    f"the TLS handshake with the DMP did not finish within "
                    f"{self.config.handshake_timeout:g} seconds ({error.step}): "
                    "nothing was sent"
                ) from error
            raise
        except (ConnectError, DNSLookupError) as error:
            raise DmpUnreachable(
                f"no connection to the DMP at {url}: {error}"
            ) from error

    async def _send(
        self,
        session: ProfessionalSession,
        protocol: Any,
        message: OutgoingMessage,
        deadline: float | None = None,
    ) -> tuple[str, bytes, int]:
        """
        POST C{message} over C{protocol} and read the whole answer, within
        the DMP's timeout (or by C{deadline}).

        @return: the answer's Content-Type, body and HTTP status.
        @raise RequestNotSent: the connection was closed: nothing was sent.
        @raise DmpTimeout: no whole answer in time.
        """
        return await _timed(
            self._post(session, protocol, message),
            self._wait(deadline),
            self.reactor,
        )

    async def _post(
        self, session: ProfessionalSession, protocol: Any, message: OutgoingMessage
    ) -> tuple[str, bytes, int]:
        uri = URI.fromBytes(message.url.encode("ascii"))
        request = Request(
            b"POST",
            uri.originForm,
            Headers(
                {
                    b"Content-Type": [message.content_type.encode("ascii")],
                    b"Host": [_host_header(uri)],
                }
            ),
            message.producer(),
            persistent=session.pool.persistent,
        )
        try:
            response = await protocol.request(request)
        except (RequestTransmissionFailed, RequestGenerationFailed) as error:
            # The connection died while the request was being sent: part of
            # it may have reached the DMP, so its outcome is unknown.
            raise DmpRequestCut(
                f"the connection to the DMP died while the request was being "
                f"sent: {_reasons(error)}"
            ) from error
        except _ANSWER_LOST as error:
            raise DmpAnswerLost(
                f"the DMP's answer never came: {_reasons(error)}"
            ) from error
        limit = self.config.max_answer_bytes
        length = response.length
        announced = length if isinstance(length, int) else 0
        chunks: list[bytes] = []
        received = 0

        def collect(data: bytes) -> None:
            # Raising here closes the connection rather than reading on.
            nonlocal received
            received += len(data)
            if max(received, announced) > limit:
                raise DmpHttpError(
                    f"the DMP's answer is too large (over {limit} bytes)"
                )
            chunks.append(data)

        try:
            await treq.collect(response, collect)
            body = b"".join(chunks)
        except _ANSWER_LOST as error:
            raise DmpAnswerLost(
                f"the DMP's answer was cut: {_reasons(error)}"
            ) from error
        content_type = (response.headers.getRawHeaders("content-type") or [""])[0]
        return content_type, body, response.code

    # Transactions -------------------------------------------------------------
    async def td02(
        self,
        context: AgentContext,
        patient: PatientId,
        timings: dict[str, Any] | None = None,
    ) -> ExistenceResult:
        """
        @param timings: filled with the exchange's times, as for L{submit}.
        @return: the TD0.2 answer: does the patient have a DMP, and is this
            professional authorised on it.
        """
        session = await self._session(context)
        message = existence_test(self.endpoints, self.vihf(session, patient), patient)
        return await self._exchange(
            context,
            session,
            "TD0.2",
            message,
            read_existence,
            idempotent=True,
            timings=timings,
        )

    async def td31(
        self,
        context: AgentContext,
        parameters: FindDocuments | None = None,
        *,
        patient: PatientId | None = None,
        unique_ids: Sequence[str] = (),
        entry_uuids: Sequence[str] = (),
    ) -> QueryResult:
        """
        @param patient: for GetDocuments, the patient named in the VIHF;
            the DMP leaves out the documents of anyone else.
        @return: the TD3.1 answer: FindDocuments with C{parameters}, or
            GetDocuments by uniqueIds or entryUUIDs.
        """
        session = await self._session(context)
        if parameters is not None:
            message = find_documents(
                self.endpoints, self.vihf(session, parameters.patient), parameters
            )
        else:
            message = get_documents(
                self.endpoints,
                self.vihf(session, patient),
                unique_ids=unique_ids,
                entry_uuids=entry_uuids,
            )
        return await self._exchange(
            context, session, "TD3.1", message, read_query, idempotent=True
        )

    async def td32(
        self,
        context: AgentContext,
        patient: PatientId,
        unique_ids: Sequence[str],
    ) -> list[RetrievedDocument]:
        """
        @param patient: the documents' patient, named in the VIHF: the DMP
            answers only about that patient's record.
        @return: the documents, exact bytes.
        """
        session = await self._session(context)
        message = retrieve_documents(
            self.endpoints, self.vihf(session, patient), unique_ids
        )
        return await self._exchange(
            context, session, "TD3.2", message, read_retrieve, idempotent=True
        )

    async def td33(
        self, context: AgentContext, entry: DocumentEntry, action: str
    ) -> RegistryResult:
        """
        Change a document's status or visibility: C{action} is one of
        C{archive}, C{unarchive}, C{delete}, C{mask}, C{unmask}. The VIHF
        names the entry's patient, as found by GetDocuments for the patient.

        @return: the DMP's result on Success.
        """
        session = await self._session(context)
        vihf = self.vihf(session, entry.patientId)
        common = dict(
            professional=session.professional,
            structure=self.config.structure,
            software=self.config.software,
            defaults=self.config.defaults,
        )
        if action in ("mask", "unmask"):
            message = update_visibility(
                self.endpoints,
                vihf,
                entry,
                masked=action == "mask",
                **common,  # type: ignore[arg-type]
            )
        else:
            new_status = {
                "archive": Status.Archived,
                "unarchive": Status.Approved,
                "delete": Status.Deleted,
            }[action]
            message = update_status(
                self.endpoints,
                vihf,
                entry,
                new_status,
                **common,  # type: ignore[arg-type]
            )
        return await self._exchange(
            context, session, "TD3.3", message, read_registry_response
        )

    def derive(
        self,
        documents: Sequence[bytes],
        overrides: Sequence[dict[str, object]] | None = None,
    ) -> list[tuple[DocumentEntry, bytes]]:
        """
        @return: each document's metadata, derived from the CDA with its
            overrides, and its bytes.
        @raise DocumentRefused: a document lacks a mandatory element, is not
            well-formed or safe XML, or has a value XDS cannot carry.
        """
        if overrides is not None and len(overrides) != len(documents):
            raise MetadataError("one overrides mapping per document, or none")
        if len(documents) > MAX_DOCUMENTS:
            raise TooManyDocuments(
                f"a submission carries at most {MAX_DOCUMENTS} documents, not "
                f"{len(documents)}: send them in several submissions"
            )
        entries = []
        for index, data in enumerate(documents):
            try:
                entry = document_entry(
                    data,
                    self.config.structure,
                    self.config.defaults,
                    overrides[index] if overrides else None,
                )
            except (MetadataError, XmlRefused) as error:
                raise DocumentRefused(index, error) from error
            entries.append((entry, data))

        # What the DMP refuses of the submission as a whole, said before the
        # card is asked anything: a document twice, several patients.
        first: dict[str, int] = {}
        for index, (entry, _) in enumerate(entries):
            earlier = first.setdefault(entry.uniqueId, index)
            if earlier != index:
                raise DocumentRefused(
                    index,
                    MetadataError(
                        f"the same document as documents[{earlier}] (uniqueId "
                        f"{entry.uniqueId}): a submission carries each document once"
                    ),
                )
        patient = entries[0][0].patientId if entries else None
        for index, (entry, _) in enumerate(entries):
            if entry.patientId != patient:
                assert patient is not None
                raise DocumentRefused(
                    index,
                    MetadataError(
                        f"its patient is {entry.patientId.ins} (authority "
                        f"{entry.patientId.authority}), that of documents[0] "
                        f"{patient.ins} (authority {patient.authority}): a "
                        "submission is about one patient"
                    ),
                )
        return entries

    async def _signed(
        self,
        session: ProfessionalSession,
        submission: Submission,
        timings: dict[str, Any],
        signing: SigningIdentity | None,
    ) -> Submission:
        """
        @return: C{submission} with the set's signature made by the card's
            signature key, C{signing}, when the facade signs submission sets.
        """
        if signing is None:
            return submission
        return await sign_submission(
            submission,
            _timed_signer(signing.signer, timings),
            signing.certificate,
            session.professional,
            self.config.structure,
            chain=signing.chain,
            algorithm=signing.algorithm,
            clock=self.reactor,
        )

    async def submit(
        self,
        context: AgentContext,
        documents: Sequence[bytes],
        overrides: Sequence[dict[str, object]] | None = None,
    ) -> Submitted:
        """
        TD2.1: submit C{documents}; done only on a DMP Success. The card
        signs the submission set once the connection to the DMP is up, so
        that no signature is spent when the DMP cannot be reached. When the
        answer is lost, ask the DMP by uniqueId whether it was stored before
        sending it again, once; when the DMP refuses that resend as a
        duplicate, ask again (the first may have arrived late).

        @raise DocumentRefused: a document cannot be submitted (nothing was
            asked of the agent).
        @raise UnknownOutcome: the outcome could not be learnt.
        """
        timings: dict[str, Any] = {}
        entries = self.derive(documents, overrides)
        session = await self._session(context)
        # Read before the DMP is reached: a card without a signature key
        # fails the submission before a connection is made for it.
        signing = None
        if self.config.sign_submission_set:
            try:
                signing = await session.signing_identity()
            except TokenExpired:
                self.forget(context)
                raise
        submission = new_submission(
            entries,
            session.professional,
            self.config.structure,
            self.config.software,
            self.config.defaults,
        )
        count = len(documents)
        # The CDA documents come first; the signature, if any, after them.
        unique_ids = [d.entry.uniqueId for d in submission.documents[:count]]
        patient = submission.submission_set.patientId
        vihf = self.vihf(session, patient)
        made: list[PreparedSubmission] = []

        async def make() -> OutgoingMessage:
            signed = await self._signed(session, submission, timings, signing)
            message = provide_and_register(self.endpoints, vihf, signed)
            made.append(PreparedSubmission(signed, message))
            return message

        try:
            result = await self._exchange(
                context,
                session,
                "TD2.1",
                LateMessage(self.endpoints.repository, make),
                read_registry_response,
                timings=timings,
            )
            return Submitted(
                made[0], result, "answered", result.warnings, count, timings
            )
        except DmpNotReached:
            raise
        except (DmpAnswerLost, DmpTimeout) as first:
            _log.warn(
                "TD2.1 outcome unknown ({why}); checking {count} uniqueIds",
                why=_in_words(first),
                count=len(unique_ids),
            )
        # The message was made and sent, or started to be.
        prepared = made[0]
        stored = await self._stored(context, patient, unique_ids)
        if stored is None:
            raise UnknownOutcome(
                "the DMP's answer to the submission never came and the check by "
                "uniqueId failed too: do not resend before searching for "
                + ", ".join(unique_ids),
                unique_ids,
            )
        if stored:
            return Submitted(
                prepared, None, "stored-after-lost-answer", count=count, timings=timings
            )
        try:
            result = await self._exchange(
                context,
                session,
                "TD2.1",
                prepared.message,
                read_registry_response,
                timings=timings,
            )
            return Submitted(
                prepared,
                result,
                "resent-after-lost-answer",
                result.warnings,
                count,
                timings,
            )
        except (DmpAnswerLost, DmpTimeout):
            pass
        except RegistryFailure as refusal:
            # The first send may have reached the DMP after the check: the
            # DMP then refuses the resend as a duplicate of it. Only a
            # second check by uniqueId tells that from a true refusal.
            if {e.code for e in refusal.errors} != {DUPLICATE_UNIQUE_ID}:
                raise
            if await self._stored(context, patient, unique_ids):
                _log.warn("TD2.1 resend refused as a duplicate: the first was stored")
                return Submitted(
                    prepared,
                    None,
                    "stored-after-lost-answer",
                    count=count,
                    timings=timings,
                )
            raise
        stored = await self._stored(context, patient, unique_ids)
        if stored:
            return Submitted(
                prepared, None, "stored-after-lost-answer", count=count, timings=timings
            )
        raise UnknownOutcome(
            "the submission was resent once after a lost answer and its answer "
            "was lost again; "
            + (
                "the DMP does not have it"
                if stored is False
                else "its outcome is unknown"
            )
            + ": search for "
            + ", ".join(unique_ids)
            + " before sending it again",
            unique_ids,
        )

    async def _stored(
        self, context: AgentContext, patient: PatientId, unique_ids: Sequence[str]
    ) -> bool | None:
        """
        @return: C{True} when the DMP has every document, C{False} when it
            has none, C{None} when it could not say or has some.
        """
        try:
            found = await self.td31(context, patient=patient, unique_ids=unique_ids)
        except Exception as error:
            _log.warn("check by uniqueId failed: {error}", error=str(error))
            return None
        have = {e.uniqueId for e in found.entries}
        if have >= set(unique_ids):
            return True
        if not have & set(unique_ids):
            return False
        return None

    async def _session(self, context: AgentContext) -> ProfessionalSession:
        """
        The professional's session, with the agent's word that the context
        still holds: every transaction acts under the card's authority, so
        once the card is locked, taken out or its token expired, a kept
        connection to the DMP must not carry one more.
        """
        kept = (context, self.config.dmp_url) in self._sessions
        try:
            session = await self.session(context)
            if kept:
                await session.agent.card()
            return session
        except TokenExpired:
            self.forget(context)
            raise

    async def _exchange(
        self,
        context: AgentContext,
        session: ProfessionalSession,
        name: str,
        message: OutgoingMessage | LateMessage,
        reader: Callable[[SoapResponse], T],
        idempotent: bool = False,
        timings: dict[str, Any] | None = None,
    ) -> T:
        """
        Run one exchange; a read (C{idempotent}) whose answer was lost, as
        when the DMP closed a kept connection just as it was reused, is
        sent once more, within what is left of the DMP's timeout counted
        from the first send. A read the DMP did not answer in time is not:
        the whole wait stays within that timeout.

        @raise DmpTimeout: no answer in time, to the read or to its resend,
            saying which was sent.
        """
        started = time.monotonic()
        try:
            try:
                return await self.exchange(session, name, message, reader, timings)
            except DmpAnswerLost as error:
                if not idempotent:
                    raise
                lost = error
            timeout = self.config.dmp_timeout
            left = timeout - (time.monotonic() - started)
            if left <= 0:
                raise lost
            try:
                return await self.exchange(
                    session, name, message, reader, timings, started + timeout
                )
            except DmpTimeout as error:
                waited = (
                    "no new connection to the DMP was made"
                    if isinstance(error, DmpNotReached)
                    else "no answer came"
                )
                raise DmpTimeout(
                    f"{lost}; the request, a read, was sent once more, and "
                    f"{waited} within the {left:.3g} seconds left of the DMP's "
                    f"timeout of {timeout:g} seconds"
                ) from error
        except TokenExpired:
            self.forget(context)
            raise


def _share(d: Deferred[T]) -> Deferred[T]:
    """
    @return: a new Deferred with C{d}'s result, leaving C{d} untouched.
    """
    result: Deferred[T] = Deferred()

    def ok(value: T) -> T:
        result.callback(value)
        return value

    def failed(failure: Any) -> Any:
        result.errback(failure)
        return failure

    d.addCallbacks(ok, failed)
    d.addErrback(lambda _: None)
    return result


async def _timed(work: Coroutine[Any, Any, T], seconds: float, reactor: Any) -> T:
    """
    @return: C{work}'s result.
    @raise DmpTimeout: it took longer than C{seconds}.
    """
    d: Deferred[T] = ensureDeferred(work)

    def timed_out(result: object, timeout: float) -> Failure:
        # Whatever the cancelled work failed with (the HTTP client says the
        # answer never came), the cause is the timeout.
        return Failure(
            DmpTimeout(
                f"the request was sent to the DMP and no answer came within "
                f"{timeout:g} seconds"
            )
        )

    d.addTimeout(seconds, reactor, onTimeoutCancel=timed_out)
    return await d


def _host_header(uri: URI) -> bytes:
    """
    @return: the Host header of a request to C{uri}, as twisted.web's Agent
        makes it.
    """
    host: bytes = uri.host
    if b":" in host:
        host = b"[" + host + b"]"
    if (uri.scheme, uri.port) in ((b"http", 80), (b"https", 443)):
        return host
    return host + b":%d" % uri.port


def _in_words(error: BaseException, longest: int = 300) -> str:
    """
    @return: what C{error} says, for a log line: its message, cut, or what
        kind of failure it is when it has none.
    """
    said = " ".join(str(error).split())
    if not said:
        kinds: dict[type[BaseException], str] = {
            CancelledError: "cancelled",
            TimeoutError: "timed out",
            ConnectionLost: "connection lost",
        }
        said = kinds.get(type(error), "no detail given")
    return said if len(said) <= longest else said[:longest] + "..."


def _reasons(error: Exception) -> str:
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(_in_words(r.value) for r in reasons)
    return _in_words(error)


def _code_of(result: object) -> str:
    if isinstance(result, RegistryResult):
        return result.status.rsplit(":", 1)[-1]
    if isinstance(result, QueryResult):
        return result.result.status.rsplit(":", 1)[-1]
    if isinstance(result, ExistenceResult):
        return result.response_code or "-"
    if isinstance(result, list):
        return "Success"
    return "-"
