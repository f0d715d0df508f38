"""One client's side of the fan-out: direct writes while its socket keeps up, a bounded queue
of frames when it does not, and the channel's slow-consumer policy when that fills.

No I/O: ``write`` is the transport's ``write`` (or a test's list append), ``paused`` follows
the transport's ``pause_writing``/``resume_writing``.  While the socket keeps up a message costs
one ``write`` of the shared frame bytes; with a ``WriteBatch`` the fan-out costs no work per
subscriber until the end of the event-loop iteration, and the frames a client is sent during
one iteration (channels that ticked together, a backlog) go out in one write, one system call
instead of one per frame.  Once the transport's buffer passes its high-water mark frames wait
here, at most ``limit`` bytes of them:

* ``conflate``: a channel has at most one frame waiting; a newer message replaces it in place
  (the latest value is what a ticker or book subscriber needs) and the skipped one is counted;
* ``disconnect``: every frame waits; past ``limit`` the client is closed with 1008 and a reason
  naming the channel, so a trades subscriber never loses a message silently.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from edge.streams.frames import EVENTS, PLAIN
from edge.streams.stats import StreamStats


class Channel(Protocol):
    """A channel as a queue sees it (``edge.streams.hub.Channel``)."""

    @property
    def name(self) -> str: ...

    @property
    def conflate(self) -> bool: ...


C = TypeVar("C", bound=Channel)


#: Bytes a batch may gather before it is written at once (a burst, such as a replay after
#: failover, is then written as it comes: the socket's flow control and the send queue bound
#: it, not the batch): the frames fanned out in one iteration, and each client's own frames.
BATCH_BYTES = 16 * 1024


class WriteBatch:
    """What the fan-out and the clients' own frames produce during one event-loop iteration,
    written at its end as one write per client.  ``defer`` schedules the flush
    (``loop.call_soon``: it runs before the next iteration's I/O callbacks).

    A fan-out is recorded once, as (frame, timestamp, channel, its subscribers): nothing is
    done per subscriber until the flush.  The flush of an iteration that fanned out one
    message (channels tick at their own instants: the usual case) is one tight loop of
    writes of the shared bytes; one that fanned out several (channels ticking together, a
    backlog after a stall) gathers each client's frames, in order, into one write, so a
    client on K channels costs one system call per iteration instead of K.  Every
    subscriber of one hub shares its service's batch."""

    __slots__ = ("defer", "dirty", "fanout_bytes", "fanouts", "scheduled")

    def __init__(self, defer: Callable[[Callable[[], None]], object]) -> None:
        self.defer = defer
        #: Subscribers with frames of their own (``Subscriber.out``) this iteration.
        self.dirty: list[Subscriber[Any]] = []
        #: Messages fanned out this iteration, oldest first, and their frames' bytes.
        self.fanouts: list[tuple[bytes, float, Any, tuple[Subscriber[Any], ...]]] = []
        self.fanout_bytes = 0
        self.scheduled = False

    def schedule(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            self.defer(self.flush)

    def fan_out(
        self, frame: bytes, ts: float, channel: Any, subscribers: tuple[Subscriber[Any], ...]
    ) -> None:
        """``frame`` for each of ``subscribers`` (a snapshot of the channel's group), written
        (or queued by each one's flow control and policy) at the flush."""
        self.fanouts.append((frame, ts, channel, subscribers))
        self.fanout_bytes += len(frame)
        if self.fanout_bytes >= BATCH_BYTES:
            self.flush()
        else:
            self.schedule()

    def flush(self) -> None:
        self.scheduled = False
        dirty, self.dirty = self.dirty, []
        fanouts, self.fanouts = self.fanouts, []
        self.fanout_bytes = 0
        if not fanouts:
            for sub in dirty:
                sub.flush()
        elif len(fanouts) == 1 and not dirty:
            write_to_each(*fanouts[0])
        else:
            _write_gathered(dirty, fanouts)


def write_to_each(
    frame: bytes, ts: float, channel: Any, subscribers: tuple[Subscriber[Any], ...]
) -> None:
    """One message to each of its subscribers: the same bytes, one write each (a closed
    subscriber is paused: ``enqueue`` drops the frame)."""
    written = 0
    for sub in subscribers:
        if sub.paused or sub.queue:
            sub.enqueue(frame, ts, channel)
        else:
            sub.write(frame)
            written += 1
    if written:
        subscribers[0].stats.delivered(len(frame), ts, written)


def _write_gathered(
    dirty: list[Subscriber[Any]],
    fanouts: list[tuple[bytes, float, Any, tuple[Subscriber[Any], ...]]],
) -> None:
    """Several messages (and clients' own frames): each client's, in the order they were
    made, gathered in its ``out`` and written in one write.  A client's own frames always
    precede the iteration's fan-outs (``Subscriber.send`` flushes the fan-outs first)."""
    touched = dirty
    for frame, ts, channel, subscribers in fanouts:
        written = 0
        for sub in subscribers:
            if sub.paused or sub.queue:
                sub.enqueue(frame, ts, channel)
                continue
            out = sub.out
            if not out:
                touched.append(sub)
            out.append(frame)
            written += 1
        if written:
            subscribers[0].stats.delivered(len(frame), ts, written)
    for sub in touched:
        out = sub.out
        if not out:
            continue  # written already (its own frames reached ``BATCH_BYTES``) or closed
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        sub.out_bytes = 0
        if not sub.closed:
            sub.write(data)


class Pending(Generic[C]):
    """A frame waiting in a client's queue (``channel`` set when it may be conflated)."""

    __slots__ = ("channel", "frame", "ts")

    def __init__(self, frame: bytes, ts: float, channel: C | None) -> None:
        self.frame = frame
        self.ts = ts
        self.channel = channel


class Subscriber(Generic[C]):
    """One client connection's subscriptions and send queue."""

    __slots__ = (
        "batch",
        "channels",
        "closed",
        "ip",
        "kind",
        "limit",
        "on_close",
        "out",
        "out_bytes",
        "paused",
        "queue",
        "queued",
        "slots",
        "stats",
        "write",
    )

    def __init__(
        self,
        write: Callable[[bytes], object],
        on_close: Callable[[int, str], None],
        ip: str,
        limit: int,
        stats: StreamStats,
        *,
        kind: int = PLAIN,
        batch: WriteBatch | None = None,
    ) -> None:
        self.write = write
        #: Where frames wait for the end of the loop iteration (None: written at once).
        self.batch = batch
        #: Frames pushed this iteration (in ``batch.dirty`` while not empty), and their bytes.
        self.out: list[bytes] = []
        self.out_bytes = 0
        #: What it is sent (``edge.streams.frames``: PLAIN, DEFLATE or EVENTS).
        self.kind = kind
        #: Called once when the policy closes the client (code, reason): the session writes
        #: the close frame and ends the connection.
        self.on_close = on_close
        self.ip = ip
        self.limit = limit
        self.stats = stats
        self.paused = False
        self.closed = False
        self.queue: deque[Pending[C]] = deque()
        self.queued = 0
        #: Conflatable frames waiting, by channel.
        self.slots: dict[C, Pending[C]] = {}
        #: Channel name -> the channel, for every subscription (live, waiting or pending).
        self.channels: dict[str, C] = {}

    @property
    def sse(self) -> bool:
        return self.kind == EVENTS

    def push(self, frame: bytes) -> None:
        """A frame of this client's own the socket can take now: written, or batched for the
        iteration's end."""
        batch = self.batch
        if batch is None:
            self.write(frame)
            return
        out = self.out
        if not out:
            batch.dirty.append(self)
            batch.schedule()
        out.append(frame)
        self.out_bytes += len(frame)
        if self.out_bytes >= BATCH_BYTES:
            self.flush()  # stays in ``dirty``: the iteration's flush finds nothing

    def flush(self) -> None:
        """Writes what this iteration gathered, in one write."""
        out = self.out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self.out_bytes = 0
        if not self.closed:
            self.write(data)

    def send(self, frame: bytes, ts: float = 0.0) -> None:
        """A frame for this client alone (acknowledgements, replay, resync); never conflated.
        What was fanned out earlier in the iteration is written (or queued) first, so the
        client gets everything in the order it was made."""
        batch = self.batch
        if batch is not None and batch.fanouts:
            batch.flush()
        if not self.paused and not self.queue:
            self.push(frame)
            self.stats.delivered(len(frame), ts)
        else:
            self.enqueue(frame, ts, None)

    def enqueue(self, frame: bytes, ts: float, channel: C | None) -> None:
        """Queue a frame the socket cannot take now; past the bound, the client is closed."""
        if self.closed:
            return
        if channel is not None and channel.conflate:
            slot = self.slots.get(channel)
            if slot is not None:
                self.queued += len(frame) - len(slot.frame)
                slot.frame, slot.ts = frame, ts
                self.stats.conflated += 1
            else:
                slot = self.slots[channel] = Pending(frame, ts, channel)
                self.queue.append(slot)
                self.queued += len(frame)
        else:
            self.queue.append(Pending(frame, ts, None))
            self.queued += len(frame)
        if self.queued > self.limit:
            self.close_slow(channel.name if channel is not None else "-")

    def resume(self) -> None:
        """The socket drained below its low-water mark: write what waits while it takes it."""
        self.paused = False
        queue, stats = self.queue, self.stats
        while queue and not self.paused and not self.closed:
            item = queue.popleft()
            self.queued -= len(item.frame)
            if item.channel is not None:
                self.slots.pop(item.channel, None)
            self.write(item.frame)
            stats.delivered(len(item.frame), item.ts)

    def close_slow(self, channel: str) -> None:
        """The queue passed its bound: close the client, saying why."""
        self.stats.disconnected["slow_consumer"] += 1
        self.stats.dropped += len(self.queue)
        self.on_close(1008, f"slow consumer: send queue full on {channel}")

    def mark_closed(self) -> None:
        """No frame is written or queued any more (``paused`` sends fan-out to ``enqueue``,
        which drops it)."""
        self.closed = True
        self.paused = True
        self.drop_queue()
        self.out.clear()
        self.out_bytes = 0

    def drop_queue(self) -> None:
        self.queue.clear()
        self.slots.clear()
        self.queued = 0
