"""
Where the public DMP material lives (schemas, official example messages, ANS
example CDAs). The project never ships it: it is read from the folder named
by C{CPSDMP_FIXTURES}, or from C{../shared/fixtures} beside the checkout.
"""

from __future__ import annotations

import os
from pathlib import Path


def fixtures_dir() -> Path | None:
    """
    @return: the fixtures folder, or C{None} when there is none.
    """
    explicit = os.environ.get("CPSDMP_FIXTURES")
    if explicit:
        path = Path(explicit)
        return path if path.is_dir() else None
    starts = [Path.cwd(), Path(__file__).resolve().parent]
    for start in starts:
        for folder in [start, *start.parents]:
            candidate = folder.parent / "shared" / "fixtures"
            if (folder / ".git").exists() and candidate.is_dir():
                return candidate
    return None
