"""``edge.tls`` and ``meridian.certs`` without sockets: handshakes between two ``ssl.SSLObject``
over memory BIOs, certificates from trustme."""

from __future__ import annotations

import contextlib
import datetime
import ssl
from pathlib import Path

import pytest
import trustme

from edge.tls import TlsContexts, TlsStats
from meridian.certs import name_matches, read_certificates
from meridian.config import EdgeTls, HostPort, TlsCertificate
from tests.tls_support import issue


def _tls(*certs: tuple[Path, Path], default: str | None = None, **extra: object) -> EdgeTls:
    return EdgeTls(
        listen=HostPort("127.0.0.1", 8443),
        certificates=tuple(TlsCertificate(str(c), str(k)) for c, k in certs),
        default=default,
        **extra,  # type: ignore[arg-type]
    )


def handshake(
    server: ssl.SSLContext, server_name: str | None, *, alpn: list[str] | None = None
) -> tuple[list[str], str | None, str | None]:
    """(DNS names of the certificate shown, ALPN protocol, TLS version) of one handshake."""
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        client_ctx.set_alpn_protocols(alpn)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_name)
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (client, srv):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if client.version() and srv.version():
            break
    der = client.getpeercert(binary_form=True)
    assert der is not None
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    names = san.value.get_values_for_type(x509.DNSName)
    return names, client.selected_alpn_protocol(), client.version()


def test_sni_exact_wildcard_default_and_alpn(tmp_path):
    ca = trustme.CA()
    a = issue(ca, tmp_path, "a", "a.test")
    b = issue(ca, tmp_path, "b", "b.test", "*.w.test")
    contexts = TlsContexts(
        _tls((a.cert, a.key), (b.cert, b.key), default="b.test"),
        "<memory>",
        http2=True,
        stats=TlsStats(),
    )
    assert handshake(contexts.listening, "a.test")[0] == ["a.test"]
    assert handshake(contexts.listening, "A.TEST")[0] == ["a.test"]  # names are case-blind
    assert "*.w.test" in handshake(contexts.listening, "x.w.test")[0]
    assert "b.test" in handshake(contexts.listening, "y.x.w.test")[0]  # one label only: default
    assert "b.test" in handshake(contexts.listening, None)[0]
    _names, alpn, version = handshake(contexts.listening, "a.test", alpn=["h2", "http/1.1"])
    assert alpn == "h2" and version == "TLSv1.3"
    assert handshake(contexts.listening, "a.test", alpn=["http/1.1"])[1] == "http/1.1"
    http1_only = TlsContexts(_tls((a.cert, a.key)), "<memory>", http2=False, stats=TlsStats())
    assert handshake(http1_only.listening, "a.test", alpn=["h2", "http/1.1"])[1] == "http/1.1"


def test_reload_swaps_certificates_and_a_bad_one_keeps_the_old(tmp_path):
    old_ca, new_ca = trustme.CA(), trustme.CA()
    old = issue(old_ca, tmp_path, "old", "a.test")
    new = issue(new_ca, tmp_path, "new", "a.test", "b.test")
    contexts = TlsContexts(_tls((old.cert, old.key)), "<memory>", http2=True, stats=TlsStats())
    listening = contexts.listening
    assert handshake(listening, "b.test")[0] == ["a.test"]
    assert contexts.reload(_tls((new.cert, new.key)), "<memory>")
    assert contexts.listening is listening  # the session context (tickets) stays
    assert handshake(listening, "b.test")[0] == ["a.test", "b.test"]
    assert not contexts.reload(_tls((new.cert, old.key)), "<memory>")  # mismatched pair
    assert handshake(listening, "b.test")[0] == ["a.test", "b.test"]


def test_min_version_tls13_refuses_a_tls12_client(tmp_path):
    ca = trustme.CA()
    a = issue(ca, tmp_path, "a", "a.test")
    contexts = TlsContexts(
        _tls((a.cert, a.key), min_version="TLSv1.3"), "<memory>", http2=True, stats=TlsStats()
    )
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="a.test")
    server = contexts.listening.wrap_bio(s_in, s_out, server_side=True)
    with pytest.raises(ssl.SSLError):
        for _ in range(5):
            for side in (client, server):
                with contextlib.suppress(ssl.SSLWantReadError):
                    side.do_handshake()
            s_in.write(c_out.read())
            c_in.write(s_out.read())


def _client_flights(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> int:
    """How many flights the client sent before the server's side of a handshake was done."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="a.test")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for flights in range(1, 6):
        with contextlib.suppress(ssl.SSLWantReadError):
            client.do_handshake()
        s_in.write(c_out.read())
        try:
            server.do_handshake()
        except ssl.SSLWantReadError:
            c_in.write(s_out.read())
            continue
        return flights
    raise AssertionError("no handshake in 5 flights")


def test_a_tls13_client_with_an_x25519_share_gets_no_hello_retry(tmp_path):
    # OpenSSL 3's set_ecdh_curve("prime256v1") made P-256 the only group: every client that
    # sent an X25519 key share (curl, browsers, openssl) got a HelloRetryRequest, a third
    # flight and a round trip more per new connection.
    ca = trustme.CA()
    a = issue(ca, tmp_path, "a", "a.test")
    contexts = TlsContexts(_tls((a.cert, a.key)), "<memory>", http2=True, stats=TlsStats())
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    client_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    assert _client_flights(contexts.listening, client_ctx) == 2  # ClientHello, Finished
    # A client that offers only P-256 is served too (its one share is acceptable: no retry),
    # and so is a TLS 1.2 one (ECDHE).
    client_ctx.set_ecdh_curve("prime256v1")
    assert _client_flights(contexts.listening, client_ctx) == 2
    tls12 = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls12.check_hostname = False
    tls12.verify_mode = ssl.CERT_NONE
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    assert _client_flights(contexts.listening, tls12) == 2


def test_certificate_problems_name_the_field(tmp_path):
    ca = trustme.CA()
    good = issue(ca, tmp_path, "good", "a.test")
    rsa_one = issue(ca, tmp_path, "r1", "a.test", key_type=trustme.KeyType.RSA)
    rsa_two = issue(ca, tmp_path, "r2", "a.test", key_type=trustme.KeyType.RSA)
    loaded, problems = read_certificates(
        _tls((good.cert, good.key), (rsa_one.cert, rsa_one.key)), "<memory>"
    )
    assert problems == [] and [c.key_type for c in loaded] == ["ECDSA", "RSA"]
    _, problems = read_certificates(
        _tls((rsa_one.cert, rsa_one.key), (rsa_two.cert, rsa_two.key)), "<memory>"
    )
    assert problems == [
        "edge.tls.certificates[1]: a.test already has an RSA certificate (certificates[0]);"
        " one per key type and name"
    ]
    later = datetime.datetime(9999, 1, 1, tzinfo=datetime.UTC)  # past any test certificate
    _, problems = read_certificates(_tls((good.cert, good.key)), "<memory>", now=later)
    assert len(problems) == 1 and problems[0].startswith("edge.tls.certificates[0].cert: ")
    assert "expired on" in problems[0]
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    _, problems = read_certificates(_tls((garbage, good.key)), "<memory>")
    assert problems[0].startswith("edge.tls.certificates[0].cert: ") and "not a PEM" in problems[0]


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("a.test", "a.test", True),
        ("*.a.test", "x.a.test", True),
        ("*.a.test", "a.test", False),
        ("*.a.test", "y.x.a.test", False),
        ("*.a.test", ".a.test", False),
    ],
)
def test_wildcards_cover_one_label(pattern, name, expected):
    assert name_matches(pattern, name) is expected
