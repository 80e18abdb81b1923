"""Benchmark: what each pynetdicom hook (dimse/pynetdicom_hooks.py) buys, hook on vs off.

One Orthanc, one DCMTK storescp as C-MOVE destination, and one dicom-import per configuration
("all": every hook on; "-name": that hook off through DICOM_ADAPTER_HOOKS_OFF), all running
in the same process tree at once. Repetitions alternate the order of the configurations.
  1. store: dcmsend of N generated CT instances (512x512, 16-bit) through each importer into
     Orthanc (emptied before each send); median seconds per configuration.
  2. move: movescu of a study of N instances (loaded once) through each importer to
     storescp; median seconds per configuration.
Reports, per hook, the ratio off/on of the median wall time and of the median CPU seconds
the importer process used (1.10 = the hook saves 10 %).

Usage: python bench/bench_hooks.py [--instances 100] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path

from pydicom import dcmread

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_retrieve import DEST_AET, TIMEOUT, timed_move
from tests.rig import Importer, Orthanc, StoreSCP, dcmsend, generate_ct_series, proc_status

OFF_ENV = "DICOM_ADAPTER_HOOKS_OFF"  # read by dicom_adapter.dimse.pynetdicom_hooks
STORE_HOOKS = ("reactor_clock", "waiting_socket", "dul_wake", "dataset_completion")
MOVE_HOOKS = ("reactor_clock", "waiting_socket", "dul_wake", "pending_p_data")


def empty(orthanc: Orthanc) -> None:
    """Delete every patient, so each store measurement starts from the same empty Orthanc."""
    for patient in orthanc.client.get("/patients").json():
        orthanc.client.delete(f"/patients/{patient}").raise_for_status()


def timed_store(importer: Importer, folder: Path, expected: int, orthanc: Orthanc) -> float:
    """Seconds for one dcmsend of `folder` through `importer`; fails loudly on a loss."""
    empty(orthanc)
    started = time.perf_counter()
    result = dcmsend("127.0.0.1", importer.port, importer.aet, [folder], timeout=TIMEOUT)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"dcmsend failed ({result.returncode}): {result.stderr[-2000:]}")
    if orthanc.count_instances() != expected:
        raise RuntimeError(f"expected {expected} instances, found {orthanc.count_instances()}")
    return elapsed


def cpu_seconds(importer: Importer) -> float:
    """User + system CPU seconds the importer process has used so far."""
    assert importer.proc is not None
    return proc_status(importer.proc.pid).cpu_seconds


def measured(importer: Importer, action: Callable[[], float]) -> tuple[float, float]:
    """(wall seconds, importer CPU seconds) of one action."""
    before = cpu_seconds(importer)
    wall = action()
    return wall, cpu_seconds(importer) - before


def report(kind: str, times: dict[str, list[tuple[float, float]]]) -> None:
    def medians(values: list[tuple[float, float]]) -> tuple[float, float]:
        return statistics.median(v[0] for v in values), statistics.median(v[1] for v in values)

    wall_on, cpu_on = medians(times["all"])
    print(f"{kind}: all hooks on: median {wall_on:.2f} s wall, {cpu_on:.2f} s importer CPU")
    for name, values in times.items():
        if name == "all":
            continue
        wall, cpu = medians(values)
        paired = statistics.median(o[0] / a[0] for o, a in zip(values, times["all"], strict=True))
        print(
            f"{kind}: {name} off: median {wall:.2f} s wall (off/on {wall / wall_on:.3f}, "
            f"per-rep pairs {paired:.3f}), {cpu:.2f} s importer CPU (off/on {cpu / cpu_on:.3f})"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--store-hooks", default=",".join(STORE_HOOKS), help="'' skips")
    parser.add_argument("--move-hooks", default=",".join(MOVE_HOOKS), help="'' skips")
    args = parser.parse_args()
    store_hooks = [h for h in args.store_hooks.split(",") if h]
    move_hooks = [h for h in args.move_hooks.split(",") if h]
    count: int = args.instances

    with tempfile.TemporaryDirectory(prefix="bench-hooks-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        store_series = generate_ct_series(work / "store", count, seed=1)[0].parent
        move_series = generate_ct_series(work / "move", count, seed=2)[0].parent
        study_uid = str(
            dcmread(next(move_series.iterdir()), stop_before_pixels=True).StudyInstanceUID
        )
        scp = stack.enter_context(StoreSCP(work / "received", aet=DEST_AET))
        aets = json.dumps([{"name": scp.aet, "host": "127.0.0.1", "port": scp.port}])
        store_orthanc = stack.enter_context(Orthanc())
        move_orthanc = stack.enter_context(Orthanc(aet="MOVEPACS"))
        loaded = dcmsend(
            "127.0.0.1", move_orthanc.dicom_port, move_orthanc.aet, [move_series], timeout=TIMEOUT
        )
        if loaded.returncode != 0:
            raise RuntimeError(f"loading Orthanc failed: {loaded.stderr[-2000:]}")

        def importer(url: str, off: str, *extra: str) -> Importer:
            return stack.enter_context(
                Importer(url, *extra, aet="ADAPTER", env={OFF_ENV: off} if off else {})
            )

        stores = {"all": importer(store_orthanc.dicomweb_url, "")}
        stores |= {f"-{h}": importer(store_orthanc.dicomweb_url, h) for h in store_hooks}
        dictionary = f"--aet_dictionary_inline={aets}"
        moves = {"all": importer(move_orthanc.dicomweb_url, "", dictionary)}
        moves |= {f"-{h}": importer(move_orthanc.dicomweb_url, h, dictionary) for h in move_hooks}

        for name in stores:  # warm-up, not measured: first association, Orthanc caches
            timed_store(stores[name], store_series, count, store_orthanc)
        for name in moves:
            timed_move(moves[name].port, moves[name].aet, study_uid, scp, count)
        store_times: dict[str, list[tuple[float, float]]] = {name: [] for name in stores}
        move_times: dict[str, list[tuple[float, float]]] = {name: [] for name in moves}
        for rep in range(args.reps):
            store_order = list(stores) if rep % 2 == 0 else list(reversed(stores))
            for name in store_order:
                storing = stores[name]
                store_times[name].append(
                    measured(
                        storing,
                        partial(timed_store, storing, store_series, count, store_orthanc),
                    )
                )
                print(f"rep {rep}: store {name}: {store_times[name][-1]}", flush=True)
            move_order = list(moves) if rep % 2 == 0 else list(reversed(moves))
            for name in move_order:
                moving = moves[name]
                move_times[name].append(
                    measured(
                        moving, partial(timed_move, moving.port, moving.aet, study_uid, scp, count)
                    )
                )
                print(f"rep {rep}: move {name}: {move_times[name][-1]}", flush=True)
        report("store", store_times)
        report("move", move_times)
    return 0


if __name__ == "__main__":
    sys.exit(main())
