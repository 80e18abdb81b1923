"""The published benchmark page stays in the repository, linked, with its charts and provenance."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "docs" / "benchmarks" / "results"
CHARTS = ("ingest.png", "rtt.png", "retrieve.png", "export.png", "memory.png")


def test_readme_links_the_benchmark_page() -> None:
    assert "](docs/benchmarks.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_chart_is_shown_and_present() -> None:
    page = PAGE.read_text(encoding="utf-8")
    shown = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page)
    assert sorted(Path(s).name for s in shown) == sorted(CHARTS)
    for image in shown:
        data = (PAGE.parent / image).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), image


def test_every_result_states_machine_date_and_command() -> None:
    page = PAGE.read_text(encoding="utf-8")
    files = sorted(RESULTS.glob("*.json"))
    assert files
    for path in files:
        run = json.loads(path.read_text())
        assert run["machine"]["cores"] >= 1 and run["machine"]["ram_gb"] > 0, path.name
        assert run["date"] and run["command"].startswith("python bench/"), path.name
        assert f"`{run['command']}`" in page, f"{path.name} is not on the page"
