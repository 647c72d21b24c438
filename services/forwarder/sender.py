"""C-STORE to one Orthanc node over a reused association.

Datasets are sent straight from the blob file (STORE_SEND_CHUNKED_DATASET): no
decode, no transcoding, so only a presentation context with the instance's
own transfer syntax can carry it. The association is kept open and renewed
with a wider set of contexts when an instance needs one it lacks.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from pynetdicom import AE
from pynetdicom.association import Association

from shared.config import NodeConfig
from shared.dimse import NODELAY_HANDLER, settle

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128


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
    def __init__(self, node: NodeConfig, calling_ae: str, timeout_s: float) -> None:
        self.node = node
        self.calling_ae = calling_ae
        self.timeout_s = timeout_s
        self.assoc: Association | None = None
        self.contexts: set[tuple[str, str]] = set()
        self.refused: set[str] = set()
        self.lock = threading.Lock()

    def _associate(self, wanted: set[tuple[str, str]]) -> Association | None:
        self.close()
        ae = AE(ae_title=self.calling_ae)
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = self.timeout_s
        ae.connection_timeout = self.timeout_s
        for sop_class, ts in sorted(wanted)[:MAX_CONTEXTS]:
            ae.add_requested_context(sop_class, ts)
        assoc = ae.associate(self.node.host, self.node.dicom_port, ae_title=self.node.ae_title,
                             evt_handlers=[NODELAY_HANDLER])
        if not assoc.is_established:
            # The node answered but accepted none of the contexts: keep the answer, so the
            # caller can tell a refusal (permanent) from an unreachable node (transient).
            self.refused = {cx.abstract_syntax for cx in assoc.rejected_contexts if cx.abstract_syntax}
            return None
        self.assoc = assoc
        self.contexts = set(wanted)
        return assoc

    def _accepted(self, assoc: Association, sop_class: str, ts: str) -> bool:
        return any(cx.abstract_syntax == sop_class and cx.transfer_syntax[0] == ts
                   for cx in assoc.accepted_contexts)

    def send(self, path: Path, sop_class: str, ts: str) -> Outcome:
        with self.lock:
            key = (sop_class, ts)
            assoc = self.assoc
            if assoc is None or not assoc.is_established or key not in self.contexts:
                wanted = (self.contexts | {key}) if len(self.contexts) < MAX_CONTEXTS else {key}
                self.refused = set()
                assoc = self._associate(wanted)
                if assoc is None:
                    if sop_class in self.refused:
                        return Outcome(False, True, "node refused the SOP class / transfer syntax")
                    return Outcome(False, False, "association failed (node unreachable or rejected)")
            if not self._accepted(assoc, sop_class, ts):
                return Outcome(False, True, "node refused the SOP class / transfer syntax")
            try:
                settle(assoc)
                rsp = assoc.send_c_store(path)
            except (OSError, RuntimeError, ValueError) as exc:
                self.close()
                return Outcome(False, False, f"send failed: {type(exc).__name__}")
            if not rsp or "Status" not in rsp:
                # No response: the association was aborted or timed out.
                self.close()
                return Outcome(False, False, "no C-STORE response")
            return classify(int(rsp.Status))

    def close(self) -> None:
        if self.assoc is not None:
            try:
                if self.assoc.is_established:
                    self.assoc.release()
            except Exception:  # noqa: BLE001 - closing a broken association must not fail the caller
                log.debug("release failed", exc_info=True)
            self.assoc = None
            self.contexts = set()
