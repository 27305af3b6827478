"""The cluster configs (cluster/) checked offline with the schemas their own tools apply.

No cloud, Kubernetes API or GPU is reachable from the tests, so each file is held to what
would reject it at launch: Ray's cluster-launcher schema, KubeRay's CRD schemas made strict
(tests/vendor/kuberay/), the keys Ray knows in a runtime_env, the project's own CLI and
config loader for every entrypoint, and a placement of each job's roles on the GPUs and
CPUs a cluster declares. The schema, PodMonitor, runtime_env, entrypoint and placement
checks are each shown rejecting a broken copy, so none passes because it looked at nothing.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

from raydraft.cli import parser
from raydraft.config import (
    ConfigError,
    ExperimentConfig,
    LoggingConfig,
    load_config,
    reward_serving_for,
)
from raydraft_ray.engine import required_cpus

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
VENDOR = Path(__file__).parent / "vendor" / "kuberay"
LAUNCHERS = ("aws-gpu.yaml", "gcp-gpu.yaml")
# KubeRay's CRDs as fetched from upstream (see VENDOR/PROVENANCE.md); absent in a plain clone.
CRD_SOURCES = Path(os.environ.get("KUBERAY_CRDS", ROOT.parent / "shared" / "vendor" / "kuberay"))

# CPUs and GPUs of the instance types the launcher YAMLs name (the clouds' documentation).
# The launcher advertises the `resources` a node type declares, not what the machine has,
# so a declared `GPU: 8` on a 4-GPU type would leave roles waiting for devices forever.
INSTANCES: dict[str, tuple[int, int]] = {
    "g6e.2xlarge": (8, 1),
    "p4d.24xlarge": (96, 8),
    "g2-standard-16": (16, 1),
    "a2-highgpu-8g": (96, 8),
}
CONFIG_MOUNT = "/etc/raydraft"  # where the KubeRay head mounts the raydraft-config ConfigMap


# -- loading -------------------------------------------------------------------------------
def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def manifests() -> list[dict[str, Any]]:
    """Every Kubernetes object under cluster/kuberay/."""
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in manifests() if doc["kind"] == kind]


def cluster_specs() -> dict[str, dict[str, Any]]:
    """Each RayCluster spec: a RayCluster's own, and the one a RayJob brings up."""
    specs = {f"RayCluster/{d['metadata']['name']}": d["spec"] for d in of_kind("RayCluster")}
    for job in of_kind("RayJob"):
        specs[f"RayJob/{job['metadata']['name']}"] = job["spec"]["rayClusterSpec"]
    return specs


def head_container(spec: dict[str, Any]) -> dict[str, Any]:
    return spec["headGroupSpec"]["template"]["spec"]["containers"][0]


def readme_submits() -> list[tuple[list[str], str]]:
    """(`ray job submit` options, entrypoint) of each submit command in cluster/README.md's
    code blocks: what a user copies, so what must parse and fit."""
    text = (CLUSTER / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.DOTALL)
    lines = [line.strip() for b in blocks for line in b.replace("\\\n", " ").splitlines()]
    submits = []
    for line in lines:
        if line.startswith("ray job submit"):
            options, _, entrypoint = line.partition(" -- ")
            submits.append((shlex.split(options, comments=True)[3:], entrypoint))
    return submits


def entrypoints() -> dict[str, str]:
    """Every training entrypoint: the RayJobs' and the README's."""
    found = {f"RayJob/{j['metadata']['name']}": j["spec"]["entrypoint"] for j in of_kind("RayJob")}
    for i, (_, entrypoint) in enumerate(readme_submits()):
        found[f"README job {i}"] = entrypoint
    return found


# -- entrypoints ---------------------------------------------------------------------------
CLI_PREFIXES = (["raydraft"], ["python", "-m", "raydraft"])


def train_argv(entrypoint: str) -> list[str]:
    """The `raydraft train ...` arguments of an entrypoint, without the program name."""
    argv = shlex.split(entrypoint, comments=True)
    for prefix in CLI_PREFIXES:
        if argv[: len(prefix)] == prefix:
            return argv[len(prefix) :]
    raise AssertionError(f"{entrypoint!r} does not run raydraft ({CLI_PREFIXES})")


def mounted_config_map(spec: dict[str, Any]) -> str | None:
    """The ConfigMap a RayCluster spec's head mounts at CONFIG_MOUNT, where the driver runs."""
    pod = spec["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m["name"] for m in head_container(spec).get("volumeMounts", [])}
    volume = volumes.get(mounts.get(CONFIG_MOUNT, ""), {})
    return volume.get("configMap", {}).get("name")


def mounted_configs(tmp_path: Path) -> dict[str, Path]:
    """The files the heads see under CONFIG_MOUNT, as local copies: what --config names."""
    names = {mounted_config_map(spec) for spec in cluster_specs().values()}
    files = {}
    for config_map in of_kind("ConfigMap"):
        if config_map["metadata"]["name"] not in names:
            continue
        for key, text in config_map.get("data", {}).items():
            local = tmp_path / config_map["metadata"]["name"] / key
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_text(text)
            files[f"{CONFIG_MOUNT}/{key}"] = local
    return files


def job_config(entrypoint: str, mounted: dict[str, Path]) -> ExperimentConfig:
    """Parse an entrypoint with the project's CLI and load the config it names, overrides
    included (load_config validates, so a wrong key or value fails here)."""
    try:
        args = parser().parse_args(train_argv(entrypoint))
    except SystemExit as exit_:  # argparse's way of saying no
        raise AssertionError(f"raydraft's CLI rejects {entrypoint!r}") from exit_
    assert args.command == "train", entrypoint
    assert args.config, f"{entrypoint!r}: name the config (the default is the toy model)"
    name = str(mounted.get(args.config, args.config))
    return load_config(name, args.overrides)


# -- resources -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """What one actor, replica or placement bundle reserves; it must fit on one node."""

    role: str
    cpus: float
    gpus: float


@dataclass
class Node:
    """A node's logical CPUs and its GPUs (free fraction of each device)."""

    cpus: float
    devices: list[float] = field(default_factory=list)

    def take(self, request: Request) -> bool:
        """Reserve `request` here as Ray would: a fraction of one device below 1 GPU, whole
        free devices from 1 GPU up (Ray accepts no fractions above 1)."""
        if request.cpus > self.cpus + 1e-9:
            return False
        wanted = request.gpus
        if wanted >= 1:
            free = [i for i, d in enumerate(self.devices) if d >= 1 - 1e-9]
            if wanted != int(wanted) or len(free) < wanted:
                return False
            for i in free[: int(wanted)]:
                self.devices[i] = 0.0
        elif wanted > 0:
            fits = [i for i, d in enumerate(self.devices) if d >= wanted - 1e-9]
            if not fits:
                return False
            self.devices[min(fits, key=lambda i: self.devices[i])] -= wanted
        self.cpus -= request.cpus
        return True


def role_requests(cfg: ExperimentConfig) -> list[Request]:
    """The resources a training config reserves on Ray, per actor (as actors/engine.py,
    actors/learner.py and actors/reward_serving.py ask for them). A colocated worker sits
    in its learner's bundle. The reward replicas are counted at max_replicas for every
    algorithm: DRaFT runs a differentiable reward inside its learners instead unless
    serve_draft_rewards, but telling which needs the algorithm classes (torch), so this
    is an upper bound there."""
    r = cfg.ray
    colocated = r.placement == "colocated"
    learner = Request(
        "learner",
        r.learner_cpus + (r.worker_cpus if colocated else 0),
        r.learner_gpus + (r.worker_gpus if colocated else 0),
    )
    requests = [learner] * r.learners
    if not colocated:
        requests += [Request("rollout worker", r.worker_cpus, r.worker_gpus)] * r.rollout_workers
    for component in cfg.rewards.components:
        serving = reward_serving_for(r.reward_serving, component)
        reward = Request(f"reward {component.name}", serving.num_cpus, serving.num_gpus)
        requests += [reward] * serving.max_replicas
    return requests


def unplaced(requests: list[Request], nodes: list[Node]) -> list[Request]:
    """The requests that find no node, placing the largest first (first fit decreasing)."""
    nodes = copy.deepcopy(nodes)
    left = []
    for request in sorted(requests, key=lambda q: (q.gpus, q.cpus), reverse=True):
        if not any(node.take(request) for node in nodes):
            left.append(request)
    return left


def cpu_quantity(value: str | int | float) -> float:
    """A Kubernetes CPU quantity ("8", "500m", 8) in CPUs."""
    text = str(value)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def launcher_nodes(config: dict[str, Any]) -> list[Node]:
    """The nodes a launcher config can grow to: the head and max_workers of each type,
    with the resources each type declares to Ray."""
    nodes = []
    for name, node_type in config["available_node_types"].items():
        count = 1 if name == config["head_node_type"] else node_type.get("max_workers", 0)
        declared = node_type["resources"]
        nodes += [Node(declared.get("CPU", 0), [1.0] * declared.get("GPU", 0))] * count
    return nodes


def ray_node(group: dict[str, Any]) -> Node:
    """A KubeRay group's node as Ray sees it: rayStartParams, else the container's limits."""
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    params = group.get("rayStartParams", {})
    cpus = cpu_quantity(params.get("num-cpus", limits["cpu"]))
    gpus = int(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    return Node(cpus, [1.0] * gpus)


def kuberay_nodes(spec: dict[str, Any]) -> list[Node]:
    """The head and the most workers each group can have (maxReplicas when the autoscaler
    runs, else replicas)."""
    nodes = [ray_node(spec["headGroupSpec"])]
    for group in spec.get("workerGroupSpecs", []):
        autoscaled = spec.get("enableInTreeAutoscaling", False)
        count = group["maxReplicas"] if autoscaled else group.get("replicas", 1)
        nodes += [ray_node(group)] * (count * group.get("numOfHosts", 1))
    return nodes


# -- Ray's cluster launcher ----------------------------------------------------------------
@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_configs_pass_rays_schema(name):
    validate_config(prepare_config(load_yaml(CLUSTER / name)))


@pytest.mark.parametrize(
    ("node_type_key", "value", "message"),
    [("min_wrkers", 1, "min_wrkers"), ("max_workers", "four", "'four' is not of type")],
)
def test_rays_schema_rejects_a_broken_launcher_config(node_type_key, value, message):
    config = load_yaml(CLUSTER / LAUNCHERS[0])
    gpu_type = config["available_node_types"]["gpu-8x"]
    gpu_type.pop("min_workers")
    gpu_type[node_type_key] = value
    with pytest.raises(jsonschema.ValidationError, match=message):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_nodes_declare_what_their_instances_have(name):
    """Workers advertise their machine's CPUs and GPUs; the head advertises none (no Ray
    work there) but has a GPU of its own for the driver's copy of the policy."""
    config = load_yaml(CLUSTER / name)
    for key, node_type in config["available_node_types"].items():
        node_config = node_type["node_config"]
        cpus, gpus = INSTANCES[node_config.get("InstanceType") or node_config["machineType"]]
        declared = node_type["resources"]
        if key == config["head_node_type"]:
            assert declared == {"CPU": 0, "GPU": 0}, f"{name}: the head takes no Ray work"
            assert gpus >= 1, f"{name}: the driver needs a device for model.device=cuda"
        else:
            assert declared == {"CPU": cpus, "GPU": gpus}, f"{name}: {key} declares {declared}"
            assert 0 <= node_type["min_workers"] <= node_type["max_workers"]


# -- images and versions -------------------------------------------------------------------
def images() -> dict[str, str]:
    """Every Ray image the configs start: the launchers' and the Dockerfile's base."""
    found = {name: load_yaml(CLUSTER / name)["docker"]["image"] for name in LAUNCHERS}
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    found["Dockerfile"] = re.search(r"^FROM (\S+)", dockerfile, flags=re.MULTILINE).group(1)
    return found


def test_nodes_run_the_ray_that_submits():
    """Nodes, the Ray that submits and the project's pin agree (a job client and a cluster
    of different Ray versions fail in ways that are hard to read)."""
    requirements = [Requirement(r) for r in importlib.metadata.requires("raydraft")]
    ray_pin = next(r for r in requirements if r.name == "ray")
    python_pin = SpecifierSet(importlib.metadata.metadata("raydraft")["Requires-Python"])
    for source, image in images().items():
        match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-gpu", image)
        assert match, f"{source}: {image} is not a Ray GPU image"
        assert match[1] == ray.__version__, f"{source}: Ray {match[1]}, here {ray.__version__}"
        assert Version(match[1]) in ray_pin.specifier, f"{source}: outside {ray_pin}"
        assert Version(f"3.{match[2]}") in python_pin, f"{source}: Python 3.{match[2]}"
    for name, spec in cluster_specs().items():
        assert spec["rayVersion"] == ray.__version__, name


def test_the_image_and_a_job_leave_out_the_same_files():
    runtime_env = load_yaml(CLUSTER / "runtime_env.yaml")
    ignored = (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [line for line in ignored if line and not line.startswith("#")]
    assert sorted(patterns) == sorted(runtime_env["excludes"])


# -- KubeRay -------------------------------------------------------------------------------
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    schema = json.loads((VENDOR / f"ray.io_{kind.lower()}s.schema.json").read_text())
    return jsonschema.Draft7Validator(schema)


def crd_errors(doc: dict[str, Any]) -> list[str]:
    errors = crd_validator(doc["kind"]).iter_errors(doc)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_manifests_pass_the_strict_crd_schemas(kind):
    docs = of_kind(kind)
    assert docs, f"no {kind} under cluster/kuberay/"
    for doc in docs:
        assert crd_errors(doc) == [], doc["metadata"]["name"]


def first_worker_group(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    return spec["workerGroupSpecs"][0]


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_strict_crd_schemas_reject_typos_and_wrong_types(kind):
    doc = of_kind(kind)[0]
    typo = copy.deepcopy(doc)
    group = first_worker_group(typo)
    group["maxReplica"] = group.pop("maxReplicas")
    assert any("'maxReplica' was unexpected" in e for e in crd_errors(typo))
    assert any("'maxReplicas' is a required property" in e for e in crd_errors(typo))
    listed = copy.deepcopy(doc)
    first_worker_group(listed)["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"
    ] = [1]
    assert any("nvidia.com/gpu: [1] is not valid" in e for e in crd_errors(listed))
    old = copy.deepcopy(doc) | {"apiVersion": "ray.io/v1alpha1"}
    assert any("'ray.io/v1alpha1' is not one of ['ray.io/v1']" in e for e in crd_errors(old))


def provenance_sha256() -> dict[str, str]:
    """{CRD file: sha256} as PROVENANCE.md records them."""
    text = (VENDOR / "PROVENANCE.md").read_text()
    return dict(re.findall(r"(ray\.io_\w+\.yaml)\S*\s*\|\s*`?([0-9a-f]{64})", text))


@pytest.mark.skipif(not CRD_SOURCES.is_dir(), reason=f"no KubeRay CRDs at {CRD_SOURCES}")
def test_vendored_schemas_are_the_conversion_of_the_recorded_crds(tmp_path):
    """The committed JSON is what convert.py makes of the CRD files PROVENANCE.md names."""
    recorded = provenance_sha256()
    spec = importlib.util.spec_from_file_location("kuberay_convert", VENDOR / "convert.py")
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    assert sorted(recorded) == sorted(f"ray.io_{plural}.yaml" for plural in convert.CRDS)
    for name, digest in recorded.items():
        found = hashlib.sha256((CRD_SOURCES / name).read_bytes()).hexdigest()
        assert found == digest, f"{CRD_SOURCES / name} is not the CRD that was converted"
    for path in convert.convert(CRD_SOURCES, tmp_path):
        assert path.read_text() == (VENDOR / path.name).read_text(), path.name


def test_every_head_mounts_the_config_map():
    """The driver reads --config on the head, so each head mounts the ConfigMap, read-only."""
    config_maps = {c["metadata"]["name"] for c in of_kind("ConfigMap")}
    for name, spec in cluster_specs().items():
        assert mounted_config_map(spec) in config_maps, f"{name}: nothing at {CONFIG_MOUNT}"
        mounts = {m["mountPath"]: m for m in head_container(spec)["volumeMounts"]}
        assert mounts[CONFIG_MOUNT].get("readOnly"), name


# -- PodMonitor ----------------------------------------------------------------------------
def ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def podmonitor_problems(
    monitor: dict[str, Any], spec: dict[str, Any], driver_port: int
) -> list[str]:
    """Why `monitor` would not scrape the pods of this RayCluster spec: the selector must
    match the head's and the workers' labels; Ray's `metrics` port must be on each of them,
    and the driver's metrics port (on the head, where a RayJob's driver runs) must be one
    of the scraped ports; every endpoint reads /metrics."""
    problems = []
    selector = monitor["spec"]["selector"]["matchLabels"]
    for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
        labels = group["template"].get("metadata", {}).get("labels", {})
        if not selector.items() <= labels.items():
            problems.append(f"selector {selector} misses the labels {labels}")
        if "metrics" not in ports(group["template"]["spec"]["containers"][0]):
            problems.append(f"no `metrics` port on {group.get('groupName', 'the head')}")
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    head_ports = ports(head_container(spec))
    if not any(head_ports.get(e["port"]) == driver_port for e in endpoints):
        problems.append(f"no scraped head port is the driver's metrics port {driver_port}")
    for endpoint in endpoints:
        if endpoint.get("path") != "/metrics":
            problems.append(f"{endpoint['port']} reads {endpoint.get('path')}")
    return problems


def kuberay_jobs(tmp_path: Path) -> dict[str, ExperimentConfig]:
    """The configs of the entrypoints that run on KubeRay: those naming the mounted config."""
    mounted = mounted_configs(tmp_path)
    return {
        name: job_config(entrypoint, mounted)
        for name, entrypoint in entrypoints().items()
        if parser().parse_args(train_argv(entrypoint)).config.startswith(CONFIG_MOUNT)
    }


def test_the_podmonitor_scrapes_the_driver_and_ray_on_every_kuberay_cluster(tmp_path):
    (monitor,) = of_kind("PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    jobs = kuberay_jobs(tmp_path)
    assert len(jobs) >= 2, "the RayJob's and the README's job on the RayCluster"
    for job, cfg in jobs.items():
        assert cfg.logging.metrics_host == "0.0.0.0", f"{job}: unreachable from another pod"
        for name, spec in cluster_specs().items():
            assert podmonitor_problems(monitor, spec, cfg.logging.metrics_port) == [], name
    assert LoggingConfig().metrics_host == "127.0.0.1", "the local default stays on loopback"


def test_podmonitor_check_rejects_a_monitor_that_would_scrape_nothing():
    (monitor,) = of_kind("PodMonitor")
    spec = next(iter(cluster_specs().values()))
    relabelled = copy.deepcopy(monitor)
    relabelled["spec"]["selector"]["matchLabels"] = {"app": "raydraft"}
    renamed = copy.deepcopy(monitor)
    renamed["spec"]["podMetricsEndpoints"][0]["port"] = "driver"
    wrong_path = copy.deepcopy(monitor)
    wrong_path["spec"]["podMetricsEndpoints"][1]["path"] = "/"
    for broken in (relabelled, renamed, wrong_path):
        assert podmonitor_problems(broken, spec, 9464), broken["spec"]
    assert podmonitor_problems(monitor, spec, 9465), "a port nobody serves on"


# -- runtime_env ---------------------------------------------------------------------------
def unknown_runtime_env_keys(runtime_env: dict[str, Any]) -> set[str]:
    """Keys Ray does not know: RuntimeEnv(**...) accepts them silently, so look ourselves."""
    RuntimeEnv(**runtime_env)  # the values Ray does check
    return set(runtime_env) - set(RuntimeEnv.known_fields)


def runtime_envs() -> dict[str, dict[str, Any]]:
    """cluster/runtime_env.yaml, each RayJob's runtimeEnvYAML and each README submit's."""
    found = {"runtime_env.yaml": load_yaml(CLUSTER / "runtime_env.yaml")}
    for job in of_kind("RayJob"):
        found[job["metadata"]["name"]] = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    for i, (options, _) in enumerate(readme_submits()):
        if "--runtime-env" in options:
            found[f"README job {i}"] = load_yaml(ROOT / options[options.index("--runtime-env") + 1])
        if "--runtime-env-json" in options:
            found[f"README job {i}"] = json.loads(options[options.index("--runtime-env-json") + 1])
    return found


def test_runtime_env_keys_are_known_to_ray():
    envs = runtime_envs()
    assert len(envs) >= 3
    for name, runtime_env in envs.items():
        assert unknown_runtime_env_keys(runtime_env) == set(), name
    assert unknown_runtime_env_keys({"excludez": [".git/"]}) == {"excludez"}


# -- entrypoints and the GPUs they need ----------------------------------------------------
def test_every_entrypoint_parses_and_names_a_config_that_loads(tmp_path):
    mounted = mounted_configs(tmp_path)
    found = entrypoints()
    assert len(found) >= 3, found  # the RayJob's and the README's launcher and KubeRay jobs
    for name, entrypoint in found.items():
        cfg = job_config(entrypoint, mounted)
        assert cfg.runtime == "ray", name
    broken = found["RayJob/raydraft-sd35m-ocr"]
    with pytest.raises(ConfigError, match=r"logging\.metrics_hots"):
        job_config(broken.replace("metrics_host", "metrics_hots"), mounted)
    with pytest.raises(ConfigError, match="no such file and no shipped config"):
        job_config(broken.replace("train.yaml", "trian.yaml"), mounted)
    with pytest.raises(AssertionError, match="rejects"):
        job_config(broken.replace("--run-dir", "--rundir"), mounted)


def cluster_nodes() -> dict[str, list[Node]]:
    nodes = {name: launcher_nodes(load_yaml(CLUSTER / name)) for name in LAUNCHERS}
    return nodes | {name: kuberay_nodes(spec) for name, spec in cluster_specs().items()}


def test_each_cluster_holds_each_jobs_roles(tmp_path):
    """Every documented job fits every cluster config: its GPUs and CPUs at their most
    (max_workers, maxReplicas) hold the roles' actors, replicas and bundles."""
    mounted = mounted_configs(tmp_path)
    clusters = cluster_nodes()
    for job, entrypoint in entrypoints().items():
        cfg = job_config(entrypoint, mounted)
        requests = role_requests(cfg)
        assert any(q.gpus for q in requests), f"{job}: a GPU job, or the check is vacuous"
        for name, nodes in clusters.items():
            assert unplaced(requests, nodes) == [], f"{job} on {name}"
        if cfg.model.device.startswith("cuda"):  # the driver's policy copy, on the head
            for name, spec in cluster_specs().items():
                limits = head_container(spec)["resources"]["limits"]
                assert int(limits.get("nvidia.com/gpu", 0)) >= 1, name


def test_placement_rejects_a_cluster_too_small():
    cfg = load_config("sd35m-pickscore-flowgrpo")  # 4 + 2 + 2 GPUs
    assert unplaced(role_requests(cfg), [Node(96, [1.0] * 8)]) == []
    assert len(unplaced(role_requests(cfg), [Node(96, [1.0] * 4)])) == 4
    assert len(unplaced(role_requests(cfg), [Node(4, [1.0] * 8)])) == 4  # CPUs run out
    halves = [Request("reward", 0.25, 0.5)] * 3
    assert len(unplaced(halves, [Node(8, [1.0])])) == 1  # two halves per device, not three


def test_the_default_fits_a_two_core_laptop_started_with_two_cpus():
    """`ray start --head --num-cpus=2` then `ray job submit` of the default: its roles (in
    sync mode they take turns) must place on the 2 CPUs, and a local instance need not
    declare more CPUs than such a machine has."""
    cfg = load_config(None, [])
    assert unplaced(role_requests(cfg), [Node(2, [])]) == []
    assert required_cpus(cfg) == 2
    bigger = load_config(None, ["ray.worker_cpus=1.0"])
    assert len(unplaced(role_requests(bigger), [Node(2, [])])) == 1
