"""Verified delivery: read forwarded instances back from their node and compare digests.

The forwarder's C-STORE success only says the node answered; this closes the
loop. Per node: follow Orthanc's ``/changes`` (NewInstance) from the stored
cursor, record what the node now holds, then for every forwarded instance the
node has shown, download it and compare the dataset digest with the one
recorded at ingest. Outcome events have deterministic ids (node, SOP Instance
UID, placement), so a publish retried after a crash is recorded once.

The deadline is only judged right after a complete ``/changes`` read: a node
that cannot be reached fails no instance on stale knowledge (its heartbeat
already says it is down).
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge

from services.probe.store import Expected, ProbeStore
from shared import events as ev
from shared.bus import Bus, BusUnavailable, PublishUncertain
from shared.config import Config, NodeConfig
from shared.dicomfile import NotDicom, dataset_bytes_digest
from shared.orthanc import OrthancClient, OrthancError
from shared.runtime import wait_or_stop

log = logging.getLogger("switchyard.probe.verify")


def read_changes(client: OrthancClient, since: int, limit: int) -> tuple[list[tuple[str, str, int]], int, bool]:
    """One page of NewInstance changes: ([(sop uid, orthanc id, seq)], last seq, done)."""
    page = client.get_json(f"/changes?since={since}&limit={limit}")
    seen = []
    for change in page.get("Changes", []):
        if change.get("ChangeType") != "NewInstance":
            continue
        try:
            tags = client.get_json(f"/instances/{change['ID']}")["MainDicomTags"]
        except OrthancError as exc:
            # Deleted since: it is not on the node any more, so it cannot verify anything.
            log.info("instance %s from /changes is gone (%s)", change["ID"], exc)
            continue
        seen.append((tags["SOPInstanceUID"], change["ID"], int(change["Seq"])))
    return seen, int(page.get("Last", since)), bool(page.get("Done", True))


def judge(client: OrthancClient, item: Expected) -> tuple[bool, str, str]:
    """Read one instance back: (digest matches, found digest, reason)."""
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
        return False, found, "dataset digest mismatch"
    return True, found, ""


def verified_event(item: Expected, digest: str) -> ev.InstanceVerifiedV1:
    return ev.InstanceVerifiedV1(
        event_id=ev.fact_id("verified", item.node_id, item.sop_instance_uid, item.placement_id),
        sop_instance_uid=item.sop_instance_uid, study_instance_uid=item.study_instance_uid,
        node_id=item.node_id, placement_id=item.placement_id, dataset_digest=digest,
    )


def failed_event(item: Expected, reason: str, found: str = "") -> ev.InstanceVerificationFailedV1:
    return ev.InstanceVerificationFailedV1(
        event_id=ev.fact_id("verification_failed", item.node_id, item.sop_instance_uid, item.placement_id),
        sop_instance_uid=item.sop_instance_uid, study_instance_uid=item.study_instance_uid,
        node_id=item.node_id, placement_id=item.placement_id, reason=reason,
        expected_digest=item.dataset_digest, found_digest=found,
        received_seq=item.received_seq, attempt=item.attempt, avoid=list(item.avoid), pool=item.pool,
    )


class Verifier:
    def __init__(self, cfg: Config, store: ProbeStore, bus: Bus, registry: CollectorRegistry) -> None:
        self.cfg = cfg
        self.store = store
        self.bus = bus
        self.outcomes = Counter("switchyard_probe_verifications", "Verification outcomes published",
                                ["node", "outcome"], registry=registry)
        self.changes = Counter("switchyard_probe_changes_seen", "NewInstance changes read from nodes",
                               ["node"], registry=registry)
        self.log_seq = Gauge("switchyard_probe_verify_last_seq", "Last stream sequence in the verification store",
                             registry=registry)

    async def follow_log(self, stop: asyncio.Event) -> None:
        """Keep the store's view of placements and forwards current."""
        start = await asyncio.to_thread(self.store.last_seq)
        log.info("following the log from stream sequence %d", start + 1)
        self.log_seq.set(start)
        async for batch in self.bus.follow_batches(start + 1, 512, 0.2, stop, subject="dicom.instance.>"):
            await asyncio.to_thread(self.store.apply, [(d.seq, d.event) for d in batch])
            self.log_seq.set(batch[-1].seq)

    async def watch(self, node: NodeConfig, stop: asyncio.Event) -> None:
        pcfg = self.cfg.probe
        client = OrthancClient(node, pcfg.timeout_s)
        while not stop.is_set():
            try:
                await self.poll(node, client)
            except (OrthancError, ValueError, KeyError) as exc:
                log.debug("verification of %s paused: %s", node.id, exc)
            except (BusUnavailable, PublishUncertain) as exc:
                log.warning("verification outcome for %s not published: %s", node.id, exc)
            await wait_or_stop(stop, pcfg.changes_interval_s)

    async def poll(self, node: NodeConfig, client: OrthancClient) -> None:
        pcfg = self.cfg.probe
        since = await asyncio.to_thread(self.store.node_cursor, node.id)
        done = False
        while not done:
            seen, last, done = await asyncio.to_thread(read_changes, client, since, pcfg.changes_limit)
            if last != since or seen:
                await asyncio.to_thread(self.store.record_changes, node.id, seen, last)
                self.changes.labels(node=node.id).inc(len(seen))
            since = last
        settled: list[tuple[str, str, str, str, str]] = []
        try:
            for item in await asyncio.to_thread(self.store.ready_to_check, node.id):
                ok, found, reason = await asyncio.to_thread(judge, client, item)
                if ok:
                    await self.publish(verified_event(item, found), item, "verified", "", settled)
                else:
                    log.warning("instance %s on %s failed verification: %s", item.sop_instance_uid, node.id, reason)
                    await self.publish(failed_event(item, reason, found), item, "failed", reason, settled)
            # Judged only now, after a complete read of the node's changes.
            for item in await asyncio.to_thread(self.store.overdue, node.id, ev.utcnow(), pcfg.verify_deadline_s):
                reason = f"not seen on the node within {pcfg.verify_deadline_s:g}s"
                log.warning("instance %s on %s failed verification: %s", item.sop_instance_uid, node.id, reason)
                await self.publish(failed_event(item, reason), item, "failed", reason, settled)
        finally:
            # One transaction for the whole poll, and only for outcomes already recorded on the log.
            await asyncio.to_thread(self.store.settle_many, settled)

    async def publish(self, event: ev.Event, item: Expected, state: str, detail: str,
                      settled: list[tuple[str, str, str, str, str]]) -> None:
        """Publish first, then settle: a crash in between re-publishes the same id (deduplicated)."""
        await self.bus.publish(event)
        settled.append((item.node_id, item.sop_instance_uid, item.placement_id, state, detail))
        self.outcomes.labels(node=item.node_id, outcome=state).inc()
