"""docs/gke.md against the local demo: its dcmsend line works, its DCMTK messages are real."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from pydicom import dcmread

from tests.guide import GUIDE, shell_lines
from tests.rig import Importer, Orthanc, dcmtk_tool, free_port, generate_ct_series, run_dcmtk


def documented_send(host: str, port: int, folder: Path) -> list[str]:
    """The guide's dcmsend line with the load balancer replaced by a local dicom-import."""
    (line,) = [line for line in shell_lines() if line.startswith("dcmsend")]
    words = shlex.split(line)
    words = [host if w == "LB_IP" else str(port) if w == "2575" else w for w in words]
    words = [str(folder) if w == "dicom/" else w for w in words]
    words[0] = dcmtk_tool("dcmsend")
    return words


def troubleshooting_texts() -> list[str]:
    """The backquoted dcmsend messages the guide's troubleshooting table quotes."""
    return re.findall(r"`(F: cannot negotiate network association: [^`]*)`", GUIDE.read_text())


def test_the_documented_dcmsend_line_stores_a_study(orthanc: Orthanc, tmp_path: Path) -> None:
    sent = generate_ct_series(tmp_path / "dicom", 3, rows=32, cols=32)
    with Importer(orthanc.dicomweb_url, aet="IMPORTADAPTER", log_dir=tmp_path) as importer:
        result = run_dcmtk(documented_send("127.0.0.1", importer.port, tmp_path / "dicom"), 120)
    assert result.returncode == 0, result.stdout + result.stderr
    for path in sent:
        assert orthanc.find_instance(dcmread(path).SOPInstanceUID) is not None


def test_the_troubleshooting_messages_are_what_dcmsend_prints(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    texts = troubleshooting_texts()
    refused = next(t for t in texts if "Connection refused" in t)
    rejected = next(t for t in texts if "Association Rejected" in t)
    generate_ct_series(tmp_path / "dicom", 1, rows=16, cols=16)
    with Importer(orthanc.dicomweb_url, aet="IMPORTADAPTER", log_dir=tmp_path) as importer:
        closed = run_dcmtk(documented_send("127.0.0.1", free_port(), tmp_path / "dicom"), 60)
        wrong = documented_send("127.0.0.1", importer.port, tmp_path / "dicom")
        wrong[wrong.index("IMPORTADAPTER")] = "NOTTHEADAPTER"
        rejected_run = run_dcmtk(wrong, 60)
        wrong[wrong.index("-v")] = "-d"  # the guide's -v, turned into -d (the last one wins)
        reason_run = run_dcmtk(wrong, 60)
    assert refused in closed.stdout + closed.stderr
    assert rejected in rejected_run.stdout + rejected_run.stderr
    assert "Called AE Title Not Recognized" in reason_run.stdout + reason_run.stderr
