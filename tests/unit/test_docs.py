"""The README's flag tables and example files stay true to the code."""

from __future__ import annotations

import os
from pathlib import Path

from scripts.flag_tables import README, TABLES, replace_table

from dicom_adapter.aets import load_aet_dictionary

ROOT = Path(__file__).resolve().parents[2]


def test_readme_flag_tables_match_the_settings() -> None:
    readme = README.read_text(encoding="utf-8")
    regenerated = readme
    for name, model in TABLES.items():
        regenerated = replace_table(regenerated, name, model)
    assert regenerated == readme, "README flag tables are stale: run python scripts/flag_tables.py"


def test_example_aet_dictionary_is_valid() -> None:
    aets = load_aet_dictionary("", os.fspath(ROOT / "aets.example.json"), {})
    peer = aets.get("PACS")
    assert peer is not None
    assert (peer.host, peer.port) == ("pacs.hospital.example", 104)
