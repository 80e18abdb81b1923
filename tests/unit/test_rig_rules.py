"""House rules of the test tree, checked on its source (issue 12 point 3): helpers come from
the rig (never from a test suite's modules or conftest files), waits go through
tests/rig/poll.py, raw PDUs from dimse/pdu.py."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# anything inside a suite: its test modules, its conftest.py (fixtures come from the rig's
# component_fixtures module), or a helper module that belongs in tests/rig/
TEST_MODULE = re.compile(r"^tests\.(unit|component|integration|faults)\.")
# split so that the issue's own grep for hand-written loops does not find this line
HAND_POLL = re.compile(r"while .*(mono" r"tonic\(\)|loop\.time\(\))|time\.sleep" r"\(POLL")
POLL_HELPER = ROOT / "tests" / "rig" / "poll.py"


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def test_no_module_imports_helpers_from_a_test_module() -> None:
    offenders = []
    for path in sources("tests", "bench"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if TEST_MODULE.match(n)]
    assert offenders == [], "move the shared helpers (and shared fixtures) to tests/rig/"


def test_tests_wait_through_the_one_polling_helper() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sources("tests")
        if path != POLL_HELPER
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if HAND_POLL.search(line)
    ]
    assert offenders == [], "use tests.rig.poll.wait_until / wait_until_async"


def test_the_rig_frames_pdus_with_the_production_codec() -> None:
    # PDU (">BBI") and item (">BBH") headers packed by hand would be a third codec
    offenders = [
        str(path.relative_to(ROOT))
        for path in [*sources("tests/rig"), *ROOT.glob("tests/rig.py")]
        if re.search(r"""struct\.pack\(\s*["']>BB[IH]""", path.read_text())
    ]
    assert offenders == [], "build well-formed PDUs with dicom_adapter.dimse.pdu"
