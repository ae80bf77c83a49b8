# twisted.web and twisted.application are not annotated.
# mypy: disable-error-code="no-untyped-call"
"""
C{twist dmpfacade}: the facade's command line, and the service that serves
its REST API (plain HTTP on loopback by default, HTTPS when given a
certificate) in front of the DMP.
"""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from twisted.application.service import Service
from twisted.internet import ssl
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from cpsdmp.facade.networks import DEFAULT_AGENT_NETWORKS, Network, parse_network
from cpsdmp.facade.resource import DEFAULT_MAX_REQUEST_BYTES, make_site
from cpsdmp.facade.service import DmpService, FacadeConfig
from cpsdmp.protocols.server_tls import server_tls_options
from cpsdmp.tapsupport import (
    check_endpoint,
    exit_on_start_failure,
    is_loopback,
    listen,
    number_option,
    read_certificates,
    read_tls_identity,
)
from cpsdmp.xds.context import (
    ACTIVITY_SECTOR_SYSTEM,
    PRACTICE_SETTING_SYSTEM,
    Software,
    Structure,
    StructureIdentifier,
    SubmissionDefaults,
)
from cpsdmp.xds.ebrim import INS_OID_PRODUCTION, INS_OID_TEST, CodedValue, is_oid

_log = Logger()

DEFAULT_LISTEN = "tcp:10080:interface=127.0.0.1"
SANDBOX_URL = "https://127.0.0.1:10443/si-dmp-server/v2/services"
PRODUCTION_URL = "https://lps2.dmp.gouv.fr/si-dmp-server/v2/services"
#: The code system of the submission sets' contentTypeCode (--content-type).
CONTENT_TYPE_SYSTEM = "1.2.250.1.213.2.2"
# A dotted OID (ITU-T X.660): no empty arc, no leading zero, first arc 0 to 2.


def _coded(option: str, system: str, value: str) -> CodedValue:
    """
    @return: the code C{value} gives as C{CODE[:display]}, in C{system}.
    @raise usage.UsageError: naming the option, when it gives no code.
    """
    code, _, display = value.partition(":")
    if not code.strip():
        raise usage.UsageError(
            f"--{option} {value}: no code; give CODE or CODE:display"
        )
    return CodedValue(code, system, display)


# Where no public address lies: private (RFC 1918, RFC 4193), shared
# (RFC 6598), loopback and link-local addresses.
_NON_PUBLIC_V4 = [
    IPv4Network(network)
    for network in [
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
    ]
]
_NON_PUBLIC_V6 = [IPv6Network(n) for n in ["fc00::/7", "::1/128", "fe80::/10"]]


def holds_public_addresses(network: Network) -> bool:
    """
    @return: whether C{network} holds addresses beyond the private, shared,
        loopback and link-local ranges: addresses of anyone on the Internet.
    """
    if isinstance(network, IPv4Network):
        return not any(network.subnet_of(block) for block in _NON_PUBLIC_V4)
    return not any(network.subnet_of(block) for block in _NON_PUBLIC_V6)


_SECONDS = "30 or 2.5"
_BYTES = f"{DEFAULT_MAX_REQUEST_BYTES} ({DEFAULT_MAX_REQUEST_BYTES // 2**20} MiB)"


class Options(usage.Options):
    """
    The command line of C{twist dmpfacade}.
    """

    synopsis = "[options]"
    longdesc = (
        "The DMP facade: a REST API for backends that performs DMP "
        "transactions with the professional's CPS card, reached through "
        "the agent context each request carries. Serves its OpenAPI "
        "description at /openapi.json."
    )

    optParameters = [
        ["listen", None, DEFAULT_LISTEN, "Endpoint of the REST API (plain HTTP)."],
        ["tls-cert", None, None, "PEM certificate chain: serve HTTPS instead."],
        ["tls-key", None, None, "PEM private key for --tls-cert."],
        [
            "dmp-url",
            None,
            SANDBOX_URL,
            f"The DMP's services (production: {PRODUCTION_URL}).",
        ],
        ["dmp-ca", None, None, "PEM file of the roots the DMP's chain must lead to."],
        ["testcard", None, None, "Trust this test card folder's root; test INS."],
        ["software-name", None, "cpsdmp", "The software's name for the VIHF."],
        ["software-version", None, "0.1", "The software's version."],
        ["homologation-id", None, None, "The DMP's homologation number."],
        ["source-oid", None, "1.2.250.1.999.1.1.1", "OID of this installation."],
        ["structure-name", None, None, "The health structure's name."],
        ["structure-kind", None, "RPPS_PRACTICE", "FINESS, SIRET or RPPS_PRACTICE."],
        ["structure-id", None, None, "The structure's number (without prefix)."],
        [
            "activity-sector",
            None,
            "SA07:Cabinet individuel",
            "Secteur d'activité, CODE[:display] (TRE_R02).",
        ],
        [
            "practice-setting",
            None,
            "AMBULATOIRE:Ambulatoire",
            "Default practiceSettingCode, CODE[:display] (JDV_J04).",
        ],
        [
            "content-type",
            None,
            "04:Hospitalisation de jour",
            "The submission sets' contentTypeCode, CODE[:display].",
        ],
        [
            "agent-timeout",
            None,
            30.0,
            "Seconds to wait for the agent.",
            number_option("agent-timeout", "seconds", _SECONDS),
        ],
        [
            "handshake-timeout",
            None,
            60.0,
            "Seconds for a TLS handshake.",
            number_option("handshake-timeout", "seconds", _SECONDS),
        ],
        [
            "dmp-timeout",
            None,
            60.0,
            "Seconds to wait for a connection to the DMP, and again for its "
            "answer; a read whose answer was lost is sent once more within "
            "what is left of them from its first send.",
            number_option("dmp-timeout", "seconds", _SECONDS),
        ],
        [
            "max-request-bytes",
            None,
            DEFAULT_MAX_REQUEST_BYTES,
            "Largest request body accepted, in bytes.",
            number_option("max-request-bytes", "bytes", _BYTES, whole=True),
        ],
    ]

    optFlags = [
        [
            "no-connection-reuse",
            None,
            "For benchmarks: a new connection and a full TLS handshake (one "
            "card signature) for every DMP exchange.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["agent-network"] = []

    def opt_agent_network(self, value: str) -> None:
        """Agents may be in this CIDR network (repeatable; default loopback)."""
        try:
            self["agent-network"].append(parse_network(value))
        except ValueError as error:
            raise usage.UsageError(f"--agent-network {value!r}: {error}") from None

    def postOptions(self) -> None:
        self["agent-network"] = self["agent-network"] or list(DEFAULT_AGENT_NETWORKS)
        check_endpoint("listen", self["listen"])
        roots: list[x509.Certificate] = []
        test_patients = False
        if self["testcard"]:
            from cpsdmp.agent.testcard import TestCard, TestCardError

            try:
                card = TestCard.load(self["testcard"])
            except TestCardError as error:
                raise usage.UsageError(str(error)) from None
            roots += read_certificates("testcard", card.ca_root)
            test_patients = True
        if self["dmp-ca"]:
            roots += read_certificates("dmp-ca", self["dmp-ca"])
        if not roots:
            raise usage.UsageError(
                "say which roots the DMP's certificate leads to: --dmp-ca PEM "
                "(or --testcard DIR for the sandbox)"
            )
        _check_dmp_url(self["dmp-url"])
        if bool(self["tls-cert"]) != bool(self["tls-key"]):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        if self["tls-cert"]:
            read_tls_identity("tls-cert", self["tls-cert"], "tls-key", self["tls-key"])
        if not is_oid(self["source-oid"]):
            raise usage.UsageError(
                f"--source-oid {self['source-oid']}: not an OID (digits separated "
                "by dots, such as 1.2.250.1.999.1.1.1)"
            )
        try:
            kind = StructureIdentifier[self["structure-kind"]]
        except KeyError:
            raise usage.UsageError(
                "--structure-kind is one of FINESS, SIRET, RPPS_PRACTICE"
            ) from None
        self["roots"] = roots
        self["structure"] = Structure(
            name=self["structure-name"] or "cpsdmp test structure",
            kind=kind,
            number=self["structure-id"] or "99900000000001",
            activity_sector=_coded(
                "activity-sector", ACTIVITY_SECTOR_SYSTEM, self["activity-sector"]
            ),
            practice_setting=_coded(
                "practice-setting", PRACTICE_SETTING_SYSTEM, self["practice-setting"]
            ),
        )
        self["software"] = Software(
            name=self["software-name"],
            version=self["software-version"],
            homologation_id=self["homologation-id"] or "",
            source_oid=self["source-oid"],
        )
        self["defaults"] = SubmissionDefaults(
            ins_authority=INS_OID_TEST if test_patients else INS_OID_PRODUCTION,
            content_type=_coded(
                "content-type", CONTENT_TYPE_SYSTEM, self["content-type"]
            ),
        )


def _check_dmp_url(url: str) -> None:
    """
    @raise usage.UsageError: unless C{url} is an https URL with a host and,
        if any, a valid port: the facade's TLS client speaks only HTTPS.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise usage.UsageError(f"--dmp-url {url}: {error}") from None
    if port == 0:
        raise usage.UsageError(f"--dmp-url {url}: port 0 is no port")
    if parts.scheme != "https":
        raise usage.UsageError(
            f"--dmp-url {url}: the DMP's services are reached over HTTPS: give "
            "an https:// URL"
        )
    if not parts.hostname:
        raise usage.UsageError(f"--dmp-url {url}: the URL names no host")


def server_options(cert: str, key: str) -> ssl.CertificateOptions:
    """
    @param cert: PEM chain, the facade's certificate first.
    @param key: PEM private key.
    @return: OpenSSL server options sending the whole chain.
    """
    return server_tls_options(*read_tls_identity("tls-cert", cert, "tls-key", key))


class FacadeService(Service):
    """
    Serves the facade's REST API; closes the DMP connections when stopped.
    """

    def __init__(
        self,
        listen: str,
        config: FacadeConfig,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        reactor: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.listen_on = listen
        self.dmp = DmpService(config, reactor)
        self.site = make_site(self.dmp, max_request_bytes)
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.port: IListeningPort | None = None

    def start(self) -> Deferred[IListeningPort]:
        """
        @return: a Deferred that fires with the listening port.
        """
        factory: Any = self.site
        if self.tls_cert and self.tls_key:
            factory = TLSMemoryBIOFactory(
                server_options(self.tls_cert, self.tls_key), False, self.site
            )

        def listening(port: IListeningPort) -> IListeningPort:
            self.port = port
            host = port.getHost()
            _log.info(
                "DMP facade on {scheme}://{host}:{port}, DMP {dmp}",
                scheme="https" if self.tls_cert else "http",
                host=getattr(host, "host", "?"),
                port=getattr(host, "port", "?"),
                dmp=self.dmp.config.dmp_url,
            )
            if not self.tls_cert and not is_loopback(host):
                _log.warn(
                    "the DMP facade serves plain HTTP on {host}:{port}, beyond "
                    "the loopback: agent contexts (their tokens) and documents "
                    "cross the network in clear; serve HTTPS with --tls-cert "
                    "and --tls-key, or listen on 127.0.0.1 behind a TLS proxy",
                    host=getattr(host, "host", "?"),
                    port=getattr(host, "port", "?"),
                )
            return port

        return listen(self.reactor, self.listen_on, factory).addCallback(listening)

    def startService(self) -> None:
        super().startService()
        maybeDeferred(self.start).addErrback(
            lambda failure: exit_on_start_failure(
                self.reactor, "dmpfacade", failure, _log
            )
        )

    def stopService(self) -> Deferred[Any]:
        """
        @return: a Deferred that fires once the port and the DMP
            connections are closed.
        """
        super().stopService()
        port, self.port = self.port, None
        stopped = port.stopListening() if port is not None else None
        closing = self.dmp.close()
        if stopped is None:
            return closing
        return stopped.addCallback(lambda _: closing)


def makeService(options: Options) -> FacadeService:
    """
    @return: the service C{twist dmpfacade} runs.
    """
    for option, meaning in [
        ("structure-id", "the structure's identifier"),
        ("structure-name", "the structure's name"),
        ("homologation-id", "the DMP homologation number"),
    ]:
        if not options[option]:
            _log.warn(
                "no --{option}: the VIHF carries a test value for {meaning}, "
                "which only a local DMP accepts",
                option=option,
                meaning=meaning,
            )
    for network in options["agent-network"]:
        if holds_public_addresses(network):
            _log.warn(
                "--agent-network {network} holds public addresses: the facade "
                "connects to an agent anywhere in it, wherever an agent "
                "context's URL leads, and sends it the context's token; name "
                "the workstations' own network (such as 10.20.0.0/16) or the "
                "end of the tunnel that reaches them",
                network=str(network),
            )
    config = FacadeConfig(
        dmp_url=options["dmp-url"],
        roots=options["roots"],
        structure=options["structure"],
        software=options["software"],
        defaults=options["defaults"],
        agent_timeout=options["agent-timeout"],
        handshake_timeout=options["handshake-timeout"],
        dmp_timeout=options["dmp-timeout"],
        reuse_connections=not options["no-connection-reuse"],
        agent_networks=options["agent-network"],
    )
    return FacadeService(
        options["listen"],
        config,
        options["tls-cert"],
        options["tls-key"],
        options["max-request-bytes"],
    )
