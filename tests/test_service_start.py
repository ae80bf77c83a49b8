"""
How C{twist dmpfacade} and C{twist dmpsandbox} start, or refuse to, run as a
user runs them: a real C{twist} process, real files and real ports. A bad
option is one usage line naming it (and the file), before anything starts;
a start that fails is one line and a non-zero exit status, never a process
left running without serving.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from functools import cache
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from cpsdmp.agent.testcard import TestCard, init_testcard

REPOSITORY = Path(__file__).resolve().parents[1]

# twist's exit status for a usage error (EX_USAGE).
EX_USAGE = 64


@cache
def _card() -> TestCard:
    return init_testcard(Path("service-start-card").absolute(), softhsm=False)


def _twist(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """
    Run C{twist --log-format text ARGV} to its end.
    """
    return subprocess.run(
        [sys.executable, "-m", "twisted", "--log-format", "text", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
        cwd=Path(".").absolute(),
    )


def _busy_port(case: SynchronousTestCase) -> int:
    """
    @return: a loopback port this test listens on.
    """
    busy = socket.socket()
    case.addCleanup(busy.close)
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    return int(busy.getsockname()[1])


# A port of its own unless the test gives --listen (the last one counts).
_ANY_PORT = ["--listen", "tcp:0:interface=127.0.0.1"]


def _facade(*argv: str) -> list[str]:
    return ["dmpfacade", "--testcard", _card().directory, *_ANY_PORT, *argv]


def _sandbox(*argv: str) -> list[str]:
    return ["dmpsandbox", "--testcard", _card().directory, *_ANY_PORT, *argv]


class StartFailureTests(SynchronousTestCase):
    """
    A service that cannot listen or open its database says so in one line
    and exits with status 1.
    """

    def assert_one_line_failure(
        self, result: subprocess.CompletedProcess[str], expected: str
    ) -> None:
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 1, output)
        self.assertNotIn("Traceback", output)
        (line,) = [line for line in output.splitlines() if expected in line]
        self.assertIn("#error]", line)

    def test_facade_port_in_use(self) -> None:
        port = _busy_port(self)
        result = _twist(*_facade("--listen", f"tcp:{port}:interface=127.0.0.1"))
        self.assert_one_line_failure(
            result,
            f"dmpfacade cannot listen on tcp:{port}:interface=127.0.0.1: "
            "Address already in use",
        )

    def test_facade_port_out_of_range(self) -> None:
        result = _twist(*_facade("--listen", "tcp:99999"))
        self.assert_one_line_failure(result, "dmpfacade cannot listen on tcp:99999: ")

    def test_sandbox_port_in_use(self) -> None:
        port = _busy_port(self)
        result = _twist(
            *_sandbox(
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
                "--db",
                str(Path("busy.sqlite").absolute()),
            )
        )
        self.assert_one_line_failure(
            result,
            f"dmpsandbox cannot listen on tcp:{port}:interface=127.0.0.1: "
            "Address already in use",
        )

    def test_sandbox_database_locked(self) -> None:
        """
        A database that passes the checks at start but cannot be opened
        then (another process holds it locked) stops the sandbox, said in
        one line.
        """
        path = Path("locked.sqlite").absolute()
        holder = sqlite3.connect(path, isolation_level=None)
        self.addCleanup(holder.close)
        holder.execute("CREATE TABLE t (x)")
        holder.execute("BEGIN EXCLUSIVE")
        result = _twist(*_sandbox("--listen", "tcp:0", "--db", str(path)))
        self.assert_one_line_failure(
            result, f"dmpsandbox cannot open the database {path}: database is locked"
        )


class UsageTests(SynchronousTestCase):
    """
    Each option naming a file is checked before start; a bad value is one
    usage line naming the option and the file, with twist's usage status.
    """

    def assert_usage_error(
        self, result: subprocess.CompletedProcess[str], expected: str
    ) -> None:
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, EX_USAGE, output)
        self.assertNotIn("Traceback", output)
        self.assertIn(f"Error: {expected}\n", output)

    def test_sandbox_database_folder_missing(self) -> None:
        result = _twist(*_sandbox("--db", "/nonexistent/dir/x.sqlite"))
        self.assert_usage_error(
            result,
            "--db /nonexistent/dir/x.sqlite: its folder /nonexistent/dir does not "
            "exist",
        )

    def test_sandbox_database_not_sqlite(self) -> None:
        path = Path("passwd").absolute()
        path.write_text("root:x:0:0:root:/root:/bin/bash\n")
        result = _twist(*_sandbox("--db", str(path)))
        self.assert_usage_error(
            result, f"--db {path}: not an SQLite database (file is not a database)"
        )
        self.assertEqual(path.read_text(), "root:x:0:0:root:/root:/bin/bash\n")

    def test_sandbox_database_folder(self) -> None:
        result = _twist(*_sandbox("--db", str(REPOSITORY)))
        self.assert_usage_error(result, f"--db {REPOSITORY}: a folder, not a file")

    def test_sandbox_client_ca_missing(self) -> None:
        result = _twist(*_sandbox("--client-ca", "/nonexistent"))
        self.assert_usage_error(
            result,
            "--client-ca /nonexistent: cannot read it (No such file or directory)",
        )

    def test_sandbox_key_not_a_key(self) -> None:
        card = _card()
        result = _twist(*_sandbox("--key", card.ca_root))
        self.assert_usage_error(
            result, f"--key {card.ca_root}: not an unencrypted PEM private key"
        )

    def test_sandbox_cert_not_a_certificate(self) -> None:
        card = _card()
        result = _twist(*_sandbox("--cert", card.sandbox_key))
        self.assert_usage_error(
            result, f"--cert {card.sandbox_key}: not a PEM certificate file"
        )

    def test_facade_tls_key_not_a_key(self) -> None:
        card = _card()
        result = _twist(
            *_facade("--tls-cert", card.sandbox_cert, "--tls-key", card.ca_root)
        )
        self.assert_usage_error(
            result, f"--tls-key {card.ca_root}: not an unencrypted PEM private key"
        )

    def test_facade_tls_key_of_another_certificate(self) -> None:
        card = _card()
        result = _twist(
            *_facade("--tls-cert", card.ca_root, "--tls-key", card.sandbox_key)
        )
        self.assert_usage_error(
            result,
            f"--tls-key {card.sandbox_key} does not match the first certificate "
            f"of --tls-cert {card.ca_root}",
        )

    def test_facade_dmp_ca_missing(self) -> None:
        result = _twist(*_facade("--dmp-ca", "/nonexistent.pem"))
        self.assert_usage_error(
            result,
            "--dmp-ca /nonexistent.pem: cannot read it (No such file or directory)",
        )

    def test_bad_listen(self) -> None:
        for command in (_facade, _sandbox):
            result = _twist(*command("--listen", "bogus:1"))
            output = result.stdout + result.stderr
            self.assertEqual(result.returncode, EX_USAGE, output)
            self.assertNotIn("Traceback", output)
            self.assertIn("Error: --listen bogus:1: not a server endpoint", output)
