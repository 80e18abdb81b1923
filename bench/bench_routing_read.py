"""Benchmark: what routing costs per C-STORE, reading the filters' attributes from the file.

A 512x512 16-bit CT instance (as tests.rig.generate_ct_series writes it, 0.5 MB) is read the
way the C-STORE handler does with routing on (`read_filter_attributes`, stopping after the
last tag a filter names), and, as baselines measured in the same run, the way it already
reads the identity UIDs for every C-STORE (`read_identity`) and a full header parse
(`dcmread(stop_before_pixels=True)`). Reports microseconds per instance (median of reps).

Usage: python bench/bench_routing_read.py [--iterations 2000] [--reps 5]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydicom import dcmread
from tests.rig import generate_ct_series

from dicom_adapter.dicom.attributes import read_filter_attributes, read_identity
from dicom_adapter.importer.routing import parse_filter


def per_call_us(fn: Callable[[], object], iterations: int, reps: int) -> float:
    """Median over `reps` of the mean microseconds per call."""
    results = []
    for _ in range(reps):
        started = time.perf_counter()
        for _ in range(iterations):
            fn()
        results.append((time.perf_counter() - started) / iterations * 1e6)
    return statistics.median(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        [path] = generate_ct_series(Path(tmp), 1)
        cases: list[tuple[str, Callable[[], object]]] = [
            ("read_identity (every C-STORE, baseline)", lambda: read_identity(path)),
            (
                "dcmread(stop_before_pixels) (baseline)",
                lambda: dcmread(path, stop_before_pixels=True),
            ),
        ]
        for text in ("Modality=MG", "Modality=MG&StudyDescription=Scr*", "Modality=MG&Rows=512"):
            tags = sorted({c.tag for c in parse_filter(text)[1]})
            cases.append(
                (f"filter {text!r}", functools.partial(read_filter_attributes, path, tags))
            )
        print(f"{path.stat().st_size} byte CT instance, {args.iterations} reads x {args.reps}")
        for name, fn in cases:
            print(f"{name:55s} {per_call_us(fn, args.iterations, args.reps):8.1f} us")


if __name__ == "__main__":
    main()
