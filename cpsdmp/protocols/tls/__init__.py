"""
A TLS 1.2 client whose private key lives elsewhere: on a CPS card, reached
through the agent, or in-process for tests. The handshake asks an
L{IRemoteKey} for the client certificate chain and for the CertificateVerify
signature, and waits on the Deferreds it returns.

HTTP over it, with connections kept and sessions resumed::

    config = TLSClientConfig(
        roots=dmp_roots,
        remote_key=key,  # any IRemoteKey
        session_cache=SessionCache(reactor),
        client_identity=card_holder_id,
    )
    agent = Agent.usingEndpointFactory(
        reactor,
        TLSAgentEndpointFactory(reactor, config),
        pool=HTTPConnectionPool(reactor),
    )
"""

from cpsdmp.protocols.tls.alerts import (
    AlertReceived,
    ConnectionFailed,
    HandshakeFailed,
    TLSError,
    TruncatedConnection,
)
from cpsdmp.protocols.tls.endpoint import TLSAgentEndpointFactory, TLSClientEndpoint
from cpsdmp.protocols.tls.handshake import TLSClientConfig, TLSInfo
from cpsdmp.protocols.tls.interfaces import IRemoteKey
from cpsdmp.protocols.tls.localkey import LocalKey
from cpsdmp.protocols.tls.schemes import SignatureScheme
from cpsdmp.protocols.tls.session import SessionCache

__all__ = [
    "AlertReceived",
    "ConnectionFailed",
    "HandshakeFailed",
    "IRemoteKey",
    "LocalKey",
    "SessionCache",
    "SignatureScheme",
    "TLSAgentEndpointFactory",
    "TLSClientConfig",
    "TLSClientEndpoint",
    "TLSError",
    "TLSInfo",
    "TruncatedConnection",
]
