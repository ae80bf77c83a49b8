"""
The README's demo command, run as a user runs it: a real agent process, a
real SoftHSM2 test card, real HTTPS on the loopback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

import cpsdmp
from cpsdmp._fixtures import fixtures_dir
from cpsdmp.agent.testcard import TestCard
from cpsdmp.demo import ANS_EXAMPLES, STEP_TIMEOUT, Demo, DemoFailed
from cpsdmp.xds.sample import sample_cda


def _run_demo(
    *arguments: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    source = str(Path(cpsdmp.__file__).resolve().parent.parent)
    return subprocess.run(
        [sys.executable, "-m", "cpsdmp.cli", "demo", *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": source, **(env or {})},
    )


class DemoTests(TestCase):
    def test_demo_passes(self) -> None:
        """
        The demo starts the local DMP, the agent and the facade, opens a
        session with the test PIN after refusing a wrong one, plays the five
        transactions for each ANS example CDA with one card signature for
        the TLS session, locks the card, stops everything and says it passed.
        """
        directory = Path("demo").absolute()
        result = _run_demo("--dir", str(directory))
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        out = result.stdout
        for expected in [
            "test card ready",
            "SoftHSM2 token 'CPS TEST'",
            "agent started",
            "wrong PIN refused",
            "next PIN held back",
            "card session opened",
            "certificate chain checked",
            "arbitrary data refused",
            "1 TLS handshake signature(s) for 30 DMP transactions",
            "6 submission-set signature(s)",
            "the facade refuses the agent context afterwards (401)",
            "  agent stopped\n",
            "  facade stopped\n",
            "  local DMP stopped\n",
            "Demo passed",
        ]:
            self.assertIn(expected, out)
        # What the agent answered to the wrong PIN, and that the test card
        # never blocks, whatever the agent's words about the card's flags.
        self.assertRegex(
            out,
            r"wrong PIN refused +[\d.]+ ms  401 from the agent: wrong PIN[^\n]* "
            r"\(the test token, SoftHSM2, keeps no count of tries and never "
            r"blocks\)\n",
        )
        # The agent's refusal, said once: no "the agent: the agent".
        self.assertRegex(out, r"arbitrary data refused +[\d.]+ ms  403 [^:\n]+: \S")
        self.assertNotIn("the agent: the agent", out)
        examples = fixtures_dir()
        assert examples is not None
        names = sorted(p.name for p in (examples / ANS_EXAMPLES).glob("*.xml"))
        self.assertEqual(len(names), 6)
        for name in names:
            self.assertIn(f"  {name} (", out)
        for step in [
            "TD0.2 existence test",
            "TD2.1 submission",
            "TD3.1 search",
            "TD3.2 retrieval",
            "TD3.3 masking",
        ]:
            self.assertEqual(out.count(step), 6, step)
        self.assertEqual(out.count("identical to the document sent"), 6)
        # The one full handshake, its time and the card's signature in it,
        # on the first exchange; every later TD0.2 and TD2.1 on the kept
        # connection.
        self.assertEqual(out.count("connection new handshake (handshake "), 1)
        self.assertRegex(
            out,
            r"TD0\.2 existence test .*DMP answered in [\d.]+ s, connection new "
            r"handshake \(handshake [\d.]+ s, card signature [\d.]+ s\)",
        )
        self.assertEqual(out.count("connection reused"), 11)
        card = TestCard.load(directory / "card")
        # The PIN in none of the processes' logs, the audit log or what the
        # demo printed: the folder holds them all.
        checked = _assert_no_pin(self, directory, card.pin)
        self.assertEqual(
            sorted(checked),
            ["agent.log", "audit.jsonl", "facade.log", "local-DMP.log"],
        )
        self.assertEqual(_pin_fields(out + result.stderr, card.pin), [])

    def test_demo_fails_loudly(self) -> None:
        """
        When the agent dies midway (killed while the demo waits out the pause
        after the wrong PIN), the demo says which step failed and why, shows
        the agent's log, keeps its folder for a look, and exits non-zero.
        """
        demo, lines = _start_demo(self)
        seen = _read_until(self, lines, "next PIN held back")
        directory = _working_folder(seen)
        self.assertTrue(_kill_agent_of(directory / "card"))
        out, err = _finish(self, demo, lines, seen)
        self.assertEqual(demo.returncode, 1, out + err)
        self.assertIn("DEMO FAILED: card session opened:", err)
        self.assertIn("agent", err.split("DEMO FAILED")[1].splitlines()[0])
        self.assertIn("last lines of the agent's log", err)
        self.assertNotIn("Demo passed", out)
        # Whatever failed, the demo stopped the processes it started.
        self.assertIn("  facade stopped\n", out)
        self.assertIn("  local DMP stopped\n", out)
        self.assertEqual(_processes_of(directory), [])
        # The logs it points at are kept, and it says so.
        log = directory / "agent.log"
        self.assertIn(f"({log})", err)
        self.assertTrue(log.is_file())
        self.assertIn(f"the demo failed: everything is kept in {directory}", out)

    def test_interrupted_early(self) -> None:
        """
        Ctrl-C (SIGINT to the whole process group, as a terminal sends it)
        while the test card is being made: the demo says it was
        interrupted, stops everything, removes its folder and exits 130.
        """
        demo, lines = _start_demo(self)
        seen = _read_until(self, lines, "working in")
        directory = _working_folder(seen)
        time.sleep(1.2)
        os.killpg(demo.pid, signal.SIGINT)
        out, err = _finish(self, demo, lines, seen)
        self.assertEqual(demo.returncode, 130, out + err)
        self.assertIn("DEMO INTERRUPTED (SIGINT)", err)
        self.assertNotIn("Exception ignored", err)
        self.assertNotIn("Traceback", err)
        self.assertNotIn("DEMO FAILED", err)
        self.assertFalse(directory.exists())
        self.assertEqual(_processes_of(directory), [])

    def test_interrupted_with_processes(self) -> None:
        """
        SIGINT to the demo alone once the local DMP and the agent run: the
        demo stops them itself before it removes its folder.
        """
        demo, lines = _start_demo(self)
        seen = _read_until(self, lines, "agent started")
        directory = _working_folder(seen)
        demo.send_signal(signal.SIGINT)
        out, err = _finish(self, demo, lines, seen)
        self.assertEqual(demo.returncode, 130, out + err)
        self.assertIn("DEMO INTERRUPTED (SIGINT)", err)
        self.assertIn("  agent stopped\n", out)
        self.assertIn("  local DMP stopped\n", out)
        self.assertNotIn("Traceback", err)
        self.assertFalse(directory.exists())
        self.assertEqual(_processes_of(directory), [])


class KilledDemoTests(TestCase):
    def test_processes_end_with_the_demo(self) -> None:
        """
        SIGKILL on the demo, which it cannot handle: the local DMP, the
        agent and the facade it started end too, instead of running on.
        """
        demo, lines = _start_demo(self)
        seen = _read_until(self, lines, "facade started")
        directory = _working_folder(seen)
        self.assertEqual(len(_processes_of(directory)), 3)
        demo.kill()
        demo.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _processes_of(directory) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertEqual(_processes_of(directory), [])


def _pin_fields(text: str, pin: str) -> list[str]:
    """
    @return: the lines of C{text} that hold C{pin} as a value of its own: a
        JSON string or number, or a field between characters that cannot
        be part of it (spaces, quotes, C{=}, C{:}...), so that a port, a
        fingerprint, a duration or an identifier that merely contains its
        digits (C{41234}, C{ab1234}, C{0.1234 s}, C{810001234567}) does
        not count.
    """
    field = re.compile(rf"(?<![\w.]){re.escape(pin)}(?!\w)")
    return [line for line in text.splitlines() if field.search(line)]


def _assert_no_pin(case: SynchronousTestCase, directory: Path, pin: str) -> list[str]:
    """
    Check that no log (C{*.log}) and no audit log (C{*.jsonl}) in
    C{directory} holds C{pin}, and that every audit line is JSON whose
    values are not it either.

    @return: the names of the files checked.
    """
    checked = []
    for path in sorted([*directory.glob("*.log"), *directory.glob("*.jsonl")]):
        text = path.read_text("utf-8", "replace")
        case.assertEqual(_pin_fields(text, pin), [], path)
        if path.suffix == ".jsonl":
            for line in text.splitlines():
                case.assertNotIn(pin, _json_values(json.loads(line)), path)
        checked.append(path.name)
    return checked


def _json_values(value: object) -> list[str]:
    """
    @return: every scalar in a JSON value, as text.
    """
    if isinstance(value, dict):
        return [v for item in value.values() for v in _json_values(item)]
    if isinstance(value, list):
        return [v for item in value for v in _json_values(item)]
    return [str(value)]


class PinCheckTests(SynchronousTestCase):
    def test_pin_fields(self) -> None:
        """
        The PIN is found as a value of its own, not inside other numbers.
        """
        for leak in [
            '{"pin": "1234"}',
            "pin=1234 refused",
            "PIN 1234",
            "[1234]",
            "the PIN: 1234.",
        ]:
            self.assertEqual(_pin_fields(leak, "1234"), [leak])
        for innocent in [
            "listening on 127.0.0.1:41234",
            "sha256:ab1234cd",
            "took 0.1234 s",
            "holder 810001234567",
            "pid 12345",
        ]:
            self.assertEqual(_pin_fields(innocent, "1234"), [])

    def test_folder(self) -> None:
        """
        Every log and audit log of the folder is checked, a JSON value
        included.
        """
        folder = Path(self.mktemp())
        folder.mkdir()
        (folder / "agent.log").write_text("fine\n")
        (folder / "audit.jsonl").write_text('{"caller": "1234"}\n')
        self.assertRaises(self.failureException, _assert_no_pin, self, folder, "1234")
        (folder / "audit.jsonl").write_text('{"caller": "127.0.0.1"}\n')
        (folder / "facade.log").write_text("secret 1234 here\n")
        self.assertRaises(self.failureException, _assert_no_pin, self, folder, "1234")
        (folder / "facade.log").write_text("port 41234\n")
        self.assertEqual(
            _assert_no_pin(self, folder, "1234"),
            ["agent.log", "audit.jsonl", "facade.log"],
        )


def _start_demo(
    case: TestCase, *arguments: str
) -> tuple[subprocess.Popen[str], queue.Queue[str | None]]:
    """
    Start the demo in a process group of its own, its temporary folder in
    this test's folder; its output lines go to the queue returned.
    """
    source = str(Path(cpsdmp.__file__).resolve().parent.parent)
    temporary = Path(case.mktemp()).absolute()
    temporary.mkdir(parents=True)
    demo = subprocess.Popen(
        [sys.executable, "-m", "cpsdmp.cli", "demo", *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": source, "TMPDIR": str(temporary)},
        start_new_session=True,
    )
    case.addCleanup(demo.wait, 30)
    case.addCleanup(_kill_group, demo.pid)
    assert demo.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_read_lines, args=(demo.stdout, lines), daemon=True).start()
    return demo, lines


def _kill_group(pid: int) -> None:
    """
    Kill the process group C{pid} leads: the demo and, should it have left
    any behind, the processes it started.
    """
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read_until(
    case: TestCase, lines: queue.Queue[str | None], expected: str
) -> list[str]:
    """
    @return: the output lines up to the first holding C{expected}.
    """
    seen: list[str] = []
    deadline = time.monotonic() + 100
    while not (seen and expected in seen[-1]):
        line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        case.assertIsNotNone(line, "".join(seen))
        assert line is not None
        seen.append(line)
    return seen


def _working_folder(seen: list[str]) -> Path:
    found = re.search(r"demo, working in (\S+)", seen[0])
    assert found is not None, seen[0]
    return Path(found.group(1))


def _finish(
    case: TestCase,
    demo: subprocess.Popen[str],
    lines: queue.Queue[str | None],
    seen: list[str],
) -> tuple[str, str]:
    """
    @return: the demo's whole output and error output once it has ended.
    """
    demo.wait(timeout=120)
    assert demo.stderr is not None
    err = demo.stderr.read()
    while (line := lines.get(timeout=10)) is not None:
        seen.append(line)
    return "".join(seen), err


def _read_lines(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _processes_of(directory: Path) -> list[str]:
    """
    @return: the command lines of the running processes that name C{directory}.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(str(directory).encode() in argument for argument in argv):
            found.append(b" ".join(argv).decode(errors="replace"))
    return found


def _kill_agent_of(card: Path) -> bool:
    """
    Kill the agent process serving C{card}, found by its command line.
    """
    killed = False
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"cpsagent" in argv and str(card).encode() in argv:
            os.kill(int(entry.name), signal.SIGKILL)
            killed = True
    return killed


class BadArgumentTests(SynchronousTestCase):
    """
    A --dir that cannot be the demo's folder, or a --cda that cannot be
    played, is one line and exit status 2, before anything is made or
    started.
    """

    def assert_refused(self, expected: str, *arguments: str) -> str:
        """
        @return: the one line of error output, which starts with
            C{expected} after the command's name.
        """
        temporary = Path(self.mktemp()).absolute()
        temporary.mkdir(parents=True)
        result = _run_demo(*arguments, env={"TMPDIR": str(temporary)})
        self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
        self.assertEqual(result.stdout, "")
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertTrue(
            result.stderr.startswith(f"cpsdmp demo: {expected}"), result.stderr
        )
        # Not even a temporary folder was made.
        self.assertEqual(list(temporary.iterdir()), [])
        return result.stderr

    def test_dir_is_a_file(self) -> None:
        path = Path("a-file").absolute()
        path.write_text("kept as it is\n")
        self.assert_refused(f"--dir {path}: a file, not a folder", "--dir", str(path))
        self.assertEqual(path.read_text(), "kept as it is\n")

    def test_dir_under_a_file(self) -> None:
        path = Path("another-file").absolute()
        path.write_text("")
        self.assert_refused(
            f"--dir {path}/card: cannot make this folder (Not a directory)",
            "--dir",
            f"{path}/card",
        )

    def test_dir_cannot_be_made(self) -> None:
        self.assert_refused(
            "--dir /proc/x: cannot make this folder (No such file or directory)",
            "--dir",
            "/proc/x",
        )

    def test_dir_not_writable(self) -> None:
        """
        A folder where no file can be made (root included) is refused too.
        """
        self.assert_refused(
            "--dir /sys: cannot write in this folder (", "--dir", "/sys"
        )

    def test_cda_missing(self) -> None:
        self.assert_refused(
            "--cda /nonexistent.xml: cannot read it (No such file or directory)",
            "--cda",
            "/nonexistent.xml",
        )

    def test_cda_not_a_regular_file(self) -> None:
        """
        A pipe no one writes to is refused at once, not waited on.
        """
        fifo = Path(self.mktemp()).absolute()
        os.mkfifo(fifo)
        self.assert_refused(f"--cda {fifo}: not a regular file", "--cda", str(fifo))

    def test_cda_not_a_cda(self) -> None:
        """
        Of several --cda files, the one that is not a CDA is named.
        """
        good = Path("good.xml").absolute()
        good.write_bytes(sample_cda(_PROFESSIONAL))
        bad = Path("not-xml.xml").absolute()
        bad.write_text("hello\n")
        self.assert_refused(
            f"--cda {bad}: not a CDA the DMP would take: CDA document is not "
            "well-formed XML: Start tag expected, '<' not found, line 1, column 1",
            "--cda",
            str(good),
            "--cda",
            str(bad),
        )

    def test_cda_without_class(self) -> None:
        """
        A CDA whose type has no classCode in the table, without
        --class-code, is refused at once, saying what to give.
        """
        path = Path("progress-note.xml").absolute()
        path.write_bytes(
            sample_cda(_PROFESSIONAL).replace(b'code="11488-4"', b'code="11506-3"')
        )
        error = self.assert_refused(f"--cda {path}: ", "--cda", str(path))
        self.assertIn("11506-3", error)
        self.assertIn("--class-code", error)


_PROFESSIONAL = {
    "id": "810001234567",
    "given_name": "Marie",
    "family_name": "DURAND-TEST",
}


class ReadmeTests(SynchronousTestCase):
    def test_testcard_keys_listed(self) -> None:
        """
        The README lists every key of the testcard.json that the demo keeps
        with --dir.
        """
        readme = (Path(cpsdmp.__file__).parents[1] / "README.md").read_text()
        section = readme.split("## The test card")[1].split("\n## ")[0]
        for field in dataclasses.fields(TestCard):
            self.assertIn(f"`{field.name}`", section)


class StepTests(SynchronousTestCase):
    def test_step_timeout(self) -> None:
        """
        A step that never ends fails the demo after the step timeout, naming
        the step.
        """
        clock = Clock()
        demo = Demo(clock, self.mktemp(), keep=True)
        never: Deferred[None] = Deferred()
        d = ensureDeferred(demo.step("agent started", lambda: never, str))
        clock.advance(STEP_TIMEOUT - 1)
        self.assertNoResult(d)
        clock.advance(1)
        failure = self.failureResultOf(d, DemoFailed)
        self.assertEqual(
            str(failure.value), f"agent started: no result within {STEP_TIMEOUT:g} s"
        )


class _Submitted(Exception):
    pass


class _FormFacade:
    """
    A facade that says the patient's DMP exists and keeps how a submission
    was asked, then stops the scenario.
    """

    def __init__(self) -> None:
        self.submissions: list[tuple[tuple[object, ...], dict[str, object]]] = []

    def td02_exist(self, patient: object, context: object) -> Deferred[object]:
        return succeed({"exists": True, "responseCode": "DMP_EXISTS"})

    def td21_submit(self, *args: object, **kwargs: object) -> Deferred[object]:
        self.submissions.append((args, kwargs))
        return fail(_Submitted())


class ScenarioTests(SynchronousTestCase):
    def test_submission_as_a_form(self) -> None:
        """
        The demo submits a document as a multipart form named after its
        file, as cpsdmp submit does: in base64 in JSON, a document of 50 MB
        would pass the facade's limit on a body.
        """
        facade = _FormFacade()
        demo = Demo(Clock(), self.mktemp(), keep=True)
        data = sample_cda(_PROFESSIONAL)
        d = ensureDeferred(
            demo.scenario(facade, {"url": "x"}, "report.xml", data)  # type: ignore[arg-type]
        )
        self.failureResultOf(d, DemoFailed)
        [(args, kwargs)] = facade.submissions
        self.assertEqual(args[0], [data])
        self.assertEqual(kwargs.get("names"), ["report.xml"])


class GeneratedDocumentDemoTests(TestCase):
    def test_without_fixtures(self) -> None:
        """
        Without the public DMP material, the demo plays a consultation
        report it makes itself, so that it works from any clone.
        """
        nowhere = Path("no-fixtures-here").absolute()
        result = _run_demo(
            "--dir",
            str(Path("demo-own").absolute()),
            env={"CPSDMP_FIXTURES": str(nowhere)},
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        # Where it looked, and that the variable was set but wrong.
        self.assertIn(
            f"(the ANS example CDAs are not at hand: CPSDMP_FIXTURES is set to "
            f"{nowhere}, which is not a folder",
            result.stdout,
        )
        self.assertIn("shared/fixtures beside the checkout (", result.stdout)
        self.assertIn("using a consultation report made by cpsdmp", result.stdout)
        self.assertIn("cpsdmp-consultation.xml", result.stdout)
        self.assertEqual(result.stdout.count("identical to the document sent"), 1)
        self.assertIn("Demo passed", result.stdout)

    def test_rerun_in_the_same_folder(self) -> None:
        """
        The demo plays again in the folder of an earlier run, the same
        documents included (their uniqueIds are fixed): it keeps the card,
        sets the earlier run's database, audit log and logs aside, says so,
        and starts its local DMP with a new database.
        """
        path = Path("same-document.xml").absolute()
        path.write_bytes(sample_cda(_PROFESSIONAL))
        directory = Path("demo-again").absolute()
        first = _run_demo("--dir", str(directory), "--cda", str(path))
        self.assertEqual(first.returncode, 0, first.stdout + first.stderr)
        self.assertNotIn("previous run", first.stdout)
        card = (directory / "card" / "testcard.json").read_bytes()
        database = (directory / "dmp.sqlite").read_bytes()
        audit = (directory / "audit.jsonl").read_bytes()

        second = _run_demo("--dir", str(directory), "--cda", str(path))
        self.assertEqual(second.returncode, 0, second.stdout + second.stderr)
        aside = directory / "previous-run"
        self.assertIn(
            f"  (the previous run's database, audit log and logs set aside in "
            f"{aside}: the local DMP starts with a new database)\n",
            second.stdout,
        )
        self.assertIn("Demo passed", second.stdout)
        # The signatures counted are this run's alone.
        self.assertIn("1 TLS handshake signature(s) for 5 DMP", second.stdout)
        self.assertIn("1 submission-set signature(s)", second.stdout)
        self.assertEqual((directory / "card" / "testcard.json").read_bytes(), card)
        self.assertEqual((aside / "dmp.sqlite").read_bytes(), database)
        self.assertEqual((aside / "audit.jsonl").read_bytes(), audit)
        self.assertTrue((aside / "agent.log").is_file())

    def test_own_document_with_class_code(self) -> None:
        """
        A document given with --cda whose type the classCode table lacks
        plays with --class-code, and the demo says it gave the class.
        """
        data = sample_cda(
            {
                "id": "810001234567",
                "given_name": "Marie",
                "family_name": "DURAND-TEST",
            }
        ).replace(b'code="11488-4"', b'code="11506-3"')
        path = Path("progress-note.xml").absolute()
        path.write_bytes(data)
        result = _run_demo(
            "--dir",
            str(Path("demo-class").absolute()),
            "--cda",
            str(path),
            "--class-code",
            "10^Compte rendu",
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("(classCode given by the demo: 10 Compte rendu)", result.stdout)
        self.assertIn("progress-note.xml", result.stdout)
        self.assertEqual(result.stdout.count("identical to the document sent"), 1)
