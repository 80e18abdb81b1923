"""Benchmark: C-STORE through dicom-import into Orthanc vs straight into Orthanc's DIMSE port.

One run, alternating repetitions, fresh Orthanc storage for every measurement:
  1. dcmsend of N generated CT instances (512x512, 16-bit) direct vs through the adapter;
     reports the throughput ratio adapter/direct (target >= 0.5).
  2. one large instance (default 1 GiB) through the adapter; reports the adapter's peak RSS
     (VmHWM, target <= 200 MB) and throughput.

`--transports asyncio,httpx` runs the adapter with each HTTP transport (ours, httpx's own) in
every repetition, in rotating order, through dicom-import's DICOM_ADAPTER_HTTP_TRANSPORT
switch, and reports the per-repetition time ratio httpx/asyncio (> 1: ours is faster).

Usage: python bench/bench_store.py [--instances 200] [--reps 3] [--large-mb 1024]
                                   [--transports asyncio[,httpx]] [--json PATH]
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

from tests.rig import (
    Importer,
    Orthanc,
    dcmsend,
    generate_ct_series,
    proc_status,
    write_large_instance,
)

from dicom_adapter.dicomweb.client import TRANSPORT_ENV


def timed_send(port: int, aet: str, folder: Path, expected: int, orthanc: Orthanc) -> float:
    """Seconds for one dcmsend of `folder`; fails loudly if anything is missing."""
    started = time.perf_counter()
    result = dcmsend("127.0.0.1", port, aet, [folder], timeout=1800)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"dcmsend failed ({result.returncode}): {result.stderr[-2000:]}")
    stored = orthanc.count_instances()
    if stored != expected:
        raise RuntimeError(f"expected {expected} instances in Orthanc, found {stored}")
    return elapsed


def run_direct(folder: Path, count: int) -> float:
    with Orthanc() as orthanc:
        return timed_send(orthanc.dicom_port, orthanc.aet, folder, count, orthanc)


def run_adapter(folder: Path, count: int, transport: str = "asyncio") -> tuple[float, float, float]:
    """Seconds, the adapter's peak RSS (MB) and the adapter's CPU seconds during the send."""
    env = {TRANSPORT_ENV: transport}
    with Orthanc() as orthanc, Importer(orthanc.dicomweb_url, env=env) as importer:
        assert importer.proc is not None
        cpu = proc_status(importer.proc.pid).cpu_seconds
        elapsed = timed_send(importer.port, importer.aet, folder, count, orthanc)
        cpu = proc_status(importer.proc.pid).cpu_seconds - cpu
        return elapsed, proc_status(importer.proc.pid).peak_rss_kib / 1024, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--large-mb", type=int, default=1024, help="0 skips the large instance")
    parser.add_argument(
        "--transports",
        default="asyncio",
        help="comma-separated HTTP transports for the adapter: asyncio (ours), httpx",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    transports: list[str] = args.transports.split(",")
    if not transports or not set(transports) <= {"asyncio", "httpx"}:
        parser.error("--transports takes asyncio and/or httpx")

    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        work = Path(tmp)
        series = work / "ct"
        generate_ct_series(series, args.instances, rows=512, cols=512)
        mb = sum(p.stat().st_size for p in series.iterdir()) / 1e6
        print(f"{args.instances} CT instances, {mb:.0f} MB", flush=True)

        direct: list[float] = []
        adapter: dict[str, list[float]] = {name: [] for name in transports}
        cpu: dict[str, list[float]] = {name: [] for name in transports}
        rss: list[float] = []
        kinds = ["direct", *transports]
        for rep in range(args.reps):
            shift = rep % len(kinds)
            for which in kinds[shift:] + kinds[:shift]:  # each kind leads one repetition in turn
                if which == "direct":
                    direct.append(run_direct(series, args.instances))
                    print(f"rep {rep}: direct  {direct[-1]:.2f} s", flush=True)
                else:
                    seconds, peak, used = run_adapter(series, args.instances, which)
                    adapter[which].append(seconds)
                    cpu[which].append(used)
                    rss.append(peak)
                    print(
                        f"rep {rep}: adapter ({which}) {seconds:.2f} s (peak RSS {peak:.0f} MB,"
                        f" CPU {used:.2f} s)",
                        flush=True,
                    )

        direct_s = statistics.median(direct)
        adapter_s = statistics.median(adapter[transports[0]])
        results: dict[str, object] = {
            "instances": args.instances,
            "direct_seconds_median": round(direct_s, 3),
            "adapter_seconds_median": round(adapter_s, 3),
            "direct_inst_per_s": round(args.instances / direct_s, 1),
            "adapter_inst_per_s": round(args.instances / adapter_s, 1),
            "throughput_ratio": round(direct_s / adapter_s, 3),
            "adapter_peak_rss_mb_many": round(max(rss), 1),
            "adapter_cpu_ms_per_instance": round(
                statistics.median(cpu[transports[0]]) * 1e3 / args.instances, 2
            ),
        }
        if len(transports) > 1:
            for name in transports:
                seconds = statistics.median(adapter[name])
                results[f"adapter_{name}_seconds_median"] = round(seconds, 3)
                results[f"throughput_ratio_{name}"] = round(direct_s / seconds, 3)
                per_instance = statistics.median(cpu[name]) * 1e3 / args.instances
                results[f"adapter_{name}_cpu_ms_per_instance"] = round(per_instance, 2)
            if set(transports) == {"asyncio", "httpx"}:
                # ratio of ratios per repetition: (direct/asyncio) / (direct/httpx)
                pairs = zip(adapter["httpx"], adapter["asyncio"], strict=True)
                per_rep = [h / a for h, a in pairs]
                results["httpx_over_asyncio_per_rep"] = [round(r, 3) for r in per_rep]
                results["httpx_over_asyncio_median"] = round(statistics.median(per_rep), 3)
                cpu_pairs = zip(cpu["httpx"], cpu["asyncio"], strict=True)
                cpu_ratios = [h / a for h, a in cpu_pairs]
                results["cpu_httpx_over_asyncio_median"] = round(statistics.median(cpu_ratios), 3)

        if args.large_mb:
            big = work / "large" / "large.dcm"
            big.parent.mkdir()
            write_large_instance(big, args.large_mb * 1024 * 1024)
            size_mb = big.stat().st_size / 1e6
            seconds, peak, _ = run_adapter(big.parent, 1, transports[0])
            results.update(
                large_instance_mb=round(size_mb),
                large_seconds=round(seconds, 2),
                large_mb_per_s=round(size_mb / seconds, 1),
                large_adapter_peak_rss_mb=round(peak, 1),
            )
            print(f"large {size_mb:.0f} MB: {seconds:.1f} s, adapter peak RSS {peak:.0f} MB")

    print(json.dumps(results, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    ok = results["throughput_ratio"] >= 0.5 and (  # type: ignore[operator]
        not args.large_mb or results["large_adapter_peak_rss_mb"] <= 200  # type: ignore[operator]
    )
    print("targets met" if ok else "TARGETS MISSED: ratio >= 0.5, large peak RSS <= 200 MB")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
