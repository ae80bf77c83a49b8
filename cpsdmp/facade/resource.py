# twisted.web is not annotated.
# mypy: disable-error-code="no-untyped-call"
"""
The facade's REST API: JSON in, JSON out, one route per DMP transaction,
errors as RFC 9457 problem documents. The routes, their request and answer
schemas and their statuses are one table, L{ROUTES}; the OpenAPI description
served at C{/openapi.json} is made from it, so that it cannot drift from what
the facade serves.
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import json
import re
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, succeed
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from cpsdmp.agent.client import (
    AgentCertificateMismatch,
    AgentError,
    AgentUnreachable,
    CardRemoved,
    NoCard,
    NoSignatureKey,
    PinBlocked,
    RateLimited,
    TokenExpired,
    WrongPin,
)
from cpsdmp.facade.networks import AgentNotAllowed
from cpsdmp.facade.service import (
    MAX_DOCUMENTS,
    AgentContext,
    CardHolderError,
    DmpAnswerLost,
    DmpHttpError,
    DmpNotReached,
    DmpService,
    DmpTimeout,
    DmpUnreachable,
    DocumentRefused,
    FacadeStopping,
    Submitted,
    TooManyDocuments,
    UnknownOutcome,
    excerpt,
)
from cpsdmp.protocols import bounded, strictjson
from cpsdmp.protocols.httpserver import (
    IDLE_TIMEOUT,
    HeaderLimitChannel,
    closing_answer,
    reason_phrase,
)
from cpsdmp.protocols.multipart import (
    MultipartError,
    TooManyParts,
    content_type_params,
    split_parts,
)
from cpsdmp.protocols.safexml import XmlRefused
from cpsdmp.protocols.soap import SoapError, SoapFault
from cpsdmp.protocols.tls import (
    AlertReceived,
    ConnectionFailed,
    HandshakeFailed,
    TLSError,
    TruncatedConnection,
)
from cpsdmp.xds.cda import CdaError, UnknownClassCode
from cpsdmp.xds.ebrim import (
    INS_OIDS,
    MAX_OID,
    CodedValue,
    DocumentEntry,
    MetadataError,
    PatientId,
    Status,
    is_oid,
)
from cpsdmp.xds.responses import RegistryFailure, UnexpectedAnswer
from cpsdmp.xds.transactions import MASQUE_PS, FindDocuments, HL7Error
from cpsdmp.xds.values import (
    CLASS_CODE_SYSTEM,
    CLASS_DISPLAYS,
    DTM_PATTERN,
    MAX_FREE_TEXT,
    MAX_LONG_NAME,
    check_asked_unique_id,
    check_code,
    check_dtm,
    check_overrides,
    check_time_order,
)

_log = Logger()

PROBLEM_BASE = "https://cpsdmp.invalid/problems/"
#: The longest detail a problem document carries.
MAX_DETAIL = 1000
#: The registry's and repository's word for a document it does not have.
MISSING_DOCUMENT = "XDSMissingDocument"
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
#: Seconds the facade, as it stops, waits for the answers of the requests
#: it stopped to go out.
STOP_WAIT = 5.0
JSON = "application/json"
PROBLEM_JSON = "application/problem+json"
MULTIPART = "multipart/form-data"
#: An answer in the media type of what it carries (a document's mimeType).
ANY_MEDIA = "*/*"


class BadRequest(Exception):
    """
    The request is malformed: the message says what to fix.
    """


# Problems -----------------------------------------------------------------------
@dataclass
class Problem(Exception):
    """
    An RFC 9457 problem document and its HTTP status.
    """

    status: int
    kind: str
    title: str
    detail: str
    extra: dict[str, Any] = field(default_factory=dict)

    def document(self) -> dict[str, Any]:
        detail = self.detail
        if len(detail) > MAX_DETAIL:
            # Whatever the message quotes, a caller never gets it all back.
            detail = detail[:MAX_DETAIL] + "... (cut)"
        return {
            "type": PROBLEM_BASE + self.kind,
            "title": self.title,
            "status": self.status,
            "detail": detail,
            **self.extra,
        }


def _dmp_errors(error: RegistryFailure) -> list[dict[str, str]]:
    return [
        {
            "code": e.code,
            "context": e.context,
            "severity": e.severity.rsplit(":", 1)[-1],
            "location": e.location,
        }
        for e in error.errors
    ]


def problem_for(error: BaseException) -> Problem:
    """
    @return: the problem document that says what went wrong, with the
        status a backend can act on (each route's statuses are in the
        OpenAPI description).
    """
    text = str(error)
    if isinstance(error, Problem):
        return error
    if isinstance(error, BadRequest):
        return Problem(400, "malformed-request", "Malformed request", text)
    if isinstance(error, TokenExpired):
        said = str(error.problem.get("detail") or "the token is expired or unknown")
        if "PIN" not in said:
            said += ": the professional must enter the PIN again in the agent"
        return Problem(
            401,
            "token-expired",
            "The agent session expired",
            f"the agent refused the context's token: {said}",
        )
    if isinstance(error, PinBlocked):
        return Problem(423, "pin-blocked", "The card's PIN is blocked", text)
    if isinstance(error, WrongPin):
        return Problem(401, "wrong-pin", "The card refused the PIN", text)
    if isinstance(error, RateLimited):
        # The agent's own wait when it gives a sensible one (the client
        # takes 1 to 3600 s), else a minute; the text names the call.
        seconds = error.retry_after or 60
        return Problem(
            429,
            "card-rate-limited",
            "The agent takes no more requests of this session for now",
            text,
            {"retryAfter": seconds},
        )
    if isinstance(error, NoCard | CardRemoved):
        return Problem(503, "no-card", "No CPS card in the workstation", text)
    if isinstance(error, AgentNotAllowed):
        return Problem(
            403, "agent-not-allowed", "The agent's address is not allowed", text
        )
    if isinstance(error, AgentCertificateMismatch):
        return Problem(502, "agent-mismatch", "Not the agent the context names", text)
    if isinstance(error, AgentUnreachable):
        # The agent client says "did not answer ... within N s" on a timeout.
        if "did not answer" in text:
            return Problem(
                504, "agent-timeout", "The agent did not answer in time", text
            )
        return Problem(502, "agent-unreachable", "The agent is unreachable", text)
    if isinstance(error, NoSignatureKey):
        return Problem(
            409,
            "no-signature-key",
            "The card has no signature key",
            "the card has no signature key: submissions cannot be signed; "
            "read-only transactions (TD0.2, TD3.1, TD3.2) and status updates "
            f"(TD3.3) still work. The agent said: {text}",
        )
    if isinstance(error, AgentError):
        return Problem(502, "agent-error", "The agent refused", text)
    if isinstance(error, HandshakeFailed):
        return Problem(
            502,
            "handshake-failed",
            "TLS handshake with the DMP failed",
            text,
            {
                "step": error.step,
                "alert": error.alert.name if error.alert is not None else None,
            },
        )
    if isinstance(error, AlertReceived):
        return Problem(
            502,
            "handshake-refused",
            "The DMP refused the TLS connection",
            text,
            {"step": error.step, "alert": error.name},
        )
    if isinstance(error, ConnectionFailed | TruncatedConnection | TLSError):
        return Problem(502, "tls-error", "TLS connection to the DMP failed", text)
    if isinstance(error, DmpTimeout):
        return Problem(504, "dmp-timeout", "The DMP did not answer in time", text)
    if isinstance(error, UnknownOutcome):
        return Problem(
            504,
            "outcome-unknown",
            "The outcome is unknown",
            text,
            {"uniqueIds": error.unique_ids, "outcome": "unknown"},
        )
    if isinstance(error, DmpUnreachable):
        return Problem(502, "dmp-unreachable", "The DMP is unreachable", text)
    if isinstance(error, DmpAnswerLost):
        return Problem(502, "dmp-answer-lost", "The DMP's answer was lost", text)
    if isinstance(error, RegistryFailure):
        return Problem(
            422,
            "dmp-refused",
            "The DMP refused the request",
            text,
            {"errors": _dmp_errors(error)},
        )
    if isinstance(error, HL7Error):
        return Problem(
            422,
            "dmp-refused",
            "The DMP refused the request",
            text,
            {
                "errors": [
                    {
                        "code": error.code,
                        "context": text,
                        "severity": "Error",
                        "location": "",
                    }
                ]
            },
        )
    if isinstance(error, SoapFault):
        code = error.subcodes[-1] if error.subcodes else error.code
        return Problem(
            502,
            "dmp-fault",
            "The DMP answered with a SOAP fault",
            text,
            {
                "errors": [
                    {
                        "code": code,
                        "context": error.reason,
                        "severity": "Error",
                        "location": "",
                    }
                ]
            },
        )
    if isinstance(error, CardHolderError):
        return Problem(502, "card-holder-unusable", "The card holder is unusable", text)
    if isinstance(error, FacadeStopping):
        return Problem(503, "stopping", "The facade is stopping", text)
    if isinstance(error, TooManyDocuments):
        return Problem(413, "too-large", "Too many documents", text)
    if isinstance(error, CdaError | XmlRefused):
        return Problem(
            422, "invalid-cda", "The document or its metadata is invalid", text
        )
    if isinstance(error, MetadataError):
        # Outside a submission (whose handler says invalid-cda itself), a
        # value the request gave that XDS cannot carry.
        return Problem(400, "malformed-request", "Malformed request", text)
    if isinstance(error, DmpHttpError | UnexpectedAnswer | SoapError):
        return Problem(502, "dmp-bad-answer", "The DMP's answer is not usable", text)
    return Problem(500, "internal-error", "Internal error", "see the facade's log")


# Reading requests ---------------------------------------------------------------
def _object(body: Mapping[str, Any], name: str, required: bool = True) -> Any:
    if name not in body:
        if required:
            raise BadRequest(f"the body lacks {name!r}")
        return None
    return body[name]


#: An entryUUID as XDS gives them (RFC 4122 URN).
ENTRY_UUID_PATTERN = (
    "^urn:uuid:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}"
    "-[0-9a-fA-F]{12}$"
)
_ENTRY_UUID = re.compile(ENTRY_UUID_PATTERN)
#: The members of a TD3.1 that filter a search (FindDocuments), meaningless
#: for documents asked for by identifier (GetDocuments).
FIND_MEMBERS = frozenset(
    {
        "statuses",
        "creationFrom",
        "creationTo",
        "classCodes",
        "typeCodes",
        "confidentialityCodes",
    }
)
#: The longest uniqueId (an OID, with its extension) and XDS time taken.
MAX_UNIQUE_ID = 128
#: A document's uniqueId as the facade takes one to ask for: an OID, or
#: OID^extension, the extension without spaces or control characters (the
#: facade also holds the OID to 64 characters and the extension to
#: printable characters, which a pattern cannot say).
UNIQUE_ID_PATTERN = (
    r"^[0-2](\.(0|[1-9][0-9]*))+"
    r"(\^[^\s^\x00-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]+)?$"
)
_UNIQUE_ID_SCHEMA = {
    "type": "string",
    "maxLength": MAX_UNIQUE_ID,
    "pattern": UNIQUE_ID_PATTERN,
}
MAX_TIME = 32


def _json_kind(value: Any) -> str:
    """
    @return: what C{value}, read from JSON, is, in JSON's words.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return "a string"


def _bounded(value: str, name: str, longest: int) -> str:
    if len(value) > longest:
        raise BadRequest(f"{name!r} is over {longest} characters: {excerpt(value)}")
    return value


def _string(
    body: Mapping[str, Any], name: str, required: bool = True, longest: int = 256
) -> str | None:
    if name not in body and not required:
        return None
    value = _object(body, name, required)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{name!r} must be a non-empty string")
    return _bounded(value, name, longest)


def _unique_id(body: Mapping[str, Any]) -> str:
    value = _string(body, "uniqueId", longest=MAX_UNIQUE_ID)
    assert value is not None
    return _asked_unique_id(value, "uniqueId")


def _asked_unique_id(value: str, name: str) -> str:
    """
    @return: C{value}, a document's uniqueId as the DMP can be asked for it.
    @raise BadRequest: naming C{name}, before the value goes into XML.
    """
    try:
        return check_asked_unique_id(value, name, MAX_UNIQUE_ID)
    except MetadataError as error:
        raise BadRequest(str(error)) from None


def _strings(body: Mapping[str, Any], name: str, longest: int = 256) -> list[str]:
    value = body.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"{name!r} must be a list of strings")
    for index, item in enumerate(value):
        _bounded(item, f"{name}[{index}]", longest)
    return value


def check_members(value: Any, schema: Mapping[str, Any], where: str) -> None:
    """
    Refuse a member the request schema does not have, in an object whose
    schema says C{additionalProperties: false}, however deep: a typo in a
    member name (C{clasCodes}) must not be ignored silently.

    @param where: how the message names C{value}.
    @raise BadRequest: naming the unknown member and the known ones.
    """
    properties = schema.get("properties")
    if isinstance(value, Mapping) and properties is not None:
        if schema.get("additionalProperties") is False:
            for name in value:
                if name not in properties:
                    raise BadRequest(
                        f"{where} has no member {excerpt(name)}: its members are "
                        + ", ".join(properties)
                    )
        for name, item in value.items():
            if name in properties:
                inner = f"{where}.{name}" if where != "the body" else name
                check_members(item, properties[name], inner)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for index, item in enumerate(value):
            check_members(item, schema["items"], f"{where}[{index}]")


def _context(body: Mapping[str, Any]) -> AgentContext:
    try:
        return AgentContext.from_json(_object(body, "agentContext"))
    except ValueError as error:
        raise BadRequest(str(error)) from None


def _coded(value: Any, name: str) -> CodedValue:
    if not isinstance(value, Mapping) or not isinstance(value.get("code"), str):
        raise BadRequest(f"{name} must be {{code, codingScheme, display}}")
    scheme = value.get("codingScheme")
    if not isinstance(scheme, str) or not scheme:
        raise BadRequest(f"{name} lacks its codingScheme")
    display = value.get("display", "")
    if not isinstance(display, str):
        raise BadRequest(f"{name}.display must be a string")
    try:
        code = check_code(CodedValue(value["code"], scheme, display), name)
    except MetadataError as error:
        raise BadRequest(str(error)) from None
    if not is_oid(scheme):
        raise BadRequest(
            f"{name}.codingScheme {excerpt(scheme)} is not an OID such as "
            f"{CLASS_CODE_SYSTEM}"
        )
    return code


#: DocumentEntry attributes a backend may override, and how each is read.
CODED_OVERRIDES = {
    "classCode",
    "typeCode",
    "formatCode",
    "healthcareFacilityTypeCode",
    "practiceSettingCode",
}
CODED_LIST_OVERRIDES = {"confidentialityCode", "eventCodeList"}
TEXT_OVERRIDES = {
    "title",
    "comments",
    "languageCode",
    "creationTime",
    "serviceStartTime",
    "serviceStopTime",
}


def read_overrides(value: Any) -> dict[str, object]:
    """
    @return: XDS attribute -> value for L{cpsdmp.xds.cda.document_entry}.
    @raise BadRequest: an unknown attribute or a malformed value.
    """
    if not isinstance(value, Mapping):
        raise BadRequest("overrides must be an object keyed by XDS attribute")
    result: dict[str, object] = {}
    for name, item in value.items():
        if name in CODED_OVERRIDES:
            result[name] = _coded(item, name)
        elif name in CODED_LIST_OVERRIDES:
            if not isinstance(item, list):
                raise BadRequest(f"{name} must be a list of codes")
            result[name] = [_coded(i, f"{name}[{j}]") for j, i in enumerate(item)]
        elif name in TEXT_OVERRIDES:
            if not isinstance(item, str):
                raise BadRequest(f"{name} must be a string")
            if name.endswith("Time"):
                _bounded(item, name, MAX_TIME)
            result[name] = item
        else:
            known = sorted(CODED_OVERRIDES | CODED_LIST_OVERRIDES | TEXT_OVERRIDES)
            raise BadRequest(
                f"{excerpt(name)} cannot be overridden; one of {', '.join(known)}"
            )
    return result


#: Base64 (RFC 4648, section 4) as the facade takes it: the alphabet alone,
#: no line breaks, padded to a multiple of 4 characters.
BASE64_PATTERN = "^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
#: The same, checked faster on a large text: the alphabet, at most two '='
#: at the end, and a length that is a multiple of 4.
_BASE64 = re.compile("[A-Za-z0-9+/]*={0,2}")


def _b64(value: Any, name: str) -> bytes:
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be base64 text")
    # b64decode alone takes more '=' than padding needs.
    if len(value) % 4 or not _BASE64.fullmatch(value):
        raise BadRequest(
            f"{name} is not base64 as the facade takes it: the base64 alphabet "
            "without line breaks or spaces, padded with '=' to a multiple of 4 "
            "characters"
        )
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{name} is not valid base64") from None


# The routes ------------------------------------------------------------------------
Handler = Callable[
    ["FacadeResource", server.Request, Any], Coroutine[Deferred[Any], Any, Any]
]

_CONTEXT_SCHEMA = {
    "type": "object",
    "description": "The agent context the professional's frontend obtained "
    "from the agent (POST /cps/session).",
    "required": ["url", "token", "tlsFingerprint"],
    "properties": {
        "url": {
            "type": "string",
            "pattern": "^https://",
            "maxLength": 2048,
            "description": "the agent's URL, https://HOST[:PORT] (an IPv4 "
            "address or a DNS name, no path); the facade reaches only agents in "
            "the networks its operator allows (--agent-network)",
        },
        "token": {"type": "string", "pattern": "^[A-Za-z0-9_-]{16,512}$"},
        "tlsFingerprint": {
            "type": "string",
            "pattern": "^sha256:([0-9A-Fa-f]{64}|[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){31})$",
        },
        "expires": {
            "type": "string",
            "maxLength": 64,
            "description": "when the token lapses if unused, as the agent said; "
            "not used by the facade, which takes it as a string only",
        },
    },
    "additionalProperties": False,
}
_PATIENT_SCHEMA = {
    "type": "object",
    "required": ["ins"],
    "properties": {
        "ins": {
            "type": "string",
            "maxLength": 15,
            "pattern": "^[0-9]{5}([0-9]{2}|2A|2B)[0-9]{8}$",
            "description": "the patient's INS (NIR or NIA): 13 digits (the 6th "
            "and 7th may be 2A or 2B) and its 2-digit key, which is checked",
        },
        "authority": {
            "type": "string",
            "enum": sorted(INS_OIDS),
            "description": "the INS authority OID (NIR, NIA, or those of the "
            "test and demonstration INS); the facade's default if absent",
        },
    },
    "additionalProperties": False,
}
_CODE_SCHEMA = {
    "type": "object",
    "required": ["code", "codingScheme"],
    "properties": {
        "code": {"type": "string", "minLength": 1, "maxLength": MAX_LONG_NAME},
        "codingScheme": {"type": "string", "minLength": 1, "maxLength": MAX_LONG_NAME},
        "display": {"type": "string", "maxLength": MAX_FREE_TEXT},
    },
    "additionalProperties": False,
}
#: A code a request gives: its codingScheme is an OID (IHE ITI TF-3, 4.2.3.1.7).
_GIVEN_CODE_SCHEMA = {
    **_CODE_SCHEMA,
    "properties": {
        **_CODE_SCHEMA["properties"],  # type: ignore[dict-item]
        "codingScheme": {
            "type": "string",
            "maxLength": MAX_OID,
            "pattern": r"^[0-2](\.(0|[1-9][0-9]*))+$",
        },
    },
}
#: A classCode: in the TRE_A03 system, one of its codes.
_CLASS_CODE_SCHEMA = {
    **_GIVEN_CODE_SCHEMA,
    "if": {"properties": {"codingScheme": {"const": CLASS_CODE_SYSTEM}}},
    "then": {"properties": {"code": {"enum": list(CLASS_DISPLAYS)}}},
}
_ENTRY_SCHEMA = {
    "type": "object",
    "description": "XDS DocumentEntry metadata, keyed by XDS attribute name.",
    "required": ["entryUUID", "uniqueId", "patientId"],
    "properties": {
        "entryUUID": {"type": "string"},
        "uniqueId": {"type": "string"},
        "patientId": {"type": "string"},
        "availabilityStatus": {"type": ["string", "null"]},
        "classCode": _CODE_SCHEMA,
        "typeCode": _CODE_SCHEMA,
        "confidentialityCode": {"type": "array", "items": _CODE_SCHEMA},
        "title": {"type": "string"},
    },
}
_DMP_ERROR_SCHEMA = {
    "type": "object",
    "required": ["code", "context", "severity", "location"],
    "properties": {
        "code": {"type": "string"},
        "context": {"type": "string"},
        "severity": {"type": "string"},
        "location": {"type": "string"},
    },
}
PROBLEM_SCHEMA = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {"type": "array", "items": _DMP_ERROR_SCHEMA},
        "step": {"type": "string"},
        "alert": {"type": ["string", "null"]},
        "uniqueIds": {"type": "array", "items": {"type": "string"}},
        "outcome": {"type": "string"},
        "documentIndex": {
            "type": "integer",
            "description": "which document of a submission is invalid, from 0",
        },
        "retryAfter": {
            "type": "integer",
            "description": "seconds to wait, as the Retry-After header says",
        },
    },
}
_WARNINGS = {"type": "array", "items": _DMP_ERROR_SCHEMA}
#: TD2.1 as a form: the agent context and the overrides as JSON parts, each
#: CDA as a file part (a part with a filename), under any name.
MULTIPART_SCHEMA = {
    "type": "object",
    "description": (
        "A part 'agentContext', an optional part 'overrides', and one to "
        f"{MAX_DOCUMENTS} file parts: every part with a filename is a CDA "
        "document, whatever its name ('documents' here), in the order given. "
        "Parts are sent as they are: a Content-Transfer-Encoding other than "
        "7bit, 8bit or binary is refused, as is a form without its closing "
        "delimiter."
    ),
    "required": ["agentContext"],
    "properties": {
        "agentContext": {"type": "string", "contentMediaType": JSON},
        "overrides": {
            "type": "string",
            "contentMediaType": JSON,
            "description": "a JSON list, one overrides object per file part",
        },
        "documents": {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_DOCUMENTS,
            "items": {"type": "string", "contentMediaType": "text/xml"},
        },
    },
    "additionalProperties": {"type": "string", "contentMediaType": "text/xml"},
}


@dataclass(frozen=True)
class Route:
    """
    One operation: its method and path, what it does, its request and
    answer schemas, and the error statuses it may answer.
    """

    method: str
    path: str
    operation_id: str
    summary: str
    handler: Handler | None
    request: dict[str, Any] | None
    answer: dict[str, Any]
    errors: tuple[int, ...] = (400, 401, 403, 413, 422, 423, 429, 431, 502, 503, 504)
    answer_types: tuple[str, ...] = (JSON,)
    request_types: tuple[str, ...] = (JSON,)
    #: What an error status means for this operation, where it is not what
    #: it means for every operation (L{_STATUS_TEXT}).
    error_texts: tuple[tuple[int, str], ...] = ()


async def _health(resource: FacadeResource, request: server.Request, body: Any) -> Any:
    return {"status": "ok", "dmp": resource.service.config.dmp_url}


async def _openapi(resource: FacadeResource, request: server.Request, body: Any) -> Any:
    return openapi()


async def _td02(resource: FacadeResource, request: server.Request, body: Any) -> Any:
    context = _context(body)
    patient = resource.patient(_object(body, "patient"))
    timings: dict[str, Any] = {}
    result = await resource.service.td02(context, patient, timings)
    return {
        "exists": result.exists,
        "responseCode": result.response_code,
        "authorization": result.authorization,
        "status": result.status,
        "family": result.family,
        "given": result.given,
        "attentions": result.attentions,
        "timings": timings,
    }


def _submitted(submitted: Submitted) -> dict[str, Any]:
    submission = submitted.prepared.submission
    return {
        "status": "Success",
        "outcome": submitted.outcome,
        "submissionSet": {
            "uniqueId": submission.submission_set.uniqueId,
            "entryUUID": submission.submission_set.entryUUID,
        },
        "documents": [
            {
                "uniqueId": d.entry.uniqueId,
                "entryUUID": d.entry.entryUUID,
                "title": d.entry.title,
                "mimeType": d.entry.mimeType,
                "classCode": d.entry.classCode.as_dict(),
                "typeCode": d.entry.typeCode.as_dict(),
            }
            for d in submitted.documents
        ],
        "warnings": [
            {
                "code": w.code,
                "context": w.context,
                "severity": "Warning",
                "location": w.location,
            }
            for w in submitted.warnings
        ],
        "timings": submitted.timings,
    }


async def _td21(resource: FacadeResource, request: server.Request, body: Any) -> Any:
    context = _context(body)
    items = _object(body, "documents")
    if not isinstance(items, list) or not items:
        raise BadRequest("'documents' must be a non-empty list")
    if len(items) > MAX_DOCUMENTS:
        # Said before any document is read.
        raise TooManyDocuments(
            f"a submission carries at most {MAX_DOCUMENTS} documents, not "
            f"{len(items)}: send them in several submissions"
        )
    # A form's documents are files, named in what the facade answers.
    form = (request.getHeader("content-type") or "").lower().startswith(MULTIPART)
    documents, overrides, names = [], [], []
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise BadRequest(f"documents[{index}] must be an object")
        content = item.get("content")
        documents.append(
            content
            if isinstance(content, bytes)
            else _b64(content, f"documents[{index}].content")
        )
        names.append(item.get("name"))
        where = (
            f"overrides[{index}] (for {excerpt(names[-1])})"
            if form
            else f"documents[{index}].overrides"
        )
        try:
            overrides.append(read_overrides(item.get("overrides", {})))
        except BadRequest as error:
            raise BadRequest(f"{where}: {error}") from None
        try:
            # The values the DMP would refuse, before anything is sent.
            check_overrides(overrides[-1])
        except MetadataError as error:
            raise Problem(
                422,
                "invalid-cda",
                "The document or its metadata is invalid",
                f"{where}: {error}",
                {"documentIndex": index},
            ) from None
    try:
        submitted = await resource.service.submit(context, documents, overrides)
    except DocumentRefused as refused:
        index, why = refused.index, refused.error
        if isinstance(why, UnknownClassCode):
            why = why.hinting(
                f"give it as overrides[{index}].classCode in the form's part "
                "'overrides' (a JSON list, one object per file)"
                if form
                else f"give it as documents[{index}].overrides.classCode"
            )
        where = f"documents[{index}]"
        if form:
            where += f" ({excerpt(names[index])})"
        raise Problem(
            422,
            "invalid-cda",
            "The document or its metadata is invalid",
            f"{where}: {why}",
            {"documentIndex": index},
        ) from refused
    except (CdaError, XmlRefused, MetadataError) as error:
        # The submission as a whole (documents of several patients, say).
        raise Problem(
            422, "invalid-cda", "The document or its metadata is invalid", str(error)
        ) from error
    return _submitted(submitted)


#: The availability statuses a search takes, by name; each may also be
#: given as its URN.
STATUS_NAMES = {
    "approved": Status.Approved,
    "archived": Status.Archived,
    "deprecated": Status.Deprecated,
    "deleted": Status.Deleted,
}


def _find_parameters(
    resource: FacadeResource, body: Mapping[str, Any]
) -> FindDocuments:
    patient = resource.patient(_object(body, "patient"))
    statuses = _strings(body, "statuses", 64) if "statuses" in body else ["Approved"]
    if not statuses:
        raise BadRequest("'statuses' must list at least one status, or be absent")
    urns = []
    for status in statuses:
        urn = STATUS_NAMES.get(status.lower(), status)
        if urn not in STATUS_NAMES.values():
            raise BadRequest(
                f"unknown status {excerpt(status)}: approved, archived, "
                "deprecated or deleted, or the URN of one of them"
            )
        urns.append(urn)

    def codes(name: str) -> list[CodedValue]:
        if name not in body:
            return []
        value = body[name]
        if not isinstance(value, list):
            raise BadRequest(f"{name!r} must be a list of codes")
        # An empty list filters nothing out: it is refused, not taken as
        # no filter.
        if not value:
            raise BadRequest(
                f"{name!r} is empty: list the codes wanted, or leave it out"
            )
        return [_coded(v, f"{name}[{index}]") for index, v in enumerate(value)]

    times = {}
    for name in ("creationFrom", "creationTo"):
        value = _string(body, name, False, MAX_TIME)
        try:
            times[name] = None if value is None else check_dtm(value, name)
        except MetadataError as error:
            raise BadRequest(str(error)) from None
    try:
        check_time_order(
            times["creationFrom"], times["creationTo"], "creationFrom", "creationTo"
        )
    except MetadataError as error:
        raise BadRequest(str(error)) from None
    return FindDocuments(
        patient=patient,
        statuses=urns,
        creation_from=times["creationFrom"],
        creation_to=times["creationTo"],
        class_codes=codes("classCodes"),
        type_codes=codes("typeCodes"),
        confidentiality_codes=codes("confidentialityCodes"),
    )


async def _td31(resource: FacadeResource, request: server.Request, body: Any) -> Any:
    context = _context(body)
    unique_ids = _strings(body, "uniqueIds", MAX_UNIQUE_ID)
    entry_uuids = _strings(body, "entryUUIDs", MAX_UNIQUE_ID)
    for name, values in [("uniqueIds", unique_ids), ("entryUUIDs", entry_uuids)]:
        # An empty list asks for nothing: it is not a search of everything.
        if name in body and not values:
            raise BadRequest(
                f"{name!r} is empty: list the documents wanted, or leave it out "
                "to search the patient's documents"
            )
    if unique_ids and entry_uuids:
        raise BadRequest("give uniqueIds or entryUUIDs, not both")
    for index, value in enumerate(unique_ids):
        _asked_unique_id(value, f"uniqueIds[{index}]")
    for index, value in enumerate(entry_uuids):
        if not _ENTRY_UUID.fullmatch(value):
            raise BadRequest(
                f"entryUUIDs[{index}] {excerpt(value)} is not an entryUUID: "
                "urn:uuid: and a UUID, as the DMP's answers give them"
            )
    # A UUID's hexadecimal digits are written in lower case (RFC 4122,
    # section 3), as the DMP compares them.
    entry_uuids = [value.lower() for value in entry_uuids]
    for name, values in [("uniqueIds", unique_ids), ("entryUUIDs", entry_uuids)]:
        first: dict[str, int] = {}
        for index, value in enumerate(values):
            if value in first:
                raise BadRequest(
                    f"{name}[{index}] repeats {name}[{first[value]}]: ask for "
                    "each document once"
                )
            first[value] = index
    if unique_ids or entry_uuids:
        search = sorted(FIND_MEMBERS & set(body))
        if search:
            raise BadRequest(
                f"{', '.join(search)} {'filters' if len(search) == 1 else 'filter'} "
                "a search of the patient's documents: "
                f"with {'uniqueIds' if unique_ids else 'entryUUIDs'} the DMP "
                "returns each document asked for, whatever its status; leave "
                f"{'it' if len(search) == 1 else 'them'} out"
            )
        # The DMP answers only about the patient the VIHF names.
        patient = resource.patient(_object(body, "patient"))
        result = await resource.service.td31(
            context, patient=patient, unique_ids=unique_ids, entry_uuids=entry_uuids
        )
    else:
        result = await resource.service.td31(context, _find_parameters(resource, body))
    return {
        "documents": [e.as_dict() for e in result.entries],
        "warnings": [
            {
                "code": w.code,
                "context": w.context,
                "severity": "Warning",
                "location": w.location,
            }
            for w in result.result.warnings
        ],
    }


OCTET_STREAM = "application/octet-stream"


def read_accept(header: str | None) -> list[tuple[str, float]]:
    """
    @return: the media ranges of an C{Accept} header (RFC 9110, 12.5.1),
        lowercase, each with its weight; a range whose weight is not a
        number from 0 to 1 is left out. Empty when there is no header.
    """
    ranges = []
    for part in (header or "").split(","):
        media, *parameters = (p.strip() for p in part.split(";"))
        if "/" not in media:
            continue
        weight = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    weight = float(value.strip())
                except ValueError:
                    weight = -1.0
        if 0 <= weight <= 1:
            ranges.append((media.lower(), weight))
    return ranges


def negotiate(
    accepted: Sequence[tuple[str, float]], offers: Sequence[str]
) -> str | None:
    """
    @param offers: the media types an answer can be, the preferred first.
    @return: the offer C{accepted} weighs most, each weighed by the most
        specific range that matches it (C{text/xml} before C{text/*} before
        C{*/*}); among equals, the more specific match, then the preferred
        offer. The first offer when there is no Accept header; C{None} when
        none is acceptable.
    """
    if not accepted:
        return offers[0]
    best: tuple[float, int, int] | None = None
    chosen = None
    for rank, offer in enumerate(offers):
        matches = [
            (_specificity(media, offer.lower()), weight)
            for media, weight in accepted
            if _specificity(media, offer.lower()) >= 0
        ]
        if not matches:
            continue
        # The most specific range that matches says the weight.
        specificity, weight = max(matches)
        if weight <= 0:
            continue
        key = (weight, specificity, -rank)
        if best is None or key > best:
            best, chosen = key, offer
    return chosen


def _specificity(media: str, offer: str) -> int:
    """
    @return: how closely the range C{media} names the type C{offer}: 2 for
        the type itself, 1 for its C{type/*}, 0 for C{*/*}, -1 when it does
        not match it.
    """
    if media == offer:
        return 2
    if media == offer.split("/", 1)[0] + "/*":
        return 1
    return 0 if media == "*/*" else -1


def _not_acceptable(request: server.Request, offers: Sequence[str]) -> Problem:
    said = request.getHeader("accept") or ""
    return Problem(
        406,
        "not-acceptable",
        "No acceptable answer",
        f"Accept {excerpt(said)} allows none of the forms of this answer: "
        + ", ".join(offers),
    )


def _not_found(unique_id: str, entries: Sequence[DocumentEntry]) -> Problem:
    """
    @param entries: what the registry has under C{unique_id} for the
        patient (nothing, or only versions that are no longer current).
    @return: the 404 that says why the document is not there: deleted,
        replaced, or unknown for this patient.
    """
    statuses = {e.availabilityStatus for e in entries}
    if Status.Deleted in statuses:
        why = f"document {unique_id} was deleted from this patient's DMP"
    elif Status.Deprecated in statuses:
        why = f"document {unique_id} was replaced by a new version"
    else:
        why = f"the DMP has no document {unique_id} for this patient"
    return Problem(404, "document-not-found", "No such document", why)


def _missing_only(error: RegistryFailure) -> bool:
    return bool(error.errors) and all(e.code == MISSING_DOCUMENT for e in error.errors)


async def _td32(resource: FacadeResource, request: server.Request, body: Any) -> Any:
    context = _context(body)
    unique_id = _unique_id(body)
    patient = resource.patient(_object(body, "patient"))
    accepted = read_accept(request.getHeader("accept"))
    if accepted and not any(q > 0 for _, q in accepted):
        # Nothing at all is acceptable: said before the DMP is asked.
        raise _not_acceptable(request, [JSON, "the document's own", OCTET_STREAM])
    try:
        documents = await resource.service.td32(context, patient, [unique_id])
    except RegistryFailure as error:
        if not _missing_only(error):
            raise
        # The registry tells a deleted document from an unknown one.
        try:
            found = await resource.service.td31(
                context, patient=patient, unique_ids=[unique_id]
            )
        except Exception:
            entries: list[DocumentEntry] = []
        else:
            entries = found.entries
        problem = _not_found(unique_id, entries)
        problem.extra["errors"] = _dmp_errors(error)
        raise problem from error
    if len(documents) != 1:
        raise Problem(
            502,
            "dmp-bad-answer",
            "The DMP's answer is not usable",
            f"asked for one document, the DMP returned {len(documents)}",
        )
    document = documents[0]
    offers = [JSON]
    if document.mime_type:
        offers.append(document.mime_type)
    offers.append(OCTET_STREAM)
    chosen = negotiate(accepted, offers)
    if chosen is None:
        raise _not_acceptable(request, offers)
    if chosen != JSON:
        return RawAnswer(
            bytes(document.data), chosen, document_filename(unique_id, chosen)
        )
    return {
        "uniqueId": document.unique_id,
        "repositoryUniqueId": document.repository,
        "mimeType": document.mime_type,
        "size": len(document.data),
        "content": base64.b64encode(document.data).decode("ascii"),
    }


UPDATE_ACTIONS = ("mask", "unmask", "archive", "unarchive", "delete")


def _conflict(entry: DocumentEntry, action: str) -> str | None:
    """
    @return: why C{action} would not change the document C{entry} is the
        current version of, or C{None} when it would.
    """
    masked = any(c.code == MASQUE_PS.code for c in entry.confidentialityCode)
    archived = entry.availabilityStatus == Status.Archived
    state = {
        "mask": "already masked" if masked else None,
        "unmask": None if masked else "not masked",
        "archive": "already archived" if archived else None,
        "unarchive": None if archived else "not archived",
        "delete": None,
    }[action]
    if state is None:
        return None
    return f"document {entry.uniqueId} is {state}: nothing to {action}"


async def _td33(resource: FacadeResource, request: server.Request, body: Any) -> Any:
    context = _context(body)
    unique_id = _unique_id(body)
    action = _string(body, "action")
    if action not in UPDATE_ACTIONS:
        raise BadRequest(f"'action' must be one of {', '.join(UPDATE_ACTIONS)}")
    patient = resource.patient(_object(body, "patient"))
    found = await resource.service.td31(
        context, patient=patient, unique_ids=[unique_id]
    )
    current = _current(found.entries)
    if not current:
        raise _not_found(unique_id, found.entries)
    entry = current[-1]
    conflict = _conflict(entry, action)
    if conflict is not None:
        raise Problem(409, "conflict", "Not possible in the document's state", conflict)
    outcome = "answered"
    try:
        await resource.service.td33(context, entry, action)
    except MetadataError as error:
        # The entry the DMP gave lacks what an update needs (its status or
        # its version): nothing was sent.
        raise Problem(
            502, "dmp-bad-answer", "The DMP's answer is not usable", str(error)
        ) from error
    except DmpNotReached:
        raise
    except (DmpAnswerLost, DmpTimeout) as lost:
        # The update went out and its answer never came: the document's
        # state, asked by uniqueId, tells whether it was applied.
        applied = await _applied(resource, context, patient, unique_id, action)
        if applied is None:
            raise UnknownOutcome(
                "the DMP's answer to the update never came and the "
                "check of the document's state failed too: the update may or "
                "may not have been applied; search for the document (TD3.1 by "
                f"uniqueId {unique_id}) to see its state before sending it again",
                [unique_id],
            ) from lost
        if not applied:
            raise Problem(
                502,
                "dmp-answer-lost",
                "The DMP's answer was lost",
                "the DMP's answer to the update never came; a search "
                f"by uniqueId shows that document {unique_id} is not "
                f"{_DONE[action]}: the update was not applied and can be sent "
                "again (the facade checks the state first)",
                {"outcome": "not-applied", "uniqueIds": [unique_id]},
            ) from lost
        outcome = "applied-after-lost-answer"
    return {
        "status": "Success",
        "uniqueId": unique_id,
        "action": action,
        "outcome": outcome,
    }


#: What a document is once each action is applied.
_DONE = {
    "mask": "masked",
    "unmask": "unmasked",
    "archive": "archived",
    "unarchive": "unarchived",
    "delete": "deleted",
}


def _current(entries: Sequence[DocumentEntry]) -> list[DocumentEntry]:
    """
    @return: the versions of a document that stand, neither deleted nor
        replaced.
    """
    return [
        e for e in entries if e.availabilityStatus in (Status.Approved, Status.Archived)
    ]


async def _applied(
    resource: FacadeResource,
    context: AgentContext,
    patient: PatientId,
    unique_id: str,
    action: str,
) -> bool | None:
    """
    @return: whether the document is in the state C{action} leads to, by a
        TD3.1 by uniqueId; C{None} when the search failed.
    """
    try:
        found = await resource.service.td31(
            context, patient=patient, unique_ids=[unique_id]
        )
    except Exception as error:
        _log.warn(
            "TD3.3 check by uniqueId failed: {error}", error=excerpt(str(error), 300)
        )
        return None
    current = _current(found.entries)
    if action == "delete":
        return not current and any(
            e.availabilityStatus == Status.Deleted for e in found.entries
        )
    if not current:
        return None
    # Done when doing it again would change nothing.
    return _conflict(current[-1], action) is not None


_AGENT = {"agentContext": _CONTEXT_SCHEMA}
#: An XDS time, UTC: YYYY[MM[DD[hh[mm[ss]]]]], a real date and time.
_TIME_SCHEMA = {"type": "string", "maxLength": MAX_TIME, "pattern": DTM_PATTERN}

#: The DocumentEntry attributes a submission may set instead of the CDA's.
_OVERRIDES_SCHEMA = {
    "type": "object",
    "description": "XDS attribute -> value; codes as {code, codingScheme, display}",
    "properties": {
        **{name: _GIVEN_CODE_SCHEMA for name in sorted(CODED_OVERRIDES)},
        "classCode": _CLASS_CODE_SCHEMA,
        **{
            name: {"type": "array", "items": _GIVEN_CODE_SCHEMA}
            for name in sorted(CODED_LIST_OVERRIDES)
        },
        **{
            name: (
                {"type": "string", "maxLength": MAX_TIME, "pattern": DTM_PATTERN}
                if name.endswith("Time")
                else {"type": "string", "maxLength": MAX_FREE_TEXT}
            )
            for name in sorted(TEXT_OVERRIDES)
        },
        "title": {"type": "string", "minLength": 1, "maxLength": MAX_FREE_TEXT},
        "languageCode": {"type": "string", "maxLength": 64},
    },
    "additionalProperties": False,
}


def _timings_schema(start: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": start + "the DMP exchange (handshake included, with the "
        "connection used: new handshake, resumed, reused, or unknown when it "
        "could not be told), the TLS handshake when the exchange made one, and "
        "the card's TLS signature when a new handshake needed one",
        "properties": {
            "submissionSetSignature": {"type": ["number", "null"]},
            "dmp": {"type": "number"},
            "connection": {"enum": ["new handshake", "resumed", "reused", "unknown"]},
            "handshake": {"type": ["number", "null"]},
            "handshakeSignature": {"type": ["number", "null"]},
        },
    }


ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/health",
        "health",
        "The facade is up; the DMP it talks to.",
        _health,
        None,
        {
            "type": "object",
            "required": ["status", "dmp"],
            "properties": {"status": {"const": "ok"}, "dmp": {"type": "string"}},
        },
        errors=(431,),
    ),
    Route(
        "GET",
        "/openapi.json",
        "openapi",
        "This description.",
        _openapi,
        None,
        {"type": "object", "required": ["openapi", "paths"]},
        errors=(431,),
    ),
    Route(
        "POST",
        "/dmp/td02Exist",
        "td02Exist",
        "TD0.2: does the patient have a DMP, and is the professional authorised on it.",
        _td02,
        {
            "type": "object",
            "required": ["agentContext", "patient"],
            "properties": {**_AGENT, "patient": _PATIENT_SCHEMA},
            "additionalProperties": False,
        },
        {
            "type": "object",
            "required": ["exists", "responseCode"],
            "properties": {
                "exists": {"type": "boolean"},
                "responseCode": {"type": "string"},
                "authorization": {"type": ["string", "null"]},
                "status": {"type": ["string", "null"]},
                "family": {"type": ["string", "null"]},
                "given": {"type": ["string", "null"]},
                "attentions": {
                    "type": "object",
                    "additionalProperties": {"type": "string"},
                },
                "timings": _timings_schema("seconds: "),
            },
        },
    ),
    Route(
        "POST",
        "/dmp/td21SubmitDocuments",
        "td21SubmitDocuments",
        "TD2.1: submit CDA documents of one patient; metadata derived from "
        "the CDA, overrides applied, the submission set signed with the card. "
        "Success only on the DMP's Success. Multipart/form-data: a part "
        "'agentContext' (JSON), the documents as file parts, an optional "
        "part 'overrides' (a JSON list, one object per document).",
        _td21,
        {
            "type": "object",
            "required": ["agentContext", "documents"],
            "properties": {
                **_AGENT,
                "documents": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_DOCUMENTS,
                    "items": {
                        "type": "object",
                        "required": ["content"],
                        "properties": {
                            "content": {
                                "type": "string",
                                "contentEncoding": "base64",
                                "pattern": BASE64_PATTERN,
                            },
                            "overrides": _OVERRIDES_SCHEMA,
                        },
                        "additionalProperties": False,
                    },
                },
            },
            "additionalProperties": False,
        },
        {
            "type": "object",
            "required": ["status", "outcome", "submissionSet", "documents"],
            "properties": {
                "status": {"const": "Success"},
                "outcome": {
                    "enum": [
                        "answered",
                        "stored-after-lost-answer",
                        "resent-after-lost-answer",
                    ]
                },
                "submissionSet": {
                    "type": "object",
                    "required": ["uniqueId", "entryUUID"],
                    "properties": {
                        "uniqueId": {"type": "string"},
                        "entryUUID": {"type": "string"},
                    },
                },
                "documents": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["uniqueId", "entryUUID"],
                        "properties": {
                            "uniqueId": {"type": "string"},
                            "entryUUID": {"type": "string"},
                            "title": {"type": "string"},
                            "mimeType": {"type": "string"},
                            "classCode": _CODE_SCHEMA,
                            "typeCode": _CODE_SCHEMA,
                        },
                    },
                },
                "warnings": _WARNINGS,
                "timings": _timings_schema(
                    "seconds: the card's submission-set signature, "
                ),
            },
        },
        request_types=(JSON, MULTIPART),
        errors=(400, 401, 403, 409, 413, 422, 423, 429, 431, 502, 503, 504),
        error_texts=(
            (
                409,
                "no-signature-key: the card has no signature key, so the "
                "submission set cannot be signed; nothing was sent to the DMP. "
                "The other transactions still work with this card",
            ),
        ),
    ),
    Route(
        "POST",
        "/dmp/td31Find",
        "td31Find",
        "TD3.1: the patient's documents (FindDocuments), or the patient's "
        "documents by uniqueIds or entryUUIDs (GetDocuments). The patient is "
        "required either way: it goes into the VIHF, and the DMP answers only "
        "about that patient's record (another patient's document is unknown). "
        "statuses, the creation times and the codes filter a search: given with "
        "uniqueIds or entryUUIDs, which return each document whatever its "
        "status, they are refused (400).",
        _td31,
        {
            "type": "object",
            "required": ["agentContext", "patient"],
            "properties": {
                **_AGENT,
                "patient": _PATIENT_SCHEMA,
                "statuses": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "string", "maxLength": 64},
                },
                "creationFrom": _TIME_SCHEMA,
                "creationTo": _TIME_SCHEMA,
                "classCodes": {
                    "type": "array",
                    "minItems": 1,
                    "items": _GIVEN_CODE_SCHEMA,
                },
                "typeCodes": {
                    "type": "array",
                    "minItems": 1,
                    "items": _GIVEN_CODE_SCHEMA,
                },
                "confidentialityCodes": {
                    "type": "array",
                    "minItems": 1,
                    "items": _GIVEN_CODE_SCHEMA,
                },
                "uniqueIds": {
                    "type": "array",
                    "items": _UNIQUE_ID_SCHEMA,
                    "minItems": 1,
                    "uniqueItems": True,
                },
                "entryUUIDs": {
                    "type": "array",
                    "items": {"type": "string", "pattern": ENTRY_UUID_PATTERN},
                    "minItems": 1,
                    "uniqueItems": True,
                    "description": "compared without regard to case",
                },
            },
            "additionalProperties": False,
        },
        {
            "type": "object",
            "required": ["documents"],
            "properties": {
                "documents": {"type": "array", "items": _ENTRY_SCHEMA},
                "warnings": _WARNINGS,
            },
        },
    ),
    Route(
        "POST",
        "/dmp/td32Retrieve",
        "td32Retrieve",
        "TD3.2: a document's exact bytes, base64 in JSON, or raw as "
        "application/octet-stream or under the document's mimeType: whichever "
        "Accept weighs most (JSON when it prefers none; 406 when it allows "
        "none of the three). The "
        "patient is required: it goes into the VIHF, and a document of another "
        "patient is answered as one the DMP does not have (404, as an unknown "
        "or deleted one).",
        _td32,
        {
            "type": "object",
            "required": ["agentContext", "patient", "uniqueId"],
            "properties": {
                **_AGENT,
                "patient": _PATIENT_SCHEMA,
                "uniqueId": _UNIQUE_ID_SCHEMA,
            },
            "additionalProperties": False,
        },
        {
            "type": "object",
            "required": ["uniqueId", "mimeType", "content"],
            "properties": {
                "uniqueId": {"type": "string"},
                "repositoryUniqueId": {"type": "string"},
                "mimeType": {"type": "string"},
                "size": {"type": "integer"},
                "content": {"type": "string", "contentEncoding": "base64"},
            },
        },
        answer_types=(JSON, "application/octet-stream", ANY_MEDIA),
        errors=(400, 401, 403, 404, 406, 413, 422, 423, 429, 431, 502, 503, 504),
    ),
    Route(
        "POST",
        "/dmp/td33UpdateStatus",
        "td33UpdateStatus",
        "TD3.3: mask or unmask a document from professionals, archive, "
        "unarchive or delete it. The patient is required: it goes into the "
        "VIHF, and a document of another patient is answered as unknown (404, "
        "as a deleted one); an action that would not change the document's "
        "state (archiving an archived one, masking a masked one) is 409.",
        _td33,
        {
            "type": "object",
            "required": ["agentContext", "patient", "uniqueId", "action"],
            "properties": {
                **_AGENT,
                "patient": _PATIENT_SCHEMA,
                "uniqueId": _UNIQUE_ID_SCHEMA,
                "action": {"enum": list(UPDATE_ACTIONS)},
            },
            "additionalProperties": False,
        },
        {
            "type": "object",
            "required": ["status", "uniqueId", "action", "outcome"],
            "properties": {
                "status": {"const": "Success"},
                "uniqueId": {"type": "string"},
                "action": {"type": "string"},
                "outcome": {
                    "enum": ["answered", "applied-after-lost-answer"],
                    "description": "applied-after-lost-answer: the DMP's answer "
                    "never came, and a search by uniqueId shows the update applied",
                },
            },
        },
        errors=(400, 401, 403, 404, 409, 413, 422, 423, 429, 431, 502, 503, 504),
    ),
)

_STATUS_TEXT = {
    400: "malformed request",
    401: "the agent session expired (enter the PIN again)",
    403: "the agent context's URL leads outside the networks the facade may "
    "reach agents in (--agent-network); nothing was sent there",
    404: "no such document for this patient: unknown, deleted or replaced "
    "(the detail says which)",
    406: "Accept allows none of the answer's forms (JSON, the document's own "
    "media type, application/octet-stream)",
    409: "the document is already in the state asked for",
    413: "request body too large; for a submission, more documents than it may carry",
    422: "the document is invalid, or the DMP refused (its codes in 'errors')",
    423: "the card's PIN is blocked",
    429: "the agent takes no more requests of this session for now (it limits "
    "card signatures): try again after Retry-After seconds",
    431: "a request line or header line over 16384 bytes; the connection closes",
    502: "the agent or the DMP failed: unreachable, TLS handshake refused "
    "(step and alert named), SOAP fault",
    503: "no CPS card in the reader, or the facade is stopping",
    504: "the DMP or the agent did not answer in time; for a submission or "
    "a status update, an outcome that could not be confirmed",
}


def _answer_schema(route: Route, media_type: str) -> dict[str, Any]:
    if media_type == JSON:
        return route.answer
    if media_type == ANY_MEDIA:
        return {
            "type": "string",
            "description": "the bytes under the document's own mimeType, when "
            "Accept names it",
        }
    return {"type": "string", "contentMediaType": media_type}


def openapi() -> dict[str, Any]:
    """
    @return: the OpenAPI 3.1 description of L{ROUTES}.
    """
    paths: dict[str, Any] = {}
    for route in ROUTES:
        responses: dict[str, Any] = {
            "200": {
                "description": "done",
                "content": {
                    t: {"schema": _answer_schema(route, t)} for t in route.answer_types
                },
            }
        }
        texts = {**_STATUS_TEXT, **dict(route.error_texts)}
        for status in route.errors:
            responses[str(status)] = {
                "description": texts[status],
                "content": {
                    PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}
                },
            }
        # Any operation may fail in the facade itself.
        responses["500"] = {"$ref": "#/components/responses/InternalError"}
        operation: dict[str, Any] = {
            "operationId": route.operation_id,
            "summary": route.summary,
            "responses": responses,
        }
        if route.request is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {
                    t: {"schema": MULTIPART_SCHEMA if t == MULTIPART else route.request}
                    for t in route.request_types
                },
            }
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "cpsdmp facade",
            "version": "1",
            "description": "DMP transactions for backends, authenticated with "
            "the professional's CPS card through their agent. A path not "
            "described here is answered 404 (components/responses/NotFound), a "
            "method a described path does not take 405 with an Allow header "
            "(components/responses/MethodNotAllowed), both as problem documents. "
            "Every answer carries Cache-Control: no-store and "
            "X-Content-Type-Options: nosniff; a document retrieved raw "
            "(td32Retrieve) comes as Content-Disposition: attachment with a "
            "file name made of its uniqueId.",
        },
        "paths": paths,
        "components": {
            "schemas": {"Problem": PROBLEM_SCHEMA},
            "responses": {
                "NotFound": _problem_response(
                    "no such path: a problem of type not-found", "not-found"
                ),
                "MethodNotAllowed": {
                    **_problem_response(
                        "the path does not take this method: a problem of type "
                        "method-not-allowed, its detail naming the methods it takes",
                        "method-not-allowed",
                    ),
                    "headers": {
                        "Allow": {
                            "description": "the methods the path takes",
                            "schema": {"type": "string"},
                        }
                    },
                },
                "InternalError": _problem_response(
                    "an unexpected failure in the facade, logged there: a "
                    "problem of type internal-error",
                    "internal-error",
                ),
            },
        },
    }


def _problem_response(description: str, kind: str) -> dict[str, Any]:
    """
    @return: an OpenAPI response: a problem document of type C{kind}.
    """
    return {
        "description": description,
        "content": {
            PROBLEM_JSON: {
                "schema": {
                    "allOf": [
                        {"$ref": "#/components/schemas/Problem"},
                        {"properties": {"type": {"const": PROBLEM_BASE + kind}}},
                    ]
                }
            }
        },
    }


@dataclass
class RawAnswer:
    """
    An answer sent as bytes with its media type rather than as JSON.
    """

    data: bytes
    media_type: str
    #: When set, the answer is a file to save, never to display: a CDA
    #: served as text/xml may carry a stylesheet a browser would run.
    filename: str | None = None


#: The extension a retrieved document's file takes, by media type.
_EXTENSIONS = {"text/xml": ".xml", "application/xml": ".xml", "application/pdf": ".pdf"}


def document_filename(unique_id: str, media_type: str) -> str:
    """
    @return: a file name for a retrieved document: its uniqueId with only
        letters, digits, dots, dashes and underscores, and an extension.
    """
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", unique_id)[:128].lstrip(".") or "document"
    return stem + _EXTENSIONS.get(media_type, ".bin")


class FacadeResource(Resource):
    """
    The REST API: dispatches on method and path through L{ROUTES}.
    """

    isLeaf = True

    def __init__(self, service: DmpService) -> None:
        super().__init__()
        self.service = service
        self._routes = {(r.method, r.path): r for r in ROUTES}
        #: The requests being answered, and the work that answers each.
        self._in_flight: dict[server.Request, Deferred[Any]] = {}
        #: Those L{stop} cut short.
        self._stopped: set[server.Request] = set()
        service.on_close.append(self.stop)

    def stop(self) -> Deferred[Any]:
        """
        Stop the requests under way, as the facade stops: each is answered
        at once (503, or its unknown outcome when it may have changed the
        DMP) and its connection closed, instead of waiting for an agent or
        a DMP that may hang.

        @return: a Deferred that fires once their connections are closed, or
            after L{STOP_WAIT} seconds.
        """
        under_way = list(self._in_flight.items())
        if under_way:
            _log.info(
                "stopping: {count} requests under way are answered and closed",
                count=len(under_way),
            )
        closed = []
        for request, work in under_way:
            self._stopped.add(request)
            channel = request.channel
            if isinstance(channel, FacadeChannel):
                closed.append(channel.when_closed())
            work.cancel()
        waiting = DeferredList(closed)
        waiting.addTimeout(STOP_WAIT, self.service.reactor)
        return waiting.addErrback(lambda _: None)

    def patient(self, value: Any) -> PatientId:
        if not isinstance(value, Mapping):
            raise BadRequest("'patient' must be an object {ins, authority?}")
        if "ins" not in value:
            raise BadRequest("'patient' lacks its 'ins'")
        if not isinstance(value["ins"], str):
            raise BadRequest(
                "'patient.ins' must be a string, the patient's INS of 15 "
                f"characters, not {_json_kind(value['ins'])}"
            )
        authority = value.get("authority", self.service.config.defaults.ins_authority)
        if not isinstance(authority, str):
            raise BadRequest(
                "'patient.authority' must be the OID of an INS authority, not "
                f"{_json_kind(authority)}"
            )
        # Bounded before any message quotes them: an INS has at most 15
        # characters, an OID at most 64.
        _bounded(value["ins"], "patient.ins", 15)
        _bounded(authority, "patient.authority", 64)
        try:
            return PatientId(value["ins"], authority)
        except MetadataError as error:
            raise BadRequest(str(error)) from None

    def render(self, request: server.Request) -> Any:
        method = (request.method or b"").decode("ascii", "replace")
        path = (request.path or b"").decode("utf-8", "replace")
        # HEAD is GET without the body, which twisted.web leaves out.
        route = self._routes.get(("GET" if method == "HEAD" else method, path))
        if route is None:
            allowed = sorted(m for m, p in self._routes if p == path)
            if "GET" in allowed:
                allowed = sorted([*allowed, "HEAD"])
            if allowed:
                request.setHeader(b"allow", ", ".join(allowed).encode())
                problem = Problem(
                    405,
                    "method-not-allowed",
                    "Method not allowed",
                    f"use {', '.join(allowed)}",
                )
            else:
                problem = Problem(404, "not-found", "Not found", f"no route {path}")
            self._send_problem(request, problem)
            return server.NOT_DONE_YET
        d = ensureDeferred(self._handle(route, request))
        d.addErrback(lambda f: _log.failure("answering {path}", f, path=path))
        return server.NOT_DONE_YET

    async def _handle(self, route: Route, request: server.Request) -> None:
        assert route.handler is not None
        # The request lets go of its channel once finished.
        channel = request.channel
        try:
            body = self._body(route, request)
            work = ensureDeferred(route.handler(self, request, body))
            self._in_flight[request] = work
            try:
                answer = await work
            finally:
                self._in_flight.pop(request, None)
        except Exception as error:
            problem = problem_for(error)
            if request in self._stopped and not isinstance(error, UnknownOutcome):
                problem = Problem(
                    503,
                    "stopping",
                    "The facade is stopping",
                    "the facade stopped while this request was under way, before "
                    "it was done; send it again once the facade is back",
                )
            if problem.status == 500:
                _log.failure(
                    "{operation} failed", Failure(), operation=route.operation_id
                )
            else:
                _log.info(
                    "{operation}: {status} {kind}",
                    operation=route.operation_id,
                    status=problem.status,
                    kind=problem.kind,
                )
            self._send_problem(request, problem)
            self._close_if_stopping(request, channel)
            return
        if request._disconnected:
            return
        if isinstance(answer, RawAnswer):
            request.setHeader(b"content-type", answer.media_type.encode())
            if answer.filename is not None:
                request.setHeader(
                    b"content-disposition",
                    f'attachment; filename="{answer.filename}"'.encode("ascii"),
                )
            request.write(answer.data)
        else:
            request.setHeader(b"content-type", JSON.encode())
            request.write(json.dumps(answer, ensure_ascii=False).encode("utf-8"))
        request.finish()
        self._close_if_stopping(request, channel)

    def _close_if_stopping(self, request: server.Request, channel: Any) -> None:
        """
        Once the facade stops, close each connection after its answer.
        """
        self._stopped.discard(request)
        if self.service.stopping and channel is not None:
            channel.loseConnection()

    def _body(self, route: Route, request: server.Request) -> Any:
        if route.request is None:
            return None
        given = request.getHeader("content-type") or ""
        content_type = given.lower()
        assert request.content is not None
        request.content.seek(0)
        raw = request.content.read()
        if content_type.startswith(MULTIPART) and (MULTIPART in route.request_types):
            return _multipart(given, raw)
        if not content_type.startswith(JSON):
            # Quoted as given: a boundary's case is its own.
            said = excerpt(given, 80) if given else "absent"
            raise BadRequest(f"the body must be {JSON}, not {said}")
        body = _json(raw, "the body")
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        check_members(body, route.request, "the body")
        return body

    def _send_problem(self, request: server.Request, problem: Problem) -> None:
        if request._disconnected:
            return
        request.setResponseCode(problem.status, reason_phrase(problem.status))
        request.setHeader(b"content-type", PROBLEM_JSON.encode())
        retry_after = problem.extra.get("retryAfter")
        if isinstance(retry_after, int):
            request.setHeader(b"retry-after", str(retry_after).encode())
        # A detail that quotes a request's lone surrogate (a JSON escape
        # UTF-8 cannot encode) says it as the same JSON escape.
        request.write(
            json.dumps(problem.document(), ensure_ascii=False).encode(
                "utf-8", "backslashreplace"
            )
        )
        request.finish()


def _json(raw: bytes, what: str) -> Any:
    """
    @return: C{raw} read as JSON, strictly (L{strictjson.loads}).
    @raise BadRequest: it is not JSON, is nested too deeply to be read, or
        names a member twice in one object.
    """
    try:
        return strictjson.loads(raw)
    except strictjson.JsonRefused as error:
        raise BadRequest(f"{what} {error}") from None


#: Reads a form part's header block.
_FORM_HEADERS = email.parser.BytesHeaderParser(policy=email.policy.HTTP)


def _multipart(content_type: str, raw: bytes) -> dict[str, Any]:
    """
    Read a multipart/form-data TD2.1: the part C{agentContext}, an optional
    part C{overrides}, and every part with a file name as a document.

    The parts are found by their delimiter lines, in one pass over the body,
    and a form with more parts than a submission takes is refused as soon
    as one too many begins; only each part's small header block is parsed,
    and a document is a slice of the body, its bytes as they were sent.
    """
    _, params = content_type_params(content_type)
    boundary = params.get("boundary")
    if not boundary:
        raise BadRequest(
            "the multipart/form-data body has no boundary in its Content-Type"
        )
    try:
        parts = split_parts(raw, boundary, MAX_DOCUMENTS + 2)
    except TooManyParts:
        raise TooManyDocuments(
            f"a submission carries at most {MAX_DOCUMENTS} documents, and the "
            f"form has more than {MAX_DOCUMENTS + 2} parts (the context, the "
            "overrides and the documents): send them in several submissions"
        ) from None
    except MultipartError as error:
        raise BadRequest(
            f"the multipart/form-data body cannot be read: {error}"
        ) from None
    context: Any = None
    overrides: Any = None
    documents: list[tuple[str, bytes]] = []
    seen: set[str] = set()
    for number, part in enumerate(parts, 1):
        headers = _FORM_HEADERS.parsebytes(part.header_block)
        name = headers.get_param("name", header="content-disposition")
        filename = headers.get_filename()
        if not name:
            raise BadRequest(
                f"the form's part {number} has no name: each part's "
                'Content-Disposition is form-data; name="..."'
            )
        which = f"part {excerpt(str(name))}"
        encoding = str(headers.get("content-transfer-encoding", "binary"))
        if encoding.strip().lower() not in ("7bit", "8bit", "binary"):
            raise BadRequest(
                f"the form's {which} has the Content-Transfer-Encoding "
                f"{excerpt(encoding)}: a form's parts are sent as they are "
                "(RFC 7578 deprecates transfer encodings)"
            )
        if name in ("agentContext", "overrides"):
            if filename:
                raise BadRequest(
                    f"the form's part {name!r} has a filename: it is JSON, not a "
                    "document; send it without a filename"
                )
            if name in seen:
                raise BadRequest(
                    f"the form has two parts {name!r}: give each JSON part once"
                )
            seen.add(name)
            value = _json(bytes(part.content), f"the part {name!r}")
            if name == "agentContext":
                context = value
            else:
                overrides = value
        elif filename:
            documents.append((filename, bytes(part.content)))
        else:
            raise BadRequest(
                f"the form's {which} is not 'agentContext', nor "
                "'overrides', nor a file (a part with a filename)"
            )
    if context is None:
        raise BadRequest("the form has no part 'agentContext' (the JSON context)")
    if not documents:
        raise BadRequest(
            "the form has no file part: each CDA document is a part with a filename"
        )
    if overrides is not None and (
        not isinstance(overrides, list) or len(overrides) != len(documents)
    ):
        raise BadRequest("'overrides' must be a list with one object per document")
    return {
        "agentContext": context,
        "documents": [
            {
                "content": data,
                "name": filename,
                "overrides": overrides[i] if overrides else {},
            }
            for i, (filename, data) in enumerate(documents)
        ],
    }


class BoundedRequest(bounded.BoundedRequest):
    """
    A request whose body is refused (413) above C{max_body} bytes: at once
    when its Content-Length says so, else, for a chunked body, once it is
    read, what is over the limit read off the connection but not kept.
    """

    max_body = DEFAULT_MAX_REQUEST_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Answers carry health data: no cache keeps them, and no browser
        # reads them as another type than the one they say.
        self.setHeader(b"cache-control", b"no-store")
        self.setHeader(b"x-content-type-options", b"nosniff")

    def too_large_problem(self) -> Problem:
        return Problem(
            413,
            "too-large",
            "Request body too large",
            f"the body is over {self.max_body} bytes",
        )

    def too_large_answer(self) -> bytes:
        payload = json.dumps(self.too_large_problem().document()).encode()
        return closing_answer(413, PROBLEM_JSON, payload)

    def refuse_too_large(self) -> None:
        self.setResponseCode(413, reason_phrase(413))
        self.setHeader(b"content-type", PROBLEM_JSON.encode())
        self.setHeader(b"connection", b"close")
        self.write(json.dumps(self.too_large_problem().document()).encode())
        self.finish()


class FacadeChannel(HeaderLimitChannel):
    """
    The facade's HTTP/1.1 connections: a request line or header too long to
    read is answered 431 with a problem document; L{when_closed} tells when
    the connection is closed, its answers sent.
    """

    def __init__(self) -> None:
        super().__init__()
        self._closed = False
        self._waiting: list[Deferred[None]] = []

    def when_closed(self) -> Deferred[None]:
        """
        @return: a Deferred that fires once the connection is closed.
        """
        if self._closed:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self._closed = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def header_too_large(self) -> bytes:
        problem = Problem(
            431,
            "header-too-large",
            "Request header too large",
            f"a request line or header line is at most {self.MAX_LENGTH} bytes",
        )
        return closing_answer(
            431, PROBLEM_JSON, json.dumps(problem.document()).encode("utf-8")
        )


def make_site(
    service: DmpService,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    idle_timeout: float = IDLE_TIMEOUT,
    reactor: Any = None,
) -> server.Site:
    """
    @param idle_timeout: seconds a connection may stay silent while none of
        its requests is being answered (L{IDLE_TIMEOUT}).
    @return: the facade's web site, bodies limited to C{max_request_bytes}.
    """
    # The facade reads a form itself, and answers a malformed one with a
    # problem document: twisted.web would answer a bare 400 and close.
    site = server.Site(
        FacadeResource(service),
        parsePOSTFormSubmission=False,
        timeout=idle_timeout,
        reactor=reactor,
    )
    site.requestFactory = type(  # type: ignore[assignment]
        "BoundedFacadeRequest", (BoundedRequest,), {"max_body": max_request_bytes}
    )
    # HTTP/1.1 only (no HTTP/2 is negotiated), so the plain channel serves.
    site.protocol = FacadeChannel  # type: ignore[assignment]
    site.displayTracebacks = False
    return site
