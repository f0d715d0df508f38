"""The edge package's one error root.

Every error the edge raises on purpose derives from ``EdgeError``: a rejected request
(``http1.RequestRejected``), a failed upstream attempt (``upstream.UpstreamFailure``), a fill
that got no usable response (``exchange.FetchError``), a body that cannot be delivered
(``transcode.BodyError``, ``compress.DecompressionBomb``).  Foreign errors (aiohttp's, the
operating system's) are caught where the edge meets them, the upstream boundary
(``upstream.UPSTREAM_BODY_ERRORS``), and turned into one of these or into an answer.

A leaf module: everything in ``edge`` may import it.
"""

from __future__ import annotations


class EdgeError(Exception):
    """Root of the errors the edge raises itself."""


__all__ = ["EdgeError"]
