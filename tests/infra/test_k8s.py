"""infra/k8s validates offline: every object of every overlay (after kustomize) against its schema, and our rules.

Schemas: KubeRay v1.7.0's CRDs (`../shared/kuberay-crds/`, made strict here: a field the CRD does not declare is an
error, as `kubectl apply --validate=strict` would make it) and the core Kubernetes ones shipped by
`kubernetes-validate` (strict mode). Rendering uses `kubectl kustomize` (kubectl's built-in kustomize).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from ssn_platform.kuberay import locked_ray_version  # YAML only: no Ray in this process

_imported_here = "ray" not in sys.modules  # Ray must stay out of this process (see the last test)
REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "infra" / "k8s"
CRDS = REPO.parent / "shared" / "kuberay-crds"
OVERLAYS = ["local-kind", "gpu-cluster"]
KUBERNETES_VERSION = "1.37.0"  # the newest schema set kubernetes-validate ships
RAY_KINDS = {"RayCluster", "RayJob", "RayService"}
JOBS = {"ingest", "train", "tune", "calibrate", "promote", "evaluate", "score", "drift"}


def render(path: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is needed to render infra/k8s; .ci/run installs it"
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, f"kubectl kustomize {path} failed: {out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(K8S / "overlays" / request.param)


def strict(schema: dict) -> dict:
    """The CRD schema with `additionalProperties: false` wherever it lists properties and allows no unknown ones."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked by the core schemas' rules below
    return schema


@pytest.fixture(scope="module")
def crd_schemas() -> dict[str, dict]:
    schemas = {}
    for path in sorted(CRDS.glob("ray.io_*.yaml")):
        crd = yaml.safe_load(path.read_text())
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schemas[crd["spec"]["names"]["kind"]] = strict(version["schema"]["openAPIV3Schema"])
    assert set(schemas) >= RAY_KINDS, f"missing KubeRay CRDs in {CRDS}"
    return schemas


def validate(obj: dict, crd_schemas: dict[str, dict]) -> None:
    if obj["kind"] in RAY_KINDS:
        assert obj["apiVersion"] == "ray.io/v1"
        jsonschema.validate(obj, crd_schemas[obj["kind"]])
    else:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_every_object_of_every_overlay_matches_its_schema(rendered, crd_schemas):
    overlay, objects = rendered
    kinds = sorted({o["kind"] for o in objects})
    assert {"RayCluster", "RayService", "RayJob", "Deployment", "Service", "ConfigMap"} <= set(kinds), kinds
    for obj in objects:
        try:
            validate(obj, crd_schemas)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as error:
            pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']}: {error.message}")


@pytest.mark.parametrize(
    "mutation, culprit",
    [
        (lambda o: o["spec"]["headGroupSpec"].update(rayStartParam={}), "rayStartParam"),  # a misspelt field
        (lambda o: o["spec"]["workerGroupSpecs"][0].update(minReplicas="1"), "'1'"),  # a wrong type
        (lambda o: o["spec"]["workerGroupSpecs"][0].pop("groupName"), "groupName"),  # a missing field
    ],
)
def test_the_validation_rejects_unknown_fields_wrong_types_and_missing_required_ones(crd_schemas, mutation, culprit):
    cluster = next(o for o in render(K8S / "overlays" / "local-kind") if o["kind"] == "RayCluster")
    validate(cluster, crd_schemas)
    mutation(cluster)
    with pytest.raises(jsonschema.ValidationError, match=re.escape(culprit)):
        validate(cluster, crd_schemas)
    deployment = next(o for o in render(K8S / "overlays" / "local-kind") if o["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment, crd_schemas)


def pod_specs(obj: dict) -> list[dict]:
    """Every pod template's spec in a Deployment or a Ray resource."""
    spec = obj.get("spec", {})
    cluster = (
        spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or (spec if obj["kind"] == "RayCluster" else None)
    )
    if cluster:
        groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
        return [g["template"]["spec"] for g in groups]
    if obj["kind"] == "Deployment":
        return [spec["template"]["spec"]]
    return []


def test_cluster_conventions(rendered):
    overlay, objects = rendered
    ray_version = locked_ray_version()
    for obj in objects:
        name = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
        assert obj["metadata"].get("namespace") == "ssn" or obj["kind"] == "Namespace", f"{name}: not in namespace ssn"
        cluster = pod_specs(obj)
        if obj["kind"] in RAY_KINDS:
            spec = obj["spec"].get("rayClusterSpec") or obj["spec"].get("rayClusterConfig") or obj["spec"]
            assert spec["rayVersion"] == ray_version, f"{name}: rayVersion is not the pinned ray {ray_version}"
            assert spec["authOptions"]["mode"] == "token", f"{name}: Ray token authentication is off"
            assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", f"{name}: work may land on the head"
            assert spec.get("enableInTreeAutoscaling") is True, name
        for pod in cluster:
            for container in pod["containers"]:
                image = container["image"]
                assert re.fullmatch(r"[\w./-]+(@sha256:[0-9a-f]{64}|:(?!latest$)[\w.-]+)", image), (
                    f"{name}: image {image!r} is pinned by neither digest nor exact tag"
                )
                limits = container.get("resources", {}).get("limits", {})
                if "nvidia.com/gpu" in limits:
                    assert container["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"], name
                    assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), (
                        f"{name}: a GPU pod without the GPU taint's toleration"
                    )
            assert pod["securityContext"]["runAsNonRoot"] is True, name
    gpus = [
        c
        for o in objects
        for p in pod_specs(o)
        for c in p["containers"]
        if "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
    ]
    if overlay == "gpu-cluster":
        assert gpus, "the GPU overlay has no GPU pods"
        service = next(o for o in objects if o["kind"] == "RayService")
        assert yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]["num_gpus"] == 1
    else:
        assert not gpus, f"{overlay}: GPU pods in a CPU-only overlay"


def test_a_rayjob_template_per_job_each_suspended_and_self_cleaning(rendered):
    overlay, objects = rendered
    jobs = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "RayJob"}
    assert set(jobs) == {f"ssn-{job}" for job in JOBS}, sorted(jobs)
    for name, spec in jobs.items():
        job = name.removeprefix("ssn-")
        assert spec["entrypoint"].startswith(f"python /app/jobs/{job}.py "), (name, spec["entrypoint"])
        assert (REPO / "jobs" / f"{job}.py").is_file()
        assert spec["suspend"] is True and spec["submissionMode"] == "K8sJobMode", name
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0, name
        assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 0, name
        for config in re.findall(r"--config (\S+)", spec["entrypoint"]):
            assert (REPO / config.removeprefix("/app/")).is_file(), f"{name}: {config} is not in the image"


RAY_HEAD = {"ray.io/is-ray-node": "yes", "ray.io/node-type": "head"}
RAY_WORKER = {"ray.io/is-ray-node": "yes", "ray.io/node-type": "worker"}
MLFLOW = {"app.kubernetes.io/name": "mlflow"}


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels is modelled here: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def reachable(policies: list[dict], pod: dict, port: int, *, namespace: str, source: dict) -> bool:
    """NetworkPolicy ingress semantics (networking.k8s.io/v1) for a pod of namespace ssn: isolated when a policy
    selects it, then allowed when some rule of a selecting policy matches the source (pod labels and namespace)
    and the port. `source` holds the source pod's labels."""
    selecting = [
        p["spec"]
        for p in policies
        if _selects(p["spec"]["podSelector"], pod) and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not selecting:
        return True
    for spec in selecting:
        for rule in spec.get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(p.get("port") == port for p in ports):
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                namespaces = peer.get("namespaceSelector")
                in_namespace = (
                    _selects(namespaces, {"kubernetes.io/metadata.name": namespace})
                    if namespaces is not None
                    else namespace == "ssn"
                )
                if in_namespace and ("podSelector" not in peer or _selects(peer["podSelector"], source)):
                    return True
    return False


def test_pod_ingress_is_closed_by_default_and_open_only_where_a_rule_says(rendered):
    overlay, objects = rendered
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    assert any(p["spec"]["podSelector"] == {} and not p["spec"].get("ingress") for p in policies), (
        f"{overlay}: no default-deny ingress policy"
    )
    outside, operator = {"namespace": "factory", "source": {}}, {"namespace": "kuberay-system", "source": {}}
    submitter = {"namespace": "ssn", "source": {"job-name": "ssn-train"}}
    for pod in (RAY_HEAD, RAY_WORKER):  # the production line reaches the endpoint on every Ray node, nothing else
        assert reachable(policies, pod, 8000, **outside), (overlay, pod)
        for port in (6379, 8265, 10001, 8080, 52365):
            assert not reachable(policies, pod, port, **outside), (overlay, pod, port)
        for port in (6379, 8265, 10001, 29500, 40000):  # Ray nodes talk to each other on any port
            assert reachable(policies, pod, port, namespace="ssn", source=RAY_WORKER), (overlay, pod, port)
        assert reachable(policies, pod, 8080, namespace="monitoring", source={})  # Prometheus
        assert not reachable(policies, pod, 6379, **submitter)
    assert reachable(policies, RAY_HEAD, 8265, **submitter) and reachable(policies, RAY_HEAD, 8265, **operator)
    assert not reachable(policies, RAY_WORKER, 8265, **operator)
    assert reachable(policies, MLFLOW, 5000, **submitter) and reachable(
        policies, MLFLOW, 5000, namespace="ssn", source=RAY_WORKER
    )
    assert not reachable(policies, MLFLOW, 5000, **outside) and not reachable(policies, MLFLOW, 5000, **operator)


SECRET_LIKE = re.compile(r"(password|secret|token|access.?key|credential)", re.I)


def test_no_secret_value_in_any_manifest_or_runtime_env(rendered):
    overlay, objects = rendered
    assert not [o for o in objects if o["kind"] == "Secret"], "a Secret with values is committed"
    for obj in objects:
        name = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
        for pod in pod_specs(obj):
            for container in pod["containers"]:
                for env in container.get("env", []):
                    assert "value" not in env or not SECRET_LIKE.search(env["name"]) or env["name"].endswith("_PATH"), (
                        f"{name}: {env['name']} has an inline value"
                    )
        if obj["kind"] == "ConfigMap":
            for key, value in obj["data"].items():
                assert not SECRET_LIKE.search(key) or key.endswith("_FILE"), f"{name}: {key} looks like a secret"
                assert "://" not in value or "@" not in value, f"{name}: {key} holds a URL with credentials"
        if obj["kind"] == "RayService":
            serve = yaml.safe_load(obj["spec"]["serveConfigV2"])
            for app in serve["applications"]:
                env = (app.get("runtime_env") or {}).get("env_vars", {})
                assert not [k for k in env if SECRET_LIKE.search(k)], f"{name}: a secret in the runtime env"
        for key in ("redisPassword",):
            spec = obj.get("spec", {})
            options = (
                spec.get("gcsFaultToleranceOptions")
                or (spec.get("rayClusterConfig") or {}).get("gcsFaultToleranceOptions")
                or {}
            )
            assert "value" not in options.get(key, {}), f"{name}: an inline Redis password"


def test_the_rayservice_is_generated_from_the_serve_config():
    from ssn_platform import kuberay

    assert kuberay.main(["--check"]) == 0, "run: python -m ssn_platform.kuberay --write"
    local = yaml.safe_load((REPO / "jobs" / "configs" / "serve.yaml").read_text())
    cluster = kuberay.cluster_serve_config(local, "gpu")
    app, local_app = cluster["applications"][0], local["applications"][0]
    assert app["import_path"] == local_app["import_path"] and "http_options" not in cluster
    assert {k: v for k, v in app["args"].items() if k not in kuberay.PROFILES["gpu"]} == {
        k: v for k, v in local_app["args"].items() if k not in kuberay.PROFILES["gpu"]
    }
    assert app["args"]["num_gpus"] == 1 and "MLFLOW_TRACKING_URI" not in str(app.get("runtime_env"))
    # Serve and the app accept what is generated. In a child process: importing Ray here, before the live stack's
    # fixture sets its address and auth mode, would break every later in-process Ray connection of the session
    # (tests/conftest.py, pytest_collection_finish).
    configs = [kuberay.cluster_serve_config(local, profile) for profile in kuberay.PROFILES]
    check = (
        "import json, sys\n"
        "from ray.serve.schema import ServeDeploySchema\n"
        "from ssn_platform.serving.settings import ServeSettings\n"
        "for config in json.load(sys.stdin):\n"
        "    ServeDeploySchema.model_validate(config)\n"
        "    ServeSettings(**config['applications'][0]['args'])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", check],
        input=json.dumps(configs),
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ray" not in sys.modules or not _imported_here, "this test must not import Ray in the test process"
