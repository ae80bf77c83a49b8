"""
Client endpoints that speak our TLS over TCP, and an endpoint factory for
C{twisted.web.client.Agent.usingEndpointFactory}, so that the Agent, its
connection pool and treq run HTTPS with a remote client key unchanged.
"""

from __future__ import annotations

from typing import Any

import idna
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.web.client import URI
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from cpsdmp.protocols.tls.handshake import TLSClientConfig
from cpsdmp.protocols.tls.protocol import TLSClientProtocol
from cpsdmp.protocols.tls.validation import is_ip_literal


def server_name(host: str) -> str:
    """
    @return: the name of C{host} to send in the server_name extension and to
        check the server's certificate against: an address as it is, a host
        name in its ASCII form (IDNA, the certificate's form too) and
        without the trailing dot of an absolute name (RFC 6066, section 3).
    @raise ValueError: when IDNA refuses the name.
    """
    if is_ip_literal(host):
        return host
    name = host[:-1] if host.endswith(".") else host
    if name.isascii():
        return name
    try:
        return idna.encode(name, uts46=True).decode("ascii")
    except idna.IDNAError as e:
        raise ValueError(f"{host!r} is not a valid host name: {e}") from None


class _TLSFactory(Factory):
    noisy = False

    def __init__(
        self,
        wrapped: IProtocolFactory,
        config: TLSClientConfig,
        host: str,
        port: int,
        clock: IReactorTime,
    ) -> None:
        self.wrapped = wrapped
        self.config = config
        self.host = host
        self.port = port
        self.clock = clock

    def buildProtocol(self, addr: Any) -> TLSClientProtocol | None:
        inner = self.wrapped.buildProtocol(addr)
        if inner is None:
            return None
        protocol = TLSClientProtocol(
            inner, self.config, self.host, self.port, self.clock
        )
        protocol.factory = self
        return protocol


@implementer(IStreamClientEndpoint)
class TLSClientEndpoint:
    """
    Connects through C{tcp} (an endpoint to C{host}:C{port}) and runs our
    TLS handshake on the connection before the application protocol sees it.
    """

    def __init__(
        self,
        clock: IReactorTime,
        tcp: IStreamClientEndpoint,
        host: str,
        port: int,
        config: TLSClientConfig,
    ) -> None:
        self._clock = clock
        self._tcp = tcp
        self._host = host
        self._port = port
        self._config = config

    @classmethod
    def for_host(
        cls, reactor: Any, host: str, port: int, config: TLSClientConfig
    ) -> TLSClientEndpoint:
        """
        @return: an endpoint to C{host} (a name, IDNA or not, or an address)
            at C{port}.
        @raise ValueError: when C{host} is not a valid host name.
        """
        # Resolved without its trailing dot too: /etc/hosts names no
        # absolute name, and a resolver tries a dotted name as it is first.
        name = server_name(host)
        tcp = HostnameEndpoint(reactor, name.encode("ascii"), port, timeout=30)
        return cls(reactor, tcp, name, port, config)

    @property
    def host(self) -> str:
        """
        The server's name as the handshake sends and checks it.
        """
        return self._host

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        """
        @return: a Deferred that fires with the application protocol once
            the handshake is done (its transport carries C{negotiated}), or
            fails with the handshake's error.
        """
        factory = _TLSFactory(
            protocolFactory, self._config, self._host, self._port, self._clock
        )
        connecting = self._tcp.connect(factory)

        def handshake(protocol: IProtocol) -> Deferred[IProtocol]:
            assert isinstance(protocol, TLSClientProtocol)
            done = protocol.when_established()
            return done.addCallback(lambda _: protocol.wrapped)

        return connecting.addCallback(handshake)


@implementer(IAgentEndpointFactory)
class TLSAgentEndpointFactory:
    """
    Gives C{Agent.usingEndpointFactory} one of our TLS endpoints per HTTPS
    URI; the same C{config} (and so the same session cache and key) serves
    every host.
    """

    def __init__(self, reactor: Any, config: TLSClientConfig) -> None:
        self._reactor = reactor
        self._config = config

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        if uri.scheme != b"https":
            raise ValueError(
                f"only https URLs can use the remote-key TLS client, not "
                f"{uri.scheme.decode('ascii', 'replace')}"
            )
        host = uri.host.decode("ascii")
        return TLSClientEndpoint.for_host(self._reactor, host, uri.port, self._config)
