"""What a client's request may become at the edge, attacked over real sockets (issue 21).

A real edge process in front of the echo origin (``tests.edge_support``), which records every
request it receives (``GET /_seen``).  Two reliability tests at the issue's scale:

* 8: more than 60 request-smuggling vectors, each answered 400 with the connection closed,
  and the origin's record shows that nothing of any of them was forwarded (no hidden request);
* 9: a poisoning matrix: after each attack a clean victim request gets the clean answer.

And one test per defect of this area (1, 2, 5, 6, 10, 13, 15), each failing on the code
before the fix.  ``python -m benchmarks.chaos.smuggling`` prints the figures.
"""

from __future__ import annotations

import itertools
import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.edge_support import (
    LOCATIONS,
    Edge,
    Origin,
    parse_response,
    processes,
    read_until_close,
    region,
    statuses,
    write_config,
)

VICTIM = "victim.test"
#: Anything an attacker puts in a request carries this; a victim's answer never may.
EVIL = "evil"


def edge_section() -> dict[str, Any]:
    return {
        "services": {"market": {}},
        "routes": [{"name": "api", "service": "market", "path_prefix": "/"}],
        "timeouts": {
            "connect": "1s",
            "first_byte": "3s",
            "total": "5s",
            "client_header": "2s",
            "client_body": "2s",
            "client_idle": "2s",
        },
        "limits": {"max_body": 100_000},
        "cache": {
            "memory": 4 << 20,
            "rules": [
                {"path_prefix": "/cc/rule/", "ttl": "60s"},
                {"path_prefix": "/cc/sym", "ttl": "60s"},
            ],
        },
    }


def start_world(tmp: Path, procs: list) -> tuple[Edge, Origin]:
    origin = Origin("eu-central", tmp, echo=True)
    procs.append(origin)
    origin.ready()
    config = write_config(
        tmp / "edge.yaml",
        {"eu-central": region(*LOCATIONS["eu-central"], [origin.url])},
        edge=edge_section(),
        outlier={"enabled": False},
    )
    edge = Edge(config, "fra", tmp)
    procs.append(edge)
    edge.ready()
    return edge, origin


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with processes() as procs:
        yield start_world(tmp_path_factory.mktemp("reliability-http"), procs)


def exchange(port: int, *writes: bytes, timeout: float = 3.0, pause: float = 0.0) -> bytes:
    """Send ``writes`` (``pause`` seconds apart) on one connection; read until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each write its own segment
        for i, data in enumerate(writes):
            if i and pause:
                time.sleep(pause)
            try:
                sock.sendall(data)
            except OSError:
                break  # the edge closed already (it refused what came before)
        return read_until_close(sock, timeout)


def get(
    port: int, path: str, host: str = VICTIM, headers: str = ""
) -> tuple[int, dict[str, str], bytes]:
    raw = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{headers}\r\n"
    return parse_response(exchange(port, raw.encode("latin-1")))


def seen(origin: Origin, needle: str) -> list[dict[str, Any]]:
    return [r for r in origin.seen() if needle in r["path"]]


# --------------------------------------------------------------------------------------------
# Test 8: smuggling vectors


def _post(path: str, headers: str, body: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: a.test\r\n{headers}\r\n{body}".encode("latin-1")


def _chunked(path: str, body: str, headers: str = "") -> bytes:
    return _post(path, "Transfer-Encoding: chunked\r\n" + headers, body)


def _get(path: str, headers: str, version: str = "HTTP/1.1") -> bytes:
    return f"GET {path} {version}\r\n{headers}\r\n".encode("latin-1")


def smuggling_vectors() -> dict[str, bytes]:
    """name -> raw request; every path carries ``/smuggle/<name>``."""
    v: dict[str, bytes] = {}

    def p(name: str) -> str:
        return f"/smuggle/{name}"

    # CL.TE, TE.CL and Content-Length oddities.
    v["cl-te"] = _post(
        p("cl-te"), "Content-Length: 6\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\nG"
    )
    v["te-cl"] = _post(
        p("te-cl"), "Transfer-Encoding: chunked\r\nContent-Length: 6\r\n", "0\r\n\r\nG"
    )
    v["te-cl-lower"] = _post(
        p("te-cl-lower"), "transfer-encoding: chunked\r\ncontent-length: 4\r\n", "0\r\n\r\n"
    )
    v["cl-duplicate"] = _post(
        p("cl-duplicate"), "Content-Length: 5\r\nContent-Length: 5\r\n", "hello"
    )
    v["cl-differing"] = _post(
        p("cl-differing"), "Content-Length: 5\r\nContent-Length: 11\r\n", "hello world"
    )
    for name, value in {
        "cl-list": "5, 5",
        "cl-plus": "+5",
        "cl-minus": "-5",
        "cl-hex": "0x5",
        "cl-space-inside": "5 5",
        "cl-decimal": "5.0",
        "cl-huge": "99999999999999999999",
        "cl-empty": "",
        "cl-letters": "five",
    }.items():
        v[name] = _post(p(name), f"Content-Length: {value}\r\n", "hello")
    # TE.TE obfuscations.
    for name, value in {
        "te-xchunked": "xchunked",
        "te-chunked-identity": "chunked, identity",
        "te-gzip-chunked": "gzip, chunked",
        "te-identity": "identity",
        "te-quoted": '"chunked"',
        "te-trailing-comma": "chunked,",
        "te-vertical-tab": "\x0bchunked",
        "te-nbsp": "\xa0chunked",
        "te-chunked-x": "chunked x",
    }.items():
        v[name] = _post(p(name), f"Transfer-Encoding: {value}\r\n", "0\r\n\r\n")
    v["te-twice"] = _post(
        p("te-twice"), "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", "0\r\n\r\n"
    )
    v["te-twice-chunked"] = _post(
        p("te-twice-chunked"),
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        "0\r\n\r\n",
    )
    v["te-space-before-colon"] = _post(
        p("te-space-before-colon"), "Transfer-Encoding : chunked\r\n", "0\r\n\r\n"
    )
    v["te-obs-fold"] = _post(
        p("te-obs-fold"), "Transfer-Encoding: identity\r\n chunked\r\n", "0\r\n\r\n"
    )
    v["te-http10"] = (
        f"POST {p('te-http10')} HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ).encode()
    v["te-underscore"] = _post(
        p("te-underscore"), "Content-Length: 5\r\nTransfer_Encoding: chunked\r\n", "0\r\n\r\n"
    )
    v["cl-underscore"] = _post(p("cl-underscore"), "Content_Length: 5\r\n", "hello")
    # Header syntax.
    v["obs-fold"] = _get(p("obs-fold"), "Host: a\r\nX-A: b\r\n c\r\n")
    v["bare-lf-line"] = f"GET {p('bare-lf-line')} HTTP/1.1\nHost: a\n\n".encode()
    v["bare-lf-header"] = f"GET {p('bare-lf-header')} HTTP/1.1\r\nHost: a\nX: b\r\n\r\n".encode()
    v["bare-cr-value"] = _get(p("bare-cr-value"), "Host: a\r\nX-A: b\rc\r\n")
    v["nul-value"] = _get(p("nul-value"), "Host: a\r\nX-A: b\x00c\r\n")
    v["nul-name"] = _get(p("nul-name"), "Host: a\r\nX-\x00A: b\r\n")
    v["space-in-name"] = _get(p("space-in-name"), "Host: a\r\nX A: b\r\n")
    v["no-colon"] = _get(p("no-colon"), "Host: a\r\nX-A\r\n")
    v["space-before-colon"] = _get(p("space-before-colon"), "Host : a\r\n")
    v["empty-name"] = _get(p("empty-name"), "Host: a\r\n: b\r\n")
    # Chunk sizes and extensions.
    for name, body in {
        "chunk-bad-size": "zz\r\nhello\r\n0\r\n\r\n",
        "chunk-overflow": "fffffffffffffffff1\r\nhello\r\n0\r\n\r\n",
        "chunk-2^64-1": "ffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        "chunk-2^63": "8000000000000000\r\nhello\r\n0\r\n\r\n",
        "chunk-over-limit": "186a1\r\nhello\r\n0\r\n\r\n",  # 413, as nginx
        "chunk-negative": "-5\r\nhello\r\n0\r\n\r\n",
        "chunk-0x": "0x5\r\nhello\r\n0\r\n\r\n",
        "chunk-size-space": "5 \r\nhello\r\n0\r\n\r\n",
        "chunk-leading-space": " 5\r\nhello\r\n0\r\n\r\n",
        "chunk-lf-only": "5\nhello\r\n0\r\n\r\n",
        "chunk-data-overrun": "5\r\nhelloXX\r\n0\r\n\r\n",
        "chunk-ext-control": "5;\x01\r\nhello\r\n0\r\n\r\n",
        "chunk-ext-bare-cr": "5;a\r=b\r\nhello\r\n0\r\n\r\n",
        "chunk-ext-huge": "5;" + "e" * 5000 + "\r\nhello\r\n0\r\n\r\n",
        "chunk-late-error": "5\r\nhello\r\n5\r\nworld\r\nzz\r\n0\r\n\r\n",
    }.items():
        v[name] = _chunked(p(name), body)
    # Versions.
    v["http09-line"] = _get(p("http09-line"), "Host: a\r\n", "HTTP/0.9")
    v["http09-simple"] = f"GET {p('http09-simple')}\r\n\r\n".encode()
    v["http20"] = _get(p("http20"), "Host: a\r\n", "HTTP/2.0")
    v["http12"] = _get(p("http12"), "Host: a\r\n", "HTTP/1.2")
    v["http30"] = _get(p("http30"), "Host: a\r\n", "HTTP/3.0")
    v["http-lower"] = _get(p("http-lower"), "Host: a\r\n", "http/1.1")
    v["http-garbage"] = _get(p("http-garbage"), "Host: a\r\n", "HTTP/1.1x")
    v["h2-preface"] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _get(p("h2-preface"), "Host: a\r\n")
    # Request-targets.
    for name, target in {
        "abs-ftp": "ftp://a.test/smuggle/abs-ftp",
        "abs-file": "file:///smuggle/abs-file",
        "abs-gopher": "gopher://a.test/smuggle/abs-gopher",
        "abs-userinfo": "http://evil@a.test/smuggle/abs-userinfo",
        "abs-no-authority": "http:///smuggle/abs-no-authority",
        "abs-bad-host": "http://a.test%2f/smuggle/abs-bad-host",
        "authority-form": "a.test:80",
        "asterisk-form": "*",
        "fragment": "/smuggle/fragment#x",
        "dot-segment": "/smuggle/dot-segment/../../admin",
        "dot-segment-encoded": "/smuggle/dot-segment-encoded/%2e%2e/admin",
        "encoded-nul": "/smuggle/encoded-nul%00.json",
    }.items():
        v[name] = _get(target, "Host: a.test\r\n")
    # Host.
    for name, host in {
        "host-slash": "a.test/smuggle/host-slash",
        "host-at": "evil@a.test",
        "host-space": "a.test smuggle",
        "host-empty": "",
        "host-bad-port": "a.test:99999",
        "host-comma": "a.test,evil.test",
        "host-backslash": "a.test\\x",
        "host-percent": "a.test%2fx",
    }.items():
        v[name] = _get(p(name), f"Host: {host}\r\n")
    v["host-duplicate"] = _get(p("host-duplicate"), "Host: a.test\r\nHost: evil.test\r\n")
    v["host-missing"] = _get(p("host-missing"), "")
    v["abs-with-bad-host"] = _get("http://a.test/smuggle/abs-with-bad-host", "Host: a/b\r\n")
    # Connection nominating what routes and frames the request.
    v["connection-host"] = _get(p("connection-host"), "Host: a.test\r\nConnection: host\r\n")
    v["connection-cl"] = _post(
        p("connection-cl"), "Connection: content-length\r\nContent-Length: 5\r\n", "hello"
    )
    # Trailers that could only be an attack.
    for name, trailer in {
        "trailer-host": "Host: evil.test",
        "trailer-xfh": "X-Forwarded-Host: evil.test",
        "trailer-authorization": "Authorization: Basic ZXZpbA==",
        "trailer-cl": "Content-Length: 5",
        "trailer-te": "Transfer-Encoding: chunked",
        "trailer-underscore": "X_Forwarded_Host: evil.test",
    }.items():
        v[name] = _chunked(p(name), f"5\r\nhello\r\n0\r\n{trailer}\r\n\r\n")
    # Bodies on methods that have none.
    v["get-body"] = _get(p("get-body"), "Host: a\r\nContent-Length: 5\r\n") + b"hello"
    v["get-chunked"] = _get(p("get-chunked"), "Host: a\r\nTransfer-Encoding: chunked\r\n") + (
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    v["head-body"] = (
        f"HEAD {p('head-body')} HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello".encode()
    )
    return v


#: Vectors answered with another status than 400 (still closed, still never forwarded): a
#: chunk declared larger than the body limit is 413 before its bytes arrive, as nginx does.
EXPECTED_STATUS = {"chunk-over-limit": 413}
#: A request hidden behind each vector: the origin must never see it either.
HIDDEN = b"GET /hidden/%s HTTP/1.1\r\nHost: a.test\r\n\r\n"


@dataclass
class VectorResult:
    sent: int = 0
    #: Answered 400 (413 for ``EXPECTED_STATUS``) with the connection closed.
    answered_400_and_closed: int = 0
    forwarded: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def h2_goaway_error(data: bytes) -> int | None:
    """The error code of the first HTTP/2 GOAWAY frame in ``data``, None when there is none."""
    at = 0
    while at + 9 <= len(data):
        length = int.from_bytes(data[at : at + 3], "big")
        kind = data[at + 3]
        payload = data[at + 9 : at + 9 + length]
        if kind == 0x7 and len(payload) >= 8:
            return int.from_bytes(payload[4:8], "big")
        at += 9 + length
    return None


#: Vectors the edge reads as another protocol: the HTTP/2 connection preface on the plain
#: listener is h2c with prior knowledge (nginx's ``listen ... http2``); the HTTP/1.1 bytes after
#: it are not HTTP/2 frames, so the answer is a GOAWAY with an error, then the close.
H2_VECTORS = frozenset({"h2-preface"})


def run_vectors(edge: Edge, origin: Origin, timeout: float = 3.0) -> VectorResult:
    result = VectorResult()
    for name, raw in smuggling_vectors().items():
        result.sent += 1
        started = time.monotonic()
        response = exchange(edge.port, raw + HIDDEN % name.encode(), timeout=timeout)
        closed = time.monotonic() - started < timeout  # the edge closed, we did not time out
        if name in H2_VECTORS:
            if closed and h2_goaway_error(response) not in (None, 0):
                result.answered_400_and_closed += 1
            else:
                result.failures.append(f"{name}: closed {closed}: {response[:120]!r}")
            continue
        got = statuses(response)
        expected = EXPECTED_STATUS.get(name, 400)
        if got == [expected] and b"connection: close" in response and closed:
            result.answered_400_and_closed += 1
        else:
            result.failures.append(f"{name}: statuses {got}, closed {closed}: {response[:120]!r}")
    for record in origin.seen():
        if "smuggle" in record["path"] or "hidden" in record["path"]:
            result.forwarded.append(record["path"])
    return result


@pytest.mark.reliability
def test_smuggling_vectors_are_refused_and_nothing_reaches_the_origin(world):
    edge, origin = world
    result = run_vectors(edge, origin)
    assert result.sent >= 60
    assert result.failures == []
    assert result.answered_400_and_closed == result.sent
    assert result.forwarded == []


# --------------------------------------------------------------------------------------------
# Test 9: the poisoning matrix


@dataclass(frozen=True)
class Row:
    name: str
    #: The attacker's raw request; ``{path}`` is the row's victim path.
    attack: str
    #: The victim's extra header lines.
    victim_headers: str = ""
    #: The variant the victim asked for (the echo origin reflects X-Variant).
    variant: str | None = None
    #: The attack's answer was personal: the victim must get a fresh one (n == 2).
    personal: bool = False
    #: The victim's path, when not ``/cc/<name>``.
    path: str = ""


def _row_get(headers: str, target: str = "{path}", host: str = VICTIM) -> str:
    return f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n"


MATRIX = [
    Row("xfh", _row_get("X-Forwarded-Host: evil.test\r\n")),
    Row("xfh-twice", _row_get("X-Forwarded-Host: evil.test\r\nX-Forwarded-Host: evil2.test\r\n")),
    Row("x-host", _row_get("X-Host: evil.test\r\n")),
    Row("x-original-host", _row_get("X-Original-Host: evil.test\r\n")),
    Row("x-original-url", _row_get("X-Original-URL: /evil\r\n")),
    Row("x-rewrite-url", _row_get("X-Rewrite-URL: /evil\r\n")),
    Row("method-override", _row_get("X-HTTP-Method-Override: EVIL\r\n")),
    Row("forwarded", _row_get("Forwarded: host=evil.test;proto=https\r\n")),
    Row("xfp", _row_get("X-Forwarded-Proto: evil\r\nX-Forwarded-Scheme: evil\r\n")),
    Row("abs-form-host-mismatch", _row_get("", "http://victim.test{path}", "evil.test")),
    Row("abs-form-https", _row_get("", "https://victim.test{path}", "evil.test")),
    Row("abs-form-other-authority", _row_get("", "http://evil.test{path}")),
    Row(
        "abs-form-port", _row_get("X-Forwarded-Host: evil.test\r\n", "http://victim.test:80{path}")
    ),
    Row("host-slash", _row_get("", "/cc/host-slash", "victim.test/cc"), path="/cc/cc/host-slash"),
    Row("host-case-dot-port", _row_get("", "{path}", "VICTIM.test.:80")),
    Row("host-at", _row_get("", "{path}", "evil.test@victim.test")),
    Row("host-duplicate", _row_get("Host: evil.test\r\n")),
    Row("host-port-junk", _row_get("", "{path}", "victim.test:80evil")),
    Row(
        "connection-variant",
        _row_get("Connection: x-variant\r\nX-Variant: blue\r\n", "{path}?vary=X-Variant"),
        victim_headers="X-Variant: blue\r\n",
        variant="blue",
        path="/cc/connection-variant?vary=X-Variant",
    ),
    Row("connection-host", _row_get("Connection: host\r\n")),
    Row("connection-xfh", _row_get("Connection: x-forwarded-host\r\nX-Forwarded-Host: evil\r\n")),
    Row(
        "connection-cookie",
        _row_get(
            "Connection: cookie\r\nCookie: session=evil\r\n", "/cc/rule/connection-cookie?cc="
        ),
        path="/cc/rule/connection-cookie?cc=",
    ),
    Row(
        "trailer-xfh",
        "POST {path} HTTP/1.1\r\nHost: victim.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        "5\r\nhello\r\n0\r\nX-Forwarded-Host: evil.test\r\n\r\n",
    ),
    Row(
        "trailer-benign",
        "POST {path} HTTP/1.1\r\nHost: victim.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        "5\r\nhello\r\n0\r\nX-Evil-Trailer: evil\r\n\r\n",
    ),
    Row("underscore-xfh", _row_get("X_Forwarded_Host: evil.test\r\nX_Original_URL: /evil\r\n")),
    Row("underscore-te", _row_get("Transfer_Encoding: chunked\r\n")),
    Row("fragment", _row_get("", "{path}#evil")),
    Row("dot-segment", _row_get("", "/cc/evil/../dot-segment")),
    Row("get-body", _row_get("Content-Length: 4\r\n", "{path}") + "evil"),
    Row(
        "cookie-rule-ttl",
        _row_get("Cookie: session=evil\r\n", "/cc/rule/cookie-rule-ttl?cc="),
        personal=True,
        path="/cc/rule/cookie-rule-ttl?cc=",
    ),
    Row(
        "authorization-rule-ttl",
        _row_get("Authorization: Bearer evil\r\n", "/cc/rule/authorization-rule-ttl?cc="),
        personal=True,
        path="/cc/rule/authorization-rule-ttl?cc=",
    ),
]


def check_victim(edge: Edge, row: Row) -> str | None:
    """None when the victim's answer is the clean one, else what was wrong."""
    path = row.path or f"/cc/{row.name}"
    status, headers, body = get(edge.port, path, VICTIM, row.victim_headers)
    if status != 200:
        return f"victim got {status}"
    if EVIL in body.decode("latin-1").lower():
        return f"victim got the attacker's answer: {body[:200]!r}"
    document = json.loads(body)
    expected = {
        "path": path,
        "host": VICTIM,
        "host_header": VICTIM,
        "method": "GET",
        "variant": row.variant,
    }
    for key, value in expected.items():
        if document[key] != value:
            return f"victim's {key} is {document[key]!r}, not {value!r}"
    if row.personal and (document["n"] != 2 or headers.get("x-cache") == "HIT"):
        return f"victim got the stored personal answer (n={document['n']})"
    return None


@dataclass
class MatrixResult:
    rows: int = 0
    clean: int = 0
    failures: list[str] = field(default_factory=list)


def run_matrix(edge: Edge, origin: Origin, prefix: str = "") -> MatrixResult:
    result = MatrixResult()
    for row in MATRIX:
        result.rows += 1
        path = row.path or f"/cc/{row.name}"
        attack = row.attack.replace("{path}", path.split("?")[0])
        exchange(edge.port, attack.encode("latin-1"))
        problem = check_victim(edge, row)
        if problem is None:
            result.clean += 1
        else:
            result.failures.append(f"{row.name}: {problem}")
    underscores = [
        (r["path"], name) for r in origin.seen() for name, _ in r["headers"] if "_" in name
    ]
    if underscores:
        result.failures.append(f"underscore headers reached the origin: {underscores}")
    return result


@pytest.mark.reliability
def test_no_victim_ever_gets_an_attackers_answer(world):
    edge, origin = world
    result = run_matrix(edge, origin)
    assert result.rows >= 30
    assert result.failures == []
    assert result.clean == result.rows


# --------------------------------------------------------------------------------------------
# One test per defect (each failed before the fix)


def _sent_headers(origin: Origin, path: str) -> list[dict[str, str]]:
    return [{k.lower(): v for k, v in r["headers"]} for r in origin.seen_for(path)]


def test_an_absolute_form_target_decides_key_host_and_forwarded_host_together(world):
    """Defect 1: keyed and forwarded by the URI's authority, X-Forwarded-Host from Host."""
    edge, origin = world
    raw = "GET http://victim.test/cc/d1 HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n"
    assert parse_response(exchange(edge.port, raw.encode()))[0] == 200
    [sent] = _sent_headers(origin, "/cc/d1")
    assert sent["host"] == sent["x-forwarded-host"] == VICTIM
    _, headers, body = get(edge.port, "/cc/d1")
    assert json.loads(body)["host"] == VICTIM and headers["x-cache"] == "HIT"


def test_a_host_with_a_slash_is_refused_and_collides_with_nothing(world):
    """Defect 2: ``Host: good.test/victim`` + ``/x`` filled the entry of ``/victim/x``."""
    edge, origin = world
    raw = b"GET /d2 HTTP/1.1\r\nHost: victim.test/cc\r\nConnection: close\r\n\r\n"
    assert statuses(exchange(edge.port, raw)) == [400]
    assert seen(origin, "/d2") == []


def test_trailer_fields_never_become_request_headers(world):
    """Defect 5: a second Host, X-Forwarded-Host and Authorization reached the origin."""
    edge, origin = world
    attack = (
        b"POST /d5-attack HTTP/1.1\r\nHost: victim.test\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n5\r\nhello\r\n0\r\nHost: evil.test\r\n"
        b"Authorization: Basic ZXZpbA==\r\n\r\n"
    )
    assert statuses(exchange(edge.port, attack)) == [400]
    assert seen(origin, "/d5-attack") == []
    benign = (
        b"POST /d5 HTTP/1.1\r\nHost: victim.test\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n5\r\nhello\r\n0\r\nX-Checksum: 1\r\n\r\n"
    )
    status, _, body = parse_response(exchange(edge.port, benign))
    assert status == 200 and json.loads(body)["body_length"] == 5
    [sent] = _sent_headers(origin, "/d5")
    assert "x-checksum" not in sent and sent["host"] == VICTIM


def test_connection_cannot_make_a_fill_store_the_wrong_variant_or_host(world):
    """Defect 6: ``Connection: x-lang`` stored the default answer as the client's variant;
    ``Connection: host`` stored a response for another host."""
    edge, origin = world
    path = "/cc/d6?vary=X-Variant"
    get(edge.port, path, headers="Connection: x-variant\r\nX-Variant: fr\r\n")
    _, _, body = get(edge.port, path, headers="X-Variant: fr\r\n")
    assert json.loads(body)["variant"] == "fr"
    raw = b"GET /cc/d6b HTTP/1.1\r\nHost: victim.test\r\nConnection: host\r\n\r\n"
    assert statuses(exchange(edge.port, raw)) == [400]
    assert seen(origin, "/cc/d6b") == []


def test_header_names_with_underscores_never_reach_the_origin(world):
    """Defect 10: ``X_Forwarded_For`` and friends passed verbatim."""
    edge, origin = world
    status, _, _ = get(
        edge.port, "/d10", headers="X_Forwarded_For: 6.6.6.6\r\nX_Forwarded_Host: evil.test\r\n"
    )
    assert status == 200
    [record] = origin.seen_for("/d10")
    assert [name for name, _ in record["headers"] if "_" in name] == []
    raw = (
        b"POST /d10b HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer_Encoding: chunked\r\n\r\n"
    )
    assert statuses(exchange(edge.port, raw + b"hello")) == [400]
    assert seen(origin, "/d10b") == []


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /d13/http09 HTTP/0.9\r\nHost: a\r\n\r\n",
        b"GET /d13/http20 HTTP/2.0\r\nHost: a\r\n\r\n",
        b"GET ftp://a.test/d13/ftp HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /d13/host HTTP/1.1\r\nHost: a b\r\n\r\n",
        b"POST /d13/chunk HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"ffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        b"GET /d13/get-body HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    ],
    ids=["http09", "http20", "ftp", "invalid-host", "chunk-2^64-1", "get-body"],
)
def test_the_parser_refuses_what_it_used_to_accept(world, raw):
    """Defect 13: each was accepted (and forwarded)."""
    edge, origin = world
    response = exchange(edge.port, raw)
    assert statuses(response) == [400] and b"connection: close" in response
    assert seen(origin, "/d13/") == []


def test_a_chunk_error_after_a_pause_leaves_the_origin_untouched(world):
    """Defect 13: the head of a request reached the origin before a later chunk error."""
    edge, origin = world
    head = b"POST /d13/late HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    response = exchange(edge.port, head + b"5\r\nhello\r\n", b"zz\r\n0\r\n\r\n", pause=0.3)
    assert statuses(response) == [400]
    assert seen(origin, "/d13/late") == []


def test_a_rule_ttl_never_shares_the_answer_to_a_request_with_a_cookie(world):
    """Defect 15: a rule's ttl stored the answer to a request with a Cookie."""
    edge, _ = world
    path = "/cc/rule/d15?cc="
    get(edge.port, path, headers="Cookie: session=alice\r\n")
    _, headers, body = get(edge.port, path)
    assert json.loads(body)["n"] == 2 and headers["x-cache"] == "MISS"
    # Without a Cookie the rule's ttl stores it as before.
    _, headers, _ = get(edge.port, path)
    assert headers["x-cache"] == "HIT"


def test_a_rule_prefix_matches_on_segment_boundaries_only(world):
    """Defect 15: ``/cc/sym`` (like the demo's ``/api/v1/symbols``) covered ``/cc/symX``."""
    edge, _ = world
    get(edge.port, "/cc/symbolsX?cc=")
    _, headers, _ = get(edge.port, "/cc/symbolsX?cc=")
    assert headers["x-cache"] == "MISS"  # no rule, no freshness: never stored
    get(edge.port, "/cc/sym?cc=")
    assert get(edge.port, "/cc/sym?cc=")[1]["x-cache"] == "HIT"  # the rule's own path


def test_the_normalised_host_is_what_the_origin_sees(world):
    """Defect 15: a Host the key normalised was forwarded raw (and echoed to everyone)."""
    edge, origin = world
    get(edge.port, "/cc/d15-host", host="VICTIM.Test.:80")
    [sent] = _sent_headers(origin, "/cc/d15-host")
    assert sent["host"] == sent["x-forwarded-host"] == VICTIM
    _, _, body = get(edge.port, "/cc/d15-host")
    assert json.loads(body)["host_header"] == VICTIM


# --------------------------------------------------------------------------------------------
# The scanner follows the raw bytes however they arrive (it runs ahead of the parser)


def test_pipelined_requests_of_every_framing_are_answered_in_order(world):
    edge, origin = world
    raw = (
        b"GET /pipe/1 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /pipe/2 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
        b"POST /pipe/3 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nabc\r\n0\r\nX-Sum: 1\r\n\r\n"
        b"\r\nPOST /pipe/4 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nde\r\n0\r\n\r\n"
        b"GET /pipe/5 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    response = exchange(edge.port, raw)
    assert statuses(response) == [200] * 5
    lengths = [json.loads(part)["body_length"] for part in _json_bodies(response)]
    assert lengths == [0, 5, 3, 2, 0]
    assert [r["path"] for r in seen(origin, "/pipe/")] == [f"/pipe/{i}" for i in range(1, 6)]


@pytest.mark.parametrize(
    "cuts",
    [(-3, -2, -1), (-1, 1, 2, 3, 4), (-2, 14, 15, 16, 18, 38, 40, 44), (-30, 5, 17)],
    ids=["in-head-end", "in-size-line", "around-chunk-ends", "coarse"],
)
def test_a_chunked_request_split_anywhere_is_forwarded_whole(world, cuts):
    """``cuts`` are offsets from the end of the head (the scanner must find it in any chunk)."""
    edge, origin = world
    path = "/split/" + str(abs(hash(cuts)))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    raw = head + b"a\r\n0123456789\r\n10\r\n" + b"x" * 16 + b"\r\n0\r\nX-Sum: 2\r\n\r\n"
    bounds = [0, *(len(head) + cut for cut in cuts), len(raw)]
    writes = [raw[lo:hi] for lo, hi in itertools.pairwise(bounds)]
    status, _, body = parse_response(exchange(edge.port, *writes, pause=0.02))
    assert status == 200 and json.loads(body)["body_length"] == 26
    assert len(seen(origin, path)) == 1


def _json_bodies(response: bytes) -> list[bytes]:
    bodies = []
    for part in response.split(b"HTTP/1.1 ")[1:]:
        _, _, body = parse_response(b"HTTP/1.1 " + part)
        bodies.append(body)
    return bodies
