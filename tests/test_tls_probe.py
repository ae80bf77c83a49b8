"""
C{cpsdmp probe} run as a command against C{openssl s_server}: its report,
its JSON, and its exit status when the handshake fails.
"""

from __future__ import annotations

import ast
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cpsdmp.protocols.tls.endpoint import TLSClientEndpoint, server_name
from cpsdmp.protocols.tls.handshake import TLSClientConfig
from tests.test_tls_interop import OpenSSLServerMixin
from tests.tlssupport import pki

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ProbeCommandTests(OpenSSLServerMixin, TestCase):
    timeout = 60

    def _probe(self, *args: str) -> Any:
        env = dict(os.environ, PYTHONPATH=_ROOT)
        d = getProcessOutputAndValue(
            sys.executable,
            ["-m", "cpsdmp.cli", "probe", *args],
            env=env,
            path=_ROOT,
            reactor=reactor,
        )
        d.addTimeout(45, reactor)
        return d

    def _key_args(self) -> list[str]:
        client = pki()["client-rsa"]
        return [
            "--ca",
            pki().root_file,
            "--key",
            client.key_file,
            "--cert",
            client.cert_file,
        ]

    @inlineCallbacks
    def test_report_and_reconnect(self) -> Any:
        """
        The text report names the protocol, suite, group, chain, client
        certificate, and says the second connection resumed.
        """
        server = self.start_server("-www", "-cipher", "ECDHE-RSA-CHACHA20-POLY1305")
        out, err, status = yield self._probe(
            f"https://localhost:{server.port}/", *self._key_args(), "--reconnect"
        )
        text = out.decode()
        self.assertEqual(status, 0, err.decode())
        self.assertIn("Protocol version: TLSv1.2", text)
        self.assertIn("Ciphersuite: ECDHE-RSA-CHACHA20-POLY1305", text)
        self.assertIn("Negotiated group: x25519", text)
        self.assertIn("Peer certificate: CN=localhost,O=cpsdmp tests", text)
        self.assertIn("issued by: CN=cpsdmp test intermediate", text)
        self.assertIn("Client certificate: CN=Dr Test CPS", text)
        self.assertIn("waiting for the CertificateVerify signature", text)
        self.assertIn("Second connection resumed: yes", text)

    @inlineCallbacks
    def test_json(self) -> Any:
        server = self.start_server("-www", "-groups", "P-384")
        out, err, status = yield self._probe(
            f"https://127.0.0.1:{server.port}", *self._key_args(), "--json"
        )
        self.assertEqual(status, 0, err.decode())
        data = json.loads(out)
        self.assertEqual(data["group"], "secp384r1")
        self.assertEqual(data["client_signature_scheme"], "rsa_pkcs1_sha256")
        self.assertFalse(data["resumed"])
        self.assertIn(
            "waiting for the CertificateVerify signature from the key holder",
            data["timings"],
        )
        self.assertEqual(
            data["verified_chain"][-1], "CN=cpsdmp test root,O=cpsdmp tests"
        )

    @inlineCallbacks
    def test_alpn_offered_said(self) -> Any:
        """
        With --alpn, the report says what was offered next to what the
        server chose, and that it chose none when it did not.
        """
        server = self.start_server("-www", "-alpn", "http/1.1")
        out, err, status = yield self._probe(
            f"https://localhost:{server.port}/",
            *self._key_args(),
            "--alpn",
            "h2",
            "--alpn",
            "http/1.1",
        )
        self.assertEqual(status, 0, err.decode())
        self.assertIn(
            "ALPN offered: h2, http/1.1\nALPN protocol: http/1.1\n", out.decode()
        )
        server = self.start_server("-www")
        out, err, status = yield self._probe(
            f"https://localhost:{server.port}/", *self._key_args(), "--alpn", "h2"
        )
        self.assertEqual(status, 0, err.decode())
        self.assertIn(
            "ALPN offered: h2\nALPN protocol: (none negotiated)\n", out.decode()
        )

    @inlineCallbacks
    def test_failure_status(self) -> Any:
        """
        An untrusted server: exit status 1 and the reason on stderr.
        """
        server = self.start_server("-www", identity="server-untrusted")
        out, err, status = yield self._probe(
            f"https://localhost:{server.port}/", *self._key_args()
        )
        self.assertEqual(status, 1)
        self.assertIn("CONNECTION FAILED", err.decode())
        self.assertIn("does not lead to a trusted root", err.decode())

    @inlineCallbacks
    def test_bad_arguments(self) -> Any:
        out, err, status = yield self._probe(
            "http://localhost/", "--ca", pki().root_file
        )
        self.assertEqual(status, 2)
        self.assertIn("not an https URL", err.decode())

    @inlineCallbacks
    def test_agent_context_not_one(self) -> Any:
        """
        An agent context file that is not one (here not JSON, or with a
        fingerprint that is not one; the reader probe shares with submit
        has its own tests) is said in one line naming the file, exit status
        2, as submit says it.
        """
        path = os.path.abspath(self.mktemp())
        good = {"url": "https://127.0.0.1:1", "token": "t" * 43}
        for content, expected in [
            ("{not json", "is not JSON"),
            (
                json.dumps({**good, "tlsFingerprint": "md5:00"}),
                "not a sha256:<hex> certificate fingerprint",
            ),
        ]:
            with open(path, "w") as f:
                f.write(content)
            out, err, status = yield self._probe(
                "https://localhost/", "--ca", pki().root_file, "--agent-context", path
            )
            self.assertEqual(status, 2, err.decode())
            self.assertEqual(len(err.decode().splitlines()), 1, err.decode())
            self.assertIn(f"cpsdmp probe: the agent context {path}", err.decode())
            self.assertIn(expected, err.decode())
        out, err, status = yield self._probe(
            "https://localhost/",
            "--ca",
            pki().root_file,
            "--agent-context",
            "/dev/zero",
        )
        self.assertEqual(status, 2, err.decode())
        self.assertEqual(
            err.decode(),
            "cpsdmp probe: the agent context /dev/zero is not a regular file\n",
        )

    @inlineCallbacks
    def test_alpn_names_checked(self) -> Any:
        """
        An ALPN name that no ClientHello can carry (empty, over 255 bytes)
        or that is not printable ASCII is a usage error, exit status 2,
        before any connection.
        """
        for name in ["", "h" * 256, "h2 x", "\u00e9t\u00e9"]:
            out, err, status = yield self._probe(
                "https://localhost:1/", *self._key_args(), "--alpn", name
            )
            self.assertEqual(status, 2, err.decode())
            self.assertIn("is not an ALPN protocol name", err.decode())
            self.assertNotIn("Traceback", err.decode())

    @inlineCallbacks
    def test_agent_context_and_local_key(self) -> Any:
        """
        The agent's card and a local key exclude each other: a usage error
        in one line, exit status 2, before the agent context is read.
        """
        out, err, status = yield self._probe(
            "https://localhost:1/",
            *self._key_args(),
            "--agent-context",
            "/nonexistent.json",
        )
        self.assertEqual(status, 2, err.decode())
        self.assertEqual(
            err.decode(),
            "cpsdmp probe: --agent-context and --key/--cert exclude each other: "
            "the client key is the agent's card or a local key, not both (see "
            "cpsdmp probe --help)\n",
        )
        out, err, status = yield self._probe(
            "https://localhost:1/", "--ca", pki().root_file, "--key", "/k.pem"
        )
        self.assertEqual(status, 2, err.decode())
        self.assertIn("cpsdmp probe: --key and --cert go together", err.decode())

    @inlineCallbacks
    def test_no_client_key(self) -> Any:
        """
        With neither the agent nor a local key, no client certificate is
        offered, as the help says: a server that requires one refuses.
        """
        out, err, status = yield self._probe("--help")
        self.assertIn(
            "With neither, no client certificate is offered",
            " ".join(out.decode().split()),
        )
        server = self.start_server("-www", "-Verify", "1")
        out, err, status = yield self._probe(
            f"https://localhost:{server.port}/", "--ca", pki().root_file
        )
        self.assertEqual(status, 1, out.decode())
        self.assertIn("CONNECTION FAILED", err.decode())

    @inlineCallbacks
    def test_files_not_pem(self) -> Any:
        """
        A file of roots, a certificate or a key that holds no PEM of its
        kind: one line naming it, exit status 2, nothing of the library's
        own text.
        """
        readme = os.path.join(_ROOT, "README.md")
        client = pki()["client-rsa"]
        for args, expected in [
            (
                ["--ca", readme],
                f"cpsdmp probe: argument --ca: no PEM certificate in {readme} "
                "(see cpsdmp probe --help)",
            ),
            (
                ["--ca", pki().root_file, "--key", client.key_file, "--cert", readme],
                f"cpsdmp probe: argument --cert: no PEM certificate in {readme} "
                "(see cpsdmp probe --help)",
            ),
            (
                ["--ca", pki().root_file, "--key", readme, "--cert", client.cert_file],
                f"cpsdmp probe: no PEM private key that can be read in {readme}",
            ),
        ]:
            out, err, status = yield self._probe("https://localhost:1/", *args)
            self.assertEqual(status, 2, err.decode())
            self.assertEqual(err.decode(), expected + "\n")

    @inlineCallbacks
    def test_bad_timeout(self) -> Any:
        """
        A timeout that is not a positive number of seconds is a bad argument:
        one line, exit status 2, before any connection.
        """
        for value in ["-1", "0", "nan"]:
            out, err, status = yield self._probe(
                "https://localhost:1/", *self._key_args(), "--timeout", value
            )
            self.assertEqual(status, 2, err.decode())
            self.assertEqual(
                err.decode(),
                f"cpsdmp probe: argument --timeout: {value!r} is not a positive "
                "number of seconds (see cpsdmp probe --help)\n",
            )

    @inlineCallbacks
    def test_missing_argument(self) -> Any:
        out, err, status = yield self._probe("https://localhost:1/")
        self.assertEqual(status, 2, err.decode())
        self.assertEqual(len(err.decode().splitlines()), 1, err.decode())
        self.assertIn("--ca", err.decode())

    @inlineCallbacks
    def test_connection_refused(self) -> Any:
        """
        Nothing listening: one line saying so, exit status 1.
        """
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out, err, status = yield self._probe(
            f"https://127.0.0.1:{port}/", *self._key_args()
        )
        self.assertEqual(status, 1, err.decode())
        self.assertEqual(len(err.decode().splitlines()), 1, err.decode())
        self.assertIn("CONNECTION FAILED", err.decode())
        self.assertIn("refused", err.decode())

    @inlineCallbacks
    def test_trailing_dot(self) -> Any:
        """
        A host name ending with the root's dot is the same name for the
        certificate check (and SNI).
        """
        server = self.start_server("-www")
        out, err, status = yield self._probe(
            f"https://localhost.:{server.port}/", *self._key_args()
        )
        self.assertEqual(status, 0, err.decode())
        self.assertIn("Protocol version: TLSv1.2", out.decode())


class ServerNameTests(SynchronousTestCase):
    """
    The name a TLS endpoint sends in SNI and checks the certificate against.
    """

    def test_names(self) -> None:
        for host, expected in [
            ("lps2.dmp.gouv.fr", "lps2.dmp.gouv.fr"),
            ("lps2.dmp.gouv.fr.", "lps2.dmp.gouv.fr"),
            ("hôpital.example", "xn--hpital-ixa.example"),
            ("hôpital.example.", "xn--hpital-ixa.example"),
            ("127.0.0.1", "127.0.0.1"),
            ("::1", "::1"),
        ]:
            self.assertEqual(server_name(host), expected, host)

    def test_bad_name(self) -> None:
        error = self.assertRaises(ValueError, server_name, "a\N{SNOWMAN}\u200d.example")
        self.assertIn("is not a valid host name", str(error))

    def test_endpoint_for_non_ascii_host(self) -> None:
        """
        An endpoint to a non-ASCII host name is made (it raised
        UnicodeEncodeError), with the ASCII form as the TLS name.
        """
        config = TLSClientConfig(roots=[pki().root])
        endpoint = TLSClientEndpoint.for_host(
            MemoryReactorClock(), "hôpital.example.", 443, config
        )
        self.assertEqual(endpoint.host, "xn--hpital-ixa.example")


class LayeringTests(SynchronousTestCase):
    def test_protocols_import_no_application(self) -> None:
        """
        The protocol modules import nothing of cpsdmp outside
        C{cpsdmp.protocols}, neither by an import statement nor by name
        through importlib.
        """
        protocols = Path(_ROOT, "cpsdmp", "protocols")
        found = []
        for path in sorted(protocols.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text("utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module or ""]
                elif isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                    names = [node.value]
                else:
                    continue
                found.extend(
                    f"{path.relative_to(_ROOT)}: {name}"
                    for name in names
                    if (name == "cpsdmp" or name.startswith("cpsdmp."))
                    and not name.startswith("cpsdmp.protocols")
                )
        self.assertEqual(found, [])
