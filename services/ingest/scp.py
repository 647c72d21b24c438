"""The Storage SCP: where Switchyard takes responsibility for an image.

Associations run on the event loop that owns the NATS connection (the upper
layer is shared.ul). Each dataset streams, undecoded, into a spool
file behind the file meta group as its P-DATA arrives, so memory does not grow
with object size; the digests are computed on the way. A C-STORE is answered
success only once the blob is durable (the spool file fsynced and renamed into
the local store, or uploaded) AND JetStream acknowledged the received event.
The blocking steps (header read, fsync, upload) run on a thread pool, so the
fsyncs of concurrent associations overlap.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import itertools
import logging
import os
import ssl
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pynetdicom import ALL_TRANSFER_SYNTAXES, StoragePresentationContexts
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification

from shared import events as ev
from shared import telemetry, ul
from shared.access import PeerPolicy
from shared.blobs import BlobStore, BlobStoreError, content_key
from shared.bus import Bus, BusUnavailable, PublishUncertain, subject_for
from shared.config import Config
from shared.dicomfile import Header, NotDicom, read_header
from shared.dicomvalidate import DatasetError, DatasetValidator, valid_uid
from shared.metrics import bounded_ae
from shared.net import set_nodelay
from shared.telemetry import current_trace_context

log = logging.getLogger("switchyard.ingest.scp")

SUCCESS = 0x0000
# Out of resources: the sender should retry later.
OUT_OF_RESOURCES_BLOB = 0xA700
OUT_OF_RESOURCES_BUS = 0xA701
OUT_OF_RESOURCES_INTERNAL = 0xA702
# Cannot understand: retrying the same bytes will not help (a structural defect, an event the bus
# cannot carry). 0xA900 (dataset does not match SOP class) is not used: ingest does not check IODs.
CANNOT_UNDERSTAND = 0xC000
UID_MISMATCH = 0xC001
TOO_LARGE = 0xC002
UNRECOGNIZED_OPERATION = 0x0211
# Room left in NATS max_payload for the message headers (Nats-Msg-Id, trace context).
EVENT_HEADER_ROOM = 1024


def shown(uid: str) -> str:
    """A UID fit for a log line: one with other characters than digits and dots may carry anything."""
    return uid if valid_uid(uid.encode("ascii", "replace")) else "(invalid UID)"


def configured_aes(cfg: Config) -> frozenset[str]:
    """The calling AEs named in the access rules: the only peer_ae label values besides ``other``."""
    peers = (entry.partition("@")[0] for entry in cfg.ingest.allowed_peers)
    return frozenset(ae.strip() for ae in (*cfg.ingest.allowed_calling_aes, *peers) if ae.strip())


def status_result(status: int) -> str:
    """success, warning or failure (PS3.7 C.4.2.1.4): a bounded label for alerting."""
    if status == SUCCESS:
        return "success"
    if status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:
        return "warning"
    return "failure"


class IngestMetrics:
    def __init__(self, registry: CollectorRegistry, known_aes: frozenset[str] = frozenset()) -> None:
        # Per calling AE, bounded: configured AEs by name, every other one as "other"; all at 0 from the start.
        self.known_aes = known_aes
        self.peer_associations = Counter(
            "switchyard_ingest_peer_associations",
            "Association requests by calling AE (configured ones; others 'other') and outcome",
            ["peer_ae", "outcome"],
            registry=registry,
        )
        self.peer_results = Counter(
            "switchyard_ingest_peer_cstore_results",
            "C-STORE responses by calling AE and result (success, warning, failure)",
            ["peer_ae", "result"],
            registry=registry,
        )
        for ae in (*known_aes, "other"):
            for outcome in ("accepted", "rejected"):
                self.peer_associations.labels(ae, outcome)
            for result in ("success", "warning", "failure"):
                self.peer_results.labels(ae, result)
        self.blob_errors = Counter(
            "switchyard_ingest_blob_errors", "Blob store writes that failed (answered 0xA700)", registry=registry
        )
        self.instances = Counter("switchyard_ingest_instances", "Instances accepted", registry=registry)
        self.bytes = Counter("switchyard_ingest_bytes", "Bytes accepted", registry=registry)
        self.statuses = Counter(
            "switchyard_ingest_cstore_status", "C-STORE responses by status", ["status"], registry=registry
        )
        self.latency = Histogram(
            "switchyard_ingest_receive_to_ack_seconds",
            "From complete dataset to C-STORE response",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.associations = Gauge("switchyard_ingest_open_associations", "Open associations", registry=registry)
        self.rejected = Counter(
            "switchyard_ingest_associations_rejected", "Association requests rejected", registry=registry
        )
        self.aborted = Counter(
            "switchyard_ingest_associations_aborted", "Associations aborted (by either side)", registry=registry
        )
        self.spool_discarded = Counter(
            "switchyard_ingest_spool_discarded", "Partial datasets discarded from the spool", registry=registry
        )


def supported_contexts() -> list[PresentationContext]:
    """Every storage SOP class pynetdicom lists (retired ones too) and Verification, any transfer syntax."""
    uids = [cx.abstract_syntax for cx in StoragePresentationContexts] + [Verification]
    return [build_context(uid, ALL_TRANSFER_SYNTAXES) for uid in uids]


class _Incoming:
    """One dataset arriving: spooled behind its file meta, hashed and validated as it comes."""

    def __init__(self, path: Path, meta: bytes, limit: int, transfer_syntax: str = "1.2.840.10008.1.2.1") -> None:
        self.path = path
        self.limit = limit
        self.transfer_syntax = transfer_syntax
        self.size = len(meta)
        self.meta_size = len(meta)
        self.too_large = False
        self.file_hash = hashlib.sha256(meta)
        self.dataset_hash = hashlib.sha256()
        self.validator = DatasetValidator(transfer_syntax)
        self.file: io.BufferedWriter | None = open(path, "xb")  # noqa: SIM115 - closed in close()/discard()
        self.file.write(meta)

    def write(self, fragment: memoryview) -> None:
        self.size += len(fragment)
        if self.too_large:
            return
        if self.size > self.limit:
            # Stop spooling at once: the rest of the object is read and dropped.
            self.too_large = True
            self.discard()
            return
        assert self.file is not None  # (None only once discarded, and then too_large is set)
        self.file.write(fragment)
        self.file_hash.update(fragment)
        self.dataset_hash.update(fragment)
        self.validator.feed(fragment)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class _Command:
    context_id: int
    field: int
    message_id: int
    sop_class: str
    sop_instance: str


@dataclass(frozen=True)
class _Peer:
    calling_ae: str
    called_ae: str
    address: str
    port: int = 0
    # Names the association in re-send events (one per association and instance).
    association_id: str = ""


class StorageSCP:
    def __init__(
        self,
        cfg: Config,
        bus: Bus,
        blobs: BlobStore,
        metrics: IngestMetrics,
        tracer: trace.Tracer,
    ) -> None:
        self.cfg = cfg
        self.bus = bus
        self.blobs = blobs
        self.metrics = metrics
        self.tracer = tracer
        self.extra = tuple(cfg.ingest.extra_tags)
        self.spool = Path(cfg.ingest.spool_dir).resolve()
        self.policy = PeerPolicy.from_config(cfg.ingest.allowed_calling_aes, cfg.ingest.allowed_peers)
        self.contexts = supported_contexts()
        # fsyncs and uploads of concurrent associations overlap here.
        self.io = ThreadPoolExecutor(max(4, cfg.ingest.max_associations), thread_name_prefix="ingest-io")
        # Spool files flushed while their header is checked (its own pool: an io thread waits on it).
        self.flush = ThreadPoolExecutor(max(4, cfg.ingest.max_associations), thread_name_prefix="ingest-flush")
        self._names = itertools.count()
        self._open = 0
        # Open associations per peer (calling AE, address): one peer may not take every slot.
        self._per_peer: dict[tuple[str, str], int] = {}
        # Association tasks, and whether each is finishing a C-STORE (not to be cut off at stop).
        self._tasks: dict[asyncio.Task, bool] = {}

    # ------------------------------------------------------------ server

    async def start(self, tls: ssl.SSLContext | None, reuse_port: bool = False) -> asyncio.AbstractServer:
        icfg = self.cfg.ingest
        return await asyncio.start_server(
            self._connection,
            icfg.host,
            icfg.port,
            ssl=tls,
            ssl_handshake_timeout=icfg.network_timeout_s if tls else None,
            limit=max(icfg.max_pdu, 65536) + 6,
            reuse_port=reuse_port or None,
        )

    async def stop(self, server: asyncio.AbstractServer, grace_s: float = 10.0) -> None:
        """Stop accepting; let C-STOREs being finished get their answer; end the rest."""
        server.close()
        for task, finishing in list(self._tasks.items()):
            if not finishing:
                task.cancel()
        pending = list(self._tasks)
        if pending:
            done, still = await asyncio.wait(pending, timeout=grace_s)
            for task in still:
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)
        self.io.shutdown(wait=True)
        self.flush.shutdown(wait=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # (always, in a coroutine)
        self._tasks[task] = False
        set_nodelay(writer)
        peername = writer.get_extra_info("peername") or ("?", 0)
        try:
            await self._association(reader, writer, str(peername[0]))
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                writer.write(ul.abort_pdu())
        except Exception:  # noqa: BLE001 - one broken association never takes the server down
            log.exception("association from %s ended by an internal error", peername[0])
            with contextlib.suppress(Exception):
                writer.write(ul.abort_pdu())
        finally:
            self._tasks.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2.0)

    async def _read(self, reader: asyncio.StreamReader, max_length: int) -> tuple[int, bytes]:
        async with asyncio.timeout(self.cfg.ingest.network_timeout_s):
            return await ul.read_pdu(reader, max_length)

    # ------------------------------------------------------------ association

    async def _association(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, address: str) -> None:
        try:
            pdu_type, data = await self._read(reader, ul.MAX_ASSOCIATE_RQ)
            if pdu_type != ul.ASSOCIATE_RQ:
                raise ul.ProtocolError(ul.ABORT_UNEXPECTED_PDU, f"PDU type {pdu_type} before A-ASSOCIATE-RQ")
            rq = ul.decode_request(data)
        except ul.ProtocolError as exc:
            log.warning("dropped a connection from %s: %s", address, exc)
            writer.write(ul.abort_pdu(exc.reason))
            return
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
            log.warning("dropped a connection from %s before association: %s", address, type(exc).__name__)
            return

        calling, called = str(rq.calling_ae_title).strip(), str(rq.called_ae_title).strip()
        refuse = None
        if not self.policy.allows(calling, address):
            refuse = ul.REJECT_CALLING_AE
            log.warning("association rejected: calling AE %r from %s is not an allowed peer", calling, address)
        elif called != self.cfg.ingest.ae_title.strip():
            refuse = ul.REJECT_CALLED_AE
            log.warning(
                "association rejected: calling AE %r from %s, called AE %r is not ours", calling, address, called
            )
        elif self._open >= self.cfg.ingest.max_associations:
            refuse = ul.REJECT_LOCAL_LIMIT
            log.warning(
                "association rejected: calling AE %r from %s, %d associations open", calling, address, self._open
            )
        elif 0 < self.cfg.ingest.max_associations_per_peer <= self._per_peer.get((calling, address), 0):
            refuse = ul.REJECT_LOCAL_LIMIT
            log.warning(
                "association rejected: calling AE %r from %s already holds %d associations (per-peer limit)",
                calling,
                address,
                self._per_peer[(calling, address)],
            )
        result = ul.negotiate(rq, int.from_bytes(data[6:8], "big"), self.contexts, self.cfg.ingest.max_pdu, refuse)
        writer.write(result.answer)
        if result.reject is not None:
            self.metrics.rejected.inc()
            self.metrics.peer_associations.labels(bounded_ae(calling, self.metrics.known_aes), "rejected").inc()
            return
        self.metrics.peer_associations.labels(bounded_ae(calling, self.metrics.known_aes), "accepted").inc()
        peername = writer.get_extra_info("peername")
        peer = _Peer(
            calling,
            called,
            address,
            int(peername[1]) if peername and len(peername) > 1 else 0,
            uuid.uuid4().hex,
        )
        key = (calling, address)
        self._open += 1
        self._per_peer[key] = self._per_peer.get(key, 0) + 1
        self.metrics.associations.inc()
        try:
            await self._data_phase(reader, writer, result, peer)
        finally:
            self._open -= 1
            if (left := self._per_peer[key] - 1) > 0:
                self._per_peer[key] = left
            else:
                del self._per_peer[key]
            self.metrics.associations.dec()

    async def _data_phase(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, assoc: ul.Negotiated, peer: _Peer
    ) -> None:
        max_in = self.cfg.ingest.max_pdu or ul.HARD_PDU_CAP
        command_bytes = bytearray()
        command: _Command | None = None
        incoming: _Incoming | None = None
        # Why a C-STORE whose dataset is still arriving will be refused (no spool file for it).
        refusal: tuple[int, str] = (UNRECOGNIZED_OPERATION, "operation not supported here")
        try:
            while True:
                try:
                    pdu_type, data = await self._read(reader, max_in)
                except ul.ProtocolError as exc:
                    return self._abort(writer, peer, exc)
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
                    self.metrics.aborted.inc()
                    log.warning(
                        "association with %r from %s ended: %s",
                        peer.calling_ae,
                        peer.address,
                        "network timeout" if isinstance(exc, TimeoutError) else "connection lost",
                    )
                    writer.write(ul.abort_pdu())
                    return
                if pdu_type == ul.RELEASE_RQ:
                    writer.write(ul.RELEASE_RP_PDU)
                    return
                if pdu_type == ul.ABORT:
                    self.metrics.aborted.inc()
                    log.warning("association aborted: calling AE %r from %s", peer.calling_ae, peer.address)
                    return
                if pdu_type != ul.P_DATA_TF:
                    return self._abort(
                        writer, peer, ul.ProtocolError(ul.ABORT_UNEXPECTED_PDU, f"unexpected PDU type {pdu_type}")
                    )
                try:
                    for context_id, is_command, last, fragment in ul.pdvs(data):
                        if context_id not in assoc.contexts:
                            raise ul.ProtocolError(
                                ul.ABORT_INVALID_PARAMETER, f"presentation context {context_id} was not accepted"
                            )
                        if is_command:
                            if command is not None:
                                raise ul.ProtocolError(ul.ABORT_UNEXPECTED_PARAMETER, "command before dataset")
                            command_bytes += fragment
                            if not last:
                                continue
                            command, has_dataset = self._command(context_id, bytes(command_bytes))
                            command_bytes.clear()
                            if not has_dataset:
                                await self._answer_without_dataset(writer, assoc, command)
                                command = None
                            elif command.field == ul.C_STORE_RQ:
                                try:
                                    incoming = self._begin(command, assoc)
                                except (OSError, ValueError) as exc:
                                    log.error("cannot spool %s: %s", command.sop_instance, exc)
                                    refusal = (OUT_OF_RESOURCES_INTERNAL, "cannot spool; retry later")
                            continue
                        if command is None or context_id != command.context_id:
                            raise ul.ProtocolError(ul.ABORT_UNEXPECTED_PARAMETER, "dataset without its command")
                        if incoming is not None:
                            incoming.write(fragment)
                        if last:
                            done, finished = command, incoming
                            command = incoming = None
                            if finished is None:
                                if done.field == ul.C_STORE_RQ:
                                    self.metrics.statuses.labels(status=f"0x{refusal[0]:04X}").inc()
                                    self.metrics.peer_results.labels(
                                        bounded_ae(peer.calling_ae, self.metrics.known_aes), status_result(refusal[0])
                                    ).inc()
                                await self._send(writer, assoc, done, *refusal)
                                refusal = (UNRECOGNIZED_OPERATION, "operation not supported here")
                            else:
                                await self._finish_store(writer, assoc, peer, done, finished)
                except ul.ProtocolError as exc:
                    return self._abort(writer, peer, exc)
        finally:
            if incoming is not None:
                self._discard(incoming, peer)

    def _abort(self, writer: asyncio.StreamWriter, peer: _Peer, exc: ul.ProtocolError) -> None:
        self.metrics.aborted.inc()
        log.warning("aborted the association with %r from %s: %s", peer.calling_ae, peer.address, exc)
        writer.write(ul.abort_pdu(exc.reason))

    def _discard(self, incoming: _Incoming, peer: _Peer) -> None:
        """A dataset the association ended in the middle of: nothing of it stays."""
        incoming.discard()
        self.metrics.spool_discarded.inc()
        log.warning("discarded a partial dataset from %s", peer.address)

    def _command(self, context_id: int, data: bytes) -> tuple[_Command, bool]:
        fields = ul.parse_command(data)
        field = ul.command_us(fields, ul.COMMAND_FIELD)
        message_id = ul.command_us(fields, ul.MESSAGE_ID)
        dataset_type = ul.command_us(fields, ul.DATASET_TYPE)
        if field is None or message_id is None or dataset_type is None:
            raise ul.ProtocolError(ul.ABORT_INVALID_PARAMETER, "command set without field, message id or type")
        command = _Command(
            context_id,
            field,
            message_id,
            ul.command_uid(fields, ul.AFFECTED_SOP_CLASS),
            ul.command_uid(fields, ul.AFFECTED_SOP_INSTANCE),
        )
        return command, dataset_type != ul.NO_DATASET

    async def _send(
        self, writer: asyncio.StreamWriter, assoc: ul.Negotiated, command: _Command, status: int, comment: str = ""
    ) -> None:
        field = command.field | 0x8000
        instance = command.sop_instance if command.field == ul.C_STORE_RQ else None
        rsp = ul.response(
            field,
            command.message_id,
            command.sop_class or assoc.contexts[command.context_id][0],
            instance,
            status,
            comment,
        )
        writer.write(ul.p_data_command(command.context_id, rsp, assoc.peer_max_pdu))
        await writer.drain()

    async def _answer_without_dataset(
        self, writer: asyncio.StreamWriter, assoc: ul.Negotiated, command: _Command
    ) -> None:
        if command.field == ul.C_ECHO_RQ:
            await self._send(writer, assoc, command, SUCCESS)
        elif command.field == ul.C_STORE_RQ:
            await self._send(writer, assoc, command, CANNOT_UNDERSTAND, "C-STORE without a dataset")
        else:
            await self._send(writer, assoc, command, UNRECOGNIZED_OPERATION, "operation not supported here")

    def _begin(self, command: _Command, assoc: ul.Negotiated) -> _Incoming:
        abstract, transfer_syntax = assoc.contexts[command.context_id]
        meta = ul.file_meta(command.sop_class or abstract, command.sop_instance, transfer_syntax)
        path = self.spool / f"{os.getpid()}-{next(self._names)}.dcm"
        return _Incoming(path, meta, self.cfg.ingest.max_object_bytes, transfer_syntax)

    # ------------------------------------------------------------ one C-STORE

    async def _finish_store(
        self, writer: asyncio.StreamWriter, assoc: ul.Negotiated, peer: _Peer, command: _Command, incoming: _Incoming
    ) -> None:
        task = asyncio.current_task()
        assert task is not None  # (always, in a coroutine)
        self._tasks[task] = True
        started = time.monotonic()
        try:
            with telemetry.span(self.tracer, "ingest.c_store", kind=trace.SpanKind.SERVER) as span:
                span.set_attributes(
                    {
                        "rpc.system": "dicom",
                        "rpc.method": "C-STORE",
                        "dicom.sop_instance_uid": shown(command.sop_instance),
                        "dicom.sop_class_uid": shown(command.sop_class),
                        "dicom.transfer_syntax_uid": incoming.transfer_syntax,
                        "dicom.calling_ae": peer.calling_ae,
                        "dicom.called_ae": peer.called_ae,
                        "switchyard.size": incoming.size,
                    }
                )
                try:
                    status, comment = await self._store(command, incoming, peer)
                except Exception as exc:  # noqa: BLE001 - every C-STORE gets an answer
                    # By type only: exception texts can carry element values.
                    log.error("unexpected failure storing %s: %s", shown(command.sop_instance), type(exc).__name__)
                    status, comment = OUT_OF_RESOURCES_INTERNAL, "internal error; retry later"
                finally:
                    incoming.discard()  # the spool file, unless the blob store took it
                telemetry.dicom_status(span, status)
            self.metrics.statuses.labels(status=f"0x{status:04X}").inc()
            self.metrics.peer_results.labels(
                bounded_ae(peer.calling_ae, self.metrics.known_aes), status_result(status)
            ).inc()
            self.metrics.latency.observe(time.monotonic() - started)
            await self._send(writer, assoc, command, status, comment)
        finally:
            if task in self._tasks:
                self._tasks[task] = False

    async def _store(self, command: _Command, incoming: _Incoming, peer: _Peer) -> tuple[int, str]:
        sop_uid = shown(command.sop_instance)
        if incoming.too_large:
            log.warning("refused %s: %d bytes over the %d byte limit", sop_uid, incoming.size, incoming.limit)
            return TOO_LARGE, "object larger than this SCP accepts"
        incoming.close()
        try:
            incoming.validator.finish()  # walked as the PDVs arrived: nothing is read again
        except DatasetError as exc:
            log.warning("refused %s: %s", sop_uid, exc)
            return CANNOT_UNDERSTAND, str(exc)
        outcome = await asyncio.get_running_loop().run_in_executor(
            self.io, self._persist, command, incoming, peer, current_trace_context()
        )
        if isinstance(outcome[0], int):
            return outcome
        received, existed = outcome
        return await self._announce(command, incoming, received, existed, peer)

    def _persist(
        self, command: _Command, incoming: _Incoming, peer: _Peer, trace_context: tuple
    ) -> tuple[int, str] | tuple[ev.InstanceReceivedV1, bool]:
        """Check the header against the command and the event against the bus, then make the blob
        durable (one trip to the thread pool): nothing is kept for what is refused.

        The spool file's bytes are flushed (``sync_ahead``) while the header is
        parsed: the two were a third of the time to answer a C-STORE, one after
        the other.
        """
        sop_uid = shown(command.sop_instance)
        flushed = self.flush.submit(self.blobs.sync_ahead, incoming.path)
        try:
            header = read_header(incoming.path, self.extra)
        except NotDicom:
            log.warning("refused %s: dataset cannot be parsed", sop_uid)
            return CANNOT_UNDERSTAND, "dataset cannot be parsed"
        if header.get("SOPInstanceUID") != sop_uid:
            log.warning("refused %s: dataset SOP Instance UID differs from the command's", sop_uid)
            return UID_MISMATCH, "SOP Instance UID differs from command"
        if header.get("SOPClassUID") != command.sop_class:
            log.warning("refused %s: dataset SOP Class UID differs from the command's", sop_uid)
            return UID_MISMATCH, "SOP Class UID differs from command"
        if not header.get("StudyInstanceUID"):
            log.warning("refused %s: no Study Instance UID", sop_uid)
            return CANNOT_UNDERSTAND, "no Study Instance UID"
        key = content_key(incoming.file_hash.hexdigest())
        received = self._received_event(command, incoming, peer, header, key, trace_context)
        size, limit = len(ev.encode(received)) + EVENT_HEADER_ROOM, self.bus.nc.max_payload
        if size > limit:
            log.warning(
                "refused %s: its received event (%d bytes) exceeds the bus's max payload (%d)", sop_uid, size, limit
            )
            return CANNOT_UNDERSTAND, "received event exceeds the bus's max payload"
        try:
            existed = self._keep(key, incoming.path, flushed.result())
        except (BlobStoreError, OSError) as exc:
            self.metrics.blob_errors.inc()
            log.error("blob store refused %s: %s", sop_uid, exc)
            return OUT_OF_RESOURCES_BLOB, "object store unavailable"
        return received, existed

    def _keep(self, key: str, path: Path, synced: bool) -> bool:
        """Make the blob durable (hand the spool file over); True when it was already there."""
        if self.blobs.exists(key):
            return True
        self.blobs.adopt_file(key, path, synced=synced)
        return False

    def _received_event(
        self, command: _Command, incoming: _Incoming, peer: _Peer, header: Header, key: str, trace_context: tuple
    ) -> ev.InstanceReceivedV1:
        sop_uid = command.sop_instance
        dataset_digest = incoming.dataset_hash.hexdigest()
        traceparent, tracestate = trace_context
        return ev.InstanceReceivedV1(
            event_id=ev.fact_id("received", sop_uid, dataset_digest),
            traceparent=traceparent,
            tracestate=tracestate,
            sop_instance_uid=sop_uid,
            sop_class_uid=header.get("SOPClassUID"),
            study_instance_uid=header.get("StudyInstanceUID"),
            series_instance_uid=header.get("SeriesInstanceUID"),
            transfer_syntax_uid=header.transfer_syntax_uid,
            blob_key=key,
            size=incoming.size,
            dataset_digest=dataset_digest,
            calling_ae=peer.calling_ae,
            called_ae=peer.called_ae,
            peer_address=peer.address,
            peer_port=peer.port,
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

    async def _announce(
        self, command: _Command, incoming: _Incoming, received: ev.InstanceReceivedV1, existed: bool, peer: _Peer
    ) -> tuple[int, str]:
        sop_uid, key, size = command.sop_instance, received.blob_key, incoming.size
        subject = subject_for(received)
        with telemetry.span(
            self.tracer,
            f"{subject} publish",
            kind=trace.SpanKind.PRODUCER,
            attributes=telemetry.messaging_attributes(subject, "publish"),
        ) as span:
            # The event carries the PRODUCER span's context (same length: the size check holds).
            received.traceparent, received.tracestate = telemetry.context_of(span)
            try:
                ack = await self.bus.publish(received, self.cfg.nats.publish_timeout_s)
            except BusUnavailable as exc:
                telemetry.fail(span, "bus unavailable")
                # Nothing reached JetStream: take back the blob we just wrote.
                if not existed:
                    await asyncio.get_running_loop().run_in_executor(self.io, self.blobs.delete, key)
                log.error("event bus unavailable for %s (%s); answered failure", sop_uid, exc)
                return OUT_OF_RESOURCES_BUS, "event log unavailable"
            except PublishUncertain as exc:
                telemetry.fail(span, "no acknowledgement")
                # The event may be recorded: keep the blob so it never points at nothing.
                log.error("no acknowledgement for %s (%s); answered failure", sop_uid, exc)
                return OUT_OF_RESOURCES_BUS, "event log did not acknowledge"
            span.set_attribute("switchyard.stream_seq", ack.seq)
            span.set_attribute("switchyard.duplicate", bool(ack.duplicate))
        if not ack.duplicate:
            self.metrics.instances.inc()
            self.metrics.bytes.inc(size)
        resent = existed or ack.duplicate
        if resent and not await self._record_resent(received, peer):
            return OUT_OF_RESOURCES_BUS, "event log unavailable"
        log.info(
            "accepted %s from %r at %s:%d (%d bytes, seq %d%s)",
            shown(sop_uid),
            peer.calling_ae,
            peer.address,
            peer.port,
            size,
            ack.seq,
            ", a re-send of content already held" if resent else "",
        )
        return SUCCESS, ""

    async def _record_resent(self, received: ev.InstanceReceivedV1, peer: _Peer) -> bool:
        """The audit record of a re-send (identical content already held): who sent it again, from where.

        The content key is the file's digest, so a blob that was already there means the same bytes.
        One event per association and instance (its id names both): a retry in the same association is
        deduplicated by the log. False when the log did not take it (the sender should retry).
        """
        resent = ev.InstanceResentV1(
            event_id=ev.fact_id("resent", received.sop_instance_uid, received.dataset_digest, peer.association_id),
            traceparent=received.traceparent,
            tracestate=received.tracestate,
            sop_instance_uid=received.sop_instance_uid,
            study_instance_uid=received.study_instance_uid,
            dataset_digest=received.dataset_digest,
            blob_key=received.blob_key,
            calling_ae=peer.calling_ae,
            called_ae=peer.called_ae,
            peer_address=peer.address,
            peer_port=peer.port,
            association_id=peer.association_id,
        )
        try:
            await self.bus.publish(resent, self.cfg.nats.publish_timeout_s)
        except (BusUnavailable, PublishUncertain) as exc:
            log.error("re-send of %s not recorded (%s); answered failure", shown(received.sop_instance_uid), exc)
            return False
        return True
