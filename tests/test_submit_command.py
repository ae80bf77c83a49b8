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

from cpsdmp.agent.testcard import init_testcard
from cpsdmp.xds.sample import sample_cda
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

    def test_file_missing(self) -> None:
        _, context = _files()
        result = _submit("/nonexistent.xml", "--agent-context", str(context))
        self.assert_bad_argument(
            result, "cpsdmp submit: /nonexistent.xml: No such file or directory"
        )

    def test_agent_context_not_one(self) -> None:
        cda, _ = _files()
        for content, expected in [
            ("{not json", "is not JSON"),
            ('["url"]', "is not an agent context"),
            ('{"url": "https://x"}', "lacks token, tlsFingerprint"),
        ]:
            context = Path("bad-context.json").absolute()
            context.write_text(content)
            result = _submit(str(cda), "--agent-context", str(context))
            self.assert_bad_argument(result, f"the agent context {context} ")
            self.assertIn(expected, result.stderr)


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
