"""C-STORE to one Orthanc node over a reused association, on asyncio.

Datasets are sent straight from the blob file (the bytes after its file meta
group): no decode, no transcoding, so only a presentation context with the
instance's own transfer syntax can carry it. The association is kept open and
renewed with a wider set of contexts when an instance needs one it lacks. The
association is shared.ul's asyncio SCU (``ul.Association``), not pynetdicom's,
which polls on two threads per association and costs milliseconds of CPU per
instance.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from shared import ul
from shared.config import NodeConfig
from shared.dicomfile import dataset_offset

MAX_CONTEXTS = 128
# What we announce we can receive (responses are small).
OUR_MAX_PDU = 65536
# An association idle longer than this is renewed before use: Orthanc closes idle
# associations after its DicomScpTimeout (30 s by default), and a C-STORE written
# into one it has closed meets a reset that says nothing about the instance.
IDLE_RENEW_S = 20.0


@dataclass(frozen=True)
class Outcome:
    """One delivery's result. Failures are of the node (``node_failure``: pause the node,
    use no delivery), of this instance (``instance``: the node rejected or aborted on
    this dataset, worth one more try at most), or neither (retried with backoff)."""

    ok: bool
    permanent: bool
    reason: str
    status: int | None = None
    node_failure: bool = False
    instance: bool = False


def classify(status: int) -> Outcome:
    """DICOM status to outcome: success and warnings deliver; 0xA7xx is worth a retry."""
    if status == 0x0000 or 0xB000 <= status <= 0xBFFF or status == 0x0107 or status == 0x0116:
        return Outcome(True, False, "stored", status)
    if 0xA700 <= status <= 0xA7FF:
        return Outcome(False, False, f"node out of resources (0x{status:04X})", status)
    return Outcome(False, True, f"node refused the instance (0x{status:04X})", status, instance=True)


class NodeSender:
    """One association to one node, one C-STORE at a time."""

    def __init__(self, node: NodeConfig, calling_ae: str, timeout_s: float) -> None:
        self.node = node
        self.calling_ae = calling_ae
        self.timeout_s = timeout_s
        self.assoc: ul.Association | None = None
        # Proposed (abstract syntax, transfer syntax) pairs; the accepted ones are in assoc.accepted.
        self.proposed: list[tuple[str, str]] = []
        self.lock = asyncio.Lock()
        self.last_used = 0.0

    @property
    def _open(self) -> bool:
        return self.assoc is not None and self.assoc.usable

    async def _associate(self, wanted: list[tuple[str, str]]) -> Outcome | None:
        """Open an association proposing ``wanted``; an Outcome when that failed."""
        await self.close()
        try:
            self.assoc = await ul.Association.request(
                self.node.host,
                self.node.dicom_port,
                self.calling_ae,
                self.node.ae_title,
                wanted,
                OUR_MAX_PDU,
                self.timeout_s,
            )
        except ul.Unreachable as exc:
            return Outcome(
                False,
                False,
                f"association failed (node unreachable: {type(exc.__cause__).__name__})",
                node_failure=True,
            )
        except ul.Rejected as exc:
            return Outcome(False, False, str(exc), node_failure=True)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ul.ProtocolError) as exc:
            return Outcome(False, False, f"association failed ({type(exc).__name__})", node_failure=True)
        self.proposed = list(wanted)
        self.last_used = time.monotonic()
        return None

    async def send(self, path: Path, sop_class: str, sop_instance: str, ts: str) -> Outcome:
        async with self.lock:
            key = (sop_class, ts)
            if self._open and time.monotonic() - self.last_used > IDLE_RENEW_S:
                await self.close()
            fresh = False
            while True:
                if not self._open or key not in self.proposed:
                    wanted = [*self.proposed, key] if self._open and len(self.proposed) < MAX_CONTEXTS else [key]
                    failed = await self._associate(wanted)
                    if failed is not None:
                        return failed
                    fresh = True
                assert self.assoc is not None
                context_id = self.assoc.accepted.get(key)
                if context_id is None:
                    return Outcome(False, True, "node refused the SOP class / transfer syntax", instance=True)
                with open(path, "rb") as f:
                    start = dataset_offset(f)
                    size = f.seek(0, 2) - start
                    f.seek(start)
                    outcome = await self._store(context_id, sop_class, sop_instance, f, size)
                self.last_used = time.monotonic()
                if outcome.instance and outcome.status is None and not fresh:
                    # The wire broke on an association opened for earlier instances: the
                    # node may have closed it (idle timeout, restart) before this one was
                    # sent. Once more on a new association before blaming the instance.
                    fresh = True
                    continue
                return outcome

    async def _store(self, context_id: int, sop_class: str, sop_instance: str, f: BinaryIO, size: int) -> Outcome:
        assert self.assoc is not None
        try:
            return classify(await self.assoc.c_store(context_id, sop_class, sop_instance, f, size))
        except TimeoutError:
            # The node took the dataset and did not answer in time: it may still be
            # storing it; an ordinary retry (the caller checks the node before giving up).
            await self.close(abort=True)
            return Outcome(False, False, "send failed: no response in time")
        except (OSError, asyncio.IncompleteReadError, ul.ProtocolError) as exc:
            # The node aborted or closed the association during this C-STORE: recognised
            # at once (no timeout wait), an instance failure; a node that is really gone
            # fails the next association instead.
            await self.close(abort=True)
            return Outcome(False, False, f"node aborted the C-STORE ({type(exc).__name__})", instance=True)

    async def close_if_idle(self) -> None:
        """Close the association unless a C-STORE is on it (the node was marked down:
        an idle association must not keep it from exiting)."""
        if not self.lock.locked():
            await self.close()

    async def close(self, abort: bool = False) -> None:
        """Release (or abort) the association; never raises."""
        assoc, self.assoc = self.assoc, None
        self.proposed = []
        if assoc is not None:
            await assoc.close(abort=abort)
