"""Ingest benchmark: durable accept rate next to DCMTK storescp, and peak RSS for a ~1 GB instance.

    just bench ingest              # 2,000 instances, ~1 GiB instance
    just bench ingest --quick      # 400 instances, ~128 MiB instance (smoke run)

Durable accept rate: C-STOREs answered success by ingest (blob fsynced AND the
received event acknowledged by a file-backed JetStream), sent by DCMTK storescu
over one association, then by 4 storescu processes at once (a fresh corpus, so
no instance is a duplicate). Baseline in the same run: DCMTK storescp writing
the same files to disk. Peak RSS: VmHWM of the ingest process (it is started
fresh for this) after it received one multi-frame instance generated on disk
by streaming, never held in memory.

Validation cost: the structural validator (shared.dicomvalidate) timed alone
over the same files, the demo corpus and a 50 MiB instance, fed in 16 KiB
chunks as PDVs arrive (smaller than most senders' PDUs: more calls, the worse
case), next to ingest's mean receive-to-ack from the one-sender run.
"""

from __future__ import annotations

import os
import shutil
import struct
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MultiFrameGrayscaleWordSecondaryCaptureImageStorage, generate_uid

from shared.dicomfile import dataset_offset
from shared.dicomvalidate import DatasetValidator
from switchyard import stack as ls
from switchyard.corpus import bundled_test_files, generate_studies
from tests.fixtures.servers import make_stack, new_orthanc_node
from tests.fixtures.util import free_port, wait_for

SENDERS = 4


def _chunks(paths: list[Path], n: int) -> list[list[Path]]:
    return [paths[i::n] for i in range(n)]


def _send(port: int, called: str, paths: list[Path], calling: str) -> None:
    result = ls.storescu("127.0.0.1", port, called, paths, calling_ae=calling, timeout=600)
    out = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed ({result.returncode}): {out[-2000:]}")


def rate(port: int, called: str, paths: list[Path], senders: int) -> float:
    """Instances per second, wall clock, with ``senders`` storescu processes (one association each)."""
    started = time.monotonic()
    with ThreadPoolExecutor(senders) as pool:
        list(
            pool.map(
                lambda i_chunk: _send(port, called, i_chunk[1], f"BENCH{i_chunk[0]}"),
                enumerate(_chunks(paths, senders)),
            )
        )
    return len(paths) / (time.monotonic() - started)


def big_multiframe(path: Path, frames: int, rows: int = 512, cols: int = 512) -> int:
    """Write a 16-bit multi-frame Part 10 file by streaming its pixel data; return its size."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.PatientID = "BENCH"
    ds.Rows, ds.Columns = rows, cols
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.save_as(path, enforce_file_format=True)
    frame = bytes(range(256)) * (rows * cols * 2 // 256)
    with open(path, "ab") as f:
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, len(frame) * frames))
        for _ in range(frames):
            f.write(frame)
    return path.stat().st_size


def validation_seconds(paths: list[Path], chunk: int = 16384, rounds: int = 3) -> float:
    """Median over ``rounds`` of the mean validator time per file (files read into memory first)."""
    data = []
    for path in paths:
        with open(path, "rb") as f:
            offset = dataset_offset(f)
        ts = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        data.append((ts, memoryview(path.read_bytes())[offset:]))
    means = []
    for _ in range(rounds):
        started = time.perf_counter()
        for ts, body in data:
            v = DatasetValidator(ts)
            for start in range(0, len(body), chunk):
                v.feed(body[start : start + chunk])
            v.finish()
        means.append((time.perf_counter() - started) / len(data))
    return sorted(means)[len(means) // 2]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    count = 400 if quick else 2000
    frames = 256 if quick else 2048  # 512x512x2 bytes a frame: 128 MiB / 1 GiB
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        print(f"generating 2 x {count} CT instances ...", flush=True)
        per_series = 50
        one = generate_studies(
            work / "one",
            studies=count // (4 * per_series),
            series_per_study=4,
            instances_per_series=per_series,
            seed=7001,
        )
        many = generate_studies(
            work / "many",
            studies=count // (4 * per_series),
            series_per_study=4,
            instances_per_series=per_series,
            seed=7002,
        )
        # A third corpus for ingest with two worker processes (new UIDs: no duplicates).
        more = generate_studies(
            work / "more",
            studies=count // (4 * per_series),
            series_per_study=4,
            instances_per_series=per_series,
            seed=7003,
        )
        size = one[0].stat().st_size
        print(f"  {len(one)} + {len(many)} + {len(more)} files, {size} bytes each", flush=True)

        scp_port = free_port()
        scp = ls.start_storescp(scp_port, work / "storescp-out", work / "storescp.log", "STORESCP")
        try:
            scp_one = rate(scp_port, "STORESCP", one, 1)
            shutil.rmtree(work / "storescp-out")
            (work / "storescp-out").mkdir()
            scp_many = rate(scp_port, "STORESCP", many, SENDERS)
        finally:
            scp.stop()

        # A second baseline that, like ingest, makes every instance durable before
        # answering: Orthanc with SyncStorageArea (fsync per file), same files.
        pacs = new_orthanc_node(9, work / "orthanc")
        pacs.start()
        try:
            pacs_one = rate(pacs.node.dicom_port, pacs.node.ae_title, one, 1)
            pacs_many = rate(pacs.node.dicom_port, pacs.node.ae_title, many, SENDERS)
        finally:
            pacs.stop()

        stack = make_stack(work / "stack", [], services=("ingest",))
        try:
            port, called = stack.cfg.ingest.port, stack.cfg.ingest.ae_title
            pid = stack.services["ingest"].popen.pid
            cpu0 = cpu_seconds(pid)
            ing_one = rate(port, called, one, 1)
            cpu1 = cpu_seconds(pid)
            r2a_sum = stack.metric("ingest", "switchyard_ingest_receive_to_ack_seconds_sum")
            r2a_count = stack.metric("ingest", "switchyard_ingest_receive_to_ack_seconds_count")
            assert r2a_sum is not None and r2a_count, (r2a_sum, r2a_count)
            r2a = r2a_sum / r2a_count
            ing_many = rate(port, called, many, SENDERS)
            cpu2 = cpu_seconds(pid)
            accepted = stack.metric("ingest", "switchyard_ingest_instances_total")

            # Peak RSS: a fresh ingest process, one big instance.
            stack.stop("ingest")
            proc = stack.start("ingest")
            pid = proc.popen.pid
            idle_hwm = vm_kib(pid, "VmHWM")
            big = work / "big.dcm"
            big_size = big_multiframe(big, frames)
            started = time.monotonic()
            _send(port, called, [big], "BENCHBIG")
            big_s = time.monotonic() - started
            peak_hwm = vm_kib(pid, "VmHWM")
        finally:
            stack.close()

        # The same, ingest.workers = 2 (SO_REUSEPORT): do 4 senders gain from a second process?
        def two_workers(cfg):
            return msgspec.structs.replace(cfg, ingest=msgspec.structs.replace(cfg.ingest, workers=2))

        stack = make_stack(work / "stack2", [], services=("ingest",), configure=two_workers)
        try:
            wait_for(
                lambda: stack.metric("ingest", "switchyard_bus_connected", worker=1) == 1,
                timeout=30,
                what="ingest worker 1",
            )
            ing_two = rate(stack.cfg.ingest.port, stack.cfg.ingest.ae_title, more, SENDERS)
        finally:
            stack.close()

        demo = bundled_test_files(work / "demo")
        val_ct = validation_seconds(one)
        val_demo = validation_seconds(demo)
        fifty = work / "fifty.dcm"
        fifty_size = big_multiframe(fifty, 100)  # 100 x 512 KiB frames
        val_fifty = validation_seconds([fifty], rounds=5)

        print(
            f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; cpus: {os.cpu_count()}; "
            f"python {sys.version.split()[0]}"
        )
        print(f"small instances: {count} x {size} bytes; ingest accepted (not duplicate): {accepted:.0f}")
        print(f"storescp (disk), 1 sender:     {scp_one:8.1f} img/s")
        print(f"storescp (disk), {SENDERS} senders:    {scp_many:8.1f} img/s")
        print(f"Orthanc (SyncStorageArea, durable), 1 sender:  {pacs_one:8.1f} img/s")
        print(f"Orthanc (SyncStorageArea, durable), {SENDERS} senders: {pacs_many:8.1f} img/s")
        print(f"ingest (durable), 1 sender:    {ing_one:8.1f} img/s  ({ing_one / scp_one:.2f}x storescp)")
        print(
            f"ingest (durable), {SENDERS} senders:   {ing_many:8.1f} img/s  ({ing_many / scp_many:.2f}x storescp, "
            f"{ing_many / ing_one:.2f}x one sender)"
        )
        print(
            f"ingest, 2 workers, {SENDERS} senders: {ing_two:8.1f} img/s  ({ing_two / scp_many:.2f}x storescp, "
            f"{ing_two / ing_one:.2f}x one sender on one worker)"
        )
        print(
            f"ingest CPU per instance: {(cpu1 - cpu0) / len(one) * 1000:.1f} ms (1 sender), "
            f"{(cpu2 - cpu1) / len(many) * 1000:.1f} ms ({SENDERS} senders); "
            f"ingest CPU utilisation {(cpu1 - cpu0) * ing_one / len(one):.2f} / "
            f"{(cpu2 - cpu1) * ing_many / len(many):.2f} cores"
        )
        print(
            f"large instance: {big_size / 2**20:.0f} MiB in {big_s:.1f} s; ingest VmHWM {idle_hwm / 1024:.0f} MiB "
            f"idle -> {peak_hwm / 1024:.0f} MiB peak"
        )
        print(
            f"validation per image: {val_ct * 1e6:.0f} us ({size} byte CT), {val_demo * 1e6:.0f} us "
            f"(demo corpus, {len(demo)} files), {val_fifty * 1e3:.2f} ms ({fifty_size / 2**20:.0f} MiB); "
            f"ingest receive-to-ack mean (1 sender) {r2a * 1e3:.2f} ms, per instance wall {1e3 / ing_one:.2f} ms: "
            f"CT validation = {val_ct / r2a:.1%} of receive-to-ack, {val_ct * ing_one:.1%} of wall"
        )
        ok = (ing_one >= 0.5 * scp_one, ing_many >= 1.5 * ing_one, peak_hwm < 256 * 1024)
        print(
            f"targets: >=0.5x storescp {'met' if ok[0] else 'MISSED'}; 4 senders >=1.5x one "
            f"{'met' if ok[1] else 'MISSED'}; RSS < 256 MB {'met' if ok[2] else 'MISSED'}"
        )
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
