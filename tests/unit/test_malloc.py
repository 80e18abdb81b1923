"""glibc malloc tuning: applied at start unless switched off (benchmarks compare both)."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

from dicom_adapter.malloc import OFF_ENV

GLIBC = ctypes.util.find_library("c") is not None and hasattr(
    ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "gnu_get_libc_version"
)


def test_tuning_is_applied_on_glibc_and_skipped_when_switched_off() -> None:
    """In a child: mallopt lasts for the whole process, so not in the test runner's."""
    assert GLIBC, "the test machine and the images run glibc"
    script = "from dicom_adapter.malloc import tune_malloc; print(tune_malloc())"
    answers = {
        setting: subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, OFF_ENV: setting},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for setting in ("", "default")
    }
    assert answers == {"": "True", "default": "False"}


def test_big_buffers_reuse_freed_memory_instead_of_new_mappings() -> None:
    """What the tuning buys: freed body buffers' pages are reused (no fresh mapping per
    allocation, each page faulting anew). Counted as minor page faults in a child process."""
    script = (
        "import resource, sys\n"
        "from dicom_adapter.malloc import tune_malloc\n"
        "if sys.argv[1] == 'on': tune_malloc()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(200):\n"  # a body read in chunks, then joined: as a WADO-RS fetch
        "    chunks = [bytes(bytearray(64 << 10)) for _ in range(8)]\n"
        "    data = bytearray(512 << 10)\n"
        "    data[:] = b''.join(chunks)\n"
        "    del chunks, data\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    faults = {
        mode: int(
            subprocess.run(
                [sys.executable, "-c", script, mode], capture_output=True, text=True, check=True
            ).stdout
        )
        for mode in ("on", "off")
    }
    # 200 fresh 512 KiB mappings fault about 128 pages each; reused memory hardly at all
    assert faults["off"] > 10_000
    assert faults["on"] < 1_000
