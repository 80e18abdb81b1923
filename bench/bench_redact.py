"""Benchmark: C-STORE ingest through dicom-import with redaction (CHC_BASIC) on vs off.

One run, rotating repetitions (each kind leads one repetition in turn), fresh Orthanc for
every measurement: dcmsend of N generated CT instances (512x512, 16-bit) through an importer
without redaction and through one with --redact_filter_profile=CHC_BASIC. Reports the
per-repetition throughput ratio redacted/plain (1.0 = redaction costs nothing), the same
ratio against the files redacted beforehand and sent without redaction (what redacting costs
the importer, apart from what storing redacted data costs the server), the cost of
redacting one instance in-process (ms), and the peak RSS of a redacting importer receiving one
large instance (the pixel data is copied file to file, never loaded).

The machine may be shared: compare the ratio within a run, and read the spread across
repetitions as the noise.

Usage: python bench/bench_redact.py [--instances 100] [--reps 3] [--large-mb 256]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_store import timed_send
from tests.rig import Importer, Orthanc, generate_ct_series, proc_status, write_large_instance

from dicom_adapter.dicom.redact import redactor_from_flags

CHC_BASIC_FLAG = "--redact_filter_profile=CHC_BASIC"


def run_adapter(folder: Path, count: int, *flags: str) -> tuple[float, float]:
    """Seconds of one dcmsend of `folder` through a fresh importer, and its peak RSS (MB)."""
    with Orthanc() as orthanc, Importer(orthanc.dicomweb_url, *flags) as importer:
        assert importer.proc is not None
        elapsed = timed_send(importer.port, importer.aet, folder, count, orthanc)
        return elapsed, proc_status(importer.proc.pid).peak_rss_kib / 1024


def redact_ms_per_instance(folder: Path) -> float:
    """Median milliseconds to redact one file with CHC_BASIC, in this process."""
    redactor = redactor_from_flags("", "", "CHC_BASIC")
    assert redactor is not None
    target = folder.parent / "redacted.dcm"
    times: list[float] = []
    for path in sorted(folder.iterdir()):
        target.unlink(missing_ok=True)  # a new file each time, as in the C-STORE path
        started = time.perf_counter()
        redactor.redact_file(path, target)
        times.append(time.perf_counter() - started)
    target.unlink()
    return statistics.median(times) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--large-mb", type=int, default=256, help="0 skips the large instance")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-redact-") as tmp:
        work = Path(tmp)
        series = work / "ct"
        generate_ct_series(series, args.instances, rows=512, cols=512)
        mb = sum(p.stat().st_size for p in series.iterdir()) / 1e6
        print(f"{args.instances} CT instances, {mb:.0f} MB", flush=True)

        # the same files redacted beforehand, sent through an importer without redaction:
        # what the DICOMweb server's side costs for redacted data, apart from our redacting
        pre = work / "pre-redacted"
        pre.mkdir()
        redactor = redactor_from_flags("", "", "CHC_BASIC")
        assert redactor is not None
        for path in series.iterdir():
            redactor.redact_file(path, pre / path.name)

        kinds = ["plain", "redacted", "pre_redacted"]
        seconds: dict[str, list[float]] = {kind: [] for kind in kinds}
        flags = {"plain": [], "redacted": [CHC_BASIC_FLAG], "pre_redacted": []}
        folders = {"plain": series, "redacted": series, "pre_redacted": pre}
        for rep in range(args.reps):
            shift = rep % len(kinds)
            for which in kinds[shift:] + kinds[:shift]:  # each kind leads in turn
                elapsed, _ = run_adapter(folders[which], args.instances, *flags[which])
                seconds[which].append(elapsed)
                print(f"rep {rep}: {which:12s} {elapsed:.2f} s", flush=True)

        # throughput ratio redacted/plain = plain seconds / redacted seconds
        per_rep = [p / r for p, r in zip(seconds["plain"], seconds["redacted"], strict=True)]
        results: dict[str, object] = {
            "instances": args.instances,
            "plain_seconds_median": round(statistics.median(seconds["plain"]), 3),
            "redacted_seconds_median": round(statistics.median(seconds["redacted"]), 3),
            "throughput_ratio_redacted_over_plain_per_rep": [round(r, 3) for r in per_rep],
            "throughput_ratio_redacted_over_plain_median": round(statistics.median(per_rep), 3),
            "pre_redacted_seconds_median": round(statistics.median(seconds["pre_redacted"]), 3),
            "throughput_ratio_redacted_over_pre_redacted_median": round(
                statistics.median(
                    p / r for p, r in zip(seconds["pre_redacted"], seconds["redacted"], strict=True)
                ),
                3,
            ),
            "redact_ms_per_instance_in_process": round(redact_ms_per_instance(series), 2),
        }

        if args.large_mb:
            big = work / "large" / "large.dcm"
            big.parent.mkdir()
            write_large_instance(big, args.large_mb * 1024 * 1024)
            size_mb = big.stat().st_size / 1e6
            elapsed, peak = run_adapter(big.parent, 1, CHC_BASIC_FLAG)
            results.update(
                large_instance_mb=round(size_mb),
                large_redacted_seconds=round(elapsed, 2),
                large_redacted_adapter_peak_rss_mb=round(peak, 1),
            )
            print(f"large {size_mb:.0f} MB redacted: {elapsed:.1f} s, peak RSS {peak:.0f} MB")

    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
