"""Logging setup: one JSON object per line with Cloud Logging's `severity`, or plain text."""

from __future__ import annotations

import datetime
import json
import logging
import sys

CONTEXT_FIELDS = ("association", "calling_aet", "sop_instance_uid", "message_id", "flag")


class JsonFormatter(logging.Formatter):
    """Formats records as single-line JSON objects."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "severity": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(*, verbose: bool, log_format: str) -> None:
    """Configure the root logger once; pynetdicom stays at WARNING unless verbose."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("pynetdicom").setLevel(logging.INFO if verbose else logging.WARNING)
    for noisy in ("httpx", "httpcore", "hpack", "google", "urllib3", "openjpeg"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
