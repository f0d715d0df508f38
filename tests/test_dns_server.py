"""GeoDNS end to end: ``python -m geodns`` on real UDP/TCP sockets, dnspython, dig and kdig."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from geodns import mmsg
from geodns.server import DnsServer, combine_answers
from meridian.config import HostPort
from meridian.lifecycle import ConfigHolder
from tests.dns_support import (
    CITY_TEST_DB,
    POP_ADDRESSES,
    HealthEndpoint,
    ServerProcess,
    addresses,
    ask,
    base_config,
    ecs_scope,
    make_query,
    running_server,
    send_raw,
    wait_for,
    with_many_answers,
    write_config,
)

ZONE = "meridian.test"


@pytest.fixture(scope="module")
def health() -> Iterator[HealthEndpoint]:
    endpoint = HealthEndpoint()
    yield endpoint
    endpoint.close()


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, health: HealthEndpoint
) -> Iterator[ServerProcess]:
    path = tmp_path_factory.mktemp("dns") / "world.yaml"
    write_config(path, with_many_answers(base_config(health.base)))
    with running_server(path) as proc:
        proc.wait_health_stable()
        yield proc


# ------------------------------------------------------------------------------ routing


@pytest.mark.parametrize(
    ("subnet", "pop"),
    [
        ("200.160.2.0/24", "gru"),  # Brazil
        ("81.2.69.0/24", "fra"),  # United Kingdom: nearest is Frankfurt
        ("8.8.8.0/24", "iad"),  # United States
        ("1.1.1.0/24", "syd"),  # Australia
        ("165.21.0.0/24", "sin"),  # Singapore
        ("80.80.80.0/24", "fra"),  # the Netherlands (residency eu: fra is in the zone anyway)
        ("2001:4860:4860::/56", "iad"),  # United States over IPv6 ECS
    ],
)
def test_each_continent_is_sent_to_its_nearest_pop(
    server: ServerProcess, subnet: str, pop: str
) -> None:
    reply = ask(server.port, f"api.{ZONE}", ecs=subnet)
    assert reply.rcode() == dns.rcode.NOERROR
    assert addresses(reply) == [POP_ADDRESSES[pop]]
    assert reply.flags & dns.flags.AA
    assert reply.answer[0].ttl == 30


def test_ecs_scope_is_the_database_network(server: ServerProcess) -> None:
    # The shipped database holds 200.160.0.0/15 as one BR network: the answer holds for /15.
    assert ecs_scope(ask(server.port, f"api.{ZONE}", ecs="200.160.2.0/24")) == 15
    # A non-byte-aligned source prefix is echoed as sent.
    reply = ask(server.port, f"api.{ZONE}", ecs="200.160.0.0/13")
    option = next(o for o in reply.options if o.otype == 8)
    assert (option.srclen, option.scopelen) == (13, 15)
    assert addresses(reply) == [POP_ADDRESSES["gru"]]


def test_ecs_source_prefix_zero_uses_the_resolver_address_with_scope_zero(
    server: ServerProcess,
) -> None:
    reply = ask(server.port, f"api.{ZONE}", ecs="0.0.0.0/0")
    # The resolver is 127.0.0.1: not in the database, so the default location (Ashburn).
    assert addresses(reply) == [POP_ADDRESSES["iad"]]
    assert ecs_scope(reply) == 0


def test_network_override_pins_a_pop(server: ServerProcess) -> None:
    assert addresses(ask(server.port, f"api.{ZONE}", ecs="10.2.3.0/24")) == [POP_ADDRESSES["syd"]]


def test_residency_keeps_an_eu_client_in_the_eu_zone(server: ServerProcess) -> None:
    # Placed in Ireland (override): regions nearest first would be eu-central anyway, so use
    # a name over POPs, where only fra is in zone eu; AAAA over regions is answered from the
    # eu region only.
    reply = ask(server.port, f"two.{ZONE}", ecs="10.1.0.0/24")
    assert addresses(reply) == [POP_ADDRESSES["fra"]]  # two answers wanted, one in zone
    reply = ask(server.port, f"two.{ZONE}", ecs="8.8.8.0/24")
    assert len(addresses(reply)) == 2


def test_aaaa_for_a_name_whose_targets_have_only_ipv4_is_nodata(server: ServerProcess) -> None:
    reply = ask(server.port, f"api.{ZONE}", "AAAA", ecs="8.8.8.0/24")
    assert reply.rcode() == dns.rcode.NOERROR
    assert not reply.answer
    assert reply.authority[0].rdtype == dns.rdatatype.SOA
    assert reply.authority[0].ttl == 60  # min(SOA TTL, MINIMUM)
    # Over regions, the one region with IPv6 answers.
    assert addresses(ask(server.port, f"origin.{ZONE}", "AAAA")) == ["2001:db8::2"]


# --------------------------------------------------------------------------- zone protocol


def test_apex_soa_and_ns_with_glue(server: ServerProcess) -> None:
    soa = ask(server.port, ZONE, "SOA")
    assert soa.answer[0].rdtype == dns.rdatatype.SOA
    assert soa.answer[0][0].serial == 2026112101
    ns = ask(server.port, ZONE, "NS")
    assert sorted(r.target.to_text() for r in ns.answer[0]) == [
        "ns.elsewhere.example.",
        "ns1.meridian.test.",
    ]
    glue = {(rr.name.to_text(), rr.rdtype): [r.address for r in rr] for rr in ns.additional}
    assert glue == {
        ("ns1.meridian.test.", dns.rdatatype.A): ["127.0.0.53"],
        ("ns1.meridian.test.", dns.rdatatype.AAAA): ["2001:db8::53"],
    }
    assert addresses(ask(server.port, f"ns1.{ZONE}", "A")) == ["127.0.0.53"]


def test_nxdomain_nodata_refused(server: ServerProcess) -> None:
    nx = ask(server.port, f"nope.{ZONE}")
    assert nx.rcode() == dns.rcode.NXDOMAIN and nx.flags & dns.flags.AA
    assert nx.authority[0].rdtype == dns.rdatatype.SOA
    ent = ask(server.port, f"sub.{ZONE}")  # empty non-terminal above deep.sub
    assert ent.rcode() == dns.rcode.NOERROR and not ent.answer
    mx = ask(server.port, f"api.{ZONE}", "MX")
    assert mx.rcode() == dns.rcode.NOERROR and not mx.answer and mx.authority
    out = ask(server.port, "example.com")
    assert out.rcode() == dns.rcode.REFUSED and not out.flags & dns.flags.AA


def test_any_is_answered_minimally(server: ServerProcess) -> None:
    reply = ask(server.port, f"api.{ZONE}", "ANY", ecs="1.1.1.0/24")
    assert len(reply.answer) == 1
    assert addresses(reply) == [POP_ADDRESSES["syd"]]
    hinfo = ask(server.port, f"sub.{ZONE}", "ANY")
    assert hinfo.answer[0].rdtype == dns.rdatatype.HINFO
    assert hinfo.answer[0][0].cpu == b"RFC8482"


def test_edns_payload_badvers_and_do_bit(server: ServerProcess) -> None:
    reply = ask(server.port, f"api.{ZONE}", payload=4096)
    assert reply.edns == 0 and reply.payload == 1232
    query = make_query(f"api.{ZONE}")
    query.use_edns(1)
    badvers = dns.query.udp(query, "127.0.0.1", port=server.port, timeout=2)
    assert badvers.rcode() == dns.rcode.BADVERS
    assert badvers.edns == 0
    do = dns.query.udp(
        make_query(f"api.{ZONE}", want_dnssec=True), "127.0.0.1", port=server.port, timeout=2
    )
    assert do.ednsflags & dns.flags.DO


def test_no_edns_gets_no_opt(server: ServerProcess) -> None:
    reply = ask(server.port, f"api.{ZONE}", payload=None)
    assert reply.edns == -1 and addresses(reply) == [POP_ADDRESSES["iad"]]


def test_notimp_for_other_opcodes(server: ServerProcess) -> None:
    query = make_query(f"api.{ZONE}")
    query.set_opcode(dns.opcode.NOTIFY)
    reply = dns.message.from_wire(send_raw(server.port, query.to_wire()) or b"")
    assert reply.rcode() == dns.rcode.NOTIMP and reply.id == query.id


def test_truncation_over_udp_then_tcp(server: ServerProcess) -> None:
    udp = ask(server.port, f"many.{ZONE}")
    assert udp.flags & dns.flags.TC and not udp.answer
    tcp = ask(server.port, f"many.{ZONE}", tcp=True)
    assert not tcp.flags & dns.flags.TC and len(addresses(tcp)) == 120
    # Without EDNS the limit is 512 bytes: 'two' fits, 'many' does not.
    assert not ask(server.port, f"two.{ZONE}", payload=None).flags & dns.flags.TC
    assert ask(server.port, f"many.{ZONE}", payload=512).flags & dns.flags.TC


def test_tcp_pipelining_answers_in_order(server: ServerProcess) -> None:
    queries = [
        make_query(f"api.{ZONE}", ecs=s) for s in ("1.1.1.0/24", "8.8.8.0/24", "165.21.0.0/24")
    ]
    payload = b"".join(struct.pack("!H", len(w)) + w for w in (q.to_wire() for q in queries))
    with socket.create_connection(("127.0.0.1", server.port), timeout=3) as sock:
        sock.sendall(payload)
        replies: list[dns.message.Message] = []
        buffer = b""
        while len(replies) < 3:
            chunk = sock.recv(65535)
            assert chunk, "connection closed early"
            buffer += chunk
            while len(buffer) >= 2 and len(buffer) >= 2 + struct.unpack("!H", buffer[:2])[0]:
                size = struct.unpack("!H", buffer[:2])[0]
                replies.append(dns.message.from_wire(buffer[2 : 2 + size]))
                buffer = buffer[2 + size :]
    assert [r.id for r in replies] == [q.id for q in queries]
    assert [addresses(r) for r in replies] == [
        [POP_ADDRESSES["syd"]],
        [POP_ADDRESSES["iad"]],
        [POP_ADDRESSES["sin"]],
    ]


# ------------------------------------------------------------------------- malformed input


def _formerr(server: ServerProcess, data: bytes) -> None:
    raw = send_raw(server.port, data)
    assert raw is not None, "no reply"
    assert raw[:2] == data[:2]
    assert raw[3] & 0xF == dns.rcode.FORMERR


def _ecs_query(option: bytes) -> bytes:
    wire = make_query(f"api.{ZONE}").to_wire()
    # Replace the empty OPT rdata (the last two bytes are RDLENGTH 0) with our option.
    return wire[:-2] + struct.pack("!H", len(option)) + option


@pytest.mark.parametrize(
    "option",
    [
        struct.pack("!HHHBB", 8, 7, 3, 24, 0) + b"\x01\x02\x03",  # family 3
        struct.pack("!HHHBB", 8, 7, 1, 33, 0) + b"\x01\x02\x03",  # source > 32
        struct.pack("!HHHBB", 8, 6, 1, 24, 0) + b"\x01\x02",  # address shorter than prefix
        struct.pack("!HHHBB", 8, 8, 1, 24, 0) + b"\x01\x02\x03\x04",  # longer than prefix
        struct.pack("!HHHBB", 8, 7, 1, 20, 0) + b"\x01\x02\x0f",  # bits beyond /20
        struct.pack("!HHHBB", 8, 7, 1, 24, 8) + b"\x01\x02\x03",  # scope set in a query
        struct.pack("!HH", 8, 2) + b"\x00\x01",  # option too short
    ],
)
def test_malformed_ecs_is_formerr(server: ServerProcess, option: bytes) -> None:
    _formerr(server, _ecs_query(option))


def test_malformed_queries_are_formerr_and_garbage_is_dropped(server: ServerProcess) -> None:
    good = make_query(f"api.{ZONE}", payload=None).to_wire()
    _formerr(server, good[:-3])  # truncated question
    _formerr(server, good[:4] + b"\x00\x02" + good[6:])  # qdcount 2
    _formerr(server, good[:12] + b"\x40" + good[13:])  # reserved label type
    _formerr(server, good + b"junk")  # trailing bytes
    assert send_raw(server.port, b"\x01\x02\x03", timeout=0.3) is None  # no header: silence
    response = bytearray(good)
    response[2] |= 0x80  # QR set: never answer a response
    assert send_raw(server.port, bytes(response), timeout=0.3) is None
    # Still serving afterwards.
    assert addresses(ask(server.port, f"api.{ZONE}")) == [POP_ADDRESSES["iad"]]


# ------------------------------------------------------------------------- dig and kdig


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig is not installed")
def test_dig_with_subnet_and_tcp(server: ServerProcess) -> None:
    out = subprocess.run(
        [
            "dig",
            "@127.0.0.1",
            "-p",
            str(server.port),
            f"api.{ZONE}",
            "A",
            "+subnet=200.160.2.0/24",
            "+norec",
            "+time=2",
            "+tries=1",
        ],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    assert "status: NOERROR" in out and "flags: qr aa;" in out
    assert "CLIENT-SUBNET: 200.160.2.0/24/15" in out
    assert POP_ADDRESSES["gru"] in out
    tcp = subprocess.run(
        [
            "dig",
            "@127.0.0.1",
            "-p",
            str(server.port),
            f"many.{ZONE}",
            "+tcp",
            "+short",
            "+time=2",
            "+tries=1",
        ],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout.split()
    assert len(tcp) == 120


@pytest.mark.skipif(shutil.which("kdig") is None, reason="kdig is not installed")
def test_kdig_nxdomain_and_truncation_retry(server: ServerProcess) -> None:
    out = subprocess.run(
        ["kdig", "@127.0.0.1", "-p", str(server.port), f"missing.{ZONE}", "+time=2", "+retry=0"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    assert "status: NXDOMAIN" in out and "SOA" in out
    # kdig retries over TCP by itself on TC, as resolvers do.
    many = subprocess.run(
        [
            "kdig",
            "@127.0.0.1",
            "-p",
            str(server.port),
            f"many.{ZONE}",
            "+short",
            "+time=2",
            "+retry=0",
        ],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout.split()
    assert len(many) == 120


# ------------------------------------------------------------------------------ reply memo


def _ask_from(source: str, port: int, wire: bytes) -> dns.message.Message:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(2.0)
        sock.sendto(wire, ("127.0.0.1", port))
        return dns.message.from_wire(sock.recv(65535))


def test_reply_memo_is_per_sender_without_ecs_and_shared_with_it(tmp_path: Path) -> None:
    config = base_config()
    config["geo"]["overrides"].append({"network": "127.0.0.2/32", "pop": "syd"})
    del config["dns"]["names"]["origin"]  # no backend checks: no health change empties the memo
    path = write_config(tmp_path / "w.yaml", config)
    with running_server(path) as proc:
        plain = make_query(f"api.{ZONE}").to_wire()
        subnet = make_query(f"api.{ZONE}", ecs="200.160.2.0/24").to_wire()
        for _ in range(3):  # the first round computes, later rounds are memo hits
            # The same bytes from two resolvers: each gets its own answer.
            assert addresses(_ask_from("127.0.0.1", proc.port, plain)) == [POP_ADDRESSES["iad"]]
            assert addresses(_ask_from("127.0.0.2", proc.port, plain)) == [POP_ADDRESSES["syd"]]
            # With an ECS subnet the sender does not matter.
            for source in ("127.0.0.1", "127.0.0.2"):
                reply = _ask_from(source, proc.port, subnet)
                assert addresses(reply) == [POP_ADDRESSES["gru"]] and ecs_scope(reply) == 15
        with urllib.request.urlopen(f"http://127.0.0.1:{proc.admin_port}/metrics") as response:
            text = response.read().decode()
        # Computed: the plain query once per sender, the ECS one once for both: 3 of 12.
        assert 'meridian_dns_memo_hits_total{transport="udp"} 9.0' in text
        assert 'meridian_dns_queries_total{qtype="A",rcode="NOERROR",transport="udp"} 12.0' in text
        assert 'meridian_dns_answers_total{target="gru"} 6.0' in text
        assert 'meridian_dns_answer_seconds_count{transport="udp"} 12.0' in text


def test_a_burst_of_cold_queries_is_answered_in_full(server: ServerProcess) -> None:
    """2,000 distinct ECS subnets sent at once, before reading: every one is answered (the
    socket buffers hold the burst while cold answers are computed)."""
    count = 2000
    queries = {}
    for i in range(count):
        query = make_query(f"api.{ZONE}", ecs=f"{11 + i // 250}.{i % 250}.{i % 7}.0/24")
        query.id = i
        queries[i] = query.to_wire()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
        sock.settimeout(5.0)
        for wire in queries.values():
            sock.sendto(wire, ("127.0.0.1", server.port))
        answered: set[int] = set()
        with contextlib.suppress(TimeoutError):
            while len(answered) < count:
                reply = dns.message.from_wire(sock.recv(65535))
                assert reply.rcode() == dns.rcode.NOERROR  # (TC for clients nearest "big")
                answered.add(reply.id)
    assert len(answered) == count


def _refuse_first_send(server: DnsServer) -> list[int]:
    """Make the server's first UDP send "would block" (``sendto``, or ``sendmmsg`` in the
    batched loop); the list records that it happened."""
    refused: list[int] = []
    batch = server._batch
    if batch is not None:
        real_sendmmsg = batch._sendmmsg

        def batch_full_once(fd: int, messages: int, count: int, flags: int) -> int:
            if not refused:
                refused.append(count)
                ctypes.set_errno(errno.EAGAIN)
                return -1
            sent: int = real_sendmmsg(fd, messages, count, flags)
            return sent

        batch._sendmmsg = batch_full_once
        return refused
    real_sendto = server._sendto

    def full_once(data: bytes, addr: tuple[str, int]) -> None:
        if not refused:
            refused.append(1)
            raise BlockingIOError
        real_sendto(data, addr)

    server._sendto = full_once
    return refused


@pytest.mark.parametrize(
    "batched",
    [
        pytest.param(False, id="recvfrom-sendto"),
        pytest.param(
            True,
            id="recvmmsg-sendmmsg",
            marks=pytest.mark.skipif(not mmsg.AVAILABLE, reason="recvmmsg/sendmmsg need Linux"),
        ),
    ],
)
async def test_udp_replies_wait_when_the_send_buffer_is_full(tmp_path: Path, batched: bool) -> None:
    """A reply the kernel cannot take now ("would block") is held and sent once the socket is
    writable again, not dropped: in the plain loop and in the batched one."""
    config = base_config()
    del config["dns"]["names"]["origin"]
    holder = ConfigHolder.from_file(str(write_config(tmp_path / "w.yaml", config)))
    server = DnsServer(holder, "iad", listen=HostPort("127.0.0.1", 0), admin=None, tcp=False)
    server.batch_syscalls = batched
    await server.start()
    assert (server._batch is not None) is batched
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        client.bind(("127.0.0.1", 0))
        client.setblocking(False)
        refused = _refuse_first_send(server)
        query = make_query(f"api.{ZONE}")
        assert server.udp_address is not None
        client.sendto(query.to_wire(), server.udp_address)
        loop = asyncio.get_running_loop()
        reply = dns.message.from_wire(await asyncio.wait_for(loop.sock_recv(client, 65535), 5))
        assert refused and reply.id == query.id
        assert addresses(reply) == [POP_ADDRESSES["iad"]]
        assert not server._backlog and server.metrics.send_errors == 0
    finally:
        client.close()
        await server.stop()


# --------------------------------------------------------------------- metrics and status


def test_metrics_and_status(server: ServerProcess) -> None:
    ask(server.port, f"api.{ZONE}", ecs="1.1.1.0/24")
    base = f"http://127.0.0.1:{server.admin_port}"
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert 'meridian_dns_queries_total{qtype="A",rcode="NOERROR",transport="udp"}' in text
    assert 'meridian_dns_answers_total{target="syd"}' in text
    assert "meridian_dns_ecs_queries_total" in text
    assert "meridian_dns_answer_seconds_bucket" in text
    with urllib.request.urlopen(f"{base}/status", timeout=5) as response:
        status = json.load(response)
    assert status["config_generation"] == 1
    assert status["pop"] == "iad"
    assert set(status["health"]["pops"]) == set(POP_ADDRESSES) | {"big"}


# -------------------------------------------------------------- failover, reload, limits


def test_failover_when_the_nearest_pop_fails_its_health_check(
    tmp_path: Path, health: HealthEndpoint
) -> None:
    path = write_config(tmp_path / "w.yaml", base_config(health.base))
    health.status["gru"] = 200
    try:
        with running_server(path) as proc:
            brazil = "200.160.2.0/24"
            assert addresses(ask(proc.port, f"api.{ZONE}", ecs=brazil)) == [POP_ADDRESSES["gru"]]
            health.status["gru"] = 503
            ttls: list[int] = []

            def moved() -> bool:
                reply = ask(proc.port, f"api.{ZONE}", ecs=brazil)
                ttls.append(reply.answer[0].ttl)
                return addresses(reply) == [POP_ADDRESSES["iad"]]

            # fall 2 at a 500 ms interval (200 ms while changing): well under 5 s.
            wait_for(moved, 5.0, "Brazil to move to iad")
            assert min(ttls) < 30, "TTL was not shortened while gru was failing"
            health.status["gru"] = 200
            wait_for(
                lambda: (
                    addresses(ask(proc.port, f"api.{ZONE}", ecs=brazil)) == [POP_ADDRESSES["gru"]]
                ),
                5.0,
                "Brazil to come back to gru",
            )
    finally:
        health.status.pop("gru", None)


def test_residency_on_failure_refuse_and_fallback(tmp_path: Path, health: HealthEndpoint) -> None:
    config = base_config(health.base)
    config["residency"]["eu-data"]["on_failure"] = "refuse"
    path = write_config(tmp_path / "w.yaml", config)
    germany = "5.9.0.0/24"
    try:
        with running_server(path) as proc:
            assert addresses(ask(proc.port, f"api.{ZONE}", ecs=germany)) == [POP_ADDRESSES["fra"]]
            health.status["fra"] = 503
            wait_for(
                lambda: ask(proc.port, f"api.{ZONE}", ecs=germany).rcode() == dns.rcode.REFUSED,
                5.0,
                "a German client to be refused",
            )
            # A US client is not affected by the EU rule.
            assert addresses(ask(proc.port, f"api.{ZONE}", ecs="8.8.8.0/24")) == ["127.0.1.1"]
            config["residency"]["eu-data"]["on_failure"] = "fallback"
            write_config(path, config)
            proc.reload()
            wait_for(
                lambda: (
                    addresses(ask(proc.port, f"api.{ZONE}", ecs=germany)) == [POP_ADDRESSES["iad"]]
                ),
                5.0,
                "a German client to fall back outside the zone",
            )
    finally:
        health.status.pop("fra", None)


def test_all_down_policies(tmp_path: Path, health: HealthEndpoint) -> None:
    config = base_config(health.base)
    config["dns"]["all_down"] = "servfail"
    path = write_config(tmp_path / "w.yaml", config)
    try:
        for name in POP_ADDRESSES:
            health.status[name] = 503
        with running_server(path) as proc:
            wait_for(
                lambda: ask(proc.port, f"api.{ZONE}").rcode() == dns.rcode.SERVFAIL,
                5.0,
                "SERVFAIL with every POP down",
            )
            config["dns"]["all_down"] = "fail_open"
            write_config(path, config)
            proc.reload()
            wait_for(
                lambda: addresses(ask(proc.port, f"api.{ZONE}")) == ["127.0.1.1"],
                5.0,
                "fail open to the nearest",
            )
            config["dns"]["all_down"] = "empty"
            write_config(path, config)
            proc.reload()
            wait_for(
                lambda: (r := ask(proc.port, f"api.{ZONE}")).rcode() == 0 and not r.answer,
                5.0,
                "an empty answer",
            )
    finally:
        health.status.clear()


def test_sighup_good_and_bad_files_under_queries(tmp_path: Path) -> None:
    config = base_config()
    path = write_config(tmp_path / "w.yaml", config)
    with running_server(path) as proc:
        failures: list[str] = []
        answered = [0]
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                try:
                    reply = ask(proc.port, f"api.{ZONE}", ecs="200.160.2.0/24", timeout=1.0)
                    if reply.rcode() != dns.rcode.NOERROR or not reply.answer:
                        failures.append(reply.to_text())
                    answered[0] += 1
                except Exception as exc:  # a lost answer is a timeout
                    failures.append(repr(exc))

        thread = threading.Thread(target=hammer)
        thread.start()
        try:
            wait_for(lambda: answered[0] > 20, 5.0, "queries flowing")
            config["pops"]["gru"]["addresses"] = ["127.0.1.22"]
            write_config(path, config)
            proc.reload()
            wait_for(
                lambda: (
                    addresses(ask(proc.port, f"api.{ZONE}", ecs="200.160.2.0/24")) == ["127.0.1.22"]
                ),
                5.0,
                "the new address",
            )
            path.write_text("dns: [unclosed\n", encoding="utf-8")
            proc.signal(signal.SIGHUP)
            wait_for(lambda: proc.log_has("config_reload_rejected"), 5.0, "the rejection line")
            config["geo"]["database"] = str(path)  # not a MaxMind database
            write_config(path, config)
            proc.signal(signal.SIGHUP)
            wait_for(
                lambda: len(proc.log_has("config_reload_rejected")) == 2,
                5.0,
                "the geo rejection line",
            )
            seen = answered[0]
            wait_for(lambda: answered[0] > seen + 20, 5.0, "queries still flowing")
        finally:
            stop.set()
            thread.join(5)
        assert failures == []
        rejected = proc.log_has("config_reload_rejected")
        assert "invalid YAML" in rejected[0]
        assert "geo.database" in rejected[1]
        assert addresses(ask(proc.port, f"api.{ZONE}", ecs="200.160.2.0/24")) == ["127.0.1.22"]
        with urllib.request.urlopen(f"http://127.0.0.1:{proc.admin_port}/status") as response:
            assert json.load(response)["config_generation"] == 2
    assert proc.proc.returncode == 0
    assert proc.log_has("event=dns_stopped")


def test_geo_database_swap_on_sighup(tmp_path: Path) -> None:
    config = base_config()
    path = write_config(tmp_path / "w.yaml", config)
    with running_server(path) as proc:
        # The shipped database places 81.2.69.160 in GB at the country centroid (a /18); its
        # neighbours answer alike, so the scope is the wider /17.
        assert ecs_scope(ask(proc.port, f"api.{ZONE}", ecs="81.2.69.160/27")) == 17
        config["geo"]["database"] = str(CITY_TEST_DB)
        write_config(path, config)
        proc.reload()
        # MaxMind's test database holds exactly 81.2.69.160/27 (London).
        wait_for(
            lambda: ecs_scope(ask(proc.port, f"api.{ZONE}", ecs="81.2.69.160/27")) == 27,
            5.0,
            "scope from the new database",
        )
        assert addresses(ask(proc.port, f"api.{ZONE}", ecs="81.2.69.160/27")) == ["127.0.1.3"]


def test_rate_limit_drops_and_slips(tmp_path: Path) -> None:
    config = base_config()
    config["dns"]["rate_limit"] = {"enabled": True, "responses_per_second": 5, "slip": 2}
    path = write_config(tmp_path / "w.yaml", config)
    with running_server(path) as proc:
        wire = make_query(f"api.{ZONE}").to_wire()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.5)
            for _ in range(40):
                sock.sendto(wire, ("127.0.0.1", proc.port))
            replies = []
            try:
                while True:
                    replies.append(sock.recv(65535))
            except TimeoutError:
                pass
        full = [r for r in replies if not r[2] & 0x02]
        slipped = [r for r in replies if r[2] & 0x02]
        assert 5 <= len(full) <= 8  # the burst, plus what refilled meanwhile
        assert slipped and all(struct.unpack("!H", r[6:8])[0] == 0 for r in slipped)
        assert len(replies) < 40  # some were dropped
        # TCP is never limited.
        assert addresses(ask(proc.port, f"api.{ZONE}", tcp=True)) == ["127.0.1.1"]
        with urllib.request.urlopen(f"http://127.0.0.1:{proc.admin_port}/metrics") as response:
            text = response.read().decode()
        assert 'meridian_dns_rate_limited_total{action="drop"}' in text
        assert 'meridian_dns_rate_limited_total{action="slip"}' in text


def test_workers_share_the_udp_port(tmp_path: Path) -> None:
    path = write_config(tmp_path / "w.yaml", base_config())
    with running_server(path, extra=("--workers", "2")) as proc:
        wait_for(lambda: len(proc.log_has("event=dns_listening")) == 2, 10.0, "two workers")
        for _ in range(20):
            assert addresses(ask(proc.port, f"api.{ZONE}", ecs="1.1.1.0/24")) == ["127.0.1.5"]
    assert proc.proc.returncode == 0
    assert len(proc.log_has("event=dns_stopped")) == 2


def test_with_workers_the_admin_listener_speaks_for_every_worker(tmp_path: Path) -> None:
    path = write_config(tmp_path / "w.yaml", base_config())
    sent = 300
    with running_server(path, extra=("--workers", "2")) as proc:
        wait_for(lambda: len(proc.log_has("event=dns_listening")) == 2, 10.0, "two workers")
        for _ in range(sent):  # each from a socket of its own: the workers share the reading
            assert addresses(ask(proc.port, f"api.{ZONE}", ecs="1.1.1.0/24")) == ["127.0.1.5"]
        with urllib.request.urlopen(f"http://127.0.0.1:{proc.admin_port}/metrics") as response:
            text = response.read().decode()
        with urllib.request.urlopen(f"http://127.0.0.1:{proc.admin_port}/status") as response:
            status = json.loads(response.read())
    assert 'meridian_dns_worker_up{worker="0"} 1.0' in text
    assert 'meridian_dns_worker_up{worker="1"} 1.0' in text
    answered = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("meridian_dns_answers_by_country_total{")
    ]
    assert sum(answered) == sent
    assert set(status["workers"]) == {"0", "1"}
    assert sum(status["answers"]["by_country"].values()) == sent
    assert sum(status["answers"]["by_target"].values()) == sent
    per_worker = [sum(w["answers"]["by_country"].values()) for w in status["workers"].values()]
    assert sum(per_worker) == sent


def test_workers_answers_add_up_and_a_sibling_document_is_untrusted() -> None:
    one = {"by_country": {"DE": 3, "BR": 1}, "by_target": {"fra": 4}}
    two = {"by_country": {"DE": 2}, "by_target": {"fra": 1, "gru": 1}}
    hostile = [
        None,
        "by_country",
        {"by_country": ["DE", 1]},
        {"by_country": {"DE": -5, "US": 1.5, "SG": True, "AU": "7"}, "by_target": {7: 1}},
    ]
    combined = combine_answers([one, two, *hostile])
    assert combined == {"by_country": {"DE": 5, "BR": 1}, "by_target": {"fra": 5, "gru": 1}}
    many = {"by_country": {f"X{i}": 1 for i in range(5000)}, "by_target": {}}
    assert len(combine_answers([many, many])["by_country"]) == 1024


def test_explain_prints_candidates_and_the_answer(tmp_path: Path) -> None:
    path = write_config(tmp_path / "w.yaml", base_config())
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from geodns.cli import *; import argparse; "
            "p = argparse.ArgumentParser(); add_explain_arguments(p); "
            "sys.exit(run_explain(p.parse_args(sys.argv[1:])))",
            "--config",
            str(path),
            "--client",
            "5.9.0.0/24",
            "--name",
            "api",
            "--down",
            "fra",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout
    assert "DE/EU" in out
    assert "residency: rule eu-data (zone eu, on_failure fallback)" in out
    assert "pop fra" in out and "DOWN" in out and "in zone" in out
    assert "answer 127.0.1.1" in out and "fell back" in out
    # The compiled range around the client, its ECS scope and what lies either side.
    assert "gets this answer; ECS scope /" in out and "before it: " in out
