"""TLS to origins with a test CA made now (trustme): verification on, the host name checked, a
client certificate when the origin asks, and what a bad certificate does: a connect failure
that sent nothing, the backend down with the reason in ``/status``, a config that names an
unusable CA bundle refused at load."""

from __future__ import annotations

import contextlib
import datetime
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import trustme
import yaml

from edge.upstream_client import ClientLimits, OriginClient, OriginResponse, UpstreamError
from edge.upstream_wire import header_block
from meridian.config import ConfigError, UpstreamTls, load_config
from meridian.origin_tls import client_context
from tests.edge_support import Edge, http_request, poll_until, region, write_config
from tests.test_upstream_client import RawOrigin

LIMITS = ClientLimits(
    connect=2.0, first_byte=2.0, read_idle=2.0, idle_timeout=30.0, max_idle=8, max_requests=1000
)
_HEADERS = header_block([(b"host", b"origin.test")])
_PAST = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)


class Pki:
    """A CA and certificates issued by it, as PEM files under ``tmp``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ca = trustme.CA()
        self.ca_file = tmp / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def leaf(self, name: str, *identities: str, expired: bool = False) -> Path:
        cert = self.ca.issue_cert(
            *identities,
            not_before=_PAST if expired else None,
            not_after=_PAST + datetime.timedelta(days=30) if expired else None,
        )
        path = self.tmp / f"{name}.pem"
        cert.private_key_and_cert_chain_pem.write_to_path(str(path))
        return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def origins(pki: Pki) -> Iterator[dict[str, RawOrigin]]:
    """TLS origins: a good one, one whose certificate names another host, an expired one and
    one that wants a client certificate."""
    tmp = pki.tmp
    made: dict[str, RawOrigin] = {}
    try:
        made["good"] = RawOrigin(tmp, "good", tls=["--cert", str(pki.leaf("good", "127.0.0.1"))])
        made["wrong-name"] = RawOrigin(
            tmp, "wrong-name", tls=["--cert", str(pki.leaf("other", "other.test"))]
        )
        made["expired"] = RawOrigin(
            tmp, "expired", tls=["--cert", str(pki.leaf("old", "127.0.0.1", expired=True))]
        )
        made["mutual"] = RawOrigin(
            tmp,
            "mutual",
            tls=[
                "--cert",
                str(pki.leaf("mutual", "127.0.0.1")),
                "--client-ca",
                str(pki.ca_file),
            ],
        )
        yield made
    finally:
        for proc in made.values():
            proc.stop()


@contextlib.asynccontextmanager
async def _client(tls: UpstreamTls, limits: ClientLimits = LIMITS) -> AsyncIterator[OriginClient]:
    client = OriginClient(limits, tls=lambda: client_context(tls, "<memory>"))
    client.start()
    try:
        yield client
    finally:
        await client.close()


async def _body(response: OriginResponse) -> bytes:
    try:
        return b"".join([chunk async for chunk in response.content.iter_any()])
    finally:
        response.release()


async def test_a_verified_origin_is_reached_over_pooled_tls_connections(
    pki: Pki, origins: dict[str, RawOrigin]
) -> None:
    url = origins["good"].url
    async with _client(UpstreamTls(ca_file=str(pki.ca_file))) as client:
        for _ in range(5):
            response = await client.send(url, "GET", b"/ok?size=9", _HEADERS, None)
            assert await _body(response) == b"x" * 9
        # One handshake for five requests: the connection is kept alive.
        assert client.stats.created[url] == 1 and client.stats.reused[url] == 4


async def test_new_connections_resume_the_backends_tls_session(
    pki: Pki, origins: dict[str, RawOrigin]
) -> None:
    url = origins["good"].url
    one_each = replace(LIMITS, max_requests=1)  # every request on a new connection
    async with _client(UpstreamTls(ca_file=str(pki.ca_file)), one_each) as client:
        for _ in range(4):
            response = await client.send(url, "GET", b"/ok?size=3", _HEADERS, None)
            connection = response._connection
            assert connection is not None and connection.transport is not None
            ssl_object = connection.transport.get_extra_info("ssl_object")
            assert ssl_object is not None and ssl_object.version() in ("TLSv1.2", "TLSv1.3")
            assert await _body(response) == b"xxx"
        # The first handshake is full; each later one resumes the session it left.
        assert client.stats.created[url] == 4
        assert client.stats.resumed.get(url, 0) == 3


@pytest.mark.parametrize(
    ("name", "why"),
    [("wrong-name", "address mismatch"), ("expired", "certificate has expired")],
)
async def test_a_certificate_that_does_not_verify_is_a_connect_failure(
    pki: Pki, origins: dict[str, RawOrigin], name: str, why: str
) -> None:
    async with _client(UpstreamTls(ca_file=str(pki.ca_file))) as client:
        with pytest.raises(UpstreamError) as caught:
            await client.send(origins[name].url, "POST", b"/echo-body", _HEADERS, b"{}")
    # A connect failure: nothing was sent, so even a POST may go elsewhere.
    assert caught.value.kind == "connect"
    assert caught.value.detail.startswith("certificate rejected") and why in caught.value.detail


async def test_the_system_store_does_not_trust_a_private_ca(origins: dict[str, RawOrigin]):
    async with _client(UpstreamTls()) as client:
        with pytest.raises(UpstreamError) as caught:
            await client.send(origins["good"].url, "GET", b"/ok", _HEADERS, None)
    assert caught.value.kind == "connect" and "certificate rejected" in caught.value.detail


async def test_an_origin_asking_for_a_client_certificate_gets_one(
    pki: Pki, origins: dict[str, RawOrigin]
) -> None:
    url = origins["mutual"].url
    client_cert = pki.leaf("pop-client", "fra.pop.test")
    with_cert = UpstreamTls(ca_file=str(pki.ca_file), client_cert=str(client_cert))
    async with _client(with_cert) as client:
        response = await client.send(url, "GET", b"/ok?size=4", _HEADERS, None)
        assert await _body(response) == b"xxxx"
    async with _client(UpstreamTls(ca_file=str(pki.ca_file))) as client:
        # Without one the origin ends the handshake (TLS 1.3: after it, at the first read).
        with pytest.raises(UpstreamError):
            await client.send(url, "GET", b"/ok?size=4", _HEADERS, None)


def test_an_unusable_ca_bundle_or_client_certificate_is_refused_at_load(tmp_path: Path) -> None:
    base = yaml.safe_load(Path("config/demo.yaml").read_text())
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    cases = {
        "edge.upstream.tls.ca_file: cannot load 'missing.pem'": {"ca_file": "missing.pem"},
        "edge.upstream.tls.ca_file: cannot load 'junk.pem'": {"ca_file": "junk.pem"},
        "edge.upstream.tls.client_cert: cannot load 'junk.pem'": {"client_cert": "junk.pem"},
        "edge.upstream.tls.client_key: given without client_cert": {"client_key": "k.pem"},
    }
    for expected, tls in cases.items():
        base["edge"]["upstream"] = {"tls": tls}
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(base))
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert any(expected in line for line in caught.value.problems), caught.value.problems


@pytest.fixture(scope="module")
def tls_edge(
    pki: Pki, origins: dict[str, RawOrigin], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Edge]:
    tmp = tmp_path_factory.mktemp("tls-edge")
    config = write_config(
        tmp / "config.yaml",
        {
            "eu-central": region(50.11, 8.68, [origins["good"].url]),
            "eu-west": region(53.35, -6.26, [origins["wrong-name"].url, origins["expired"].url]),
        },
        edge={"upstream": {"tls": {"ca_file": str(pki.ca_file)}}},
    )
    edge = Edge(config, "fra", tmp)
    try:
        edge.ready()
        yield edge
    finally:
        edge.stop()


def test_the_edge_forwards_to_a_verified_origin_over_tls(tls_edge: Edge) -> None:
    status, _, body = http_request(tls_edge.port, "GET", "/ok?size=12")
    assert status == 200 and body == b"x" * 12


def test_bad_certificates_take_backends_down_with_the_reason_in_status(
    tls_edge: Edge, origins: dict[str, RawOrigin]
) -> None:
    def targets() -> dict[str, dict[str, str]]:
        found: dict[str, dict[str, str]] = tls_edge.status()["health"]["targets"]
        return found

    for name, why in (("wrong-name", "address mismatch"), ("expired", "has expired")):
        url = origins[name].url
        poll_until(lambda url=url: targets()[url]["state"] == "down", within=15)  # type: ignore[misc]
        reason = targets()[url]["reason"]
        assert "certificate rejected: " in reason and why in reason, reason
    assert targets()[origins["good"].url]["state"] == "up"


def test_a_reload_with_the_origins_ca_brings_its_backend_up(
    pki: Pki, origins: dict[str, RawOrigin], tmp_path: Path
) -> None:
    """Without the CA (the system store only) the origin is down for its certificate; a reload
    naming the CA bundle is used by the next check and the next connection, no restart."""
    url = origins["good"].url
    regions = {"eu-central": region(50.11, 8.68, [url])}
    config = write_config(tmp_path / "config.yaml", regions)
    edge = Edge(config, "fra", tmp_path)
    try:
        edge.ready()

        def target() -> dict[str, str]:
            found: dict[str, str] = edge.status()["health"]["targets"][url]
            return found

        poll_until(lambda: target()["state"] == "down", within=15)
        assert "certificate rejected: " in target()["reason"]
        write_config(config, regions, edge={"upstream": {"tls": {"ca_file": str(pki.ca_file)}}})
        edge.signal(signal.SIGHUP)
        poll_until(lambda: target()["state"] == "up", within=15)
        status, _, body = http_request(edge.port, "GET", "/ok?size=6")
        assert status == 200 and body == b"xxxxxx"
    finally:
        edge.stop()


def test_a_websocket_reaches_an_https_origin_over_verified_tls(tls_edge: Edge) -> None:
    """The tunnel's own connection to an https:// backend: TLS with the same context."""
    with socket.create_connection(("127.0.0.1", tls_edge.port), timeout=10) as sock:
        sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        data = b""
        while b"hello" not in data:
            piece = sock.recv(4096)
            assert piece, data
            data += piece
    assert data.startswith(b"HTTP/1.1 101 ")
    assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in data  # RFC 6455's example key's answer
    assert data.endswith(b"\x81\x05hello")
