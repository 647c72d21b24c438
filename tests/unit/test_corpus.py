"""The demo corpus: synthetic studies are well-formed and reproducible; bundled files are storable."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import AllTransferSyntaxes, CTImageStorage, MRImageStorage
from pynetdicom import ALL_TRANSFER_SYNTAXES, StoragePresentationContexts

from switchyard.corpus import bundled_test_files, corpus_index, generate_studies, main

STUDIES, SERIES, INSTANCES = 3, 2, 5


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> list[Path]:
    return generate_studies(
        tmp_path_factory.mktemp("gen"),
        studies=STUDIES,
        series_per_study=SERIES,
        instances_per_series=INSTANCES,
        seed=7,
        rows=16,
        cols=8,
    )


@pytest.fixture(scope="module")
def bundled(tmp_path_factory) -> list[Path]:
    return bundled_test_files(tmp_path_factory.mktemp("bundled"))


def _read(path: Path, pixels: bool = False) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=not pixels)


def _uids(paths: list[Path], keyword: str) -> set[str]:
    return {str(getattr(_read(p), keyword)) for p in paths}


def test_generated_files_are_readable_part10(generated):
    assert len(generated) == STUDIES * SERIES * INSTANCES
    for path in generated:
        raw = path.read_bytes()
        assert raw[128:132] == b"DICM"
        ds = _read(path, pixels=True)
        meta = ds.file_meta
        assert meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert meta.ImplementationClassUID
        for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID):
            assert uid.is_valid and uid.startswith("2.25."), uid
            assert int(uid.removeprefix("2.25.")) < 2**128, uid
        assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.SamplesPerPixel) == (16, 8, 16, 1)
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert len(ds.PixelData) == 16 * 8 * 2
        for keyword in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "AccessionNumber",
            "StudyDate",
            "StudyDescription",
            "SeriesNumber",
            "InstanceNumber",
            "Modality",
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "FrameOfReferenceUID",
        ):
            assert ds.get(keyword) not in (None, ""), keyword
        assert str(ds.PatientName).startswith("DEMO^") and ds.PatientID.startswith("DEMO")
        relative = path.relative_to(path.parents[2])
        assert relative.parts[2] == f"{ds.InstanceNumber - 1}.dcm"
        assert relative.parts[1] == str(ds.SeriesNumber - 1)


def test_generated_counts_per_study_and_series(generated):
    per_study = Counter(str(_read(p).StudyInstanceUID) for p in generated)
    assert len(per_study) == STUDIES
    assert set(per_study.values()) == {SERIES * INSTANCES}
    per_series = Counter(str(_read(p).SeriesInstanceUID) for p in generated)
    assert len(per_series) == STUDIES * SERIES
    assert set(per_series.values()) == {INSTANCES}
    series_of_study: dict[str, set[str]] = {}
    for p in generated:
        ds = _read(p)
        series_of_study.setdefault(str(ds.StudyInstanceUID), set()).add(str(ds.SeriesInstanceUID))
    assert all(len(s) == SERIES for s in series_of_study.values())


def test_generated_modalities_alternate_by_study(generated):
    by_dir: dict[int, set[tuple[str, str]]] = {}
    for p in generated:
        ds = _read(p)
        by_dir.setdefault(int(p.parents[1].name), set()).add((ds.Modality, ds.SOPClassUID))
    assert by_dir == {i: {("CT", CTImageStorage) if i % 2 == 0 else ("MR", MRImageStorage)} for i in range(STUDIES)}


def test_generated_sop_instance_uids_unique(generated):
    sops = [str(_read(p).SOPInstanceUID) for p in generated]
    assert len(set(sops)) == len(sops)


def test_same_seed_gives_byte_identical_files(generated, tmp_path):
    again = generate_studies(
        tmp_path, studies=STUDIES, series_per_study=SERIES, instances_per_series=INSTANCES, seed=7, rows=16, cols=8
    )
    assert [p.relative_to(tmp_path) for p in again] == [p.relative_to(p.parents[2]) for p in generated]
    for a, b in zip(generated, again, strict=True):
        assert a.read_bytes() == b.read_bytes(), a


def test_different_seed_gives_disjoint_uids(generated, tmp_path):
    other = generate_studies(
        tmp_path, studies=STUDIES, series_per_study=SERIES, instances_per_series=INSTANCES, seed=8, rows=16, cols=8
    )
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        assert not _uids(generated, keyword) & _uids(other, keyword), keyword
    assert generated[0].read_bytes() != other[0].read_bytes()


def test_bundled_files_are_many_and_unique(bundled):
    assert len(bundled) >= 20
    assert bundled == sorted(bundled)
    assert all(p.is_file() for p in bundled)
    sops = [str(_read(p).SOPInstanceUID) for p in bundled]
    assert len(set(sops)) == len(sops)


def test_bundled_files_pass_every_filter(bundled):
    storage = {cx.abstract_syntax for cx in StoragePresentationContexts}
    syntaxes = set(ALL_TRANSFER_SYNTAXES) & set(AllTransferSyntaxes)
    for path in bundled:
        name = path.name.lower()
        assert not any(m in name for m in ("bad", "invalid", "no_meta", "nofile", "empty")), path
        assert path.stat().st_size < 20 * 1024 * 1024, path
        ds = _read(path)
        meta = ds.file_meta
        for keyword in ("TransferSyntaxUID", "MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID"):
            assert meta.get(keyword), (path, keyword)
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"):
            assert ds.get(keyword), (path, keyword)
        ts = meta.TransferSyntaxUID
        assert ts != "1.2.840.10008.1.2.1.99", path
        assert ts in syntaxes, path
        # DCMTK storescu sends only what it needn't decompress (see the storescp integration test).
        assert not ts.is_compressed, path
        assert ds.SOPClassUID in storage, path
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID, path


def test_bundled_copies_are_byte_identical_to_pydicom_files(bundled):
    from pydicom.data import get_testdata_files

    sources: dict[str, Path] = {}
    for s in sorted(Path(p) for p in get_testdata_files()):
        sources.setdefault(s.name, s)
    for path in bundled:
        assert path.read_bytes() == sources[path.name].read_bytes(), path


def test_corpus_index_groups_by_study(generated, bundled):
    index = corpus_index(generated + bundled)
    expected: dict[str, set[str]] = {}
    for p in generated + bundled:
        ds = _read(p)
        expected.setdefault(str(ds.StudyInstanceUID), set()).add(str(ds.SOPInstanceUID))
    assert {k: set(v) for k, v in index.items()} == expected
    assert all(v == sorted(v) for v in index.values())
    assert sum(map(len, index.values())) == len(generated) + len(bundled)
    generated_studies = _uids(generated, "StudyInstanceUID")
    assert all(len(index[s]) == SERIES * INSTANCES for s in generated_studies)


def test_main_prints_counts_not_patient_data(tmp_path, capsys):
    assert main([str(tmp_path), "--studies", "2", "--series", "1", "--instances", "3", "--no-bundled"]) == 0
    out = capsys.readouterr().out
    assert "DEMO" not in out
    lines = out.strip().splitlines()
    assert len(lines) == 3
    assert all(line.split()[1] == "3" for line in lines[:2])
    assert len(list((tmp_path / "generated").rglob("*.dcm"))) == 6
    assert not (tmp_path / "pydicom").exists()
