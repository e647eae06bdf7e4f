"""Checkers: does a program's output match the expected answer?

Each checker takes the payload's stdout (bytes) and the expected text and returns a
`Check`. They are pure functions, chosen by name in a batch job:

    exact    the bytes are equal
    tokens   the same whitespace-separated tokens (spacing and line breaks ignored)
    numbers  the same tokens, where two numeric tokens match when they differ by at
             most `tolerance`, absolute or relative to the expected value
"""

from __future__ import annotations

import math

from .errors import UsageError
from .record import record

DEFAULT_TOLERANCE = 1e-6
NAMES = ("exact", "tokens", "numbers")


@record(frozen=True)
class Check:
    checker: str
    passed: bool
    detail: str = ""  # why it failed: the first difference

    def to_dict(self) -> dict:
        return {"checker": self.checker, "passed": self.passed, "detail": self.detail}


def exact(output: bytes, expected: str) -> Check:
    want = expected.encode()
    if output == want:
        return Check("exact", True)
    return Check("exact", False, _first_byte_difference(output, want))


def tokens(output: bytes, expected: str) -> Check:
    return _compare_tokens("tokens", output, expected, None)


def numbers(
    output: bytes, expected: str, tolerance: float = DEFAULT_TOLERANCE
) -> Check:
    return _compare_tokens("numbers", output, expected, tolerance)


def check(
    name: str, output: bytes, expected: str, tolerance: float | None = None
) -> Check:
    """Run the checker called `name`. Raises UsageError for an unknown name."""
    if name == "exact":
        return exact(output, expected)
    if name == "tokens":
        return tokens(output, expected)
    if name == "numbers":
        return numbers(
            output, expected, DEFAULT_TOLERANCE if tolerance is None else tolerance
        )
    raise UsageError(f"unknown checker {name!r}: use one of {', '.join(NAMES)}")


def _compare_tokens(
    name: str, output: bytes, expected: str, tolerance: float | None
) -> Check:
    got = output.decode("utf-8", "replace").split()
    want = expected.split()
    for index, (g, w) in enumerate(zip(got, want)):
        if g != w and not (tolerance is not None and _close(g, w, tolerance)):
            return Check(
                name, False, f"token {index + 1}: got {_clip(g)}, expected {_clip(w)}"
            )
    if len(got) != len(want):
        return Check(name, False, f"got {len(got)} tokens, expected {len(want)}")
    return Check(name, True)


def _close(got: str, want: str, tolerance: float) -> bool:
    try:
        g, w = float(got), float(want)
    except ValueError:
        return False
    if math.isnan(g) or math.isnan(w):
        return False
    if math.isinf(g) or math.isinf(w):
        return g == w
    return abs(g - w) <= tolerance or abs(g - w) <= tolerance * abs(w)


def _first_byte_difference(got: bytes, want: bytes) -> str:
    for index, (g, w) in enumerate(zip(got, want)):
        if g != w:
            got_text, want_text = got[index : index + 16], want[index : index + 16]
            return f"byte {index}: got {got_text!r}, expected {want_text!r}"
    if len(got) < len(want):
        return f"output ends after {len(got)} bytes; expected {len(want)}"
    return (
        f"output has {len(got) - len(want)} extra bytes after the expected {len(want)}"
    )


def _clip(token: str, width: int = 24) -> str:
    return repr(token if len(token) <= width else token[: width - 1] + "…")
