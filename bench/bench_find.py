"""Benchmark: C-FIND latency through dicom-import vs Orthanc's own C-FIND, same data, same run.

One Orthanc loaded with the oracle data set of tests/integration/test_import_find.py (3
patients, 5 studies, 17 instances) and one dicom-import in front of it; optionally a second
dicom-import running another source tree (`--before-src`, e.g. a `git archive` of an older
commit) to measure a change. Each query runs `--finds` times per server, alternating, each on
a new association (as findscu does); reports the median ms per server. The queries cover the
empty-page end of QIDO paging (one extra request per query) and the Number-of-related counts:
from QIDO (study), from the listing itself (patient, by ID) and per patient (patient, by name).

Usage: python bench/bench_find.py [--finds 40] [--before-src /tmp/old/src]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from pydicom import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.rig import Importer, Orthanc, c_find, dcmsend
from tests.rig.find import (
    PATIENT_COUNTS,
    PATIENT_ROOT_FIND,
    STUDY_COUNTS,
    STUDY_ROOT_FIND,
    identifier,
    write_dataset,
)

QUERIES: dict[str, tuple[str, Callable[[], Dataset]]] = {
    "study, one patient": (
        STUDY_ROOT_FIND,
        lambda: identifier("STUDY", PatientID="FP001", StudyInstanceUID="", StudyDescription=""),
    ),
    "study counts": (
        STUDY_ROOT_FIND,
        lambda: identifier(
            "STUDY", PatientID="FP*", StudyInstanceUID="", **dict.fromkeys(STUDY_COUNTS, "")
        ),
    ),
    "patient counts, by ID": (
        PATIENT_ROOT_FIND,
        lambda: identifier("PATIENT", PatientID="FP*", **dict.fromkeys(PATIENT_COUNTS, "")),
    ),
    "patient counts, by name": (
        PATIENT_ROOT_FIND,
        lambda: identifier(
            "PATIENT", PatientName="Doe^*", PatientID="", **dict.fromkeys(PATIENT_COUNTS, "")
        ),
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finds", type=int, default=40)
    parser.add_argument("--before-src", type=Path, default=None)
    args = parser.parse_args()
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-find-")))
        write_dataset(work / "data")
        orthanc = stack.enter_context(Orthanc(workdir=work / "orthanc"))
        sent = dcmsend("127.0.0.1", orthanc.dicom_port, orthanc.aet, [work / "data"])
        assert sent.returncode == 0, sent.stderr
        servers = {"orthanc": (orthanc.dicom_port, orthanc.aet)}
        if args.before_src is not None:
            env = {"PYTHONPATH": str(args.before_src)}
            before = Importer(orthanc.dicomweb_url, aet="BEFORE", log_dir=work, env=env)
            stack.enter_context(before)
            servers["adapter-before"] = (before.port, before.aet)
        adapter = stack.enter_context(Importer(orthanc.dicomweb_url, aet="ADAPTER", log_dir=work))
        servers["adapter"] = (adapter.port, adapter.aet)
        for name, (sop_class, query) in QUERIES.items():
            times: dict[str, list[float]] = {server: [] for server in servers}
            for _ in range(args.finds):
                for server, (port, aet) in servers.items():
                    started = time.perf_counter()
                    c_find(port, aet, sop_class, query())
                    times[server].append(time.perf_counter() - started)
            cells = "  ".join(
                f"{server} {statistics.median(t) * 1000:6.1f} ms" for server, t in times.items()
            )
            print(f"{name:24s} {cells}   (median of {args.finds})")


if __name__ == "__main__":
    main()
