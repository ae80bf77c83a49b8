"""
How the cpsdmp TLS client compares with OpenSSL's (through pyOpenSSL) as a
client of the same local C{openssl s_server} requiring a client certificate,
with a local RSA key: full and resumed handshakes per second and CPU per
handshake, and application-data throughput both ways for AES-GCM and
ChaCha20-Poly1305. Run from the checkout's root:

    python benchmarks/tls/bench.py [--handshakes N] [--megabytes M] [--repeat R]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(__file__))))

from OpenSSL import SSL, crypto  # noqa: E402
from OpenSSL.SSL import _lib  # noqa: E402
from twisted.internet import reactor  # noqa: E402
from twisted.internet.defer import Deferred, inlineCallbacks  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint  # noqa: E402
from twisted.internet.interfaces import IPullProducer  # noqa: E402
from twisted.internet.protocol import Factory, Protocol  # noqa: E402
from zope.interface import implementer  # noqa: E402

from cpsdmp.protocols.tls.endpoint import TLSClientEndpoint  # noqa: E402
from cpsdmp.protocols.tls.handshake import TLSClientConfig  # noqa: E402
from cpsdmp.protocols.tls.session import SessionCache  # noqa: E402
from cpsdmp.protocols.tls.suites import SUITES_BY_NAME  # noqa: E402
from tests.tlssupport import OpenSSLServer, pki  # noqa: E402

SUITES = {
    "AES-GCM": "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "ChaCha20": "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
}


class Measure:
    """
    Wall and CPU (this process) time of a block.
    """

    def __enter__(self) -> Measure:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0


# -- the reference: OpenSSL as the client, blocking sockets


def openssl_context(suite: str) -> SSL.Context:
    p = pki()
    client = p["client-rsa"]
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_cipher_list(SUITES_BY_NAME[suite].openssl_name.encode())
    ctx.use_certificate(crypto.X509.from_cryptography(client.chain[0]))
    ctx.use_privatekey(crypto.PKey.from_cryptography_key(client.key))
    ctx.get_cert_store().add_cert(crypto.X509.from_cryptography(p.root))
    ctx.set_verify(SSL.VERIFY_PEER, lambda *a: bool(a[-1]))
    ctx.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)
    return ctx


def openssl_connect(port: int, ctx: SSL.Context, session: Any = None) -> SSL.Connection:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.settimeout(None)  # pyOpenSSL wants a blocking socket
    conn = SSL.Connection(ctx, sock)
    conn.set_tlsext_host_name(b"localhost")
    if session is not None:
        conn.set_session(session)
    conn.set_connect_state()
    conn.do_handshake()
    return conn


def openssl_close(conn: SSL.Connection) -> None:
    try:
        conn.shutdown()
    except SSL.Error:
        pass
    conn.sock_shutdown(socket.SHUT_RDWR)
    conn.close()


def openssl_handshakes(port: int, n: int, resume: bool) -> Measure:
    ctx = openssl_context(SUITES["AES-GCM"])
    first = openssl_connect(port, ctx)
    session = first.get_session()
    openssl_close(first)
    with Measure() as m:
        for _ in range(n):
            conn = openssl_connect(port, ctx, session if resume else None)
            if resume:
                # pyOpenSSL has no public call for this; ask OpenSSL directly.
                assert _lib.SSL_session_reused(conn._ssl), "OpenSSL did not resume"
                session = conn.get_session()
            openssl_close(conn)
    return m


def openssl_download(port: int, suite: str, size: int) -> Measure:
    conn = openssl_connect(port, openssl_context(suite))
    with Measure() as m:
        conn.sendall(b"GET /payload.bin HTTP/1.0\r\n\r\n")
        got = 0
        while True:
            try:
                data = conn.recv(1 << 16)
            except (SSL.ZeroReturnError, SSL.SysCallError):
                break
            if not data:
                break
            got += len(data)
    assert got >= size, got
    conn.close()
    return m


def openssl_upload(port: int, suite: str, size: int) -> Measure:
    conn = openssl_connect(port, openssl_context(suite))
    chunk = os.urandom(1 << 20)
    with Measure() as m:
        for _ in range(size >> 20):
            conn.sendall(chunk)
        conn.shutdown()
        while True:  # until the server has read it all and closed
            try:
                if not conn.recv(1 << 16):
                    break
            except (SSL.ZeroReturnError, SSL.SysCallError):
                break
    conn.close()
    return m


# -- ours, on the Twisted reactor


class Sink(Protocol):
    def __init__(self, request: bytes = b"") -> None:
        self.request = request
        self.received = 0
        self.done: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        if self.request:
            self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(None)


def our_config(suite: str, cache: SessionCache | None) -> TLSClientConfig:
    return TLSClientConfig(
        roots=[pki().root],
        remote_key=pki()["client-rsa"].local_key(),
        suites=[SUITES_BY_NAME[suite]],
        session_cache=cache,
    )


@inlineCallbacks
def our_connect(port: int, config: TLSClientConfig, request: bytes = b"") -> Any:
    # Straight to 127.0.0.1 like the OpenSSL client; "localhost" stays the
    # name we send and check.
    tcp = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=30)
    endpoint = TLSClientEndpoint(reactor, tcp, "localhost", port, config)
    protocol = yield endpoint.connect(Factory.forProtocol(lambda: Sink(request)))
    return protocol


@inlineCallbacks
def our_handshakes(port: int, n: int, resume: bool) -> Any:
    config = our_config(SUITES["AES-GCM"], SessionCache(reactor) if resume else None)
    first = yield our_connect(port, config)
    first.transport.loseConnection()
    yield first.done
    with Measure() as m:
        for _ in range(n):
            p = yield our_connect(port, config)
            assert p.transport.negotiated.resumed == resume
            p.transport.loseConnection()
            yield p.done
    return m


@inlineCallbacks
def our_download(port: int, suite: str, size: int) -> Any:
    # Connected before the measure starts, as the OpenSSL client is.
    p = yield our_connect(port, our_config(suite, None))
    with Measure() as m:
        p.transport.write(b"GET /payload.bin HTTP/1.0\r\n\r\n")
        yield p.done
    assert p.received >= size, p.received
    return m


@implementer(IPullProducer)
class Chunks:
    """
    Writes C{count} chunks, one each time the TCP buffer drains, the way
    Twisted producers (HTTP request bodies among them) feed a transport.
    """

    def __init__(self, transport: Any, chunk: bytes, count: int) -> None:
        self.transport, self.chunk, self.left = transport, chunk, count

    def resumeProducing(self) -> None:
        if self.left:
            self.left -= 1
            self.transport.write(self.chunk)
        else:
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def stopProducing(self) -> None:
        self.left = 0


@inlineCallbacks
def our_upload(port: int, suite: str, size: int) -> Any:
    chunk = os.urandom(1 << 20)
    p = yield our_connect(port, our_config(suite, None))
    with Measure() as m:
        p.transport.registerProducer(Chunks(p.transport, chunk, size >> 20), False)
        yield p.done
    return m


# -- the run


def best(runs: list[Measure]) -> Measure:
    """
    @return: a measure made of the best wall time and the best CPU time.
    """
    m = Measure()
    m.wall = min(r.wall for r in runs)
    m.cpu = min(r.cpu for r in runs)
    return m


def ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs else float("inf")


@inlineCallbacks
def run(args: argparse.Namespace, results: dict[str, Any]) -> Any:
    auth = ["-Verify", "1", "-CAfile", pki().client_root_file]
    payload_dir = pki().directory
    size = args.megabytes << 20
    with open(os.path.join(payload_dir, "payload.bin"), "wb") as f:
        f.write(os.urandom(size))
    cwd = os.getcwd()
    os.chdir(payload_dir)  # s_server -WWW serves files from its directory
    www = OpenSSLServer(["-WWW", "-quiet", *auth])
    sink = OpenSSLServer(["-quiet", *auth])
    os.chdir(cwd)
    try:
        www.wait_ready()
        sink.wait_ready()
        n = args.handshakes
        # Each measurement is repeated, ours and OpenSSL's in turn, and the
        # best run of each kept: on a small machine the server shares the
        # CPUs, and the best run is the least disturbed one.
        for resume in (False, True):
            kind = "resumed" if resume else "full"
            theirs_runs, ours_runs = [], []
            for _ in range(args.repeat):
                theirs_runs.append(openssl_handshakes(www.port, n, resume))
                ours_runs.append((yield our_handshakes(www.port, n, resume)))
            theirs, ours = best(theirs_runs), best(ours_runs)
            results[f"{kind}_handshakes"] = {
                "n": n,
                "ours_per_second": n / ours.wall,
                "openssl_per_second": n / theirs.wall,
                "ours_cpu_ms": 1000 * ours.cpu / n,
                "openssl_cpu_ms": 1000 * theirs.cpu / n,
                "cpu_ratio": ratio(ours.cpu, theirs.cpu),
            }
        for name, suite in SUITES.items():
            for direction, theirs_f, ours_f, port in (
                ("download", openssl_download, our_download, www.port),
                ("upload", openssl_upload, our_upload, sink.port),
            ):
                theirs_runs, ours_runs = [], []
                for _ in range(args.repeat):
                    theirs_runs.append(theirs_f(port, suite, size))
                    ours_runs.append((yield ours_f(port, suite, size)))
                theirs, ours = best(theirs_runs), best(ours_runs)
                mb = size / (1 << 20)
                results[f"{name}_{direction}"] = {
                    "megabytes": mb,
                    "ours_mb_per_s": mb / ours.wall,
                    "openssl_mb_per_s": mb / theirs.wall,
                    "throughput_ratio": theirs.wall / ours.wall,
                    "ours_cpu_ms_per_mb": 1000 * ours.cpu / mb,
                    "openssl_cpu_ms_per_mb": 1000 * theirs.cpu / mb,
                }
    finally:
        www.stop()
        sink.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--handshakes", type=int, default=200)
    parser.add_argument("--megabytes", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    outcome: list[Any] = []

    def finish(result: Any) -> None:
        outcome.append(result)
        reactor.stop()

    reactor.callWhenRunning(lambda: run(args, results).addBoth(finish))
    reactor.run()
    if outcome and hasattr(outcome[0], "raiseException"):
        outcome[0].raiseException()
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for key, value in results.items():
        print(key)
        for k, v in value.items():
            print(f"  {k:22} {v:10.3f}" if isinstance(v, float) else f"  {k:22} {v}")


if __name__ == "__main__":
    main()
