"""TLS termination: the listener's ``ssl.SSLContext``, certificates chosen by SNI, reload.

The listener is served with one *listening* context that lives as long as the worker.  Its
``sni_callback`` runs for every ClientHello (OpenSSL calls it with or without SNI) and switches
the connection to the context of the certificate for that name (``SniTable``): exact name,
then a wildcard one label up, then the default.  A reload builds a new table and swaps it in;
handshakes from then on get the new certificates, connections already open keep theirs.

Session resumption: the listening context is the OpenSSL *session context* of every
connection (switching contexts in the SNI callback does not change it), so its session cache
and its ticket key survive certificate reloads.  Python's ``ssl`` module cannot set ticket
keys (no ``SSL_CTX_set_tlsext_ticket_key_cb``), so each worker process has its own random
key: a ticket is honoured by the worker that issued it, not by its siblings, and not after a
restart.  Sharing and rotating keys across the workers of a POP needs that binding.

Every context: TLS 1.2 and 1.3 only (``edge.tls.min_version`` may raise it to 1.3), AEAD
ciphers with forward secrecy for 1.2 (Mozilla's "intermediate" list without DHE; TLS 1.3
suites are OpenSSL's defaults, all AEAD), no compression, no renegotiation, ALPN ``h2`` (when
HTTP/2 is enabled) then ``http/1.1``.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from meridian.certs import LoadedCertificate, read_certificates
from meridian.config import ConfigError, EdgeTls
from meridian.log import get_logger

log = get_logger("edge")

#: TLS 1.2 suites: ECDHE key exchange and an AEAD cipher only (Mozilla "intermediate").
TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def alpn_protocols(http2: bool) -> list[str]:
    return ["h2", "http/1.1"] if http2 else ["http/1.1"]


def new_context(min_version: str, alpn: list[str]) -> ssl.SSLContext:
    """A server context with the edge's protocol policy and no certificate yet."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[min_version]
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_SINGLE_ECDH_USE
    context.set_alpn_protocols(alpn)
    # Key exchange groups: OpenSSL's defaults (X25519 first, then P-256, ...), as nginx's
    # ``ssl_ecdh_curve auto``.  Never ``set_ecdh_curve``: on OpenSSL 3 it makes its curve the
    # *only* group, for TLS 1.3 too, so every client offering an X25519 key share (curl,
    # browsers, openssl) got a HelloRetryRequest: one more round trip and a dearer P-256
    # exchange on each new connection (``benchmarks.handshake`` measures it).
    return context


@dataclass(slots=True, eq=False)
class TlsStats(Collector):
    """Handshakes by result (plain numbers, exported on scrape)."""

    full: int = 0
    resumed: int = 0
    #: Failed handshakes by reason.
    failed: dict[str, int] = field(default_factory=dict)
    #: Completed handshakes by negotiated version and ALPN protocol.
    by_version: dict[tuple[str, str], int] = field(default_factory=dict)

    def completed(self, version: str, alpn: str, resumed: bool) -> None:
        if resumed:
            self.resumed += 1
        else:
            self.full += 1
        key = (version, alpn)
        self.by_version[key] = self.by_version.get(key, 0) + 1

    def fail(self, reason: str) -> None:
        self.failed[reason] = self.failed.get(reason, 0) + 1

    def collect(self) -> Iterable[CounterMetricFamily]:
        handshakes = CounterMetricFamily(
            "meridian_edge_tls_handshakes",
            "TLS handshakes on the edge listener: full, resumed, or failed (with the reason).",
            labels=("result", "reason"),
        )
        handshakes.add_metric(("full", ""), self.full)
        handshakes.add_metric(("resumed", ""), self.resumed)
        for reason, count in sorted(self.failed.items()):
            handshakes.add_metric(("failed", reason), count)
        yield handshakes
        versions = CounterMetricFamily(
            "meridian_edge_tls_connections",
            "TLS connections by negotiated version and ALPN protocol.",
            labels=("tls_version", "protocol"),
        )
        for (version, alpn), count in sorted(self.by_version.items()):
            versions.add_metric((version, alpn), count)
        yield versions

    def describe(self) -> Iterable[CounterMetricFamily]:
        return []


class SniTable:
    """Server name -> context, built from one set of loaded certificates."""

    __slots__ = ("default", "exact", "wildcard")

    def __init__(self, tls: EdgeTls, loaded: list[LoadedCertificate], alpn: list[str]) -> None:
        # One context per distinct set of certificates serving a name (an RSA and an ECDSA
        # certificate for the same names share one: OpenSSL picks by the client's algorithms).
        groups: dict[str, list[LoadedCertificate]] = {}
        for cert in loaded:
            for name in cert.names:
                groups.setdefault(name, []).append(cert)
        contexts: dict[tuple[int, ...], ssl.SSLContext] = {}
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wildcard: dict[str, ssl.SSLContext] = {}
        for name, certs in groups.items():
            key = tuple(c.index for c in certs)
            context = contexts.get(key)
            if context is None:
                context = contexts[key] = new_context(tls.min_version, alpn)
                for cert in certs:
                    context.load_cert_chain(cert.cert_path, cert.key_path)
            if name.startswith("*."):
                self.wildcard[name[2:]] = context
            else:
                self.exact[name] = context
        default_name = tls.default.lower() if tls.default else loaded[0].names[0]
        self.default = self.lookup(default_name) or next(iter(contexts.values()))

    def lookup(self, name: str) -> ssl.SSLContext | None:
        context = self.exact.get(name)
        if context is None:
            _, dot, parent = name.partition(".")
            if dot:
                context = self.wildcard.get(parent)
        return context


class TlsContexts:
    """The listening context and the certificates it switches to; ``reload`` swaps them."""

    def __init__(self, tls: EdgeTls, source: str, *, http2: bool, stats: TlsStats) -> None:
        self.stats = stats
        self.alpn = alpn_protocols(http2)
        self.table, loaded = self._build(tls, source)
        self.listening = new_context(tls.min_version, self.alpn)
        # The listening context serves nobody itself (the callback always switches), but
        # OpenSSL wants a certificate on it.
        self.listening.load_cert_chain(loaded[0].cert_path, loaded[0].key_path)
        self.listening.sni_callback = self._on_client_hello

    def _build(self, tls: EdgeTls, source: str) -> tuple[SniTable, list[LoadedCertificate]]:
        loaded, problems = read_certificates(tls, source)
        if problems or not loaded:
            raise ConfigError(problems or ["edge.tls.certificates: none could be loaded"])
        return SniTable(tls, loaded, self.alpn), loaded

    def reload(self, tls: EdgeTls, source: str) -> bool:
        """New handshakes use ``tls``'s certificates (re-read from disk); open connections keep
        theirs.  A certificate that cannot be loaded keeps the old table (logged)."""
        try:
            table = self._build(tls, source)[0]
        except (ConfigError, ssl.SSLError, OSError) as exc:
            problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
            log.error("tls_reload_failed", reason=problems[0])
            return False
        self.table = table
        log.info("tls_reloaded", names=len(table.exact) + len(table.wildcard))
        return True

    def _on_client_hello(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: object
    ) -> int | None:
        table = self.table
        context = table.default
        if server_name:
            context = table.lookup(server_name.lower()) or context
        connection.context = context
        return None


__all__ = ["TLS12_CIPHERS", "SniTable", "TlsContexts", "TlsStats", "alpn_protocols", "new_context"]
