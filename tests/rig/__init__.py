"""Reusable test and benchmark rig: Orthanc, the importer subprocess, DCMTK tools, test data.

Plain helpers without pytest, so `bench/` scripts can import them as `from tests.rig import ...`.
Every server gets a free port and is polled for readiness; nothing sleeps to wait for a server.
One module per concern: processes (ports, child processes, /proc, metrics), poll (the one
way to wait), orthanc, services (dicom-import, dicom-export), dcmtk (tools, storescp), dimse
(pynetdicom clients, raw associations over dimse/pdu.py), pki, data (generated instances),
find (the C-FIND data tree), commitment (a storage-commitment requester), stow_server (a
STOW-RS server on a socket), fault_proxy (a fault-injecting HTTP proxy), spool (helpers of the
spool fault tests). This package re-exports the common names. Not re-exported: component (the
in-process importer harness of tests/component and the retrieve faults; import it as
`tests.rig.component`) and component_fixtures (its pytest fixtures, bound in conftest files).
"""

from tests.rig.data import (
    CHUNK_BYTES,
    LARGE_FRAME_COLS,
    LARGE_FRAME_ROWS,
    generate_ct_series,
    instance_paths,
    part10_bytes,
    write_large_instance,
)
from tests.rig.dcmtk import (
    DCMTK_TOOLS,
    StoreSCP,
    dcmsend,
    dcmtk_env,
    dcmtk_tool,
    parse_dcmsend_debug,
    run_dcmtk,
)
from tests.rig.dimse import (
    VERIFICATION,
    ProcessWideSettings,
    c_find,
    echo,
    interrupt_c_store,
    p_data,
    raw_associate,
    read_pdu,
    recv_exactly,
    save_process_wide_settings,
    send_file,
)
from tests.rig.fault_proxy import FORWARDED, Fault, FaultProxy
from tests.rig.orthanc import DICOMWEB_PLUGIN, ORTHANC_BINARY, Orthanc, store_jpeg_instance
from tests.rig.pki import Pki, make_pki
from tests.rig.poll import PollTimeout, wait_until, wait_until_async
from tests.rig.processes import (
    LOG_TAIL_CHARS,
    POLL_INTERVAL,
    STARTUP_TIMEOUT,
    ProcStatus,
    free_port,
    http_get,
    parse_metrics,
    proc_status,
    raise_if_exited,
    refused_port,
    scrape_metrics,
    tree_cpu_seconds,
)
from tests.rig.services import (
    Importer,
    LoggedProcess,
    StartImporter,
    importer_binary,
    json_records,
)
from tests.rig.spool import (
    DELIVERY_TIMEOUT,
    RestartableOrthanc,
    assert_all_in_orthanc,
    assert_identical_in_orthanc,
    new_instances,
    queued,
    send,
    spool_args,
)

__all__ = [
    "CHUNK_BYTES",
    "DCMTK_TOOLS",
    "DELIVERY_TIMEOUT",
    "DICOMWEB_PLUGIN",
    "FORWARDED",
    "LARGE_FRAME_COLS",
    "LARGE_FRAME_ROWS",
    "LOG_TAIL_CHARS",
    "ORTHANC_BINARY",
    "POLL_INTERVAL",
    "STARTUP_TIMEOUT",
    "VERIFICATION",
    "Fault",
    "FaultProxy",
    "Importer",
    "LoggedProcess",
    "Orthanc",
    "Pki",
    "PollTimeout",
    "ProcStatus",
    "ProcessWideSettings",
    "RestartableOrthanc",
    "StartImporter",
    "StoreSCP",
    "assert_all_in_orthanc",
    "assert_identical_in_orthanc",
    "c_find",
    "dcmsend",
    "dcmtk_env",
    "dcmtk_tool",
    "echo",
    "free_port",
    "generate_ct_series",
    "http_get",
    "importer_binary",
    "instance_paths",
    "interrupt_c_store",
    "json_records",
    "make_pki",
    "new_instances",
    "p_data",
    "parse_dcmsend_debug",
    "parse_metrics",
    "part10_bytes",
    "proc_status",
    "queued",
    "raise_if_exited",
    "raw_associate",
    "read_pdu",
    "recv_exactly",
    "refused_port",
    "run_dcmtk",
    "save_process_wide_settings",
    "scrape_metrics",
    "send",
    "send_file",
    "spool_args",
    "store_jpeg_instance",
    "tree_cpu_seconds",
    "wait_until",
    "wait_until_async",
    "write_large_instance",
]
