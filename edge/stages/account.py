"""The account stage: metrics and the access line of a request on the slow path.

(The fast path accounts its hits itself, inline: ``stages.hit``.)"""

from __future__ import annotations

from edge.exchange import Exchange
from edge.stages.services import EdgeServices


class Accountant:
    __slots__ = ("services",)

    def __init__(self, services: EdgeServices) -> None:
        self.services = services

    def account(self, exchange: Exchange) -> None:
        services = self.services
        request, record = exchange.request, exchange.record
        total = services.clock() - request.received_at
        services.metrics.observe_request(
            record.route,
            record.status,
            record.cache,
            record.region,
            total,
            exchange.state.config.edge.latency_target,
        )
        access_log = services.access_log
        if access_log.enabled:
            access_log.record_request(
                request.method,
                request.path,
                record.status,
                record.cache,
                record.region,
                record.backend,
                len(record.attempts),
                record.upstream_seconds,
                exchange.sink.bytes_sent,
                total,
                request.request_id,
                request.client_ip,
                request.protocol,
            )


__all__ = ["Accountant"]
