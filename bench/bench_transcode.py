"""Benchmark: transcoding during C-STORE (--store_compress_to_transfer_syntax, issue 10 point 6).

One run:
  1. in process: ms per 512x512 16-bit CT instance to transfer syntax `--target` (default JPEG
     2000 lossless), for the rig's CT (random 12-bit pixels: the codec's worst case) and for a
     smooth phantom (closer to a real CT slice); the compressed size against the original;
  2. ingest: dcmsend of N such CT instances through dicom-import into Orthanc, without and with
     the flag, alternating, fresh Orthanc storage every time; reports the time ratio with/without
     and the importer's CPU per instance;
  3. memory: one large multi-frame instance (`--large-mb`, 0 skips; random 8-bit pixels)
     through dicom-import without and with the flag; the importer's peak RSS of each.

Usage: python bench/bench_transcode.py [--instances 50] [--reps 2] [--large-mb 32]
                                       [--target 1.2.840.10008.1.2.4.90]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.rig import (
    Importer,
    Orthanc,
    dcmsend,
    generate_ct_series,
    proc_status,
    write_large_instance,
)

from dicom_adapter.dicom.transcode import TARGETS, Outcome, Transcoder


def phantom_series(folder: Path, count: int) -> list[Path]:
    """The rig's CT series with smooth, image-like pixels (a disc, a gradient, a little noise)."""
    paths = generate_ct_series(folder, count, rows=512, cols=512, seed=1)
    y, x = np.mgrid[0:512, 0:512]
    disc = ((x - 256) ** 2 + (y - 256) ** 2 < 200**2) * 1000
    rng = np.random.default_rng(2)
    for index, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        noise = rng.integers(0, 16, size=(512, 512))
        pixels = (disc + (x + y + index) // 4 + noise).clip(0, 4095)
        ds.PixelData = pixels.astype("<u2").tobytes()
        ds.save_as(path, enforce_file_format=True)
    return paths


def in_process(paths: list[Path], target: str, work: Path) -> dict[str, float]:
    """Median wall and CPU ms per instance, and the compressed/original size ratio."""
    transcoder = Transcoder(target)
    times: list[float] = []
    cpu: list[float] = []
    ratios: list[float] = []
    for path in paths:
        copy = work / f"cstore-{path.name}"
        shutil.copyfile(path, copy)
        started, cpu_started = time.perf_counter(), time.process_time()
        outcome = transcoder.transcode_file(copy)
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
        if outcome is not Outcome.TRANSCODED:
            raise RuntimeError(f"{path} was not transcoded: {outcome}")
        ratios.append(copy.stat().st_size / path.stat().st_size)
        copy.unlink()
    return {
        "ms_per_instance_median": round(statistics.median(times) * 1e3, 1),
        "cpu_ms_per_instance_median": round(statistics.median(cpu) * 1e3, 1),
        "ms_per_instance_max": round(max(times) * 1e3, 1),
        "size_ratio_median": round(statistics.median(ratios), 3),
    }


def ingest(
    folder: Path, count: int, extra: list[str], syntax: str = ""
) -> tuple[float, float, float]:
    """Seconds for one dcmsend through dicom-import, its CPU seconds and peak RSS (MB).

    With `syntax`, fails unless Orthanc stored the (first) instance in it.
    """
    with Orthanc() as orthanc, Importer(orthanc.dicomweb_url, *extra) as importer:
        assert importer.proc is not None
        cpu = proc_status(importer.proc.pid).cpu_seconds
        started = time.perf_counter()
        result = dcmsend("127.0.0.1", importer.port, importer.aet, [folder], timeout=1800)
        elapsed = time.perf_counter() - started
        if result.returncode != 0:
            raise RuntimeError(f"dcmsend failed ({result.returncode}): {result.stderr[-2000:]}")
        stored = orthanc.count_instances()
        if stored != count:
            raise RuntimeError(f"expected {count} instances in Orthanc, found {stored}")
        if syntax and (found := orthanc.transfer_syntax(orthanc.instances()[0])) != syntax:
            raise RuntimeError(f"stored in {found}, not {syntax}: see the importer's log")
        status = proc_status(importer.proc.pid)
        return elapsed, status.cpu_seconds - cpu, status.peak_rss_kib / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=50)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--large-mb", type=int, default=32, help="0 skips the large instance")
    parser.add_argument("--target", default="1.2.840.10008.1.2.4.90", choices=sorted(TARGETS))
    args = parser.parse_args()
    flag = f"--store_compress_to_transfer_syntax={args.target}"
    results: dict[str, object] = {"target": args.target, "instances": args.instances}

    with tempfile.TemporaryDirectory(prefix="bench-transcode-") as tmp:
        work = Path(tmp)
        rig_ct = generate_ct_series(work / "ct", args.instances, rows=512, cols=512)
        phantom = phantom_series(work / "phantom", min(args.instances, 20))
        scratch = work / "scratch"
        scratch.mkdir()
        for name, paths in (("random_ct", rig_ct[:20]), ("phantom_ct", phantom)):
            measured = in_process(paths, args.target, scratch)
            results[name] = measured
            print(f"in process, {name}: {measured}", flush=True)

        without: list[float] = []
        with_flag: list[float] = []
        cpu_without: list[float] = []
        cpu_with: list[float] = []
        for rep in range(args.reps):
            order = [False, True] if rep % 2 == 0 else [True, False]
            for transcoding in order:
                seconds, cpu, _ = ingest(
                    work / "ct",
                    args.instances,
                    [flag] if transcoding else [],
                    args.target if transcoding else "",
                )
                (with_flag if transcoding else without).append(seconds)
                (cpu_with if transcoding else cpu_without).append(cpu)
                label = "with" if transcoding else "without"
                print(f"rep {rep}: ingest {label} transcoding {seconds:.2f} s", flush=True)
        plain_s, flag_s = statistics.median(without), statistics.median(with_flag)
        results.update(
            ingest_without_seconds=round(plain_s, 2),
            ingest_with_seconds=round(flag_s, 2),
            ingest_without_inst_per_s=round(args.instances / plain_s, 1),
            ingest_with_inst_per_s=round(args.instances / flag_s, 1),
            ingest_throughput_ratio_with_over_without=round(plain_s / flag_s, 3),
            importer_cpu_ms_per_instance_without=round(
                statistics.median(cpu_without) * 1e3 / args.instances, 1
            ),
            importer_cpu_ms_per_instance_with=round(
                statistics.median(cpu_with) * 1e3 / args.instances, 1
            ),
        )

        if args.large_mb:
            big = work / "large" / "large.dcm"
            big.parent.mkdir()
            write_large_instance(big, args.large_mb * 1024 * 1024)
            size_mb = big.stat().st_size / 1e6
            plain_seconds, _, plain_peak = ingest(big.parent, 1, [])
            # DCMTK gives up on a C-STORE answer after 60 s: keep --large-mb small enough
            slow_ok = "--transcode_max_seconds=50"
            seconds, _, peak = ingest(big.parent, 1, [flag, slow_ok], args.target)
            results.update(
                large_instance_mb=round(size_mb),
                large_seconds_without=round(plain_seconds, 2),
                large_seconds_with=round(seconds, 2),
                large_importer_peak_rss_mb_without=round(plain_peak, 1),
                large_importer_peak_rss_mb_with=round(peak, 1),
            )
            print(
                f"large {size_mb:.0f} MB: {plain_seconds:.1f} s / {seconds:.1f} s, importer peak "
                f"RSS {plain_peak:.0f} MB / {peak:.0f} MB (without / with transcoding)"
            )

    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
