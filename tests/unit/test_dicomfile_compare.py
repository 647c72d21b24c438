"""Semantic dataset comparison (shared.dicomfile.dataset_difference): encoding is not content."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian

from shared.dicomfile import NotDicom, dataset_bytes_digest, dataset_difference


def read(name: str) -> bytes:
    with open(str(get_testdata_file(name)), "rb") as f:
        return f.read()


def saved(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_deflated_file_reencoded_explicit_le_is_equal():
    dfl = read("image_dfl.dcm")
    ds = pydicom.dcmread(io.BytesIO(dfl))
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    plain = saved(ds)
    assert dataset_bytes_digest(dfl) != dataset_bytes_digest(plain)
    assert dataset_difference(dfl, plain) == ""


def test_byte_order_and_trailing_padding_are_encoding():
    assert dataset_difference(read("MR_small.dcm"), read("MR_small_bigendian.dcm")) == ""


def test_group_lengths_are_ignored():
    ds = pydicom.dcmread(io.BytesIO(read("MR_small.dcm")))
    ds.add_new(0x00080000, "UL", 1234)
    assert dataset_difference(read("MR_small.dcm"), saved(ds)) == ""


def test_a_changed_value_or_pixel_is_named_by_tag_only():
    original = read("MR_small.dcm")
    ds = pydicom.dcmread(io.BytesIO(original))
    ds.PatientID = "SOMEONE-ELSE"
    diff = dataset_difference(original, saved(ds))
    assert diff == "(0010,0020)" and "SOMEONE" not in diff
    ds = pydicom.dcmread(io.BytesIO(original))
    pixels = bytearray(ds.PixelData)
    pixels[10] ^= 1
    ds.PixelData = bytes(pixels)
    assert dataset_difference(original, saved(ds)) == "(7FE0,0010)"


def test_a_sequence_item_difference_is_found():
    original = read("rtplan.dcm")
    ds = pydicom.dcmread(io.BytesIO(original))
    ds.BeamSequence[0].BeamName = "other"
    assert dataset_difference(original, saved(ds)).startswith("(300A,00B0)[0].")


def test_undecodable_bytes_are_not_dicom():
    with pytest.raises(NotDicom):
        dataset_difference(b"\0" * 200, read("MR_small.dcm"))
