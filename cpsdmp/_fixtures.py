"""
Where the public DMP material lives (schemas, official example messages, ANS
example CDAs). The project never ships it: it is read from the folder named
by C{CPSDMP_FIXTURES}, or from C{../shared/fixtures} beside the checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

VARIABLE = "CPSDMP_FIXTURES"


def _beside_checkouts() -> list[Path]:
    """
    @return: the C{shared/fixtures} folders beside the checkouts that hold
        the working folder or this package, nearest first, whether they
        exist or not.
    """
    candidates: list[Path] = []
    for start in [Path.cwd(), Path(__file__).resolve().parent]:
        for folder in [start, *start.parents]:
            candidate = folder.parent / "shared" / "fixtures"
            if (folder / ".git").exists() and candidate not in candidates:
                candidates.append(candidate)
    return candidates


def fixtures_dir() -> Path | None:
    """
    @return: the fixtures folder, or C{None} when there is none
        (L{fixtures_missing} then says where it was looked for).
    """
    explicit = os.environ.get(VARIABLE)
    if explicit:
        path = Path(explicit)
        return path if path.is_dir() else None
    for candidate in _beside_checkouts():
        if candidate.is_dir():
            return candidate
    return None


def fixtures_missing() -> str:
    """
    @return: why L{fixtures_dir} found no folder, naming where it looked:
        the folder C{CPSDMP_FIXTURES} names when it is set (and then only
        there), else C{shared/fixtures} beside the checkout.
    """
    beside = _beside_checkouts()
    where = (
        ", ".join(str(p) for p in beside)
        if beside
        else "none: cpsdmp does not run from a checkout"
    )
    explicit = os.environ.get(VARIABLE)
    if explicit:
        return (
            f"{VARIABLE} is set to {explicit}, which is not a folder: set it "
            "to the folder of the public DMP material, or unset it to use "
            f"shared/fixtures beside the checkout ({where})"
        )
    return (
        f"{VARIABLE} is not set and there is no shared/fixtures folder beside "
        f"the checkout ({where}): set {VARIABLE} to the folder of the public "
        "DMP material"
    )
