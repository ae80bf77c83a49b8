"""
The problem documents (RFC 9457) the agent answers with, shared by the agent
that writes them and the client that reads them.
"""

from __future__ import annotations

# The "type" member of each problem the agent reports.
PREFIX = "urn:cpsdmp:agent:"
WRONG_PIN = PREFIX + "wrong-pin"
PIN_PAUSE = PREFIX + "pin-pause"
PIN_LAST_TRY = PREFIX + "pin-last-try"
PIN_BLOCKED = PREFIX + "pin-blocked"
NO_CARD = PREFIX + "no-card"
CARD_REMOVED = PREFIX + "card-removed"
CARD_FAULT = PREFIX + "card-fault"
CARD_TIMEOUT = PREFIX + "card-timeout"
CARD_LOCKED = PREFIX + "card-locked"
KEY_NOT_FOUND = PREFIX + "key-not-found"
NO_SIGNATURE_KEY = PREFIX + "no-signature-key"
TOKEN_MISSING = PREFIX + "token-missing"
TOKEN_EXPIRED = PREFIX + "token-expired"
BODY_TOO_LARGE = PREFIX + "body-too-large"
HEADER_TOO_LARGE = PREFIX + "header-too-large"
BAD_REQUEST = PREFIX + "bad-request"
UNKNOWN_ALGORITHM = PREFIX + "unknown-algorithm"
FORBIDDEN_ORIGIN = PREFIX + "forbidden-origin"
NOT_FOUND = PREFIX + "not-found"
METHOD_NOT_ALLOWED = PREFIX + "method-not-allowed"
INTERNAL = PREFIX + "internal-error"
POLICY_REFUSED = PREFIX + "signature-refused"
RATE_LIMITED = PREFIX + "rate-limited"
AUDIT_UNAVAILABLE = PREFIX + "audit-unavailable"

CONTENT_TYPE = "application/problem+json"
