"""Settings shared by every test module.

Hypothesis: no per-example deadline and no ``too_slow`` health check.  On CI's loaded 2-core
machine an example's wall time says nothing about whether the property holds, and speed is
proven by the benchmarks (``benchmarks/``), never by a timed unit test.  A test may still ask
for more (or fewer) examples with its own ``@settings``: what it leaves out comes from here.
"""

from hypothesis import HealthCheck, settings

settings.register_profile("meridian", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("meridian")
