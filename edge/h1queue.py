"""The requests of one HTTP/1.1 connection, answered strictly in order and one at a time
(pipelining): the one being handled (``Pipeline.handle`` in a task, writing through the
connection's ``ResponseWriter``) and those read behind it, at most ``PIPELINE_DEPTH`` before
the connection stops reading.

Accounting that cannot leak: every exchange ends in ``request_ended`` (the queue is the
``RequestGuard`` of its task's ``Pipeline.handle``, which calls it in its ``finally``), which
hands it back to the connection (``QueueHost.request_done``): the connection decides whether
it may carry the next request.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator
from typing import Protocol

from edge.cache.coalesce import leads_fill
from edge.h1parse import Exchange
from edge.h1response import ResponseWriter
from edge.http1 import expects_continue
from edge.pipeline import Pipeline, ProxyRequest
from meridian.log import get_logger

log = get_logger("edge")

#: Pipelined requests queued before the connection stops reading.
PIPELINE_DEPTH = 16


class QueueHost(Protocol):
    """The connection, as its request queue reports to it."""

    def request_done(self, exchange: Exchange) -> None:
        """``exchange`` was answered (or failed): the connection may go on or close."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class _Gone:
    """The host of a lost connection's queue: what the queue reports after the loss changes
    nothing (the connection's own ``request_done`` returns at once without a transport)."""

    def request_done(self, exchange: Exchange) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


_GONE = _Gone()


class RequestQueue:
    """The requests of one connection (module docstring)."""

    __slots__ = ("_host", "_loop", "_pipeline", "_response", "_waiting", "active", "task")

    def __init__(
        self,
        host: QueueHost,
        pipeline: Pipeline,
        loop: asyncio.AbstractEventLoop,
        response: ResponseWriter,
    ) -> None:
        self._host = host
        self._pipeline = pipeline
        self._loop = loop
        self._response = response
        #: The exchange being handled, and its task.
        self.active: Exchange | None = None
        self.task: asyncio.Task[None] | None = None
        self._waiting: deque[Exchange] = deque()

    @property
    def busy(self) -> bool:
        return self.active is not None or bool(self._waiting)

    def __iter__(self) -> Iterator[Exchange]:
        """The exchange being handled (if any), then those waiting."""
        if self.active is not None:
            yield self.active
        yield from self._waiting

    def push(self, exchange: Exchange) -> None:
        """Handle ``exchange`` now if nothing is in progress, else after those before it."""
        exchange.scheduled = True
        if self.active is None:
            if exchange.body is not None:
                self._start(exchange)
                return
            # ``_start`` for a bodiless request (no 100 Continue), written out: per request.
            self.active = exchange
            self._response.begin(exchange)
            self.task = self._loop.create_task(
                self._pipeline.handle(exchange.request, None, self._response, exchange.lookup, self)
            )
            return
        self._waiting.append(exchange)
        if len(self._waiting) == PIPELINE_DEPTH:
            self._host.pause_reading()

    def start_next(self) -> bool:
        """Start the next waiting request; False when none waits."""
        if not self._waiting:
            return False
        was_full = len(self._waiting) >= PIPELINE_DEPTH
        self._start(self._waiting.popleft())
        if was_full:
            self._host.resume_reading()
        return True

    def drop_waiting(self) -> None:
        """Forget the requests not started (the connection closes after the active one)."""
        self._waiting.clear()

    def cancel(self) -> None:
        """Cancel the active request's task (the client went away, or its deadline passed)."""
        task = self.task
        if task is not None and not task.done():
            task.cancel()

    def release(self) -> None:
        """The connection is lost: cancel the active request, unless it leads a cache fill
        that others wait on or the cache keeps (``edge.cache.coalesce.leads_fill``: it
        finishes, its answer going nowhere), and let go of the connection (a reference cycle
        that would keep it for the cyclic collector)."""
        task = self.task
        if task is not None and not task.done() and not leads_fill(task):
            task.cancel()
        self._host = _GONE

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def _start(self, exchange: Exchange) -> None:
        self.active = exchange
        self._response.begin(exchange)
        if exchange.body is not None and expects_continue(exchange.request.headers):
            self._response.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.task = self._loop.create_task(
            self._pipeline.handle(
                exchange.request, exchange.body, self._response, exchange.lookup, self
            )
        )

    # -- RequestGuard: the end of the active request's task (``Pipeline.handle``) -------------

    def request_failed(self, request: ProxyRequest, exc: Exception) -> None:
        """A bug: answer 500 if we still can, never hang the client."""
        log.error(
            "request_failed",
            error=repr(exc),
            request_id=request.request_id.decode("ascii", "replace"),
        )
        exchange = self.active
        response = self._response
        if exchange is not None and exchange.request is request and not exchange.response_started:
            response.write_complete(
                self._pipeline.error_answer(500, "internal_error", request.request_id),
                close=True,
            )
        else:
            response.abort()

    def request_ended(self, request: ProxyRequest) -> None:
        """Hand the exchange back to the connection (``QueueHost.request_done``)."""
        exchange = self.active
        if exchange is not None and exchange.request is request:
            self.active = None
            self.task = None
            response = self._response
            response.active = None
            response.request_deadline = 0.0
            self._host.request_done(exchange)


__all__ = ["PIPELINE_DEPTH", "QueueHost", "RequestQueue"]
