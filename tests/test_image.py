"""The container image, built and run: the Dockerfile as scripts/build-image.sh builds it.

No container registry is reachable here, so the base image is made from Debian's packages
(scripts/image-base.sh: debootstrap bookworm minbase + python3 + python3-venv, about 40 s once
per machine, then cached in /var/cache/meridian-test-base and in buildah's storage), and the
image is built on it with ``buildah bud --isolation chroot``.  The built image then runs with
``buildah run --isolation chroot``, which shares the host's network: ``meridian check`` through
the image's ENTRYPOINT, the demo stack on ports chosen free at test time answering an HTTP
request and DNS queries from the host, the image's own HEALTHCHECK command, the user it runs as,
no compiler, its size.

Deselect with ``-m "not image"``.  Skipped, with the reason, only where buildah cannot run.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rdatatype
import pytest

from tests.edge_support import http_request, poll_until

# The first test builds the image (about 20 s; a minute when the base is not cached yet).
pytestmark = [pytest.mark.image, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent
#: Whole image, and Meridian's share of it (its venv, config and user) over the base.
SIZE_BUDGET_MB = 250
MERIDIAN_BUDGET_MB = 100
IMAGE_USER = "10001:10001"
#: The demo's default ports (meridian.demo), moved together by --port-offset.
DEMO_PORTS = {
    "origins": (9001, 9002, 9003),
    "edge": (8080,),
    "edge_tls": (8443,),  # the edge's port + meridian.demo.HTTPS_PORT_OFFSET
    "edge_admin": (9100,),
    "dns": (5353,),
    "dns_admin": (9153,),
}


def buildah_unusable() -> str | None:
    """Why buildah cannot build and run images here, or None when it can."""
    if shutil.which("buildah") is None:
        return "buildah is not installed (Debian: apt-get install buildah debootstrap)"
    if os.geteuid() != 0:
        return "building the base (debootstrap) and running buildah --isolation chroot need root"
    probe = subprocess.run(
        ["buildah", "from", "--quiet", "scratch"], capture_output=True, text=True, timeout=60
    )
    if probe.returncode != 0:
        return f"buildah cannot create a container here: {probe.stderr.strip()[-300:]}"
    subprocess.run(["buildah", "rm", probe.stdout.strip()], capture_output=True, timeout=60)
    return None


def size_mb(image: str) -> float:
    """The image's size as buildah reports it (decimal MB)."""
    out = buildah("images", "--format", "{{.Size}}", image).strip()
    match = re.fullmatch(r"([\d.]+)\s*([kMG]?B)", out)
    assert match is not None, out
    return float(match.group(1)) * {"B": 1e-6, "kB": 1e-3, "MB": 1.0, "GB": 1e3}[match.group(2)]


def buildah(*args: str, timeout: float = 120) -> str:
    out = subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"buildah {' '.join(args)}: {out.stderr[-2000:]}"
    return out.stdout


@dataclass
class Image:
    name: str
    base: str
    config: dict[str, Any]
    seconds: dict[str, float]
    #: Working containers made by the tests, removed with the image.
    containers: list[str] = field(default_factory=list)
    #: The container one-off commands run in.
    shell: str = ""

    def container(self) -> str:
        name = buildah("from", "--quiet", "--pull=never", self.name).strip()
        self.containers.append(name)
        return name

    def run_argv(
        self, container: str, argv: list[str], env: dict[str, str] | None = None
    ) -> list[str]:
        options = [f"--env={k}={v}" for k, v in (env or {}).items()]
        return ["buildah", "run", "--isolation", "chroot", *options, container, "--", *argv]

    def run(
        self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """``argv`` in a container of the image, as its user, on the host's network."""
        return subprocess.run(
            self.run_argv(self.shell, argv, env), capture_output=True, text=True, timeout=timeout
        )

    @property
    def entrypoint(self) -> list[str]:
        entrypoint: list[str] = self.config["Entrypoint"]
        return entrypoint


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    reason = buildah_unusable()
    if reason is not None:
        pytest.skip(reason)
    seconds = {}
    started = time.monotonic()
    base = subprocess.run(
        ["bash", str(ROOT / "scripts" / "image-base.sh")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert base.returncode == 0, base.stderr[-3000:]
    seconds["base"] = time.monotonic() - started
    tag = f"localhost/meridian:test-{os.getpid()}"
    started = time.monotonic()
    built = subprocess.run(
        [
            "bash",
            str(ROOT / "scripts" / "build-image.sh"),
            "--base",
            base.stdout.strip(),
            "--tag",
            tag,
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    seconds["build"] = time.monotonic() - started
    inspected = json.loads(buildah("inspect", "--type", "image", tag))
    made = Image(tag, base.stdout.strip(), inspected["Docker"]["config"], seconds)
    try:
        made.shell = made.container()
        yield made
    finally:
        for container in made.containers:
            subprocess.run(["buildah", "rm", container], capture_output=True, timeout=60)
        subprocess.run(["buildah", "rmi", tag], capture_output=True, timeout=120)


def test_meridian_check_on_the_shipped_config(image: Image) -> None:
    result = image.run([*image.entrypoint, "check", "/etc/meridian/global.yaml"])
    assert result.returncode == 0, result.stderr
    assert "/etc/meridian/global.yaml: OK" in result.stdout
    assert "pops (20)" in result.stdout
    broken = image.run([*image.entrypoint, "check", "/etc/hostname"])
    assert broken.returncode == 2


def test_runs_as_its_own_non_root_user(image: Image) -> None:
    assert image.config["User"] == IMAGE_USER  # numeric: runAsNonRoot can verify it
    result = image.run(["id", "-u"])
    assert result.stdout.strip() == IMAGE_USER.split(":")[0]
    # What it runs cannot be changed by what it runs.
    assert image.run(["sh", "-c", "touch /opt/meridian/bin/x"]).returncode != 0
    assert image.run(["sh", "-c", "touch /etc/meridian/global.yaml"]).returncode != 0


def test_no_compiler_and_no_installer_left(image: Image) -> None:
    # Executables named like a compiler or linker, anywhere; and the packages that bring them.
    found = image.run(
        [
            "sh",
            "-c",
            "find / -xdev -type f -perm /111 \\( -name cc -o -name 'cc1*' -o -name gcc"
            " -o -name 'gcc-[0-9]*' -o -name '*-linux-gnu-gcc*' -o -name 'c++' -o -name 'g++*'"
            " -o -name 'clang*' -o -name tcc -o -name ld -o -name 'ld.*' -o -name as \\)"
            " -print 2>/dev/null; dpkg-query -W -f '${Package}\\n' | grep -E"
            " '^(gcc|g\\+\\+|cpp|clang|tcc|binutils|libc6-dev|build-essential)(-[0-9]+)?$'",
        ]
    )
    assert found.stdout.strip() == "", found.stdout
    assert found.returncode == 1  # grep found no package (and nothing failed on the way)
    pip = image.run(["/opt/meridian/bin/python", "-c", "import pip"])
    assert pip.returncode != 0, "pip belongs to the build stage"


def test_image_size_within_budget(image: Image) -> None:
    total = size_mb(image.name)
    base = size_mb(image.base)
    assert total <= SIZE_BUDGET_MB, f"{total:.0f} MB"
    assert total - base <= MERIDIAN_BUDGET_MB, f"Meridian adds {total - base:.0f} MB"


# ---------------------------------------------------------------------------- the demo stack


def _free(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _ephemeral_start() -> int:
    """Where the kernel's ephemeral ports begin: another test's client socket may take any of
    them at any moment, so the demo's fixed ports stay below."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def free_offset() -> int:
    """A --port-offset under which every demo port is free now (TCP and UDP), below the
    ephemeral range."""
    ports = [p for group in DEMO_PORTS.values() for p in group]
    rng = random.Random()
    # From 19,000: tests/test_demo.py's band ends there (two pytest workers may run both).
    top = max(_ephemeral_start(), 20_000 + max(ports) + 1)
    for _ in range(200):
        offset = rng.randrange(19_000, top - max(ports))
        if all(_free(p + offset) for p in ports):
            return offset
    raise AssertionError("no free port range for the demo")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children first."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    queue = [pid]
    while queue:
        for child in parents.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError:
        return []


def uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(pid)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def dns_answer(port: int, tcp: bool) -> list[str]:
    query = dns.message.make_query("api.meridian.test", "A")
    ask = dns.query.tcp if tcp else dns.query.udp
    reply = ask(query, "127.0.0.1", port=port, timeout=3)
    return [r.address for rrset in reply.answer if rrset.rdtype == dns.rdatatype.A for r in rrset]


def test_demo_stack_answers_the_host_and_passes_its_healthcheck(
    image: Image, tmp_path: Path
) -> None:
    offset = free_offset()
    edge, admin, dns_port = 8080 + offset, 9100 + offset, 5353 + offset
    container = image.container()
    log_path = tmp_path / "demo.log"
    argv = image.run_argv(container, [*image.entrypoint, "demo", "--port-offset", str(offset)])
    with log_path.open("wb") as log:
        runner = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    tree: list[int] = []
    try:

        def up() -> bool:
            if runner.poll() is not None:
                raise AssertionError(f"demo exited:\n{log_path.read_text()[-12000:]}")
            return "Meridian demo is up" in log_path.read_text(errors="replace")

        poll_until(up, within=90, every=0.1)
        tree = descendants(runner.pid)
        # (buildah-chroot-exec, above it, has the same arguments.)
        (demo,) = [
            p
            for p in tree
            if cmdline(p)[-3:] == ["demo", "--port-offset", str(offset)]
            and cmdline(p)[0].endswith("python3")
        ]
        served = [p for p in tree if "meridian.cli" in cmdline(p)]
        assert len(served) == 5, [cmdline(p) for p in served]  # 3 origins, edge, dns
        assert {uid(p) for p in [demo, *served]} == {int(IMAGE_USER.split(":")[0])}

        # From the host, through the edge to an origin region.
        def ticker() -> tuple[int, dict[str, str], bytes]:
            return http_request(edge, "GET", "/api/v1/ticker/BTC-USD")

        _, headers, body = poll_until(lambda: (r := ticker())[0] == 200 and r, within=30)
        assert headers["x-meridian-region"] == "us-east"
        assert json.loads(body)["symbol"] == "BTC-USD"
        # And GeoDNS, UDP and TCP: the demo's POP addresses.
        assert re.fullmatch(r"127\.0\.1\.\d+", dns_answer(dns_port, tcp=False)[0])
        assert dns_answer(dns_port, tcp=True) == dns_answer(dns_port, tcp=False)

        # The image's own HEALTHCHECK, as a container engine would run it.
        test = image.config["Healthcheck"]["Test"]
        assert test[0] == "CMD"
        healthy = image.run(
            test[1:], env={"MERIDIAN_HEALTHCHECK_URL": f"http://127.0.0.1:{admin}/healthz"}
        )
        assert healthy.returncode == 0, healthy.stderr
        dead = free_offset() + 9100
        unhealthy = image.run(
            test[1:], env={"MERIDIAN_HEALTHCHECK_URL": f"http://127.0.0.1:{dead}/healthz"}
        )
        assert unhealthy.returncode != 0

        # SIGTERM to the demo, by PID: it stops every part and the container's run ends.
        os.kill(demo, signal.SIGTERM)
        assert runner.wait(timeout=30) == 0, log_path.read_text()[-3000:]
        poll_until(lambda: not any(alive(p) for p in tree), within=10)
    finally:
        for pid in reversed(tree):  # whatever is left, by PID
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if runner.poll() is None:
            runner.kill()
            runner.wait(timeout=10)
