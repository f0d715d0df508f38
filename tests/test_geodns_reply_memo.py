"""The UDP reply memo of ``DnsServer`` (``_shared``, ``_by_client``) and its doorkeeper: a reply
the shape lookups give is memoized only on its query's second sighting, every reply stays
byte-for-byte what the strict path renders, and the memo never holds more than its bound."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import geodns.server
from geodns.responder import DOORKEEPER_SLOTS
from geodns.server import DnsServer
from meridian.config import HostPort
from meridian.lifecycle import ConfigHolder
from tests import dns_support

SENDER = ("127.0.0.1", 5300)


def _server(directory: Path) -> DnsServer:
    config = dns_support.base_config()
    del config["dns"]["names"]["origin"]  # no backend checks: no health change empties a memo
    path = dns_support.write_config(directory / "dns.yaml", config)
    holder = ConfigHolder.from_file(str(path))
    return DnsServer(holder, "iad", listen=HostPort("127.0.0.1", 0), admin=None, tcp=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> DnsServer:
    return _server(tmp_path_factory.mktemp("memo"))


def _wire(name: str, rdtype: str, subnet: str | None, ident: int) -> bytes:
    message = dns_support.make_query(name, rdtype, ecs=subnet)
    message.id = ident
    data: bytes = message.to_wire()
    return data


def _ask(server: DnsServer, data: bytes, sender: tuple[str, int] = SENDER) -> bytes:
    server._outbox.clear()
    server.handle_datagram(data, sender)
    (reply, to), *rest = server._outbox
    server._outbox.clear()
    assert to == sender and not rest
    return reply


def _memoized(server: DnsServer) -> int:
    return len(server._shared) + len(server._by_client)


_subnets = st.one_of(
    st.none(),
    st.builds(
        lambda address, bits: f"{ipaddress.IPv4Address(address)}/{bits}",
        st.integers(0, 2**32 - 1),
        st.sampled_from((8, 16, 20, 24, 32)),
    ),
    st.builds(
        lambda address, bits: f"{ipaddress.IPv6Address(address)}/{bits}",
        st.integers(0, 2**128 - 1),
        st.sampled_from((32, 48, 56, 64)),
    ),
)
_senders = st.one_of(
    st.builds(lambda a: str(ipaddress.IPv4Address(a)), st.integers(1, 2**32 - 2)),
    st.builds(lambda a: str(ipaddress.IPv6Address(a)), st.integers(1, 2**128 - 1)),
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    name=st.sampled_from(("api.meridian.test", "API.Meridian.Test", "nowhere.meridian.test")),
    rdtype=st.sampled_from(("A", "AAAA", "ANY", "TXT")),
    subnet=_subnets,
    sender=_senders,
    ident=st.integers(0, 0xFFFF),
)
def test_every_sighting_is_answered_as_the_strict_path_answers(
    server: DnsServer, name: str, rdtype: str, subnet: str | None, sender: str, ident: int
) -> None:
    """First sighting (compiled or shape lookup), second (admitted to the memo), third (from
    the memo), each with a new ID: the same bytes as the strict path, which memoizes nothing."""
    responder = server.serving.responder
    health = server.monitor.snapshot
    for sighting in range(3):
        data = _wire(name, rdtype, subnet, (ident + sighting) & 0xFFFF)
        slow = responder.respond_slow(data, ipaddress.ip_address(sender), tcp=False, health=health)
        assert slow is not None
        assert _ask(server, data, (sender, 53)) == slow.wire, sighting


def test_a_reply_is_memoized_on_its_second_sighting(tmp_path: Path) -> None:
    """ECS (the shared memo) and no ECS (the sender's memo): the first sighting of a known
    shape is answered by the shape lookup and not memoized, the second is memoized, the third
    is a memo hit."""
    server = _server(tmp_path)
    _ask(server, _wire("api.meridian.test", "A", "81.2.69.0/24", 1))  # learns the ECS shape
    _ask(server, _wire("api.meridian.test", "A", None, 1), ("81.2.69.7", 53))  # and the plain
    cases = (("89.160.20.0/24", SENDER), (None, ("89.160.20.7", 53)))
    for subnet, sender in cases:
        data = _wire("api.meridian.test", "A", subnet, 7)
        held, shaped, hits = _memoized(server), server.metrics.shaped, sum(server.metrics.hits)
        _ask(server, data, sender)
        assert server.metrics.shaped == shaped + 1
        assert _memoized(server) == held  # seen once: not memoized
        _ask(server, data, sender)
        assert server.metrics.shaped == shaped + 2
        assert _memoized(server) == held + 1  # seen twice: memoized
        _ask(server, data, sender)
        assert server.metrics.shaped == shaped + 2 and sum(server.metrics.hits) == hits + 1
    assert len(server._shared) >= 2 and len(server._by_client) >= 2


def test_queries_that_never_come_back_do_not_fill_the_memo(tmp_path: Path) -> None:
    """A new ECS subnet per query (and a new sender per query without ECS): answered by the
    shape lookups, next to nothing memoized (a doorkeeper collision admits 1 in 255 at most)."""
    server = _server(tmp_path)
    _ask(server, _wire("api.meridian.test", "A", "81.2.69.0/24", 1))
    _ask(server, _wire("api.meridian.test", "A", None, 1), ("81.2.69.7", 53))
    held = _memoized(server)
    template = _wire("api.meridian.test", "A", "11.0.0.0/24", 9)
    plain = _wire("api.meridian.test", "A", None, 9)
    count = 5000
    for i in range(count):
        _ask(server, template[:-3] + (0x0B0000 + i).to_bytes(3, "big"))
        _ask(server, plain, (str(ipaddress.IPv4Address(0x0C000000 + 256 * i + 1)), 53))
    assert server.metrics.shaped >= 2 * count * 0.9  # (a few senders get an answer not seen yet)
    assert _memoized(server) - held <= 2 * count // 100


def test_the_memo_and_its_doorkeeper_stay_within_their_bounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both memos together never hold more than MEMO_LIMIT entries, whichever path fills
    them; the doorkeeper is its fixed number of slots however many queries it saw."""
    limit = 40
    monkeypatch.setattr(geodns.server, "MEMO_LIMIT", limit)
    server = _server(tmp_path)
    peak = 0
    for i in range(300):
        subnet = f"{ipaddress.IPv4Address((0x0D0000 + i) << 8)}/24"
        sender = (str(ipaddress.IPv4Address(0x0E000000 + 256 * i + 1)), 53)
        for _ in range(2):  # twice: the second sighting is memoized
            _ask(server, _wire("api.meridian.test", "A", subnet, i))
            peak = max(peak, _memoized(server))
            _ask(server, _wire("api.meridian.test", "A", None, i), sender)
            peak = max(peak, _memoized(server))
    assert peak == limit
    assert len(server._seen) == DOORKEEPER_SLOTS
