"""
The README's demo command, run as a user runs it: a real agent process, a
real SoftHSM2 test card, real HTTPS on the loopback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import TestCase

import cpsdmp
from cpsdmp.agent.testcard import init_testcard


def _run_demo(*arguments: str) -> subprocess.CompletedProcess[str]:
    source = str(Path(cpsdmp.__file__).resolve().parent.parent)
    return subprocess.run(
        [sys.executable, "-m", "cpsdmp.cli", "demo", *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": source},
    )


class DemoTests(TestCase):
    def test_demo_passes(self) -> None:
        """
        The demo opens a session with the test PIN after refusing a wrong
        one, has the card sign with each algorithm, verifies each signature,
        locks the session, stops the agent and says it passed.
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
            "SHA256WithRSA signature",
            "SHA384WithRSA signature",
            "SHA512WithRSA signature",
            "SHA1WithRSA signature",
            "the token is refused afterwards",
            "  agent stopped\n",
            "Demo passed",
        ]:
            self.assertIn(expected, out)
        self.assertTrue((directory / "card" / "testcard.json").exists())
        self.assertNotIn("1234", (directory / "agent.log").read_text())

    def test_demo_fails_loudly(self) -> None:
        """
        When the card cannot be reached (the test card names a file that is
        no PKCS#11 module), the demo says which step failed, shows the
        agent's log, stops the agent and exits non-zero.
        """
        directory = Path("demo-broken").absolute()
        card = init_testcard(directory / "card")
        description = json.loads(Path(card.directory, "testcard.json").read_text())
        description["pkcs11_module"] = "/bin/true"
        Path(card.directory, "testcard.json").write_text(json.dumps(description))
        result = _run_demo("--dir", str(directory))
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("DEMO FAILED", result.stderr)
        self.assertIn("last lines of the agent's log", result.stderr)
        self.assertIn("agent stopped", result.stdout)
        self.assertNotIn("Demo passed", result.stdout)
