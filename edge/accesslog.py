"""The access log: one structured line per request, batched and formatted at flush."""

from __future__ import annotations

import json
import logging
import re
import time

from edge.memos import ACCESS_LOG_MIDDLES, BoundedMemo
from meridian.log import current_format, format_event, get_logger, write_lines

access_logger = get_logger("edge.access")

_Pending = tuple[float, str, float, float, bytes, str, str]
#: The protocol fields of a line: "h1" or "h2", and the TLS version when the front end knows it.
H1_FIELDS = " proto=h1"
_MiddleKey = tuple[str, int, int, str, str, str, str, int]


class AccessLog:
    """One structured line per request, batched: written once per flush (every sweep of the
    connections, or 256 lines), not once per request.  Same line format as ``meridian.log``
    (logfmt or JSON, to the stream the CLI configured), but formatted here with a cheaper path
    for the plain values an access line holds; disabled when the level is above info.

    ``record_request`` (every request the edge answers, hits and misses alike) keeps a tuple
    and the line is put together at ``flush``; its constant middle (method, path, status,
    bytes, cache, region, backend, attempts) is built once per distinct value."""

    def __init__(self) -> None:
        #: Formatted lines, and requests still to format (at flush, in order).
        self._lines: list[str | _Pending] = []
        self._middles: BoundedMemo[_MiddleKey, str] = BoundedMemo(ACCESS_LOG_MIDDLES)
        #: Whether lines are recorded (``configure``); a plain attribute: read on every hit.
        self.enabled: bool = access_logger.enabled(logging.INFO)
        self._second = -1
        self._stamp = ""
        self._millisecond = -1
        self._prefix = ""
        #: The protocol fields of the lines recorded without explicit ones (``protocol_fields``;
        #: a front end sets them around its synchronous calls into the hit stage).
        self.protocol = H1_FIELDS

    def configure(self, enabled: bool) -> None:
        """Switch the access log on or off (``edge.access_log``, at start and on reload);
        it stays off while the ``edge.access`` logger's level is above info."""
        if not enabled:
            self.flush()
        self.enabled = enabled and access_logger.enabled(logging.INFO)

    def _timestamp(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int(now * 1000) % 1000:03d}Z"

    def record(self, **fields: object) -> None:
        if not self.enabled:
            return
        if current_format() == "json":
            line = format_event("info", "edge.access", "access", fields, "json")
        else:
            parts = [f"ts={self._timestamp()} level=info logger=edge.access event=access"]
            for key, value in fields.items():
                parts.append(f"{key}={_logfmt(str(value))}")
            line = " ".join(parts)
        self._add(line)

    def record_request(
        self,
        method: str,
        path: str,
        status: int,
        cache: str,
        region: str,
        backend: str,
        attempts: int,
        upstream: float,
        sent: int,
        total: float,
        request_id: bytes,
        client_ip: str,
        protocol: str | None = None,
    ) -> None:
        """The access line of one request: the same fields as ``record``, in the same order,
        for about half a microsecond here (logfmt formatting waits for ``flush``).
        ``protocol``: ``protocol_fields(...)``; None: ``self.protocol``."""
        if not self.enabled:
            return
        tail = self.protocol if protocol is None else protocol
        if current_format() == "json":
            extra = dict(part.split("=", 1) for part in tail.split())
            self.record(
                method=method,
                path=path,
                status=status,
                bytes=sent,
                cache=cache,
                region=region,
                backend=backend,
                attempts=attempts,
                upstream_ms=round(upstream * 1000, 2),
                total_ms=round(total * 1000, 2),
                **extra,
                request_id=request_id.decode("ascii", "replace"),
                client=client_ip,
            )
            return
        key = (path, status, sent, cache, region, method, backend, attempts)
        middle = self._middles.get(key)
        if middle is None:
            middle = self._middle(key)
        lines = self._lines
        lines.append((time.time(), middle, upstream, total, request_id, client_ip, tail))
        if len(lines) >= 256:
            self.flush()

    def _middle(self, key: _MiddleKey) -> str:
        path, status, sent, cache, region, method, backend, attempts = key
        middle = (
            f" method={_logfmt(method)} path={_logfmt(path)} status={status} bytes={sent}"
            f" cache={_logfmt(cache)} region={_logfmt(region)} backend={_logfmt(backend)}"
            f" attempts={attempts} upstream_ms="
        )
        if len(self._middles) >= self._middles.bound:  # bounded: paths are the client's choice
            self._middles.clear()
        self._middles[key] = middle
        return middle

    def _format(self, item: _Pending) -> str:
        now, middle, upstream, total, request_id, client, tail = item
        millisecond = int(now * 1000)
        if millisecond != self._millisecond:  # lines of one millisecond share their prefix
            self._millisecond = millisecond
            self._prefix = (
                f"ts={self._stamp_of(millisecond // 1000)}.{millisecond % 1000:03d}Z"
                " level=info logger=edge.access event=access"
            )
        rid = request_id.decode("ascii", "replace")
        if _NEEDS_QUOTES.search(rid):
            rid = json.dumps(rid)
        return (
            f"{self._prefix}{middle}{round(upstream * 1000, 2)}"
            f" total_ms={round(total * 1000, 2)}{tail} request_id={rid} client={_logfmt(client)}"
        )

    def _stamp_of(self, second: int) -> str:
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return self._stamp

    def _add(self, line: str) -> None:
        self._lines.append(line)
        if len(self._lines) >= 256:
            self.flush()

    def flush(self) -> None:
        if not self._lines:
            return
        lines = [item if isinstance(item, str) else self._format(item) for item in self._lines]
        self._lines.clear()
        write_lines("\n".join(lines) + "\n")


def protocol_fields(protocol: str, tls_version: str | None) -> str:
    """The protocol fields of an access line (`` proto=h2 tls=TLSv1.3``), made once per
    connection or request kind, never per line."""
    if tls_version:
        return f" proto={protocol} tls={tls_version}"
    return f" proto={protocol}"


def _logfmt(text: str) -> str:
    """A logfmt value: as it is, or JSON-quoted when empty or holding a separator."""
    if not text or _NEEDS_QUOTES.search(text):
        return json.dumps(text)
    return text


_NEEDS_QUOTES = re.compile(r'[ ="\\\n\t]')


__all__ = ["H1_FIELDS", "AccessLog", "protocol_fields"]
