"""
Checking the server's certificate chain against the configured roots with
C{cryptography.x509.verification} and its name with C{service_identity}.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import re
from collections.abc import Sequence

from cryptography import x509
from cryptography.x509 import DNSName, IPAddress
from cryptography.x509.oid import ExtensionOID
from cryptography.x509.verification import (
    PolicyBuilder,
    Store,
    VerificationError,
)
from service_identity import CertificateError as NoNames
from service_identity import VerificationError as NameMismatch
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)

from cpsdmp.protocols.tls.alerts import AlertDescription, ProtocolViolation


@functools.lru_cache(maxsize=256)
def is_ip_literal(host: str) -> bool:
    # Cached: asked at every handshake, and a name fails two parsers.
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def check_server_chain(
    chain: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    host: str,
    now: datetime.datetime | None = None,
) -> list[x509.Certificate]:
    """
    Check that C{chain} (leaf first, as sent) is valid now, names C{host}
    (a DNS name or an IP literal) and leads to one of C{roots}.

    @return: the verified chain, leaf to root.
    @raise ProtocolViolation: with the alert to send and the reason.
    """
    if not chain:
        raise ProtocolViolation(
            AlertDescription.certificate_unknown, "the server sent no certificate"
        )
    if now is None:
        now = datetime.datetime.now(datetime.UTC)
    leaf = chain[0]
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise ProtocolViolation(
            AlertDescription.certificate_expired,
            f"the server certificate {leaf.subject.rfc4514_string()} is valid "
            f"from {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} to "
            f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, not now",
        )

    ip = is_ip_literal(host)
    try:
        if ip:
            verify_certificate_ip_address(leaf, host)
        else:
            verify_certificate_hostname(leaf, host)
    except NameMismatch as e:
        raise ProtocolViolation(
            AlertDescription.bad_certificate,
            f"the server certificate is not valid for {host!r}: {e}",
        ) from None
    except NoNames:
        # A name only in the subject's CN: service_identity does not fall
        # back to it, and RFC 9525 no longer allows it.
        raise ProtocolViolation(
            AlertDescription.bad_certificate,
            f"the server certificate {leaf.subject.rfc4514_string()} has no "
            f"subjectAltName, so it names no host, {host!r} included",
        ) from None

    subject: DNSName | IPAddress = (
        IPAddress(ipaddress.ip_address(host)) if ip else DNSName(host)
    )
    verifier = (
        PolicyBuilder()
        .store(Store(list(roots)))
        .time(now)
        .build_server_verifier(subject)
    )
    try:
        return list(verifier.verify(leaf, list(chain[1:])))
    except VerificationError as e:
        raise ProtocolViolation(
            AlertDescription.unknown_ca,
            "the server chain does not lead to a trusted root: "
            + path_problem(e, leaf, [*chain, *roots]),
        ) from None


# How cryptography's path builder says what it found wrong, and with which
# certificate (as Python shows the object).
_PROCESSING = re.compile(r"\s*\(encountered processing (<Certificate\(.*?\)>)\)")
_EXHAUSTED = "candidates exhausted: "
_NO_ISSUER = "all candidates exhausted with no interior errors"
_EXTENSION = re.compile(r"invalid extension: ([0-9.]+): (.*)")
_EXTENSION_NAMES = {
    getattr(ExtensionOID, name).dotted_string: name.replace("_", " ").lower()
    for name in dir(ExtensionOID)
    if name.isupper()
}


def path_problem(
    error: VerificationError,
    leaf: x509.Certificate,
    certificates: Sequence[x509.Certificate],
) -> str:
    """
    @return: what C{cryptography}'s path builder found wrong with the path
        from C{leaf}, in words: each certificate by its subject (RFC 4514),
        each extension by its name, never the library's own phrasing or
        Python's representation of its objects.
    @param certificates: the chain sent and the trusted roots, among which
        the one at fault is found by the representation the error names.
    """
    text = str(error).removeprefix("validation failed: ")
    subject = leaf.subject.rfc4514_string()
    processing = _PROCESSING.search(text)
    if processing is not None:
        named = processing.group(1)
        at_fault = next((c for c in certificates if repr(c) == named), None)
        if at_fault is not None:
            subject = at_fault.subject.rfc4514_string()
        text = text[: processing.start()] + text[processing.end() :]
    while text.startswith(_EXHAUSTED):
        text = text[len(_EXHAUSTED) :]
    if text == _NO_ISSUER:
        return (
            f"no trusted root issued the certificate of {subject} "
            f"(issuer {leaf.issuer.rfc4514_string()}), directly or through "
            "the intermediates the server sent"
        )
    extension = _EXTENSION.fullmatch(text)
    if extension is not None:
        oid, reason = extension.groups()
        name = _EXTENSION_NAMES.get(oid, oid)
        if reason == "Certificate is missing required extension":
            return (
                f"the certificate of {subject} lacks the {name} extension, "
                "which the path check requires of every certificate but a root"
            )
        return f"the certificate of {subject} has a bad {name} extension: {reason}"
    return f"the certificate of {subject}: {text}"


class VerifiedChains:
    """
    Remembers the chains already verified for a host against given roots, so
    that reconnecting to the same server skips path building and the name
    check; the validity dates are checked again on every use.
    """

    def __init__(self, size: int = 64) -> None:
        self._size = size
        self._chains: dict[tuple[object, ...], list[x509.Certificate]] = {}
        self._encoded: dict[
            tuple[object, ...], tuple[list[x509.Certificate], list[x509.Certificate]]
        ] = {}

    def check(
        self,
        chain: Sequence[x509.Certificate],
        roots: Sequence[x509.Certificate],
        host: str,
        now: datetime.datetime | None = None,
    ) -> list[x509.Certificate]:
        """
        Like L{check_server_chain}, from memory when possible.
        """
        when = now or datetime.datetime.now(datetime.UTC)
        key = (host, tuple(roots), tuple(chain))
        verified = self._chains.get(key)
        if verified is not None and all(
            c.not_valid_before_utc <= when <= c.not_valid_after_utc for c in verified
        ):
            return verified
        verified = check_server_chain(chain, roots, host, when)
        if len(self._chains) >= self._size:
            self._chains.pop(next(iter(self._chains)))
        self._chains[key] = verified
        return verified

    def check_encoded(
        self,
        encoded: Sequence[bytes],
        roots: Sequence[x509.Certificate],
        host: str,
        now: datetime.datetime | None = None,
    ) -> tuple[list[x509.Certificate], list[x509.Certificate]]:
        """
        Like L{check}, from the chain as the server sent it (DER, leaf
        first): the same bytes again are neither parsed nor verified again,
        only their validity dates are checked.

        @return: the chain sent, parsed, and the verified chain (lists of
            their own, the certificates shared).
        @raise ProtocolViolation: with the alert to send and the reason.
        """
        when = now or datetime.datetime.now(datetime.UTC)
        key = (host, tuple(roots), tuple(encoded))
        known = self._encoded.get(key)
        if known is not None and all(
            c.not_valid_before_utc <= when <= c.not_valid_after_utc for c in known[1]
        ):
            return list(known[0]), list(known[1])
        try:
            chain = [x509.load_der_x509_certificate(der) for der in encoded]
        except ValueError:
            raise ProtocolViolation(
                AlertDescription.bad_certificate,
                "the server sent an unreadable certificate",
            ) from None
        # Kept here only: the parsed chain is not remembered a second time.
        verified = check_server_chain(chain, roots, host, when)
        if len(self._encoded) >= self._size:
            self._encoded.pop(next(iter(self._encoded)))
        self._encoded[key] = (chain, verified)
        return list(chain), list(verified)
