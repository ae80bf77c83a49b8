# twisted.python.failure and twisted.web.client are not annotated.
# mypy: disable-error-code="no-untyped-call"
"""
C{cpsdmp submit CDA.xml... --facade URL --agent-context FILE}: a submission
through a running facade, as a backend would make it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.iweb import IAgent
from zope.interface import implementer

from cpsdmp.cli import (
    BadInput,
    http_url,
    pem_certificates,
    positive_seconds,
    read_agent_context,
    usage_error,
)
from cpsdmp.protocols.safexml import XmlRefused
from cpsdmp.xds.cda import (
    CLASS_CODE_SYSTEM,
    CdaError,
    UnknownClassCode,
    document_entry,
    read_header,
)
from cpsdmp.xds.cli import coded, read_cda
from cpsdmp.xds.ebrim import CodedValue, MetadataError

DEFAULT_FACADE = "http://127.0.0.1:10080"


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "submit",
        help="submit CDA documents through a running facade (TD2.1)",
        description="Submit CDA documents of one patient to the DMP through "
        "a running facade, with the professional's agent context.",
        epilog="Exit status: 0 when the DMP took the documents, 1 on a "
        "failure or a refusal, 2 for a bad argument, a file that is not a "
        "CDA, a CDA of a type without classCode and no --class-code, or more "
        "documents than a submission carries (nothing is sent then).",
    )
    parser.add_argument(
        "cda", nargs="+", type=Path, metavar="CDA", help="CDA documents (XML)"
    )
    parser.add_argument(
        "--facade",
        default=DEFAULT_FACADE,
        type=http_url,
        metavar="URL",
        help=f"the facade's URL (default {DEFAULT_FACADE})",
    )
    parser.add_argument(
        "--agent-context",
        required=True,
        type=Path,
        metavar="FILE",
        help="JSON file with the agent context {url, token, tlsFingerprint}, "
        "as POST /cps/session of the agent answers it",
    )
    parser.add_argument(
        "--class-code",
        metavar="CODE[^DISPLAY[^SCHEME]]",
        type=coded(CLASS_CODE_SYSTEM),
        help="classCode of every document, in place of the one its typeCode "
        "gives; needed for a type the table has none for (as for cpsdmp "
        "metadata)",
    )
    parser.add_argument(
        "--facade-ca",
        type=pem_certificates,
        metavar="PEM",
        help="for an https:// facade, and only for one: the roots its "
        "certificate may lead to (default: those this machine trusts)",
    )
    parser.add_argument("--json", action="store_true", help="print the JSON answer")
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=300.0,
        metavar="SECONDS",
        help="seconds to wait for the facade's answer (default 300)",
    )
    parser.set_defaults(func=run)


class FacadeTlsFailure(Exception):
    """
    The TLS handshake with an https:// facade failed; the message says why
    in words.
    """


def _tls_failure_in_words(reason: Failure, host: str, roots_given: bool) -> str | None:
    """
    @param host: the host of the facade's URL.
    @param roots_given: whether the roots the facade's certificate may lead
        to were given (--facade-ca), instead of this machine's.
    @return: what a failure of the connection to the facade says about its
        TLS handshake, in words, or C{None} when it is about something else.
    """
    if reason.check(VerificationError):
        return (
            f"the facade's TLS certificate does not name {host}, the host of "
            "the URL: use a name or address it gives"
        )
    if not reason.check(SSL.Error):
        return None
    # OpenSSL's error queue: (library, function, reason) for each error.
    args = reason.value.args if reason.value is not None else ()
    queue = args[0] if args else []
    said = [
        str(error[2])
        for error in (queue if isinstance(queue, list) else [])
        if isinstance(error, tuple) and len(error) == 3 and error[2]
    ]
    if "certificate verify failed" in said and roots_given:
        return (
            "the facade's TLS certificate is not trusted (its chain leads to "
            "none of the roots of --facade-ca, or the facade does not send "
            "its intermediate certificates)"
        )
    if "certificate verify failed" in said:
        return (
            "the facade's TLS certificate is not trusted (its chain leads to "
            "no root this machine trusts): give the root it leads to with "
            "--facade-ca PEM"
        )
    return (
        "the TLS handshake with the facade failed (OpenSSL: "
        f"{', '.join(said) or reason.getErrorMessage()})"
    )


# How twisted.web's client reports a connection that failed, its reasons
# (Failures) in a list.
_WRAPPERS = (ResponseNeverReceived, ResponseFailed, RequestTransmissionFailed)


@implementer(IAgent)
class _TlsFailuresInWords:
    """
    An HTTP agent that says why a TLS handshake with the facade failed in
    words, where OpenSSL gives a list of tuples.
    """

    def __init__(self, agent: IAgent, roots_given: bool) -> None:
        self._agent = agent
        self._roots_given = roots_given

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Any = None,
        bodyProducer: Any = None,
    ) -> Deferred[Any]:
        host = urlsplit(uri.decode("ascii", "replace")).hostname or "?"

        def in_words(failure: Failure) -> Failure:
            error = failure.value
            # The same exception, its reasons in words.
            if isinstance(error, _WRAPPERS):
                for reason in error.reasons:
                    words = _tls_failure_in_words(reason, host, self._roots_given)
                    if words is not None:
                        return Failure(type(error)([Failure(FacadeTlsFailure(words))]))
            return failure

        sent: Deferred[Any] = self._agent.request(method, uri, headers, bodyProducer)
        return sent.addErrback(in_words)


def _http_client(reactor: Any, roots: list[x509.Certificate] | None) -> Any:
    """
    @return: a treq client whose HTTPS trusts C{roots}, or this machine's
        roots when C{None}, and says a failed handshake in words.
    """
    from treq.client import HTTPClient
    from twisted.internet import ssl
    from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

    trust = None
    if roots:
        trust = ssl.trustRootFromCertificates(
            [
                ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM))
                for c in roots
            ]
        )
    agent = Agent(reactor, BrowserLikePolicyForHTTPS(trust))
    return HTTPClient(_TlsFailuresInWords(agent, bool(roots)))


def _read_document(path: Path, class_code: CodedValue | None) -> bytes:
    """
    @return: the bytes of a CDA, once it is read as one and its classCode is
        known (from its typeCode, or C{class_code}); the rest of its
        metadata is the facade's to check, with its structure and defaults.
    """
    try:
        data = read_cda(path)
    except OSError as error:
        raise BadInput(f"{path}: {error.strerror}") from None
    except ValueError as error:
        raise BadInput(f"{path}: {error}") from None
    try:
        read_header(data)
    except (CdaError, XmlRefused) as error:
        raise BadInput(f"{path}: {error}") from None
    try:
        document_entry(
            data, overrides={"classCode": class_code} if class_code else None
        )
    except UnknownClassCode as error:
        hint = "give it with --class-code CODE (a TRE_A03 code)"
        raise BadInput(f"{path}: {error.hinting(hint)}") from None
    except (CdaError, XmlRefused, MetadataError):
        pass  # the facade says it, naming the document
    return data


def _problem_lines(problem: Any, files: list[Path]) -> list[str]:
    """
    @param problem: a L{cpsdmp.facade.client.FacadeProblem}.
    @param files: the files submitted, in their order.
    @return: the lines that say a problem of the facade: the file it is
        about, or else all the files submitted, and its title, then the
        DMP's own errors one a line when it gave some (the detail sums them
        up: not said twice), or else the detail (without the title when the
        detail repeats it).
    """
    about = "cpsdmp submit"
    index = problem.problem.get("documentIndex")
    if isinstance(index, int) and 0 <= index < len(files):
        about += f": {files[index]}"
    else:
        # About the submission as a whole, whatever stopped it (the DMP, the
        # card, a rate limit): a script submitting many files is told which.
        about += f": {', '.join(str(path) for path in files)}"
    title = str(problem.problem.get("title") or "error")
    detail = str(problem.problem.get("detail") or "")
    if not problem.errors:
        # A detail that repeats the title says it all.
        if detail.lower().startswith(title.lower()):
            return [f"{about}: {problem.status} {detail}"]
        return [f"{about}: {problem}"]
    return [f"{about}: {problem.status} {title}"] + [
        f"  DMP {error.get('severity', '')} {error.get('code', '')}: "
        f"{error.get('context', '')}"
        for error in problem.errors
    ]


def run(args: argparse.Namespace) -> int:
    from cpsdmp.facade.service import MAX_DOCUMENTS

    if args.facade_ca and urlsplit(args.facade).scheme != "https":
        return usage_error(
            "submit",
            f"--facade-ca applies to an https:// facade only; {args.facade} is not one",
        )
    if len(args.cda) > MAX_DOCUMENTS:
        print(
            f"cpsdmp submit: {len(args.cda)} documents: a submission carries at "
            f"most {MAX_DOCUMENTS}; submit them in several",
            file=sys.stderr,
        )
        return 2
    try:
        context = read_agent_context(args.agent_context)
        documents = [_read_document(path, args.class_code) for path in args.cda]
    except BadInput as error:
        print(f"cpsdmp submit: {error}", file=sys.stderr)
        return 2
    overrides = None
    if args.class_code:
        overrides = [{"classCode": args.class_code.as_dict()} for _ in documents]

    from twisted.internet import task

    outcome: dict[str, int] = {}

    async def main(reactor: Any) -> None:
        from cpsdmp.facade.client import FacadeClient, FacadeError, FacadeProblem

        client = FacadeClient(
            args.facade,
            reactor,
            timeout=args.timeout,
            http=_http_client(reactor, args.facade_ca),
        )
        try:
            # As a form: the documents as they are, not a third larger in
            # base64, against the facade's limit on a body.
            answer = await client.td21_submit(
                documents, context, overrides, names=[path.name for path in args.cda]
            )
        except FacadeProblem as problem:
            for line in _problem_lines(problem, args.cda):
                print(line, file=sys.stderr)
            if args.json:
                print(json.dumps(problem.problem, ensure_ascii=False, indent=2))
            outcome["status"] = 1
            return
        except FacadeError as error:
            print(f"cpsdmp submit: {error}", file=sys.stderr)
            outcome["status"] = 1
            return
        finally:
            await client.close()
        if args.json:
            print(json.dumps(answer, ensure_ascii=False, indent=2))
        else:
            print(
                f"submitted ({answer['outcome']}): submission set "
                f"{answer['submissionSet']['uniqueId']}"
            )
            for path, document in zip(args.cda, answer["documents"], strict=True):
                print(
                    f"  {path}: uniqueId {document['uniqueId']} "
                    f"entryUUID {document['entryUUID']}"
                )
        outcome["status"] = 0

    def start(reactor: Any) -> Any:
        from twisted.internet.defer import ensureDeferred

        return ensureDeferred(main(reactor))

    try:
        task.react(start)
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            return 1
    return outcome.get("status", 1)
