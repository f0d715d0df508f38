"""The stream hub's counters: plain numbers bumped on the fan-out path, turned into Prometheus
families on scrape (``edge.streams.metrics``), as the request path's are."""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable

#: Delivery lag buckets (seconds): origin timestamp -> the write to the client's socket.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class StreamStats:
    __slots__ = (
        "arrival_counts",
        "arrival_sum",
        "bytes_out",
        "clients",
        "compressed",
        "conflated",
        "disconnected",
        "dropped",
        "duplicates",
        "invalid",
        "lag_counts",
        "lag_sum",
        "messages_in",
        "messages_out",
        "now",
        "resyncs",
        "snapshots",
    )

    def __init__(self, now: Callable[[], float]) -> None:
        #: Wall clock (origin timestamps are Unix time).
        self.now = now
        self.clients = 0
        self.messages_in = 0
        self.messages_out = 0
        self.bytes_out = 0
        self.conflated = 0
        #: Frames thrown away with a client closed by the slow-consumer policy.
        self.dropped = 0
        #: Upstream messages at or below the channel's last sequence (a resubscription's
        #: overlap), and upstream messages that were not what the protocol says.
        self.duplicates = 0
        self.invalid = 0
        self.snapshots = 0
        #: Messages compressed for permessage-deflate clients (once each, for all of them).
        self.compressed = 0
        self.disconnected: Counter[str] = Counter()
        self.resyncs: Counter[str] = Counter()
        self.lag_counts = [0] * (len(LAG_BUCKETS) + 1)
        self.lag_sum = 0.0
        #: Origin timestamp -> the message's arrival at the edge (the upstream's share).
        self.arrival_counts = [0] * (len(LAG_BUCKETS) + 1)
        self.arrival_sum = 0.0

    def arrived(self, ts: float) -> None:
        lag = max(0.0, self.now() - ts)
        self.arrival_counts[bisect.bisect_left(LAG_BUCKETS, lag)] += 1
        self.arrival_sum += lag

    def delivered(self, size: int, ts: float, count: int = 1) -> None:
        """``count`` writes of a ``size``-byte frame whose origin timestamp is ``ts`` (0: a
        frame of the edge's own, no lag)."""
        self.messages_out += count
        self.bytes_out += size * count
        if ts:
            lag = max(0.0, self.now() - ts)
            self.lag_counts[bisect.bisect_left(LAG_BUCKETS, lag)] += count
            self.lag_sum += lag * count
