"""The whole demo corpus goes through a real DICOM peer: DCMTK storescu to DCMTK storescp.

This is what keeps bundled_test_files honest: a file it returns that DCMTK
cannot send or store would break the demo, which sends with storescu too.
"""

from __future__ import annotations

import pydicom
import pytest

from switchyard import stack as ls
from switchyard.corpus import bundled_test_files, corpus_index, generate_studies

pytestmark = pytest.mark.integration


def test_storescp_stores_every_corpus_file(storescp, tmp_path):
    corpus = tmp_path / "corpus"
    files = generate_studies(corpus / "generated", studies=4, series_per_study=3, instances_per_series=4, seed=11)
    files += bundled_test_files(corpus / "pydicom")
    index = corpus_index(files)

    result = ls.storescu("127.0.0.1", storescp.port, storescp.ae_title, [corpus], extra=["+sd", "+r"])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "E:" not in output, output[-4000:]

    stored = storescp.received()
    assert len(stored) == len(files)
    got: dict[str, set[str]] = {}
    for path in stored:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        got.setdefault(str(ds.StudyInstanceUID), set()).add(str(ds.SOPInstanceUID))
    assert got == {study: set(sops) for study, sops in index.items()}
