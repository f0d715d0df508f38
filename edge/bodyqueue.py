"""A request body handed from a front end to the upstream request as it arrives.

Both front ends stream request bodies the same way: the protocol ``feed``s chunks, ``finish``es
or ``fail``s the body, and the forward stage iterates it.  What differs is what taking a chunk
releases: for HTTP/1.1 the connection's read pause (``edge.h1parse.StreamedBody``), for HTTP/2
the peer's flow-control window (``edge.h2streams.H2Body``).  Each chunk carries its ``credit``
and the subclass says in ``_taken`` what to do with it.  A leaf module.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

from edge.http1 import RequestRejected


class BodyQueue:
    """Chunks in arrival order, never buffered beyond what the owner lets in."""

    __slots__ = ("_chunks", "_done", "_error", "_waiter", "received")

    def __init__(self) -> None:
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._done = False
        self._error: RequestRejected | None = None
        self._waiter: asyncio.Future[None] | None = None
        #: Bytes received so far (for the body size limit).
        self.received = 0

    @property
    def complete(self) -> bool:
        return self._done

    @property
    def error(self) -> RequestRejected | None:
        return self._error

    def _put(self, data: bytes, credit: int) -> None:
        self.received += len(data)
        self._chunks.append((data, credit))
        self._wake()

    def finish(self) -> None:
        self._done = True
        self._wake()

    def fail(self, error: RequestRejected) -> None:
        if self._done:
            return
        self._error = error
        self._done = True
        self._wake()

    def _taken(self, credit: int) -> None:
        """A chunk with ``credit`` left the queue (to be released by the subclass)."""

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        while True:
            if self._chunks:
                chunk, credit = self._chunks.popleft()
                self._taken(credit)
                if chunk:
                    yield chunk
                continue
            if self._error is not None:
                raise self._error
            if self._done:
                return
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None


__all__ = ["BodyQueue"]
