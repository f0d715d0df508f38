"""The stream service's Prometheus families, built from plain numbers on scrape."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from itertools import accumulate

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from edge.streams.stats import LAG_BUCKETS, StreamStats

_PREFIX = "meridian_edge_stream_"


class StreamMetrics(Collector):
    def __init__(
        self,
        stats: StreamStats,
        *,
        channels: Callable[[], int],
        connected: Mapping[str, str],
        made: Mapping[str, int],
        moves: Mapping[str, int],
    ) -> None:
        self.stats = stats
        self.channels = channels
        #: Channel -> region of its upstream subscription; subscriptions made by region.
        self.connected = connected
        self.made = made
        #: Subscriptions moved to another region while connected, by reason.
        self.moves = moves

    def collect(self) -> Iterable[Metric]:
        stats = self.stats
        yield GaugeMetricFamily(_PREFIX + "clients", "Open stream sessions.", value=stats.clients)
        yield GaugeMetricFamily(
            _PREFIX + "channels",
            "Channels open at this worker (lingering ones included).",
            value=self.channels(),
        )
        upstream = GaugeMetricFamily(
            _PREFIX + "upstream_subscriptions",
            "Upstream subscriptions connected now, by region.",
            labels=("region",),
        )
        regions: dict[str, int] = {}
        for region in self.connected.values():
            regions[region] = regions.get(region, 0) + 1
        for region, count in sorted(regions.items()):
            upstream.add_metric((region,), count)
        yield upstream
        made = CounterMetricFamily(
            _PREFIX + "upstream_subscribes",
            "Upstream subscriptions made, by region.",
            labels=("region",),
        )
        for region, count in sorted(self.made.items()):
            made.add_metric((region,), count)
        yield made
        moves = CounterMetricFamily(
            _PREFIX + "upstream_moves",
            "Upstream subscriptions moved to another region while connected, by reason"
            " (backend_down, nearer_region_back).",
            labels=("reason",),
        )
        for reason, count in sorted(self.moves.items()):
            moves.add_metric((reason,), count)
        yield moves
        for name, doc, value in (
            ("messages_in", "Upstream messages received.", stats.messages_in),
            ("messages_out", "Frames written to clients.", stats.messages_out),
            ("bytes_out", "Bytes of frames written to clients.", stats.bytes_out),
            ("conflated", "Queued messages replaced by a newer one (conflate).", stats.conflated),
            ("dropped", "Queued frames dropped with a client closed as too slow.", stats.dropped),
            ("duplicates", "Upstream messages at or below the last sequence.", stats.duplicates),
            ("invalid", "Upstream messages that broke the protocol.", stats.invalid),
            ("snapshots", "Snapshots sent to clients.", stats.snapshots),
            (
                "compressed",
                "Messages compressed for permessage-deflate clients (once for all of them).",
                stats.compressed,
            ),
        ):
            yield CounterMetricFamily(_PREFIX + name, doc, value=value)
        for name, doc, table in (
            ("disconnected", "Clients closed by the edge, by reason.", stats.disconnected),
            ("resyncs", "Resync frames sent to clients, by reason.", stats.resyncs),
        ):
            family = CounterMetricFamily(_PREFIX + name, doc, labels=("reason",))
            for reason, count in sorted(table.items()):
                family.add_metric((reason,), count)
            yield family
        for name, doc, counts, total in (
            (
                "delivery_lag_seconds",
                "Origin timestamp to the write of the frame to the client's socket.",
                stats.lag_counts,
                stats.lag_sum,
            ),
            (
                "arrival_lag_seconds",
                "Origin timestamp to the message's arrival at the edge (the upstream's share).",
                stats.arrival_counts,
                stats.arrival_sum,
            ),
        ):
            cumulative = list(accumulate(counts))
            buckets = [(str(b), c) for b, c in zip(LAG_BUCKETS, cumulative, strict=False)]
            buckets.append(("+Inf", cumulative[-1]))
            yield HistogramMetricFamily(_PREFIX + name, doc, buckets=buckets, sum_value=total)

    def describe(self) -> Iterable[Metric]:
        return []
