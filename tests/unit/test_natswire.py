"""The raw NATS reader: the fast path reads a delivery line exactly as the general path does, or not at
all; a recorded byte stream gives the same frames however it is split; what it cannot do, it refuses."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import cast

import pytest

from shared import natswire
from shared.natswire import DELIVERY as _DELIVERY
from shared.natswire import ack_tokens as _ack_tokens
from shared.readmodel import replay

V1 = "$JS.ACK.SWITCHYARD.Xy7rT2kLmN0pQ4sV8wZ1aB.1.123456.123450.1764393333000000000.3876544"
V2 = "$JS.ACK.hub.ACCHASH.SWITCHYARD.Xy7rT2kLmN0pQ4sV8wZ1aB.1.123456.123450.1764393333000000000.3876544.tok"


def test_v1_deliveries_with_and_without_headers():
    for line, headers, total in (
        (f"MSG dicom.instance.received 1 {V1} 575\r\n", None, b"575"),
        (f"HMSG dicom.instance.received 1 {V1} 40 615\r\n", b"40", b"615"),
    ):
        m = _DELIVERY.match(line.encode())
        assert m is not None and m.end() == len(line)
        sseq, dseq, left, got_headers, got_total = m.groups()
        assert (int(sseq), int(dseq), int(left)) == _ack_tokens(V1) == (123456, 123450, 3876544)
        assert (got_headers, got_total) == (headers, total)


def test_anything_else_is_left_to_the_general_path():
    for line in (
        f"MSG dicom.instance.received 1 {V2} 575\r\n",  # domain form: general path
        "HMSG _SWITCHYARD_REPLAY.ab 1 $JS.FC.SWITCHYARD.x.y 24 24\r\n",  # flow control
        "HMSG _SWITCHYARD_REPLAY.ab 1 28 28\r\n",  # idle heartbeat
        f"MSG dicom.instance.received 2 {V1} 575\r\n",  # another subscription
        "PING\r\n",
    ):
        assert _DELIVERY.match(line.encode()) is None, line
    assert _ack_tokens(V2) == (123456, 123450, 3876544)


# -- the sans-IO parser over a recorded byte stream -------------------------------------------

FC_HEADERS = b"NATS/1.0 100 FlowControl Request\r\n\r\n"
HB_HEADERS = b"NATS/1.0 100 Idle Heartbeat\r\n\r\n"
MSG_HEADERS = b"NATS/1.0\r\nNats-Msg-Id: x\r\n\r\n"
INFO = {"server_id": "N1", "version": "2.10.0", "headers": True, "max_payload": 1048576}


def _v1(sseq: int, dseq: int, pending: int) -> bytes:
    return f"$JS.ACK.SWITCHYARD.C.1.{sseq}.{dseq}.1764393333000000000.{pending}".encode()


RECORDED = b"".join(
    [
        b"INFO " + json.dumps(INFO).encode() + b"\r\n",
        b"+OK\r\n",
        b"MSG dicom.instance.received 1 " + _v1(10, 1, 5) + b" 5\r\nhello\r\n",
        b"HMSG dicom.instance.placed 1 "
        + _v1(11, 2, 4)
        + b" %d %d\r\n" % (len(MSG_HEADERS), len(MSG_HEADERS) + 7)
        + MSG_HEADERS
        + b"world\r\n\r\n",
        b"PING\r\n",
        b"HMSG _SWITCHYARD_REPLAY.ab 1 $JS.FC.SWITCHYARD.x.y %d %d\r\n" % (len(FC_HEADERS), len(FC_HEADERS))
        + FC_HEADERS
        + b"\r\n",
        b"HMSG _SWITCHYARD_REPLAY.ab 1 %d %d\r\n" % (len(HB_HEADERS), len(HB_HEADERS)) + HB_HEADERS + b"\r\n",
        b"PONG\r\n",
        b"MSG dicom.instance.received 1 " + V2.encode() + b" 3\r\nabc\r\n",
        b"MSG dicom.instance.received 1 " + _v1(12, 4, 0) + b" 0\r\n\r\n",
        b"-ERR 'Slow Consumer Detected'\r\n",
    ]
)
FRAMES = [
    natswire.Info(INFO),
    natswire.Ok(),
    (10, 1, 5, b"hello"),
    (11, 2, 4, b"world\r\n"),
    natswire.Ping(),
    natswire.FlowControl(b"$JS.FC.SWITCHYARD.x.y"),
    natswire.Heartbeat(),
    natswire.Pong(),
    (123456, 123450, 3876544, b"abc"),
    (12, 4, 0, b""),
    natswire.Err("Slow Consumer Detected"),
]


def test_a_recorded_stream_parses_to_its_frames():
    parser = natswire.WireParser()
    assert parser.feed(RECORDED) == FRAMES
    assert parser.controls == 7
    assert parser.feed(b"") == [] and parser.controls == 0


def test_a_split_at_every_byte_gives_the_same_frames():
    for cut in range(len(RECORDED) + 1):
        parser = natswire.WireParser()
        assert parser.feed(RECORDED[:cut]) + parser.feed(RECORDED[cut:]) == FRAMES, cut


def test_byte_by_byte_gives_the_same_frames():
    parser = natswire.WireParser()
    frames = []
    for i in range(len(RECORDED)):
        frames += parser.feed(RECORDED[i : i + 1])
    assert frames == FRAMES


def test_deliveries_only_is_a_plain_list():
    parser = natswire.WireParser()
    data = b"".join(b"MSG s 1 " + _v1(i, i, 9 - i) + b" 1\r\nx\r\n" for i in range(1, 10))
    assert parser.feed(data) == [(i, i, 9 - i, b"x") for i in range(1, 10)]
    assert parser.controls == 0


def _wire_over(data: bytes) -> natswire.Wire:
    """A Wire whose reader replays recorded bytes (no writes are needed before the -ERR)."""
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return natswire.Wire(reader, cast(asyncio.StreamWriter, None), natswire.WireParser())  # never written to


def test_err_raises_a_clear_error():
    async def read():
        async for _ in natswire.deliveries(_wire_over(b"-ERR 'Authorization Violation'\r\n")):
            pass

    with pytest.raises(natswire.WireError, match="-ERR 'Authorization Violation'"):
        asyncio.run(read())


def test_a_closed_connection_raises():
    async def read():
        return [got async for got in natswire.deliveries(_wire_over(b"MSG s 1 " + _v1(1, 1, 3) + b" 1\r\nx\r\n"))]

    with pytest.raises(natswire.WireError, match="closed"):
        asyncio.run(read())


@pytest.mark.parametrize("info", [{"auth_required": True}, {"nonce": "abc"}, {"tls_required": True}])
def test_a_server_that_wants_auth_or_tls_is_refused(info):
    with pytest.raises(natswire.WireUnsupported):
        natswire.hello({**INFO, **info})


def test_a_plain_server_gets_connect_and_ping():
    line = natswire.hello(INFO)
    assert line.startswith(b"CONNECT {") and line.endswith(b"}\r\nPING\r\n")
    assert json.loads(line[8:-8])["headers"] is True


@pytest.mark.parametrize(
    "url",
    ["tls://127.0.0.1:4222", "nats://user:secret@127.0.0.1:4222", "nats://token@127.0.0.1:4222", "ws://127.0.0.1:8080"],
)
def test_urls_the_reader_does_not_handle_are_refused_before_connecting(url):
    with pytest.raises(natswire.WireUnsupported):
        asyncio.run(natswire.connect(url))


def test_the_slow_path_is_announced_once_per_reason(caplog):
    caplog.set_level(logging.WARNING, logger="switchyard.readmodel.replay")
    replay._SLOW_PATH_REASONS.discard("a test's reason")
    for _ in range(3):
        replay._slow_path_once("a test's reason")
    assert [r.getMessage() for r in caplog.records].count(
        "replaying through nats-py, not the raw reader (~2.6x slower): a test's reason"
    ) == 1
