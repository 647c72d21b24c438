"""C-FIND answers name where the instances are (RetrieveAETitle) and keep names in the query's character set.

Byte-level: DCMTK findscu writes each answer as received (-X), and the raw bytes are checked.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import pydicom
import pytest

from switchyard import stack as ls
from switchyard.corpus import generate_studies
from tests.fixtures.qr import dcmtk
from tests.fixtures.util import wait_for

pytestmark = pytest.mark.integration

LATIN = "Müller^Jürgen"  # fits ISO_IR 100
CYRILLIC = "Иванов^Пётр"  # does not


def study_named(root: Path, seed: int, name: str) -> tuple[str, list[Path]]:
    files = generate_studies(root, studies=1, series_per_study=1, instances_per_series=2, seed=seed)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = name
        ds.save_as(f)
    return str(pydicom.dcmread(files[0]).StudyInstanceUID), files


def raw_answers(stack, out: Path, *keys: str) -> list[bytes]:
    out.mkdir(parents=True)
    args = ["-S", "-X", "-od", str(out)]
    for k in keys:
        args += ["-k", k]
    result = dcmtk(stack, "findscu", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return [p.read_bytes() for p in sorted(out.glob("rsp*.dcm"))]


@pytest.fixture(scope="module")
def named(stack, tmp_path_factory):
    """Two studies with non-ASCII names, sent through Switchyard and held by a node."""
    root = tmp_path_factory.mktemp("charset")
    latin = study_named(root / "latin", 7301, LATIN)
    cyrillic = study_named(root / "cyrillic", 7302, CYRILLIC)
    assert stack.send([root], extra=["+sd", "+r"]).returncode == 0
    probe = tmp_path_factory.mktemp("charset-ready")

    def held(study_uid: str) -> bool:
        """The front door knows the study and a node holds it (forwarded)."""
        answers = raw_answers(
            stack,
            probe / f"q{len(list(probe.iterdir()))}",
            "QueryRetrieveLevel=STUDY",
            f"StudyInstanceUID={study_uid}",
            "RetrieveAETitle",
        )
        return len(answers) == 1 and any(f"NODE{i}".encode() in answers[0] for i in (1, 2, 3))

    for study_uid, _ in (latin, cyrillic):
        wait_for(functools.partial(held, study_uid), timeout=90, what="the study held by a node")
    return latin, cyrillic


def _answer(stack, tmp_path: Path, study_uid: str, *keys: str) -> tuple[bytes, pydicom.Dataset]:
    (raw,) = raw_answers(
        stack,
        tmp_path / "q",
        "QueryRetrieveLevel=STUDY",
        f"StudyInstanceUID={study_uid}",
        "PatientName",
        "RetrieveAETitle",
        *keys,
    )
    return raw, pydicom.dcmread(pydicom.filebase.DicomBytesIO(raw), force=True)


def test_retrieve_ae_title_names_this_scp_and_the_node_holding_the_study(stack, named, tmp_path):
    (study_uid, _), _ = named
    _, ds = _answer(stack, tmp_path, study_uid)
    aes = list(ds.RetrieveAETitle) if ds["RetrieveAETitle"].VM > 1 else [ds.RetrieveAETitle]
    assert aes[0] == stack.cfg.probe.qr_ae_title
    holders = [n.ae_title for n in stack.cfg.nodes if n.ae_title in aes]
    assert len(holders) == 1, aes  # one node holds a study (placement keeps it together)


@pytest.mark.parametrize(
    ("charset", "codec"), [("ISO_IR 100", "latin-1"), ("ISO_IR 192", "utf-8")], ids=["latin1", "utf8"]
)
def test_names_come_back_in_the_query_character_set(stack, named, tmp_path, charset, codec):
    (study_uid, _), _ = named
    raw, ds = _answer(stack, tmp_path, study_uid, f"SpecificCharacterSet={charset}")
    assert LATIN.encode(codec) in raw, raw
    assert b"M?ller" not in raw
    assert ds.SpecificCharacterSet == charset
    assert str(ds.PatientName) == LATIN


def test_a_name_the_query_charset_cannot_hold_comes_back_in_utf8_not_as_question_marks(stack, named, tmp_path):
    _, (study_uid, _) = named
    for i, keys in enumerate((("SpecificCharacterSet=ISO_IR 100",), ())):
        raw, ds = _answer(stack, tmp_path / str(i), study_uid, *keys)
        assert CYRILLIC.encode("utf-8") in raw and b"???" not in raw, raw
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert str(ds.PatientName) == CYRILLIC


def test_a_query_in_latin1_matches_a_latin1_name(stack, named, tmp_path):
    (study_uid, _), _ = named
    out = tmp_path / "match"
    out.mkdir()
    # findscu sends the key's bytes as given: write the query as a file, encoded in Latin-1.
    query = pydicom.Dataset()
    query.SpecificCharacterSet = "ISO_IR 100"
    query.QueryRetrieveLevel = "STUDY"
    query.PatientName = "Müller*"
    query.StudyInstanceUID = ""
    qfile = tmp_path / "query.dcm"
    query.save_as(qfile, implicit_vr=True, little_endian=True)
    p = stack.cfg.probe
    argv = [str(ls.DCMTK_BIN / "findscu"), "-aet", "TESTSCU", "-aec", p.qr_ae_title, "-S", "-X", "-od", str(out)]
    result = subprocess.run(
        [*argv, "127.0.0.1", str(p.qr_port), str(qfile)], env=ls.dicom_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert qfile.read_bytes().count("Müller".encode("latin-1")) == 1
    uids = [str(pydicom.dcmread(p).StudyInstanceUID) for p in sorted(out.glob("rsp*.dcm"))]
    assert study_uid in uids


def test_nothing_leaks_into_the_probe_log(stack, named):
    log = stack.log("probe")
    for name in (LATIN, CYRILLIC):
        for part in name.split("^"):
            assert part not in log
