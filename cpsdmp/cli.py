"""
The C{cpsdmp} command: each subcommand lives beside the code it drives and
registers itself through an C{add_parser(subparsers)} function that sets
C{func} on its parser. C{func(args)} returns the exit status.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from cryptography import x509

# Module that defines each subcommand, in the order `--help` lists them.
SUBCOMMANDS = [
    "cpsdmp.agent.testcard_cli",
    "cpsdmp.xds.cli",
    "cpsdmp.facade.cli",
    "cpsdmp.demo",
    "cpsdmp.probe",
]


class _Parser(argparse.ArgumentParser):
    """
    Says a bad argument in one line, pointing at the help, with exit status 2.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def usage_error(command: str, message: str) -> int:
    """
    Say, as the parser does, a combination of arguments that cannot serve.

    @return: the exit status for a bad argument, 2.
    """
    print(f"cpsdmp {command}: {message} (see cpsdmp {command} --help)", file=sys.stderr)
    return 2


def positive_seconds(value: str) -> float:
    """
    An argparse type: a finite number of seconds above zero.
    """
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a positive number of seconds"
        )
    return seconds


def http_url(value: str) -> str:
    """
    An argparse type: an http or https URL naming a host.
    """
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- raises ValueError for a bad port
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{value!r}: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an http:// or https:// URL with a host"
        )
    return value


class BadInput(Exception):
    """
    A file given as an argument cannot serve; the message names it and says
    why, in one line.
    """


# What an agent context holds (POST /cps/session's answer of the agent).
AGENT_CONTEXT_KEYS = ("url", "token", "tlsFingerprint")


# A bundle of trusted roots is some hundreds of KiB at most.
MAX_PEM_BYTES = 16 * 1024 * 1024

# An agent context is a few hundred bytes; reading stops here whatever the
# file holds.
MAX_AGENT_CONTEXT_BYTES = 64 * 1024


def _size(limit: int) -> str:
    mib = 1024 * 1024
    return f"{limit // mib} MiB" if limit % mib == 0 else f"{limit // 1024} KiB"


class FileTooLarge(ValueError):
    """
    A file is larger than it may be.
    """


def read_regular_file(path: Path, limit: int) -> bytes:
    """
    @return: the bytes of a regular file of at most C{limit} bytes, read up
        to C{limit} and no further.
    @raise ValueError: it is not a regular file (a pipe no one writes to
        would be waited on forever, a device read until the limit), or
        L{FileTooLarge}; the message says which, to follow the file's name.
    @raise OSError: it cannot be read.
    """
    # Opened without waiting for a writer, in case it is a pipe.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        # Asked before a file object is made of it: that refuses a folder
        # with an error of its own, and leaves the descriptor open.
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise FileTooLarge(f"larger than {_size(limit)}")
    return data


def read_agent_context(path: Path) -> dict[str, Any]:
    """
    @return: the agent context of a JSON file: an object whose C{url},
        C{token} and C{tlsFingerprint} are strings.
    @raise BadInput: the file cannot be read or is not an agent context.
    """
    try:
        data = read_regular_file(path, MAX_AGENT_CONTEXT_BYTES)
    except OSError as error:
        raise BadInput(
            f"cannot read the agent context {path}: {error.strerror}"
        ) from None
    except ValueError as error:
        raise BadInput(f"the agent context {path} is {error}") from None
    try:
        text = data.decode("utf-8")
    except ValueError as error:
        raise BadInput(f"the agent context {path} is not UTF-8 text: {error}") from None
    try:
        context = json.loads(text)
    except ValueError as error:
        raise BadInput(f"the agent context {path} is not JSON: {error}") from None
    if not isinstance(context, dict):
        raise BadInput(
            f"the agent context {path} is not an agent context (a JSON object "
            "with url, token and tlsFingerprint)"
        )
    missing = [key for key in AGENT_CONTEXT_KEYS if key not in context]
    if missing:
        raise BadInput(f"the agent context {path} lacks {', '.join(missing)}")
    not_text = [
        key
        for key in AGENT_CONTEXT_KEYS
        if not isinstance(context[key], str) or not context[key]
    ]
    if not_text:
        raise BadInput(
            f"the agent context {path} has {', '.join(not_text)} empty or not a string"
        )
    return context


def pem_certificates(path: str) -> list[x509.Certificate]:
    """
    An argparse type: the PEM certificates of a file, in their order.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except OSError as error:
        raise argparse.ArgumentTypeError(
            f"{path}: cannot read it ({error.strerror})"
        ) from None
    if len(data) > MAX_PEM_BYTES:
        raise argparse.ArgumentTypeError(
            f"{path}: larger than {MAX_PEM_BYTES // (1024 * 1024)} MiB: not "
            "PEM certificates"
        )
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        if b"-----BEGIN CERTIFICATE-----" in data:
            message = f"{path}: a PEM certificate in it cannot be read"
        else:
            message = f"no PEM certificate in {path}"
        raise argparse.ArgumentTypeError(message) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cpsdmp",
        description="Talk to the French DMP with a CPS card left in the "
        "professional's workstation.",
        epilog="The services run under twist: twist cpsagent (the "
        "workstation agent), twist dmpfacade (the REST facade), twist "
        "dmpsandbox (a local DMP); twist NAME --help lists their options.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # Whoever read our output stopped (`| head`): the rest goes nowhere,
        # without a traceback, and Python's own flush at exit fails no more.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
