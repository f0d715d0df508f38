"""Certificates and keys for the edge's TLS listener, read and judged before anything serves.

``read_certificates`` loads every ``edge.tls.certificates`` entry and returns what the edge
needs (the PEM files, the names each certificate answers for, its key type) together with one
problem line per thing that is wrong: an unreadable file, a key that is not the certificate's,
a certificate expired or not yet valid, a name listed in ``names`` the certificate does not
cover, two certificates of the same key type for one name, a ``default`` no certificate
covers.  ``meridian check``, the config load at start and every SIGHUP reload go through it, so
a bad certificate is one line naming the field, never a half-configured listener.

Pure but for reading the files (and OpenSSL's own check that it can load the pair).
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

if TYPE_CHECKING:
    from meridian.config import EdgeTls

#: "RSA", "ECDSA" or "Ed25519": one certificate per key type and name (OpenSSL picks by the
#: client's signature algorithms).
KeyType = str


@dataclass(frozen=True, slots=True)
class LoadedCertificate:
    """One ``edge.tls.certificates`` entry, read and checked."""

    index: int
    cert_path: str
    key_path: str
    #: The names this certificate serves (its configured ``names``, else its DNS SANs),
    #: lower-case; wildcards as ``*.example.com``.
    names: tuple[str, ...]
    key_type: KeyType
    not_after: datetime.datetime


def resolve(path: str, source: str) -> str:
    """``path`` relative to the directory of the config file ``source`` (absolute kept)."""
    candidate = Path(path)
    if candidate.is_absolute() or source.startswith("<"):
        return str(candidate)
    return str(Path(source).resolve().parent / candidate)


def name_matches(pattern: str, name: str) -> bool:
    """RFC 6125 matching of one DNS SAN (``*.example.com`` covers one label) to ``name``."""
    if pattern == name:
        return True
    if pattern.startswith("*."):
        head, dot, rest = name.partition(".")
        return bool(head) and bool(dot) and rest == pattern[2:]
    return False


def read_certificates(
    tls: EdgeTls, source: str, *, now: datetime.datetime | None = None
) -> tuple[list[LoadedCertificate], list[str]]:
    """Every certificate of ``tls`` loaded and checked; (certificates, problems)."""
    moment = now or datetime.datetime.now(datetime.UTC)
    loaded: list[LoadedCertificate] = []
    problems: list[str] = []
    for index, entry in enumerate(tls.certificates):
        where = f"edge.tls.certificates[{index}]"
        cert_path = resolve(entry.cert, source)
        key_path = resolve(entry.key, source)
        try:
            cert_pem = Path(cert_path).read_bytes()
        except OSError as exc:
            problems.append(f"{where}.cert: cannot read {cert_path}: {exc.strerror or exc}")
            continue
        try:
            key_pem = Path(key_path).read_bytes()
        except OSError as exc:
            problems.append(f"{where}.key: cannot read {key_path}: {exc.strerror or exc}")
            continue
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as exc:
            problems.append(f"{where}.cert: {cert_path} is not a PEM certificate ({exc})")
            continue
        try:
            key = load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            problems.append(
                f"{where}.key: {key_path} is not an unencrypted PEM private key ({exc})"
            )
            continue
        if key.public_key() != cert.public_key():
            problems.append(f"{where}.key: {key_path} is not the key of {cert_path}")
            continue
        key_type = _key_type(key)
        if key_type is None:
            problems.append(f"{where}.key: only RSA, ECDSA and Ed25519 keys are served")
            continue
        not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
        if not_after <= moment:
            problems.append(f"{where}.cert: {cert_path} expired on {not_after:%Y-%m-%d %H:%M} UTC")
            continue
        if not_before > moment:
            problems.append(
                f"{where}.cert: {cert_path} is not valid before {not_before:%Y-%m-%d %H:%M} UTC"
            )
            continue
        sans = _dns_names(cert)
        if entry.names:
            names = tuple(n.lower().rstrip(".") for n in entry.names)
            uncovered = [n for n in names if not any(name_matches(p, n) for p in sans)]
            if uncovered:
                problems.append(
                    f"{where}.names: {', '.join(uncovered)} not covered by the certificate"
                    f" (it names {', '.join(sans) or 'no DNS names'})"
                )
                continue
        else:
            names = sans
        if not names:
            problems.append(f"{where}.cert: {cert_path} names no DNS name (subjectAltName)")
            continue
        try:  # what OpenSSL itself says about the pair (the context is thrown away)
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_path, key_path)
        except (ssl.SSLError, OSError) as exc:
            problems.append(f"{where}: OpenSSL refuses the pair: {exc}")
            continue
        loaded.append(LoadedCertificate(index, cert_path, key_path, names, key_type, not_after))
    if problems:
        return loaded, problems
    seen: dict[tuple[str, KeyType], int] = {}
    for cert_entry in loaded:
        for name in cert_entry.names:
            other = seen.setdefault((name, cert_entry.key_type), cert_entry.index)
            if other != cert_entry.index:
                problems.append(
                    f"edge.tls.certificates[{cert_entry.index}]: {name} already has an"
                    f" {cert_entry.key_type} certificate (certificates[{other}]); one per key"
                    " type and name"
                )
    if tls.default is not None:
        default = tls.default.lower()
        if not any(name_matches(p, default) for c in loaded for p in c.names):
            problems.append(f"edge.tls.default: no certificate serves {tls.default!r}")
    return loaded, problems


def _key_type(key: object) -> KeyType | None:
    if isinstance(key, rsa.RSAPrivateKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ECDSA"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "Ed25519"
    return None


def _dns_names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    return tuple(n.lower().rstrip(".") for n in san.value.get_values_for_type(x509.DNSName))


@dataclass(frozen=True, slots=True)
class DemoCertificate:
    cert: Path
    key: Path
    #: The throwaway CA that signed it (for ``curl --cacert``).
    ca: Path


def issue_demo_certificate(
    directory: Path, names: list[str], addresses: list[str], *, days: int = 7
) -> DemoCertificate:
    """A throwaway CA and an ECDSA P-256 certificate it signs for ``names`` and
    ``addresses`` (the demo's HTTPS listener; never for production)."""
    import ipaddress

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Meridian demo CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = DemoCertificate(directory / "demo.crt", directory / "demo.key", directory / "ca.pem")
    paths.cert.write_bytes(cert.public_bytes(pem))
    paths.key.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths.key.chmod(0o600)
    paths.ca.write_bytes(ca_cert.public_bytes(pem))
    return paths


__all__ = [
    "DemoCertificate",
    "LoadedCertificate",
    "issue_demo_certificate",
    "name_matches",
    "read_certificates",
    "resolve",
]
