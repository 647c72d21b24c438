"""Dashboards and alerts answered by a real Prometheus scraping a running stack.

After a few studies are routed, every dashboard panel's query and every alert
expression (each operand, its threshold removed) returns data: a query that
returns nothing is a panel that shows nothing, or an alert that can never fire.
"""

from __future__ import annotations

import json
import re
import urllib.request
from base64 import b64encode
from pathlib import Path

import msgspec
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from switchyard.corpus import generate_studies
from tests.fixtures.otlp import start_receiver, traced
from tests.fixtures.prometheus import RULES, SERVICES, start_prometheus
from tests.fixtures.servers import make_stack
from tests.fixtures.util import wait_for

pytestmark = pytest.mark.integration

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
INSTANCES = 6
SENDER, STRANGER = "MODALITY1", "STRANGER"


@pytest.fixture(scope="module")
def routed(orthanc_nodes, tmp_path_factory):
    """A stack with Prometheus scraping it, after INSTANCES instances were routed and verified."""
    for n in orthanc_nodes:
        if not n.running:
            n.start()
    base = tmp_path_factory.mktemp("dashboards")
    # Tracing on, as deployed: latency exemplars carry the trace ids of recorded spans.
    receiver, stop_receiver = start_receiver()

    def configure(cfg):
        # One configured calling AE: the only peer_ae label value besides "other".
        ingest = msgspec.structs.replace(cfg.ingest, allowed_calling_aes=[SENDER])
        return traced(msgspec.structs.replace(cfg, ingest=ingest), receiver.traces_url)

    try:
        stack = make_stack(base / "stack", orthanc_nodes, configure=configure)
    except BaseException:
        stop_receiver()
        raise
    prom = None
    try:
        prom = start_prometheus(stack.cfg, [n.node for n in orthanc_nodes], base / "prometheus")
        wait_for(
            lambda: len(prom.query("switchyard_scheduler_node_live == 1")) == len(orthanc_nodes),
            timeout=60,
            interval=0.5,
            what="every node live in Prometheus",
        )
        files = generate_studies(base / "corpus", studies=2, series_per_study=1, instances_per_series=3, seed=1414)
        assert stack.send(sorted(files), calling_ae=SENDER).returncode == 0
        assert stack.send(sorted(files)[:1], calling_ae=STRANGER).returncode != 0  # not configured: rejected
        wait_for(
            lambda: (
                sum(
                    float(s["value"][1]) for s in prom.query('switchyard_probe_verifications_total{outcome="verified"}')
                )
                >= INSTANCES
            ),
            timeout=120,
            interval=0.5,
            what="every instance verified, as Prometheus sees it",
        )
        # Two scrapes since (a rate needs two samples), and a round of the consumer-lag reader (every 5 s).
        wait_for(
            lambda: (
                prom.query('sum(rate(switchyard_probe_verifications_total{outcome="verified"}[5m])) > 0')
                and prom.query("switchyard_consumer_pending")
                and prom.query("max(switchyard_stream_last_seq) > 0")
            ),
            timeout=30,
            interval=0.5,
            what="consumer lag scraped",
        )
        yield stack, prom, orthanc_nodes
    finally:
        if prom is not None:
            prom.stop()
        stack.close()
        stop_receiver()


def panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out.extend(p.get("panels", [])) if p["type"] == "row" else out.append(p)
    return out


def targets() -> list[tuple[str, str, str]]:
    return [
        (path.stem, p["title"], t["expr"])
        for path in DASHBOARDS
        for p in panels(json.loads(path.read_text()))
        for t in p["targets"]
    ]


def alert_operands() -> list[tuple[str, str]]:
    """Each alert's operands (split at and/or/unless), threshold comparisons removed; recording rules whole."""
    out = []
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule["record"]
            if "record" in rule:
                out.append((name, rule["expr"]))
                continue
            for part in re.split(r"\s+(?:and|or|unless)(?:\s+on\(\))?\s+", rule["expr"].strip()):
                out.append((name, re.sub(r"\s*(?:==|!=|>=|<=|>|<)\s*[0-9.]+\s*$", "", part)))
    return out


def test_every_panel_query_returns_data(routed):
    _, prom, nodes = routed
    empty = []
    for dash, title, expr in targets():
        query = expr.replace("$node", nodes[0].node.id)
        if not prom.query(query):
            empty.append(f"{dash} / {title}: {query}")
    assert empty == [], "\n".join(empty)


def test_every_alert_expression_returns_data(routed):
    _, prom, _ = routed
    ops = alert_operands()
    assert len({name for name, _ in ops}) >= 13
    empty = [f"{name}: {expr}" for name, expr in ops if not prom.query(expr)]
    assert empty == [], "\n".join(empty)


def test_every_rule_loads_and_evaluates_without_error(routed):
    _, prom, _ = routed
    names = {r.get("alert") or r["record"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}

    def health() -> dict[str, str]:
        return {r["name"]: r["health"] for g in prom.api("rules")["groups"] for r in g["rules"]}

    wait_for(lambda: "unknown" not in health().values(), timeout=30, interval=0.5, what="every rule evaluated")
    assert health() == dict.fromkeys(names, "ok")


def test_no_alert_fires_on_a_healthy_run(routed):
    _, prom, _ = routed
    firing = [a for a in prom.api("alerts")["alerts"] if a["state"] == "firing"]
    assert firing == []


def test_latency_exemplars_carry_trace_ids(routed):
    _, prom, _ = routed
    found = prom.api("query_exemplars", query="switchyard_stage_seconds_bucket", start="0", end="9999999999")
    ids = [e["labels"].get("trace_id", "") for series in found for e in series["exemplars"]]
    assert ids and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def scrape(url: str, auth: tuple[str, str] | None = None) -> set[str]:
    req = urllib.request.Request(url)
    if auth is not None:
        req.add_header("Authorization", "Basic " + b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    text = urllib.request.urlopen(req, timeout=5).read().decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_dashboards_name_provisioned_datasources_and_live_metrics(routed):
    stack, _, nodes = routed
    provisioned = yaml.safe_load((GRAFANA / "provisioning" / "datasources.yaml").read_text())["datasources"]
    uids = {d["uid"]: d["type"] for d in provisioned}
    assert {"prometheus", "tempo", "loki"} <= set(uids.values())
    live: set[str] = set()
    for service in SERVICES:
        live |= scrape(f"http://127.0.0.1:{getattr(stack.cfg, service).metrics_port}/metrics")
    node = nodes[0].node
    live |= scrape(f"{node.rest_url}/tools/metrics-prometheus", (node.username, node.password))
    assert len(DASHBOARDS) >= 4
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"] and dashboard["title"]
        for p in panels(dashboard):
            for ds in [p["datasource"], *(t.get("datasource", p["datasource"]) for t in p["targets"])]:
                assert uids.get(ds["uid"]) == ds["type"], f"{path.name} / {p['title']}: datasource {ds}"
            assert p["targets"], f"{path.name} / {p['title']}: no query"
            for t in p["targets"]:
                names = set(re.findall(r"\b((?:switchyard|orthanc)_[a-z0-9_]+)", t["expr"]))
                # ``up`` is Prometheus's own series about the scrape, in no /metrics.
                assert names or t["expr"].startswith("up{"), f"{path.name} / {p['title']}: no metric in {t['expr']}"
                missing = names - live
                assert missing == set(), f"{path.name} / {p['title']}: not in any live /metrics: {missing}"


def test_readiness_and_liveness_answer_on_every_metrics_port(routed):
    stack, _, _ = routed
    for service in SERVICES:
        port = getattr(stack.cfg, service).metrics_port
        for path in ("/healthz", "/readyz"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                assert r.status == 200, f"{service}{path}"


def test_ingest_counts_by_configured_calling_ae_and_others_as_other(routed):
    _, prom, _ = routed

    def value(expr: str) -> float:
        return sum(float(s["value"][1]) for s in prom.query(expr))

    sender = f'peer_ae="{SENDER}"'
    assert value(f'switchyard_ingest_peer_cstore_results_total{{{sender}, result="success"}}') == INSTANCES
    assert value(f'switchyard_ingest_peer_associations_total{{{sender}, outcome="accepted"}}') >= 1
    wait_for(
        lambda: value('switchyard_ingest_peer_associations_total{peer_ae="other", outcome="rejected"}') >= 1,
        timeout=30,
        interval=0.5,
        what="the stranger's rejection scraped",
    )
    values = set(prom.api("label/peer_ae/values"))
    assert values == {SENDER, "other"}


def test_the_probe_exports_nats_server_monitoring(routed):
    _, prom, _ = routed
    assert [s["value"][1] for s in prom.query("switchyard_nats_up")] == ["1"]
    # The event stream and the heartbeats stream (and the affinity KV's).
    assert float(prom.query("switchyard_nats_jetstream_streams")[0]["value"][1]) >= 2
    assert float(prom.query("switchyard_nats_connections")[0]["value"][1]) >= 5
