"""The replay reader's fast path reads a delivery line exactly as the general path does, or not at all."""

from __future__ import annotations

from shared.natswire import DELIVERY as _DELIVERY, ack_tokens as _ack_tokens

V1 = "$JS.ACK.SWITCHYARD.Xy7rT2kLmN0pQ4sV8wZ1aB.1.123456.123450.1764393333000000000.3876544"
V2 = "$JS.ACK.hub.ACCHASH.SWITCHYARD.Xy7rT2kLmN0pQ4sV8wZ1aB.1.123456.123450.1764393333000000000.3876544.tok"


def test_v1_deliveries_with_and_without_headers():
    for line, headers, total in ((f"MSG dicom.instance.received 1 {V1} 575\r\n", None, b"575"),
                                 (f"HMSG dicom.instance.received 1 {V1} 40 615\r\n", b"40", b"615")):
        m = _DELIVERY.match(line.encode())
        assert m is not None and m.end() == len(line)
        sseq, dseq, left, got_headers, got_total = m.groups()
        assert (int(sseq), int(dseq), int(left)) == _ack_tokens(V1) == (123456, 123450, 3876544)
        assert (got_headers, got_total) == (headers, total)


def test_anything_else_is_left_to_the_general_path():
    for line in (f"MSG dicom.instance.received 1 {V2} 575\r\n",  # domain form: general path
                 "HMSG _SWITCHYARD_REPLAY.ab 1 $JS.FC.SWITCHYARD.x.y 24 24\r\n",  # flow control
                 "HMSG _SWITCHYARD_REPLAY.ab 1 28 28\r\n",  # idle heartbeat
                 f"MSG dicom.instance.received 2 {V1} 575\r\n",  # another subscription
                 "PING\r\n"):
        assert _DELIVERY.match(line.encode()) is None, line
    assert _ack_tokens(V2) == (123456, 123450, 3876544)
