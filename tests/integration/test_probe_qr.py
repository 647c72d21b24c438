"""The probe's PACS front door on the wire: DCMTK findscu, movescu (to storescp) and getscu."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import msgspec
import pydicom
import pytest

from switchyard import stack as ls
from switchyard.corpus import corpus_index, generate_studies
from tests.fixtures.qr import dcmtk, find, identical, refused
from tests.fixtures.util import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def corpus(stack, orthanc_nodes, tmp_path_factory):
    """Two studies sent through Switchyard; ready when the front door answers for them."""
    root = tmp_path_factory.mktemp("qr-corpus")
    files = generate_studies(root, studies=2, series_per_study=2, instances_per_series=2, seed=5201)
    assert stack.send([root], extra=["+sd", "+r"]).returncode == 0
    index = corpus_index(files)
    headers = {f: pydicom.dcmread(f, stop_before_pixels=True) for f in files}
    acc = {str(h.StudyInstanceUID): str(h.AccessionNumber) for h in headers.values()}
    tmp = tmp_path_factory.mktemp("qr-ready")

    def known(study_uid: str) -> bool:
        keys = {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": study_uid, "SOPInstanceUID": ""}
        return len(find(stack, tmp, "-S", keys)) == 4

    for study_uid in index:
        wait_for(functools.partial(known, study_uid), timeout=60, what="front door knows the study")
    return files, index, headers, acc


def test_find_at_every_level_in_both_models(stack, corpus, tmp_path):
    files, index, headers, acc = corpus
    study_uid = next(iter(index))
    h = next(v for v in headers.values() if str(v.StudyInstanceUID) == study_uid)

    studies = find(
        stack,
        tmp_path,
        "-S",
        {
            "QueryRetrieveLevel": "STUDY",
            "PatientName": str(h.PatientName)[:-1] + "*",
            "AccessionNumber": acc[study_uid],
            "StudyInstanceUID": "",
            "StudyDate": "",
            "ModalitiesInStudy": "",
            "NumberOfStudyRelatedInstances": "",
            "StudyDescription": "",
            "ReferringPhysicianName": "",
        },
    )
    assert len(studies) == 1
    s = studies[0]
    assert (s.StudyInstanceUID, s.StudyDate, s.ModalitiesInStudy) == (study_uid, h.StudyDate, h.Modality)
    assert int(s.NumberOfStudyRelatedInstances) == 4
    assert s.StudyDescription == h.StudyDescription
    assert "ReferringPhysicianName" in s and not s.ReferringPhysicianName  # asked, unknown: empty

    # Date ranges, inclusive and open-ended.
    day = str(h.StudyDate)
    for rng, hit in ((f"{day}-{day}", True), (f"-{day}", True), (f"{day}-", True), (f"{int(day) + 1}-", False)):
        got = find(
            stack,
            tmp_path,
            "-S",
            {
                "QueryRetrieveLevel": "STUDY",
                "StudyDate": rng,
                "AccessionNumber": acc[study_uid],
                "StudyInstanceUID": "",
            },
        )
        assert [str(x.StudyInstanceUID) for x in got] == ([study_uid] if hit else []), rng

    patients = find(
        stack,
        tmp_path,
        "-P",
        {"QueryRetrieveLevel": "PATIENT", "PatientID": str(h.PatientID), "PatientName": "", "PatientBirthDate": ""},
    )
    assert [(str(p.PatientID), str(p.PatientName)) for p in patients] == [(h.PatientID, str(h.PatientName))]

    p_studies = find(
        stack,
        tmp_path,
        "-P",
        {
            "QueryRetrieveLevel": "STUDY",
            "PatientID": str(h.PatientID),
            "StudyInstanceUID": study_uid,
            "AccessionNumber": "",
        },
    )
    assert [str(x.AccessionNumber) for x in p_studies] == [acc[study_uid]]

    series = find(
        stack,
        tmp_path,
        "-S",
        {
            "QueryRetrieveLevel": "SERIES",
            "StudyInstanceUID": study_uid,
            "SeriesInstanceUID": "",
            "Modality": h.Modality,
            "SeriesNumber": "",
        },
    )
    expected_series = sorted(
        {str(v.SeriesInstanceUID) for v in headers.values() if str(v.StudyInstanceUID) == study_uid}
    )
    assert sorted(str(x.SeriesInstanceUID) for x in series) == expected_series
    assert all(x.Modality == h.Modality for x in series)
    assert (
        find(
            stack,
            tmp_path,
            "-S",
            {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": study_uid, "Modality": "XA", "SeriesInstanceUID": ""},
        )
        == []
    )

    images = find(
        stack,
        tmp_path,
        "-S",
        {
            "QueryRetrieveLevel": "IMAGE",
            "StudyInstanceUID": study_uid,
            "SeriesInstanceUID": expected_series[0],
            "SOPInstanceUID": "",
            "SOPClassUID": "",
            "InstanceNumber": "",
        },
    )
    expected_sops = sorted(
        str(v.SOPInstanceUID) for v in headers.values() if str(v.SeriesInstanceUID) == expected_series[0]
    )
    assert sorted(str(x.SOPInstanceUID) for x in images) == expected_sops
    assert all(x.SOPClassUID == h.SOPClassUID for x in images)
    # A UID list matches each listed instance.
    listed = find(stack, tmp_path, "-S", {"QueryRetrieveLevel": "IMAGE", "SOPInstanceUID": "\\".join(expected_sops)})
    assert sorted(str(x.SOPInstanceUID) for x in listed) == expected_sops


def test_bad_queries_get_a_failure_status_and_the_scp_keeps_answering(stack, corpus, tmp_path):
    files, index, headers, acc = corpus
    bad_level = dcmtk(stack, "findscu", "-S", "-v", "-k", "QueryRetrieveLevel=FOO", "-k", "PatientID=")
    assert refused(bad_level, 0xA900, "DataSetDoesNotMatchSOPClass")
    # PATIENT level does not exist in the Study Root model.
    no_patients = dcmtk(stack, "findscu", "-S", "-v", "-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID=")
    assert refused(no_patients, 0xA900, "DataSetDoesNotMatchSOPClass")
    # An information model the front door does not offer: the association carries no context for it.
    worklist = dcmtk(stack, "findscu", "-W", "-k", "PatientID=")
    assert worklist.returncode != 0
    assert "presentation context" in (worklist.stdout + worklist.stderr).lower()
    bad_get = dcmtk(stack, "getscu", "-S", "-v", "-od", str(tmp_path), "-k", "QueryRetrieveLevel=FOO")
    assert refused(bad_get, 0xA900, "DataSetDoesNotMatchSOPClass")
    assert not list(tmp_path.glob("*.dcm*"))
    study_uid = next(iter(index))
    assert len(find(stack, tmp_path, "-S", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study_uid})) == 1


def test_get_returns_the_study_byte_identical(stack, corpus, tmp_path):
    files, index, headers, acc = corpus
    study_uid = list(index)[1]
    out = tmp_path / "get"
    out.mkdir()
    result = dcmtk(
        stack, "getscu", "-S", "-od", str(out), "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}"
    )
    assert result.returncode == 0, result.stderr
    originals = [f for f, h in headers.items() if str(h.StudyInstanceUID) == study_uid]
    assert identical(sorted(out.iterdir()), originals)


def test_move_to_a_known_destination_and_refuse_an_unknown_one(stack, corpus, storescp, tmp_path):
    files, index, headers, acc = corpus
    stack.cfg = msgspec.structs.replace(
        stack.cfg,
        probe=msgspec.structs.replace(
            stack.cfg.probe, move_destinations=[f"{storescp.ae_title}@127.0.0.1:{storescp.port}"]
        ),
    )
    ls.write_config(stack.cfg, stack.config_path)
    stack.stop("probe")
    stack.start("probe")

    study_uid = list(index)[0]
    h = next(h for h in headers.values() if str(h.StudyInstanceUID) == study_uid)
    series_uid = str(h.SeriesInstanceUID)
    result = dcmtk(
        stack,
        "movescu",
        "-P",
        "-aem",
        storescp.ae_title,
        "-k",
        "QueryRetrieveLevel=SERIES",
        "-k",
        f"PatientID={h.PatientID}",
        "-k",
        f"StudyInstanceUID={study_uid}",
        "-k",
        f"SeriesInstanceUID={series_uid}",
    )
    assert result.returncode == 0, result.stderr
    originals = [f for f, h in headers.items() if str(h.SeriesInstanceUID) == series_uid]
    wait_for(lambda: len(storescp.received()) == len(originals), timeout=20, what="storescp got the series")
    assert identical(storescp.received(), originals)

    unknown = dcmtk(
        stack,
        "movescu",
        "-S",
        "-v",
        "-aem",
        "NOWHERE",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study_uid}",
    )
    assert refused(unknown, 0xA801, "MoveDestinationUnknown")
    assert len(storescp.received()) == len(originals)


async def test_a_missing_blob_fails_only_its_own_sub_operation(stack, corpus, tmp_path):
    files, index, headers, acc = corpus
    study_uid = list(index)[1]
    lost_sop = index[study_uid][0]
    (received,) = [e for e in await stack.received_events() if e.sop_instance_uid == lost_sop]
    blob = Path(stack.cfg.blobs.path) / received.blob_key
    aside = tmp_path / "aside"
    blob.rename(aside)
    try:
        out = tmp_path / "get"
        out.mkdir()
        result = dcmtk(
            stack,
            "getscu",
            "-S",
            "-v",
            "-od",
            str(out),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study_uid}",
        )
    finally:
        aside.rename(blob)
    originals = [
        f for f, h in headers.items() if str(h.StudyInstanceUID) == study_uid and str(h.SOPInstanceUID) != lost_sop
    ]
    assert identical(sorted(out.iterdir()), originals)
    text = (result.stdout + result.stderr).lower()
    assert re.search(r"number of completed suboperations\s*:\s*3", text), text[-1500:]
    assert re.search(r"number of failed suboperations\s*:\s*1", text), text[-1500:]
