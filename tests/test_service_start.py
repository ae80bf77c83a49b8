"""
How C{twist dmpfacade} and C{twist dmpsandbox} start, or refuse to, run as a
user runs them: a real C{twist} process, real files and real ports. A bad
option is one usage line naming it (and the file), before anything starts;
a start that fails is one line and a non-zero exit status, never a process
left running without serving.
"""

from __future__ import annotations

import os
import queue
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from functools import cache
from pathlib import Path
from typing import IO

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


def _agent(*argv: str) -> list[str]:
    return ["cpsagent", "--testcard", _card().directory, *_ANY_PORT, *argv]


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
            result, f"--cert {card.sandbox_key}: not a PEM certificate chain"
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
            f"--tls-key {card.sandbox_key} does not match the certificate in "
            f"--tls-cert {card.ca_root}",
        )

    def test_facade_dmp_ca_missing(self) -> None:
        result = _twist(*_facade("--dmp-ca", "/nonexistent.pem"))
        self.assert_usage_error(
            result,
            "--dmp-ca /nonexistent.pem: cannot read it (No such file or directory)",
        )

    def test_facade_bad_dmp_url(self) -> None:
        result = _twist(*_facade("--dmp-url", "ftp://x"))
        self.assert_usage_error(
            result,
            "--dmp-url ftp://x: the DMP's services are reached over HTTPS: give "
            "an https:// URL",
        )

    def test_typed_options_named(self) -> None:
        """
        A value of the wrong type names its option and the form expected,
        in twist's usage line.
        """
        for argv, expected in [
            (
                _facade("--agent-timeout", "abc"),
                "--agent-timeout abc: not a number of seconds above 0, such as "
                "30 or 2.5",
            ),
            (
                _facade("--max-request-bytes", "1e3"),
                "--max-request-bytes 1e3: not a whole number of bytes above 0, "
                "such as 67108864 (64 MiB)",
            ),
            (
                _sandbox("--max-request-bytes", "1e3"),
                "--max-request-bytes 1e3: not a whole number of bytes above 0, "
                "such as 67108864 (64 MiB)",
            ),
        ]:
            self.assert_usage_error(_twist(*argv), expected)

    def test_bad_listen(self) -> None:
        for command in (_facade, _sandbox):
            result = _twist(*command("--listen", "bogus:1"))
            output = result.stdout + result.stderr
            self.assertEqual(result.returncode, EX_USAGE, output)
            self.assertNotIn("Traceback", output)
            self.assertIn("Error: --listen bogus:1: not a server endpoint", output)

    def test_listen_port_out_of_range(self) -> None:
        """
        A --listen port outside 0 to 65535 is a usage error of each
        service, before it starts, not a failure to listen once it runs.
        """
        for command in (_facade, _sandbox, _agent):
            for listen in ("tcp:99999", "tcp6:port=70000:interface=\\:\\:1"):
                result = _twist(*command("--listen", listen))
                output = result.stdout + result.stderr
                self.assertEqual(result.returncode, EX_USAGE, output)
                self.assertNotIn("Starting reactor", output)
                self.assertRegex(
                    output,
                    rf"Error: --listen {re.escape(listen)}: port \d+ is not from "
                    "0 to 65535",
                )

    def test_listen_not_tcp(self) -> None:
        """
        A --listen that is not a TCP endpoint (a UNIX socket, whose callers
        have no address; TLS, which each service does itself) is a usage
        error of each service, before it starts.
        """
        card = _card()
        tls = f"ssl:0:privateKey={card.sandbox_key}:certKey={card.sandbox_cert}"
        for command in (_facade, _sandbox, _agent):
            for listen in ("unix:/tmp/cpsdmp-no-such-folder/socket", tls):
                result = _twist(*command("--listen", listen))
                output = result.stdout + result.stderr
                self.assertEqual(result.returncode, EX_USAGE, output)
                self.assertNotIn("Starting reactor", output)
                self.assertIn(
                    f"Error: --listen {listen}: not a TCP endpoint (tcp: or tcp6:)",
                    output,
                )


def _read_lines(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


class StartWarningTests(SynchronousTestCase):
    """
    What the facade warns of at start, said before it serves.
    """

    def facade_output(self, listen: str, *argv: str) -> str:
        """
        @return: what C{twist dmpfacade --listen LISTEN ARGV} logs up to its
            end, stopped once it has said where it listens and its reactor
            is starting: the warnings, if any, are logged before.
        """
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "twisted",
                "--log-format",
                "text",
                *_facade("--listen", listen, *argv),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
        )
        self.addCleanup(process.wait, 30)
        self.addCleanup(process.terminate)
        assert process.stdout is not None
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(
            target=_read_lines, args=(process.stdout, lines), daemon=True
        ).start()
        seen: list[str] = []
        deadline = time.monotonic() + 60
        while not all(
            any(expected in line for line in seen)
            for expected in ("DMP facade on http", "Starting reactor")
        ):
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            self.assertIsNotNone(line, "".join(seen))
            assert line is not None
            seen.append(line)
        # The lines up to now are all it logged at start, in order: a SIGTERM
        # sent at once may cut what follows, never these.
        process.terminate()
        while (line := lines.get(timeout=30)) is not None:
            seen.append(line)
        return "".join(seen)

    def test_all_interfaces_warned(self) -> None:
        """
        A facade serving plain HTTP beyond the loopback says loudly that
        agent contexts and documents then cross the network in clear.
        """
        output = self.facade_output("tcp:0")
        self.assertRegex(
            output,
            r"#warn\] the DMP facade serves plain HTTP on 0\.0\.0\.0:\d+, beyond "
            r"the loopback",
        )

    def test_loopback_not_warned(self) -> None:
        output = self.facade_output("tcp:0:interface=127.0.0.1")
        self.assertNotIn("plain HTTP", output)
        self.assertTrue(re.search(r"DMP facade on http://127\.0\.0\.1:\d+", output))
        self.assertNotIn("--agent-network", output)

    def test_public_agent_network_warned(self) -> None:
        """
        An --agent-network that holds public addresses is said loudly at
        start: the facade connects to agents anywhere in it.
        """
        output = self.facade_output(
            "tcp:0:interface=127.0.0.1",
            "--agent-network",
            "0.0.0.0/0",
            "--agent-network",
            "::/0",
            "--agent-network",
            "10.20.0.0/16",
            "--agent-network",
            "192.168.0.0/15",
        )
        for network in ["0.0.0.0/0", "::/0", "192.168.0.0/15"]:
            self.assertIn(
                f"#warn] --agent-network {network} holds public addresses: the "
                "facade connects to an agent anywhere in it, wherever an agent "
                "context's URL leads",
                output,
            )
        self.assertNotIn("--agent-network 10.20.0.0/16", output)

    def test_private_agent_networks_not_warned(self) -> None:
        output = self.facade_output(
            "tcp:0:interface=127.0.0.1",
            *[
                argument
                for network in [
                    "10.0.0.0/8",
                    "172.16.0.0/12",
                    "192.168.1.0/24",
                    "100.64.0.0/10",
                    "169.254.0.0/16",
                    "127.0.0.0/8",
                    "fd00::/8",
                    "fe80::/10",
                    "::1/128",
                ]
                for argument in ("--agent-network", network)
            ],
        )
        self.assertIn("DMP facade on http", output)
        self.assertNotIn("--agent-network", output)


class FacadeOptionsTests(SynchronousTestCase):
    """
    The facade refuses at start what would make every request fail later.
    """

    def refused(self, *argv: str) -> str:
        from twisted.python.usage import UsageError

        from cpsdmp.facade.tap import Options

        error = self.assertRaises(
            UsageError,
            Options().parseOptions,
            ["--testcard", _card().directory, *argv],
        )
        return str(error)

    def test_dmp_url(self) -> None:
        for url in [
            "ftp://x",
            "notaurl",
            "http://127.0.0.1:18998/si-dmp-server/v2/services",
            "https://",
            "https://127.0.0.1:99999/services",
            "https://127.0.0.1:port/services",
        ]:
            message = self.refused("--dmp-url", url)
            self.assertTrue(message.startswith(f"--dmp-url {url}: "), message)

    def test_dmp_url_accepted(self) -> None:
        from cpsdmp.facade.tap import PRODUCTION_URL, Options

        options = Options()
        options.parseOptions(
            ["--testcard", _card().directory, "--dmp-url", PRODUCTION_URL]
        )
        self.assertEqual(options["dmp-url"], PRODUCTION_URL)

    def test_max_request_bytes(self) -> None:
        for value in ["-1", "0", "1e3", "1.5", "abc", "64MiB"]:
            self.assertEqual(
                self.refused("--max-request-bytes", value),
                f"--max-request-bytes {value}: not a whole number of bytes above "
                "0, such as 67108864 (64 MiB)",
            )

    def test_source_oid(self) -> None:
        for value in ["notanoid", "1", "1.2.", "1..2", "3.1.2", "1.02"]:
            self.assertEqual(
                self.refused("--source-oid", value),
                f"--source-oid {value}: not an OID (digits separated by dots, "
                "such as 1.2.250.1.999.1.1.1)",
            )

    def test_timeouts(self) -> None:
        for name in ["agent-timeout", "handshake-timeout", "dmp-timeout"]:
            for value in ["-1", "0", "nan", "inf", "abc", "30s"]:
                self.assertEqual(
                    self.refused(f"--{name}", value),
                    f"--{name} {value}: not a number of seconds above 0, such "
                    "as 30 or 2.5",
                )

    def test_coded_values(self) -> None:
        for name in ["activity-sector", "practice-setting", "content-type"]:
            for value in ["", ":display only"]:
                self.assertEqual(
                    self.refused(f"--{name}", value),
                    f"--{name} {value}: no code; give CODE or CODE:display",
                )

    def test_numbers_accepted(self) -> None:
        from cpsdmp.facade.tap import Options

        options = Options()
        options.parseOptions(
            [
                "--testcard",
                _card().directory,
                "--agent-timeout",
                "2.5",
                "--dmp-timeout",
                "90",
                "--max-request-bytes",
                "1000",
            ]
        )
        self.assertEqual(options["agent-timeout"], 2.5)
        self.assertEqual(options["dmp-timeout"], 90.0)
        self.assertEqual(options["handshake-timeout"], 60.0)
        self.assertEqual(options["max-request-bytes"], 1000)


class SandboxOptionsTests(SynchronousTestCase):
    def test_max_request_bytes(self) -> None:
        from twisted.python.usage import UsageError

        from cpsdmp.sandbox.tap import Options

        for value in ["-1", "0", "1e3", "abc"]:
            error = self.assertRaises(
                UsageError,
                Options().parseOptions,
                ["--testcard", _card().directory, "--max-request-bytes", value],
            )
            self.assertEqual(
                str(error),
                f"--max-request-bytes {value}: not a whole number of bytes above "
                "0, such as 67108864 (64 MiB)",
            )


class HelpTests(SynchronousTestCase):
    def test_no_empty_defaults(self) -> None:
        """
        The help shows no "[default: ]" for an option without a default.
        """
        from cpsdmp.facade.tap import Options as FacadeOptions
        from cpsdmp.sandbox.tap import Options as SandboxOptions

        for options in (FacadeOptions(), SandboxOptions()):
            text = " ".join(str(options).split())
            self.assertNotIn("[default: ]", text)


class NumberOptionTests(SynchronousTestCase):
    """
    The coerce function of numeric options, for every service's options.
    """

    def test_bounds(self) -> None:
        from twisted.python.usage import UsageError

        from cpsdmp.tapsupport import number_option

        pause = number_option(
            "wrong-pin-pause",
            "seconds",
            "5",
            minimum=0,
            minimum_allowed=True,
            maximum=3600,
        )
        self.assertEqual(pause("0"), 0.0)
        self.assertEqual(pause("3600"), 3600.0)
        for value in ["-1", "3600.5", "nan", "", "five"]:
            error = self.assertRaises(UsageError, pause, value)
            self.assertEqual(
                str(error),
                f"--wrong-pin-pause {value}: not a number of seconds from 0 to "
                "3600, such as 5",
            )
        count = number_option("tries", "tries", "3", whole=True, maximum=10)
        self.assertEqual(count("10"), 10)
        self.assertIsInstance(count("10"), int)
        error = self.assertRaises(UsageError, count, "2.0")
        self.assertEqual(
            str(error),
            "--tries 2.0: not a whole number of tries above 0 and at most 10, "
            "such as 3",
        )


class ReadmeTests(SynchronousTestCase):
    def test_defaults_said(self) -> None:
        """
        The README names each option of twist dmpfacade and dmpsandbox, and
        the default size of a request they take.
        """
        from cpsdmp.facade.tap import Options as FacadeOptions
        from cpsdmp.sandbox.tap import Options as SandboxOptions

        readme = (REPOSITORY / "README.md").read_text()
        for options, title in [
            (FacadeOptions, "## The facade"),
            (SandboxOptions, "## The local DMP"),
        ]:
            section = readme.split(title)[1].split("\n## ")[0]
            names = [p[0] for p in options.optParameters]
            names += [f[0] for f in getattr(options, "optFlags", [])]
            names += [
                name[4:].replace("_", "-")
                for name in dir(options)
                if name.startswith("opt_") and name not in ("opt_help", "opt_version")
            ]
            for name in names:
                if name == "no-connection-reuse":
                    # For benchmarks only: the README says so there.
                    self.assertIn(f"`--{name}`", readme)
                    continue
                self.assertIn(f"`--{name}", section, f"{title}: --{name}")
            self.assertRegex(section, r"`--max-request-bytes`[^.]*64 MiB")
