"""Scaling signals: what an autoscaler (or an operator) needs to decide that a POP needs more
edge instances, in ``/metrics`` and ``/status`` (``scaling``).

How each is estimated:

* **CPU utilisation**: this process's CPU seconds (user + system, ``os.times``) per wall second
  over the last minute, divided by the CPU limit in cores: the cgroup's quota
  (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``), else the CPUs this process may
  run on.  1.0 is the whole limit; with ``--workers N`` each worker reports its share, so the
  workers' values add up to the container's.
* **Memory utilisation**: resident memory (``/proc/self/statm``) over the cgroup's memory limit
  (v2 ``memory.max``, v1 ``memory.limit_in_bytes``), else the host's ``MemTotal``.
* **Queue depth**: requests accepted and not yet answered (read when sampled).
* **Latency against target**: the p99 of the last minute over ``edge.latency_target`` (above 1:
  the objective is missed).
* **Scale hint**, the seeds' formula, desired instances = expected load / capacity per instance
  x 1.5: the expected load is the request rate of the last minute; the capacity of an instance
  is that rate divided by the utilisation of its scarcest resource (CPU or memory: linear
  extrapolation to 100% of the limit), so load / capacity is that utilisation.  A missed latency
  target counts as a full instance at least (the instance is saturated in a way CPU may not
  show, e.g. a slow origin holding connections).  Each instance exports its own share; the
  POP's desired instance count is ``ceil(sum(meridian_edge_scale_hint))`` over its instances.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: Headroom of the seeds' formula: run at two thirds of capacity.
HEADROOM = 1.5
#: A cgroup v1 memory limit at or above this means "no limit" (the kernel's PAGE_COUNTER_MAX).
_V1_UNLIMITED = 1 << 62


@dataclass(frozen=True, slots=True)
class Limits:
    cpu_cores: float
    memory_bytes: int
    #: "cgroup v2", "cgroup v1" or "host": where the numbers came from.
    source: str


def read_limits(root: Path = Path("/sys/fs/cgroup"), proc: Path = Path("/proc")) -> Limits:
    """The CPU and memory limits of this process's cgroup, each falling back to the host's."""
    host_cpus = float(len(os.sched_getaffinity(0)))
    host_memory = _host_memory(proc)
    cpu: float | None = None
    memory: int | None = None
    source = "host"
    cpu_max = _read(root / "cpu.max")
    if cpu_max is not None or (root / "memory.max").exists():
        source = "cgroup v2"
        if cpu_max is not None:
            quota, _, period = cpu_max.partition(" ")
            if quota != "max" and period:
                cpu = int(quota) / int(period)
        memory_max = _read(root / "memory.max")
        if memory_max is not None and memory_max != "max":
            memory = int(memory_max)
    else:
        quota_text = _read(root / "cpu" / "cpu.cfs_quota_us")
        period_text = _read(root / "cpu" / "cpu.cfs_period_us")
        limit_text = _read(root / "memory" / "memory.limit_in_bytes")
        if quota_text is not None or limit_text is not None:
            source = "cgroup v1"
        if quota_text is not None and period_text is not None and int(quota_text) > 0:
            cpu = int(quota_text) / int(period_text)
        if limit_text is not None and int(limit_text) < _V1_UNLIMITED:
            memory = int(limit_text)
    return Limits(
        cpu_cores=min(cpu, host_cpus) if cpu is not None else host_cpus,
        memory_bytes=min(memory, host_memory) if memory is not None else host_memory,
        source=source,
    )


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _host_memory(proc: Path) -> int:
    for line in (_read(proc / "meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resident_bytes(proc: Path = Path("/proc")) -> int:
    statm = _read(proc / "self" / "statm")
    return int(statm.split()[1]) * os.sysconf("SC_PAGE_SIZE") if statm else 0


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def scale_hint(cpu: float, memory: float, latency_ratio: float | None) -> float:
    """Desired instances for this instance's load (see the module docstring)."""
    load = max(cpu, memory)
    if latency_ratio is not None and latency_ratio > 1.0:
        load = max(load, 1.0)
    return load * HEADROOM


class ScalingSignals(Collector):
    """Sampled with the status board (``sample``); read by ``/metrics`` and ``/status``."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        limits: Limits,
        cpu: Callable[[], float] = cpu_seconds,
        memory: Callable[[], int] = resident_bytes,
        queue_depth: Callable[[], int],
        p99: Callable[[], float | None],
        latency_target: Callable[[], float],
        window: float = 60.0,
    ) -> None:
        self._clock = clock
        self.limits = limits
        self._cpu = cpu
        self._memory = memory
        self._queue_depth = queue_depth
        self._p99 = p99
        self._latency_target = latency_target
        self._window = window
        self._cpu_samples: deque[tuple[float, float]] = deque(maxlen=64)
        self.cpu_utilisation = 0.0
        self.memory_utilisation = 0.0
        self.memory_bytes = 0
        self.queue_depth = 0
        self.latency_ratio: float | None = None
        self.scale_hint = 0.0

    def sample(self) -> None:
        now = self._clock()
        samples = self._cpu_samples
        samples.append((now, self._cpu()))
        while len(samples) > 2 and samples[1][0] <= now - self._window:
            samples.popleft()
        (first_at, first_cpu), (last_at, last_cpu) = samples[0], samples[-1]
        if last_at > first_at:
            busy = (last_cpu - first_cpu) / (last_at - first_at)
            self.cpu_utilisation = busy / self.limits.cpu_cores
        self.memory_bytes = self._memory()
        self.memory_utilisation = self.memory_bytes / self.limits.memory_bytes
        self.queue_depth = self._queue_depth()
        p99, target = self._p99(), self._latency_target()
        self.latency_ratio = p99 / target if p99 is not None and target > 0 else None
        self.scale_hint = scale_hint(
            self.cpu_utilisation, self.memory_utilisation, self.latency_ratio
        )

    def status(self) -> dict[str, Any]:
        return {
            "cpu_utilisation": round(self.cpu_utilisation, 4),
            "cpu_limit_cores": self.limits.cpu_cores,
            "memory_utilisation": round(self.memory_utilisation, 4),
            "memory_bytes": self.memory_bytes,
            "memory_limit_bytes": self.limits.memory_bytes,
            "limits_from": self.limits.source,
            "queue_depth": self.queue_depth,
            "latency_p99_over_target": (
                None if self.latency_ratio is None else round(self.latency_ratio, 3)
            ),
            "scale_hint": round(self.scale_hint, 3),
            "scale_hint_instances": math.ceil(round(self.scale_hint, 6)),
        }

    def collect(self) -> Iterable[Metric]:
        gauges: list[tuple[str, str, float]] = [
            (
                "meridian_edge_cpu_utilisation",
                "Process CPU over the last minute as a share of the CPU limit (cgroup-aware).",
                self.cpu_utilisation,
            ),
            ("meridian_edge_cpu_limit_cores", "CPU limit in cores.", self.limits.cpu_cores),
            (
                "meridian_edge_memory_utilisation",
                "Resident memory as a share of the memory limit (cgroup-aware).",
                self.memory_utilisation,
            ),
            (
                "meridian_edge_memory_limit_bytes",
                "Memory limit in bytes.",
                float(self.limits.memory_bytes),
            ),
            (
                "meridian_edge_queue_depth",
                "Requests accepted and not yet answered.",
                float(self.queue_depth),
            ),
            (
                "meridian_edge_latency_p99_over_target",
                "p99 latency of the last minute over edge.latency_target (above 1: missed).",
                self.latency_ratio if self.latency_ratio is not None else 0.0,
            ),
            (
                "meridian_edge_scale_hint",
                "Desired instances for this instance's load (utilisation x 1.5); sum over a "
                "POP's instances.",
                self.scale_hint,
            ),
        ]
        for name, documentation, value in gauges:
            yield GaugeMetricFamily(name, documentation, value=value)

    def describe(self) -> Iterable[Metric]:
        return []
