# twisted.web, twisted.enterprise and twisted.application are not annotated.
# mypy: disable-error-code="no-untyped-call"
"""
C{twist dmpsandbox}: the local DMP's command line and the service that opens
its SQLite database and serves its web services over mutual TLS.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from cpsdmp.sandbox.service import DEFAULT_MAX_REQUEST_BYTES, make_site
from cpsdmp.sandbox.store import Store
from cpsdmp.sandbox.tls import dmp_server_options
from cpsdmp.tapsupport import (
    StartError,
    check_endpoint,
    exit_on_start_failure,
    listen,
    number_option,
    read_certificates,
    read_tls_identity,
)

_log = Logger()

DEFAULT_LISTEN = "tcp:10443:interface=127.0.0.1"
DEFAULT_DB = "dmpsandbox.sqlite"


class Options(usage.Options):
    """
    The command line of C{twist dmpsandbox}.
    """

    synopsis = "[options]"
    longdesc = (
        "A local DMP for development and tests: the DMP's TLS settings with "
        "client certificates checked against the test PKI, its SOAP services "
        "for TD0.2, TD2.1, TD3.1, TD3.2 and TD3.3, and the documents kept in "
        "SQLite."
    )

    optParameters = [
        ["listen", None, DEFAULT_LISTEN, "Endpoint to serve HTTPS on (always TLS)."],
        ["db", None, DEFAULT_DB, "SQLite file of the documents (made if missing)."],
        [
            "testcard",
            None,
            None,
            "Take certificate, key and client CAs from this test card folder.",
        ],
        ["cert", None, None, "PEM chain of the server: its certificate first."],
        ["key", None, None, "PEM private key of the server."],
        [
            "max-request-bytes",
            None,
            DEFAULT_MAX_REQUEST_BYTES,
            "Largest request body accepted, in bytes.",
            number_option(
                "max-request-bytes",
                "bytes",
                f"{DEFAULT_MAX_REQUEST_BYTES} "
                f"({DEFAULT_MAX_REQUEST_BYTES // 2**20} MiB)",
                whole=True,
            ),
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["client-cas"] = []

    def opt_client_ca(self, path: str) -> None:
        """
        PEM file of an authority whose card certificates are accepted (repeatable).
        """
        self["client-cas"].append(path)

    def postOptions(self) -> None:
        check_endpoint("listen", self["listen"])
        if self["testcard"]:
            from cpsdmp.agent.testcard import TestCard, TestCardError

            try:
                card = TestCard.load(self["testcard"])
            except TestCardError as error:
                raise usage.UsageError(str(error)) from None
            self["cert"] = self["cert"] or card.sandbox_cert
            self["key"] = self["key"] or card.sandbox_key
            if not self["client-cas"]:
                self["client-cas"] = [card.ca_root, *card.ca_intermediates]
        if not (self["cert"] and self["key"] and self["client-cas"]):
            raise usage.UsageError(
                "say which certificate to serve and which cards to accept: "
                "--testcard DIR, or --cert, --key and --client-ca"
            )
        read_tls_identity("cert", self["cert"], "key", self["key"])
        for path in self["client-cas"]:
            read_certificates("client-ca", path)
        check_database("db", self["db"])


def check_database(option: str, path: str) -> None:
    """
    @raise usage.UsageError: when C{path} cannot be the SQLite database: its
        folder is missing, it is a folder, or it is a file SQLite cannot read
        as a database (the file is opened read-only, never changed).
    """
    file = Path(path)
    if file.is_dir():
        raise usage.UsageError(f"--{option} {path}: a folder, not a file")
    if not file.exists():
        folder = file.absolute().parent
        if not folder.is_dir():
            raise usage.UsageError(
                f"--{option} {path}: its folder {folder} does not exist"
            )
        return
    try:
        with open(file, "rb"):
            pass
        uri = f"{file.absolute().as_uri()}?mode=ro"
        connection = sqlite3.connect(uri, uri=True, timeout=0)
        try:
            connection.execute("PRAGMA schema_version").fetchone()
        finally:
            connection.close()
    except OSError as e:
        raise usage.UsageError(
            f"--{option} {path}: cannot read it ({e.strerror})"
        ) from None
    except sqlite3.DatabaseError as e:
        if e.sqlite_errorname in ("SQLITE_BUSY", "SQLITE_LOCKED"):
            # In use by another process now: the sandbox will wait for it,
            # and say so if it cannot.
            return
        if e.sqlite_errorname == "SQLITE_NOTADB":
            raise usage.UsageError(
                f"--{option} {path}: not an SQLite database ({e})"
            ) from None
        raise usage.UsageError(
            f"--{option} {path}: SQLite cannot open it ({e})"
        ) from None


class SandboxService(Service):
    """
    Opens the database, then listens; stops listening, then closes it.
    """

    def __init__(
        self,
        listen: str,
        db: str,
        cert: str,
        key: str,
        client_cas: Sequence[str],
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        reactor: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.listen_on = listen
        self.db = db
        self.tls = dmp_server_options(cert, key, list(client_cas))
        self.max_request_bytes = max_request_bytes
        self.store: Store | None = None
        self.port: IListeningPort | None = None
        self._starting: Deferred[IListeningPort] | None = None

    def start(self) -> Deferred[IListeningPort]:
        """
        @return: a Deferred that fires with the listening port once the
            database is ready and the port open.
        """
        store = self.store = Store(self.db)
        site = make_site(store, self.max_request_bytes)
        factory = TLSMemoryBIOFactory(self.tls, False, site)

        def not_opened(failure: Any) -> None:
            raise StartError(
                f"cannot open the database {self.db}: {failure.getErrorMessage()}"
            )

        def listening(port: IListeningPort) -> IListeningPort:
            self.port = port
            host = port.getHost()
            _log.info(
                "DMP sandbox on https://{host}:{port}/si-dmp-server/v2/services, "
                "database {db}",
                host=getattr(host, "host", "?"),
                port=getattr(host, "port", "?"),
                db=self.db,
            )
            return port

        self._starting = (
            store.open()
            .addErrback(not_opened)
            .addCallback(lambda _: listen(self.reactor, self.listen_on, factory))
            .addCallback(listening)
        )
        return self._starting

    def startService(self) -> None:
        super().startService()
        maybeDeferred(self.start).addErrback(
            lambda failure: exit_on_start_failure(
                self.reactor, "dmpsandbox", failure, _log
            )
        )

    def stopService(self) -> Deferred[None]:
        """
        @return: a Deferred that fires once the port is closed and the
            database too.
        """
        super().stopService()

        def close(_: object) -> None:
            if self.store is not None:
                self.store.close()
                self.store = None

        done: Deferred[None] = Deferred()
        done.addCallback(close)
        port, self.port = self.port, None
        stopped = port.stopListening() if port is not None else None
        if stopped is None:
            done.callback(None)
        else:
            stopped.chainDeferred(done)
        return done


def makeService(options: Options) -> SandboxService:
    """
    @return: the service C{twist dmpsandbox} runs.
    """
    return SandboxService(
        options["listen"],
        options["db"],
        options["cert"],
        options["key"],
        options["client-cas"],
        options["max-request-bytes"],
    )
