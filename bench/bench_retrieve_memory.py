"""Benchmark: peak RSS of dicom-import serving many C-MOVEs at once (issue 8, point 12).

One Orthanc (DICOMweb source, loaded once with dcmsend), one DCMTK storescp (`--fork
--ignore`: receives every data set, writes nothing) as the move destination, and one
dicom-import subprocess in front of Orthanc. `--moves` C-MOVE requests of the same study
(`--instances` generated CT images of `--rows` x `--rows` 16-bit pixels) run at the same
time, each on its own association from a pynetdicom move SCU thread; every one must end in
Success with all instances completed. Reports wall time and the peak RSS of dicom-import
(VmHWM from /proc: the high-water mark of the whole process life), against the target.

"Before/after": run it once as is and once with PYTHONPATH=<other checkout>/src; the
dicom-import subprocess inherits PYTHONPATH, so it runs that code.

Usage: python bench/bench_retrieve_memory.py [--moves 16] [--instances 200] [--rows 512]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from pydicom import dcmread

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.rig import (
    Importer,
    Orthanc,
    dcmsend,
    dcmtk_env,
    dcmtk_tool,
    echo,
    free_port,
    generate_ct_series,
    proc_status,
)
from tests.rig.dimse import study_move

DEST_AET = "MEMDEST"
TARGET_MB = 500.0
TIMEOUT = 900.0


def start_storescp(port: int) -> subprocess.Popen[bytes]:
    """storescp that forks per association and discards what it receives."""
    args = [dcmtk_tool("storescp"), "--fork", "--ignore", "-aet", DEST_AET, "+xa", str(port)]
    proc = subprocess.Popen(
        args,
        env=dcmtk_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # forked children share the group: stopped together
    )
    deadline = time.monotonic() + 30
    while not echo("127.0.0.1", port, DEST_AET, timeout=2.0):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_group(proc)
            raise RuntimeError("storescp did not answer C-ECHO")
        time.sleep(0.05)
    return proc


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM storescp and its forked children; SIGKILL if they linger."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def one_move(port: int, aet: str, study_uid: str, expected: int) -> float:
    """Seconds for one C-MOVE of the study to storescp; fails unless all were completed."""
    started = time.perf_counter()
    study_move(port, aet, study_uid, DEST_AET, expected, TIMEOUT)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--moves", type=int, default=16)
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--rows", type=int, default=512, help="rows = columns of each image")
    parser.add_argument("--importer-arg", action="append", default=[], dest="importer_args")
    args = parser.parse_args()
    count: int = args.instances
    code = os.environ.get("PYTHONPATH", "(installed package)")

    with tempfile.TemporaryDirectory(prefix="bench-retrieve-memory-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        series = work / "ct"
        generate_ct_series(series, count, rows=args.rows, cols=args.rows)
        study_uid = str(dcmread(next(series.iterdir()), stop_before_pixels=True).StudyInstanceUID)
        mb = sum(p.stat().st_size for p in series.iterdir()) / 1e6
        print(f"{count} CT instances, {mb:.0f} MB; {args.moves} concurrent C-MOVEs", flush=True)

        scp_port = free_port()
        scp = start_storescp(scp_port)
        stack.callback(stop_group, scp)
        orthanc = stack.enter_context(Orthanc())
        loaded = dcmsend("127.0.0.1", orthanc.dicom_port, orthanc.aet, [series], timeout=TIMEOUT)
        if loaded.returncode != 0:
            raise RuntimeError(f"dcmsend into Orthanc failed: {loaded.stderr[-2000:]}")
        if orthanc.count_instances() != count:
            raise RuntimeError(f"Orthanc holds {orthanc.count_instances()} instances, not {count}")
        aets = json.dumps([{"name": DEST_AET, "host": "127.0.0.1", "port": scp_port}])
        importer = stack.enter_context(
            Importer(
                orthanc.dicomweb_url,
                f"--aet_dictionary_inline={aets}",
                f"--max_associations={max(32, 2 * args.moves)}",
                *args.importer_args,
                aet="ADAPTER",
            )
        )
        assert importer.proc is not None
        baseline = proc_status(importer.proc.pid).peak_rss_kib / 1024

        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.moves) as pool:
            moves = [
                pool.submit(one_move, importer.port, importer.aet, study_uid, count)
                for _ in range(args.moves)
            ]
            seconds = [move.result() for move in moves]
        wall = time.perf_counter() - started
        peak = proc_status(importer.proc.pid).peak_rss_kib / 1024

    moved = args.moves * mb
    verdict = "OK" if peak < TARGET_MB else "OVER TARGET"
    print(f"code: {code}")
    print(
        f"{args.moves} x {count} instances ({moved:.0f} MB) in {wall:.1f} s "
        f"(slowest move {max(seconds):.1f} s)"
    )
    print(
        f"dicom-import peak RSS {peak:.0f} MB (after startup {baseline:.0f} MB); "
        f"target < {TARGET_MB:.0f} MB: {verdict}"
    )
    return 0 if peak < TARGET_MB else 1


if __name__ == "__main__":
    sys.exit(main())
