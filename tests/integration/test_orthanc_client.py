"""The keep-alive REST client and the probe's one-download sighting, on a real Orthanc node."""

from __future__ import annotations

import concurrent.futures

import msgspec
import pydicom
import pytest
import urllib3.connectionpool
from urllib3.util.connection import is_connection_dropped

from services.probe.store import Expected
from services.probe.verify import judge_all, read_changes, sight
from shared import events as ev
from shared.config import NodeConfig
from shared.dicomfile import dataset_bytes_digest
from shared.orthanc import OrthancClient, OrthancError
from switchyard.corpus import generate_studies
from tests.fixtures.servers import new_orthanc_node
from tests.fixtures.util import free_port, wait_for

pytestmark = pytest.mark.integration


def idle(client: OrthancClient) -> list:
    """The kept connections in the client's urllib3 pool, most recently used first.

    urllib3 reconnects a dropped connection object in place: a new connection is a new ``.sock``.
    """
    pool = client._pool.pool
    assert pool is not None  # (None only once the pool is closed)
    return [conn for conn in reversed(pool.queue) if conn is not None]


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """A node of its own: these tests restart it."""
    n = new_orthanc_node(7, tmp_path_factory.mktemp("orthanc-client"))
    n.start()
    yield n
    n.stop()


@pytest.fixture(scope="module")
def stored(node, tmp_path_factory):
    """Two instances uploaded to the node: [(path, orthanc id, sop uid)]."""
    files = generate_studies(
        tmp_path_factory.mktemp("corpus"), studies=1, series_per_study=1, instances_per_series=2, seed=7301
    )
    client = node.client
    return [
        (
            f,
            client.post_json("/instances", f.read_bytes())["ID"],
            str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID),
        )
        for f in sorted(files)
    ]


def test_requests_reuse_one_connection(node):
    client = OrthancClient(node.node)
    client.system()
    (conn,) = idle(client)
    sock = conn.sock
    for _ in range(20):
        client.statistics()
    # Orthanc keeps the connection open (KeepAlive defaults to true): the same socket served every request.
    assert idle(client) == [conn] and conn.sock is sock and sock is not None


def test_errors_keep_their_meaning(node):
    client = OrthancClient(node.node)
    with pytest.raises(OrthancError, match="HTTP 404"):
        client.get_bytes("/instances/no-such-instance/file")
    # An error response still leaves a usable connection behind.
    assert client.system()["DicomAet"] == node.node.ae_title
    wrong = OrthancClient(msgspec.structs.replace(node.node, password="wrong"))
    with pytest.raises(OrthancError, match="HTTP 401"):
        wrong.system()
    nobody = OrthancClient(
        NodeConfig(id="nobody", dicom_port=free_port(), rest_url=f"http://127.0.0.1:{free_port()}"), timeout=1.0
    )
    with pytest.raises(OrthancError, match="refused"):
        nobody.system()


def test_a_kept_connection_is_replaced_after_the_node_restarts(node):
    client = OrthancClient(node.node, timeout=2.0)
    client.system()
    (before,) = (conn.sock for conn in idle(client))
    node.stop()
    try:
        with pytest.raises(OrthancError):
            client.system()  # down: an error, not a hang
    finally:
        node.start()
    assert client.system()["DicomAet"] == node.node.ae_title
    assert idle(client) and idle(client)[0].sock not in (before, None)


@pytest.mark.parametrize("noticed_while_idle", [True, False])
def test_a_connection_the_node_closed_is_replaced_by_a_fresh_one(node, monkeypatch, noticed_while_idle):
    """Seen closed before use, or (a close racing the request) failing on use and retried once."""
    if not noticed_while_idle:
        monkeypatch.setattr(urllib3.connectionpool, "is_connection_dropped", lambda conn: False)
    client = OrthancClient(node.node)
    client.system()
    (stale,) = (conn.sock for conn in idle(client))
    node.stop()
    node.start()
    # The pooled connection now points at a process that is gone: the request still succeeds.
    assert client.system()["DicomAet"] == node.node.ae_title
    assert idle(client)[0].sock not in (stale, None)


def test_a_connection_idle_past_the_nodes_keep_alive_is_not_used(node):
    client = OrthancClient(node.node)
    client.system()
    (conn,) = idle(client)
    sock = conn.sock
    # Orthanc closes an idle connection after about a second; poll the real condition.
    wait_for(lambda: is_connection_dropped(conn), timeout=10, what="the node closed the idle connection")
    assert client.system()["DicomAet"] == node.node.ae_title
    assert idle(client)[0].sock not in (sock, None)


def test_concurrent_callers_each_get_a_connection(node):
    client = OrthancClient(node.node)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(lambda _: client.system()["Version"], range(200)))
    assert len(set(versions)) == 1
    assert 1 <= len(idle(client)) <= 8


def test_a_sighting_names_the_instance_and_its_digest_in_one_download(node, stored):
    client = node.client
    for path, orthanc_id, sop in stored:
        assert sight(client, orthanc_id) == (sop, dataset_bytes_digest(path.read_bytes()))
    assert sight(client, "00000000-00000000-00000000-00000000-00000000") is None  # gone: nothing seen
    seen, last, done = read_changes(client, 0, 100)
    assert done and last >= len(stored)
    assert {(s[0], s[1], s[3]) for s in seen} >= {
        (sop, oid, dataset_bytes_digest(p.read_bytes())) for p, oid, sop in stored
    }


def expected(node, path, sop, orthanc_id=None, found=None, digest=None) -> Expected:
    return Expected(
        node.node.id,
        sop,
        "1.2.3",
        "placement-1",
        digest or dataset_bytes_digest(path.read_bytes()),
        ev.utcnow(),
        orthanc_id,
        found_digest=found,
    )


def test_a_matching_sighting_verifies_without_a_request(node, stored):
    path, orthanc_id, sop = stored[0]
    item = expected(node, path, sop, orthanc_id, found=dataset_bytes_digest(path.read_bytes()))
    unreachable = OrthancClient(
        NodeConfig(id=node.node.id, dicom_port=free_port(), rest_url=f"http://127.0.0.1:{free_port()}"), timeout=1.0
    )
    outcomes, paused = judge_all(unreachable, [item], [], "missing")
    assert paused is None and outcomes == [(item, True, item.dataset_digest, "")]


def test_nothing_fails_on_a_sighting_alone(node, stored):
    """A stale or wrong sighting, or a missed change: the node is asked by SOP Instance UID first."""
    (path_a, id_a, sop_a), (path_b, id_b, sop_b) = stored
    digest_a = dataset_bytes_digest(path_a.read_bytes())
    stale = expected(node, path_a, sop_a, "wrong-id", found="a digest the node's file no longer has")
    legacy = expected(node, path_b, sop_b, id_b, found=None)  # a sighting recorded before digests were kept
    never_seen = expected(node, path_a, sop_a)
    absent = expected(node, path_a, "1.2.3.999.1")
    changed = expected(node, path_a, sop_a, id_a, found=digest_a, digest="the digest recorded at ingest")
    outcomes, paused = judge_all(node.client, [stale, legacy, changed], [never_seen, absent], "not seen")
    assert paused is None
    assert [o[1:] for o in outcomes] == [
        (True, digest_a, ""),
        (True, dataset_bytes_digest(path_b.read_bytes()), ""),
        (False, digest_a, "dataset digest mismatch"),
        (True, digest_a, ""),
        (False, "", "not seen"),
    ]


def test_judging_pauses_when_the_node_stops_answering(node, stored):
    path, _orthanc_id, sop = stored[0]
    node.stop()
    try:
        outcomes, paused = judge_all(node.client, [expected(node, path, sop, found="stale")], [], "missing")
    finally:
        node.start()
    assert outcomes == [] and isinstance(paused, OrthancError)
