"""HTTP/2 at the edge (issue 14, items 2 and 3): real clients (curl, httpx, h2load) and a raw
h2 client for the attacks, each answered while another client is served."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import hpack
import httpx
import pytest
import trustme
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame, PingFrame, SettingsFrame

from tests.edge_support import Client, Edge, Origin, poll_until, processes
from tests.tls_support import issue, tls_config

CURL = shutil.which("curl")
H2LOAD = shutil.which("h2load")
NGHTTP = shutil.which("nghttp")
NAME = "api.meridian.test"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One echo origin and one edge (h2c on the plain listener, h2 on the TLS one) for the
    module; attack limits low enough to reach quickly."""
    tmp = tmp_path_factory.mktemp("h2")
    ca = trustme.CA()
    files = issue(ca, tmp, "api", NAME, "127.0.0.1")
    with processes() as procs:
        origin = Origin("us-east", tmp, echo=True)
        procs.append(origin)
        config, tls_port = tls_config(
            tmp / "edge.yaml",
            origin.url,
            [{"cert": str(files.cert), "key": str(files.key)}],
            edge={
                "http2": {
                    "max_resets_per_second": 50,
                    "max_control_frames_per_second": 100,
                    "stall_timeout": "1s",
                },
            },
        )
        edge = Edge(config, "iad", tmp)
        procs.append(edge)
        origin.ready()
        edge.ready()
        yield {"edge": edge, "origin": origin, "tls_port": tls_port, "ca": files.ca}


# --------------------------------------------------------------------------------------------
# A raw HTTP/2 client


class RawH2:
    """An h2c client on a plain socket, for frames no polite client sends."""

    def __init__(self, port: int, **settings: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        if settings:
            self.conn.update_settings(
                {getattr(h2.settings.SettingCodes, k.upper()): v for k, v in settings.items()}
            )
        self.flush()
        self.events: list[h2.events.Event] = []
        self.closed = False

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def send_raw(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            self.closed = True

    def headers(self, path: str, *, end_stream: bool = True, **extra: str) -> list[Any]:
        fields = [
            (":method", "GET" if end_stream else "POST"),
            (":path", path),
            (":scheme", "http"),
            (":authority", NAME),
            *extra.items(),
        ]
        return [(k.encode(), v.encode()) for k, v in fields]

    def request(self, path: str, **extra: str) -> int:
        stream_id: int = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, self.headers(path, **extra), end_stream=True)
        self.flush()
        return stream_id

    def read(self, until: Any, within: float = 10.0) -> None:
        """Read and process frames until ``until(self)`` or the server closes."""
        deadline = time.monotonic() + within
        while not until(self) and time.monotonic() < deadline and not self.closed:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                self.closed = True
                break
            self.events += self.conn.receive_data(data)
            self.flush()

    def response(self, stream_id: int, within: float = 10.0) -> tuple[dict[bytes, bytes], bytes]:
        def ended(c: RawH2) -> bool:
            return any(
                isinstance(e, h2.events.StreamEnded | h2.events.StreamReset)
                and e.stream_id == stream_id
                for e in c.events
            )

        self.read(ended, within)
        headers: dict[bytes, bytes] = {}
        body = b""
        for event in self.events:
            if getattr(event, "stream_id", None) != stream_id:
                continue
            if isinstance(event, h2.events.ResponseReceived):
                headers = dict(event.headers or [])
            elif isinstance(event, h2.events.DataReceived):
                body += event.data or b""
                self.conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
        self.flush()
        return headers, body

    def goaway(self) -> h2.events.ConnectionTerminated | None:
        for event in self.events:
            if isinstance(event, h2.events.ConnectionTerminated):
                return event
        return None

    def wait_closed(self, within: float = 10.0) -> None:
        self.read(lambda c: False, within)

    def close(self) -> None:
        self.sock.close()


def _served(edge: Edge) -> None:
    """Another client, on another connection, is served."""
    conn = RawH2(edge.port)
    try:
        headers, _ = conn.response(conn.request("/echo"))
        assert headers[b":status"] == b"200"
    finally:
        conn.close()


def _goaway_code(conn: RawH2) -> int:
    conn.read(lambda c: c.goaway() is not None)
    event = conn.goaway()
    assert event is not None, "no GOAWAY"
    assert event.error_code is not None
    return int(event.error_code)


# --------------------------------------------------------------------------------------------
# Real clients


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_curl_prior_knowledge_and_tls_hits_carry_the_same_headers_as_http11(stack):
    edge: Edge = stack["edge"]
    path = "/cc/h2-same?cc=public,max-age=60"
    h1 = Client(edge.port, host=NAME)
    status, h1_headers, h1_body = h1.get(path)
    assert status == 200 and h1_headers["x-cache"] == "MISS"
    status, h1_headers, h1_body = h1.get(path)
    assert h1_headers["x-cache"] == "HIT"
    h1.close()

    def curl(*args: str) -> tuple[str, dict[str, str], bytes]:
        out = subprocess.run(
            ["curl", "-s", "-i", "-H", "Accept-Encoding: identity", *args],
            capture_output=True,
            timeout=20,
            check=True,
        ).stdout
        head, _, body = out.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        return lines[0], fields, body

    plain = f"http://127.0.0.1:{edge.port}{path}"
    line, fields, body = curl("--http2-prior-knowledge", "-H", f"Host: {NAME}", plain)
    assert line.startswith("HTTP/2 200")
    port = stack["tls_port"]
    tls_url = f"https://{NAME}:{port}{path}"
    resolve = f"{NAME}:{port}:127.0.0.1"
    line2, fields2, body2 = curl(
        "--http2",
        "--cacert",
        str(stack["ca"]),
        "--resolve",
        resolve,
        "-H",
        f"Host: {NAME}",
        tls_url,
    )
    assert line2.startswith("HTTP/2 200")
    for got, got_body in ((fields, body), (fields2, body2)):
        assert got_body == h1_body
        assert got["x-cache"] == "HIT"
        for name in ("age", "x-meridian-region", "cache-control", "content-type", "etag"):
            assert got.get(name) == h1_headers.get(name), name
        assert "connection" not in got and "keep-alive" not in got
        assert int(got["content-length"]) == len(h1_body)


async def test_httpx_http2_multiplexes_streams_and_streams_request_bodies(stack):
    edge: Edge = stack["edge"]
    origin: Origin = stack["origin"]
    async with _client(stack) as client:
        responses = await asyncio.gather(*(client.get(f"/echo?n={i}") for i in range(40)))
        assert {r.status_code for r in responses} == {200}
        assert {r.http_version for r in responses} == {"HTTP/2"}
        body = bytes(range(256)) * 4096  # 1 MiB, more than any window
        posted = await client.post("/echo", content=body)
        assert posted.status_code == 200
        seen = posted.json()
        assert seen["body_length"] == len(body)
        assert seen["body_sha"] == hashlib.sha256(body).hexdigest()

        async def chunks():
            for _ in range(8):
                yield b"z" * 100_000

        streamed = await client.post("/echo", content=chunks())
        assert streamed.json()["body_length"] == 800_000
        big = await client.get("/big?size=3000000")
        assert big.status_code == 200 and len(big.content) == 3_000_000
    assert edge.metric("meridian_edge_h2_requests_total", tls_version="TLSv1.3") >= 44
    seen = [r for r in origin.seen() if r["path"].startswith("/echo")]
    assert len(seen) >= 42
    # The origin is told the client came over https.
    assert all(["x-forwarded-proto", "https"] in r["headers"] for r in seen)


def _client(stack: dict[str, Any]) -> httpx.AsyncClient:
    """httpx with HTTP/2 over TLS (the certificate also names 127.0.0.1)."""
    return httpx.AsyncClient(
        http2=True,
        verify=ssl.create_default_context(cafile=str(stack["ca"])),
        base_url=f"https://127.0.0.1:{stack['tls_port']}",
        timeout=20,
    )


@pytest.mark.skipif(H2LOAD is None, reason="h2load is not installed (nghttp2-client)")
@pytest.mark.parametrize("tls", [False, True])
def test_h2load_short_load_has_no_failed_request(stack, tls):
    edge: Edge = stack["edge"]
    url = (
        f"https://127.0.0.1:{stack['tls_port']}/cc/h2load"
        if tls
        else f"http://127.0.0.1:{edge.port}/cc/h2load"
    )
    out = subprocess.run(
        ["h2load", "-n", "3000", "-c", "4", "-m", "10", url],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert re.search(
        r"requests: 3000 total, 3000 started, 3000 done, 3000 succeeded, 0 failed", out
    ), out
    assert "status codes: 3000 2xx" in out, out


@pytest.mark.skipif(NGHTTP is None, reason="nghttp is not installed (nghttp2-client)")
def test_nghttp_with_padding_a_table_size_update_and_tiny_windows(stack):
    """nghttp2's own client: every frame padded, its encoder's table shrunk (a dynamic table
    size update, then literals), priorities sent, a 1 KB stream window and a 16 KB connection
    window: many small DATA frames and WINDOW_UPDATEs each way, over TLS."""
    port = stack["tls_port"]
    url = f"https://127.0.0.1:{port}/big?size=200000"
    out = subprocess.run(
        [
            "nghttp",
            "-nsy",
            "-b",
            "17",
            "--encoder-header-table-size=100",
            "-w",
            "10",
            "-W",
            "14",
            "-m",
            "4",
            url,
            f"https://127.0.0.1:{port}/echo?nghttp=1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [
        line for line in out.stdout.splitlines() if "/big?size=200000" in line or "/echo" in line
    ]
    assert len(rows) == 8, out.stdout + out.stderr  # four of each, on one connection
    big = [row for row in rows if "/big" in row]
    assert all(" 200 " in row and "195K" in row for row in big), out.stdout
    assert all(" 200 " in row for row in rows), out.stdout


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_drain_sends_goaway_and_finishes_the_streams_in_flight(tmp_path):
    with processes() as procs:
        origin = Origin("us-east", tmp_path, echo=True)
        procs.append(origin)
        ca = trustme.CA()
        files = issue(ca, tmp_path, "api", NAME)
        config, _ = tls_config(
            tmp_path / "edge.yaml", origin.url, [{"cert": str(files.cert), "key": str(files.key)}]
        )
        edge = Edge(config, "iad", tmp_path)
        procs.append(edge)
        origin.ready()
        edge.ready()
        watcher = RawH2(edge.port)
        assert watcher.response(watcher.request("/echo"))[0][b":status"] == b"200"
        # curl (nghttp2) finishes a stream below GOAWAY's last stream ID as RFC 9113 says.
        curl = subprocess.Popen(
            [
                "curl",
                "-s",
                "--http2-prior-knowledge",
                f"http://127.0.0.1:{edge.port}/slow?seconds=1",
                "-w",
                " %{http_version} %{http_code}",
            ],
            stdout=subprocess.PIPE,
        )
        try:
            poll_until(lambda: origin.seen_for("/slow?seconds=1"))
            edge.signal(signal.SIGTERM)
            watcher.read(lambda c: c.goaway() is not None)
            event = watcher.goaway()
            assert event is not None and event.error_code == h2.errors.ErrorCodes.NO_ERROR
            assert event.last_stream_id == 1  # the one stream it had opened
            out, _ = curl.communicate(timeout=15)
        finally:
            if curl.poll() is None:
                curl.kill()
                curl.wait()
        assert out == b"slow done 2 200"
        watcher.wait_closed()
        assert watcher.closed
        assert edge.wait(within=15) == 0
        watcher.close()


# --------------------------------------------------------------------------------------------
# Attacks: each offender closed or limited, another client served meanwhile


def test_rapid_reset_gets_goaway_enhance_your_calm(stack):
    edge: Edge = stack["edge"]
    bystander = RawH2(edge.port)
    attacker = RawH2(edge.port)
    for _ in range(200):
        stream_id = attacker.conn.get_next_available_stream_id()
        attacker.conn.send_headers(stream_id, attacker.headers("/slow?seconds=5"))
        attacker.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
    attacker.send_raw(attacker.conn.data_to_send())
    assert _goaway_code(attacker) == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    attacker.wait_closed()
    assert attacker.closed
    headers, _ = bystander.response(bystander.request("/echo"))
    assert headers[b":status"] == b"200"
    bystander.close()
    _served(edge)
    assert edge.metric("meridian_edge_h2_goaways_total", reason="rapid_reset") >= 1


def test_continuation_flood_is_cut_off(stack):
    edge: Edge = stack["edge"]
    attacker = RawH2(edge.port)
    encoder = hpack.Encoder()
    block = encoder.encode(attacker.headers("/echo"))
    first = HeadersFrame(1, data=block, flags=["END_STREAM"])  # no END_HEADERS
    attacker.send_raw(first.serialize())
    for _ in range(100):
        frame = ContinuationFrame(1, data=b"x-pad: " + b"a" * 16000)
        attacker.send_raw(frame.serialize())
        if attacker.closed:
            break
    assert _goaway_code(attacker) == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    attacker.close()
    _served(edge)
    assert edge.metric("meridian_edge_h2_goaways_total", reason="header_block_too_large") >= 1


def test_hpack_bomb_is_refused(stack):
    edge: Edge = stack["edge"]
    attacker = RawH2(edge.port)
    # One 4 KB field, indexed once, then referenced by index: about 1 byte per 4 KB decoded.
    fields = attacker.headers("/echo") + [(b"x-bomb", b"b" * 4000)] * 200
    attacker.conn.send_headers(1, fields, end_stream=True)
    sent = attacker.conn.data_to_send()
    assert len(sent) < 8000  # tiny on the wire
    attacker.send_raw(sent)
    assert _goaway_code(attacker) == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    attacker.close()
    _served(edge)


def test_oversized_headers_get_431_and_the_connection_goes_on(stack):
    edge: Edge = stack["edge"]
    conn = RawH2(edge.port)
    big = conn.request("/echo", **{"x-big": "v" * 20_000})  # over 16 KiB, under the refusal
    headers, _ = conn.response(big)
    assert headers[b":status"] == b"431"
    headers, _ = conn.response(conn.request("/echo"))
    assert headers[b":status"] == b"200"
    conn.close()


@pytest.mark.parametrize("kind", ["settings", "ping", "empty_data"])
def test_control_frame_floods_get_goaway(stack, kind):
    edge: Edge = stack["edge"]
    attacker = RawH2(edge.port)
    if kind == "empty_data":
        attacker.conn.send_headers(1, attacker.headers("/echo", end_stream=False))
        attacker.flush()
    frames = []
    for i in range(500):
        if kind == "settings":
            frames.append(SettingsFrame(0, settings={0x3: 100}).serialize())
        elif kind == "ping":
            frames.append(PingFrame(0, opaque_data=i.to_bytes(8, "big")).serialize())
        else:
            frames.append(DataFrame(1, data=b"").serialize())
    attacker.send_raw(b"".join(frames))
    assert _goaway_code(attacker) == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    attacker.close()
    _served(edge)
    assert edge.metric("meridian_edge_h2_goaways_total", reason="control_flood") >= 1


def test_a_stream_on_a_zero_window_is_reset_after_the_stall_timeout(stack):
    edge: Edge = stack["edge"]
    stalled = RawH2(edge.port, initial_window_size=0)
    stalled.read(lambda c: any(isinstance(e, h2.events.SettingsAcknowledged) for e in c.events))
    stream_id = stalled.request("/big?size=2000000")
    started = time.monotonic()
    stalled.read(lambda c: any(isinstance(e, h2.events.StreamReset) for e in c.events), within=10)
    resets = [e for e in stalled.events if isinstance(e, h2.events.StreamReset)]
    assert resets and resets[0].stream_id == stream_id
    assert resets[0].error_code == h2.errors.ErrorCodes.CANCEL
    assert 0.9 <= time.monotonic() - started < 5  # stall_timeout 1s, sweep granularity
    # Nothing but the head went out on the stalled stream; the connection is still usable
    # for a response that fits in no window... and others are served.
    assert not any(isinstance(e, h2.events.DataReceived) and e.data for e in stalled.events)
    stalled.close()
    _served(edge)
    assert edge.metric("meridian_edge_h2_stream_resets_total", reason="zero_window_stall") >= 1


def test_stream_id_abuse_is_a_protocol_error(stack):
    edge: Edge = stack["edge"]
    attacker = RawH2(edge.port)
    block = hpack.Encoder().encode(attacker.headers("/echo"))
    # An even stream ID: only servers open those.
    attacker.send_raw(HeadersFrame(2, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize())
    assert _goaway_code(attacker) == h2.errors.ErrorCodes.PROTOCOL_ERROR
    attacker.close()
    # Stream IDs going backwards.
    attacker = RawH2(edge.port)
    encoder = hpack.Encoder()
    attacker.send_raw(
        HeadersFrame(
            5, data=encoder.encode(attacker.headers("/echo")), flags=["END_HEADERS", "END_STREAM"]
        ).serialize()
        + HeadersFrame(
            3, data=encoder.encode(attacker.headers("/echo")), flags=["END_HEADERS", "END_STREAM"]
        ).serialize()
    )
    assert _goaway_code(attacker) == h2.errors.ErrorCodes.PROTOCOL_ERROR
    attacker.close()
    _served(edge)


def test_streams_beyond_the_advertised_limit_end_the_connection(stack):
    edge: Edge = stack["edge"]
    conn = RawH2(edge.port)
    conn.read(lambda c: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in c.events))
    assert conn.conn.remote_settings.max_concurrent_streams == 128
    encoder = hpack.Encoder()
    frames = [
        HeadersFrame(
            2 * i + 1,
            data=encoder.encode(conn.headers("/slow?seconds=3")),
            flags=["END_HEADERS", "END_STREAM"],
        ).serialize()
        for i in range(140)
    ]
    conn.send_raw(b"".join(frames))
    assert _goaway_code(conn) == h2.errors.ErrorCodes.PROTOCOL_ERROR
    conn.close()
    _served(edge)


async def test_access_lines_name_the_protocol_and_tls_version(stack):
    edge: Edge = stack["edge"]
    async with _client(stack) as client:
        miss = await client.get("/echo?access=1", headers={"x-request-id": "h2-access-miss"})
        assert miss.status_code == 200
        for rid in ("h2-access-m", "h2-access-h"):
            hit = await client.get("/cc/access-log", headers={"x-request-id": rid})
            assert hit.status_code == 200
        assert hit.headers["x-cache"] == "HIT"
    h1 = Client(edge.port, host=NAME)
    h1.get("/echo?access=2", X_Request_ID="h1-access")
    h1.close()

    def line(rid: str) -> str | None:
        return next((ln for ln in edge.log_text().splitlines() if f"request_id={rid} " in ln), None)

    for rid in ("h2-access-miss", "h2-access-m", "h2-access-h"):
        found = poll_until(lambda rid=rid: line(rid))
        assert " proto=h2 tls=TLSv1.3 request_id=" in found, found
    assert " cache=HIT " in poll_until(lambda: line("h2-access-h"))
    found = poll_until(lambda: line("h1-access"))
    assert " proto=h1 request_id=" in found


def test_metrics_report_h2_requests_and_streams_per_connection(stack):
    edge: Edge = stack["edge"]
    _served(edge)
    poll_until(lambda: edge.metric("meridian_edge_h2_streams_per_connection_count") >= 1)
    assert edge.metric("meridian_edge_h2_requests_total", tls_version="none") >= 1
    assert json.dumps(edge.status())
