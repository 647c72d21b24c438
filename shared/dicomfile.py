"""Reading DICOM Part 10 files without decoding or re-encoding them.

The dataset digest covers the bytes after the file meta group: they are what a
sender sent and what a node must hold; file meta is rewritten by every hop.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

# Tags the received event needs, read with stop_before_pixels.
HEADER_KEYWORDS = (
    "SOPInstanceUID",
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "AccessionNumber",
    "StudyDate",
    "StudyDescription",
    "SeriesNumber",
    "InstanceNumber",
)


class NotDicom(ValueError):
    """The bytes are not a readable DICOM Part 10 file."""


def dataset_offset(f: BinaryIO) -> int:
    """Offset of the first dataset byte after preamble, 'DICM' and group 0002."""
    return _walk_meta(f)[0]


def _walk_meta(f: BinaryIO) -> tuple[int, str]:
    """(dataset offset, MediaStorageSOPInstanceUID or "").

    Group 0002 is always explicit VR little endian; walk its elements rather
    than trusting (0002,0000), which some writers get wrong.
    """
    f.seek(128)
    if f.read(4) != b"DICM":
        raise NotDicom("no DICM prefix")
    pos = 132
    sop = ""
    while True:
        f.seek(pos)
        head = f.read(8)
        if len(head) < 8:
            return pos, sop
        group, elem = struct.unpack("<HH", head[:4])
        if group != 0x0002:
            return pos, sop
        vr = head[4:6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV"):
            length = struct.unpack("<I", f.read(4))[0]
            pos += 12 + length
        else:
            length = struct.unpack("<H", head[6:8])[0]
            if elem == 0x0003:
                sop = f.read(length).rstrip(b"\x00 ").decode("ascii", errors="replace")
            pos += 8 + length


def dataset_bytes_digest(data: bytes) -> str:
    """Dataset digest of a whole Part 10 file held in memory (tests, verification)."""
    return meta_sop_and_digest(data)[1]


def meta_sop_and_digest(data: bytes) -> tuple[str, str]:
    """(MediaStorageSOPInstanceUID from the file meta or "", dataset digest) of a file in memory."""
    import io

    try:
        offset, sop = _walk_meta(io.BytesIO(data))
    except struct.error as exc:  # cut short inside group 0002
        raise NotDicom(f"truncated file meta: {exc}") from exc
    return sop, hashlib.sha256(data[offset:]).hexdigest()


@dataclass(frozen=True)
class Header:
    transfer_syntax_uid: str
    values: dict[str, str] = field(default_factory=dict)

    def get(self, keyword: str) -> str:
        return self.values.get(keyword, "")


def _tags(keywords: tuple[str, ...]) -> list[int]:
    return [tag for tag in map(tag_for_keyword, keywords) if tag is not None]


_HEADER_TAGS = _tags(HEADER_KEYWORDS)


def read_header(path: Path, extra_keywords: tuple[str, ...] = ()) -> Header:
    """Header tags only; pixel data is never read.

    Only the wanted tags (and Specific Character Set, which pydicom always
    adds) become dataset elements: the others are walked past as raw bytes,
    which cuts the parse by ~40% on the ingest's answer path.
    """
    tags = _HEADER_TAGS + _tags(extra_keywords) if extra_keywords else _HEADER_TAGS
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
        if len(ds) == 0:
            raise NotDicom("no dataset elements")
        ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if ds.file_meta else ""
    except (NotDicom, OSError):
        raise  # an I/O error on the spool file may pass on a retry: not the dataset's fault
    except Exception as exc:  # noqa: BLE001 - any parse error is the dataset's, never "retry later"
        # By type only: pydicom's messages can quote element values.
        raise NotDicom(type(exc).__name__) from exc
    values: dict[str, str] = {}
    for kw in (*HEADER_KEYWORDS, *extra_keywords):
        try:
            value = ds.get(kw)
        except Exception:  # noqa: BLE001 - a malformed optional tag must not fail the store
            value = None
        if value is not None and value != "":
            values[kw] = str(value)
    return Header(ts, values)


# Bytes per word of the VRs whose raw value is a byte string in the dataset's byte order.
_WORD_VRS = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}


def _little(value: bytes, width: int, little_endian: bool) -> bytes:
    """A word-valued byte string in little endian (a big endian dataset keeps its own order)."""
    if little_endian or width < 2 or len(value) % width:
        return value
    return b"".join(value[i : i + width][::-1] for i in range(0, len(value), width))


def _normal(elem: DataElement, little_endian: bool) -> object:
    """An element's value with encoding-only differences taken out (padding, byte order)."""
    value = elem.value
    if isinstance(value, bytes):
        value = _little(value, _WORD_VRS.get(elem.VR, 1), little_endian)
        # Odd-length values are padded to even length: one trailing NUL or space.
        return value[:-1] if value[-1:] in (b"\x00", b" ") else value
    if isinstance(value, str):
        return value.rstrip(" \x00")
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [v.rstrip(" \x00") if isinstance(v, str) else v for v in value]
    return value


def _content(tag: BaseTag) -> bool:
    """Not group lengths, file meta or Data Set Trailing Padding (FFFC,FFFC): those are encoding."""
    return bool(tag.element != 0x0000 and tag.group != 0x0002 and tag != 0xFFFCFFFC)


def _first_difference(a: Dataset, b: Dataset, a_little: bool, b_little: bool, path: str = "") -> str:
    """The first tag that differs between two decoded datasets ("" when equal); group lengths ignored."""
    tags_a = {t for t in a.keys() if _content(t)}
    tags_b = {t for t in b.keys() if _content(t)}
    if tags_a != tags_b:
        return f"{path}{min(tags_a ^ tags_b)}"
    for tag in sorted(tags_a):
        ea, eb = a[tag], b[tag]
        if ea.VR == "SQ" or eb.VR == "SQ":
            if ea.VR != eb.VR or len(ea.value) != len(eb.value):
                return f"{path}{tag}"
            for i, (ia, ib) in enumerate(zip(ea.value, eb.value, strict=True)):
                diff = _first_difference(ia, ib, a_little, b_little, f"{path}{tag}[{i}].")
                if diff:
                    return diff
        elif _normal(ea, a_little) != _normal(eb, b_little):
            return f"{path}{tag}"
    return ""


def dataset_difference(a: bytes, b: bytes) -> str:
    """Compare two Part 10 files as datasets: "" when equal, else the first differing tag.

    For a node that stored other bytes for the same dataset: group lengths,
    value padding and the transfer syntax of uncompressed data (deflate,
    explicit/implicit VR, byte order) are encoding, not content. Encapsulated
    pixel data differs when its compressed bytes do. The answer names tags only,
    never values (they may identify a patient). Raises NotDicom when either
    file cannot be decoded.
    """
    import io

    try:
        da = pydicom.dcmread(io.BytesIO(a))
        db = pydicom.dcmread(io.BytesIO(b))
        return _first_difference(da, db, bool(da.is_little_endian), bool(db.is_little_endian))
    except Exception as exc:  # noqa: BLE001 - any decode error means "cannot be compared"
        raise NotDicom(type(exc).__name__) from exc
