"""The README's flag table and example files stay true to the code."""

from __future__ import annotations

import os
from pathlib import Path

from dicom_adapter.aets import load_aet_dictionary
from dicom_adapter.config.docs import flag_table
from dicom_adapter.config.importer import ImporterSettings

ROOT = Path(__file__).resolve().parents[2]


def test_readme_flag_table_matches_the_settings() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("<!-- flags:import:start -->\n") + len("<!-- flags:import:start -->\n")
    end = readme.index("\n<!-- flags:import:end -->")
    assert readme[start:end] == flag_table(ImporterSettings), (
        "README flag table is stale: regenerate it with "
        "python -c 'from dicom_adapter.config.docs import flag_table; "
        "from dicom_adapter.config.importer import ImporterSettings; "
        "print(flag_table(ImporterSettings))'"
    )


def test_example_aet_dictionary_is_valid() -> None:
    aets = load_aet_dictionary("", os.fspath(ROOT / "aets.example.json"), {})
    peer = aets.get("PACS")
    assert peer is not None
    assert (peer.host, peer.port) == ("pacs.hospital.example", 104)
