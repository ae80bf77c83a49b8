"""
What the agent's tests share: one SoftHSM2 test card per test process (SoftHSM2
reads its configuration once, when the PKCS#11 module is initialised, and
python-pkcs11 loads the module once per process), and a running agent on a
free loopback port.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cryptography import x509
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ServerFactory
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from cpsdmp.agent.audit import AuditLog, RateLimit
from cpsdmp.agent.card import (
    DEFAULT_CARD_TIMEOUT,
    CardBackend,
    Pkcs11Backend,
    WorkerCard,
)
from cpsdmp.agent.policy import SigningPolicy
from cpsdmp.agent.resource import AgentResource
from cpsdmp.agent.tap import (
    AgentService,
    fingerprint,
    self_signed_identity,
)
from cpsdmp.agent.testcard import TestCard, init_testcard
from cpsdmp.protocols.server_tls import server_tls_options


@functools.cache
def shared_testcard() -> TestCard:
    """
    @return: the test card of this test process, made on first use in a
        temporary folder removed at exit.
    """
    folder = Path(tempfile.mkdtemp(prefix="cpsdmp-agent-tests-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return init_testcard(folder / "card", softhsm=True)


def token_backend(token_label: str | None = None) -> Pkcs11Backend:
    """
    @return: a PKCS#11 backend on the shared test card's token.
    """
    card = shared_testcard()
    assert card.pkcs11_module is not None
    return Pkcs11Backend(
        card.pkcs11_module,
        token_label or card.token_label,
        card.ca_intermediate_certificates(),
        card.environment(),
    )


class RunningAgent:
    """
    An agent serving HTTPS on a free loopback port, for one test.
    """

    def __init__(
        self,
        backend: CardBackend,
        clock: IReactorTime | None = None,
        session_idle: float = 900.0,
        allow_origin: str | None = None,
        policy: SigningPolicy | None = None,
        rate_limit: RateLimit | None = None,
        audit: AuditLog | None = None,
        card_timeout: float = DEFAULT_CARD_TIMEOUT,
    ) -> None:
        """
        By default the agent signs anything, unlimited: the tests that use
        it are about something else than the signing policy.
        """
        key, self.certificate = self_signed_identity()
        self.fingerprint = fingerprint(self.certificate)
        self.card = WorkerCard(backend, reactor, card_timeout)
        self.resource = AgentResource(
            self.card,
            clock or reactor,  # type: ignore[arg-type]
            session_idle=session_idle,
            allow_origin=allow_origin,
            policy=policy,
            rate_limit=rate_limit,
            audit=audit,
        )
        self.resource.tls_fingerprint = self.fingerprint
        self.service = AgentService(
            reactor,
            "tcp:0:interface=127.0.0.1",
            self.card,
            self.resource,
            server_tls_options(key, [self.certificate]),
        )

    @property
    def url(self) -> str:
        return self.resource.url


def signature_request(
    certificate: x509.Certificate, documents: int = 2, **kwargs: Any
) -> bytes:
    """
    @return: what L{sign_submission} asks the signer to sign for a
        submission of C{documents} consultation reports signed with
        C{certificate}: the signature without its value.
    """
    from cpsdmp.xds.cda import document_entry
    from cpsdmp.xds.sample import sample_cda
    from cpsdmp.xds.signature import sign_submission
    from cpsdmp.xds.transactions import new_submission
    from tests.xdsvalues import DEFAULTS, PROFESSIONAL, SOFTWARE, STRUCTURE

    professional = shared_testcard().professional
    entries = []
    for _ in range(documents):
        data = sample_cda(professional)
        entries.append((document_entry(data), data))
    submission = new_submission(entries, PROFESSIONAL, STRUCTURE, SOFTWARE, DEFAULTS)
    asked: list[bytes] = []

    def signer(request: bytes, algorithm: str) -> Deferred[bytes]:
        asked.append(request)
        return Deferred()  # never signs: only the request is wanted

    sign_submission(submission, signer, certificate, PROFESSIONAL, STRUCTURE, **kwargs)
    return asked[0]


def start_agent(
    testcase: TestCase, backend: CardBackend, **kwargs: Any
) -> Deferred[RunningAgent]:
    """
    Start an agent over C{backend}, stopped when C{testcase} ends.

    @return: a Deferred that fires with the L{RunningAgent} once it listens.
    """
    agent = RunningAgent(backend, **kwargs)
    agent.service.startService()
    testcase.addCleanup(agent.service.stopService)
    return agent.service.listening.addCallback(lambda _: agent)


class HostileAgent:
    """
    Something that holds a TLS certificate, as an agent does, and answers
    with C{resource}, or speaks C{resource}'s protocol when it is a factory
    (to answer what no HTTP server would send): an agent gone wrong, or not
    an agent at all.
    """

    def __init__(self, testcase: TestCase, resource: Resource | ServerFactory) -> None:
        key, certificate = self_signed_identity()
        self.fingerprint = fingerprint(certificate)
        self._port = reactor.listenSSL(  # type: ignore[attr-defined]
            0,
            resource if isinstance(resource, ServerFactory) else Site(resource),
            server_tls_options(key, [certificate]),
            interface="127.0.0.1",
        )
        testcase.addCleanup(self._port.stopListening)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self._port.getHost().port}"

    def context(self) -> dict[str, str]:
        """
        @return: an agent context naming this server.
        """
        return {"url": self.url, "token": "t" * 43, "tlsFingerprint": self.fingerprint}
