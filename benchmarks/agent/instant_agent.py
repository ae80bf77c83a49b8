"""
The agent exactly as `twist cpsagent --testcard DIR` builds it, but over a
card that answers every signature at once: what the agent itself costs per
signature (HTTPS, routing, the worker thread, the log), with no card time.

    python benchmarks/agent/instant_agent.py DIR LISTEN
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cryptography import x509  # noqa: E402
from twisted.internet import reactor  # noqa: E402
from twisted.logger import globalLogBeginner, textFileLogObserver  # noqa: E402

from cpsdmp.agent import tap  # noqa: E402
from cpsdmp.agent.card import CardBackend, KeyUsage, WorkerCard  # noqa: E402
from cpsdmp.agent.resource import AgentResource  # noqa: E402
from cpsdmp.protocols.server_tls import server_tls_options  # noqa: E402


class InstantCard:
    """
    The test card's certificates, and a signature of the right size made in
    no time.
    """

    def __init__(self, inner: CardBackend) -> None:
        self.inner = inner
        self.description = "instant card (benchmark)"

    def load(self) -> None:
        self.inner.load()

    def pin_final_try(self) -> bool:
        return self.inner.pin_final_try()

    def login(self, pin: str) -> None:
        self.inner.login(pin)

    def logout(self) -> None:
        self.inner.logout()

    def check_present(self) -> None:
        self.inner.check_present()

    def chain(self, usage: KeyUsage) -> list[x509.Certificate]:
        return self.inner.chain(usage)

    def sign_digest(self, usage: KeyUsage, algorithm: Any, digest: bytes) -> bytes:
        return bytes(256)

    def close(self) -> None:
        self.inner.close()


def main(directory: str, listen: str) -> None:
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    options = tap.Options()
    options.parseOptions(["--testcard", directory, "--listen", listen])
    key, certificate = tap.self_signed_identity()
    card = WorkerCard(InstantCard(tap.card_backend(options)), reactor)  # type: ignore[arg-type]
    resource = AgentResource(card, reactor, policy=None, rate_limit=None)  # type: ignore[arg-type]
    resource.tls_fingerprint = tap.fingerprint(certificate)
    service = tap.AgentService(
        reactor, listen, card, resource, server_tls_options(key, [certificate])
    )
    reactor.callWhenRunning(service.startService)  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
