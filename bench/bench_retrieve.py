"""Benchmark: C-MOVE and C-FIND through dicom-import vs Orthanc's own DIMSE and QIDO-RS.

One Orthanc (fresh storage, loaded once with dcmsend: the data is only read afterwards),
one DCMTK storescp as the move destination (known to Orthanc as a DicomModalities entry and
to the adapter through its AET dictionary), and one dicom-import in front of Orthanc:
  1. C-MOVE of a study of N generated CT instances (512x512, 16-bit) to storescp, with
     DCMTK movescu against Orthanc's DIMSE port (direct) and against the adapter, alternating
     the order per repetition; the destination folder is emptied before each move and must
     hold all N files afterwards. Reports median seconds, instances/s and the throughput
     ratio adapter/direct (= direct_time / adapter_time, target >= 0.8).
  1b. C-GET of the same study with DCMTK getscu (into an emptied folder, all N files
     required), direct against Orthanc and through the adapter, alternating; the same ratio
     (target >= 0.8).
  2. C-FIND latency, alternating per repetition: a direct QIDO-RS
     `GET /studies?StudyInstanceUID=...` (httpx, keep-alive) vs a STUDY-level C-FIND through
     the adapter (pynetdicom with TCP_NODELAY, one association for all finds). Reports the
     p50 of each and the p50 of the per-pair added latency (adapter - direct) in ms; no target.

`--baseline_src DIR` starts one more dicom-import running the code in DIR (PYTHONPATH, e.g.
another checkout's src/) and measures its C-MOVE and C-GET in the same alternation: before
and after a change in one run (`move_baseline_*`, `get_baseline_*`).

`--transports asyncio,httpx` starts one dicom-import per HTTP transport (ours, httpx's own;
through the DICOM_ADAPTER_HTTP_TRANSPORT switch) in front of the same Orthanc; every
repetition then moves through each, in rotating order, and every find round asks each. Reports
the per-repetition time ratio httpx/asyncio (> 1: ours is faster).

The received files go to a tmpfs (`--sink_dir`, default /dev/shm): on disk, the write-back of
~100 MB per move made the same direct C-MOVE take 0.27 s or 0.51 s depending on the run.

Usage: python bench/bench_retrieve.py [--instances 200] [--reps 3] [--finds 50]
                                      [--transports asyncio[,httpx]] [--baseline_src DIR]
                                      [--json PATH] [--sink_dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.rig import (
    Importer,
    Orthanc,
    StoreSCP,
    dcmsend,
    generate_ct_series,
    proc_status,
    run_dcmtk,
    tree_cpu_seconds,
)

from dicom_adapter.dicomweb.client import TRANSPORT_ENV

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
PENDING = (0xFF00, 0xFF01)
TARGET_RATIO = 0.8  # issue 12, for C-MOVE and C-GET alike
DEST_AET = "BENCHDEST"
TIMEOUT = 600.0


def timed_move(port: int, called_aet: str, study_uid: str, scp: StoreSCP, expected: int) -> float:
    """Seconds for one movescu of the study to `scp`; fails loudly if anything is missing."""
    scp.clear()
    args = ["movescu", "-S", "-aet", "MOVESCU", "-aec", called_aet, "-aem", scp.aet]
    args += ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}"]
    started = time.perf_counter()
    result = run_dcmtk([*args, "127.0.0.1", str(port)], timeout=TIMEOUT)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"movescu failed ({result.returncode}): {result.stderr[-2000:]}")
    received = scp.count()
    if received != expected:
        raise RuntimeError(f"expected {expected} instances at storescp, found {received}")
    return elapsed


def timed_get(port: int, called_aet: str, study_uid: str, folder: Path, expected: int) -> float:
    """Seconds for one getscu of the study into an empty `folder`; fails loudly if short."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    args = ["getscu", "-S", "-aet", "GETSCU", "-aec", called_aet, "-od", str(folder)]
    args += ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}"]
    started = time.perf_counter()
    result = run_dcmtk([*args, "127.0.0.1", str(port)], timeout=TIMEOUT)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"getscu failed ({result.returncode}): {result.stderr[-2000:]}")
    received = sum(1 for _ in folder.iterdir())
    if received != expected:
        raise RuntimeError(f"expected {expected} instances from C-GET, found {received}")
    return elapsed


def qido_once(client: httpx.Client, study_uid: str) -> float:
    """Seconds for one QIDO-RS study search by UID; checks exactly one match came back."""
    params = httpx.QueryParams(
        [
            ("StudyInstanceUID", study_uid),
            ("includefield", "PatientName"),
            ("includefield", "StudyDate"),
        ]
    )
    started = time.perf_counter()
    response = client.get("/studies", params=params, headers={"Accept": "application/dicom+json"})
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    matches = response.json()
    if len(matches) != 1:
        raise RuntimeError(f"QIDO-RS returned {len(matches)} studies, expected 1")
    return elapsed


def set_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN on the SCU side: TCP_NODELAY, as DCMTK gets from TCP_NODELAY=1.

    Without it Nagle's algorithm holds the identifier P-DATA until the command's delayed ACK
    and every C-FIND pays ~40 ms on the client side, hiding the adapter's own latency.
    """
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def cfind_once(assoc: Association, study_uid: str) -> float:
    """Seconds for one STUDY-level C-FIND by UID; checks one match and a final Success."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    query.PatientName = ""
    query.StudyDate = ""
    matches = 0
    final: int | None = None
    started = time.perf_counter()
    for status, ident in assoc.send_c_find(query, STUDY_ROOT_FIND):
        if not status or "Status" not in status:
            raise RuntimeError("C-FIND got no response (association aborted or timed out)")
        code = int(status.Status)
        if code in PENDING:
            matches += ident is not None
        else:
            final = code
    elapsed = time.perf_counter() - started
    if final != 0x0000 or matches != 1:
        raise RuntimeError(f"C-FIND ended with status {final} and {matches} matches, expected 1")
    return elapsed


def pid_of(importer: Importer) -> int:
    """The process id of a started importer."""
    assert importer.proc is not None
    return importer.proc.pid


def release(assoc: Association) -> None:
    """Release an association that is still established."""
    if assoc.is_established:
        assoc.release()


def percentile(values: list[float], fraction: float) -> float:
    """Interpolated percentile (statistics.quantiles, inclusive method)."""
    if len(values) == 1:
        return values[0]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[round(fraction * 100) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--finds", type=int, default=50)
    parser.add_argument(
        "--transports",
        default="asyncio",
        help="comma-separated HTTP transports for the adapter: asyncio (ours), httpx",
    )
    parser.add_argument(
        "--baseline_src",
        default="",
        help="also measure a dicom-import running the code in this directory (PYTHONPATH)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--sink_dir",
        type=Path,
        default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
        help="where storescp and getscu write what they receive (default: a tmpfs, so the"
        " disk's write-back of 100 MB per move does not time the sink; same for both sides)",
    )
    args = parser.parse_args()
    if args.finds < 1 or args.reps < 1:
        parser.error("--finds and --reps need at least 1")
    count: int = args.instances
    transports: list[str] = args.transports.split(",")
    if not transports or not set(transports) <= {"asyncio", "httpx"}:
        parser.error("--transports takes asyncio and/or httpx")

    with tempfile.TemporaryDirectory(prefix="bench-retrieve-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        series = work / "ct"
        generate_ct_series(series, count, rows=512, cols=512)
        study_uid = str(dcmread(next(series.iterdir()), stop_before_pixels=True).StudyInstanceUID)
        mb = sum(p.stat().st_size for p in series.iterdir()) / 1e6
        print(f"{count} CT instances, {mb:.0f} MB, study {study_uid}", flush=True)
        sink = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.sink_dir)))

        scp = stack.enter_context(StoreSCP(sink / "received", aet=DEST_AET))
        orthanc = stack.enter_context(
            Orthanc(modalities={"dest": [scp.aet, "127.0.0.1", scp.port]})
        )
        loaded = dcmsend("127.0.0.1", orthanc.dicom_port, orthanc.aet, [series], timeout=TIMEOUT)
        if loaded.returncode != 0:
            raise RuntimeError(f"dcmsend into Orthanc failed: {loaded.stderr[-2000:]}")
        if orthanc.count_instances() != count:
            raise RuntimeError(f"Orthanc holds {orthanc.count_instances()} instances, not {count}")
        aets = json.dumps([{"name": scp.aet, "host": "127.0.0.1", "port": scp.port}])
        importers = {
            name: stack.enter_context(
                Importer(
                    orthanc.dicomweb_url,
                    f"--aet_dictionary_inline={aets}",
                    aet="ADAPTER",
                    env={TRANSPORT_ENV: name},
                )
            )
            for name in transports
        }
        baseline: Importer | None = None
        if args.baseline_src:
            baseline = stack.enter_context(
                Importer(
                    orthanc.dicomweb_url,
                    f"--aet_dictionary_inline={aets}",
                    aet="ADAPTER",
                    env={"PYTHONPATH": str(Path(args.baseline_src).resolve())},
                )
            )

        # 1. C-MOVE throughput
        direct: list[float] = []
        adapter: dict[str, list[float]] = {name: [] for name in transports}
        move_cpu: dict[str, list[float]] = {name: [] for name in transports}
        kinds = ["direct", *transports]
        # CPU seconds of every process in one C-MOVE (what bounds the ratio on these cores)
        move_cpu_all: dict[str, list[dict[str, float]]] = {"direct": [], "adapter": []}

        def cpu_now(importer: Importer | None) -> dict[str, float]:
            assert orthanc.proc is not None and scp.proc is not None
            return {
                "orthanc": proc_status(orthanc.proc.pid).cpu_seconds,
                "storescp": tree_cpu_seconds(scp.proc.pid),
                "adapter": proc_status(pid_of(importer)).cpu_seconds if importer else 0.0,
                "movescu": sum(os.times()[2:4]),
            }

        def note_cpu(kind: str, before: dict[str, float], after: dict[str, float]) -> None:
            move_cpu_all[kind].append({key: after[key] - before[key] for key in before})

        move_baseline: list[float] = []
        move_kinds = [*kinds, "baseline"] if baseline is not None else kinds
        for rep in range(args.reps):
            shift = rep % len(move_kinds)
            for which in move_kinds[shift:] + move_kinds[:shift]:  # each leads a repetition
                if which == "baseline":
                    assert baseline is not None
                    move_baseline.append(
                        timed_move(baseline.port, baseline.aet, study_uid, scp, count)
                    )
                    print(f"rep {rep}: move baseline {move_baseline[-1]:.2f} s", flush=True)
                elif which == "direct":
                    before = cpu_now(None)
                    direct.append(
                        timed_move(orthanc.dicom_port, orthanc.aet, study_uid, scp, count)
                    )
                    note_cpu("direct", before, cpu_now(None))
                    print(f"rep {rep}: move direct  {direct[-1]:.2f} s", flush=True)
                else:
                    importer = importers[which]
                    before = cpu_now(importer)
                    used = proc_status(pid_of(importer)).cpu_seconds
                    seconds = timed_move(importer.port, importer.aet, study_uid, scp, count)
                    used = proc_status(pid_of(importer)).cpu_seconds - used
                    if which == transports[0]:
                        note_cpu("adapter", before, cpu_now(importer))
                    adapter[which].append(seconds)
                    move_cpu[which].append(used)
                    print(
                        f"rep {rep}: move adapter ({which}) {seconds:.2f} s (CPU {used:.2f} s)",
                        flush=True,
                    )

        # 1b. C-GET throughput (the instances come back on the requesting association)
        get_direct: list[float] = []
        get_adapter: list[float] = []
        get_baseline: list[float] = []
        first_importer = importers[transports[0]]
        get_kinds = ["direct", "adapter"] + (["baseline"] if baseline is not None else [])
        for rep in range(args.reps):
            shift = rep % len(get_kinds)
            for which in get_kinds[shift:] + get_kinds[:shift]:
                if which == "direct":
                    seconds = timed_get(
                        orthanc.dicom_port, orthanc.aet, study_uid, sink / "got", count
                    )
                    get_direct.append(seconds)
                elif which == "baseline":
                    assert baseline is not None
                    seconds = timed_get(baseline.port, baseline.aet, study_uid, sink / "got", count)
                    get_baseline.append(seconds)
                else:
                    seconds = timed_get(
                        first_importer.port, first_importer.aet, study_uid, sink / "got", count
                    )
                    get_adapter.append(seconds)
                print(f"rep {rep}: get {which:<7} {seconds:.2f} s", flush=True)

        # 2. C-FIND latency
        qido: list[float] = []
        cfind: dict[str, list[float]] = {name: [] for name in transports}
        find_cpu = dict.fromkeys(transports, 0.0)
        pids = {name: pid_of(importer) for name, importer in importers.items()}
        client = stack.enter_context(
            httpx.Client(base_url=orthanc.dicomweb_url, timeout=60.0, trust_env=False)
        )
        ae = AE(ae_title="FINDSCU")
        ae.add_requested_context(STUDY_ROOT_FIND)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60.0
        assocs: dict[str, Association] = {}
        for name, importer in importers.items():
            assoc = ae.associate(
                "127.0.0.1",
                importer.port,
                ae_title=importer.aet,
                evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)],
            )
            if not assoc.is_established:
                raise ConnectionError("the adapter did not accept the C-FIND association")
            stack.callback(release, assoc)
            assocs[name] = assoc
            cfind_once(assoc, study_uid)  # warm-up: connection set-up, Orthanc caches
        qido_once(client, study_uid)
        for rep in range(args.finds):
            shift = rep % len(kinds)
            for which in kinds[shift:] + kinds[:shift]:
                if which == "direct":
                    qido.append(qido_once(client, study_uid))
                else:
                    pid = pids[which]
                    used = proc_status(pid).cpu_seconds
                    cfind[which].append(cfind_once(assocs[which], study_uid))
                    find_cpu[which] += proc_status(pid).cpu_seconds - used
        first = transports[0]
        added = [c - q for c, q in zip(cfind[first], qido, strict=True)]
        print(
            f"find: QIDO-RS p50 {statistics.median(qido) * 1e3:.2f} ms, C-FIND via adapter p50 "
            + ", ".join(f"{n} {statistics.median(cfind[n]) * 1e3:.2f} ms" for n in transports),
            flush=True,
        )

    direct_s = statistics.median(direct)
    adapter_s = statistics.median(adapter[first])
    ratio = direct_s / adapter_s
    get_ratio = statistics.median(get_direct) / statistics.median(get_adapter)
    results: dict[str, object] = {
        "instances": count,
        "study_mb": round(mb),
        "move_direct_seconds_median": round(direct_s, 3),
        "move_adapter_seconds_median": round(adapter_s, 3),
        "move_direct_inst_per_s": round(count / direct_s, 1),
        "move_adapter_inst_per_s": round(count / adapter_s, 1),
        "move_throughput_ratio": round(ratio, 3),
        "move_cpu_seconds_median": {
            kind: {
                key: round(statistics.median(run[key] for run in runs), 3)
                for key in (runs[0] if runs else {})
            }
            for kind, runs in move_cpu_all.items()
        },
        "get_direct_seconds_median": round(statistics.median(get_direct), 3),
        "get_adapter_seconds_median": round(statistics.median(get_adapter), 3),
        "get_throughput_ratio": round(get_ratio, 3),
        "finds": args.finds,
        "qido_p50_ms": round(statistics.median(qido) * 1e3, 2),
        "cfind_adapter_p50_ms": round(statistics.median(cfind[first]) * 1e3, 2),
        "cfind_adapter_p90_ms": round(percentile(cfind[first], 0.9) * 1e3, 2),
        "cfind_added_p50_ms": round(statistics.median(added) * 1e3, 2),
    }
    if baseline is not None:
        results["baseline_src"] = args.baseline_src
        results["move_baseline_seconds_median"] = round(statistics.median(move_baseline), 3)
        results["move_baseline_throughput_ratio"] = round(
            direct_s / statistics.median(move_baseline), 3
        )
        results["get_baseline_seconds_median"] = round(statistics.median(get_baseline), 3)
        results["get_baseline_throughput_ratio"] = round(
            statistics.median(get_direct) / statistics.median(get_baseline), 3
        )
        results["get_direct_seconds"] = [round(x, 3) for x in get_direct]
        results["get_adapter_seconds"] = [round(x, 3) for x in get_adapter]
        results["get_baseline_seconds"] = [round(x, 3) for x in get_baseline]
    if len(transports) > 1:
        for name in transports:
            seconds = statistics.median(adapter[name])
            results[f"move_{name}_seconds_median"] = round(seconds, 3)
            results[f"move_throughput_ratio_{name}"] = round(direct_s / seconds, 3)
            results[f"cfind_{name}_p50_ms"] = round(statistics.median(cfind[name]) * 1e3, 2)
            per_instance = statistics.median(move_cpu[name]) * 1e3 / count
            results[f"move_{name}_cpu_ms_per_instance"] = round(per_instance, 2)
            results[f"cfind_{name}_cpu_ms"] = round(find_cpu[name] * 1e3 / args.finds, 2)
        if set(transports) == {"asyncio", "httpx"}:
            # ratio of ratios per repetition: (direct/asyncio) / (direct/httpx)
            per_rep = [h / a for h, a in zip(adapter["httpx"], adapter["asyncio"], strict=True)]
            results["move_httpx_over_asyncio_per_rep"] = [round(r, 3) for r in per_rep]
            results["move_httpx_over_asyncio_median"] = round(statistics.median(per_rep), 3)
            cpu_ratios = [
                h / a for h, a in zip(move_cpu["httpx"], move_cpu["asyncio"], strict=True)
            ]
            results["move_cpu_httpx_over_asyncio_median"] = round(statistics.median(cpu_ratios), 3)
            per_find = [h / a for h, a in zip(cfind["httpx"], cfind["asyncio"], strict=True)]
            results["cfind_httpx_over_asyncio_median"] = round(statistics.median(per_find), 3)
    print(json.dumps(results, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    ok = ratio >= TARGET_RATIO and get_ratio >= TARGET_RATIO
    print(
        "targets met"
        if ok
        else f"TARGETS MISSED: move and get throughput ratios >= {TARGET_RATIO} "
        f"(got {ratio:.2f}, {get_ratio:.2f})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
