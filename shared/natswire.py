"""A raw NATS reader for a push consumer's deliveries: a sans-IO parser and a thin asyncio driver.

Why not nats-py: its per-message path (a Msg object, a callback, a queue) costs
about 2.6x a regex over the socket's bytes, and a replay reads millions of
deliveries. Only what a plain, unauthenticated ``nats://`` server sends to one
subscription is handled (INFO, MSG/HMSG, PING, PONG, +OK, -ERR); anything else
(TLS, any kind of auth) raises WireUnsupported so the caller uses nats-py.

``WireParser.feed(bytes)`` returns frames; a delivery is a plain tuple
``(stream seq, consumer seq, pending, payload)`` (the hot path: no object per
message), everything else one of the small frame classes below.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

ACK_PREFIX = "$JS.ACK."
SID = 1  # the one subscription the reader makes

Delivery = tuple[int, int, int, bytes]  # (stream seq, consumer seq, pending, payload without headers)


def ack_tokens(reply: str) -> tuple[int, int, int]:
    """(stream seq, consumer seq, pending) from a JetStream ack subject (v1 or v2 form)."""
    t = reply.split(".")
    if len(t) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>
        return int(t[5]), int(t[6]), int(t[8])
    return int(t[7]), int(t[8]), int(t[10])  # $JS.ACK.<domain>.<hash>.<stream>.<consumer>.<delivered>...


# A delivery to subscription SID with a v1 ack subject
# ($JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>): groups
# sseq, dseq, pending, header bytes (HMSG), total bytes. Anything else takes the general path.
# (Single-character negations: sre counts those in a tight loop, ~2x faster than a class.)
DELIVERY = re.compile(
    rb"H?MSG [^ ]+ 1 \$JS\.ACK\.[^.]+\.[^.]+\.\d+\.(\d+)\.(\d+)\.\d+\.(\d+)"
    rb" (?:(\d+) )?(\d+)\r\n"
)


@dataclass(frozen=True, slots=True)
class Info:
    info: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Pong:
    pass


@dataclass(frozen=True, slots=True)
class Ok:
    pass


@dataclass(frozen=True, slots=True)
class Err:
    message: str


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A message without a reply subject (the consumer's idle heartbeat)."""


@dataclass(frozen=True, slots=True)
class FlowControl:
    """A message whose reply is not an ack subject: the server waits for an empty publish to it."""

    reply: bytes


Frame = Delivery | Info | Ping | Pong | Ok | Err | Heartbeat | FlowControl


class WireUnsupported(Exception):
    """The URL or the server needs what the raw reader does not do (TLS, auth): use nats-py."""


class WireError(ConnectionError):
    """The server sent -ERR, or closed the connection."""


class WireParser:
    """Bytes in, frames out; keeps an incomplete frame until the rest arrives."""

    def __init__(self) -> None:
        self._buf = b""
        self.controls = 0  # frames other than deliveries in the last feed (0: a plain list of deliveries)

    def feed(self, data: bytes) -> list[Frame]:
        buf = self._buf + data if self._buf else data
        out: list[Frame]
        pos, size, out = 0, len(buf), []
        delivery = DELIVERY.match
        mixed = False  # any frame from the general path (it may be a control frame)
        while True:
            m = delivery(buf, pos)
            if m is not None:  # the common case, parsed in C: a delivery with a v1 ack subject
                sseq, dseq, left, headers, length = m.groups()
                start = m.end()
                end = start + int(length)
                if end + 2 > size:
                    break
                pos = end + 2
                out.append((int(sseq), int(dseq), int(left), buf[start + int(headers or 0) : end]))
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            mixed = True
            op = buf[pos : pos + 4]
            if op == b"MSG " or op == b"HMSG":
                args = buf[pos:eol].split()
                start = eol + 2
                end = start + int(args[-1])
                if end + 2 > size:
                    break
                pos = end + 2
                headers = int(args[-2]) if op == b"HMSG" else 0
                if len(args) < (6 if op == b"HMSG" else 5):
                    out.append(Heartbeat())
                elif not args[3].startswith(ACK_PREFIX.encode()):
                    out.append(FlowControl(args[3]))
                else:
                    out.append((*ack_tokens(args[3].decode()), buf[start + headers : end]))
                continue
            line = buf[pos:eol]
            pos = eol + 2
            if line == b"PING":
                out.append(Ping())
            elif line == b"PONG":
                out.append(Pong())
            elif line == b"+OK":
                out.append(Ok())
            elif op == b"-ERR":
                out.append(Err(line[4:].strip().strip(b"'").decode(errors="replace")))
            elif op == b"INFO":
                out.append(Info(json.loads(line[5:])))
            # (anything else is not sent to a subscriber and is skipped)
        self._buf = buf[pos:]
        self.controls = sum(type(f) is not tuple for f in out) if out and mixed else 0
        return out


def hello(info: dict[str, Any], seed: bytes | None = None) -> bytes:
    """CONNECT and PING for a server's INFO; WireUnsupported if it wants TLS or auth we cannot give.

    With an nkey ``seed`` the reader logs in as that identity: the server's
    nonce signed with it (the same login nats-py does with ``nkeys_seed``).
    """
    if info.get("tls_required"):
        raise WireUnsupported("the server requires TLS")
    options: dict[str, Any] = {
        "verbose": False,
        "pedantic": False,
        "headers": True,
        "no_responders": True,
        "protocol": 1,
        "lang": "python-raw",
        "version": "1",
        "name": "switchyard-replay-reader",
    }
    if seed is not None and info.get("nonce"):
        from shared import natsauth

        options.update(nkey=natsauth.public_key(seed), sig=natsauth.sign_nonce(seed, info["nonce"]))
    elif info.get("auth_required") or info.get("nonce"):
        raise WireUnsupported("the server requires authentication and no nkey seed was given")
    return b"CONNECT " + json.dumps(options).encode() + b"\r\nPING\r\n"


def _error(frame: Err) -> WireError:
    return WireError(f"nats server error: -ERR '{frame.message}'")


@dataclass
class Wire:
    """An open connection: its streams and the parser holding what was read past the handshake."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    parser: WireParser

    async def read(self) -> list[Frame]:
        chunk = await self.reader.read(1 << 22)
        if not chunk:
            raise WireError("nats closed the connection")
        return self.parser.feed(chunk)

    async def subscribe(self, subject: str) -> None:
        """The one subscription (sid SID) whose deliveries ``deliveries`` reads."""
        self.writer.write(f"SUB {subject} {SID}\r\nPING\r\n".encode())
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()


async def connect(url: str, seed: bytes | None = None) -> Wire:
    """Open a raw connection to the first server of ``url`` (plain nats://; an nkey ``seed`` to log in)."""
    parts = urlsplit(url.split(",")[0].strip())
    if parts.scheme not in ("nats", "") or not parts.hostname:
        raise WireUnsupported(f"the URL scheme {parts.scheme!r} is not plain nats://")
    if parts.username or parts.password:
        raise WireUnsupported("the URL carries credentials")
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 4222, limit=1 << 20)
    wire = Wire(reader, writer, WireParser())
    try:
        frames = await wire.read()
        while not frames:  # INFO may arrive over several reads
            frames = await wire.read()
        if not isinstance(frames[0], Info):
            raise WireUnsupported("no INFO from the server")
        writer.write(hello(frames[0].info, seed))
        await writer.drain()
        frames = frames[1:]
        while True:
            for frame in frames:
                if isinstance(frame, Pong):
                    return wire
                if isinstance(frame, Err):
                    raise _error(frame)
            frames = await wire.read()
    except BaseException:
        writer.close()
        raise


async def deliveries(wire: Wire) -> AsyncGenerator[list[Delivery], None]:
    """The subscription's deliveries, one list per read (subscribe first).

    Answers PING and flow control as they come (the server pauses at its
    flow-control window while the caller is busy); -ERR raises WireError.
    """
    while True:
        frames = await wire.read()
        if not wire.parser.controls:
            if frames:
                yield cast("list[Delivery]", frames)  # no control frames: deliveries only
            continue
        got: list[Delivery] = []
        replies: list[bytes] = []
        for frame in frames:
            if type(frame) is tuple:
                got.append(frame)
            elif isinstance(frame, FlowControl):
                replies.append(b"PUB " + frame.reply + b" 0\r\n\r\n")  # we are reading
            elif isinstance(frame, Ping):
                replies.append(b"PONG\r\n")
            elif isinstance(frame, Err):
                raise _error(frame)
        if replies:
            wire.writer.write(b"".join(replies))
        if got:
            yield got
