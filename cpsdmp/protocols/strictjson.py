"""
JSON read the strict way this project's servers read requests. Python's
C{json.loads} keeps the last of two members of the same name, so that what
a caller's checks saw and what the server acts on could differ: here a
member named twice in one object is refused. So are C{NaN} and
C{Infinity}, which JSON has not, and integers longer than any value a
request carries (Python would answer about its own conversion limit).
"""

from __future__ import annotations

import json
from typing import Any

#: The longest integer taken, in digits.
MAX_INTEGER_DIGITS = 64


class JsonRefused(ValueError):
    """
    The text is not JSON this project takes. The message completes a
    sentence whose subject is what was read: C{f"the body {error}"}.
    """


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    members: dict[str, Any] = {}
    for name, value in pairs:
        if name in members:
            shown = name if len(name) <= 40 else name[:40] + "..."
            raise JsonRefused(f"has the member {shown!r} twice in one object")
        members[name] = value
    return members


def _integer(digits: str) -> int:
    count = len(digits.lstrip("-"))
    if count > MAX_INTEGER_DIGITS:
        raise JsonRefused(
            f"has a number of {count} digits (at most {MAX_INTEGER_DIGITS} are taken)"
        )
    return int(digits)


def _constant(name: str) -> Any:
    raise JsonRefused(f"has {name}, which is not JSON")


def loads(data: bytes | str) -> Any:
    """
    @return: C{data} read as JSON (UTF-8 when bytes).
    @raise JsonRefused: it is not JSON, not UTF-8, nested too deeply, or
        has a member twice in one object, NaN or Infinity, or an integer
        over L{MAX_INTEGER_DIGITS} digits.
    """
    try:
        if isinstance(data, bytes):
            # RFC 8259, section 8.1: a byte order mark may be ignored.
            data = data.decode("utf-8-sig")
        return json.loads(
            data,
            object_pairs_hook=_no_duplicates,
            parse_int=_integer,
            parse_constant=_constant,
        )
    except JsonRefused:
        raise
    except RecursionError:
        raise JsonRefused("is JSON nested too deeply") from None
    except UnicodeDecodeError:
        raise JsonRefused("is not JSON: it is not UTF-8 text") from None
    except ValueError as error:
        raise JsonRefused(f"is not JSON: {error}") from None
