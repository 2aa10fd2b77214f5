"""Offline stand-ins for `kustomize build` and `docker compose config`, for tests/test_manifests.py.

No kustomize, kubectl or docker binary runs here, so the tests render the manifests themselves, and only with the
features the manifests use: `kustomize()` refuses any kustomization field it does not implement instead of
ignoring it.

    >>> objects = kustomize(DEPLOY / "k8s" / "overlays" / "gpu")
    >>> env = read_env_file(DEPLOY / "compose" / ".env.example")
    >>> compose, variables = compose_config(DEPLOY / "compose" / "compose.yaml", env)
"""

from __future__ import annotations

import base64
import copy
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"

# -- kustomize ------------------------------------------------------------------------------------------------

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "resources", "secretGenerator", "generatorOptions",
                        "images", "patches"}
CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "PersistentVolume",
                  "StorageClass", "IngressClass", "PriorityClass"}
# Strategic merge: lists of objects merged item by item on these keys (the Kubernetes API's patchMergeKey);
# every other list is replaced, as the API does for lists without a merge key (args, tolerations...).
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort", "imagePullSecrets": "name"}


def load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomize(folder: Path) -> list[dict]:
    """The objects `kustomize build folder` prints, for the kustomization features used in deploy/k8s.

    The secret generator reads `<file>.example` when the real env file is absent (it is never committed)."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KUSTOMIZATION_FIELDS
    if unknown:
        raise NotImplementedError(f"{folder}: kustomization fields this renderer does not implement: {unknown}")
    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = folder / entry
        objects += kustomize(path) if path.is_dir() else load_documents(path)
    options = kustomization.get("generatorOptions", {})
    for generator in kustomization.get("secretGenerator", []):
        if not options.get("disableNameSuffixHash"):
            raise NotImplementedError("generated names with a hash suffix (set disableNameSuffixHash)")
        objects.append(_secret(folder, generator))
    for patch in kustomization.get("patches", []):
        if set(patch) != {"path"}:
            raise NotImplementedError(f"patches other than a strategic-merge file: {patch}")
        for document in load_documents(folder / patch["path"]):
            target = find(objects, document["kind"], document["metadata"]["name"])
            objects[objects.index(target)] = strategic_merge(target, document)
    for image in kustomization.get("images", []):
        for container in containers(objects):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kustomization["namespace"]
    return objects


def _secret(folder: Path, generator: dict) -> dict:
    if set(generator) - {"name", "envs"}:
        raise NotImplementedError(f"secretGenerator fields other than name and envs: {generator}")
    data: dict[str, str] = {}
    for name in generator["envs"]:
        path = folder / name
        if not path.exists():
            path = folder / f"{name}.example"
        data |= read_env_file(path)
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": {"name": generator["name"]},
            "data": {key: base64.b64encode(value.encode()).decode() for key, value in data.items()}}


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and # comments skipped (the format of kustomize envs and compose .env)."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path}: not KEY=VALUE: {line!r}"
            values[key.strip()] = value.strip()
    return values


def strategic_merge(base, patch, key: str | None = None):
    """A Kubernetes strategic-merge patch, for maps and the merge-keyed lists in MERGE_KEYS (no $patch directives)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = copy.deepcopy(base)
        for name, value in patch.items():
            if name.startswith("$"):
                raise NotImplementedError(f"strategic-merge directive {name}")
            if value is None:
                merged.pop(name, None)
            else:
                merged[name] = strategic_merge(merged[name], value, name) if name in merged else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and MERGE_KEYS.get(key or ""):
        merge_key = MERGE_KEYS[key]
        merged = copy.deepcopy(base)
        for item in patch:
            index = next((i for i, old in enumerate(merged) if old.get(merge_key) == item.get(merge_key)), None)
            if index is None:
                merged.append(copy.deepcopy(item))
            else:
                merged[index] = strategic_merge(merged[index], item)
        return merged
    return copy.deepcopy(patch)


def find(objects: list[dict], kind: str, name: str) -> dict:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def pod_spec(obj: dict) -> dict | None:
    """The pod template's spec of a workload object, else None."""
    spec = obj.get("spec", {})
    if obj["kind"] == "CronJob":
        return spec["jobTemplate"]["spec"]["template"]["spec"]
    if obj["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
        return spec["template"]["spec"]
    return None


def containers(objects: list[dict]) -> list[dict]:
    return [c for obj in objects if (spec := pod_spec(obj)) for c in spec.get("initContainers", []) +
            spec["containers"]]


def strict_crd_schema(schema):
    """A CRD's openAPIV3Schema with unknown fields rejected, as `kubectl apply --validate=strict` does: the API
    server prunes unknown fields silently, so a misspelt field would otherwise pass unnoticed."""
    if isinstance(schema, list):
        return [strict_crd_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {name: strict_crd_schema(value) for name, value in schema.items()}
    if ("properties" in strict and "additionalProperties" not in strict
            and not strict.get("x-kubernetes-preserve-unknown-fields")):
        strict["additionalProperties"] = False
    return strict


# -- compose ----------------------------------------------------------------------------------------------------

_REFERENCE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?", re.S)


class InterpolationError(ValueError):
    pass


def interpolate(text: str, env: dict[str, str], used: set[str]) -> str:
    """Compose's variable interpolation: $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error},
    ${VAR?error}, ${VAR:+alt}, ${VAR+alt}, and $$ for a literal $. Names read go into `used`."""

    def substitute(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        if match["named"]:
            used.add(match["named"])
            return env.get(match["named"], "")
        parts = _BRACED.fullmatch(match["braced"])
        if parts is None:
            raise InterpolationError(f"invalid interpolation ${{{match['braced']}}}")
        name, op, arg = parts["name"], parts["op"], parts["arg"] or ""
        used.add(name)
        value = env.get(name)
        missing = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in (":-", "-"):
            return arg if missing else value
        if op in (":?", "?"):
            if missing:
                raise InterpolationError(f"{name}: {arg}")
            return value
        if op in (":+", "+"):
            return "" if missing else arg
        return value or ""

    return _REFERENCE.sub(substitute, text)


def interpolate_tree(node, env: dict[str, str], used: set[str]):
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env, used) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(item, env, used) for item in node]
    if isinstance(node, str):
        return interpolate(node, env, used)
    return node


def compose_config(compose_file: Path, env: dict[str, str]) -> tuple[dict, set[str]]:
    """The compose model after YAML merge keys and interpolation with `env` (what `docker compose --env-file F
    config` resolves, with env read from F), and the names of the variables it read."""
    used: set[str] = set()
    raw = yaml.safe_load(compose_file.read_text())
    return interpolate_tree(raw, env, used), used
