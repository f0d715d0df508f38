"""What the stages read from the worker: the pipeline, as a protocol (no import of it)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Protocol

from edge.accesslog import AccessLog
from edge.admin import EdgeMetrics
from edge.cache import HttpCache
from edge.exchange import HealthSource
from edge.state import EdgeState
from edge.transcode import Transcoder
from edge.upstream import UpstreamPool


class EdgeServices(Protocol):
    """``edge.pipeline.Pipeline`` as its stages see it."""

    #: Swapped whole on reload; a request reads it once (``Exchange.state``).
    state: EdgeState
    upstream: UpstreamPool
    health: HealthSource
    metrics: EdgeMetrics
    access_log: AccessLog
    clock: Callable[[], float]
    rng: random.Random
    cache: HttpCache | None
    transcoder: Transcoder | None


__all__ = ["EdgeServices"]
