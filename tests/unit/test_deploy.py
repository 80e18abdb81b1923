"""deploy/ manifests and the Dockerfiles (SPEC §4): valid Kubernetes objects, true to the flags.

Every object validates against the Kubernetes JSON schemas (kubernetes-validate, strict: an
unknown or misspelt field fails); every adapter container's `args:` go through the real flag
parser, so a manifest can never carry a flag the adapters would refuse; the probes, the
Service, the grace period and the Dockerfiles' EXPOSE lines are checked against the ports and
periods those flags configure. Workloads are Deployments and the StatefulSet of the
local-spool variant, whose queue must live on a PersistentVolumeClaim per replica.
"""

from __future__ import annotations

import json
import posixpath
import shlex
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from dicom_adapter.aets import parse_aet_dictionary
from dicom_adapter.config.common import CommonSettings
from dicom_adapter.config.exporter import ExporterSettings
from dicom_adapter.config.importer import ImporterSettings
from dicom_adapter.config.parse import parse_settings
from dicom_adapter.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUSTOMIZATION = DEPLOY / "kustomization.yaml"
SIDECAR = DEPLOY / "import-with-export-sidecar.yaml"
SPOOL = DEPLOY / "import-spool-statefulset.yaml"
# Alternatives to import-deployment.yaml, not in the standard kustomization.
VARIANTS = (SIDECAR, SPOOL)
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
# The flags that make the spool variant differ from the Deployment.
SPOOL_FLAGS = frozenset({"persistent_file_storage_location", "auto_ack_cstore"})

# 1.30: the oldest minor these manifests promise to work on (autoscaling/v2, policy/v1 and
# every field used here are GA there); the newest the package has schemas for catches
# removals.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())

Obj = dict[str, Any]


@dataclass(frozen=True)
class Image:
    """One of the two container images and the console script it runs."""

    script: str
    model: type[CommonSettings]
    dockerfile: Path


IMAGES = {
    "dicom-adapter-import": Image("dicom-import", ImporterSettings, ROOT / "Dockerfile.import"),
    "dicom-adapter-export": Image("dicom-export", ExporterSettings, ROOT / "Dockerfile.export"),
}


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    """deploy/*.yaml except the kustomization (not a Kubernetes object)."""
    return sorted(p for p in DEPLOY.glob("*.yaml") if p != KUSTOMIZATION)


def load_documents(path: Path) -> list[Obj]:
    docs = [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]
    assert all(isinstance(doc, dict) for doc in docs), path.name
    return docs


MANIFESTS: list[tuple[str, Path, Obj]] = [
    (f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", path, doc)
    for path in manifest_files()
    for doc in load_documents(path)
]


def objects(kind: str) -> list[tuple[str, Path, Obj]]:
    return [m for m in MANIFESTS if m[2]["kind"] == kind]


def workloads() -> list[tuple[str, Path, Obj]]:
    """Deployments and StatefulSets: the objects that run adapter pods."""
    return [m for m in MANIFESTS if m[2]["kind"] in WORKLOAD_KINDS]


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def image_of(container: Obj) -> Image:
    """The image a container runs, whatever registry path and tag replace the example's."""
    repository = str(container["image"]).split("@")[0].rsplit("/", 1)[-1].split(":")[0]
    assert repository in IMAGES, f"{container['name']}: not an adapter image: {container['image']}"
    return IMAGES[repository]


@dataclass(frozen=True)
class Container:
    """An adapter container in a workload, with the settings its args and env produce."""

    where: str
    path: Path
    workload: Obj
    container: Obj
    image: Image

    @property
    def pod(self) -> Obj:
        return pod_spec(self.workload)

    @property
    def settings(self) -> CommonSettings:
        return container_settings(self.container, self.image)


def adapter_containers() -> list[Container]:
    found = []
    for where, path, workload in workloads():
        for container in pod_spec(workload)["containers"]:
            found.append(
                Container(
                    f"{where}:{container['name']}", path, workload, container, image_of(container)
                )
            )
    return found


CONTAINERS = adapter_containers()
IMPORT_CONTAINERS = [c for c in CONTAINERS if c.image.script == "dicom-import"]


def container_settings(container: Obj, image: Image) -> CommonSettings:
    """Parse the container's args with the real parser, over the environment it would see."""
    environ = dict(dockerfile_env(image.dockerfile))
    environ.update({e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e})
    argv = [str(arg) for arg in container.get("args", [])]
    return parse_settings(
        image.model, argv, prog=image.script, description="deploy", environ=environ
    )


def metrics_port(settings: CommonSettings) -> int:
    assert isinstance(settings, ImporterSettings | ExporterSettings)
    return settings.metrics_port


def importer(settings: CommonSettings) -> ImporterSettings:
    assert isinstance(settings, ImporterSettings)
    return settings


def resolve_port(containers: list[Obj], port: int | str) -> int:
    """A probe's or Service's port: a number, or the name of a containerPort."""
    if isinstance(port, int):
        return port
    numbers = [
        int(p["containerPort"])
        for c in containers
        for p in c.get("ports", [])
        if p.get("name") == port
    ]
    assert len(numbers) == 1, f"port name {port!r} matches {len(numbers)} container ports"
    return numbers[0]


def prestop_seconds(container: Obj) -> float:
    """How long the preStop hook delays SIGTERM (sleep hooks only; 0 when there is none)."""
    hook = container.get("lifecycle", {}).get("preStop")
    if not hook:
        return 0.0
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook.get("exec", {}).get("command", [])
    assert command[:1] == ["sleep"] and len(command) == 2, f"unexpected preStop hook: {hook}"
    return float(command[1])


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --------------------------------------------------------------------------------------------
# Dockerfiles
# --------------------------------------------------------------------------------------------


def dockerfile_stages(path: Path) -> list[list[tuple[str, str]]]:
    """(INSTRUCTION, arguments) per build stage, continuation lines joined, comments dropped."""
    stages: list[list[tuple[str, str]]] = []
    logical = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        keyword, _, rest = logical.partition(" ")
        logical = ""
        if keyword.upper() == "FROM":
            stages.append([])
        assert stages, f"{path.name}: {keyword} before FROM"
        stages[-1].append((keyword.upper(), rest.strip()))
    assert not logical, f"{path.name}: ends in a continuation line"
    return stages


def final_stage(path: Path) -> list[tuple[str, str]]:
    return dockerfile_stages(path)[-1]


def instruction_args(path: Path, keyword: str) -> list[str]:
    return [rest for kw, rest in final_stage(path) if kw == keyword]


def dockerfile_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in instruction_args(path, "ENV"):
        for token in shlex.split(rest):
            key, sep, value = token.partition("=")
            assert sep, f"{path.name}: use ENV KEY=VALUE, not {rest!r}"
            env[key] = value
    return env


def exposed_ports(path: Path) -> set[int]:
    return {int(p.split("/")[0]) for rest in instruction_args(path, "EXPOSE") for p in rest.split()}


def walk_strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from walk_strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk_strings(item)
    elif isinstance(node, str):
        yield node


# --------------------------------------------------------------------------------------------
# the objects are valid Kubernetes
# --------------------------------------------------------------------------------------------


def test_deploy_has_every_object_the_spec_asks_for() -> None:
    kinds = {(doc["apiVersion"], doc["kind"]) for _, _, doc in MANIFESTS}
    assert kinds >= {
        ("apps/v1", "Deployment"),
        ("apps/v1", "StatefulSet"),
        ("v1", "Service"),
        ("v1", "ConfigMap"),
        ("v1", "ServiceAccount"),
        ("autoscaling/v2", "HorizontalPodAutoscaler"),
        ("policy/v1", "PodDisruptionBudget"),
    }
    assert not objects("Secret"), "credentials come from Workload Identity, not Secrets"
    scripts = {c.image.script for c in CONTAINERS}
    assert scripts == {"dicom-import", "dicom-export"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("where", "doc"), [pytest.param(m[0], m[2], id=m[0]) for m in MANIFESTS])
def test_manifest_validates_strictly(where: str, doc: Obj, version: str) -> None:
    problem = ""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        problem = f"{where} is not valid Kubernetes {exc.version}: {path}: {exc.message}"
    if problem:  # outside the except: the jsonschema error would print the whole schema
        pytest.fail(problem, pytrace=False)


def test_kustomization_applies_the_standard_set() -> None:
    kustomization = load_documents(KUSTOMIZATION)
    assert len(kustomization) == 1
    resources = kustomization[0]["resources"]
    assert all((DEPLOY / name).is_file() for name in resources)
    # Everything but the variants, which replace import-deployment.yaml.
    assert sorted(resources) == sorted(p.name for p in manifest_files() if p not in VARIANTS)
    names = {(doc["kind"], doc["metadata"]["name"]) for doc in load_documents(SIDECAR)}
    assert names == {("Deployment", "dicom-import")}
    names = {(doc["kind"], doc["metadata"]["name"]) for doc in load_documents(SPOOL)}
    assert names == {("StatefulSet", "dicom-import"), ("Service", "dicom-import-headless")}
    # Swapping the variant in for import-deployment.yaml leaves no other object by the names
    # it brings (the standard set has no Service called dicom-import-headless).
    standard = {
        (doc["kind"], doc["metadata"]["name"])
        for name in resources
        for doc in load_documents(DEPLOY / name)
    }
    assert not names & standard


# --------------------------------------------------------------------------------------------
# containers: flags, probes, shutdown, security
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("c", CONTAINERS, ids=lambda c: c.where)
def test_container_args_parse_with_the_real_flag_parser(c: Container) -> None:
    assert "command" not in c.container, "the image's ENTRYPOINT runs the console script"
    args = [str(arg) for arg in c.container["args"]]
    assert all(arg.startswith("--") for arg in args), args
    settings = c.settings  # raises ConfigError on any flag the adapter would refuse
    if isinstance(settings, ImporterSettings):
        assert settings.dimse_aet
        assert settings.dimse_port > 0, "set --dimse_port: the Java default 0 is a random port"
        assert settings.dicomweb_address
    else:
        assert isinstance(settings, ExporterSettings)
        assert settings.project_id and settings.subscription_id and settings.dicomweb_addr


@pytest.mark.parametrize("c", CONTAINERS, ids=lambda c: c.where)
def test_probes_hit_the_health_endpoints_on_the_metrics_port(c: Container) -> None:
    port = metrics_port(c.settings)
    assert port > 0, "the probes need a fixed --metrics_port"
    ports = {int(p["containerPort"]) for p in c.container["ports"]}
    assert port in ports
    probes = {"livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    sidecar = c.image.script == "dicom-export" and len(c.pod["containers"]) > 1
    if sidecar:
        # Its readiness would take the whole pod out of the DIMSE Service.
        assert "readinessProbe" not in c.container
        del probes["readinessProbe"]
    for probe, path in probes.items():
        get = c.container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert resolve_port([c.container], get["port"]) == port, probe


@pytest.mark.parametrize("c", CONTAINERS, ids=lambda c: c.where)
def test_termination_grace_period_outlasts_the_drain(c: Container) -> None:
    drain = prestop_seconds(c.container) + c.settings.shutdown_grace_period
    assert c.pod["terminationGracePeriodSeconds"] > drain


@pytest.mark.parametrize("c", CONTAINERS, ids=lambda c: c.where)
def test_container_runs_non_root_with_a_read_only_root_and_a_spool_volume(c: Container) -> None:
    pod_security = c.pod["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    user = instruction_args(c.image.dockerfile, "USER")[-1].split(":")[0]
    assert pod_security["runAsUser"] == int(user)
    security = c.container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in c.pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c.container["volumeMounts"]}
    scratch = dockerfile_env(c.image.dockerfile)["TMPDIR"]
    for path in (scratch, "/tmp"):
        assert path in mounts, f"nothing writable mounted at {path}"
        assert "emptyDir" in volumes[mounts[path]]
    assert "resources" in c.container
    assert {"requests", "limits"} <= set(c.container["resources"])


@pytest.mark.parametrize("c", IMPORT_CONTAINERS, ids=lambda c: c.where)
def test_aet_dictionary_comes_from_the_configmap(c: Container) -> None:
    path = importer(c.settings).aet_dictionary
    assert path, "dicom-import should get its AET dictionary from the ConfigMap"
    directory, key = posixpath.split(path)
    mounts = {m["mountPath"]: m["name"] for m in c.container["volumeMounts"]}
    volumes = {v["name"]: v for v in c.pod["volumes"]}
    volume = volumes[mounts[directory]]
    configmaps = {doc["metadata"]["name"]: doc for _, _, doc in objects("ConfigMap")}
    text = configmaps[volume["configMap"]["name"]]["data"][key]
    aets = parse_aet_dictionary(text, "aet_dictionary")
    assert len(aets) > 0
    example = json.loads((ROOT / "aets.example.json").read_text(encoding="utf-8"))
    assert {e["name"] for e in example} <= set(aets.names), "keep it like aets.example.json"


def test_ports_do_not_collide_within_a_pod() -> None:
    for where, _, workload in workloads():
        ports = [p for c in pod_spec(workload)["containers"] for p in c.get("ports", [])]
        numbers = [p["containerPort"] for p in ports]
        names = [p["name"] for p in ports]
        assert len(set(numbers)) == len(numbers), where
        assert len(set(names)) == len(names), where


def test_sidecar_pod_runs_both_adapters() -> None:
    [(_, _, deployment)] = [m for m in workloads() if m[1] == SIDECAR]
    scripts = [image_of(c).script for c in pod_spec(deployment)["containers"]]
    assert scripts == ["dicom-import", "dicom-export"]
    metrics = {c.image.script: metrics_port(c.settings) for c in CONTAINERS if c.path == SIDECAR}
    assert metrics == {"dicom-import": 9090, "dicom-export": 9091}


def test_prometheus_annotations_name_the_metrics_port() -> None:
    for where, path, workload in workloads():
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        first = next(c for c in CONTAINERS if c.path == path and c.workload is workload)
        assert annotations["prometheus.io/scrape"] == "true", where
        assert annotations["prometheus.io/path"] == "/metrics", where
        assert int(annotations["prometheus.io/port"]) == metrics_port(first.settings), where


# --------------------------------------------------------------------------------------------
# Service, HPA, PDB, ServiceAccounts
# --------------------------------------------------------------------------------------------


def test_service_is_a_tcp_load_balancer_on_the_dimse_port() -> None:
    [(_, _, service)] = [
        m for m in objects("Service") if m[2]["spec"].get("type") == "LoadBalancer"
    ]
    spec = service["spec"]
    assert spec["type"] == "LoadBalancer"
    assert spec["externalTrafficPolicy"] == "Local"  # keeps the modality's source IP
    targets = [
        c
        for c in IMPORT_CONTAINERS
        if labels_match(spec["selector"], c.workload["spec"]["template"]["metadata"]["labels"])
    ]
    # Every import variant (own Deployment, export sidecar, spool StatefulSet) sits behind it.
    assert {c.path.name for c in targets} == {"import-deployment.yaml", SIDECAR.name, SPOOL.name}
    [port] = spec["ports"]
    assert port["protocol"] == "TCP"
    for c in targets:
        dimse_port = importer(c.settings).dimse_port
        assert resolve_port(c.pod["containers"], port["targetPort"]) == dimse_port
        assert port["port"] == dimse_port  # the port modalities are configured with


def test_hpa_and_pdb_cover_the_import_deployment() -> None:
    import_workloads = [m for m in workloads() if m[2]["metadata"]["name"] == "dicom-import"]
    # import-deployment.yaml, the sidecar variant and the spool StatefulSet
    assert [m[1] for m in import_workloads] == sorted(
        [DEPLOY / "import-deployment.yaml", SIDECAR, SPOOL]
    )
    [(_, _, hpa)] = objects("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        "dicom-import",
    )
    assert hpa["spec"]["minReplicas"] >= 2
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    [(_, _, pdb)] = objects("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    for where, _, workload in import_workloads:
        assert workload["spec"]["replicas"] >= 2, where
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert labels_match(pdb["spec"]["selector"]["matchLabels"], labels), where
        assert labels_match(workload["spec"]["selector"]["matchLabels"], labels), where
        for c in pod_spec(workload)["containers"]:
            assert "cpu" in c["resources"]["requests"], "the CPU HPA needs CPU requests"


def test_a_local_spool_lives_on_a_claim_per_replica_of_a_statefulset() -> None:
    spooling = [
        c for c in IMPORT_CONTAINERS if importer(c.settings).persistent_file_storage_location
    ]
    assert [c.path for c in spooling] == [SPOOL]
    for c in IMPORT_CONTAINERS:
        settings = importer(c.settings)
        # Acknowledging before the upload is only safe with a durable queue behind it.
        assert not settings.auto_ack_cstore or settings.persistent_file_storage_location, c.where
    [c] = spooling
    settings = importer(c.settings)
    assert settings.auto_ack_cstore
    location = settings.persistent_file_storage_location
    assert location.startswith("/"), "a local spool directory (gs:// needs no volume)"
    # An emptyDir (or any pod volume) would lose the acknowledged queue with the pod.
    assert c.workload["kind"] == "StatefulSet"
    spec = c.workload["spec"]
    mounts = {m["mountPath"]: m for m in c.container["volumeMounts"]}
    mount = mounts[location]
    assert not mount.get("readOnly", False)
    assert mount["name"] not in {v["name"] for v in c.pod["volumes"]}
    claims = {t["metadata"]["name"]: t["spec"] for t in spec["volumeClaimTemplates"]}
    claim = claims[mount["name"]]
    assert claim["accessModes"] == ["ReadWriteOnce"]  # one replica's queue, one writer
    assert claim["resources"]["requests"]["storage"]
    # Claims outlive a deleted or scaled-down StatefulSet: they may still hold queued items.
    policy = spec["persistentVolumeClaimRetentionPolicy"]
    assert policy == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    # The image's user can write the claim's filesystem.
    assert c.pod["securityContext"]["fsGroup"] == c.pod["securityContext"]["runAsGroup"]
    # No autoscaler: scaling down would strand a replica's queue on its unmounted claim.
    for _, _, hpa in objects("HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["kind"] != "StatefulSet"


def test_the_spool_statefulset_runs_the_same_pod_as_the_deployment_plus_the_queue() -> None:
    """Probes, security, resources, env and spreading cannot drift between the two variants."""
    [(_, _, deployment)] = [m for m in workloads() if m[1].name == "import-deployment.yaml"]
    [(_, _, statefulset)] = [m for m in workloads() if m[1] == SPOOL]
    template = json.loads(json.dumps(statefulset["spec"]["template"]))
    [container] = template["spec"]["containers"]
    container["args"] = [
        a for a in container["args"] if str(a).split("=")[0].removeprefix("--") not in SPOOL_FLAGS
    ]
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] != "spool-queue"]
    assert template == deployment["spec"]["template"]
    assert statefulset["spec"]["selector"] == deployment["spec"]["selector"]
    assert statefulset["spec"]["replicas"] == deployment["spec"]["replicas"]


def test_the_statefulset_has_a_headless_governing_service() -> None:
    for where, path, workload in objects("StatefulSet"):
        name = workload["spec"]["serviceName"]
        [(_, service_path, service)] = [
            m for m in objects("Service") if m[2]["metadata"]["name"] == name
        ]
        assert service_path == path, "ship the governing Service with its StatefulSet"
        spec = service["spec"]
        assert spec["clusterIP"] == "None", where
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert labels_match(spec["selector"], labels), where
        containers = pod_spec(workload)["containers"]
        for port in spec["ports"]:
            assert resolve_port(containers, port["targetPort"]) == port["port"], where


@pytest.mark.parametrize(
    "bad",
    [
        "--auto_ack_cstore=maybe",
        "--persistent_file_storage_locaton=/spool-queue",
        "--persistent_file_storage_location",
        "--dimse_port=port",
    ],
)
def test_the_spool_variants_args_still_meet_every_parser_check(bad: str) -> None:
    """Bad values next to the spool flags are still refused by the real parser."""
    [c] = [c for c in IMPORT_CONTAINERS if c.path == SPOOL]
    container = dict(c.container, args=[*c.container["args"], bad])
    with pytest.raises(ConfigError):
        container_settings(container, c.image)


def test_pods_use_workload_identity_and_carry_no_secrets() -> None:
    accounts = {doc["metadata"]["name"]: doc for _, _, doc in objects("ServiceAccount")}
    for where, _, workload in workloads():
        account = accounts[pod_spec(workload)["serviceAccountName"]]
        google = account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
        assert google.endswith(".iam.gserviceaccount.com"), where
    secret_flags = ("--dicomweb_bearer_token", "--dicomweb_basic_auth")
    for c in CONTAINERS:
        assert not any(str(a).startswith(secret_flags) for a in c.container["args"]), c.where
        for env in c.container.get("env", []):
            if any(word in env["name"] for word in ("TOKEN", "PASSWORD", "BASIC_AUTH", "KEY")):
                assert "value" not in env, f"{c.where}: {env['name']} belongs in a Secret"
    for _, _, doc in MANIFESTS:
        assert not any("BEGIN PRIVATE KEY" in s for s in walk_strings(doc))


# --------------------------------------------------------------------------------------------
# Dockerfiles
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image", IMAGES.values(), ids=lambda i: i.dockerfile.name)
def test_dockerfile_runs_the_console_script_as_non_root(image: Image) -> None:
    stages = dockerfile_stages(image.dockerfile)
    assert all(stage[0][1].split()[0] == "python:3.11-slim" for stage in stages)
    [entrypoint] = instruction_args(image.dockerfile, "ENTRYPOINT")
    assert json.loads(entrypoint) == [image.script]  # exec form: signals reach the adapter
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert image.script in pyproject["project"]["scripts"]
    user = instruction_args(image.dockerfile, "USER")[-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a fixed numeric non-root UID (runAsNonRoot)"
    env = dockerfile_env(image.dockerfile)
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["TMPDIR"] == "/spool"
    assert any(env["TMPDIR"] in json.loads(v) for v in instruction_args(image.dockerfile, "VOLUME"))
    text = image.dockerfile.read_text(encoding="utf-8")
    assert "[test]" not in text, "no test extras in the image"


@pytest.mark.parametrize("image", IMAGES.values(), ids=lambda i: i.dockerfile.name)
def test_dockerfile_exposes_the_ports_the_manifests_use(image: Image) -> None:
    used = {
        int(p["containerPort"])
        for c in CONTAINERS
        if c.image == image
        for p in c.container["ports"]
    }
    assert exposed_ports(image.dockerfile) == used
    # `docker run IMAGE <required flags>` listens on the EXPOSEd ports too.
    required = {
        "dicom-import": ["--dimse_aet=ADAPTER", "--dicomweb_address=http://dicomweb:8042/dw"],
        "dicom-export": [
            "--project_id=p",
            "--subscription_id=s",
            "--dicomweb_addr=http://dicomweb:8042/dw",
            "--peer_dicomweb_address=http://pacs:8042/dw",
        ],
    }[image.script]
    settings = parse_settings(
        image.model,
        required,
        prog=image.script,
        description="deploy",
        environ=dockerfile_env(image.dockerfile),
    )
    listening = {metrics_port(settings)}
    if isinstance(settings, ImporterSettings):
        listening.add(settings.dimse_port)
    assert listening == exposed_ports(image.dockerfile)


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".mypy_cache", ".pytest_cache", ".ruff_cache", "tests"} <= ignored
    assert not {"src", "pyproject.toml", "README.md"} & ignored  # the build needs these


@pytest.mark.parametrize("c", CONTAINERS, ids=lambda c: c.where)
def test_pod_variables_for_the_k8s_container_monitoring_resource(c: Container) -> None:
    """ENV_POD_NAME / ENV_POD_NAMESPACE from the Downward API, ENV_CONTAINER_NAME its name."""
    env = {e["name"]: e for e in c.container.get("env", [])}
    for name, field in (
        ("ENV_POD_NAME", "metadata.name"),
        ("ENV_POD_NAMESPACE", "metadata.namespace"),
    ):
        assert env[name]["valueFrom"]["fieldRef"]["fieldPath"] == field, name
    assert env["ENV_CONTAINER_NAME"]["value"] == c.container["name"]
