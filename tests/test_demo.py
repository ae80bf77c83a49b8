"""
The README's demo command, run as a user runs it: a real agent process, a
real SoftHSM2 test card, real HTTPS on the loopback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import TestCase

import cpsdmp


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
        When the agent dies midway (killed while the demo waits out the pause
        after the wrong PIN), the demo says which step failed and why, shows
        the agent's log, and exits non-zero.
        """
        directory = Path("demo-broken").absolute()
        source = str(Path(cpsdmp.__file__).resolve().parent.parent)
        demo = subprocess.Popen(
            [sys.executable, "-m", "cpsdmp.cli", "demo", "--dir", str(directory)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": source},
        )
        self.addCleanup(demo.kill)
        assert demo.stdout is not None
        seen = []
        for line in demo.stdout:
            seen.append(line)
            if "next PIN held back" in line:
                self.assertTrue(_kill_agent_of(directory / "card"))
                break
        out, err = demo.communicate(timeout=120)
        out = "".join(seen) + out
        self.assertEqual(demo.returncode, 1, out + err)
        self.assertIn("DEMO FAILED: card session opened:", err)
        self.assertIn("agent", err.split("DEMO FAILED")[1].splitlines()[0])
        self.assertIn("last lines of the agent's log", err)
        self.assertNotIn("Demo passed", out)


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
