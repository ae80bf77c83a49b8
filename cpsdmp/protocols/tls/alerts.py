"""
TLS alerts (RFC 5246 section 7.2) and the exceptions the client raises: one
for an alert the peer sent, one for a handshake that we stopped, one for a
connection closed without close_notify.
"""

from __future__ import annotations

import enum


class AlertLevel(enum.IntEnum):
    warning = 1
    fatal = 2


class AlertDescription(enum.IntEnum):
    close_notify = 0
    unexpected_message = 10
    bad_record_mac = 20
    record_overflow = 22
    handshake_failure = 40
    bad_certificate = 42
    unsupported_certificate = 43
    certificate_revoked = 44
    certificate_expired = 45
    certificate_unknown = 46
    illegal_parameter = 47
    unknown_ca = 48
    access_denied = 49
    decode_error = 50
    decrypt_error = 51
    protocol_version = 70
    insufficient_security = 71
    internal_error = 80
    inappropriate_fallback = 86
    user_canceled = 90
    no_renegotiation = 100
    missing_extension = 109
    unsupported_extension = 110
    unrecognized_name = 112
    no_application_protocol = 120

    @classmethod
    def name_of(cls, code: int) -> str:
        try:
            return cls(code).name
        except ValueError:
            return f"unknown alert {code}"


class TLSError(Exception):
    """
    Anything that ends a TLS connection abnormally.
    """


class ProtocolViolation(TLSError):
    """
    The peer broke the protocol (or our policy): we answer with the fatal
    alert C{description}.
    """

    def __init__(self, description: AlertDescription, message: str) -> None:
        super().__init__(message)
        self.description = description


class HandshakeFailed(TLSError):
    """
    The handshake stopped at C{step}; C{alert} is the alert we sent, if any.
    """

    def __init__(
        self, step: str, reason: str, alert: AlertDescription | None = None
    ) -> None:
        sent = f" (sent alert {alert.name})" if alert is not None else ""
        super().__init__(f"TLS handshake failed ({step}): {reason}{sent}")
        self.step = step
        self.reason = reason
        self.alert = alert


class ConnectionFailed(TLSError):
    """
    An established connection broke the protocol (a forged record, an
    unexpected message); we sent the fatal C{alert} and closed.
    """

    def __init__(self, reason: str, alert: AlertDescription) -> None:
        super().__init__(f"TLS connection failed: {reason} (sent alert {alert.name})")
        self.reason = reason
        self.alert = alert


class AlertReceived(TLSError):
    """
    The server sent a fatal alert (or a warning we cannot go on after).
    """

    def __init__(self, level: int, description: int, step: str) -> None:
        name = AlertDescription.name_of(description)
        level_name = "fatal" if level == AlertLevel.fatal else "warning"
        super().__init__(f"server sent {level_name} alert {name} {step}")
        self.level = level
        self.description = description
        self.step = step

    @property
    def name(self) -> str:
        return AlertDescription.name_of(self.description)


class TruncatedConnection(TLSError):
    """
    The TCP connection closed without a close_notify: the data received may
    have been cut short by an attacker or a failing middlebox.
    """
