"""
The scripts in benchmarks/ still run against the code as it is, with small
counts, and their own consistency checks hold. No figure is judged here:
speed is the benchmarks' business, not the tests'.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

import cpsdmp

ROOT = Path(cpsdmp.__file__).resolve().parent.parent


def _bench(name: str, *arguments: str) -> str:
    """
    Run one benchmark script with its own temporary folder, and check that it
    leaves nothing there: a test card left behind would hold its PIN and keys.
    """
    with tempfile.TemporaryDirectory() as scratch:
        result = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / name / "bench.py"), *arguments],
            capture_output=True,
            text=True,
            timeout=240,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": scratch},
        )
        left = sorted(p.name for p in Path(scratch).iterdir())
    if result.returncode != 0:
        raise AssertionError(
            f"benchmarks/{name}/bench.py exited with {result.returncode}:\n"
            + result.stdout[-3000:]
            + result.stderr[-3000:]
        )
    if left:
        raise AssertionError(f"benchmarks/{name}/bench.py left {left} behind")
    return result.stdout


def _json_documents(text: str) -> dict[str, Any]:
    """
    @return: the JSON objects printed one after the other in C{text}, merged.
    """
    decoder = json.JSONDecoder()
    merged: dict[str, Any] = {}
    position = 0
    while True:
        start = text.find("{", position)
        if start < 0:
            return merged
        document, position = decoder.raw_decode(text, start)
        merged.update(document)


class BenchmarkScriptTests(SynchronousTestCase):
    def test_agent(self) -> None:
        """
        The agent benchmark signs through the agent and directly, and
        measures the signing policy's check and its cost through the agent.
        """
        figures = json.loads(_bench("agent", "--count", "5", "--json"))
        for row in [
            "direct",
            "agent_sequential",
            "agent_instant_card",
            "agent_concurrent",
        ]:
            self.assertGreater(figures[row]["per_second"], 0, row)
        policy = figures["policy"]
        self.assertGreater(policy["transcript_bytes"], 1000)
        for row in ["check_warm", "check_cold", "agent_policy_on", "agent_policy_off"]:
            self.assertGreater(policy[row]["per_second"], 0, row)

    def test_tls(self) -> None:
        """
        The TLS benchmark measures our client and OpenSSL's side by side, for
        full and resumed handshakes and for throughput both ways.
        """
        figures = json.loads(
            _bench(
                "tls",
                "--handshakes",
                "3",
                "--megabytes",
                "1",
                "--repeat",
                "1",
                "--json",
            )
        )
        for row in ["full_handshakes", "resumed_handshakes"]:
            self.assertEqual(figures[row]["n"], 3)
            self.assertGreater(figures[row]["cpu_ratio"], 0)
        for row in [
            "AES-GCM_download",
            "AES-GCM_upload",
            "ChaCha20_download",
            "ChaCha20_upload",
        ]:
            self.assertGreater(figures[row]["throughput_ratio"], 0, row)

    def test_xds(self) -> None:
        """
        The XDS benchmark times every ANS example CDA and builds a large
        submission in each mode beside OpenSSL's floor, reading the document
        back to its exact bytes in the last.
        """
        figures = _json_documents(_bench("xds", "--size-mb", "2", "--rounds", "2"))
        self.assertEqual(len(figures["per_document"]), 6)
        for mode in ["nosign", "sign", "readback"]:
            large = figures[f"large_{mode}"]
            self.assertGreater(large["document"], 2 * 1024 * 1024)
            self.assertGreater(large["openssl_seconds"], 0)
        self.assertIsNotNone(figures["large_readback"]["read_seconds"])

    def test_e2e(self) -> None:
        """
        The end-to-end benchmark runs the chain and its own checks hold: the
        deployed facade made one handshake with the card (later ones
        reused or resumed), the one without reuse a handshake per exchange,
        and the agent signed exactly those handshakes.
        """
        output = Path(self.mktemp()).absolute()
        _bench(
            "e2e",
            "--latency",
            "3",
            "--total",
            "6",
            "--concurrency",
            "2",
            "--json",
            str(output),
        )
        figures = json.loads(output.read_text("utf-8"))
        deployed = figures["facade_log_connections"]
        self.assertEqual(deployed.get("new handshake"), 1, deployed)
        fresh = figures["facade_no_reuse_log_connections"]
        self.assertEqual(set(fresh), {"new handshake"}, fresh)
        self.assertEqual(
            figures["card_authentication_signatures"], 1 + fresh["new handshake"]
        )
