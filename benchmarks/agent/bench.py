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
DigestInfo, CKM_RSA_PKCS with the authentication key.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pkcs11
from twisted.internet import task
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
from twisted.internet.protocol import ProcessProtocol

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cpsdmp.agent.card import algorithm_named  # noqa: E402
from cpsdmp.agent.client import CpsAgentClient, open_session  # noqa: E402
from cpsdmp.agent.testcard import TestCard, init_testcard  # noqa: E402

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
        found = re.search(
            rb"listening on (https://\S+) \(TLS certificate (sha256:[0-9a-f]{64})\)",
            self.output,
        )
        if found and not self.listening.called:
            self.listening.callback((found.group(1).decode(), found.group(2).decode()))

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        if not self.listening.called:
            self.listening.errback(RuntimeError(self.output.decode(errors="replace")))
        self.ended.callback(None)


LISTEN = "tcp:0:interface=127.0.0.1"


def twist_cpsagent(card: TestCard) -> list[str]:
    """
    @return: the command line of the agent on the test card's token.
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
    ]


def instant_agent(card: TestCard) -> list[str]:
    """
    @return: the command line of the same agent over a card that signs in
        no time.
    """
    script = Path(__file__).with_name("instant_agent.py")
    return [sys.executable, str(script), card.directory, LISTEN]


async def through_agent(
    reactor: Any, card: TestCard, command: list[str], count: int, concurrency: int
) -> tuple[list[float], float]:
    """
    @return: the seconds each of C{count} sequential signatures took through
        the agent C{command} starts, and the wall time of C{count} more with
        C{concurrency} in flight.
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
        for _ in range(20):
            await client.sign(DATA, ALGORITHM.name)
        times = []
        for _ in range(count):
            started = time.perf_counter()
            await client.sign(DATA, ALGORITHM.name)
            times.append(time.perf_counter() - started)

        semaphore = DeferredSemaphore(concurrency)
        started = time.perf_counter()
        await gatherResults(
            [semaphore.run(client.sign, DATA, ALGORITHM.name) for _ in range(count)]
        )
        wall = time.perf_counter() - started
        await client.close()
        return times, wall
    finally:
        if not agent.ended.called:
            process.signalProcess("TERM")
        await agent.ended


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "per_second": len(times) / sum(times),
        "mean_ms": statistics.fmean(times) * 1000,
        "median_ms": statistics.median(times) * 1000,
        "p95_ms": ordered[int(len(ordered) * 0.95) - 1] * 1000,
    }


async def run(reactor: Any, arguments: argparse.Namespace) -> None:
    folder = arguments.testcard or Path(tempfile.mkdtemp(prefix="cpsdmp-bench-"))
    card = init_testcard(folder, softhsm=True)

    direct_times = direct(card, arguments.count)
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
