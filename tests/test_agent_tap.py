"""
Tests for C{twist cpsagent}: its options, its plugin, and the command itself
run as a separate process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from twisted.application.service import IServiceMaker
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cpsdmp.agent import problems, tap
from cpsdmp.agent.audit import RateLimit
from cpsdmp.agent.card import Pkcs11Backend, SoftCardBackend, WorkerCard
from cpsdmp.agent.client import AgentError, CpsAgentClient, open_session
from cpsdmp.agent.resource import AgentResource
from cpsdmp.agent.tap import LISTENING_LINE
from cpsdmp.protocols.server_tls import server_tls_options
from cpsdmp.tapsupport import StartError
from tests.agent_support import shared_testcard
from tests.tlssupport import pki


def _source_root() -> str:
    import cpsdmp

    return str(Path(cpsdmp.__file__).parent.parent)


def _soft() -> str:
    """
    @return: the test card's PKCS#12 soft card, for options that need a
        card and are about something else.
    """
    return shared_testcard().soft_card


def _module() -> str:
    """
    @return: a PKCS#11 module that exists: the test card's SoftHSM2.
    """
    module = shared_testcard().pkcs11_module
    assert module is not None
    return module


def _not_a_module() -> str:
    """
    @return: a shared library that is not a PKCS#11 module.
    """
    import _ctypes

    return str(_ctypes.__file__)


def _options(*argv: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(argv))
    return options


class OptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        options = _options("--pkcs11-module", _module())
        self.assertEqual(options["listen"], "tcp:10035:interface=127.0.0.1")
        self.assertEqual(options["session-idle"], 900.0)
        self.assertIsNone(options["allow-origin"])

    def test_card_required(self) -> None:
        self.assertRaises(usage.UsageError, _options)

    def test_tls_pair(self) -> None:
        self.assertRaises(
            usage.UsageError, _options, "--soft-card", _soft(), "--tls-cert", "a.pem"
        )

    def test_testcard_token(self) -> None:
        card = shared_testcard()
        backend = tap.card_backend(_options("--testcard", card.directory))
        assert isinstance(backend, Pkcs11Backend)
        self.assertEqual(backend.token_label, card.token_label)
        self.assertEqual(backend.module, card.pkcs11_module)

    def test_soft_card(self) -> None:
        card = shared_testcard()
        backend = tap.card_backend(
            _options(
                "--soft-card",
                card.soft_card,
                "--soft-card-signature",
                card.soft_card_signature,
            )
        )
        self.assertIsInstance(backend, SoftCardBackend)

    def test_soft_card_not_pkcs12(self) -> None:
        """
        A --soft-card that is not a PKCS#12 file (a PEM certificate, the
        test card's root) or cannot be read is a usage error naming it, not
        a "wrong PIN" at the first session.
        """
        card = shared_testcard()
        missing = self.mktemp()
        for option, path, expected in [
            ("--soft-card", card.ca_root, "a PEM file, not PKCS#12"),
            ("--soft-card", card.sandbox_key, "a PEM file, not PKCS#12"),
            ("--soft-card", missing, "cannot read it"),
            ("--soft-card-signature", card.ca_root, "a PEM file, not PKCS#12"),
        ]:
            argv = ["--soft-card", card.soft_card, option, path]
            with self.assertRaises(usage.UsageError) as raised:
                _options(*argv)
            message = str(raised.exception)
            self.assertIn(f"{option} {path}", message)
            self.assertIn(expected, message)
        der = Path(self.mktemp())
        der.write_bytes(
            card.ca_root_certificate().public_bytes(serialization.Encoding.DER)
        )
        with self.assertRaises(usage.UsageError) as raised:
            _options("--soft-card", str(der))
        self.assertIn("not a PKCS#12 file", str(raised.exception))

    def test_card_sources_conflict(self) -> None:
        """
        One card source at a time: --testcard names the card itself, so
        --pkcs11-module, --token-label or --soft-card beside it is a usage
        error saying they conflict, never one silently overriding the
        other; --token-label goes with --pkcs11-module,
        --soft-card-signature with --soft-card.
        """
        card = shared_testcard()
        module = "/usr/lib/cps.so"
        for argv, expected in [
            (["--pkcs11-module", module], "--testcard conflicts with --pkcs11-module"),
            (["--token-label", "X"], "--testcard conflicts with --token-label"),
            (["--soft-card", card.soft_card], "--testcard conflicts with --soft-card"),
            (
                ["--soft-card-signature", card.soft_card_signature],
                "--testcard conflicts with --soft-card-signature",
            ),
        ]:
            with self.assertRaises(usage.UsageError) as raised:
                _options("--testcard", card.directory, *argv)
            self.assertIn(expected, str(raised.exception))
        with self.assertRaises(usage.UsageError) as raised:
            _options("--pkcs11-module", module, "--soft-card", card.soft_card)
        self.assertIn(
            "--pkcs11-module conflicts with --soft-card", str(raised.exception)
        )
        with self.assertRaises(usage.UsageError) as raised:
            _options("--soft-card", card.soft_card, "--token-label", "X")
        self.assertIn("--token-label goes with --pkcs11-module", str(raised.exception))
        with self.assertRaises(usage.UsageError) as raised:
            _options("--pkcs11-module", module, "--soft-card-signature", card.soft_card)
        self.assertIn(
            "--soft-card-signature goes with --soft-card", str(raised.exception)
        )

    def test_pkcs11_module_readable(self) -> None:
        """
        A --pkcs11-module path that names no readable file is a usage
        error naming it, before anything starts; a bare library name is
        left to the dynamic loader, at start.
        """
        folder = self.mktemp()
        os.mkdir(folder)
        for path, reason in [
            ("/nonexistent.so", "No such file or directory"),
            (folder, "Is a directory"),
        ]:
            with self.assertRaises(usage.UsageError) as raised:
                _options("--pkcs11-module", path)
            self.assertEqual(
                str(raised.exception),
                f"--pkcs11-module {path}: cannot read it ({reason})",
            )
        self.assertEqual(
            _options("--pkcs11-module", "libcps3_pkcs11_lux.so")["pkcs11-module"],
            "libcps3_pkcs11_lux.so",
        )

    def test_allow_origin(self) -> None:
        """
        --allow-origin is one web origin, scheme://host[:port] as a browser
        sends it in Origin; anything else is a usage error.
        """
        for origin in ["https://frontend.example", "http://localhost:3000"]:
            self.assertEqual(
                _options("--soft-card", _soft(), "--allow-origin", origin)[
                    "allow-origin"
                ],
                origin,
            )
        for origin in [
            "*",
            "notanorigin",
            "null",
            "",
            "https://",
            "https://frontend.example/",
            "https://frontend.example/app",
            "https://frontend.example?x=1",
            "https://user@frontend.example",
            "ftp://frontend.example",
            "https://frontend.example:99999",
            "HTTPS://Frontend.example",
            "https://frontend.example:443",
        ]:
            with self.assertRaises(usage.UsageError) as raised:
                _options("--soft-card", _soft(), "--allow-origin", origin)
            self.assertIn(f"--allow-origin {origin!r}", str(raised.exception))
            self.assertIn("scheme://host[:port]", str(raised.exception))

    def test_allow_server(self) -> None:
        """
        An --allow-server that is empty or not a host name or IP address
        is a usage error naming it.
        """
        for name in ["", " ", "a b", "https://lps2.dmp.gouv.fr", "lps2.dmp.gouv.fr/x"]:
            with self.assertRaises(usage.UsageError) as raised:
                _options("--soft-card", _soft(), "--allow-server", name)
            self.assertIn(f"--allow-server {name!r}", str(raised.exception))
        options = _options(
            "--soft-card",
            _soft(),
            "--allow-server",
            "::1",
            "--allow-server",
            "dmp.test",
        )
        self.assertEqual(options["allow-servers"], ["::1", "dmp.test"])

    def test_listen(self) -> None:
        """
        A --listen that is not an endpoint description is a usage error
        naming it, at start.
        """
        for listen in ["garbage:x", "tcp:notaport", "tcp:10035:nosuch=1"]:
            with self.assertRaises(usage.UsageError) as raised:
                _options("--soft-card", _soft(), "--listen", listen)
            self.assertIn(f"--listen {listen}", str(raised.exception))

    def test_given_tls_identity(self) -> None:
        """
        With --tls-cert and --tls-key, the contexts name that certificate.
        """
        key, certificate = tap.self_signed_identity()
        cert_path = Path(self.mktemp() + ".pem")
        key_path = Path(self.mktemp() + "-key.pem")
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        options = _options(
            "--soft-card",
            shared_testcard().soft_card,
            "--tls-cert",
            str(cert_path),
            "--tls-key",
            str(key_path),
        )
        service = tap.makeService(options)
        assert isinstance(service, tap.AgentService)
        self.assertEqual(service.resource.tls_fingerprint, tap.fingerprint(certificate))

    def test_tls_chain_in_order(self) -> None:
        """
        A --tls-cert whose intermediate comes before the certificate it
        issued is a usage error saying the order.
        """
        identity = pki()["server-rsa"]
        reversed_chain = Path(self.mktemp())
        reversed_chain.write_bytes(
            Path(identity.chain_file).read_bytes()
            + Path(identity.cert_file).read_bytes()
        )
        with self.assertRaises(usage.UsageError) as raised:
            _options(
                "--soft-card",
                _soft(),
                "--tls-cert",
                str(reversed_chain),
                "--tls-key",
                identity.key_file,
            )
        self.assertIn("did not issue certificate 1", str(raised.exception))
        options = _options(
            "--soft-card",
            _soft(),
            "--tls-cert",
            identity.cert_file,
            "--tls-key",
            identity.key_file,
        )
        self.assertEqual(options["tls-identity"][1], identity.chain[:1])

    def test_unusable_tls_identity(self) -> None:
        """
        A --tls-cert or --tls-key that is missing, not PEM, or a key that
        does not match the certificate is a usage error naming the file,
        not a traceback at start or a failure at the first connection.
        """
        key, certificate = tap.self_signed_identity()
        other_key, _ = tap.self_signed_identity()
        cert_path = Path(self.mktemp())
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        other_key_path = Path(self.mktemp())
        other_key_path.write_bytes(
            other_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        garbage = Path(self.mktemp())
        garbage.write_text("not PEM")
        missing = self.mktemp()
        for cert, key_file, expected in [
            (missing, str(other_key_path), f"--tls-cert {missing}"),
            (str(garbage), str(other_key_path), f"--tls-cert {garbage}"),
            (str(cert_path), missing, f"--tls-key {missing}"),
            (str(cert_path), str(garbage), f"--tls-key {garbage}"),
            (str(cert_path), str(other_key_path), "does not match"),
        ]:
            with self.assertRaises(usage.UsageError) as raised:
                _options(
                    "--soft-card", _soft(), "--tls-cert", cert, "--tls-key", key_file
                )
            self.assertIn(expected, str(raised.exception))

    def test_unusable_files(self) -> None:
        """
        An --intermediate that is not a PEM certificate, or an --audit-log
        that cannot be written, is a usage error naming the file.
        """
        missing = self.mktemp()
        with self.assertRaises(usage.UsageError) as raised:
            _options("--soft-card", _soft(), "--intermediate", missing)
        self.assertIn(f"--intermediate {missing}", str(raised.exception))
        audit = str(Path(self.mktemp(), "no-such-folder", "audit.jsonl"))
        with self.assertRaises(usage.UsageError) as raised:
            _options("--soft-card", _soft(), "--audit-log", audit)
        self.assertIn(f"--audit-log {audit}", str(raised.exception))

    def test_audit_log_refusing_writes(self) -> None:
        """
        An --audit-log that opens but refuses every write (/dev/full) is a
        usage error at start; a new file, and a device that takes writes,
        are not, and nothing is written to the file.
        """
        with self.assertRaises(usage.UsageError) as raised:
            _options("--soft-card", _soft(), "--audit-log", "/dev/full")
        self.assertEqual(
            str(raised.exception),
            "--audit-log /dev/full: cannot write it (No space left on device)",
        )
        audit = Path(self.mktemp())
        for path in (str(audit), "/dev/null"):
            _options("--soft-card", _soft(), "--audit-log", path)
        self.assertEqual(audit.read_bytes(), b"")

    def test_bad_numbers(self) -> None:
        """
        Idle times, timeouts and pauses that are not finite numbers within
        their range are refused at start, not at the first session, in one
        line naming the option, the value and the form expected.
        """
        for option, values, form in [
            (
                "session-idle",
                ["inf", "nan", "1e309", "0", "-5", "1e9", "abc", "15m"],
                "a number of seconds above 0 and at most 604800, such as 900",
            ),
            (
                "card-timeout",
                ["inf", "0", "-1", "600.5", "abc"],
                "a number of seconds above 0 and at most 600, such as 30",
            ),
            (
                "wrong-pin-pause",
                ["inf", "-1", "86400", "5s"],
                "a number of seconds from 0 to 3600, such as 5",
            ),
        ]:
            for value in values:
                with self.assertRaises(usage.UsageError) as raised:
                    _options("--soft-card", _soft(), f"--{option}", value)
                self.assertEqual(
                    str(raised.exception), f"--{option} {value}: not {form}"
                )

    def test_numbers_within_range(self) -> None:
        """
        The ends of each range are taken, as numbers.
        """
        options = _options(
            "--soft-card",
            _soft(),
            "--session-idle",
            "604800",
            "--card-timeout",
            "600",
            "--wrong-pin-pause",
            "0",
        )
        self.assertEqual(options["session-idle"], 604800.0)
        self.assertEqual(options["card-timeout"], 600.0)
        self.assertEqual(options["wrong-pin-pause"], 0.0)

    def test_public_url(self) -> None:
        options = _options("--soft-card", _soft(), "--public-url", "https://ws1:10035")
        self.assertEqual(options["public-url"], "https://ws1:10035")
        self.assertRaises(
            usage.UsageError,
            _options,
            "--soft-card",
            _soft(),
            "--public-url",
            "http://ws1:10035",
        )

    def test_missing_testcard(self) -> None:
        """
        A --testcard folder without a test card is a usage error that says
        how to make one.
        """
        with self.assertRaises(usage.UsageError) as raised:
            _options("--testcard", "/nonexistent/card")
        self.assertIn("cpsdmp testcard init", str(raised.exception))


class PolicyOptionsTests(SynchronousTestCase):
    def test_production_defaults(self) -> None:
        """
        On a real card the card authenticates to the DMP's hosts only, with
        the roots given by --trust, at 120 signatures a minute per session.
        """
        root = shared_testcard().ca_root
        options = _options("--pkcs11-module", _module(), "--trust", root)
        policy = tap.signing_policy(options)
        assert policy is not None
        self.assertEqual(
            policy.allowed_servers, ["lps2.dmp.gouv.fr", "lps.dev1.dmp.gouv.fr"]
        )
        self.assertEqual(len(policy.roots), 1)
        self.assertEqual(options["rate-limit"], RateLimit(120, 60.0))
        self.assertIsNone(options["audit-log"])

    def test_testcard(self) -> None:
        """
        With a test card the sandbox's names and the test root are added.
        """
        card = shared_testcard()
        policy = tap.signing_policy(_options("--testcard", card.directory))
        assert policy is not None
        self.assertEqual(
            policy.allowed_servers,
            ["lps2.dmp.gouv.fr", "lps.dev1.dmp.gouv.fr", "localhost", "127.0.0.1"],
        )
        self.assertEqual(policy.roots, [card.ca_root_certificate()])

    def test_allow_server_replaces(self) -> None:
        card = shared_testcard()
        options = _options(
            "--testcard",
            card.directory,
            "--allow-server",
            "dmp.example",
            "--allow-server",
            "10.0.0.1",
        )
        policy = tap.signing_policy(options)
        assert policy is not None
        self.assertEqual(policy.allowed_servers, ["dmp.example", "10.0.0.1"])

    def test_insecure(self) -> None:
        options = _options("--soft-card", _soft(), "--insecure-sign-anything")
        self.assertIsNone(tap.signing_policy(options))

    def test_rate_limit(self) -> None:
        options = _options("--soft-card", _soft(), "--rate-limit", "100/1.5")
        self.assertEqual(options["rate-limit"], RateLimit(100, 1.5))
        for bad in ("100", "0/60", "10/0", "ten/60", "-1/60"):
            with self.assertRaises(usage.UsageError) as caught:
                _options("--soft-card", _soft(), "--rate-limit", bad)
            self.assertIn("N/SECONDS", str(caught.exception))

    def test_bad_trust(self) -> None:
        missing = self.mktemp()
        self.assertRaises(
            usage.UsageError, _options, "--soft-card", _soft(), "--trust", missing
        )
        not_pem = Path(self.mktemp())
        not_pem.write_text("no certificate here")
        self.assertRaises(
            usage.UsageError, _options, "--soft-card", _soft(), "--trust", str(not_pem)
        )

    def test_soft_card_without_signature_key(self) -> None:
        """
        A soft card given no --soft-card-signature has no signature key:
        said at start, as a warning, since no submission can then be
        signed; not said when it has one.
        """
        card = shared_testcard()
        for argv, warned in [
            (["--soft-card", card.soft_card], True),
            (
                [
                    "--soft-card",
                    card.soft_card,
                    "--soft-card-signature",
                    card.soft_card_signature,
                ],
                False,
            ),
        ]:
            events: list[dict[str, Any]] = []
            globalLogPublisher.addObserver(events.append)
            try:
                tap.makeService(_options(*argv))
            finally:
                globalLogPublisher.removeObserver(events.append)
            said = [
                formatEvent(e) for e in events if "no signature key" in formatEvent(e)
            ]
            if warned:
                [line] = said
                self.assertEqual(
                    [e["log_level"].name for e in events if formatEvent(e) == line],
                    ["warn"],
                )
                self.assertIn("--soft-card-signature", line)
                self.assertIn("submissions cannot be signed", line)
            else:
                self.assertEqual(said, [])

    def test_audit_log(self) -> None:
        """
        --audit-log gives the resource an audit log on that file, closed
        when the service stops.
        """
        path = self.mktemp()
        options = _options(
            "--soft-card", shared_testcard().soft_card, "--audit-log", path
        )
        service = tap.makeService(options)
        assert isinstance(service, tap.AgentService)
        assert service.resource.audit is not None
        self.assertEqual(str(service.resource.audit.path), path)
        self.assertTrue(Path(path).exists())
        self.assertEqual(Path(path).stat().st_mode & 0o777, 0o600)
        service.resource.audit.close()


class ServiceStartTests(TestCase):
    @inlineCallbacks
    def test_endpoint_failing_as_made(self) -> Any:
        """
        An endpoint description that fails as the endpoint is made (past
        the options' check) fails the start like a busy port: the
        reactor stops, with one line saying why.
        """
        # The service's reactor is in memory, to see it stop; the card's
        # thread reports to the real one.
        memory = MemoryReactorClock()
        card = WorkerCard(SoftCardBackend(Path(_soft())), reactor)
        resource = AgentResource(card, memory, policy=None)
        key, certificate = tap.self_signed_identity()
        service = tap.AgentService(
            memory, "garbage:x", card, resource, server_tls_options(key, [certificate])
        )
        self.addCleanup(service.stopService)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        service.startService()
        # The service listens once the card's thread has loaded its module.
        yield self.assertFailure(service.listening, StartError)
        memory.advance(0)
        self.assertTrue(memory.hasStopped)
        [line] = [formatEvent(e) for e in events if "cannot listen" in formatEvent(e)]
        self.assertIn("cpsagent cannot listen on garbage:x", line)
        self.assertIn("Unknown endpoint type", line)


class PluginTests(SynchronousTestCase):
    def test_plugin(self) -> None:
        """
        Twisted finds the cpsagent plugin, which builds the agent's service.
        """
        import twisted.plugins

        makers = {m.tapname: m for m in getPlugins(IServiceMaker, twisted.plugins)}
        self.assertIn("cpsagent", makers)
        self.assertIs(makers["cpsagent"].options, tap.Options)


class _Output(ProcessProtocol):
    """
    Collect a process's output; C{listening} fires with its URL and TLS
    fingerprint as soon as it logs them.
    """

    def __init__(self) -> None:
        self.output = b""
        self.listening: Deferred[tuple[str, str]] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.exited = False
        self._exit_waiters: list[Deferred[None]] = []

    def wait_exit(self) -> Deferred[None]:
        """
        @return: a Deferred that fires once the process has ended, whatever
            became of C{ended} (a test's timeout cancels it).
        """
        if self.exited:
            return succeed(None)
        waiting: Deferred[None] = Deferred()
        self._exit_waiters.append(waiting)
        return waiting

    def outReceived(self, data: bytes) -> None:
        self.output += data
        found = LISTENING_LINE.search(self.output)
        if found and not self.listening.called:
            self.listening.callback((found.group(1).decode(), found.group(2).decode()))

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.status = reason.value.exitCode
        self.exited = True
        for waiting in self._exit_waiters:
            waiting.callback(None)
        if not self.listening.called:
            self.listening.errback(
                AssertionError(
                    f"cpsagent ended: {self.output.decode(errors='replace')}"
                )
            )
        self.ended.callback(None)


class CommandTests(TestCase):
    timeout = 60

    def twist(self, *argv: str) -> _Output:
        output = _Output()
        env = {**os.environ, "PYTHONPATH": _source_root()}
        transport = reactor.spawnProcess(  # type: ignore[attr-defined]
            output,
            sys.executable,
            [sys.executable, "-m", "twisted", *argv],
            env=env,
        )

        def stop() -> Deferred[None]:
            # Not output.ended: a test that timed out waiting on it has
            # cancelled it, and the process would be left running.
            if output.exited:
                return succeed(None)
            transport.signalProcess("TERM")
            return output.wait_exit().addTimeout(30, reactor).addErrback(kill)

        def kill(failure: Any) -> Deferred[None]:
            if not output.exited:
                transport.signalProcess("KILL")
            return output.wait_exit()

        self.addCleanup(stop)
        return output

    def test_help_lists_cpsagent(self) -> None:
        """
        The C{twist} script of the environment the README's install made
        lists cpsagent, run from outside the checkout and without
        PYTHONPATH: Twisted finds the plugin the way a user's shell does.
        """
        twist = Path(sys.executable).parent / "twist"
        self.assertTrue(twist.is_file(), f"no twist script beside {sys.executable}")
        environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        result = subprocess.run(
            [str(twist), "--help"],
            capture_output=True,
            cwd=tempfile.gettempdir(),
            env=environment,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, rb"\n\s+cpsagent\s")

    @inlineCallbacks
    def test_twist_cpsagent(self) -> Any:
        """
        C{twist cpsagent --testcard DIR} serves HTTPS on the port it was
        given; a session opens with the test card's PIN, and the signing
        policy is on: arbitrary data is refused with a 403 naming the reason,
        logged as a security event without the data or the token.
        """
        card = shared_testcard()
        output = self.twist(
            "--log-format",
            "text",
            "cpsagent",
            "--testcard",
            card.directory,
            "--listen",
            "tcp:0:interface=127.0.0.1",
        )
        url, fingerprint = yield output.listening.addTimeout(30, reactor)
        self.assertTrue(url.startswith("https://127.0.0.1:"))
        self.assertIn(
            b"signing policy: authentication to lps2.dmp.gouv.fr", output.output
        )
        context = yield open_session(url, card.pin, fingerprint)
        client = CpsAgentClient.from_context(context)
        self.addCleanup(client.close)
        for sign in (client.sign, client.sign_for_signature):
            error = yield self.assertFailure(
                sign(b"hello", "SHA256WithRSA"), AgentError
            )
            self.assertEqual(error.problem["status"], 403)
            self.assertEqual(error.problem["type"], problems.POLICY_REFUSED)
        yield client.card()  # logged after the refusals
        self.assertEqual(output.output.count(b"security: signature with the"), 2)
        self.assertNotIn(context["token"].encode(), output.output)
        self.assertNotIn(b"hello", output.output)

    @inlineCallbacks
    def test_insecure_sign_anything(self) -> Any:
        """
        With C{--insecure-sign-anything} the agent signs anything, says so
        loudly at start and warns at every signature it makes, and only
        then: a request it refuses as bad input (a signature request that
        is not XML) is not said to be signed.
        """
        card = shared_testcard()
        output = self.twist(
            "--log-format",
            "text",
            "cpsagent",
            "--testcard",
            card.directory,
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--insecure-sign-anything",
        )
        url, fingerprint = yield output.listening.addTimeout(30, reactor)
        self.assertIn(b"INSECURE: --insecure-sign-anything", output.output)
        context = yield open_session(url, card.pin, fingerprint)
        client = CpsAgentClient.from_context(context)
        self.addCleanup(client.close)
        chain = yield client.certificate_chain()
        for _ in range(2):
            signature = yield client.sign(b"hello", "SHA256WithRSA")
            public_key = chain[0].public_key()
            assert isinstance(public_key, rsa.RSAPublicKey)
            public_key.verify(signature, b"hello", padding.PKCS1v15(), hashes.SHA256())
        error = yield self.assertFailure(
            client.sign_for_signature(b"hello", "SHA256WithRSA"), AgentError
        )
        self.assertEqual(error.problem["status"], 400)
        yield client.card()
        self.assertEqual(output.output.count(b"without any check"), 2)
        self.assertNotIn(context["token"].encode(), output.output)
        self.assertNotIn(b"hello", output.output)

    @inlineCallbacks
    def test_busy_port_exits_non_zero(self) -> Any:
        """
        When the port is taken, the agent says so in one line and exits 1.
        """
        card = shared_testcard()
        busy = reactor.listenTCP(0, Factory(), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(busy.stopListening)
        output = self.twist(
            "--log-format",
            "text",
            "cpsagent",
            "--testcard",
            card.directory,
            "--listen",
            f"tcp:{busy.getHost().port}:interface=127.0.0.1",
        )
        output.listening.addErrback(lambda _: None)
        yield output.ended.addTimeout(30, reactor)
        self.assertEqual(output.status, 1, output.output)
        self.assertIn(b"cpsagent cannot listen on", output.output)
        self.assertNotIn(b"Traceback", output.output)

    @inlineCallbacks
    def test_not_a_pkcs11_module(self) -> Any:
        """
        A --pkcs11-module that cannot be loaded as a PKCS#11 module (a
        shared library without C_GetFunctionList, a file that is no
        library, a name the loader does not find) stops the agent at
        start, in one line, with status 1, before it listens: not at the
        first PIN.
        """
        text = Path(self.mktemp())
        text.write_text("not a library\n")
        cases = [
            (_not_a_module(), "not a PKCS#11 module (no C_GetFunctionList)"),
            (str(text), "not a shared library (file too short)"),
            (
                "libno-such-pkcs11.so",
                "the dynamic loader finds no such library (No such file or directory)",
            ),
        ]
        # At once, each within its own timeout: three processes one after
        # the other could outlast the test's on a loaded machine.
        outputs = [
            self.twist(
                "--log-format",
                "text",
                "cpsagent",
                "--pkcs11-module",
                module,
                "--listen",
                "tcp:0:interface=127.0.0.1",
            )
            for module, _ in cases
        ]
        for output in outputs:
            output.listening.addErrback(lambda _: None)
        yield gatherResults([o.ended.addTimeout(45, reactor) for o in outputs])
        for (module, reason), output in zip(cases, outputs, strict=True):
            self.assertEqual(output.status, 1, output.output)
            line = f"cpsagent cannot load the PKCS#11 module {module}: {reason}\n"
            self.assertIn(line.encode(), output.output)
            self.assertNotIn(b"listening on", output.output)
            self.assertNotIn(b"Traceback", output.output)

    @inlineCallbacks
    def test_tls_chain_served(self) -> Any:
        """
        With a --tls-cert holding the agent's certificate and its
        intermediate, the agent sends both: OpenSSL, trusting only the
        root, verifies it (what curl --cacert root.pem needs), and the
        context pins the agent's own certificate.
        """
        identity = pki()["server-rsa"]
        both = Path(self.mktemp())
        both.write_bytes(
            Path(identity.cert_file).read_bytes()
            + Path(identity.chain_file).read_bytes()
        )
        output = self.twist(
            "--log-format",
            "text",
            "cpsagent",
            "--testcard",
            shared_testcard().directory,
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--tls-cert",
            str(both),
            "--tls-key",
            identity.key_file,
        )
        url, fingerprint = yield output.listening.addTimeout(30, reactor)
        self.assertEqual(fingerprint, tap.fingerprint(identity.chain[0]))
        done = yield deferToThread(
            subprocess.run,
            [
                "openssl",
                "s_client",
                "-connect",
                url.removeprefix("https://"),
                "-CAfile",
                pki().root_file,
                "-verify_return_error",
                "-showcerts",
            ],
            input=b"",
            capture_output=True,
            timeout=30,
        )
        report = done.stdout.decode()
        self.assertEqual(done.returncode, 0, report + done.stderr.decode())
        self.assertIn("Verify return code: 0 (ok)", report)
        self.assertEqual(report.count("-----BEGIN CERTIFICATE-----"), 2)

    @inlineCallbacks
    def test_usage_errors_exit_non_zero(self) -> Any:
        """
        A bad option is one line naming it, no traceback, and a non-zero
        exit, before anything listens.
        """
        card = shared_testcard()
        for argv, expected in [
            (["--listen", "garbage:x"], b"--listen garbage:x"),
            (["--allow-origin", "*"], b"--allow-origin '*'"),
            (["--soft-card", card.ca_root], b"--soft-card"),
            (
                ["--card-timeout", "abc"],
                b"--card-timeout abc: not a number of seconds above 0 and at "
                b"most 600, such as 30",
            ),
        ]:
            testcard = (
                [] if argv[0] == "--soft-card" else ["--testcard", card.directory]
            )
            output = self.twist("cpsagent", *testcard, *argv)
            output.listening.addErrback(lambda _: None)
            yield output.ended.addTimeout(30, reactor)
            self.assertNotEqual(output.status, 0, output.output)
            self.assertIn(b"Error: " + expected, output.output)
            self.assertNotIn(b"Traceback", output.output)

    @inlineCallbacks
    def test_all_interfaces_warned_and_public_url(self) -> Any:
        """
        Listening beyond the loopback is said plainly in the log, and the
        agent context carries the --public-url the backend reaches.
        """
        card = shared_testcard()
        output = self.twist(
            "--log-format",
            "text",
            "cpsagent",
            "--testcard",
            card.directory,
            "--listen",
            "tcp:0",
            "--public-url",
            "https://workstation.example:10035",
        )
        url, fingerprint = yield output.listening.addTimeout(30, reactor)
        self.assertEqual(url, "https://workstation.example:10035")
        port = re.search(rb"listening on 0\.0\.0\.0:(\d+)", output.output)
        assert port is not None
        context = yield open_session(
            f"https://127.0.0.1:{port.group(1).decode()}", card.pin, fingerprint
        )
        self.assertEqual(context["url"], "https://workstation.example:10035")
        # Logged right after the listening line; surely read by now that the
        # process has answered a request.
        self.assertIn(b"not only on the loopback", output.output)
