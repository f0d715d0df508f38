"""The plaintext listener that redirects to HTTPS (``edge.tls.redirect``)."""

from __future__ import annotations

import pytest
import trustme

from edge.http1 import RequestRejected
from edge.redirect import redirect_location
from tests.edge_support import Edge, Origin, free_port, parse_response, processes, raw_exchange
from tests.tls_support import https_get, issue, tls_config


@pytest.mark.parametrize(
    ("head", "port", "location"),
    [
        (b"GET /a?b=1 HTTP/1.1\r\nHost: api.test", 443, b"https://api.test/a?b=1"),
        (b"POST /o HTTP/1.1\r\nHost: api.test:80", 8443, b"https://api.test:8443/o"),
        (b"GET http://api.test:80/x HTTP/1.1\r\nHost: other", 443, b"https://api.test/x"),
        (b"GET / HTTP/1.1\r\nHost: [::1]:8080", 443, b"https://[::1]/"),
        (b"GET / HTTP/1.0", 443, None),  # no host to send them to
        (b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test", 443, None),
        (b"GET / HTTP/1.1\r\nHost: a.test\r\nLocation: https://evil.test", 443, b"https://a.test/"),
        (b"GET /a\r\nSet-Cookie: x HTTP/1.1\r\nHost: a.test", 443, None),
        (b"GET //evil.test/ HTTP/1.1\r\nHost: a.test", 443, b"https://a.test//evil.test/"),
        (b"GET /../x HTTP/1.1\r\nHost: a.test", 443, None),
        (b"GET / HTTP/1.1\r\nHost: a.test\r\nBad Name: v", 443, None),
        (b"GET / HTTP/2.0\r\nHost: a.test", 443, None),
    ],
)
def test_redirect_location(head, port, location):
    if location is None:
        with pytest.raises(RequestRejected):
            redirect_location(head, port)
    else:
        assert redirect_location(head, port) == location


def test_the_plain_listener_redirects_to_https(tmp_path):
    ca = trustme.CA()
    files = issue(ca, tmp_path, "api", "api.meridian.test")
    redirect_port = free_port()
    with processes() as procs:
        origin = Origin("us-east", tmp_path, echo=True)
        config, tls_port = tls_config(
            tmp_path / "edge.yaml",
            origin.url,
            [{"cert": str(files.cert), "key": str(files.key)}],
            redirect=f"127.0.0.1:{redirect_port}",
        )
        edge = Edge(config, "iad", tmp_path)
        procs += [origin, edge]
        origin.ready()
        edge.ready()
        raw = raw_exchange(
            redirect_port,
            b"POST /echo?x=1 HTTP/1.1\r\nHost: api.meridian.test\r\nContent-Length: 3\r\n\r\nabc",
        )
        status, headers, body = parse_response(raw)
        assert status == 308 and body == b""
        assert headers["location"] == f"https://api.meridian.test:{tls_port}/echo?x=1"
        assert headers["connection"] == "close"
        status, _, _ = parse_response(raw_exchange(redirect_port, b"GET / HTTP/1.0\r\n\r\n"))
        assert status == 400
        # Where it points is served.
        status, _ = https_get(tls_port, files.ca, "api.meridian.test", "/echo?x=1")
        assert status == 200
        # Nothing was forwarded from the plain listener.
        assert origin.seen_for("/echo?x=1") and all(
            r["method"] == "GET" for r in origin.seen_for("/echo?x=1")
        )
