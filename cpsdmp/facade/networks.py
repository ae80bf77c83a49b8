"""
Where the facade may reach agents: the networks its operator allows, and a
reactor for the agent clients that holds every TCP connection they make to
those networks.

An agent context comes from a frontend, so its URL can name any host; left
unchecked, the facade would carry the card's token to whatever answers there
and tell the caller whether a port inside the data centre is closed, open or
a TLS server. The check is made on the address itself, not on the URL's
name: on the address a connection is about to be made to (nothing is sent to
a refused one, not even a SYN), and again on the peer of the connection once
it is made, before the TLS handshake writes its first byte, so that what a
name resolves to decides, whatever the DNS says.
"""

# twisted.python.failure is not annotated.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
    ip_network,
)
from typing import Any

from twisted.internet.interfaces import IAddress, IConnector, IProtocolFactory
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from cpsdmp.agent.client import AgentError

_log = Logger()

Network = IPv4Network | IPv6Network

#: Loopback only: the agent on the facade's own machine, or the end of a
#: tunnel to the workstation that the organisation runs there.
DEFAULT_AGENT_NETWORKS: tuple[Network, ...] = (
    ip_network("127.0.0.0/8"),
    ip_network("::1/128"),
)


class AgentNotAllowed(AgentError):
    """
    The agent context's URL leads to an address outside the networks the
    facade may reach agents in; nothing was sent there.
    """


def parse_network(text: str) -> Network:
    """
    @return: the network C{text} names in CIDR notation (C{10.1.0.0/16},
        C{fd00::/8}); an address alone is a network of one.
    @raise ValueError: not a network, or host bits set (C{10.1.2.3/16}).
    """
    return ip_network(text.strip(), strict=True)


def is_allowed(host: str, networks: Sequence[Network]) -> bool:
    """
    @param host: an IPv4 or IPv6 address as a socket gives it (an IPv6 one
        may carry a C{%scope}).
    @return: whether it lies in one of C{networks}; an IPv4-mapped IPv6
        address counts as the IPv4 address it maps.
    """
    try:
        address: IPv4Address | IPv6Address = ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def _refusal() -> AgentNotAllowed:
    return AgentNotAllowed(
        "the agent context's URL leads outside the networks this facade may "
        "reach agents in (its operator's --agent-network): nothing was sent "
        "there"
    )


class _CheckedPeerFactory(ClientFactory):
    """
    Wraps the factory of one outgoing TCP connection: once it is made, the
    peer's address is checked before the wrapped factory builds the protocol
    that would write to it; a refused peer fails the connection attempt and
    the socket is closed unused.
    """

    noisy = False

    def __init__(self, wrapped: IProtocolFactory, networks: Sequence[Network]):
        self._wrapped: Any = wrapped
        self._networks = networks
        self._connector: IConnector | None = None
        self._refused = False

    def doStart(self) -> None:
        self._wrapped.doStart()

    def doStop(self) -> None:
        self._wrapped.doStop()

    def startedConnecting(self, connector: IConnector) -> None:
        self._connector = connector
        starting = getattr(self._wrapped, "startedConnecting", None)
        if starting is not None:
            starting(connector)

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        host = getattr(addr, "host", "")
        if is_allowed(host, self._networks):
            protocol: Protocol | None = self._wrapped.buildProtocol(addr)
            return protocol
        _log.warn(
            "refused an agent at {host}: outside --agent-network {networks}",
            host=host,
            networks=", ".join(str(n) for n in self._networks),
        )
        self._refused = True
        self._wrapped.clientConnectionFailed(self._connector, Failure(_refusal()))
        # No protocol: Twisted closes the connection without writing to it.
        return None

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self._wrapped.clientConnectionFailed(connector, reason)

    def clientConnectionLost(self, connector: IConnector, reason: Failure) -> None:
        if not self._refused:
            self._wrapped.clientConnectionLost(connector, reason)


class AgentNetworkReactor:
    """
    The reactor as the agent clients see it: the same in everything, but
    C{connectTCP} reaches only addresses in C{networks}.
    """

    def __init__(self, reactor: Any, networks: Sequence[Network]) -> None:
        self._reactor = reactor
        self.networks = tuple(networks)
        directlyProvides(self, *providedBy(reactor))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._reactor, name)

    def connectTCP(
        self,
        host: str,
        port: int,
        factory: IProtocolFactory,
        timeout: float = 30,
        bindAddress: Any = None,
    ) -> IConnector:
        """
        Connect as the reactor does, refusing at once an address outside
        the networks (a name is resolved by the reactor and its address
        checked once connected, like every peer).

        @raise AgentNotAllowed: C{host} is an address outside the networks.
        """
        if _is_address(host) and not is_allowed(host, self.networks):
            _log.warn(
                "refused an agent at {host}: outside --agent-network {networks}",
                host=host,
                networks=", ".join(str(n) for n in self.networks),
            )
            raise _refusal()
        checked = _CheckedPeerFactory(factory, self.networks)
        connector: IConnector = self._reactor.connectTCP(
            host, port, checked, timeout, bindAddress
        )
        return connector


def _is_address(host: str) -> bool:
    try:
        ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True
