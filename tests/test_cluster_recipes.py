"""The cluster recipes in cluster/launcher/ and cluster/kuberay/ parse and have what their tools require.

Launcher config: validated by Ray's own code, as `ray up` does before it calls the cloud (`prepare_config`
merges the provider's defaults, `validate_config` checks Ray's JSON schema, which forbids unknown keys).
KubeRay manifests: no operator here, so the fields are checked against the ray.io/v1 Go types of KubeRay
(ray-operator/apis/ray/v1/raycluster_types.go, rayjob_types.go): required fields present, no unknown field
(a typo would be dropped or rejected by the API server). Both recipes must also fit the study they run
(GPUs and CPUs of one trial on one node) and pin the Ray and torch versions this project is tested with.
No network, no cloud, no Kubernetes: fast.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "cluster" / "launcher" / "aws-gpu.yaml"
KUBERAY = REPO / "cluster" / "kuberay"
RAYJOB = KUBERAY / "rayjob-isoflop.yaml"
PAPER_STUDY = REPO / "studies" / "paper" / "isoflop.yaml"
SHARED = "/mnt/shared"

# Fields of the KubeRay ray.io/v1 types (json tags); REQUIRED_* have no `omitempty`.
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
               "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
               "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule"}
RAYCLUSTER_SPEC = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
                   "autoscalerOptions", "headServiceAnnotations", "suspend"}
HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
                "template", "scaleStrategy"}
REQUIRED_HEAD_GROUP = {"rayStartParams", "template"}
REQUIRED_WORKER_GROUP = {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"}


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def paper_trial_needs() -> tuple[float, float]:
    """(GPUs, CPUs) one trial of the paper's isoFLOP study asks for."""
    resources = yaml.safe_load(PAPER_STUDY.read_text())["resources"]
    workers = resources["workers_per_trial"]
    return workers * resources["gpus_per_worker"], workers * resources["cpus_per_worker"]


def torch_version_under_test() -> str:
    return re.search(r"^TORCH_CPU_VERSION \?= (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)


# ----------------------------------------------------------------------------------------- launcher


@pytest.fixture(scope="module")
def launcher() -> dict:
    (config,) = load_all(LAUNCHER)
    return config


def test_launcher_config_passes_rays_own_validation(launcher):
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(launcher, schema)
    validate_config(prepare_config(copy.deepcopy(launcher)))


def test_rays_validation_rejects_a_misspelled_field(launcher):
    """The check above can fail: the schema forbids keys the launcher does not know."""
    broken = copy.deepcopy(launcher)
    broken["setup_command"] = broken.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_launcher_has_a_cpu_head_and_gpu_workers_that_fit_a_paper_trial(launcher):
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert launcher.get(key), key
    assert launcher["provider"]["type"] == "aws"
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0  # trials' GPU workers never land on the head
    gpus, cpus = paper_trial_needs()
    workers = {name: t for name, t in types.items() if name != launcher["head_node_type"]}
    assert workers
    for name, node in workers.items():
        assert node["node_config"]["InstanceType"], name
        assert node["resources"]["GPU"] >= gpus and node["resources"]["CPU"] >= cpus, name
        assert node["max_workers"] >= 1, name
        mounts = " ".join(node["initialization_commands"])
        assert f"$RAY_HEAD_IP:{SHARED}" in mounts, name  # every worker mounts the head's shared volume
    assert f"-v {SHARED}:{SHARED}" in launcher["docker"]["run_options"]


def test_launcher_installs_cuda_torch_before_the_project_and_pins_ray(launcher):
    setup = launcher["setup_commands"]
    torch_step = next(i for i, c in enumerate(setup) if "torch==" in c)
    project_step = next(i for i, c in enumerate(setup) if "pip install" in c and "peer-sweeps" in c)
    assert torch_step < project_step
    assert f"torch=={torch_version_under_test()}" in setup[torch_step]
    assert launcher["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    assert launcher["file_mounts"]["~/peer-sweeps"] == "."


# ----------------------------------------------------------------------------------------- KubeRay


@pytest.fixture(scope="module")
def kuberay_docs() -> dict[str, dict]:
    docs = load_all(RAYJOB)
    return {doc["kind"]: doc for doc in docs}


def _containers(template: dict) -> list[dict]:
    containers = template["spec"]["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers)
    return containers


def _check_volumes(template: dict, claim: str) -> None:
    """Every container mounts the shared claim at SHARED, and each mount names a volume of the pod."""
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    for container in _containers(template):
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert set(mounts.values()) <= set(volumes), mounts
        assert volumes[mounts[SHARED]]["persistentVolumeClaim"]["claimName"] == claim


def test_rayjob_has_the_fields_kuberay_requires_and_no_unknown_ones(kuberay_docs):
    job = kuberay_docs["RayJob"]
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC, set(spec) - RAYJOB_SPEC
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= RAYCLUSTER_SPEC, set(cluster) - RAYCLUSTER_SPEC
    head = cluster["headGroupSpec"]
    assert REQUIRED_HEAD_GROUP <= set(head) <= HEAD_GROUP, set(head)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # map[string]string
    assert cluster["workerGroupSpecs"]
    for group in cluster["workerGroupSpecs"]:
        assert REQUIRED_WORKER_GROUP <= set(group) <= WORKER_GROUP, set(group)
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
    yaml.safe_load(spec["runtimeEnvYAML"])  # a YAML document inside a string


def test_rayjob_gpu_workers_fit_a_paper_trial_and_share_storage(kuberay_docs):
    cluster = kuberay_docs["RayJob"]["spec"]["rayClusterSpec"]
    claim = kuberay_docs["PersistentVolumeClaim"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    gpus, cpus = paper_trial_needs()
    for container in _containers(cluster["headGroupSpec"]["template"]):
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
    _check_volumes(cluster["headGroupSpec"]["template"], claim["metadata"]["name"])
    for group in cluster["workerGroupSpecs"]:
        (container,) = _containers(group["template"])
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert int(limits["nvidia.com/gpu"]) >= gpus and float(limits["cpu"]) >= cpus
        assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"]  # Kubernetes: GPU request == limit
        _check_volumes(group["template"], claim["metadata"]["name"])


def test_rayjob_runs_the_paper_study_into_shared_storage_on_the_tested_ray(kuberay_docs):
    spec = kuberay_docs["RayJob"]["spec"]
    entrypoint = spec["entrypoint"]
    assert "peer-sweeps run studies/paper/isoflop.yaml" in entrypoint
    assert re.search(rf"--out {SHARED}/\S+", entrypoint)
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["PEER_SWEEPS_DATA"].startswith(SHARED)
    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-" in dockerfile
    assert f'"torch=={torch_version_under_test()}"' in dockerfile
    assert dockerfile.index("torch==") < dockerfile.index("pip install --no-cache-dir -e .")
    for source in re.findall(r"^COPY --chown=\S+ (.+) \S+$", dockerfile, re.M):
        for path in source.split():
            assert (REPO / path).exists(), path


def test_recipes_install_what_the_paper_studies_need_and_deepspeed_is_pinned_to_the_tested_version():
    """The c4 suite of the paper's studies needs `datasets` on every node; cluster/ relies on DeepSpeed
    internals, so pyproject pins the version installed (and tested) here. The head volume holds the paper
    study's checkpoints (`peer-sweeps plan`: 1,110 GB at peak with 4 trials at a time) and its data."""
    from importlib.metadata import version

    from peer_sweeps.plan import plan_study, storage_totals
    from peer_sweeps.study import load_study

    config = yaml.safe_load(LAUNCHER.read_text())
    assert any(re.search(r"pip install .*\bdatasets\b", command) for command in config["setup_commands"])
    assert "pip install --no-cache-dir datasets" in (KUBERAY / "Dockerfile").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'"deepspeed==([\d.]+)"', pyproject).group(1) == version("deepspeed")
    (head_disk,) = config["available_node_types"]["ray.head.cpu"]["node_config"]["BlockDeviceMappings"]
    peak = storage_totals(plan_study(load_study(PAPER_STUDY)), concurrent=4)["peak"]
    assert head_disk["Ebs"]["VolumeSize"] > peak * 1.2
