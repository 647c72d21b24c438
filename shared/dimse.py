"""pynetdicom plumbing shared by every service that speaks DICOM through pynetdicom (the probe's Q/R, tests)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from pynetdicom import evt

from shared.net import set_nodelay

if TYPE_CHECKING:
    from pynetdicom.association import Association

log = logging.getLogger(__name__)


def _set_nodelay(event: evt.Event) -> None:
    """TCP_NODELAY on the association's socket (pynetdicom has no option for it)."""
    dul_socket = getattr(event.assoc.dul.socket, "socket", None)
    if dul_socket is not None and not set_nodelay(dul_socket):
        log.warning("could not set TCP_NODELAY on a pynetdicom socket")


# Bind on every AE, SCP (start_server) and SCU (associate) alike.
NODELAY_HANDLER = (evt.EVT_CONN_OPEN, _set_nodelay)


def settle(assoc: Association, timeout: float = 0.005) -> None:
    """Let pynetdicom's reactor wake before the next request on ``assoc``.

    pynetdicom (3.0) resumes its paused reactor after each send_c_*; if the next
    request goes out before the reactor thread has woken, the reactor can take
    the response off the queue ("Received unexpected C-STORE service message")
    and the request waits out its DIMSE timeout (pynetdicom issue #875). A fast
    peer makes this likely. Wait (briefly) until the reactor has run. Reads a
    private attribute: tests/unit/test_pynetdicom_internals.py watches it.
    """
    deadline = time.monotonic() + timeout
    while getattr(assoc, "_is_paused", False) and time.monotonic() < deadline:
        time.sleep(0.0001)
