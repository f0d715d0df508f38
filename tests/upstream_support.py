"""A raw origin for the upstream client's tests: ``python -m tests.upstream_support``.

It writes its answers byte by byte (no framework smoothing them), counts the TCP connections
it accepted and the requests per path, and misbehaves on purpose by path:

``/ok?size=N``            200 with a Content-Length body of N bytes
``/chunked?size=N``       200, chunked, with a trailer
``/slow-head?ms=N``       the head after N ms
``/stall-body``           head (Content-Length 100) and 10 bytes, then nothing
``/short``                Content-Length 100, 10 bytes, then close
``/long``                 Content-Length 5, then 10 bytes more than that
``/chunk-cut``            chunked, one chunk, then close
``/garbage``              not HTTP at all
``/both``                 Content-Length and Transfer-Encoding together
``/drop``                 close without a word
``/close-delimited``      no length: the body ends with the connection
``/big?mb=N``             N MiB of body, written as the reader takes it
``/echo-body``            the request body's length and SHA-256 (chunked or with length)
``/ws``                   a WebSocket handshake, then one text frame "hello"
``/slow-read``            reads a Content-Length body 64 KiB every 5 ms, then 200 "read"
``/stats``                {"connections": accepted, "paths": {path: requests}} (not counted)
``/healthz``              200 (counted: each health check comes on a connection of its own)

``/ok`` answers HEAD with its head alone; ``Connection: close`` is honoured after any answer.

It prints ``listening port=N`` once bound (port 0: the system picks).  With ``--cert`` it
serves TLS (and with ``--client-ca`` asks for a client certificate).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import ssl
import sys
from urllib.parse import parse_qs, urlsplit

CONNECTIONS = 0
PATHS: dict[str, int] = {}


def _response(status: int, body: bytes, extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\n{extra}\r\n".encode("latin-1")
        + body
    )


async def _read_body(reader: asyncio.StreamReader, head: dict[str, str]) -> bytes:
    if head.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b""):
                    pass
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readline()
    length = int(head.get("content-length", "0"))
    return await reader.readexactly(length) if length else b""


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    global CONNECTIONS
    CONNECTIONS += 1
    try:
        while True:
            try:
                raw = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            lines = raw.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            head = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    head[name.strip().lower()] = value.strip()
            url = urlsplit(target)
            if url.path == "/slow-read":
                # Reads the body slowly (64 KiB every 5 ms), counting it, then answers.
                PATHS["/slow-read"] = PATHS.get("/slow-read", 0) + 1
                left = int(head.get("content-length", "0"))
                while left:
                    piece = await reader.read(min(left, 65536))
                    if not piece:
                        return
                    left -= len(piece)
                    await asyncio.sleep(0.005)
                writer.write(_response(200, b"read", "cache-control: no-store\r\n"))
                await writer.drain()
                continue
            if url.path == "/ws" and head.get("upgrade", "").lower() == "websocket":
                # A WebSocket handshake, then one text frame "hello" (unmasked, as a server
                # sends it), then whatever comes is dropped.
                PATHS["/ws"] = PATHS.get("/ws", 0) + 1
                accept = base64.b64encode(
                    hashlib.sha1(
                        head["sec-websocket-key"].encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
                    ).digest()
                )
                writer.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
                    b"\x81\x05hello"
                )
                await writer.drain()
                while await reader.read(65536):
                    pass
                return
            body = await _read_body(reader, head)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            path = url.path
            if path == "/healthz":
                PATHS[path] = PATHS.get(path, 0) + 1
            if path in ("/stats", "/healthz"):
                data = json.dumps({"connections": CONNECTIONS, "paths": PATHS}).encode()
                writer.write(_response(200, data, "cache-control: no-store\r\n"))
                await writer.drain()
                if head.get("connection", "").lower() == "close":
                    return
                continue
            PATHS[path] = PATHS.get(path, 0) + 1
            if not await _answer(path, query, method, head, body, writer):
                return
            if head.get("connection", "").lower() == "close":
                return
    finally:
        writer.close()


async def _answer(
    path: str,
    query: dict[str, str],
    method: str,
    head: dict[str, str],
    body: bytes,
    writer: asyncio.StreamWriter,
) -> bool:
    """Write the answer; False when the connection is to end."""
    cache = "cache-control: public, max-age=60\r\n"
    if path == "/ok":
        data = _response(200, b"x" * int(query.get("size", "2")), cache)
        writer.write(data.partition(b"\r\n\r\n")[0] + b"\r\n\r\n" if method == "HEAD" else data)
    elif path == "/chunked":
        size = int(query.get("size", "10"))
        writer.write(b"HTTP/1.1 200 X\r\ntransfer-encoding: chunked\r\n" + cache.encode())
        writer.write(b"\r\n%x\r\n%b\r\n0\r\nx-trailer: t\r\n\r\n" % (size, b"c" * size))
    elif path == "/slow-head":
        await asyncio.sleep(int(query.get("ms", "1000")) / 1000)
        writer.write(_response(200, b"late", cache))
    elif path == "/stall-body":
        writer.write(b"HTTP/1.1 200 X\r\ncontent-length: 100\r\n" + cache.encode() + b"\r\n")
        writer.write(b"s" * 10)
        await writer.drain()
        await asyncio.sleep(3600)
    elif path == "/short":
        writer.write(b"HTTP/1.1 200 X\r\ncontent-length: 100\r\n" + cache.encode() + b"\r\n")
        writer.write(b"s" * 10)
        await writer.drain()
        return False
    elif path == "/long":
        writer.write(_response(200, b"hello", cache) + b"0123456789")
    elif path == "/chunk-cut":
        writer.write(b"HTTP/1.1 200 X\r\ntransfer-encoding: chunked\r\n" + cache.encode())
        writer.write(b"\r\n5\r\nhello\r\n")
        await writer.drain()
        return False
    elif path == "/garbage":
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()
        return False
    elif path == "/both":
        writer.write(
            b"HTTP/1.1 200 X\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        )
    elif path == "/drop":
        return False
    elif path == "/close-delimited":
        writer.write(b"HTTP/1.1 200 X\r\n" + cache.encode() + b"\r\nuntil the end")
        await writer.drain()
        return False
    elif path == "/big":
        size = int(query.get("mb", "100")) * 2**20
        writer.write(b"HTTP/1.1 200 X\r\ncontent-length: %d\r\n\r\n" % size)
        piece = b"b" * 2**16
        for _ in range(size // len(piece)):
            writer.write(piece)
            await writer.drain()
    elif path == "/echo-body":
        answer = {
            "method": method,
            "length": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
            "framing": "chunked" if "transfer-encoding" in head else "length",
        }
        writer.write(_response(200, json.dumps(answer).encode(), "cache-control: no-store\r\n"))
    else:
        writer.write(_response(404, b"no such path"))
    await writer.drain()
    return True


async def _main(port: int, tls: ssl.SSLContext | None) -> None:
    server = await asyncio.start_server(_serve, "127.0.0.1", port, ssl=tls)
    bound = server.sockets[0].getsockname()[1]
    print(f"listening port={bound}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cert", help="PEM certificate chain and key: serve TLS")
    parser.add_argument("--client-ca", help="require a client certificate from this CA")
    args = parser.parse_args(argv)
    tls = None
    if args.cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.cert)
        if args.client_ca:
            tls.load_verify_locations(args.client_ca)
            tls.verify_mode = ssl.CERT_REQUIRED
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args.port, tls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
