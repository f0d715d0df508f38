"""Offline helpers for the Kubernetes manifests: a small kustomize and a ConfigMap volume.

``kustomize_build(dir)`` renders a kustomization the way ``kubectl kustomize`` does, for the
subset ``deploy/kubernetes`` uses: ``resources`` (files and directories), ``namespace``,
``labels`` (without selectors), ``configMapGenerator`` (files and literals, no name hash) and
strategic-merge ``patches`` that touch maps only.  Anything else raises ``Unsupported``, so a
manifest that starts using a feature this does not implement fails the tests instead of being
rendered wrongly.  Where ``kubectl`` is installed, tests/test_kubernetes.py checks that both
render every kustomization identically.

``ConfigMapVolume`` lays out a directory as the kubelet's atomic writer does for a ConfigMap
volume: ``KEY -> ..data/KEY``, ``..data -> ..<timestamp>``; an update writes a new timestamped
directory, renames a fresh ``..data_tmp`` symlink over ``..data`` and removes the old directory.
"""

from __future__ import annotations

import copy
import itertools
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

Resource = dict[str, Any]

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_KEYS = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "labels",
    "configMapGenerator",
    "generatorOptions",
    "patches",
}
#: Kinds whose pod template gets ``labels`` with ``includeTemplates`` (kustomize's fieldSpecs).
TEMPLATED = {"Deployment", "ReplicaSet", "DaemonSet", "StatefulSet", "Job", "ReplicationController"}
#: Cluster-scoped kinds: the namespace transformer leaves them out (Namespace is renamed).
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume"}


class Unsupported(Exception):
    """The kustomization uses something this renderer does not implement."""


def resource_id(resource: Resource) -> tuple[str, str, str, str]:
    meta = resource.get("metadata", {})
    return (
        resource.get("apiVersion", ""),
        resource["kind"],
        meta.get("namespace", ""),
        meta["name"],
    )


def kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory}: no kustomization file")


def kustomize_build(directory: Path) -> list[Resource]:
    spec = yaml.safe_load(kustomization_file(directory).read_text()) or {}
    unknown = set(spec) - SUPPORTED_KEYS
    if unknown:
        raise Unsupported(f"{directory}: kustomization keys {sorted(unknown)}")
    resources: list[Resource] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            resources += kustomize_build(path)
        else:
            resources += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    resources += _generate(directory, spec)
    for entry in spec.get("patches", []):
        _patch(directory, entry, resources)
    if "namespace" in spec:
        _set_namespace(resources, spec["namespace"])
    for entry in spec.get("labels", []):
        _label(resources, entry)
    seen: set[tuple[str, str, str, str]] = set()
    for resource in resources:
        key = resource_id(resource)
        if key in seen:
            raise ValueError(f"{directory}: {key} defined twice")
        seen.add(key)
    return resources


def _generate(directory: Path, spec: dict[str, Any]) -> list[Resource]:
    generators = spec.get("configMapGenerator", [])
    options = spec.get("generatorOptions", {})
    if generators and (
        options.get("disableNameSuffixHash") is not True
        or set(options) != {"disableNameSuffixHash"}
    ):
        raise Unsupported(f"{directory}: generatorOptions other than disableNameSuffixHash: true")
    out = []
    for generator in generators:
        unknown = set(generator) - {"name", "files", "literals"}
        if unknown:
            raise Unsupported(f"{directory}: configMapGenerator keys {sorted(unknown)}")
        data: dict[str, str] = {}
        for item in generator.get("files", []):
            key, _, source = item.rpartition("=")
            path = directory / source
            data[key or Path(source).name] = path.read_text()
        for literal in generator.get("literals", []):
            key, sep, value = literal.partition("=")
            if not sep:
                raise ValueError(f"{directory}: literal {literal!r} has no '='")
            data[key] = value
        out.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": generator["name"]},
                "data": data,
            }
        )
    return out


def _patch(directory: Path, entry: dict[str, Any], resources: list[Resource]) -> None:
    if set(entry) - {"path", "patch"} or len(entry) != 1:
        raise Unsupported(f"{directory}: patch entry {entry!r} (only one path or patch)")
    text = (directory / entry["path"]).read_text() if "path" in entry else entry["patch"]
    patch = yaml.safe_load(text)
    if not isinstance(patch, dict) or "kind" not in patch:
        raise Unsupported(f"{directory}: only strategic-merge patches of one resource")
    meta = patch.get("metadata", {})
    matches = [
        r
        for r in resources
        if r["kind"] == patch["kind"]
        and r["metadata"]["name"] == meta["name"]
        and ("namespace" not in meta or r["metadata"].get("namespace") == meta["namespace"])
    ]
    if len(matches) != 1:
        raise ValueError(
            f"{directory}: patch for {patch['kind']}/{meta['name']} matches {len(matches)}"
        )
    _merge(matches[0], patch, f"{directory}: {patch['kind']}/{meta['name']}")


def _merge(target: dict[str, Any], patch: dict[str, Any], where: str) -> None:
    for key, value in patch.items():
        if isinstance(key, str) and key.startswith("$"):
            raise Unsupported(f"{where}: patch directive {key}")
        if isinstance(value, list):
            # Strategic merge merges some lists by key and replaces others: not implemented.
            raise Unsupported(f"{where}: patch of the list {key!r}")
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value, where)
        else:
            target[key] = copy.deepcopy(value)


def _set_namespace(resources: list[Resource], namespace: str) -> None:
    for resource in resources:
        kind = resource["kind"]
        if kind in ("RoleBinding", "ClusterRoleBinding"):
            raise Unsupported(f"namespace for {kind} subjects")
        if kind == "Namespace":
            resource["metadata"]["name"] = namespace
        elif kind not in CLUSTER_SCOPED:
            resource["metadata"]["namespace"] = namespace


def _label(resources: list[Resource], entry: dict[str, Any]) -> None:
    if set(entry) - {"pairs", "includeTemplates", "includeSelectors"} or entry.get(
        "includeSelectors"
    ):
        raise Unsupported(f"labels entry {entry!r}")
    pairs = {str(k): str(v) for k, v in entry["pairs"].items()}
    for resource in resources:
        resource["metadata"].setdefault("labels", {}).update(pairs)
        if entry.get("includeTemplates"):
            if resource["kind"] in TEMPLATED:
                template = resource["spec"]["template"]
            elif resource["kind"] == "CronJob":
                template = resource["spec"]["jobTemplate"]["spec"]["template"]
            else:
                continue
            template.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)


def by_id(resources: list[Resource]) -> dict[tuple[str, str, str, str], Resource]:
    return {resource_id(r): r for r in resources}


# --------------------------------------------------------------------------------------------
# ConfigMap volume


class ConfigMapVolume:
    """A directory kept as the kubelet keeps a ConfigMap volume (see the module doc)."""

    _sequence = itertools.count(1)

    def __init__(self, root: Path, files: dict[str, str]) -> None:
        self.root = root
        root.mkdir(parents=True)
        self._current: Path | None = None
        self.update(files)
        for key in files:
            (root / key).symlink_to(f"..data/{key}")

    def path(self, key: str) -> Path:
        return self.root / key

    def update(self, files: dict[str, str]) -> None:
        stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime())
        directory = self.root / f"..{stamp}.{next(self._sequence):09d}"
        directory.mkdir()
        for key, text in files.items():
            (directory / key).write_text(text)
        temporary = self.root / "..data_tmp"
        temporary.symlink_to(directory.name)
        os.rename(temporary, self.root / "..data")  # atomic: readers see old or new, whole
        if self._current is not None:
            shutil.rmtree(self._current)
        self._current = directory
