"""dicom-import's GIL switch interval: shortened at start unless switched off (benchmarks)."""

from __future__ import annotations

import os
import subprocess
import sys

from dicom_adapter.cli import SWITCH_ENV, SWITCH_INTERVAL

# In a child: the interval lasts for the whole process. The service itself is replaced by a
# print of the interval that import_main left in force.
SCRIPT = (
    "import sys\n"
    "from dicom_adapter import cli\n"
    "cli.run_import = lambda argv: print(sys.getswitchinterval()) or 0\n"
    "cli.import_main([])\n"
)


def interval_in_dicom_import(setting: str | None) -> float:
    env = {key: value for key, value in os.environ.items() if key != SWITCH_ENV}
    if setting is not None:
        env[SWITCH_ENV] = setting
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True
    )
    return float(done.stdout.strip())


def test_dicom_import_shortens_the_switch_interval_unless_told_otherwise() -> None:
    default = sys.getswitchinterval()  # Python's own (this runner does not change it)
    assert default > SWITCH_INTERVAL
    assert interval_in_dicom_import(None) == SWITCH_INTERVAL
    assert interval_in_dicom_import("default") == default
    assert interval_in_dicom_import("0.002") == 0.002
    assert interval_in_dicom_import("not a number") == SWITCH_INTERVAL
