"""Test helpers for the edge's TLS listener: certificates made at test time (``trustme``), a
config with ``edge.tls``, and clients that report which certificate they were shown."""

from __future__ import annotations

import datetime
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme

from tests.edge_support import free_port, region, write_config


@dataclass
class CertFiles:
    cert: Path
    key: Path
    ca: Path


def issue(
    ca: trustme.CA,
    directory: Path,
    stem: str,
    *names: str,
    not_after: datetime.datetime | None = None,
    key_type: trustme.KeyType = trustme.KeyType.ECDSA,
) -> CertFiles:
    """A leaf certificate for ``names`` written to ``directory/stem.{crt,key}``, its CA beside."""
    leaf = ca.issue_cert(*names, not_after=not_after, key_type=key_type)
    cert = directory / f"{stem}.crt"
    key = directory / f"{stem}.key"
    ca_path = directory / f"{stem}-ca.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    ca.cert_pem.write_to_path(str(ca_path))
    return CertFiles(cert, key, ca_path)


def tls_config(
    path: Path,
    origin_url: str,
    certificates: list[dict[str, Any]],
    *,
    tls_port: int | None = None,
    edge: dict[str, Any] | None = None,
    **tls: Any,
) -> tuple[Path, int]:
    """A config whose edge has a TLS listener on ``tls_port`` (a free one by default)."""
    port = tls_port or free_port()
    section: dict[str, Any] = {
        "tls": {"listen": f"127.0.0.1:{port}", "certificates": certificates, **tls}
    }
    section.update(edge or {})
    write_config(path, {"us-east": region(39.04, -77.49, [origin_url])}, edge=section)
    return path, port


def peer_names(port: int, cafile: Path, server_name: str | None) -> list[str]:
    """The DNS names of the certificate the edge shows for ``server_name`` (None: no SNI)."""
    context = ssl.create_default_context(cafile=str(cafile))
    context.check_hostname = False  # the names shown are what the caller looks at
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as sock,
    ):
        cert = sock.getpeercert()
    assert cert is not None
    return [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]


def https_get(
    port: int, cafile: Path, name: str, path: str = "/", *, timeout: float = 10.0
) -> tuple[int, bytes]:
    """One HTTP/1.1 GET over TLS to ``name`` (SNI and Host), Connection: close."""
    context = ssl.create_default_context(cafile=str(cafile))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=name) as sock,
    ):
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    raw_response = b"".join(chunks)
    return int(raw_response[9:12]), raw_response
