"""docs/gke.md stays true: its adapter command lines parse, the files it names exist."""

from __future__ import annotations

import re
import shlex

import pytest
from tests.guide import GUIDE, ROOT, shell_lines

from dicom_adapter.config.importer import ImporterSettings
from dicom_adapter.config.parse import parse_settings


def import_commands() -> list[list[str]]:
    """The `dicom-import ...` invocations (also inside `kubectl exec ... --`)."""
    found = []
    for line in shell_lines():
        words = shlex.split(line)
        for at, word in enumerate(words):
            if word == "dicom-import" and (at == 0 or words[at - 1] == "--"):
                found.append(words[at + 1 :])
    return found


def test_the_guide_runs_dicom_import_with_check() -> None:
    commands = import_commands()
    assert commands, "docs/gke.md shows no dicom-import command"
    assert any("--check" in argv for argv in commands)


@pytest.mark.parametrize("argv", import_commands(), ids=lambda a: " ".join(a)[:60])
def test_dicom_import_lines_parse_with_the_real_flag_parser(argv: list[str]) -> None:
    settings = parse_settings(
        ImporterSettings, argv, prog="dicom-import", description="gke.md", environ={}
    )
    assert settings.dimse_aet == "IMPORTADAPTER"
    assert settings.dimse_port == 2575


def test_the_guide_uses_the_manifests_aet_and_port() -> None:
    manifest = (ROOT / "deploy" / "import-deployment.yaml").read_text(encoding="utf-8")
    assert "--dimse_aet=IMPORTADAPTER" in manifest
    assert "--dimse_port=2575" in manifest
    sends = [line for line in shell_lines() if line.startswith("dcmsend")]
    assert sends and all("-aec IMPORTADAPTER" in line and " 2575 " in line for line in sends)


def test_files_the_guide_names_exist() -> None:
    text = GUIDE.read_text(encoding="utf-8")
    names = set(re.findall(r"`((?:deploy/[\w.-]*)|Dockerfile\.\w+)`", text))
    names |= set(re.findall(r"deploy/[\w-]+\.yaml", text))
    names |= set(re.findall(r"-f (Dockerfile\.\w+)", text))
    assert names, "the guide names no files"
    missing = [name for name in sorted(names) if not (ROOT / name).exists()]
    assert not missing, missing


def test_readme_links_the_guide() -> None:
    assert "docs/gke.md" in (ROOT / "README.md").read_text(encoding="utf-8")
