"""Benchmark: glibc malloc tuning (dicom_adapter/malloc.py) on vs off, same run.

Two measurements, alternating the order per repetition:
  fetch:   CPU per WADO-RS fetch of a 512 KB CT instance from Orthanc, through the adapter's
           DicomwebClient (a child process per mode: the tuning is process-wide).
  receive: instances/s dicom-import acknowledges with --auto_ack_cstore while it uploads
           nothing (upstream a closed port), one dcmsend association.
Off = DICOM_ADAPTER_MALLOC=default in the process's environment. "off/on" > 1: tuning saves.

Usage: python bench/bench_malloc.py [--instances 100] [--reps 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.rig import Importer, Orthanc, dcmsend, free_port, generate_ct_series, instance_paths

from dicom_adapter.malloc import OFF_ENV, tune_malloc

MODES = {"on": {}, "off": {OFF_ENV: "default"}}


def fetch_child(url_file: Path, spool: Path) -> None:
    """In the child: fetch every URL twice (the first round warms up), print CPU per fetch."""
    from dicom_adapter.dicomweb.client import DicomwebClient, RetryPolicy, make_http_client

    tune_malloc()
    urls = url_file.read_text().split()

    async def main() -> float:
        client = DicomwebClient(make_http_client(timeout=60), RetryPolicy())
        spent = 0.0
        for round_ in range(2):
            started = time.process_time()
            for url in urls:
                async for part in client.wado_instances(url, spool_dir=spool):
                    part.discard()
            spent = time.process_time() - started if round_ else 0.0
        await client.http.aclose()
        return spent / len(urls)

    print(json.dumps({"cpu_ms_per_fetch": asyncio.run(main()) * 1000}))


def run_fetch(orthanc: Orthanc, files: list[Path], work: Path, reps: int) -> dict[str, object]:
    urls = [f"{orthanc.dicomweb_url}/{path}" for path in instance_paths(files)]
    url_file = work / "urls.txt"
    url_file.write_text("\n".join(urls))
    spent: dict[str, list[float]] = {mode: [] for mode in MODES}
    for rep in range(reps):
        for mode in MODES if rep % 2 == 0 else reversed(list(MODES)):
            out = subprocess.run(
                [sys.executable, __file__, "--fetch-child", str(url_file), str(work)],
                env={**os.environ, **MODES[mode]},
                capture_output=True,
                text=True,
                check=True,
            )
            spent[mode].append(json.loads(out.stdout.splitlines()[-1])["cpu_ms_per_fetch"])
            print(f"rep {rep}: fetch {mode}: {spent[mode][-1]:.2f} ms CPU per fetch", flush=True)
    on, off = (statistics.median(spent[m]) for m in ("on", "off"))
    return {
        "fetch_cpu_ms_on": round(on, 2),
        "fetch_cpu_ms_off": round(off, 2),
        "fetch_off_over_on": round(off / on, 2),
    }


def run_receive(folder: Path, count: int, work: Path, reps: int) -> dict[str, object]:
    dead = f"http://127.0.0.1:{free_port()}/dicom-web"
    flags = [
        "--auto_ack_cstore",
        "--persistent_file_upload_retry_amount=100",
        "--min_upload_delay=600000",
        "--max_waiting_time_between_uploads=600",
    ]
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    for rep in range(reps):
        for mode in MODES if rep % 2 == 0 else reversed(list(MODES)):
            spool = work / f"spool-{mode}-{rep}"
            with Importer(
                dead, f"--persistent_file_storage_location={spool}", *flags, env=MODES[mode]
            ) as importer:
                started = time.perf_counter()
                result = dcmsend("127.0.0.1", importer.port, importer.aet, [folder], timeout=600)
                elapsed = time.perf_counter() - started
            if result.returncode != 0:
                raise RuntimeError(f"dcmsend failed: {result.stderr[-2000:]}")
            shutil.rmtree(spool)
            rates[mode].append(count / elapsed)
            print(f"rep {rep}: receive {mode}: {rates[mode][-1]:.1f} inst/s", flush=True)
    on, off = (statistics.median(rates[m]) for m in ("on", "off"))
    return {
        "receive_inst_per_s_on": round(on, 1),
        "receive_inst_per_s_off": round(off, 1),
        "receive_on_over_off": round(on / off, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--fetch-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fetch_child:
        fetch_child(Path(args.fetch_child[0]), Path(args.fetch_child[1]))
        return 0
    results: dict[str, object] = {"instances": args.instances, "reps": args.reps}
    with tempfile.TemporaryDirectory(prefix="bench-malloc-") as tmp:
        work = Path(tmp)
        folder = work / "ct"
        files = generate_ct_series(folder, args.instances)
        with Orthanc() as orthanc:
            loaded = dcmsend("127.0.0.1", orthanc.dicom_port, orthanc.aet, [folder], timeout=600)
            if loaded.returncode != 0:
                raise RuntimeError(f"loading Orthanc failed: {loaded.stderr[-2000:]}")
            results.update(run_fetch(orthanc, files, work, args.reps))
        results.update(run_receive(folder, args.instances, work, args.reps))
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
