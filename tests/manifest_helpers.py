"""Rendering the deployment files for tests/test_manifests.py: `kubectl kustomize` for deploy/k8s, and an
offline stand-in for `docker compose config` (no docker here).

The overlays are rendered by the real kustomize (`kubectl kustomize`, kubectl from the Makefile's `apt` target),
from a copy of deploy/k8s into which the test writes base/secrets.env from the example, as a user does: the real
secrets.env is never committed, and kustomize fails without it (`k8s_copy(..., secrets=None)` shows that).

    >>> objects = kustomize(k8s_copy(tmp_path) / "overlays" / "gpu")
    >>> env = read_env_file(DEPLOY / "compose" / ".env.example")
    >>> compose, variables = compose_config(DEPLOY / "compose" / "compose.yaml", env)
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
SECRETS_EXAMPLE = K8S / "base" / "secrets.env.example"
MIN_KUSTOMIZE = (4, 0)      # `patches`, `envs`, configMapGenerator hashes with reference rewriting

# -- kustomize ------------------------------------------------------------------------------------------------


class KustomizeError(Exception):
    """`kubectl kustomize` failed; the message is its stderr."""


def load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@functools.cache
def kubectl() -> str:
    """The kubectl binary, with a kustomize new enough for deploy/k8s; a clear failure otherwise."""
    found = shutil.which("kubectl")
    assert found, "kubectl not found: `make apt` installs it (the tests render deploy/k8s with `kubectl kustomize`)"
    version = json.loads(subprocess.run([found, "version", "--client", "-o", "json"], capture_output=True,
                                        text=True, timeout=60, check=True).stdout)
    kustomize_version = version.get("kustomizeVersion", "v0")
    numbers = tuple(int(n) for n in re.findall(r"\d+", kustomize_version)[:2])
    assert numbers >= MIN_KUSTOMIZE, (f"{found} embeds kustomize {kustomize_version}; deploy/k8s needs "
                                      f"v{'.'.join(map(str, MIN_KUSTOMIZE))} or newer (kubectl 1.21+)")
    return found


def k8s_copy(folder: Path, secrets: str | dict[str, str] | None = "example", config: dict[str, str] | None = None
             ) -> Path:
    """deploy/k8s copied to folder/k8s, without any secrets.env of the working tree. `secrets`: "example" writes
    base/secrets.env from secrets.env.example (what the README tells a user to do), a dict writes those values
    over the example's, None writes none. `config`: values written over base/config.env's."""
    target = folder / "k8s"
    shutil.copytree(K8S, target, ignore=shutil.ignore_patterns("secrets.env"))
    if secrets is not None:
        values = read_env_file(SECRETS_EXAMPLE) | (secrets if isinstance(secrets, dict) else {})
        (target / "base" / "secrets.env").write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    if config:
        path = target / "base" / "config.env"
        values = read_env_file(path) | config
        path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return target


def kustomize(folder: Path) -> list[dict]:
    """The objects `kubectl kustomize folder` prints; KustomizeError with its stderr when it fails."""
    result = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise KustomizeError(result.stderr.strip())
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


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


GENERATED = {"ConfigMap", "Secret"}     # kustomize's generators append a hash of the content to these names


def unhashed(name: str) -> str:
    """A generated name without kustomize's content-hash suffix (lineguard-config-5gkf46g7fg -> lineguard-config)."""
    return re.sub(r"-[a-z0-9]{10}$", "", name)


def find(objects: list[dict], kind: str, name: str) -> dict:
    """The one object of that kind and name; a generated ConfigMap or Secret by its name before the hash."""
    matches = [o for o in objects if o["kind"] == kind and (o["metadata"]["name"] == name or (
        kind in GENERATED and unhashed(o["metadata"]["name"]) == name))]
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
