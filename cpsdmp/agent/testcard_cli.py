"""
C{cpsdmp testcard init}: make (or reuse) a test CPS card and its test PKI.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cpsdmp.agent.testcard import (
    TestCardError,
    UnusableFolder,
    init_testcard,
    softhsm2_missing,
)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "testcard", help="make a test PKI and a test CPS card"
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    init = actions.add_parser(
        "init",
        help="create the test card in a folder, or reuse the one already there",
        description=(
            "Make, in DIR and nowhere else, a test PKI shaped like IGC-Santé's "
            "test hierarchy, a server certificate for the local DMP, and a test "
            "CPS card: a SoftHSM2 token holding the professional's keys and "
            "certificates under a real card's labels (its own softhsm2.conf in "
            "DIR), and a PKCS#12 soft card. DIR/testcard.json describes it all. "
            "Run again, it reuses what reads back whole. DIR is new, empty, or "
            "holds a test card made before: a folder of other files is refused."
        ),
    )
    init.add_argument("--dir", required=True, help="folder that holds everything")
    kind = init.add_mutually_exclusive_group()
    kind.add_argument(
        "--softhsm",
        dest="softhsm",
        action="store_true",
        default=None,
        help="require a SoftHSM2 token (default: when SoftHSM2 is installed)",
    )
    kind.add_argument(
        "--soft-only",
        dest="softhsm",
        action="store_false",
        help="make only the PKCS#12 soft card",
    )
    init.set_defaults(func=run_init)


def run_init(args: argparse.Namespace) -> int:
    try:
        card = init_testcard(args.dir, softhsm=args.softhsm, report=print)
    except UnusableFolder as e:
        print(f"cpsdmp testcard: {e}", file=sys.stderr)
        return 2
    except TestCardError as e:
        print(f"cpsdmp testcard: {e}", file=sys.stderr)
        return 1
    holder = card.professional
    print(f"Test card in {card.directory}")
    print(
        f"  holder        {holder['name']} ({holder['profession']}), id {holder['id']}"
    )
    if card.has_token:
        print(f"  SoftHSM2      token {card.token_label!r}, PIN {card.pin}")
        print(f"  module        {card.pkcs11_module}")
        print(f"  SOFTHSM2_CONF {card.softhsm2_conf}")
    else:
        reason = softhsm2_missing() or "not asked for"
        print(f"  SoftHSM2      none ({reason}); soft card only")
    print(f"  soft card     {card.soft_card} (password: the PIN)")
    print(f"  CA root       {card.ca_root}")
    print(f"  sandbox cert  {card.sandbox_cert}")
    print(f"  description   {card.directory}/testcard.json")
    return 0
