"""Reliability test 1 (issue 21): SIGHUP x50 under continuous load, 5 of the reloads invalid
configs, edge with ``--workers 2`` -> no failed request, every worker on the last accepted
generation.  The scenario is ``benchmarks.chaos.reload`` (which prints the figures)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks.chaos.reload import INVALID, run_reloads


@pytest.mark.reliability
def test_fifty_reloads_under_load_five_of_them_invalid_fail_no_request(tmp_path: Path) -> None:
    figures = run_reloads(reloads=50, invalid=5, workers=2, clients=8, workdir=tmp_path)
    print(figures)
    assert figures.failed == 0, figures.failures
    assert figures.sent == figures.answered
    assert figures.answered > 1000  # the load really ran
    assert (figures.accepted, figures.rejected) == (45, 5)
    # The reloads happened under load, not between bursts of it.
    assert figures.reloads_under_load >= 40, figures
    assert figures.worker_restarts == 0
    assert figures.final_generations == {"0": 46, "1": 46}
    # Each bad file: one line in the supervisor's log naming the field and the reason; the
    # workers never saw it (nothing adopted but the 45 good generations, twice each).
    log = (tmp_path / "edge.log").read_text()
    rejected = re.findall(r"event=config_reload_rejected reason=(.*) generation=", log)
    assert len(rejected) == len(INVALID) == 5
    for line, field in zip(
        rejected,
        ("invalid YAML", "edge.routes[0].service", "edge.pool_size", "pops:", "drain_timeout"),
        strict=True,
    ):
        assert field in line
    assert len(re.findall(r"event=config_adopted ", log)) == 45 * 2
