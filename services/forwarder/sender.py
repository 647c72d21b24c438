"""C-STORE to one Orthanc node over a reused association, on asyncio.

Datasets are sent straight from the blob file (the bytes after its file meta
group): no decode, no transcoding, so only a presentation context with the
instance's own transfer syntax can carry it. The association is kept open and
renewed with a wider set of contexts when an instance needs one it lacks. The
upper layer is shared.ul, as in ingest: pynetdicom's SCU polls on two threads
per association and costs milliseconds of CPU per instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from shared import ul
from shared.config import NodeConfig
from shared.dicomfile import dataset_offset
from shared.net import set_nodelay

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128
# What we announce we can receive (responses are small); and the largest
# dataset fragment we send when the node announces no limit.
OUR_MAX_PDU = 65536
UNLIMITED_FRAGMENT = 1024 * 1024


@dataclass(frozen=True)
class Outcome:
    ok: bool
    permanent: bool
    reason: str
    status: int | None = None


def classify(status: int) -> Outcome:
    """DICOM status to outcome: success and warnings deliver; 0xA7xx is worth a retry."""
    if status == 0x0000 or 0xB000 <= status <= 0xBFFF or status == 0x0107 or status == 0x0116:
        return Outcome(True, False, "stored", status)
    if 0xA700 <= status <= 0xA7FF:
        return Outcome(False, False, f"node out of resources (0x{status:04X})", status)
    return Outcome(False, True, f"node refused the instance (0x{status:04X})", status)


class NodeSender:
    """One association to one node, one C-STORE at a time."""

    def __init__(self, node: NodeConfig, calling_ae: str, timeout_s: float) -> None:
        self.node = node
        self.calling_ae = calling_ae
        self.timeout_s = timeout_s
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        # Proposed (abstract syntax, transfer syntax) pairs and the accepted ones' context ids.
        self.proposed: list[tuple[str, str]] = []
        self.accepted: dict[tuple[str, str], int] = {}
        self.peer_max_pdu = 0
        self.message_id = 0
        self.lock = asyncio.Lock()

    @property
    def _open(self) -> bool:
        # A node that closed an idle association (or sent an A-ABORT/A-RELEASE-RQ
        # unasked) shows as EOF or unread bytes: associate afresh before sending.
        return (self.writer is not None and self.reader is not None and not self.reader.at_eof()
                and not self.writer.is_closing())

    async def _associate(self, wanted: list[tuple[str, str]]) -> Outcome | None:
        """Open an association proposing ``wanted``; an Outcome when that failed."""
        await self.close()
        try:
            async with asyncio.timeout(self.timeout_s):
                reader, writer = await asyncio.open_connection(self.node.host, self.node.dicom_port)
        except (OSError, TimeoutError) as exc:
            return Outcome(False, False, f"association failed (node unreachable: {type(exc).__name__})")
        set_nodelay(writer)
        established = False
        try:
            writer.write(ul.associate_request(self.calling_ae, self.node.ae_title, wanted, OUR_MAX_PDU))
            async with asyncio.timeout(self.timeout_s):
                pdu_type, data = await ul.read_pdu(reader, ul.MAX_ASSOCIATE_RQ)
            if pdu_type == ul.ASSOCIATE_RJ:
                result, source, reason = data[7], data[8], data[9]
                return Outcome(False, False, f"association rejected (result {result}, source {source}, "
                                             f"reason {reason})")
            if pdu_type != ul.ASSOCIATE_AC:
                raise ul.ProtocolError(ul.ABORT_UNEXPECTED_PDU, f"PDU type {pdu_type} instead of A-ASSOCIATE-AC")
            accepted, peer_max = ul.decode_accept(data, wanted)
            established = True
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ul.ProtocolError) as exc:
            return Outcome(False, False, f"association failed ({type(exc).__name__})")
        finally:
            if not established:
                writer.close()
        self.reader, self.writer = reader, writer
        self.proposed, self.accepted, self.peer_max_pdu = list(wanted), accepted, peer_max
        return None

    async def send(self, path: Path, sop_class: str, sop_instance: str, ts: str) -> Outcome:
        async with self.lock:
            key = (sop_class, ts)
            if not self._open or key not in self.proposed:
                wanted = [*self.proposed, key] if self._open and len(self.proposed) < MAX_CONTEXTS else [key]
                failed = await self._associate(wanted)
                if failed is not None:
                    return failed
            if key not in self.accepted:
                return Outcome(False, True, "node refused the SOP class / transfer syntax")
            try:
                return await self._store(path, self.accepted[key], sop_class, sop_instance)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ul.ProtocolError) as exc:
                await self.close(abort=True)
                return Outcome(False, False, f"send failed: {type(exc).__name__}")

    async def _store(self, path: Path, context_id: int, sop_class: str, sop_instance: str) -> Outcome:
        assert self.reader is not None and self.writer is not None
        self.message_id = self.message_id % 0xFFFF + 1
        command = ul.store_request(self.message_id, sop_class, sop_instance)
        self.writer.write(ul.p_data_command(context_id, command, self.peer_max_pdu))
        room = self.peer_max_pdu - 6 if self.peer_max_pdu > 6 else UNLIMITED_FRAGMENT
        with open(path, "rb") as f:
            start = dataset_offset(f)
            remaining = f.seek(0, 2) - start
            f.seek(start)
            while True:
                fragment = f.read(min(room, remaining))
                remaining -= len(fragment)
                self.writer.write(ul.p_data_dataset(context_id, fragment, last=remaining <= 0 or not fragment))
                async with asyncio.timeout(self.timeout_s):
                    await self.writer.drain()
                if remaining <= 0 or not fragment:
                    break
        return await self._response()

    async def _response(self) -> Outcome:
        assert self.reader is not None
        command = bytearray()
        while True:
            async with asyncio.timeout(self.timeout_s):
                pdu_type, data = await ul.read_pdu(self.reader, ul.HARD_PDU_CAP)
            if pdu_type == ul.ABORT:
                raise ConnectionResetError("the node aborted the association")
            if pdu_type != ul.P_DATA_TF:
                raise ul.ProtocolError(ul.ABORT_UNEXPECTED_PDU, f"PDU type {pdu_type} instead of C-STORE-RSP")
            for _cx, is_command, last, fragment in ul.pdvs(data):
                if not is_command:
                    continue
                command += fragment
                if not last:
                    continue
                fields = ul.parse_command(bytes(command))
                status = ul.command_us(fields, ul.STATUS)
                if (ul.command_us(fields, ul.COMMAND_FIELD) != ul.C_STORE_RSP or status is None
                        or ul.command_us(fields, ul.MESSAGE_ID_RESPONDED) != self.message_id):
                    raise ul.ProtocolError(ul.ABORT_UNEXPECTED_PARAMETER, "not the C-STORE-RSP we wait for")
                return classify(status)

    async def close(self, abort: bool = False) -> None:
        """Release (or abort) the association; never raises."""
        reader, writer = self.reader, self.writer
        self.reader = self.writer = None
        self.proposed, self.accepted = [], {}
        if writer is None:
            return
        try:
            if abort or reader is None or reader.at_eof():
                writer.write(ul.abort_pdu())
            else:
                writer.write(ul.RELEASE_RQ_PDU)
                async with asyncio.timeout(min(self.timeout_s, 2.0)):
                    while (await ul.read_pdu(reader, ul.HARD_PDU_CAP))[0] not in (ul.RELEASE_RP, ul.ABORT):
                        pass
        except Exception:  # noqa: BLE001 - closing a broken association must not fail the caller
            log.debug("release of the association with %s failed", self.node.id, exc_info=True)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
