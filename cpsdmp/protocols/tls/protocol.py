"""
The Twisted face of the TLS client: a protocol that runs the handshake over
a TCP transport, then wraps an application protocol and serves it as its
transport, the way C{TLSMemoryBIOProtocol} does for OpenSSL. The negotiated
parameters are on the transport as C{negotiated} (a L{TLSInfo}).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from cryptography import x509
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IProtocol,
    IPushProducer,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cpsdmp.protocols.tls.alerts import (
    AlertDescription,
    AlertLevel,
    AlertReceived,
    ConnectionFailed,
    HandshakeFailed,
    ProtocolViolation,
    TLSError,
    TruncatedConnection,
)
from cpsdmp.protocols.tls.handshake import (
    ClientHandshake,
    State,
    TLSClientConfig,
    TLSInfo,
)
from cpsdmp.protocols.tls.messages import HandshakeReassembler, HandshakeType
from cpsdmp.protocols.tls.records import ContentType, RecordLayer

_log = Logger()


@implementer(ITransport, IPushProducer)
class TLSClientProtocol(Protocol):
    """
    A TLS 1.2 client connection. C{wrapped} is connected once the handshake
    is done; L{when_established} tells when, or why not.
    """

    def __init__(
        self,
        wrapped: IProtocol,
        config: TLSClientConfig,
        host: str,
        port: int,
        clock: IReactorTime,
    ) -> None:
        self.wrapped = wrapped
        self.config = config
        self.host = host
        self.port = port
        self._clock = clock
        self.negotiated: TLSInfo | None = None
        self.connected = False
        self.disconnecting = False
        self._records = RecordLayer()
        self._reassembler = HandshakeReassembler()
        self._handshake: ClientHandshake | None = None
        self._waiters: list[Deferred[TLSInfo]] = []
        self._result: TLSInfo | Exception | None = None
        self._error: Exception | None = None
        self._close_notify_sent = False
        self._close_notify_received = False
        self._wrapped_connected = False
        self._timeout: Any = None

    @property
    def _tcp(self) -> Any:
        return self.transport

    # -- handshake

    def when_established(self) -> Deferred[TLSInfo]:
        """
        @return: a Deferred that fires with the L{TLSInfo} once the
            handshake is done, or fails with why it did not complete.
            Cancelling it aborts the connection.
        """
        if isinstance(self._result, TLSInfo):
            return _fired(self._result)
        if isinstance(self._result, Exception):
            d: Deferred[TLSInfo] = Deferred()
            d.errback(_failure(self._result))
            return d

        def cancel(d: Deferred[TLSInfo]) -> None:
            if d in self._waiters:
                self._waiters.remove(d)
            if self.transport is not None:
                self._tcp.abortConnection()

        d = Deferred(cancel)
        self._waiters.append(d)
        return d

    def connectionMade(self) -> None:
        self.connected = True
        self._timeout = self._clock.callLater(
            self.config.handshake_timeout, self._handshake_timed_out
        )
        self._handshake = ClientHandshake(
            self.config,
            self.host,
            self.port,
            self._records,
            self._write_raw,
            self._clock,
            self._established,
            self._failed,
        )
        try:
            self._handshake.start()
        except Exception as error:
            # Nothing of ours may leave the connection open and its waiters
            # waiting: a ClientHello that cannot be made fails the handshake.
            self._handshake.fail(None, f"the ClientHello could not be made: {error}")

    def _write_raw(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def _handshake_timed_out(self) -> None:
        self._timeout = None
        if self._handshake is not None:
            self._handshake.fail(
                AlertDescription.user_canceled,
                f"no answer within {self.config.handshake_timeout:g} seconds",
            )

    def _cancel_timeout(self) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None

    def _established(self, info: TLSInfo) -> None:
        self._cancel_timeout()
        self.negotiated = info
        self._result = info
        self._wrapped_connected = True
        self.wrapped.makeConnection(self)
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(info)

    def _failed(self, exception: Exception) -> None:
        self._cancel_timeout()
        self._result = exception
        self._error = exception
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.errback(_failure(exception))
        if self.transport is not None and self.connected:
            self.disconnecting = True
            self.transport.loseConnection()

    @property
    def _established_now(self) -> bool:
        return isinstance(self._result, TLSInfo)

    # -- incoming

    def dataReceived(self, data: bytes) -> None:
        records = self._records
        records.feed(data)
        try:
            while self._error is None:
                record = records.next_record()
                if record is None:
                    return
                content_type, payload = record
                if content_type == ContentType.application_data:
                    if not self._established_now:
                        raise ProtocolViolation(
                            AlertDescription.unexpected_message,
                            "application data before the handshake completed",
                        )
                    if payload and not self._close_notify_received:
                        self.wrapped.dataReceived(payload)
                elif content_type == ContentType.handshake:
                    self._handshake_record(payload)
                elif content_type == ContentType.alert:
                    self._alert(payload)
                else:
                    self._change_cipher_spec(payload)
        except ProtocolViolation as e:
            self._violation(e)

    def _handshake_record(self, payload: bytes) -> None:
        if not payload:
            raise ProtocolViolation(
                AlertDescription.unexpected_message, "empty handshake record"
            )
        reassembler = self._reassembler
        reassembler.feed(payload)
        while self._error is None:
            message = reassembler.next_message()
            if message is None:
                return
            msg_type, body, raw = message
            if self._established_now:
                if msg_type != HandshakeType.hello_request or body:
                    raise ProtocolViolation(
                        AlertDescription.unexpected_message,
                        f"handshake message {msg_type} after the handshake",
                    )
                # We never renegotiate (RFC 5746 would allow it; a card
                # signature per renegotiation is not worth it).
                _log.info(
                    "TLS renegotiation requested by {host}: refused", host=self.host
                )
                self._send_alert(AlertLevel.warning, AlertDescription.no_renegotiation)
                continue
            assert self._handshake is not None
            self._handshake.handle_message(msg_type, body, raw)

    def _change_cipher_spec(self, payload: bytes) -> None:
        if self._established_now or self._handshake is None:
            raise ProtocolViolation(
                AlertDescription.unexpected_message,
                "ChangeCipherSpec after the handshake",
            )
        self._handshake.handle_change_cipher_spec(payload, self._reassembler.pending)

    def _alert(self, payload: bytes) -> None:
        if len(payload) != 2:
            raise ProtocolViolation(AlertDescription.decode_error, "malformed alert")
        level, description = payload[0], payload[1]
        if description == AlertDescription.close_notify:
            self._close_notify_received = True
            if not self._established_now:
                self._abandon(AlertReceived(level, description, self._step()))
                return
            if not self._close_notify_sent:
                self._send_alert(AlertLevel.warning, AlertDescription.close_notify)
            self.disconnecting = True
            if self.transport is not None:
                self.transport.loseConnection()
            return
        if (
            level == AlertLevel.warning
            and description != AlertDescription.user_canceled
        ):
            _log.info(
                "TLS warning alert {alert} from {host}",
                alert=AlertDescription.name_of(description),
                host=self.host,
            )
            return
        error = AlertReceived(level, description, self._step())
        if not self._established_now:
            self._abandon(error)
        else:
            self._error = error
            self.disconnecting = True
            if self.transport is not None:
                self.transport.loseConnection()

    def _step(self) -> str:
        if self._handshake is None or self._established_now:
            return "after the handshake"
        state = self._handshake.state
        if state is State.WAIT_CHANGE_CIPHER_SPEC:
            return "after our Finished (the server rejected our flight)"
        return "while " + str(state.value)

    def _abandon(self, error: Exception) -> None:
        assert self._handshake is not None
        self._error = error
        self._handshake.abandon(error)

    def _violation(self, violation: ProtocolViolation) -> None:
        if self._established_now or self._handshake is None:
            self._error = ConnectionFailed(str(violation), violation.description)
            self._send_alert(AlertLevel.fatal, violation.description)
            self.disconnecting = True
            if self.transport is not None:
                self.transport.loseConnection()
        else:
            self._handshake.fail(violation.description, str(violation))

    def _send_alert(self, level: AlertLevel, description: AlertDescription) -> None:
        if description == AlertDescription.close_notify:
            self._close_notify_sent = True
        self._write_raw(
            self._records.seal(ContentType.alert, bytes((level, description)))
        )

    def connectionLost(self, reason: Failure | None = None) -> None:
        if reason is None:
            reason = _failure(ConnectionDone())
        self.connected = False
        self._cancel_timeout()
        if self._handshake is not None and not self._established_now:
            if self._error is None:
                step = self._handshake.state.value
                self._handshake.abandon(
                    HandshakeFailed(
                        step, f"the connection closed: {reason.getErrorMessage()}"
                    )
                )
        if not self._wrapped_connected:
            return
        self._wrapped_connected = False
        if self._error is not None:
            why = _failure(self._error)
        elif self._close_notify_received or self._close_notify_sent:
            why = _failure(ConnectionDone("TLS connection closed cleanly"))
        else:
            why = _failure(
                TruncatedConnection(
                    "the server closed the TCP connection without a TLS "
                    "close_notify: data may be missing"
                )
            )
        self.wrapped.connectionLost(why)

    # -- ITransport for the wrapped protocol

    def write(self, data: bytes) -> None:
        if not self._established_now or self.disconnecting or not self.connected:
            return
        if self.transport is not None and data:
            try:
                pieces = self._records.seal_pieces(ContentType.application_data, data)
            except ProtocolViolation as e:
                self._violation(e)
                return
            self.transport.writeSequence(pieces)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self.disconnecting or self.transport is None:
            return
        self.disconnecting = True
        if self._established_now and not self._close_notify_sent:
            self._send_alert(AlertLevel.warning, AlertDescription.close_notify)
        self.transport.loseConnection()

    def abortConnection(self) -> None:
        self.disconnecting = True
        if self.transport is not None:
            self._tcp.abortConnection()

    def getPeer(self) -> IAddress:
        assert self.transport is not None
        peer: IAddress = self.transport.getPeer()
        return peer

    def getHost(self) -> IAddress:
        assert self.transport is not None
        host: IAddress = self.transport.getHost()
        return host

    def getPeerCertificate(self) -> x509.Certificate | None:
        if self.negotiated is None or not self.negotiated.server_chain:
            return None
        return self.negotiated.server_chain[0]

    # -- producer plumbing, straight to the TCP transport: we encrypt as we
    # write, so its buffer is ours.

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert self.transport is not None
        self._tcp.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if self.transport is not None:
            self._tcp.unregisterProducer()

    def pauseProducing(self) -> None:
        if self.transport is not None:
            self._tcp.pauseProducing()

    def resumeProducing(self) -> None:
        if self.transport is not None:
            self._tcp.resumeProducing()

    def stopProducing(self) -> None:
        if self.transport is not None:
            self._tcp.stopProducing()


def _failure(exception: BaseException) -> Failure:
    return Failure(exception)  # type: ignore[no-untyped-call]


def _fired(info: TLSInfo) -> Deferred[TLSInfo]:
    d: Deferred[TLSInfo] = Deferred()
    d.callback(info)
    return d


__all__ = ["TLSClientProtocol", "TLSError"]
