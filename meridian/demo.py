"""``meridian demo``: sample origin regions, the edge and GeoDNS of one POP, all on loopback.

Every part runs as its own process (as in production), started from one config file; Ctrl-C
stops them all, by PID.  ``--port-offset N`` shifts every port so two demos can coexist.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from meridian.config import ConfigError, parse_config
from meridian.log import get_logger
from meridian.supervise import Supervisor, wait_for_port

#: How long the demo waits for every part to listen before it gives up.
START_SECONDS = 60.0
log = get_logger("demo")


def packaged_demo_config() -> Path:
    return Path(str(resources.files("meridian") / "data" / "demo.yaml"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="topology file (default: the embedded demo)")
    parser.add_argument("--pop", default="iad", help="which POP's edge and GeoDNS to run")
    parser.add_argument("--port-offset", type=int, default=0, help="shift every port by N")
    parser.add_argument(
        "--run-for", type=float, default=None, help=argparse.SUPPRESS
    )  # seconds; for tests and scripted smoke runs


def _shift_hostport(value: str, offset: int) -> str:
    host, _, port = value.rpartition(":")
    return f"{host}:{int(port) + offset}"


def _shift_url(url: str, offset: int) -> str:
    parts = urlsplit(url)
    if parts.port is None or parts.hostname is None:
        return url
    return urlunsplit(parts._replace(netloc=f"{parts.hostname}:{parts.port + offset}"))


def shift_ports(data: dict[str, Any], offset: int) -> dict[str, Any]:
    """The same world with every listener, backend and health URL port moved by ``offset``."""
    if not offset:
        return data
    listeners = data.setdefault("listeners", {})
    for key in ("edge", "edge_admin", "dns", "dns_admin"):
        default = {
            "edge": "127.0.0.1:8080",
            "edge_admin": "127.0.0.1:9100",
            "dns": "127.0.0.1:5353",
            "dns_admin": "127.0.0.1:9153",
        }[key]
        listeners[key] = _shift_hostport(str(listeners.get(key, default)), offset)
    for region in (data.get("regions") or {}).values():
        region["backends"] = [_shift_url(u, offset) for u in region.get("backends", [])]
    for pop in (data.get("pops") or {}).values():
        if pop.get("health_url"):
            pop["health_url"] = _shift_url(pop["health_url"], offset)
    return data


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


#: The demo's HTTPS listener is the edge's port plus this (8080 -> 8443).
HTTPS_PORT_OFFSET = 363


def _with_https(data: dict[str, Any], workdir: Path) -> Path | None:
    """An ``edge.tls`` listener with a certificate made now for the demo's API name (and
    localhost, 127.0.0.1), unless the config has one; returns the CA to trust, if made."""
    edge = data.get("edge")
    if not isinstance(edge, dict) or edge.get("tls"):
        return None
    from meridian.certs import issue_demo_certificate

    listen = str((data.get("listeners") or {}).get("edge", "127.0.0.1:8080"))
    host, _, port = listen.rpartition(":")
    zone = str((data.get("dns") or {}).get("zone", "meridian.test")).rstrip(".")
    made = issue_demo_certificate(workdir, [f"api.{zone}", "localhost"], ["127.0.0.1"])
    edge["tls"] = {
        "listen": f"{host}:{int(port) + HTTPS_PORT_OFFSET}",
        "certificates": [{"cert": str(made.cert), "key": str(made.key)}],
    }
    return made.ca


def run(args: argparse.Namespace) -> int:
    source = Path(args.config) if args.config else packaged_demo_config()
    data = yaml.safe_load(source.read_text(encoding="utf-8"))
    data = shift_ports(data, args.port_offset)
    workdir = Path(tempfile.mkdtemp(prefix="meridian-demo-"))
    demo_ca = _with_https(data, workdir)
    try:
        config = parse_config(data, str(source))
        config.pop(args.pop)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    except KeyError:
        print(f"{source}: --pop {args.pop!r} is not a POP of this config", file=sys.stderr)
        return 2

    config_path = workdir / "demo.yaml"
    config_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    base = [sys.executable, "-m", "meridian.cli"]
    common = ["--config", str(config_path), "--pop", args.pop]
    supervisor = Supervisor()
    supervisor.install_signal_handlers()
    try:
        for region in config.regions:
            for url in region.backends:
                parts = urlsplit(url)
                origin_args = [
                    "origin",
                    "--region",
                    region.name,
                    "--host",
                    parts.hostname or "127.0.0.1",
                    "--port",
                    str(parts.port or 80),
                ]
                supervisor.start(f"origin {region.name} {url}", base + origin_args)
        started = ["origins"]
        ls = config.listeners
        for part, module in (("edge", "edge.cli"), ("dns", "geodns.cli")):
            if _available(module):
                supervisor.start(part, [*base, part, *common])
                started.append(part)
            else:
                log.warning("demo_part_missing", part=part, reason="not implemented yet")

        # Generous: a cold start in a container on a busy machine took over 20 s (CI).
        deadline = time.monotonic() + START_SECONDS
        ports = [
            (urlsplit(u).hostname or "127.0.0.1", urlsplit(u).port or 80)
            for r in config.regions
            for u in r.backends
        ]
        if "edge" in started:
            ports.append((ls.edge.host, ls.edge.port))
        if "dns" in started:
            ports.append((ls.dns.host, ls.dns.port))
        for host, port in ports:
            if not wait_for_port(host, port, deadline):
                log.error("demo_start_failed", addr=f"{host}:{port}")
                return 1
        first = config.regions[0].backends[0]
        tls = config.edge.tls
        https_name = f"api.{config.dns.zone.rstrip('.')}"
        if (
            "edge" in started
            and tls is not None
            and not wait_for_port(tls.listen.host, tls.listen.port, deadline)
        ):
            log.error("demo_start_failed", addr=str(tls.listen))
            return 1
        dig = f"dig @{ls.dns.host} -p {ls.dns.port}"
        print(
            f"\nMeridian demo is up (POP {args.pop}; {', '.join(started)}).  Try:\n"
            f"  curl -s {first}/api/v1/ticker/BTC-USD            # an origin directly\n"
            + (
                f"  curl -si http://{ls.edge}/api/v1/ticker/BTC-USD   # via the edge\n"
                f"  curl -s --compressed -H 'Accept-Encoding: br'"
                f" http://{ls.edge}/api/v1/depth/BTC-USD\n"
                f"  curl -s http://{ls.edge_admin}/metrics | grep meridian_\n"
                f"  open http://{ls.edge_admin}/                     # the live status page\n"
                if "edge" in started
                else ""
            )
            + (
                f"  curl -si --http2 --cacert {demo_ca} --resolve {https_name}:"
                f"{tls.listen.port}:{tls.listen.host}"
                f" https://{https_name}:{tls.listen.port}/api/v1/ticker/BTC-USD   # HTTPS, h2\n"
                f"  curl -s --http2-prior-knowledge http://{ls.edge}/api/v1/ticker/BTC-USD"
                "   # h2c\n"
                if "edge" in started and tls is not None and demo_ca is not None
                else ""
            )
            + (
                f"  {dig} api.{config.dns.zone} +subnet=200.160.2.0/24\n"
                f"  {dig} origin.{config.dns.zone} +subnet=81.2.69.0/24\n"
                if "dns" in started
                else ""
            )
            + "Ctrl-C stops everything.\n",
            flush=True,
        )
        return supervisor.run(until=time.monotonic() + args.run_for if args.run_for else None)
    finally:
        supervisor.stop()
        log.info("demo_stopped", children=len(supervisor.children))
