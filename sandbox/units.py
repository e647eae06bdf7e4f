"""Parsing of sizes and durations given on the command line or in profiles."""

from __future__ import annotations

from .errors import UsageError

_SIZE_SUFFIXES = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 1000**3,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tib": 1 << 40,
}
_TIME_SUFFIXES = {"": 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_size(text: str | int, what: str = "size") -> int:
    """'64M' -> 67108864. K, M, G, T are binary (as in docker and systemd); KB, MB,
    GB are decimal. A bare number is bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise UsageError(f"{what} must not be negative, got {text}")
        return text
    raw = str(text).strip().lower()
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    suffix = raw[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if suffix not in _SIZE_SUFFIXES or value < 0 or value != value:
        raise UsageError(
            f"bad {what} {str(text)!r}: use a number of bytes with an optional "
            "suffix K, M, G or T (binary) or KB, MB, GB (decimal), e.g. 64M"
        )
    return int(value * _SIZE_SUFFIXES[suffix])


def parse_seconds(text: str | float, what: str = "time") -> float:
    """'1.5' or '1500ms' or '2m' -> seconds as a float; must be positive."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        raw = str(text).strip().lower()
        number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
        suffix = raw[len(number) :]
        try:
            value = float(number) * _TIME_SUFFIXES[suffix]
        except (ValueError, KeyError):
            value = -1.0
    if not value > 0 or value == float("inf"):
        raise UsageError(
            f"bad {what} {str(text)!r}: use a positive number of seconds, "
            "optionally with a suffix ms, s, m or h, e.g. 2.5 or 500ms"
        )
    return value


def parse_count(text: str | int, what: str) -> int:
    """A positive whole number (tasks, open files)."""
    try:
        value = int(str(text).strip())
    except ValueError:
        value = 0
    if value <= 0:
        raise UsageError(f"bad {what} {str(text)!r}: use a positive whole number")
    return value


def format_size(n: int) -> str:
    for unit, factor in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)
