"""The spool on Cloud Storage (`gs://bucket/prefix`): the local spool's queue, as objects.

Layout, one prefix per replica (its pod name, env HOSTNAME) so replicas never upload each
other's items:
- `<prefix>/<replica>/queue/<arrival ns>-<serial>-<SOP Instance UID>.dcm`: written (the
  upload call returned) before the C-STORE is acknowledged; the received local file is then
  removed. Deleted once STOW-RS stored it.
- `<prefix>/<replica>/failed/<name>` and `<name>.json` (the same reason fields as the local
  spool): copied there, reason written, then the queue object deleted. A crash between the
  steps leaves the item in both areas; it is uploaded (or failed) again on replay.
Every call blocks (google-cloud-storage is synchronous): callers run them in a thread, never
on the event loop. depth() and oldest_age() answer from memory (/metrics calls them).
Cloud Storage has no lock: two processes with the same replica name would upload the same
items (a STOW of a stored instance counts as delivered, so nothing is lost, but work doubles).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

from dicom_adapter.errors import ConfigError
from dicom_adapter.spool.base import SUFFIX, name_arrival_ns, queue_name

SCHEME = "gs://"
QUEUE = "queue"
FAILED = "failed"
NOTE_SUFFIX = ".json"
RESCAN_SECONDS = 2.0  # one object listing per replica every 2 s (~43k class A operations/day)
CALL_TIMEOUT = 20.0  # default seconds per Cloud Storage request (connect, and between bytes)
RETRY_SECONDS = 60.0  # default budget for retrying a Cloud Storage call
SCRATCH_PREFIX = "cstore-gcs-"  # in importer/cstore_spool.py's run directory: swept with it
_SCOPES = ("https://www.googleapis.com/auth/devstorage.read_write",)


@dataclass(frozen=True)
class GcsLocation:
    """`gs://bucket/prefix`, split; `prefix` has no leading or trailing slash (may be empty)."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, location: str) -> GcsLocation:
        """Split a gs:// location; ValueError naming what is wrong."""
        if not location.startswith(SCHEME):
            raise ValueError(f"{location!r} is not a gs://bucket/prefix location")
        bucket, _, prefix = location.removeprefix(SCHEME).partition("/")
        if not bucket:
            raise ValueError(f"{location!r} names no bucket (gs://bucket/prefix)")
        parts = [part for part in prefix.split("/") if part]
        if any(part in (".", "..") for part in parts):
            raise ValueError(f"{location!r}: '.' and '..' are not allowed in the prefix")
        return cls(bucket, "/".join(parts))

    def replica_root(self, replica: str) -> str:
        """`<prefix>/<replica>/` (object names start with it)."""
        return f"{self.prefix}/{replica}/" if self.prefix else f"{replica}/"

    def area(self, replica: str, area: str) -> str:
        """`<prefix>/<replica>/<area>/`."""
        return f"{self.replica_root(replica)}{area}/"

    def url(self, name: str = "") -> str:
        """gs:// URL of an object name (or of the bucket)."""
        return f"{SCHEME}{self.bucket}/{name}"


def is_gcs(location: str) -> bool:
    """True for a gs:// spool location."""
    return location.startswith(SCHEME)


def replica_name(environ: Mapping[str, str] | None = None) -> str:
    """This replica's prefix: env HOSTNAME (the pod name in Kubernetes), else the host name."""
    env = os.environ if environ is None else environ
    name = env.get("HOSTNAME", "").strip() or socket.gethostname()
    check_replica(name)
    return name


def check_replica(name: str) -> None:
    """ValueError for a name that cannot be one path segment of an object name."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"{name!r} cannot name a replica (one path segment, no '/')")


class StorageError(OSError):
    """A Cloud Storage call failed (the spool's callers handle OSError)."""


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Cloud Storage and auth errors as OSError; a missing object as FileNotFoundError."""
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth

    try:
        yield
    except api.NotFound as exc:
        raise FileNotFoundError(str(exc)) from exc
    except (api.GoogleAPIError, auth.GoogleAuthError, ValueError) as exc:
        raise StorageError(f"Cloud Storage: {exc}") from exc


class Storage:
    """google-cloud-storage clients, one per thread (sharing one credential).

    Every call is bounded: `timeout` per request, transient errors retried for at most
    `retry_seconds` (the library's default would retry an upload for 120 s while a C-STORE
    waits for its answer).
    """

    def __init__(
        self,
        location: GcsLocation,
        project: str,
        *,
        timeout: float = CALL_TIMEOUT,
        retry_seconds: float = RETRY_SECONDS,
    ) -> None:
        from google.cloud.storage import Client
        from google.cloud.storage.retry import DEFAULT_RETRY

        self.location = location
        self._project = project or None
        self._credentials: Any = None
        if not os.environ.get("STORAGE_EMULATOR_HOST"):
            import google.auth
            import google.auth.exceptions

            try:
                self._credentials, _ = google.auth.default(scopes=list(_SCOPES))
            except google.auth.exceptions.DefaultCredentialsError as exc:
                raise ConfigError(
                    "persistent_file_storage_location", f"no Google credentials: {exc}"
                ) from None
        self._client_class = Client
        self.timeout = timeout
        self.retry = DEFAULT_RETRY.with_timeout(retry_seconds)
        self._local = threading.local()

    def bucket(self) -> Any:
        """This thread's handle of the bucket."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._client_class(project=self._project, credentials=self._credentials)
            self._local.client = client
        return client.bucket(self.location.bucket)

    def names(self, prefix: str) -> list[str]:
        """Object names under a prefix (one level: no deeper 'directories')."""
        with translated():
            blobs = self.bucket().list_blobs(
                prefix=prefix, delimiter="/", timeout=self.timeout, retry=self.retry
            )
            return [blob.name for blob in blobs]

    def subfolders(self, prefix: str) -> list[str]:
        """The names of the 'directories' right under a prefix."""
        with translated():
            pages = self.bucket().list_blobs(
                prefix=prefix, delimiter="/", timeout=self.timeout, retry=self.retry
            )
            for _ in pages:
                pass
            return sorted(p.removeprefix(prefix).rstrip("/") for p in pages.prefixes)

    def upload_file(self, path: Path, name: str) -> None:
        """Write a local file to an object; returns once Cloud Storage stored it."""
        with translated():
            blob = self.bucket().blob(name)
            blob.upload_from_filename(
                str(path), content_type="application/dicom", timeout=self.timeout, retry=self.retry
            )

    def upload_json(self, name: str, value: dict[str, Any]) -> None:
        """Write a small JSON object."""
        with translated():
            self.bucket().blob(name).upload_from_string(
                json.dumps(value, indent=2, sort_keys=True),
                content_type="application/json",
                timeout=self.timeout,
                retry=self.retry,
            )

    def download(self, name: str, path: Path) -> None:
        """Copy an object to a local file; FileNotFoundError when it is gone."""
        with translated():
            self.bucket().blob(name).download_to_filename(
                str(path), timeout=self.timeout, retry=self.retry
            )

    def head(self, name: str, size: int) -> bytes:
        """The first `size` bytes of an object."""
        with translated():
            blob = self.bucket().blob(name)
            data: bytes = blob.download_as_bytes(
                start=0, end=size - 1, timeout=self.timeout, retry=self.retry
            )
            return data

    def read_json(self, name: str) -> dict[str, Any]:
        """A JSON object's content ({} when missing or not a JSON object)."""
        try:
            with translated():
                loaded = json.loads(
                    self.bucket()
                    .blob(name)
                    .download_as_bytes(timeout=self.timeout, retry=self.retry)
                )
        except (OSError, ValueError):
            return {}
        return loaded if isinstance(loaded, dict) else {}

    def copy(self, source: str, target: str) -> None:
        """Server-side copy; FileNotFoundError when the source is gone."""
        with translated():
            bucket = self.bucket()
            bucket.copy_blob(
                bucket.blob(source), bucket, target, timeout=self.timeout, retry=self.retry
            )

    def move(self, source: str, target: str) -> None:
        """Copy, then delete the source (Cloud Storage has no rename)."""
        self.copy(source, target)
        with translated():
            self.bucket().blob(source).delete(timeout=self.timeout, retry=self.retry)

    def delete(self, name: str) -> None:
        """Delete an object; a missing one is fine."""
        with contextlib.suppress(FileNotFoundError), translated():
            self.bucket().blob(name).delete(timeout=self.timeout, retry=self.retry)


class GcsSpool:
    """One replica's queue and failed area under `gs://bucket/prefix/<replica>/`."""

    incoming: Path | None = None  # received in the temp directory (importer/cstore_spool.py)
    rescan_seconds = RESCAN_SECONDS
    files_in_place = False  # materialize() downloads a scratch copy

    def __init__(
        self,
        storage: Storage,
        replica: str,
        *,
        scratch: Path,
        headroom_bytes: int,
        keep_received: bool = False,
        area: str = "",
    ) -> None:
        check_replica(replica)
        self.storage = storage
        self.location = storage.location
        self.replica = replica
        # `area`: "" for the replica's own queue, `dest/<id>/` for a routing destination's
        self.area_root = self.location.replica_root(replica) + area
        self.queue_prefix = f"{self.area_root}{QUEUE}/"
        self.failed_prefix = f"{self.area_root}{FAILED}/"
        self.scratch = scratch
        self.headroom_bytes = headroom_bytes
        self._wanted = 0  # bytes of the last refused instance: not ready until they would fit
        # synchronous mode: the STOW reads the received file, not a download of the object
        self._keep_received = keep_received
        self._held: dict[str, Path] = {}
        self._lock = threading.Lock()
        self._waiting: dict[str, int] = {}  # queue names -> arrival ns, for depth and age
        self._serial = itertools.count()

    @property
    def root(self) -> str:
        """gs:// URL of this replica's area (for log lines)."""
        return self.location.url(self.location.replica_root(self.replica))

    def close(self) -> None:
        """Nothing is held on Cloud Storage; scratch files go with their run directory."""

    def free_bytes(self) -> int:
        """Bytes free on the LOCAL volume where C-STOREs are received."""
        stats = os.statvfs(self.scratch)
        return stats.f_bavail * stats.f_frsize

    def has_room(self) -> bool:
        """Only the local receiving volume's headroom: a bucket has no useful 'free space'."""
        return self.free_bytes() >= self.headroom_bytes + self._wanted

    def refusal(self, size: int) -> str | None:
        """Below the local headroom (no byte cap for a bucket), else None."""
        free = self.free_bytes()
        if free < self.headroom_bytes:
            self._wanted = max(1, size)
            return f"receiving volume below its headroom ({free} bytes free)"
        self._wanted = 0
        return None

    def refused(self, size: int) -> None:
        """A received file could not be written locally: not ready until it would fit."""
        self._wanted = max(1, size)

    def add_incoming(self, delta: int) -> None:
        """Received bytes are not capped for a gs:// spool (the headroom covers the volume)."""

    def commit(self, path: Path, sop_instance_uid: str) -> PurePath:
        """Write the received file to `queue/<name>`; after that the local file is removed."""
        name = queue_name(time.time_ns(), next(self._serial), sop_instance_uid)
        item = self.commit_as(path, name)
        if self._keep_received:
            with self._lock:
                self._held[name] = path
        else:
            path.unlink(missing_ok=True)
        return item

    def commit_as(self, path: Path, name: str) -> PurePath:
        """Write `path` to `queue/<name>` and count it queued; the local file is left alone."""
        item = PurePosixPath(self.queue_prefix + name)
        self.storage.upload_file(path, str(item))
        with self._lock:
            self._waiting[name] = name_arrival_ns(name) or time.time_ns()
        return item

    def queued(self) -> list[PurePath]:
        """List `queue/` (arrival order); also refreshes what depth() and oldest_age() say."""
        names = [n for n in self.storage.names(self.queue_prefix) if n.endswith(SUFFIX)]
        items: list[PurePath] = [PurePosixPath(n) for n in names]
        items.sort(key=lambda p: (name_arrival_ns(p.name) or 0, p.name))
        with self._lock:
            self._waiting = {p.name: name_arrival_ns(p.name) or time.time_ns() for p in items}
        return items

    def depth(self) -> int:
        """Instances in queue/ as of the last listing and this process's own changes."""
        with self._lock:
            return len(self._waiting)

    def oldest_age(self) -> float:
        """Seconds since the oldest queued instance arrived (0 when none)."""
        with self._lock:
            oldest = min(self._waiting.values(), default=None)
        return 0.0 if oldest is None else max(0.0, (time.time_ns() - oldest) / 1e9)

    def materialize(self, item: PurePath) -> Path:
        """The received file (synchronous mode) or a scratch download of the object."""
        with self._lock:
            held = self._held.get(item.name)
        if held is not None:
            return held
        fd, name = tempfile.mkstemp(prefix=SCRATCH_PREFIX, suffix=SUFFIX, dir=self.scratch)
        os.close(fd)
        local = Path(name)
        try:
            self.storage.download(str(item), local)
        except BaseException:
            local.unlink(missing_ok=True)
            raise
        return local

    def release(self, item: PurePath, local: Path) -> None:
        """Remove the scratch download (or the held received file)."""
        with self._lock:
            self._held.pop(item.name, None)
        local.unlink(missing_ok=True)

    def _forget(self, item: PurePath) -> None:
        with self._lock:
            self._waiting.pop(item.name, None)

    def delivered(self, item: PurePath) -> None:
        """Delete the queue object."""
        self.storage.delete(str(item))
        self._forget(item)

    def fail(self, item: PurePath, reason: dict[str, Any]) -> str:
        """Copy to failed/, write `<name>.json`, delete from queue/; returns the gs:// URL."""
        target = self.failed_prefix + item.name
        bucket = self.storage
        bucket.copy(str(item), target)
        bucket.upload_json(target + NOTE_SUFFIX, reason)
        bucket.delete(str(item))
        self._forget(item)
        return self.location.url(target)
