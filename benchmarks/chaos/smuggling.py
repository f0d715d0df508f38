"""Figures of reliability tests 8 and 9 (issue 21): smuggling vectors and the poisoning matrix.

    python -m benchmarks.chaos.smuggling [--json]

Starts the echo origin and one edge on 127.0.0.1 (as ``tests/test_reliability_http.py``
does), sends every smuggling vector (each followed by a hidden request on the same
connection), then runs every poisoning-matrix row (attack, then a clean victim request), and
prints: vectors sent, answered 400 (413 where stated) with the connection closed, requests of
theirs the origin received (must be 0), matrix rows, victims given the clean answer, and the
wall time.  Exits 1 when any figure is off.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _tests() -> tuple[Any, Any]:
    """The test module that holds the vectors and the matrix, and its process helpers
    (imported at run time: the test suite is not part of the type-checked packages)."""
    support = importlib.import_module("tests.edge_support")
    return importlib.import_module("tests.test_reliability_http"), support.processes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON document, no table")
    args = parser.parse_args(argv)
    started = time.monotonic()
    suite, processes = _tests()
    with tempfile.TemporaryDirectory() as tmp, processes() as procs:
        edge, origin = suite.start_world(Path(tmp), procs)
        vectors = suite.run_vectors(edge, origin)
        matrix = suite.run_matrix(edge, origin)
    failures: list[str] = vectors.failures + vectors.forwarded + matrix.failures
    figures: dict[str, Any] = {
        "vectors_sent": vectors.sent,
        "vectors_refused_and_closed": vectors.answered_400_and_closed,
        "vector_requests_forwarded": len(vectors.forwarded),
        "matrix_rows": matrix.rows,
        "matrix_victims_clean": matrix.clean,
        "failures": failures,
        "seconds": round(time.monotonic() - started, 1),
    }
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for name, value in figures.items():
            if name != "failures":
                print(f"{name:28} {value}")
        for failure in failures:
            print("FAIL", failure)
    ok = (
        not failures
        and vectors.answered_400_and_closed == vectors.sent
        and matrix.clean == matrix.rows
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
