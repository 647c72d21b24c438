"""Verified delivery: read forwarded instances back from their node and compare digests.

The forwarder's C-STORE success only says the node answered; this closes the
loop. Per node: follow Orthanc's ``/changes`` (NewInstance) from the stored
cursor, record what the node now holds, then for every forwarded instance the
node has shown, download it and compare the dataset digest with the one
recorded at ingest. Outcome events have deterministic ids (node, SOP Instance
UID, placement), so a publish retried after a crash is recorded once.

One REST call per instance: each NewInstance change's file is downloaded when
it is seen (its file meta names the SOP Instance UID, and its dataset digest is
kept with the sighting), so an expected instance whose sighting digest matches
is verified without another request. Nothing fails on a sighting alone: before
a failure the instance is looked up by SOP Instance UID on the node and read
back (``confirm``). A poll's outcomes are published pipelined and only the
acknowledged ones are settled.

When the digests differ, the node may have re-encoded an equal dataset
(Orthanc inflates a deflated file, for one): the file is then compared as a
dataset with the blob received at ingest (shared.dicomfile.dataset_difference).
Equal is ``verified`` with ``reencoded``; different is a failure naming the
first differing tag (never a value).

The deadline is only judged right after a complete ``/changes`` read: a node
that cannot be reached fails no instance on stale knowledge (its heartbeat
already says it is down).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from datetime import datetime

from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Gauge

from services.probe.store import Expected, ProbeStore
from shared import events as ev
from shared import telemetry
from shared.blobs import BlobStoreError, open_blob_store
from shared.bus import Bus, BusUnavailable, PublishUncertain
from shared.config import Config, NodeConfig
from shared.dicomfile import NotDicom, dataset_bytes_digest, dataset_difference, meta_sop_and_digest
from shared.metrics import Stage, observe, reason_counter, reason_label, seconds_since, stage_histogram
from shared.orthanc import OrthancClient, OrthancError
from shared.runtime import wait_or_stop
from shared.telemetry import context_from

log = logging.getLogger("switchyard.probe.verify")

# Both of the probe's log projections (this store, the front door's) are off the
# delivery path: a transaction a second, not five, costs far less CPU per event.
# A batch fills at LOG_BATCH events before that (the front door's full batch means
# "behind": it catches up in bulk), so it is sized above a second of the log.
LOG_BATCH = 4096
LOG_LINGER_S = 1.0

# Outcomes in flight at once (pipelined publishes awaiting their PubAck).
PUBLISH_WINDOW = 256


Seen = tuple[str, str, int, str | None]  # (sop uid, orthanc id, change seq, dataset digest or None)


def read_changes(client: OrthancClient, since: int, limit: int) -> tuple[list[Seen], int, bool]:
    """One page of NewInstance changes, each file downloaded once: ([seen], last seq, done)."""
    page = client.get_json(f"/changes?since={since}&limit={limit}")
    seen = []
    for change in page.get("Changes", []):
        if change.get("ChangeType") != "NewInstance":
            continue
        sighting = sight(client, change["ID"])
        if sighting is not None:
            seen.append((sighting[0], change["ID"], int(change["Seq"]), sighting[1]))
    return seen, int(page.get("Last", since)), bool(page.get("Done", True))


def sight(client: OrthancClient, orthanc_id: str) -> tuple[str, str | None] | None:
    """(SOP Instance UID, dataset digest or None) of one instance on the node; None when it is gone."""
    try:
        try:
            sop, digest = meta_sop_and_digest(client.get_bytes(f"/instances/{orthanc_id}/file"))
        except (NotDicom, ValueError):
            sop, digest = "", None  # judged (and failed, if so) by a read-back, not here
        if not sop:
            # No usable file meta: ask the node, as for any instance it indexed.
            sop = client.get_json(f"/instances/{orthanc_id}")["MainDicomTags"]["SOPInstanceUID"]
    except OrthancError as exc:
        if "HTTP 404" not in str(exc):
            raise  # the node is not answering: read this page again next poll
        # Deleted since: it is not on the node any more, so it cannot verify anything.
        log.info("instance %s from /changes is gone (%s)", orthanc_id, exc)
        return None
    return sop, digest


# The reason on a verified outcome whose node holds other bytes for an equal dataset.
REENCODED = "re-encoded by the node"

# The bytes received at ingest, by blob key (None: not available to compare with).
Original = Callable[[str], bytes | None]


def judge(client: OrthancClient, item: Expected, original: Original | None = None) -> tuple[bool, str, str]:
    """Read one instance back: (dataset matches, found digest, reason)."""
    try:
        data = client.get_bytes(f"/instances/{item.orthanc_id}/file")
        found = dataset_bytes_digest(data)
    except OrthancError as exc:
        if "HTTP 404" not in str(exc):
            raise  # the node is not answering: judge later
        return False, "", "instance no longer on the node"
    except (NotDicom, ValueError) as exc:
        return False, "", f"stored file is not DICOM: {exc}"
    if found != item.dataset_digest:
        return compare(data, found, item, original)
    return True, found, ""


def compare(data: bytes, found: str, item: Expected, original: Original | None) -> tuple[bool, str, str]:
    """Other bytes on the node: the same dataset re-encoded, or a different one."""
    sent = original(item.blob_key) if original is not None and item.blob_key else None
    if sent is None:
        return False, found, "dataset digest mismatch"
    try:
        diff = dataset_difference(sent, data)
    except NotDicom as exc:
        return False, found, f"dataset digest mismatch (not comparable: {exc})"
    if diff:
        return False, found, f"dataset differs at {diff}"
    return True, found, REENCODED


def confirm(
    client: OrthancClient, item: Expected, missing: str, original: Original | None = None
) -> tuple[bool, str, str]:
    """Judge by the node's own index: look the SOP Instance UID up, read that instance back.

    The authority before any failure: a sighting (file meta, an earlier
    download, a missed change) only ever verifies.
    """
    orthanc_id = client.instance_id(item.sop_instance_uid)
    if orthanc_id is None:
        return False, "", missing
    return judge(client, dataclasses.replace(item, orthanc_id=orthanc_id), original)


Outcome = tuple[Expected, bool, str, str]  # (item, ok, found digest, reason)


def judge_all(
    client: OrthancClient,
    ready: list[Expected],
    overdue: list[Expected],
    missing: str,
    original: Original | None = None,
) -> tuple[list[Outcome], OrthancError | None]:
    """Judge a poll's instances on one worker thread; stops at the first unanswered request (with it)."""
    out: list[Outcome] = []
    try:
        for item in ready:
            if item.found_digest is not None and item.found_digest == item.dataset_digest:
                out.append((item, True, item.found_digest, ""))
            else:
                out.append((item, *confirm(client, item, "instance no longer on the node", original)))
        for item in overdue:
            out.append((item, *confirm(client, item, missing, original)))
    except OrthancError as exc:
        return out, exc
    return out, None


def verified_event(
    item: Expected, digest: str, reencoded: bool = False, ctx: tuple[str, str] = ("", "")
) -> ev.InstanceVerifiedV1:
    return ev.InstanceVerifiedV1(
        event_id=ev.fact_id("verified", item.node_id, item.sop_instance_uid, item.placement_id),
        traceparent=ctx[0],
        tracestate=ctx[1],
        sop_instance_uid=item.sop_instance_uid,
        study_instance_uid=item.study_instance_uid,
        node_id=item.node_id,
        placement_id=item.placement_id,
        dataset_digest=digest,
        reencoded=reencoded,
    )


def failed_event(
    item: Expected, reason: str, found: str = "", ctx: tuple[str, str] = ("", "")
) -> ev.InstanceVerificationFailedV1:
    return ev.InstanceVerificationFailedV1(
        event_id=ev.fact_id("verification_failed", item.node_id, item.sop_instance_uid, item.placement_id),
        traceparent=ctx[0],
        tracestate=ctx[1],
        sop_instance_uid=item.sop_instance_uid,
        study_instance_uid=item.study_instance_uid,
        node_id=item.node_id,
        placement_id=item.placement_id,
        reason=reason,
        expected_digest=item.dataset_digest,
        found_digest=found,
        received_seq=item.received_seq,
        attempt=item.attempt,
        avoid=list(item.avoid),
        pool=item.pool,
        verification_failures=item.verification_failures,
    )


class Verifier:
    def __init__(
        self, cfg: Config, store: ProbeStore, bus: Bus, registry: CollectorRegistry, tracer: trace.Tracer | None = None
    ) -> None:
        self.cfg = cfg
        self.tracer = tracer or trace.NoOpTracer()
        self.store = store
        self.bus = bus
        self.outcomes = Counter(
            "switchyard_probe_verifications", "Verification outcomes published", ["node", "outcome"], registry=registry
        )
        self.changes = Counter(
            "switchyard_probe_changes_seen", "NewInstance changes read from nodes", ["node"], registry=registry
        )
        self.failures = reason_counter(
            "switchyard_verification_failures",
            "Forwarded instances that failed verification, by node and reason",
            (n.id for n in cfg.nodes),
            registry,
        )
        self.stage = stage_histogram(
            registry, [Stage.FORWARDED_TO_VERIFIED, Stage.RECEIVED_TO_VERIFIED], [n.id for n in cfg.nodes]
        )
        for node in cfg.nodes:
            for outcome in ("verified", "failed"):
                self.outcomes.labels(node=node.id, outcome=outcome)
        self.log_seq = Gauge(
            "switchyard_probe_verify_last_seq", "Last stream sequence in the verification store", registry=registry
        )
        # Per node: its /changes cursor (this process is its only writer), and after a poll
        # that found nothing to judge, (store generation, next deadline) to skip idle queries.
        self.cursors: dict[str, int] = {}
        self.idle: dict[str, tuple[int, datetime | None]] = {}
        self.blobs = open_blob_store(cfg.blobs)

    def original(self, blob_key: str) -> bytes | None:
        """The bytes received at ingest (worker thread); None when the blob cannot be read."""
        try:
            with self.blobs.open(blob_key) as f:
                return f.read()
        except (BlobStoreError, OSError, ValueError) as exc:
            log.warning("blob for a semantic comparison not readable: %s", type(exc).__name__)
            return None

    async def watch(self, node: NodeConfig, stop: asyncio.Event) -> None:
        pcfg = self.cfg.probe
        client = OrthancClient(node, pcfg.timeout_s)
        try:
            while not stop.is_set():
                try:
                    await self.poll(node, client)
                except (OrthancError, ValueError, KeyError) as exc:
                    log.debug("verification of %s paused: %s", node.id, exc)
                except (BusUnavailable, PublishUncertain) as exc:
                    log.warning("verification outcome for %s not published: %s", node.id, exc)
                await wait_or_stop(stop, pcfg.changes_interval_s)
        finally:
            client.close()

    async def poll(self, node: NodeConfig, client: OrthancClient) -> None:
        started = time.time_ns()
        outcomes, paused = await asyncio.to_thread(self.look, node, client)
        if outcomes:
            await self.publish(node, outcomes, started)
        if paused is not None:
            raise paused

    def look(self, node: NodeConfig, client: OrthancClient) -> tuple[list[Outcome], OrthancError | None]:
        """Worker thread: read the node's new changes, then judge what is due (one thread trip a poll)."""
        pcfg = self.cfg.probe
        since = self.cursors.get(node.id)
        if since is None:
            since = self.store.node_cursor(node.id)
        done = False
        while not done:
            seen, last, done = read_changes(client, since, pcfg.changes_limit)
            if last != since or seen:
                self.store.record_changes(node.id, seen, last)
                self.changes.labels(node=node.id).inc(len(seen))
            since = self.cursors[node.id] = last
        generation, now = self.store.generation, ev.utcnow()
        idle = self.idle.get(node.id)
        if idle is not None and idle[0] == generation and (idle[1] is None or now < idle[1]):
            return [], None  # nothing written since a poll that found nothing, and no deadline passed
        ready = self.store.ready_to_check(node.id)
        # Judged only now, after a complete read of the node's changes.
        overdue = self.store.overdue(node.id, now, pcfg.verify_deadline_s)
        if not ready and not overdue:
            self.idle[node.id] = (generation, self.store.next_due(node.id, pcfg.verify_deadline_s))
            return [], None
        self.idle.pop(node.id, None)
        missing = f"not seen on the node within {pcfg.verify_deadline_s:g}s"
        return judge_all(client, ready, overdue, missing, self.original)

    def _span(self, node: NodeConfig, item: Expected, ok: bool, reason: str, started: int | None) -> trace.Span:
        """One verification span, a child of the forward's CLIENT span; from the poll's start to its publish."""
        span = self.tracer.start_span(
            "probe.verify",
            context=context_from(item.traceparent) if item.traceparent else None,
            start_time=started,
            attributes={
                "dicom.sop_instance_uid": item.sop_instance_uid,
                "switchyard.node": node.id,
                "switchyard.verified": ok,
                "switchyard.reencoded": reason == REENCODED,
            },
        )
        if not ok:
            # The reason's head only: a "not DICOM" reason ends with a parser's text.
            head = reason.split(":", 1)[0]
            span.set_attribute("switchyard.reason", head)
            telemetry.fail(span, f"verification failed: {head}")
        return span

    async def publish(self, node: NodeConfig, outcomes: list[Outcome], started: int | None = None) -> None:
        """Publish pipelined, then settle what was acknowledged (one transaction).

        A crash or a missing PubAck in between leaves the expectation pending:
        the next poll publishes the same event id again (deduplicated).
        """
        events: list[ev.Event] = []
        spans: list[trace.Span] = []
        for item, ok, found, reason in outcomes:
            span = self._span(node, item, ok, reason, started)
            spans.append(span)
            ctx = telemetry.context_of(span)
            if ok:
                events.append(verified_event(item, found, reencoded=reason == REENCODED, ctx=ctx))
            else:
                log.warning("instance %s on %s failed verification: %s", item.sop_instance_uid, node.id, reason)
                events.append(failed_event(item, reason, found, ctx=ctx))
        settled: list[tuple[str, str, str, str, str]] = []
        error: Exception | None = None
        try:
            for start in range(0, len(events), PUBLISH_WINDOW):
                acks = await self.bus.publish_many(events[start : start + PUBLISH_WINDOW])
                for (item, ok, _found, reason), ack in zip(outcomes[start : start + PUBLISH_WINDOW], acks, strict=True):
                    if isinstance(ack, Exception):
                        error = error or ack
                        continue
                    state = "verified" if ok else "failed"
                    settled.append((item.node_id, item.sop_instance_uid, item.placement_id, state, reason))
                    self.outcomes.labels(node=item.node_id, outcome=state).inc()
                    if ok:
                        waited = seconds_since(item.forwarded_at)
                        observe(self.stage.labels(Stage.FORWARDED_TO_VERIFIED, item.node_id), waited)
                        if item.received_at is not None:
                            total = seconds_since(item.received_at)
                            observe(self.stage.labels(Stage.RECEIVED_TO_VERIFIED, item.node_id), total)
                    else:
                        self.failures.labels(item.node_id, reason_label(reason)).inc()
        finally:
            for span in spans:
                span.end()
            await asyncio.to_thread(self.store.settle_many, settled)
        if error is not None:
            raise error
