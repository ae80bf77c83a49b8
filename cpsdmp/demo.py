"""
C{cpsdmp demo}: the chain played on one machine, each step printed with its
time, every process started here stopped before the end, and a non-zero exit
status on any failure.

What runs today is the workstation's part: a test card on SoftHSM2, the agent
started as its own process (C{twist cpsagent}), a card session opened with
the PIN, and the card's signatures made through the agent and verified.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater, react
from twisted.internet.threads import deferToThreadPool

import cpsdmp
from cpsdmp.agent.card import ALGORITHMS
from cpsdmp.agent.client import (
    AgentError,
    CpsAgentClient,
    PinPause,
    TokenExpired,
    WrongPin,
    open_session,
)
from cpsdmp.agent.pki import verify_card_chain
from cpsdmp.agent.tap import fingerprint
from cpsdmp.agent.testcard import TestCard, TestCardError, init_testcard

_T = TypeVar("_T")

AGENT_START_TIMEOUT = 30.0
PROCESS_STOP_TIMEOUT = 10.0

# Shorter than the agent's default, so that the demo shows the pause after a
# wrong PIN without waiting long.
AGENT_WRONG_PIN_PAUSE = 1


class DemoFailed(Exception):
    """
    A step of the demo went wrong; the message says which and why.
    """


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo", help="play the chain on this machine with a test card"
    )
    parser.add_argument(
        "--dir",
        help="folder for the test card, keys and logs (default: a new "
        "temporary folder, removed unless --keep)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the folder and say where it is"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    status: list[int] = []

    def main(reactor: Any) -> Deferred[None]:
        async def play() -> None:
            status.append(await Demo(reactor, args.dir, args.keep).play())

        return ensureDeferred(play())

    try:
        react(main)
    except SystemExit as e:
        if e.code not in (0, None):
            return int(e.code) if isinstance(e.code, int) else 1
    return status[0] if status else 1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _source_root() -> str:
    # The folder that holds the cpsdmp package: a child process that has it
    # on sys.path imports the same code and finds the same twist plugins.
    return str(Path(cpsdmp.__file__).resolve().parent.parent)


class Demo:
    """
    The steps, printed as they happen.
    """

    def __init__(self, reactor: Any, directory: str | None, keep: bool) -> None:
        self.reactor = reactor
        self.keep = keep or directory is not None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="cpsdmp-demo-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.number = 0
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []

    def say(self, title: str, detail: str, seconds: float) -> None:
        self.number += 1
        print(f"{self.number:>3}. {title:<28} {seconds * 1000:8.1f} ms  {detail}")
        sys.stdout.flush()

    async def step(
        self,
        title: str,
        action: Callable[[], Awaitable[_T]],
        detail: Callable[[_T], str],
    ) -> _T:
        start = time.monotonic()
        try:
            result = await action()
        except DemoFailed:
            raise
        except Exception as e:
            raise DemoFailed(f"{title}: {e}") from e
        self.say(title, detail(result), time.monotonic() - start)
        return result

    async def play(self) -> int:
        print(f"cpsdmp {cpsdmp.__version__} demo, working in {self.directory}")
        try:
            await self.agent_part()
        except DemoFailed as e:
            print(f"\nDEMO FAILED: {e}", file=sys.stderr)
            self.show_logs()
            return 1
        finally:
            await self.stop_processes()
            self.clean_up()
        total = time.monotonic() - self.started
        print(f"\nDemo passed in {total:.1f} s.")
        return 0

    async def agent_part(self) -> None:
        card = await self.step(
            "test card ready",
            self.make_card,
            lambda c: (
                (
                    f"SoftHSM2 token {c.token_label!r}"
                    if c.has_token
                    else "PKCS#12 soft card (SoftHSM2 missing)"
                )
                + f", holder {c.professional['name']} ({c.professional['profession']},"
                f" {c.professional['id']})"
            ),
        )
        url, tls_fingerprint = await self.step(
            "agent started",
            lambda: self.start_agent(card),
            lambda r: f"{r[0]}, pinned by {r[1][:23]}...",
        )
        await self.step(
            "wrong PIN refused",
            lambda: self.wrong_pin(url, tls_fingerprint, card),
            lambda message: message,
        )
        pause = await self.step(
            "next PIN held back",
            lambda: self.pin_pause(url, tls_fingerprint, card),
            lambda seconds: (
                f"429 for {seconds} s after a wrong PIN, the card not asked"
            ),
        )
        await deferLater(self.reactor, pause, lambda: None)
        context = await self.step(
            "card session opened",
            lambda: open_session(url, card.pin, tls_fingerprint, self.reactor),
            lambda c: f"token issued, expires {c['expires']}",
        )
        client = CpsAgentClient.from_context(context, self.reactor)
        try:
            await self.step(
                "card read",
                client.card,
                lambda c: "card present, holder {name}, {profession}, id {id}".format(
                    **c["holder"]
                ),
            )
            await self.step(
                "certificate chain checked",
                lambda: self.check_chain(client, card),
                lambda subject: f"{subject} -> TEST AC RACINE IGC-SANTE ELEMENTAIRE",
            )
            for name in ALGORITHMS:
                await self.step(
                    f"{name} signature",
                    functools.partial(self.sign_and_verify, client, name),
                    lambda size: (
                        f"{size} bytes, made by the card, verified with its certificate"
                    ),
                )
            await self.step(
                "session locked",
                lambda: self.lock(client),
                lambda message: message,
            )
        finally:
            await client.close()

    async def make_card(self) -> TestCard:
        try:
            return await self.in_thread(init_testcard, self.directory / "card")
        except TestCardError as e:
            raise DemoFailed(str(e)) from e

    async def in_thread(self, function: Callable[..., _T], *args: Any) -> _T:
        return await deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), function, *args
        )

    async def start_agent(self, card: TestCard) -> tuple[str, str]:
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = _loopback_certificate(key)
        cert_path = self.directory / "agent-tls.pem"
        key_path = self.directory / "agent-tls-key.pem"
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
        port = _free_port()
        self.spawn(
            "agent",
            [
                "cpsagent",
                "--testcard",
                card.directory,
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
                "--tls-cert",
                str(cert_path),
                "--tls-key",
                str(key_path),
                "--wrong-pin-pause",
                str(AGENT_WRONG_PIN_PAUSE),
                # The steps below have the card sign arbitrary bytes to show
                # each algorithm, which the signing policy rightly refuses.
                "--insecure-sign-anything",
            ],
        )
        await self.wait_for_port("agent", port)
        return f"https://127.0.0.1:{port}", fingerprint(certificate)

    def spawn(self, name: str, twist_arguments: list[str]) -> None:
        log = open(self.directory / f"{name}.log", "wb")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [_source_root(), *filter(None, [env.get("PYTHONPATH")])]
        )
        process = subprocess.Popen(
            [sys.executable, "-m", "twisted", "--log-format", "text", *twist_arguments],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=self.directory,
        )
        log.close()
        self.processes.append((name, process))

    async def wait_for_port(self, name: str, port: int) -> None:
        deadline = time.monotonic() + AGENT_START_TIMEOUT
        process = dict(self.processes)[name]
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise DemoFailed(
                    f"the {name} exited at start with status {process.returncode}"
                )
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                await deferLater(self.reactor, 0.1, lambda: None)
        raise DemoFailed(f"the {name} did not listen within {AGENT_START_TIMEOUT} s")

    async def wrong_pin(self, url: str, tls_fingerprint: str, card: TestCard) -> str:
        wrong = "0000" if card.pin != "0000" else "9999"
        try:
            await open_session(url, wrong, tls_fingerprint, self.reactor)
        except WrongPin as e:
            return str(e)
        raise DemoFailed("the agent accepted a wrong PIN")

    async def pin_pause(self, url: str, tls_fingerprint: str, card: TestCard) -> int:
        try:
            await open_session(url, card.pin, tls_fingerprint, self.reactor)
        except PinPause as e:
            return e.retry_after or AGENT_WRONG_PIN_PAUSE
        raise DemoFailed("the agent took a PIN right after a wrong one")

    async def check_chain(self, client: CpsAgentClient, card: TestCard) -> str:
        chain = await client.certificate_chain()
        verify_card_chain(chain, [card.ca_root_certificate()])
        self.chain = chain
        common_name = chain[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(common_name[0].value)

    async def sign_and_verify(self, client: CpsAgentClient, name: str) -> int:
        data = f"cpsdmp demo, {name}, {time.time()}".encode()
        signature = await client.sign(data, name)
        public_key = self.chain[0].public_key()
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise DemoFailed("the card's certificate does not hold an RSA key")
        public_key.verify(signature, data, padding.PKCS1v15(), ALGORITHMS[name].hash())
        return len(signature)

    async def lock(self, client: CpsAgentClient) -> str:
        await client.lock()
        try:
            await client.card()
        except TokenExpired:
            return "the token is refused afterwards"
        except AgentError as e:
            raise DemoFailed(f"after locking, the agent answered {e}") from e
        raise DemoFailed("the token still worked after the session was locked")

    async def stop_processes(self) -> None:
        for name, process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + PROCESS_STOP_TIMEOUT
            while process.poll() is None and time.monotonic() < deadline:
                await deferLater(self.reactor, 0.05, lambda: None)
            if process.poll() is None:
                process.kill()
                process.wait()
                print(f"  the {name} did not stop in time and was killed")
            elif process.returncode in (0, -signal.SIGTERM):
                # twist ends on SIGTERM by re-raising it once shut down.
                print(f"  {name} stopped")
            else:
                print(f"  the {name} stopped with status {process.returncode}")
        self.processes = []

    def show_logs(self) -> None:
        for name, _ in self.processes:
            log = self.directory / f"{name}.log"
            if log.exists():
                tail = log.read_text("utf-8", "replace").splitlines()[-15:]
                print(f"--- last lines of the {name}'s log ({log}):", file=sys.stderr)
                print("\n".join(tail), file=sys.stderr)

    def clean_up(self) -> None:
        if self.keep:
            print(f"  everything is kept in {self.directory}")
            return
        shutil.rmtree(self.directory, ignore_errors=True)


def _loopback_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cpsdmp demo agent")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
