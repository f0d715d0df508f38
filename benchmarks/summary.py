"""One small JSON of a day's figures, worth committing, from the runners' full JSON files.

    python -m benchmarks.summary benchmarks/results-2026-11-21.json \\
        --compare benchmarks/out/2026-11-21-all.json --growth benchmarks/out/growth.json \\
        --profile benchmarks/out/profile/profile.json

Keeps the machine, versions, settings, probes and the median of every (scenario, peer) from
``compare`` (with the ratios to nginx, gdnsd and PowerDNS), the growth tables' rows, and the
top 10 own-time functions of each profile.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RATIO_BASES = {"http": ("nginx",), "dns": ("gdnsd", "pdns")}
KEEP = ("rps", "p50_ms", "p99_ms", "errors", "origin_requests", "hit_pct", "qps")
KEEP_DNS = ("latency_avg_ms", "lost", "completed")


def medians(report: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    groups: dict[tuple[str, str], list[dict[str, float]]] = {}
    for m in report["measurements"]:
        groups.setdefault((m["scenario"], m["peer"]), []).append(m["values"])
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (scenario, peer), rows in groups.items():
        keys = [k for k in (*KEEP, *KEEP_DNS) if k in rows[0]]
        med = {k: round(statistics.median(r[k] for r in rows), 3) for k in keys}
        med["rounds"] = len(rows)
        metric = "rps" if "rps" in med else "qps"
        med[f"{metric}_rounds"] = [round(r[metric]) for r in rows]  # type: ignore[assignment]
        out.setdefault(scenario, {})[peer] = med
    for peers in out.values():
        for base in RATIO_BASES[report["kind"]]:
            if base not in peers:
                continue
            metric = "rps" if "rps" in peers[base] else "qps"
            for med in peers.values():
                if peers[base][metric]:
                    med[f"vs_{base}"] = round(med[metric] / peers[base][metric], 3)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.summary", description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--compare", type=Path, action="append", default=[])
    parser.add_argument("--growth", type=Path)
    parser.add_argument("--profile", type=Path, action="append", default=[])
    args = parser.parse_args(argv)
    summary: dict[str, Any] = {"compare": []}
    for path in args.compare:
        data = json.loads(path.read_text())
        summary["compare"].append(
            {
                "source": path.name,
                "machine": data["machine"],
                "versions": data["versions"],
                "settings": data["settings"],
                "reports": [
                    {
                        "kind": r["kind"],
                        "skipped": r["skipped"],
                        "probes": r["probes"],
                        "medians": medians(r),
                    }
                    for r in data["reports"]
                ],
            }
        )
    if args.growth:
        summary["growth"] = json.loads(args.growth.read_text())
    profile: dict[str, Any] = {}
    for path in args.profile:
        profile.update(json.loads(path.read_text()))
    if profile:
        summary["profile"] = {
            name: {
                "total_s": part["total_s"],
                "requests": part.get("requests"),
                "total_us_per_request": part.get("total_us_per_request"),
                "runs": part.get("runs") or part.get("run"),
                "by_tottime": part["by_tottime"][:10],
            }
            for name, part in profile.items()
        }
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
