"""
The facade end to end over real sockets: the SoftHSM2 test card behind a
running agent, the sandbox DMP over mutual TLS, and the facade serving HTTP
on loopback, called through L{FacadeClient}. Every ANS example CDA goes
through TD0.2, TD2.1, TD3.1, TD3.2 and TD3.3; then the faults, the lost
answers of a submission, and the OpenAPI description against the routes.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import ip_network
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_description
from OpenSSL import crypto
from referencing import Registry
from referencing.jsonschema import DRAFT202012
from treq.client import HTTPClient
from twisted.internet import reactor, ssl
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import (
    ClientFactory,
    Factory,
    ProcessProtocol,
    Protocol,
)
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from cpsdmp.agent.card import KeyUsage
from cpsdmp.agent.card import PinBlocked as CardPinBlockedError
from cpsdmp.agent.client import CpsAgentClient, open_session
from cpsdmp.agent.holder import Holder
from cpsdmp.facade.client import (
    AgentFailed,
    AgentNotAllowed,
    AgentSessionExpired,
    AgentTimedOut,
    CardPinBlocked,
    CardRateLimited,
    DmpFailed,
    DmpRefused,
    DmpTimedOut,
    DocumentNotFound,
    FacadeClient,
    FacadeError,
    FacadeProblem,
    HandshakeRefused,
    InvalidDocument,
    MalformedRequest,
    OutcomeUnknown,
)
from cpsdmp.facade.client import NoSignatureKey as FacadeNoSignatureKey
from cpsdmp.facade.networks import AgentNetworkReactor
from cpsdmp.facade.resource import ROUTES, UPDATE_ACTIONS, make_site, openapi
from cpsdmp.facade.service import MAX_DOCUMENTS, FacadeConfig
from cpsdmp.facade.tap import FacadeService
from cpsdmp.protocols.httpserver import IDLE_TIMEOUT
from cpsdmp.sandbox.tap import SandboxService
from cpsdmp.xds.cda import CdaError, document_entry
from cpsdmp.xds.ebrim import INS_OID_TEST, CodedValue, Status
from tests.agent_support import shared_testcard, start_agent, token_backend
from tests.conformance.material import example_cdas
from tests.xdsvalues import DEFAULTS, SOFTWARE, STRUCTURE

CDA_PATIENT = {"ins": "279035121518989", "authority": INS_OID_TEST}
SYNTHESE = {
    "code": "11",
    "codingScheme": "1.2.250.1.213.1.1.4.1",
    "display": "Synthèse",
}
REPOSITORY = Path(__file__).resolve().parents[1]
CLASS_SYSTEM = "1.2.250.1.213.1.1.4.1"


def overrides_for(data: bytes) -> dict[str, Any] | None:
    """
    @return: a classCode for the example CDAs whose typeCode has none in the
        mapping, as a producer would give it; nothing otherwise.
    """
    try:
        document_entry(data, STRUCTURE, DEFAULTS)
    except CdaError as error:
        if "classCode" in str(error):
            return {"classCode": SYNTHESE}
    return None


def unique_id(data: bytes) -> str:
    """
    @return: the uniqueId the CDA's metadata carries (its ClinicalDocument/id).
    """
    classcode = CodedValue("11", "1.2.250.1.213.1.1.4.1", "Synthèse")
    return document_entry(data, STRUCTURE, DEFAULTS, {"classCode": classcode}).uniqueId


def cda(prefix: str) -> bytes:
    return next(p for p in example_cdas() if p.name.startswith(prefix)).read_bytes()


class CountingBackend:
    """
    The test card's backend, counting the signatures of each key.
    """

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        self.signatures = {KeyUsage.authentication: 0, KeyUsage.signature: 0}
        #: Called, in the card's thread, with the key of each signature.
        self.on_signature: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def sign_digest(self, usage: KeyUsage, algorithm: Any, digest: bytes) -> bytes:
        self.signatures[usage] += 1
        if self.on_signature is not None:
            self.on_signature(usage)
        return self._backend.sign_digest(usage, algorithm, digest)


PROBLEM = "application/problem+json"
JSON = "application/json"
#: The base URI under which the facade's description is given to jsonschema.
DESCRIPTION = "urn:cpsdmp:facade:openapi.json"


def _pointer(*parts: str) -> str:
    # RFC 6901: "~" and "/" escaped in each segment.
    return "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def conforms(
    value: Any, pointer: str, description: dict[str, Any] | None = None
) -> None:
    """
    Check C{value} with jsonschema against the schema at C{pointer} in the
    facade's OpenAPI description (JSON Schema 2020-12, the dialect of OpenAPI
    3.1), its references resolved in the description.

    @raise AssertionError: naming every place that does not conform.
    """
    registry: Registry[Any] = Registry().with_resource(
        DESCRIPTION, DRAFT202012.create_resource(description or openapi())
    )
    validator = Draft202012Validator({"$ref": DESCRIPTION + pointer}, registry=registry)
    errors = sorted(validator.iter_errors(value), key=lambda e: e.json_path)
    assert not errors, f"{pointer}: " + "; ".join(
        f"{e.json_path}: {e.message}" for e in errors
    )


def _operation(description: dict[str, Any], operation_id: str) -> tuple[str, str]:
    for path, operations in description["paths"].items():
        for method, operation in operations.items():
            if operation["operationId"] == operation_id:
                return path, method
    raise KeyError(operation_id)


def answer_schema(operation_id: str, status: str = "200") -> str:
    """
    @return: the pointer to the JSON schema of an operation's answer.
    """
    path, method = _operation(openapi(), operation_id)
    media = "application/json" if status == "200" else "application/problem+json"
    return _pointer(
        "paths", path, method, "responses", status, "content", media, "schema"
    )


@dataclass
class SentAnswer:
    """
    An answer the facade under test sent, with the request it answered.
    """

    method: str
    path: str
    status: int
    media_type: str
    body: bytes
    request_media_type: str
    request_body: bytes
    #: Its Cache-Control and X-Content-Type-Options headers.
    safety: tuple[list[bytes] | None, list[bytes] | None] = (None, None)


def recording(factory: type[Any], answers: list[SentAnswer]) -> type[Any]:
    """
    @return: a subclass of the facade's request factory that notes in
        C{answers} every answer sent, as it went on the wire.
    """

    class Recording(factory):  # type: ignore[misc, valid-type]
        sent = b""

        def write(self, data: bytes) -> None:
            self.sent += data
            super().write(data)

        def finish(self) -> Any:
            content = self.content
            request_body = b""
            if content is not None:
                content.seek(0)
                request_body = content.read()
            media = (self.responseHeaders.getRawHeaders(b"content-type") or [b""])[0]
            sent_media = (self.requestHeaders.getRawHeaders(b"content-type") or [b""])[
                0
            ]
            answers.append(
                SentAnswer(
                    self.method.decode(),
                    self.path.decode(),
                    self.code,
                    media.decode().split(";")[0].strip(),
                    self.sent,
                    sent_media.decode().split(";")[0].strip(),
                    request_body,
                    (
                        self.responseHeaders.getRawHeaders(b"cache-control"),
                        self.responseHeaders.getRawHeaders(b"x-content-type-options"),
                    ),
                )
            )
            return super().finish()

    return Recording


def check_answers(answers: list[SentAnswer], description: dict[str, Any]) -> None:
    """
    Check each answer against the description: its status is one the
    operation documents, its media type one documented for that status, its
    JSON body valid against that schema; and the request of each successful
    JSON call valid against the request schema, so that the description
    asks for no more than the facade needs.

    @raise AssertionError: naming the answer that does not conform.
    """
    for answer in answers:
        where = f"{answer.method} {answer.path} -> {answer.status}"
        # Every answer may carry health data: never cached, never sniffed.
        assert answer.safety == ([b"no-store"], [b"nosniff"]), where
        operations = description["paths"].get(answer.path, {})
        method = answer.method.lower()
        if method == "head" and "get" in operations:
            # What GET would answer, the body left out on the wire.
            method = "get"
        operation = operations.get(method)
        if operation is None:
            # Not described: only "no such route" or "not this method", as
            # the description's shared responses say.
            assert answer.status == (405 if operations else 404), where
            assert answer.media_type == "application/problem+json", where
            conforms(
                json.loads(answer.body),
                _pointer(
                    "components",
                    "responses",
                    "MethodNotAllowed" if operations else "NotFound",
                    "content",
                    "application/problem+json",
                    "schema",
                ),
                description,
            )
            continue
        status = str(answer.status)
        assert status in operation["responses"], f"{where}: status not described"
        base = ("paths", answer.path, method, "responses", status)
        response = operation["responses"][status]
        if "$ref" in response:
            # A shared response: "#/components/responses/<name>".
            base = tuple(response["$ref"].removeprefix("#/").split("/"))
            response = description["components"]["responses"][base[-1]]
        content = response["content"]
        media = answer.media_type if answer.media_type in content else "*/*"
        assert media in content, f"{where}: {answer.media_type} not described"
        if media in ("application/json", "application/problem+json"):
            conforms(
                json.loads(answer.body),
                _pointer(*base, "content", media, "schema"),
                description,
            )
        if (
            answer.status == 200
            and "requestBody" in operation
            and answer.request_media_type == "application/json"
        ):
            conforms(
                json.loads(answer.request_body),
                _pointer(
                    "paths",
                    answer.path,
                    method,
                    "requestBody",
                    "content",
                    "application/json",
                    "schema",
                ),
                description,
            )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class FacadeTestCase(TestCase):
    """
    An agent on the test card with an open session, a sandbox DMP, and a
    facade in front of it.
    """

    timeout = 180

    @inlineCallbacks
    def setUp(self) -> Any:
        # Every answer of the facades under test, checked against the
        # description once the test is over (the first cleanup, run last).
        self.answers: list[SentAnswer] = []
        self.addCleanup(lambda: check_answers(self.answers, openapi()))
        self.card = shared_testcard()
        self.backend = CountingBackend(token_backend())
        self.agent = yield start_agent(self, self.backend)
        self.context = yield open_session(
            self.agent.url, self.card.pin, self.agent.fingerprint
        )
        self.sandbox_port = yield self.start_sandbox()
        self.facade = yield self.start_facade(self.dmp_url(self.sandbox_port))

    def start_sandbox(self, client_cas: list[str] | None = None) -> Deferred[int]:
        card = self.card
        service = SandboxService(
            "tcp:0:interface=127.0.0.1",
            str(Path(self.mktemp() + ".sqlite").absolute()),
            card.sandbox_cert,
            card.sandbox_key,
            client_cas or [card.ca_root, *card.ca_intermediates],
        )
        self.addCleanup(service.stopService)
        return service.start().addCallback(lambda port: port.getHost().port)

    @staticmethod
    def dmp_url(port: int) -> str:
        return f"https://127.0.0.1:{port}/si-dmp-server/v2/services"

    def start_facade(self, dmp_url: str, **settings: Any) -> Deferred[FacadeClient]:
        config = FacadeConfig(
            dmp_url=dmp_url,
            roots=[self.card.ca_root_certificate()],
            structure=STRUCTURE,
            software=SOFTWARE,
            defaults=DEFAULTS,
            **settings,
        )
        self.service = FacadeService("tcp:0:interface=127.0.0.1", config)
        self.service.site.requestFactory = recording(
            self.service.site.requestFactory, self.answers
        )
        self.addCleanup(self.service.stopService)

        def client(port: Any) -> FacadeClient:
            self.facade_url = f"http://127.0.0.1:{port.getHost().port}"
            facade = FacadeClient(self.facade_url)
            self.addCleanup(facade.close)
            return facade

        return self.service.start().addCallback(client)

    @property
    def authentication_signatures(self) -> int:
        return self.backend.signatures[KeyUsage.authentication]

    def submit(self, data: bytes, **kwargs: Any) -> Deferred[dict[str, Any]]:
        return self.facade.td21_submit(
            [data], kwargs.get("context", self.context), [overrides_for(data)]
        )

    @inlineCallbacks
    def failure_of(self, d: Deferred[Any], kind: type[Exception]) -> Any:
        try:
            yield d
        except kind as error:
            return error
        self.fail(f"expected {kind.__name__}")


class ScenarioTests(FacadeTestCase):
    @inlineCallbacks
    def test_every_example_cda(self) -> Any:
        """
        Each ANS example CDA: the patient's DMP exists, the submission
        succeeds with the CDA's uniqueId, a search finds it, the retrieval
        gives back the exact bytes, and masking it shows in the metadata.
        All of it with one card signature for the TLS authentication.
        """
        exists = yield self.facade.td02_exist(CDA_PATIENT, self.context)
        conforms(exists, answer_schema("td02Exist"))
        self.assertTrue(exists["exists"])
        self.assertEqual(exists["authorization"], "VALIDE")
        paths = example_cdas()
        self.assertEqual(len(paths), 6)
        for path in paths:
            data = path.read_bytes()
            submitted = yield self.submit(data)
            conforms(submitted, answer_schema("td21SubmitDocuments"))
            self.assertEqual(submitted["outcome"], "answered", path.name)
            timings = submitted["timings"]
            self.assertEqual(timings["connection"], "reused")
            self.assertGreater(timings["submissionSetSignature"], 0)
            self.assertGreater(timings["dmp"], 0)
            [document] = submitted["documents"]
            self.assertEqual(document["uniqueId"], unique_id(data))

            found = yield self.facade.td31_find(self.context, CDA_PATIENT)
            self.assertIn(document["uniqueId"], [d["uniqueId"] for d in found])
            conforms({"documents": found}, answer_schema("td31Find"))

            content = yield self.facade.td32_retrieve(
                document["uniqueId"], self.context, CDA_PATIENT
            )
            self.assertEqual(content, data, path.name)

            updated = yield self.facade.td33_update(
                document["uniqueId"], "mask", self.context, CDA_PATIENT
            )
            conforms(updated, answer_schema("td33UpdateStatus"))
            [entry] = yield self.facade.td31_find(
                self.context, CDA_PATIENT, uniqueIds=[document["uniqueId"]]
            )
            self.assertIn(
                "MASQUE_PS", [c["code"] for c in entry["confidentialityCode"]]
            )
            error = yield self.failure_of(
                self.facade.td33_update(
                    document["uniqueId"], "mask", self.context, CDA_PATIENT
                ),
                FacadeProblem,
            )
            self.assertEqual((error.status, error.kind), (409, "conflict"))
        self.assertEqual(self.authentication_signatures, 1)
        # One signature of the submission set per submission.
        self.assertEqual(self.backend.signatures[KeyUsage.signature], len(paths))

    @inlineCallbacks
    def test_json_retrieval(self) -> Any:
        """
        Without Accept: application/octet-stream, TD3.2 answers JSON with
        the bytes in base64 and the document's mimeType; the raw bytes as
        Accept weighs the forms, 406 when it allows none.
        """
        data = cda("VAC-NOTE")
        submitted = yield self.submit(data)
        unique_id = submitted["documents"][0]["uniqueId"]
        answer = yield self.post(
            "/dmp/td32Retrieve",
            {
                "agentContext": self.context,
                "patient": CDA_PATIENT,
                "uniqueId": unique_id,
            },
        )
        self.assertEqual(answer[0], 200)
        conforms(answer[1], answer_schema("td32Retrieve"))
        self.assertEqual(base64.b64decode(answer[1]["content"]), data)
        self.assertEqual(answer[1]["mimeType"], "text/xml")

        body = {"agentContext": self.context, "patient": CDA_PATIENT}
        # Accept read with its weights (RFC 9110, 12.5.1): the answer is
        # what it weighs most, JSON when it prefers nothing, and 406 when
        # it allows none of JSON, the document's type and octet-stream.
        for accept, media_type in [
            ("application/octet-stream", "application/octet-stream"),
            ("text/xml", "text/xml"),
            ("text/xml, application/octet-stream;q=0.5", "text/xml"),
            ("text/xml;q=0.5, application/octet-stream", "application/octet-stream"),
            ("text/*", "text/xml"),
            ("application/json;q=0.1, */*;q=0.5", "text/xml"),
            (
                "application/json;q=0.5, application/octet-stream",
                "application/octet-stream",
            ),
            ("*/*", "application/json"),
            ("application/*", "application/json"),
            ("application/octet-stream;q=0", None),
            ("application/pdf", None),
            ("application/json;q=0, text/xml;q=0, application/octet-stream;q=0", None),
        ]:
            response = yield Agent(reactor).request(
                b"POST",
                (self.facade_url + "/dmp/td32Retrieve").encode(),
                Headers(
                    {
                        b"content-type": [b"application/json"],
                        b"accept": [accept.encode()],
                    }
                ),
                _body(json.dumps(dict(body, uniqueId=unique_id)).encode()),
            )
            content = yield readBody(response)
            if media_type is None:
                self.assertEqual(response.code, 406, accept)
                problem = json.loads(content)
                self.assertIn(
                    "allows none of the forms of this answer", problem["detail"]
                )
                continue
            self.assertEqual(response.code, 200, accept)
            self.assertEqual(
                response.headers.getRawHeaders(b"content-type"),
                [media_type.encode()],
                accept,
            )
            disposition = response.headers.getRawHeaders(b"content-disposition")
            if media_type == "application/json":
                self.assertEqual(base64.b64decode(json.loads(content)["content"]), data)
                self.assertIsNone(disposition)
            else:
                self.assertEqual(content, data, accept)
                # A file to save, never a page for a browser to display.
                extension = ".xml" if media_type == "text/xml" else ".bin"
                self.assertEqual(
                    disposition,
                    [f'attachment; filename="{unique_id}{extension}"'.encode()],
                    accept,
                )

    @inlineCallbacks
    def test_multipart_submission(self) -> Any:
        """
        TD2.1 as multipart/form-data: the agent context as a JSON part, the
        CDA as a file, the overrides as a JSON part.
        """
        data = cda("DLU-EHPAD-FLUDT")
        boundary = "cpsdmp-boundary-1"
        parts = [
            (
                'name="agentContext"',
                "application/json",
                json.dumps(self.context).encode(),
            ),
            (
                'name="overrides"',
                "application/json",
                json.dumps([overrides_for(data)]).encode(),
            ),
            ('name="documents"; filename="cda.xml"', "text/xml", data),
        ]
        body = multipart(boundary, parts)
        status, answer = yield self.post(
            "/dmp/td21SubmitDocuments",
            body,
            content_type=f"multipart/form-data; boundary={boundary}",
        )
        self.assertEqual(status, 200, answer)
        self.assertEqual(answer["documents"][0]["uniqueId"], unique_id(data))
        content = yield self.facade.td32_retrieve(
            answer["documents"][0]["uniqueId"], self.context, CDA_PATIENT
        )
        self.assertEqual(content, data)

    @inlineCallbacks
    def post(self, path: str, body: Any, content_type: str = "application/json") -> Any:
        """
        @return: a Deferred firing with the status and the parsed JSON answer.
        """
        import io

        from twisted.web.client import FileBodyProducer

        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = yield Agent(reactor).request(
            b"POST",
            (self.facade_url + path).encode(),
            Headers({b"content-type": [content_type.encode()]}),
            FileBodyProducer(io.BytesIO(raw)),
        )
        content = yield readBody(response)
        return response.code, json.loads(content)

    @inlineCallbacks
    def test_second_request_no_new_signature(self) -> Any:
        """
        A second request by the same professional reuses the connection; one
        after the connections were closed resumes the TLS session. Neither
        asks the card for a signature.
        """
        first = yield self.facade.td02_exist(CDA_PATIENT, self.context)
        self.assertEqual(self.authentication_signatures, 1)
        second = yield self.facade.td02_exist(CDA_PATIENT, self.context)
        self.assertEqual(self.authentication_signatures, 1)

        from cpsdmp.facade.service import AgentContext

        session = yield self.service.dmp.session(AgentContext.from_json(self.context))
        yield session.pool.closeCachedConnections()
        third = yield self.facade.td02_exist(CDA_PATIENT, self.context)
        self.assertEqual(self.authentication_signatures, 1)
        # What each answer says of its connection, with the times.
        timings = [a["timings"] for a in (first, second, third)]
        self.assertEqual(
            [t["connection"] for t in timings], ["new handshake", "reused", "resumed"]
        )
        self.assertGreater(timings[0]["handshakeSignature"], 0)
        self.assertGreater(timings[0]["handshake"], timings[0]["handshakeSignature"])
        self.assertGreater(timings[0]["dmp"], timings[0]["handshake"])
        self.assertEqual(
            (timings[1]["handshake"], timings[1]["handshakeSignature"]), (None, None)
        )
        self.assertGreater(timings[2]["handshake"], 0)
        self.assertIsNone(timings[2]["handshakeSignature"])
        self.assertEqual(session.connections.handshakes, 2)
        self.assertEqual(session.connections.resumed, 1)


class ResumptionTests(FacadeTestCase):
    @inlineCallbacks
    def test_new_token_same_agent_resumes(self) -> Any:
        """
        The professional enters the PIN again (a new token, same agent and
        card): the facade resumes the TLS session, no card signature.
        """
        yield self.facade.td02_exist(CDA_PATIENT, self.context)
        again = yield open_session(
            self.agent.url, self.card.pin, self.agent.fingerprint
        )
        self.assertNotEqual(again["token"], self.context["token"])
        yield self.facade.td02_exist(CDA_PATIENT, again)
        self.assertEqual(self.authentication_signatures, 1)

    @inlineCallbacks
    def test_concurrent_first_requests_one_signature(self) -> Any:
        """
        Ten requests at once by a professional the facade has not seen: the
        first handshake signs, the other connections wait for it and resume
        its session.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        results = yield DeferredList(
            [self.facade.td02_exist(CDA_PATIENT, self.context) for _ in range(10)],
            consumeErrors=True,
        )
        self.assertEqual([ok for ok, _ in results], [True] * 10, results)
        self.assertEqual(self.authentication_signatures, 1)
        logged = sorted(
            (e["connection"], e["signature"] == "none")
            for e in events
            if e.get("log_namespace") == "cpsdmp.facade.service" and e.get("action")
        )
        self.assertEqual(logged, [("new handshake", False)] + [("resumed", True)] * 9)

    @inlineCallbacks
    def test_other_agent_same_certificate_signs(self) -> Any:
        """
        Another agent serving the same card (so the same certificate) does
        not get the first agent's TLS session: the facade makes a full
        handshake, and the card signs again.
        """
        yield self.facade.td02_exist(CDA_PATIENT, self.context)
        other = yield start_agent(self, SharedCard(self.backend))
        self.assertNotEqual(other.fingerprint, self.agent.fingerprint)
        context = yield open_session(other.url, self.card.pin, other.fingerprint)
        yield self.facade.td02_exist(CDA_PATIENT, context)
        self.assertEqual(self.authentication_signatures, 2)


class NoReuseTests(FacadeTestCase):
    @inlineCallbacks
    def test_no_connection_reuse(self) -> Any:
        """
        With connection reuse off (for benchmarks), every exchange makes a
        new connection and a full handshake, which the card signs; the
        option is off unless asked for.
        """
        from cpsdmp.facade.tap import Options, makeService

        options = Options()
        options.parseOptions(["--testcard", str(Path(self.card.ca_root).parent)])
        self.assertTrue(makeService(options).dmp.config.reuse_connections)
        options = Options()
        options.parseOptions(
            [
                "--testcard",
                str(Path(self.card.ca_root).parent),
                "--no-connection-reuse",
            ]
        )
        self.assertFalse(makeService(options).dmp.config.reuse_connections)

        facade = yield self.start_facade(
            self.dmp_url(self.sandbox_port), reuse_connections=False
        )
        for _ in range(3):
            yield facade.td02_exist(CDA_PATIENT, self.context)
        self.assertEqual(self.authentication_signatures, 3)
        from cpsdmp.xds.sample import sample_cda

        answer = yield facade.td21_submit(
            [sample_cda(self.card.professional)], self.context
        )
        self.assertEqual(answer["timings"]["connection"], "new handshake")
        self.assertIsNotNone(answer["timings"]["handshakeSignature"])
        self.assertEqual(self.authentication_signatures, 4)


class SharedCard:
    """
    The card another agent already unlocked, lent to a second agent: its
    login, logout and close leave the first agent's session alone.
    """

    def __init__(self, backend: Any) -> None:
        self._backend = backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def login(self, pin: str) -> None:
        pass

    def logout(self) -> None:
        pass

    def close(self) -> None:
        pass


class BlockedCard(SharedCard):
    """
    A card that answers, when asked to sign, that its PIN is blocked.
    """

    def sign_digest(self, usage: KeyUsage, algorithm: Any, digest: bytes) -> bytes:
        raise CardPinBlockedError()


class SignatureKeyTests(FacadeTestCase):
    @inlineCallbacks
    def test_read_only_without_signature_key(self) -> Any:
        """
        Behind an agent started with a soft card and no
        --soft-card-signature, the card's signature key is asked for only
        when a submission needs the set signed: the other transactions work,
        and a submission is 409 no-signature-key, saying so, with nothing
        sent to the DMP.
        """
        from cpsdmp.agent import tap

        data = cda("BIO")
        yield self.submit(data)
        stored = unique_id(data)

        options = tap.Options()
        options.parseOptions(["--soft-card", self.card.soft_card])
        agent = yield start_agent(self, tap.card_backend(options))
        context = yield open_session(agent.url, self.card.pin, agent.fingerprint)
        exists = yield self.facade.td02_exist(CDA_PATIENT, context)
        self.assertTrue(exists["exists"])
        found = yield self.facade.td31_find(context, CDA_PATIENT)
        self.assertIn(stored, [d["uniqueId"] for d in found])
        content = yield self.facade.td32_retrieve(stored, context, CDA_PATIENT)
        self.assertEqual(content, data)
        updated = yield self.facade.td33_update(stored, "mask", context, CDA_PATIENT)
        self.assertEqual(updated["status"], "Success")

        other = cda("VAC-NOTE")
        error = yield self.failure_of(
            self.submit(other, context=context), FacadeNoSignatureKey
        )
        self.assertEqual(error.status, 409)
        self.assertEqual(error.kind, "no-signature-key")
        detail = error.problem["detail"]
        self.assertTrue(
            detail.startswith(
                "the card has no signature key: submissions cannot be signed; "
                "read-only transactions (TD0.2, TD3.1, TD3.2) and status "
                "updates (TD3.3) still work."
            ),
            detail,
        )
        found = yield self.facade.td31_find(
            context, CDA_PATIENT, uniqueIds=[unique_id(other)]
        )
        self.assertEqual(found, [])


class FaultTests(FacadeTestCase):
    @inlineCallbacks
    def test_duplicate_submission(self) -> Any:
        """
        The same CDA twice: the DMP refuses the second with its own code,
        and the facade answers 422 with it.
        """
        data = cda("BIO")
        yield self.submit(data)
        error = yield self.failure_of(self.submit(data), DmpRefused)
        self.assertEqual(error.status, 422)
        self.assertTrue(error.codes, error.problem)
        self.assertTrue(any("UniqueId" in code for code in error.codes), error.problem)
        self.assertEqual(
            set(error.errors[0]), {"code", "context", "severity", "location"}
        )
        # The location (the document's uniqueId) is kept as the DMP gave
        # it; the detail names the document once, as its context does.
        stored = unique_id(data)
        self.assertEqual(error.errors[0]["location"], stored)
        self.assertEqual(error.problem["detail"].count(stored), 1)
        self.assertTrue(
            error.problem["detail"].endswith(
                f"error XDSDuplicateUniqueIdInRegistry: a document with "
                f"uniqueId {stored} is already stored"
            ),
            error.problem["detail"],
        )

    @inlineCallbacks
    def test_unknown_patient(self) -> Any:
        """
        A CDA about a patient the DMP does not know is refused with the
        DMP's code.
        """
        # An INS with its right key, of a patient the local DMP does not have.
        data = cda("BIO").replace(b"279035121518989", b"299999999999945")
        error = yield self.failure_of(self.submit(data), DmpRefused)
        self.assertEqual(error.status, 422)
        self.assertTrue(error.codes)
        self.assertIn("299999999999945", json.dumps(error.problem))

    @inlineCallbacks
    def test_invalid_cda(self) -> Any:
        """
        A CDA without confidentialityCode: 422 naming the element, nothing
        sent to the DMP.
        """
        data = re.sub(rb"<confidentialityCode[^>]*/>", b"", cda("BIO"), count=1)
        error = yield self.failure_of(self.submit(data), InvalidDocument)
        self.assertEqual(error.status, 422)
        self.assertIn("confidentialityCode", str(error))
        error = yield self.failure_of(
            self.facade.td21_submit([b"<not-xml"], self.context), InvalidDocument
        )
        self.assertEqual(error.status, 422)

    @inlineCallbacks
    def test_unique_id_too_long(self) -> Any:
        """
        A CDA id whose extension makes a document uniqueId over what XDS
        takes (root^extension, the extension at most 16 characters) is 422
        naming the document and its uniqueId, before the card is asked to
        sign anything (the agent refused the set's signature, 502); an
        extension of 16 characters is submitted.
        """
        root = b'<id root="1.2.250.1.213.1.1.1.55.2024.9.1"/>'
        data = cda("BIO")
        self.assertIn(root, data)
        too_long = data.replace(root, root[:-2] + b' extension="A2345678901234567"/>')
        error = yield self.failure_of(
            self.facade.td21_submit([cda("VAC-NOTE"), too_long], self.context),
            InvalidDocument,
        )
        self.assertEqual(error.status, 422)
        self.assertEqual(error.problem["documentIndex"], 1)
        detail = error.problem["detail"]
        self.assertTrue(detail.startswith("documents[1]: "), detail)
        self.assertIn("1.2.250.1.213.1.1.1.55.2024.9.1^A2345678901234567", detail)
        self.assertIn("the extension at most 16 characters", detail)
        self.assertEqual(
            self.backend.signatures,
            {KeyUsage.authentication: 0, KeyUsage.signature: 0},
        )
        longest = data.replace(root, root[:-2] + b' extension="A234567890123456"/>')
        answer = yield self.submit(longest)
        self.assertEqual(
            answer["documents"][0]["uniqueId"],
            "1.2.250.1.213.1.1.1.55.2024.9.1^A234567890123456",
        )

    @inlineCallbacks
    def test_which_document_is_invalid(self) -> Any:
        """
        With several documents in one submission, the error names the bad
        one: its index, and its file name in a form; a missing classCode is
        asked for as the facade takes it (the document's overrides), not as
        the command line does. Nothing is sent, and the card signs nothing.
        """
        good, unmapped = cda("VAC-NOTE"), cda("DLU-EHPAD-FLUDT")
        self.assertIsNotNone(overrides_for(unmapped))
        self.assertIsNone(overrides_for(good))
        error = yield self.failure_of(
            self.facade.td21_submit([good, unmapped], self.context), InvalidDocument
        )
        detail = error.problem["detail"]
        self.assertTrue(detail.startswith("documents[1]: "), detail)
        self.assertIn("give it as documents[1].overrides.classCode", detail)
        self.assertNotIn("cpsdmp metadata", detail)
        self.assertEqual(error.problem["documentIndex"], 1)
        error = yield self.failure_of(
            self.facade.td21_submit([good, good, b"<not-xml"], self.context),
            InvalidDocument,
        )
        self.assertTrue(error.problem["detail"].startswith("documents[2]: "))

        boundary = "b0undary"
        form = multipart(
            boundary,
            [
                (
                    'name="agentContext"',
                    "application/json",
                    json.dumps(self.context).encode(),
                ),
                ('name="documents"; filename="note.xml"', "text/xml", good),
                ('name="documents"; filename="ehpad.xml"', "text/xml", unmapped),
            ],
        )
        response, problem = yield post_raw(
            self.facade_url + "/dmp/td21SubmitDocuments",
            form,
            f"multipart/form-data; boundary={boundary}",
        )
        self.assertEqual(response.code, 422, problem)
        detail = problem["detail"]
        self.assertTrue(detail.startswith("documents[1] ('ehpad.xml'): "), detail)
        self.assertIn("overrides[1].classCode in the form's part 'overrides'", detail)
        self.assertEqual(problem["documentIndex"], 1)
        # A bad override is named by its document too.
        error = yield self.failure_of(
            self.facade.td21_submit(
                [good, good], self.context, [None, {"classCode": {"code": "11"}}]
            ),
            MalformedRequest,
        )
        self.assertIn("documents[1].overrides: classCode", str(error))
        self.assertEqual(
            self.backend.signatures,
            {KeyUsage.authentication: 0, KeyUsage.signature: 0},
        )

    @inlineCallbacks
    def test_malformed_requests(self) -> Any:
        error = yield self.failure_of(
            self.facade.td21_submit([], self.context), MalformedRequest
        )
        self.assertEqual(error.status, 400)
        error = yield self.failure_of(
            self.facade.td02_exist(CDA_PATIENT, {"url": "x"}), MalformedRequest
        )
        self.assertIn("token", str(error))
        error = yield self.failure_of(
            self.facade.td02_exist({"ins": "12"}, self.context), MalformedRequest
        )
        self.assertIn("INS", str(error))
        error = yield self.failure_of(
            self.facade.td31_find(self.context, CDA_PATIENT, creationFrom="yesterday"),
            MalformedRequest,
        )
        self.assertIn("creationFrom", str(error))
        error = yield self.failure_of(
            self.facade.td33_update("1.2.3", "shred", self.context), MalformedRequest
        )
        self.assertIn("mask", str(error))

    @inlineCallbacks
    def test_empty_lists_of_documents(self) -> Any:
        """
        TD3.1 with an empty list of uniqueIds or entryUUIDs asks for nothing:
        400, not a search of every document of the patient.
        """
        submitted = yield self.submit(cda("VAC-NOTE"))
        self.assertTrue(submitted["documents"])
        found = yield self.facade.td31_find(self.context, CDA_PATIENT)
        self.assertIn(
            submitted["documents"][0]["uniqueId"], [d["uniqueId"] for d in found]
        )
        for name in [
            "uniqueIds",
            "entryUUIDs",
            "classCodes",
            "typeCodes",
            "confidentialityCodes",
        ]:
            error = yield self.failure_of(
                self.facade.td31_find(self.context, CDA_PATIENT, **{name: []}),
                MalformedRequest,
            )
            self.assertEqual(error.status, 400)
            self.assertIn(f"'{name}' is empty", str(error))
            request = _pointer(
                "paths",
                "/dmp/td31Find",
                "post",
                "requestBody",
                "content",
                JSON,
                "schema",
            )
            self.assertRaises(
                AssertionError,
                conforms,
                {"agentContext": ABSENT_AGENT, "patient": CDA_PATIENT, name: []},
                request,
            )

    @inlineCallbacks
    def test_documents_asked_once(self) -> Any:
        """
        TD3.1 asking for a document twice is refused, naming the repeat; an
        entryUUID is found whatever the case of its hexadecimal digits, and
        the same one in two cases is a repeat.
        """
        submitted = yield self.submit(cda("VAC-NOTE"))
        (document,) = submitted["documents"]
        unique, entry_uuid = document["uniqueId"], document["entryUUID"]
        upper = "urn:uuid:" + entry_uuid.removeprefix("urn:uuid:").upper()
        for name, values in [
            ("uniqueIds", [unique, "1.2.3", unique]),
            ("entryUUIDs", [entry_uuid, str(uuid.uuid4().urn), upper]),
        ]:
            error = yield self.failure_of(
                self.facade.td31_find(self.context, CDA_PATIENT, **{name: values}),
                MalformedRequest,
            )
            self.assertIn(f"{name}[2] repeats {name}[0]", str(error))
        (found,) = yield self.facade.td31_find(
            self.context, CDA_PATIENT, entryUUIDs=[upper]
        )
        self.assertEqual(found["entryUUID"], entry_uuid)

    @inlineCallbacks
    def test_other_patients_document(self) -> Any:
        """
        A document of patient B asked for with patient A: TD3.1 by uniqueId
        finds nothing, TD3.2 gets the DMP's "missing document", TD3.3 is
        "not found" and changes nothing; without a patient the facade refuses
        the request (400). With patient B, everything works.
        """
        from cpsdmp.xds.sample import DEFAULT_PATIENT, sample_cda

        other = {"ins": DEFAULT_PATIENT.ins, "authority": INS_OID_TEST}
        self.assertNotEqual(other["ins"], CDA_PATIENT["ins"])
        submitted = yield self.facade.td21_submit(
            [sample_cda(self.card.professional)], self.context
        )
        document = submitted["documents"][0]["uniqueId"]

        found = yield self.facade.td31_find(
            self.context, CDA_PATIENT, uniqueIds=[document]
        )
        self.assertEqual(found, [])
        error = yield self.failure_of(
            self.facade.td32_retrieve(document, self.context, CDA_PATIENT),
            DocumentNotFound,
        )
        self.assertEqual((error.status, error.kind), (404, "document-not-found"))
        self.assertEqual(error.codes, ["XDSMissingDocument"])
        self.assertIn("no document", error.problem["detail"])
        self.assertNotIn(DEFAULT_PATIENT.ins, json.dumps(error.problem))
        error = yield self.failure_of(
            self.facade.td33_update(document, "mask", self.context, CDA_PATIENT),
            FacadeProblem,
        )
        self.assertEqual((error.status, error.kind), (404, "document-not-found"))
        for call in (
            self.facade.td32_retrieve(document, self.context),
            self.facade.td33_update(document, "mask", self.context),
            self.facade.td31_find(self.context, uniqueIds=[document]),
        ):
            error = yield self.failure_of(call, MalformedRequest)
            self.assertIn("patient", str(error))

        [entry] = yield self.facade.td31_find(self.context, other, uniqueIds=[document])
        self.assertNotIn("MASQUE_PS", [c["code"] for c in entry["confidentialityCode"]])
        content = yield self.facade.td32_retrieve(document, self.context, other)
        self.assertIn(DEFAULT_PATIENT.ins.encode(), content)
        yield self.facade.td33_update(document, "mask", self.context, other)

    @inlineCallbacks
    def test_status_updates(self) -> Any:
        """
        TD3.3 answers the same way for every action: one that would not
        change the document's state is 409 (archive, unarchive, mask,
        unmask alike) and changes nothing; a document that is not there is
        404, saying whether it was deleted or is unknown, for TD3.3 and
        TD3.2 alike.
        """
        from cpsdmp.xds.sample import DEFAULT_PATIENT, sample_cda

        patient = {"ins": DEFAULT_PATIENT.ins, "authority": INS_OID_TEST}
        submitted = yield self.facade.td21_submit(
            [sample_cda(self.card.professional)], self.context
        )
        document = submitted["documents"][0]["uniqueId"]

        @inlineCallbacks
        def update(action: str, unique_id: str = document) -> Any:
            try:
                answer = yield self.facade.td33_update(
                    unique_id, action, self.context, patient
                )
            except FacadeProblem as error:
                return error.status, error.kind, error.problem["detail"]
            return 200, answer["status"], ""

        @inlineCallbacks
        def state() -> Any:
            [entry] = yield self.facade.td31_find(
                self.context,
                patient,
                uniqueIds=[document],
            )
            masked = "MASQUE_PS" in [c["code"] for c in entry["confidentialityCode"]]
            return entry["availabilityStatus"].rsplit(":", 1)[-1], masked

        for action, expected, after in [
            ("unarchive", (409, "conflict", "not archived"), ("Approved", False)),
            ("unmask", (409, "conflict", "not masked"), ("Approved", False)),
            ("archive", (200, "Success", ""), ("Archived", False)),
            ("archive", (409, "conflict", "already archived"), ("Archived", False)),
            ("mask", (200, "Success", ""), ("Archived", True)),
            ("mask", (409, "conflict", "already masked"), ("Archived", True)),
            ("unarchive", (200, "Success", ""), ("Approved", True)),
            ("unarchive", (409, "conflict", "not archived"), ("Approved", True)),
            ("unmask", (200, "Success", ""), ("Approved", False)),
            ("unmask", (409, "conflict", "not masked"), ("Approved", False)),
        ]:
            status, kind, detail = yield update(action)
            self.assertEqual((status, kind), expected[:2], (action, detail))
            self.assertIn(expected[2], detail, action)
            self.assertEqual((yield state()), after, action)

        self.assertEqual((yield update("delete"))[:2], (200, "Success"))
        for action in UPDATE_ACTIONS:
            status, kind, detail = yield update(action)
            self.assertEqual((status, kind), (404, "document-not-found"), action)
            self.assertIn("was deleted", detail, action)
        error = yield self.failure_of(
            self.facade.td32_retrieve(document, self.context, patient),
            DocumentNotFound,
        )
        self.assertEqual(error.status, 404)
        self.assertIn("was deleted", error.problem["detail"])
        self.assertEqual(error.codes, ["XDSMissingDocument"])

        unknown = "1.2.250.1.999.42.4242"
        status, kind, detail = yield update("mask", unknown)
        self.assertEqual((status, kind), (404, "document-not-found"))
        self.assertIn(f"no document {unknown}", detail)
        error = yield self.failure_of(
            self.facade.td32_retrieve(unknown, self.context, patient),
            DocumentNotFound,
        )
        self.assertIn(f"no document {unknown}", error.problem["detail"])

    @inlineCallbacks
    def test_wrong_token(self) -> Any:
        """
        A token the agent does not know (expired, or the card was locked):
        401, saying the PIN is needed again.
        """
        context = dict(self.context, token=secrets.token_urlsafe(32))
        error = yield self.failure_of(
            self.facade.td02_exist(CDA_PATIENT, context), AgentSessionExpired
        )
        self.assertEqual(error.status, 401)
        self.assertEqual(str(error).count("PIN again"), 1, str(error))

    @inlineCallbacks
    def test_locked_card_stops_kept_sessions(self) -> Any:
        """
        Once the professional locks the card, the facade carries no further
        transaction for that context, though its TLS connection to the DMP
        is still open and would need no card signature: 401, and the DMP
        never sees the request.
        """
        yield self.facade.td02_exist(CDA_PATIENT, self.context)
        agent = CpsAgentClient.from_context(self.context)
        yield agent.lock()
        yield agent.close()
        error = yield self.failure_of(
            self.facade.td02_exist(CDA_PATIENT, self.context), AgentSessionExpired
        )
        self.assertEqual(error.status, 401)

    @inlineCallbacks
    def test_agent_stopped_midway(self) -> Any:
        """
        The agent stops after a first request: a submission needs the card's
        signature key, and the facade says the agent failed: unreachable
        (502) once its connections are gone, or silent (504) while one
        lingers.
        """
        facade = yield self.start_facade(
            self.dmp_url(self.sandbox_port), agent_timeout=3.0
        )
        yield facade.td02_exist(CDA_PATIENT, self.context)
        yield self.agent.service.stopService()
        data = cda("VAC-NOTE")
        error = yield self.failure_of(
            facade.td21_submit([data], self.context, [overrides_for(data)]),
            AgentFailed,
        )
        self.assertIn(
            (error.status, error.kind),
            [(502, "agent-unreachable"), (504, "agent-timeout")],
        )
        self.assertIn(self.agent.url, str(error))

    @inlineCallbacks
    def test_pin_blocked(self) -> Any:
        """
        The card answers that its PIN is blocked when the handshake needs its
        signature (SoftHSM2 has no PIN counter, so a card wrapper says it):
        the agent answers 423 and the facade passes it on, saying so and
        what to do; the agent dropped the session, so the next call is 401.
        """
        agent = yield start_agent(self, BlockedCard(self.backend))
        context = yield open_session(agent.url, self.card.pin, agent.fingerprint)
        error = yield self.failure_of(
            self.facade.td02_exist(CDA_PATIENT, context), CardPinBlocked
        )
        self.assertEqual((error.status, error.kind), (423, "pin-blocked"))
        self.assertIn("PIN blocked", str(error))
        self.assertIn("PUK", str(error))
        error = yield self.failure_of(
            self.facade.td02_exist(CDA_PATIENT, context), AgentSessionExpired
        )
        self.assertEqual(error.status, 401)

    @inlineCallbacks
    def test_agent_unreachable(self) -> Any:
        context = dict(self.context, url=f"https://127.0.0.1:{free_port()}")
        error = yield self.failure_of(
            self.facade.td02_exist(CDA_PATIENT, context), AgentFailed
        )
        self.assertEqual(error.status, 502)
        self.assertEqual(error.kind, "agent-unreachable")

    @inlineCallbacks
    def test_dmp_down(self) -> Any:
        """
        Nothing listens at the DMP's address: 502, DMP unreachable.
        """
        facade = yield self.start_facade(self.dmp_url(free_port()))
        error = yield self.failure_of(
            facade.td02_exist(CDA_PATIENT, self.context), DmpFailed
        )
        self.assertEqual(error.status, 502)
        self.assertEqual(error.kind, "dmp-unreachable")

    @inlineCallbacks
    def test_dmp_down_no_card_signature(self) -> Any:
        """
        A submission to a DMP that nothing answers for: 502, and the card
        signed nothing, the submission set included (the connection comes
        before the set's signature).
        """
        facade = yield self.start_facade(self.dmp_url(free_port()))
        data = cda("VAC-NOTE")
        error = yield self.failure_of(
            facade.td21_submit([data], self.context, [overrides_for(data)]),
            DmpFailed,
        )
        self.assertEqual((error.status, error.kind), (502, "dmp-unreachable"))
        self.assertEqual(
            self.backend.signatures,
            {KeyUsage.authentication: 0, KeyUsage.signature: 0},
        )

    @inlineCallbacks
    def test_log_of_failed_connections(self) -> Any:
        """
        The log of an exchange that never had a connection says so, with
        the card's signature of a handshake that failed; one whose message
        could not be made says its connection went unused; none claims a
        connection reused.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def logged() -> dict[str, Any]:
            [event] = [
                e
                for e in events
                if e.get("log_namespace") == "cpsdmp.facade.service" and e.get("action")
            ]
            del events[:]
            return event

        down = yield self.start_facade(self.dmp_url(free_port()))
        yield self.failure_of(down.td02_exist(CDA_PATIENT, self.context), DmpFailed)
        event = logged()
        self.assertEqual(
            (event["code"], event["connection"], event["signature"]),
            ("failed", "not established", "none"),
        )
        # In words, not the name of a Python class.
        self.assertIn("TD0.2: failed (no connection to the DMP at", formatEvent(event))
        self.assertNotIn("DmpUnreachable", formatEvent(event))
        self.assertIn("connection not established", formatEvent(event))

        other_ca = Path(self.mktemp() + ".pem")
        other_ca.write_bytes(_other_authority())
        port = yield self.start_sandbox([str(other_ca)])
        refusing = yield self.start_facade(self.dmp_url(port))
        yield self.failure_of(
            refusing.td02_exist(CDA_PATIENT, self.context), HandshakeRefused
        )
        event = logged()
        self.assertEqual(event["connection"], "not established")
        self.assertNotEqual(event["signature"], "none")

        # The set's signature refused by the agent once the connection is up.
        from cpsdmp.agent.audit import RateLimit

        agent = yield start_agent(self, self.backend, rate_limit=RateLimit(1, 60.0))
        context = yield open_session(agent.url, self.card.pin, agent.fingerprint)
        data = cda("VAC-NOTE")
        yield self.failure_of(
            self.facade.td21_submit([data], context, [overrides_for(data)]),
            CardRateLimited,
        )
        event = logged()
        self.assertEqual(event["connection"], "new handshake (unused)")
        self.assertIn("connection new handshake (unused)", formatEvent(event))
        self.assertIn("TD2.1: failed (", formatEvent(event))
        self.assertIn("signatures per 60 s", formatEvent(event))
        self.assertNotIn("RateLimited", formatEvent(event))
        self.assertNotIn("AgentError", formatEvent(event))

    @inlineCallbacks
    def test_untrusted_card(self) -> Any:
        """
        A DMP that trusts another authority refuses the card's certificate
        in the handshake: 502 naming the alert it sent.
        """
        other_ca = Path(self.mktemp() + ".pem")
        other_ca.write_bytes(_other_authority())
        port = yield self.start_sandbox([str(other_ca)])
        facade = yield self.start_facade(self.dmp_url(port))
        error = yield self.failure_of(
            facade.td02_exist(CDA_PATIENT, self.context), HandshakeRefused
        )
        self.assertEqual(error.status, 502)
        self.assertIn(error.problem["alert"], ("unknown_ca", "bad_certificate"))
        self.assertIn(error.problem["alert"], str(error))
        # The step: the DMP checks the card's certificate once our flight,
        # CertificateVerify signed by the card, is in.
        self.assertIn("after our Finished", error.problem["step"])
        self.assertIn(error.problem["step"], str(error))
        self.assertEqual(self.authentication_signatures, 1)
        # A submission there: the handshake fails again before the card is
        # asked for the submission set's signature.
        data = cda("VAC-NOTE")
        error = yield self.failure_of(
            facade.td21_submit([data], self.context, [overrides_for(data)]),
            HandshakeRefused,
        )
        self.assertEqual(self.backend.signatures[KeyUsage.signature], 0)

    @inlineCallbacks
    def test_dmp_timeout(self) -> Any:
        """
        A DMP that accepts the connection and never answers: 504.
        """
        listening = reactor.listenTCP(
            0, Factory.forProtocol(Protocol), interface="127.0.0.1"
        )
        self.addCleanup(listening.stopListening)
        facade = yield self.start_facade(
            self.dmp_url(listening.getHost().port),
            dmp_timeout=1.0,
            handshake_timeout=5.0,
        )
        error = yield self.failure_of(
            facade.td02_exist(CDA_PATIENT, self.context), Exception
        )
        self.assertEqual(error.status, 504, error)
        self.assertEqual(error.kind, "dmp-timeout")

    @inlineCallbacks
    def test_handshake_timeout(self) -> Any:
        """
        A DMP that accepts the connection and never answers the ClientHello,
        with a handshake timeout shorter than the DMP's: still a timeout
        (504), naming the handshake step it stopped at, not a refusal.
        """
        listening = reactor.listenTCP(
            0, Factory.forProtocol(Protocol), interface="127.0.0.1"
        )
        self.addCleanup(listening.stopListening)
        facade = yield self.start_facade(
            self.dmp_url(listening.getHost().port),
            dmp_timeout=30.0,
            handshake_timeout=1.0,
        )
        error = yield self.failure_of(
            facade.td02_exist(CDA_PATIENT, self.context), Exception
        )
        self.assertEqual((error.status, error.kind), (504, "dmp-timeout"), error)
        self.assertIn("waiting for ServerHello", str(error))
        self.assertEqual(self.authentication_signatures, 0)


def _other_authority() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Another CA")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


# Lost answers ---------------------------------------------------------------------
class _Upstream(Protocol):
    def __init__(self, downstream: _Downstream) -> None:
        self.downstream = downstream

    def connectionMade(self) -> None:
        self.downstream.upstream_ready(self)

    def dataReceived(self, data: bytes) -> None:
        self.downstream.from_server(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.downstream.transport.loseConnection()


class _Downstream(Protocol):
    """
    One client connection through the proxy.
    """

    def __init__(self, proxy: LosingProxy) -> None:
        self.proxy = proxy
        self.upstream: _Upstream | None = None
        self.pending: list[bytes] = []
        self.sent = 0
        self.cut = False
        #: Who spoke last on this connection, the facade or the DMP: the
        #: facade speaking again after the DMP starts a new exchange.
        self.last: str | None = None
        self.doomed = False

    def connectionMade(self) -> None:
        if self.proxy.refuse_new:
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy.target)
        connectProtocol(endpoint, _Upstream(self))

    def upstream_ready(self, upstream: _Upstream) -> None:
        self.upstream = upstream
        for data in self.pending:
            upstream.transport.write(data)
        self.pending = []

    #: In C{late-request}: this connection's request is held back...
    late = False
    #: ...and the data of the one that waits for it to be answered.
    waiting: list[bytes] | None = None
    on_answer: Any = None

    def dataReceived(self, data: bytes) -> None:
        if self.cut:
            return
        if self.last != "facade":
            self.last = "facade"
            self.proxy.exchanges += 1
            if (
                self.proxy.mode == "lose-nth"
                and self.proxy.exchanges == self.proxy.lose_at
            ):
                self.proxy.mode = None
                self.proxy.cuts += 1
                if self.proxy.lose == "answer":
                    # The request reaches the DMP, its answer never comes back.
                    self.doomed = True
                else:
                    # The request never reaches the DMP.
                    self.cut = True
                    if self.upstream is not None:
                        self.upstream.transport.abortConnection()
                    call = reactor.callLater(0.3, self.transport.abortConnection)  # type: ignore[attr-defined, union-attr]
                    self.proxy.later.append((call, self.transport))
                    if self.proxy.lose == "request-and-all":
                        self.proxy.refuse_new = True
                    return
        self.sent += len(data)
        big = self.sent >= self.proxy.threshold
        if self.proxy.mode == "late-request" and (
            big or self.late or self.waiting is not None
        ):
            if self.late or self.proxy.late is None:
                # The first submission: its end reaches the DMP only when the
                # facade sends it again, after its check by uniqueId.
                self.late = True
                self.proxy.late = self
                self.proxy.late_data.append(data)
                return
            if self.waiting is None:
                # The resend: the first one goes on now, and this one once
                # the DMP has answered the first.
                self.waiting = []
                self.proxy.cuts += 1
                self.proxy.release_late(self)
            self.waiting.append(data)
            return
        # The facade's request is in TLS records of application data.
        request = self.application_data(data)
        if request and self.proxy.mode == "hold-answers":
            # It reaches the DMP, whose answer is held here for good.
            self.held = True
            self.proxy.cuts += 1
        elif request and self.proxy.mode == "lose-then-hold":
            # It reaches the DMP, whose answer is lost with the connection;
            # the next requests are held.
            self.doomed = True
            self.proxy.mode = "hold-answers"
            self.proxy.cuts += 1
        if big and self.proxy.mode == "swallow-request":
            # The request reaches the proxy, never the DMP.
            self.cut = True
            self.proxy.cuts += 1
            if self.proxy.once:
                self.proxy.mode = None
            if self.upstream is not None:
                self.upstream.transport.abortConnection()
            call = reactor.callLater(0.5, self.transport.abortConnection)
            self.proxy.later.append((call, self.transport))
            return
        if self.sent >= self.proxy.cut_at and self.proxy.mode == "cut-request":
            # The connection dies while the facade is still sending the body.
            self.cut = True
            self.proxy.cuts += 1
            if self.proxy.once:
                self.proxy.mode = None
            # Stop reading so that the rest of the body waits in the facade,
            # then drop both sides.
            self.transport.pauseProducing()
            if self.upstream is not None:
                self.upstream.transport.abortConnection()
            call = reactor.callLater(0.3, self.transport.abortConnection)
            self.proxy.later.append((call, self.transport))
            return
        if big and self.proxy.mode in ("drop-answer", "hold-answer"):
            self.armed = True
        if self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.transport.write(data)

    #: What the facade sent of a TLS record header, and what is left of the
    #: record it is in.
    _header = b""
    _record_left = 0

    def application_data(self, data: bytes) -> bool:
        """
        @return: whether C{data}, the next bytes the facade sent, has a TLS
            record of application data (its request) in it.
        """
        found = False
        while data:
            if self._record_left:
                taken = min(self._record_left, len(data))
                self._record_left -= taken
                data = data[taken:]
                continue
            needed = 5 - len(self._header)
            self._header += data[:needed]
            data = data[needed:]
            if len(self._header) == 5:
                found = found or self._header[0] == 0x17
                self._record_left = int.from_bytes(self._header[3:5], "big")
                self._header = b""
        return found

    def forward(self, data: bytes) -> None:
        if self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.transport.write(data)

    def flush_waiting(self) -> None:
        waiting, self.waiting = self.waiting or [], None
        self.proxy.mode = None
        for data in waiting:
            self.forward(data)

    def from_server(self, data: bytes) -> None:
        self.last = "dmp"
        if self.doomed:
            self.transport.abortConnection()  # type: ignore[union-attr]
            if self.upstream is not None:
                self.upstream.transport.abortConnection()
            return
        if self.late:
            # The DMP answered the late submission; nobody waits for it now.
            callback, self.on_answer = self.on_answer, None
            if callback is not None:
                callback()
            return
        if getattr(self, "armed", False) and self.proxy.mode == "hold-answer":
            # The DMP answered; the answer waits here until the facade gives up.
            self.proxy.cuts += 1
            self.proxy.mode = None
            self.held = True
            return
        if getattr(self, "held", False):
            return
        if getattr(self, "armed", False) and self.proxy.mode == "drop-answer":
            # The DMP answered; the answer never reaches the facade.
            self.proxy.cuts += 1
            if self.proxy.once:
                self.proxy.mode = None
            self.transport.abortConnection()
            if self.upstream is not None:
                self.upstream.transport.abortConnection()
            return
        self.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.upstream is not None and not self.late:
            self.upstream.transport.loseConnection()


class LosingProxy(Factory):
    """
    A TCP proxy to the sandbox that, once armed, loses the answer to a large
    request (C{drop-answer}: the DMP got it) or the large request itself
    (C{swallow-request}: the DMP never got it), once or every time.
    """

    def __init__(self, target: int, threshold: int) -> None:
        self.target = target
        self.threshold = threshold
        self.mode: str | None = None
        self.once = True
        self.cuts = 0
        self.later: list[Any] = []
        #: C{cut-request} stops reading after this many bytes (the TLS
        #: handshake and the start of the body), then drops the connection.
        self.cut_at = 16 * 1024
        #: C{late-request}: the connection whose request is held, its data.
        self.late: _Downstream | None = None
        self.late_data: list[bytes] = []
        self.downstreams: list[_Downstream] = []
        #: C{lose-nth}: the exchanges begun through the proxy (the facade
        #: speaking after the DMP), and the one whose C{lose} is lost:
        #: C{answer}, C{request}, or C{request-and-all} (every connection
        #: after it refused too).
        self.exchanges = 0
        self.lose_at = 0
        self.lose = "answer"
        self.refuse_new = False

    def lose_exchange(self, nth: int, what: str) -> None:
        """
        Lose what C{what} says of the C{nth} exchange from now.
        """
        self.exchanges = 0
        self.lose_at = nth
        self.lose = what
        self.mode = "lose-nth"

    def release_late(self, resend: _Downstream) -> None:
        """
        Let the held request reach the DMP; C{resend} goes on once the DMP
        has answered it.
        """
        late = self.late
        assert late is not None
        late.on_answer = resend.flush_waiting
        for data in self.late_data:
            late.forward(data)
        self.late_data = []

    def stop(self) -> None:
        if self.late is not None and self.late.upstream is not None:
            self.late.upstream.transport.abortConnection()
        for call, transport in self.later:
            if call.active():
                call.cancel()
                transport.abortConnection()

    def drop_all(self) -> None:
        """
        Close every connection through the proxy, as a DMP closes idle ones.
        """
        for downstream in self.downstreams:
            downstream.transport.loseConnection()
            if downstream.upstream is not None:
                downstream.upstream.transport.loseConnection()

    def buildProtocol(self, addr: Any) -> _Downstream:
        downstream = _Downstream(self)
        self.downstreams.append(downstream)
        return downstream


class ProxiedTestCase(FacadeTestCase):
    """
    A facade that reaches the DMP through a L{LosingProxy}, with a kept
    connection to it.
    """

    @inlineCallbacks
    def setUp(self) -> Any:
        yield super().setUp()
        self.proxy = LosingProxy(self.sandbox_port, threshold=64 * 1024)
        listening = reactor.listenTCP(0, self.proxy, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.addCleanup(self.proxy.stop)
        self.proxy_port = listening.getHost().port
        self.facade = yield self.start_facade(self.dmp_url(self.proxy_port))
        self.data = cda("BIO")
        self.assertGreater(len(self.data), self.proxy.threshold)
        yield self.facade.td02_exist(CDA_PATIENT, self.context)


class LostAnswerTests(ProxiedTestCase):
    @inlineCallbacks
    def stored_copies(self) -> Any:
        found = yield self.facade.td31_find(
            self.context,
            CDA_PATIENT,
            uniqueIds=[unique_id(self.data)],
        )
        return len(found)

    @inlineCallbacks
    def test_answer_lost_but_stored(self) -> Any:
        """
        The DMP stored the submission, its answer was lost: the facade finds
        it by uniqueId and does not send it again.
        """
        self.proxy.mode = "drop-answer"
        answer = yield self.submit(self.data)
        self.assertEqual(self.proxy.cuts, 1)
        self.assertEqual(answer["outcome"], "stored-after-lost-answer")
        copies = yield self.stored_copies()
        self.assertEqual(copies, 1)

    @inlineCallbacks
    def test_answer_late_but_stored(self) -> Any:
        """
        The DMP stored the submission but its answer does not come within
        the facade's timeout: the facade finds it by uniqueId.
        """
        self.facade = yield self.start_facade(
            self.dmp_url(self.proxy_port), dmp_timeout=2.0
        )
        self.proxy.mode = "hold-answer"
        answer = yield self.submit(self.data)
        self.assertEqual(self.proxy.cuts, 1)
        self.assertEqual(answer["outcome"], "stored-after-lost-answer")
        copies = yield self.stored_copies()
        self.assertEqual(copies, 1)

    @inlineCallbacks
    def test_request_lost_then_resent(self) -> Any:
        """
        The submission never reached the DMP: the facade finds nothing by
        uniqueId and sends it once more, with success.
        """
        self.proxy.mode = "swallow-request"
        answer = yield self.submit(self.data)
        self.assertEqual(self.proxy.cuts, 1)
        self.assertEqual(answer["outcome"], "resent-after-lost-answer")
        copies = yield self.stored_copies()
        self.assertEqual(copies, 1)
        self.assertEqual(self.authentication_signatures, 1)

    @inlineCallbacks
    def test_stored_late_resend_refused(self) -> Any:
        """
        The end of the submission reaches the DMP only after the facade gave
        up waiting and found nothing by uniqueId: the DMP stores it, then
        refuses the resend as a duplicate of it. The facade checks again and
        says the submission was stored (once), not refused.
        """
        self.facade = yield self.start_facade(
            self.dmp_url(self.proxy_port), dmp_timeout=2.0
        )
        self.proxy.mode = "late-request"
        answer = yield self.submit(self.data)
        self.assertEqual(self.proxy.cuts, 1)
        self.assertEqual(answer["outcome"], "stored-after-lost-answer")
        copies = yield self.stored_copies()
        self.assertEqual(copies, 1)

    @inlineCallbacks
    def test_kept_connection_closed_while_signing(self) -> Any:
        """
        The DMP closes the kept connection while the card signs the
        submission set: nothing was sent on it, so the facade sends the
        submission on a new connection, which resumes the TLS session (no
        second card signature for the handshake); stored once, answered.
        """
        closed = threading.Event()

        def close_during_set_signature(usage: KeyUsage) -> None:
            if usage is KeyUsage.signature:
                reactor.callFromThread(lambda: (self.proxy.drop_all(), closed.set()))
                closed.wait(5)
                # Time for the close to reach the facade's side.
                time.sleep(0.3)

        self.backend.on_signature = close_during_set_signature
        answer = yield self.submit(self.data)
        self.assertTrue(closed.is_set())
        self.assertEqual(answer["outcome"], "answered")
        self.assertEqual(answer["timings"]["connection"], "resumed")
        copies = yield self.stored_copies()
        self.assertEqual(copies, 1)
        self.assertEqual(self.authentication_signatures, 1)

    @inlineCallbacks
    def test_still_unknown(self) -> Any:
        """
        Every submission is lost on the way: after one resend the facade
        says the outcome is unknown (504) and names the uniqueIds.
        """
        self.proxy.mode = "swallow-request"
        self.proxy.once = False
        error = yield self.failure_of(self.submit(self.data), OutcomeUnknown)
        self.assertEqual(error.status, 504)
        self.assertEqual(self.proxy.cuts, 2)
        self.assertEqual(error.unique_ids, [unique_id(self.data)])
        self.proxy.mode = None
        copies = yield self.stored_copies()
        self.assertEqual(copies, 0)

    @inlineCallbacks
    def cutting_facade(self) -> Any:
        """
        A facade whose connections to the DMP go through a proxy with a
        small TCP window that cuts them mid-body, so that the facade is
        still sending the submission when its connection dies.
        """
        proxy = LosingProxy(self.sandbox_port, threshold=self.proxy.threshold)
        proxy.mode = "cut-request"
        listening = reactor.listenTCP(0, proxy, interface="127.0.0.1")
        # Accepted sockets inherit the listening socket's receive buffer and
        # maximum segment, and a small segment keeps the facade's send buffer
        # small too.
        listening.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        listening.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
        self.addCleanup(listening.stopListening)
        self.addCleanup(proxy.stop)
        self.proxy = proxy
        self.facade = yield self.start_facade(self.dmp_url(listening.getHost().port))
        # More than the kernel's socket buffers can hold between the two.
        filler = b"<!--" + b" " * (8 * 1024 * 1024) + b"-->"
        end = self.data.rindex(b"</ClinicalDocument>")
        self.data = self.data[:end] + filler + self.data[end:]

    @inlineCallbacks
    def test_request_cut_then_resent(self) -> Any:
        """
        The connection dies while the submission's body is being sent: the
        outcome is unknown, so the facade checks by uniqueId, finds nothing
        and sends it once more.
        """
        yield self.cutting_facade()
        answer = yield self.submit(self.data)
        self.assertEqual(self.proxy.cuts, 1)
        self.assertEqual(answer["outcome"], "resent-after-lost-answer")
        copies = yield self.stored_copies()
        self.assertEqual(copies, 1)

    @inlineCallbacks
    def test_request_always_cut(self) -> Any:
        """
        Every send of the submission is cut mid-body: 504 outcome unknown
        with the uniqueIds, never a bare internal error.
        """
        yield self.cutting_facade()
        self.proxy.once = False
        error = yield self.failure_of(self.submit(self.data), OutcomeUnknown)
        self.assertEqual(error.status, 504)
        self.assertEqual(self.proxy.cuts, 2)
        self.assertEqual(error.unique_ids, [unique_id(self.data)])


class LostUpdateTests(ProxiedTestCase):
    """
    TD3.3 whose answer never came: never sent again blindly; the document's
    state, searched by uniqueId, tells whether the update was applied.
    """

    @inlineCallbacks
    def update(self, lose: str) -> Any:
        """
        Submit a document, then mask it with the C{lose} part of the update
        lost (the search before the update is the first exchange, the update
        the second).

        @return: a Deferred that fires with the update's outcome, or the
            failure's error, and the document's uniqueId.
        """
        data = cda("VAC-NOTE")
        yield self.submit(data)
        unique = unique_id(data)
        self.proxy.lose_exchange(2, lose)
        try:
            answer = yield self.facade.td33_update(
                unique, "mask", self.context, CDA_PATIENT
            )
        except FacadeError as error:
            answer = error
        self.assertEqual(self.proxy.cuts, 1)
        return answer, unique

    @inlineCallbacks
    def masked(self, unique: str) -> Any:
        found = yield self.facade.td31_find(
            self.context, CDA_PATIENT, uniqueIds=[unique]
        )
        current = [d for d in found if d["availabilityStatus"] == Status.Approved]
        return any(c["code"] == "MASQUE_PS" for c in current[-1]["confidentialityCode"])

    @inlineCallbacks
    def test_update_answer_lost_but_applied(self) -> Any:
        answer, unique = yield self.update("answer")
        self.assertEqual(
            answer,
            {
                "status": "Success",
                "uniqueId": unique,
                "action": "mask",
                "outcome": "applied-after-lost-answer",
            },
        )
        self.assertTrue((yield self.masked(unique)))

    @inlineCallbacks
    def test_update_lost_not_applied(self) -> Any:
        error, unique = yield self.update("request")
        self.assertIsInstance(error, FacadeProblem)
        self.assertEqual(error.status, 502)
        self.assertEqual(error.problem["outcome"], "not-applied")
        self.assertIn("was not applied and can be sent again", str(error))
        self.assertFalse((yield self.masked(unique)))
        # Sent again, it is applied once.
        answer = yield self.facade.td33_update(
            unique, "mask", self.context, CDA_PATIENT
        )
        self.assertEqual(answer["outcome"], "answered")
        self.assertTrue((yield self.masked(unique)))

    @inlineCallbacks
    def test_update_outcome_unknown(self) -> Any:
        error, unique = yield self.update("request-and-all")
        self.assertIsInstance(error, OutcomeUnknown)
        self.assertEqual(error.status, 504)
        self.assertEqual(error.unique_ids, [unique])
        self.assertIn("may or may not have been applied", str(error))
        self.assertIn("TD3.1 by uniqueId", str(error))


class ReadTimeoutTests(ProxiedTestCase):
    @inlineCallbacks
    def test_read_never_answered(self) -> Any:
        """
        A read the DMP never answers is 504 once the DMP's timeout has
        passed, not twice that, and says what happened: the request was
        sent and no answer came.
        """
        facade = yield self.start_facade(self.dmp_url(self.proxy_port), dmp_timeout=2.0)
        yield facade.td02_exist(CDA_PATIENT, self.context)
        self.proxy.mode = "hold-answers"
        for read in [
            lambda: facade.td31_find(self.context, CDA_PATIENT),
            lambda: facade.td32_retrieve("1.2.3", self.context, CDA_PATIENT),
        ]:
            started = time.monotonic()
            error = yield self.failure_of(read(), DmpTimedOut)
            waited = time.monotonic() - started
            self.assertEqual((error.status, error.kind), (504, "dmp-timeout"))
            self.assertLess(waited, 3.5)
            detail = error.problem["detail"]
            self.assertNotIn("nothing was sent", detail)
            self.assertIn(
                "was sent to the DMP and no answer came within 2 seconds", detail
            )
        self.assertEqual(self.proxy.cuts, 2)

    @inlineCallbacks
    def test_resent_read_never_answered(self) -> Any:
        """
        A read whose answer is lost with its connection is sent once more,
        within what is left of the DMP's timeout; when no answer comes to
        it either, the 504 says both.
        """
        facade = yield self.start_facade(self.dmp_url(self.proxy_port), dmp_timeout=2.0)
        yield facade.td02_exist(CDA_PATIENT, self.context)
        self.proxy.mode = "lose-then-hold"
        started = time.monotonic()
        error = yield self.failure_of(
            facade.td31_find(self.context, CDA_PATIENT), DmpTimedOut
        )
        self.assertLess(time.monotonic() - started, 3.5)
        self.assertEqual(self.proxy.cuts, 2)
        detail = error.problem["detail"]
        self.assertIn("the DMP's answer never came", detail)
        self.assertIn("sent once more", detail)
        self.assertIn("left of the DMP's timeout of 2 seconds", detail)
        self.assertNotIn("nothing was sent", detail)


class OpenApiTests(FacadeTestCase):
    @inlineCallbacks
    def test_description_matches_routes(self) -> Any:
        """
        The served description is a valid OpenAPI 3.1 document made from the
        routes; every described operation answers as described (a malformed
        POST gets a documented 400 problem), a method a path does not take
        is 405 and a path it does not describe is 404, both as problems.
        The answers of every other test of this module are checked the same
        way when it ends.
        """
        served = yield self.facade.openapi()
        validate_description(served)
        self.assertEqual(served, json.loads(json.dumps(openapi())))
        self.assertEqual(served["openapi"], "3.1.0")
        described = {
            (method.upper(), path)
            for path, operations in served["paths"].items()
            for method in operations
        }
        self.assertEqual(described, {(r.method, r.path) for r in ROUTES})
        for method, path in sorted(described):
            response = yield Agent(reactor).request(
                method.encode(),
                (self.facade_url + path).encode(),
                Headers({b"content-type": [b"application/json"]}),
                _body(b"{}") if method == "POST" else None,
            )
            yield readBody(response)
            self.assertEqual(response.code, 200 if method == "GET" else 400, path)
        for method, path in [(b"GET", "/dmp/td21SubmitDocuments"), (b"GET", "/dmp")]:
            response = yield Agent(reactor).request(
                method, (self.facade_url + path).encode()
            )
            yield readBody(response)
        self.assertEqual(
            [(a.path, a.status) for a in self.answers[-2:]],
            [("/dmp/td21SubmitDocuments", 405), ("/dmp", 404)],
        )
        self.assertEqual(
            {(a.method, a.path) for a in self.answers} & described, described
        )
        check_answers(self.answers, served)

    @inlineCallbacks
    def test_head(self) -> Any:
        """
        HEAD on a GET route answers as GET would, without the body; the
        Allow header of a 405 names HEAD wherever GET is taken.
        """
        for path in ("/health", "/openapi.json"):
            response = yield Agent(reactor).request(
                b"HEAD", (self.facade_url + path).encode()
            )
            body = yield readBody(response)
            self.assertEqual((response.code, body), (200, b""), path)
            self.assertEqual(
                response.headers.getRawHeaders(b"content-type"),
                [b"application/json"],
            )
        response = yield Agent(reactor).request(
            b"DELETE", (self.facade_url + "/health").encode()
        )
        yield readBody(response)
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"GET, HEAD"])

    def test_answers_checked(self) -> None:
        """
        The check of the answers fails on what the description does not
        say: an undescribed status, media type or member type.
        """
        description = openapi()
        problem = json.dumps(
            {"type": "x", "title": "t", "status": 418, "detail": "d"}
        ).encode()
        for answer in [
            SentAnswer("POST", "/dmp/td02Exist", 418, PROBLEM, problem, "", b""),
            SentAnswer("POST", "/dmp/td02Exist", 200, "text/html", b"<p>", "", b""),
            SentAnswer(
                "POST",
                "/dmp/td02Exist",
                200,
                "application/json",
                b'{"exists": "yes", "responseCode": "OK"}',
                "",
                b"",
            ),
            SentAnswer("GET", "/health", 200, "application/json", b"{}", "", b""),
        ]:
            self.assertRaises(AssertionError, check_answers, [answer], description)


@inlineCallbacks
def post_json(url: str, body: Any, **headers: str) -> Any:
    """
    POST C{body} as JSON to C{url}.

    @return: a Deferred that fires with the response and its JSON body.
    """
    sent = Headers({b"content-type": [b"application/json"]})
    for name, value in headers.items():
        sent.setRawHeaders(name.replace("_", "-"), [value])
    response = yield Agent(reactor).request(
        b"POST", url.encode(), sent, _body(json.dumps(body).encode())
    )
    content = yield readBody(response)
    return response, json.loads(content) if content else None


@inlineCallbacks
def post_raw(url: str, body: bytes, content_type: str) -> Any:
    """
    POST C{body} as it is to C{url}.

    @return: a Deferred that fires with the response and its JSON body
        (C{None} when it has none).
    """
    response = yield Agent(reactor).request(
        b"POST",
        url.encode(),
        Headers({b"content-type": [content_type.encode()]}),
        _body(body),
    )
    content = yield readBody(response)
    return response, json.loads(content) if content else None


def multipart(boundary: str, parts: list[tuple[str, str, bytes]]) -> bytes:
    """
    @return: a multipart/form-data body of C{(disposition, media type,
        content)} parts.
    """
    return (
        b"".join(
            f"--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n"
            f"Content-Type: {media}\r\n\r\n".encode()
            + content
            + b"\r\n"
            for disposition, media, content in parts
        )
        + f"--{boundary}--\r\n".encode()
    )


def _body(data: bytes) -> Any:
    import io

    from twisted.web.client import FileBodyProducer

    return FileBodyProducer(io.BytesIO(data))


class SubmitCommandTests(FacadeTestCase):
    @inlineCallbacks
    def test_submit_command(self) -> Any:
        """
        C{cpsdmp submit} as a process against the running facade: the JSON
        answer names the uniqueId; the document is then in the DMP.
        """
        data_path = next(p for p in example_cdas() if p.name.startswith("VAC_"))
        context_file = Path(self.mktemp()).absolute()
        context_file.write_text(json.dumps(self.context))
        env = dict(os.environ, PYTHONPATH=str(REPOSITORY))
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            [
                "-m",
                "cpsdmp.cli",
                "submit",
                str(data_path),
                "--facade",
                self.facade_url,
                "--agent-context",
                str(context_file),
                "--class-code",
                "11^Synthèse",
                "--json",
            ],
            env=env,
            path=str(REPOSITORY),
        )
        self.assertEqual(code, 0, err)
        answer = json.loads(out)
        expected = unique_id(data_path.read_bytes())
        self.assertEqual(answer["documents"][0]["uniqueId"], expected)
        content = yield self.facade.td32_retrieve(expected, self.context, CDA_PATIENT)
        self.assertEqual(content, data_path.read_bytes())

        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            [
                "-m",
                "cpsdmp.cli",
                "submit",
                str(data_path),
                "--facade",
                self.facade_url,
                "--agent-context",
                str(context_file),
                "--class-code",
                "11^Synthèse",
            ],
            env=env,
            path=str(REPOSITORY),
        )
        self.assertEqual(code, 1)
        self.assertIn(b"422", err)


class _Counting(Protocol):
    """
    A listener that notes every connection and every byte it receives, and
    never answers.
    """

    def connectionMade(self) -> None:
        self.factory.connections += 1  # type: ignore[attr-defined]
        self.factory.transports.append(self.transport)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.factory.received += data  # type: ignore[attr-defined]


def counting_listener(test: TestCase) -> tuple[Factory, int]:
    """
    @return: a L{_Counting} listener's factory on loopback, and its port.
    """
    factory = Factory.forProtocol(_Counting)
    factory.connections = 0  # type: ignore[attr-defined]
    factory.received = b""  # type: ignore[attr-defined]
    factory.transports = []  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    test.addCleanup(port.stopListening)

    def close() -> None:
        for transport in factory.transports:  # type: ignore[attr-defined]
            transport.abortConnection()

    test.addCleanup(close)
    return factory, port.getHost().port


class _HangUp(Protocol):
    """
    Reads a request, then closes the connection without answering.
    """

    def dataReceived(self, data: bytes) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]


class AgentContextTests(FacadeTestCase):
    @inlineCallbacks
    def test_malformed_context_refused_at_once(self) -> Any:
        """
        An agent context whose URL is not https://, whose fingerprint is not
        a SHA-256 or whose token is not shaped like the agent's is refused
        at once (400, naming the member; the token never repeated), and
        nothing is sent to the address it names: a listener there sees no
        connection.
        """
        listener, port = counting_listener(self)
        token = self.context["token"]
        cases = [
            ({"url": f"http://127.0.0.1:{port}"}, "https://"),
            ({"url": f"ftp://127.0.0.1:{port}"}, "https://"),
            ({"url": f"HTTPS://127.0.0.1:{port}"}, "https://"),
            ({"url": "https://"}, "url"),
            ({"url": f"https://user:pw@127.0.0.1:{port}"}, "credentials"),
            ({"url": f"https://127.0.0.1:{port}/?a=b"}, "query"),
            ({"url": f"https://[::1]:{port}"}, "IPv6"),
            ({"url": "https://127.0.0.1:99999"}, "port"),
            ({"url": f"https://127.0.0.1:{port}/" + "a" * 3000}, "url"),
            ({"tlsFingerprint": "nope"}, "tlsFingerprint"),
            ({"tlsFingerprint": "sha256:00"}, "tlsFingerprint"),
            ({"tlsFingerprint": "sha256:" + "g" * 64}, "tlsFingerprint"),
            ({"tlsFingerprint": "sha256:" + "00 " * 32}, "tlsFingerprint"),
            ({"token": token[:15]}, "token"),
            ({"token": "A" * 513}, "token"),
            ({"token": token[:20] + " " + token[21:]}, "token"),
            ({"token": token[:20] + "=" + token[21:]}, "token"),
        ]
        for change, named in cases:
            context = {**self.context, "url": f"https://127.0.0.1:{port}", **change}
            response, problem = yield post_json(
                self.facade_url + "/dmp/td02Exist",
                {"agentContext": context, "patient": CDA_PATIENT},
            )
            self.assertEqual(response.code, 400, (change, problem))
            self.assertEqual(
                problem["type"].rsplit("/", 1)[-1], "malformed-request", problem
            )
            self.assertIn(named, problem["detail"], change)
            self.assertLess(len(problem["detail"]), 400, change)
            if "token" in change:
                self.assertNotIn(change["token"], problem["detail"])
        self.assertEqual((listener.connections, listener.received), (0, b""))
        # Each refused as the description says: not one of these conforms.
        schema = _pointer(
            "paths",
            "/dmp/td02Exist",
            "post",
            "requestBody",
            "content",
            "application/json",
            "schema",
            "properties",
            "agentContext",
        )
        conforms(self.context, schema)
        for change, _ in cases:
            if (
                change.get("url", "").startswith("https://")
                and len(change["url"]) < 2048
            ):
                continue  # the description does not parse URLs
            self.assertRaises(
                AssertionError, conforms, dict(self.context, **change), schema
            )

    @inlineCallbacks
    def test_well_formed_contexts(self) -> Any:
        """
        A fingerprint with colons between its bytes or in capitals, and a
        token of another length than the agent's own, are well formed: the
        agent is asked, and says whether it knows them. Each spelling of the
        fingerprint is the same context: its kept connection is reused, and
        the card signed one handshake only.
        """
        fingerprint = self.context["tlsFingerprint"]
        digest = fingerprint.split(":", 1)[1]
        first = yield self.facade.td02_exist(CDA_PATIENT, self.context)
        self.assertEqual(first["timings"]["connection"], "new handshake")
        # Every time in seconds, the card's handshake signature included,
        # rounded to the microsecond.
        self.assertIsNotNone(first["timings"]["handshakeSignature"])
        for name, value in first["timings"].items():
            if isinstance(value, float):
                self.assertEqual(value, round(value, 6), name)
        for variant in [
            "sha256:" + digest.upper(),
            "sha256:" + ":".join(digest[i : i + 2] for i in range(0, 64, 2)),
            "sha256:" + ":".join(digest[i : i + 2] for i in range(0, 64, 2)).upper(),
        ]:
            answer = yield self.facade.td02_exist(
                CDA_PATIENT, dict(self.context, tlsFingerprint=variant)
            )
            self.assertTrue(answer["exists"])
            self.assertEqual(answer["timings"]["connection"], "reused", variant)
        self.assertEqual(self.authentication_signatures, 1)
        error = yield self.failure_of(
            self.facade.td02_exist(
                CDA_PATIENT, dict(self.context, token=secrets.token_urlsafe(12))
            ),
            AgentSessionExpired,
        )
        self.assertEqual(error.status, 401)


class _Greeting(Protocol):
    """
    A client that writes as soon as it is connected, as TLS does.
    """

    def connectionMade(self) -> None:
        self.transport.write(b"hello")  # type: ignore[union-attr]


class _Attempt(ClientFactory):
    protocol = _Greeting

    def __init__(self) -> None:
        self.failed: Deferred[Any] = Deferred()

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        # The reason as a value, not as the Deferred's failure.
        self.failed.callback([reason])


class AgentNetworkTests(FacadeTestCase):
    @inlineCallbacks
    def test_outside_networks_refused(self) -> Any:
        """
        With agents allowed only in another network than loopback, every
        agent URL on loopback is refused with the same 403, whether a real
        agent, a closed port, a plain listener or a TLS server is there (the
        facade is no port scanner), and nothing is sent: the listener sees
        no connection.
        """
        facade = yield self.start_facade(
            self.dmp_url(self.sandbox_port),
            agent_networks=[ip_network("192.0.2.0/24")],
        )
        listener, port = counting_listener(self)
        details = set()
        for url in [
            self.agent.url,
            f"https://127.0.0.1:{free_port()}",
            f"https://127.0.0.1:{port}",
            f"https://localhost:{port}",
            f"https://127.0.0.1:{self.sandbox_port}",
        ]:
            error = yield self.failure_of(
                facade.td02_exist(CDA_PATIENT, dict(self.context, url=url)),
                AgentNotAllowed,
            )
            self.assertEqual((error.status, error.kind), (403, "agent-not-allowed"))
            self.assertIn("--agent-network", str(error))
            self.assertNotIn("127.0.0.1", str(error))
            details.add(error.problem["detail"])
        self.assertEqual(len(details), 1, details)
        self.assertEqual((listener.connections, listener.received), (0, b""))
        self.assertEqual(self.authentication_signatures, 0)

        # The same agent, allowed: it answers.
        facade = yield self.start_facade(
            self.dmp_url(self.sandbox_port),
            agent_networks=[ip_network("192.0.2.0/24"), ip_network("127.0.0.1/32")],
        )
        answer = yield facade.td02_exist(CDA_PATIENT, self.context)
        self.assertTrue(answer["exists"])

    @inlineCallbacks
    def test_peer_checked_once_connected(self) -> Any:
        """
        A name is resolved by the reactor and its address is not known
        before the connection is made: the connected peer is checked before
        the client may write, so a name that resolves into a refused network
        fails with nothing written (the listener sees a connection, and not
        one byte).
        """
        from cpsdmp.facade.networks import AgentNotAllowed as NotAllowed

        listener, port = counting_listener(self)
        guarded = AgentNetworkReactor(reactor, [ip_network("192.0.2.0/24")])
        attempt = _Attempt()
        guarded.connectTCP("localhost", port, attempt)
        [reason] = yield attempt.failed
        self.assertIsInstance(reason.value, NotAllowed)
        for _ in range(20):
            if listener.connections:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        yield deferLater(reactor, 0.1, lambda: None)
        self.assertEqual((listener.connections, listener.received), (1, b""))

        # Allowed, the same client writes.
        guarded = AgentNetworkReactor(reactor, [ip_network("127.0.0.0/8")])
        connector = guarded.connectTCP("localhost", port, _Attempt())
        self.addCleanup(connector.disconnect)
        for _ in range(40):
            if listener.received:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(listener.received, b"hello")

    def test_is_allowed(self) -> None:
        from cpsdmp.facade.networks import DEFAULT_AGENT_NETWORKS, is_allowed

        for host, allowed in [
            ("127.0.0.1", True),
            ("127.1.2.3", True),
            ("::1", True),
            ("::ffff:127.0.0.1", True),
            ("10.0.0.1", False),
            ("::ffff:10.0.0.1", False),
            ("169.254.169.254", False),
            ("fe80::1%eth0", False),
            ("localhost", False),
            ("", False),
        ]:
            self.assertEqual(is_allowed(host, DEFAULT_AGENT_NETWORKS), allowed, host)
        self.assertTrue(is_allowed("fe80::1%eth0", [ip_network("fe80::/10")]))


class MoreFaultTests(FacadeTestCase):
    @inlineCallbacks
    def test_agent_timeout(self) -> Any:
        """
        An agent address where something accepts connections and never
        answers: 504, the agent did not answer in time.
        """
        silent = reactor.listenTCP(
            0, Factory.forProtocol(Protocol), interface="127.0.0.1"
        )
        self.addCleanup(silent.stopListening)
        facade = yield self.start_facade(
            self.dmp_url(self.sandbox_port), agent_timeout=1.0
        )
        context = dict(self.context, url=f"https://127.0.0.1:{silent.getHost().port}")
        error = yield self.failure_of(
            facade.td02_exist(CDA_PATIENT, context), AgentTimedOut
        )
        self.assertEqual(error.status, 504)

    @inlineCallbacks
    def test_agent_describes_another_profession(self) -> Any:
        """
        An agent (or something between it and the facade) that says the
        card holder is a pharmacist when the authentication certificate
        names a doctor: 502 card-holder-unusable, nothing submitted.
        """
        card = self.agent.resource.card
        genuine = yield card.holder()
        self.assertEqual(genuine.profession, "Médecin")
        rewritten = Holder(genuine.id, genuine.name, "Pharmacien")
        card.holder = lambda: succeed(rewritten)  # type: ignore[method-assign]
        error = yield self.failure_of(self.submit(cda("BIO")), AgentFailed)
        self.assertEqual((error.status, error.kind), (502, "card-holder-unusable"))
        self.assertIn("profession is not the one", error.problem["detail"])
        self.assertEqual(self.backend.signatures[KeyUsage.signature], 0)

    @inlineCallbacks
    def test_reason_phrases(self) -> Any:
        """
        Every problem's status line carries its reason phrase, also for the
        statuses twisted.web has no name for (it would say "Unknown
        Status"): 422 for a document that is not a CDA, 400 for bad JSON.
        """
        body = json.dumps(
            {
                "agentContext": self.context,
                "documents": [{"content": base64.b64encode(b"<not-xml").decode()}],
            }
        ).encode()
        response, problem = yield post_raw(
            self.facade_url + "/dmp/td21SubmitDocuments", body, "application/json"
        )
        self.assertEqual(
            (response.code, response.phrase), (422, b"Unprocessable Entity"), problem
        )
        response, problem = yield post_raw(
            self.facade_url + "/dmp/td02Exist", b"{", "application/json"
        )
        self.assertEqual((response.code, response.phrase), (400, b"Bad Request"))

    @inlineCallbacks
    def test_deeply_nested_json(self) -> Any:
        """
        A body, or a multipart JSON part, of 200,000 nested lists: 400, as a
        malformed request, not an internal error.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        nested = b"[" * 200_000
        response, problem = yield post_raw(
            self.facade_url + "/dmp/td02Exist", nested, "application/json"
        )
        self.assertEqual(response.code, 400, problem)
        self.assertIn("nested too deeply", problem["detail"])
        boundary = "b0undary"
        response, problem = yield post_raw(
            self.facade_url + "/dmp/td21SubmitDocuments",
            multipart(
                boundary,
                [
                    ('name="agentContext"', "application/json", nested),
                    ('name="documents"; filename="a.xml"', "text/xml", cda("BIO")),
                ],
            ),
            f"multipart/form-data; boundary={boundary}",
        )
        self.assertEqual(response.code, 400, problem)
        self.assertIn("'agentContext' is JSON nested too deeply", problem["detail"])
        self.assertEqual([e for e in events if e.get("log_failure")], [])

    @inlineCallbacks
    def test_malformed_multipart(self) -> Any:
        """
        A multipart/form-data body that cannot be read (no part under its
        boundary, no boundary at all, no agent context or no file) is a 400
        problem document saying what is wrong, and the facade logs it; the
        card signs nothing.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        url = self.facade_url + "/dmp/td21SubmitDocuments"
        context = ('name="agentContext"', "application/json", b"{}")
        document = ('name="documents"; filename="a.xml"', "text/xml", cda("BIO"))
        for content_type, body, said in [
            ("multipart/form-data; boundary=xyz", b"garbage", "boundary 'xyz'"),
            ("multipart/form-data", b"garbage", "no boundary"),
            (
                "multipart/form-data; boundary=xyz",
                multipart("xyz", [document]),
                "no part 'agentContext'",
            ),
            (
                "multipart/form-data; boundary=xyz",
                multipart("xyz", [context]),
                "no file part",
            ),
            (
                "multipart/form-data; boundary=xyz",
                multipart("xyz", [(context[0], context[1], b'"x"'), document]),
                "agentContext",
            ),
            (
                "multipart/form-data; boundary=xyz",
                multipart("xyz", [context, document]).removesuffix(b"--xyz--\r\n"),
                "it is truncated",
            ),
            (
                "multipart/form-data; boundary=xyz",
                multipart("xyz", [context, ('filename="a.xml"', "text/xml", b"<x/>")]),
                "part 2 has no name",
            ),
            (
                "multipart/form-data; boundary=xyz",
                multipart(
                    "xyz", [(context[0] + '; filename="c.json"', JSON, b"{}"), document]
                ),
                "part 'agentContext' has a filename",
            ),
            (
                "multipart/form-data; boundary=xyz",
                multipart(
                    "xyz",
                    [
                        context,
                        (
                            'name="d"; filename="a.xml"',
                            "text/xml\r\nContent-Transfer-Encoding: base64",
                            base64.b64encode(cda("BIO")),
                        ),
                    ],
                ),
                "part 'd' has the Content-Transfer-Encoding 'base64'",
            ),
        ]:
            response, problem = yield post_raw(url, body, content_type)
            self.assertEqual(response.code, 400, (body[:20], problem))
            self.assertEqual(
                response.headers.getRawHeaders(b"content-type"),
                [b"application/problem+json"],
            )
            self.assertEqual(problem["type"].rsplit("/", 1)[-1], "malformed-request")
            self.assertIn(said, problem["detail"])
        logged = [
            e
            for e in events
            if e.get("operation") == "td21SubmitDocuments" and e.get("status") == 400
        ]
        self.assertEqual(len(logged), 9)
        self.assertEqual(self.backend.signatures[KeyUsage.signature], 0)

    @inlineCallbacks
    def test_agent_hangs_up(self) -> Any:
        """
        Something that holds the agent's certificate takes each request and
        closes the connection without an answer: 502, saying so in words,
        not with the HTTP client's exception.
        """
        certificate = x509.load_pem_x509_certificate(
            Path(self.card.sandbox_cert).read_bytes()
        )
        options = ssl.CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(
                serialization.load_pem_private_key(
                    Path(self.card.sandbox_key).read_bytes(), None
                )
            ),
            certificate=crypto.X509.from_cryptography(certificate),
        )
        port = reactor.listenSSL(  # type: ignore[attr-defined]
            0, Factory.forProtocol(_HangUp), options, interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        context = dict(
            self.context,
            url=f"https://127.0.0.1:{port.getHost().port}",
            tlsFingerprint="sha256:" + certificate.fingerprint(hashes.SHA256()).hex(),
        )
        error = yield self.failure_of(
            self.facade.td02_exist(CDA_PATIENT, context), AgentFailed
        )
        self.assertEqual((error.status, error.kind), (502, "agent-unreachable"))
        detail = error.problem["detail"]
        self.assertIn("the connection ended before the answer came", detail)
        for internal in ["ResponseNeverReceived", "Failure", "twisted", "<", "(["]:
            self.assertNotIn(internal, detail)

    @inlineCallbacks
    def test_bad_values_quoted_short(self) -> Any:
        """
        A huge bad value (a 100 KB INS, authority, uniqueId, time, status or
        override name) is named by its first characters and its length in
        the 400, never echoed whole.
        """
        huge = "1" * 100_000
        calls = [
            ("/dmp/td02Exist", {"patient": {"ins": huge}}, "patient.ins"),
            (
                "/dmp/td02Exist",
                {"patient": {"ins": CDA_PATIENT["ins"], "authority": huge}},
                "patient.authority",
            ),
            (
                "/dmp/td32Retrieve",
                {"patient": CDA_PATIENT, "uniqueId": huge},
                "uniqueId",
            ),
            (
                "/dmp/td31Find",
                {"patient": CDA_PATIENT, "uniqueIds": ["1.2", huge]},
                "uniqueIds",
            ),
            (
                "/dmp/td31Find",
                {"patient": CDA_PATIENT, "creationFrom": huge},
                "creationFrom",
            ),
            ("/dmp/td31Find", {"patient": CDA_PATIENT, "statuses": [huge]}, "status"),
            (
                "/dmp/td21SubmitDocuments",
                {
                    "documents": [
                        {
                            "content": base64.b64encode(cda("BIO")).decode(),
                            "overrides": {huge: "x"},
                        }
                    ]
                },
                "overrides has no member",
            ),
            (
                "/dmp/td21SubmitDocuments",
                {
                    "documents": [
                        {
                            "content": base64.b64encode(cda("BIO")).decode(),
                            "overrides": {"creationTime": huge},
                        }
                    ]
                },
                "creationTime",
            ),
        ]
        for path, body, named in calls:
            response, problem = yield post_json(
                self.facade_url + path, {"agentContext": self.context, **body}
            )
            self.assertEqual(response.code, 400, (path, named, problem))
            self.assertIn(named, problem["detail"])
            self.assertLess(len(problem["detail"]), 400, problem["detail"])
            self.assertNotIn("1" * 100, problem["detail"])
            # The description refuses them too.
            request = _pointer(
                "paths",
                path,
                "post",
                "requestBody",
                "content",
                "application/json",
                "schema",
            )
            self.assertRaises(
                AssertionError,
                conforms,
                {"agentContext": self.context, **body},
                request,
            )

    @inlineCallbacks
    def test_body_limit(self) -> Any:
        """
        A body over the limit is refused with 413 and a problem document,
        before the DMP or the agent is asked anything.
        """
        self.service.site.requestFactory.max_body = 10_000
        error = yield self.failure_of(
            self.facade.td21_submit([cda("BIO")], self.context), FacadeProblem
        )
        self.assertEqual(error.status, 413)
        self.assertEqual(error.kind, "too-large")
        self.assertEqual(self.backend.signatures[KeyUsage.signature], 0)

    @inlineCallbacks
    def test_card_rate_limited(self) -> Any:
        """
        The agent's signature limit for the session is reached (here one a
        minute, spent on the TLS handshake): the submission-set signature is
        refused and the facade answers 429 with Retry-After, not 502.
        """
        from cpsdmp.agent.audit import RateLimit

        agent = yield start_agent(self, self.backend, rate_limit=RateLimit(1, 60.0))
        context = yield open_session(agent.url, self.card.pin, agent.fingerprint)
        data = cda("VAC-NOTE")
        response, problem = yield post_json(
            self.facade_url + "/dmp/td21SubmitDocuments",
            {
                "agentContext": context,
                "documents": [{"content": base64.b64encode(data).decode()}],
            },
        )
        self.assertEqual(response.code, 429)
        self.assertEqual(problem["type"].rsplit("/", 1)[-1], "card-rate-limited")
        retry = int(response.headers.getRawHeaders("retry-after")[0])
        self.assertTrue(1 <= retry <= 60)
        self.assertEqual(problem["retryAfter"], retry)
        self.assertIn("signature", problem["detail"])
        self.assertIn(f"{retry} s", problem["detail"])
        error = yield self.failure_of(
            self.facade.td21_submit([data], context, [overrides_for(data)]),
            CardRateLimited,
        )
        self.assertEqual(error.retry_after, problem["retryAfter"])

    @inlineCallbacks
    def test_answer_limit(self) -> Any:
        """
        A DMP answer over the facade's limit is refused (502), not read.
        """
        data = cda("DOC_NON")
        submitted = yield self.submit(data)
        small = yield self.start_facade(
            self.dmp_url(self.sandbox_port), max_answer_bytes=len(data) // 2
        )
        error = yield self.failure_of(
            small.td32_retrieve(
                submitted["documents"][0]["uniqueId"], self.context, CDA_PATIENT
            ),
            DmpFailed,
        )
        self.assertEqual((error.status, error.kind), (502, "dmp-bad-answer"))
        self.assertIn("too large", str(error))

    @inlineCallbacks
    def test_one_log_event_per_transaction(self) -> Any:
        """
        Each DMP transaction logs one event with its action, the DMP's
        answer, its duration, the connection (new, reused) and the card
        signature; no event carries the token.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        yield self.facade.td02_exist(CDA_PATIENT, self.context)
        yield self.facade.td02_exist(CDA_PATIENT, self.context)
        yield self.submit(cda("VAC-NOTE"))
        transactions = [
            e
            for e in events
            if e.get("log_namespace") == "cpsdmp.facade.service" and e.get("action")
        ]
        self.assertEqual(
            [e["action"] for e in transactions], ["TD0.2", "TD0.2", "TD2.1"]
        )
        self.assertEqual([e["code"] for e in transactions], ["OK", "OK", "Success"])
        self.assertEqual(transactions[0]["connection"], "new handshake")
        self.assertNotEqual(transactions[0]["signature"], "none")
        self.assertEqual(transactions[1]["connection"], "reused")
        self.assertEqual(transactions[1]["signature"], "none")
        self.assertIn("submission-set signature", formatEvent(transactions[2]))
        # Neither the token nor the document (its title, its patient's INS)
        # in any event of the facade, the agent or the local DMP.
        title = re.search(rb"<title>([^<]+)</title>", cda("VAC-NOTE"))
        assert title is not None
        secrets = [self.context["token"], CDA_PATIENT["ins"], title.group(1).decode()]
        for event in events:
            for secret in secrets:
                self.assertNotIn(secret, formatEvent(event) or "")
                self.assertNotIn(secret, repr(event))


class ProblemMappingTests(SynchronousTestCase):
    """
    Each failure the facade meets, and the status and problem type a
    backend gets for it.
    """

    def test_statuses(self) -> None:
        from cpsdmp.agent.client import (
            AgentUnreachable,
            NoCard,
            PinBlocked,
            TokenExpired,
        )
        from cpsdmp.facade.resource import BadRequest, problem_for
        from cpsdmp.facade.service import DmpTimeout, DmpUnreachable
        from cpsdmp.protocols.tls import HandshakeFailed
        from cpsdmp.protocols.tls.alerts import AlertDescription
        from cpsdmp.xds.responses import (
            FAILURE,
            RegistryError,
            RegistryFailure,
            RegistryResult,
        )

        refusal = RegistryFailure(
            RegistryResult(
                FAILURE, [RegistryError("DMP_4001", "patient inconnu", "Error")]
            )
        )
        cases = [
            (BadRequest("no agentContext"), 400, "malformed-request"),
            (TokenExpired("expired"), 401, "token-expired"),
            (PinBlocked("PIN blocked"), 423, "pin-blocked"),
            (NoCard("no card"), 503, "no-card"),
            (AgentUnreachable("cannot reach the agent"), 502, "agent-unreachable"),
            (AgentUnreachable("the agent did not answer"), 504, "agent-timeout"),
            (
                HandshakeFailed(
                    "WAIT_SIGNATURE",
                    "key holder failed",
                    AlertDescription.internal_error,
                ),
                502,
                "handshake-failed",
            ),
            (DmpUnreachable("refused"), 502, "dmp-unreachable"),
            (DmpTimeout("slow"), 504, "dmp-timeout"),
            (CdaError("no title"), 422, "invalid-cda"),
            (refusal, 422, "dmp-refused"),
            (RuntimeError("bug"), 500, "internal-error"),
        ]
        for error, status, kind in cases:
            problem = problem_for(error)
            self.assertEqual((problem.status, problem.kind), (status, kind), error)
        document = problem_for(refusal).document()
        self.assertEqual(
            document["errors"],
            [
                {
                    "code": "DMP_4001",
                    "context": "patient inconnu",
                    "severity": "Error",
                    "location": "",
                }
            ],
        )
        handshake = problem_for(cases[6][0]).document()
        self.assertEqual(
            (handshake["step"], handshake["alert"]),
            ("WAIT_SIGNATURE", "internal_error"),
        )
        self.assertNotIn("bug", json.dumps(problem_for(RuntimeError("bug")).document()))

    def test_rate_limited(self) -> None:
        """
        The agent's rate limit is a 429 whose words fit any call, with the
        agent's wait when it is sensible, else a minute; a wait of the
        agent's that is not is never passed on to the backend.
        """
        from cpsdmp.agent import problems
        from cpsdmp.agent.client import RateLimited
        from cpsdmp.facade.resource import problem_for

        for retry, seconds in [(5, 5), (10**30, 60), (None, 60)]:
            error = RateLimited(
                "the agent answered GET /cps/card: too many requests",
                {"type": problems.RATE_LIMITED, "retryAfter": retry},
            )
            problem = problem_for(error)
            document = problem.document()
            self.assertEqual((problem.status, problem.kind), (429, "card-rate-limited"))
            self.assertEqual(document["retryAfter"], seconds)
            self.assertEqual(
                document["title"],
                "The agent takes no more requests of this session for now",
            )
            self.assertEqual(
                document["detail"],
                "the agent answered GET /cps/card: too many requests",
            )

    def test_conflict_said(self) -> None:
        """
        A TD3.3 that would change nothing says the document's state as it
        is: "already" only for the state asked for.
        """
        from cpsdmp.facade.resource import _conflict

        classcode = CodedValue("11", CLASS_SYSTEM, "Synthèse")
        entry = document_entry(
            cda("BIO"), STRUCTURE, DEFAULTS, {"classCode": classcode}
        )
        said = f"document {entry.uniqueId} is"
        self.assertEqual(
            _conflict(entry, "unmask"), f"{said} not masked: nothing to unmask"
        )
        self.assertEqual(
            _conflict(entry, "unarchive"), f"{said} not archived: nothing to unarchive"
        )
        self.assertIsNone(_conflict(entry, "mask"))

    def test_long_detail_cut(self) -> None:
        """
        Whatever a message quotes, a problem's detail is at most 1000
        characters and says it was cut.
        """
        from cpsdmp.facade.resource import problem_for
        from cpsdmp.xds.ebrim import MetadataError

        document = problem_for(MetadataError("bad " + "x" * 5000)).document()
        self.assertEqual(len(document["detail"]), 1000 + len("... (cut)"))
        self.assertTrue(document["detail"].endswith("... (cut)"))

    def test_overrides(self) -> None:
        from cpsdmp.facade.resource import BadRequest, read_overrides

        accepted = {
            "classCode": SYNTHESE,
            "title": "Bilan",
            "confidentialityCode": [SYNTHESE],
        }
        values = read_overrides(accepted)
        self.assertEqual(
            values["classCode"], CodedValue("11", SYNTHESE["codingScheme"], "Synthèse")
        )
        self.assertEqual(values["title"], "Bilan")
        self.assertRaises(BadRequest, read_overrides, {"patientId": "x"})
        self.assertRaises(BadRequest, read_overrides, {"classCode": {"code": "11"}})

        # The description says the same.
        schema = _pointer(
            "paths",
            "/dmp/td21SubmitDocuments",
            "post",
            "requestBody",
            "content",
            "application/json",
            "schema",
            "properties",
            "documents",
            "items",
            "properties",
            "overrides",
        )
        conforms(accepted, schema)
        for refused in [{"patientId": "x"}, {"classCode": {"code": "11"}}]:
            self.assertRaises(AssertionError, conforms, refused, schema)

    def test_lone_surrogate_in_detail(self) -> None:
        """
        A problem whose detail quotes a lone surrogate (which a JSON escape
        can give and UTF-8 cannot encode) is still sent, the surrogate as
        the same JSON escape.
        """
        from twisted.web.test.requesthelper import DummyRequest

        from cpsdmp.facade.resource import FacadeResource, Problem

        request = DummyRequest([b""])
        request._disconnected = False
        resource = FacadeResource(_bare_service())
        resource._send_problem(request, Problem(400, "x", "X", "bad \ud800 here"))
        self.assertEqual(request.responseCode, 400)
        document = json.loads(b"".join(request.written))
        self.assertEqual(document["detail"], "bad \ud800 here")


class DocumentFilenameTests(SynchronousTestCase):
    def test_only_safe_characters(self) -> None:
        """
        A retrieved document's file name keeps only letters, digits, dots,
        dashes and underscores of its uniqueId, never starts with a dot,
        and has its media type's extension.
        """
        from cpsdmp.facade.resource import document_filename

        for unique_id, media_type, name in [
            ("1.2.250.1^abc", "text/xml", "1.2.250.1_abc.xml"),
            ('../"x"\r\n;y', "application/octet-stream", "__x____y.bin"),
            ("..", "application/pdf", "document.pdf"),
        ]:
            self.assertEqual(document_filename(unique_id, media_type), name)


class OptionsTests(SynchronousTestCase):
    def test_needs_roots(self) -> None:
        from twisted.python.usage import UsageError

        from cpsdmp.facade.tap import Options

        self.assertRaises(UsageError, Options().parseOptions, [])

    def test_test_values_warned(self) -> None:
        """
        Without the structure's identity and the homologation number, the
        facade says at start that it fills the VIHF with test values.
        """
        from twisted.logger import globalLogPublisher

        from cpsdmp.facade.tap import Options, makeService

        card = shared_testcard()
        options = Options()
        options.parseOptions(["--testcard", str(Path(card.ca_root).parent)])
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        makeService(options)
        warned = {e.get("option") for e in events if e.get("log_level").name == "warn"}
        self.assertEqual(warned, {"structure-id", "structure-name", "homologation-id"})

    def test_agent_networks(self) -> None:
        """
        Agents are reached on loopback unless --agent-network says where,
        as often as needed; a value that is not a network is refused.
        """
        from twisted.python.usage import UsageError

        from cpsdmp.facade.tap import Options, makeService

        card = shared_testcard()
        testcard = ["--testcard", str(Path(card.ca_root).parent)]
        options = Options()
        options.parseOptions(testcard)
        config = makeService(options).dmp.config
        self.assertEqual(
            list(config.agent_networks),
            [ip_network("127.0.0.0/8"), ip_network("::1/128")],
        )
        options = Options()
        options.parseOptions(
            [*testcard, "--agent-network", "10.20.0.0/16"]
            + ["--agent-network", "fd00::/8"]
        )
        service = makeService(options)
        self.assertEqual(
            list(service.dmp.config.agent_networks),
            [ip_network("10.20.0.0/16"), ip_network("fd00::/8")],
        )
        self.assertEqual(
            service.dmp.agent_reactor.networks,
            (ip_network("10.20.0.0/16"), ip_network("fd00::/8")),
        )
        for bad in ["10.20.0.1/16", "tunnel", "10.0.0.0/33"]:
            self.assertRaises(
                UsageError,
                Options().parseOptions,
                [*testcard, "--agent-network", bad],
            )

    def test_testcard_and_settings(self) -> None:
        from cpsdmp.facade.tap import SANDBOX_URL, Options, makeService

        card = shared_testcard()
        options = Options()
        options.parseOptions(
            [
                "--testcard",
                str(Path(card.ca_root).parent),
                "--structure-id",
                "12345678900011",
                "--structure-kind",
                "SIRET",
                "--software-name",
                "Logiciel",
                "--dmp-timeout",
                "7",
            ]
        )
        service = makeService(options)
        config = service.dmp.config
        self.assertEqual(config.dmp_url, SANDBOX_URL)
        self.assertEqual(config.structure.idnst, "312345678900011")
        self.assertEqual(config.software.name, "Logiciel")
        self.assertEqual(config.dmp_timeout, 7.0)
        self.assertEqual(config.defaults.ins_authority, INS_OID_TEST)
        self.assertEqual(list(config.roots), [card.ca_root_certificate()])
        self.assertEqual(service.listen_on, "tcp:10080:interface=127.0.0.1")


class _Output(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


class TwistTests(FacadeTestCase):
    @inlineCallbacks
    def test_twist_dmpfacade_https(self) -> Any:
        """
        C{twist dmpfacade} runs as a process serving HTTPS with its
        certificate chain, performs a TD0.2 through the agent and the
        sandbox, and logs the transaction without the token.
        """
        port = free_port()
        output = _Output()
        process = reactor.spawnProcess(  # type: ignore[attr-defined]
            output,
            sys.executable,
            [
                sys.executable,
                "-m",
                "twisted",
                "--log-format=text",
                "dmpfacade",
                "--testcard",
                self.card.directory,
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
                "--dmp-url",
                self.dmp_url(self.sandbox_port),
                "--tls-cert",
                self.card.sandbox_cert,
                "--tls-key",
                self.card.sandbox_key,
            ],
            env=dict(os.environ, PYTHONPATH=str(REPOSITORY)),
            path=str(REPOSITORY),
        )

        def stop() -> Deferred[None]:
            if not output.ended.called:
                process.signalProcess("TERM")
            return output.ended

        self.addCleanup(stop)
        root = ssl.Certificate.loadPEM(Path(self.card.ca_root).read_bytes())
        https = HTTPClient(
            Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=root))
        )
        facade = FacadeClient(f"https://127.0.0.1:{port}", http=https)
        health = None
        for _ in range(100):
            try:
                health = yield facade.health()
                break
            except Exception:
                if output.ended.called:
                    break
                yield deferLater(reactor, 0.2, lambda: None)
        self.assertIsNotNone(health, output.output.decode(errors="replace"))
        exists = yield facade.td02_exist(CDA_PATIENT, self.context)
        self.assertTrue(exists["exists"])
        yield stop()
        log = output.output.decode(errors="replace")
        self.assertIn("DMP TD0.2: OK", log)
        self.assertNotIn(self.context["token"], log)


class _Stalling(Protocol):
    """
    A facade that reads the request, then answers C{self.factory.answer}
    (nothing, headers without the whole body, or a dropped connection) and
    stalls.
    """

    def dataReceived(self, data: bytes) -> None:
        answer = self.factory.answer  # type: ignore[attr-defined]
        if answer == "drop":
            self.transport.abortConnection()  # type: ignore[union-attr]
        elif answer:
            self.transport.write(answer)  # type: ignore[union-attr]
            self.factory.answer = b""  # type: ignore[attr-defined]

    def connectionMade(self) -> None:
        self.factory.connections.append(self.transport)  # type: ignore[attr-defined]


class FacadeClientTests(TestCase):
    """
    The backend's client facing a facade that fails: each wait ends, and
    the error says what happened, as a L{FacadeError}.
    """

    timeout = 30

    def stalling(self, answer: bytes | str) -> FacadeClient:
        factory = Factory.forProtocol(_Stalling)
        factory.answer = answer  # type: ignore[attr-defined]
        factory.connections = []  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)

        def drop() -> None:
            for transport in factory.connections:  # type: ignore[attr-defined]
                transport.abortConnection()

        self.addCleanup(drop)
        client = FacadeClient(f"http://127.0.0.1:{port.getHost().port}", timeout=1.0)
        self.addCleanup(client.close)
        return client

    @inlineCallbacks
    def test_silent(self) -> Any:
        client = self.stalling(b"")
        error = yield self.assertFailure(client.health(), FacadeError)
        self.assertIn("did not answer within 1 s", str(error))

    @inlineCallbacks
    def test_body_stalls(self) -> Any:
        client = self.stalling(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        error = yield self.assertFailure(client.health(), FacadeError)
        self.assertIn("did not answer within 1 s", str(error))

    @inlineCallbacks
    def test_dropped(self) -> Any:
        client = self.stalling("drop")
        error = yield self.assertFailure(client.health(), FacadeError)
        self.assertIn("connection to the facade", str(error))

    @inlineCallbacks
    def test_problem_not_json(self) -> Any:
        client = self.stalling(
            b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: application/problem+json\r\n"
            b"Content-Length: 5\r\n\r\noops!"
        )
        error = yield self.assertFailure(client.health(), FacadeError)
        self.assertIn("HTTP 502", str(error))


def _bare_service(reactor_: Any = None) -> Any:
    """
    @return: a facade service whose DMP and agents are never reached.
    """
    from cpsdmp.facade.service import DmpService

    config = FacadeConfig(
        dmp_url="https://127.0.0.1:1/si-dmp-server/v2/services",
        roots=[],
        structure=STRUCTURE,
        software=SOFTWARE,
        defaults=DEFAULTS,
    )
    return DmpService(config, reactor_)


class SessionCacheTests(TestCase):
    """
    A session that could not be opened is never kept: the next request with
    the same context tries again and fails the same way.
    """

    timeout = 30

    def fail_twice(self, context: Any) -> Any:
        from cpsdmp.agent.client import AgentUnreachable

        service = _bare_service()
        for _ in range(2):
            d = service.session(context)
            yield self.assertFailure(d, AgentUnreachable)
            self.assertEqual(len(service._sessions), 0)

    @inlineCallbacks
    def test_failed_at_once_not_kept(self) -> Any:
        from cpsdmp.facade.service import AgentContext

        # Past AgentContext.from_json, which refuses such a host: the
        # agent client fails before anything is sent.
        context = AgentContext(
            "https://exa mple:10036", "A" * 43, "sha256:" + "ab" * 32
        )
        yield from self.fail_twice(context)

    @inlineCallbacks
    def test_failed_later_not_kept(self) -> Any:
        from cpsdmp.facade.service import AgentContext

        yield from self.fail_twice(AgentContext.from_json(ABSENT_AGENT))


class _Pending(Resource):
    """
    A resource whose answers never come, as a request waiting on a slow
    DMP.
    """

    isLeaf = True

    def render(self, request: Any) -> Any:
        return NOT_DONE_YET


class ConnectionLimitTests(SynchronousTestCase):
    """
    The facade's connections: one that stays silent is closed after
    L{IDLE_TIMEOUT}, whatever Twisted's default, but never one that sends a
    body slowly or waits for its answer.
    """

    def connect(self, site: Any) -> tuple[Any, StringTransport]:
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_early_answers_not_sniffed(self) -> None:
        """
        The 413 to a Content-Length over the limit and the 431 to a header
        line too long, sent before a request exists, carry the headers of
        every other answer: no-store and nosniff.
        """
        for data, status in [
            (
                b"POST /dmp/td02Exist HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: 99999999999999\r\n\r\n",
                b"413",
            ),
            (b"GET /" + b"a" * 17000 + b" HTTP/1.1\r\n", b"431"),
        ]:
            clock = Clock()
            site = make_site(_bare_service(clock), reactor=clock)
            protocol, transport = self.connect(site)
            protocol.dataReceived(data)
            head = transport.value().partition(b"\r\n\r\n")[0]
            self.assertTrue(head.startswith(b"HTTP/1.1 " + status), head)
            self.assertIn(b"Cache-Control: no-store", head)
            self.assertIn(b"X-Content-Type-Options: nosniff", head)

    def test_silent_connection_closed(self) -> None:
        clock = Clock()
        site = make_site(_bare_service(clock), reactor=clock)
        protocol, transport = self.connect(site)
        protocol.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        clock.advance(IDLE_TIMEOUT - 1)
        self.assertFalse(transport.disconnecting)
        clock.advance(2)
        self.assertTrue(transport.disconnecting)

    def test_kept_connection_closed_when_idle(self) -> None:
        clock = Clock()
        site = make_site(_bare_service(clock), reactor=clock)
        protocol, transport = self.connect(site)
        protocol.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"200 OK", transport.value())
        clock.advance(IDLE_TIMEOUT + 1)
        self.assertTrue(transport.disconnecting)

    def test_slow_upload_not_cut(self) -> None:
        """
        A body that keeps coming, however slowly in all, is not cut.
        """
        clock = Clock()
        site = make_site(_bare_service(clock), reactor=clock)
        protocol, transport = self.connect(site)
        protocol.dataReceived(
            b"POST /dmp/td02Exist HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 10\r\n\r\n"
        )
        for _ in range(9):
            clock.advance(IDLE_TIMEOUT - 1)
            protocol.dataReceived(b" ")
        self.assertFalse(transport.disconnecting)

    def test_slow_answer_not_cut(self) -> None:
        """
        A request whose answer takes long (the DMP is slow) keeps its
        connection.
        """
        clock = Clock()
        site = make_site(_bare_service(clock), reactor=clock)
        site.resource = _Pending()
        protocol, transport = self.connect(site)
        protocol.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        clock.advance(IDLE_TIMEOUT * 10)
        self.assertFalse(transport.disconnecting)


class HeaderLimitTests(TestCase):
    """
    A request line or header too long to read is answered 431 with a
    problem document, then the connection closes, as the agent does.
    """

    timeout = 30

    @inlineCallbacks
    def test_header_too_large(self) -> Any:
        site = make_site(_bare_service())
        port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)

        def exchange(request: bytes) -> bytes:
            with socket.create_connection(("127.0.0.1", port.getHost().port)) as s:
                s.settimeout(10)
                s.sendall(request)
                answer = b""
                while chunk := s.recv(65536):
                    answer += chunk
                return answer

        for request in [
            b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 17000 + b"\r\n\r\n",
            b"GET /" + b"a" * 17000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        ]:
            answer = yield deferToThread(exchange, request)
            head, _, body = answer.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 431 "), head)
            self.assertIn(b"Connection: close", head)
            document = json.loads(body)
            self.assertEqual(
                document["type"], "https://cpsdmp.invalid/problems/header-too-large"
            )
            self.assertIn("16384 bytes", document["detail"])
            conforms(document, _pointer("components", "schemas", "Problem"))
        for path, operations in openapi()["paths"].items():
            for method, operation in operations.items():
                self.assertIn("431", operation["responses"], f"{method} {path}")


#: A well-formed agent context of an agent that is not there: a request the
#: facade sent on would fail as agent-unreachable (502), not as malformed.
ABSENT_AGENT = {
    "url": "https://127.0.0.1:1",
    "token": "A" * 43,
    "tlsFingerprint": "sha256:" + "ab" * 32,
}


def _object_text(*members: tuple[str, str]) -> str:
    """
    @return: the text of a JSON object of C{(name, JSON text)} members, in
        order, the same name possibly twice.
    """
    return "{" + ", ".join(f"{json.dumps(n)}: {v}" for n, v in members) + "}"


class RequestCheckTests(TestCase):
    """
    What the facade refuses in a request before it sends anything anywhere,
    against a facade whose agent and DMP are not there: a request that got
    past the checks would fail as unreachable instead.
    """

    timeout = 30

    def setUp(self) -> None:
        self.answers: list[SentAnswer] = []
        self.addCleanup(lambda: check_answers(self.answers, openapi()))
        site = make_site(_bare_service())
        site.requestFactory = recording(site.requestFactory, self.answers)
        self.site = site
        port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        self.url = f"http://127.0.0.1:{port.getHost().port}"

    @inlineCallbacks
    def post(
        self, path: str, body: bytes | dict[str, Any], content_type: str = JSON
    ) -> Any:
        """
        @return: a Deferred that fires with the status and the JSON answer.
        """
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        response, document = yield post_raw(self.url + path, body, content_type)
        return response.code, document

    @inlineCallbacks
    def refused(
        self,
        path: str,
        body: bytes | dict[str, Any],
        status: int = 400,
        content_type: str = JSON,
    ) -> Any:
        """
        @return: a Deferred that fires with the detail of the problem,
            checked to have C{status}.
        """
        code, document = yield self.post(path, body, content_type)
        self.assertEqual(code, status, document)
        return document["detail"]

    @inlineCallbacks
    def test_wrong_content_type_quoted_as_given(self) -> Any:
        """
        A Content-Type a route does not take is quoted in the refusal as the
        request gave it: a boundary keeps its case.
        """
        given = "multipart/form-data; boundary=AbC-XyZ"
        detail = yield self.refused("/dmp/td02Exist", b"{}", content_type=given)
        self.assertIn(f"not {given!r}", detail)

    @inlineCallbacks
    def test_member_twice(self) -> Any:
        """
        A member given twice in one object is refused, wherever it is: the
        facade would otherwise act on the last one unseen.
        """
        context = json.dumps(ABSENT_AGENT)
        patient = json.dumps({"ins": "279035121518989"})
        other = json.dumps({"ins": "185127505612306"})
        for body in [
            _object_text(
                ("agentContext", context), ("patient", other), ("patient", patient)
            ),
            _object_text(
                ("agentContext", context),
                (
                    "patient",
                    _object_text(
                        ("ins", '"185127505612306"'), ("ins", '"279035121518989"')
                    ),
                ),
            ),
            _object_text(
                (
                    "agentContext",
                    _object_text(
                        ("url", '"https://127.0.0.1:1"'),
                        ("token", json.dumps("A" * 43)),
                        ("token", json.dumps("B" * 43)),
                        ("tlsFingerprint", json.dumps("sha256:" + "ab" * 32)),
                    ),
                ),
                ("patient", patient),
            ),
        ]:
            detail = yield self.refused("/dmp/td02Exist", body.encode())
            self.assertIn("twice in one object", detail)
        boundary = "b0undary"
        document = ('name="doc"; filename="a.xml"', "text/xml", b"<x/>")
        for twice, value in [("agentContext", context), ("overrides", "[{}]")]:
            given = [(f'name="{twice}"', JSON, value.encode())] * 2
            if twice != "agentContext":
                given.append(('name="agentContext"', JSON, context.encode()))
            detail = yield self.refused(
                "/dmp/td21SubmitDocuments",
                multipart(boundary, [*given, document]),
                content_type=f"multipart/form-data; boundary={boundary}",
            )
            self.assertIn(f"two parts '{twice}'", detail)

    @inlineCallbacks
    def test_huge_number_said_in_words(self) -> Any:
        body = (
            b'{"agentContext": %s, "patient": {"ins": "279035121518989"}, "x": 1%s}'
            % (json.dumps(ABSENT_AGENT).encode(), b"0" * 5000)
        )
        detail = yield self.refused("/dmp/td02Exist", body)
        self.assertEqual(
            detail, "the body has a number of 5001 digits (at most 64 are taken)"
        )
        for constant in [b"NaN", b"Infinity", b"-Infinity"]:
            detail = yield self.refused("/dmp/td02Exist", b'{"x": %s}' % constant)
            self.assertIn("which is not JSON", detail)

    @inlineCallbacks
    def test_unknown_members(self) -> Any:
        """
        A member a route does not know is refused by name, at any depth: a
        typo is not a filter silently left out.
        """
        patient = {"ins": "279035121518989"}
        base = {"agentContext": ABSENT_AGENT, "patient": patient}
        content = base64.b64encode(b"<x/>").decode()
        for path, body, where in [
            ("/dmp/td31Find", {**base, "clasCodes": [SYNTHESE]}, "the body"),
            ("/dmp/td02Exist", {**base, "patients": patient}, "the body"),
            (
                "/dmp/td02Exist",
                {**base, "patient": {**patient, "authorty": "1.2.3"}},
                "patient",
            ),
            (
                "/dmp/td02Exist",
                {**base, "agentContext": {**ABSENT_AGENT, "tls": "x"}},
                "agentContext",
            ),
            (
                "/dmp/td31Find",
                {**base, "classCodes": [{**SYNTHESE, "system": "x"}]},
                "classCodes[0]",
            ),
            (
                "/dmp/td21SubmitDocuments",
                {"agentContext": ABSENT_AGENT, "documents": [{"contents": content}]},
                "documents[0]",
            ),
            (
                "/dmp/td21SubmitDocuments",
                {
                    "agentContext": ABSENT_AGENT,
                    "documents": [{"content": content}],
                    "patient": patient,
                },
                "the body",
            ),
            ("/dmp/td32Retrieve", {**base, "uniqueId": "1.2.3", "x": 1}, "the body"),
            (
                "/dmp/td33UpdateStatus",
                {**base, "uniqueId": "1.2.3", "action": "mask", "force": True},
                "the body",
            ),
        ]:
            detail = yield self.refused(path, body)
            self.assertTrue(detail.startswith(f"{where} has no member "), detail)
            # The description refuses it too.
            request = _pointer(
                "paths", path, "post", "requestBody", "content", JSON, "schema"
            )
            self.assertRaises(AssertionError, conforms, body, request)
        detail = yield self.refused("/dmp/td31Find", {**base, "clasCodes": [SYNTHESE]})
        self.assertIn("'clasCodes'", detail)
        self.assertIn("classCodes", detail)
        boundary = "b0undary"
        detail = yield self.refused(
            "/dmp/td21SubmitDocuments",
            multipart(
                boundary,
                [
                    ('name="agentContext"', JSON, json.dumps(ABSENT_AGENT).encode()),
                    ('name="overides"', JSON, b"[{}]"),
                    ('name="doc"; filename="a.xml"', "text/xml", b"<x/>"),
                ],
            ),
            content_type=f"multipart/form-data; boundary={boundary}",
        )
        self.assertIn("'overides'", detail)

    @inlineCallbacks
    def test_search_members_with_identifiers(self) -> Any:
        """
        statuses, creation times and codes filter a search (FindDocuments):
        documents asked for by identifier (GetDocuments) come whatever their
        status, so these are refused with uniqueIds or entryUUIDs rather
        than ignored.
        """
        base = {"agentContext": ABSENT_AGENT, "patient": {"ins": "279035121518989"}}
        for given in [
            {"uniqueIds": ["1.2.3"], "statuses": ["deleted"]},
            {"entryUUIDs": [str(uuid.uuid4().urn)], "classCodes": [SYNTHESE]},
            {"uniqueIds": ["1.2.3"], "creationFrom": "2024"},
        ]:
            detail = yield self.refused("/dmp/td31Find", {**base, **given})
            self.assertIn("filter", detail)
            self.assertIn("leave", detail)

    @inlineCallbacks
    def test_entry_uuids_checked(self) -> Any:
        base = {"agentContext": ABSENT_AGENT, "patient": {"ins": "279035121518989"}}
        good = uuid.uuid4().urn
        for value in [
            "abc",
            good[len("urn:uuid:") :],
            good + "0",
            "urn:uuid:" + "g" * 36,
        ]:
            detail = yield self.refused(
                "/dmp/td31Find", {**base, "entryUUIDs": [good, value]}
            )
            self.assertIn("entryUUIDs[1]", detail)
            self.assertIn("not an entryUUID", detail)

    def exchange_raw(self, request: bytes, then: bytes = b"") -> Deferred[bytes]:
        """
        Send C{request} on a plain socket, then, once the first answer bytes
        come, C{then}.

        @return: a Deferred that fires with all the facade sent until it
            closed the connection, or until 10 seconds of silence.
        """
        host, port = self.url.removeprefix("http://").split(":")

        def run() -> bytes:
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(request)
                received = b""
                try:
                    while chunk := sock.recv(65536):
                        if not received and then:
                            sock.sendall(then)
                        received += chunk
                except (TimeoutError, ConnectionResetError):
                    pass
                return received

        return deferToThread(run)

    @inlineCallbacks
    def test_huge_content_length_refused_at_once(self) -> Any:
        """
        A Content-Length over the facade's body limit is answered 413 as
        soon as the headers are read, without the 100 Continue its Expect
        asks for, and the connection closes: nothing of the body is sent or
        waited for.
        """
        head = (
            b"POST /dmp/td21SubmitDocuments HTTP/1.1\r\n"
            b"Host: facade\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: 10000000000\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        started = time.monotonic()
        received = yield self.exchange_raw(head)
        self.assertLess(time.monotonic() - started, 5)
        self.assertNotIn(b"100 Continue", received)
        status, _, rest = received.partition(b"\r\n")
        self.assertTrue(status.startswith(b"HTTP/1.1 413 "), status)
        headers, _, payload = rest.partition(b"\r\n\r\n")
        self.assertIn(b"Connection: close", headers)
        problem = json.loads(payload)
        self.assertEqual(problem["status"], 413)
        self.assertIn(f"over {64 * 1024 * 1024} bytes", problem["detail"])

    @inlineCallbacks
    def test_refused_body_sent_anyway(self) -> Any:
        """
        A client that sends a refused body without waiting for the answer
        reads the 413 once, and the request is never processed.
        """
        self.site.requestFactory.max_body = 1000
        body = json.dumps({"agentContext": ABSENT_AGENT, "x": "y" * 5000}).encode()
        received = yield self.exchange_raw(
            b"POST /dmp/td02Exist HTTP/1.1\r\nHost: facade\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        self.assertTrue(received.startswith(b"HTTP/1.1 413 "), received)
        self.assertEqual(received.count(b"HTTP/1.1"), 1, received)

    @inlineCallbacks
    def test_agent_url_host_checked(self) -> Any:
        """
        An agent URL whose host is not a host name or an IPv4 address is
        refused with 400 naming agentContext.url, each time it is given: the
        first refusal leaves nothing behind that the next request trips on.
        """

        def exist(url: str) -> Any:
            body = {
                "patient": {"ins": "279035121518989"},
                "agentContext": {**ABSENT_AGENT, "url": url},
            }
            return self.post("/dmp/td02Exist", json.dumps(body).encode("ascii"))

        for url in [
            "https://exa mple:10036",
            "https://exa mple:10036",
            "https://a_b:10036",
            "https://-agent:10036",
            "https://agent..local:10036",
            "https://poste\u00e9.local:10036",
            "https://" + "a" * 64 + ".local:10036",
            # Shorthand forms an address resolver reads, and numbers that
            # are not an address: neither an IPv4 address nor a name.
            "https://2130706433:10035",
            "https://0x7f.1:10035",
            "https://127.1:10035",
            "https://999.1.1.1:10035",
            "https://127.0.0.01:10035",
        ]:
            code, document = yield exist(url)
            self.assertEqual(code, 400, (url, document))
            self.assertTrue(
                document["detail"].startswith("agentContext.url "), document["detail"]
            )
            self.assertIn("host", document["detail"])
        for url in [
            "https://agent-1.local:10036",
            "https://127.0.0.1:1",
            "https://localhost.:1",
            "https://LOCALHOST:1/",
            "https://127.0.0.1.:1",
        ]:
            code, document = yield exist(url)
            # Past the checks: the agent is not there.
            self.assertEqual(code, 502, (url, document))
            self.assertNotIn("..", document["detail"])

    @inlineCallbacks
    def test_agent_url_port_and_path_checked(self) -> Any:
        """
        An agent URL whose port is not plain digits from 1 to 65535, or that
        has a path, credentials, a query or a fragment, is refused with 400
        naming agentContext.url.
        """
        base = {"patient": {"ins": "279035121518989"}}
        for url, said in [
            ("https://127.0.0.1:010035", "port"),
            ("https://127.0.0.1:0", "port"),
            ("https://127.0.0.1:65536", "port"),
            ("https://127.0.0.1:", "port"),
            ("https://127.0.0.1:+1", "port"),
            ("https://127.0.0.1:10035/cps/../x", "path"),
            ("https://127.0.0.1:10035/cps", "path"),
            ("https://user@127.0.0.1:10035", "credentials"),
            ("https://127.0.0.1:10035/?a=1", "query"),
            ("https://127.0.0.1:10035#x", "fragment"),
        ]:
            body = {**base, "agentContext": {**ABSENT_AGENT, "url": url}}
            code, document = yield self.post(
                "/dmp/td02Exist", json.dumps(body).encode("ascii")
            )
            self.assertEqual(code, 400, (url, document))
            self.assertTrue(
                document["detail"].startswith("agentContext.url "), document["detail"]
            )
            self.assertIn(said, document["detail"])

    @inlineCallbacks
    def test_unique_ids_checked(self) -> Any:
        """
        A uniqueId that is not an OID or OID^extension, such as one with a
        control character or a lone surrogate XML cannot carry, is refused
        with 400 naming the member, in each route that takes one.
        """
        base = {"agentContext": ABSENT_AGENT, "patient": {"ins": "279035121518989"}}
        for value in [
            "1.2.3\x01",
            "1.2.3^AB\x00",
            "1.2.3^\ud800",
            "1.2.3\ud800",
            "\x0b",
            "1.2.3^",
            "1.2.3^a b",
            "urn:oid:1.2.3",
        ]:
            for path, body, member in [
                ("/dmp/td32Retrieve", {**base, "uniqueId": value}, "uniqueId"),
                (
                    "/dmp/td33UpdateStatus",
                    {**base, "uniqueId": value, "action": "mask"},
                    "uniqueId",
                ),
                (
                    "/dmp/td31Find",
                    {**base, "uniqueIds": ["1.2.3^A1", value]},
                    "uniqueIds[1]",
                ),
            ]:
                code, document = yield self.post(path, json.dumps(body).encode("ascii"))
                self.assertEqual(code, 400, (path, value, document))
                self.assertEqual(
                    document["type"].rsplit("/", 1)[-1], "malformed-request"
                )
                self.assertTrue(
                    document["detail"].startswith(f"{member} "), document["detail"]
                )
                self.assertIn("is not a uniqueId", document["detail"])

    @inlineCallbacks
    def test_texts_xml_cannot_carry(self) -> Any:
        """
        Other texts of a request that go into the DMP's messages are refused
        with 400 when XML cannot carry one of their characters, before
        anything is sent.
        """
        base = {"agentContext": ABSENT_AGENT, "patient": {"ins": "279035121518989"}}
        for body, said in [
            (
                {**base, "patient": {"ins": "279035121518989", "authority": "1.2\x01"}},
                "is not an INS authority",
            ),
            (
                {**base, "patient": {"ins": "279035121518989", "authority": "\ud800"}},
                "is not an INS authority",
            ),
            ({**base, "statuses": ["urn:x\x02"]}, "status"),
            ({**base, "statuses": ["urn:\udc00"]}, "status"),
            (
                {**base, "classCodes": [{"code": "11", "codingScheme": "1.2\x03"}]},
                "classCodes[0] codingScheme",
            ),
            (
                {
                    **base,
                    "typeCodes": [
                        {"code": "1", "codingScheme": "1.2", "display": "\ud800"}
                    ],
                },
                "typeCodes[0] display",
            ),
        ]:
            code, document = yield self.post(
                "/dmp/td31Find", json.dumps(body).encode("ascii")
            )
            self.assertEqual(code, 400, (body, document))
            self.assertIn(said, document["detail"])
        content = base64.b64encode(cda("BIO")).decode()
        for overrides, said in [
            ({"title": "a\x07b"}, "title has a character XML cannot carry (U+0007)"),
            ({"comments": "\ud83d"}, "comments has a character XML cannot carry"),
        ]:
            body = {
                "agentContext": ABSENT_AGENT,
                "documents": [{"content": content, "overrides": overrides}],
            }
            code, document = yield self.post(
                "/dmp/td21SubmitDocuments", json.dumps(body).encode("ascii")
            )
            self.assertEqual(code, 422, document)
            self.assertIn(said, document["detail"])

    @inlineCallbacks
    def test_described_as_refused(self) -> Any:
        """
        What the description's patterns refuse, the facade refuses with 400
        (the patient's authority, a uniqueId, base64 content, the agent
        context's expires); what they take, it takes past its checks.
        """
        patient = {"ins": "279035121518989"}
        base = {"agentContext": ABSENT_AGENT, "patient": patient}
        content = base64.b64encode(b"<x/>").decode()

        def submit(content: str) -> dict[str, Any]:
            return {"agentContext": ABSENT_AGENT, "documents": [{"content": content}]}

        def find(**members: Any) -> dict[str, Any]:
            return {**base, **members}

        refused = [
            ("/dmp/td02Exist", {**base, "patient": {**patient, "authority": "1.2.3"}}),
            (
                "/dmp/td02Exist",
                {**base, "agentContext": {**ABSENT_AGENT, "expires": 1700000000}},
            ),
            (
                "/dmp/td02Exist",
                {**base, "agentContext": {**ABSENT_AGENT, "expires": None}},
            ),
            ("/dmp/td32Retrieve", find(uniqueId="")),
            ("/dmp/td32Retrieve", find(uniqueId="1.2.3^")),
            ("/dmp/td32Retrieve", find(uniqueId="1.2.3^A\x01")),
            ("/dmp/td32Retrieve", find(uniqueId="1.2.3 ")),
            ("/dmp/td32Retrieve", find(uniqueId="ABC")),
            ("/dmp/td33UpdateStatus", find(uniqueId="", action="mask")),
            ("/dmp/td31Find", find(uniqueIds=[""])),
            ("/dmp/td31Find", find(uniqueIds=["1.2.3", "1.2..3"])),
            ("/dmp/td21SubmitDocuments", submit(content[:4] + "\n" + content[4:])),
            ("/dmp/td21SubmitDocuments", submit(content.rstrip("="))),
            ("/dmp/td21SubmitDocuments", submit(content + "==")),
            ("/dmp/td21SubmitDocuments", submit("AB=C")),
        ]
        taken = [
            (
                "/dmp/td02Exist",
                {**base, "patient": {**patient, "authority": INS_OID_TEST}},
            ),
            (
                "/dmp/td02Exist",
                {
                    **base,
                    "agentContext": {**ABSENT_AGENT, "expires": "2030-01-01T00:00:00Z"},
                },
            ),
            ("/dmp/td32Retrieve", find(uniqueId="1.2.250.1.213.1.1.9^AB-12_x")),
            ("/dmp/td33UpdateStatus", find(uniqueId="1.2.3", action="mask")),
            ("/dmp/td31Find", find(uniqueIds=["1.2.3^Été"])),
            ("/dmp/td21SubmitDocuments", submit(content)),
        ]
        for path, body in refused + taken:
            code, document = yield self.post(path, body)
            request = _pointer(
                "paths", path, "post", "requestBody", "content", JSON, "schema"
            )
            if (path, body) in refused:
                self.assertEqual(code, 400, (path, body, document))
                self.assertRaises(AssertionError, conforms, body, request)
            else:
                # Past the checks: the agent is not there, or the CDA is no CDA.
                self.assertIn(code, (422, 502), (path, body, document))
                conforms(body, request)

    @inlineCallbacks
    def test_internal_error_described(self) -> Any:
        """
        A failure of the facade's own is 500 with a problem document, as the
        description says every operation may answer (the answers are
        checked against it when the test ends).
        """

        async def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("a bug")

        self.site.resource.service.td02 = broken
        code, document = yield self.post(
            "/dmp/td02Exist",
            {"agentContext": ABSENT_AGENT, "patient": {"ins": "279035121518989"}},
        )
        self.assertEqual(code, 500)
        self.assertEqual(document["type"].rsplit("/", 1)[-1], "internal-error")
        self.assertNotIn("a bug", document["detail"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(
            openapi()["paths"]["/dmp/td02Exist"]["post"]["responses"]["500"],
            {"$ref": "#/components/responses/InternalError"},
        )

    @inlineCallbacks
    def test_cda_past_parser_limits(self) -> Any:
        """
        A CDA past the XML parser's limits is 422 saying so in the facade's
        words, not with libxml2's advice to switch its huge-tree option on.
        """
        deep = b"<ClinicalDocument>" + b"<x>" * 300 + b"</x>" * 300
        deep += b"</ClinicalDocument>"
        body = {
            "agentContext": ABSENT_AGENT,
            "documents": [{"content": base64.b64encode(deep).decode()}],
        }
        code, document = yield self.post("/dmp/td21SubmitDocuments", body)
        self.assertEqual(code, 422, document)
        detail = document["detail"]
        self.assertIn("exceeds the XML parser's limits", detail)
        self.assertIn("elements nested more than 256 deep", detail)
        self.assertNotIn("XML_PARSE_HUGE", detail)

    @inlineCallbacks
    def test_patient_ins(self) -> Any:
        """
        An INS that is not a string is said to be one, not the patient; one
        of the wrong shape or with the wrong key is refused before anything
        is sent.
        """
        for ins, said in [
            (279035121518989, "'patient.ins' must be a string"),
            (None, "'patient.ins' must be a string"),
            ("27903512151898X", "is not an INS: 15 characters"),
            ("279035121518988", "does not match its first 13 characters"),
        ]:
            body = {"agentContext": ABSENT_AGENT, "patient": {"ins": ins}}
            detail = yield self.refused("/dmp/td02Exist", body)
            self.assertIn(said, detail)
            request = _pointer(
                "paths",
                "/dmp/td02Exist",
                "post",
                "requestBody",
                "content",
                JSON,
                "schema",
            )
            if said.startswith("is not"):
                self.assertRaises(AssertionError, conforms, body, request)
        detail = yield self.refused(
            "/dmp/td02Exist", {"agentContext": ABSENT_AGENT, "patient": {}}
        )
        self.assertIn("lacks its 'ins'", detail)

    @inlineCallbacks
    def test_override_values(self) -> Any:
        """
        Override values the DMP would refuse are 422 naming the document and
        the attribute, before the card or the DMP is asked anything.
        """
        content = base64.b64encode(cda("BIO")).decode()
        # The description refuses the shapes; a real date and the order of
        # two times are beyond what a JSON schema says.
        for overrides, said, described in [
            (
                {"creationTime": "yesterday"},
                "creationTime 'yesterday' is not an XDS time",
                True,
            ),
            (
                {"serviceStartTime": "20301301", "serviceStopTime": "20200101"},
                "serviceStartTime '20301301' is not a real date and time",
                False,
            ),
            (
                {"serviceStartTime": "20300101", "serviceStopTime": "20200101"},
                "serviceStartTime 20300101 is after serviceStopTime 20200101",
                False,
            ),
            ({"title": "x" * 100_000}, "title is 100000 characters long", True),
            (
                {"classCode": {"code": "ZZZ", "codingScheme": CLASS_SYSTEM}},
                "classCode 'ZZZ' is not a class of TRE_A03",
                True,
            ),
        ]:
            body = {
                "agentContext": ABSENT_AGENT,
                "documents": [
                    {"content": content},
                    {"content": content, "overrides": overrides},
                ],
            }
            code, document = yield self.post("/dmp/td21SubmitDocuments", body)
            self.assertEqual(code, 422, document)
            self.assertEqual(document["documentIndex"], 1)
            self.assertTrue(
                document["detail"].startswith(f"documents[1].overrides: {said}"),
                document["detail"],
            )
            request = _pointer(
                "paths",
                "/dmp/td21SubmitDocuments",
                "post",
                "requestBody",
                "content",
                JSON,
                "schema",
            )
            if described:
                self.assertRaises(AssertionError, conforms, body, request)
            else:
                conforms(body, request)

    @inlineCallbacks
    def test_coding_schemes_are_oids(self) -> Any:
        """
        A code a request gives has an OID for codingScheme, as the CLI
        requires: anything else is 400 naming the member, and the
        description refuses it too.
        """
        content = base64.b64encode(cda("BIO")).decode()
        search = {"agentContext": ABSENT_AGENT, "patient": {"ins": "279035121518989"}}
        for path, body, said in [
            (
                "/dmp/td21SubmitDocuments",
                {
                    "agentContext": ABSENT_AGENT,
                    "documents": [
                        {
                            "content": content,
                            "overrides": {
                                "classCode": {
                                    "code": "ZZZ",
                                    "codingScheme": "x",
                                    "display": "y",
                                }
                            },
                        }
                    ],
                },
                "documents[0].overrides: classCode.codingScheme 'x' is not an OID",
            ),
            (
                "/dmp/td21SubmitDocuments",
                {
                    "agentContext": ABSENT_AGENT,
                    "documents": [
                        {
                            "content": content,
                            "overrides": {
                                "eventCodeList": [{"code": "1", "codingScheme": "1.x"}]
                            },
                        }
                    ],
                },
                "eventCodeList[0].codingScheme '1.x' is not an OID",
            ),
            (
                "/dmp/td31Find",
                {**search, "classCodes": [{"code": "11", "codingScheme": "TRE_A03"}]},
                "classCodes[0].codingScheme 'TRE_A03' is not an OID",
            ),
        ]:
            code, document = yield self.post(path, body)
            self.assertEqual(code, 400, document)
            self.assertIn(said, document["detail"])
            request = _pointer(
                "paths", path, "post", "requestBody", "content", JSON, "schema"
            )
            self.assertRaises(AssertionError, conforms, body, request)

    @inlineCallbacks
    def test_search_times(self) -> Any:
        base = {"agentContext": ABSENT_AGENT, "patient": {"ins": "279035121518989"}}
        for given, said in [
            (
                {"creationFrom": "20201301"},
                "creationFrom '20201301' is not a real date",
            ),
            (
                {"creationTo": "2020-01-01"},
                "creationTo '2020-01-01' is not an XDS time",
            ),
            (
                {"creationFrom": "2021", "creationTo": "20200101"},
                "creationFrom 2021 is after creationTo 20200101",
            ),
        ]:
            detail = yield self.refused("/dmp/td31Find", {**base, **given})
            self.assertIn(said, detail)

    @inlineCallbacks
    def test_given_is_not_absent(self) -> Any:
        """
        A member given as null, false, 0, an empty string, list or object is
        not taken for an absent one (whose default would apply): it is
        refused with 400 naming it.
        """
        ins = "279035121518989"
        base = {"agentContext": ABSENT_AGENT, "patient": {"ins": ins}}
        content = base64.b64encode(cda("BIO")).decode()
        calls: list[tuple[str, dict[str, Any], str]] = [
            (
                "/dmp/td02Exist",
                {**base, "patient": {"ins": ins, "authority": authority}},
                "authority",
            )
            for authority in [0, False, "", [], {}, None]
        ]
        calls += [
            ("/dmp/td31Find", {**base, "creationFrom": None}, "creationFrom"),
            ("/dmp/td31Find", {**base, "creationTo": None}, "creationTo"),
            ("/dmp/td31Find", {**base, "statuses": []}, "statuses"),
            (
                "/dmp/td21SubmitDocuments",
                {
                    "agentContext": ABSENT_AGENT,
                    "documents": [{"content": content, "overrides": None}],
                },
                "documents[0].overrides",
            ),
        ]
        for path, body, named in calls:
            detail = yield self.refused(path, body)
            self.assertIn(named, detail)
            request = _pointer(
                "paths", path, "post", "requestBody", "content", JSON, "schema"
            )
            self.assertRaises(AssertionError, conforms, body, request)

    @inlineCallbacks
    def test_submission_as_a_whole(self) -> Any:
        """
        What the DMP, or the agent, would refuse of a submission as a whole
        is 422 naming the documents, before anything is asked of the card:
        the same document twice (the agent refused the signature as a
        security event), documents of two patients (said with a Python set).
        """
        data = cda("BIO")
        other = data.replace(b"279035121518989", b"185127505612306").replace(
            b"2024.9.1", b"2024.9.2"
        )
        for documents, said in [
            (
                [data, cda("VAC-NOTE"), data],
                "documents[2]: the same document as documents[0] (uniqueId "
                + unique_id(data),
            ),
            (
                [data, other],
                "documents[1]: its patient is 185127505612306 (authority "
                f"{INS_OID_TEST}), that of documents[0] 279035121518989",
            ),
        ]:
            body = {
                "agentContext": ABSENT_AGENT,
                "documents": [
                    {
                        "content": base64.b64encode(d).decode(),
                        "overrides": overrides_for(d) or {},
                    }
                    for d in documents
                ],
            }
            code, document = yield self.post("/dmp/td21SubmitDocuments", body)
            self.assertEqual(code, 422, document)
            self.assertEqual(document["documentIndex"], len(documents) - 1)
            self.assertTrue(document["detail"].startswith(said), document["detail"])
            self.assertNotIn("{", document["detail"])

    @inlineCallbacks
    def test_too_many_documents(self) -> Any:
        """
        More documents than a submission may carry are refused with 413
        saying the maximum, as JSON or as a form, before any is read.
        """
        content = base64.b64encode(b"<not-read/>").decode()
        body = {
            "agentContext": ABSENT_AGENT,
            "documents": [{"content": content}] * (MAX_DOCUMENTS + 1),
        }
        detail = yield self.refused("/dmp/td21SubmitDocuments", body, 413)
        self.assertIn(
            f"at most {MAX_DOCUMENTS} documents, not {MAX_DOCUMENTS + 1}", detail
        )
        boundary = "b0undary"
        form = [('name="agentContext"', JSON, json.dumps(ABSENT_AGENT).encode())] + [
            (f'name="d{i}"; filename="d{i}.xml"', "text/xml", b"<not-read/>")
            for i in range(MAX_DOCUMENTS + 1)
        ]
        detail = yield self.refused(
            "/dmp/td21SubmitDocuments",
            multipart(boundary, form),
            413,
            content_type=f"multipart/form-data; boundary={boundary}",
        )
        self.assertIn(f"at most {MAX_DOCUMENTS} documents", detail)
        # A form of more parts than a submission has is refused when one too
        # many begins, without reading on (this one is not even ended).
        form += [('name="d"; filename="d.xml"', "text/xml", b"<not-read/>")] * 300
        detail = yield self.refused(
            "/dmp/td21SubmitDocuments",
            multipart(boundary, form).removesuffix(f"--{boundary}--\r\n".encode()),
            413,
            content_type=f"multipart/form-data; boundary={boundary}",
        )
        self.assertIn(f"more than {MAX_DOCUMENTS + 2} parts", detail)
        request = _pointer(
            "paths",
            "/dmp/td21SubmitDocuments",
            "post",
            "requestBody",
            "content",
            JSON,
            "schema",
        )
        self.assertRaises(AssertionError, conforms, body, request)


class SubmissionSizeTests(SynchronousTestCase):
    def test_largest_submission_signable(self) -> None:
        """
        The card's signature request for the largest submission the facade
        takes, each document's uniqueId as long as XDS takes it (an OID of
        64 characters and an extension of 16), fits the agent's request
        body with room to spare.
        """
        from cryptography.hazmat.primitives.serialization import pkcs12

        from cpsdmp.agent.resource import MAX_BODY
        from cpsdmp.xds.signature import local_signer
        from cpsdmp.xds.submit import SigningIdentity, prepare_td21
        from cpsdmp.xds.transactions import DmpEndpoints
        from cpsdmp.xds.values import MAX_EXTENSION, MAX_OID
        from tests.xdsvalues import PROFESSIONAL

        card = shared_testcard()
        signature = pkcs12.load_pkcs12(
            Path(card.soft_card_signature).read_bytes(), card.pin.encode()
        )
        assert signature.key is not None and signature.cert is not None
        sizes = []
        signer = local_signer(signature.key)

        def measuring(request: bytes, algorithm: str) -> Any:
            sizes.append(len(request))
            return signer(request, algorithm)

        data = cda("BIO")
        root = b'<id root="1.2.250.1.213.1.1.1.55.2024.9.1"/>'
        self.assertIn(root, data)
        longest_oid = "1.2.250." + "1" * (MAX_OID - len("1.2.250."))
        documents = []
        for index in range(MAX_DOCUMENTS):
            extension = str(index).rjust(MAX_EXTENSION, "0")
            documents.append(
                data.replace(
                    root,
                    b'<id root="%s" extension="%s"/>'
                    % (longest_oid.encode(), extension.encode()),
                )
            )
        prepared = self.successResultOf(
            prepare_td21(
                documents,
                professional=PROFESSIONAL,
                structure=STRUCTURE,
                software=SOFTWARE,
                defaults=DEFAULTS,
                endpoints=DmpEndpoints("https://127.0.0.1:1/si-dmp-server/v2/services"),
                issuer="CN=test",
                signing=SigningIdentity(measuring, signature.cert.certificate),
            )
        )
        self.assertEqual(len(prepared.submission.documents), MAX_DOCUMENTS + 1)
        self.assertEqual(
            len(prepared.submission.documents[0].entry.uniqueId),
            MAX_OID + 1 + MAX_EXTENSION,
        )
        self.assertEqual(len(sizes), 1)
        self.assertLess(sizes[0], MAX_BODY * 0.85, sizes[0])


class StopTests(TestCase):
    """
    The facade stopping while a request waits on an agent that hangs: the
    request is answered at once, and the stop does not wait for the
    agent's timeout.
    """

    timeout = 60

    @inlineCallbacks
    def test_stop_answers_requests_under_way(self) -> Any:
        hung = reactor.listenTCP(
            0, Factory.forProtocol(Protocol), interface="127.0.0.1"
        )  # type: ignore[attr-defined]
        self.addCleanup(hung.stopListening)
        config = FacadeConfig(
            dmp_url="https://127.0.0.1:1/si-dmp-server/v2/services",
            roots=[],
            structure=STRUCTURE,
            software=SOFTWARE,
            defaults=DEFAULTS,
            agent_timeout=30.0,
        )
        service = FacadeService("tcp:0:interface=127.0.0.1", config)
        answers: list[SentAnswer] = []
        service.site.requestFactory = recording(service.site.requestFactory, answers)
        port = yield service.start()
        self.addCleanup(service.stopService)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        context = dict(ABSENT_AGENT, url=f"https://127.0.0.1:{hung.getHost().port}")
        answering = post_json(
            f"http://127.0.0.1:{port.getHost().port}/dmp/td02Exist",
            {"agentContext": context, "patient": {"ins": "279035121518989"}},
        )
        yield deferLater(reactor, 0.5, lambda: None)
        self.assertFalse(answering.called)

        started = time.monotonic()
        yield service.stopService()
        self.assertLess(time.monotonic() - started, 5)
        response, problem = yield answering
        self.assertEqual(response.code, 503, problem)
        self.assertEqual(problem["type"], "https://cpsdmp.invalid/problems/stopping")
        self.assertIn("send it again once the facade is back", problem["detail"])
        check_answers(answers, openapi())
        said = [formatEvent(e) or "" for e in events]
        self.assertTrue(any("1 requests under way" in line for line in said), said)
