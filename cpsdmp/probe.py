"""
C{cpsdmp probe URL}: one remote-key TLS handshake against any server, the
client key being the agent's card or a local key, reported the way
C{openssl s_client -brief} does, or as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from twisted.internet.defer import Deferred
from twisted.internet.task import react

from cpsdmp.cli import (
    MAX_PEM_BYTES,
    BadInput,
    pem_certificates,
    positive_seconds,
    read_agent_context,
    usage_error,
)
from cpsdmp.protocols.tls.alerts import TLSError
from cpsdmp.protocols.tls.endpoint import server_name
from cpsdmp.protocols.tls.handshake import TLSClientConfig
from cpsdmp.protocols.tls.interfaces import IRemoteKey
from cpsdmp.protocols.tls.localkey import LocalKey
from cpsdmp.protocols.tls.probe import probe, report


class ProbeError(Exception):
    """
    The probe could not even start: a bad URL, an unreadable file.
    """


def _local_key(key_path: str, chain: list[x509.Certificate]) -> IRemoteKey:
    try:
        with open(key_path, "rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except OSError as e:
        raise ProbeError(
            f"cannot read the private key {key_path}: {e.strerror}"
        ) from None
    try:
        key = load_pem_private_key(data, password=None)
    except TypeError:
        raise ProbeError(
            f"the private key in {key_path} is encrypted: give one that is not"
        ) from None
    except ValueError:
        raise ProbeError(f"no PEM private key that can be read in {key_path}") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ProbeError(f"{key_path} holds neither an RSA nor an EC key")
    return LocalKey(key, chain)


def _agent_key(context_path: str) -> IRemoteKey:
    from cpsdmp.agent.client import CpsAgentClient

    try:
        context = read_agent_context(Path(context_path))
    except BadInput as e:
        raise ProbeError(str(e)) from None
    try:
        return CpsAgentClient.from_context(context)
    except ValueError as e:
        raise ProbeError(f"the agent context {context_path}: {e}") from None


def _target(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"https://{url}")
    try:
        port = parts.port
    except ValueError as e:
        raise ProbeError(f"{url!r}: {e}") from None
    if parts.scheme != "https" or not parts.hostname:
        raise ProbeError(f"{url!r} is not an https URL")
    try:
        server_name(parts.hostname)
    except ValueError as e:
        raise ProbeError(str(e)) from None
    return parts.hostname, port or 443


def format_report(data: dict[str, Any]) -> str:
    lines = [
        "CONNECTION ESTABLISHED",
        f"Protocol version: {data['protocol']}",
        f"Ciphersuite: {data['cipher']} ({data['cipher_suite']})",
        f"Negotiated group: {data['group'] or '(resumed session)'}",
        f"Peer signature: {data['server_signature_scheme'] or '(resumed session)'}",
        f"Extended master secret: {'yes' if data['extended_master_secret'] else 'NO'}",
        f"Peer certificate: {data['server_chain'][0] if data['server_chain'] else '-'}",
    ]
    for issuer in data["verified_chain"][1:]:
        lines.append(f"  issued by: {issuer}")
    lines.append(f"Verification: {data['verification']}")
    if data["client_certificate"]:
        scheme = data["client_signature_scheme"]
        how = f"signed with {scheme}" if scheme else "resumed session, no new signature"
        lines.append(f"Client certificate: {data['client_certificate']} ({how})")
    elif data["client_certificate_requested"]:
        lines.append("Client certificate: requested, none sent")
    else:
        lines.append("Client certificate: not requested")
    offered = data.get("alpn_offered")
    if offered:
        lines.append(f"ALPN offered: {', '.join(offered)}")
    if data["alpn"] or offered:
        lines.append(f"ALPN protocol: {data['alpn'] or '(none negotiated)'}")
    lines.append(f"Resumed: {'yes' if data['resumed'] else 'no'}")
    lines.append(f"Remote signature: {data['remote_signature_seconds']:.3f} s")
    lines.append("Time per step:")
    for step, seconds in data["timings"].items():
        lines.append(f"  {seconds:8.4f} s  {step}")
    return "\n".join(lines)


def alpn_name(value: str) -> bytes:
    """
    An argparse type: an ALPN protocol name, 1 to 255 printable ASCII
    characters.
    """
    if not (1 <= len(value) <= 255 and all("!" <= c <= "~" for c in value)):
        raise argparse.ArgumentTypeError(
            f"{value[:40]!r} is not an ALPN protocol name (1 to 255 printable "
            "ASCII characters)"
        )
    return value.encode("ascii")


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "probe",
        help="run the remote-key TLS handshake against a server and report it",
        description="Connect to URL with the cpsdmp TLS client, the client key "
        "being the agent's card (--agent-context) or a local key (--key with "
        "--cert), one or the other, and report the session like `openssl "
        "s_client -brief`. With neither, no client certificate is offered: a "
        "server that requires one refuses the handshake.",
        epilog="Exit status: 0 when the handshake succeeded, 1 when it "
        "failed, 2 for a bad argument.",
    )
    parser.add_argument("url", metavar="URL", help="https://host[:port]/...")
    parser.add_argument(
        "--ca",
        required=True,
        type=pem_certificates,
        metavar="PEM",
        help="PEM file of the trusted roots",
    )
    parser.add_argument(
        "--agent-context",
        metavar="FILE",
        help="JSON agent context {url, token, tlsFingerprint}: the card behind "
        "that agent signs (not with --key/--cert)",
    )
    parser.add_argument(
        "--key",
        metavar="PEM",
        help="PEM private key, with --cert (instead of the agent)",
    )
    parser.add_argument(
        "--cert",
        type=pem_certificates,
        metavar="PEM",
        help="PEM client certificate and its chain, with --key",
    )
    parser.add_argument(
        "--reconnect", action="store_true", help="connect twice, say if it resumed"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--allow-no-ems",
        action="store_true",
        help="accept a server without the extended master secret",
    )
    parser.add_argument(
        "--allow-no-renegotiation-info",
        action="store_true",
        help="accept a server without secure renegotiation (RFC 5746)",
    )
    parser.add_argument(
        "--alpn",
        action="append",
        default=[],
        type=alpn_name,
        metavar="PROTOCOL",
        help="protocol to offer by ALPN, such as http/1.1 (repeatable)",
    )
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=30.0,
        metavar="SECONDS",
        help="seconds for each wait, the key holder's included (default 30; "
        "twice that for the whole handshake)",
    )
    parser.set_defaults(func=run)


def _config(args: argparse.Namespace) -> TLSClientConfig:
    if args.key or args.cert:
        remote: IRemoteKey | None = _local_key(args.key, args.cert)
    elif args.agent_context:
        remote = _agent_key(args.agent_context)
    else:
        remote = None
    return TLSClientConfig(
        roots=args.ca,
        remote_key=remote,
        alpn=args.alpn,
        allow_no_extended_master_secret=args.allow_no_ems,
        allow_no_renegotiation_info=args.allow_no_renegotiation_info,
        remote_key_timeout=args.timeout,
        handshake_timeout=2 * args.timeout,
    )


def run(args: argparse.Namespace) -> int:
    """
    Run the probe on the global reactor.

    @return: 0 when every handshake succeeded, 1 when one failed, 2 when
        the probe could not start.
    """
    if args.agent_context and (args.key or args.cert):
        return usage_error(
            "probe",
            "--agent-context and --key/--cert exclude each other: the client "
            "key is the agent's card or a local key, not both",
        )
    if bool(args.key) != bool(args.cert):
        return usage_error("probe", "--key and --cert go together")
    try:
        host, port = _target(args.url)
        config = _config(args)
    except ProbeError as e:
        print(f"cpsdmp probe: {e}", file=sys.stderr)
        return 2

    outcome: dict[str, Any] = {}

    def main(reactor: Any) -> Deferred[None]:
        d: Deferred[Any] = probe(
            reactor, host, port, config, 2 if args.reconnect else 1
        )

        def done(result: Any) -> None:
            outcome["result"] = result

        return d.addBoth(done)

    started = time.monotonic()
    try:
        react(main)
    except SystemExit:
        pass
    result = outcome.get("result")
    if result is None:
        print("cpsdmp probe: ended without a result", file=sys.stderr)
        return 1
    if not isinstance(result, list):
        error = result.value
        kind = "TLS error" if isinstance(error, TLSError) else type(error).__name__
        if args.json:
            print(json.dumps({"error": str(error), "kind": kind}, indent=2))
        print(f"CONNECTION FAILED ({kind}): {error}", file=sys.stderr)
        return 1
    reports = [report(info, host, port, len(config.roots)) for info in result]
    if args.alpn:
        for data in reports:
            data["alpn_offered"] = [name.decode("ascii") for name in args.alpn]
    if args.json:
        out: Any = reports[0] if len(reports) == 1 else reports
        print(json.dumps(out, indent=2))
    else:
        for i, data in enumerate(reports):
            if i:
                print("---\nReconnected:")
            print(format_report(data))
        if args.reconnect:
            resumed = reports[1]["resumed"]
            print(f"Second connection resumed: {'yes' if resumed else 'NO'}")
        print(f"Total: {time.monotonic() - started:.3f} s")
    return 0
