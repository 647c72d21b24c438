"""The demo and test corpus: synthetic multi-series studies plus pydicom's own test files.

Synthetic studies give known counts and UIDs that change with the seed, so a
demo can be sent again without colliding with what a node already holds.
pydicom's bundled files add real-world variety (vendors, byte orders, VR encodings,
SOP classes) that a router must pass through untouched.

Run as ``python -m switchyard.corpus DEST`` to write a corpus to disk.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import uuid
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    AllTransferSyntaxes,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
)
from pynetdicom import ALL_TRANSFER_SYNTAXES, StoragePresentationContexts

# Bundled files bigger than this only slow the demo down.
MAX_BUNDLED_BYTES = 20 * 1024 * 1024

# pydicom names its deliberately broken files with these words.
BROKEN_NAME_MARKERS = ("bad", "invalid", "no_meta", "nofile", "empty")

# DCMTK storescu (the demo's sender, even with -R) proposes only uncompressed
# transfer syntaxes unless given a config profile, and Debian's build cannot
# decompress JPEG, JPEG 2000 or RLE on the fly: such files fail with "DIMSE
# Failed to send message". tests/integration/test_corpus_storescp.py checks this.
SENDABLE_TRANSFER_SYNTAXES = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian})

_UID_NAMESPACE = "switchyard-demo-corpus"


def _uid(seed: int, *parts: object) -> str:
    """A 2.25 UID that depends only on the seed and the position in the corpus.

    generate_uid(prefix=None) ignores entropy_srcs and is random, so build the
    2.25 form (decimal of a UUID, PS3.5 B.2) from a name-based UUID5 instead.
    """
    name = ":".join([_UID_NAMESPACE, str(seed), *map(str, parts)])
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


def _instance(
    *, seed: int, study: int, series: int, instance: int, rows: int, cols: int, uids: dict[str, str]
) -> Dataset:
    """One CT or MR image with every identifying tag a router looks at, all obviously fake."""
    is_ct = study % 2 == 0
    study_rng = random.Random(f"{_UID_NAMESPACE}:{seed}:{study}")
    day = study_rng.randrange(1, 29)
    birth_year = study_rng.randrange(1930, 2000)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage if is_ct else MRImageStorage
    meta.MediaStorageSOPInstanceUID = UID(_uid(seed, "instance", study, series, instance))
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "SWITCHYARD_DEMO"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = f"2024{study % 12 + 1:02d}{day:02d}"
    ds.StudyTime = ds.SeriesTime = f"{8 + study % 10:02d}{series:02d}00"
    ds.ContentTime = f"{8 + study % 10:02d}{series:02d}{instance % 60:02d}"
    ds.AccessionNumber = f"DEMOACC{seed % 100000:05d}{study + 1:03d}"
    ds.Modality = "CT" if is_ct else "MR"
    ds.Manufacturer = "SWITCHYARD DEMO"
    ds.InstitutionName = "DEMO HOSPITAL"
    ds.ReferringPhysicianName = "DEMO^REFERRER"
    ds.StudyDescription = f"DEMO {'CT' if is_ct else 'MR'} STUDY {study + 1}"
    ds.SeriesDescription = f"DEMO SERIES {series + 1}"
    ds.PatientName = f"DEMO^PATIENT{study + 1:02d}"
    ds.PatientID = f"DEMO{study + 1:02d}"
    ds.PatientBirthDate = f"{birth_year}0101"
    ds.PatientSex = "O"
    ds.SliceThickness = "5"
    if is_ct:
        ds.KVP = "120"
    else:
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = "500"
        ds.EchoTime = "15"
        ds.EchoTrainLength = "1"
        ds.MagneticFieldStrength = "1.5"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.StudyID = f"{study + 1}"
    ds.SeriesNumber = series + 1
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance + 1
    ds.ImagePositionPatient = [0, 0, 5 * instance]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [1, 1]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if is_ct:
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
    pixel_rng = random.Random(f"{_UID_NAMESPACE}:{seed}:{study}:{series}:{instance}")
    ds.PixelData = pixel_rng.randbytes(rows * cols * 2)
    return ds


def generate_studies(
    dest: Path,
    studies: int = 4,
    series_per_study: int = 3,
    instances_per_series: int = 4,
    seed: int = 0,
    rows: int = 64,
    cols: int = 64,
) -> list[Path]:
    """Write synthetic CT/MR studies as DICOM Part 10 files under dest/<study>/<series>/<n>.dcm.

    Everything is derived from ``seed``: the same seed writes byte-identical
    files, another seed writes new UIDs, so repeated demos are new studies.
    """
    dest = Path(dest)
    written: list[Path] = []
    for study in range(studies):
        study_uid = _uid(seed, "study", study)
        frame_uid = _uid(seed, "frame", study)
        for series in range(series_per_study):
            uids = {"study": study_uid, "frame": frame_uid, "series": _uid(seed, "series", study, series)}
            series_dir = dest / str(study) / str(series)
            series_dir.mkdir(parents=True, exist_ok=True)
            for instance in range(instances_per_series):
                ds = _instance(
                    seed=seed, study=study, series=series, instance=instance, rows=rows, cols=cols, uids=uids
                )
                path = series_dir / f"{instance}.dcm"
                ds.save_as(path, enforce_file_format=True)
                written.append(path)
    return written


_STORAGE_SOP_CLASSES = frozenset(cx.abstract_syntax for cx in StoragePresentationContexts)
_TRANSFER_SYNTAXES = frozenset(ALL_TRANSFER_SYNTAXES) & frozenset(AllTransferSyntaxes) & SENDABLE_TRANSFER_SYNTAXES


def _storable_sop_instance(path: Path, any_transfer_syntax: bool = False) -> str | None:
    """The SOP Instance UID if a Storage SCP could take the file as it is, else None.

    The SOP class must be one our ingest SCP offers (pynetdicom's
    StoragePresentationContexts) and the transfer syntax one it accepts and
    DCMTK storescu sends unchanged (see SENDABLE_TRANSFER_SYNTAXES); deflated
    files are left out anyway, DCMTK and Orthanc builds vary in support.
    """
    name = path.name.lower()
    if not any_transfer_syntax and any(marker in name for marker in BROKEN_NAME_MARKERS):
        return None
    try:
        if path.stat().st_size >= MAX_BUNDLED_BYTES:
            return None
        with warnings.catch_warnings():
            # Some candidates are deliberately malformed; they are judged below, not reported.
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError, NotImplementedError):
        return None
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        return None
    ts = str(meta.get("TransferSyntaxUID", "") or "")
    media_class = str(meta.get("MediaStorageSOPClassUID", "") or "")
    media_instance = str(meta.get("MediaStorageSOPInstanceUID", "") or "")
    sop_class = str(ds.get("SOPClassUID", "") or "")
    sop_instance = str(ds.get("SOPInstanceUID", "") or "")
    study = str(ds.get("StudyInstanceUID", "") or "")
    if not (ts and media_class and media_instance and sop_class and sop_instance and study):
        return None
    if not any_transfer_syntax and (ts == DeflatedExplicitVRLittleEndian or ts not in _TRANSFER_SYNTAXES):
        return None
    if sop_class not in _STORAGE_SOP_CLASSES or media_instance != sop_instance:
        return None
    return sop_instance


def bundled_test_files(dest: Path, any_transfer_syntax: bool = False) -> list[Path]:
    """Copy the pydicom test files a Storage SCP can store into dest; return their new paths.

    By default only files DCMTK storescu sends unchanged (uncompressed, see
    SENDABLE_TRANSFER_SYNTAXES) and none named as broken: the demo's corpus.
    ``any_transfer_syntax`` takes every readable file whatever its encoding
    (ingest's byte-identity test sends those that storescu cannot with pynetdicom).

    Files are taken in sorted path order and a SOP Instance UID already taken
    is skipped: a router keys instances by that UID, so duplicates would make
    counts in the demo ambiguous.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    names: set[str] = set()
    copied: list[Path] = []
    for source in sorted(Path(p) for p in get_testdata_files()):
        if not source.is_file():
            continue
        uid = _storable_sop_instance(source, any_transfer_syntax)
        if uid is None or uid in seen or source.name in names:
            continue
        seen.add(uid)
        names.add(source.name)
        target = dest / source.name
        shutil.copyfile(source, target)
        copied.append(target)
    return sorted(copied)


def corpus_index(paths: Iterable[Path]) -> dict[str, list[str]]:
    """StudyInstanceUID -> sorted SOP Instance UIDs: what a node should hold once all is routed."""
    index: dict[str, list[str]] = {}
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SOPInstanceUID"])
        index.setdefault(str(ds.StudyInstanceUID), []).append(str(ds.SOPInstanceUID))
    return {study: sorted(sops) for study, sops in sorted(index.items())}


def main(argv: Sequence[str] | None = None) -> int:
    """Write a corpus to DEST/generated (and DEST/pydicom); print UIDs and counts, no patient data."""
    p = argparse.ArgumentParser(prog="python -m switchyard.corpus", description=main.__doc__)
    p.add_argument("dest", type=Path)
    p.add_argument("--studies", type=int, default=4)
    p.add_argument("--series", dest="series_per_study", type=int, default=3)
    p.add_argument("--instances", dest="instances_per_series", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--cols", type=int, default=64)
    p.add_argument("--no-bundled", action="store_true", help="leave out pydicom's test files")
    args = p.parse_args(argv)

    files = generate_studies(
        args.dest / "generated",
        studies=args.studies,
        series_per_study=args.series_per_study,
        instances_per_series=args.instances_per_series,
        seed=args.seed,
        rows=args.rows,
        cols=args.cols,
    )
    if not args.no_bundled:
        files += bundled_test_files(args.dest / "pydicom")
    index = corpus_index(files)
    for study, sops in index.items():
        print(f"{study} {len(sops)}")
    print(f"{len(files)} files in {len(index)} studies under {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
