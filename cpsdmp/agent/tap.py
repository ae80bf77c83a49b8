"""
C{twist cpsagent}: the options of the workstation agent and the service that
serves its REST resource over HTTPS, with the card behind it.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.application.service import IService, Service
from twisted.internet import ssl
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.failure import Failure

from cpsdmp.agent.audit import (
    DEFAULT_RATE_LIMIT,
    AuditLog,
    RateLimit,
    create_private,
)
from cpsdmp.agent.card import (
    DEFAULT_CARD_TIMEOUT,
    CardBackend,
    CardError,
    Pkcs11Backend,
    SoftCardBackend,
    WorkerCard,
    pkcs12_problem,
)
from cpsdmp.agent.policy import DMP_SERVERS, SANDBOX_SERVERS, SigningPolicy
from cpsdmp.agent.resource import (
    MAX_WRONG_PIN_PAUSE,
    WRONG_PIN_PAUSE,
    AgentResource,
    agent_site,
)
from cpsdmp.protocols.server_tls import server_tls_options
from cpsdmp.tapsupport import (
    StartError,
    check_endpoint,
    exit_on_start_failure,
    is_loopback,
    listen,
    number_option,
    read_certificates,
    read_tls_identity,
)

_log = Logger()

DEFAULT_LISTEN = "tcp:10035:interface=127.0.0.1"

# What the agent logs once it listens, for a program that started it to learn
# the context URL and the certificate fingerprint to pin.
LISTENING_LINE = re.compile(
    rb"listening on \S+ as (https://\S+) \(TLS certificate (sha256:[0-9a-f]{64})\)"
)

# The longest idle time a token may be given: a week.
MAX_SESSION_IDLE = 7 * 24 * 3600.0

# The longest --card-timeout and --wrong-pin-pause, in seconds.
MAX_CARD_TIMEOUT = 600.0
MAX_WRONG_PIN_PAUSE_OPTION = 3600.0

# Seconds between two checks that the card is still in the reader.
CARD_WATCH_INTERVAL = 2.0


class Options(usage.Options):
    """
    The command line of C{twist cpsagent}.
    """

    synopsis = "[options]"
    longdesc = (
        "Serve the CPS card of this workstation over HTTPS on the loopback: "
        "a PIN opens a session whose token lets a backend read the card's "
        "certificates and have its keys sign."
    )

    optParameters = [
        ["listen", None, DEFAULT_LISTEN, "Endpoint to serve HTTPS on."],
        [
            "tls-cert",
            None,
            None,
            "PEM certificate of the agent, then its intermediates "
            "(default: self-signed).",
        ],
        ["tls-key", None, None, "PEM private key for --tls-cert."],
        ["pkcs11-module", None, None, "PKCS#11 module of the card reader."],
        ["token-label", None, None, "Label of the card's token (default: the first)."],
        ["soft-card", None, None, "PKCS#12 file of the authentication key."],
        ["soft-card-signature", None, None, "PKCS#12 file of the signature key."],
        ["testcard", None, None, "Use the test card made in this folder."],
        ["allow-origin", None, None, "The one web origin allowed to call (CORS)."],
        [
            "session-idle",
            None,
            900.0,
            "Seconds a token lives unused.",
            number_option("session-idle", "seconds", "900", maximum=MAX_SESSION_IDLE),
        ],
        [
            "wrong-pin-pause",
            None,
            WRONG_PIN_PAUSE,
            "Seconds during which no PIN is tried after a wrong one; doubled "
            f"with each wrong PIN in a row, up to {MAX_WRONG_PIN_PAUSE:g} s.",
            number_option(
                "wrong-pin-pause",
                "seconds",
                f"{WRONG_PIN_PAUSE:g}",
                minimum=0,
                minimum_allowed=True,
                maximum=MAX_WRONG_PIN_PAUSE_OPTION,
            ),
        ],
        [
            "public-url",
            None,
            None,
            "https URL the backend reaches this agent at, put in the agent "
            "context (default: the address it listens on).",
        ],
        [
            "rate-limit",
            None,
            str(DEFAULT_RATE_LIMIT.count) + "/" + f"{DEFAULT_RATE_LIMIT.seconds:g}",
            "Signatures allowed per session: N/SECONDS.",
        ],
        ["audit-log", None, None, "File to append a JSON line per signature to."],
        [
            "card-timeout",
            None,
            DEFAULT_CARD_TIMEOUT,
            "Seconds a card operation may take before the agent answers 503.",
            number_option(
                "card-timeout",
                "seconds",
                f"{DEFAULT_CARD_TIMEOUT:g}",
                maximum=MAX_CARD_TIMEOUT,
            ),
        ],
    ]

    optFlags = [
        [
            "insecure-sign-anything",
            None,
            "Sign whatever is asked, with no check: for development only.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["tls-identity"] = None
        self["intermediates"] = []
        self["allow-servers"] = []
        self["trust"] = []

    def opt_allow_server(self, name: str) -> None:
        """
        Server the card may authenticate to (repeatable; replaces the default).
        """
        self["allow-servers"].append(name)

    def opt_trust(self, path: str) -> None:
        """
        PEM roots a server chain must lead to (repeatable): IGC-Santé's.
        """
        self["trust"].append(path)

    def opt_intermediate(self, path: str) -> None:
        """
        PEM file of an intermediate CA to complete the card's chain (repeatable).
        """
        self["intermediates"].append(path)

    def postOptions(self) -> None:
        if not (self["testcard"] or self["soft-card"] or self["pkcs11-module"]):
            raise usage.UsageError(
                "say where the card is: --pkcs11-module, --soft-card or --testcard"
            )
        self._check_card_sources()
        check_endpoint("listen", self["listen"])
        if self["allow-origin"] is not None:
            self["allow-origin"] = check_origin(self["allow-origin"])
        for name in self["allow-servers"]:
            if not is_host_name(name):
                raise usage.UsageError(
                    f"--allow-server {name!r} is not a host name or an IP address"
                )
        if bool(self["tls-cert"]) != bool(self["tls-key"]):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        if self["tls-cert"]:
            self["tls-identity"] = read_tls_identity(
                "tls-cert", self["tls-cert"], "tls-key", self["tls-key"]
            )
        url = self["public-url"]
        if url is not None and not (
            url.startswith("https://") and len(url) > len("https://")
        ):
            raise usage.UsageError("--public-url must be an https:// URL")
        if self["testcard"]:
            from cpsdmp.agent.testcard import TestCard, TestCardError

            try:
                TestCard.load(self["testcard"])
            except TestCardError as e:
                raise usage.UsageError(str(e)) from None
        try:
            self["rate-limit"] = RateLimit.parse(self["rate-limit"])
        except ValueError as e:
            raise usage.UsageError(f"--rate-limit: {e}") from None
        for option, paths in [
            ("trust", self["trust"]),
            ("intermediate", self["intermediates"]),
        ]:
            for path in paths:
                read_certificates(option, path)
        if self["audit-log"]:
            try:
                fd = create_private(self["audit-log"])
                try:
                    # Nothing is written to a file, but a device that
                    # refuses every write (/dev/full) refuses this one too.
                    os.write(fd, b"")
                finally:
                    os.close(fd)
            except OSError as e:
                raise usage.UsageError(
                    f"--audit-log {self['audit-log']}: cannot write it ({e.strerror})"
                ) from None

    def _check_card_sources(self) -> None:
        """
        One card at a time: the options naming a card never silently
        override one another.
        """
        others = ["pkcs11-module", "token-label", "soft-card", "soft-card-signature"]
        if self["testcard"]:
            for option in others:
                if self[option]:
                    raise usage.UsageError(
                        f"--testcard conflicts with --{option}: a test card names "
                        "its own card; give one or the other"
                    )
        if self["pkcs11-module"] and self["soft-card"]:
            raise usage.UsageError(
                "--pkcs11-module conflicts with --soft-card: give one card"
            )
        if self["token-label"] and not self["pkcs11-module"]:
            raise usage.UsageError("--token-label goes with --pkcs11-module")
        if self["soft-card-signature"] and not self["soft-card"]:
            raise usage.UsageError("--soft-card-signature goes with --soft-card")
        module = self["pkcs11-module"]
        if module and "/" in module:
            # A path: the file must be there. A bare library name is the
            # dynamic loader's to find, at start.
            try:
                with open(module, "rb"):
                    pass
            except OSError as e:
                raise usage.UsageError(
                    f"--pkcs11-module {module}: cannot read it ({e.strerror})"
                ) from None
        for option in ("soft-card", "soft-card-signature"):
            if self[option]:
                path = self[option]
                try:
                    problem = pkcs12_problem(Path(path).read_bytes())
                except OSError as e:
                    problem = f"cannot read it ({e.strerror})"
                if problem is not None:
                    raise usage.UsageError(f"--{option} {path}: {problem}")


# A DNS host name (RFC 1123): labels of letters, digits and hyphens.
_HOST_NAME = re.compile(
    r"(?=.{1,253}\.?$)(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?"
)


def is_host_name(name: str) -> bool:
    """
    @return: whether C{name} is a DNS host name or an IP address.
    """
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return _HOST_NAME.fullmatch(name) is not None


def check_origin(text: str) -> str:
    """
    @return: C{text}, if it is a web origin written as a browser sends it
        in C{Origin} (RFC 6454): C{scheme://host[:port]}, lower case, no
        default port, nothing after.
    @raise usage.UsageError: saying what an origin is.
    """
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        port = None
        parts = parts._replace(scheme="")
    host = parts.hostname or ""
    serialized = ""
    if parts.scheme in ("http", "https") and host:
        serialized = f"{parts.scheme}://{f'[{host}]' if ':' in host else host}"
        if port is not None and port != {"http": 80, "https": 443}[parts.scheme]:
            serialized += f":{port}"
    if serialized and serialized == text:
        return text
    hint = f" (as a browser writes it: {serialized})" if serialized else ""
    raise usage.UsageError(
        f"--allow-origin {text!r} is not a web origin: give scheme://host[:port], "
        f"e.g. https://frontend.example{hint}"
    )


def _load_certificates(paths: list[str]) -> list[x509.Certificate]:
    certificates: list[x509.Certificate] = []
    for path in paths:
        certificates.extend(x509.load_pem_x509_certificates(Path(path).read_bytes()))
    return certificates


def card_backend(options: Options | dict[str, Any]) -> CardBackend:
    """
    @return: the card the options name: a test card's token (or its soft
        card when it has no token), a soft card, or a PKCS#11 module.
    """
    intermediates = _load_certificates(list(options.get("intermediates") or []))
    if options.get("testcard"):
        from cpsdmp.agent.testcard import TestCard

        card = TestCard.load(options["testcard"])
        intermediates += card.ca_intermediate_certificates()
        if card.pkcs11_module:
            return Pkcs11Backend(
                card.pkcs11_module, card.token_label, intermediates, card.environment()
            )
        return SoftCardBackend(
            Path(card.soft_card), Path(card.soft_card_signature), intermediates
        )
    if options.get("soft-card"):
        signature = options.get("soft-card-signature")
        return SoftCardBackend(
            Path(options["soft-card"]),
            Path(signature) if signature else None,
            intermediates,
        )
    return Pkcs11Backend(
        options["pkcs11-module"], options.get("token-label"), intermediates
    )


def signing_policy(options: Options | dict[str, Any]) -> SigningPolicy | None:
    """
    @return: the policy the options ask for: the DMP's hosts (and, with a
        test card, the sandbox's names and the test root) unless
        C{--allow-server} names others; C{None} with
        C{--insecure-sign-anything}.
    """
    if options.get("insecure-sign-anything"):
        return None
    roots = _load_certificates(list(options.get("trust") or []))
    servers = list(options.get("allow-servers") or [])
    if options.get("testcard"):
        from cpsdmp.agent.testcard import TestCard

        roots.append(TestCard.load(options["testcard"]).ca_root_certificate())
        if not servers:
            servers = [*DMP_SERVERS, *SANDBOX_SERVERS]
    return SigningPolicy(roots, servers or DMP_SERVERS)


def _announce_policy(policy: SigningPolicy | None, options: Options) -> None:
    if policy is None:
        banner = "!" * 72
        _log.warn(
            "{banner}\nINSECURE: --insecure-sign-anything: the card will sign "
            "ANYTHING any session asks for, with no check. Development only; "
            "never with a real CPS card.\n{banner}",
            banner=banner,
        )
        return
    _log.info(
        "signing policy: authentication to {servers} only, server chains to "
        "{roots} root(s); rate limit {limit}",
        servers=", ".join(policy.allowed_servers),
        roots=len(policy.roots),
        limit=options["rate-limit"],
    )
    if not policy.roots:
        _log.warn(
            "no server root given (--trust): every authentication signature "
            "will be refused; give the IGC-Santé root file with --trust"
        )


def self_signed_identity() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """
    @return: a fresh key and a certificate for it naming the loopback, made
        at each start so that a restart also changes the pinned fingerprint.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cpsdmp agent")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def fingerprint(certificate: x509.Certificate) -> str:
    """
    @return: C{"sha256:<hex>"} of the certificate's DER, as agent contexts
        carry it.
    """
    der = certificate.public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def agent_url(address: Any) -> str:
    """
    @return: the https URL a local caller reaches a listening C{address} at.
    """
    if isinstance(address, IPv6Address):
        host = "::1" if address.host in ("::", "") else address.host
        return f"https://[{host}]:{address.port}"
    if isinstance(address, IPv4Address):
        host = "127.0.0.1" if address.host in ("0.0.0.0", "") else address.host
        return f"https://{host}:{address.port}"
    return ""


def _describe(address: Any) -> str:
    host = getattr(address, "host", "?")
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{getattr(address, 'port', '?')}"


class AgentService(Service):
    """
    Listen with TLS on the endpoint, serve the resource, run the card's
    worker thread; C{listening} fires with the port once it listens.
    """

    def __init__(
        self,
        reactor: Any,
        listen: str,
        card: WorkerCard,
        resource: AgentResource,
        tls: ssl.CertificateOptions,
        public_url: str | None = None,
        exit_on_failure: bool = False,
    ) -> None:
        self._reactor = reactor
        self._public_url = public_url
        self._exit_on_failure = exit_on_failure
        self._listen = listen
        self.card = card
        self.resource = resource
        self._tls = tls
        self.port: IListeningPort | None = None
        self._factory: TLSMemoryBIOFactory | None = None
        self._watch = LoopingCall(resource.watch_card)
        self._watch.clock = reactor
        self.listening: Deferred[IListeningPort] = Deferred()

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.card.start()
        factory = TLSMemoryBIOFactory(self._tls, False, agent_site(self.resource))
        self._factory = factory

        Deferred.fromCoroutine(self._start(factory)).addCallbacks(
            self._listened, self._not_listening
        )

    async def _start(self, factory: TLSMemoryBIOFactory) -> IListeningPort:
        # The card's module first, on the card's thread: one that cannot
        # serve stops the agent now, not at the first PIN. The card itself
        # may be out of the reader.
        try:
            await self.card.load()
        except CardError as e:
            raise StartError(str(e)) from None
        if not self.running:
            raise CancelledError("the agent was stopped as it started")
        self._watch.start(CARD_WATCH_INTERVAL, now=False)
        return await listen(self._reactor, self._listen, factory)

    def _listened(self, port: IListeningPort) -> None:
        self.port = port
        address = port.getHost()
        self.resource.url = self._public_url or agent_url(address)
        _log.info(
            "cpsagent listening on {address} as {url} (TLS certificate "
            "{fingerprint}), card: {card}",
            address=_describe(address),
            url=self.resource.url,
            fingerprint=self.resource.tls_fingerprint,
            card=self.card.description,
        )
        if not is_loopback(address):
            _log.warn(
                "cpsagent listens on {address}, not only on the loopback: any "
                "machine that reaches this port can try PINs and, with a "
                "token, have the card sign",
                address=_describe(address),
            )
        self.listening.callback(port)

    def _not_listening(self, failure: Failure) -> None:
        # Said, and the stop asked for, before anyone waiting is told; an
        # agent stopped as it started has nothing to say.
        if isinstance(failure.value, CancelledError):
            pass
        elif self._exit_on_failure:
            exit_on_start_failure(self._reactor, "cpsagent", failure, _log)
        else:
            _log.error("cpsagent {reason}", reason=failure.getErrorMessage())
            self._reactor.callLater(0, self._reactor.stop)
        self.listening.errback(failure)
        self.listening.addErrback(lambda _: None)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        port, self.port = self.port, None
        if self._watch.running:
            self._watch.stop()
        # Connections kept alive by callers end with the agent: they would
        # reach a card it no longer holds.
        if self._factory is not None:
            for protocol in list(self._factory.protocols):
                protocol.transport.loseConnection()
        released = self.card.stop()
        if self.resource.audit is not None:
            self.resource.audit.close()
        stopping = [released]
        if port is not None:
            stopped: Deferred[None] | None = port.stopListening()
            if stopped is not None:
                stopping.append(stopped)
        return gatherResults(stopping).addCallback(lambda _: None)


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    @return: the agent service the options describe.
    """
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    if options["tls-identity"] is not None:
        key, chain = options["tls-identity"]
    else:
        key, certificate = self_signed_identity()
        chain = [certificate]
    backend = card_backend(options)
    if isinstance(backend, SoftCardBackend) and not backend.has_signature_key:
        _log.warn(
            "the soft card has no signature key (no --soft-card-signature): "
            "submissions cannot be signed with it"
        )
    card = WorkerCard(backend, reactor, options["card-timeout"])
    policy = signing_policy(options)
    _announce_policy(policy, options)
    resource = AgentResource(
        card,
        reactor,
        session_idle=options["session-idle"],
        allow_origin=options["allow-origin"],
        wrong_pin_pause=options["wrong-pin-pause"],
        policy=policy,
        rate_limit=options["rate-limit"],
        audit=AuditLog(options["audit-log"], reactor) if options["audit-log"] else None,
    )
    resource.tls_fingerprint = fingerprint(chain[0])
    service = AgentService(
        reactor,
        options["listen"],
        card,
        resource,
        server_tls_options(key, chain),
        public_url=options["public-url"],
        exit_on_failure=True,
    )
    service.setName("cpsagent")  # type: ignore[no-untyped-call]
    return service
