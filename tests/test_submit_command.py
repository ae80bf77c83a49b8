"""
C{cpsdmp submit} run as a process, as a user runs it: a bad argument is one
line and exit status 2, a file that cannot be submitted is named, a failure
is one clear line and a non-zero status, and nothing hangs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase

from cpsdmp.agent.testcard import TestCard, init_testcard
from cpsdmp.facade.tap import FacadeService
from cpsdmp.xds.sample import DEFAULT_PATIENT, sample_cda
from tests.test_facade import FacadeTestCase

REPOSITORY = Path(__file__).resolve().parents[1]


def _submit(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cpsdmp.cli", "submit", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
    )


def _professional() -> dict[str, str]:
    card = init_testcard(Path("submit-card").absolute(), softhsm=False)
    return card.professional


def _other_card() -> TestCard:
    """
    @return: a test card of another test PKI.
    """
    return init_testcard(Path("other-card").absolute(), softhsm=False)


def _files() -> tuple[Path, Path]:
    """
    @return: a CDA ready to submit and an agent context file (its agent
        need not exist for the checks made before anything is sent).
    """
    cda = Path("fresh.xml").absolute()
    cda.write_bytes(sample_cda(_professional()))
    context = Path("context.json").absolute()
    context.write_text(
        json.dumps(
            {
                "url": "https://127.0.0.1:1",
                "token": "t" * 43,
                "tlsFingerprint": "sha256:" + "0" * 64,
            }
        )
    )
    return cda, context


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BadArgumentTests(SynchronousTestCase):
    def assert_bad_argument(
        self, result: subprocess.CompletedProcess[str], expected: str
    ) -> None:
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertEqual(result.stdout, "")
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertIn(expected, result.stderr)

    def test_timeout(self) -> None:
        cda, context = _files()
        for value in ["-1", "0", "nan", "inf", "soon"]:
            result = _submit(
                str(cda), "--agent-context", str(context), "--timeout", value
            )
            self.assert_bad_argument(
                result,
                f"argument --timeout: {value!r} is not a positive number of seconds",
            )

    def test_facade_url(self) -> None:
        cda, context = _files()
        for value in ["notaurl", "ftp://x", "http://", "http://127.0.0.1:99999"]:
            result = _submit(
                str(cda), "--agent-context", str(context), "--facade", value
            )
            self.assert_bad_argument(result, f"argument --facade: {value!r}")

    def test_missing_argument(self) -> None:
        cda, _ = _files()
        result = _submit(str(cda))
        self.assert_bad_argument(result, "--agent-context")
        self.assertIn("cpsdmp submit --help", result.stderr)

    def test_file_not_xml(self) -> None:
        """
        Of several documents, the one that is not a CDA is named, and
        nothing is sent.
        """
        cda, context = _files()
        bad = Path("notxml.xml").absolute()
        bad.write_text("hello\n")
        result = _submit(
            str(cda),
            str(bad),
            "--agent-context",
            str(context),
            "--facade",
            f"http://127.0.0.1:{_closed_port()}",
        )
        self.assert_bad_argument(result, f"cpsdmp submit: {bad}: ")
        self.assertIn("not well-formed XML", result.stderr)

    def test_too_many_documents(self) -> None:
        """
        More documents than the facade takes in one submission are refused
        before any is read or anything sent; as many are read.
        """
        from cpsdmp.facade.service import MAX_DOCUMENTS

        _, context = _files()
        unread = ["/nonexistent.xml"] * (MAX_DOCUMENTS + 1)
        result = _submit(*unread, "--agent-context", str(context))
        self.assert_bad_argument(
            result,
            f"cpsdmp submit: {MAX_DOCUMENTS + 1} documents: a submission carries "
            f"at most {MAX_DOCUMENTS}; submit them in several",
        )
        result = _submit(*unread[1:], "--agent-context", str(context))
        self.assert_bad_argument(
            result, "cpsdmp submit: /nonexistent.xml: No such file or directory"
        )

    def test_cda_without_class(self) -> None:
        """
        A CDA whose type has no classCode in the table, without
        --class-code: named, with the option to give, exit status 2, and
        nothing sent.
        """
        cda, context = _files()
        cda.write_bytes(
            cda.read_bytes().replace(b'code="11488-4"', b'code="11506-3"', 1)
        )
        result = _submit(
            str(cda),
            "--agent-context",
            str(context),
            "--facade",
            f"http://127.0.0.1:{_closed_port()}",
        )
        self.assert_bad_argument(
            result, f"cpsdmp submit: {cda}: no classCode is known for the typeCode"
        )
        self.assertIn("11506-3", result.stderr)
        self.assertIn("give it with --class-code CODE", result.stderr)
        self.assertNotIn("overrides", result.stderr)
        # Given, the document goes on to the facade (here, none listens).
        result = _submit(
            str(cda),
            "--agent-context",
            str(context),
            "--facade",
            f"http://127.0.0.1:{_closed_port()}",
            "--class-code",
            "11",
        )
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("no connection to the facade", result.stderr)

    def test_file_missing(self) -> None:
        _, context = _files()
        result = _submit("/nonexistent.xml", "--agent-context", str(context))
        self.assert_bad_argument(
            result, "cpsdmp submit: /nonexistent.xml: No such file or directory"
        )

    def test_agent_context_not_one(self) -> None:
        """
        An agent context file that is not one is a bad argument, said in one
        line naming the file (each way of not being one: L{AgentContextFileTests}).
        """
        cda, _ = _files()
        context = Path("bad-context.json").absolute()
        context.write_text('{"url": "https://x"}')
        result = _submit(str(cda), "--agent-context", str(context))
        self.assert_bad_argument(result, f"the agent context {context} ")
        self.assertIn("lacks token, tlsFingerprint", result.stderr)

    def test_agent_context_not_a_small_file(self) -> None:
        """
        An agent context that is not a regular file (a device, a pipe no one
        writes to) or is larger than one can be is refused at once, without
        reading it all or waiting.
        """
        cda, _ = _files()
        fifo = Path("fifo").absolute()
        os.mkfifo(fifo)
        large = Path("large.json").absolute()
        large.write_text(" " * (64 * 1024) + "{}")
        here = str(Path(".").absolute())
        for path, expected in [
            ("/dev/zero", "the agent context /dev/zero is not a regular file"),
            (str(fifo), f"the agent context {fifo} is not a regular file"),
            (here, f"the agent context {here} is not a regular file"),
            (str(large), f"the agent context {large} is larger than 64 KiB"),
        ]:
            result = _submit(str(cda), "--agent-context", path)
            self.assert_bad_argument(result, f"cpsdmp submit: {expected}")


class AgentContextFileTests(SynchronousTestCase):
    def test_not_an_agent_context(self) -> None:
        """
        The reader that submit and probe share says how a file is not an
        agent context: not JSON, not an object, members missing, or not
        strings.
        """
        from cpsdmp.cli import BadInput, read_agent_context

        path = Path(self.mktemp())
        for content, expected in [
            ("{not json", "is not JSON"),
            ('["url"]', "is not an agent context"),
            ('{"url": "https://x"}', "lacks token, tlsFingerprint"),
            (
                json.dumps({"url": 1, "token": None, "tlsFingerprint": "x"}),
                "has url, token empty or not a string",
            ),
        ]:
            path.write_text(content)
            with self.assertRaises(BadInput) as raised:
                read_agent_context(path)
            said = str(raised.exception)
            self.assertTrue(said.startswith(f"the agent context {path} "), said)
            self.assertIn(expected, said)

    def test_folder_refused_and_closed(self) -> None:
        """
        A folder given as the agent context is refused as not a regular
        file, and the descriptor opened to find it out is closed.
        """
        from cpsdmp.cli import BadInput, read_agent_context

        folder = Path(self.mktemp())
        folder.mkdir()
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(3):
            with self.assertRaises(BadInput) as raised:
                read_agent_context(folder)
            self.assertEqual(
                str(raised.exception),
                f"the agent context {folder} is not a regular file",
            )
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)


class FailureTests(SynchronousTestCase):
    def test_facade_unreachable(self) -> None:
        """
        No facade at the URL: one line that says so, status 1, at once.
        """
        cda, context = _files()
        port = _closed_port()
        result = _submit(
            str(cda),
            "--agent-context",
            str(context),
            "--facade",
            f"http://127.0.0.1:{port}",
        )
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertIn(f"127.0.0.1:{port}", result.stderr)
        self.assertNotIn("Traceback", result.stderr)


class RefusedDocumentTests(FacadeTestCase):
    @inlineCallbacks
    def test_refused_document_named(self) -> Any:
        """
        When the facade refuses one of several documents, well-formed CDAs
        all, the refusal names the file it is about.
        """
        good = Path("good.xml").absolute()
        good.write_bytes(sample_cda(self.card.professional))
        bad = Path("no-confidentiality.xml").absolute()
        data = sample_cda(self.card.professional)
        start = data.index(b"<confidentialityCode")
        end = data.index(b"/>", start) + 2
        bad.write_bytes(data[:start] + data[end:])
        context = Path("context.json").absolute()
        context.write_text(json.dumps(self.context))
        result = yield deferToThread(
            _submit,
            str(good),
            str(bad),
            "--agent-context",
            str(context),
            "--facade",
            self.facade_url,
        )
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn(f"cpsdmp submit: {bad}: 422 ", result.stderr)
        self.assertIn("confidentialityCode", result.stderr)
        self.assertNotIn(str(good), result.stderr)


class DmpRefusalTests(FacadeTestCase):
    @inlineCallbacks
    def test_refusal_names_file_once(self) -> Any:
        """
        When the DMP refuses a submission (the same document twice), the
        refusal names the file, and says the DMP's error once.
        """
        cda = Path("twice.xml").absolute()
        cda.write_bytes(sample_cda(self.card.professional))
        context = Path("context.json").absolute()
        context.write_text(json.dumps(self.context))
        argv = [str(cda), "--agent-context", str(context), "--facade", self.facade_url]
        first = yield deferToThread(_submit, *argv)
        self.assertEqual(first.returncode, 0, first.stderr)
        result = yield deferToThread(_submit, *argv)
        self.assertEqual(result.returncode, 1, result.stderr)
        lines = result.stderr.splitlines()
        self.assertEqual(
            lines[0], f"cpsdmp submit: {cda}: 422 The DMP refused the request"
        )
        self.assertEqual(len(lines), 2, result.stderr)
        self.assertRegex(
            lines[1],
            r"^  DMP Error XDSDuplicateUniqueIdInRegistry: a document with "
            r"uniqueId [0-9.]+ is already stored$",
        )


class ProblemLinesTests(SynchronousTestCase):
    def problem(self, **members: Any) -> Any:
        from cpsdmp.facade.client import PROBLEM_BASE, problem_error

        kind = members.pop("kind")
        return problem_error(
            members["status"], {"type": PROBLEM_BASE + kind, **members}
        )

    def test_detail_repeating_title(self) -> None:
        """
        A detail that begins with the title is said without the title, and
        a refusal of the whole submission names each file.
        """
        from cpsdmp.facade.cli import _problem_lines

        problem = self.problem(
            kind="dmp-refused",
            status=422,
            title="The DMP refused the request",
            detail="the DMP refused the request (partial success): no",
        )
        self.assertEqual(
            _problem_lines(problem, [Path("a.xml"), Path("b.xml")]),
            [
                "cpsdmp submit: a.xml, b.xml: 422 the DMP refused the request "
                "(partial success): no"
            ],
        )

    def test_title_and_detail(self) -> None:
        """
        A detail that says something else follows the title; a problem that
        stopped the whole submission, whatever its cause, names its files.
        """
        from cpsdmp.facade.cli import _problem_lines

        problem = self.problem(
            kind="agent-timeout",
            status=504,
            title="The agent did not answer in time",
            detail="after 30 s",
        )
        self.assertEqual(
            _problem_lines(problem, [Path("a.xml")]),
            ["cpsdmp submit: a.xml: 504 The agent did not answer in time: after 30 s"],
        )


class FormSubmissionTests(FacadeTestCase):
    @inlineCallbacks
    def test_document_sent_as_is(self) -> Any:
        """
        The documents go as the files of a form, as they are: a document
        whose base64 in JSON would be over the facade's limit on a body goes
        through, and the DMP keeps its exact bytes (CRLF line ends too),
        whatever its file's name.
        """
        from tests.test_facade import CDA_PATIENT

        data = sample_cda(self.card.professional, text="x" * 300_000)
        data = data.replace(b"><", b">\r\n<")
        limit = len(data) + 20_000
        self.assertGreater(len(data) * 4 // 3, limit)
        service = FacadeService(
            "tcp:0:interface=127.0.0.1",
            self.service.dmp.config,
            max_request_bytes=limit,
        )
        self.addCleanup(service.stopService)
        port = yield service.start()
        cda = Path('compte rendu \u00e9t\u00e9 "1".xml').absolute()
        cda.write_bytes(data)
        context = Path("context.json").absolute()
        context.write_text(json.dumps(self.context))
        result = yield deferToThread(
            _submit,
            str(cda),
            "--agent-context",
            str(context),
            "--facade",
            f"http://127.0.0.1:{port.getHost().port}",
            "--json",
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        unique_id = json.loads(result.stdout)["documents"][0]["uniqueId"]
        patient = {**CDA_PATIENT, "ins": DEFAULT_PATIENT.ins}
        kept = yield self.facade.td32_retrieve(unique_id, self.context, patient)
        self.assertEqual(kept, data)


class FacadeOverHttpsTests(FacadeTestCase):
    """
    A facade that serves HTTPS, with a certificate of the test PKI, which
    the system does not trust.
    """

    @inlineCallbacks
    def setUp(self) -> Any:
        yield super().setUp()
        service = FacadeService(
            "tcp:0:interface=127.0.0.1",
            self.service.dmp.config,
            self.card.sandbox_cert,
            self.card.sandbox_key,
        )
        self.addCleanup(service.stopService)
        port = yield service.start()
        self.https_url = f"https://127.0.0.1:{port.getHost().port}"
        self.cda = Path("https.xml").absolute()
        self.cda.write_bytes(sample_cda(self.card.professional))
        self.context_file = Path("context.json").absolute()
        self.context_file.write_text(json.dumps(self.context))

    @inlineCallbacks
    def test_untrusted_certificate(self) -> Any:
        """
        The facade's certificate is not trusted: said in words, with what
        to do, in one line, status 1.
        """
        result = yield deferToThread(
            _submit,
            str(self.cda),
            "--agent-context",
            str(self.context_file),
            "--facade",
            self.https_url,
        )
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(
            result.stderr,
            f"cpsdmp submit: the connection to the facade at {self.https_url} "
            "failed: the facade's TLS certificate is not trusted (its chain "
            "leads to no root this machine trusts): give the root it leads to "
            "with --facade-ca PEM\n",
        )

    @inlineCallbacks
    def test_other_facade_ca(self) -> Any:
        """
        With C{--facade-ca} naming another root, that is said.
        """
        other = Path("other-root.pem").absolute()
        other.write_bytes(Path(_other_card().ca_root).read_bytes())
        result = yield deferToThread(
            _submit,
            str(self.cda),
            "--agent-context",
            str(self.context_file),
            "--facade",
            self.https_url,
            "--facade-ca",
            str(other),
        )
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(
            result.stderr,
            f"cpsdmp submit: the connection to the facade at {self.https_url} "
            "failed: the facade's TLS certificate is not trusted (its chain "
            "leads to none of the roots of --facade-ca, or the facade does "
            "not send its intermediate certificates)\n",
        )

    @inlineCallbacks
    def test_name_not_in_certificate(self) -> Any:
        """
        A facade reached at an address its certificate does not name (the
        local DMP's certificate names 127.0.0.1, not 127.0.0.2): said so.
        """
        service = FacadeService(
            "tcp:0:interface=127.0.0.2",
            self.service.dmp.config,
            self.card.sandbox_cert,
            self.card.sandbox_key,
        )
        self.addCleanup(service.stopService)
        port = yield service.start()
        url = f"https://127.0.0.2:{port.getHost().port}"
        result = yield deferToThread(
            _submit,
            str(self.cda),
            "--agent-context",
            str(self.context_file),
            "--facade",
            url,
            "--facade-ca",
            self.card.ca_root,
        )
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(
            result.stderr,
            f"cpsdmp submit: the connection to the facade at {url} failed: the "
            "facade's TLS certificate does not name 127.0.0.2, the host of the "
            "URL: use a name or address it gives\n",
        )

    @inlineCallbacks
    def test_trusted_with_facade_ca(self) -> Any:
        """
        With C{--facade-ca} naming the root the facade's chain leads to,
        the submission goes through.
        """
        result = yield deferToThread(
            _submit,
            str(self.cda),
            "--agent-context",
            str(self.context_file),
            "--facade",
            self.https_url,
            "--facade-ca",
            self.card.ca_root,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("submitted (answered): submission set ", result.stdout)

    @inlineCallbacks
    def test_handshake_refused(self) -> Any:
        """
        An https:// URL whose server refuses the handshake (here the local
        DMP, which asks for a client certificate): the failure is said in
        words, OpenSSL's reason quoted as text.
        """
        result = yield deferToThread(
            _submit,
            str(self.cda),
            "--agent-context",
            str(self.context_file),
            "--facade",
            f"https://127.0.0.1:{self.sandbox_port}",
            "--facade-ca",
            self.card.ca_root,
        )
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertIn(
            "failed: the TLS handshake with the facade failed (OpenSSL: ",
            result.stderr,
        )
        self.assertNotIn("[(", result.stderr)


class FacadeCaArgumentTests(SynchronousTestCase):
    def test_facade_ca_unreadable(self) -> None:
        cda, context = _files()
        for path, expected in [
            (
                "/nonexistent.pem",
                "/nonexistent.pem: cannot read it (No such file or directory)",
            ),
            (str(cda), f"no PEM certificate in {cda}"),
        ]:
            result = _submit(
                str(cda), "--agent-context", str(context), "--facade-ca", path
            )
            self.assertEqual(result.returncode, 2, result.stderr)
            self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
            self.assertIn(f"argument --facade-ca: {expected}", result.stderr)

    def test_facade_ca_with_http(self) -> None:
        """
        Roots for a facade reached over http:// would be ignored: refused as
        a usage error, exit status 2.
        """
        cda, context = _files()
        root = Path("root.pem").absolute()
        root.write_bytes(Path(_other_card().ca_root).read_bytes())
        result = _submit(
            str(cda),
            "--agent-context",
            str(context),
            "--facade",
            "http://127.0.0.1:1",
            "--facade-ca",
            str(root),
        )
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertEqual(
            result.stderr,
            "cpsdmp submit: --facade-ca applies to an https:// facade only; "
            "http://127.0.0.1:1 is not one (see cpsdmp submit --help)\n",
        )


class ClassCodeOptionTests(SynchronousTestCase):
    def test_replaces_known_class(self) -> None:
        """
        C{--class-code} replaces the classCode the typeCode gives, and the
        help of submit and of metadata says so.
        """
        cda, _ = _files()
        metadata = [sys.executable, "-m", "cpsdmp.cli", "metadata", "--json"]
        env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
        derived = subprocess.run(
            [*metadata, str(cda)], capture_output=True, text=True, env=env
        )
        self.assertEqual(json.loads(derived.stdout)["classCode"]["code"], "10")
        given = subprocess.run(
            [*metadata, str(cda), "--class-code", "11"],
            capture_output=True,
            text=True,
            env=env,
        )
        self.assertEqual(json.loads(given.stdout)["classCode"]["code"], "11")
        for command in ["submit", "metadata"]:
            shown = subprocess.run(
                [sys.executable, "-m", "cpsdmp.cli", command, "--help"],
                capture_output=True,
                text=True,
                env=env,
            )
            self.assertIn(
                "in place of the one its typeCode gives", " ".join(shown.stdout.split())
            )


class ReadmeTests(SynchronousTestCase):
    def test_options_listed(self) -> None:
        """
        The README's paragraph on cpsdmp submit names each of its options.
        """
        from cpsdmp.cli import build_parser

        readme = (REPOSITORY / "README.md").read_text()
        paragraph = readme[readme.index("`cpsdmp submit CDA...") :].split("\n\n")[0]
        parser = build_parser()
        subparsers = next(a for a in parser._actions if a.dest == "command")
        submit = subparsers.choices["submit"]  # type: ignore[attr-defined]
        for action in submit._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    self.assertRegex(paragraph, rf"(?<![\w-]){option}(?![\w-])")
