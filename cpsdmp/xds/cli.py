"""
C{cpsdmp metadata CDA.xml}: print the XDS DocumentEntry that submitting this
CDA to the DMP would carry, keyed by XDS attribute names, so that a
professional or an integrator can check it before anything is sent.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from cpsdmp.cli import FileTooLarge, read_regular_file
from cpsdmp.protocols.safexml import XmlRefused
from cpsdmp.xds.cda import (
    CLASS_CODE_SYSTEM,
    CdaError,
    UnknownClassCode,
    document_entry,
)
from cpsdmp.xds.context import (
    ACTIVITY_SECTOR_SYSTEM,
    PRACTICE_SETTING_SYSTEM,
)
from cpsdmp.xds.ebrim import CodedValue, MetadataError, is_oid
from cpsdmp.xds.values import check_class_code

# The largest CDA read; a DMP document is far smaller, and reading stops here
# whatever the file claims (a file still growing).
MAX_CDA_BYTES = 128 * 1024 * 1024

# A code may be a URN (every formatCode is one), hence the colon; never an
# HL7 v2 delimiter.
_CODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]*")


def coded(default_scheme: str) -> Any:
    """
    @return: an argparse type reading C{code[^display[^codingScheme]]} (an
        HL7 v2 CE), the scheme defaulting to C{default_scheme}.
    """

    def parse(value: str) -> CodedValue:
        # code, or code^display, or code^display^scheme (an HL7 v2 CE).
        code, _, rest = value.partition("^")
        display, _, scheme = rest.partition("^")
        if not _CODE.fullmatch(code):
            raise argparse.ArgumentTypeError(
                f"{value!r}: a code is letters, digits and _ . : / - "
                "(code[^display[^codingScheme]])"
            )
        if scheme and not is_oid(scheme):
            raise argparse.ArgumentTypeError(
                f"{value!r}: the coding scheme must be an OID such as "
                "1.2.250.1.213.1.1.4.1"
            )
        if not (scheme or default_scheme):
            raise argparse.ArgumentTypeError(
                f"{value!r}: give the coding scheme too (code^display^OID)"
            )
        given = CodedValue(code, scheme or default_scheme, display)
        if given.scheme == CLASS_CODE_SYSTEM:
            # A class of the TRE_A03 table, or the DMP refuses it.
            try:
                check_class_code(given)
            except MetadataError as error:
                raise argparse.ArgumentTypeError(str(error)) from None
        return given

    return parse


def _title(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("the title cannot be empty")
    return value


def read_cda(path: Path, limit: int = MAX_CDA_BYTES) -> bytes:
    """
    @return: the file's bytes, read up to C{limit} and no further.
    @raise ValueError: when the file is larger, or is not a regular file.
    """
    try:
        return read_regular_file(path, limit)
    except FileTooLarge as error:
        raise FileTooLarge(f"{error}: not a CDA") from None


# How a code is given on the command line (an HL7 v2 CE).
_CE = "CODE[^DISPLAY[^SCHEME]]"


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "metadata",
        help="show the XDS metadata a submission of a CDA would carry",
        description="Derive the XDS DocumentEntry of a CDA document as the DMP "
        "would receive it. Codes are given as code[^display[^codingScheme]].",
        epilog="Exit status: 0 when the metadata is printed, 2 for a bad "
        "argument or a file that cannot give it (unreadable, not a CDA the DMP "
        "would take, or of a type without classCode and no --class-code), "
        "said in one line.",
    )
    parser.add_argument("cda", type=Path, metavar="CDA", help="the CDA document")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--class-code",
        type=coded(CLASS_CODE_SYSTEM),
        metavar=_CE,
        help="classCode of the document, in place of the one its typeCode "
        "gives; needed for a type the table has none for (TRE_A03; a code "
        "alone gets its display name)",
    )
    parser.add_argument(
        "--format-code",
        type=coded(""),
        metavar="CODE^DISPLAY^SCHEME",
        help="formatCode to use (with its scheme)",
    )
    parser.add_argument(
        "--practice-setting",
        type=coded(PRACTICE_SETTING_SYSTEM),
        metavar=_CE,
        help="practiceSettingCode when the CDA has none, or to replace it",
    )
    parser.add_argument(
        "--facility-type",
        type=coded(ACTIVITY_SECTOR_SYSTEM),
        metavar=_CE,
        help="healthcareFacilityTypeCode when the CDA has none, or to replace it",
    )
    parser.add_argument("--title", type=_title, help="title to use")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides: dict[str, object] = {}
    for option, name in [
        ("class_code", "classCode"),
        ("format_code", "formatCode"),
        ("practice_setting", "practiceSettingCode"),
        ("facility_type", "healthcareFacilityTypeCode"),
        ("title", "title"),
    ]:
        value = getattr(args, option)
        if value is not None:
            overrides[name] = value
    try:
        data = read_cda(args.cda)
        entry = document_entry(data, overrides=overrides)
    except OSError as error:
        print(
            f"cpsdmp metadata: cannot read {args.cda}: {error.strerror}",
            file=sys.stderr,
        )
        return 2
    except UnknownClassCode as error:
        hint = "give it with --class-code CODE (a TRE_A03 code)"
        print(f"cpsdmp metadata: {args.cda}: {error.hinting(hint)}", file=sys.stderr)
        return 2
    except (CdaError, XmlRefused, MetadataError, ValueError) as error:
        print(f"cpsdmp metadata: {args.cda}: {error}", file=sys.stderr)
        return 2
    values = entry.as_dict()
    if args.json:
        print(json.dumps(values, ensure_ascii=False, indent=2))
        return 0
    for name, value in values.items():
        if isinstance(value, dict):
            value = CodedValue(
                value["code"], value["codingScheme"], value["display"]
            ).to_ce()
        elif isinstance(value, list):
            value = " ~ ".join(
                CodedValue(v["code"], v["codingScheme"], v["display"]).to_ce()
                if isinstance(v, dict) and "code" in v
                else json.dumps(v, ensure_ascii=False)
                if isinstance(v, dict)
                else str(v)
                for v in value
            )
        print(f"{name}: {'' if value is None else value}")
    return 0
