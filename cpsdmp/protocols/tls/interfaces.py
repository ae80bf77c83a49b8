"""
The contract between the TLS client and whatever holds the client's private
key: the CPS card through the agent, or a local key.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from cpsdmp.protocols.tls.schemes import SignatureScheme


class IRemoteKey(Interface):
    """
    A client identity whose private key the TLS client never sees.
    """

    supported_signature_schemes: Sequence[SignatureScheme] = Attribute(
        "The schemes C{sign} accepts, most preferred first."
    )

    def certificate_chain() -> Deferred[list[x509.Certificate]]:
        """
        Fetch the client certificate and the intermediates that follow it.

        @return: a Deferred that fires with the chain, leaf first.
        """

    def sign(data: bytes, scheme: SignatureScheme) -> Deferred[bytes]:
        """
        Sign C{data} (the whole message, not a digest) under C{scheme}.

        @return: a Deferred that fires with the signature bytes, or fails
            with an exception that says why the key holder refused.
        """
