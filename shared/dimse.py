"""pynetdicom plumbing shared by every service that speaks DICOM."""

from __future__ import annotations

import logging
import socket
import time

from pynetdicom import evt

log = logging.getLogger(__name__)


def _set_nodelay(event: evt.Event) -> None:
    """Without TCP_NODELAY every DIMSE round trip stalls ~40 ms (Nagle + delayed ACK)."""
    try:
        sock = event.assoc.dul.socket.socket
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError) as exc:
        log.warning("could not set TCP_NODELAY: %s", exc)


# Bind on every AE, SCP (start_server) and SCU (associate) alike.
NODELAY_HANDLER = (evt.EVT_CONN_OPEN, _set_nodelay)


def settle(assoc, timeout: float = 0.005) -> None:
    """Let pynetdicom's reactor wake before the next request on ``assoc``.

    pynetdicom (3.0) resumes its paused reactor after each send_c_*; if the next
    request goes out before the reactor thread has woken, the reactor can take
    the response off the queue ("Received unexpected C-STORE service message")
    and the request waits out its DIMSE timeout (pynetdicom issue #875). A fast
    peer makes this likely. Wait (briefly) until the reactor has run.
    """
    deadline = time.monotonic() + timeout
    while getattr(assoc, "_is_paused", False) and time.monotonic() < deadline:
        time.sleep(0.0001)
