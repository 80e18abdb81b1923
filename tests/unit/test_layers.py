"""The package's layers as DESIGN.md draws them, read from the import statements of src/."""

from __future__ import annotations

import ast
from pathlib import Path

import dicom_adapter

PACKAGE = Path(dicom_adapter.__file__).resolve().parent
ROOT = PACKAGE.name

# subpackage -> modules it may not import (top-level names, or subpackages of ours)
FORBIDDEN: dict[str, frozenset[str]] = {
    # format level: no networking, nothing above it
    "dicom": frozenset(
        {
            f"{ROOT}.dicomweb",
            f"{ROOT}.dimse",
            f"{ROOT}.spool",
            f"{ROOT}.importer",
            f"{ROOT}.exporter",
            "httpx",
            "pynetdicom",
            "google",
        }
    ),
    # the DICOMweb client knows nothing of DIMSE, the spool or either side
    "dicomweb": frozenset(
        {f"{ROOT}.dimse", f"{ROOT}.spool", f"{ROOT}.importer", f"{ROOT}.exporter"}
    ),
    # the association layer only: neither side, nor the DICOMweb client, nor the spool
    "dimse": frozenset(
        {f"{ROOT}.dicomweb", f"{ROOT}.spool", f"{ROOT}.importer", f"{ROOT}.exporter"}
    ),
    # the durable queue serves the importer: it defines what it needs of a store
    "spool": frozenset({f"{ROOT}.importer", f"{ROOT}.exporter"}),
    # siblings: what both sides need lives a layer below
    "importer": frozenset({f"{ROOT}.exporter"}),
    "exporter": frozenset({f"{ROOT}.importer"}),
}


def imported_modules(path: Path, package_dir: Path) -> list[tuple[int, list[str]]]:
    """Each import statement of the file: its line and the modules it may load, absolute.

    `from a import b` may load `a` or the submodule `a.b`: both are named.
    """
    package = ".".join(path.relative_to(package_dir.parent).with_suffix("").parts[:-1])
    found: list[tuple[int, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, [alias.name]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            found.append((node.lineno, [module, *(f"{module}.{a.name}" for a in node.names)]))
    return sorted(found)


def _violates(module: str, forbidden: frozenset[str]) -> bool:
    return any(module == name or module.startswith(name + ".") for name in forbidden)


def layer_violations(package: Path = PACKAGE) -> list[str]:
    """Every import that crosses a layer the wrong way, as `file:line imports module`."""
    violations: list[str] = []
    for layer, forbidden in sorted(FORBIDDEN.items()):
        for path in sorted((package / layer).rglob("*.py")):
            for line, modules in imported_modules(path, package):
                bad = next((m for m in modules if _violates(m, forbidden)), None)
                if bad is not None:
                    where = path.relative_to(package.parent)
                    violations.append(f"{where}:{line} imports {bad}")
    return violations


def test_no_layer_imports_across_or_upwards() -> None:
    assert layer_violations() == []


def test_the_walk_sees_imports_of_every_form(tmp_path: Path) -> None:
    """A walker that reads no imports would pass the test above: it must see each form."""
    fake = tmp_path / ROOT
    (fake / "exporter").mkdir(parents=True)
    (fake / "dicom").mkdir()
    (fake / "exporter" / "sinks.py").write_text(
        "from dicom_adapter.importer.store import x\n"
        "def f():\n    from ..importer import move\n"
        "from dicom_adapter import importer\n"
        "from dicom_adapter.dicomweb import stow\n",  # allowed
        encoding="utf-8",
    )
    (fake / "dicom" / "part10.py").write_text(
        "import httpx\nimport pynetdicom.events\nfrom . import tags\n", encoding="utf-8"
    )
    found = layer_violations(fake)
    assert found == [
        f"{ROOT}/dicom/part10.py:1 imports httpx",
        f"{ROOT}/dicom/part10.py:2 imports pynetdicom.events",
        f"{ROOT}/exporter/sinks.py:1 imports {ROOT}.importer.store",
        f"{ROOT}/exporter/sinks.py:3 imports {ROOT}.importer",
        f"{ROOT}/exporter/sinks.py:4 imports {ROOT}.importer",
    ]
