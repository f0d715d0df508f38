"""The key-count growth runner's fixed origin (``benchmarks.growth.FixedOrigin``), in its own
process on a real socket, and the runner's options."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.growth import FIXED_BODY, fixed_origin_command, parse_args

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def origin_port() -> Iterator[int]:
    port = _free_port()
    process = subprocess.Popen(
        fixed_origin_command(port, 20),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        assert f"addr=127.0.0.1:{port}" in line, line
        yield port
    finally:
        process.terminate()
        process.wait(10)


def _read_responses(
    sock: socket.socket, count: int
) -> list[tuple[bytes, dict[bytes, bytes], bytes]]:
    data = b""
    responses = []
    deadline = time.monotonic() + 10
    while len(responses) < count and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        assert chunk, "origin closed the connection"
        data += chunk
        while b"\r\n\r\n" in data:
            head, rest = data.split(b"\r\n\r\n", 1)
            status, *lines = head.split(b"\r\n")
            fields = (line.split(b": ", 1) for line in lines)
            headers = {name.lower(): value for name, value in fields}
            length = int(headers[b"content-length"])
            if len(rest) < length:
                break
            responses.append((status, headers, rest[:length]))
            data = rest[length:]
    return responses


def test_fixed_origin_answers_every_get_with_a_cacheable_2k_body(origin_port: int) -> None:
    with socket.create_connection(("127.0.0.1", origin_port), timeout=10) as sock:
        # Pipelined, and split mid-request: each complete request gets one response.
        sock.sendall(b"GET /api/v1/ticker/BTC-USD?k=1 HTTP/1.1\r\nHost: o\r\n\r\nGET /a?k=2 HT")
        time.sleep(0.05)
        sock.sendall(b"TP/1.1\r\nHost: o\r\n\r\nGET /healthz HTTP/1.1\r\nHost: o\r\n\r\n")
        responses = _read_responses(sock, 3)
    assert len(responses) == 3
    for status, headers, body in responses:
        assert status == b"HTTP/1.1 200 OK"
        assert headers[b"cache-control"] == b"public, max-age=3600"
        assert headers[b"date"].endswith(b" GMT")
        assert body == FIXED_BODY
    assert 1900 <= len(FIXED_BODY) <= 2100


def test_fill_budget_default_reaches_a_million_keys() -> None:
    args = parse_args(["keys"])
    assert args.keys == [1000, 100000, 1000000]
    assert args.fill_budget == 900.0
    with pytest.raises(SystemExit):
        parse_args(["keys", "--fill-budget", "2h"])
