"""Console entry points: parse settings, configure logging once, run the service on uvloop."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import uvloop

from dicom_adapter.config.common import CommonSettings
from dicom_adapter.config.exporter import ExporterSettings
from dicom_adapter.config.importer import ImporterSettings
from dicom_adapter.config.parse import deprecation_notes, parse_settings
from dicom_adapter.errors import ConfigError
from dicom_adapter.malloc import tune_malloc
from dicom_adapter.observability.logging import configure_logging

S = TypeVar("S", bound=CommonSettings)

# How long a thread that wants the GIL waits for the one holding it (Python's default: 5 ms).
# dicom-import receives each C-STORE on a pynetdicom thread, a serial exchange with the sender,
# while its event loop uploads spooled instances; each wait for the GIL delays the next
# instance. Measured (bench/bench_spool.py p1, 200 CT instances, 6 alternating runs): all
# stored after 1.455 s at 5 ms, 1.383 s at 1 ms, 1.322 s at 0.5 ms.
SWITCH_INTERVAL = 0.0005
SWITCH_ENV = "DICOM_ADAPTER_SWITCH_INTERVAL"  # seconds, or "default" (benchmarks: A/B)

IMPORT_DESCRIPTION = (
    "DIMSE SCP in front of a DICOMweb server: C-STORE → STOW-RS, C-FIND → QIDO-RS, C-MOVE/C-GET "
    "→ WADO-RS, storage commitment. Flags match Google's "
    "healthcare-dicom-dicomweb-adapter; each can also be set by the environment variable shown."
)

EXPORT_DESCRIPTION = (
    "Pulls Pub/Sub messages naming DICOMweb instances, fetches each with WADO-RS and sends it "
    "to a DIMSE peer (C-STORE) or a DICOMweb server (STOW-RS). Flags match Google's "
    "healthcare-dicom-dicomweb-adapter; each can also be set by the environment variable shown."
)


def _fail(prog: str, exc: ConfigError) -> int:
    print(f"{prog}: {exc}", file=sys.stderr)
    return 2


Service = Callable[[S, dict[str, str]], Coroutine[Any, Any, int]]


def _wants_check(argv: Sequence[str]) -> bool:
    """--check given (looked at before parsing: a parse failure is then a FAIL line).

    Accepts what the parser accepts: `--check`, `--check=BOOL` and `--check BOOL`.
    """
    wanted = False
    for index, arg in enumerate(argv):
        name, has_value, value = arg.partition("=")
        if name != "--check":
            continue
        following = argv[index + 1].lower() if index + 1 < len(argv) else ""
        if not has_value and following in _BOOL_WORDS:
            value = following
        wanted = value.lower() not in _FALSE_WORDS if (has_value or value) else True
    return wanted


_FALSE_WORDS = frozenset({"false", "f", "0", "no", "n", "off"})  # as pydantic reads bools
_BOOL_WORDS = _FALSE_WORDS | {"true", "t", "1", "yes", "y", "on"}


def _run(
    prog: str,
    model: type[S],
    description: str,
    argv: Sequence[str],
    service: Service[S],
    check: Service[S],
) -> int:
    """Parse flags (one stderr line + exit 2 on error), configure logging once, run on uvloop.

    With --check the checks run instead of the service, and a flag problem is one FAIL line.
    """
    try:
        settings = parse_settings(model, argv, prog=prog, description=description)
    except ConfigError as exc:
        if _wants_check(argv):
            from dicom_adapter.preflight import flags_failed

            print(flags_failed(exc).line)
            return 1
        return _fail(prog, exc)
    configure_logging(verbose=settings.verbose, log_format=settings.log_format)
    for note in deprecation_notes(settings):
        logging.getLogger("dicom_adapter").warning(note)
    try:
        return uvloop.run((check if settings.check else service)(settings, dict(os.environ)))
    except ConfigError as exc:
        return _fail(prog, exc)


def tune_switch_interval(environ: dict[str, str] | os._Environ[str] = os.environ) -> float:
    """Set the GIL switch interval (SWITCH_INTERVAL unless SWITCH_ENV says otherwise); the
    interval in force afterwards."""
    wanted = environ.get(SWITCH_ENV, "").strip().lower()
    if wanted != "default":
        try:
            interval = float(wanted) if wanted else SWITCH_INTERVAL
        except ValueError:
            interval = SWITCH_INTERVAL
        if interval > 0:
            sys.setswitchinterval(interval)
    return sys.getswitchinterval()


def import_main(argv: Sequence[str] | None = None) -> None:
    """Run dicom-import."""
    tune_malloc()
    tune_switch_interval()
    sys.exit(run_import(sys.argv[1:] if argv is None else argv))


def run_import(argv: Sequence[str]) -> int:
    """dicom-import without sys.exit, for tests."""
    from dicom_adapter import preflight
    from dicom_adapter.importer import app

    return _run(
        "dicom-import",
        ImporterSettings,
        IMPORT_DESCRIPTION,
        argv,
        app.run,
        preflight.run_import_check,
    )


def export_main(argv: Sequence[str] | None = None) -> None:
    """Run dicom-export."""
    tune_malloc()
    sys.exit(run_export(sys.argv[1:] if argv is None else argv))


def run_export(argv: Sequence[str]) -> int:
    """dicom-export without sys.exit, for tests."""
    from dicom_adapter import preflight
    from dicom_adapter.exporter import app

    return _run(
        "dicom-export",
        ExporterSettings,
        EXPORT_DESCRIPTION,
        argv,
        app.run,
        preflight.run_export_check,
    )
