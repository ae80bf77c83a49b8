"""
C{cpsdmp demo}: the whole chain played on one machine, each step printed with
its time, every process started here stopped before the end, and a non-zero
exit status on any failure.

A test card on SoftHSM2; the local DMP (C{twist dmpsandbox}), the agent
(C{twist cpsagent}) and the facade (C{twist dmpfacade}) started as processes
on free loopback ports; a card session opened with the PIN; then, for each
CDA document, through the facade's REST API: the existence test, the
submission, the search, the retrieval compared byte for byte, and the
masking. The agent's audit log then tells how many times the card signed.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
    ensureDeferred,
)
from twisted.internet.task import deferLater, react
from twisted.internet.threads import deferToThreadPool

import cpsdmp
from cpsdmp._fixtures import fixtures_dir, fixtures_missing
from cpsdmp.agent.client import (
    AgentError,
    CpsAgentClient,
    PinPause,
    WrongPin,
    open_session,
)
from cpsdmp.agent.pki import verify_card_chain
from cpsdmp.agent.tap import fingerprint, self_signed_identity
from cpsdmp.agent.testcard import TestCard, TestCardError, init_testcard
from cpsdmp.facade.client import AgentSessionExpired, FacadeClient, FacadeError
from cpsdmp.protocols.safexml import XmlRefused
from cpsdmp.xds.cda import (
    CLASS_BY_TYPE,
    CLASS_CODE_SYSTEM,
    NS,
    CdaError,
    UnknownClassCode,
    document_entry,
    read_header,
)
from cpsdmp.xds.cli import coded, read_cda
from cpsdmp.xds.ebrim import CodedValue, MetadataError
from cpsdmp.xds.sample import sample_cda

_T = TypeVar("_T")

START_TIMEOUT = 30.0

# The longest any one step may take, facade calls included.
STEP_TIMEOUT = 120.0

# Where the ANS example CDAs are in the public DMP material.
ANS_EXAMPLES = "ans-testcontenucda-3-0/ExemplesCDA"

# The typeCodes of ANS examples that this version's classCode table lacks:
# the demo gives their class itself (--class-code does for other documents).
_SYNTHESE = CodedValue("11", CLASS_CODE_SYSTEM, "Synthèse")
CLASS_BY_TYPE_CODES = {code for code, _ in CLASS_BY_TYPE}
_DEMO_CLASS_BY_TYPE = {
    "74207-2": _SYNTHESE,  # Dossier de liaison d'urgence (DLU)
    "11369-6": _SYNTHESE,  # Historique des vaccinations
}
PROCESS_STOP_TIMEOUT = 10.0

# What a run leaves in its folder beside the card: the local DMP's database
# (holding the documents submitted, whose uniqueIds a CDA fixes, so that the
# same documents played again would be refused as duplicates), the agent's
# audit log (which the signatures are counted in), and the logs.
RUN_FILES = (
    "dmp.sqlite",
    "dmp.sqlite-journal",
    "dmp.sqlite-wal",
    "dmp.sqlite-shm",
    "audit.jsonl",
    "local-DMP.log",
    "agent.log",
    "facade.log",
)
# Where a run sets aside what the one before left, in place of the run before.
PREVIOUS_RUN = "previous-run"

# Shorter than the agent's default, so that the demo shows the pause after a
# wrong PIN without waiting long.
AGENT_WRONG_PIN_PAUSE = 1


class DemoFailed(Exception):
    """
    A step of the demo went wrong; the message says which and why.
    """


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="play the whole chain on this machine: test card, agent, local "
        "DMP, facade, and each CDA submitted, found, read back and masked",
        description="Play the whole chain on this machine, each step printed "
        "with its time: a test CPS card on SoftHSM2, the local DMP, the agent "
        "and the facade started as processes on free loopback ports, a wrong "
        "PIN refused, a card session opened, then for each CDA the existence "
        "test, the submission, the search, the retrieval and the masking "
        "through the facade; the card's signatures counted, the card locked.",
        epilog="Every process started is stopped at the end. Exit status: 0 "
        "when the demo passed, 1 when a step failed (the folder is kept then, "
        "with the processes' logs), 2 for a bad argument (a --dir that cannot "
        "be the folder, a --cda that is not a CDA the DMP would take: checked "
        "before anything starts), 130 on Ctrl-C.",
    )
    parser.add_argument(
        "--dir",
        help="folder for the test card, keys, database and logs, kept at the "
        "end (default: a new temporary folder, removed unless --keep or a "
        "step failed); played again there, the demo keeps the card and moves "
        "the previous run's database, audit log and logs to "
        f"DIR/{PREVIOUS_RUN}",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the folder and say where it is"
    )
    parser.add_argument(
        "--cda",
        action="append",
        metavar="FILE",
        help="a CDA document to play (repeatable; default: the ANS examples "
        "when the public DMP material is at hand, else one made here)",
    )
    parser.add_argument(
        "--class-code",
        metavar="CODE[^DISPLAY[^SCHEME]]",
        type=coded(CLASS_CODE_SYSTEM),
        help="classCode of the documents whose type has none in the table",
    )
    parser.set_defaults(func=run)


class _BadArgument(Exception):
    """
    An argument the demo cannot play with; the message names it.
    """


def _prepare_folder(option: str, path: str) -> Path:
    """
    Make the folder C{path} names if it is missing, and check that the demo
    can write in it.

    @return: the folder.
    @raise _BadArgument: naming C{option} and the folder, when it is a file
        or cannot be made or written in.
    """
    if not path.strip():
        raise _BadArgument(f"{option}: empty; name a folder")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise _BadArgument(f"{option} {path}: a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _BadArgument(
            f"{option} {path}: cannot make this folder ({e.strerror})"
        ) from None
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".cpsdmp-demo-"):
            pass
    except OSError as e:
        raise _BadArgument(
            f"{option} {path}: cannot write in this folder ({e.strerror})"
        ) from None
    return folder


def _read_document(path: str, class_code: CodedValue | None) -> tuple[str, bytes]:
    """
    Read a --cda file and derive its metadata as the demo will submit it.

    @return: the file's name and bytes.
    @raise _BadArgument: naming the file, when it cannot be read or is not
        a CDA the DMP would take.
    """
    try:
        data = read_cda(Path(path))
    except OSError as e:
        raise _BadArgument(f"--cda {path}: cannot read it ({e.strerror})") from None
    except ValueError as e:
        raise _BadArgument(f"--cda {path}: {e}") from None
    try:
        overrides = overrides_for(data, class_code)
        document_entry(data, overrides=dict(overrides or {}))
    except UnknownClassCode as e:
        hint = "give it with --class-code CODE (a TRE_A03 code)"
        raise _BadArgument(f"--cda {path}: {e.hinting(hint)}") from None
    except (CdaError, MetadataError, XmlRefused) as e:
        raise _BadArgument(f"--cda {path}: not a CDA the DMP would take: {e}") from None
    return Path(path).name, data


def run(args: argparse.Namespace) -> int:
    # Every argument checked before anything is made or started.
    try:
        documents = [_read_document(path, args.class_code) for path in args.cda or []]
        if args.dir is not None:
            _prepare_folder("--dir", args.dir)
    except _BadArgument as e:
        print(f"cpsdmp demo: {e}", file=sys.stderr)
        return 2
    status: list[int] = []

    def main(reactor: Any) -> Deferred[None]:
        demo = Demo(reactor, args.dir, args.keep, documents, args.class_code)

        def interrupted(signum: int, frame: Any) -> None:
            demo.interrupt(signum)

        def handle_signals() -> None:
            # Instead of the reactor's own handlers, which stop it at once,
            # leaving the processes and the folder behind. Now, and once
            # the reactor runs: it sets its SIGTERM handler then.
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, interrupted)

        handle_signals()
        reactor.callWhenRunning(handle_signals)
        return ensureDeferred(demo.play()).addCallback(status.append)

    try:
        react(main)
    except SystemExit as e:
        if e.code not in (0, None):
            return int(e.code) if isinstance(e.code, int) else 1
    return status[0] if status else 1


def overrides_for(data: bytes, class_code: CodedValue | None) -> dict[str, Any] | None:
    """
    @return: the classCode to give when the CDA's typeCode has none in the
        table: C{class_code} (--class-code), or the demo's own for the ANS
        examples.
    @raise CdaError: not a CDA.
    @raise XmlRefused: unsafe or malformed XML.
    """
    type_code = read_header(data).root.xpath("string(h:code/@code)", namespaces=NS)
    if type_code in CLASS_BY_TYPE_CODES:
        return None
    given = class_code or _DEMO_CLASS_BY_TYPE.get(str(type_code))
    return {"classCode": given.as_dict()} if given else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_this_process() -> Callable[[], None] | None:
    """
    @return: on Linux, a function to run in a child between fork and exec
        that has the kernel send it SIGTERM when this process ends, however
        it ends (SIGKILL included, which no handler sees); elsewhere
        C{None}. Everything it calls is looked up here, before any fork.
        The kernel sends the signal when the thread that started the child
        ends: the demo starts its processes from the reactor's thread, the
        main one.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()
    getppid = os.getppid
    exit_now = os._exit

    def set_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0)
        # This process may have ended between the fork and the prctl.
        if getppid() != parent:
            exit_now(1)

    return set_death_signal


# linux/prctl.h
_PR_SET_PDEATHSIG = 1


def _source_root() -> str:
    # The folder that holds the cpsdmp package: a child process that has it
    # on sys.path imports the same code and finds the same twist plugins.
    return str(Path(cpsdmp.__file__).resolve().parent.parent)


class Demo:
    """
    The steps, printed as they happen.
    """

    def __init__(
        self,
        reactor: Any,
        directory: str | None,
        keep: bool,
        documents: list[tuple[str, bytes]] | None = None,
        class_code: CodedValue | None = None,
    ) -> None:
        self.reactor = reactor
        self.given_documents = list(documents or [])
        self.class_code = class_code
        self.keep = keep or directory is not None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="cpsdmp-demo-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.number = 0
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        # Work done in threads, each Deferred firing once its thread is done.
        self.threads: list[Deferred[None]] = []
        self.current_step = ""
        # The signal that interrupted the demo, if one did.
        self.interrupted: int | None = None
        self._chain: Deferred[None] | None = None

    def interrupt(self, signum: int) -> None:
        """
        Interrupt the demo on signal C{signum}: from a signal handler, so
        that every failure seen from now on is known to come from it. The
        steps are cancelled; what they started is then stopped.
        """
        if self.interrupted is not None:
            return
        self.interrupted = signum

        def cancel() -> None:
            if self._chain is not None:
                self._chain.cancel()

        self.reactor.callFromThread(cancel)

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
        self.current_step = title

        async def act() -> _T:
            return await action()

        running = ensureDeferred(act())
        running.addTimeout(STEP_TIMEOUT, self.reactor)
        try:
            result = await running
        except (DemoFailed, CancelledError):
            raise
        except TimeoutError as e:
            raise DemoFailed(f"{title}: no result within {STEP_TIMEOUT:g} s") from e
        except Exception as e:
            raise DemoFailed(f"{title}: {e}") from e
        self.current_step = ""
        self.say(title, detail(result), time.monotonic() - start)
        return result

    async def play(self) -> int:
        """
        Play the steps, then stop what they started.

        @return: the exit status: 0 when every step passed, 1 when one
            failed, 128 + the signal's number when interrupted.
        """
        print(f"cpsdmp {cpsdmp.__version__} demo, working in {self.directory}")
        sys.stdout.flush()
        failure: DemoFailed | None = None
        self._chain = ensureDeferred(self.play_chain())
        try:
            await self._chain
        except DemoFailed as e:
            failure = e
        except CancelledError:
            if self.interrupted is None:
                await self.stop(keep=True)
                raise
        except BaseException:
            # A fault of the demo itself: stop, and keep the files for a look.
            await self.stop(keep=True)
            raise
        finally:
            self._chain = None
        if self.interrupted is not None:
            # A step that failed after the interruption failed because of it.
            name = signal.Signals(self.interrupted).name
            during = (
                f" during step {self.number + 1} ({self.current_step})"
                if self.current_step
                else ""
            )
            print(
                f"\nDEMO INTERRUPTED ({name}){during}: stopping what it started",
                file=sys.stderr,
            )
            await self.stop(keep=self.keep)
            return 128 + self.interrupted
        if failure is not None:
            print(f"\nDEMO FAILED: {failure}", file=sys.stderr)
            self.show_logs()
            await self.stop(keep=True)
            return 1
        await self.stop(keep=self.keep)
        total = time.monotonic() - self.started
        print(f"\nDemo passed in {total:.1f} s.")
        return 0

    async def stop(self, keep: bool) -> None:
        """
        Stop the processes, wait for the work in threads, then remove the
        folder unless C{keep}.
        """
        await self.stop_processes()
        for thread in self.threads:
            await thread
        self.clean_up(keep)

    def set_previous_run_aside(self) -> None:
        """
        Move what an earlier run left in the folder (L{RUN_FILES}) to its
        L{PREVIOUS_RUN} folder, in place of what was there, and say so: the
        local DMP then starts with a new database. The card stays.

        @raise DemoFailed: when the files cannot be moved.
        """
        found = [self.directory / name for name in RUN_FILES]
        found = [path for path in found if path.exists()]
        if not found:
            return
        aside = self.directory / PREVIOUS_RUN
        try:
            if aside.exists():
                shutil.rmtree(aside)
            aside.mkdir()
            for path in found:
                path.rename(aside / path.name)
        except OSError as e:
            raise DemoFailed(
                f"cannot set the previous run's files aside in {aside}: {e}"
            ) from e
        print(
            f"  (the previous run's database, audit log and logs set aside in "
            f"{aside}: the local DMP starts with a new database)"
        )
        sys.stdout.flush()

    async def play_chain(self) -> None:
        self.set_previous_run_aside()
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
        documents = self.documents(card)
        dmp_url = await self.step(
            "local DMP started", lambda: self.start_sandbox(card), lambda url: url
        )
        url, tls_fingerprint = await self.step(
            "agent started",
            lambda: self.start_agent(card),
            lambda r: f"{r[0]}, pinned by {r[1][:23]}...",
        )
        facade_url = await self.step(
            "facade started",
            lambda: self.start_facade(card, dmp_url),
            lambda url: f"{url}, its API described at {url}/openapi.json",
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
            lambda c: f"agent context issued, token expires {c['expires']}",
        )
        agent = CpsAgentClient.from_context(context, self.reactor)
        facade = FacadeClient(facade_url, self.reactor, timeout=STEP_TIMEOUT)
        try:
            await self.step(
                "card read",
                agent.card,
                lambda c: "holder {name}, {profession}, id {id}".format(**c["holder"]),
            )
            await self.step(
                "certificate chain checked",
                lambda: self.check_chain(agent, card),
                lambda subject: f"{subject} -> TEST AC RACINE IGC-SANTE ELEMENTAIRE",
            )
            await self.step(
                "arbitrary data refused",
                lambda: self.refused(agent),
                lambda message: message,
            )
            for name, data in documents:
                await self.scenario(facade, context, name, data)
            await self.step(
                "card signatures counted",
                self.count_signatures,
                lambda counts: (
                    f"{counts[0]} TLS handshake signature(s) for "
                    f"{len(documents) * 5} DMP transactions (the connection "
                    "kept or its TLS session resumed), "
                    f"{counts[1]} submission-set signature(s)"
                ),
            )
            await self.step(
                "session locked",
                lambda: self.lock(agent, facade, context),
                lambda message: message,
            )
        finally:
            await agent.close()
            await facade.close()

    def documents(self, card: TestCard) -> list[tuple[str, bytes]]:
        """
        @return: the CDA documents to play, named: those given with --cda,
            else the ANS examples when the public material is at hand, else
            a consultation report made here.
        """
        if self.given_documents:
            return self.given_documents
        fixtures = fixtures_dir()
        if fixtures is None:
            why = fixtures_missing()
        elif not (fixtures / ANS_EXAMPLES).is_dir():
            why = f"no {ANS_EXAMPLES} folder in {fixtures}"
        else:
            examples = sorted((fixtures / ANS_EXAMPLES).glob("*.xml"))
            return [(p.name, p.read_bytes()) for p in examples]
        print(
            f"  (the ANS example CDAs are not at hand: {why}; using a consultation "
            "report made by cpsdmp)"
        )
        return [("cpsdmp-consultation.xml", sample_cda(card.professional))]

    async def scenario(
        self,
        facade: FacadeClient,
        context: dict[str, Any],
        name: str,
        data: bytes,
    ) -> None:
        print(f"\n  {name} ({len(data)} bytes)")
        try:
            overrides = overrides_for(data, self.class_code)
            entry = document_entry(data, overrides=dict(overrides or {}))
        except (CdaError, MetadataError, XmlRefused) as e:
            raise DemoFailed(f"{name}: not a CDA the DMP would take: {e}") from e
        if overrides:
            code = overrides["classCode"]
            print(f"  (classCode given by the demo: {code['code']} {code['display']})")
        patient = {"ins": entry.patientId.ins, "authority": entry.patientId.authority}
        await self.step(
            "TD0.2 existence test",
            lambda: facade.td02_exist(patient, context),
            lambda answer: ", ".join(
                [
                    f"the patient's DMP {'exists' if answer['exists'] else 'is absent'}"
                    f" ({answer['responseCode']})",
                    *_describe_timings(answer.get("timings") or {}),
                ]
            ),
        )
        submitted = await self.step(
            "TD2.1 submission",
            # As a form, as cpsdmp submit sends it: the document as it is,
            # not a third larger in base64, against the facade's limit on a
            # body.
            lambda: facade.td21_submit([data], context, [overrides], names=[name]),
            _describe_submission,
        )
        unique_id = submitted["documents"][0]["uniqueId"]
        await self.step(
            "TD3.1 search",
            lambda: self.find(facade, context, patient, unique_id),
            lambda found: (
                "found by uniqueId, status "
                + str(found["availabilityStatus"]).rpartition(":")[2]
            ),
        )
        await self.step(
            "TD3.2 retrieval",
            lambda: self.retrieve(facade, context, patient, unique_id, data),
            lambda size: f"{size} bytes, identical to the document sent",
        )
        await self.step(
            "TD3.3 masking",
            lambda: facade.td33_update(unique_id, "mask", context, patient),
            lambda answer: f"masked to professionals: {answer['status']}",
        )

    async def find(
        self,
        facade: FacadeClient,
        context: dict[str, Any],
        patient: dict[str, str],
        unique_id: str,
    ) -> dict[str, Any]:
        found = await facade.td31_find(context, patient, uniqueIds=[unique_id])
        matching = [d for d in found if d.get("uniqueId") == unique_id]
        if len(matching) != 1:
            raise DemoFailed(f"TD3.1 found {len(matching)} documents for {unique_id}")
        return matching[0]

    async def retrieve(
        self,
        facade: FacadeClient,
        context: dict[str, Any],
        patient: dict[str, str],
        unique_id: str,
        sent: bytes,
    ) -> int:
        received = await facade.td32_retrieve(unique_id, context, patient)
        if received != sent:
            raise DemoFailed(
                f"TD3.2 returned {len(received)} bytes that differ from the "
                f"{len(sent)} sent"
            )
        return len(received)

    async def make_card(self) -> TestCard:
        try:
            return await self.in_thread(init_testcard, self.directory / "card")
        except TestCardError as e:
            raise DemoFailed(str(e)) from e

    async def in_thread(self, function: Callable[..., _T], *args: Any) -> _T:
        """
        @return: what C{function} returns, run in a thread; the step may be
            cancelled meanwhile, the thread is still waited for before the
            folder it may write in is removed.
        """
        work: Deferred[_T] = deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), function, *args
        )
        result: Deferred[_T] = Deferred()
        self.threads.append(work.chainDeferred(result))
        return await result

    async def start_agent(
        self,
        card: TestCard,
        name: str = "agent",
        extra_arguments: Sequence[str] = (),
    ) -> tuple[str, str]:
        """
        Start an agent over C{card}; C{name} tells its files apart when
        several agents run (its audit log is C{audit.jsonl} for the first,
        C{NAME-audit.jsonl} for others).

        @return: its URL and the fingerprint of its TLS certificate.
        """
        key, certificate = self_signed_identity()
        cert_path = self.directory / f"{name}-tls.pem"
        key_path = self.directory / f"{name}-tls-key.pem"
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
            name,
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
                "--audit-log",
                str(self.audit_log(name)),
                *extra_arguments,
            ],
        )
        await self.wait_for_port(name, port)
        return f"https://127.0.0.1:{port}", fingerprint(certificate)

    def audit_log(self, agent_name: str = "agent") -> Path:
        """
        @return: the audit log of the agent started under C{agent_name}.
        """
        if agent_name == "agent":
            return self.directory / "audit.jsonl"
        return self.directory / f"{agent_name}-audit.jsonl"

    async def start_sandbox(self, card: TestCard) -> str:
        port = _free_port()
        self.spawn(
            "local DMP",
            [
                "dmpsandbox",
                "--testcard",
                card.directory,
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
                "--db",
                str(self.directory / "dmp.sqlite"),
            ],
        )
        await self.wait_for_port("local DMP", port)
        return f"https://127.0.0.1:{port}/si-dmp-server/v2/services"

    async def start_facade(
        self,
        card: TestCard,
        dmp_url: str,
        name: str = "facade",
        extra_arguments: Sequence[str] = (),
    ) -> str:
        """
        Start a facade in front of C{dmp_url}, logging to C{NAME.log}.

        @return: its URL.
        """
        port = _free_port()
        self.spawn(
            name,
            [
                "dmpfacade",
                "--testcard",
                card.directory,
                "--dmp-url",
                dmp_url,
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
                *extra_arguments,
            ],
        )
        await self.wait_for_port(name, port)
        return f"http://127.0.0.1:{port}"

    def spawn(self, name: str, twist_arguments: list[str]) -> None:
        log = open(self._log_path(name), "wb")
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
            # Should the demo be killed outright, its processes end too.
            preexec_fn=_die_with_this_process(),
        )
        log.close()
        self.processes.append((name, process))

    async def wait_for_port(self, name: str, port: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
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
        raise DemoFailed(f"the {name} did not listen within {START_TIMEOUT} s")

    async def wrong_pin(self, url: str, tls_fingerprint: str, card: TestCard) -> str:
        wrong = "0000" if card.pin != "0000" else "9999"
        try:
            await open_session(url, wrong, tls_fingerprint, self.reactor)
        except WrongPin as e:
            said = f"{e.problem.get('status', 401)} from the agent: "
            said += str(e.problem.get("detail") or e)
            if e.tries_left is None:
                # What the agent says of the card's flags is about a real
                # card; the test card's PIN never blocks.
                said += (
                    " (the test token, SoftHSM2, keeps no count of tries and "
                    "never blocks)"
                    if card.has_token
                    else " (the PKCS#12 soft card keeps no count of tries and "
                    "never blocks)"
                )
            return said
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
        common_name = chain[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(common_name[0].value)

    async def refused(self, agent: CpsAgentClient) -> str:
        try:
            await agent.sign(b"anything at all", "SHA256WithRSA")
        except AgentError as e:
            if e.problem.get("status") != 403:
                raise
            # The agent's own words say why.
            return f"403 {e.problem.get('title')}: {e.problem.get('detail')}"
        raise DemoFailed("the agent had the card sign arbitrary data")

    async def count_signatures(self) -> tuple[int, int]:
        lines = self.audit_log().read_text("utf-8").splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        signed = [r for r in records if r.get("outcome") == "signed"]
        handshakes = sum(1 for r in signed if r.get("key") == "authentication")
        documents = sum(1 for r in signed if r.get("key") == "signature")
        return handshakes, documents

    async def lock(
        self,
        agent: CpsAgentClient,
        facade: FacadeClient,
        context: dict[str, Any],
    ) -> str:
        await agent.lock()
        try:
            await facade.td02_exist({"ins": "185127505612306"}, context)
        except AgentSessionExpired:
            return "the facade refuses the agent context afterwards (401)"
        except FacadeError as e:
            raise DemoFailed(f"after locking, the facade answered {e}") from e
        raise DemoFailed("the agent context still worked after the card was locked")

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
            elif process.returncode in (0, -signal.SIGTERM, -signal.SIGINT):
                # twist ends on SIGTERM or SIGINT (Ctrl-C in the terminal
                # reaches the demo's processes too) by re-raising it once
                # shut down.
                print(f"  {name} stopped")
            else:
                print(f"  the {name} stopped with status {process.returncode}")
        self.processes = []

    def _log_path(self, name: str) -> Path:
        return self.directory / f"{name.replace(' ', '-')}.log"

    def show_logs(self) -> None:
        for name, _ in self.processes:
            log = self._log_path(name)
            if log.exists():
                tail = log.read_text("utf-8", "replace").splitlines()[-15:]
                print(f"--- last lines of the {name}'s log ({log}):", file=sys.stderr)
                print("\n".join(tail), file=sys.stderr)

    def clean_up(self, keep: bool) -> None:
        if keep and not self.keep:
            print(f"  the demo failed: everything is kept in {self.directory}")
            return
        if keep:
            print(f"  everything is kept in {self.directory}")
            return
        shutil.rmtree(self.directory, ignore_errors=True)
        print(f"  {self.directory} removed")


def _describe_timings(timings: dict[str, Any]) -> list[str]:
    """
    @return: what the facade's timings of a DMP exchange say: the DMP's
        answer, the connection, the TLS handshake and the card's signature
        of it when there was one.
    """
    parts = []
    if "dmp" in timings:
        parts.append(f"DMP answered in {timings['dmp']:.3f} s")
    if timings.get("connection"):
        connection = f"connection {timings['connection']}"
        if timings.get("handshake") is not None:
            connection += f" (handshake {timings['handshake']:.3f} s"
            if timings.get("handshakeSignature") is not None:
                connection += f", card signature {timings['handshakeSignature']:.3f} s"
            connection += ")"
        parts.append(connection)
    return parts


def _describe_submission(answer: dict[str, Any]) -> str:
    document = answer["documents"][0]
    timings = answer.get("timings") or {}
    parts = [f"Success, uniqueId {document['uniqueId']}"]
    if timings.get("submissionSetSignature") is not None:
        parts.append(
            f"card signed the set in {timings['submissionSetSignature']:.3f} s"
        )
    return ", ".join(parts + _describe_timings(timings))
