"""TLS on the edge listener (issue 14, item 1), with real clients: curl, openssl s_client,
Python's ssl; certificates made at test time by trustme."""

from __future__ import annotations

import asyncio
import datetime
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvloop
from prometheus_client import CollectorRegistry

from edge.front import FrontDoors
from edge.protocol import Connections
from edge.server import LISTEN_BACKLOG, _tls_listeners
from edge.tls import TlsContexts, TlsStats
from meridian.config import EdgeTls, HostPort, TlsCertificate
from tests.edge_support import ROOT, Edge, Origin, poll_until, processes
from tests.stage_support import world
from tests.tls_support import https_get, issue, peer_names, tls_config

CURL = shutil.which("curl")
OPENSSL = shutil.which("openssl")


def _start(tmp_path: Path, certificates: list[dict[str, object]], **tls: object):
    origin = Origin("us-east", tmp_path, echo=True)
    config, tls_port = tls_config(tmp_path / "edge.yaml", origin.url, certificates, **tls)
    edge = Edge(config, "iad", tmp_path)
    return origin, edge, tls_port


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_curl_http11_and_http2_over_tls_and_the_handshakes_are_counted(tmp_path):
    ca = trustme.CA()
    files = issue(ca, tmp_path, "api", "api.meridian.test")
    with processes() as procs:
        origin, edge, port = _start(tmp_path, [{"cert": str(files.cert), "key": str(files.key)}])
        procs += [origin, edge]
        origin.ready()
        edge.ready()
        base = ["curl", "-s", "--cacert", str(files.ca), "-o", "/dev/null"]
        resolve = ["--resolve", f"api.meridian.test:{port}:127.0.0.1"]
        url = f"https://api.meridian.test:{port}/echo"
        for flag, version in (("--http1.1", "1.1"), ("--http2", "2")):
            out = subprocess.run(
                [*base, *resolve, flag, "-w", "%{http_version} %{http_code}", url],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            ).stdout
            assert out == f"{version} 200", (flag, out)
        assert edge.metric("meridian_edge_tls_handshakes_total", result="full") == 2
        assert edge.metric("meridian_edge_tls_connections_total", protocol="h2") == 1
        assert edge.metric("meridian_edge_tls_connections_total", protocol="http/1.1") == 1
        # The origin is told the client came over https, whichever protocol it spoke.
        seen = origin.seen_for("/echo")
        assert len(seen) == 2
        for record in seen:
            proto = [v for k, v in record["headers"] if k.lower() == "x-forwarded-proto"]
            assert proto == ["https"], record["headers"]

        # And the access lines name the protocol and the TLS version, HTTP/1.1 included.
        def logged(fields: str) -> bool:  # access lines are written in batches
            return any(
                "event=access" in line and fields in line for line in edge.log_text().splitlines()
            )

        poll_until(lambda: logged(" proto=h1 tls=TLSv1.") and logged(" proto=h2 tls=TLSv1."))


def test_sni_picks_the_certificate_for_each_name_and_the_default_without_sni(tmp_path):
    ca = trustme.CA()
    a = issue(ca, tmp_path, "a", "a.meridian.test")
    b = issue(ca, tmp_path, "b", "b.meridian.test", "*.wild.meridian.test")
    rsa = issue(ca, tmp_path, "b-rsa", "b.meridian.test", key_type=trustme.KeyType.RSA)
    certificates: list[dict[str, object]] = [
        {"cert": "a.crt", "key": "a.key"},  # relative to the config file
        {"cert": str(b.cert), "key": str(b.key)},
        {"cert": str(rsa.cert), "key": str(rsa.key)},
    ]
    with processes() as procs:
        origin, edge, port = _start(tmp_path, certificates, default="b.meridian.test")
        procs += [origin, edge]
        origin.ready()
        edge.ready()
        assert peer_names(port, a.ca, "a.meridian.test") == ["a.meridian.test"]
        assert "b.meridian.test" in peer_names(port, a.ca, "b.meridian.test")
        assert "*.wild.meridian.test" in peer_names(port, a.ca, "x.wild.meridian.test")
        # No SNI, or a name nobody serves: the default certificate.
        assert "b.meridian.test" in peer_names(port, a.ca, None)
        assert "b.meridian.test" in peer_names(port, a.ca, "nobody.example")
        # An RSA-only client gets the RSA certificate of the same name.
        context = ssl.create_default_context(cafile=str(a.ca))
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="b.meridian.test") as sock,
        ):
            cipher = sock.cipher()
            assert cipher is not None and "RSA" in cipher[0]
        status, _ = https_get(port, a.ca, "a.meridian.test", "/echo")
        assert status == 200


def test_old_protocol_versions_are_refused_and_counted_as_failed_handshakes(tmp_path):
    ca = trustme.CA()
    files = issue(ca, tmp_path, "api", "api.meridian.test")
    with processes() as procs:
        origin, edge, port = _start(
            tmp_path,
            [{"cert": str(files.cert), "key": str(files.key)}],
            edge={"timeouts": {"client_header": "1s"}},
        )
        procs += [origin, edge]
        origin.ready()
        edge.ready()
        context = ssl.create_default_context(cafile=str(files.ca))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # what the test is about
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
        with pytest.raises(ssl.SSLError), socket.create_connection(("127.0.0.1", port)) as raw:
            context.wrap_socket(raw, server_hostname="api.meridian.test")
        # Plain HTTP sent to the TLS port is a failed handshake too, never a request.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            raw.recv(100)
        failed = "meridian_edge_tls_handshakes_total"
        poll_until(lambda: edge.metric(failed, result="failed", reason="error") >= 2, within=10)
        # A client that never says hello is cut at the header timeout (1 s here).
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            assert raw.recv(100) == b""  # closed by the edge
        poll_until(lambda: edge.metric(failed, result="failed", reason="timeout") == 1)
        assert edge.metric("meridian_edge_tls_handshakes_total", result="full") == 0


@pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_openssl_s_client_shows_alpn_h2_and_resumes_the_session(tmp_path, version):
    ca = trustme.CA()
    files = issue(ca, tmp_path, "api", "api.meridian.test")
    session = tmp_path / "session.pem"
    with processes() as procs:
        origin, edge, port = _start(tmp_path, [{"cert": str(files.cert), "key": str(files.key)}])
        procs += [origin, edge]
        origin.ready()
        edge.ready()

        def s_client(*extra: str) -> str:
            argv = [
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{port}",
                "-servername",
                "api.meridian.test",
                "-CAfile",
                str(files.ca),
                "-alpn",
                "h2,http/1.1",
                version,
                *extra,
            ]
            with subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
            ) as proc:
                assert proc.stdin is not None and proc.stdout is not None
                if "-sess_out" in extra:
                    # TLS 1.3 tickets come after the handshake: keep the connection open
                    # until s_client has written the session.
                    poll_until(lambda: session.exists() and session.stat().st_size > 0)
                proc.stdin.close()
                out = proc.stdout.read().decode(errors="replace")
                proc.wait(timeout=20)
            return out

        first = s_client("-sess_out", str(session))
        assert "ALPN protocol: h2" in first
        assert "Verify return code: 0 (ok)" in first
        assert re.search(r"^New, TLSv1\.[23]", first, re.M), first[-1500:]
        second = s_client("-sess_in", str(session))
        assert re.search(r"^Reused, TLSv1\.[23]", second, re.M), second[-1500:]
        poll_until(lambda: edge.metric("meridian_edge_tls_handshakes_total", result="resumed") >= 1)


@pytest.mark.parametrize(
    ("problem", "expected"),
    [
        ("expired", r"edge\.tls\.certificates\[0\]\.cert: .* expired on"),
        ("mismatch", r"edge\.tls\.certificates\[0\]\.key: .* is not the key of"),
        ("names", r"edge\.tls\.certificates\[0\]\.names: other\.test not covered"),
        ("missing", r"edge\.tls\.certificates\[0\]\.cert: cannot read"),
        ("default", r"edge\.tls\.default: no certificate serves 'nope\.test'"),
    ],
)
def test_a_bad_certificate_config_is_one_line_and_exit_2(tmp_path, problem, expected):
    ca = trustme.CA()
    good = issue(ca, tmp_path, "good", "api.meridian.test")
    entry: dict[str, object] = {"cert": str(good.cert), "key": str(good.key)}
    extra: dict[str, object] = {}
    if problem == "expired":
        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
        old = issue(ca, tmp_path, "old", "api.meridian.test", not_after=past)
        entry = {"cert": str(old.cert), "key": str(old.key)}
    elif problem == "mismatch":
        other = issue(ca, tmp_path, "other", "api.meridian.test")
        entry = {"cert": str(good.cert), "key": str(other.key)}
    elif problem == "names":
        entry["names"] = ["api.meridian.test", "other.test"]
    elif problem == "missing":
        entry["cert"] = str(tmp_path / "nowhere.crt")
    elif problem == "default":
        extra["default"] = "nope.test"
    config, _ = tls_config(tmp_path / "edge.yaml", "http://127.0.0.1:9", [entry], **extra)
    check = subprocess.run(
        [sys.executable, "-m", "meridian.cli", "check", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert check.returncode == 2
    lines = check.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(expected, lines[0]), check.stderr
    edge = Edge(config, "iad", tmp_path)
    try:
        assert edge.wait(within=30) == 2
        assert re.search(expected, edge.log_text())
    finally:
        edge.stop()


def test_sighup_swaps_the_certificate_under_load_with_no_failed_request(tmp_path):
    old_ca, new_ca = trustme.CA(), trustme.CA()
    old = issue(old_ca, tmp_path, "old", "api.meridian.test")
    # Both CAs are trusted by the clients under load; the probe trusts one at a time.
    bundle = tmp_path / "both.pem"
    bundle.write_bytes(old_ca.cert_pem.bytes() + new_ca.cert_pem.bytes())
    live_cert, live_key = tmp_path / "live.crt", tmp_path / "live.key"
    live_cert.write_bytes(old.cert.read_bytes())
    live_key.write_bytes(old.key.read_bytes())
    with processes() as procs:
        origin, edge, port = _start(tmp_path, [{"cert": str(live_cert), "key": str(live_key)}])
        procs += [origin, edge]
        origin.ready()
        edge.ready()
        # A keep-alive connection made with the old certificate.
        context = ssl.create_default_context(cafile=str(old.ca))
        kept = context.wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=10),
            server_hostname="api.meridian.test",
        )
        request = b"GET /echo HTTP/1.1\r\nHost: api.meridian.test\r\n\r\n"
        kept.sendall(request)
        assert kept.recv(65536).startswith(b"HTTP/1.1 200")
        failures: list[str] = []
        done = [0]
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                try:
                    status, _ = https_get(port, bundle, "api.meridian.test", "/echo")
                    if status != 200:
                        failures.append(str(status))
                except (OSError, ssl.SSLError) as exc:
                    failures.append(repr(exc))
                done[0] += 1

        threads = [threading.Thread(target=load) for _ in range(3)]
        for thread in threads:
            thread.start()
        try:
            poll_until(lambda: done[0] > 20)
            new = issue(new_ca, tmp_path, "new", "api.meridian.test")
            live_cert.write_bytes(new.cert.read_bytes())
            live_key.write_bytes(new.key.read_bytes())
            edge.signal(signal.SIGHUP)
            edge.wait_for_log(r"event=tls_reloaded")
            served = done[0]
            poll_until(lambda: done[0] > served + 20)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=20)
        assert failures == []
        # New handshakes get the new certificate: only the new CA verifies it.
        status, _ = https_get(port, new.ca, "api.meridian.test", "/echo")
        assert status == 200
        with pytest.raises(ssl.SSLCertVerificationError):
            https_get(port, old.ca, "api.meridian.test", "/echo")
        # The connection opened before the reload goes on with its certificate.
        kept.sendall(request)
        assert kept.recv(65536).startswith(b"HTTP/1.1 200")
        kept.close()


def test_a_reload_with_a_bad_certificate_keeps_the_old_one(tmp_path):
    ca = trustme.CA()
    good = issue(ca, tmp_path, "good", "api.meridian.test")
    live_cert = tmp_path / "live.crt"
    live_cert.write_bytes(good.cert.read_bytes())
    with processes() as procs:
        origin, edge, port = _start(tmp_path, [{"cert": str(live_cert), "key": str(good.key)}])
        procs += [origin, edge]
        origin.ready()
        edge.ready()
        other = issue(ca, tmp_path, "other", "api.meridian.test")
        live_cert.write_bytes(other.cert.read_bytes())  # no longer matches the key
        edge.signal(signal.SIGHUP)
        edge.wait_for_log(r"event=config_reload_rejected reason=.*is not the key of")
        status, _ = https_get(port, good.ca, "api.meridian.test", "/echo")
        assert status == 200


def test_workers_share_the_tls_listener(tmp_path):
    ca = trustme.CA()
    files = issue(ca, tmp_path, "api", "api.meridian.test")
    with processes() as procs:
        origin = Origin("us-east", tmp_path, echo=True)
        config, port = tls_config(
            tmp_path / "edge.yaml",
            origin.url,
            [{"cert": str(files.cert), "key": str(files.key)}],
        )
        edge = Edge(config, "iad", tmp_path, workers=2)
        procs += [origin, edge]
        origin.ready()
        edge.wait_for_log(r"event=edge_tls_listening.*worker=1")
        edge.wait_for_log(r"event=edge_tls_listening.*worker=0")
        for _ in range(10):
            status, _ = https_get(port, files.ca, "api.meridian.test", "/echo")
            assert status == 200
        # The listening socket is the supervisor's: a SIGHUP reload reaches every worker.
        edge.signal(signal.SIGHUP)
        edge.wait_for_log(r"event=tls_reloaded")
        status, _ = https_get(port, files.ca, "api.meridian.test", "/echo")
        assert status == 200


def test_meridian_check_summarises_the_tls_listener(tmp_path):
    ca = trustme.CA()
    until = datetime.datetime(2031, 5, 4, tzinfo=datetime.UTC)
    files = issue(ca, tmp_path, "api", "api.meridian.test", "*.m.test", not_after=until)
    config, port = tls_config(
        tmp_path / "edge.yaml", "http://127.0.0.1:9", [{"cert": "api.crt", "key": "api.key"}]
    )
    del files
    check = subprocess.run(
        [sys.executable, "-m", "meridian.cli", "check", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert check.returncode == 0, check.stderr
    assert (
        f"edge tls: 127.0.0.1:{port}, 1 certificate(s) (api.meridian.test, *.m.test),"
        " first expiry 2031-05-04, TLSv1.2+, ALPN h2, http/1.1"
    ) in check.stdout


def _accept_queue_limit(sock: Any) -> int:
    """A listening socket's accept queue limit, as Linux reports it: ``tcpi_sacked`` of
    TCP_INFO holds ``sk_max_ack_backlog`` for a socket in LISTEN."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return struct.unpack_from("8B6I", info)[13]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TCP_INFO layout is Linux's")
def test_the_tls_listener_keeps_the_edges_accept_backlog(tmp_path):
    # uvloop (like asyncio) calls listen() again on a socket it is handed, with 100 unless
    # told otherwise: the TLS listener had an accept queue of 100 where the plain one had 2048.
    a = issue(trustme.CA(), tmp_path, "a", "a.test")
    tls = EdgeTls(HostPort("127.0.0.1", 0), (TlsCertificate(str(a.cert), str(a.key)),))

    async def limits() -> list[int]:
        w = world()
        doors = FrontDoors(Connections(w.pipeline, asyncio.get_running_loop()), CollectorRegistry())
        contexts = TlsContexts(tls, "<memory>", http2=True, stats=TlsStats())
        server, extra = await _tls_listeners(doors, contexts, tls, None, w.pipeline.state.config, 0)
        try:
            return [_accept_queue_limit(sock) for sock in server.sockets]
        finally:
            server.close()
            for other in extra:
                other.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(limits()) == [LISTEN_BACKLOG]
