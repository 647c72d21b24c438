"""The catalog against real servers: search, trails, nodes, extra tags, rebuild and audit export.

Data is routed for real (DCMTK storescu -> ingest -> scheduler -> forwarder ->
Orthanc) with ingest configured to carry extra header tags.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

import duckdb
import msgspec
import pytest

from shared.readmodel.catalog import CatalogStore
from shared.readmodel.replay import rebuild_file
from switchyard import cli
from switchyard.corpus import corpus_index, generate_studies
from tests.fixtures.servers import OPERATOR_TOKEN, catalog_ready, make_stack
from tests.fixtures.util import dump_all, wait_for

pytestmark = pytest.mark.integration

EXTRA = ["Manufacturer", "KVP", "MagneticFieldStrength"]
# Verified once the probe reads instances back (another branch); forwarded until then.
DELIVERED = {"forwarded", "verified"}


def with_extra_tags(cfg):
    return msgspec.structs.replace(cfg, ingest=msgspec.structs.replace(cfg.ingest, extra_tags=EXTRA))


@pytest.fixture(scope="module")
def routed(orthanc_nodes, tmp_path_factory):
    """A stack with extra tags, one CT and one MR study routed and delivered."""
    for n in orthanc_nodes:
        if not n.running:
            n.start()
    stack = make_stack(tmp_path_factory.mktemp("catalog-stack"), orthanc_nodes, configure=with_extra_tags)
    try:
        corpus = tmp_path_factory.mktemp("catalog-corpus")
        files = generate_studies(corpus, studies=2, series_per_study=2, instances_per_series=2, seed=5151)
        index = corpus_index(files)
        result = stack.send([corpus], calling_ae="CATSCU", extra=["+sd", "+r"])
        assert result.returncode == 0, result.stderr

        def delivered():
            rows = stack.catalog("/api/instances?limit=100")
            return len(rows) == len(files) and all(r["state"] in DELIVERED for r in rows)

        wait_for(delivered, timeout=90, what="all instances forwarded")
        yield stack, index
    finally:
        stack.close()


def get(stack, path: str, token: str | None = "default") -> tuple[int, Any]:  # (status, JSON body)
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {OPERATOR_TOKEN if token == 'default' else token}"
    req = urllib.request.Request(f"http://127.0.0.1:{stack.cfg.catalog.http_port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as rsp:
            return rsp.status, json.loads(rsp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def study_uids(rows) -> set[str]:
    return {r["study_instance_uid"] for r in rows}


def test_search_studies_series_and_instances(routed):
    stack, index = routed
    ct_study, mr_study = sorted(index, key=lambda s: stack.catalog(f"/api/studies?study_uid={s}")[0]["modalities"])
    assert stack.catalog(f"/api/studies?study_uid={ct_study}")[0]["modalities"] == "CT"
    assert study_uids(stack.catalog("/api/studies?modality=MR")) == {mr_study}
    assert study_uids(stack.catalog("/api/studies?patient_id=DEMO01")) == {ct_study}
    acc = stack.catalog(f"/api/studies?study_uid={mr_study}")[0]["accession_number"]
    assert study_uids(stack.catalog(f"/api/studies?accession={acc}")) == {mr_study}
    assert study_uids(stack.catalog("/api/studies?calling_ae=CATSCU")) == set(index)
    assert stack.catalog("/api/studies?calling_ae=NOBODY") == []
    assert study_uids(stack.catalog("/api/studies?date_from=20240101&date_to=20241231")) == set(index)
    assert stack.catalog("/api/studies?date_from=20250101") == []
    series = stack.catalog(f"/api/series?study_uid={ct_study}")
    assert len(series) == 2 and all(s["instances"] == 2 and s["modality"] == "CT" for s in series)
    inst = stack.catalog(f"/api/instances?series_uid={series[0]['series_instance_uid']}")
    assert len(inst) == 2 and {i["calling_ae"] for i in inst} == {"CATSCU"}
    assert len(stack.catalog("/api/instances?modality=MR")) == 4


@pytest.mark.parametrize(
    "query,fragment",
    [
        ("/api/studies?patient=DEMO01", "unknown query parameter 'patient'"),
        ("/api/studies?date_from=2024-01-01", "date_from must be YYYYMMDD"),
        ("/api/series?limit=0", "limit"),
        ("/api/instances?state=lost", "state must be one of"),
        ("/api/instances?study_uid=abc", "not a DICOM UID"),
        ("/api/instances?tag.1bad=x", "unknown query parameter"),
        ("/api/totals?x=1", "unknown query parameter"),
    ],
)
def test_bad_queries_get_a_json_400(routed, query, fragment):
    status, body = get(routed[0], query)
    assert status == 400
    assert fragment in body["error"]


def test_token_is_required(routed):
    stack, _ = routed
    for path in ("/api/studies", "/api/nodes", "/api/totals"):
        assert get(stack, path, token=None) == (401, {"error": "missing or wrong bearer token"})
        assert get(stack, path, token="wrong")[0] == 401
    assert get(stack, "/healthz", token=None)[0] == 200


def test_trail_of_an_instance_and_of_a_study(routed):
    stack, index = routed
    study = sorted(index)[0]
    sop = index[study][0]
    trail = stack.catalog(f"/api/instances/{sop}/trail")
    types = [e["type"] for e in trail["events"]]
    assert types[:3] == ["instance.received.v1", "instance.placed.v1", "instance.forwarded.v1"]
    assert set(types[3:]) <= {"instance.verified.v1"}
    received, placed, forwarded = trail["events"][:3]
    assert received["calling_ae"] == "CATSCU" and received["at"]
    # Who sent it: DCMTK's storescu connected from loopback, from an ephemeral port.
    assert received["called_ae"] == stack.cfg.ingest.ae_title
    assert received["peer_address"] == "127.0.0.1" and 1024 <= received["peer_port"] <= 65535
    assert trail["instance"]["peer_address"] == "127.0.0.1"
    assert trail["instance"]["peer_port"] == received["peer_port"]
    assert placed["why"]["reason"] in {"new_study", "affinity"}
    assert {c["node_id"] for c in placed["why"]["candidates"]} <= {"node1", "node2", "node3"}
    assert forwarded["node_id"] == placed["node_id"] == trail["instance"]["node_id"]
    assert trail["instance"]["state"] in DELIVERED
    assert trail["instance"]["verified"] is (types[-1] == "instance.verified.v1")
    seqs = [e["seq"] for e in trail["events"]]
    assert seqs == sorted(seqs)

    whole = stack.catalog(f"/api/studies/{study}/trail")
    assert {i["sop_instance_uid"] for i in whole["instances"]} == set(index[study])
    assert len([e for e in whole["events"] if e["type"] != "instance.verified.v1"]) == 3 * len(index[study])
    assert [e["seq"] for e in whole["events"]] == sorted(e["seq"] for e in whole["events"])
    assert get(stack, "/api/studies/1.2.3.4/trail")[0] == 404


def test_nodes_with_their_latest_load(routed):
    stack, _ = routed

    def loaded():
        nodes = stack.catalog("/api/nodes")
        return nodes if all(n["load"] and n["load"]["up"] for n in nodes) else None

    nodes = wait_for(loaded, timeout=20, what="a heartbeat for every node")
    assert [n["node_id"] for n in nodes] == ["node1", "node2", "node3"]
    assert all(n["configured"] for n in nodes)
    assert sum(n["instances"].get(s, 0) for n in nodes for s in DELIVERED) == 8
    assert all("instance_count" in n["load"] and "occurred_at" in n["load"] for n in nodes)


def test_extra_header_tags_are_queryable(routed):
    stack, index = routed
    assert len(stack.catalog("/api/instances?tag.Manufacturer=SWITCHYARD%20DEMO")) == 8
    ct = stack.catalog("/api/instances?tag.KVP=120")
    assert len(ct) == 4 and {r["modality"] for r in ct} == {"CT"}
    assert ct[0]["extra_tags"] == {"Manufacturer": "SWITCHYARD DEMO", "KVP": "120"}
    assert study_uids(stack.catalog("/api/studies?tag.MagneticFieldStrength=1.5")) == {
        s for s in index if stack.catalog(f"/api/studies?study_uid={s}")[0]["modalities"] == "MR"
    }
    assert stack.catalog("/api/series?tag.Manufacturer=OTHER") == []


def test_totals(routed):
    totals = routed[0].catalog("/api/totals")
    assert (totals["instances"], totals["studies"], totals["series"], totals["patients"]) == (8, 2, 4, 2)
    assert sum(totals["locations"].get(s, 0) for s in DELIVERED) == 8
    assert totals["events"] == totals["last_seq"] >= 24


async def test_rebuild_equals_the_live_store_and_swaps_in(routed, tmp_path, capsys):
    stack, _ = routed
    db = stack.cfg.catalog.db_path
    argv = ["--config", str(stack.config_path)]
    # cli.main runs its own event loop, so from this async test it runs in a thread.
    assert await asyncio.to_thread(cli.main, [*argv, "catalog", "rebuild"]) == 1  # refuses: the file is held
    assert "stop it" in capsys.readouterr().err
    # The log must be quiet before the snapshot: the probe's verified events are
    # the last facts about these instances.
    wait_for(
        lambda: [r["state"] for r in stack.catalog("/api/instances")] == ["verified"] * 8,
        timeout=60,
        what="every routed instance verified",
    )
    stack.stop("catalog")
    live = dump_all(db)
    assert set(live) == {
        "events",
        "instances",
        "locations",
        "nodes",
        "projection_state",
        "patients",
        "studies",
        "series",
    }  # the last three are views over instances
    assert live["studies"] and live["patients"] and live["series"]
    last = live["projection_state"][0][1]

    fresh = tmp_path / "fresh.duckdb"
    result = await rebuild_file(stack.cfg.nats, fresh, CatalogStore, until_seq=last, swap=False)
    assert (result.events, result.last_seq) == (last, last)
    assert dump_all(fresh) == live  # table by table

    assert (
        await asyncio.to_thread(
            cli.main,
            [
                *argv,
                "audit",
                "export",
                "--since",
                "2000-01-01",
                "--until",
                "2100-01-01",
                "--out",
                str(tmp_path / "audit"),
            ],
        )
        == 0
    )
    assert f"{last} events, 8 instances" in capsys.readouterr().out
    con = duckdb.connect()
    assert con.execute(f"SELECT count(*) FROM '{tmp_path}/audit/events.parquet'").fetchone() == (last,)
    # Provenance as columns: who sent each instance (AE titles, address, port) and on which subject.
    for table in ("events", "instances"):
        rows = con.execute(
            "SELECT DISTINCT subject, calling_ae, called_ae, peer_address, peer_port > 0"
            f" FROM '{tmp_path}/audit/{table}.csv' WHERE subject = 'dicom.instance.received'"
        ).fetchall()
        assert rows == [("dicom.instance.received", "CATSCU", stack.cfg.ingest.ae_title, "127.0.0.1", True)]
    subjects = con.execute(
        f"SELECT DISTINCT split_part(subject, '.', 3) FROM '{tmp_path}/audit/events.parquet'"
        " WHERE type LIKE 'instance.%'"
    ).fetchall()
    assert {s for (s,) in subjects} >= {"received", "placed", "forwarded"}

    assert await asyncio.to_thread(cli.main, [*argv, "catalog", "rebuild"]) == 0
    assert "catalog rebuilt" in capsys.readouterr().out
    assert dump_all(db) == live
    stack.start("catalog")
    wait_for(lambda: catalog_ready(stack), timeout=20, what="catalog up on the rebuilt file")
    assert stack.catalog("/api/totals")["instances"] == 8
