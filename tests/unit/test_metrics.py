"""shared.metrics: bounded labels, the health door, series at 0 before the first event."""

from __future__ import annotations

import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from shared.events import FailureReason
from shared.metrics import (
    ReasonLabel,
    Stage,
    bounded_ae,
    reason_counter,
    reason_label,
    seconds_since,
    serve,
    stage_histogram,
)
from tests.fixtures.util import free_port


@pytest.mark.parametrize(
    ("reason", "label"),
    [
        (FailureReason.NODE_DOWN.value, "node down"),
        (FailureReason.NODE_REMOVED.value, "node removed"),
        ("not seen on the node within 60s", "not seen"),
        ("instance no longer on the node", "gone from node"),
        ("dataset digest mismatch", "digest mismatch"),
        ("dataset differs at (0010,0010)", "digest mismatch"),
        ("stored file is not DICOM: truncated", "not dicom"),
        ("association rejected after 5 deliveries", "other"),
        ("", "other"),
    ],
)
def test_reason_labels_are_bounded(reason, label):
    assert reason_label(reason) == label
    assert label in {r.value for r in ReasonLabel}


def test_only_configured_aes_are_label_values():
    known = frozenset({"MODALITY1"})
    assert bounded_ae("MODALITY1 ", known) == "MODALITY1"
    assert bounded_ae("DOE^JOHN", known) == "other"


def test_counters_and_histograms_exist_at_zero_before_the_first_event():
    registry = CollectorRegistry()
    reason_counter("x_failures", "doc", ["n1", "n2"], registry)
    stage_histogram(registry, [Stage.RECEIVED_TO_PLACED], ["n1"])
    text = _exposition(registry)
    failures = {(s.labels["node"], s.labels["reason"]) for s in text if s.name == "x_failures_total"}
    assert failures == {(n, r.value) for n in ("n1", "n2") for r in ReasonLabel}
    counts = [s for s in text if s.name == "switchyard_stage_seconds_count"]
    assert [(s.labels, s.value) for s in counts] == [({"stage": "received_to_placed", "node": "n1"}, 0.0)]


def test_seconds_since_is_never_negative():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert seconds_since(now - timedelta(seconds=2), now) == 2.0
    assert seconds_since(now + timedelta(seconds=2), now) == 0.0
    assert seconds_since((now - timedelta(seconds=1)).replace(tzinfo=None), now) == 1.0


def test_readyz_says_which_check_fails_and_healthz_stays_cheap():
    state = {"nats": False}
    registry = CollectorRegistry()
    port = free_port()
    server = serve(registry, "127.0.0.1", port, [("nats", lambda: state["nats"]), ("raises", lambda: 1 / 0 > 0)])
    try:
        base = f"http://127.0.0.1:{port}"
        assert urllib.request.urlopen(f"{base}/healthz", timeout=5).status == 200
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/readyz", timeout=5)
        assert err.value.code == 503
        assert err.value.read().decode() == "not ready: nats, raises\n"
        assert urllib.request.urlopen(f"{base}/metrics", timeout=5).status == 200
    finally:
        server.shutdown()


def test_readyz_is_200_when_every_check_holds():
    port = free_port()
    server = serve(CollectorRegistry(), "127.0.0.1", port, [("nats", lambda: True)])
    try:
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).read() == b"ready\n"
    finally:
        server.shutdown()


def _exposition(registry):
    from prometheus_client import generate_latest

    return [s for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples]


def test_the_door_listens_on_ipv6_loopback_too():
    port = free_port()
    try:
        server = serve(CollectorRegistry(), "::1", port, [])
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    try:
        assert urllib.request.urlopen(f"http://[::1]:{port}/healthz", timeout=5).status == 200
    finally:
        server.shutdown()
