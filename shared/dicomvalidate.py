"""Structural validation of a dataset's bytes as they arrive, before ingest answers.

Ingest must not acknowledge what no node will accept (issue #13). The
validator is fed the dataset in chunks (the PDV fragments as they come off
the wire) and walks it with a small state machine: tag, VR, length; value
bytes are counted past, never copied or decoded, so a 1 GB object costs what
its few hundred element headers cost and is read once. Sequences and items
(defined and undefined length) and encapsulated pixel data are walked;
nesting is bounded.

Errors name the element by tag and the kind of defect, never a value: they go
into the C-STORE's Error Comment (an LO, at most 64 characters) and the log.
"""

from __future__ import annotations

import re
import struct
import zlib

from pydicom.datadict import dictionary_VR

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
DEFLATED_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1.99"

MAX_DEPTH = 16  # nested sequences; real objects stay well under 8

# The UID elements the received event carries (top level): (tag, name).
UID_TAGS = {
    0x00080016: "SOP Class UID",
    0x00080018: "SOP Instance UID",
    0x0020000D: "Study Instance UID",
    0x0020000E: "Series Instance UID",
}

_KNOWN_VRS = frozenset(
    b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
# Explicit VRs with a 2-byte reserved field and a 4-byte length.
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\Z")

UNDEFINED = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_END = 0xFFFEE00D
SEQUENCE_END = 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010

# Container kinds.
_DATASET, _SEQUENCE, _ITEM, _FRAGMENTS = "dataset", "sequence", "item", "fragments"


class DatasetError(ValueError):
    """The dataset can never be delivered; ``str()`` is a value-free Error Comment."""


def tag_str(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def valid_uid(value: bytes) -> bool:
    """0-9 and dots, <= 64 characters, no empty component, no leading zero but "0" itself."""
    text = value.rstrip(b"\x00 ")
    if not text or len(text) > 64:
        return False
    try:
        return _UID.match(text.decode("ascii")) is not None
    except UnicodeDecodeError:
        return False


class _Container:
    __slots__ = ("kind", "end", "explicit", "little", "fmt", "tag", "length")

    def __init__(self, kind: str, end: int | None, explicit: bool, little: bool, tag: int, length: int) -> None:
        self.kind, self.end, self.explicit, self.little = kind, end, explicit, little
        self.fmt = "<" if little else ">"
        self.tag, self.length = tag, length


class DatasetValidator:
    """Feed the dataset's bytes with ``feed``; ``finish`` raises DatasetError or returns the UIDs seen.

    After the first error further chunks are ignored (the rest of the object
    is still read off the wire by the caller) and ``error`` holds it.
    """

    def __init__(self, transfer_syntax: str) -> None:
        explicit = transfer_syntax != IMPLICIT_VR_LE
        little = transfer_syntax != EXPLICIT_VR_BE
        self._inflate = zlib.decompressobj(-zlib.MAX_WBITS) if transfer_syntax == DEFLATED_EXPLICIT_VR_LE else None
        self._stack = [_Container(_DATASET, None, explicit, little, 0, 0)]
        self._limit: int | None = None  # the innermost defined end: nothing may run past it
        self._pos = 0  # offset in the (inflated) dataset of the first byte not yet walked
        self._buf = bytearray()  # a header split across chunks, or a UID value, being gathered
        self._want = 8  # bytes wanted in _buf
        self._skip = 0  # value bytes still to count past
        self._capture: int | None = None  # UID tag whose value is being collected
        self._current = (0, 0)  # (tag, length) of the element being read, for messages
        self._elements = 0
        self.error: DatasetError | None = None
        self.uids: dict[int, str] = {}

    # ------------------------------------------------------------ input

    def feed(self, data: bytes | memoryview) -> None:
        if self.error is not None:
            return
        try:
            if self._inflate is None:
                self._walk(memoryview(data))
                return
            out = self._inflate.decompress(data, 1 << 20)
            while True:
                self._walk(memoryview(out))
                if not self._inflate.unconsumed_tail:
                    break
                out = self._inflate.decompress(self._inflate.unconsumed_tail, 1 << 20)
        except DatasetError as exc:
            self.error = exc
        except zlib.error:
            self.error = DatasetError("deflated dataset cannot be inflated")

    def finish(self) -> dict[int, str]:
        """The dataset is complete: raise what is wrong with it, else return {UID tag: value}."""
        if self.error is None:
            try:
                if self._inflate is not None:
                    self._walk(memoryview(self._inflate.flush()))
                    if not self._inflate.eof:
                        raise DatasetError("deflated dataset is truncated")
                self._end()
            except DatasetError as exc:
                self.error = exc
            except zlib.error:
                self.error = DatasetError("deflated dataset cannot be inflated")
        if self.error is not None:
            raise self.error
        return self.uids

    def _end(self) -> None:
        tag, length = self._current
        if self._skip or self._capture is not None:
            raise DatasetError(f"element {tag_str(tag)} value length {length} runs past end of dataset")
        if self._buf:
            raise DatasetError("dataset ends inside an element header")
        if len(self._stack) > 1:
            inner = self._stack[-1]
            what = "item" if inner.kind == _ITEM else "sequence"
            opener = next(c for c in reversed(self._stack) if c.tag)
            raise DatasetError(f"{what} in {tag_str(opener.tag)} not closed at end of dataset")
        if self._elements == 0:
            raise DatasetError("no dataset elements")

    # ------------------------------------------------------------ walking

    def _walk(self, mv: memoryview) -> None:
        i, n = 0, len(mv)
        while i < n:
            if self._skip:
                take = min(self._skip, n - i)
                self._skip -= take
                i += take
                self._pos += take
                if not self._skip:
                    self._close_ended()
            elif self._capture is not None:
                take = min(self._want - len(self._buf), n - i)
                self._buf += mv[i : i + take]
                i += take
                if len(self._buf) == self._want:
                    self._captured()
            elif not self._buf and (used := self._header(mv, i, n - i)):
                i += used  # the common case: a whole header in this chunk, parsed in place
            else:
                # A header split across chunks: gather it first.
                take = min(self._want - len(self._buf), n - i)
                self._buf += mv[i : i + take]
                i += take
                if len(self._buf) == self._want and self._header(self._buf, 0, self._want):
                    self._buf = bytearray()

    def _header(self, src: bytes | bytearray | memoryview, off: int, avail: int) -> int:
        """Parse the element header at src[off:]; return its size, or 0 if more bytes are needed."""
        if avail < 8:
            return 0
        top = self._stack[-1]
        fmt = top.fmt
        group, elem = struct.unpack_from(fmt + "HH", src, off)
        tag = group << 16 | elem
        if top.kind is not _DATASET and top.kind is not _ITEM or group == 0xFFFE:
            length = struct.unpack_from(fmt + "I", src, off + 4)[0]
            self._advance(8)
            self._delimiter(top, tag, length)
            return 8
        vr = None
        if top.explicit:
            vr = bytes(src[off + 4 : off + 6])
            if vr not in _KNOWN_VRS:
                if vr.isalpha() and vr.isupper():
                    raise DatasetError(f"element {tag_str(tag)} has unknown VR {vr.decode()}")
                raise DatasetError(f"element {tag_str(tag)}: implicit VR data in explicit VR")
            if vr in _LONG_VRS:
                if avail < 12:
                    self._want = 12  # the 4-byte length follows the reserved bytes
                    return 0
                length = struct.unpack_from(fmt + "I", src, off + 8)[0]
                size = 12
            else:
                length = struct.unpack_from(fmt + "H", src, off + 6)[0]
                size = 8
        else:
            length = struct.unpack_from(fmt + "I", src, off + 4)[0]
            size = 8
        self._advance(size)
        self._elements += 1
        self._current = (tag, length)
        if group == 0x0002:
            raise DatasetError(f"group 0002 element {tag_str(tag)} inside the dataset")
        if tag in UID_TAGS and len(self._stack) == 1:
            self._uid_element(tag, vr, length)
            return size
        if length == UNDEFINED:
            if tag == PIXEL_DATA and vr in (b"OB", b"OW", None):
                self._push(_FRAGMENTS, None, True, True, tag, length)
            elif vr == b"SQ" or vr is None:
                self._push(_SEQUENCE, None, top.explicit, top.little, tag, length)
            elif vr == b"UN":  # PS3.5 6.2.2: an undefined-length UN is an implicit VR LE sequence
                self._push(_SEQUENCE, None, False, True, tag, length)
            else:
                raise DatasetError(f"element {tag_str(tag)} VR {vr.decode()} with undefined length")
            return size
        if length & 1:
            raise DatasetError(f"element {tag_str(tag)} has odd value length {length}")
        self._within(tag, length)
        if vr == b"SQ" or (vr is None and length and _dictionary_sq(tag)):
            self._push(_SEQUENCE, self._pos + length, top.explicit, top.little, tag, length)
        elif length:
            self._skip = length
        else:
            self._close_ended()
        return size

    def _advance(self, size: int) -> None:
        """Count a header as read; it must not cross the end of its item."""
        self._want = 8
        self._pos += size
        if self._limit is not None and self._pos > self._limit:
            raise DatasetError("element header runs past the end of its item")

    def _delimiter(self, top: _Container, tag: int, length: int) -> None:
        """An item or delimiter header (tag and 4-byte length, no VR in any transfer syntax)."""
        if tag == ITEM and top.kind == _SEQUENCE:
            self._current = (tag, length)
            if length == UNDEFINED:
                self._push(_ITEM, None, top.explicit, top.little, top.tag, length)
                return
            if length & 1:
                raise DatasetError(f"item in {tag_str(top.tag)} has odd length {length}")
            self._within(top.tag, length)
            self._push(_ITEM, self._pos + length, top.explicit, top.little, top.tag, length)
        elif tag == ITEM and top.kind == _FRAGMENTS:
            self._current = (tag, length)
            if length == UNDEFINED or length & 1:
                raise DatasetError(f"pixel data fragment with bad length {length}")
            self._within(PIXEL_DATA, length)
            self._skip = length
            if not length:
                self._close_ended()
        elif tag == SEQUENCE_END and top.kind in (_SEQUENCE, _FRAGMENTS) and top.end is None:
            self._pop(tag)
        elif tag == ITEM_END and top.kind == _ITEM and top.end is None:
            self._pop(tag)
        elif top.kind in (_SEQUENCE, _FRAGMENTS):
            raise DatasetError(f"element {tag_str(tag)} where an item belongs in {tag_str(top.tag)}")
        else:
            raise DatasetError(f"delimiter {tag_str(tag)} out of place")

    def _uid_element(self, tag: int, vr: bytes | None, length: int) -> None:
        if vr == b"SQ" or length == UNDEFINED:
            raise DatasetError(f"element {tag_str(tag)} is a sequence, not a UID")
        if vr not in (b"UI", b"UN", None):
            raise DatasetError(f"element {tag_str(tag)} has VR {vr.decode()}, not UI")
        if length & 1:
            raise DatasetError(f"element {tag_str(tag)} has odd value length {length}")
        if length > 64:
            raise DatasetError(f"element {tag_str(tag)} is not a valid UID (too long)")
        if length == 0:
            raise DatasetError(f"element {tag_str(tag)} is empty")
        self._within(tag, length)
        self._capture = tag
        self._want = length

    def _captured(self) -> None:
        tag, value = self._capture, bytes(self._buf)
        assert tag is not None  # called only while a UID value is being captured
        self._capture = None
        self._buf = bytearray()
        self._want = 8
        self._pos += len(value)
        if not valid_uid(value):
            raise DatasetError(f"element {tag_str(tag)} is not a valid UID")
        self.uids[tag] = value.rstrip(b"\x00 ").decode("ascii")
        self._close_ended()

    # ------------------------------------------------------------ containers

    def _within(self, tag: int, length: int) -> None:
        """A value of ``length`` starting here must end inside every enclosing defined length."""
        if self._limit is not None and self._pos + length > self._limit:
            raise DatasetError(f"element {tag_str(tag)} value length {length} runs past its item")

    def _push(self, kind: str, end: int | None, explicit: bool, little: bool, tag: int, length: int) -> None:
        if len(self._stack) > MAX_DEPTH * 2:  # a sequence and an item per level
            raise DatasetError(f"sequences nested deeper than {MAX_DEPTH} in {tag_str(tag)}")
        self._stack.append(_Container(kind, end, explicit, little, tag, length))
        if end is not None:
            self._limit = end
        self._close_ended()

    def _pop(self, tag: int) -> None:
        self._stack.pop()
        self._limit = next((c.end for c in reversed(self._stack) if c.end is not None), None)
        self._close_ended()

    def _close_ended(self) -> None:
        """Close every defined-length container that ends exactly here."""
        while len(self._stack) > 1 and self._stack[-1].end == self._pos:
            self._stack.pop()
            self._limit = next((c.end for c in reversed(self._stack) if c.end is not None), None)


def _dictionary_sq(tag: int) -> bool:
    """Implicit VR: a defined-length element is walked as a sequence only if the dictionary says SQ."""
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False


def validate(data: bytes, transfer_syntax: str, chunk: int = 0) -> dict[int, str]:
    """Validate a whole dataset held in memory (tests, tools); ``chunk`` > 0 feeds it in pieces."""
    v = DatasetValidator(transfer_syntax)
    if chunk:
        for start in range(0, len(data), chunk):
            v.feed(data[start : start + chunk])
    else:
        v.feed(data)
    return v.finish()
