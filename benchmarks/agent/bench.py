"""
Signatures per second through the agent over HTTPS against direct
python-pkcs11 calls on the same SoftHSM2 token, in one run, and the agent's
overhead per signature.

    python benchmarks/agent/bench.py [--count N] [--concurrency C] [--testcard DIR]

The agent runs as `twist cpsagent --testcard DIR` in its own process, as on a
workstation; the client is CpsAgentClient (treq, one persistent connection
pool). A third measure runs the same agent over a card that signs in no time
(instant_agent.py): the agent's own cost per signature. The direct measure
makes, in this process, exactly the card calls the agent makes: hash,
DigestInfo, CKM_RSA_PKCS with the authentication key. The last measures
are the signing policy's cost: its check on a real handshake transcript, in
this process, and the same transcript signed through an agent with the
policy on and one with it off.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pkcs11
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import task
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from zope.interface import implementer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cpsdmp.agent.card import algorithm_named  # noqa: E402
from cpsdmp.agent.client import CpsAgentClient, open_session  # noqa: E402
from cpsdmp.agent.tap import LISTENING_LINE, signing_policy  # noqa: E402
from cpsdmp.agent.testcard import TestCard, init_testcard  # noqa: E402
from cpsdmp.protocols.tls.endpoint import TLSClientEndpoint  # noqa: E402
from cpsdmp.protocols.tls.handshake import TLSClientConfig  # noqa: E402
from cpsdmp.protocols.tls.interfaces import IRemoteKey  # noqa: E402
from cpsdmp.protocols.tls.schemes import SignatureScheme  # noqa: E402
from cpsdmp.sandbox.tls import dmp_server_options  # noqa: E402

ALGORITHM = algorithm_named("SHA256WithRSA")
DATA = os.urandom(200)  # about the size of a TLS 1.2 client transcript hash input


def direct(card: TestCard, count: int) -> list[float]:
    """
    @return: the seconds each of C{count} direct signatures took.
    """
    assert card.pkcs11_module and card.softhsm2_conf
    os.environ["SOFTHSM2_CONF"] = card.softhsm2_conf
    lib = pkcs11.lib(card.pkcs11_module)
    token = lib.get_token(token_label=card.token_label)
    times = []
    with token.open(user_pin=card.pin) as session:
        key = session.get_key(
            object_class=pkcs11.ObjectClass.PRIVATE_KEY, label="CPS_PRIV_AUT"
        )
        for i in range(count + 20):
            started = time.perf_counter()
            digest_info = ALGORITHM.digest_info(ALGORITHM.digest(DATA))
            key.sign(digest_info, mechanism=pkcs11.Mechanism.RSA_PKCS)
            if i >= 20:  # the first ones warm up
                times.append(time.perf_counter() - started)
    return times


class _Agent(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.listening: Deferred[tuple[str, str]] = Deferred()
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output = (self.output + data)[-4096:]
        found = LISTENING_LINE.search(self.output)
        if found and not self.listening.called:
            self.listening.callback((found.group(1).decode(), found.group(2).decode()))

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        if not self.listening.called:
            self.listening.errback(RuntimeError(self.output.decode(errors="replace")))
        self.ended.callback(None)


LISTEN = "tcp:0:interface=127.0.0.1"


def twist_cpsagent(card: TestCard, policy: bool = False) -> list[str]:
    """
    @return: the command line of the agent on the test card's token, with
        its signing policy on or off, and a rate limit no benchmark reaches.
    """
    return [
        sys.executable,
        "-m",
        "twisted",
        "--log-format",
        "text",
        "cpsagent",
        "--testcard",
        card.directory,
        "--listen",
        LISTEN,
        "--rate-limit",
        "1000000/1",
        *([] if policy else ["--insecure-sign-anything"]),
    ]


def instant_agent(card: TestCard) -> list[str]:
    """
    @return: the command line of the same agent over a card that signs in
        no time.
    """
    script = Path(__file__).with_name("instant_agent.py")
    return [sys.executable, str(script), card.directory, LISTEN]


@asynccontextmanager
async def running_agent(
    reactor: Any, card: TestCard, command: list[str]
) -> AsyncIterator[CpsAgentClient]:
    """
    Start the agent C{command} names, open a session on it, and stop it
    at the end.
    """
    agent = _Agent()
    process = reactor.spawnProcess(
        agent,
        command[0],
        command,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        url, fingerprint = await agent.listening.addTimeout(30, reactor)
        context = await open_session(url, card.pin, fingerprint, reactor)
        client = CpsAgentClient.from_context(context, reactor)
        try:
            yield client
        finally:
            await client.close()
    finally:
        if not agent.ended.called:
            process.signalProcess("TERM")
        await agent.ended


async def sequential(
    client: CpsAgentClient, data: bytes | Iterator[bytes], count: int
) -> list[float]:
    """
    @param data: what to sign each time, or an iterator giving a new one
        each time (a transcript is signed once).
    @return: the seconds each of C{count} signatures took, one at a time,
        after 10 not counted.
    """
    next_data = (lambda: data) if isinstance(data, bytes) else data.__next__
    for _ in range(10):
        await client.sign(next_data(), ALGORITHM.name)
    times = []
    for _ in range(count):
        item = next_data()
        started = time.perf_counter()
        await client.sign(item, ALGORITHM.name)
        times.append(time.perf_counter() - started)
    return times


async def through_agent(
    reactor: Any, card: TestCard, command: list[str], count: int, concurrency: int
) -> tuple[list[float], float]:
    """
    @return: the seconds each of C{count} sequential signatures took through
        the agent C{command} starts, and the wall time of C{count} more with
        C{concurrency} in flight.
    """
    async with running_agent(reactor, card, command) as client:
        times = await sequential(client, DATA, count)
        semaphore = DeferredSemaphore(concurrency)
        started = time.perf_counter()
        await gatherResults(
            [semaphore.run(client.sign, DATA, ALGORITHM.name) for _ in range(count)]
        )
        return times, time.perf_counter() - started


@implementer(IRemoteKey)
class _Recording:
    """
    The agent as the TLS client's key, keeping the transcript it signs.
    """

    def __init__(self, client: CpsAgentClient) -> None:
        self._client = client
        self.supported_signature_schemes = client.supported_signature_schemes
        self.transcripts: list[bytes] = []

    def certificate_chain(self) -> Deferred[list[x509.Certificate]]:
        return self._client.certificate_chain()

    def sign(self, data: bytes, scheme: SignatureScheme) -> Deferred[bytes]:
        self.transcripts.append(data)
        return self._client.sign(data, scheme)


async def real_transcripts(
    reactor: Any, card: TestCard, client: CpsAgentClient, count: int
) -> list[bytes]:
    """
    @return: the transcripts of C{count} real handshakes of our TLS client,
        its key the card behind the agent C{client} talks to, with an
        OpenSSL server set up like the sandbox DMP (its certificate, client
        certificates required). The policy signs a transcript once: each
        measure of it needs new ones, made through another agent.
    """
    server = dmp_server_options(
        card.sandbox_cert, card.sandbox_key, [card.ca_root, *card.ca_intermediates]
    )
    port = reactor.listenSSL(
        0, Factory.forProtocol(Protocol), server, interface="127.0.0.1"
    )
    try:
        key = _Recording(client)
        config = TLSClientConfig(roots=[card.ca_root_certificate()], remote_key=key)
        endpoint = TLSClientEndpoint.for_host(
            reactor, "localhost", port.getHost().port, config
        )
        for _ in range(count):
            protocol = await endpoint.connect(Factory.forProtocol(Protocol))
            protocol.transport.loseConnection()
        return key.transcripts
    finally:
        await port.stopListening()


def policy_check(
    card: TestCard, transcripts: list[bytes], card_chain: list[bytes], count: int
) -> tuple[list[float], list[float]]:
    """
    @return: the seconds C{check_authentication} took on each of C{count}
        transcripts (after 20 not counted), with the server chain already
        verified once (as for every handshake after the first), and with a
        fresh policy each time (a cold chain).
    """
    warm, cold = [], []
    policy = signing_policy({"testcard": card.directory})
    assert policy is not None
    for i, transcript in enumerate(transcripts[: count + 20]):
        started = time.perf_counter()
        decision = policy.check_authentication(transcript, card_chain)
        if i >= 20:
            warm.append(time.perf_counter() - started)
        assert decision.allowed, decision.reason
    for transcript in transcripts[: min(count, 100)]:
        fresh = signing_policy({"testcard": card.directory})
        assert fresh is not None
        started = time.perf_counter()
        decision = fresh.check_authentication(transcript, card_chain)
        cold.append(time.perf_counter() - started)
        assert decision.allowed, decision.reason
    return warm, cold


def signature_requests(certificate: x509.Certificate, count: int) -> list[bytes]:
    """
    @return: C{count} submission-set signature requests for C{certificate},
        each of one consultation report, as the facade hands them to the
        agent.
    """
    from cpsdmp.xds.cda import document_entry
    from cpsdmp.xds.sample import sample_cda
    from cpsdmp.xds.signature import sign_submission
    from cpsdmp.xds.transactions import new_submission
    from tests.xdsvalues import DEFAULTS, PROFESSIONAL, SOFTWARE, STRUCTURE

    requests: list[bytes] = []

    def signer(request: bytes, algorithm: str) -> Deferred[bytes]:
        requests.append(request)
        return Deferred()  # only the request is wanted

    professional = {
        "id": "810001234567",
        "given_name": "Marie",
        "family_name": "DURAND-TEST",
        "specialty": "G15_10/SM54",
        "organization": "CABINET CPSDMP TEST",
    }
    for _ in range(count):
        data = sample_cda(professional)
        submission = new_submission(
            [(document_entry(data), data)], PROFESSIONAL, STRUCTURE, SOFTWARE, DEFAULTS
        )
        sign_submission(submission, signer, certificate, PROFESSIONAL, STRUCTURE)
    return requests


def signature_check(
    card: TestCard, chain: list[x509.Certificate], count: int
) -> tuple[list[float], int]:
    """
    @return: the seconds C{check_signature} took on each of C{count}
        requests of one document (after 20 not counted), and a request's
        size.
    """
    policy = signing_policy({"testcard": card.directory})
    assert policy is not None
    requests = signature_requests(chain[0], count + 20)
    times = []
    for i, request in enumerate(requests):
        started = time.perf_counter()
        decision = policy.check_signature(request, ALGORITHM.name, chain)
        if i >= 20:
            times.append(time.perf_counter() - started)
        assert decision.allowed, decision.reason
    return times, len(requests[0])


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "per_second": len(times) / sum(times),
        "mean_ms": statistics.fmean(times) * 1000,
        "median_ms": statistics.median(times) * 1000,
        "p95_ms": ordered[int(len(ordered) * 0.95) - 1] * 1000,
    }


async def run(reactor: Any, arguments: argparse.Namespace) -> None:
    if arguments.testcard:
        await measure(reactor, arguments, arguments.testcard)
        return
    # The test card made for this run (its PIN, its keys) goes with it.
    with tempfile.TemporaryDirectory(prefix="cpsdmp-bench-") as folder:
        await measure(reactor, arguments, Path(folder))


async def measure(reactor: Any, arguments: argparse.Namespace, folder: Path) -> None:
    card = init_testcard(folder, softhsm=True)

    direct_times = direct(card, arguments.count)
    async with (
        running_agent(reactor, card, twist_cpsagent(card, True)) as on,
        running_agent(reactor, card, twist_cpsagent(card)) as off,
    ):
        # Made through the agent with the policy off, so that the other has
        # signed none of them yet; enough for its measure, warm-ups included.
        blocks = range(0, arguments.count, 50)
        transcripts = await real_transcripts(
            reactor, card, off, arguments.count + 10 * len(blocks) + 20
        )
        card_chain = [
            c.public_bytes(Encoding.DER) for c in await on.certificate_chain()
        ]
        signature_chain = await on.signature_certificate_chain()
        # Blocks of 50 taken in turn from each agent, so that both see the
        # same moments of the machine's load; each signs the same
        # transcripts, once each.
        policy_on: list[float] = []
        policy_off: list[float] = []
        for_on, for_off = iter(transcripts), iter(transcripts)
        for start in blocks:
            block = min(50, arguments.count - start)
            policy_on += await sequential(on, for_on, block)
            policy_off += await sequential(off, for_off, block)
    warm, cold = policy_check(card, transcripts, card_chain, arguments.count)
    transcript = transcripts[0]
    request_times, request_bytes = signature_check(
        card, signature_chain, arguments.count
    )
    agent_times, wall = await through_agent(
        reactor, card, twist_cpsagent(card), arguments.count, arguments.concurrency
    )
    instant_times, _ = await through_agent(
        reactor, card, instant_agent(card), arguments.count, 1
    )

    results = {
        "count": arguments.count,
        "key": "CPS_PRIV_AUT, RSA 2048, CKM_RSA_PKCS over SHA-256 DigestInfo",
        "direct": summary(direct_times),
        "agent_sequential": summary(agent_times),
        "agent_instant_card": summary(instant_times),
        "agent_concurrent": {
            "concurrency": arguments.concurrency,
            "per_second": arguments.count / wall,
        },
    }
    results["policy"] = {
        "transcript_bytes": len(transcript),
        "check_warm": summary(warm),
        "check_cold": summary(cold),
        "agent_policy_on": summary(policy_on),
        "agent_policy_off": summary(policy_off),
        "signature_request_bytes": request_bytes,
        "check_signature_request": summary(request_times),
    }
    results["overhead_ms"] = {
        "mean": results["agent_sequential"]["mean_ms"] - results["direct"]["mean_ms"],
        "median": results["agent_sequential"]["median_ms"]
        - results["direct"]["median_ms"],
    }
    if arguments.json:
        print(json.dumps(results, indent=2))
        return
    d, a = results["direct"], results["agent_sequential"]
    print(f"{arguments.count} signatures each way, {results['key']}")
    print(f"{'':24}{'sig/s':>10}{'mean ms':>10}{'median ms':>11}{'p95 ms':>9}")
    rows = (
        ("direct python-pkcs11", d),
        ("agent, one at a time", a),
        ("agent, instant card", results["agent_instant_card"]),
    )
    for label, r in rows:
        print(
            f"{label:24}{r['per_second']:10.1f}{r['mean_ms']:10.2f}"
            f"{r['median_ms']:11.2f}{r['p95_ms']:9.2f}"
        )
    c = results["agent_concurrent"]
    print(
        f"{'agent, ' + str(c['concurrency']) + ' in flight':24}{c['per_second']:10.1f}"
    )
    o = results["overhead_ms"]
    print(
        f"overhead per signature (agent - direct): {o['mean']:.2f} ms mean, "
        f"{o['median']:.2f} ms median"
    )
    p = results["policy"]
    print(
        f"signing policy, on real transcripts of {p['transcript_bytes']} bytes, "
        "each signed once:"
    )
    rows = (
        ("check, chain known", p["check_warm"]),
        ("check, chain new", p["check_cold"]),
        ("agent, policy on", p["agent_policy_on"]),
        ("agent, policy off", p["agent_policy_off"]),
    )
    for label, r in rows:
        print(
            f"{label:24}{r['per_second']:10.1f}{r['mean_ms']:10.2f}"
            f"{r['median_ms']:11.2f}{r['p95_ms']:9.2f}"
        )
    r = p["check_signature_request"]
    print(f"signature key, on requests of {p['signature_request_bytes']} bytes:")
    print(
        f"{'check, signature request':24}{r['per_second']:10.1f}{r['mean_ms']:10.2f}"
        f"{r['median_ms']:11.2f}{r['p95_ms']:9.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--testcard", type=Path, help="reuse this test card")
    parser.add_argument("--json", action="store_true")
    arguments = parser.parse_args()
    task.react(lambda reactor: Deferred.fromCoroutine(run(reactor, arguments)))


if __name__ == "__main__":
    main()
