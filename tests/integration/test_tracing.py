"""One trace per routed instance across the five services, exported over OTLP/HTTP to a real receiver;
and the standard OTEL_* variables deciding where spans go."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pydicom
import pytest

from shared.config import RoutingConfig, RoutingRule
from switchyard.corpus import generate_studies
from tests.fixtures.otlp import (
    KIND_CLIENT,
    KIND_CONSUMER,
    KIND_PRODUCER,
    KIND_SERVER,
    STATUS_ERROR,
    OtlpReceiver,
    ReceivedSpan,
    start_receiver,
    traced,
)
from tests.fixtures.servers import make_stack
from tests.fixtures.util import wait_for
from tests.integration.placement_helpers import scheduler_sees

pytestmark = pytest.mark.integration

# Values no span may carry (set on the dataset sent): distinctive, so a substring check means something.
PATIENT = {
    "PatientName": "TRACEZ^SECRETQ",
    "PatientID": "PIDQX7Z31",
    "PatientBirthDate": "18990417",
    "AccessionNumber": "ACCZQ9X44",
}


def one_instance(tmp_path: Path, seed: int) -> tuple[str, Path]:
    """One instance with the patient values above; its own ``seed`` per test (the same seed, the same
    UIDs: a node that already holds the instance would keep the first copy)."""
    (path,) = generate_studies(tmp_path / "corpus", studies=1, series_per_study=1, instances_per_series=1, seed=seed)
    ds = pydicom.dcmread(path)
    for keyword, value in PATIENT.items():
        setattr(ds, keyword, value)
    ds.save_as(path)
    return str(ds.SOPInstanceUID), path


def with_tracing(endpoint: str):
    return lambda cfg: traced(cfg, endpoint)


def texts(span: ReceivedSpan) -> list[str]:
    """Every string a span carries to a trace store."""
    out = [span.name, span.status_message]
    for attrs in (span.attributes, span.resource):
        for key, value in attrs.items():
            out += [key, str(value)]
    return out


def the_trace(receiver: OtlpReceiver, sop: str) -> dict[str, list[ReceivedSpan]] | None:
    """By service, the spans of the instance's trace, once every service has sent its part."""
    spans = receiver.snapshot()
    roots = [s for s in spans if s.kind == KIND_SERVER and s.attributes.get("dicom.sop_instance_uid") == sop]
    if not roots:
        return None
    trace_id = roots[0].trace_id
    by: dict[str, list[ReceivedSpan]] = {}
    for s in spans:
        if s.trace_id == trace_id:
            by.setdefault(s.service, []).append(s)
    verify = [s for s in by.get("probe", []) if s.name == "probe.verify"]
    if not verify:
        return None
    linking = [s for s in spans if s.service == "catalog" and (trace_id, verify[0].span_id) in s.links]
    if not linking or not {"ingest", "scheduler", "forwarder"} <= by.keys():
        return None
    by["catalog"] = linking
    return by


def one(spans: list[ReceivedSpan], kind: int, name_start: str = "") -> ReceivedSpan:
    found = [s for s in spans if s.kind == kind and s.name.startswith(name_start)]
    assert len(found) == 1, [(s.name, s.kind) for s in spans]
    return found[0]


async def test_one_routed_instance_is_one_trace_across_the_five_services(
    live_nodes, otlp_receiver, tmp_path, monkeypatch
):
    # Export every 100 ms instead of the SDK's 5 s (inherited by the service processes).
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    stack = make_stack(tmp_path / "stack", live_nodes, configure=with_tracing(otlp_receiver.traces_url))
    try:
        wait_for(lambda: all(scheduler_sees(stack, n.node.id, True) for n in live_nodes), 30, what="every node live")
        sop, path = one_instance(tmp_path, 14141)
        assert stack.send([path]).returncode == 0
        by = wait_for(lambda: the_trace(otlp_receiver, sop), 60, 0.2, "the instance's trace from all five services")
    finally:
        stack.close()

    server = one(by["ingest"], KIND_SERVER, "ingest.c_store")
    assert server.parent_span_id == ""  # the trace starts at the C-STORE
    assert server.attributes["dicom.status"] == "0x0000"
    assert server.attributes["dicom.calling_ae"] == "TESTSCU"
    assert server.attributes["dicom.sop_class_uid"]
    assert server.attributes["dicom.transfer_syntax_uid"]
    received = one(by["ingest"], KIND_PRODUCER)
    assert received.parent_span_id == server.span_id
    assert received.attributes["messaging.system"] == "nats"
    assert received.attributes["messaging.destination.name"] == "dicom.instance.received"
    assert received.attributes["messaging.operation.type"] == "publish"

    decision = one(by["scheduler"], KIND_CONSUMER)
    assert decision.parent_span_id == received.span_id
    assert decision.attributes["messaging.operation.type"] == "process"
    placed = one(by["scheduler"], KIND_PRODUCER)
    assert placed.parent_span_id == decision.span_id
    assert placed.attributes["messaging.destination.name"].startswith("dicom.instance.placed.")

    store = one(by["forwarder"], KIND_CLIENT, "forwarder.c_store")
    assert store.parent_span_id == placed.span_id
    assert store.attributes["dicom.status"] == "0x0000"
    assert store.attributes["switchyard.node"] == decision.attributes["switchyard.node"]
    assert store.status_code != 2  # not ERROR

    verify = one(by["probe"], 1, "probe.verify")
    assert verify.parent_span_id == store.span_id
    assert verify.attributes["switchyard.verified"] is True

    # The catalog's batch spans link to the spans whose events they applied (the verified one among them).
    linked = {span_id for s in by["catalog"] for t, span_id in s.links if t == server.trace_id}
    assert verify.span_id in linked
    assert all(s.kind == KIND_CONSUMER and s.name == "catalog.apply" for s in by["catalog"])

    # No patient data anywhere a trace store would keep it.
    for span in otlp_receiver.snapshot():
        for text in texts(span):
            for keyword, value in PATIENT.items():
                assert value not in text, f"{keyword} in span {span.name}"


async def test_otel_variables_decide_where_spans_go(orthanc_nodes, otlp_receiver, tmp_path, monkeypatch):
    """OTEL_TRACES_EXPORTER, _ENDPOINT, _HEADERS, OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over
    Switchyard's config (here: traces off, and an endpoint that must receive nothing)."""
    wanted, stop = start_receiver(token="otel-token-1")
    try:
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", wanted.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "Authorization=Bearer%20otel-token-1")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "router-under-test")
        monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=trace-test,service.namespace=radiology")
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")

        def configure(cfg):
            telemetry = msgspec.structs.replace(
                cfg.telemetry, traces="none", otlp_endpoint=otlp_receiver.traces_url, sample_ratio=0.0
            )
            return msgspec.structs.replace(cfg, telemetry=telemetry)

        stack = make_stack(tmp_path / "stack", orthanc_nodes, services=("ingest",), configure=configure)
        try:
            sop, path = one_instance(tmp_path, 14142)
            assert stack.send([path]).returncode == 0

            def server_span():
                return [s for s in wanted.snapshot() if s.attributes.get("dicom.sop_instance_uid") == sop]

            spans = wait_for(server_span, 30, 0.1, "the C-STORE span at the OTEL_* endpoint")
        finally:
            stack.close()
    finally:
        stop()
    resource = spans[0].resource
    assert resource["service.name"] == "router-under-test"
    assert resource["service.namespace"] == "radiology"
    assert resource["deployment.environment"] == "trace-test"
    assert resource["switchyard.service"] == "ingest"
    assert wanted.refused == 0  # the header was sent
    assert otlp_receiver.snapshot() == []  # the config's endpoint got nothing


async def test_a_refused_c_store_is_an_error_span_with_its_status(orthanc_nodes, otlp_receiver, tmp_path, monkeypatch):
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")

    def configure(cfg):
        cfg = with_tracing(otlp_receiver.traces_url)(cfg)
        return msgspec.structs.replace(cfg, ingest=msgspec.structs.replace(cfg.ingest, max_object_bytes=1024))

    stack = make_stack(tmp_path / "stack", orthanc_nodes, services=("ingest",), configure=configure)
    try:
        sop, path = one_instance(tmp_path, 14143)
        stack.send([path])  # refused: larger than the SCP takes

        def refused():
            return [s for s in otlp_receiver.snapshot() if s.attributes.get("dicom.sop_instance_uid") == sop]

        (span,) = wait_for(refused, 30, 0.1, "the refused C-STORE's span")
    finally:
        stack.close()
    assert span.kind == KIND_SERVER
    assert span.attributes["dicom.status"] == "0xC002"
    assert span.status_code == STATUS_ERROR
    assert span.status_message == "DICOM status 0xC002"
    # Nothing was published: no PRODUCER span in its trace.
    assert [s for s in otlp_receiver.snapshot() if s.trace_id == span.trace_id] == [span]


def spans_of(receiver: OtlpReceiver, trace_id: str) -> list[ReceivedSpan]:
    return [s for s in receiver.snapshot() if s.trace_id == trace_id]


async def test_a_failed_verification_and_its_re_placement_stay_in_the_instance_trace(
    live_nodes, otlp_receiver, tmp_path, monkeypatch
):
    """The node holds other bytes under the instance's UID: verification fails (ERROR), the scheduler
    places it again on the other node of the pool; all of it one trace."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    pair = RoutingConfig(pools={"pair": ["node1", "node2"]}, rules=[RoutingRule(name="pair", pools=["pair"])])

    def configure(cfg):
        return msgspec.structs.replace(with_tracing(otlp_receiver.traces_url)(cfg), routing=pair)

    stack = make_stack(
        tmp_path / "stack", live_nodes, services=("ingest", "scheduler", "probe", "catalog"), configure=configure
    )
    uploaded = None
    try:
        wait_for(lambda: all(scheduler_sees(stack, n.node.id, True) for n in live_nodes), 30, what="every node live")
        sop, path = one_instance(tmp_path, 14144)
        assert stack.send([path]).returncode == 0

        def first_placement():
            return [s for s in otlp_receiver.snapshot() if s.kind == KIND_PRODUCER and s.service == "scheduler"]

        (placed,) = wait_for(first_placement, 30, 0.1, "the first placement's span")
        node_id = placed.attributes["messaging.destination.name"].rsplit(".", 1)[1]
        bad = next(n for n in live_nodes if n.node.id == node_id)
        ds = pydicom.dcmread(path)
        ds.StudyDescription = "changed on the node"
        altered = tmp_path / "altered.dcm"
        ds.save_as(altered)
        uploaded = (bad, bad.client.post_json("/instances", altered.read_bytes())["ID"])
        stack.start("forwarder")

        def verified_elsewhere():
            spans = spans_of(otlp_receiver, placed.trace_id)
            ok = [s for s in spans if s.name == "probe.verify" and s.attributes.get("switchyard.verified") is True]
            return spans if ok else None

        spans = wait_for(verified_elsewhere, 90, 0.2, "the re-placed instance verified, in the same trace")
    finally:
        stack.close()
        if uploaded is not None:
            node, orthanc_id = uploaded
            node.client._request(f"/instances/{orthanc_id}", method="DELETE")
    by_id = {s.span_id: s for s in spans}
    failed = [s for s in spans if s.name == "probe.verify" and s.attributes.get("switchyard.verified") is False]
    assert len(failed) == 1 and failed[0].status_code == STATUS_ERROR
    assert failed[0].status_message == "verification failed: dataset differs at (0008,1030)"
    # The re-placement: a CONSUMER child of the failed verification, then a second placement and C-STORE.
    (replace,) = [s for s in spans if s.kind == KIND_CONSUMER and s.parent_span_id == failed[0].span_id]
    assert replace.attributes["messaging.destination.name"] == f"dicom.instance.verification_failed.{node_id}"
    stores = [s for s in spans if s.kind == KIND_CLIENT]
    assert len(stores) == 2
    assert {by_id[by_id[s.parent_span_id].parent_span_id].kind for s in stores} == {KIND_CONSUMER}
    assert {s.attributes["switchyard.node"] for s in stores} == {"node1", "node2"}
