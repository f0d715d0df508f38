"""Moving upstream subscriptions back to a nearer region once it has recovered.

A subscription moves off a region that fails (``UpstreamLinks.move_off_unhealthy``) and would
otherwise stay on the farther one for as long as it lives, while requests go back to the
nearer region at once (they choose per request).  Here is when a subscription goes back:

* the policy is pure (``nearer_region``): the first region ahead of the current one, in the
  POP's order of the route's live regions, that has been up continuously for ``hold``
  seconds.  The hold is the hysteresis: a region that flaps never stays up long enough to
  take streams back, so they do not flap with it.
* the health snapshot says whether a region is up, not since when; ``RegionUptime`` records
  the moment this worker first saw each region up (from the health subscription and on
  every sweep), and forgets it when the region is seen down.  A subscription that fails or
  ends in a region restarts that region's hold too (``setback``): the checks may not have
  seen it down (a restart faster than ``fall`` checks), or may pass while its stream
  endpoint fails, and a move back on the next sweep would then repeat every second.
* the moves are spread: at most ``move_back_rate`` subscriptions per sweep (once a second)
  per worker, the others on the next sweeps, so a region that just recovered is not hit by
  every channel's resubscription (each a ``since=`` replay) in the same loop turn.  A budget
  rather than jitter: it bounds the rate whatever the number of channels, and a test can
  count it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from edge.upstream import HealthView


def nearer_region(
    current: str,
    regions: Sequence[str],
    up_since: Mapping[str, float],
    now: float,
    hold: float,
) -> str | None:
    """The region a subscription on ``current`` should move back to, else None.

    ``regions`` are the route's live regions in the POP's order (``live_regions``);
    ``up_since`` says since when each region has been up (absent: not up).  The answer is
    the nearest region ahead of ``current`` that has been up for ``hold`` seconds or more:
    one nearer still that came back only now does not hold the move up (a second move
    follows once it has held).  A ``current`` that is not among ``regions`` is left alone:
    it is down, and moving off it is ``move_off_unhealthy``'s business.
    """
    if current not in regions:
        return None
    for region in regions:
        if region == current:
            return None
        since = up_since.get(region)
        if since is not None and now - since >= hold:
            return region
    return None  # pragma: no cover - current is in regions, so the loop returned


class RegionUptime:
    """When each region came up, as this worker saw it (on the links' clock)."""

    def __init__(self) -> None:
        #: Region -> when it was first seen up since it was last seen down.
        self.since: dict[str, float] = {}

    def observe(self, regions: Iterable[str], health: HealthView, now: float) -> None:
        """Record the regions that are up now: a new one from ``now``, one already up keeps
        its time; one down (or gone from the config) is forgotten."""
        since = self.since
        self.since = {name: since.get(name, now) for name in regions if health.region_up(name)}

    def setback(self, region: str, now: float) -> None:
        """A subscription failed or ended in ``region``: its hold starts again from ``now``
        (a region not seen up stays so: its time is set when it is)."""
        if region in self.since:
            self.since[region] = now
