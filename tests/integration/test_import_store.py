"""dicom-import end to end: DCMTK / pynetdicom -> importer (subprocess) -> STOW-RS -> Orthanc."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE

from tests.rig import (
    VERIFICATION,
    Importer,
    Orthanc,
    StartImporter,
    dcmsend,
    dcmtk_env,
    dcmtk_tool,
    echo,
    free_port,
    generate_ct_series,
    http_get,
    interrupt_c_store,
    parse_dcmsend_debug,
    run_dcmtk,
    scrape_metrics,
    send_file,
    wait_until,
    write_large_instance,
)

HOST = "127.0.0.1"
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
CALLED_AET_NOT_RECOGNISED = 7  # A-ASSOCIATE-RJ reason, service user (PS3.8 9.3.4)


def _stored_id(orthanc: Orthanc, sop_instance_uid: str) -> str:
    orthanc_id = orthanc.find_instance(sop_instance_uid)
    assert orthanc_id is not None, f"instance {sop_instance_uid} did not arrive in Orthanc"
    return orthanc_id


def _without_meta(ds: Dataset) -> Dataset:
    """The data set proper: what a C-STORE carries (no group 0002)."""
    return Dataset({element.tag: element for element in ds if element.tag.group != 0x0002})


def _bundled_copy(name: str, dest: Path) -> Dataset:
    """A copy of a pydicom test file with a fresh SOP Instance UID, same transfer syntax.

    Several bundled files share one SOP Instance UID (MR_small*); Orthanc ignores duplicates,
    so without fresh UIDs a later file would be checked against an earlier one's storage.
    Files without Patient ID / Study / Series UID get one: Orthanc refuses them otherwise.
    """
    path = get_testdata_file(name)
    if path is None:
        pytest.fail(f"pydicom test file {name} is not bundled with the installed pydicom")
    ds = pydicom.dcmread(path)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):  # Orthanc refuses files without
        if keyword not in ds:
            setattr(ds, keyword, generate_uid())
    if "PatientID" not in ds:
        ds.PatientID = "BUNDLED"
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.save_as(dest, enforce_file_format=True)
    copy = pydicom.dcmread(dest)
    assert copy.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    return copy


def _dcmsend_statuses(result: subprocess.CompletedProcess[str]) -> dict[str, int]:
    return parse_dcmsend_debug(result.stdout + result.stderr)


# --- (a) bulk ------------------------------------------------------------------------------


def test_dcmsend_of_300_instances_all_arrive_with_identical_pixels(
    importer: Importer, orthanc: Orthanc, tmp_path: Path
) -> None:
    paths = generate_ct_series(tmp_path / "ct", 300, rows=64, cols=64, seed=300)
    sent = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, paths)}

    result = dcmsend(HOST, importer.port, importer.aet, [tmp_path / "ct"], extra=["-d"])

    assert result.returncode == 0, result.stderr[-3000:]
    assert _dcmsend_statuses(result) == dict.fromkeys(sent, SUCCESS)
    for uid, ds in sent.items():
        stored = orthanc.instance_dataset(_stored_id(orthanc, uid))
        assert stored.SOPInstanceUID == uid
        assert stored.PixelData == ds.PixelData, f"pixel data of {uid} changed on the way"


# --- (b) transfer syntaxes and non-image objects --------------------------------------------

# dcmsend proposes a compressed file's own transfer syntax; -dn forbids it to fall back to
# decompressing, so anything but the original transfer syntax in Orthanc is the importer's doing.
COMPRESSED = [
    "JPEG2000.dcm",
    "MR_small_jp2klossless.dcm",
    "JPEGLSNearLossless_08.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_RLE.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "image_dfl.dcm",
]

# For uncompressed files dcmsend always proposes [explicit LE, explicit BE, implicit LE] in one
# context (whatever the file's syntax) and converts to what the SCP picks, so dcmsend cannot
# ask for the original syntax. These are sent with exactly their own syntax (pynetdicom,
# file bytes as they are) and, separately, with dcmsend for content.
UNCOMPRESSED = [
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "rtplan.dcm",
    "test-SR.dcm",
    "waveform_ecg.dcm",
]


@pytest.mark.parametrize("name", COMPRESSED)
def test_dcmsend_keeps_compressed_transfer_syntax(
    name: str, importer: Importer, orthanc: Orthanc, tmp_path: Path
) -> None:
    sent = _bundled_copy(name, tmp_path / name)
    uid = str(sent.SOPInstanceUID)

    result = dcmsend(HOST, importer.port, importer.aet, [tmp_path / name], extra=["-dn", "-d"])

    assert result.returncode == 0, result.stderr[-3000:]
    assert _dcmsend_statuses(result) == {uid: SUCCESS}
    orthanc_id = _stored_id(orthanc, uid)
    assert orthanc.transfer_syntax(orthanc_id) == sent.file_meta.TransferSyntaxUID
    stored = orthanc.instance_dataset(orthanc_id)
    assert stored.PixelData == sent.PixelData, "compressed pixel data changed on the way"


@pytest.mark.parametrize("name", UNCOMPRESSED)
def test_uncompressed_object_keeps_its_transfer_syntax_and_content(
    name: str, importer: Importer, orthanc: Orthanc, tmp_path: Path
) -> None:
    sent = _bundled_copy(name, tmp_path / name)
    uid = str(sent.SOPInstanceUID)

    status = send_file(HOST, importer.port, importer.aet, tmp_path / name)

    assert status == SUCCESS
    orthanc_id = _stored_id(orthanc, uid)
    assert orthanc.transfer_syntax(orthanc_id) == sent.file_meta.TransferSyntaxUID
    assert _without_meta(orthanc.instance_dataset(orthanc_id)) == _without_meta(sent)


@pytest.mark.parametrize("name", UNCOMPRESSED)
def test_dcmsend_of_uncompressed_object_arrives_with_same_content(
    name: str, importer: Importer, orthanc: Orthanc, tmp_path: Path
) -> None:
    sent = _bundled_copy(name, tmp_path / name)
    uid = str(sent.SOPInstanceUID)

    result = dcmsend(HOST, importer.port, importer.aet, [tmp_path / name], extra=["-d"])

    assert result.returncode == 0, result.stderr[-3000:]
    assert _dcmsend_statuses(result) == {uid: SUCCESS}
    stored = orthanc.instance_dataset(_stored_id(orthanc, uid))
    # dcmsend may have converted between uncompressed syntaxes: compare decoded values, except
    # private elements (after a conversion to implicit VR nobody knows their VR any more)
    if "PixelData" in sent:
        assert (stored.pixel_array == sent.pixel_array).all()
        del stored.PixelData, sent.PixelData
    stored.remove_private_tags()
    sent.remove_private_tags()
    assert _without_meta(stored) == _without_meta(sent)


# --- (c) AE titles and (h) C-ECHO ----------------------------------------------------------


def test_echoscu_succeeds(importer: Importer) -> None:
    result = run_dcmtk(["echoscu", "-aec", importer.aet, HOST, str(importer.port)], 30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_wrong_called_aet_is_rejected(importer: Importer) -> None:
    result = run_dcmtk(["echoscu", "-aec", "WRONG", HOST, str(importer.port)], 30)
    assert result.returncode != 0
    assert "Association Rejected" in result.stdout + result.stderr

    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate(HOST, importer.port, ae_title="WRONG")
    assert assoc.is_rejected
    rejection = assoc.acceptor.primitive
    assert rejection is not None
    assert rejection.diagnostic == CALLED_AET_NOT_RECOGNISED

    assert echo(HOST, importer.port, importer.aet)
    result = run_dcmtk(["echoscu", "-aec", importer.aet, HOST, str(importer.port)], 30)
    assert result.returncode == 0, result.stdout + result.stderr


# --- metrics and health ---------------------------------------------------------------------


def test_metrics_count_what_dcmsend_stored_and_readyz_is_ok(
    importer: Importer, tmp_path: Path
) -> None:
    count = 7
    paths = generate_ct_series(tmp_path / "ct", count, rows=16, cols=16, seed=70)
    assert http_get(importer.metrics_url + "/readyz").status_code == 200
    assert http_get(importer.metrics_url + "/healthz").text == "ok\n"

    result = dcmsend(HOST, importer.port, importer.aet, [tmp_path / "ct"])

    assert result.returncode == 0, result.stderr[-3000:]
    response = http_get(importer.metrics_url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert f"\ndicomadapter_import_cstore_requests_total {count}.0\n" in response.text
    metrics = scrape_metrics(importer.metrics_url)
    assert metrics["dicomadapter_import_started_total"] == 1
    assert metrics["dicomadapter_import_cstore_errors_total"] == 0
    # The Part-10 files as received: the sent files, with the adapter's own file meta group.
    file_bytes = sum(p.stat().st_size for p in paths)
    received = metrics["dicomadapter_import_cstore_bytes_total"]
    assert file_bytes - 200 * count < received < file_bytes + 200 * count
    assert metrics["dicomadapter_import_cstore_seconds_count"] == count
    assert http_get(importer.metrics_url + "/readyz").status_code == 200
    announced = [
        r for r in importer.log_records() if r["message"].startswith("metrics and health on port")
    ]
    assert [r["message"] for r in announced] == [
        f"metrics and health on port {importer.metrics_port}"
    ]


# --- (d) unusable data sets ----------------------------------------------------------------


@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "SOPClassUID"])
def test_data_set_without_sop_uid_is_refused_with_cannot_understand(
    keyword: str, importer: Importer, orthanc: Orthanc, tmp_path: Path
) -> None:
    (path,) = generate_ct_series(tmp_path / "ct", 1, rows=16, cols=16, seed=4)
    ds = pydicom.dcmread(path)
    uid = str(ds.file_meta.MediaStorageSOPInstanceUID)
    delattr(ds, keyword)  # the file meta still names both UIDs, so the C-STORE request does
    ds.save_as(path, enforce_file_format=True)

    status = send_file(HOST, importer.port, importer.aet, path)

    assert status == CANNOT_UNDERSTAND
    assert orthanc.find_instance(uid) is None
    assert importer.running()


def test_instance_the_archive_refuses_gets_a_failure_status(
    importer: Importer, orthanc: Orthanc, tmp_path: Path
) -> None:
    (path,) = generate_ct_series(tmp_path / "ct", 1, rows=16, cols=16, seed=9)
    ds = pydicom.dcmread(path)
    del ds.StudyInstanceUID  # Orthanc answers STOW-RS with 400 for this
    ds.save_as(path, enforce_file_format=True)

    status = send_file(HOST, importer.port, importer.aet, path)

    assert status is not None
    assert status >> 12 in (0xA, 0xC), f"status {status:#06x} is not a failure"
    assert orthanc.find_instance(str(ds.SOPInstanceUID)) is None


# --- (e) garbage and aborts ----------------------------------------------------------------


def _send_garbage(importer: Importer) -> None:
    """64 KiB of random bytes on a raw connection, as a port scanner or a confused client."""
    # the importer may hang up before reading it all; that is fine
    with (
        socket.create_connection((HOST, importer.port), timeout=10) as sock,
        contextlib.suppress(OSError),
    ):
        sock.sendall(os.urandom(64 * 1024))


def test_garbage_and_aborts_leave_the_daemon_serving(
    start_importer: StartImporter, orthanc: Orthanc, tmp_path: Path
) -> None:
    # short grace: how fast shutdown is after garbage is the next test's business
    importer = start_importer("--shutdown_grace_period=5")
    _send_garbage(importer)

    ae = AE(ae_title="ABORTER")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate(HOST, importer.port, ae_title=importer.aet)
    assert assoc.is_established
    assoc.abort()

    large = tmp_path / "large.dcm"
    large_uid = write_large_instance(large, 32 * 1024 * 1024)
    # half of the data set, then A-ABORT; and half of it, then a plain TCP close (a crash)
    interrupt_c_store(HOST, importer.port, importer.aet, large, 16 * 1024 * 1024, abort=True)
    interrupt_c_store(HOST, importer.port, importer.aet, large, 16 * 1024 * 1024, abort=False)

    assert importer.running(), importer.log_text()[-3000:]
    assert echo(HOST, importer.port, importer.aet)
    (path,) = generate_ct_series(tmp_path / "ct", 1, rows=32, cols=32, seed=5)
    assert send_file(HOST, importer.port, importer.aet, path) == SUCCESS
    _stored_id(orthanc, str(pydicom.dcmread(path).SOPInstanceUID))
    assert orthanc.find_instance(large_uid) is None, "a truncated, aborted instance was stored"


def test_garbage_connection_does_not_hold_up_shutdown(start_importer: StartImporter) -> None:
    importer = start_importer("--shutdown_grace_period=60")
    _send_garbage(importer)
    assert echo(HOST, importer.port, importer.aet)

    started = time.monotonic()
    exit_code: int | None = None
    with contextlib.suppress(TimeoutError):  # stop() kills the process on timeout
        exit_code = importer.stop(signal.SIGTERM, timeout=10)
    elapsed = time.monotonic() - started

    assert exit_code is not None, (
        "SIGTERM took over 10 s after a garbage connection (grace period 60 s): the dead "
        "connection is waited for as if it were a running association"
    )
    assert exit_code == 0
    assert elapsed < 10


def test_large_instance_arrives_intact(
    importer: Importer, orthanc: Orthanc, tmp_path: Path
) -> None:
    path = tmp_path / "large.dcm"
    uid = write_large_instance(path, 48 * 1024 * 1024, seed=7)

    assert send_file(HOST, importer.port, importer.aet, path) == SUCCESS

    header = pydicom.dcmread(path, stop_before_pixels=True)
    pixel_element = 12 + int(header.NumberOfFrames) * header.Rows * header.Columns
    stored = orthanc.instance_file(_stored_id(orthanc, uid))
    # the pixel data element (header and value) ends both files, byte for byte
    assert stored[-pixel_element:] == path.read_bytes()[-pixel_element:], "pixel data changed"


# --- (f) upstream down ---------------------------------------------------------------------


def test_unreachable_dicomweb_is_a_failure_never_success(
    start_importer: StartImporter, tmp_path: Path
) -> None:
    nothing_listens = f"http://127.0.0.1:{free_port()}/dicom-web"
    importer = start_importer(
        "--upstream_retry_deadline=2", "--http_timeout=1", dicomweb_address=nothing_listens
    )
    first, second = generate_ct_series(tmp_path / "ct", 2, rows=16, cols=16, seed=6)

    started = time.monotonic()
    assert send_file(HOST, importer.port, importer.aet, first) == OUT_OF_RESOURCES
    # the retry deadline (2 s) bounds the wait, not the sender's DIMSE timeout
    assert time.monotonic() - started < 15

    # dcmsend exits 0 even when every store is refused; the refusal shows in its output
    result = dcmsend(HOST, importer.port, importer.aet, [second], extra=["-d"])
    uid = str(pydicom.dcmread(second).SOPInstanceUID)
    assert _dcmsend_statuses(result) == {uid: OUT_OF_RESOURCES}
    assert "with status SUCCESS" not in result.stdout + result.stderr
    assert importer.running()


# --- (g) SIGTERM ---------------------------------------------------------------------------

GRACE_SECONDS = 10


def test_sigterm_during_dcmsend_loses_nothing_acknowledged(
    start_importer: StartImporter, orthanc: Orthanc, tmp_path: Path
) -> None:
    importer = start_importer(f"--shutdown_grace_period={GRACE_SECONDS}")
    paths = generate_ct_series(tmp_path / "ct", 50, rows=512, cols=512, seed=8)
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
    before = orthanc.count_instances()
    output_path = tmp_path / "dcmsend.out"

    with output_path.open("w") as output:
        sender = subprocess.Popen(
            [dcmtk_tool("dcmsend"), "-d", "-aec", importer.aet, HOST, str(importer.port)]
            + [str(p) for p in paths],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=dcmtk_env(),
        )
        try:

            def first_arrived() -> bool:
                if sender.poll() is not None:
                    pytest.fail(f"dcmsend exited first:\n{output_path.read_text()[-3000:]}")
                return orthanc.count_instances() != before

            wait_until(first_arrived, 60.0, "the first instance in Orthanc", interval=0.02)
            still_sending = sender.poll() is None

            exit_code = importer.stop(signal.SIGTERM, timeout=GRACE_SECONDS + 10)

            sender.wait(timeout=60)
        finally:
            if sender.poll() is None:
                sender.kill()
                sender.wait()

    assert still_sending, "dcmsend finished before SIGTERM; the test needs a bigger transfer"
    assert exit_code == 0
    statuses = parse_dcmsend_debug(output_path.read_text())
    acknowledged = [uid for uid in uids if statuses.get(uid) == SUCCESS]
    lost = [uid for uid in acknowledged if orthanc.find_instance(uid) is None]
    assert lost == [], f"{len(lost)} of {len(acknowledged)} acknowledged instances are missing"
    # the contract: running associations are allowed to finish within the grace period
    assert sender.returncode == 0
    assert len(acknowledged) == len(uids)
