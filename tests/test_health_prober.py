"""The health monitor against real processes: sample origins, raw sockets, redis-server.

Intervals are short here (200 ms) so the suite stays fast; one test runs at the production
defaults (10 s interval, fall 3, 2 s timeout) and checks the 30 s promise.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest

from meridian.health import Health, HealthMonitor, HealthSnapshot, pop_target
from tests.health_support import (
    ServerProcess,
    blackhole,
    captured_logs,
    free_port,
    make_config,
    origin_command,
    redis_command,
    running_monitor,
    sample,
    server_processes,
    state_of,
    wait_for,
)

FAST = {"interval": "200ms", "fast_interval": "100ms", "timeout": "100ms", "fall": 3, "rise": 2}
#: Scheduling slack on a loaded two-core CI machine.
SLACK = 0.5


@pytest.fixture
def origin() -> Iterator[ServerProcess]:
    with server_processes(origin_command("r"), 1, "origin") as (server,):
        yield server


@pytest.fixture
def origins() -> Iterator[list[ServerProcess]]:
    with server_processes(origin_command("r"), 2, "origin") as servers:
        yield servers


@pytest.fixture
def redis() -> Iterator[ServerProcess]:
    with server_processes(redis_command, 1, "redis") as (server,):
        yield server


@pytest.fixture
def logs() -> Iterator[Any]:
    with captured_logs() as read:
        yield read


def redis_url(server: ServerProcess) -> str:
    return f"redis://127.0.0.1:{server.port}/0"


def redis_connected(monitor: HealthMonitor) -> bool:
    return bool(monitor.status()["redis"]["connected"])


def events(read_logs: Any, name: str, **fields: Any) -> list[dict[str, Any]]:
    return [
        e
        for e in read_logs()
        if e["event"] == name and all(e.get(k) == v for k, v in fields.items())
    ]


async def put_control(server: ServerProcess, body: dict[str, Any]) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.put(f"{server.url}/_control", json=body) as response,
    ):
        assert response.status == 200, await response.text()


# ------------------------------------------------------------------------------------------
# Active checks


async def test_sigkill_leaves_rotation_fast_and_returns_after_rise(
    origins: list[ServerProcess], logs: Any
) -> None:
    dead, alive = origins
    config = make_config({"r": [dead.url, alive.url]}, health=FAST)
    hc = config.health
    async with running_monitor(config, pop="iad") as (monitor, registry):
        await wait_for(
            lambda: state_of(monitor, dead.url) == state_of(monitor, alive.url) == "up",
            5.0,
            "both backends up",
        )

        dead.kill()
        took = await wait_for(lambda: not monitor.snapshot.backend_up(dead.url), 5.0, "down")
        print(
            f"\nSIGKILL -> out of rotation in {took * 1000:.0f} ms "
            f"(interval {hc.interval:g}s, fall {hc.fall})"
        )
        assert took <= hc.fall * hc.interval + hc.timeout + SLACK
        assert monitor.snapshot.usable_backends("r") == (alive.url,)
        assert monitor.snapshot.region_up("r")
        (down,) = events(logs, "target_down", target=dead.url)
        assert down["reason"] == f"{hc.fall} checks failed: connect failed: Connection refused"
        assert down["pop"] == "iad" and down["region"] == "r"
        labels = {"target": dead.url, "region": "r", "pop": "iad"}
        assert sample(registry, "meridian_target_up", labels) == 0.0
        assert sample(registry, "meridian_target_up", {**labels, "target": alive.url}) == 1.0
        to_down = {"target": dead.url, "to": "down"}
        assert sample(registry, "meridian_health_transitions_total", to_down) == 1.0
        checks = sample(registry, "meridian_health_check_seconds_count", {"target": dead.url})
        assert checks is not None and checks >= hc.fall + 1

        await dead.restart()
        took = await wait_for(lambda: monitor.snapshot.backend_up(dead.url), 5.0, "back up")
        print(f"restarted -> back in rotation in {took * 1000:.0f} ms (rise {hc.rise})")
        status = monitor.status()
        assert status["targets"][dead.url]["reason"] == f"{hc.rise} checks passed: status 200"
        assert status["regions"]["r"]["usable_backends"] == [dead.url, alive.url]
        json.dumps(status)  # the admin endpoint serves it as is


async def test_unhealthy_answers_are_failures_with_their_reason(origin: ServerProcess) -> None:
    config = make_config({"r": [origin.url]}, health=FAST)
    async with running_monitor(config) as (monitor, _):
        await wait_for(lambda: state_of(monitor, origin.url) == "up", 5.0, "up")
        failure_modes: list[tuple[dict[str, Any], str]] = [
            ({"healthy": False}, "3 checks failed: status 503"),
            ({"drop": True}, "3 checks failed: closed without answering"),
            ({"delay_ms": 1000}, "3 checks failed: timeout after 0.1s"),
        ]
        for switches, reason in failure_modes:
            await put_control(origin, switches)
            await wait_for(lambda: state_of(monitor, origin.url) == "down", 5.0, str(switches))
            assert monitor.status()["targets"][origin.url]["reason"] == reason
            await put_control(origin, {})
            await wait_for(lambda: state_of(monitor, origin.url) == "up", 5.0, "up again")


async def test_a_blackholed_backend_is_caught_by_the_timeout() -> None:
    async with blackhole() as url:
        config = make_config({"r": [url]}, health=FAST)
        hc = config.health
        started = time.monotonic()
        async with running_monitor(config) as (monitor, _):
            await wait_for(lambda: state_of(monitor, url) == "down", 5.0, "down")
            took = time.monotonic() - started
            print(f"\nblackholed backend down after {took * 1000:.0f} ms")
            # Each of the fall checks had to wait out its whole timeout.
            assert hc.fall * hc.timeout <= took <= hc.fall * hc.interval + hc.timeout + SLACK
            target = monitor.status()["targets"][url]
            assert target["last_error"] == "timeout after 0.1s"
            assert target["consecutive_failures"] >= hc.fall


async def test_tcp_checks_only_see_whether_a_connection_is_accepted() -> None:
    refused = f"http://127.0.0.1:{free_port()}"
    async with blackhole() as hanging:
        config = make_config({"r": [hanging, refused]}, health={**FAST, "kind": "tcp"})
        async with running_monitor(config) as (monitor, _):
            await wait_for(lambda: state_of(monitor, refused) == "down", 5.0, "refused down")
            assert state_of(monitor, hanging) == "up"  # accepting is all a TCP check asks
            reason = monitor.status()["targets"][refused]["last_error"]
            assert reason == "connect failed: Connection refused"


async def test_pop_health_url_decides_pop_up(origin: ServerProcess) -> None:
    config = make_config(
        {"r": ["http://127.0.0.1:9"]},
        pops={"iad": f"{origin.url}/healthz", "gru": None},
        health=FAST,
    )
    options = {"check_backends": False, "check_pops": True}
    async with running_monitor(config, **options) as (monitor, _):
        target = pop_target("iad")
        await wait_for(lambda: state_of(monitor, target) == "up", 5.0, "pop up")
        assert monitor.status()["targets"]["http://127.0.0.1:9"]["last_check"] is None
        await put_control(origin, {"healthy": False})
        await wait_for(lambda: not monitor.snapshot.pop_up("iad"), 5.0, "pop down")
        assert monitor.snapshot.pop_up("gru")  # no health_url: always up
        await put_control(origin, {})
        await wait_for(lambda: monitor.snapshot.pop_up("iad"), 5.0, "pop up again")


async def test_update_config_keeps_state_and_adds_and_removes_targets(
    origin: ServerProcess,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    before = make_config({"r": [origin.url]}, health=FAST)
    async with running_monitor(before) as (monitor, registry):
        await wait_for(lambda: state_of(monitor, origin.url) == "up", 5.0, "up")
        since = monitor.status()["targets"][origin.url]["since"]
        generation = monitor.snapshot.generation

        monitor.update_config(
            make_config({"r": [origin.url, dead], "r2": [origin.url]}, health=FAST)
        )
        assert monitor.snapshot.generation > generation
        assert monitor.status()["targets"][origin.url]["since"] == since  # state kept
        assert monitor.snapshot.usable_backends("r2") == (origin.url,)
        await wait_for(lambda: state_of(monitor, dead) == "down", 5.0, "new target checked")
        labels = {"target": dead, "region": "r", "pop": ""}
        assert sample(registry, "meridian_target_up", labels) == 0.0

        monitor.update_config(before)
        assert dead not in monitor.status()["targets"]
        assert sample(registry, "meridian_target_up", labels) is None
        assert "r2" not in monitor.status()["regions"]
        assert state_of(monitor, origin.url) == "up"


# ------------------------------------------------------------------------------------------
# Passive detection


async def test_passive_failures_eject_at_once_and_checks_bring_it_back(
    origin: ServerProcess, logs: Any
) -> None:
    config = make_config({"r": [origin.url]}, health=FAST, outlier={"base_ejection": "500ms"})
    async with running_monitor(config) as (monitor, registry):
        await wait_for(lambda: state_of(monitor, origin.url) == "up", 5.0, "up")
        published: list[HealthSnapshot] = []
        monitor.subscribe(published.append)

        for _ in range(4):
            monitor.report(origin.url, False)
        assert monitor.snapshot.backend_up(origin.url)
        monitor.report(origin.url, False)
        ejected_at = time.monotonic()
        # Synchronous: the very next read of the snapshot has it out.
        assert not monitor.snapshot.backend_up(origin.url)
        assert published and not published[-1].backend_up(origin.url)
        assert not monitor.snapshot.region_up("r")
        # A one-backend pool in panic mode still has someone to send to.
        assert monitor.snapshot.usable_backends("r") == (origin.url,)
        ejections = sample(registry, "meridian_outlier_ejections_total", {"target": origin.url})
        assert ejections == 1.0
        (logged,) = events(logs, "target_ejected", target=origin.url)
        assert logged["ejection_seconds"] == 0.5

        await wait_for(lambda: monitor.snapshot.backend_up(origin.url), 5.0, "returned")
        took = time.monotonic() - ejected_at
        print(f"\nejected for 0.5 s, back in rotation after {took * 1000:.0f} ms")
        assert 0.5 <= took <= 0.5 + config.health.fast_interval * 1.1 + SLACK
        assert monitor.status()["targets"][origin.url]["reason"].startswith("ejection over")


async def test_passive_detection_under_traffic_with_retries(
    origins: list[ServerProcess],
) -> None:
    """A small client in front of two origins: each request goes to a usable backend, is
    reported, and is retried once on the other.  SIGKILL one origin mid-traffic."""
    dead, alive = origins
    # Slow active checks, so that what takes the dead origin out is the live traffic.
    config = make_config({"r": [dead.url, alive.url]}, health={"interval": "10s"})
    attempts = failed_gets = 0
    stop = asyncio.Event()

    async def client(monitor: HealthMonitor, session: aiohttp.ClientSession, n: int) -> None:
        nonlocal attempts, failed_gets
        while not stop.is_set():
            usable = monitor.snapshot.usable_backends("r")
            tries = [usable[(n + i) % len(usable)] for i in range(min(2, len(usable)))]
            n += 1
            for url in tries:
                attempts += 1
                try:
                    async with session.get(f"{url}/api/v1/symbols") as response:
                        await response.read()
                        ok = response.status < 500
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                monitor.report(url, ok)
                if ok:
                    break
            else:
                failed_gets += 1

    timeout = aiohttp.ClientTimeout(total=1.0)
    async with (
        running_monitor(config) as (monitor, _),
        aiohttp.ClientSession(timeout=timeout) as session,
    ):
        await wait_for(lambda: state_of(monitor, dead.url) == "up", 5.0, "up")
        workers = [asyncio.create_task(client(monitor, session, n)) for n in range(4)]
        try:
            await wait_for(lambda: attempts > 100, 5.0, "traffic flowing")
            dead.kill()
            took = await wait_for(lambda: not monitor.snapshot.backend_up(dead.url), 5.0, "ejected")
            seen = attempts
            await wait_for(lambda: attempts > seen + 100, 5.0, "more traffic")
        finally:
            stop.set()
            await asyncio.gather(*workers)
    print(
        f"\npassive: SIGKILL -> ejected in {took * 1000:.0f} ms under traffic, "
        f"{attempts} attempts, {failed_gets} failed client GETs"
    )
    assert took <= 1.0
    assert failed_gets == 0
    assert state_of(monitor, dead.url) == Health.EJECTED


# ------------------------------------------------------------------------------------------
# Sharing through Redis


async def test_instances_of_a_pop_share_transitions_through_redis(
    redis: ServerProcess, origin: ServerProcess
) -> None:
    """A probes the origin; B probes nothing and learns everything from A (and vice versa)."""
    config = make_config({"r": [origin.url]}, health=FAST, outlier={"base_ejection": "30s"})
    shared = {"pop": "iad", "redis_url": redis_url(redis)}
    async with (
        running_monitor(config, **shared) as (a, a_registry),
        running_monitor(config, check_backends=False, **shared) as (b, b_registry),
    ):
        channel = {"channel": "meridian:health:iad"}
        for monitor in (a, b):
            await wait_for(functools.partial(redis_connected, monitor), 5.0, "connected")
        for registry in (a_registry, b_registry):
            assert sample(registry, "meridian_health_redis_connected", channel) == 1.0
        await wait_for(lambda: state_of(a, origin.url) == "up", 5.0, "A sees it up")

        went_down: dict[str, float] = {}

        def watch(name: str) -> Callable[[HealthSnapshot], None]:
            def record(snapshot: HealthSnapshot) -> None:
                if not snapshot.backend_up(origin.url):
                    went_down.setdefault(name, time.monotonic())

            return record

        a.subscribe(watch("a"))
        b.subscribe(watch("b"))
        origin.kill()
        await wait_for(lambda: len(went_down) == 2, 5.0, "A sees it down, and B follows")
        lag = went_down["b"] - went_down["a"]
        print(f"\npeer transition applied {lag * 1000:.1f} ms after the local one")
        assert 0.0 <= lag < 1.0
        assert b.status()["targets"][origin.url]["reason"].startswith("peer ")

        await origin.restart()
        await wait_for(lambda: b.snapshot.backend_up(origin.url), 5.0, "B sees it back")

        # And the other way: B's live traffic ejects, A follows at once.
        for _ in range(5):
            b.report(origin.url, False)
        await wait_for(lambda: state_of(a, origin.url) == "ejected", 2.0, "A follows B")
        assert a.status()["targets"][origin.url]["ejected_for"] > 25.0
        # Only the instance that saw the failures counts an ejection.
        ejected = {"target": origin.url}
        assert sample(b_registry, "meridian_outlier_ejections_total", ejected) == 1.0
        assert sample(a_registry, "meridian_outlier_ejections_total", ejected) is None


async def test_redis_unreachable_from_the_start_changes_nothing_but_a_gauge(logs: Any) -> None:
    url = "http://127.0.0.1:9"
    config = make_config({"r": [url, "http://127.0.0.1:10"]})
    options = {"check_backends": False, "redis_url": f"redis://127.0.0.1:{free_port()}/0"}
    async with running_monitor(config, **options) as (monitor, registry):
        await wait_for(lambda: monitor.status()["redis"]["failed_attempts"] >= 2, 5.0, "retries")
        gauge = sample(
            registry, "meridian_health_redis_connected", {"channel": "meridian:health:all"}
        )
        assert gauge == 0.0
        assert len(events(logs, "health_redis_unavailable")) == 1  # said once, not per retry
        for _ in range(5):
            monitor.report(url, False)
        assert not monitor.snapshot.backend_up(url)


async def test_redis_dying_and_coming_back(redis: ServerProcess, logs: Any) -> None:
    url = "http://127.0.0.1:9"
    config = make_config({"r": [url, "http://127.0.0.1:10"]})
    options = {"check_backends": False, "pop": "iad", "redis_url": redis_url(redis)}
    async with running_monitor(config, **options) as (monitor, _):
        await wait_for(lambda: redis_connected(monitor), 5.0, "connected")
        redis.kill()
        took = await wait_for(lambda: not redis_connected(monitor), 5.0, "lost")
        print(f"\nredis loss noticed in {took * 1000:.0f} ms")
        for _ in range(5):
            monitor.report(url, False)
        assert not monitor.snapshot.backend_up(url)  # the local view goes on

        await redis.restart()
        await wait_for(lambda: redis_connected(monitor), 10.0, "reconnected")
        assert len(events(logs, "health_redis_unavailable")) == 1
        assert len(events(logs, "health_redis_connected")) == 2


# ------------------------------------------------------------------------------------------
# The promise at production settings


@pytest.mark.slow
async def test_sigkill_at_default_settings_is_out_of_rotation_within_30s(
    origins: list[ServerProcess],
) -> None:
    dead, alive = origins
    config = make_config({"r": [dead.url, alive.url]})  # interval 10 s, fall 3, timeout 2 s
    hc = config.health
    assert (hc.interval, hc.fall, hc.timeout) == (10.0, 3, 2.0)
    async with running_monitor(config) as (monitor, _):
        await wait_for(lambda: state_of(monitor, dead.url) == "up", 5.0, "first check")
        # Kill right after a passed check: the worst phase, a whole interval until the next.
        dead.kill()
        took = await wait_for(
            lambda: monitor.snapshot.usable_backends("r") == (alive.url,), 31.0, "out"
        )
        print(f"\ndefaults: SIGKILL -> out of rotation in {took:.1f} s (promise: 30 s)")
        assert took <= 30.0
        assert not monitor.snapshot.backend_up(dead.url)
