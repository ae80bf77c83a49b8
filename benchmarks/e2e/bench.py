"""
The whole chain measured: TD2.1 submissions through the facade (with the
card on a SoftHSM2 token behind the agent) to the local DMP, each a process
of its own on the loopback, beside a reference client that sends the same
TD2.1 message, built with cpsdmp.xds, straight to the local DMP over
OpenSSL (pyOpenSSL) with the soft card's keys in its own process: the floor
any facade would stand on. Run from the checkout's root:

    python benchmarks/e2e/bench.py [--latency N] [--total N] [--concurrency C]

It prints a table and, with --json FILE, writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(__file__))))

import treq  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402
from cryptography.hazmat.primitives.serialization import pkcs12  # noqa: E402
from OpenSSL import crypto  # noqa: E402
from twisted.internet import ssl  # noqa: E402
from twisted.internet.defer import (  # noqa: E402
    DeferredSemaphore,
    ensureDeferred,
    gatherResults,
)
from twisted.internet.task import react  # noqa: E402
from twisted.web.client import Agent, HTTPConnectionPool  # noqa: E402
from twisted.web.http_headers import Headers  # noqa: E402
from twisted.web.iweb import IPolicyForHTTPS  # noqa: E402
from zope.interface import implementer  # noqa: E402

from cpsdmp.agent.client import open_session  # noqa: E402
from cpsdmp.agent.testcard import TestCard, init_testcard  # noqa: E402
from cpsdmp.demo import Demo  # noqa: E402
from cpsdmp.facade.client import FacadeClient  # noqa: E402
from cpsdmp.facade.service import professional_from  # noqa: E402
from cpsdmp.facade.tap import Options as FacadeOptions  # noqa: E402
from cpsdmp.protocols.soap import read_message  # noqa: E402
from cpsdmp.sandbox.store import TEST_PATIENTS  # noqa: E402
from cpsdmp.xds.sample import SamplePatient, sample_cda  # noqa: E402
from cpsdmp.xds.signature import local_signer  # noqa: E402
from cpsdmp.xds.submit import SigningIdentity, prepare_td21  # noqa: E402
from cpsdmp.xds.transactions import (  # noqa: E402
    DmpEndpoints,
    read_registry_response,
)

TIMEOUT = 60.0

PATIENTS = [
    SamplePatient(r.patient.ins, r.family, r.given, r.gender, r.birth_date)
    for r in TEST_PATIENTS
]


def _document(card: TestCard, n: int) -> bytes:
    return sample_cda(
        card.professional, PATIENTS[n % len(PATIENTS)], text=f"Mesure {n}.\n"
    )


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "median_ms": statistics.median(ordered) * 1000,
        "p90_ms": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] * 1000,
        "mean_ms": statistics.fmean(ordered) * 1000,
    }


# -- the reference client: OpenSSL, the keys in this process ----------------


@implementer(IPolicyForHTTPS)
class _ClientCertificatePolicy:
    """
    TLS to the local DMP with the soft card's authentication certificate.
    """

    def __init__(self, card: TestCard) -> None:
        loaded = pkcs12.load_pkcs12(
            Path(card.soft_card).read_bytes(), card.pin.encode()
        )
        assert loaded.key is not None and loaded.cert is not None
        self.certificate = loaded.cert.certificate
        self.chain = [c.certificate for c in loaded.additional_certs]
        key = crypto.PKey.from_cryptography_key(loaded.key)  # type: ignore[arg-type]
        cert = crypto.X509.from_cryptography(self.certificate)
        self.options = ssl.optionsForClientTLS(
            "127.0.0.1",
            trustRoot=ssl.Certificate.loadPEM(Path(card.ca_root).read_bytes()),
            clientCertificate=ssl.PrivateCertificate.fromCertificateAndKeyPair(
                ssl.Certificate(cert), ssl.KeyPair(key)
            ),
            extraCertificateOptions={
                "extraCertChain": [
                    crypto.X509.from_cryptography(c) for c in self.chain[:1]
                ]
            },
        )

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return self.options


class ReferenceClient:
    """
    Builds and signs each TD2.1 with cpsdmp.xds and the soft card's keys in
    this process, and posts it to the local DMP over pyOpenSSL.
    """

    def __init__(self, reactor: Any, card: TestCard, dmp_url: str, reuse: bool) -> None:
        self.reactor = reactor
        policy = _ClientCertificatePolicy(card)
        signature = pkcs12.load_pkcs12(
            Path(card.soft_card_signature).read_bytes(), card.pin.encode()
        )
        assert isinstance(signature.key, rsa.RSAPrivateKey)
        assert signature.cert is not None
        self.signing = SigningIdentity(
            local_signer(signature.key),
            signature.cert.certificate,
            [c.certificate for c in signature.additional_certs],
        )
        # The same settings as a facade started with --testcard.
        options = FacadeOptions()
        options.parseOptions(["--testcard", card.directory])
        self.options = options
        holder = {"id": card.professional["id"], **card.professional}
        self.professional = professional_from(holder, policy.certificate)
        self.issuer = policy.certificate.subject.rfc4514_string()
        self.endpoints = DmpEndpoints(dmp_url)
        self.pool = HTTPConnectionPool(reactor)
        self.pool.persistent = reuse
        self.pool.maxPersistentPerHost = 8
        self.http = treq.client.HTTPClient(
            Agent(reactor, contextFactory=policy, pool=self.pool)
        )

    async def submit(self, document: bytes) -> dict[str, float]:
        started = time.perf_counter()
        prepared = await prepare_td21(
            [document],
            professional=self.professional,
            structure=self.options["structure"],
            software=self.options["software"],
            defaults=self.options["defaults"],
            endpoints=self.endpoints,
            issuer=self.issuer,
            signing=self.signing,
            clock=self.reactor,
        )
        signed = time.perf_counter()
        message = prepared.message
        response = await self.http.post(
            message.url,
            data=message.body(),
            headers=Headers({"Content-Type": [message.content_type]}),
            timeout=TIMEOUT,
        )
        body = await response.content()
        content_type = (response.headers.getRawHeaders("content-type") or [""])[0]
        result = read_registry_response(read_message(content_type, body))
        if not result.success:
            raise RuntimeError(f"the local DMP answered {result.status}")
        done = time.perf_counter()
        return {"total": done - started, "signature": signed - started}

    def close(self) -> Any:
        return self.pool.closeCachedConnections()


# -- the runs ------------------------------------------------------------------


async def _throughput(
    reactor: Any, total: int, concurrency: int, one: Callable[[int], Awaitable[Any]]
) -> float:
    semaphore = DeferredSemaphore(concurrency)
    started = time.perf_counter()
    await gatherResults(
        [
            semaphore.run(lambda n=n: ensureDeferred(one(n)))  # type: ignore[misc]
            for n in range(total)
        ],
        consumeErrors=True,
    )
    return total / (time.perf_counter() - started)


async def _facade_latency(
    facade: FacadeClient, context: dict[str, Any], card: TestCard, count: int
) -> dict[str, Any]:
    rows = []
    for n in range(count):
        started = time.perf_counter()
        answer = await facade.td21_submit([_document(card, n)], context)
        total = time.perf_counter() - started
        timings = answer["timings"]
        rows.append((total, timings))
    first_total, first = rows[0]
    steady = rows[1:]
    by_connection: dict[str, int] = {}
    for _, t in steady:
        by_connection[t["connection"]] = by_connection.get(t["connection"], 0) + 1
    handshakes = [t["handshakeSignature"] for _, t in steady if t["handshakeSignature"]]
    return {
        "first": {
            "total_ms": first_total * 1000,
            "submissionSetSignature_ms": first["submissionSetSignature"] * 1000,
            "dmp_ms": first["dmp"] * 1000,
            "handshakeSignature_ms": (first["handshakeSignature"] or 0) * 1000,
            "connection": first["connection"],
        },
        "total": _stats([r[0] for r in steady]),
        "submissionSetSignature": _stats(
            [t["submissionSetSignature"] for _, t in steady]
        ),
        "dmp": _stats([t["dmp"] for _, t in steady]),
        "handshakeSignature": _stats(handshakes) if handshakes else None,
        "connections": by_connection,
    }


_EVENT = re.compile(
    r"DMP (?P<action>\S+): (?P<code>\S+) in (?P<seconds>[\d.]+)s, connection "
    r"(?P<connection>[a-z ]+), card signature"
)


def _logged_connections(log: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for match in _EVENT.finditer(log.read_text("utf-8", "replace")):
        counts[match["connection"]] = counts.get(match["connection"], 0) + 1
    return counts


async def run(reactor: Any, arguments: argparse.Namespace) -> dict[str, Any]:
    chain = Demo(reactor, None, keep=arguments.keep)
    directory = chain.directory
    card = init_testcard(directory / "card", softhsm=True)
    figures: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "latency_requests": arguments.latency,
        "throughput_requests": arguments.total,
        "concurrency": arguments.concurrency,
    }
    try:
        dmp_url = await chain.start_sandbox(card)
        url, pinned = await chain.start_agent(
            card, extra_arguments=["--rate-limit", "1000000/60"]
        )
        reuse_url = await chain.start_facade(card, dmp_url, "facade")
        fresh_url = await chain.start_facade(
            card, dmp_url, "facade-no-reuse", ["--no-connection-reuse"]
        )
        context = await open_session(url, card.pin, pinned, reactor, TIMEOUT)
        reuse = FacadeClient(reuse_url, reactor, timeout=TIMEOUT)
        fresh = FacadeClient(fresh_url, reactor, timeout=TIMEOUT)
        reference = ReferenceClient(reactor, card, dmp_url, reuse=True)
        reference_fresh = ReferenceClient(reactor, card, dmp_url, reuse=False)
        try:
            print("latency, one at a time ...", file=sys.stderr)
            figures["latency_facade_reuse"] = await _facade_latency(
                reuse, context, card, arguments.latency
            )
            figures["latency_facade_no_reuse"] = await _facade_latency(
                fresh, context, card, arguments.latency
            )
            for name, client in [
                ("latency_reference_reuse", reference),
                ("latency_reference_no_reuse", reference_fresh),
            ]:
                rows = [
                    await client.submit(_document(card, n))
                    for n in range(arguments.latency)
                ]
                figures[name] = {
                    "total": _stats([r["total"] for r in rows[1:]]),
                    "submissionSetSignature": _stats(
                        [r["signature"] for r in rows[1:]]
                    ),
                }

            print("throughput ...", file=sys.stderr)

            def through(facade: FacadeClient) -> Callable[[int], Awaitable[Any]]:
                return lambda n: facade.td21_submit([_document(card, n)], context)

            for name, one in [
                ("facade_reuse", through(reuse)),
                ("facade_no_reuse", through(fresh)),
                ("reference_reuse", lambda n: reference.submit(_document(card, n))),
                (
                    "reference_no_reuse",
                    lambda n: reference_fresh.submit(_document(card, n)),
                ),
            ]:
                figures[f"per_second_{name}"] = await _throughput(
                    reactor, arguments.total, arguments.concurrency, one
                )
        finally:
            await reuse.close()
            await fresh.close()
            await reference.close()
            await reference_fresh.close()
    finally:
        await chain.stop_processes()
        figures["facade_log_connections"] = _logged_connections(
            directory / "facade.log"
        )
        figures["facade_no_reuse_log_connections"] = _logged_connections(
            directory / "facade-no-reuse.log"
        )
        audit = [
            json.loads(line)
            for line in chain.audit_log().read_text("utf-8").splitlines()
            if line.strip()
        ]
        figures["card_authentication_signatures"] = sum(
            1
            for r in audit
            if r.get("key") == "authentication" and r.get("outcome") == "signed"
        )
        chain.clean_up(keep=False)
    return figures


def report(figures: dict[str, Any]) -> None:
    print(
        f"\n{figures['cpus']} CPU(s); latency over {figures['latency_requests']} "
        f"sequential TD2.1 (the first apart); throughput over "
        f"{figures['throughput_requests']} TD2.1, {figures['concurrency']} at a time"
    )
    print("\nTD2.1 latency, ms (median / p90)")
    for name in ["facade_reuse", "facade_no_reuse"]:
        f = figures[f"latency_{name}"]
        line = (
            f"  {name:<22} total {f['total']['median_ms']:6.1f} / "
            f"{f['total']['p90_ms']:6.1f}   card set signature "
            f"{f['submissionSetSignature']['median_ms']:6.1f}   DMP exchange "
            f"{f['dmp']['median_ms']:6.1f}"
        )
        if f["handshakeSignature"]:
            line += (
                f"   (of which handshake card signature "
                f"{f['handshakeSignature']['median_ms']:.1f})"
            )
        print(line + f"   connections {f['connections']}")
        first = f["first"]
        print(
            f"  {'  first request':<22} total {first['total_ms']:6.1f}"
            f"            card set signature {first['submissionSetSignature_ms']:6.1f}"
            f"   DMP exchange {first['dmp_ms']:6.1f}   ({first['connection']}, "
            f"handshake card signature {first['handshakeSignature_ms']:.1f})"
        )
    for name in ["reference_reuse", "reference_no_reuse"]:
        f = figures[f"latency_{name}"]
        print(
            f"  {name:<22} total {f['total']['median_ms']:6.1f} / "
            f"{f['total']['p90_ms']:6.1f}   in-process set signature "
            f"{f['submissionSetSignature']['median_ms']:6.1f}"
        )
    print("\nSubmissions per second")
    for kind in ["reuse", "no_reuse"]:
        facade = figures[f"per_second_facade_{kind}"]
        floor = figures[f"per_second_reference_{kind}"]
        print(
            f"  {kind:<9} facade {facade:6.1f}   reference {floor:6.1f}   "
            f"facade/reference {facade / floor:.2f}"
        )
    print(
        f"\nfacade log, connections: {figures['facade_log_connections']}; "
        f"without reuse: {figures['facade_no_reuse_log_connections']}; "
        f"card authentication signatures: "
        f"{figures['card_authentication_signatures']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--latency", type=int, default=30)
    parser.add_argument("--total", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--keep", action="store_true", help="keep the folder")
    arguments = parser.parse_args()

    def play(reactor: Any) -> Any:
        async def go() -> None:
            figures = await run(reactor, arguments)
            report(figures)
            if arguments.json:
                Path(arguments.json).write_text(json.dumps(figures, indent=2))

        return ensureDeferred(go())

    react(play)


if __name__ == "__main__":
    main()
