"""Console entry points: parse settings, configure logging once, run the service on uvloop."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import uvloop

from dicom_adapter.config.exporter import ExporterSettings
from dicom_adapter.config.importer import ImporterSettings
from dicom_adapter.config.parse import deprecation_notes, parse_settings
from dicom_adapter.errors import ConfigError
from dicom_adapter.observability.logging import configure_logging

IMPORT_DESCRIPTION = (
    "DIMSE SCP that forwards C-STORE to a DICOMweb server (STOW-RS). Flags match Google's "
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


def import_main(argv: Sequence[str] | None = None) -> None:
    """Run dicom-import."""
    sys.exit(run_import(sys.argv[1:] if argv is None else argv))


def run_import(argv: Sequence[str]) -> int:
    """dicom-import without sys.exit, for tests."""
    import logging

    from dicom_adapter.importer import app

    prog = "dicom-import"
    try:
        settings = parse_settings(ImporterSettings, argv, prog=prog, description=IMPORT_DESCRIPTION)
    except ConfigError as exc:
        return _fail(prog, exc)
    configure_logging(verbose=settings.verbose, log_format=settings.log_format)
    for note in deprecation_notes(settings):
        logging.getLogger("dicom_adapter").warning(note)
    try:
        return uvloop.run(app.run(settings, dict(os.environ)))
    except ConfigError as exc:
        return _fail(prog, exc)


def export_main(argv: Sequence[str] | None = None) -> None:
    """Run dicom-export."""
    sys.exit(run_export(sys.argv[1:] if argv is None else argv))


def run_export(argv: Sequence[str]) -> int:
    """dicom-export without sys.exit, for tests."""
    import logging

    from dicom_adapter.exporter import app

    prog = "dicom-export"
    try:
        settings = parse_settings(ExporterSettings, argv, prog=prog, description=EXPORT_DESCRIPTION)
    except ConfigError as exc:
        return _fail(prog, exc)
    configure_logging(verbose=settings.verbose, log_format=settings.log_format)
    for note in deprecation_notes(settings):
        logging.getLogger("dicom_adapter").warning(note)
    try:
        return uvloop.run(app.run(settings, dict(os.environ)))
    except ConfigError as exc:
        return _fail(prog, exc)
