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

from cpsdmp.xds.cda import CLASS_CODE_SYSTEM
from cpsdmp.xds.cli import coded

DEFAULT_FACADE = "http://127.0.0.1:10080"


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "submit",
        help="submit CDA documents through a running facade (TD2.1)",
        description="Submit CDA documents of one patient to the DMP through "
        "a running facade, with the professional's agent context.",
    )
    parser.add_argument("cda", nargs="+", type=Path, help="CDA documents (XML)")
    parser.add_argument(
        "--facade", default=DEFAULT_FACADE, help=f"facade URL ({DEFAULT_FACADE})"
    )
    parser.add_argument(
        "--agent-context",
        required=True,
        type=Path,
        help="JSON file with the agent context {url, token, tlsFingerprint}",
    )
    parser.add_argument(
        "--class-code",
        metavar="CODE[^DISPLAY[^SCHEME]]",
        type=coded(CLASS_CODE_SYSTEM),
        help="classCode of every document, when the CDA's type has none "
        "(as for cpsdmp metadata)",
    )
    parser.add_argument("--json", action="store_true", help="print the JSON answer")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait (300)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        context = json.loads(args.agent_context.read_text())
        documents = [path.read_bytes() for path in args.cda]
    except OSError as error:
        print(f"cpsdmp submit: {error.filename}: {error.strerror}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"cpsdmp submit: the agent context is not JSON: {error}", file=sys.stderr)
        return 2
    overrides = None
    if args.class_code:
        overrides = [{"classCode": args.class_code.as_dict()} for _ in documents]

    from twisted.internet import task

    outcome: dict[str, int] = {}

    async def main(reactor: Any) -> None:
        from cpsdmp.facade.client import FacadeClient, FacadeError, FacadeProblem

        client = FacadeClient(args.facade, reactor, timeout=args.timeout)
        try:
            answer = await client.td21_submit(documents, context, overrides)
        except FacadeProblem as problem:
            print(f"cpsdmp submit: {problem}", file=sys.stderr)
            for error in problem.errors:
                print(
                    f"  DMP {error.get('severity', '')} {error.get('code', '')}: "
                    f"{error.get('context', '')}",
                    file=sys.stderr,
                )
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
