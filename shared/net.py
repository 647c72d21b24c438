"""Socket settings every DICOM hop needs, in one place."""

from __future__ import annotations

import asyncio
import socket


def set_nodelay(sock_or_writer: socket.socket | asyncio.StreamWriter | None) -> bool:
    """TCP_NODELAY on a socket or an asyncio writer's socket; False when it could not be set.

    Without it every DIMSE round trip stalls ~40 ms (Nagle + delayed ACK).
    Non-TCP sockets (unix, none at all) are left alone.
    """
    sock = sock_or_writer
    if isinstance(sock, asyncio.StreamWriter):
        sock = sock.get_extra_info("socket")
    if sock is None:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        return False
    return True
