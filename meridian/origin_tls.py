"""TLS to origins: the one client context the edge's upstream client and the health checks share.

Verification is always on: the peer's chain must lead to the system's CA store, or to
``edge.upstream.tls.ca_file`` when one is given (then to it alone), and its certificate must
name the backend URL's host (SNI carries that host; an IP address is matched against the
certificate's IP SANs).  An optional client certificate makes it mutual TLS between POP and
origin.  There is no switch to turn verification off: an origin with a private CA names it.

``context_problems`` is what ``meridian check`` and every config load say about these files,
one line per field; ``client_context`` builds the context from files already judged.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from meridian.certs import resolve

if TYPE_CHECKING:
    from meridian.config import UpstreamTls


class ResumingContext(ssl.SSLContext):
    """A client context that offers its last session on each new connection (TLS session
    resumption across one backend's pooled connections: an abbreviated handshake).

    asyncio's ``create_connection`` takes no session; it calls ``wrap_bio`` to start the
    handshake, so the session is given there.  One context per backend: a session is only ever
    offered to the server that issued it (the context does not know host and port apart)."""

    #: The session to offer (``remember`` keeps the latest); None: a full handshake.
    session: ssl.SSLSession | None

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        offered = session or getattr(self, "session", None)
        return super().wrap_bio(
            incoming,
            outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
            session=offered,
        )


def client_context(tls: UpstreamTls, source: str) -> ResumingContext:
    """A context for ``https://`` backends (one per backend: it resumes that backend's
    sessions); raises ``ssl.SSLError`` / ``OSError``."""
    ca_file = None if tls.ca_file is None else resolve(tls.ca_file, source)
    context = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname on
    context.session = None
    if ca_file is None:
        context.load_default_certs()
    else:
        context.load_verify_locations(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.client_cert is not None:
        key = None if tls.client_key is None else resolve(tls.client_key, source)
        context.load_cert_chain(resolve(tls.client_cert, source), key)
    context.set_alpn_protocols(["http/1.1"])
    return context


def context_problems(tls: UpstreamTls, source: str) -> list[str]:
    """One line per field of ``edge.upstream.tls`` that cannot be used."""
    problems: list[str] = []
    where = "edge.upstream.tls"
    if tls.ca_file is not None:
        try:
            ssl.create_default_context(cafile=resolve(tls.ca_file, source))
        except (OSError, ssl.SSLError) as exc:
            problems.append(f"{where}.ca_file: cannot load {tls.ca_file!r}: {_why(exc)}")
    if tls.client_key is not None and tls.client_cert is None:
        problems.append(f"{where}.client_key: given without client_cert")
    if tls.client_cert is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        key = None if tls.client_key is None else resolve(tls.client_key, source)
        try:
            context.load_cert_chain(resolve(tls.client_cert, source), key)
        except (OSError, ssl.SSLError) as exc:
            problems.append(
                f"{where}.client_cert: cannot load {tls.client_cert!r}"
                f"{'' if key is None else ' with its key'}: {_why(exc)}"
            )
    return problems


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def verify_reason(exc: BaseException) -> str:
    """Why a handshake with an origin failed, in a few words for logs and ``/status``."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate rejected: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    return f"{type(exc).__name__}: {exc}"


__all__ = ["ResumingContext", "client_context", "context_problems", "verify_reason"]
