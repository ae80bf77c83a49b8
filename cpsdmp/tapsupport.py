# twisted.python.failure and twisted.internet.endpoints are not annotated.
# mypy: disable-error-code="no-untyped-call"
"""
What the C{twist} services of cpsdmp share at start: the files and numbers
their options name, read and checked before anything starts, each refusal a
one-line usage error naming the option and the form it takes; and a start
that fails (a port in use, a database that does not open) said in one line,
after which the process exits with status 1 instead of running without
serving.
"""

from __future__ import annotations

import ipaddress
import math
import os
import sys
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import (
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    serverFromString,
)
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from cpsdmp.protocols.server_tls import load_server_identity

_log = Logger()


class StartError(Exception):
    """
    A service could not start; the message says what and why, in one line.
    """


def number_option(
    option: str,
    unit: str,
    example: str,
    *,
    whole: bool = False,
    minimum: float = 0,
    minimum_allowed: bool = False,
    maximum: float | None = None,
) -> Callable[[str], float]:
    """
    A coerce function for an option of C{usage.Options.optParameters} that
    takes a number, finite, above C{minimum} (or from it, when
    C{minimum_allowed}) and at most C{maximum}; a whole number when
    C{whole}, returned as an C{int}.

    @param option: the option's name, without its dashes, for the message.
    @param unit: what the number counts (C{seconds}, C{bytes}).
    @param example: a value that the option takes, as the message gives it.
    @return: the coerce function; it raises a L{usage.UsageError} naming
        the option, the value and the form expected, which twist prints as
        it is (it words a C{ValueError} as a "Parameter type enforcement"
        failure that names no option).
    """
    if maximum is not None:
        bounds = f"from {minimum:g} to {maximum:g}"
        if not minimum_allowed:
            bounds = f"above {minimum:g} and at most {maximum:g}"
    else:
        bounds = f"from {minimum:g}" if minimum_allowed else f"above {minimum:g}"
    form = f"{'a whole' if whole else 'a'} number of {unit} {bounds}, such as {example}"

    def coerce(value: str) -> float:
        try:
            parsed: float = int(value, 10) if whole else float(value)
        except ValueError:
            parsed = math.nan
        if not (
            math.isfinite(parsed)
            and (parsed >= minimum if minimum_allowed else parsed > minimum)
            and (maximum is None or parsed <= maximum)
        ):
            raise usage.UsageError(f"--{option} {value}: not {form}")
        return parsed

    return coerce


def check_endpoint(option: str, description: str) -> None:
    """
    Check a --listen endpoint: TCP, over IPv4 (C{tcp:}) or IPv6
    (C{tcp6:}), the only kind the services serve on. Each wraps its own TLS,
    so an C{ssl:} endpoint would be TLS in TLS; and a caller on a UNIX
    socket has no address to check, log or give an agent's URL with.

    @raise usage.UsageError: when C{description} is not a server endpoint
        description that Twisted can parse, is not a TCP one, or names a
        TCP port outside 0 to 65535 (which Twisted parses, and only the
        listening refuses).
    """
    try:
        # Only parsed: the endpoint keeps the reactor and does nothing with
        # it until it listens, which this one never does.
        endpoint = serverFromString(_NOT_A_REACTOR, description)
    except Exception as e:  # endpoint parsers raise many kinds
        raise usage.UsageError(
            f"--{option} {description}: not a server endpoint ({e}); for "
            "example tcp:PORT:interface=127.0.0.1"
        ) from None
    if not isinstance(endpoint, TCP4ServerEndpoint | TCP6ServerEndpoint):
        raise usage.UsageError(
            f"--{option} {description}: not a TCP endpoint (tcp: or tcp6:); "
            "for example tcp:PORT:interface=127.0.0.1"
        )
    # The TCP endpoints keep their port there.
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:
        raise usage.UsageError(
            f"--{option} {description}: port {port} is not from 0 to 65535; "
            "for example tcp:PORT:interface=127.0.0.1"
        )


_NOT_A_REACTOR = object()


def _read(option: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise usage.UsageError(
            f"--{option} {path}: cannot read it ({e.strerror})"
        ) from None


def read_certificates(option: str, path: str) -> list[x509.Certificate]:
    """
    @return: the PEM certificates in C{path}, in their order.
    @raise usage.UsageError: naming the option and the file when it cannot
        be read or holds no PEM certificate.
    """
    data = _read(option, path)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise usage.UsageError(
            f"--{option} {path}: not a PEM certificate file"
        ) from None


def read_tls_identity(
    cert_option: str, cert_path: str, key_option: str, key_path: str
) -> tuple[PrivateKeyTypes, list[x509.Certificate]]:
    """
    @return: the private key and the certificate chain (its own certificate
        first, then each issuer in turn), once checked to belong together.
    @raise usage.UsageError: naming the option and the file that cannot serve.
    """
    try:
        return load_server_identity(
            cert_path, key_path, f"--{cert_option}", f"--{key_option}"
        )
    except ValueError as e:
        raise usage.UsageError(str(e)) from None


def listen(
    reactor: Any, description: str, factory: IProtocolFactory
) -> Deferred[IListeningPort]:
    """
    Listen on the endpoint C{description} describes.

    @return: a Deferred that fires with the port, or fails with a
        L{StartError} that says why in one line.
    """

    def failed(failure: Failure) -> Failure:
        error = failure.value
        reason = failure.getErrorMessage()
        if isinstance(error, CannotListenError) and error.socketError is not None:
            socket_error = error.socketError
            reason = getattr(socket_error, "strerror", None) or str(socket_error)
        return Failure(StartError(f"cannot listen on {description}: {reason}"))

    def start() -> Deferred[IListeningPort]:
        endpoint = serverFromString(reactor, description)
        listening: Deferred[IListeningPort] = endpoint.listen(factory)
        return listening

    # An endpoint that fails as it is made fails like one that cannot listen.
    return maybeDeferred(start).addErrback(failed)


def is_loopback(address: Any) -> bool:
    """
    @return: whether only this machine can reach C{address}: an IP address
        on the loopback, or a UNIX socket.
    """
    if not isinstance(address, IPv4Address | IPv6Address):
        return True
    try:
        return ipaddress.ip_address(address.host.split("%")[0]).is_loopback
    except ValueError:
        return False


def exit_on_start_failure(
    reactor: Any, name: str, failure: Failure, log: Logger = _log
) -> None:
    """
    Say in one line on C{log} why the service C{name} did not start (a
    traceback only for an error nobody foresaw), stop the reactor, and have
    the process exit with status 1 once it has stopped: C{twist} itself
    would exit 0, and a service manager must see that the service is not
    running.
    """
    if failure.check(StartError):
        log.error("{name} {reason}", name=name, reason=failure.getErrorMessage())
    else:
        log.failure("{name} could not start", failure, name=name)
    reactor.addSystemEventTrigger("after", "shutdown", _exit, 1)
    reactor.callLater(0, reactor.stop)


def _exit(status: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
