"""The Storage SCP: where Switchyard takes responsibility for an image.

pynetdicom spools each incoming dataset to a file (STORE_RECV_CHUNKED_DATASET),
so memory does not grow with object size and the bytes are never decoded and
re-encoded. A C-STORE is answered success only once the blob is durable AND
JetStream acknowledged the received event.

Handlers run on pynetdicom's threads; they reach the asyncio loop that owns
the NATS connection through run_coroutine_threadsafe, and never raise.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydicom.dataset import Dataset
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, StoragePresentationContexts, evt
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import Verification, register_uid, uid_to_service_class

from shared import events as ev
from shared.access import PeerPolicy, bound_reads, install_policy
from shared.blobs import BlobStore, BlobStoreError, content_key
from shared.bus import Bus, BusUnavailable, PublishUncertain
from shared.config import Config
from shared.dicomfile import NotDicom, digests, read_header
from shared.dimse import NODELAY_HANDLER
from shared.telemetry import current_trace_context

log = logging.getLogger(__name__)

SUCCESS = 0x0000
# Out of resources: the sender should retry later.
OUT_OF_RESOURCES_BLOB = 0xA700
OUT_OF_RESOURCES_BUS = 0xA701
OUT_OF_RESOURCES_INTERNAL = 0xA702
# Cannot understand: retrying the same bytes will not help.
CANNOT_UNDERSTAND = 0xC000
UID_MISMATCH = 0xC001
TOO_LARGE = 0xC002


class IngestMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.instances = Counter("switchyard_ingest_instances", "Instances accepted", registry=registry)
        self.bytes = Counter("switchyard_ingest_bytes", "Bytes accepted", registry=registry)
        self.statuses = Counter(
            "switchyard_ingest_cstore_status", "C-STORE responses by status", ["status"], registry=registry
        )
        self.latency = Histogram(
            "switchyard_ingest_receive_to_ack_seconds",
            "From complete dataset to C-STORE response",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.associations = Gauge(
            "switchyard_ingest_open_associations", "Open associations", registry=registry
        )
        self.rejected = Counter(
            "switchyard_ingest_associations_rejected", "Association requests rejected", registry=registry
        )
        self.aborted = Counter(
            "switchyard_ingest_associations_aborted", "Associations aborted (by either side)", registry=registry
        )
        self.spool_discarded = Counter(
            "switchyard_ingest_spool_discarded", "Partial datasets discarded from the spool", registry=registry
        )


def storage_sop_classes() -> list[str]:
    """Every storage SOP class pynetdicom lists, each one handled as storage.

    pynetdicom negotiates retired storage classes (e.g. the old Ultrasound
    1.2.840.10008.5.1.4.1.1.6) but maps them to no service class and then
    aborts the whole association on the first such C-STORE, failing every
    other image the sender had queued. Registering them as storage avoids that.
    """
    uids = [cx.abstract_syntax for cx in StoragePresentationContexts]
    for uid in uids:
        if uid_to_service_class(uid) is not StorageServiceClass:
            register_uid(uid, "Retired" + uid.replace(".", "_"), StorageServiceClass)
    return uids


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


class StorageSCP:
    def __init__(
        self, cfg: Config, bus: Bus, blobs: BlobStore, loop: asyncio.AbstractEventLoop,
        metrics: IngestMetrics, tracer: trace.Tracer,
    ) -> None:
        self.cfg = cfg
        self.bus = bus
        self.blobs = blobs
        self.loop = loop
        self.metrics = metrics
        self.tracer = tracer
        self.extra = tuple(cfg.ingest.extra_tags)
        self._lock = threading.Lock()
        self._established: set[int] = set()
        self.policy = PeerPolicy.from_config(cfg.ingest.allowed_calling_aes, cfg.ingest.allowed_peers)

    def build_ae(self) -> AE:
        icfg = self.cfg.ingest
        ae = AE(ae_title=icfg.ae_title)
        for uid in storage_sop_classes():
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        # Calling AE titles (and addresses) are checked by the PeerPolicy ACSE.
        ae.require_called_aet = True
        ae.maximum_associations = icfg.max_associations
        ae.maximum_pdu_size = icfg.max_pdu
        ae.network_timeout = icfg.network_timeout_s
        ae.acse_timeout = icfg.network_timeout_s
        ae.dimse_timeout = icfg.network_timeout_s
        return ae

    def handlers(self) -> list:
        return [
            NODELAY_HANDLER,
            install_policy(self.policy),
            bound_reads(self.cfg.ingest.network_timeout_s),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_ESTABLISHED, self._opened),
            (evt.EVT_RELEASED, self._closed),
            (evt.EVT_ABORTED, self._aborted),
            (evt.EVT_REJECTED, self._rejected),
            (evt.EVT_CONN_CLOSE, self._discard_partial),
        ]

    def _opened(self, event: evt.Event) -> None:
        with self._lock:
            self._established.add(id(event.assoc))
        self.metrics.associations.inc()

    def _closed(self, event: evt.Event) -> None:
        # pynetdicom also reports aborts of associations that were never established.
        with self._lock:
            if id(event.assoc) not in self._established:
                return
            self._established.discard(id(event.assoc))
        self.metrics.associations.dec()

    def _aborted(self, event: evt.Event) -> None:
        self._closed(event)
        self.metrics.aborted.inc()
        req = event.assoc.requestor
        log.warning("association aborted: calling AE %r from %s", req.ae_title, req.address)

    def _rejected(self, event: evt.Event) -> None:
        self.metrics.rejected.inc()
        req = event.assoc.requestor
        log.warning("association rejected: calling AE %r from %s, called AE %r", req.ae_title,
                    req.address, event.assoc.acceptor.ae_title)

    def _discard_partial(self, event: evt.Event) -> None:
        """Delete the spool file of a dataset the connection ended in the middle of.

        pynetdicom spools with NamedTemporaryFile(delete=False) and unlinks the
        file only after the C-STORE handler ran: a dataset cut off by an abort,
        a dropped connection or a truncated PDU would stay in the spool forever.
        """
        try:
            message = getattr(event.assoc.dimse, "message", None)
            spool = getattr(message, "_data_set_file", None)
            if spool is None:
                return
            spool.close()
            Path(spool.name).unlink(missing_ok=True)
            message._data_set_file = None
            self.metrics.spool_discarded.inc()
            log.warning("discarded a partial dataset from %s", event.assoc.requestor.address)
        except Exception:  # noqa: BLE001 - a handler never raises
            log.exception("could not discard a partial spool file")

    def handle_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def handle_store(self, event: evt.Event) -> int | Dataset:
        started = time.monotonic()
        req = event.request
        sop_uid = str(req.AffectedSOPInstanceUID or "")
        with self.tracer.start_as_current_span("ingest.c_store") as span:
            span.set_attribute("dicom.sop_instance_uid", sop_uid)
            span.set_attribute("dicom.sop_class_uid", str(req.AffectedSOPClassUID or ""))
            try:
                result = self._store(event, sop_uid)
            except Exception:  # noqa: BLE001 - a handler must answer, never raise
                log.exception("unexpected failure storing %s", sop_uid)
                result = _status(OUT_OF_RESOURCES_INTERNAL, "internal error; retry later")
            code = result if isinstance(result, int) else int(result.Status)
            span.set_attribute("dicom.status", code)
        self.metrics.statuses.labels(status=f"0x{code:04X}").inc()
        self.metrics.latency.observe(time.monotonic() - started)
        return result

    def _store(self, event: evt.Event, sop_uid: str) -> int | Dataset:
        req = event.request
        path = Path(event.dataset_path)
        size = path.stat().st_size
        if size > self.cfg.ingest.max_object_bytes:
            log.warning("refused %s: %d bytes over the %d byte limit", sop_uid, size,
                        self.cfg.ingest.max_object_bytes)
            return _status(TOO_LARGE, "object larger than this SCP accepts")
        try:
            header = read_header(path, self.extra)
        except NotDicom:
            log.warning("refused %s: dataset cannot be parsed", sop_uid)
            return _status(CANNOT_UNDERSTAND, "dataset cannot be parsed")
        if header.get("SOPInstanceUID") != sop_uid:
            log.warning("refused %s: dataset SOP Instance UID differs from the command's", sop_uid)
            return _status(UID_MISMATCH, "SOP Instance UID differs from command")
        if header.get("SOPClassUID") != str(req.AffectedSOPClassUID):
            log.warning("refused %s: dataset SOP Class UID differs from the command's", sop_uid)
            return _status(UID_MISMATCH, "SOP Class UID differs from command")
        study_uid = header.get("StudyInstanceUID")
        if not study_uid:
            log.warning("refused %s: no Study Instance UID", sop_uid)
            return _status(CANNOT_UNDERSTAND, "no Study Instance UID")

        d = digests(path)
        key = content_key(d.file_sha256)
        try:
            existed = self.blobs.exists(key)
            if not existed:
                self.blobs.put_file(key, path)
        except (BlobStoreError, OSError) as exc:
            log.error("blob store refused %s: %s", sop_uid, exc)
            return _status(OUT_OF_RESOURCES_BLOB, "object store unavailable")

        traceparent, tracestate = current_trace_context()
        assoc = event.assoc
        received = ev.InstanceReceivedV1(
            event_id=ev.fact_id("received", sop_uid, d.dataset_sha256),
            traceparent=traceparent,
            tracestate=tracestate,
            sop_instance_uid=sop_uid,
            sop_class_uid=header.get("SOPClassUID"),
            study_instance_uid=study_uid,
            series_instance_uid=header.get("SeriesInstanceUID"),
            transfer_syntax_uid=header.transfer_syntax_uid,
            blob_key=key,
            size=d.size,
            dataset_digest=d.dataset_sha256,
            calling_ae=assoc.requestor.ae_title,
            called_ae=assoc.acceptor.ae_title,
            modality=header.get("Modality"),
            patient_id=header.get("PatientID"),
            patient_name=header.get("PatientName"),
            patient_birth_date=header.get("PatientBirthDate"),
            accession_number=header.get("AccessionNumber"),
            study_date=header.get("StudyDate"),
            study_description=header.get("StudyDescription"),
            series_number=header.get("SeriesNumber"),
            instance_number=header.get("InstanceNumber"),
            extra_tags={k: header.get(k) for k in self.extra if header.get(k)},
        )
        timeout = self.cfg.nats.publish_timeout_s
        try:
            future = asyncio.run_coroutine_threadsafe(self.bus.publish(received, timeout), self.loop)
            ack = future.result(timeout + 1.0)
        except BusUnavailable as exc:
            # Nothing reached JetStream: take back the blob we just wrote.
            if not existed:
                self.blobs.delete(key)
            log.error("event bus unavailable for %s (%s); answered failure", sop_uid, exc)
            return _status(OUT_OF_RESOURCES_BUS, "event log unavailable")
        except (PublishUncertain, TimeoutError) as exc:
            # The event may be recorded: keep the blob so it never points at nothing.
            log.error("no acknowledgement for %s (%s); answered failure", sop_uid, exc)
            return _status(OUT_OF_RESOURCES_BUS, "event log did not acknowledge")
        span = trace.get_current_span()
        span.set_attribute("switchyard.stream_seq", ack.seq)
        span.set_attribute("switchyard.duplicate", bool(ack.duplicate))
        if not ack.duplicate:
            self.metrics.instances.inc()
            self.metrics.bytes.inc(d.size)
        log.info("accepted %s (%d bytes, seq %d%s)", sop_uid, d.size, ack.seq,
                 ", already recorded" if ack.duplicate else "")
        return SUCCESS
