"""Benchmark: CPU of the adapter's WADO-RS fetch (DicomwebClient.wado_instances), per instance.

One Orthanc loaded with N generated CT instances (512x512, 16-bit). A child process (uvloop,
the malloc tuning, as in the daemons) fetches them two ways, best of 5 rounds each:
  single: one WADO-RS request per instance (what dicom-export does per message);
  study:  the whole study in one request (what C-MOVE and C-GET do).
The figure is the child's thread CPU per instance, so it says what the fetch costs, not how
fast Orthanc answers. With `--baseline_src DIR` every repetition also runs a child on that
source tree (e.g. a `git worktree` of the previous commit), alternating the order: the
ratio new/base is a same-run before/after (< 1: the change saves CPU).

Usage: python bench/bench_fetch.py [--instances 100] [--reps 4] [--baseline_src DIR]
                                   [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydicom import dcmread
from tests.rig import Orthanc, dcmsend, generate_ct_series, instance_paths

ROUNDS = 5
SRC = Path(__file__).resolve().parents[1] / "src"


def fetch_child(url_file: Path, study_url: str, spool: Path) -> None:
    """In the child: best-of-ROUNDS thread CPU per instance, single and study; prints JSON."""
    import uvloop

    from dicom_adapter.dicomweb.client import DicomwebClient, RetryPolicy, make_http_client
    from dicom_adapter.malloc import tune_malloc

    tune_malloc()
    urls = url_file.read_text().split()

    async def best(targets: list[str]) -> float:
        client = DicomwebClient(make_http_client(timeout=60), RetryPolicy())
        result = float("inf")
        for _ in range(ROUNDS):
            started = time.thread_time()
            for url in targets:
                async for part in client.wado_instances(url, spool_dir=spool):
                    await part.adiscard()
            result = min(result, (time.thread_time() - started) / len(urls))
        await client.http.aclose()
        return result * 1000

    async def main() -> dict[str, float]:
        return {"single": await best(urls), "study": await best([study_url])}

    print(json.dumps(uvloop.run(main())))


def run_child(src: Path, url_file: Path, study_url: str, work: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(url_file), study_url, str(work)],
        env={**os.environ, "PYTHONPATH": str(src)},
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(out.stdout.splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--baseline_src", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        fetch_child(Path(args.child[0]), args.child[1], Path(args.child[2]))
        return 0
    trees = {"new": SRC}
    if args.baseline_src is not None:
        trees["base"] = args.baseline_src.resolve()
    with tempfile.TemporaryDirectory(prefix="bench-fetch-") as tmp:
        work = Path(tmp)
        files = generate_ct_series(work / "ct", args.instances, rows=512, cols=512)
        first = dcmread(files[0], stop_before_pixels=True)
        with Orthanc(workdir=work / "orthanc") as orthanc:
            loaded = dcmsend("127.0.0.1", orthanc.dicom_port, orthanc.aet, [work / "ct"])
            if loaded.returncode != 0:
                raise RuntimeError(f"dcmsend failed: {loaded.stderr[-2000:]}")
            root = orthanc.dicomweb_url.rstrip("/")
            urls = [f"{root}/{path}" for path in instance_paths(files)]
            url_file = work / "urls.txt"
            url_file.write_text("\n".join(urls))
            study_url = f"{root}/studies/{first.StudyInstanceUID}"
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
            for rep in range(args.reps):
                order = list(trees) if rep % 2 == 0 else list(reversed(trees))
                for name in order:
                    got = run_child(trees[name], url_file, study_url, work)
                    runs[name].append(got)
                    print(
                        f"rep {rep}: {name:<4} single {got['single']:.3f} ms,"
                        f" study {got['study']:.3f} ms CPU per instance",
                        flush=True,
                    )
    results: dict[str, object] = {"instances": args.instances, "reps": args.reps}
    for name, measured in runs.items():
        for kind in ("single", "study"):
            median = statistics.median(r[kind] for r in measured)
            results[f"{name}_{kind}_cpu_ms"] = round(median, 3)
    if "base" in runs:
        for kind in ("single", "study"):
            new, base = results[f"new_{kind}_cpu_ms"], results[f"base_{kind}_cpu_ms"]
            assert isinstance(new, float) and isinstance(base, float)
            results[f"{kind}_new_over_base"] = round(new / base, 3)
    print(json.dumps(results, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
