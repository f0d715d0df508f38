"""Process lifecycle: SIGHUP reload under load, a rejected reload, SIGTERM drain, workers."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import threading

import aiohttp
import pytest

from tests.edge_support import (
    LOCATIONS,
    Edge,
    Origin,
    http_request,
    poll_until,
    processes,
    region,
    write_config,
)


def _regions(origin: Origin) -> dict:
    return {"eu-central": region(*LOCATIONS["eu-central"], [origin.url], "eu")}


async def test_sighup_under_steady_load_reloads_without_a_failed_request(tmp_path):
    with processes() as procs:
        origin = Origin("eu-central", tmp_path, echo=True)
        procs.append(origin)
        origin.ready()
        config = write_config(tmp_path / "edge.yaml", _regions(origin))
        edge = Edge(config, "fra", tmp_path)
        procs.append(edge)
        edge.ready()
        failures: list[str] = []
        done = 0
        stop = asyncio.Event()

        async def client(session: aiohttp.ClientSession) -> None:
            nonlocal done
            while not stop.is_set():
                try:
                    async with session.get(f"{edge.base}/echo") as response:
                        await response.read()
                        if response.status != 200:
                            failures.append(str(response.status))
                        done += 1
                except aiohttp.ClientError as exc:
                    failures.append(repr(exc))

        async with aiohttp.ClientSession() as session:
            clients = [asyncio.create_task(client(session)) for _ in range(4)]
            for generation in (2, 3, 4):
                served = done  # each reload lands in the middle of a steady stream
                await asyncio.to_thread(poll_until, lambda: done > served + 20)  # noqa: B023
                routes = [
                    {"name": f"v{generation}", "service": "market", "path_prefix": "/v/"},
                    {"name": "api", "service": "market", "path_prefix": "/"},
                ]
                write_config(config, _regions(origin), edge={"routes": routes})
                edge.signal(signal.SIGHUP)
                await asyncio.to_thread(
                    edge.wait_for_log, rf"event=config_reloaded .*generation={generation}"
                )
            # A broken file is rejected in one line and the running config keeps serving.
            config.write_text("regions: [this is not a mapping\n")
            edge.signal(signal.SIGHUP)
            await asyncio.to_thread(edge.wait_for_log, r"event=config_reload_rejected")
            served = done
            await asyncio.to_thread(poll_until, lambda: done > served + 50)
            stop.set()
            await asyncio.gather(*clients)
        assert failures == []
        assert done > 110
        status = await asyncio.to_thread(edge.status)
        assert status["config"]["generation"] == 4
        assert status["routes"][0]["route"] == "v4"


def test_sigterm_drains_a_slow_in_flight_request_then_exits_0(tmp_path):
    with processes() as procs:
        origin = Origin("eu-central", tmp_path)  # the sample origin, slowed by /_control
        procs.append(origin)
        origin.ready()
        config = write_config(
            tmp_path / "edge.yaml", _regions(origin), edge={"drain_timeout": "10s"}
        )
        edge = Edge(config, "fra", tmp_path)
        procs.append(edge)
        edge.ready()
        origin.control({"delay_ms": 1500})
        result: dict[str, object] = {}

        def slow_request() -> None:
            result["response"] = http_request(edge.port, "GET", "/api/v1/whoami", timeout=10)

        thread = threading.Thread(target=slow_request)
        thread.start()
        poll_until(lambda: origin.control()["requests"]["in_flight"] == 1)
        edge.signal(signal.SIGTERM)
        edge.wait_for_log(r"event=edge_draining")
        # No longer accepting: new connections are refused while the old request finishes.
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", edge.port)) != 0
        thread.join(timeout=10)
        status, headers, body = result["response"]  # type: ignore[misc]
        assert status == 200 and json.loads(body) == {"region": "eu-central"}
        assert headers["connection"] == "close"
        assert edge.wait(within=10) == 0
        assert re.search(r"event=edge_stopped .*clean=true", edge.log_text())


def test_workers_share_the_port_and_a_dead_worker_is_restarted(tmp_path):
    with processes() as procs:
        origin = Origin("eu-central", tmp_path, echo=True)
        procs.append(origin)
        origin.ready()
        config = write_config(tmp_path / "edge.yaml", _regions(origin))
        edge = Edge(config, "fra", tmp_path, workers=2)
        procs.append(edge)
        pids = poll_until(
            lambda: (
                set(re.findall(r"edge_listening .*pid=(\d+)", edge.log_text()))
                if len(re.findall(r"edge_listening", edge.log_text())) >= 2
                else None
            )
        )
        victim = int(sorted(pids)[1])
        import os

        os.kill(victim, signal.SIGKILL)
        edge.wait_for_log(rf"event=worker_exited child=edge/\d .*pid={victim}")
        poll_until(lambda: len(re.findall(r"event=edge_listening", edge.log_text())) >= 3)
        for _ in range(20):
            assert http_request(edge.port, "GET", "/echo")[0] == 200
        assert edge.admin("/readyz")[0] in (200, 503)
        edge.signal(signal.SIGTERM)
        assert edge.wait(within=15) == 0


@pytest.mark.parametrize("bad", ["--pop nowhere"])
def test_an_unknown_pop_fails_at_start(tmp_path, bad):
    with processes() as procs:
        config = write_config(
            tmp_path / "edge.yaml",
            {"eu-central": region(*LOCATIONS["eu-central"], ["http://127.0.0.1:1"])},
        )
        edge = Edge(config, bad.split()[1], tmp_path)
        procs.append(edge)
        assert edge.wait(within=15) == 2
        assert "config_invalid" in edge.log_text()


def test_the_access_log_switches_off_and_on_with_a_reload(tmp_path):
    with processes() as procs:
        origin = Origin("eu-central", tmp_path, echo=True)
        procs.append(origin)
        origin.ready()
        config = write_config(tmp_path / "edge.yaml", _regions(origin), edge={"access_log": False})
        edge = Edge(config, "fra", tmp_path)
        procs.append(edge)
        edge.ready()

        def access_lines(path: str) -> int:
            return sum(
                "event=access" in line and f"path={path} " in line
                for line in edge.log_text().splitlines()
            )

        assert http_request(edge.port, "GET", "/echo/quiet")[0] == 200
        write_config(config, _regions(origin), edge={"access_log": True})
        edge.signal(signal.SIGHUP)
        edge.wait_for_log(r"event=config_reloaded .*generation=2")
        assert http_request(edge.port, "GET", "/echo/logged")[0] == 200
        poll_until(lambda: access_lines("/echo/logged") == 1 or None)
        assert access_lines("/echo/quiet") == 0
        assert edge.metric("meridian_edge_requests_total", route="api", status="200") >= 2
