"""Local demo: dcmsend → dicom-import → STOW-RS → Orthanc, then QIDO-RS shows the studies.

Usage: scripts/demo [--keep]   (--keep leaves Orthanc and the adapter running until Ctrl-C)
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
import tempfile
import threading
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.rig import Importer, Orthanc, dcmsend, generate_ct_series

PATIENTS = ("DEMO001", "DEMO002", "DEMO003")


def value(dataset: dict[str, dict[str, list[object]]], tag: str) -> str:
    """First value of a DICOM JSON attribute as text."""
    values = dataset.get(tag, {}).get("Value", [""])
    first = values[0] if values else ""
    if isinstance(first, dict):
        return str(first.get("Alphabetic", ""))
    return str(first)


def main() -> int:
    parser = argparse.ArgumentParser(description="dicom-adapter local demo")
    parser.add_argument("--keep", action="store_true", help="keep running until Ctrl-C")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dicom-adapter-demo-") as tmp:
        data = Path(tmp) / "studies"
        for seed, patient in enumerate(PATIENTS):
            generate_ct_series(data / patient, 5, rows=128, cols=128, seed=seed, patient_id=patient)
        print(f"1. generated {len(PATIENTS)} CT studies x 5 instances in {data}")
        with Orthanc(workdir=Path(tmp) / "orthanc") as orthanc:
            print(f"2. Orthanc (dev DICOMweb server): {orthanc.dicomweb_url}")
            with Importer(orthanc.dicomweb_url, aet="DICOMADAPTER", log_dir=Path(tmp)) as adapter:
                print(f"3. dicom-import running: {shlex.join(adapter.args)}")
                sent = dcmsend("127.0.0.1", adapter.port, adapter.aet, [data])
                print(
                    f"4. dcmsend -aec {adapter.aet} 127.0.0.1 {adapter.port} +sd +r {data} "
                    f"-> exit {sent.returncode}"
                )
                if sent.returncode != 0:
                    print(sent.stdout, sent.stderr, sep="\n")
                    return 1
                url = f"{orthanc.dicomweb_url}/studies?includefield=00201208"
                print(f"5. QIDO-RS: GET {url}")
                studies = httpx.get(url, headers={"Accept": "application/dicom+json"}).json()
                print(f"   {'PatientID':<10} {'PatientName':<16} {'StudyDate':<10} instances")
                for study in sorted(studies, key=lambda s: value(s, "00100020")):
                    print(
                        f"   {value(study, '00100020'):<10} {value(study, '00100010'):<16} "
                        f"{value(study, '00080020'):<10} {value(study, '00201208')}"
                    )
                if len(studies) != len(PATIENTS):
                    print(f"expected {len(PATIENTS)} studies, found {len(studies)}")
                    return 1
                if args.keep:
                    print(
                        f"\nRunning: DIMSE {adapter.aet}@127.0.0.1:{adapter.port}, DICOMweb "
                        f"{orthanc.dicomweb_url}, metrics {adapter.metrics_url}/metrics. "
                        "Ctrl-C to stop."
                    )
                    with contextlib.suppress(KeyboardInterrupt):
                        threading.Event().wait()
                code = adapter.stop()
                print(f"6. dicom-import stopped on SIGTERM, exit {code}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
