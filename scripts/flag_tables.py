"""Regenerate the README's flag tables from the settings models: python scripts/flag_tables.py"""

from __future__ import annotations

import sys
from pathlib import Path

from dicom_adapter.config.common import CommonSettings
from dicom_adapter.config.docs import flag_table
from dicom_adapter.config.exporter import ExporterSettings
from dicom_adapter.config.importer import ImporterSettings

README = Path(__file__).resolve().parents[1] / "README.md"
TABLES: dict[str, type[CommonSettings]] = {"import": ImporterSettings, "export": ExporterSettings}


def replace_table(readme: str, name: str, model: type[CommonSettings]) -> str:
    """The README text with the table between the `flags:<name>` markers regenerated."""
    start_marker, end_marker = f"<!-- flags:{name}:start -->\n", f"\n<!-- flags:{name}:end -->"
    start = readme.index(start_marker) + len(start_marker)
    end = readme.index(end_marker)
    return readme[:start] + flag_table(model) + readme[end:]


def main() -> int:
    text = README.read_text(encoding="utf-8")
    for name, model in TABLES.items():
        text = replace_table(text, name, model)
    README.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
