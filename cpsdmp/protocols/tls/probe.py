"""
One remote-key TLS handshake against any server, and what a user checks
after it (protocol, cipher, group, server chain and its verification, client
certificate, resumption, time per step including the remote signature) as
plain data. The command C{cpsdmp probe} drives it.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory, Protocol

from cpsdmp.protocols.tls.endpoint import TLSClientEndpoint
from cpsdmp.protocols.tls.handshake import State, TLSClientConfig, TLSInfo
from cpsdmp.protocols.tls.session import SessionCache


class _Quiet(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


@inlineCallbacks
def probe(
    reactor: Any, host: str, port: int, config: TLSClientConfig, count: int = 1
) -> Any:
    """
    Connect C{count} times (sharing a session cache), closing each
    connection once established.

    @return: a Deferred that fires with one L{TLSInfo} per connection, or
        fails with the first connection's error.
    """
    if config.session_cache is None:
        config.session_cache = SessionCache(reactor)
    results: list[TLSInfo] = []
    for _ in range(count):
        endpoint = TLSClientEndpoint.for_host(reactor, host, port, config)
        protocol = yield endpoint.connect(Factory.forProtocol(_Quiet))
        info = protocol.transport.negotiated
        results.append(info)
    return results


def _name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


def report(info: TLSInfo, host: str, port: int, roots: int) -> dict[str, Any]:
    """
    @return: what a user checks after a handshake, as plain data.
    """
    waits = {
        State[name].value: round(seconds, 4) for name, seconds in info.timings.items()
    }
    return {
        "server": f"{host}:{port}",
        "protocol": info.version,
        "cipher": info.openssl_cipher,
        "cipher_suite": info.cipher_suite,
        "group": info.group,
        "server_signature_scheme": info.server_signature_scheme,
        "extended_master_secret": info.extended_master_secret,
        "resumed": info.resumed,
        "alpn": info.alpn.decode("ascii", "replace") if info.alpn else None,
        "server_chain": [_name(c) for c in info.server_chain],
        "verified_chain": [_name(c) for c in info.verified_chain],
        "verification": (
            f"OK: chain to a trusted root ({roots} configured), name {host}"
        ),
        "client_certificate_requested": info.client_certificate_requested,
        "client_certificate": (
            _name(info.client_chain[0]) if info.client_chain else None
        ),
        "client_signature_scheme": info.client_signature_scheme,
        "remote_signature_seconds": round(info.timings.get("WAIT_SIGNATURE", 0.0), 4),
        "timings": waits,
    }
