"""Structured logs: one line per event, JSON or logfmt, levels honoured.

    log = get_logger("edge")
    log.info("config_reloaded", generation=3, source="config/demo.yaml")

The event name comes first and fields are keyword arguments, so a line is never formatted when
its level is disabled (the check is one integer comparison).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Literal, TextIO

LogFormat = Literal["json", "logfmt"]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _State:
    level = logging.INFO
    fmt: LogFormat = "logfmt"
    stream: TextIO = sys.stderr


def configure(level: str = "info", fmt: LogFormat = "logfmt", stream: TextIO | None = None) -> None:
    """Set the process-wide level and format (called once by the CLI)."""
    if level not in _LEVELS:
        raise ValueError(f"unknown log level {level!r}")
    _State.level = _LEVELS[level]
    _State.fmt = fmt
    _State.stream = stream if stream is not None else sys.stderr


def current_format() -> LogFormat:
    """The format chosen at start-up, for writers that pre-build their lines (the access log)."""
    return _State.fmt


def write_lines(text: str) -> None:
    """Write already formatted lines (ending in a newline) in one call: batched access logs."""
    try:
        _State.stream.write(text)
        _State.stream.flush()
    except (OSError, ValueError):  # a closed stderr must never take a request down
        pass


def _logfmt_value(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text == "" or any(c in text for c in ' ="\\\n\t'):
        return json.dumps(text)
    return text


def format_event(
    level: str, logger: str, event: str, fields: dict[str, Any], fmt: LogFormat
) -> str:
    ts = (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        + f".{int(time.time() * 1000) % 1000:03d}Z"
    )
    if fmt == "json":
        record = {"ts": ts, "level": level, "logger": logger, "event": event, **fields}
        return json.dumps(record, default=str, separators=(",", ":"))
    parts = [f"ts={ts}", f"level={level}", f"logger={logger}", f"event={_logfmt_value(event)}"]
    parts.extend(f"{key}={_logfmt_value(value)}" for key, value in fields.items())
    return " ".join(parts)


class StructuredLogger:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def enabled(self, level: int) -> bool:
        return level >= _State.level

    def _emit(self, level: int, level_name: str, event: str, fields: dict[str, Any]) -> None:
        if level < _State.level:
            return
        line = format_event(level_name, self.name, event, fields, _State.fmt)
        try:
            _State.stream.write(line + "\n")
            _State.stream.flush()
        except (OSError, ValueError):  # a closed stderr must never take a request down
            pass

    def debug(self, event: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, "debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit(logging.INFO, "info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(logging.WARNING, "warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit(logging.ERROR, "error", event, fields)


def get_logger(name: str) -> StructuredLogger:
    return StructuredLogger(name)
