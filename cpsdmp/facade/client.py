# twisted.web is not annotated.
# mypy: disable-error-code="no-untyped-call"
"""
A treq client for backends that call the facade: one method per route,
parsed answers, and the facade's problem documents raised as typed errors
(L{FacadeProblem} and its subclasses, chosen by the problem's type).
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from treq.client import HTTPClient
from twisted.internet.defer import Deferred, TimeoutError, ensureDeferred
from twisted.internet.error import ConnectError, ConnectionLost
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
)
from twisted.web.http import PotentialDataLoss

PROBLEM_BASE = "https://cpsdmp.invalid/problems/"


class FacadeError(Exception):
    """
    The facade could not be reached or answered something unreadable.
    """


class FacadeProblem(FacadeError):
    """
    The facade answered with a problem document.

    @ivar status: the HTTP status.
    @ivar kind: the problem type's last segment (C{dmp-refused}...).
    @ivar problem: the whole problem document.
    """

    def __init__(self, status: int, problem: Mapping[str, Any]) -> None:
        self.status = status
        self.problem = dict(problem)
        self.kind = str(problem.get("type", "")).rsplit("/", 1)[-1]
        title = problem.get("title", "error")
        detail = problem.get("detail", "")
        super().__init__(
            f"{status} {title}: {detail}" if detail else f"{status} {title}"
        )

    @property
    def errors(self) -> list[dict[str, str]]:
        """
        The DMP's own errors ({code, context, severity, location}), if any.
        """
        return list(self.problem.get("errors", []))

    @property
    def codes(self) -> list[str]:
        return [e.get("code", "") for e in self.errors]


class MalformedRequest(FacadeProblem):
    pass


class AgentSessionExpired(FacadeProblem):
    """
    The agent session ended: the professional must enter the PIN again.
    """


class CardPinBlocked(FacadeProblem):
    pass


class CardMissing(FacadeProblem):
    pass


class NoSignatureKey(FacadeProblem):
    """
    The card has no signature key: it cannot sign a submission set. The
    other transactions work with it; nothing was sent to the DMP.
    """


class CardRateLimited(FacadeProblem):
    """
    The agent refused a card signature: the session reached its signature
    limit. Nothing was sent to the DMP; try again after L{retry_after}
    seconds.
    """

    @property
    def retry_after(self) -> int | None:
        value = self.problem.get("retryAfter")
        return value if isinstance(value, int) else None


class InvalidDocument(FacadeProblem):
    """
    A CDA document or its metadata is invalid; the detail names the element.
    """


class DmpRefused(FacadeProblem):
    """
    The DMP refused the request; L{errors} carries its codes.
    """


class AgentFailed(FacadeProblem):
    pass


class AgentNotAllowed(AgentFailed):
    """
    The agent context's URL leads outside the networks the facade may reach
    agents in; nothing was sent there.
    """


class DocumentNotFound(FacadeProblem):
    """
    TD3.2 or TD3.3 of a document the DMP does not have for the patient:
    unknown, deleted or replaced (the detail says which).
    """


class HandshakeRefused(FacadeProblem):
    """
    The TLS handshake with the DMP failed; the problem names the step and
    the alert.
    """


class DmpFailed(FacadeProblem):
    """
    The DMP was unreachable, answered a fault, or something unusable.
    """


class DmpTimedOut(FacadeProblem):
    pass


class AgentTimedOut(AgentFailed):
    """
    The agent did not answer in time (the workstation asleep, the card slow).
    """


class OutcomeUnknown(DmpTimedOut):
    """
    A submission's answer never came and the facade could not confirm it:
    search by the uniqueIds before sending it again.
    """

    @property
    def unique_ids(self) -> list[str]:
        return list(self.problem.get("uniqueIds", []))


_KINDS: Mapping[str, type[FacadeProblem]] = {
    "malformed-request": MalformedRequest,
    "token-expired": AgentSessionExpired,
    "wrong-pin": AgentSessionExpired,
    "pin-blocked": CardPinBlocked,
    "card-rate-limited": CardRateLimited,
    "no-card": CardMissing,
    "no-signature-key": NoSignatureKey,
    "invalid-cda": InvalidDocument,
    "card-holder-unusable": AgentFailed,
    "document-not-found": DocumentNotFound,
    "dmp-refused": DmpRefused,
    "agent-unreachable": AgentFailed,
    "agent-mismatch": AgentFailed,
    "agent-not-allowed": AgentNotAllowed,
    "agent-error": AgentFailed,
    "handshake-failed": HandshakeRefused,
    "handshake-refused": HandshakeRefused,
    "tls-error": HandshakeRefused,
    "dmp-unreachable": DmpFailed,
    "dmp-answer-lost": DmpFailed,
    "dmp-fault": DmpFailed,
    "dmp-bad-answer": DmpFailed,
    "dmp-timeout": DmpTimedOut,
    "agent-timeout": AgentTimedOut,
    "outcome-unknown": OutcomeUnknown,
}


def problem_error(status: int, problem: Mapping[str, Any]) -> FacadeProblem:
    """
    @return: the typed error for a problem document.
    """
    kind = str(problem.get("type", "")).rsplit("/", 1)[-1]
    return _KINDS.get(kind, FacadeProblem)(status, problem)


class _BodyReader(Protocol):
    """
    Reads an answer's body; cancelling L{done} closes the connection it
    comes on, so that a body that stalls is not waited for.
    """

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def _cancel(self, _: object) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return  # cancelled: the end of the connection says nothing more
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


class FacadeClient:
    """
    Calls a facade at C{url} (C{http://127.0.0.1:10080}).
    """

    def __init__(
        self,
        url: str,
        reactor: Any = None,
        timeout: float = 300.0,
        http: HTTPClient | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._reactor = reactor
        self._pool = HTTPConnectionPool(reactor)
        self._http = http or HTTPClient(Agent(reactor, pool=self._pool))

    def close(self) -> Deferred[None]:
        """
        @return: a Deferred that fires once the pooled connections are closed.
        """
        closing: Deferred[None] = self._pool.closeCachedConnections()
        return closing

    async def _exchange(
        self, method: str, path: str, kwargs: dict[str, Any]
    ) -> tuple[Any, bytes]:
        response = await self._http.request(
            method, self.url + path, unbuffered=True, **kwargs
        )
        reader = _BodyReader()
        response.deliverBody(reader)
        return response, await reader.done

    async def _call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        accept: str = "application/json",
        raw: bool = False,
        form: tuple[bytes, str] | None = None,
    ) -> Any:
        """
        @param form: a body and its content type, sent instead of C{body}.
        """
        kwargs: dict[str, Any] = {"headers": {"Accept": accept}}
        if body is not None:
            kwargs["data"] = json.dumps(body).encode("utf-8")
            kwargs["headers"]["Content-Type"] = "application/json"
        if form is not None:
            kwargs["data"], kwargs["headers"]["Content-Type"] = form
        # One timeout for the whole exchange: connection, answer and body.
        exchange = ensureDeferred(self._exchange(method, path, kwargs))
        # Cancelled at the timeout, the exchange fails with whatever the
        # step it was in makes of it: say it was the timeout.
        exchange.addTimeout(
            self.timeout,
            self._reactor,
            onTimeoutCancel=lambda result, timeout: Failure(TimeoutError()),
        )
        try:
            response, content = await exchange
        except TimeoutError:
            raise FacadeError(
                f"the facade at {self.url} did not answer within {self.timeout:g} s"
            ) from None
        except ConnectError as error:
            raise FacadeError(
                f"no connection to the facade at {self.url}: {error}"
            ) from None
        except (ResponseFailed, RequestTransmissionFailed, ConnectionLost) as error:
            reasons = getattr(error, "reasons", None) or [error]
            said = "; ".join(
                r.getErrorMessage() if hasattr(r, "getErrorMessage") else str(r)
                for r in reasons
            )
            raise FacadeError(
                f"the connection to the facade at {self.url} failed: {said}"
            ) from None
        content_type = (response.headers.getRawHeaders("content-type") or [""])[0]
        if response.code >= 400:
            if content_type.startswith("application/problem+json"):
                try:
                    problem = json.loads(content)
                except ValueError:
                    problem = None
                if isinstance(problem, dict):
                    raise problem_error(response.code, problem)
            raise FacadeError(
                f"the facade answered HTTP {response.code} without a problem document"
            )
        if raw:
            return content, content_type
        try:
            return json.loads(content)
        except ValueError:
            raise FacadeError("the facade's answer is not JSON") from None

    def health(self) -> Deferred[dict[str, Any]]:
        """
        @return: a Deferred that fires with C{{"status": "ok", "dmp": url}}.
        """
        return ensureDeferred(self._call("GET", "/health"))

    def openapi(self) -> Deferred[dict[str, Any]]:
        return ensureDeferred(self._call("GET", "/openapi.json"))

    def td02_exist(
        self, patient: Mapping[str, str], agent_context: Mapping[str, Any]
    ) -> Deferred[dict[str, Any]]:
        """
        @param patient: C{{"ins", "authority"?}}.
        @return: a Deferred that fires with C{{"exists", "authorization", ...}}.
        """
        return ensureDeferred(
            self._call(
                "POST",
                "/dmp/td02Exist",
                {"agentContext": dict(agent_context), "patient": dict(patient)},
            )
        )

    def td21_submit(
        self,
        documents: Sequence[bytes],
        agent_context: Mapping[str, Any],
        overrides: Sequence[Mapping[str, Any] | None] | None = None,
        names: Sequence[str] | None = None,
    ) -> Deferred[dict[str, Any]]:
        """
        Submit CDA documents of one patient.

        @param overrides: per document, XDS attributes to set (codes as
            C{{"code", "codingScheme", "display"}}).
        @param names: per document, a file name: given, the documents go as
            the files of a multipart/form-data form, as they are, instead of
            in base64 in JSON (a third larger, against the facade's limit
            on a request's body); the facade's problems name them.
        @return: a Deferred that fires with C{{"status": "Success", "outcome",
            "submissionSet", "documents": [{"uniqueId", "entryUUID"...}]}}.
        @raise DmpRefused: with the DMP's codes.
        """
        if names is not None:
            form = _form(documents, names, agent_context, overrides)
            return ensureDeferred(
                self._call("POST", "/dmp/td21SubmitDocuments", form=form)
            )
        items = []
        for index, data in enumerate(documents):
            item: dict[str, Any] = {"content": base64.b64encode(data).decode("ascii")}
            if overrides and overrides[index]:
                item["overrides"] = dict(overrides[index] or {})
            items.append(item)
        return ensureDeferred(
            self._call(
                "POST",
                "/dmp/td21SubmitDocuments",
                {"agentContext": dict(agent_context), "documents": items},
            )
        )

    def td31_find(
        self,
        agent_context: Mapping[str, Any],
        patient: Mapping[str, str] | None = None,
        **criteria: Any,
    ) -> Deferred[list[dict[str, Any]]]:
        """
        @param patient: required by the facade, for a search by uniqueIds or
            entryUUIDs too: the DMP answers only about the VIHF's patient.
        @param criteria: C{statuses}, C{uniqueIds}, C{entryUUIDs},
            C{classCodes}... as the route takes them.
        @return: a Deferred that fires with the documents' metadata.
        """
        body: dict[str, Any] = {"agentContext": dict(agent_context), **criteria}
        if patient is not None:
            body["patient"] = dict(patient)
        d = ensureDeferred(self._call("POST", "/dmp/td31Find", body))
        return d.addCallback(lambda answer: list(answer["documents"]))

    def td32_retrieve(
        self,
        unique_id: str,
        agent_context: Mapping[str, Any],
        patient: Mapping[str, str] | None = None,
    ) -> Deferred[bytes]:
        """
        @param patient: the document's patient, required by the facade (it
            goes into the VIHF; the DMP answers only about that patient).
        @return: a Deferred that fires with the document's exact bytes.
        """
        body: dict[str, Any] = {
            "agentContext": dict(agent_context),
            "uniqueId": unique_id,
        }
        if patient is not None:
            body["patient"] = dict(patient)
        d = ensureDeferred(
            self._call(
                "POST",
                "/dmp/td32Retrieve",
                body,
                accept="application/octet-stream",
                raw=True,
            )
        )
        return d.addCallback(lambda answer: answer[0])

    def td33_update(
        self,
        unique_id: str,
        action: str,
        agent_context: Mapping[str, Any],
        patient: Mapping[str, str] | None = None,
    ) -> Deferred[dict[str, Any]]:
        """
        @param action: C{mask}, C{unmask}, C{archive}, C{unarchive} or C{delete}.
        @param patient: the document's patient, required by the facade.
        @return: a Deferred that fires with C{{"status": "Success", "uniqueId",
            "action", "outcome"}}; C{outcome} is C{applied-after-lost-answer}
            when the DMP's answer was lost and its state shows the update.
        """
        body: dict[str, Any] = {
            "agentContext": dict(agent_context),
            "uniqueId": unique_id,
            "action": action,
        }
        if patient is not None:
            body["patient"] = dict(patient)
        return ensureDeferred(self._call("POST", "/dmp/td33UpdateStatus", body))


def _form(
    documents: Sequence[bytes],
    names: Sequence[str],
    agent_context: Mapping[str, Any],
    overrides: Sequence[Mapping[str, Any] | None] | None,
) -> tuple[bytes, str]:
    """
    @return: a TD2.1 as a multipart/form-data body (RFC 7578) and its
        content type: the agent context and the overrides as JSON parts,
        each document as a file part.
    """
    if len(names) != len(documents):
        raise ValueError("one name per document")
    parts = [('name="agentContext"', "application/json", _json(agent_context))]
    if overrides and any(overrides):
        listed = [dict(each or {}) for each in overrides]
        parts.append(('name="overrides"', "application/json", _json(listed)))
    for name, data in zip(names, documents, strict=True):
        parts.append((f'name="documents"; {_filename(name)}', "text/xml", data))
    # A boundary that no part holds.
    boundary = f"cpsdmp-{secrets.token_hex(16)}"
    while any(boundary.encode() in content for _, _, content in parts):
        boundary = f"cpsdmp-{secrets.token_hex(16)}"
    body = b"".join(
        f"--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n"
        f"Content-Type: {media}\r\n\r\n".encode("ascii")
        + content
        + b"\r\n"
        for disposition, media, content in parts
    )
    body += f"--{boundary}--\r\n".encode("ascii")
    return body, f"multipart/form-data; boundary={boundary}"


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


def _filename(name: str) -> str:
    """
    @return: the filename parameter of a part: quoted when the name is
        printable ASCII without quote or backslash, else encoded as RFC 2231
        says (UTF-8, percent-escaped).
    """
    if name.isascii() and name.isprintable() and not set(name) & {'"', "\\"}:
        return f'filename="{name}"'
    return f"filename*=utf-8''{quote(name, safe='')}"


__all__ = [
    "AgentFailed",
    "AgentTimedOut",
    "AgentSessionExpired",
    "CardMissing",
    "CardPinBlocked",
    "CardRateLimited",
    "DmpFailed",
    "DmpRefused",
    "DmpTimedOut",
    "DocumentNotFound",
    "FacadeClient",
    "FacadeError",
    "FacadeProblem",
    "HandshakeRefused",
    "InvalidDocument",
    "MalformedRequest",
    "OutcomeUnknown",
    "problem_error",
]
