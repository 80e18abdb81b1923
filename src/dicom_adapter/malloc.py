"""glibc malloc tuning at process start: big buffers reuse freed heap memory.

Why (measured, bench/bench_malloc.py): by default glibc serves every allocation of 128 KiB
and more (PDUs, HTTP body chunks, instances held in memory) with a fresh mmap and returns it
with munmap when freed, so each one page-faults anew; on a VM that fault cost dominated:
a 512 KB WADO-RS fetch cost 3.1 ms of CPU, 0.8 ms with freed memory reused. Python has no
API for mallopt(3), hence ctypes. Other C libraries (musl) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)

OFF_ENV = "DICOM_ADAPTER_MALLOC"  # "default": leave glibc's settings (benchmarks: on vs off)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 8 << 20  # below: from the heap, reused once freed (instances up to 4 MiB)
TRIM_THRESHOLD = 32 << 20  # free memory kept at the heap top before returning it to the OS


def tune_malloc() -> bool:
    """Set the thresholds (glibc only); True when applied."""
    if os.environ.get(OFF_ENV, "").lower() == "default":
        return False
    # find_library needs ldconfig or a compiler, absent from slim images: glibc's soname first
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        name = ctypes.util.find_library("c")
        if name is None:
            return False
        try:
            libc = ctypes.CDLL(name)
        except OSError:
            return False
    try:
        mallopt = libc.mallopt
    except AttributeError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc's own symbol: not musl
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mmap_set = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    trim_set = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    applied = mmap_set and trim_set
    if not applied:
        logger.debug("mallopt refused the thresholds")
    return applied
