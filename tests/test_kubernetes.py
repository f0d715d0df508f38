"""Kubernetes (deploy/kubernetes): every kustomization rendered and validated offline, and the
ConfigMap reload done for real.

Offline: each overlay is rendered (``tests.kube_support.kustomize_build``, checked against
``kubectl kustomize`` where kubectl is installed) and every resource validated against the
Kubernetes OpenAPI schemas (``kubernetes-validate``, strict: unknown fields fail) of the oldest
and newest versions we claim; then what the schemas cannot say: the restricted security
context, probes on paths the admin servers serve, the drain fitting the grace period, the
seeds' autoscaling triggers, N+2, three zones, the container args accepted by the CLI, the
ConfigMap's config accepted by ``meridian check``.

For real: ``meridian edge`` (alone and with ``--workers 2``) and ``meridian dns`` read their
config from a directory laid out as the kubelet lays out a ConfigMap volume; the ``..data``
symlink is swapped as the kubelet swaps it, and the new config is served without a signal; a
swap to an invalid config is rejected and the old one keeps serving.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from meridian.cli import build_parser
from meridian.config import load_config
from meridian.lifecycle import FileWatch, file_identity
from meridian.units import parse_size
from tests import dns_support
from tests.edge_support import (
    Origin,
    Proc,
    free_port,
    http_request,
    poll_until,
    region,
    write_config,
)
from tests.kube_support import (
    ConfigMapVolume,
    Resource,
    Unsupported,
    by_id,
    kustomize_build,
    resource_id,
)

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(p.name for p in (KUBE / "overlays").iterdir() if p.is_dir())
KUSTOMIZATIONS = sorted(str(p.parent.relative_to(KUBE)) for p in KUBE.rglob("kustomization.yaml"))
#: The oldest Kubernetes these manifests claim (mixed-protocol LoadBalancer, minDomains) and
#: the newest schemas kubernetes-validate ships.
SCHEMA_VERSIONS = ("1.28", "1.37")
IMAGE_USER = 10001
#: The restricted profile allows these sysctls (the baseline's safe set).
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
}
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def render(name: str) -> list[Resource]:
    return kustomize_build(KUBE / name)


def overlay(pop: str) -> dict[tuple[str, str, str, str], Resource]:
    return by_id(render(f"overlays/{pop}"))


def find(resources: dict[Any, Resource], kind: str, name: str) -> Resource:
    found = [r for r in resources.values() if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_specs(resources: dict[Any, Resource]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (r["metadata"]["name"], r["spec"]["template"]["spec"])
        for r in resources.values()
        if r["kind"] in ("Deployment", "StatefulSet", "DaemonSet")
    ]


def meridian_containers(resources: dict[Any, Resource]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (name, container)
        for name, spec in pod_specs(resources)
        for container in spec["containers"]
        if "/meridian:" in container["image"]
    ]


def cluster_config(resources: dict[Any, Resource], tmp_path: Path) -> Path:
    path = tmp_path / "meridian.yaml"
    path.write_text(find(resources, "ConfigMap", "meridian-config")["data"]["meridian.yaml"])
    return path


# -------------------------------------------------------------------------- rendering, schemas


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_renderer_matches_kubectl_kustomize(name: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the renderer's fidelity is not cross-checked")
    out = subprocess.run(
        [kubectl, "kustomize", str(KUBE / name)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    theirs = by_id([doc for doc in yaml.safe_load_all(out.stdout) if doc])
    assert by_id(render(name)) == theirs


def test_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [cm.yaml]\npatches:\n  - path: patch.yaml\n"
    )
    (tmp_path / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {k: v}\n"
    )
    # A list in a strategic-merge patch: kustomize merges some lists by key, this does not.
    (tmp_path / "patch.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\nextra: [1]\n"
    )
    with pytest.raises(Unsupported):
        kustomize_build(tmp_path)
    (tmp_path / "kustomization.yaml").write_text("resources: [cm.yaml]\nnamePrefix: x-\n")
    with pytest.raises(Unsupported):
        kustomize_build(tmp_path)


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_resource_validates_against_the_kubernetes_schemas(name: str, version: str) -> None:
    resources = render(name)
    assert resources
    for resource in resources:
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {resource_id(resource)} (Kubernetes {version}): {exc}")


def test_the_schema_check_rejects_a_misspelt_field() -> None:
    deployment = find(overlay("iad"), "Deployment", "meridian-edge")
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, SCHEMA_VERSIONS[-1], strict=True)


# ----------------------------------------------------------------------------- each POP's set


@pytest.mark.parametrize("pop", OVERLAYS)
def test_overlay_is_a_complete_pop(pop: str, tmp_path: Path) -> None:
    resources = overlay(pop)
    namespace = find(resources, "Namespace", f"meridian-{pop}")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for key, resource in resources.items():
        if resource["kind"] != "Namespace":
            assert key[2] == f"meridian-{pop}", key
    assert find(resources, "ConfigMap", "meridian-pop")["data"] == {"pop": pop}
    config = load_config(cluster_config(resources, tmp_path))
    config.pop(pop)  # a POP of the world the config describes
    find(resources, "Service", "meridian-redis")
    assert config.edge.cache.redis_url == "redis://meridian-redis:6379/0"
    # Every reference resolves inside the overlay.
    configmaps = {
        r["metadata"]["name"]: r["data"] for r in resources.values() if r["kind"] == "ConfigMap"
    }
    for name, spec in pod_specs(resources):
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps, (name, volume)
        for container in spec["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    assert ref["key"] in configmaps[ref["name"]], (name, env)
    hpa = find(resources, "HorizontalPodAutoscaler", "meridian-edge")
    find(resources, hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"])
    # Selectors (Services, PDBs, spread constraints) pick the pods they mean.
    pods = {
        r["metadata"]["name"]: r["spec"]["template"]["metadata"]["labels"]
        for r in resources.values()
        if r["kind"] in ("Deployment", "StatefulSet")
    }

    def selects(selector: dict[str, str]) -> list[str]:
        return [n for n, labels in pods.items() if selector.items() <= labels.items()]

    for resource in resources.values():
        if resource["kind"] == "Service" and resource["spec"].get("type") != "ExternalName":
            (target,) = selects(resource["spec"]["selector"])
            workload = next(
                r for r in resources.values() if r["metadata"]["name"] == target and "spec" in r
            )
            ports = {
                p["name"]
                for c in workload["spec"]["template"]["spec"]["containers"]
                for p in c.get("ports", [])
            }
            for port in resource["spec"]["ports"]:
                assert port["targetPort"] in ports, (resource["metadata"]["name"], port)
        if resource["kind"] == "PodDisruptionBudget":
            assert selects(resource["spec"]["selector"]["matchLabels"])


@pytest.mark.parametrize("pop", OVERLAYS)
def test_configmap_config_passes_meridian_check(pop: str, tmp_path: Path) -> None:
    path = cluster_config(overlay(pop), tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "meridian.cli", "check", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert f"{path}: OK" in out.stdout


def test_configmap_config_is_the_global_config_with_cluster_addresses() -> None:
    cluster = yaml.safe_load((KUBE / "base" / "meridian.yaml").read_text())
    world = yaml.safe_load((ROOT / "config" / "global.yaml").read_text())
    for document in (cluster, world):
        document.pop("listeners")
        document["edge"]["cache"].pop("redis_url")
    assert cluster == world, "deploy/kubernetes/base/meridian.yaml drifted from config/global.yaml"


def expand(arg: str, env: dict[str, str]) -> str:
    """$(VAR) as the kubelet expands it in args, from the container's environment."""
    return re.sub(r"\$\((\w+)\)", lambda match: env[match.group(1)], arg)


@pytest.mark.parametrize("pop", OVERLAYS)
def test_container_args_are_accepted_by_the_cli(pop: str) -> None:
    resources = overlay(pop)
    configmaps = {
        r["metadata"]["name"]: r["data"] for r in resources.values() if r["kind"] == "ConfigMap"
    }
    commands = set()
    for workload, container in meridian_containers(resources):
        env: dict[str, str] = {}
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = item["value"]
            else:
                ref = item["valueFrom"]["configMapKeyRef"]
                env[item["name"]] = configmaps[ref["name"]][ref["key"]]

        args = [expand(a, env) for a in container["args"]]
        assert "command" not in container  # the image's ENTRYPOINT, meridian, runs them
        command = args[0]
        commands.add(command)
        parsed = build_parser(command).parse_args(args)  # argparse exits on anything unknown
        assert parsed.pop == pop, (workload, args)
        assert parsed.watch_config > 0, f"{workload}: the ConfigMap reload needs --watch-config"
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        config_dir, key = parsed.config.rsplit("/", 1)
        mount = mounts[config_dir]
        assert "subPath" not in mount, "a subPath mount never sees the ConfigMap's updates"
        spec = find(resources, "Deployment", workload)["spec"]["template"]["spec"]
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert key in configmaps[volume["configMap"]["name"]]
    assert commands == {"edge", "dns"}


def test_a_bad_container_arg_is_caught() -> None:
    with pytest.raises(SystemExit):
        build_parser("edge").parse_args(
            ["edge", "--config", "x", "--pop", "iad", "--listen-on", "x"]
        )


# ------------------------------------------------------------------------ what pods must obey


def restricted_violations(name: str, spec: dict[str, Any]) -> list[str]:
    """The restricted Pod Security profile's rules, plus a read-only root filesystem."""
    problems = []
    pod = spec.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            problems.append(f"{name}: {key}")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            problems.append(f"{name}: volume {volume['name']} is {kinds}")
    for sysctl in pod.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            problems.append(f"{name}: sysctl {sysctl['name']}")
    for container in spec["containers"] + spec.get("initContainers", []):
        where = f"{name}/{container['name']}"
        context = container.get("securityContext", {})

        def setting(key: str, context: dict[str, Any] = context) -> Any:
            return context.get(key, pod.get(key))

        if setting("runAsNonRoot") is not True:
            problems.append(f"{where}: runAsNonRoot")
        if setting("runAsUser") == 0:
            problems.append(f"{where}: runs as root")
        if context.get("privileged"):
            problems.append(f"{where}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation")
        if (setting("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{where}: seccompProfile")
        capabilities = context.get("capabilities", {})
        if capabilities.get("drop") != ["ALL"]:
            problems.append(f"{where}: capabilities not dropped")
        if not set(capabilities.get("add", [])) <= {"NET_BIND_SERVICE"}:
            problems.append(f"{where}: adds {capabilities['add']}")
        if context.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: root filesystem writable")
        for port in container.get("ports", []):
            if port.get("hostPort"):
                problems.append(f"{where}: hostPort")
    return problems


@pytest.mark.parametrize("pop", OVERLAYS)
def test_pods_meet_the_restricted_profile(pop: str) -> None:
    resources = overlay(pop)
    problems = [p for name, spec in pod_specs(resources) for p in restricted_violations(name, spec)]
    assert problems == []
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(rf"^USER {IMAGE_USER}:{IMAGE_USER}$", dockerfile, re.M)
    for name, spec in pod_specs(resources):
        if any("/meridian:" in c["image"] for c in spec["containers"]):
            assert spec["securityContext"]["runAsUser"] == IMAGE_USER, name
        for container in spec["containers"]:
            privileged_ports = [
                p["containerPort"] for p in container.get("ports", []) if p["containerPort"] < 1024
            ]
            added = container["securityContext"]["capabilities"].get("add", [])
            # NET_BIND_SERVICE exactly where a privileged port (53) is bound.
            assert (added == ["NET_BIND_SERVICE"]) == bool(privileged_ports), (name, added)
            if privileged_ports:
                sysctls = {s["name"]: s["value"] for s in spec["securityContext"]["sysctls"]}
                start = int(sysctls["net.ipv4.ip_unprivileged_port_start"])
                assert start <= min(privileged_ports)


def test_the_restricted_check_catches_a_violation() -> None:
    spec = find(overlay("iad"), "Deployment", "meridian-edge")["spec"]["template"]["spec"]
    spec["containers"][0]["securityContext"]["capabilities"]["add"] = ["NET_ADMIN"]
    spec["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    spec["hostNetwork"] = True
    assert len(restricted_violations("edge", spec)) == 3


@pytest.mark.parametrize("pop", OVERLAYS)
def test_pods_listen_where_probes_and_services_look(pop: str, tmp_path: Path) -> None:
    resources = overlay(pop)
    config = load_config(cluster_config(resources, tmp_path))
    listeners = config.listeners
    edge = find(resources, "Deployment", "meridian-edge")["spec"]["template"]["spec"]
    (container,) = edge["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": listeners.edge.port, "admin": listeners.edge_admin.port}
    assert listeners.edge_admin.host == "0.0.0.0"  # the kubelet probes the pod's address
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    dns = find(resources, "Deployment", "meridian-geodns")["spec"]["template"]["spec"]
    (container,) = dns["containers"]
    ports = {(p["containerPort"], p["protocol"]) for p in container["ports"]}
    assert ports == {
        (listeners.dns.port, "UDP"),
        (listeners.dns.port, "TCP"),
        (listeners.dns_admin.port, "TCP"),
    }
    service = find(resources, "Service", "meridian-geodns")["spec"]
    assert {(p["port"], p["protocol"]) for p in service["ports"]} == {(53, "UDP"), (53, "TCP")}
    # GeoDNS places clients by the resolver's address: the load balancer must keep it.
    assert service["externalTrafficPolicy"] == "Local"


@pytest.mark.parametrize("pop", OVERLAYS)
def test_drain_fits_the_grace_period(pop: str, tmp_path: Path) -> None:
    resources = overlay(pop)
    config = load_config(cluster_config(resources, tmp_path))
    for name, drain in (
        # The edge: in-flight requests, then the cache's Redis writes, each up to drain_timeout.
        ("meridian-edge", 2 * config.edge.drain_timeout),
        # GeoDNS workers get 5 s (geodns.server.dns_group) plus the supervisor's margin.
        ("meridian-geodns", 5.0 + 5.0),
    ):
        spec = find(resources, "Deployment", name)["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        pre_stop = float(command[1])
        assert pre_stop >= 2, "endpoints need a moment to drop the pod before SIGTERM"
        assert spec["terminationGracePeriodSeconds"] >= pre_stop + drain + 2, name


@pytest.mark.parametrize("pop", OVERLAYS)
def test_autoscaling_follows_the_seeds_triggers(pop: str, tmp_path: Path) -> None:
    resources = overlay(pop)
    hpa = find(resources, "HorizontalPodAutoscaler", "meridian-edge")["spec"]
    targets = {}
    for metric in hpa["metrics"]:
        if metric["type"] == "Resource":
            targets[metric["resource"]["name"]] = metric["resource"]["target"]
        else:
            targets[metric["pods"]["metric"]["name"]] = metric["pods"]["target"]
    assert targets == {
        "cpu": {"type": "Utilization", "averageUtilization": 70},
        "memory": {"type": "Utilization", "averageUtilization": 80},
        "meridian_edge_in_flight_requests": {"type": "AverageValue", "averageValue": "1000"},
        "meridian_edge_latency_over_target_ratio": {"type": "AverageValue", "averageValue": "2"},
    }
    # N+2 with N >= 1, one per zone at least, room to grow; a drain takes one pod at a time.
    assert 3 <= hpa["minReplicas"] < hpa["maxReplicas"]
    assert find(resources, "PodDisruptionBudget", "meridian-edge")["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": {"app.kubernetes.io/name": "meridian-edge"}},
    }
    edge = find(resources, "Deployment", "meridian-edge")["spec"]
    assert "replicas" not in edge, "the HPA owns replicas; an applied value would undo it"
    assert edge["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # A full cache alone must not trip the memory trigger.
    (container,) = edge["template"]["spec"]["containers"]
    config = load_config(cluster_config(resources, tmp_path))
    request = parse_size(container["resources"]["requests"]["memory"])
    assert config.edge.cache.memory < 0.8 * request
    assert parse_size(container["resources"]["limits"]["memory"]) >= request
    assert container["resources"]["requests"]["cpu"]
    # Every custom metric has its prometheus-adapter rule.
    (adapter,) = render("monitoring")
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    named = {rule["name"]["as"] for rule in rules}
    assert {m for m in targets if m.startswith("meridian_")} <= named


@pytest.mark.parametrize("pop", OVERLAYS)
def test_pods_spread_over_three_zones(pop: str) -> None:
    resources = overlay(pop)
    for name in ("meridian-edge", "meridian-geodns"):
        deployment = find(resources, "Deployment", name)["spec"]
        labels = deployment["template"]["metadata"]["labels"]
        (zone,) = [
            c
            for c in deployment["template"]["spec"]["topologySpreadConstraints"]
            if c["topologyKey"] == "topology.kubernetes.io/zone"
        ]
        assert zone["whenUnsatisfiable"] == "DoNotSchedule"
        assert zone["minDomains"] == 3 and zone["maxSkew"] == 1
        assert zone["labelSelector"]["matchLabels"].items() <= labels.items()
    assert find(resources, "Deployment", "meridian-geodns")["spec"]["replicas"] >= 3


# ------------------------------------------------------------------------ FileWatch (pure core)


def test_file_watch_reloads_once_per_change() -> None:
    watch = FileWatch("f", 5.0, (1, 10, 100, 1000))
    assert watch.due == 0.0  # the first look is at once
    assert not watch.observe((1, 10, 100, 1000), now=0.0)
    assert watch.due == 5.0
    assert watch.observe((1, 11, 100, 1000), now=5.0)  # a symlink swap: new inode
    assert not watch.observe((1, 11, 100, 1000), now=10.0)  # seen: not again (even if it failed)
    assert watch.observe((1, 11, 120, 1000), now=15.0)  # rewritten in place
    assert watch.observe((1, 11, 120, 2000), now=20.0)


def test_file_watch_waits_out_a_missing_file() -> None:
    watch = FileWatch("f", 1.0, (1, 10, 100, 1000))
    assert not watch.observe(None, now=1.0)  # gone for a moment: a reload could only fail
    assert not watch.observe(None, now=2.0)
    assert watch.observe((1, 10, 100, 1000), now=3.0)  # back, even unchanged: reload once
    assert not FileWatch("f", 1.0, None).observe(None, now=0.0)


def test_file_identity_follows_a_configmap_swap(tmp_path: Path) -> None:
    volume = ConfigMapVolume(tmp_path / "cm", {"meridian.yaml": "a: 1\n"})
    path = str(volume.path("meridian.yaml"))
    before = file_identity(path)
    volume.update({"meridian.yaml": "a: 1\n"})  # the same bytes, a new file
    after = file_identity(path)
    assert before is not None and after is not None and before != after
    assert Path(path).read_text() == "a: 1\n"
    names = sorted(p.name for p in (tmp_path / "cm").iterdir())
    # The old timestamped directory is gone, and no ..data_tmp is left.
    assert (
        len(names) == 3 and names[0].startswith("..20") and names[1:] == ["..data", "meridian.yaml"]
    )
    assert file_identity(str(tmp_path / "missing")) is None


# --------------------------------------------------------------------- the reload, for real


WATCH = "200ms"


def edge_world(us: Origin, eu: Origin, market: dict[str, Any], tmp: Path) -> str:
    """A world whose `market` service is ``market``; POP iad's nearest region is us-east."""
    path = write_config(
        tmp / "world.yaml",
        {
            "us-east": region(39.04, -77.49, [us.url]),
            "eu-central": region(50.11, 8.68, [eu.url]),
        },
        edge={"services": {"market": market}},
    )
    return path.read_text()


@pytest.fixture
def origins(tmp_path: Path) -> Any:
    us = Origin("us-east", tmp_path)
    eu = Origin("eu-central", tmp_path)
    try:
        us.ready()
        eu.ready()
        yield us, eu
    finally:
        us.stop()
        eu.stop()


class WatchedEdge(Proc):
    def __init__(self, config: Path, tmp: Path, *extra: str) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        argv = [
            sys.executable,
            "-m",
            "meridian.cli",
            "edge",
            "--config",
            str(config),
            "--pop",
            "iad",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--admin",
            f"127.0.0.1:{self.admin_port}",
            "--watch-config",
            WATCH,
            *extra,
        ]
        super().__init__(argv, tmp / f"edge-{self.port}.log", "edge")

    def region(self, tag: str) -> str:
        """The region that answers a request nobody asked before (no cache hit)."""
        status, headers, _ = http_request(self.port, "GET", f"/api/v1/ticker/BTC-USD?k={tag}")
        assert status == 200, (status, headers)
        return headers["x-meridian-region"]

    def generation(self) -> int:
        status, _, body = http_request(self.admin_port, "GET", "/status")
        assert status == 200
        generation: int = yaml.safe_load(body)["config"]["generation"]
        return generation


def test_edge_serves_a_swapped_configmap_and_keeps_the_old_one_when_invalid(
    origins: tuple[Origin, Origin], tmp_path: Path
) -> None:
    us, eu = origins
    v1 = edge_world(us, eu, {}, tmp_path)
    volume = ConfigMapVolume(tmp_path / "configmap", {"meridian.yaml": v1})
    edge = WatchedEdge(volume.path("meridian.yaml"), tmp_path)
    try:
        edge.wait_for_log(r"event=edge_listening")
        assert edge.region("v1") == "us-east"
        assert edge.generation() == 1

        # The kubelet's update: no signal, only a new ..data.
        volume.update({"meridian.yaml": edge_world(us, eu, {"regions": ["eu-central"]}, tmp_path)})
        counter = iter(range(10_000))
        poll_until(lambda: edge.region(f"v2-{next(counter)}") == "eu-central", within=10)
        assert edge.generation() == 2
        edge.wait_for_log(r"event=config_file_changed")

        # An invalid config: rejected in one line, the old one keeps serving.
        bad = edge_world(us, eu, {"regions": ["nowhere"]}, tmp_path)
        volume.update({"meridian.yaml": bad})
        edge.wait_for_log(r"event=config_reload_rejected")
        assert edge.region("v3") == "eu-central"
        assert edge.generation() == 2

        # Watching goes on after a rejection.
        volume.update({"meridian.yaml": v1})
        poll_until(lambda: edge.region(f"v4-{next(counter)}") == "us-east", within=10)
        assert edge.generation() == 3
        assert edge.popen.poll() is None
        assert len(re.findall(r"event=config_file_changed", edge.log_text())) == 3
    finally:
        edge.stop()


def test_supervised_edge_workers_adopt_a_swapped_configmap(
    origins: tuple[Origin, Origin], tmp_path: Path
) -> None:
    us, eu = origins
    volume = ConfigMapVolume(
        tmp_path / "configmap", {"meridian.yaml": edge_world(us, eu, {}, tmp_path)}
    )
    edge = WatchedEdge(volume.path("meridian.yaml"), tmp_path, "--workers", "2")
    try:
        poll_until(
            lambda: len(re.findall(r"event=edge_listening", edge.log_text())) == 2, within=20
        )
        assert edge.region("v1") == "us-east"
        volume.update({"meridian.yaml": edge_world(us, eu, {"regions": ["eu-central"]}, tmp_path)})
        edge.wait_for_log(r"event=config_file_changed")
        # Each request on a fresh connection: both workers answer some of them.
        counter = iter(range(10_000))
        poll_until(
            lambda: all(edge.region(f"v2-{next(counter)}") == "eu-central" for _ in range(20)),
            within=10,
        )
        volume.update({"meridian.yaml": edge_world(us, eu, {"regions": ["nowhere"]}, tmp_path)})
        edge.wait_for_log(r"event=config_reload_rejected")
        assert all(edge.region(f"v3-{i}") == "eu-central" for i in range(20))
        assert edge.popen.poll() is None
    finally:
        edge.stop()


def test_geodns_serves_a_swapped_configmap(tmp_path: Path) -> None:
    world = dns_support.base_config()
    volume = ConfigMapVolume(
        tmp_path / "configmap", {"meridian.yaml": yaml.safe_dump(world, sort_keys=False)}
    )
    extra = ("--workers", "1", "--watch-config", WATCH)
    with dns_support.running_server(volume.path("meridian.yaml"), "iad", extra) as server:
        assert dns_support.ask(server.port, "extra.meridian.test").rcode() == 3  # NXDOMAIN
        world["dns"]["names"]["extra"] = {"targets": "pops", "answers": 1}
        volume.update({"meridian.yaml": yaml.safe_dump(world, sort_keys=False)})
        reply = dns_support.wait_for(
            lambda: (r := dns_support.ask(server.port, "extra.meridian.test")).answer and r,
            10,
            "the new name",
        )
        assert dns_support.addresses(reply)
        world["dns"]["names"]["broken"] = {"targets": "nowhere"}
        volume.update({"meridian.yaml": yaml.safe_dump(world, sort_keys=False)})
        dns_support.wait_for(lambda: server.log_has("config_reload_rejected"), 10, "rejection")
        assert dns_support.ask(server.port, "extra.meridian.test").answer
        assert server.status()["config_generation"] == 2


def test_a_real_edge_serves_what_the_manifests_name(
    origins: tuple[Origin, Origin], tmp_path: Path
) -> None:
    """The probes' paths, and the series the custom metrics' queries name, on a real edge."""
    (adapter,) = render("monitoring")
    text = adapter["data"]["config.yaml"]
    names = set(re.findall(r"meridian_edge_[a-z_]+", text))
    us, eu = origins
    config = tmp_path / "world.yaml"
    config.write_text(edge_world(us, eu, {}, tmp_path))
    edge = WatchedEdge(config, tmp_path)
    try:
        edge.wait_for_log(r"event=edge_listening")
        # Ready once a region's health check passed; alive at once.
        poll_until(lambda: http_request(edge.admin_port, "GET", "/readyz")[0] == 200, within=10)
        assert http_request(edge.admin_port, "GET", "/healthz")[0] == 200
        assert http_request(edge.admin_port, "GET", "/livez")[0] == 404  # the check can fail
        edge.region("scrape")  # the latency histogram has samples after a request
        status, _, body = http_request(edge.admin_port, "GET", "/metrics")
        assert status == 200
        exported = {
            line.split("{")[0].split(" ")[0]
            for line in body.decode().splitlines()
            if line and not line.startswith("#")
        }
        hpa_metrics = {n for n in names if not n.endswith("_ratio")}
        assert names - hpa_metrics == {"meridian_edge_latency_over_target_ratio"}
        assert hpa_metrics <= exported, hpa_metrics - exported
    finally:
        edge.stop()
