"""Durations, sizes and rates as people write them: ``10s``, ``250ms``, ``1.5m``, ``256MiB``,
``64k``, ``10/s``, ``600/m``."""

from __future__ import annotations

import re

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*$")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "ki": 1024,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mi": 1024**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gi": 1024**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ti": 1024**4,
    "tib": 1024**4,
}


def parse_duration(value: object) -> float:
    """Seconds from ``10s``/``250ms``/``2m``; a bare number means seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 10s or 250ms")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError("expected a duration such as 10s or 250ms")
    match = _DURATION_RE.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a duration (examples: 10s, 250ms, 1.5m)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]


def parse_size(value: object) -> int:
    """Bytes from ``256MiB``/``64k``/``1.5GB``; a bare integer means bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 64KiB or 256MiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError("expected a size such as 64KiB or 256MiB")
    match = _SIZE_RE.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a size (examples: 512, 64KiB, 256MiB)")
    unit = (match.group(2) or "").lower()
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h|d)\s*$")
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_rate(value: object) -> float:
    """Events per second from ``10/s``/``600/m``/``1000/h``/``5000/d``; a bare number means
    per second.  Zero is refused (a limit that admits nothing is a deny rule, not a rate)."""
    if isinstance(value, bool):
        raise ValueError("expected a rate such as 10/s or 600/m")
    if isinstance(value, int | float):
        rate = float(value)
    elif isinstance(value, str):
        match = _RATE_RE.match(value)
        if match is None:
            raise ValueError(f"{value!r} is not a rate (examples: 10/s, 600/m, 1000/h)")
        rate = float(match.group(1)) / _RATE_UNITS[match.group(2)]
    else:
        raise ValueError("expected a rate such as 10/s or 600/m")
    if not rate > 0.0 or rate > 1e9:  # also refuses NaN
        raise ValueError(f"a rate must be above 0 and at most 1e9/s, got {value!r}")
    return rate


def format_duration(seconds: float) -> str:
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


def format_size(size: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size}B"
