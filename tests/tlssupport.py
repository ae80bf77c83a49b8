"""
Test support for the TLS client: a throwaway PKI made with C{cryptography}
(roots, an intermediate, RSA and ECDSA server leaves for 127.0.0.1 and
localhost, an expired one, one without subjectAltName, a client CA and client
identities), written to a
temporary directory; C{openssl s_server} subprocesses on free ports; and an
application protocol that records what it receives.
"""

from __future__ import annotations

import atexit
import datetime
import ipaddress
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from cpsdmp.protocols.tls.interfaces import IRemoteKey
from cpsdmp.protocols.tls.localkey import LocalKey

Key = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
_NOW = datetime.datetime.now(datetime.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cpsdmp tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _issue(
    subject_key: Key,
    cn: str,
    issuer_key: Key | None = None,
    issuer: x509.Certificate | None = None,
    ca: bool = False,
    names: Sequence[str] = (),
    client: bool = False,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> x509.Certificate:
    public = subject_key.public_key()
    signer = issuer_key if issuer_key is not None else subject_key
    issuer_name = issuer.subject if issuer is not None else _name(cn)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or _NOW - datetime.timedelta(days=1))
        .not_valid_after(not_after or _NOW + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
            critical=False,
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=isinstance(subject_key, rsa.RSAPrivateKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        ).add_extension(
            x509.ExtendedKeyUsage(
                [
                    ExtendedKeyUsageOID.CLIENT_AUTH
                    if client
                    else ExtendedKeyUsageOID.SERVER_AUTH
                ]
            ),
            critical=False,
        )
    if names:
        general: list[x509.GeneralName] = []
        for n in names:
            try:
                general.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                general.append(x509.DNSName(n))
        builder = builder.add_extension(
            x509.SubjectAlternativeName(general), critical=False
        )
    return builder.sign(signer, hashes.SHA256())


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


@dataclass
class Identity:
    """
    A key, its chain (leaf first) and their PEM files.
    """

    key: Key
    chain: list[x509.Certificate]
    key_file: str
    cert_file: str
    chain_file: str

    def local_key(self, schemes: Sequence[object] | None = None) -> LocalKey:
        return LocalKey(self.key, self.chain, schemes)  # type: ignore[arg-type]


@dataclass
class PKI:
    directory: str
    root: x509.Certificate
    root_file: str
    other_root: x509.Certificate
    client_root: x509.Certificate
    client_root_file: str
    identities: dict[str, Identity] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Identity:
        return self.identities[name]


def _write(directory: str, name: str, data: bytes) -> str:
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _identity(
    directory: str, name: str, key: Key, chain: list[x509.Certificate]
) -> Identity:
    key_file = _write(
        directory,
        f"{name}.key",
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    cert_file = _write(directory, f"{name}.pem", _pem(chain[0]))
    chain_file = _write(
        directory, f"{name}-chain.pem", b"".join(_pem(c) for c in chain[1:])
    )
    return Identity(key, chain, key_file, cert_file, chain_file)


_pki: PKI | None = None


def pki() -> PKI:
    """
    @return: the test PKI, made once per test run.
    """
    global _pki
    if _pki is not None:
        return _pki
    directory = tempfile.mkdtemp(prefix="cpsdmp-tls-")
    atexit.register(shutil.rmtree, directory, True)

    root_key = _rsa()
    root = _issue(root_key, "cpsdmp test root", ca=True)
    inter_key = _rsa()
    inter = _issue(inter_key, "cpsdmp test intermediate", root_key, root, ca=True)
    other_key = _rsa()
    other_root = _issue(other_key, "cpsdmp untrusted root", ca=True)
    client_root_key = _rsa()
    client_root = _issue(client_root_key, "cpsdmp test client CA", ca=True)

    names = ["localhost", "127.0.0.1"]
    result = PKI(
        directory,
        root,
        _write(directory, "root.pem", _pem(root)),
        other_root,
        client_root,
        _write(directory, "client-root.pem", _pem(client_root)),
    )
    server_rsa = _rsa()
    server_ec = ec.generate_private_key(ec.SECP256R1())
    wrong_key = _rsa()
    expired_key = _rsa()
    untrusted_key = _rsa()
    no_san_key = _rsa()
    client_key = _rsa()
    client_ec = ec.generate_private_key(ec.SECP256R1())
    stranger_key = _rsa()
    stranger_root_key = _rsa()
    stranger_root = _issue(stranger_root_key, "cpsdmp stranger CA", ca=True)
    for name, key, chain in [
        (
            "server-rsa",
            server_rsa,
            [_issue(server_rsa, "localhost", inter_key, inter, names=names), inter],
        ),
        (
            "server-ec",
            server_ec,
            [_issue(server_ec, "localhost", inter_key, inter, names=names), inter],
        ),
        (
            "server-wrong-name",
            wrong_key,
            [
                _issue(
                    wrong_key,
                    "elsewhere",
                    inter_key,
                    inter,
                    names=["elsewhere.example"],
                ),
                inter,
            ],
        ),
        (
            "server-expired",
            expired_key,
            [
                _issue(
                    expired_key,
                    "localhost",
                    inter_key,
                    inter,
                    names=names,
                    not_before=_NOW - datetime.timedelta(days=60),
                    not_after=_NOW - datetime.timedelta(days=30),
                ),
                inter,
            ],
        ),
        (
            # The name only in the subject's CN, which RFC 9525 no longer
            # accepts for a server.
            "server-no-san",
            no_san_key,
            [_issue(no_san_key, "localhost", inter_key, inter), inter],
        ),
        (
            "server-untrusted",
            untrusted_key,
            [_issue(untrusted_key, "localhost", other_key, other_root, names=names)],
        ),
        (
            "client-rsa",
            client_key,
            [
                _issue(
                    client_key, "Dr Test CPS", client_root_key, client_root, client=True
                )
            ],
        ),
        (
            "client-ec",
            client_ec,
            [
                _issue(
                    client_ec, "Dr Test EC", client_root_key, client_root, client=True
                )
            ],
        ),
        (
            "client-stranger",
            stranger_key,
            [
                _issue(
                    stranger_key,
                    "Dr Stranger",
                    stranger_root_key,
                    stranger_root,
                    client=True,
                )
            ],
        ),
    ]:
        result.identities[name] = _identity(directory, name, key, chain)
    _pki = result
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class OpenSSLServer:
    """
    An C{openssl s_server} on a free loopback port, with its output in a
    file; L{stop} kills it (tests register it as a cleanup).
    """

    def __init__(
        self,
        args: Sequence[str],
        identity: str = "server-rsa",
        tls12_only: bool = True,
        ssl_options: str = "",
    ) -> None:
        p = pki()
        ident = p[identity]
        self.port = free_port()
        self.log_path = os.path.join(p.directory, f"s_server-{self.port}.log")
        self._log = open(self.log_path, "wb")
        command = [
            "openssl",
            "s_server",
            "-accept",
            f"127.0.0.1:{self.port}",
            "-key",
            ident.key_file,
            "-cert",
            ident.cert_file,
            "-ign_eof",
        ]
        if tls12_only:
            command.append("-tls1_2")
        if ident.chain[1:]:
            command += ["-cert_chain", ident.chain_file]
        self.quiet = "-quiet" in args
        env = None
        if ssl_options:
            # What s_server has no flag for (say, "-ExtendedMasterSecret"),
            # through OpenSSL's configuration of the default TLS context.
            config = os.path.join(p.directory, f"openssl-{self.port}.cnf")
            with open(config, "w") as f:
                f.write(
                    "openssl_conf = init\n[init]\nssl_conf = ssl\n"
                    "[ssl]\nsystem_default = defaults\n"
                    f"[defaults]\nOptions = {ssl_options}\n"
                )
            env = dict(os.environ, OPENSSL_CONF=config)
        self.process = subprocess.Popen(
            command + list(args),
            stdin=subprocess.PIPE,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "ACCEPT" in self.output():
                return
            if self.quiet and self._accepts():
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"openssl s_server exited: {self.output()}")
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"openssl s_server not ready after {timeout} s")

    def _accepts(self) -> bool:
        # -quiet hides the ACCEPT line: try a TCP connection instead.
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def output(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def command(self, line: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line)
        self.process.stdin.flush()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        if self.process.stdin is not None:
            self.process.stdin.close()
        self._log.close()


class Collector(Protocol):
    """
    Sends C{request} once connected and records what arrives until the
    connection is lost; C{done} fires then, C{reason} says why.
    """

    def __init__(self, request: bytes = b"") -> None:
        self.request = request
        self.received = bytearray()
        self.done: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self.connected_with: object = None
        self.on_data: Deferred[bytes] | None = None

    def connectionMade(self) -> None:
        self.connected_with = self.transport
        if self.request:
            self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.on_data is not None:
            d, self.on_data = self.on_data, None
            d.callback(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason
        self.done.callback(None)


class CollectorFactory(Factory):
    def __init__(self, request: bytes = b"") -> None:
        self.request = request
        self.protocols: list[Collector] = []

    def buildProtocol(self, addr: object) -> Collector:
        p = Collector(self.request)
        p.factory = self
        self.protocols.append(p)
        return p


@implementer(IRemoteKey)
class CountingKey:
    """
    Wraps an L{IRemoteKey} and counts the calls to it.
    """

    def __init__(self, key: IRemoteKey) -> None:
        self._key = key
        self.supported_signature_schemes = key.supported_signature_schemes
        self.chain_calls = 0
        self.sign_calls = 0

    def certificate_chain(self) -> Deferred[list[x509.Certificate]]:
        self.chain_calls += 1
        return self._key.certificate_chain()

    def sign(self, data: bytes, scheme: object) -> Deferred[bytes]:
        self.sign_calls += 1
        return self._key.sign(data, scheme)  # type: ignore[arg-type]


# SSL_OP_NO_EXTENDED_MASTER_SECRET in OpenSSL 3.0 (not exposed by pyOpenSSL)
SSL_OP_NO_EXTENDED_MASTER_SECRET = 0x00000001


@implementer(IOpenSSLContextFactory)
class ServerContext:
    """
    A pyOpenSSL server context for Twisted's C{listenSSL}: TLS 1.2 only,
    the client certificate required and checked against the test client CA
    unless C{client_auth} is false.
    """

    def __init__(
        self,
        identity: str = "server-rsa",
        client_auth: bool = True,
        extended_master_secret: bool = True,
        tickets: bool = True,
    ) -> None:
        from OpenSSL import SSL, crypto

        p = pki()
        ident = p[identity]
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
        ctx.use_privatekey(crypto.PKey.from_cryptography_key(ident.key))  # type: ignore[arg-type]
        ctx.use_certificate(crypto.X509.from_cryptography(ident.chain[0]))
        for extra in ident.chain[1:]:
            ctx.add_extra_chain_cert(crypto.X509.from_cryptography(extra))
        if client_auth:
            ctx.get_cert_store().add_cert(crypto.X509.from_cryptography(p.client_root))  # type: ignore[union-attr]
            ctx.set_verify(
                SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                lambda conn, cert, errno, depth, ok: bool(ok),
            )
            ctx.add_client_ca(crypto.X509.from_cryptography(p.client_root))
        if not extended_master_secret:
            ctx.set_options(SSL_OP_NO_EXTENDED_MASTER_SECRET)
        if not tickets:
            ctx.set_options(SSL.OP_NO_TICKET)
        ctx.set_session_id(b"cpsdmp-tests")
        self._context = ctx

    def getContext(self) -> object:
        return self._context
