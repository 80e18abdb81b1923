"""The README's flag table, generated from the settings models so the two never drift."""

from __future__ import annotations

from dicom_adapter.config.common import CommonSettings
from dicom_adapter.config.parse import default_text, flag_status

STATUS_TEXT = {
    "": "supported",
    "new": "new (not in the Java adapter)",
    "deprecated": "deprecated, works (logs a deprecation line)",
    "not supported yet": "accepted; setting it stops startup (not supported yet)",
}


def flag_table(model: type[CommonSettings]) -> str:
    """Markdown table: flag, default, environment variable, status, description."""
    lines = [
        "| flag | default | env var | status | what it does |",
        "|---|---|---|---|---|",
    ]
    java_first = sorted(model.model_fields.items(), key=lambda item: flag_status(item[1]) == "new")
    for name, info in java_first:
        description = (info.description or "").replace("|", "\\|")
        lines.append(
            f"| `--{name}` | `{default_text(info)}` | `{name.upper()}` | "
            f"{STATUS_TEXT[flag_status(info)]} | {description} |"
        )
    return "\n".join(lines)
