"""``--workers N`` seen from the admin listener: /metrics covers every worker (a ``worker``
label on each sample) and a purge empties every worker's L1, without Redis.

Which worker accepts a connection is the kernel's choice, so the tests choose for it: with
one worker stopped (SIGSTOP), every new connection goes to the other.  Real processes, real
sockets."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meridian.workers import decode_targets, encode_targets, merge_expositions
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

TOKEN = "workers-purge-token"


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Edge, Origin, dict[int, int]]]:
    with processes() as procs:
        origin = Origin("eu-central", tmp_path, echo=True)
        procs.append(origin)
        origin.ready()
        config = write_config(
            tmp_path / "edge.yaml",
            {"eu-central": region(*LOCATIONS["eu-central"], [origin.url], "eu")},
            edge={"cache": {"purge_token": TOKEN}},
        )
        edge = Edge(config, "fra", tmp_path, workers=2)
        procs.append(edge)
        poll_until(lambda: len(re.findall(r"event=edge_listening", edge.log_text())) >= 2)
        pids = poll_until(lambda: _worker_pids(edge))
        yield edge, origin, pids


def _worker_pids(edge: Edge) -> dict[int, int] | None:
    status = edge.status()
    sibling = status.get("workers", {}).get("1", {})
    if not sibling.get("up"):
        return None
    return {0: status["pid"], 1: sibling["pid"]}


@contextlib.contextmanager
def only(pids: dict[int, int], slot: int) -> Iterator[None]:
    """Every other worker stopped: new connections go to worker ``slot``."""
    others = [pid for other, pid in pids.items() if other != slot]
    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)


def _samples(edge: Edge) -> list[tuple[str, dict[str, str], float]]:
    status, text = edge.admin("/metrics")
    assert status == 200
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    ]


def _sum(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(
        value
        for sample, have, value in samples
        if sample == name and all(have.get(k) == v for k, v in labels.items())
    )


def test_metrics_cover_every_worker(world):
    edge, _, pids = world
    with only(pids, 0):
        for _ in range(5):
            assert http_request(edge.port, "GET", "/echo?w0")[0] == 200
    with only(pids, 1):
        for _ in range(7):
            assert http_request(edge.port, "GET", "/echo?w1")[0] == 200
    status, text = edge.admin("/metrics")
    assert status == 200
    # A valid exposition: each family declared once, however many workers report it.
    types = re.findall(r"^# TYPE (\S+) ", text.decode(), re.MULTILINE)
    assert len(types) == len(set(types))
    samples = _samples(edge)
    name = "meridian_edge_requests_total"
    assert _sum(samples, name, worker="0", route="api") == 5
    assert _sum(samples, name, worker="1", route="api") == 7
    assert _sum(samples, "meridian_edge_worker_up", worker="0") == 1
    assert _sum(samples, "meridian_edge_worker_up", worker="1") == 1
    # Every sample says which worker it is from; the process metrics are per worker too.
    assert all("worker" in labels for _, labels, _ in samples)
    assert _sum(samples, "meridian_edge_process_resident_memory_bytes", worker="1") > 0
    # /status lists the other workers as well.
    workers = edge.status()["workers"]
    assert workers["1"]["pid"] == pids[1] and workers["1"]["up"] is True


def test_a_purge_reaches_every_workers_memory_without_redis(world):
    edge, origin, pids = world
    path = "/cc/purged?cc=public,max-age=300"
    for slot in (0, 1):
        with only(pids, slot):
            assert http_request(edge.port, "GET", path)[1]["x-cache"] == "MISS"
            assert http_request(edge.port, "GET", path)[1]["x-cache"] == "HIT"
    samples = _samples(edge)
    assert _sum(samples, "meridian_cache_entries", worker="0") == 1
    assert _sum(samples, "meridian_cache_entries", worker="1") == 1
    assert len(origin.seen_for(path)) == 2  # one fill per worker

    status, answer = edge.purge({"url": f"http://127.0.0.1{path}"}, token=TOKEN)
    assert status == 200, answer
    assert answer["workers"] == {"0": 1, "1": 1}
    assert answer["local"] == 2
    assert answer["unreached"] == []

    samples = _samples(edge)
    assert _sum(samples, "meridian_cache_entries", worker="0") == 0
    assert _sum(samples, "meridian_cache_entries", worker="1") == 0
    for slot in (0, 1):
        with only(pids, slot):
            assert http_request(edge.port, "GET", path)[1]["x-cache"] == "MISS"
    assert len(origin.seen_for(path)) == 4


def test_a_sibling_that_is_down_is_reported_not_fatal(world):
    edge, _, pids = world
    os.kill(pids[1], signal.SIGKILL)
    # Until the supervisor has restarted it, the scrape and the purge still answer.
    status, answer = edge.purge({"prefix": "/cc/"}, token=TOKEN)
    assert status == 200
    assert answer["workers"]["0"] == 0
    assert answer["unreached"] in ([], [1])
    assert edge.admin("/metrics")[0] == 200
    # The restarted worker answers again.
    poll_until(lambda: (p := _worker_pids(edge)) is not None and p[1] != pids[1], within=15)
    assert _sum(_samples(edge), "meridian_edge_worker_up", worker="1") == 1


def test_merged_exposition_keeps_each_family_once():
    one = (
        '# HELP x_total Things.\n# TYPE x_total counter\nx_total{a="1"} 2.0\n'
        "# HELP h Latency.\n# TYPE h histogram\n"
        'h_bucket{le="0.5"} 1.0\nh_bucket{le="+Inf"} 2.0\nh_count 2.0\nh_sum 0.75\n'
    )
    two = '# HELP x_total Things.\n# TYPE x_total counter\nx_total{a="1"} 3.0\n'
    text = merge_expositions({"0": one, "1": two}, {"0": True, "1": True, "2": False}).decode()
    assert text.count("# TYPE x_total counter") == 1
    assert 'x_total{a="1",worker="0"} 2.0' in text
    assert 'x_total{a="1",worker="1"} 3.0' in text
    assert 'h_bucket{le="+Inf",worker="0"} 2.0' in text
    assert 'meridian_edge_worker_up{worker="2"} 0.0' in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["h"].type == "histogram"


def test_purge_targets_round_trip_any_bytes():
    targets = [("primary", bytes(range(256))), ("tag", "btc€".encode()), ("path_prefix", b"/a")]
    targets.append(("soft_tag", b"btc"))  # a soft purge reaches the siblings too
    assert decode_targets(encode_targets(targets)) == targets
    for bad in (b"[]", b'{"targets": [["nope", "x"]]}', b'{"targets": [["tag"]]}', b"{"):
        with pytest.raises(ValueError):
            decode_targets(bad)
    assert json.loads(encode_targets([]))["targets"] == []


def test_a_worker_respawned_while_the_file_is_broken_serves_the_accepted_config(tmp_path):
    """Issue 21 defect 9: the respawned worker re-read the (now invalid) file and came back
    with the start-up config beside a sibling on the current generation."""

    def routes(prefix: str) -> dict[str, object]:
        return {"routes": [{"name": prefix, "service": "market", "path_prefix": f"/{prefix}/"}]}

    with processes() as procs:
        origin = Origin("eu-central", tmp_path, echo=True)
        procs.append(origin)
        origin.ready()
        regions = {"eu-central": region(*LOCATIONS["eu-central"], [origin.url], "eu")}
        config = write_config(tmp_path / "edge.yaml", regions, edge=routes("g1"))
        edge = Edge(config, "fra", tmp_path, workers=2)
        procs.append(edge)
        pids = poll_until(lambda: _worker_pids(edge))

        def served(slot: int, workers: dict[int, int]) -> tuple[int, int]:
            with only(workers, slot):
                return (
                    http_request(edge.port, "GET", "/g1/x")[0],
                    http_request(edge.port, "GET", "/g2/x")[0],
                )

        assert served(0, pids) == served(1, pids) == (200, 404)
        write_config(config, regions, edge=routes("g2"))  # generation 2
        edge.signal(signal.SIGHUP)
        poll_until(lambda: served(0, pids) == served(1, pids) == (404, 200))
        config.write_text("edge: {routes: [oops\n")  # broken on disk from now on
        edge.signal(signal.SIGHUP)
        edge.wait_for_log(r"event=config_reload_rejected")
        os.kill(pids[1], signal.SIGKILL)
        respawned = poll_until(
            lambda: (p := _worker_pids(edge)) is not None and p[1] != pids[1] and p, within=15
        )
        # Both workers serve generation 2: the respawned one was handed the accepted config.
        assert served(1, respawned) == (404, 200)
        assert served(0, respawned) == (404, 200)
        workers = edge.status()["workers"]
        assert workers["1"]["generation"] == 2
        assert edge.status()["config"]["generation"] == 2
