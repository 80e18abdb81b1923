"""Names of the gs:// spool: location parsing, per-replica prefixes, queue names."""

from __future__ import annotations

import socket
from pathlib import PurePosixPath

import pytest

from dicom_adapter.spool.base import name_arrival_ns, name_sop_instance_uid, queue_name
from dicom_adapter.spool.gcs import FAILED, QUEUE, GcsLocation, is_gcs, replica_name


@pytest.mark.parametrize(
    ("location", "bucket", "prefix"),
    [
        ("gs://bucket/prefix", "bucket", "prefix"),
        ("gs://bucket/a/b/", "bucket", "a/b"),
        ("gs://bucket//a//b", "bucket", "a/b"),
        ("gs://bucket", "bucket", ""),
        ("gs://bucket/", "bucket", ""),
    ],
)
def test_location_is_split_into_bucket_and_prefix(location: str, bucket: str, prefix: str) -> None:
    assert GcsLocation.parse(location) == GcsLocation(bucket, prefix)
    assert is_gcs(location)


@pytest.mark.parametrize("location", ["gs://", "gs:///p", "gs://b/../p", "gs://b/./p", "/spool"])
def test_bad_locations_are_refused(location: str) -> None:
    with pytest.raises(ValueError, match=r"gs://|bucket|not allowed"):
        GcsLocation.parse(location)


def test_each_replica_has_its_own_areas() -> None:
    location = GcsLocation.parse("gs://b/dicom/spool")
    assert location.area("pod-0", QUEUE) == "dicom/spool/pod-0/queue/"
    assert location.area("pod-0", FAILED) == "dicom/spool/pod-0/failed/"
    assert location.area("pod-1", QUEUE) == "dicom/spool/pod-1/queue/"
    # no replica's area is a prefix of another's (pod-1 vs pod-10)
    assert not location.area("pod-10", QUEUE).startswith(location.area("pod-1", QUEUE))
    assert not location.replica_root("pod-10").startswith(location.replica_root("pod-1"))
    assert GcsLocation.parse("gs://b").area("pod-0", QUEUE) == "pod-0/queue/"
    assert location.url("x/y") == "gs://b/x/y"


def test_replica_is_the_pod_name_else_the_host_name() -> None:
    assert replica_name({"HOSTNAME": "dicom-import-7c9f-x2"}) == "dicom-import-7c9f-x2"
    assert replica_name({}) == socket.gethostname()
    assert replica_name({"HOSTNAME": "  "}) == socket.gethostname()
    with pytest.raises(ValueError, match="replica"):
        replica_name({"HOSTNAME": "a/b"})


def test_queue_names_sort_by_arrival_and_keep_the_uid() -> None:
    uid = "1.2.826.0.1.3680043.8.498.1"
    first = queue_name(999_999_999, 0, uid)
    later = queue_name(1_000_000_000, 1, uid)
    assert first == f"999999999-0-{uid}.dcm"
    names = sorted([later, first], key=lambda n: name_arrival_ns(n) or 0)
    assert names == [first, later]
    assert name_sop_instance_uid(first) == uid
    assert name_arrival_ns(PurePosixPath("spool/pod-0/queue/" + later).name) == 1_000_000_000


def test_unsafe_uid_characters_cannot_leave_the_queue_area() -> None:
    name = queue_name(1, 2, "../../other-pod/queue/x")
    assert "/" not in name
    assert name == "1-2-.._.._other_pod_queue_x.dcm"
    assert name_arrival_ns("not-ours.dcm") is None
