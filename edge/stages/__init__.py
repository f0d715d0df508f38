"""The stages of the request path, one job each (``edge.pipeline`` runs them in order):

* ``EdgeState.route`` (``edge.state``): host and path to a route target, memoised
* ``hit``: the cache lookup; answers from cached bytes (the fast path and the slow path)
* ``fill``: MISS / REVALIDATE through ``HttpCache.fill``, and stale-while-revalidate refreshes;
  ``fill_read`` reads the upstream response for the cache or hands it back live
* ``forward``: BYPASS, the client's request as it is, then invalidation for unsafe methods
* ``walk``: the upstream walk (retries, failover, passive health, abandoning a backend that
  left rotation)
* ``respond``: encode (``edge.transcode``), send, or answer an error, through the sink
* ``account``: metrics and the access line of a request on the slow path

Each stage holds the worker's ``EdgeServices`` (the pipeline) and reads ``services.state``
when it needs the config snapshot outside an exchange: only ``state`` is swapped, on reload.
"""
