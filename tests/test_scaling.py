"""Scaling signals (issue 18): cgroup limits read from fake hierarchies, utilisation and the
scale hint on an injected clock, and the gauges they export."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from edge.scaling import HEADROOM, Limits, ScalingSignals, read_limits, resident_bytes, scale_hint

GIB = 1 << 30


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return root


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    return _tree(tmp_path / "proc", {"meminfo": "MemTotal:       16777216 kB\nMemFree: 1 kB"})


def test_cgroup_v2_quota_and_memory_limit(tmp_path: Path, proc: Path) -> None:
    root = _tree(tmp_path / "v2", {"cpu.max": "50000 100000", "memory.max": str(GIB)})
    limits = read_limits(root, proc)
    assert (limits.cpu_cores, limits.memory_bytes, limits.source) == (0.5, GIB, "cgroup v2")


def test_cgroup_v2_without_limits_falls_back_to_the_host(tmp_path: Path, proc: Path) -> None:
    root = _tree(tmp_path / "v2", {"cpu.max": "max 100000", "memory.max": "max"})
    limits = read_limits(root, proc)
    assert limits.cpu_cores == len(os.sched_getaffinity(0))
    assert limits.memory_bytes == 16 * GIB and limits.source == "cgroup v2"


def test_cgroup_v1_and_its_unlimited_marker(tmp_path: Path, proc: Path) -> None:
    root = _tree(
        tmp_path / "v1",
        {
            "cpu/cpu.cfs_quota_us": "-1",
            "cpu/cpu.cfs_period_us": "100000",
            "memory/memory.limit_in_bytes": "9223372036854771712",
        },
    )
    limits = read_limits(root, proc)
    assert limits.source == "cgroup v1"
    assert limits.cpu_cores == len(os.sched_getaffinity(0)) and limits.memory_bytes == 16 * GIB
    _tree(root, {"cpu/cpu.cfs_quota_us": "100000", "memory/memory.limit_in_bytes": str(GIB)})
    limits = read_limits(root, proc)
    assert (min(1.0, limits.cpu_cores), limits.memory_bytes) == (1.0, GIB)


def test_no_cgroup_at_all_is_the_host(tmp_path: Path, proc: Path) -> None:
    limits = read_limits(tmp_path / "none", proc)
    assert limits.source == "host" and limits.memory_bytes == 16 * GIB


def test_resident_memory_of_this_process_is_plausible() -> None:
    assert 10 * 1024 * 1024 < resident_bytes() < 8 * GIB


def test_scale_hint_is_the_scarcest_resource_times_headroom() -> None:
    assert scale_hint(0.4, 0.1, 0.5) == pytest.approx(0.4 * HEADROOM)
    assert scale_hint(0.2, 0.7, None) == pytest.approx(0.7 * HEADROOM)
    # Latency target missed while CPU looks idle (a slow origin): at least one full instance.
    assert scale_hint(0.1, 0.1, 2.0) == pytest.approx(1.0 * HEADROOM)
    assert scale_hint(0.0, 0.0, None) == 0.0


def test_signals_over_a_window_on_an_injected_clock() -> None:
    now = [0.0]
    cpu = [0.0]
    p99: list[float | None] = [0.01]
    signals = ScalingSignals(
        clock=lambda: now[0],
        limits=Limits(cpu_cores=2.0, memory_bytes=4 * GIB, source="cgroup v2"),
        cpu=lambda: cpu[0],
        memory=lambda: GIB,
        queue_depth=lambda: 7,
        p99=lambda: p99[0],
        latency_target=lambda: 0.05,
    )
    signals.sample()
    # 1.5 CPU seconds per second, against a 2-core limit, for a minute.
    for _ in range(30):
        now[0] += 2.0
        cpu[0] += 3.0
        signals.sample()
    assert signals.cpu_utilisation == pytest.approx(0.75)
    assert signals.memory_utilisation == 0.25
    assert signals.latency_ratio == pytest.approx(0.2)
    assert signals.scale_hint == pytest.approx(0.75 * HEADROOM)
    status = signals.status()
    assert status["queue_depth"] == 7 and status["scale_hint_instances"] == 2
    # Idle since, but p99 twice the target: the window forgets the busy minute.
    p99[0] = 0.1
    for _ in range(31):
        now[0] += 2.0
        signals.sample()
    assert signals.cpu_utilisation == 0.0
    assert signals.latency_ratio == pytest.approx(2.0)
    assert len(signals._cpu_samples) <= 64

    registry = CollectorRegistry()
    registry.register(signals)
    text = generate_latest(registry).decode()
    assert "meridian_edge_scale_hint 1.5" in text  # p99 over target: one full instance
    assert "meridian_edge_queue_depth 7.0" in text
    assert "meridian_edge_cpu_limit_cores 2.0" in text
