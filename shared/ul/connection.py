"""The DICOM upper layer's drivers on asyncio streams: reading PDUs, the requestor (SCU) side.

pynetdicom runs every association on two polling threads (sleeps of 1 ms and
0.1 ms between looks at its queues): measured at 6 ms of CPU per small
C-STORE and ~120 instances/s on one association. Switchyard's DICOM hops need
little of it (negotiation, P-DATA, C-STORE, C-ECHO), so they run on the event
loop the service already has. The acceptor side is ingest's Storage SCP
(services/ingest/scp.py), on ``read_pdu`` and the codec; the requestor side
is ``Association`` here: the forwarder's C-STOREs and the probe's C-ECHO.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from ssl import SSLContext
from typing import BinaryIO

from shared.net import set_nodelay
from shared.ul.codec import (
    ABORT,
    ABORT_INVALID_PARAMETER,
    ABORT_UNEXPECTED_PARAMETER,
    ABORT_UNEXPECTED_PDU,
    ABORT_UNRECOGNISED_PDU,
    ASSOCIATE_AC,
    ASSOCIATE_RJ,
    ASSOCIATE_RQ,
    C_ECHO_RSP,
    C_STORE_RSP,
    COMMAND_FIELD,
    HARD_PDU_CAP,
    IMPLICIT_VR_LITTLE_ENDIAN,
    MAX_ASSOCIATE_RQ,
    MESSAGE_ID_RESPONDED,
    P_DATA_TF,
    RELEASE_RP,
    RELEASE_RQ_PDU,
    STATUS,
    VERIFICATION,
    ProtocolError,
    abort_pdu,
    associate_request,
    command_us,
    decode_accept,
    decode_reject,
    echo_request,
    p_data_command,
    p_data_dataset,
    parse_command,
    pdvs,
    store_request,
)

__all__ = [
    "ECHO_MAX_PDU",
    "UNLIMITED_FRAGMENT",
    "Association",
    "Rejected",
    "Unreachable",
    "echo",
    "read_command",
    "read_pdu",
]

log = logging.getLogger(__name__)

# The largest dataset fragment sent when the peer announces no PDU limit (0).
UNLIMITED_FRAGMENT = 1024 * 1024
# What the probe's C-ECHO announces it can receive (one small response).
ECHO_MAX_PDU = 16384


async def read_pdu(reader: asyncio.StreamReader, max_length: int) -> tuple[int, bytes]:
    """One whole PDU (header included); refuses unknown types and oversize lengths before reading them."""
    head = await reader.readexactly(6)
    pdu_type = head[0]
    if not ASSOCIATE_RQ <= pdu_type <= ABORT:
        raise ProtocolError(ABORT_UNRECOGNISED_PDU, f"unrecognised PDU type 0x{pdu_type:02X}")
    length = int.from_bytes(head[2:6], "big")
    if length > max_length:
        raise ProtocolError(ABORT_INVALID_PARAMETER, f"PDU of {length} bytes over the {max_length} byte maximum")
    return pdu_type, head + await reader.readexactly(length)


async def read_command(reader: asyncio.StreamReader, timeout: float) -> dict[int, bytes]:
    """The next whole command set the peer sends (responses carry no dataset here); ``timeout`` per PDU."""
    command = bytearray()
    while True:
        async with asyncio.timeout(timeout):
            pdu_type, data = await read_pdu(reader, HARD_PDU_CAP)
        if pdu_type == ABORT:
            raise ConnectionResetError("the peer aborted the association")
        if pdu_type != P_DATA_TF:
            raise ProtocolError(ABORT_UNEXPECTED_PDU, f"PDU type {pdu_type} instead of a response")
        for _cx, is_command, last, fragment in pdvs(data):
            if is_command:
                command += fragment
                if last:
                    return parse_command(bytes(command))


class Unreachable(ConnectionError):
    """No TCP connection to the peer (refused, no route, timed out); the cause is chained."""


class Rejected(Exception):
    """The peer answered the A-ASSOCIATE-RQ with an A-ASSOCIATE-RJ."""

    def __init__(self, result: int, source: int, reason: int) -> None:
        super().__init__(f"association rejected (result {result}, source {source}, reason {reason})")
        self.result, self.source, self.reason = result, source, reason


class Association:
    """One requestor-side association: negotiated contexts, then one request at a time.

    Errors on the wire raise (OSError, TimeoutError, IncompleteReadError,
    ProtocolError); the caller then ``close(abort=True)``s it.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        accepted: dict[tuple[str, str], int],
        peer_max_pdu: int,
        timeout: float,
    ) -> None:
        self.reader, self.writer = reader, writer
        # Accepted (abstract syntax, transfer syntax) -> presentation context id.
        self.accepted = accepted
        self.peer_max_pdu = peer_max_pdu
        self.timeout = timeout
        self.message_id = 0

    @classmethod
    async def request(
        cls,
        host: str,
        port: int,
        calling_ae: str,
        called_ae: str,
        contexts: list[tuple[str, str]],
        max_pdu: int,
        timeout: float,
        ssl: SSLContext | None = None,
    ) -> Association:
        """Connect (over TLS when ``ssl`` is given) and negotiate ``contexts`` (each one transfer syntax).

        Raises Unreachable, Rejected or a wire error.
        """
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port, ssl=ssl)
        except (OSError, TimeoutError) as exc:
            raise Unreachable(f"{host}:{port} unreachable: {type(exc).__name__}") from exc
        set_nodelay(writer)
        try:
            writer.write(associate_request(calling_ae, called_ae, contexts, max_pdu))
            async with asyncio.timeout(timeout):
                pdu_type, data = await read_pdu(reader, MAX_ASSOCIATE_RQ)
            if pdu_type == ASSOCIATE_RJ:
                raise Rejected(*decode_reject(data))
            if pdu_type != ASSOCIATE_AC:
                raise ProtocolError(ABORT_UNEXPECTED_PDU, f"PDU type {pdu_type} instead of A-ASSOCIATE-AC")
            accepted, peer_max = decode_accept(data, contexts)
        except BaseException:
            writer.close()
            raise
        return cls(reader, writer, accepted, peer_max, timeout)

    @property
    def usable(self) -> bool:
        """False once the peer closed (EOF) or the writer is closing.

        A peer that closed an idle association, or sent an A-ABORT or
        A-RELEASE-RQ unasked, shows as EOF or unread bytes: associate afresh.
        """
        # Nothing is ever due from the peer between requests: bytes waiting there are an
        # A-ABORT or A-RELEASE-RQ (Orthanc aborts an association idle past its
        # DicomScpTimeout and keeps the socket open). StreamReader has no public size.
        unread = len(getattr(self.reader, "_buffer", b""))
        return unread == 0 and not self.reader.at_eof() and not self.writer.is_closing()

    def _next_message_id(self) -> int:
        self.message_id = self.message_id % 0xFFFF + 1
        return self.message_id

    async def c_store(self, context_id: int, sop_class: str, sop_instance: str, dataset: BinaryIO, size: int) -> int:
        """C-STORE ``size`` bytes read from ``dataset`` (at its position, encoded as the context says); the status."""
        message_id = self._next_message_id()
        writer = self.writer
        writer.write(p_data_command(context_id, store_request(message_id, sop_class, sop_instance), self.peer_max_pdu))
        room = self.peer_max_pdu - 6 if self.peer_max_pdu > 6 else UNLIMITED_FRAGMENT
        remaining = size
        while True:
            fragment = dataset.read(min(room, remaining))
            remaining -= len(fragment)
            writer.write(p_data_dataset(context_id, fragment, last=remaining <= 0 or not fragment))
            async with asyncio.timeout(self.timeout):
                await writer.drain()
            if remaining <= 0 or not fragment:
                break
        return await self._status(C_STORE_RSP, message_id)

    async def c_echo(self, context_id: int) -> int:
        """C-ECHO on the Verification context; the status."""
        message_id = self._next_message_id()
        self.writer.write(p_data_command(context_id, echo_request(message_id), self.peer_max_pdu))
        return await self._status(C_ECHO_RSP, message_id)

    async def _status(self, field: int, message_id: int) -> int:
        rsp = await read_command(self.reader, self.timeout)
        status = command_us(rsp, STATUS)
        if (
            command_us(rsp, COMMAND_FIELD) != field
            or status is None
            or command_us(rsp, MESSAGE_ID_RESPONDED) != message_id
        ):
            raise ProtocolError(ABORT_UNEXPECTED_PARAMETER, "not the response we wait for")
        return status

    async def release(self, timeout: float) -> None:
        """A-RELEASE-RQ, then wait (at most ``timeout``) for the A-RELEASE-RP or an A-ABORT."""
        self.writer.write(RELEASE_RQ_PDU)
        async with asyncio.timeout(timeout):
            while (await read_pdu(self.reader, HARD_PDU_CAP))[0] not in (RELEASE_RP, ABORT):
                pass

    async def close(self, abort: bool = False, release_timeout: float = 2.0) -> None:
        """Release (or abort, when asked or the peer is gone) and close the socket; never raises."""
        writer = self.writer
        try:
            if abort or self.reader.at_eof():
                writer.write(abort_pdu())
            else:
                await self.release(min(self.timeout, release_timeout))
        except Exception:  # noqa: BLE001 - closing a broken association must not fail the caller
            log.debug("release of an association failed", exc_info=True)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)


async def echo(host: str, port: int, calling_ae: str, called_ae: str, timeout: float) -> bool:
    """Associate, C-ECHO, release; True when the peer answered success. Never raises for network trouble."""
    contexts = [(VERIFICATION, IMPLICIT_VR_LITTLE_ENDIAN)]
    assoc = None
    try:
        async with asyncio.timeout(timeout):
            assoc = await Association.request(host, port, calling_ae, called_ae, contexts, ECHO_MAX_PDU, timeout)
            context_id = assoc.accepted.get(contexts[0])
            if context_id is None:
                assoc.writer.write(abort_pdu())
                return False
            ok = await assoc.c_echo(context_id) == 0
            await assoc.release(timeout)
            return ok
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ProtocolError, Rejected):
        return False
    finally:
        if assoc is not None:
            assoc.writer.close()
