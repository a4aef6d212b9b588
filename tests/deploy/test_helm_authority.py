"""The authority chart, offline like the sidecar's: lint, template for SQLite and PostgreSQL value sets,
strict Kubernetes schema validation, then what the schemas cannot see (replicas, the DSN and signing
key only in Secrets, probes, PDB, ServiceMonitor, and that the sidecar chart's fleet values fit)."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.deploy.test_helm import (
    CRD_KINDS,
    KUBE_VERSION,
    MONITORING_API,
    NAMESPACE,
    RELEASE,
    Rendered,
    _validate,
    _yaml_docs,
    env_of,
    env_value,
    helm,  # noqa: F401 -- the fixture
    mounts_of,
)

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "vienna-authority"
VALUES = Path(__file__).resolve().parent / "authority-values"
SETS = {"sqlite": (), "postgres": MONITORING_API}


def template(
    helm_bin: Path, values: str | None, *extra: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    command = [
        str(helm_bin),
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        KUBE_VERSION,
    ]
    if values is not None:
        command += ["-f", str(VALUES / f"{values}.yaml")]
    done = subprocess.run([*command, *extra], capture_output=True, text=True, check=False, timeout=60)
    if check:
        assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def charts(helm: Path) -> dict[str, Rendered]:  # noqa: F811
    return {
        name: Rendered(name, _yaml_docs(template(helm, name, *extra).stdout)) for name, extra in SETS.items()
    }


def test_lint_strict(helm: Path) -> None:  # noqa: F811
    for values in SETS:
        done = subprocess.run(
            [str(helm), "lint", "--strict", str(CHART), "-f", str(VALUES / f"{values}.yaml")],
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", sorted(SETS))
@pytest.mark.parametrize("version", [KUBE_VERSION, kubernetes_validate.latest_version()])
def test_manifests_validate_against_kubernetes_schemas(
    charts: dict[str, Rendered], name: str, version: str
) -> None:
    errors = []
    for manifest in charts[name].manifests:
        problem = _validate(manifest, version)
        if problem == "no-schema":
            assert manifest["kind"] in CRD_KINDS
        elif problem is not None:
            errors.append(problem)
    assert not errors, "\n".join(errors)


def container(chart: Rendered) -> dict[str, object]:
    containers = chart.pod["containers"]
    assert len(containers) == 1
    found: dict[str, object] = containers[0]
    return found


def test_sqlite_is_one_replica_on_a_claim(charts: dict[str, Rendered]) -> None:
    chart = charts["sqlite"]
    deployment = chart.one("Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    assert chart.of_kind("PodDisruptionBudget") == []  # nothing to keep available with one replica
    claim = chart.one("PersistentVolumeClaim")
    main = container(chart)
    assert env_value(main, "VIENNA_STORE") == "sqlite:////var/lib/vienna-authority/authority.db"
    assert mounts_of(main)["store"]["mountPath"] == "/var/lib/vienna-authority"
    assert chart.volumes["store"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    # The chart rendered the operators and sidecars files and a fresh Ed25519 signing key.
    secrets = chart.named("Secret")
    files = secrets[f"{RELEASE}-vienna-authority-files"]["stringData"]
    assert "token_sha256" in files["operators.yaml"] and "billing-agent" in files["sidecars.yaml"]
    pem = base64.b64decode(secrets[f"{RELEASE}-vienna-authority-signing-key"]["data"]["signing-key.pem"])
    assert isinstance(serialization.load_pem_private_key(pem, password=None), Ed25519PrivateKey)


def test_postgres_runs_replicas_with_a_pdb_and_the_dsn_from_a_secret(charts: dict[str, Rendered]) -> None:
    chart = charts["postgres"]
    assert chart.one("Deployment")["spec"]["replicas"] >= 2
    assert chart.one("PodDisruptionBudget")["spec"]["minAvailable"] == 1
    assert chart.of_kind("PersistentVolumeClaim") == []
    store = env_of(container(chart))["VIENNA_STORE"]
    assert store["valueFrom"]["secretKeyRef"] == {"name": "authority-postgres", "key": "dsn"}
    assert chart.named("Secret") == {}  # every secret is the operator's own
    assert chart.volumes["signing-key"]["secret"]["secretName"] == "authority-signing-key"
    monitor = chart.one("ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


@pytest.mark.parametrize("name", sorted(SETS))
def test_probes_ports_and_hardening(charts: dict[str, Rendered], name: str) -> None:
    main = container(charts[name])
    assert main["args"] == ["authority"]
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"  # type: ignore[index]
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"  # type: ignore[index]
    security = main["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False  # type: ignore[index]
    for volume in charts[name].volumes.values():
        if "secret" in volume:
            assert volume["secret"]["defaultMode"] & 0o007 == 0
    service = charts[name].one("Service")
    assert service["spec"]["ports"][0]["port"] == 9700


def test_misconfigurations_are_refused(helm: Path) -> None:  # noqa: F811
    several = template(helm, "sqlite", "--set", "replicaCount=2", check=False)
    assert several.returncode != 0 and "PostgreSQL" in several.stderr
    nobody = template(helm, None, check=False)
    assert nobody.returncode != 0 and "operators" in nobody.stderr
