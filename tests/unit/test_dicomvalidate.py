"""The structural validator on hand-built dataset bytes: each defect, each encoding, every chunking."""

from __future__ import annotations

import struct
import zlib

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from shared.dicomvalidate import (
    DEFLATED_EXPLICIT_VR_LE,
    EXPLICIT_VR_BE,
    IMPLICIT_VR_LE,
    MAX_DEPTH,
    DatasetError,
    DatasetValidator,
    valid_uid,
    validate,
)

EXPLICIT_LE = "1.2.840.10008.1.2.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
LONG = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
UNDEF = 0xFFFFFFFF
SOP_CLASS = b"1.2.840.10008.5.1.4.1.1.2\x00"
SOP_INSTANCE = b"1.2.3.4.5.6"
STUDY = b"1.2.3.4.7\x00"
SERIES = b"1.2.3.4.8\x00"


def ex(tag: int, vr: bytes, value: bytes = b"", length: int | None = None, big: bool = False) -> bytes:
    """One explicit VR element; ``length`` overrides the encoded length (defects, undefined)."""
    e = ">" if big else "<"
    n = len(value) if length is None else length
    head = struct.pack(e + "HH", tag >> 16, tag & 0xFFFF) + vr
    if vr in LONG:
        return head + b"\0\0" + struct.pack(e + "I", n) + value
    return head + struct.pack(e + "H", n) + value


def im(tag: int, value: bytes = b"", length: int | None = None) -> bytes:
    """One implicit VR little endian element."""
    n = len(value) if length is None else length
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, n) + value


def item(body: bytes, undefined: bool = False, big: bool = False) -> bytes:
    e = ">" if big else "<"
    if undefined:
        return struct.pack(e + "HHI", 0xFFFE, 0xE000, UNDEF) + body + struct.pack(e + "HHI", 0xFFFE, 0xE00D, 0)
    return struct.pack(e + "HHI", 0xFFFE, 0xE000, len(body)) + body


def seq_end(big: bool = False) -> bytes:
    return struct.pack((">" if big else "<") + "HHI", 0xFFFE, 0xE0DD, 0)


def head_ex(big: bool = False, sop: bytes = SOP_INSTANCE) -> bytes:
    """SOP Class, SOP Instance, Patient ID, Study and Series UIDs, explicit VR."""
    return (
        ex(0x00080016, b"UI", SOP_CLASS, big=big)
        + ex(0x00080018, b"UI", _pad(sop, b"\0"), big=big)
        + ex(0x00100020, b"LO", b"PID123", big=big)
        + ex(0x0020000D, b"UI", STUDY, big=big)
        + ex(0x0020000E, b"UI", SERIES, big=big)
    )


def head_im(sop: bytes = SOP_INSTANCE) -> bytes:
    return (
        im(0x00080016, SOP_CLASS)
        + im(0x00080018, _pad(sop, b"\0"))
        + im(0x00100020, b"PID123")
        + im(0x0020000D, STUDY)
        + im(0x0020000E, SERIES)
    )


def _pad(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def check(data: bytes, ts: str = EXPLICIT_LE) -> dict[int, str]:
    """Validate whole and in every small chunking: the result must not depend on where chunks split."""
    whole = _outcome(data, ts, 0)
    for chunk in (1, 2, 3, 7, 13):
        assert _outcome(data, ts, chunk) == whole, chunk
    if isinstance(whole, str):
        raise DatasetError(whole)
    return whole


def _outcome(data: bytes, ts: str, chunk: int):
    try:
        return validate(data, ts, chunk)
    except DatasetError as exc:
        return str(exc)


def fails(data: bytes, ts: str = EXPLICIT_LE) -> str:
    with pytest.raises(DatasetError) as info:
        check(data, ts)
    message = str(info.value)
    assert len(message) <= 64, message
    assert "PID123" not in message and "1.2.3.4" not in message
    return message


# ---------------------------------------------------------------- good datasets


def test_explicit_little_endian_gives_the_uids():
    uids = check(head_ex() + ex(0x7FE00010, b"OW", b"\1\2" * 8))
    assert uids == {
        0x00080016: SOP_CLASS[:-1].decode(),
        0x00080018: SOP_INSTANCE.decode(),
        0x0020000D: STUDY[:-1].decode(),
        0x0020000E: SERIES[:-1].decode(),
    }


def test_explicit_big_endian():
    assert len(check(head_ex(big=True) + ex(0x00280010, b"US", b"\0\x10", big=True), EXPLICIT_VR_BE)) == 4


def test_implicit_little_endian_with_a_defined_length_sequence_from_the_dictionary():
    nested = im(0x00081150, SOP_CLASS) + im(0x00081155, b"1.2.9\0")
    body = head_im() + im(0x00081140, item(nested))  # Referenced Image Sequence, defined length
    assert len(check(body, IMPLICIT_VR_LE)) == 4


def test_undefined_length_sequences_and_items_nested():
    inner = ex(0x00081199, b"SQ", item(ex(0x00081155, b"UI", b"1.2.9\0"), undefined=True) + seq_end(), length=UNDEF)
    outer = ex(0x00400275, b"SQ", item(inner, undefined=True) + item(b"") + seq_end(), length=UNDEF)
    check(head_ex() + outer + ex(0x00400280, b"ST", b"ok"))


def test_defined_length_sequence_in_explicit_and_big_endian():
    for big, ts in ((False, EXPLICIT_LE), (True, EXPLICIT_VR_BE)):
        body = ex(0x00081155, b"UI", b"1.2.9\0", big=big)
        sq = ex(0x00081140, b"SQ", item(body, big=big) + item(body, big=big), big=big)
        check(head_ex(big=big) + sq + ex(0x00280010, b"US", b"\0\1", big=big), ts)


def test_undefined_length_un_is_walked_as_implicit():
    body = item(im(0x00081155, b"1.2.9\0"), undefined=True) + seq_end()
    check(head_ex() + ex(0x00091010, b"UN", body, length=UNDEF))


def test_encapsulated_pixel_data():
    frags = item(b"") + item(b"\xff\xd8" * 50) + item(b"\xff\xd9\0\0") + seq_end()
    check(head_ex() + ex(0x7FE00010, b"OB", frags, length=UNDEF) + ex(0xFFFCFFFC, b"OB", b"\0\0"), JPEG_BASELINE)


def test_empty_values_and_empty_sequences():
    check(head_ex() + ex(0x00100010, b"PN") + ex(0x00081140, b"SQ") + ex(0x00081150, b"SQ", seq_end(), length=UNDEF))


def test_deflated_explicit_little_endian():
    raw = head_ex() + ex(0x7FE00010, b"OW", b"\0\0" * 5000)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    assert len(check(packer.compress(raw) + packer.flush(), DEFLATED_EXPLICIT_VR_LE)) == 4


def test_pydicom_written_datasets_pass(tmp_path):
    ds = Dataset()
    ds.SOPClassUID = SOP_CLASS[:-1].decode()
    ds.SOPInstanceUID = SOP_INSTANCE.decode()
    ds.StudyInstanceUID = STUDY[:-1].decode()
    ds.SeriesInstanceUID = SERIES[:-1].decode()
    ds.PatientName = "Doe^Jane"
    ref = Dataset()
    ref.ReferencedSOPInstanceUID = "1.2.9"
    ds.ReferencedImageSequence = [ref, ref]
    ds.BitsAllocated = 16
    ds.PixelData = b"\0\1" * 64
    for little, implicit, ts in (
        (True, False, EXPLICIT_LE),
        (True, True, IMPLICIT_VR_LE),
        (False, False, EXPLICIT_VR_BE),
    ):
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = little, implicit
        write_dataset(fp, ds)
        assert len(check(fp.getvalue(), ts)) == 4


def test_valid_uid_rules():
    assert valid_uid(b"1.2.840.10008.1.2\x00")
    assert valid_uid(b"0.0")
    assert valid_uid(b"1.2.3 ")
    for bad in (b"", b"1..2", b".1", b"1.", b"1.02", b"1.2a", b"1.2.3-4", b"1" * 65, b"\xff\xfe", b"1 .2"):
        assert not valid_uid(bad), bad


# ---------------------------------------------------------------- defects


def test_truncated_pixel_data():
    data = head_ex() + ex(0x7FE00010, b"OW", b"\0\0" * 100)
    assert fails(data[:-50]) == "element (7FE0,0010) value length 200 runs past end of dataset"


def test_truncated_encapsulated_pixel_data():
    data = head_ex() + ex(0x7FE00010, b"OB", item(b"") + item(b"\xff\xd8" * 50) + seq_end(), length=UNDEF)
    assert "(7FE0,0010)" in fails(data[:-8], JPEG_BASELINE)
    assert "past end of dataset" in fails(data[:-20], JPEG_BASELINE)


def test_truncated_inside_an_element_header():
    assert fails(head_ex() + ex(0x00100010, b"PN", b"AB")[:5]) == "dataset ends inside an element header"


def test_odd_value_length():
    assert fails(head_ex() + ex(0x00100010, b"PN", b"Doe^Jan")) == "element (0010,0010) has odd value length 7"
    assert "odd value length" in fails(head_im() + im(0x00100010, b"Doe^Jan"), IMPLICIT_VR_LE)


def test_length_running_past_the_end():
    data = head_ex() + ex(0x00100020, b"LO", b"ABCDEF", length=0x100)
    assert fails(data) == "element (0010,0020) value length 256 runs past end of dataset"


def test_element_running_past_its_item():
    body = ex(0x00081155, b"UI", b"1.2.9\0", length=40)
    assert "runs past its item" in fails(head_ex() + ex(0x00081140, b"SQ", item(body) + b"\0" * 40))


def test_unknown_vr():
    assert fails(head_ex() + ex(0x00100010, b"XZ", b"AB")) == "element (0010,0010) has unknown VR XZ"


def test_implicit_vr_data_on_an_explicit_context():
    assert fails(head_im(), EXPLICIT_LE) == "element (0008,0016): implicit VR data in explicit VR"
    assert "implicit VR data" in fails(head_ex() + im(0x00100010, b"Doe^Jane"))


def test_uid_element_sent_as_sequence():
    sq = ex(0x0020000D, b"SQ", item(ex(0x00081155, b"UI", b"1.2.9\0")))
    assert fails(ex(0x00080016, b"UI", SOP_CLASS) + sq) == "element (0020,000D) is a sequence, not a UID"
    undefined = ex(0x00080018, b"SQ", item(b"") + seq_end(), length=UNDEF)
    assert fails(ex(0x00080016, b"UI", SOP_CLASS) + undefined) == "element (0008,0018) is a sequence, not a UID"
    assert "not a UID" in fails(
        im(0x00080016, SOP_CLASS) + im(0x00080018, b"", length=UNDEF) + item(b"") + seq_end(), IMPLICIT_VR_LE
    )


def test_uid_with_non_uid_characters():
    assert fails(head_ex(sop=b"1.2.3.PID123")) == "element (0008,0018) is not a valid UID"
    assert fails(head_im(sop=b"1.2.03"), IMPLICIT_VR_LE) == "element (0008,0018) is not a valid UID"
    assert "too long" in fails(head_ex(sop=b"1." * 40))
    assert "has VR LO, not UI" in fails(ex(0x00080018, b"LO", b"1.2.3\0"))


def test_group_0002_inside_the_dataset():
    data = head_ex() + ex(0x00020010, b"UI", b"1.2.840.10008.1.2\0")
    assert fails(data) == "group 0002 element (0002,0010) inside the dataset"
    item_with = ex(0x00081140, b"SQ", item(ex(0x00020003, b"UI", b"1.2.9\0")))
    assert "group 0002" in fails(head_ex() + item_with)


def test_stray_delimiters_and_foreign_elements_in_sequences():
    assert "out of place" in fails(head_ex() + seq_end())
    assert "where an item belongs" in fails(head_ex() + ex(0x00081140, b"SQ", ex(0x00100010, b"PN", b"AB")))
    assert "not closed" in fails(head_ex() + ex(0x00081140, b"SQ", item(b"", undefined=True), length=UNDEF))
    assert "undefined length" in fails(head_ex() + ex(0x00204000, b"UT", b"", length=UNDEF))


def test_nesting_is_bounded():
    body = ex(0x00100010, b"PN", b"AB")
    for _ in range(MAX_DEPTH + 1):
        body = ex(0x00081140, b"SQ", item(body, undefined=True) + seq_end(), length=UNDEF)
    assert "nested deeper" in fails(head_ex() + body)
    shallow = ex(0x00100010, b"PN", b"AB")
    for _ in range(MAX_DEPTH - 1):
        shallow = ex(0x00081140, b"SQ", item(shallow, undefined=True) + seq_end(), length=UNDEF)
    check(head_ex() + shallow)


def test_empty_dataset_and_bad_deflate():
    assert fails(b"") == "no dataset elements"
    assert fails(b"not deflate at all", DEFLATED_EXPLICIT_VR_LE).startswith("deflated dataset")


def test_the_first_error_stays_and_later_chunks_are_ignored():
    v = DatasetValidator(EXPLICIT_LE)
    v.feed(head_ex() + ex(0x00100010, b"XZ", b"AB"))
    first = v.error
    v.feed(b"\xff" * 1000)
    assert v.error is first
    with pytest.raises(DatasetError):
        v.finish()


def test_large_values_are_counted_past_not_buffered():
    v = DatasetValidator(EXPLICIT_LE)
    v.feed(head_ex() + ex(0x7FE00010, b"OW", b"", length=64 * 2**20))
    chunk = bytes(1 << 20)
    for _ in range(64):
        v.feed(chunk)
        assert len(v._buf) == 0
    assert len(v.finish()) == 4


def test_any_pydicom_error_in_the_header_read_is_not_dicom_and_quotes_no_value(tmp_path, monkeypatch):
    import pydicom

    import shared.dicomfile as dicomfile

    path = tmp_path / "x.dcm"
    path.write_bytes(b"\0" * 132)

    def broken(*args, **kwargs):
        raise KeyError("PID123 Doe^Jane")  # as pydicom may: the value in the message

    monkeypatch.setattr(pydicom, "dcmread", broken)  # the module dicomfile calls
    with pytest.raises(dicomfile.NotDicom) as info:
        dicomfile.read_header(path)
    assert str(info.value) == "KeyError"
